"""Grain pipelines: deterministic, sharded per process, checkpointable, worker-count independent.

Order of operations (all on a MapDataset, so every element is a pure function of its index):
  indices -> shuffle(seed; a new permutation every epoch) -> repeat
  -> load + decode + augment, seeded by the GLOBAL position (bad files replaced deterministically)
  -> this process's shard (every shard_count-th element) -> batch
  -> per-batch resolution / degradation / noise index, seeded by the batch number
  -> IterDataset [-> mp_prefetch worker processes]
Consequences: the same global element gets the same crop whatever the process count; all
processes draw the same t for batch i, so the global batch is homogeneous in shape; workers each
produce whole batches and Grain reads them round-robin, so the sequence is the same for 0, 1 or N
workers; the iterator state (get_state/set_state, or Orbax through grain.checkpoint) resumes at
exactly the next batch.

The shapes a configuration emits are listed by degradation.batch_shapes (counts in
degradation.py's docstring).
"""
import dataclasses
import logging
import os
import time
from typing import Any

import grain
import numpy as np

from ..schedule import ResolutionSchedule
from .degradation import DynamicResolution, check_config, degrade_batch
from .transforms import decode_image, eval_transform, train_transform

log = logging.getLogger("detailflow_jax")


@dataclasses.dataclass(frozen=True)
class ImagePipelineConfig:
  image_size: int
  batch_size: int                   # per process
  seed: int = 0
  train: bool = True                # random crop + flip + shuffle; else centre crop, file order
  flip: bool = True
  num_epochs: int | None = None  # None: repeat forever
  drop_remainder: bool = True       # keeps every batch the same size (one shape)
  degradation_prob: float = 0.0     # needs a schedule
  correction_training: bool = False
  noise_prob: float = 1.0           # the reference perturbs every eligible batch
  dynamic: DynamicResolution | None = None
  num_workers: int = 0              # mp_prefetch worker processes; 0 = in the main process
  worker_buffer_size: int = 2       # batches each worker hands over ahead of use
  read_threads: int = 2             # batches built concurrently per process (PIL, BLAS free the GIL)
  read_buffer: int = 4              # batches built ahead per process
  shard_index: int | None = None  # None: jax.process_index()
  shard_count: int | None = None  # None: jax.process_count()
  max_substitutions: int = 20       # replacements tried for one bad image before giving up

  @property
  def crop_size(self) -> int:
    return self.dynamic.crop_size if self.dynamic is not None else self.image_size


def resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  """Explicit shard arguments, or this JAX process's index and the process count."""
  if shard_index is None or shard_count is None:
    import jax
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} outside [0, {shard_count})")
  return shard_index, shard_count


class _LoadImage(grain.transforms.RandomMap):
  """index -> {"image": float32 HWC in [-1, 1], "label", "skipped"}. A record that cannot be read,
  decoded or transformed is replaced by another one drawn with the element's own RNG (so the
  result is still a pure function of the index) and counted in "skipped"."""

  def __init__(self, source, cfg: ImagePipelineConfig):
    self.source, self.cfg = source, cfg

  def _try(self, index: int, rng: np.random.Generator) -> dict[str, Any] | None:
    try:
      record = self.source[index]
    except Exception as e:  # A source's own decoding (TFDS) can fail on one record.
      log.warning("skipping record %d of %s: %s: %s", index, self.source, type(e).__name__, e)
      return None
    name = record.get("name", str(index))
    img = decode_image(record["image"], name)
    if img is None:
      return None
    try:
      if self.cfg.train:
        arr = train_transform(img, self.cfg.crop_size, rng, flip=self.cfg.flip)
      else:
        arr = eval_transform(img, self.cfg.crop_size)
    except Exception as e:  # e.g. a degenerate 1-pixel-wide image
      log.warning("skipping %s: transform failed (%s: %s)", name, type(e).__name__, e)
      return None
    return {"image": arr, "label": np.int32(record["label"])}

  def random_map(self, index, rng: np.random.Generator):
    index = int(index)
    for attempt in range(self.cfg.max_substitutions + 1):
      out = self._try(index, rng)
      if out is not None:
        out["skipped"] = np.int32(attempt)
        return out
      index = int(rng.integers(len(self.source)))
    raise RuntimeError(f"{self.cfg.max_substitutions + 1} unreadable images in a row (last: record "
                       f"{index} of {self.source}): is the dataset corrupt?")


