"""Resize ops against the reference goldens and torch F.interpolate."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detailflow_jax.ops import resize


def _nhwc(x):
  return x.transpose(0, 2, 3, 1)


def test_area_and_bicubic_match_goldens(golden):
  img = _nhwc(golden["images"][:1])
  area21 = resize.resize_images(img, 21)
  np.testing.assert_allclose(area21, _nhwc(golden["resize_area_21"]), atol=1e-5)
  np.testing.assert_allclose(resize.resize_images(area21, 64),
                             _nhwc(golden["resize_bicubic_21_to_64"]), atol=1e-5)
  area40 = resize.resize_images(img, 40)
  np.testing.assert_allclose(area40, _nhwc(golden["resize_area_40"]), atol=1e-5)
  np.testing.assert_allclose(resize.resize_images(area40, 64),
                             _nhwc(golden["resize_bicubic_40_to_64"]), atol=1e-5)
  # Degraded targets: area to token2res[t], then to token2dec_out_res[t].
  np.testing.assert_allclose(resize.resize_images(area21, 24), _nhwc(golden["resize_degrade_t8"]), atol=1e-5)
  np.testing.assert_allclose(resize.resize_images(area40, 40), _nhwc(golden["resize_degrade_t16"]), atol=1e-5)


def test_numpy_and_jit_give_the_same_numbers(golden):
  img = _nhwc(golden["images"])
  jitted = jax.jit(lambda x: resize.resize_images(resize.resize_images(x, 21), 64))
  out = np.asarray(jitted(jnp.asarray(img)))
  ref = resize.resize_images(resize.resize_images(img, 21), 64)
  assert isinstance(ref, np.ndarray)
  np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("in_size,out_size", [(4, 1), (4, 2), (4, 3), (16, 7), (4, 5), (5, 13), (16, 16), (9, 4)])
def test_matches_torch_interpolate(in_size, out_size):
  rng = np.random.default_rng(in_size * 100 + out_size)
  x = rng.normal(size=(2, in_size, in_size, 5)).astype(np.float32)
  t = torch.from_numpy(x).permute(0, 3, 1, 2)
  def torch_resize(**kw):
    return F.interpolate(t, size=(out_size, out_size), **kw).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(resize.resize_area(x, out_size), torch_resize(mode="area"), atol=1e-5)
  np.testing.assert_allclose(resize.resize_bicubic(x, out_size),
                             torch_resize(mode="bicubic", align_corners=False), atol=1e-5)
  for b in range(2):
    np.testing.assert_allclose(
        resize.resize_grid_bilinear_aa(x[b], out_size),
        torch_resize(mode="bilinear", align_corners=False, antialias=True)[b], atol=1e-5)


def test_resize_rejects_non_square_identity():
  with pytest.raises(ValueError, match="widths"):
    resize.resize_images(np.zeros((1, 8, 8, 3), np.float32), (8, 4))
