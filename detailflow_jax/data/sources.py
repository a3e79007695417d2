"""Random-access sources for Grain: ImageNet folders, TFDS ArrayRecord, token records, shapes.

Image sources return undecoded records ({"image": encoded bytes, "label": int, "name": str}) so
that decoding, and the handling of files that turn out to be bad, happens in the transforms
where it can be counted and replaced deterministically.
"""
import contextlib
import hashlib
import json
import logging
import os
import pathlib

import numpy as np

from .. import paths

log = logging.getLogger("detailflow_jax")

# torchvision's IMG_EXTENSIONS, compared case-insensitively as ImageFolder does.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _default_cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("DETAILFLOW_CACHE", pathlib.Path.home() / ".cache" / "detailflow_jax"))


class ImageFolderSource:
  """`<root>/<split>/<wnid>/*.JPEG` with labels = index of the wnid in sorted order (as
  torchvision's ImageFolder). The file index is built once and cached as JSON."""

  def __init__(self, root, split: str | None = "train", cache_dir=None):
    self.root = pathlib.Path(root)
    if not self.root.is_dir():
      raise FileNotFoundError(f"dataset root does not exist: {self.root}")
    if split and (self.root / split).is_dir():
      self.split_dir = self.root / split
    else:
      # The reference passes the split directory itself (…/train) as the ImageFolder root.
      self.split_dir = self.root
      if split:
        log.info("%s has no %r folder: reading class folders directly under it", self.root, split)
    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    key = hashlib.sha1(str(self.split_dir.resolve()).encode()).hexdigest()[:16]
    self.index_path = cache_dir / f"imagefolder-{key}.json"
    index = self._load_cached_index()
    if index is None:
      index = self._build_index()
      try:
        with paths.atomic_file(self.index_path, shared=True) as tmp:
          tmp.write_text(json.dumps(index))
      except OSError as e:  # A read-only cache is no reason to fail.
        log.warning("could not cache the file index at %s: %s", self.index_path, e)
    self.classes: list[str] = index["classes"]
    self.files: list[str] = index["files"]
    self.labels = np.asarray(index["labels"], np.int32)
    if not self.files:
      raise FileNotFoundError(f"no images under {self.split_dir} (looked for {', '.join(IMAGE_SUFFIXES)})")

  def _signature(self) -> dict[str, float]:
    return {d.name: d.stat().st_mtime for d in sorted(self.split_dir.iterdir()) if d.is_dir()}

  def _load_cached_index(self) -> dict | None:
    if not self.index_path.is_file():
      return None
    try:
      index = json.loads(self.index_path.read_text())
    except (OSError, json.JSONDecodeError):
      return None
    return index if index.get("signature") == self._signature() else None

  def _build_index(self) -> dict:
    classes = sorted(d.name for d in self.split_dir.iterdir() if d.is_dir())
    files, labels = [], []
    for label, wnid in enumerate(classes):
      names = self._list_class(wnid)
      if not names:
        log.warning("class folder %s has no images (its label %d stays reserved)",
                    self.split_dir / wnid, label)
      files += names
      labels += [label] * len(names)
    log.info("indexed %d images in %d classes under %s", len(files), len(classes), self.split_dir)
    return {"classes": classes, "files": files, "labels": labels, "signature": self._signature()}

  def _list_class(self, wnid: str) -> list[str]:
    """Image paths relative to the split folder, in torchvision ImageFolder's order (sorted
    os.walk following links, names sorted), so index i is ImageFolder's sample i."""
    def on_error(e):  # An unreadable folder keeps its label but adds no images.
      log.warning("cannot list %s: %s", e.filename, e)
    names = []
    for folder, _, fnames in sorted(os.walk(self.split_dir / wnid, followlinks=True, onerror=on_error)):
      rel = pathlib.Path(folder).relative_to(self.split_dir)
      names += [str(rel / f) for f in sorted(fnames) if f.lower().endswith(IMAGE_SUFFIXES)]
    return names

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict:
    name = self.files[index]
    try:
      data = (self.split_dir / name).read_bytes()
    except OSError as e:
      log.warning("cannot read %s: %s", self.split_dir / name, e)
      data = b""
    return {"image": data, "label": int(self.labels[index]), "name": name}

  def __repr__(self):
    return f"ImageFolderSource({self.split_dir}, {len(self)} images)"


