"""TensorFlow 1's legacy `ResizeBilinear` (align_corners=False, half_pixel_centers=False).

The 2015-12-05 Inception graph resizes every input to 299x299 with it, so FID numbers depend
on reproducing it exactly. Output pixel i reads source coordinate src = i * (in / out), with
the scale and the product rounded in the working dtype (float32, as TF does; float64 runs use
the float32 scale, as torch-fidelity's float64 mode does), lo = floor(src),
hi = min(ceil(src), in - 1), and the interpolation is TF's
  top = tl + (tr - tl) * dx;  bottom = bl + (br - bl) * dx;  out = top + (bottom - top) * dy.
This is not `jax.image.resize` (half-pixel centres), nor `detailflow_jax.ops.resize`, which
implements torch `F.interpolate` for the data pipeline.
"""

import jax.numpy as jnp
import numpy as np


def tf1_source_coords(in_size: int, out_size: int, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(lo, hi, lerp) for every output index: int32 [out], int32 [out], `dtype` [out]."""
  if in_size < 1 or out_size < 1:
    raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")
  dtype = np.dtype(dtype)
  scale = np.float32(in_size) / np.float32(out_size)  # TF: in_size / static_cast<float>(out_size)
  src = np.arange(out_size, dtype=dtype) * dtype.type(scale)
  floor = np.floor(src)
  lo = floor.astype(np.int32)
  hi = np.minimum(np.ceil(src), in_size - 1).astype(np.int32)
  return lo, hi, (src - floor).astype(dtype)


def tf1_resize_bilinear(images, size: int):
  """[N, H, W, C] float images -> [N, size, size, C] in the same dtype (jnp)."""
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"tf1_resize_bilinear expects NHWC images, got shape {images.shape}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"tf1_resize_bilinear expects float images, got {images.dtype}")
  dtype = images.dtype
  ylo, yhi, dy = tf1_source_coords(images.shape[1], size, dtype)
  xlo, xhi, dx = tf1_source_coords(images.shape[2], size, dtype)
  dx = jnp.asarray(dx)[None, None, :, None]
  dy = jnp.asarray(dy)[None, :, None, None]

  def lerp(a, b, t):
    # Fused into the add, XLA/LLVM contracts the product into an FMA: one rounding instead of
    # TF's two, an ulp off in ~20% of the pixels. A data-dependent select between the multiply
    # and the add blocks the contraction and changes no value (where a is NaN both forms give
    # NaN); optimization_barrier, reduce_precision and a constant-predicate select are folded
    # away by XLA before code generation.
    return a + jnp.where(jnp.isnan(a), a, (b - a) * t)

  def along_x(rows):
    return lerp(jnp.take(rows, xlo, axis=2), jnp.take(rows, xhi, axis=2), dx)

  return lerp(along_x(jnp.take(images, ylo, axis=1)), along_x(jnp.take(images, yhi, axis=1)), dy)
