"""Code extraction for AR training: images -> tokenizer codes -> ArrayRecord token records.

As the reference's extract_codes_c2i: each image is centre-cropped to crop_range x the
resolution and cut into ten crops (4 corners + centre, and their mirror images), or kept
whole plus its mirror image; every view is encoded with the resolution's best token count.
With self-correction (`correction_training` tokenizers) each record holds the triple
(clean codes, codes of the perturbed input, corrected targets) from `Tokenizer.self_correct`,
with one noise index per image shared by its views (as the reference), under
`extract.precision` (the reference's --mixed-precision, bf16 autocast by default).

On the mesh (the config's mesh section, all devices of all processes): the tokenizer is placed
by the logical-axis rules (replicated, or FSDP with mesh.fsdp > 1) and every device encodes
`extract.per_device_batch` images per step. The images are cut into chunks of `chunk_size`;
process p reads, encodes and writes chunks p, p + P, p + 2P, ... (P processes): it feeds only
its own rows of each global batch and gets only those rows' codes back. Image i's record is a
function of (tokenizer, precision, seed, i) alone: its noise index draws from numpy
(seed, EXTRACT_STREAM, i), its random top-k codes from `protocol.row_keys(seed, i,
EXTRACT_STREAM)`, and every device runs the same per-device batch whatever the device count
(the reason the batch is per device: a matmul's rounding may change with its row count). So
the chunk files are byte-identical on 1 device, 8 devices, FSDP parameters or 2 processes.
The noise index is traced and every batch padded to one size: a run compiles one program. A
chunk appears under its final name only when complete; a rerun (on any mesh) skips the
chunks on disk.
"""
import concurrent.futures
import json
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image

from .. import paths, sharding
from ..cli import progress_bar
from ..data import protocol, sources
from ..data.pipeline import global_batch
from ..data.sources import TokenRecordWriter
from ..data.transforms import center_crop_arr, decode_image, to_float
from ..models.precision import Precision, set_precision
from ..weights.load import load_tokenizer

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


class CodeEncoder:
  """The jitted encoder of an extraction run on a mesh. Takes this process's rows of a global
  batch: images [B, V, H, W, 3] (V views per image), noise indices [B] (shared by an image's
  views; ignored without self-correction) and image indices [B] (the keys of their random
  top-k codes); returns those rows' codes [B, V, T, 1] clean, or with self-correction the
  triples (clean, inputs, targets) [B, V, T, 3]. Row b depends on image b, its noise index and
  its image index only, not on the rest of the batch. The noise index is traced, so one batch
  shape is one compile (`trace_count` counts traces).

  precision: the autocast policy (models/precision.py) put on the model merged inside the
  program; the parameters keep their dtype and the rules' placement on `mesh` (`params`).
  """

  def __init__(self, tokenizer, num_tokens: int, self_correction: bool, *, mesh=None,
               precision: Precision = Precision(), seed: int = 0):
    self.mesh = mesh if mesh is not None else sharding.make_mesh()
    self.num_tokens, self.self_correction = num_tokens, self_correction
    self.precision, self.seed = precision, seed
    self._graphdef, state = nnx.split(tokenizer)
    shardings = sharding.shardings_for(state, self.mesh)
    sharding.log_replicated_report(state, shardings, self.mesh)
    self.params = jax.device_put(state, shardings)
    out = sharding.batch_sharding(self.mesh, 4)
    self._out_spec = out.spec
    self.trace_count = 0
    self._jitted = jax.jit(self._counted, out_shardings=out)

  def _codes(self, params, images, noise_idx, indices, seed):
    model = set_precision(nnx.merge(self._graphdef, params), self.precision)
    b, v = images.shape[:2]
    if not self.self_correction:
      flat = images.reshape((b * v,) + images.shape[2:])
      return model.encode(flat, self.num_tokens).indices.reshape(b, v, -1, 1)
    keys = protocol.row_keys(seed, indices, protocol.EXTRACT_STREAM)

    def one_image(views, idx, key):  # one key per image: its codes ignore the batch around it
      out = model.self_correct(views, idx, key, self.num_tokens)
      return jnp.stack([out.clean.indices, out.inputs, out.targets], axis=-1)
    return jax.vmap(one_image)(images, noise_idx, keys)

  def _counted(self, *args):
    self.trace_count += 1  # runs at trace time only
    return self._codes(*args)

  def jaxpr(self, images, noise_idx, indices):
    """The program for arrays of these shapes, traced (not compiled, not counted): its per-op
    dtypes show the precision policy."""
    return jax.make_jaxpr(self._codes)(self.params, images, jnp.asarray(noise_idx, jnp.int32),
                                       jnp.asarray(indices, jnp.int32), jnp.uint32(self.seed))

  def __call__(self, images, noise_idx, indices) -> np.ndarray:
    """Host arrays of this process's rows -> their codes (host numpy, this process's rows)."""
    rows = global_batch({"images": np.asarray(images, np.float32),
                         "noise_idx": np.asarray(noise_idx, np.int32),
                         "indices": np.asarray(indices, np.int32)}, self.mesh)
    codes = self._jitted(self.params, rows["images"], rows["noise_idx"], rows["indices"],
                         jnp.uint32(self.seed))
    return np.asarray(multihost_utils.global_array_to_host_local_array(codes, self.mesh, self._out_spec))


