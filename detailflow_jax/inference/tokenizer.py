"""Jitted, compile-once entry points around a tokenizer for scripts and demos."""
import functools

import jax
import jax.numpy as jnp
from flax import nnx


class TokenizerFns:
  """Pure jitted encode/decode over a tokenizer's state (one compile per shape/num_tokens)."""

  def __init__(self, model):
    self.config = model.config
    self.schedule = model.schedule
    self._graphdef, self._state = nnx.split(model)

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

  def encode(self, images, num_tokens: int | None = None):
    """NHWC [-1, 1] images -> (int32 indices [B, T], code vectors [B, T, D])."""
    return self._encode(self._state, jnp.asarray(images), num_tokens)

  def decode(self, indices, num_tokens: int | None = None, image_size: int | None = None):
    """Indices [B, >= t] -> NHWC pixels (unclipped) from the first t tokens at `image_size`
    (default: the resolution t tokens stand for)."""
    t = indices.shape[1] if num_tokens is None else int(num_tokens)
    size = self.schedule.decode_resolution(t) if image_size is None else int(image_size)
    return self._decode(self._state, jnp.asarray(indices, jnp.int32), t, size)

  def __hash__(self):
    return id(self)

  def __eq__(self, other):
    return self is other
