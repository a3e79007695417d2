"""FID / IS / precision-recall against numpy oracles transcribed from ADM's evaluator.py, on
synthetic features (closed-form Gaussians, the singular-product retry, ties, float16 overflow)."""
import warnings

import numpy as np
import pytest
from scipy import linalg

from detailflow_jax.eval import scores

# ------------------------------------------------------------------------------ oracles -------


def oracle_fid(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """ADM's FIDStatistics.frechet_distance, line by line (sqrtm without `disp`)."""
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
    covmean = covmean.real
  return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def oracle_is(logits, split_size=5000):
  x = np.asarray(logits, np.float64)
  preds = np.exp(x - x.max(1, keepdims=True))
  preds /= preds.sum(1, keepdims=True)
  out = []
  for i in range(0, len(preds), split_size):
    part = preds[i:i + split_size]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    out.append(np.exp(np.mean(np.sum(kl, 1))))
  return np.mean(out)


def oracle_distances(u, v):
  """ADM's float16 distance block, whole-matrix float32 fallback."""
  u16, v16 = u.astype(np.float16), v.astype(np.float16)
  with np.errstate(over="ignore", invalid="ignore"):
    nu = np.square(u16).astype(np.float32).sum(1).astype(np.float16)
    nv = np.square(v16).astype(np.float32).sum(1).astype(np.float16)
    uv = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
    d = np.maximum(nu[:, None] - np.float16(2) * uv + nv[None, :], np.float16(0))
  if np.isfinite(d).all():
    return d.astype(np.float32)
  u, v = u.astype(np.float32), v.astype(np.float32)
  return np.maximum((u * u).sum(1)[:, None] - 2 * (u @ v.T) + (v * v).sum(1)[None, :], 0)


def oracle_pr(ref, samples, k=3):
  r_ref = np.sort(oracle_distances(ref, ref), 1)[:, k]
  r_s = np.sort(oracle_distances(samples, samples), 1)[:, k]
  d = oracle_distances(ref, samples)
  precision = np.mean(np.any(d <= r_ref[:, None], axis=0))
  recall = np.mean(np.any(d <= r_s[None, :], axis=1))
  return precision, recall


# ------------------------------------------------------------------------------ FID -----------


def test_fid_closed_form_diagonal_gaussians():
  rng = np.random.default_rng(0)
  d = 16
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  v1, v2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  ours = scores.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
  assert ours == pytest.approx(expected, rel=1e-12)


def test_fid_closed_form_scaled_covariance():
  """sigma2 = c^2 sigma1 (a full covariance): FID = |dmu|^2 + (1 - c)^2 tr(sigma1)."""
  rng = np.random.default_rng(1)
  a = rng.standard_normal((12, 12))
  sigma = a @ a.T + 0.1 * np.eye(12)
  mu1, mu2, c = rng.standard_normal(12), rng.standard_normal(12), 1.7
  expected = np.sum((mu1 - mu2) ** 2) + (1 - c) ** 2 * np.trace(sigma)
  ours = scores.frechet_distance(mu1, sigma, mu2, c * c * sigma)
  assert ours == pytest.approx(expected, rel=1e-10)
  assert ours == oracle_fid(mu1, sigma, mu2, c * c * sigma)


def test_fid_rank_deficient_takes_the_retry():
  # 3 samples of 4-d features: a singular product whose sqrtm (SciPy 1.17) is not finite.
  f1 = np.array([[-1.0, 2.0, 0.0, -1.0], [1.0, 1.0, 2.0, 1.0], [0.0, 2.0, 0.0, 1.0]])
  f2 = np.array([[1.0, 0.0, 1.0, 2.0], [1.0, 0.0, -1.0, 0.0], [1.0, -1.0, 2.0, -1.0]])
  (mu1, s1), (mu2, s2) = scores.statistics(f1), scores.statistics(f2)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    assert not np.isfinite(linalg.sqrtm(s1.dot(s2))).all()
  with pytest.warns(UserWarning, match="adding 1e-06 to diagonal"):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", linalg.LinAlgWarning)  # SciPy's own "Matrix is singular"
      ours = scores.frechet_distance(mu1, s1, mu2, s2)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    assert np.isfinite(ours) and ours == oracle_fid(mu1, s1, mu2, s2)


def test_fid_identical_statistics_keeps_tiny_negative():
  f = np.random.default_rng(1).standard_normal((40, 8))
  mu, sigma = scores.statistics(f)
  ours = scores.frechet_distance(mu, sigma, mu, sigma)
  assert ours == oracle_fid(mu, sigma, mu, sigma)
  assert -1e-12 < ours < 0  # not clamped to 0


def test_fid_statistics_are_float64_numpy_cov():
  f = np.random.default_rng(2).standard_normal((30, 5)).astype(np.float32)
  mu, sigma = scores.statistics(f)
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_array_equal(sigma, np.cov(f.astype(np.float64), rowvar=False))
  np.testing.assert_array_equal(mu, f.astype(np.float64).mean(0))


def test_fid_imaginary_component_raises():
  with pytest.raises(scores.ScoreError, match="imaginary component"):
    scores.frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))


