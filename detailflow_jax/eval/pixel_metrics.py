"""PSNR and SSIM exactly as scikit-image computes them (the reference's reconstruct_vq.py calls
skimage.metrics.peak_signal_noise_ratio and structural_similarity), without scikit-image.

skimage's defaults, which the reference uses: SSIM with a 7 x 7 uniform window
(gaussian_weights=False), sample covariance (N / (N - 1)), K1 = 0.01, K2 = 0.03, the window
means of im^2 / im1*im2 minus the squared means, the SSIM map cropped by 3 pixels on each side
and averaged per channel (channel_axis=-1), then over channels; computed in the inputs' float
type (float32 for float32 images). PSNR: 10 log10(data_range^2 / MSE), the MSE accumulated in
float64; data_range defaults to the float dtype's range (1 for images in [0, 1]).

The reference passes data_range=2.0 to SSIM on images in [0, 1], which inflates SSIM (the
constants C1, C2 grow 4x); the job reports the standard data_range=1 value and that one, named.
"""
import numpy as np
from scipy.ndimage import uniform_filter

SSIM_WINDOW = 7
K1, K2 = 0.01, 0.03


def _float_type(*arrays):
  """skimage's _supported_float_type: float32 stays float32 (also float16), else float64."""
  types = {np.dtype(a.dtype) for a in arrays}
  if all(t in (np.dtype(np.float16), np.dtype(np.float32)) for t in types):
    return np.float32
  return np.float64


def psnr(image_true: np.ndarray, image_test: np.ndarray, data_range=None) -> float:
  """skimage.metrics.peak_signal_noise_ratio for float images."""
  if image_true.shape != image_test.shape:
    raise ValueError(f"psnr: shapes differ, {image_true.shape} vs {image_test.shape}")
  ft = _float_type(image_true, image_test)
  a, b = image_true.astype(ft, copy=False), image_test.astype(ft, copy=False)
  if data_range is None:
    if not np.issubdtype(image_true.dtype, np.floating):
      raise ValueError("psnr: give data_range for integer images")
    if a.min() < -1 or a.max() > 1:
      raise ValueError("psnr: float images outside [-1, 1] need an explicit data_range")
    data_range = 1.0 if a.min() >= 0 else 2.0
  err = np.mean((a - b) ** 2, dtype=np.float64)
  return float(10 * np.log10((data_range ** 2) / err))


def _ssim_channel(x: np.ndarray, y: np.ndarray, data_range: float) -> np.ndarray:
  win = SSIM_WINDOW
  n = win ** x.ndim
  cov_norm = n / (n - 1)
  ux, uy = uniform_filter(x, size=win), uniform_filter(y, size=win)
  uxx, uyy, uxy = (uniform_filter(x * x, size=win), uniform_filter(y * y, size=win),
                   uniform_filter(x * y, size=win))
  vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
  c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
  a1, a2, b1, b2 = 2 * ux * uy + c1, 2 * vxy + c2, ux ** 2 + uy ** 2 + c1, vx + vy + c2
  s = (a1 * a2) / (b1 * b2)
  pad = (win - 1) // 2
  return s[pad:-pad, pad:-pad].mean(dtype=np.float64)


def ssim(im1: np.ndarray, im2: np.ndarray, data_range: float) -> float:
  """skimage.metrics.structural_similarity(im1, im2, data_range=..., channel_axis=-1) of two
  HWC images (gaussian_weights=False, win_size=7)."""
  if im1.shape != im2.shape or im1.ndim != 3:
    raise ValueError(f"ssim: expected two HWC images of one shape, got {im1.shape} and {im2.shape}")
  if min(im1.shape[:2]) < SSIM_WINDOW:
    raise ValueError(f"ssim: images {im1.shape} are smaller than the {SSIM_WINDOW}-pixel window")
  ft = _float_type(im1, im2)
  x, y = im1.astype(ft, copy=False), im2.astype(ft, copy=False)
  per_channel = np.empty(x.shape[-1], ft)
  for ch in range(x.shape[-1]):
    per_channel[ch] = _ssim_channel(x[..., ch], y[..., ch], data_range)
  return float(per_channel.mean())
