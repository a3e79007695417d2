"""The tokenizer evaluation job: PSNR / SSIM equal scikit-image's (both data ranges), streamed
statistics equal np.cov and rFID of a set against itself is ~0, and the job end to end on the
fixture tokenizer (noisy-eval passes, curve, resume)."""
import json

import numpy as np
import pytest

from detailflow_jax.data import protocol
from detailflow_jax.eval import scores
from detailflow_jax.eval.pixel_metrics import psnr, ssim
from detailflow_jax.eval.reconstruction import RunningStatistics, normalize, streamed_statistics


def _pair(seed, shape=(24, 20, 3)):
  """The reference's two arrays: uint8 reconstruction / 255 and (x + 1) / 2 of the input."""
  rng = np.random.default_rng(seed)
  crop = rng.integers(0, 256, shape, dtype=np.uint8)
  recon = np.clip(crop.astype(np.int32) + rng.integers(-40, 41, shape), 0, 255).astype(np.uint8)
  return recon.astype(np.float32) / np.float32(255), (normalize(crop) + np.float32(1)) / np.float32(2)


@pytest.mark.parametrize("seed", [0, 1])
def test_psnr_and_ssim_equal_scikit_image(seed):
  metrics = pytest.importorskip("skimage.metrics")
  restored, gt = _pair(seed)
  # reconstruct_vq.py's calls: psnr_loss(restored, gt); ssim_loss(..., data_range=2.0, channel_axis=-1)
  assert psnr(restored, gt) == metrics.peak_signal_noise_ratio(restored, gt)
  for data_range in (1.0, 2.0):
    assert psnr(restored, gt, data_range) == metrics.peak_signal_noise_ratio(restored, gt, data_range=data_range)
    ref = metrics.structural_similarity(restored, gt, data_range=data_range, channel_axis=-1)
    assert ssim(restored, gt, data_range) == pytest.approx(float(ref), rel=1e-6, abs=1e-7)
  assert ssim(restored, gt, 2.0) > ssim(restored, gt, 1.0)  # the reference's quirk inflates SSIM


def test_pixel_metrics_reject_bad_input():
  a = np.zeros((5, 5, 3), np.float32)
  with pytest.raises(ValueError, match="smaller than the 7-pixel window"):
    ssim(a, a, 1.0)
  with pytest.raises(ValueError, match=r"shapes differ, \(5, 5, 3\) vs \(5, 4, 3\)"):
    psnr(a, a[:, :4])


def test_streamed_statistics_and_rfid_of_a_set_against_itself():
  x = np.random.default_rng(0).standard_normal((300, 2048)).astype(np.float32) * 0.5 + 1.0
  mu, sigma = streamed_statistics(x[i:i + 64] for i in range(0, 300, 64))
  mu_ref, sigma_ref = scores.statistics(x)
  np.testing.assert_allclose(mu, mu_ref, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-9, atol=1e-10)
  assert abs(scores.frechet_distance(mu, sigma, mu_ref, sigma_ref)) < 1e-3
  with pytest.raises(scores.ScoreError, match="at least 2 samples, got 1"):
    stats = RunningStatistics()
    stats.add(x[:1])
    stats.result()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  from PIL import Image
  root = tmp_path_factory.mktemp("val_images")
  rng = np.random.default_rng(0)
  for i in range(5):  # two classes; crops from 70 x 80 images (ADM centre crop to 64)
    d = root / "val" / f"n0{i % 2}"
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (70, 80, 3), dtype=np.uint8)).save(d / f"{i}.png")
  return root


