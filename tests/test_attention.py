"""The attention core: the chunked cached attention equals the plain one over the keys it may
read, whatever the fill level, chunk or kv-head grouping."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detailflow_jax.models.attention import cached_attention, dot_product_attention
from detailflow_jax.models.gpt import cache_chunk


@pytest.mark.parametrize("num_heads,num_kv_heads,chunk",
                         [(4, 4, 8), (4, 2, 16), (6, 1, 32), (4, 2, 64)])  # 64: whole cache
def test_cached_attention_matches_plain_attention(num_heads, num_kv_heads, chunk):
  rng = np.random.default_rng(num_heads * 10 + chunk)
  batch, q_len, length, dim = 3, 4, 64, 8
  q = jnp.asarray(rng.normal(size=(batch, q_len, num_heads, dim)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(batch, num_kv_heads, length, dim)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(batch, num_kv_heads, length, dim)), jnp.float32)
  run = jax.jit(cached_attention, static_argnames="chunk")
  for filled in (1, chunk - 1, chunk, chunk + 3, length):
    # Group-causal-like: query i sees keys < filled - q_len + i + 1, key 0 always.
    mask = jnp.arange(length)[None, :] < (filled - q_len + 1 + jnp.arange(q_len))[:, None]
    mask = mask | (jnp.arange(length)[None, :] == 0)
    # Whatever lies beyond the filled front (stale or unwritten slots) must not matter.
    got = run(q, k.at[:, :, filled:].set(1e4), v.at[:, :, filled:].set(-1e4), mask,
              jnp.int32(filled), chunk=chunk)
    want = dot_product_attention(q, jnp.swapaxes(k[:, :, :filled], 1, 2),
                                 jnp.swapaxes(v[:, :, :filled], 1, 2), mask[:, :filled])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=1e-5)


def test_cache_chunk_divides_the_cache():
  assert cache_chunk(512) == 64 and cache_chunk(16) == 16 and cache_chunk(24) == 24
  assert cache_chunk(40) == 40 and cache_chunk(72) == 24 and cache_chunk(7) == 7
  with pytest.raises(ValueError, match="multiple of the chunk"):
    cached_attention(jnp.zeros((1, 1, 1, 4)), jnp.zeros((1, 1, 20, 4)), jnp.zeros((1, 1, 20, 4)),
                     jnp.ones((1, 20), bool), jnp.int32(3), 8)


def test_score_tiles_choose_examples_then_query_blocks():
  from detailflow_jax.models.attention import score_tiles
  # The DF-16 decoder's attention: one image's scores (12 heads x 384 x 384 float32 = 7 MB)
  # exceed 4 MiB, so one image x the largest divisor of 384 queries that fits (192: 3.5 MB).
  assert score_tiles(8, 384, 12 * 384 * 4, 4 << 20) == (1, 192)
  # Whole examples while they fit: the largest divisor of the batch.
  assert score_tiles(8, 129, 12 * 129 * 4, 4 << 20) == (4, 129)
  assert score_tiles(7, 129, 12 * 129 * 4, 4 << 20) == (1, 129)
  # No divisor of a prime query length >= 16 fits: whole examples rather than 1-query tiles.
  assert score_tiles(2, 383, 12 * 383 * 4, 4 << 20) == (1, 383)


@pytest.mark.parametrize("mask_shape", [None, (32, 10), (4, 1, 32, 10), (1, 6, 32, 10), (4, 6, 32, 10)])
@pytest.mark.parametrize("budget", [4000, 16000])  # query blocks of one example; whole examples
def test_tiled_attention_equals_one_softmax(monkeypatch, mask_shape, budget):
  import detailflow_jax.models.attention as attention
  rng = np.random.default_rng(budget + len(mask_shape or ()))
  batch, q_len, kv_len, num_heads, num_kv_heads, dim = 4, 32, 10, 6, 2, 4
  q = jnp.asarray(rng.normal(size=(batch, q_len, num_heads, dim)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(batch, kv_len, num_kv_heads, dim)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(batch, kv_len, num_kv_heads, dim)), jnp.float32)
  mask = None if mask_shape is None else jnp.asarray(rng.random(mask_shape) < 0.6).at[..., 0].set(True)
  want = attention._attention(q, k, v, mask)
  monkeypatch.setitem(attention.SCORE_TILE_BYTES, jax.default_backend(), budget)
  examples, queries = attention.score_tiles(batch, q_len, num_heads * kv_len * 4, budget)
  # One example's scores: 6 heads x 32 x 10 x 4 bytes = 7680.
  assert (examples, queries) == ((1, 16) if budget == 4000 else (2, 32))
  tiled = jax.make_jaxpr(attention.dot_product_attention)(q, k, v, mask)
  assert "scan" in str(tiled) or "while" in str(tiled)
  got = jax.jit(attention.dot_product_attention)(q, k, v, mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-6)
