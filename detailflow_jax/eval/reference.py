"""ADM's batch files (reference and sample `.npz`), read and written.

A batch file holds `arr_0`: uint8 images [N, H, W, 3] (NHWC, any size: the network resizes to
299). A reference may also hold FID statistics `mu` [2048], `sigma` [2048, 2048], `mu_s` [2023],
`sigma_s` [2023, 2023]; ADM's evaluator uses them instead of recomputing (for sample files too),
and so do we. Files we write add `inception_sha256` (the converted weights' `weights_sha256`)
and `pool` (the images' pool_3 features, reused for precision/recall): statistics and features
computed with other weights are refused, never mixed. ADM's own files (e.g.
VIRTUAL_imagenet256_labeled.npz) carry no hash and are used as they are.

`arr_0` is streamed from the zip member batch by batch (a 50k-sample file is ~10 GB), as ADM's
evaluator does; files may be local or remote (gs://, through `paths`). Writing a reference from
an image set, streamed (one block of images in memory, see `write_reference`):
  python -m detailflow_jax.eval.reference --images DIR_OR_NPZ --out REF.npz --inception DIR
  python -m detailflow_jax.eval.reference --tfds imagenet2012 --split validation \
      --images TFDS_DATA_DIR --out REF.npz --inception DIR
"""
import argparse
import contextlib
import dataclasses
import logging
import pathlib
import sys
import zipfile
from collections.abc import Iterator

import numpy as np

from .. import paths
from ..cli import command
from .inception import POOL_DIM, SPATIAL_DIM, load_inception
from .scores import ScoreError, check_statistics, statistics

IMAGES_KEY = "arr_0"
HASH_KEY = "inception_sha256"
POOL_KEY = "pool"
STAT_SHAPES = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM),
               "mu_s": (SPATIAL_DIM,), "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}
log = logging.getLogger("detailflow_jax")


class EvalInputError(ValueError):
  """A batch file that cannot be evaluated; the message names the file, key and shape."""


class NpzImages:
  """`arr_0` of an npz, validated from its header and read sequentially in batches."""

  def __init__(self, path, key: str = IMAGES_KEY):
    self.path, self.key = paths.run_path(path), key
    members = npz_keys(self.path)
    if key not in members:
      raise EvalInputError(f"{self.path}: missing key {key!r} (uint8 images [N, H, W, 3]); "
                           f"the file has {sorted(members)}")
    with self._open() as f:
      header = _read_header(f)
    if header is None:  # an .npy format version without a public header reader: load it
      with _open_npz(self.path) as data:
        arr = data[key]
      header = (arr.shape, True, arr.dtype)
    shape, self._fortran, dtype = header
    self.shape, self.dtype = tuple(shape), np.dtype(dtype)
    where = f"{self.path}: {key!r} has dtype {self.dtype} and shape {self.shape}"
    if self.dtype != np.uint8:
      raise EvalInputError(f"{where}; expected uint8 images in [0, 255] (NHWC)")
    if len(self.shape) != 4 or self.shape[-1] != 3:
      hint = " (this looks like NCHW; transpose to NHWC)" if len(self.shape) == 4 and self.shape[1] == 3 else ""
      raise EvalInputError(f"{where}; expected [N, H, W, 3]{hint}")
    if min(self.shape) == 0:
      raise EvalInputError(f"{where}; it holds no images")

  @contextlib.contextmanager
  def _open(self):
    with self.path.open("rb") as raw, zipfile.ZipFile(raw) as archive, \
        archive.open(f"{self.key}.npy") as member:
      yield member

  def __len__(self) -> int:
    return self.shape[0]

  def batches(self, batch_size: int) -> Iterator[np.ndarray]:
    if self._fortran:
      with _open_npz(self.path) as data:
        arr = data[self.key]
      for i in range(0, len(arr), batch_size):
        yield np.ascontiguousarray(arr[i:i + batch_size])
      return
    per_image = int(np.prod(self.shape[1:]))
    with self._open() as f:
      _read_header(f)
      for i in range(0, len(self), batch_size):
        n = min(batch_size, len(self) - i)
        data = f.read(n * per_image)
        if len(data) != n * per_image:
          raise EvalInputError(f"{self.path}: {self.key!r} is truncated at image {i}")
        yield np.frombuffer(data, np.uint8).reshape((n,) + self.shape[1:])


def _read_header(f):
  """(shape, fortran_order, dtype) of an .npy stream positioned at its start, or None."""
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  if version == (2, 0):
    return np.lib.format.read_array_header_2_0(f)
  return None


@contextlib.contextmanager
def _open_npz(path):
  """np.load of a local or remote (`paths`) .npz, members read on demand."""
  with paths.run_path(path).open("rb") as raw, np.load(raw, allow_pickle=False) as data:
    yield data