class TFDSSource:
  """TFDS ArrayRecord data through `tfds.data_source` (no TensorFlow, no tf.data). TFDS decodes
  the stored JPEGs with numpy/PIL, so records carry uint8 HWC arrays."""

  def __init__(self, name: str = "imagenet2012", split: str = "train", data_dir=None):
    import tensorflow_datasets as tfds
    self._source = tfds.data_source(name, split=split, data_dir=data_dir)
    self.name = f"{name}/{split}"
    if len(self._source) == 0:
      raise FileNotFoundError(f"TFDS {self.name} has no examples (data_dir={data_dir})")

  def __len__(self) -> int:
    return len(self._source)

  def __repr__(self):
    return f"TFDSSource({self.name}, {len(self)} images)"

  def __getitem__(self, index: int) -> dict:
    record = self._source[index]
    name = record.get("file_name", b"")
    name = name.decode() if isinstance(name, bytes) else str(name)
    return {"image": np.asarray(record["image"]), "label": int(record["label"]),
            "name": f"{self.name}[{index}] {name}".rstrip()}


# --- token records ---------------------------------------------------------------------------
# One record per image: int32 header (views, length, width, label) + int32 codes [views, length,
# width]. `views` are the augmentations the extraction job encoded (the reference stores the image
# and its flip, or ten crops) and training picks one per sample; `width` is 1 for plain codes or 3
# for self-correction triples (clean codes, codes of the perturbed input, corrected labels).

_HEADER = 4


def encode_token_record(tokens: np.ndarray, label: int) -> bytes:
  """tokens: [T] codes, [T, 3] triples, or [A, T, W] with A augmented views (W = 1 or 3)."""
  tokens = np.asarray(tokens)
  if tokens.ndim == 1:
    tokens = tokens[None, :, None]
  elif tokens.ndim == 2:
    tokens = tokens[None]
  if tokens.ndim != 3 or tokens.shape[-1] not in (1, 3):
    raise ValueError(f"tokens must be [T], [T, 3] or [views, T, 1|3], got shape {tokens.shape}")
  header = np.asarray([*tokens.shape, label], np.int32)
  return header.tobytes() + np.ascontiguousarray(tokens, dtype=np.int32).tobytes()


def decode_token_record(data: bytes) -> dict:
  """-> {"tokens": [views, T, W] int32, "label": int32}."""
  views, length, width, label = np.frombuffer(data[:4 * _HEADER], np.int32)
  tokens = np.frombuffer(data[4 * _HEADER:], np.int32).reshape(views, length, width)
  return {"tokens": tokens, "label": np.int32(label)}


class TokenRecordWriter:
  """Writes token records into `<directory>/<prefix>-<shard>.array_record` (one file per shard).
  A remote directory (gs://..., etils.epath) gets the shard written locally and uploaded whole
  at close (ArrayRecord writes local files; an object appears only once its upload is done)."""

  def __init__(self, directory, shard: int = 0, prefix: str = "tokens"):
    from array_record.python.array_record_module import ArrayRecordWriter
    self.path = paths.run_path(directory) / f"{prefix}-{shard:05d}.array_record"
    # Held open until close/__exit__: the shard appears under self.path only when finished.
    self._staging = contextlib.ExitStack()
    self._tmp = self._staging.enter_context(paths.atomic_file(self.path))
    self._writer = ArrayRecordWriter(str(self._tmp), "group_size:1")
    self.count = 0

  def write(self, tokens: np.ndarray, label: int) -> None:
    """tokens: see encode_token_record."""
    self._writer.write(encode_token_record(tokens, label))
    self.count += 1

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    if exc_info[0] is None:
      self.close()
    else:  # A failed job leaves no half-written shard under the final name.
      self._writer.close()
      self._staging.__exit__(*exc_info)

  def close(self) -> pathlib.Path:
    """Finishes the shard; it only appears under its final name once complete."""
    self._writer.close()
    self._staging.close()
    return self.path


