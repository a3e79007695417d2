"""Code extraction for AR training: images -> tokenizer codes -> ArrayRecord token records.

As the reference's extract_codes_c2i: each image is centre-cropped to crop_range x the
resolution and cut into ten crops (4 corners + centre, and their mirror images), or kept
whole plus its mirror image; every view is encoded with the resolution's best token count.
With self-correction (`correction_training` tokenizers) each record holds the triple
(clean codes, codes of the perturbed input, corrected labels) from `encode_noisy`, with one
noise index drawn per batch (the reference draws one per image; the per-record distribution
is the same). Work is split by process and written in chunks; a restarted job skips the
chunks already on disk.
"""
import json
import logging
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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
  from PIL import Image
  from ..data.transforms import center_crop_arr, to_float
  img = Image.fromarray(image_u8)
  if ten_crop:
    big = center_crop_arr(img, int(size * crop_range))
    return to_float(ten_crops(big, size))
  arr = center_crop_arr(img, size)
  return to_float(np.stack([arr, arr[:, ::-1]]))


def build_image_source(e):
  """The image source an `extract` config section names."""
  from ..data import sources
  if e.source == "imagefolder":
    return sources.ImageFolderSource(e.path, e.split)
  if e.source == "tfds":
    return sources.TFDSSource(e.get("tfds_name", "imagenet2012"), e.split, e.path or None)
  if e.source == "shapes":
    return sources.ProceduralShapes(e.num_classes, e.shapes_size, e.num_images, e.seed,
                                    style=e.shapes_style)
  raise ValueError(f"extract.source={e.source!r} (imagefolder | tfds | shapes)")


class _Encoder:
  """Jitted clean / self-correction encoders (one compile per noise index)."""

  def __init__(self, tokenizer, num_tokens: int):
    self._graphdef, self._state = nnx.split(tokenizer)
    self.num_tokens = num_tokens
    self._noisy = jax.jit(self._noisy_impl, static_argnums=(2,))
    self._clean = jax.jit(self._clean_impl)

  def _clean_impl(self, state, images):
    return nnx.merge(self._graphdef, state).encode(images, self.num_tokens).indices

  def _noisy_impl(self, state, images, noise_idx, key):
    out = nnx.merge(self._graphdef, state).encode_noisy(images, noise_idx, key, self.num_tokens)
    return jnp.stack([out["clean"], out["input"], out["label"]], axis=-1)

  def __call__(self, images, noise_idx: Optional[int], key):
    if noise_idx is None:
      return self._clean(self._state, images)[..., None]
    return self._noisy(self._state, images, noise_idx, key)


def extract(c, tokenizer_dir, workdir) -> paths.AnyPath:
  """Writes `<workdir>/tokens-pPPPPP-cCCCCC.array_record` shards and `<workdir>/codes.json`."""
  from ..data.sources import TokenRecordWriter
  from ..data.transforms import decode_image
  from ..pretrained import load_tokenizer
  from .loop import progress_bar

  e = c.extract
  workdir = paths.run_path(workdir)  # local or gs://... (etils.epath)
  workdir.mkdir(parents=True, exist_ok=True)
  tokenizer = load_tokenizer(tokenizer_dir)
  size = e.image_size or tokenizer.config.image_size
  schedule = tokenizer.schedule
  if size not in schedule.decres2besttoken:
    raise ValueError(f"extract.image_size={size} is not one of the tokenizer's resolutions {schedule.best_res}")
  num_tokens = schedule.decres2besttoken[size]
  correction = bool(tokenizer.config.correction_training and e.self_correction)
  source = build_image_source(e)
  proc, nproc = jax.process_index(), jax.process_count()
  mine = np.arange(proc, len(source), nproc)
  encoder = _Encoder(tokenizer, num_tokens)
  meta = {"tokenizer": tokenizer.config.to_dict(), "ar_image_size": size, "ar_token_num": num_tokens,
          "views": 10 if e.ten_crop else 2, "self_correction": correction, "num_images": len(source)}
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
        noise_idx = (schedule.sample_noise_index(num_tokens, chunk_rng, 1.0, correction)
                     if correction else None)
        key = jax.random.key(int(chunk_rng.integers(2 ** 31)))
        codes = np.asarray(encoder(jnp.asarray(batch), noise_idx, key))
        codes = codes.reshape(len(labels), -1, num_tokens, codes.shape[-1])
        for tokens, label in zip(codes, labels):
          writer.write(tokens, label)
        done += len(labels)
    rate = done / max(time.time() - start, 1e-9)
    remaining = len(mine) - first - len(indices)
    log.info("extract: chunk %d/%d %s, %d images (%.1f/s), ETA %.0fs", chunk_id + 1, len(chunks),
             progress_bar(chunk_id + 1, len(chunks)), done, rate, remaining / max(rate, 1e-9))
  if skipped_chunks:
    log.info("extract: %d chunk(s) were already on disk and were kept", skipped_chunks)
  return workdir
