"""Image resizing with torch `F.interpolate` semantics, as separable linear maps.

Every resize here is linear along each axis, so it is a [out, in] weight matrix per axis built
once in numpy (sizes are static) and applied with einsum. The same function therefore runs on
numpy arrays in data workers and on jax arrays inside jit, with identical numbers.

Layouts: images are [..., H, W, C] (NHWC); position-embedding grids are [H, W, C].
"""
import functools
import math

import numpy as np

try:
  import jax.numpy as jnp
except ImportError:  # Data workers may run without jax.
  jnp = None


@functools.cache
def area_matrix(in_size: int, out_size: int) -> np.ndarray:
  """torch 'area' = adaptive average pooling: window [floor(i*in/out), ceil((i+1)*in/out))."""
  w = np.zeros((out_size, in_size), dtype=np.float64)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = ((i + 1) * in_size + out_size - 1) // out_size
    w[i, start:end] = 1.0 / (end - start)
  return w


def _cubic_coeffs(t, a=np.float32(-0.75)):
  """Keys' cubic weights of the 4 taps at fraction t, in t's dtype (float32 for torch's)."""
  one = t.dtype.type(1)

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + one

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return far(t + one), near(t), near(one - t), far(t.dtype.type(2) - t)


@functools.cache
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """torch 'bicubic', align_corners=False: Keys a=-0.75, no antialias, indices clamped.

  The source coordinates and weights are computed in float32, op by op, as torch's kernels do
  for float inputs (scale = float(in) / out; src = scale * (i + 0.5) - 0.5; t = src - floor):
  in float64 the weights differ from torch's by up to ~2e-5 where in / out is not a binary
  fraction (128 -> 112)."""
  f32 = np.float32
  w = np.zeros((out_size, in_size), dtype=np.float64)
  scale = f32(in_size) / f32(out_size)
  for i in range(out_size):
    src = scale * (f32(i) + f32(0.5)) - f32(0.5)  # Not clamped at 0 for cubic, as torch does.
    base = math.floor(src)
    coeffs = _cubic_coeffs(src - f32(base))
    for k, c in enumerate(coeffs):
      j = min(max(base - 1 + k, 0), in_size - 1)
      w[i, j] += float(c)
  return w


@functools.cache
def bilinear_antialias_matrix(in_size: int, out_size: int) -> np.ndarray:
  """torch 'bilinear', align_corners=False, antialias=True (a triangle filter widened by the
  downscale factor, weights renormalised at the borders; plain bilinear when upsampling)."""
  w = np.zeros((out_size, in_size), dtype=np.float64)
  scale = in_size / out_size
  support = scale if scale >= 1.0 else 1.0
  inv = 1.0 / scale if scale >= 1.0 else 1.0
  for i in range(out_size):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    taps = np.array([max(0.0, 1.0 - abs((j - center + 0.5) * inv)) for j in range(lo, hi)])
    total = taps.sum()
    if total > 0:
      w[i, lo:hi] = taps / total
  return w


def _apply(images, mat_h: np.ndarray, mat_w: np.ndarray, h_axis: int):
  """Applies [out, in] matrices along axes h_axis and h_axis + 1 of `images`."""
  is_numpy = isinstance(images, np.ndarray) or jnp is None
  xp = np if is_numpy else jnp
  dtype = images.dtype
  mh = xp.asarray(mat_h, dtype=np.float32)
  mw = xp.asarray(mat_w, dtype=np.float32)
  x = xp.moveaxis(images.astype(np.float32), (h_axis, h_axis + 1), (-2, -1))
  # Plain (batched) matmuls: numpy hands them to BLAS, unlike an ellipsis einsum (100x slower).
  kwargs = {} if is_numpy else {"precision": "highest"}
  x = xp.matmul(mh, x, **kwargs)
  x = xp.matmul(x, mw.T, **kwargs)
  return xp.moveaxis(x, (-2, -1), (h_axis, h_axis + 1)).astype(dtype)


def _size_pair(size):
  return (size, size) if isinstance(size, int) else tuple(size)


def resize_area(images, size):
  """torch F.interpolate(mode='area') on NHWC images (any leading dims)."""
  out_h, out_w = _size_pair(size)
  in_h, in_w = images.shape[-3], images.shape[-2]
  return _apply(images, area_matrix(in_h, out_h), area_matrix(in_w, out_w), images.ndim - 3)


def resize_bicubic(images, size):
  """torch F.interpolate(mode='bicubic', align_corners=False) on NHWC images."""
  out_h, out_w = _size_pair(size)
  in_h, in_w = images.shape[-3], images.shape[-2]
  return _apply(images, bicubic_matrix(in_h, out_h), bicubic_matrix(in_w, out_w), images.ndim - 3)


def resize_images(images, size):
  """The reference's resize_imgs on square NHWC images: area to shrink, bicubic to grow."""
  out_h, out_w = _size_pair(size)
  in_h, in_w = images.shape[-3], images.shape[-2]
  if in_h > out_h:
    return resize_area(images, (out_h, out_w))
  if in_h == out_h:
    if in_w != out_w:
      raise ValueError(f"resize_images: equal heights ({in_h}) but widths {in_w} vs {out_w}")
    return images
  return resize_bicubic(images, (out_h, out_w))


def resize_grid_bilinear_aa(grid, size):
  """torch F.interpolate(bilinear, align_corners=False, antialias=True) on an [H, W, C] grid
  (used to fit learned position-embedding tables to any patch grid)."""
  out_h, out_w = _size_pair(size)
  in_h, in_w = grid.shape[0], grid.shape[1]
  return _apply(grid, bilinear_antialias_matrix(in_h, out_h),
                bilinear_antialias_matrix(in_w, out_w), 0)