def _local_copy(remote, cache_dir=None) -> str:
  """A local copy of a remote shard, keyed by its URI; copied again if the size differs."""
  root = pathlib.Path(cache_dir) if cache_dir is not None else _default_cache_dir() / "token_records"
  key = hashlib.sha256(os.fspath(remote).encode()).hexdigest()[:16]
  local = root / key / remote.name
  if not local.is_file() or local.stat().st_size != paths.file_size(remote):
    with paths.atomic_file(local, shared=True) as tmp:
      tmp.write_bytes(remote.read_bytes())
  return str(local)


class TokenRecordSource:
  """All `*.array_record` token shards under a directory (or an explicit list of files).
  Remote shards (gs://..., etils.epath) are copied once into a local cache directory
  (`cache_dir`, default $DETAILFLOW_CACHE/token_records): ArrayRecord reads local files."""

  def __init__(self, files, cache_dir=None):
    import grain
    if isinstance(files, (str, os.PathLike)):
      root = paths.run_path(files)
      if not root.exists():
        raise FileNotFoundError(f"token record path does not exist: {root}")
      files = sorted(root.glob("*.array_record"), key=os.fspath) if root.is_dir() else [root]
    if not files:
      raise FileNotFoundError("no .array_record token shards found")
    files = [_local_copy(paths.run_path(p), cache_dir) if paths.is_remote(p) else str(p) for p in files]
    self.paths = files
    self._source = grain.sources.ArrayRecordDataSource(files)

  def __len__(self) -> int:
    return len(self._source)

  def __repr__(self):
    return f"TokenRecordSource({len(self.paths)} shards, {len(self)} records)"

  def __getitem__(self, index: int) -> dict:
    """-> {"tokens": [views, T, W] int32, "label"}."""
    return decode_token_record(self._source[index])


# --- procedural shapes -----------------------------------------------------------------------

SHAPES = ("disc", "square", "triangle", "ring", "cross", "diamond", "hbar", "vbar")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "white")
PALETTE = np.asarray([[230, 40, 40], [40, 200, 60], [40, 90, 230], [240, 200, 30],
                      [200, 50, 220], [30, 210, 220], [250, 130, 20], [245, 245, 245]], np.float32)
# "textured": small shapes anywhere on dim stripe textures (the tokenizer tests' data).
# "plain": one large, near-centred shape on a flat dark background (the demo's data: all of a
#          tiny tokenizer's capacity goes to the shape's outline and colour).
SHAPE_STYLES = ("textured", "plain")


def class_shape_colour(label: int):
  """Class c = (shape c % 8, colour (c // 8 + c) % 8): distinct pairs for up to 64 classes;
  classes 0-7 are red disc, green square, blue triangle, yellow ring, magenta cross, cyan
  diamond, orange hbar, white vbar."""
  shape, colour = class_shape_colour_index(label)
  return SHAPES[shape], PALETTE[colour]


