"""Feature extraction over 8 devices, reference files, and `python -m detailflow_jax.evaluate`
end to end (random Inception weights); bad batch files give errors naming file, key and shape."""
import json

import numpy as np
import pytest
from conftest import FIXTURES
from inception_helpers import golden_inputs

from detailflow_jax.eval import scores
from detailflow_jax.eval.reference import EvalInputError, load_batch, read_image_set

SIZE = 64  # every network call here is [8, 64, 64, 3]: one compile for the module


@pytest.fixture(scope="module")
def model_and_info(inception_random_dir):
  from detailflow_jax.eval.inception import load_inception
  return load_inception(inception_random_dir)


def _features(model, images):
  from detailflow_jax.eval.features import extract_features
  return extract_features(model, (images[i:i + 8] for i in range(0, len(images), 8)), len(images), 8)


def test_features_match_torch_fidelity_across_8_devices(model_and_info):
  import jax

  from detailflow_jax.eval.features import extract_features
  assert jax.device_count() == 8
  model, _ = model_and_info
  with np.load(FIXTURES / "inception_golden.npz", allow_pickle=False) as golden:
    batches = [golden_inputs(SIZE, 3), golden_inputs(SIZE, 1)]  # two batches, each padded to 8
    feats = extract_features(model, iter(batches), 4, batch_size=5)
    for name in ("pool", "spatial", "logits"):
      ref = np.concatenate([golden[f"float32_{SIZE}_b3_{name}"], golden[f"float32_{SIZE}_b1_{name}"]])
      assert feats[name].shape == ref.shape and feats[name].dtype == np.float32
      assert np.max(np.abs(feats[name] - ref)) <= 1e-4 * np.max(np.abs(ref)), name


def test_evaluate_cli_end_to_end(inception_random_dir, model_and_info, tmp_path, capsys):
  from detailflow_jax.evaluate import main
  model, info = model_and_info
  rng = np.random.default_rng(0)
  ref_images = rng.integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
  samples = rng.integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8)
  # ADM-format reference (no hash) with point-mass statistics: sigma = 0 makes sqrtm(sigma_s @ 0)
  # exactly 0, so FID = |mu_s - mu|^2 + tr(sigma_s) in closed form.
  mu, mu_s = rng.standard_normal(2048), rng.standard_normal(2023)
  np.savez(tmp_path / "ref.npz", arr_0=ref_images, mu=mu, sigma=np.zeros((2048, 2048)),
           mu_s=mu_s, sigma_s=np.zeros((2023, 2023)))
  np.savez(tmp_path / "samples.npz", arr_0=samples)
  rc = main(["--reference", str(tmp_path / "ref.npz"), "--samples", str(tmp_path / "samples.npz"),
             "--inception", str(inception_random_dir), "--batch-size", "8",
             "--json", str(tmp_path / "out.json"), "--save-features", str(tmp_path / "feats.npz")])
  assert rc == 0
  printed = capsys.readouterr().out.splitlines()
  assert [line.split(":")[0] for line in printed[-5:]] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
  result = json.loads((tmp_path / "out.json").read_text())
  with np.load(tmp_path / "feats.npz", allow_pickle=False) as f:
    feats = {k: f[k] for k in f.files}
  assert str(feats["inception_sha256"]) == info["weights_sha256"] == result["inputs"]["inception"]["weights_sha256"]
  assert feats["pool"].shape == (6, 2048) and feats["spatial"].shape == (6, 2023) and feats["logits"].shape == (6, 1008)
  for key, feat, m in (("fid", "pool", mu), ("sfid", "spatial", mu_s)):
    mu_x, sigma_x = scores.statistics(feats[feat])
    assert result[key] == pytest.approx((mu_x - m).dot(mu_x - m) + np.trace(sigma_x), rel=1e-12)
  assert result["inception_score"] == scores.inception_score(feats["logits"])
  ref_pool = _features(model, ref_images)["pool"]
  assert (result["precision"], result["recall"]) == scores.precision_recall(ref_pool, feats["pool"])
  assert printed[-1] == f"Recall: {result['recall']}"
  from detailflow_jax.paths import file_sha256
  assert result["inputs"]["samples"]["sha256"] == file_sha256(tmp_path / "samples.npz")


