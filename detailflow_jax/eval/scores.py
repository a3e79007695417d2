"""FID, sFID, Inception Score, precision and recall exactly as ADM's evaluations/evaluator.py.

- Statistics: mu = mean, sigma = np.cov(rowvar=False) (ddof 1), both float64 on the host.
- Frechet distance: scipy.linalg.sqrtm(sigma1 @ sigma2) (SciPy >= 1.16 without `disp`, which
  1.18 removed); only when the result is not finite, retry with 1e-6 * I added to both
  covariances (with ADM's warning); a complex result whose diagonal has an imaginary part above
  1e-3 raises, otherwise its real part is used; no clamping (identical statistics may give a
  tiny negative number, as ADM's do).
- Inception Score: softmax of the unbiased logits (float64 here; ADM's TF graph used float32),
  contiguous splits of 5000 in file order (the last one may be shorter), mean over splits of
  exp(mean KL(p(y|x) || p(y))).
- Precision / recall (Kynkaanniemi et al., k = 3): a point's radius is the 4th smallest squared
  distance in its own set (the point itself counts as the first); a sample is "in" the reference
  manifold when its distance to some reference point is <= that point's radius. Squared
  distances are ADM's: features cast to float16, max(|u|^2 - 2 u.v + |v|^2, 0) with float16
  results (squares and products accumulated in float32, as GPU kernels do), and for any
  10,000 x 10,000 block where that is not finite the whole block is recomputed in float32.
  These run jitted on the default device, block by block.
"""
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

FID_EPS = 1e-6
IMAGINARY_ATOL = 1e-3
IS_SPLIT_SIZE = 5000
PR_BLOCK_SIZE = 10000
PR_NEIGHBOURHOOD = 3
HIGHEST = jax.lax.Precision.HIGHEST


class ScoreError(ValueError):
  """Inputs a score cannot be computed from; the message names what is wrong."""


# ------------------------------------------------------------------------------ FID / sFID ----

def statistics(features, name: str = "features") -> tuple[np.ndarray, np.ndarray]:
  """(mu [D], sigma [D, D]) in float64 from [N, D] features (N >= 2)."""
  x = np.asarray(features, dtype=np.float64)
  if x.ndim != 2:
    raise ScoreError(f"{name}: expected [N, D] features, got shape {x.shape}")
  if x.shape[0] < 2:
    raise ScoreError(f"{name}: a covariance needs at least 2 samples, got shape {x.shape}")
  if not np.isfinite(x).all():
    raise ScoreError(f"{name}: features {x.shape} contain NaN or inf")
  return np.mean(x, axis=0), np.cov(x, rowvar=False)


class RunningStatistics:
  """mu and sigma (np.cov, ddof 1) of [n, dim] feature blocks seen one at a time, in float64,
  in O(dim^2) memory. Sums are taken about the first block's mean (shifted data: no
  cancellation when the mean is large against the spread); agrees with `statistics` of the
  whole set to ~1e-12 relative."""

  def __init__(self, dim: int = 2048):
    self.dim, self.n, self.shift = dim, 0, None
    self.sum, self.outer = np.zeros(dim), np.zeros((dim, dim))

  def add(self, features: np.ndarray) -> None:
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise ScoreError(f"expected [N, {self.dim}] features, got shape {x.shape}")
    if not np.isfinite(x).all():
      raise ScoreError(f"features {x.shape} contain NaN or inf")
    if not len(x):
      return
    if self.shift is None:
      self.shift = x.mean(0)
    x = x - self.shift
    self.n += len(x)
    self.sum += x.sum(0)
    self.outer += x.T @ x

  def result(self) -> tuple[np.ndarray, np.ndarray]:
    if self.n < 2:
      raise ScoreError(f"a covariance needs at least 2 samples, got {self.n}")
    mean = self.sum / self.n
    sigma = (self.outer - self.n * np.outer(mean, mean)) / (self.n - 1)
    return self.shift + mean, sigma


def check_statistics(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
  """float64 (mu, sigma) with shapes [D] and [D, D] and finite values, or a ScoreError."""
  mu, sigma = np.atleast_1d(np.asarray(mu, np.float64)), np.atleast_2d(np.asarray(sigma, np.float64))
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ScoreError(f"{name}: mu {mu.shape} and sigma {sigma.shape} are not [D] and [D, D]")
  for key, value in (("mu", mu), ("sigma", sigma)):
    if not np.isfinite(value).all():
      raise ScoreError(f"{name}: {key} {value.shape} contains NaN or inf")
  return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = FID_EPS) -> float:
  """ADM's FIDStatistics.frechet_distance (see the module docstring)."""
  mu1, sigma1 = check_statistics(mu1, sigma1, "first statistics")
  mu2, sigma2 = check_statistics(mu2, sigma2, "second statistics")
  if mu1.shape != mu2.shape:
    raise ScoreError(f"mean vectors have different lengths: {mu1.shape}, {mu2.shape}")
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAGINARY_ATOL):
      raise ScoreError(f"Frechet distance: the matrix square root has an imaginary component "
                       f"{np.max(np.abs(covmean.imag))}")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ------------------------------------------------------------------------------ IS ------------