def test_tokenizer_job_end_to_end(tokenizer, inception_random_dir, image_folder, tmp_path, monkeypatch):
  from detailflow_jax.eval.inception import load_inception
  from detailflow_jax.eval.reconstruction import ReconstructionJob, ReconstructionSettings, crop_record
  monkeypatch.setenv("DETAILFLOW_CACHE", str(tmp_path / "cache"))
  inception, info = load_inception(inception_random_dir)
  # t = 28 and 32 decode at 64 px: one Inception input shape for the whole test.
  settings = ReconstructionSettings(path=str(image_folder), chunk_size=4, per_device_batch=1,
                                    curve_tokens=(28, 32), inception_batch=8)
  job = ReconstructionJob(tokenizer, inception, info["weights_sha256"], settings)
  assert job.noise_indices == protocol.noise_indices(32, 4) == [-1, 0, 8, 16, 24, 28]
  results = job.run(tmp_path / "w")
  # The noise index is traced: the clean pass is one program, all five noise passes are another.
  assert job.trace_count == 2
  assert [p["noise_idx"] for p in results["noisy_eval"]] == job.noise_indices
  assert results["num_images"] == 5 and results["image_size"] == 64
  clean = results["noisy_eval"][0]
  assert (results["psnr"], results["ssim"], results["ssim_dr2"], results["rfid"]) == \
      (clean["psnr"], clean["ssim"], clean["ssim_dr2"], clean["rfid"])
  assert results["ssim_dr2"] > results["ssim"]
  # The clean pass recomputed here: reconstruct, uint8, PSNR / SSIM per image, mean.
  from detailflow_jax.inference.images import to_uint8
  from detailflow_jax.inference.tokenizer import TokenizerFns
  crops = np.stack([crop_record(job.source[i], 64) for i in range(5)])
  x = normalize(crops)
  indices, _ = TokenizerFns(tokenizer).encode(x)
  recon = to_uint8(np.asarray(TokenizerFns(tokenizer).decode(np.asarray(indices)))).astype(np.float32) / np.float32(255)
  gt = (x + np.float32(1)) / np.float32(2)
  assert results["psnr"] == pytest.approx(np.mean([psnr(a, b) for a, b in zip(recon, gt)]), abs=0.05)
  assert results["ssim"] == pytest.approx(np.mean([ssim(a, b, 1.0) for a, b in zip(recon, gt)]), abs=5e-3)
  # Every noisy pass perturbs tokens, so its reconstructions differ from the clean pass's (which
  # of them is closer to the image is not fixed for a random-weight fixture tokenizer).
  assert all(abs(p["psnr"] - clean["psnr"]) > 1e-6 for p in results["noisy_eval"][1:])
  curve = {c["tokens"]: c for c in results["curve"]}
  # The curve decodes through its own program: equal up to float32 reassociation (seen: 1.4e-6 dB).
  assert curve[32]["resolution"] == 64 and curve[32]["psnr"] == pytest.approx(clean["psnr"], abs=1e-4)
  assert curve[32]["rfid"] == pytest.approx(clean["rfid"], rel=1e-3, abs=1e-3)
  assert json.loads((tmp_path / "w" / "curve.json").read_text()) == results["curve"]
  assert (tmp_path / "w" / "curve.png").is_file()
  # The crops' statistics were cached with the Inception hash; rFID of the crops against them ~ 0.
  with np.load(tmp_path / "w" / "reference_64.npz", allow_pickle=False) as ref:
    assert str(ref["inception_sha256"]) == info["weights_sha256"]
    mu, sigma = ref["mu"], ref["sigma"]
  feats = np.concatenate([np.load(p)["real_pool"] for p in sorted((tmp_path / "w" / "chunks").glob("chunk-*.npz"))])
  assert abs(scores.frechet_distance(*scores.statistics(feats), mu, sigma)) < 1e-3
  # A rerun finds every chunk done (the chunk store's resume is tested with the generation job).
  again = ReconstructionJob(tokenizer, inception, info["weights_sha256"], settings)
  from detailflow_jax.eval.chunks import ChunkStore
  proto = dict(settings.protocol(), num_images=5, source_repr=repr(again.source),
               inception_sha256=info["weights_sha256"], image_size=64)
  assert ChunkStore(tmp_path / "w" / "chunks", proto, 5, 4, again._arrays(), writer=False).pending() == []