def class_shape_colour_index(label: int):
  """(index into SHAPES, index into COLOURS / PALETTE) of class `label`."""
  return label % len(SHAPES), (label // len(SHAPES) + label) % len(PALETTE)


def _shape_mask(shape: str, yy, xx, cy, cx, r):
  dy, dx = (yy - cy) / r, (xx - cx) / r
  if shape == "disc":
    return dy ** 2 + dx ** 2 <= 1
  if shape == "square":
    return (np.abs(dy) <= 0.8) & (np.abs(dx) <= 0.8)
  if shape == "triangle":
    return (dy <= 0.8) & (dy >= -0.9) & (np.abs(dx) <= (dy + 0.9) * 0.6)
  if shape == "ring":
    d = dy ** 2 + dx ** 2
    return (d <= 1) & (d >= 0.45)
  if shape == "cross":
    return ((np.abs(dy) <= 0.3) & (np.abs(dx) <= 1)) | ((np.abs(dx) <= 0.3) & (np.abs(dy) <= 1))
  if shape == "diamond":
    return np.abs(dy) + np.abs(dx) <= 1
  if shape == "hbar":
    return (np.abs(dy) <= 0.35) & (np.abs(dx) <= 1)
  return (np.abs(dx) <= 0.35) & (np.abs(dy) <= 1)


def render_shape(rng: np.random.Generator, size: int, shape: int, colour: int,
                 style: str = "textured") -> np.ndarray:
  """One [size, size, 3] uint8 image of SHAPES[shape] in PALETTE[colour], drawn with `rng`."""
  if style not in SHAPE_STYLES:
    raise ValueError(f"shape style {style!r} is not one of {SHAPE_STYLES}")
  n = size
  yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
  if style == "textured":
    # Background: a dim two-colour stripe texture at a random angle and frequency.
    base = rng.uniform(20, 90, size=3).astype(np.float32)
    other = base + rng.uniform(-25, 25, size=3).astype(np.float32)
    angle = rng.uniform(0, np.pi)
    freq = rng.uniform(2, 6) * 2 * np.pi / n
    stripes = 0.5 + 0.5 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    img = base[None, None] * (1 - stripes[..., None]) + other[None, None] * stripes[..., None]
    img += rng.normal(0, 4, size=img.shape).astype(np.float32)
    r = n * rng.uniform(0.22, 0.32)
    cy, cx = rng.uniform(r + 1, n - r - 1, size=2)
  else:
    img = np.broadcast_to(rng.uniform(15, 45, size=3).astype(np.float32), (n, n, 3)).copy()
    r = n * rng.uniform(0.34, 0.42)
    cy, cx = n / 2 + rng.uniform(-0.08, 0.08, size=2) * n
  mask = _shape_mask(SHAPES[shape], yy, xx, cy, cx, r)
  img[mask] = PALETTE[colour] * rng.uniform(0.85, 1.0)
  return np.clip(img, 0, 255).astype(np.uint8)


class ProceduralShapes:
  """Coloured shapes of `num_classes` classes (class_shape_colour) in one of SHAPE_STYLES;
  item i is a fixed function of (seed, i), at any resolution. Records hold decoded uint8 images."""

  def __init__(self, num_classes: int = 10, image_size: int = 64, size: int = 10000, seed: int = 0,
               style: str = "textured"):
    if not 1 <= num_classes <= len(SHAPES) * len(PALETTE):
      raise ValueError(f"num_classes must be in [1, {len(SHAPES) * len(PALETTE)}]")
    if style not in SHAPE_STYLES:
      raise ValueError(f"shape style {style!r} is not one of {SHAPE_STYLES}")
    self.num_classes, self.image_size, self.size, self.seed = num_classes, image_size, size, seed
    self.style = style

  def __len__(self) -> int:
    return self.size

  def render(self, index: int) -> dict:
    rng = np.random.default_rng([self.seed, index])
    label = int(rng.integers(self.num_classes))
    shape, colour = class_shape_colour_index(label)
    image = render_shape(rng, self.image_size, shape, colour, self.style)
    return {"image": image, "label": label, "name": f"shapes[{index}]"}

  def __getitem__(self, index: int) -> dict:
    return self.render(index)

  def __repr__(self):
    return (f"ProceduralShapes({self.num_classes} classes, {self.style}, {self.image_size} px, "
            f"{self.size} images)")


def build_image_source(e):
  """The image source a config section names (`extract`, or the tokenizer recipe's `data`):
  `source` imagefolder | tfds | shapes and its keys."""
  if e.source == "imagefolder":
    return ImageFolderSource(e.path, e.split)
  if e.source == "tfds":
    return TFDSSource(e.get("tfds_name", "imagenet2012"), e.split, e.path or None)
  if e.source == "shapes":
    return ProceduralShapes(e.num_classes, e.shapes_size, e.num_images, e.seed,
                                    style=e.shapes_style)
  raise ValueError(f"extract.source={e.source!r} (imagefolder | tfds | shapes)")