def npz_keys(path) -> set:
  path = paths.run_path(path)
  if not path.is_file():
    raise EvalInputError(f"batch file not found: {path}")
  try:
    with path.open("rb") as raw, zipfile.ZipFile(raw) as z:
      return {n[:-4] for n in z.namelist() if n.endswith(".npy")}
  except zipfile.BadZipFile as e:
    raise EvalInputError(f"{path} is not an .npz file: {e}") from e


@dataclasses.dataclass
class BatchFile:
  """A reference or sample batch: its images and what it carries besides."""
  path: paths.AnyPath
  images: NpzImages
  stats: dict[str, np.ndarray] | None  # mu, sigma, mu_s, sigma_s (float64) or None
  pool: np.ndarray | None  # cached pool_3 features of `images` (our files only)
  weights_sha256: str | None


def load_batch(path, weights_sha256: str, min_images: int = 2) -> BatchFile:
  """Opens and validates a batch file against the Inception weights about to be used."""
  path = paths.run_path(path)
  keys = npz_keys(path)
  images = NpzImages(path)
  if len(images) < min_images:
    raise EvalInputError(f"{path}: {IMAGES_KEY!r} has shape {images.shape}; the covariance and "
                         f"precision/recall need at least {min_images} images")
  with _open_npz(path) as data:
    stored_hash = str(data[HASH_KEY]) if HASH_KEY in keys else None
    if stored_hash is not None and stored_hash != weights_sha256:
      raise EvalInputError(f"{path}: {HASH_KEY} is {stored_hash[:16]}..., but the Inception weights "
                           f"given have weights_sha256 {weights_sha256[:16]}...; statistics from "
                           "different weights cannot be compared (rewrite the file with these weights)")
    stats = None
    present = [k for k in STAT_SHAPES if k in keys]
    if present:
      missing = [k for k in STAT_SHAPES if k not in keys]
      if missing:
        raise EvalInputError(f"{path}: has {present} but is missing key(s) {missing}")
      stats = {}
      for key, shape in STAT_SHAPES.items():
        value = data[key]
        if value.shape != shape:
          raise EvalInputError(f"{path}: key {key!r} has shape {value.shape}, expected {shape}")
        stats[key] = np.asarray(value, np.float64)
      try:
        check_statistics(stats["mu"], stats["sigma"], f"{path} (mu, sigma)")
        check_statistics(stats["mu_s"], stats["sigma_s"], f"{path} (mu_s, sigma_s)")
      except ScoreError as e:
        raise EvalInputError(str(e)) from e
    pool = None
    if POOL_KEY in keys:
      pool = data[POOL_KEY]
      if pool.shape != (len(images), POOL_DIM) or stored_hash is None:
        raise EvalInputError(f"{path}: key {POOL_KEY!r} has shape {pool.shape} (expected "
                             f"{(len(images), POOL_DIM)}) or comes without {HASH_KEY}")
  return BatchFile(path, images, stats, pool, stored_hash)


