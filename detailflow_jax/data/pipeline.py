"""Grain pipelines: deterministic, sharded per process, checkpointable, worker-count independent.

Order of operations (all on a MapDataset, so every element is a pure function of its index):
  indices -> shuffle(seed, reshuffled every epoch) -> repeat -> this process's shard
  -> per-index load + decode + augment (bad files replaced by a deterministic substitute)
  -> batch -> per-batch degradation -> IterDataset [-> mp_prefetch workers]
Workers each produce whole batches and Grain reads them round-robin, so the batch sequence is
the same for 0, 1 or N workers; the iterator state (get_state/set_state, or Orbax through
grain.checkpoint) resumes at exactly the next batch.
"""
import dataclasses
import logging
import time
from typing import Any, Dict, Iterator, Optional

import grain
import numpy as np

from ..schedule import ResolutionSchedule
from .degradation import degrade_batch
from .transforms import decode_image, eval_transform, train_transform

log = logging.getLogger("detailflow_jax")


@dataclasses.dataclass(frozen=True)
class ImagePipelineConfig:
  image_size: int
  batch_size: int                 # per process
  seed: int = 0
  train: bool = True
  num_epochs: Optional[int] = None  # None: repeat forever
  degradation_prob: float = 0.0
  correction_training: bool = False
  num_workers: int = 0
  shard_index: int = 0
  shard_count: int = 1
  max_substitutions: int = 20     # attempts to replace one bad image before giving up


class _LoadImage(grain.transforms.RandomMap):
  """index -> {"image": float32 HWC, "label", "skipped"}; a bad file is replaced by another
  image drawn with the element's own RNG (deterministic) and counted in "skipped"."""

  def __init__(self, source, cfg: ImagePipelineConfig):
    self.source, self.cfg = source, cfg

  def random_map(self, index, rng: np.random.Generator):
    skipped = 0
    for _ in range(self.cfg.max_substitutions + 1):
      record = self.source[int(index)]
      img = decode_image(record["image"], record.get("name", str(index)))
      if img is not None:
        arr = (train_transform(img, self.cfg.image_size, rng) if self.cfg.train
               else eval_transform(img, self.cfg.image_size))
        return {"image": arr, "label": np.int32(record["label"]), "skipped": np.int32(skipped)}
      skipped += 1
      index = rng.integers(len(self.source))
    raise RuntimeError(f"{self.cfg.max_substitutions + 1} consecutive unreadable images "
                       f"around index {index}: is the dataset corrupt?")


class _Degrade(grain.transforms.RandomMap):
  def __init__(self, schedule: ResolutionSchedule, cfg: ImagePipelineConfig):
    self.schedule, self.cfg = schedule, cfg

  def random_map(self, batch, rng: np.random.Generator):
    out = degrade_batch(batch["image"], self.schedule, rng, self.cfg.degradation_prob,
                        self.cfg.correction_training)
    out["label"] = batch["label"]
    out["skipped"] = np.int32(batch["skipped"].sum())
    return out


def _indices(num_records: int, seed: int, shuffle: bool, num_epochs: Optional[int],
             shard_index: int, shard_count: int) -> grain.MapDataset:
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} outside [0, {shard_count})")
  ds = grain.MapDataset.range(num_records)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  # Every process takes every shard_count-th element: disjoint, equal-sized shards.
  return ds[shard_index::shard_count]


def image_dataset(source, cfg: ImagePipelineConfig,
                  schedule: Optional[ResolutionSchedule] = None) -> grain.MapDataset:
  """Batches {"image" [B,H,W,3], "label" [B], "skipped"} (+ degradation fields with a schedule)."""
  ds = _indices(len(source), cfg.seed, cfg.train, cfg.num_epochs, cfg.shard_index, cfg.shard_count)
  ds = ds.random_map(_LoadImage(source, cfg), seed=cfg.seed)
  ds = ds.batch(cfg.batch_size, drop_remainder=True)
  if schedule is not None:
    # Seeded by the batch index alone, so every process draws the same t for batch i and the
    # global batch stays homogeneous in shape.
    ds = ds.random_map(_Degrade(schedule, cfg), seed=cfg.seed + 1)
  return ds


def token_dataset(source, *, batch_size: int, seed: int = 0, shuffle: bool = True,
                  num_epochs: Optional[int] = None, shard_index: int = 0,
                  shard_count: int = 1) -> grain.MapDataset:
  """Batches {"tokens": [B, T] or [B, T, 3], "labels": [B]} from token records."""
  ds = _indices(len(source), seed, shuffle, num_epochs, shard_index, shard_count)
  ds = ds.map(lambda i: source[int(i)]).batch(batch_size, drop_remainder=True)
  return ds.map(lambda b: {"tokens": b["tokens"].astype(np.int32), "labels": b["label"].astype(np.int32)})


def to_iterator(ds: grain.MapDataset, num_workers: int = 0, buffer_size: int = 2):
  """A checkpointable iterator; with workers, batches are produced in separate processes."""
  it_ds = ds.to_iter_dataset()
  if num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=buffer_size))
  return iter(it_ds)


class Progress:
  """Wraps an iterator of batches: counts images and skipped files, logs a rate line."""

  def __init__(self, iterator: Iterator[Dict[str, Any]], log_every: int = 100, name: str = "data"):
    self.iterator, self.log_every, self.name = iterator, log_every, name
    self.batches = self.images = self.skipped = 0
    self._start = time.time()

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.iterator)
    self.batches += 1
    self.images += len(batch["label"] if "label" in batch else batch["labels"])
    self.skipped += int(np.asarray(batch.get("skipped", 0)).sum())
    if self.log_every and self.batches % self.log_every == 0:
      rate = self.images / max(time.time() - self._start, 1e-9)
      log.info("%s: %d batches, %d examples (%.1f/s), %d bad files replaced", self.name,
               self.batches, self.images, rate, self.skipped)
    return batch

  def get_state(self):
    return self.iterator.get_state()

  def set_state(self, state):
    self.iterator.set_state(state)


def global_batch(local: Dict[str, Any], mesh) -> Dict[str, Any]:
  """Assembles the per-process batch into global jax.Arrays sharded over the mesh's batch axes
  (jax.make_array_from_process_local_data). Batch-level scalars stay host numpy values."""
  import jax
  from ..train.mesh import batch_sharding
  out = {}
  for key, value in local.items():
    value = np.asarray(value)
    if value.ndim == 0:
      out[key] = value
    else:
      out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
  return out
