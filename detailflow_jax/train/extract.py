"""Code extraction for AR training: images -> tokenizer codes -> ArrayRecord token records.

As the reference's extract_codes_c2i: each image is centre-cropped to crop_range x the
resolution and cut into ten crops (4 corners + centre, and their mirror images), or kept
whole plus its mirror image; every view is encoded with the resolution's best token count.
With self-correction (`correction_training` tokenizers) each record holds the triple
(clean codes, codes of the perturbed input, corrected targets) from `Tokenizer.self_correct`,
with one noise index drawn per image and shared by its views (as the reference). The noise
index is traced and every batch is padded to one size, so a run compiles one program. Work is
split by process and written in chunks; a restarted job skips the chunks already on disk.
"""
import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from ..data import sources
from ..data.sources import TokenRecordWriter
from ..data.transforms import center_crop_arr, decode_image, to_float
from ..pretrained import load_tokenizer
from .loop import progress_bar

from .. import paths

log = logging.getLogger("detailflow_jax")


def ten_crops(image: np.ndarray, size: int) -> np.ndarray:
  """[H, W, C] -> [10, size, size, C]: corners + centre, then their horizontal flips
  (torchvision TenCrop order)."""
  h, w = image.shape[:2]
  tops = [0, 0, h - size, h - size, (h - size) // 2]
  lefts = [0, w - size, 0, w - size, (w - size) // 2]
  crops = [image[t:t + size, l:l + size] for t, l in zip(tops, lefts)]
  return np.stack(crops + [c[:, ::-1] for c in crops])


def views_of(image_u8: np.ndarray, size: int, ten_crop: bool, crop_range: float) -> np.ndarray:
  img = Image.fromarray(image_u8)
  if ten_crop:
    big = center_crop_arr(img, int(size * crop_range))
    return to_float(ten_crops(big, size))
  arr = center_crop_arr(img, size)
  return to_float(np.stack([arr, arr[:, ::-1]]))


def build_image_source(e):
  """The image source an `extract` config section names."""
  if e.source == "imagefolder":
    return sources.ImageFolderSource(e.path, e.split)
  if e.source == "tfds":
    return sources.TFDSSource(e.get("tfds_name", "imagenet2012"), e.split, e.path or None)
  if e.source == "shapes":
    return sources.ProceduralShapes(e.num_classes, e.shapes_size, e.num_images, e.seed,
                                    style=e.shapes_style)
  raise ValueError(f"extract.source={e.source!r} (imagefolder | tfds | shapes)")


class CodeEncoder:
  """The jitted encoder of an extraction run: clean codes [N, T, 1], or with self-correction
  the triple (clean, inputs, targets) [N, T, 3] for per-view noise indices [N]. The noise index
  is traced, so one batch shape is one compile (`trace_count` counts traces)."""

  def __init__(self, tokenizer, num_tokens: int, self_correction: bool):
    self._graphdef, self._state = nnx.split(tokenizer)
    self.num_tokens, self.self_correction = num_tokens, self_correction
    self.trace_count = 0
    self._jitted = jax.jit(self._codes)

  def _codes(self, state, images, noise_idx, key):
    self.trace_count += 1  # runs at trace time only
    model = nnx.merge(self._graphdef, state)
    if not self.self_correction:
      return model.encode(images, self.num_tokens).indices[..., None]
    out = model.self_correct(images, noise_idx, key, self.num_tokens)
    return jnp.stack([out.clean.indices, out.inputs, out.targets], axis=-1)

  def __call__(self, images, noise_idx, key):
    """images [N, H, W, 3]; noise_idx int32 [N] (ignored without self-correction)."""
    return self._jitted(self._state, images, jnp.asarray(noise_idx, jnp.int32), key)


def extract(c, tokenizer_dir, workdir) -> paths.AnyPath:
  """Writes `<workdir>/tokens-pPPPPP-cCCCCC.array_record` shards and `<workdir>/codes.json`."""
  e = c.extract
  workdir = paths.run_path(workdir)  # local or gs://... (etils.epath)
  workdir.mkdir(parents=True, exist_ok=True)
  tokenizer = load_tokenizer(tokenizer_dir)
  size = e.image_size or tokenizer.config.image_size
  schedule = tokenizer.schedule
  if size not in schedule.decres2besttoken:
    raise ValueError(f"extract.image_size={size} is not one of the tokenizer's resolutions {schedule.best_res}")
  num_tokens = schedule.decres2besttoken[size]
  # A single token has nothing after it to correct (the schedule draws no noise index for t=1).
  correction = bool(tokenizer.config.correction_training and e.self_correction and num_tokens > 1)
  source = build_image_source(e)
  proc, nproc = jax.process_index(), jax.process_count()
  mine = np.arange(proc, len(source), nproc)
  encoder = CodeEncoder(tokenizer, num_tokens, correction)
  num_views = 10 if e.ten_crop else 2
  batch_views = min(e.batch_size, e.chunk_size) * num_views  # every batch padded to this
  meta = {"tokenizer": tokenizer.config.to_dict(), "ar_image_size": size, "ar_token_num": num_tokens,
          "views": num_views, "self_correction": correction, "num_images": len(source)}
  if proc == 0:
    (workdir / "codes.json").write_text(json.dumps(meta, indent=2))
  start, done, skipped_chunks = time.time(), 0, 0
  chunks = range(0, len(mine), e.chunk_size)
  for chunk_id, first in enumerate(chunks):
    prefix = f"tokens-p{proc:05d}-c{chunk_id:06d}"
    target = workdir / f"{prefix}-00000.array_record"
    # Keep the RNG stream identical whether or not earlier chunks are skipped.
    chunk_rng = np.random.default_rng([e.seed, proc, chunk_id])
    if target.exists():
      skipped_chunks += 1
      continue
    indices = mine[first:first + e.chunk_size]
    with TokenRecordWriter(workdir, prefix=prefix) as writer:
      for b in range(0, len(indices), e.batch_size):
        batch_idx = indices[b:b + e.batch_size]
        views, labels = [], []
        for i in batch_idx:
          record = source[int(i)]
          img = decode_image(record["image"], record.get("name", str(i)))
          if img is None:
            continue  # counted in the log line; an unreadable image has no codes
          views.append(views_of(np.asarray(img), size, e.ten_crop, e.crop_range))
          labels.append(int(record["label"]))
        if not views:
          continue
        batch = np.concatenate(views)
        noise_idx = np.zeros(batch_views, np.int32)
        if correction:  # one index per image, shared by its views
          per_image = [schedule.sample_noise_index(num_tokens, chunk_rng, 1.0) for _ in labels]
          noise_idx[:len(batch)] = np.repeat(per_image, num_views)
        key = jax.random.key(int(chunk_rng.integers(2 ** 31)))
        padded = np.zeros((batch_views,) + batch.shape[1:], batch.dtype)
        padded[:len(batch)] = batch
        codes = np.asarray(encoder(padded, noise_idx, key))[:len(batch)]
        codes = codes.reshape(len(labels), num_views, num_tokens, codes.shape[-1])
        for tokens, label in zip(codes, labels):
          writer.write(tokens, label)
        done += len(labels)
    rate = done / max(time.time() - start, 1e-9)
    remaining = len(mine) - first - len(indices)
    log.info("extract: chunk %d/%d %s, %d images (%.1f/s), ETA %.0fs", chunk_id + 1, len(chunks),
             progress_bar(chunk_id + 1, len(chunks)), done, rate, remaining / max(rate, 1e-9))
  if skipped_chunks:
    log.info("extract: %d chunk(s) were already on disk and were kept", skipped_chunks)
  log.info("extract: the encoder compiled %d program(s)", encoder.trace_count)
  return workdir
