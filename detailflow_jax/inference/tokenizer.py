"""Jitted, compile-once entry points around a tokenizer for scripts and demos."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class TokenizerFns:
  """Pure jitted encode/decode over a tokenizer's state (one compile per shape/num_tokens;
  `decode_prefix`: one per batch and decode resolution). `decode_prefix_traces` counts the
  traces of decode_prefix's program so tests can assert reuse."""

  def __init__(self, model):
    self.config = model.config
    self.schedule = model.schedule
    self._graphdef, self._state = nnx.split(model)
    self.decode_prefix_traces = 0

  def load_weights(self, model) -> "TokenizerFns":
    """The same compiled programs over the weights of `model`, a tokenizer of the same
    structure (a training hook reuses them from one step's weights to the next)."""
    graphdef, state = nnx.split(model)
    if graphdef != self._graphdef:
      raise ValueError("load_weights needs a tokenizer of the same structure (config and dtypes)")
    self._state = state
    return self

  @functools.partial(jax.jit, static_argnums=(0, 3))
  def _encode(self, state, images, num_tokens):
    out = nnx.merge(self._graphdef, state).encode(images, num_tokens)
    return out.indices, out.quant

  @functools.partial(jax.jit, static_argnums=(0, 3, 4))
  def _decode(self, state, indices, num_tokens, image_size):
    return nnx.merge(self._graphdef, state).decode_indices(indices, num_tokens, image_size)

  @functools.partial(jax.jit, static_argnums=(0, 4))
  def _decode_prefix(self, state, indices, num_tokens, image_size):
    self.decode_prefix_traces += 1  # Python side effect: runs only while tracing
    return nnx.merge(self._graphdef, state).decode_prefix(indices, num_tokens, image_size)

  def encode(self, images, num_tokens: int | None = None):
    """NHWC [-1, 1] images -> (int32 indices [B, T], code vectors [B, T, D])."""
    return self._encode(self._state, jnp.asarray(images), num_tokens)

  def decode(self, indices, num_tokens: int | None = None, image_size: int | None = None):
    """Indices [B, >= t] -> NHWC pixels (unclipped) from the first t tokens at `image_size`
    (default: the resolution t tokens stand for)."""
    t = indices.shape[1] if num_tokens is None else int(num_tokens)
    size = self.schedule.decode_resolution(t) if image_size is None else int(image_size)
    return self._decode(self._state, jnp.asarray(indices, jnp.int32), t, size)

  def decode_prefix(self, indices, num_tokens: int | None = None):
    """`decode(indices, num_tokens)` (pixels of the first t tokens at the resolution they stand
    for) through one compiled program per decode resolution instead of one per t: the prefix is
    padded on the host to the resolution's token bucket (schedule.decode_token_bucket) and the
    padding is masked out (Tokenizer.decode_prefix). Same pixels up to float rounding."""
    indices = np.asarray(indices, np.int32)
    t = indices.shape[1] if num_tokens is None else int(num_tokens)
    if not 1 <= t <= indices.shape[1]:
      raise ValueError(f"num_tokens={t} outside [1, {indices.shape[1]}] (the indices given)")
    bucket = self.schedule.decode_token_bucket(t)
    padded = np.zeros((indices.shape[0], bucket), np.int32)
    padded[:, :t] = indices[:, :t]
    return self._decode_prefix(self._state, jnp.asarray(padded), jnp.int32(t),
                               self.schedule.decode_resolution(t))

  def __hash__(self):
    return id(self)

  def __eq__(self, other):
    return self is other
