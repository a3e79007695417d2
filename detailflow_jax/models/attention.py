"""Scaled dot-product attention shared by the tokenizer ViT and the GPT.

Both models reduce to the same math once q/k/v exist: softmax(q k^T / sqrt(d) masked) v. The
modules differ only in how they make q/k/v (separate biased projections vs. a fused one with
RoPE and grouped kv heads), so this function is the one place the attention itself lives.
"""
from typing import Optional

import jax
import jax.numpy as jnp


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          mask: Optional[jax.Array] = None) -> jax.Array:
  """Multi-head attention core.

  Args:
    query: [batch, q_len, num_heads, head_dim].
    key, value: [batch, kv_len, num_kv_heads, head_dim]; num_heads % num_kv_heads == 0, and
      kv head j serves query heads j*r .. j*r + r - 1 (torch repeat_interleave order).
      (KV caches, laid out [batch, num_kv_heads, kv_len, head_dim], go through
      `cached_attention`.)
    mask: bool, True = may attend, broadcastable to [batch, num_heads, q_len, kv_len].

  Returns [batch, q_len, num_heads, head_dim] in the query dtype. Scores and softmax are
  computed in float32 so bf16 inputs keep a stable softmax.
  """
  batch, q_len, num_heads, head_dim = query.shape
  kv_len, num_kv_heads = key.shape[1], key.shape[2]
  if num_heads % num_kv_heads:
    raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
  repeats = num_heads // num_kv_heads
  q = query.reshape(batch, q_len, num_kv_heads, repeats, head_dim)
  scale = 1.0 / jnp.sqrt(jnp.float32(head_dim)).astype(query.dtype)
  scores = jnp.einsum("bqkrd,bskd->bkrqs", q * scale, key, preferred_element_type=jnp.float32)
  if mask is not None:
    mask = jnp.broadcast_to(mask, (batch, num_heads, q_len, kv_len))
    mask = mask.reshape(batch, num_kv_heads, repeats, q_len, kv_len)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
  out = jnp.einsum("bkrqs,bskd->bqkrd", probs, value)
  return out.reshape(batch, q_len, num_heads, head_dim)


def cached_attention(query: jax.Array, k_cache: jax.Array, v_cache: jax.Array, mask: jax.Array,
                     num_keys: jax.Array, chunk: int) -> jax.Array:
  """Attention of a few new queries over the filled front of a KV cache, chunk by chunk.

  query [B, n, H, D]; k_cache, v_cache [B, K, S, D] (kv heads first), S % chunk == 0;
  mask bool broadcastable to [B, H, n, S]; num_keys (traced): keys [0, num_keys) may be read.

  A while loop visits ceil(num_keys / chunk) chunks with an online softmax (running max, sum
  and weighted values, float32), so the work and memory traffic of a step follow the filled
  length and never touch the rest of the cache: generation cost stays linear in the tokens.
  The first chunk must hold a key every query may see (the class token does), so the running
  max is finite after it.
  """
  batch, q_len, num_heads, head_dim = query.shape
  num_kv_heads, length = k_cache.shape[1], k_cache.shape[2]
  if length % chunk:
    raise ValueError(f"cache length {length} is not a multiple of the chunk {chunk}")
  repeats = num_heads // num_kv_heads
  scale = 1.0 / jnp.sqrt(jnp.float32(head_dim)).astype(query.dtype)
  q = jnp.transpose((query * scale).reshape(batch, q_len, num_kv_heads, repeats, head_dim),
                    (0, 2, 3, 1, 4))                                   # [B, K, R, n, D]
  mask = jnp.broadcast_to(mask, (batch, num_heads, q_len, length)).reshape(
      batch, num_kv_heads, repeats, q_len, length)
  stats_shape = (batch, num_kv_heads, repeats, q_len)

  def body(i, carry):
    running_max, denom, acc = carry
    first = i * chunk
    k = jax.lax.dynamic_slice_in_dim(k_cache, first, chunk, axis=2)
    v = jax.lax.dynamic_slice_in_dim(v_cache, first, chunk, axis=2)
    visible = jax.lax.dynamic_slice_in_dim(mask, first, chunk, axis=4)
    scores = jnp.einsum("bkrqd,bksd->bkrqs", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(visible, scores, -jnp.inf)
    new_max = jnp.maximum(running_max, jnp.max(scores, axis=-1))
    probs = jnp.exp(scores - new_max[..., None])               # masked keys: exp(-inf) = 0
    correction = jnp.exp(running_max - new_max)
    denom = denom * correction + jnp.sum(probs, axis=-1)
    acc = acc * correction[..., None] + jnp.einsum(
        "bkrqs,bksd->bkrqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return new_max, denom, acc

  init = (jnp.full(stats_shape, -jnp.inf, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
          jnp.zeros(stats_shape + (head_dim,), jnp.float32))
  num_chunks = jnp.minimum((num_keys + chunk - 1) // chunk, length // chunk)
  _, denom, acc = jax.lax.fori_loop(0, num_chunks, body, init)
  out = (acc / denom[..., None]).astype(query.dtype)                  # [B, K, R, n, D]
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(batch, q_len, num_heads, head_dim)
