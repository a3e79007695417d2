"""The tokenizer job's --image-size / --image-size-eval (reconstruct_vq.py): crops at the decode
side, decres2besttoken[side] tokens, reconstructions and the float crops resized with torch's
bicubic to the eval side before uint8 / PSNR, rFID against the unresized crops."""
import dataclasses
import json
import pathlib

import numpy as np
import pytest

from detailflow_jax.eval.pixel_metrics import psnr

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  from PIL import Image
  root = tmp_path_factory.mktemp("val_images")
  rng = np.random.default_rng(1)
  for i in range(3):
    d = root / "val" / f"n0{i % 2}"
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (60, 52, 3), dtype=np.uint8)).save(d / f"{i}.png")
  return root


def test_image_size_and_image_size_eval(tokenizer_dir, inception_random_dir, image_folder, tmp_path):
  from detailflow_jax.eval.inception import load_inception
  from detailflow_jax.eval.reconstruction import ReconstructionJob, ReconstructionSettings, crop_record, normalize
  from detailflow_jax.inference.images import to_uint8
  from detailflow_jax.ops.resize import resize_bicubic
  from detailflow_jax.weights.load import load_tokenizer
  tokenizer = load_tokenizer(tokenizer_dir)
  # The fixture allows only 64 (min_image_size = max_image_size, as reconstruct_vq.py asserts):
  inception, info = load_inception(inception_random_dir)
  settings = ReconstructionSettings(path=str(image_folder), chunk_size=2, per_device_batch=1, noisy_eval=False,
                                    curve=False, image_size=48, image_size_eval=40, inception_batch=8)
  with pytest.raises(ValueError, match=r"image_size=48: the tokenizer decodes \[.*min_image_size=64"):
    ReconstructionJob(tokenizer, inception, info["weights_sha256"], settings)
  tokenizer.config = dataclasses.replace(tokenizer.config, min_image_size=8)
  job = ReconstructionJob(tokenizer, inception, info["weights_sha256"], settings)
  tables = json.loads((FIXTURES / "detailflow_tiny_a" / "degradation_tables.json").read_text())
  assert job.tokens == tables["fixture"]["decres2besttoken"]["48"] == 20
  results = job.run(tmp_path / "w")
  assert (results["image_size"], results["image_size_eval"], results["num_tokens"]) == (48, 40, 20)
  assert results["settings"]["image_size"] == 48 and results["settings"]["image_size_eval"] == 40

  # Recomputed: crop at 48, encode 20 tokens, decode at 48, bicubic to 40, uint8; the crop
  # resized to 40 the same way for the PSNR target.
  import jax
  from flax import nnx
  crops = np.stack([crop_record(job.source[i], 48) for i in range(3)])
  x = normalize(crops)

  @nnx.jit
  def reconstruct(model, images):
    return model.decode(model.encode(images, 20).quant, None, 48)

  recon = to_uint8(np.asarray(resize_bicubic(reconstruct(tokenizer, jax.numpy.asarray(x)), 40)))
  restored = recon.astype(np.float32) / np.float32(255)
  gt = (resize_bicubic(x, 40) + np.float32(1)) / np.float32(2)
  assert results["psnr"] == pytest.approx(np.mean([psnr(a, b) for a, b in zip(restored, gt)]), abs=1e-3)
  with np.load(tmp_path / "w" / "chunks" / "chunk-000000.npz", allow_pickle=False) as chunk:
    assert chunk["clean_pool"].shape == chunk["real_pool"].shape == (2, 2048)
