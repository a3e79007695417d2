"""Small pieces the demo relies on: coarse-to-fine errors, the shape / colour judge, loss curves."""
import json

import numpy as np
import pytest
from PIL import Image

from configs.detailflow16_tokenizer import get_config
from detailflow_jax.demo.judge import clean_shape_images, coarse_to_fine_errors, judge_images, train_judge
from detailflow_jax.inference.plots import read_metrics, save_curves
from detailflow_jax.inference.tokenizer import TokenizerFns
from detailflow_jax.models.tokenizer import Tokenizer, TokenizerConfig
from detailflow_jax.ops.resize import resize_images


def test_coarse_to_fine_errors_match_a_direct_computation():
  fns = TokenizerFns(Tokenizer(TokenizerConfig.from_dict(get_config("tiny").model), rngs=0))
  images = np.random.default_rng(0).uniform(-1, 1, (5, 32, 32, 3)).astype(np.float32)
  rows = coarse_to_fine_errors(fns, images, batch_size=2)
  assert [r["tokens"] for r in rows] == [1, 2, 3, 4, 8, 12]  # every t below full resolution
  r = rows[4]
  decoded = np.asarray(fns.decode(fns.encode(images)[0], 8))
  degraded = resize_images(resize_images(images, r["target_res"]), r["decode_res"])
  assert r["decode_res"] == decoded.shape[1] == 24
  np.testing.assert_allclose(r["mse_degraded"], np.mean((decoded - degraded) ** 2), rtol=1e-5)
  np.testing.assert_allclose(r["mse_full"], np.mean((decoded - resize_images(images, 24)) ** 2), rtol=1e-5)
  with pytest.raises(ValueError, match=r"\[N, S, S, 3\]"):
    coarse_to_fine_errors(fns, images[..., :2])
  with pytest.raises(ValueError, match="token counts \\[5\\]"):
    coarse_to_fine_errors(fns, images, counts=[4, 5])


def test_judge_learns_shape_and_colour_from_clean_images():
  shapes, colours = (0, 1, 2, 4), (0, 2, 5)
  judge = train_judge(shapes, colours, 32, style="plain", num_images=512, steps=150, seed=0)
  assert judge.shapes == shapes and judge.colours == colours
  images, shape_idx, colour_idx = clean_shape_images(shapes, colours, 32, 256, "plain", seed=9)
  # Shape and colour are drawn independently: every pair occurs, so neither head can lean on
  # the other factor.
  assert len(set(zip(shape_idx.tolist(), colour_idx.tolist()))) == len(shapes) * len(colours)
  shape_pred, colour_pred = judge_images(judge, images)
  assert np.mean(shape_pred == shape_idx) >= 0.8  # chance 25 %
  assert np.mean(colour_pred == colour_idx) >= 0.9  # chance 33 %
  with pytest.raises(ValueError, match="distinct"):
    train_judge((0, 0), colours, 32, style="plain")
  with pytest.raises(ValueError, match="shape style 'wavy'"):
    clean_shape_images(shapes, colours, 32, 4, "wavy", seed=0)


def test_loss_curves_png_and_metrics_reading(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "loss": 2.0 / s} for s in range(1, 30)] + [{"step": 30, "other": 1.0}]
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  steps, values = read_metrics(path, "loss")
  assert steps.tolist() == list(range(1, 30)) and values[0] == 2.0
  png = save_curves(tmp_path / "curves.png", {"loss": (steps, values), "empty": ([], [])}, columns=2)
  with Image.open(png) as im:
    arr = np.asarray(im.convert("RGB"))
  line = (arr[..., 0] < 80) & (arr[..., 2] > 150)  # the curve's blue on a white sheet
  assert arr.shape[1] == 2 * 360 and line.sum() > 100
  path.write_text('{"step": 1, "loss": 1.0}\n{not json\n')
  with pytest.raises(ValueError, match="metrics.jsonl:2"):
    read_metrics(path, "loss")
  with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
    read_metrics(tmp_path / "nothing.jsonl", "loss")
  with pytest.raises(ValueError, match="at least one curve"):
    save_curves(tmp_path / "x.png", {})


def test_tokenizer_fns_load_weights_reuses_its_programs():
  """A training hook's TokenizerFns takes each step's weights without compiling again."""
  cfg = TokenizerConfig.from_dict(get_config("tiny").model)
  fns = TokenizerFns(Tokenizer(cfg, rngs=0))
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  first = np.asarray(fns.encode(images)[1])
  programs = fns._encode._cache_size()
  other = Tokenizer(cfg, rngs=1)
  assert fns.load_weights(other) is fns
  reloaded = np.asarray(fns.encode(images)[1])
  assert fns._encode._cache_size() == programs  # the same program for the new weights
  assert not np.array_equal(first, reloaded)
  np.testing.assert_array_equal(reloaded, TokenizerFns(other).encode(images)[1])
  import dataclasses
  with pytest.raises(ValueError, match="same structure"):
    fns.load_weights(Tokenizer(dataclasses.replace(cfg, codebook_size=128), rngs=0))