def test_fid_bad_statistics():
  with pytest.raises(scores.ScoreError, match=r"sigma \(3, 3\) contains NaN"):
    scores.frechet_distance(np.zeros(3), np.full((3, 3), np.nan), np.zeros(3), np.eye(3))
  with pytest.raises(scores.ScoreError, match=r"different lengths: \(3,\), \(2,\)"):
    scores.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
  with pytest.raises(scores.ScoreError, match=r"at least 2 samples, got shape \(1, 4\)"):
    scores.statistics(np.zeros((1, 4)), "samples")


# ------------------------------------------------------------------------------ IS ------------


def test_is_uniform_is_one():
  assert scores.inception_score(np.zeros((100, 10))) == pytest.approx(1.0, abs=1e-12)


def test_is_confident_over_c_classes_is_c():
  c = 7
  logits = 60.0 * np.eye(c)[np.arange(700) % c]
  ours = scores.inception_score(logits)
  assert ours == pytest.approx(c, rel=1e-12) and ours == pytest.approx(oracle_is(logits), rel=1e-13)


def test_is_short_last_split():
  rng = np.random.default_rng(3)
  logits = np.concatenate([rng.standard_normal((10000, 20)) * 3,
                           30.0 * np.eye(20)[np.arange(2000) % 20]]).astype(np.float32)
  ours = scores.inception_score(logits)
  assert ours == pytest.approx(oracle_is(logits), rel=1e-12)
  # Three splits (5000, 5000, 2000) averaged, which differs from one split over everything.
  assert abs(ours - oracle_is(logits, split_size=12000)) > 0.1


# ------------------------------------------------------------------------------ P / R ---------


def test_pr_integer_features_with_ties():
  rng = np.random.default_rng(4)
  ref = rng.integers(-3, 4, (60, 16)).astype(np.float32)
  ref[10:20] = ref[0]  # duplicate points: zero distances and tied radii
  samples = rng.integers(-3, 4, (50, 16)).astype(np.float32)
  samples[:5] = ref[:5]
  ours = scores.precision_recall(ref, samples)
  assert ours == oracle_pr(ref, samples)
  assert 0 < ours[0] < 1 and 0 < ours[1] < 1


def test_pr_float16_path_and_block_size_invariance():
  rng = np.random.default_rng(5)
  # Quarter-integer features: float16 exactly, every float32 sum exact, so no summation order
  # can change a bit; distances still round to float16.
  ref = np.round(rng.standard_normal((150, 32)) * 12) / 4
  samples = np.round((rng.standard_normal((130, 32)) * 1.1 + 0.3) * 12) / 4
  assert np.isfinite(oracle_distances(ref, samples)).all()
  expected = oracle_pr(ref, samples)
  for block in (10000, 50):
    assert scores.precision_recall(ref, samples, block_size=block) == expected


def test_pr_float32_fallback_when_float16_overflows():
  rng = np.random.default_rng(6)
  ref = rng.integers(-100, 101, (40, 16)).astype(np.float32)
  samples = (rng.integers(-100, 101, (45, 16)) // 2 * 2).astype(np.float32)
  d16 = np.asarray(scores._distances(ref, samples, True))
  assert not np.isfinite(d16).all()
  np.testing.assert_array_equal(np.asarray(scores.pairwise_distances(ref, samples)),
                                oracle_distances(ref, samples))
  expected = oracle_pr(ref, samples)
  assert scores.precision_recall(ref, samples) == expected
  assert scores.precision_recall(ref, samples, block_size=16) == expected


def test_pr_radii_are_fourth_smallest_counting_self():
  x = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]], np.float32)
  # Row 0's squared distances: 0, 1, 9, 36, 100 -> the 4th smallest is 36; row 2's: 0, 4, 9, 9, 49.
  np.testing.assert_array_equal(scores.manifold_radii(x), [36, 25, 9, 25, 81])
  np.testing.assert_array_equal(scores.manifold_radii(x, block_size=2), [36, 25, 9, 25, 81])
  with pytest.raises(scores.ScoreError, match=r"at least 4 points, got \(3, 1\)"):
    scores.manifold_radii(x[:3])
