"""Inception features of an image stream, data-parallel over every device (all hosts).

Each global batch is padded to a fixed size (a multiple of the device count, so one compile per
image size), split along the batch axis over a 1-D mesh of all devices, run through the jitted
network, and gathered back to the host; padded rows are dropped before anything sees them.
Under `jax.distributed` every process reads the same stream and feeds its own slice of each
batch; every process gets all features. Progress (images, images/s, ETA) is logged.
"""
import functools
import logging
import math
import time
from collections.abc import Iterable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..cli import progress_bar
from .inception import InceptionV3

log = logging.getLogger("detailflow_jax")
OUTPUTS = ("pool", "spatial", "logits")


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, images):
  return nnx.merge(graphdef, state)(images)


def global_batch_size(batch_size: int) -> int:
  """`batch_size` rounded up to a multiple of the device count."""
  n = jax.device_count()
  return max(n, int(math.ceil(batch_size / n)) * n)


def extract_features(model: InceptionV3, batches: Iterable[np.ndarray], total: int,
                     batch_size: int = 256, name: str = "images",
                     log_every_s: float = 10.0) -> dict[str, np.ndarray]:
  """{'pool' [N, 2048], 'spatial' [N, 2023], 'logits' [N, 1008]} (float32) of the uint8 NHWC
  `batches` (each at most `batch_size` images; `total` of them in all)."""
  gbs = global_batch_size(batch_size)
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  data = NamedSharding(mesh, PartitionSpec("data"))
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
  nproc = jax.process_count()
  # This process's rows of every global batch: the span of its devices' shards.
  shards = data.addressable_devices_indices_map((gbs,))
  lo = min(index[0].start or 0 for index in shards.values())
  hi = max(gbs if index[0].stop is None else index[0].stop for index in shards.values())
  out = {k: [] for k in OUTPUTS}
  done, start, last_log = 0, time.time(), 0.0
  for batch in batches:
    n = len(batch)
    if n > gbs:
      raise ValueError(f"{name}: a batch of {n} images is larger than the global batch {gbs}")
    padded = np.zeros((gbs,) + batch.shape[1:], np.uint8)
    padded[:n] = batch
    x = jax.make_array_from_process_local_data(data, padded[lo:hi], padded.shape)
    feats = _forward(graphdef, state, x)
    if nproc > 1:
      from jax.experimental import multihost_utils
      feats = multihost_utils.process_allgather(feats, tiled=True)
    for k in OUTPUTS:
      out[k].append(np.asarray(feats[k], np.float32)[:n])
    done += n
    now = time.time()
    if now - last_log >= log_every_s or done >= total:
      rate = done / max(now - start, 1e-9)
      log.info("inception features (%s): %s %d/%d images, %.1f img/s, ETA %.0fs", name,
               progress_bar(done, total), done, total, rate, max(total - done, 0) / max(rate, 1e-9))
      last_log = now
  if done != total:
    raise ValueError(f"{name}: expected {total} images, the stream gave {done}")
  return {k: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for k, v in out.items()}
