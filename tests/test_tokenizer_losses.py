"""Tokenizer-training losses against hand-computed values, DiffAugment, and the self-correction
step's index bookkeeping against the reference's rules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detailflow_jax.models.tokenizer import group_cosine_similarity
from detailflow_jax.train import gan


def test_gan_losses_hand_computed():
  real, fake = jnp.array([2.0, 0.5]), jnp.array([-2.0, 0.0])
  # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * (0.25 + 0.5)
  assert float(gan.hinge_d_loss(real, fake)) == pytest.approx(0.375)
  assert float(gan.hinge_gen_loss(jnp.array([1.0, 3.0]))) == pytest.approx(-2.0)
  zero = jnp.zeros(3)
  assert float(gan.vanilla_d_loss(zero, zero)) == pytest.approx(np.log(2.0))
  assert float(gan.non_saturating_gen_loss(zero)) == pytest.approx(np.log(2.0))
  # softplus(-3) for the real logit, softplus(1) for the fake one.
  expected = 0.5 * (np.log1p(np.exp(-3.0)) + np.log1p(np.exp(1.0)))
  assert float(gan.non_saturating_d_loss(jnp.array([3.0]), jnp.array([1.0]))) == pytest.approx(expected, rel=1e-6)


def test_lecam_ema_then_regulariser():
  ema = gan.lecam_update(jnp.zeros(2), jnp.array([1.0, 1.0]), jnp.array([-1.0, -1.0]), 0.999)
  np.testing.assert_allclose(ema, [0.001, -0.001], rtol=1e-5)
  # relu(1 - (-0.001))^2 + relu(0.001 - (-1))^2
  assert float(gan.lecam_reg(jnp.array([1.0]), jnp.array([-1.0]), ema)) == pytest.approx(2 * 1.001 ** 2, rel=1e-5)
  loss, new_ema, metrics = gan.discriminator_losses(
      jnp.array([1.0]), jnp.array([-1.0]), jnp.zeros(2), d_loss="hinge", disc_weight=jnp.float32(0.2),
      lecam_weight=0.001)
  # hinge: 0.5 * (0 + 0) = 0; total = 0.2 * (0.001 * 2.004002 + 0)
  assert float(loss) == pytest.approx(0.2 * 0.001 * 2 * 1.001 ** 2, rel=1e-5)
  assert float(metrics["d_base_loss"]) == 0.0
  assert float(gan.adopt_weight(0.2, jnp.int32(9), 10)) == 0.0
  assert float(gan.adopt_weight(0.2, jnp.int32(10), 10)) == pytest.approx(0.2)


def test_diff_augment_ops():
  key = jax.random.key(0)
  x = jax.random.uniform(key, (4, 16, 16, 3), minval=-1, maxval=1)
  np.testing.assert_array_equal(gan.diff_augment(x, key, prob=0.0), x)
  bright = gan.rand_brightness(x, key)
  shift = np.asarray(bright - x)
  assert np.allclose(shift, shift[:, :1, :1, :1], atol=1e-6) and np.all(np.abs(shift) <= 0.5)

  # Translation: each image is its own copy shifted by (dy, dx) in [-2, 2], zeros uncovered.
  moved = np.asarray(gan.rand_translation(x, key, 0.125))
  xs = np.asarray(x)
  for i in range(4):
    found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
             if np.allclose(moved[i], _shift(xs[i], dy, dx))]
    assert found, f"image {i} is not a shifted copy"

  # Cutout 0.5 of 16 px: an 8x8 square (clipped at borders) of zeros, the rest untouched.
  ones = jnp.ones((8, 16, 16, 1))
  cut = np.asarray(gan.rand_cutout(ones, key, 0.5))[..., 0]
  for img in cut:
    rows, cols = np.nonzero(img == 0)
    assert 0 < len(rows) <= 64
    assert len(rows) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # a rectangle
  with pytest.raises(ValueError, match="unknown DiffAugment policy"):
    gan.diff_augment(x, key, "colour")


def _shift(img, dy, dx):
  """img moved so that out[r, c] = img[r + dy, c + dx] (zero outside)."""
  h, w, _ = img.shape
  out = np.zeros_like(img)
  for r in range(h):
    for c in range(w):
      if 0 <= r + dy < h and 0 <= c + dx < w:
        out[r, c] = img[r + dy, c + dx]
  return out


def test_group_cosine_similarity():
  same = jnp.ones((2, 4, 3))
  assert float(group_cosine_similarity(same, 2)) == pytest.approx(1.0)
  opposite = jnp.array([[[1.0, 0.0], [-1.0, 0.0]]])
  assert float(group_cosine_similarity(opposite, 2)) == pytest.approx(-1.0)


@pytest.mark.parametrize("noise_idx", [1, 8, 12])
def test_self_correction_bookkeeping(tokenizer, golden_images_nhwc, noise_idx):
  """The training forward's perturbed half follows the reference's rules: clean codes before
  noise_idx, random top-50 codes on [noise_idx, noise_end) (1 token inside the causal prefix, a
  group after it), re-encoded codes after; the traced-prefix encoder equals the static one; the
  VQ terms are weighted by the positions each half trains."""
  cfg = tokenizer.config
  images = jnp.asarray(golden_images_nhwc)
  m = cfg.num_latent_tokens
  key = jax.random.key(3)
  out = tokenizer.train_forward(images, images, key, num_tokens=m, max_tokens=m,
                                decode_res=images.shape[1], noise_idx=jnp.int32(noise_idx))
  b = images.shape[0]
  assert out.recon.shape[0] == 2 * b and out.target.shape[0] == 2 * b
  span = 1 if noise_idx < cfg.causal_len else cfg.group_size
  noise_end = noise_idx + span

  clean = tokenizer.encode(images)
  np.testing.assert_array_equal(out.indices, clean.indices)
  noisy = tokenizer.quantize.random_topk_codes(
      tokenizer.quantize(clean.latents), 50, key)
  prefix_idx = jnp.concatenate([clean.indices[:, :noise_idx], noisy[:, noise_idx:noise_end]], 1)
  # The noisy span is drawn among each position's 50 nearest codes.
  dist = tokenizer.quantize(clean.latents).distances
  ranks = jnp.argsort(jnp.argsort(dist, -1), -1)
  span_ranks = jnp.take_along_axis(ranks[:, :noise_end], prefix_idx[..., None], -1)[:, noise_idx:]
  assert int(span_ranks.max()) < 50
  # Static-slice refine path (parity-tested against the reference) == traced-prefix path.
  prefix_quant = tokenizer.quantize.lookup(prefix_idx)
  refined = tokenizer.refine(images, prefix_quant)
  expected = jnp.concatenate([prefix_quant, refined.quant[:, noise_end:]], 1)
  z = tokenizer.post_quant_conv(expected)
  recon_noisy = tokenizer.decoder(z, images.shape[1])
  np.testing.assert_allclose(out.recon[b:], recon_noisy, atol=2e-5)
  np.testing.assert_allclose(out.recon[:b], tokenizer(images), atol=2e-5)

  # VQ weighting: clean m / (2m - noise_end), refined (m - noise_end) / (2m - noise_end).
  vq_clean = tokenizer.quantize.losses(tokenizer.quantize(clean.latents))
  vq_ref = tokenizer.quantize.losses(tokenizer.quantize(refined.latents), noise_end)
  total = 2 * m - noise_end
  want = vq_clean["commit_loss"] * m / total + vq_ref["commit_loss"] * (m - noise_end) / total
  assert float(out.losses["commit_loss"]) == pytest.approx(float(want), rel=1e-4)
  # The static slice rule of the reference == our traced mask.
  tail = tokenizer.quantize(refined.latents)
  manual = 0.25 * np.mean(np.square(
      np.asarray(tokenizer.quantize.lookup(tail.indices))[:, noise_end:]
      - np.asarray(tail.normalized_input)[:, noise_end:]))
  assert float(vq_ref["commit_loss"]) == pytest.approx(manual, rel=1e-4)


def test_lpips_head_dropout_scales_kept_values_and_zeroes_dropped():
  """The reference's NetLinLayer: Dropout(p) before each 1x1 head, active in training."""
  from detailflow_jax.models.lpips import LPIPS
  lp = LPIPS((4, 4, 4, 4, 4), rngs=0)
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  y = jax.random.uniform(jax.random.key(2), (2, 16, 16, 3), minval=-1, maxval=1)
  plain = np.asarray(lp(x, y))
  shapes = lp.tap_shapes(2, 16, 16)
  assert shapes[0] == (2, 16, 16, 4) and shapes[4] == (2, 1, 1, 4)
  keep_all = [jnp.ones(s, bool) for s in shapes]
  np.testing.assert_allclose(lp(x, y, keep_all, 0.5), 2.0 * plain, rtol=1e-5)
  drop_all = [jnp.zeros(s, bool) for s in shapes]
  np.testing.assert_allclose(lp(x, y, drop_all, 0.5), 0.0, atol=1e-7)
  with pytest.raises(ValueError, match="dropout_keep"):
    lp(x, y, None, 0.5)


def test_trainer_draws_lpips_masks_at_the_configured_rate():
  from detailflow_jax.train import tokenizer as recipe
  assert recipe.LossConfig().lpips_dropout == 0.5  # the reference's Dropout(0.5), on by default
  with pytest.raises(ValueError, match="lpips_dropout"):
    recipe.LossConfig(lpips_dropout=1.0)