_BLAS_LIMITED_IN_PID = None


def _single_threaded_blas() -> None:
  """Makes numpy's BLAS single-threaded in the process that builds batches (once per process).

  Degradation is numpy matmuls; Grain already runs several batches at once (read threads,
  worker processes), and BLAS threads on top spin against them: on a 2-core machine a batch took
  15x longer (760 ms vs 51 ms for 8 images at 256 px). PyTorch DataLoader workers make the same
  choice. threadpoolctl limits only the BLAS libraries loaded in this process (JAX's XLA CPU
  backend does not use them)."""
  global _BLAS_LIMITED_IN_PID
  if _BLAS_LIMITED_IN_PID == os.getpid():
    return
  _BLAS_LIMITED_IN_PID = os.getpid()
  from threadpoolctl import threadpool_limits
  threadpool_limits(limits=1, user_api="blas")


class _Degrade(grain.transforms.RandomMap):

  def __init__(self, schedule: ResolutionSchedule, cfg: ImagePipelineConfig):
    self.schedule, self.cfg = schedule, cfg

  def random_map(self, batch, rng: np.random.Generator):
    _single_threaded_blas()
    out = degrade_batch(batch["image"], self.schedule, rng, self.cfg.degradation_prob,
                        self.cfg.correction_training, self.cfg.noise_prob, self.cfg.dynamic)
    n = out["image"].shape[0]  # dynamic resolution may have shortened the batch
    out["label"] = batch["label"][:n]
    out["skipped"] = np.int32(batch["skipped"].sum())
    return out


def _epochs(num_records: int, seed: int, shuffle: bool, num_epochs: int | None) -> grain.MapDataset:
  if num_records == 0:
    raise ValueError("the source is empty")
  ds = grain.MapDataset.range(num_records)
  if shuffle:
    ds = ds.shuffle(seed=seed)  # Grain draws a fresh permutation for every repeated epoch.
  return ds.repeat(num_epochs)


def image_dataset(source, cfg: ImagePipelineConfig,
                  schedule: ResolutionSchedule | None = None) -> grain.MapDataset:
  """Batches {"image" [B,H,W,3], "label" [B], "skipped"}; with a schedule also "target", "t",
  "decode_res", "target_res", "max_tokens", "noise_idx" (see degradation.degrade_batch)."""
  if (cfg.degradation_prob or (cfg.dynamic is not None and cfg.dynamic.enabled)) and schedule is None:
    raise ValueError("degradation and dynamic resolution need the tokenizer's ResolutionSchedule")
  if schedule is not None:
    check_config(schedule, cfg.image_size, cfg.degradation_prob, cfg.dynamic)
  shard_index, shard_count = resolve_shard(cfg.shard_index, cfg.shard_count)
  ds = _epochs(len(source), cfg.seed, cfg.train, cfg.num_epochs)
  ds = ds.random_map(_LoadImage(source, cfg), seed=cfg.seed)
  ds = ds[shard_index::shard_count]
  ds = ds.batch(cfg.batch_size, drop_remainder=cfg.drop_remainder)
  if schedule is not None:
    ds = ds.random_map(_Degrade(schedule, cfg), seed=cfg.seed + 1)
  else:
    ds = ds.map(_count_skipped)
  return ds


def _count_skipped(batch):
  """Per-image replacement counts -> one per-batch count (as _Degrade reports it)."""
  return {**batch, "skipped": np.int32(batch["skipped"].sum())}


# The reference's CustomDataset reads an example from its `ten_crop_105/` sibling directory iff
# torch.rand(1) < 0.5 (dataset/imagenet.py).
MIX_PROB = 0.5


class _PickView(grain.transforms.RandomMap):
  """A token record -> one of its augmented views (uniformly, as the reference's CustomDataset
  picks the image or its flip); [T, 1] codes become [T]. With a `mix` source (the same images'
  codes extracted another way, record for record: the reference's ten_crop_105 codes), example
  i reads mix[i] instead of source[i] iff its first draw u < MIX_PROB; the view is drawn after."""

  def __init__(self, source, random_view: bool, mix=None):
    self.source, self.random_view, self.mix = source, random_view, mix

  def random_map(self, index, rng: np.random.Generator):
    record = self.source[int(index)]
    if self.mix is not None and rng.random() < MIX_PROB:
      mixed = self.mix[int(index)]
      if int(mixed["label"]) != int(record["label"]):
        raise ValueError(f"record {int(index)}: label {int(mixed['label'])} in the mixed codes, "
                         f"{int(record['label'])} in data.path: the two must hold the same images in order")
      record = mixed
    views = record["tokens"]
    view = int(rng.integers(views.shape[0])) if self.random_view else 0
    tokens = views[view]
    return {"tokens": tokens[:, 0] if tokens.shape[1] == 1 else tokens,
            "labels": np.int32(record["label"])}