def _chunk_path(workdir, chunk_id: int):
  return workdir / f"{_chunk_prefix(chunk_id)}-00000.array_record"  # TokenRecordWriter's name


def _chunk_prefix(chunk_id: int) -> str:
  return f"tokens-c{chunk_id:06d}"


def _write_or_check_meta(workdir, meta) -> None:
  """codes.json: written once (process 0); a rerun with other settings would mix records made
  two ways in one directory, so any difference is an error naming the fields."""
  path = workdir / "codes.json"
  meta = json.loads(json.dumps(meta))  # as it reads back (tuples are lists)
  if path.exists():
    stored = json.loads(path.read_text())
    differ = [k for k in sorted(set(meta) | set(stored)) if meta.get(k) != stored.get(k)]
    if differ:
      raise ValueError(f"{path} belongs to another extraction ({', '.join(differ)} differ); use "
                       f"another --workdir or delete it")
  elif jax.process_index() == 0:  # whole or absent: other processes may be reading it
    with paths.atomic_file(path) as tmp:
      tmp.write_text(json.dumps(meta, indent=2))


def _max_over_processes(n: int) -> int:
  if jax.process_count() == 1:
    return n
  return int(np.max(multihost_utils.process_allgather(np.int32(n))))


def extract(c, tokenizer_dir, workdir, mesh=None) -> paths.AnyPath:
  """Writes `<workdir>/tokens-cCCCCCC-00000.array_record` (chunk C: images C x chunk_size
  onwards, in order) and `<workdir>/codes.json`. mesh: default the config's mesh section
  over all devices."""
  e = c.extract
  policy = Precision.named(e.precision, key="extract.precision")
  for key in ("per_device_batch", "chunk_size"):
    if e[key] < 1:
      raise ValueError(f"extract.{key} must be positive, got {e[key]}")
  mesh = mesh if mesh is not None else sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
  weights = e.get("tokenizer_weights", "")
  if weights not in ("", "model", "ema"):
    raise ValueError(f"extract.tokenizer_weights={weights!r} is not one of 'model', 'ema' or '' "
                     "(the checkpoint's default)")
  workdir = paths.run_path(workdir)  # local or gs://... (etils.epath)
  workdir.mkdir(parents=True, exist_ok=True)
  try:
    # The reference's --vq-ema: load_vq_model takes checkpoint['ema'] instead of ['model'].
    tokenizer = load_tokenizer(tokenizer_dir, weights=weights or None)
  except ValueError as err:
    if not weights:
      raise
    raise ValueError(f"extract.tokenizer_weights={weights!r}: {err}") from err
  size = e.image_size or tokenizer.config.image_size
  schedule = tokenizer.schedule
  if size not in schedule.decres2besttoken:
    raise ValueError(f"extract.image_size={size} is not one of the tokenizer's resolutions {schedule.best_res}")
  num_tokens = schedule.decres2besttoken[size]
  # A single token has nothing after it to correct (the schedule draws no noise index for t=1).
  correction = bool(tokenizer.config.correction_training and e.self_correction and num_tokens > 1)
  source = sources.build_image_source(e)
  num_views = 10 if e.ten_crop else 2
  _write_or_check_meta(workdir, {
      "tokenizer": tokenizer.config.to_dict(), "ar_image_size": size, "ar_token_num": num_tokens,
      "views": num_views, "self_correction": correction, "num_images": len(source),
      "precision": e.precision, "seed": e.seed, "chunk_size": e.chunk_size,
      # Only when asked for: codes.json files written before the key existed stay valid.
      **({"tokenizer_weights": weights} if weights else {})})

  proc, nproc = jax.process_index(), jax.process_count()
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  global_images = e.per_device_batch * shards
  if global_images % nproc:
    raise ValueError(f"extract.per_device_batch={e.per_device_batch} x {shards} batch shards "
                     f"does not split over {nproc} processes")
  local = global_images // nproc  # this process's rows of every global batch
  encoder = CodeEncoder(tokenizer, num_tokens, correction, mesh=mesh, precision=policy, seed=e.seed)
  num_chunks = -(-len(source) // e.chunk_size)
  bounds = lambda k: (k * e.chunk_size, min((k + 1) * e.chunk_size, len(source)))
  mine = range(proc, num_chunks, nproc)
  pending = [k for k in mine if not _chunk_path(workdir, k).exists()]
  my_steps = sum(math.ceil((bounds(k)[1] - bounds(k)[0]) / local) for k in pending)
  # Every process runs every step (one SPMD program); one whose chunks are done feeds padding.
  steps = _max_over_processes(my_steps)
  log.info("extract: %d images in %d chunks of %d; process %d/%d has %d to make (%d kept); "
           "%d images per step (%d per device x %d), precision %s", len(source), num_chunks,
           e.chunk_size, proc, nproc, len(pending), len(mine) - len(pending), global_images,
           e.per_device_batch, shards, e.precision)

  def noise_index(i: int) -> int:
    if not correction:
      return 0
    return schedule.sample_noise_index(num_tokens, np.random.default_rng([e.seed, protocol.EXTRACT_STREAM, i]), 1.0)

  def read(i: int):
    """(views, label, noise index) of image i, or None for an unreadable image (no codes)."""
    record = source[i]
    img = decode_image(record["image"], record.get("name", str(i)))
    if img is None:
      return None
    return views_of(np.asarray(img), size, e.ten_crop, e.crop_range), int(record["label"]), noise_index(i)

  views = np.zeros((local, num_views, size, size, 3), np.float32)
  noise, indices = np.zeros(local, np.int32), np.zeros(local, np.int32)
  step, done, unreadable = 0, 0, 0
  start = warm = time.time()
  done_warm = 0
  # Reading, decoding and cropping release the GIL for the most part: one thread per core
  # (map keeps the image order, so the records do not depend on it).
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    for n_chunk, k in enumerate(pending):
      first, stop = bounds(k)
      with TokenRecordWriter(workdir, prefix=_chunk_prefix(k)) as writer:
        for b in range(first, stop, local):
          rows = range(b, min(b + local, stop))
          labels = []
          for i, item in zip(rows, pool.map(read, rows)):
            if item is None:
              unreadable += 1
              continue
            views[len(labels)], noise[len(labels)], indices[len(labels)] = item[0], item[2], i
            labels.append(item[1])
          views[len(labels):], noise[len(labels):], indices[len(labels):] = 0.0, 0, 0  # padding
          codes = encoder(views, noise, indices)
          for tokens, label in zip(codes, labels):
            writer.write(tokens, label)
          step, done = step + 1, done + len(labels)
          if step == 1:  # rate and ETA leave out the first step: it compiles
            warm, done_warm = time.time(), done
      now = time.time()
      if step > 1:
        rate, per_step = (done - done_warm) / (now - warm), (now - warm) / (step - 1)
      else:
        rate, per_step = done / (now - start), now - start
      log.info("extract: chunk %d written (%d/%d here) %s, %d images here (%.1f/s), step %d/%d, ETA %.0fs",
               k, n_chunk + 1, len(pending), progress_bar(n_chunk + 1, len(pending)), done, rate,
               step, steps, (steps - step) * per_step)
  for _ in range(step, steps):  # other processes still have chunks to make
    views[:] = 0.0
    encoder(views, np.zeros(local, np.int32), np.zeros(local, np.int32))
  if len(mine) > len(pending):
    log.info("extract: %d chunk(s) were already on disk and were kept", len(mine) - len(pending))
  if unreadable:
    log.warning("extract: %d unreadable image(s) skipped", unreadable)
  log.info("extract: the encoder compiled %d program(s)", encoder.trace_count)
  return workdir