def test_written_reference_carries_hash_and_features(inception_random_dir, model_and_info, tmp_path):
  from detailflow_jax.eval.reference import main
  _, info = model_and_info
  images = np.random.default_rng(1).integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
  np.savez(tmp_path / "set.npz", arr_0=images)
  # Blocks of 2 images: the set spans three (the last one short).
  assert main(["--images", str(tmp_path / "set.npz"), "--out", str(tmp_path / "ref.npz"),
               "--inception", str(inception_random_dir), "--batch-size", "8", "--block-size", "2"]) == 0
  batch = load_batch(tmp_path / "ref.npz", info["weights_sha256"])
  np.testing.assert_array_equal(np.concatenate(list(batch.images.batches(2))), images)
  assert batch.pool.shape == (5, 2048) and batch.stats["sigma"].shape == (2048, 2048)
  # Accumulated block by block: ADM's np.mean / np.cov of the whole set up to float64 rounding.
  mu, sigma = scores.statistics(batch.pool)
  np.testing.assert_allclose(batch.stats["mu"], mu, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(batch.stats["sigma"], sigma, rtol=1e-9, atol=1e-14 * np.abs(sigma).max())
  with pytest.raises(EvalInputError, match=r"ref.npz: inception_sha256 is .*weights_sha256 0000000000000000"):
    load_batch(tmp_path / "ref.npz", "0" * 64)


def test_image_directory_is_center_cropped(tmp_path):
  from PIL import Image
  for i, size in enumerate([(80, 70), (64, 90)]):
    Image.fromarray(np.full((size[1], size[0], 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
  images = read_image_set(tmp_path, 64)
  assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
  assert images[1].min() == images[1].max() == 40


@pytest.mark.parametrize("arrays, message", [
    ({"arr_0": np.zeros((4, 8, 8, 3), np.float32)}, r"'arr_0' has dtype float32 and shape \(4, 8, 8, 3\); expected uint8"),
    ({"arr_0": np.zeros((4, 3, 8, 8), np.uint8)}, r"shape \(4, 3, 8, 8\); expected \[N, H, W, 3\] \(this looks like NCHW"),
    ({"arr_0": np.zeros((4, 8, 8), np.uint8)}, r"shape \(4, 8, 8\); expected \[N, H, W, 3\]"),
    ({"arr_0": np.zeros((4, 8, 8, 4), np.uint8)}, r"shape \(4, 8, 8, 4\); expected \[N, H, W, 3\]"),
    ({"images": np.zeros((4, 8, 8, 3), np.uint8)}, r"missing key 'arr_0' .*\['images'\]"),
    ({"arr_0": np.zeros((3, 8, 8, 3), np.uint8)}, r"'arr_0' has shape \(3, 8, 8, 3\); .* at least 4 images"),
    ({"arr_0": np.zeros((4, 8, 8, 3), np.uint8), "mu": np.zeros(2048), "sigma": np.zeros((2048, 2048))},
     r"has \['mu', 'sigma'\] but is missing key\(s\) \['mu_s', 'sigma_s'\]"),
    ({"arr_0": np.zeros((4, 8, 8, 3), np.uint8), "mu": np.zeros(2047), "sigma": np.zeros((2048, 2048)),
      "mu_s": np.zeros(2023), "sigma_s": np.zeros((2023, 2023))}, r"key 'mu' has shape \(2047,\), expected \(2048,\)"),
    ({"arr_0": np.zeros((4, 8, 8, 3), np.uint8), "mu": np.zeros(2048), "sigma": np.zeros((2048, 2048)),
      "mu_s": np.full(2023, np.nan), "sigma_s": np.zeros((2023, 2023))}, r"\(mu_s, sigma_s\): mu \(2023,\) contains NaN"),
    ({"arr_0": np.zeros((4, 8, 8, 3), np.uint8), "inception_sha256": np.array("f" * 64)},
     r"inception_sha256 is ffffffffffffffff\.\.\., but .* weights_sha256 abababababababab"),
], ids=["float", "nchw", "no-channels", "rgba", "missing-arr_0", "too-few", "missing-stats", "stat-shape",
        "nan-stats", "hash-mismatch"])
def test_bad_batch_files(tmp_path, arrays, message):
  path = tmp_path / "batch.npz"
  np.savez(path, **arrays)
  with pytest.raises(EvalInputError, match=message) as err:
    load_batch(path, "ab" * 32, min_images=4)
  assert str(path) in str(err.value)


def test_cli_reports_bad_input_before_running_the_network(inception_random_dir, tmp_path, capsys):
  from detailflow_jax.evaluate import main
  np.savez(tmp_path / "ref.npz", arr_0=np.zeros((5, 8, 8, 3), np.uint8))
  np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((5, 3, 8, 8), np.uint8))
  assert main(["--reference", str(tmp_path / "ref.npz"), "--samples", str(tmp_path / "nchw.npz"),
               "--inception", str(inception_random_dir)]) == 2
  assert "nchw.npz: 'arr_0' has dtype uint8 and shape (5, 3, 8, 8)" in capsys.readouterr().err


def test_cli_missing_inception_dir_says_how_to_make_it(tmp_path, capsys):
  from detailflow_jax.evaluate import main
  np.savez(tmp_path / "ref.npz", arr_0=np.zeros((5, 8, 8, 3), np.uint8))
  assert main(["--reference", str(tmp_path / "ref.npz"), "--samples", str(tmp_path / "ref.npz"),
               "--inception", str(tmp_path / "none")]) == 2
  assert "python -m detailflow_jax.convert inception" in capsys.readouterr().err


def test_features_under_two_jax_distributed_processes(inception_random_dir):
  """Two localhost processes x 4 CPU devices: each feeds its half of every padded batch and both
  get all features, equal to torch-fidelity's golden ones."""
  import pathlib

  from conftest import run_two_processes
  script = pathlib.Path(__file__).parent / "scripts" / "two_process_inception.py"
  results = run_two_processes(script, inception_random_dir, timeout=300)
  for r in results:
    assert r["devices"] == 8 and r["processes"] == 2
    assert all(e <= 1e-4 for e in r["relative_errors"].values()), r
  assert results[0]["pool_sum"] == results[1]["pool_sum"]  # every process has every feature
