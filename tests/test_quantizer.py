"""Vector quantizer: nearest code, straight-through gradient, losses, usage, top-k noise."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from detailflow_jax.models.quantizer import VectorQuantizer, codebook_usage, l2_normalize


@pytest.fixture()
def quantizer():
  q = VectorQuantizer(4, 2, beta=0.25, l2_norm=True, show_usage=True, rngs=nnx.Rngs(0))
  q.embedding[...] = jnp.array([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [0.0, -1.0]])
  return q


def test_nearest_code_and_straight_through(quantizer):
  z = jnp.array([[[3.0, 0.5], [0.2, 1.0], [-2.0, -2.1]]])
  out = quantizer(z)
  np.testing.assert_array_equal(out.indices, [[0, 1, 3]])
  np.testing.assert_allclose(out.quant, [[[1, 0], [0, 1], [0, -1]]], atol=1e-6)
  # Straight-through: d quant / d z is the derivative of l2-normalisation alone.
  g = jax.grad(lambda z: quantizer(z).quant.sum())(z)
  g_norm = jax.grad(lambda z: l2_normalize(z).sum())(z)
  np.testing.assert_allclose(g, g_norm, atol=1e-6)


def test_losses_by_hand(quantizer):
  z = jnp.array([[[3.0, 4.0], [0.0, -5.0]]])   # normalised: (0.6, 0.8), (0, -1)
  out = quantizer(z)
  losses = quantizer.losses(out)
  # Codes: (0, 1) for the first (distance 0.2^2*... ), (0, -1) exact for the second.
  d_first = (0.6 - 0.0) ** 2 + (0.8 - 1.0) ** 2
  np.testing.assert_allclose(losses["vq_loss"], d_first / 4, rtol=1e-5)
  np.testing.assert_allclose(losses["commit_loss"], 0.25 * d_first / 4, rtol=1e-5)
  # noise_end drops the first positions from both terms.
  tail = quantizer.losses(out, noise_end=1)
  np.testing.assert_allclose(tail["vq_loss"], 0.0, atol=1e-7)
  assert float(losses["entropy_loss"]) == 0.0  # entropy_loss_ratio 0


def test_codebook_usage_window(quantizer):
  assert float(quantizer.update_usage(jnp.array([[0, 0, 1]]))) == 0.5
  assert float(quantizer.update_usage(jnp.array([[3]]))) == 0.75
  assert float(codebook_usage(jnp.array([-1, -1]), 4)) == 0.0


def test_random_topk_codes_stay_in_topk(quantizer):
  z = jax.random.normal(jax.random.key(0), (3, 5, 2))
  out = quantizer(z)
  order = np.argsort(np.asarray(out.distances), axis=-1)
  seen = set()
  for seed in range(20):
    codes = np.asarray(quantizer.random_topk_codes(out, 2, jax.random.key(seed)))
    for idx in np.ndindex(codes.shape):
      assert codes[idx] in order[idx][:2]
      seen.add((idx, int(codes[idx])))
  assert len(seen) == 15 * 2  # at every position both of the two nearest codes get drawn
