"""Scaled dot-product attention shared by the tokenizer ViT and the GPT.

Both models reduce to the same math once q/k/v exist: softmax(q k^T / sqrt(d) masked) v. The
modules differ only in how they make q/k/v (separate biased projections vs. one kernel grouped
by kv head, with RoPE), so this function is the one place the attention itself lives.
"""

import jax
import jax.numpy as jnp

from .precision import float32_accumulated

# Bytes of float32 scores one tile of `dot_product_attention` may hold, per backend. XLA:CPU
# runs the whole masked softmax between the two products as one YNNPACK fusion; once the
# scores outgrow the caches it slows to half speed. The DF-16 decoder's attention (8 images x
# 12 heads x 384 queries x 384 keys, 56 MB of scores), 2-core CPU, 2026-12-07: untiled 76.8 ms,
# tiles of one image 40.5 ms (7 MB), one image x 192 queries 35.9 ms (3.5 MB), x 128 39.7 ms,
# x 64 49.9 ms; the outputs were bitwise equal. Backends not listed: one softmax over all.
SCORE_TILE_BYTES = {"cpu": 4 << 20}


def _scores(q, k, preferred_element_type):
  return jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=preferred_element_type)


def _weighted_values(probs, v, preferred_element_type):
  return jnp.einsum("bkqs,bksd->bkqd", probs, v, preferred_element_type=preferred_element_type)


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          mask: jax.Array | None = None) -> jax.Array:
  """Multi-head attention core.

  Args:
    query: [batch, q_len, num_heads, head_dim].
    key, value: [batch, kv_len, num_kv_heads, head_dim]; num_heads % num_kv_heads == 0, and
      kv head j serves query heads j*r .. j*r + r - 1 (torch repeat_interleave order).
      (KV caches, laid out [batch, num_kv_heads, kv_len, head_dim], go through
      `cached_attention`.)
    mask: bool, True = may attend, broadcastable to [batch, num_heads, q_len, kv_len].

  Returns [batch, q_len, num_heads, head_dim] in the query dtype. Scores, softmax and the
  weighted sum of values are computed in float32 so bf16 inputs keep a stable softmax.

  On backends listed in SCORE_TILE_BYTES the work runs in tiles (whole examples, else blocks
  of queries of one example) whose float32 scores fit that many bytes, one after the other;
  every query still sees all its keys in one softmax, so each tile's numbers are the ones the
  untiled computation gives.
  """
  batch, q_len, num_heads, head_dim = query.shape
  kv_len, num_kv_heads = key.shape[1], key.shape[2]
  if num_heads % num_kv_heads:
    raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
  budget = SCORE_TILE_BYTES.get(jax.default_backend())
  query_bytes = num_heads * kv_len * 4  # one query's float32 scores
  if budget is None or batch * q_len * query_bytes <= budget:
    return _attention(query, key, value, mask)
  examples, queries = score_tiles(batch, q_len, query_bytes, budget)
  if mask is not None:
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    mask = jnp.broadcast_to(mask, (batch, mask.shape[1], q_len, kv_len))
    # [batch tiles, query blocks, examples, mask heads, queries, keys]
    mask = jnp.moveaxis(mask.reshape(batch // examples, examples, mask.shape[1],
                                     q_len // queries, queries, kv_len), 3, 1)
  # [batch tiles, query blocks, examples, queries, heads, head_dim]
  q = jnp.moveaxis(query.reshape(batch // examples, examples, q_len // queries, queries,
                                 num_heads, head_dim), 2, 1)
  split = lambda x: x.reshape(batch // examples, examples, *x.shape[1:])

  def batch_tile(operands):
    q, k, v, mask = operands
    return jax.lax.map(lambda qm: _attention(qm[0], k, v, qm[1]), (q, mask))

  out = jax.lax.map(batch_tile, (q, split(key), split(value), mask))
  return jnp.moveaxis(out, 1, 2).reshape(batch, q_len, num_heads, head_dim)


def score_tiles(batch: int, q_len: int, query_bytes: int, budget: int) -> tuple[int, int]:
  """(examples, queries) per tile of `dot_product_attention`: as many whole examples as fit
  `budget` bytes of scores (a divisor of batch), else one example and the largest divisor of
  q_len whose queries fit (the whole query length where that divisor would be under 16, since
  a loop of tiny tiles costs more than the cache misses it saves)."""
  per_example = query_bytes * q_len
  if per_example <= budget:
    return max(d for d in range(1, batch + 1) if batch % d == 0 and d * per_example <= budget), q_len
  fit = [d for d in range(1, q_len + 1) if q_len % d == 0 and d * query_bytes <= budget]
  queries = max(fit, default=1)
  return 1, (queries if queries >= min(16, q_len) else q_len)


def _attention(query, key, value, mask):
  """`dot_product_attention` in one softmax over every query and key."""
  batch, q_len, num_heads, head_dim = query.shape
  kv_len, num_kv_heads = key.shape[1], key.shape[2]
  repeats = num_heads // num_kv_heads
  scale = 1.0 / jnp.sqrt(jnp.float32(head_dim)).astype(query.dtype)
  # Head-major operands ([B, K, R*q, D] queries, [B, K, S, D] keys/values): both contractions
  # are then plain batched matmuls over B*K, and the only transposes are of the q/k/v/output
  # activations, never of the q x S scores (the 5-D einsum layout cost XLA:CPU ~2x here).
  q = jnp.transpose((query * scale).reshape(batch, q_len, num_kv_heads, repeats, head_dim),
                    (0, 2, 3, 1, 4)).reshape(batch, num_kv_heads, repeats * q_len, head_dim)
  k = jnp.transpose(key, (0, 2, 1, 3))
  v = jnp.transpose(value, (0, 2, 1, 3))
  # float32_accumulated: under autocast (bf16 q/k/v) the backward's products are bf16 too.
  scores = float32_accumulated(_scores, q, k)
  if mask is not None:
    mask = jnp.broadcast_to(mask, (batch, num_heads, q_len, kv_len))
    mask = mask.reshape(batch, num_kv_heads, repeats * q_len, kv_len)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  # Softmax with the normalisation moved after the value matmul: exp(s - max) feeds it and the
  # row sums divide its head_dim-wide output, saving a full pass over the q x S probabilities.
  weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  out = float32_accumulated(_weighted_values, weights.astype(value.dtype), v) / denom
  out = out.astype(query.dtype).reshape(batch, num_kv_heads, repeats, q_len, head_dim)
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(batch, q_len, num_heads, head_dim)


def cached_attention(query: jax.Array, k_cache: jax.Array, v_cache: jax.Array, mask: jax.Array,
                     num_keys: jax.Array, chunk: int) -> jax.Array:
  """Attention of a few new queries over the filled front of a KV cache.

  query [B, n, H, D]; k_cache, v_cache [B, K, S, D] (kv heads first), S % chunk == 0;
  mask bool broadcastable to [B, H, n, S]; num_keys (traced): keys [0, num_keys) may be read.

  chunk < S ("chunked"): a while loop visits ceil(num_keys / chunk) chunks with an online
  softmax (running max, sum and weighted values, float32), so the work and memory traffic of
  a step follow the filled length and never touch the rest of the cache: generation cost
  stays linear in the tokens. The first chunk must hold a key every query may see (the class
  token does), so the running max is finite after it.
  chunk == S ("whole"): one masked softmax over the whole cache, no loop; num_keys is then
  unused, so the mask must hide every slot at or past it (the group-causal mask does). Work
  follows S, not the fill, but there is no loop or online-softmax bookkeeping.
  """
  batch, q_len, num_heads, head_dim = query.shape
  num_kv_heads, length = k_cache.shape[1], k_cache.shape[2]
  if length % chunk:
    raise ValueError(f"cache length {length} is not a multiple of the chunk {chunk}")
  repeats = num_heads // num_kv_heads
  rows = repeats * q_len
  scale = 1.0 / jnp.sqrt(jnp.float32(head_dim)).astype(query.dtype)
  # Head-major [B, K, R*n, D] queries: each contraction is one batched matmul over B*K.
  q = jnp.transpose((query * scale).reshape(batch, q_len, num_kv_heads, repeats, head_dim),
                    (0, 2, 3, 1, 4)).reshape(batch, num_kv_heads, rows, head_dim)
  mask = jnp.broadcast_to(mask, (batch, num_heads, q_len, length)).reshape(
      batch, num_kv_heads, rows, length)

  def scores_of(k, visible):
    scores = _scores(q, k, jnp.float32)
    return jnp.where(visible, scores, -jnp.inf)              # masked keys: exp(-inf) = 0

  def weighted_values(probs, v):
    return _weighted_values(probs.astype(v.dtype), v, jnp.float32)

  if chunk == length:
    scores = scores_of(k_cache, mask)
    probs = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    out = weighted_values(probs, v_cache) / jnp.sum(probs, axis=-1, keepdims=True)
  else:
    def body(i, carry):
      running_max, denom, acc = carry
      first = i * chunk
      k = jax.lax.dynamic_slice_in_dim(k_cache, first, chunk, axis=2)
      v = jax.lax.dynamic_slice_in_dim(v_cache, first, chunk, axis=2)
      scores = scores_of(k, jax.lax.dynamic_slice_in_dim(mask, first, chunk, axis=3))
      new_max = jnp.maximum(running_max, jnp.max(scores, axis=-1, keepdims=True))
      probs = jnp.exp(scores - new_max)
      correction = jnp.exp(running_max - new_max)
      denom = denom * correction + jnp.sum(probs, axis=-1, keepdims=True)
      return new_max, denom, acc * correction + weighted_values(probs, v)

    stats_shape = (batch, num_kv_heads, rows, 1)
    init = (jnp.full(stats_shape, -jnp.inf, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros((batch, num_kv_heads, rows, head_dim), jnp.float32))
    num_chunks = jnp.minimum((num_keys + chunk - 1) // chunk, length // chunk)
    _, denom, acc = jax.lax.fori_loop(0, num_chunks, body, init)
    out = acc / denom
  out = out.astype(query.dtype).reshape(batch, num_kv_heads, repeats, q_len, head_dim)
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(batch, q_len, num_heads, head_dim)