def batch_statistics(batch: BatchFile, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The file's own statistics where it has them (as ADM's read_statistics), else computed."""
  if batch.stats is not None:
    return batch.stats
  try:
    mu, sigma = statistics(features["pool"], f"{batch.path} pool features")
    mu_s, sigma_s = statistics(features["spatial"], f"{batch.path} spatial features")
  except ScoreError as e:
    raise EvalInputError(str(e)) from e
  return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}


def save_npz_atomically(path, **arrays) -> paths.AnyPath:
  path = paths.run_path(path)
  with paths.atomic_file(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez adds no ".npz"
    np.savez(f, **arrays)
  return path


class ImageSet:
  """uint8 [N, size, size, 3] images read block by block (never all N at once): a directory of
  images (sorted, recursive; ADM's centre crop to `size`), an npz's arr_0 (used as it is), or a
  TFDS split (`tfds=NAME`, source = its data_dir; ADM's centre crop)."""

  def __init__(self, source, size: int, tfds: str | None = None, split: str = "validation"):
    self.size, self.name = size, str(source)
    self._npz = self._files = self._tfds = None
    if tfds:
      from ..data.sources import TFDSSource
      self._tfds = TFDSSource(tfds, split, data_dir=str(source) if source else None)
      self.name, self.shape = repr(self._tfds), (len(self._tfds), size, size, 3)
      return
    source = pathlib.Path(source)
    if source.is_file():
      self._npz = NpzImages(source)
      self.shape = self._npz.shape
      return
    if not source.is_dir():
      raise EvalInputError(f"image set not found: {source}")
    self._files = sorted(p for p in source.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not self._files:
      raise EvalInputError(f"{source}: no .png/.jpg/.jpeg files")
    self.shape = (len(self._files), size, size, 3)

  def __len__(self) -> int:
    return self.shape[0]

  def blocks(self, block_size: int) -> Iterator[np.ndarray]:
    if self._npz is not None:
      yield from self._npz.batches(block_size)
      return
    for start in range(0, len(self), block_size):
      stop = min(start + block_size, len(self))
      yield np.stack([self._image(i) for i in range(start, stop)])

  def _image(self, i: int) -> np.ndarray:
    from PIL import Image

    from ..data.transforms import center_crop_arr
    if self._tfds is not None:
      img = Image.fromarray(np.asarray(self._tfds[i]["image"]))
      return np.asarray(center_crop_arr(img.convert("RGB"), self.size), np.uint8)
    with Image.open(self._files[i]) as img:
      return np.asarray(center_crop_arr(img.convert("RGB"), self.size), np.uint8)


def read_image_set(source, size: int) -> np.ndarray:
  """All of an `ImageSet` in memory (small sets and tests; `write_reference` streams)."""
  images = ImageSet(source, size)
  return np.concatenate(list(images.blocks(1024)))


def write_reference(path, images: ImageSet, model, weights_sha256: str, batch_size: int = 256,
                    block_size: int = 1024) -> paths.AnyPath:
  """An ADM-format reference batch (arr_0, mu, sigma, mu_s, sigma_s) with our hash and cached
  pool features, in bounded memory: `block_size` images at a time are read, run through the
  network (batches of `batch_size`) and appended to arr_0 in the zip; the statistics are
  accumulated block by block (`scores.RunningStatistics`, float64) and the pool features
  spooled to a local temporary file, so memory holds one block of images plus O(D^2), for any
  N. `path` may be local or remote (gs://: uploaded when complete)."""
  import tempfile

  from .chunks import write_npz_streaming
  from .features import extract_features
  from .scores import RunningStatistics
  n, h, w, c = images.shape
  if c != 3:
    raise EvalInputError(f"reference images must be [N, H, W, 3], got {images.shape}")
  pool_stats, spatial_stats = RunningStatistics(POOL_DIM), RunningStatistics(SPATIAL_DIM)
  with tempfile.TemporaryFile() as pool_file:
    def image_blocks():
      for block in images.blocks(block_size):
        feats = extract_features(model, (block[i:i + batch_size] for i in range(0, len(block), batch_size)),
                                 len(block), batch_size, name=images.name)
        pool_stats.add(feats["pool"])
        spatial_stats.add(feats["spatial"])
        pool_file.write(np.ascontiguousarray(feats["pool"], np.float32).tobytes())
        yield block

    stats = {}

    def stat(key):
      def value():
        if not stats:
          try:
            stats["mu"], stats["sigma"] = pool_stats.result()
            stats["mu_s"], stats["sigma_s"] = spatial_stats.result()
          except ScoreError as e:
            raise EvalInputError(f"{images.name}: {e}") from e
        return stats[key]
      return value

    def pool_blocks():
      pool_file.seek(0)
      row = POOL_DIM * 4
      for start in range(0, n, block_size):
        rows = min(block_size, n - start)
        yield np.frombuffer(pool_file.read(rows * row), np.float32).reshape(rows, POOL_DIM)

    members = {IMAGES_KEY: ((n, h, w, 3), np.uint8, image_blocks())}
    members.update({k: stat(k) for k in STAT_SHAPES})
    members[POOL_KEY] = ((n, POOL_DIM), np.float32, pool_blocks())
    members[HASH_KEY] = lambda: np.array(weights_sha256)
    return write_npz_streaming(path, members)


@command
def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m detailflow_jax.eval.reference",
                                   description="Write an ADM-format reference batch from an image set "
                                               "(streamed: memory holds one block of images).")
  parser.add_argument("--images", default=None,
                      help="directory of images, an npz with arr_0, or with --tfds the TFDS data_dir")
  parser.add_argument("--tfds", default=None, help="a TFDS dataset name (e.g. imagenet2012) to read instead")
  parser.add_argument("--split", default="validation", help="the TFDS split (with --tfds)")
  parser.add_argument("--out", required=True, help="output .npz (local or gs://)")
  parser.add_argument("--inception", required=True, help="converted Inception directory")
  parser.add_argument("--size", type=int, default=256, help="center-crop size for image directories / TFDS")
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--block-size", type=int, default=1024, help="images read and held at a time")
  args = parser.parse_args(argv)
  if not args.images and not args.tfds:
    parser.error("give --images DIR_OR_NPZ, or --tfds NAME [--images DATA_DIR]")
  for key in ("size", "batch_size", "block_size"):
    if getattr(args, key) < 1:
      parser.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
  model, info = load_inception(args.inception)
  images = ImageSet(args.images, args.size, tfds=args.tfds, split=args.split)
  out = write_reference(args.out, images, model, info["weights_sha256"], args.batch_size, args.block_size)
  print(f"wrote {out} ({len(images)} images)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