def token_dataset(source, *, batch_size: int, seed: int = 0, shuffle: bool = True,
                  random_view: bool = True, num_epochs: int | None = None,
                  shard_index: int | None = None, shard_count: int | None = None,
                  drop_remainder: bool = True, mix=None) -> grain.MapDataset:
  """Batches {"tokens": [B, T] or [B, T, 3] int32, "labels": [B] int32} for AR training.
  mix: a second source of the same images' codes (see _PickView), or None."""
  shard_index, shard_count = resolve_shard(shard_index, shard_count)
  if mix is not None and len(mix) != len(source):
    raise ValueError(f"the mixed codes hold {len(mix)} records, data.path {len(source)}: the two "
                     "must hold the same images in order")
  ds = _epochs(len(source), seed, shuffle, num_epochs)
  ds = ds.random_map(_PickView(source, random_view, mix), seed=seed)
  return ds[shard_index::shard_count].batch(batch_size, drop_remainder=drop_remainder)


def to_iterator(ds: grain.MapDataset, num_workers: int = 0, buffer_size: int = 2,
                read_threads: int = 2, read_buffer: int = 4) -> grain.DatasetIterator:
  """A checkpointable iterator; with workers, batches are produced in separate processes.

  The elements here are whole batches, so Grain's read defaults (16 threads, 500 elements ahead)
  would build hundreds of batches at once: the thread count and read-ahead are set explicitly."""
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_buffer))
  if num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=buffer_size))
  return iter(it_ds)


class Progress(grain.DatasetIterator):
  """Wraps a batch iterator in the main process: counts batches, examples and replaced bad
  files, and logs a rate line every `log_every` batches (and at once when files get skipped).
  Still a grain DatasetIterator, so grain.checkpoint and get/set_state work through it."""

  def __init__(self, parent: grain.DatasetIterator, log_every: int = 100, name: str = "data"):
    super().__init__(parent)
    self.log_every, self.name = log_every, name
    self.batches = self.examples = self.skipped = 0
    self._start = time.perf_counter()

  def __next__(self):
    batch = next(self._parent)
    self.batches += 1
    labels = batch["label"] if "label" in batch else batch["labels"]
    self.examples += len(labels)
    skipped = int(np.asarray(batch.get("skipped", 0)).sum())
    if skipped:
      log.warning("%s: batch %d replaced %d unreadable image(s) (%d so far; the workers' log names "
                  "the files)", self.name, self.batches, skipped, self.skipped + skipped)
    self.skipped += skipped
    if self.log_every and self.batches % self.log_every == 0:
      rate = self.examples / max(time.perf_counter() - self._start, 1e-9)
      log.info("%s: %d batches, %d examples (%.1f/s), %d bad files replaced", self.name,
               self.batches, self.examples, rate, self.skipped)
    return batch

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


def image_iterator(source, cfg: ImagePipelineConfig, schedule: ResolutionSchedule | None = None,
                   log_every: int = 100) -> Progress:
  """The whole image pipeline as a checkpointable iterator with cfg.num_workers workers."""
  ds = image_dataset(source, cfg, schedule)
  it = to_iterator(ds, cfg.num_workers, cfg.worker_buffer_size, cfg.read_threads, cfg.read_buffer)
  return Progress(it, log_every, name=str(source))


def global_batch(local: dict[str, Any], mesh) -> dict[str, Any]:
  """Assembles every process's local batch into global jax.Arrays sharded over the mesh's batch
  axes (jax.make_array_from_process_local_data). Per-batch scalars (t, decode_res, noise_idx…)
  are equal on all processes by construction and stay host numpy values: they select programs."""
  # Local: data/ stays importable without jax, so Grain's worker processes do not load it.
  import jax

  from .. import sharding
  out = {}
  for key, value in local.items():
    value = np.asarray(value)
    if value.ndim == 0:
      out[key] = value
    else:
      out[key] = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, value.ndim), value)
  return out
