"""What both evaluation jobs do on the devices: cast weights, feed each process its rows of a
global batch, decode tokens, bring results back to every host."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import sharding
from ..models.precision import Precision, set_precision
from ..ops.resize import resize_bicubic

PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def check_precision(precision: str):
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
  return PRECISIONS[precision]


def cast_floating(state, dtype):
  """Floating leaves of a pytree cast to `dtype` (integers, keys unchanged)."""
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)


def to_host(x: jax.Array) -> np.ndarray:
  """The whole (batch-sharded) array on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


class GlobalBatch:
  """Global batches of `size` rows split over the mesh's batch axes; each process feeds only
  the rows its devices hold (every process may read the whole batch on the host)."""

  def __init__(self, mesh, size: int):
    self.mesh, self.size = mesh, size
    self._sharding = {}
    shards = self.sharding(1).addressable_devices_indices_map((size,))
    self.lo = min(ix[0].start or 0 for ix in shards.values())
    self.hi = max(size if ix[0].stop is None else ix[0].stop for ix in shards.values())

  def sharding(self, ndim: int):
    if ndim not in self._sharding:
      self._sharding[ndim] = sharding.batch_sharding(self.mesh, ndim)
    return self._sharding[ndim]

  def put(self, rows: np.ndarray) -> jax.Array:
    """rows [size, ...] (the whole global batch, the same on every process) -> sharded array."""
    if len(rows) != self.size:
      raise ValueError(f"a global batch has {self.size} rows, got {len(rows)}")
    return jax.make_array_from_process_local_data(self.sharding(rows.ndim), rows[self.lo:self.hi], rows.shape)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_tokens", "image_size", "policy", "out_size"))
def decode_tokens(graphdef, state, tokens, *, num_tokens: int, image_size: int,
                  policy: Precision | None = None, out_size: int | None = None):
  """Tokenizer decode of the first `num_tokens` of `tokens` [B, T] at `image_size` -> pixels
  [B, S, S, 3] in about [-1, 1] (unclipped), S = out_size or image_size, under `policy` (None:
  native): float32, or bfloat16 out of a bf16-autocast decode as the reference's decode_code.
  out_size != image_size: resized with torch's bicubic (a = -0.75, align_corners=False), which
  computes in float32 and rounds to the pixels' dtype, as torch's bf16 kernel does."""
  model = nnx.merge(graphdef, state)
  if policy is not None:
    set_precision(model, policy)
  pixels = model.decode_indices(tokens, num_tokens, image_size)
  if out_size and out_size != image_size:
    pixels = resize_bicubic(pixels, out_size)
  return pixels