def softmax(logits) -> np.ndarray:
  x = np.asarray(logits, np.float64)
  e = np.exp(x - np.max(x, axis=1, keepdims=True))
  return e / np.sum(e, axis=1, keepdims=True)


def inception_score(logits, split_size: int = IS_SPLIT_SIZE) -> float:
  """ADM's compute_inception_score from unbiased logits [N, C]."""
  logits = np.asarray(logits)
  if logits.ndim != 2 or len(logits) == 0:
    raise ScoreError(f"Inception Score: expected [N, C] logits, got shape {logits.shape}")
  if not np.isfinite(logits).all():
    raise ScoreError(f"Inception Score: logits {logits.shape} contain NaN or inf")
  preds = softmax(logits)
  scores = []
  for i in range(0, len(preds), split_size):
    part = preds[i:i + split_size]
    kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return float(np.mean(scores))


# ------------------------------------------------------------------------------ P / R ---------

def _distances(u, v, low_precision: bool):
  if low_precision:
    u16, v16 = u.astype(jnp.float16), v.astype(jnp.float16)
    nu = jnp.sum(jnp.square(u16).astype(jnp.float32), axis=1).astype(jnp.float16)
    nv = jnp.sum(jnp.square(v16).astype(jnp.float32), axis=1).astype(jnp.float16)
    # float16 x float16 products are exact in float32: a float32-accumulating matmul.
    uv = jnp.matmul(u16.astype(jnp.float32), v16.astype(jnp.float32).T, precision=HIGHEST)
    uv = uv.astype(jnp.float16)
  else:
    nu, nv = jnp.sum(jnp.square(u), axis=1), jnp.sum(jnp.square(v), axis=1)
    uv = jnp.matmul(u, v.T, precision=HIGHEST)
  return jnp.maximum(nu[:, None] - 2 * uv + nv[None, :], 0)


@jax.jit
def pairwise_distances(u, v):
  """ADM's DistanceBlock: float16 squared distances as float32, or float32 ones for the whole
  block when any float16 one is not finite."""
  u, v = u.astype(jnp.float32), v.astype(jnp.float32)
  d16 = _distances(u, v, True)
  return jax.lax.cond(jnp.all(jnp.isfinite(d16)), lambda: d16.astype(jnp.float32),
                      lambda: _distances(u, v, False))


@functools.partial(jax.jit, static_argnums=2)
def _smallest(u, v, k: int):
  """The k smallest distances of every row of block (u, v), ascending [rows, k]."""
  return -jax.lax.top_k(-pairwise_distances(u, v), k)[0]


def manifold_radii(features, k: int = PR_NEIGHBOURHOOD, block_size: int = PR_BLOCK_SIZE) -> np.ndarray:
  """float32 [N]: the (k+1)-th smallest squared distance of each point to its own set. Merging
  each column block's k+1 smallest gives exactly ADM's partition over the whole row."""
  features = np.asarray(features, np.float32)
  n = len(features)
  if n < k + 1:
    raise ScoreError(f"precision/recall: k={k} neighbours need at least {k + 1} points, got {features.shape}")
  radii = np.empty(n, np.float32)
  for r in range(0, n, block_size):
    rows = features[r:r + block_size]
    best = [np.asarray(_smallest(rows, features[c:c + block_size], min(k + 1, len(features[c:c + block_size]))))
            for c in range(0, n, block_size)]
    radii[r:r + block_size] = np.sort(np.concatenate(best, axis=1), axis=1)[:, k]
  return radii


@jax.jit
def _less_thans(u, radii_u, v, radii_v):
  d = pairwise_distances(u, v)
  return jnp.any(d <= radii_v[None, :], axis=1), jnp.any(d <= radii_u[:, None], axis=0)


def precision_recall(ref_features, sample_features, k: int = PR_NEIGHBOURHOOD,
                     block_size: int = PR_BLOCK_SIZE) -> tuple[float, float]:
  """ADM's compute_prec_recall: (precision, recall) of samples against the reference."""
  ref = np.asarray(ref_features, np.float32)
  samples = np.asarray(sample_features, np.float32)
  if ref.ndim != 2 or samples.ndim != 2 or ref.shape[1] != samples.shape[1]:
    raise ScoreError(f"precision/recall: feature shapes {ref.shape} and {samples.shape} do not match")
  for name, x in (("reference", ref), ("sample", samples)):
    if not np.isfinite(x).all():
      raise ScoreError(f"precision/recall: {name} features {x.shape} contain NaN or inf")
  radii_ref = manifold_radii(ref, k, block_size)
  radii_samples = manifold_radii(samples, k, block_size)
  ref_in = np.zeros(len(ref), bool)        # recall: reference points inside the sample manifold
  samples_in = np.zeros(len(samples), bool)  # precision: samples inside the reference manifold
  for r in range(0, len(ref), block_size):
    for c in range(0, len(samples), block_size):
      a, b = _less_thans(ref[r:r + block_size], radii_ref[r:r + block_size],
                         samples[c:c + block_size], radii_samples[c:c + block_size])
      ref_in[r:r + block_size] |= np.asarray(a)
      samples_in[c:c + block_size] |= np.asarray(b)
  return float(np.mean(samples_in.astype(np.float64))), float(np.mean(ref_in.astype(np.float64)))
