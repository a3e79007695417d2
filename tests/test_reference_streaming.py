"""A reference batch written from an image set in bounded memory: block by block (a set of many
blocks), the same arrays as the whole set in memory, and a peak that does not grow with N."""
import tracemalloc

import numpy as np
import pytest

from detailflow_jax.eval import scores
from detailflow_jax.eval.reference import ImageSet, load_batch, write_reference

SIDE, BLOCK = 128, 4


@pytest.fixture(scope="module")
def model_and_info(inception_random_dir):
  from detailflow_jax.eval.inception import load_inception
  return load_inception(inception_random_dir)


def _image_file(path, n, seed):
  np.savez(path, arr_0=np.random.default_rng(seed).integers(0, 256, (n, SIDE, SIDE, 3), dtype=np.uint8))
  return path


def _write(model, info, source, out):
  tracemalloc.start()
  try:
    write_reference(out, ImageSet(source, SIDE), model, info["weights_sha256"], batch_size=BLOCK, block_size=BLOCK)
    return tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def test_streamed_reference_equals_the_whole_set_and_memory_stays_flat(model_and_info, tmp_path):
  from detailflow_jax.eval.features import extract_features
  model, info = model_and_info
  small = _image_file(tmp_path / "small.npz", 2 * BLOCK, 0)
  large = _image_file(tmp_path / "large.npz", 6 * BLOCK + 2, 1)
  peak_small = _write(model, info, small, tmp_path / "ref_small.npz")
  peak_large = _write(model, info, large, tmp_path / "ref_large.npz")
  block_bytes = BLOCK * SIDE * SIDE * 3
  print(f"peak traced memory: {peak_small} B ({2 * BLOCK} images), {peak_large} B ({6 * BLOCK + 2} images), "
        f"block {block_bytes} B")
  # The large set holds 4.5 blocks (0.88 MB) more images; held in memory they would show here.
  assert peak_large - peak_small < 2 * block_bytes, (peak_small, peak_large, block_bytes)

  batch = load_batch(tmp_path / "ref_large.npz", info["weights_sha256"])
  with np.load(large) as f:
    images = f["arr_0"]
  np.testing.assert_array_equal(np.concatenate(list(batch.images.batches(7))), images)
  whole = extract_features(model, (images[i:i + BLOCK] for i in range(0, len(images), BLOCK)), len(images), BLOCK)
  np.testing.assert_array_equal(batch.pool, whole["pool"])
  for key, feats in (("mu", "pool"), ("mu_s", "spatial")):
    mu, sigma = scores.statistics(whole[feats])
    np.testing.assert_allclose(batch.stats[key], mu, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(batch.stats["sigma" + key[2:]], sigma, rtol=1e-9, atol=1e-14 * np.abs(sigma).max())


def test_image_folder_is_read_block_by_block(tmp_path):
  from PIL import Image
  rng = np.random.default_rng(2)
  for i in range(5):
    d = tmp_path / f"class{i % 2}"
    d.mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (70 + i, 90, 3), dtype=np.uint8)).save(d / f"{i}.png")
  images = ImageSet(tmp_path, 64)
  blocks = list(images.blocks(2))
  assert [len(b) for b in blocks] == [2, 2, 1] and images.shape == (5, 64, 64, 3)
  from detailflow_jax.data.transforms import center_crop_arr
  first = min(tmp_path.rglob("*.png"))
  np.testing.assert_array_equal(blocks[0][0], center_crop_arr(Image.open(first).convert("RGB"), 64))
