"""Scaled dot-product attention shared by the tokenizer ViT and the GPT.

Both models reduce to the same math once q/k/v exist: softmax(q k^T / sqrt(d) masked) v. The
modules differ only in how they make q/k/v (separate biased projections vs. a fused one with
RoPE and grouped kv heads), so this function is the one place the attention itself lives.
"""
from typing import Optional

import jax
import jax.numpy as jnp


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          mask: Optional[jax.Array] = None, kv_heads_first: bool = False) -> jax.Array:
  """Multi-head attention core.

  Args:
    query: [batch, q_len, num_heads, head_dim].
    key, value: [batch, kv_len, num_kv_heads, head_dim]; num_heads % num_kv_heads == 0, and
      kv head j serves query heads j*r .. j*r + r - 1 (torch repeat_interleave order).
      With kv_heads_first: [batch, num_kv_heads, kv_len, head_dim] (the KV-cache layout). Then
      the few query rows are transposed instead of the long keys/values, and each (batch,
      kv head) is one plain GEMM: ~2x faster for cached decoding on CPU.
    mask: bool, True = may attend, broadcastable to [batch, num_heads, q_len, kv_len].

  Returns [batch, q_len, num_heads, head_dim] in the query dtype. Scores and softmax are
  computed in float32 so bf16 inputs keep a stable softmax.
  """
  batch, q_len, num_heads, head_dim = query.shape
  num_kv_heads = key.shape[1 if kv_heads_first else 2]
  kv_len = key.shape[2 if kv_heads_first else 1]
  if num_heads % num_kv_heads:
    raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
  repeats = num_heads // num_kv_heads
  q = query.reshape(batch, q_len, num_kv_heads, repeats, head_dim)
  scale = 1.0 / jnp.sqrt(jnp.float32(head_dim)).astype(query.dtype)
  if kv_heads_first:
    scores = jnp.einsum("bkrqd,bksd->bkrqs", jnp.transpose(q * scale, (0, 2, 3, 1, 4)), key,
                        preferred_element_type=jnp.float32)
  else:
    scores = jnp.einsum("bqkrd,bskd->bkrqs", q * scale, key, preferred_element_type=jnp.float32)
  if mask is not None:
    mask = jnp.broadcast_to(mask, (batch, num_heads, q_len, kv_len))
    mask = mask.reshape(batch, num_kv_heads, repeats, q_len, kv_len)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
  if kv_heads_first:
    out = jnp.transpose(jnp.einsum("bkrqs,bksd->bkrqd", probs, value), (0, 3, 1, 2, 4))
  else:
    out = jnp.einsum("bkrqs,bskd->bqkrd", probs, value)
  return out.reshape(batch, q_len, num_heads, head_dim)
