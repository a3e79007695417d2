"""TF1 legacy ResizeBilinear: bit-exact against a per-row numpy transcription of TensorFlow's
kernel, and against torch-fidelity's own reimplementation when that is installed."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detailflow_jax.eval.resize import tf1_resize_bilinear


def tf1_oracle(image: np.ndarray, out: int) -> np.ndarray:
  """TF's legacy_scaler + compute_lerp for one HWC float32 image, one output row at a time."""
  h, w, _ = image.shape
  sy, sx = np.float32(h) / np.float32(out), np.float32(w) / np.float32(out)
  xs = np.arange(out, dtype=np.float32) * sx
  x0 = np.floor(xs).astype(int)
  x1 = np.minimum(np.ceil(xs).astype(int), w - 1)
  dx = (xs - np.floor(xs)).astype(np.float32)[:, None]
  rows = []
  for i in range(out):
    y = np.float32(i) * sy
    y0, y1 = int(np.floor(y)), min(int(np.ceil(y)), h - 1)
    dy = np.float32(y - np.floor(y))
    top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * dx
    bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * dx
    rows.append(top + (bottom - top) * dy)
  return np.stack(rows)


@pytest.mark.parametrize("size", [32, 64, 128, 256, 512])
def test_bit_exact_against_tf1_formula(size):
  rng = np.random.default_rng(size)
  images = np.concatenate([rng.integers(0, 256, (1, size, size, 3)),
                           rng.uniform(0, 255, (1, size, size, 3))]).astype(np.float32)
  ours = np.asarray(jax.jit(tf1_resize_bilinear, static_argnums=1)(images, 299))
  assert ours.dtype == np.float32
  for img, got in zip(images, ours):
    np.testing.assert_array_equal(got, tf1_oracle(img, 299))


def test_same_size_is_identity_and_not_half_pixel():
  x = np.random.default_rng(0).uniform(0, 255, (1, 299, 299, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(tf1_resize_bilinear(x, 299)), x)
  # Downscaling 4 -> 2 reads source pixels 0 and 2 (no half-pixel centres, no averaging).
  ramp = np.arange(4, dtype=np.float32)[None, :, None, None] * np.ones((1, 4, 4, 1), np.float32)
  np.testing.assert_array_equal(np.asarray(tf1_resize_bilinear(ramp, 2))[0, :, 0, 0], [0, 2])


def test_matches_torch_fidelity_resize():
  try:
    from inception_helpers import import_torch_fidelity_inception
    import_torch_fidelity_inception()
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
  except ImportError as e:
    pytest.skip(f"torch-fidelity is not importable here ({e}); CI checks against the golden file only")
  import torch
  for size in (32, 64, 128, 256, 512):
    x = np.random.default_rng(size).uniform(0, 255, (2, size, size, 3))
    for dtype in (np.float32, np.float64):
      theirs = interpolate_bilinear_2d_like_tensorflow1x(
          torch.from_numpy(x.astype(dtype).transpose(0, 3, 1, 2)), size=(299, 299), align_corners=False)
      with jax.enable_x64(dtype == np.float64):
        ours = np.asarray(tf1_resize_bilinear(jnp.asarray(x.astype(dtype)), 299))
      np.testing.assert_array_equal(ours, theirs.numpy().transpose(0, 2, 3, 1), err_msg=f"{size} {dtype}")
