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
