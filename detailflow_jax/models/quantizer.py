"""l2-normalised vector quantizer (the reference's VectorQuantizer)."""
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

USAGE_WINDOW = 65536  # indices remembered for the codebook-usage metric


class CodebookUsage(nnx.Variable):
  """Rolling window of the most recent code indices (a buffer, not trained)."""


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """torch F.normalize: x / max(||x||, eps)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


class QuantizerOutput(NamedTuple):
  quant: jax.Array            # [..., D] straight-through code vectors
  indices: jax.Array          # [...] int32 nearest codes
  distances: jax.Array        # [..., V] squared distances used for the argmin
  normalized_input: jax.Array  # [..., D] the (normalised) input the codes approximate


class VectorQuantizer(nnx.Module):

  def __init__(self, codebook_size: int, dim: int, *, beta: float = 0.25,
               entropy_loss_ratio: float = 0.0, l2_norm: bool = True, show_usage: bool = True,
               vq_loss_ratio: float = 1.0, rngs: nnx.Rngs):
    self.codebook_size = codebook_size
    self.dim = dim
    self.beta = beta
    self.entropy_loss_ratio = entropy_loss_ratio
    self.l2_norm = l2_norm
    self.vq_loss_ratio = vq_loss_ratio
    init = nnx.initializers.uniform(2.0 / codebook_size)
    table = init(rngs.params(), (codebook_size, dim)) - 1.0 / codebook_size
    if l2_norm:
      table = l2_normalize(table)
    self.embedding = nnx.Param(table, eager_sharding=False, out_sharding=("vocab", None))
    self.show_usage = show_usage
    if show_usage:
      # Zeros, as the reference's codebook_used buffer starts: until the window has filled,
      # code 0 counts as used (the usage metric reads this window only).
      self.codebook_used = CodebookUsage(jnp.zeros((USAGE_WINDOW,), jnp.int32))

  def codebook(self) -> jax.Array:
    table = self.embedding[...]
    return l2_normalize(table) if self.l2_norm else table

  def lookup(self, indices: jax.Array) -> jax.Array:
    """Code vectors of `indices` (any shape) -> indices.shape + (D,)."""
    return jnp.take(self.codebook(), indices, axis=0)

  def __call__(self, z: jax.Array) -> QuantizerOutput:
    """Nearest code under squared distance (after l2-normalising both sides when configured)."""
    codebook = self.codebook()
    # bf16 activations (autocast) are quantized in the codebook's float32; with bf16
    # parameters (native bf16 inference) nothing changes.
    z = z.astype(jnp.promote_types(z.dtype, codebook.dtype))
    if self.l2_norm:
      z = l2_normalize(z)
    zf = z.astype(jnp.float32)
    cb = codebook.astype(jnp.float32)
    d = (jnp.sum(zf ** 2, axis=-1, keepdims=True) + jnp.sum(cb ** 2, axis=-1)
         - 2.0 * jnp.einsum("...d,nd->...n", zf, cb, precision="highest"))
    indices = jnp.argmin(d, axis=-1).astype(jnp.int32)
    codes = jnp.take(codebook, indices, axis=0).astype(z.dtype)
    quant = z + jax.lax.stop_gradient(codes - z)
    return QuantizerOutput(quant, indices, d, z)

  def losses(self, out: QuantizerOutput, noise_end=0) -> dict[str, jax.Array]:
    """Codebook, commitment (x beta) and entropy losses; the first two averaged over positions
    >= noise_end (axis 1). noise_end (a scalar or per image [B]) may be traced (a mask, not a
    slice), so self-correction batches with different noise positions share one compiled step.
    `out`: anything with normalized_input / indices / distances (e.g. an EncodeOutput)."""
    z = out.normalized_input
    codes = jnp.take(self.codebook(), out.indices, axis=0)
    keep = jnp.arange(z.shape[1])[None] >= jnp.reshape(noise_end, (-1, 1))
    keep = jnp.broadcast_to(keep, z.shape[:2])[..., None].astype(jnp.float32)
    count = jnp.maximum(jnp.sum(keep) * z.shape[-1], 1.0)
    masked_mean = lambda sq: jnp.sum(sq.astype(jnp.float32) * keep) / count
    vq = masked_mean(jnp.square(codes - jax.lax.stop_gradient(z))) * self.vq_loss_ratio
    commit = self.beta * masked_mean(jnp.square(jax.lax.stop_gradient(codes) - z))
    entropy = self.entropy_loss_ratio * entropy_loss(-out.distances)
    return {"vq_loss": vq, "commit_loss": commit, "entropy_loss": entropy}

  def update_usage(self, indices: jax.Array) -> jax.Array:
    """Pushes `indices` into the rolling window and returns the fraction of codes seen in it."""
    if not self.show_usage:
      return jnp.float32(0.0)
    flat = indices.reshape(-1).astype(jnp.int32)[-USAGE_WINDOW:]
    window = jnp.concatenate([self.codebook_used[...][flat.shape[0]:], flat])
    self.codebook_used[...] = window
    return codebook_usage(window, self.codebook_size)

  def topk_codes(self, out: QuantizerOutput, k: int, ranks: jax.Array) -> jax.Array:
    """For self-correction: per position, the code at `ranks` (int, out.indices' shape, in
    [0, k); 0 = nearest) among the k nearest ones (ascending distance, as torch.topk)."""
    k = min(k, self.codebook_size)
    _, top = jax.lax.top_k(-out.distances, k)
    return jnp.take_along_axis(top, ranks[..., None].astype(jnp.int32), axis=-1)[..., 0].astype(jnp.int32)

  def random_topk_codes(self, out: QuantizerOutput, k: int, key: jax.Array) -> jax.Array:
    """`topk_codes` with ranks drawn uniformly from `key` (draw_topk_ranks)."""
    return self.topk_codes(out, k, draw_topk_ranks(key, out.indices.shape, min(k, self.codebook_size)))


def draw_topk_ranks(key: jax.Array, shape, k: int) -> jax.Array:
  """Self-correction's draw: a uniform rank in [0, k) per position (the reference's
  torch.randint(0, top_k, ...) in VectorQuantizer.forward)."""
  return jax.random.randint(key, shape, 0, k).astype(jnp.int32)


def codebook_usage(window: jax.Array, codebook_size: int) -> jax.Array:
  """Fraction of the codebook present among the valid (>= 0) entries of `window`."""
  counts = jnp.zeros((codebook_size,), jnp.int32).at[jnp.where(window >= 0, window, codebook_size)].add(
      1, mode="drop")
  return jnp.mean((counts > 0).astype(jnp.float32))


def entropy_loss(affinity: jax.Array, temperature: float = 0.01) -> jax.Array:
  """Per-sample entropy minus entropy of the mean distribution (softmax over codes)."""
  logits = affinity.reshape(-1, affinity.shape[-1]).astype(jnp.float32) / temperature
  probs = jax.nn.softmax(logits, axis=-1)
  log_probs = jax.nn.log_softmax(logits + 1e-5, axis=-1)
  avg_probs = jnp.mean(probs, axis=0)
  avg_entropy = -jnp.sum(avg_probs * jnp.log(avg_probs + 1e-5))
  sample_entropy = -jnp.mean(jnp.sum(probs * log_probs, axis=-1))
  return sample_entropy - avg_entropy
