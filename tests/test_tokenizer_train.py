"""Tokenizer training end to end: config validation, the launcher, kill -9 + resume == a straight
run, reconstruction PNGs and a loadable export."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs.detailflow16_tokenizer import get_config
from detailflow_jax.models.tokenizer import TokenizerConfig
from detailflow_jax.train import tokenizer as recipe

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _assert_refused(key: str, value, match: str) -> None:
  """The tiny config with the dotted `key` set to `value` fails validation with `match`."""
  bad = get_config("tiny")
  *parents, name = key.split(".")
  node = bad
  for parent in parents:
    node = getattr(node, parent)
  setattr(node, name, value)
  with pytest.raises(ValueError, match=match):
    recipe.validate(bad, 8)


def test_config_validation_names_the_field():
  recipe.validate(get_config("tiny"), 8)
  full = get_config()
  with pytest.raises(ValueError, match="weights.lpips.*weights.dino.*weights.teacher"):
    recipe.validate(full, 8)
  _assert_refused("data.batch_size", 12, "data.batch_size=12")
  _assert_refused("disc.type", "stylegan", "disc.type='stylegan'")
  _assert_refused("model.group_size", 3, "multiple of group_size")
  assert recipe.total_steps(full) == 250 * (1_281_167 // 256)
  cfg = TokenizerConfig.from_dict(full.model)
  # The released DetailFlow-16 shapes: so400m-wide encoder (12 layers), 768-wide decoder, teacher.
  assert (cfg.encoder.hidden_size, cfg.encoder.num_layers) == (1152, 12)
  assert (cfg.decoder.hidden_size, cfg.decoder.num_layers) == (768, 12)
  assert cfg.teacher.num_layers == 27 and cfg.num_latent_tokens == 128


def test_no_config_key_is_silently_ignored():
  """Unknown model keys, a compute dtype the step would not use, a weight file nothing reads,
  and GPT knobs without an implementation are errors naming the key."""
  import dataclasses

  from detailflow_jax.models.gpt import GPTConfig
  # enc_pretrained: the reference's checkpoint field, not a model key here.
  _assert_refused("model.enc_pretrained", True, "unknown key.*enc_pretrained")
  _assert_refused("model.encoder.depth", 3, "model.encoder: unknown key.*depth")
  _assert_refused("compute_dtype", "float16", "compute_dtype='float16'")
  _assert_refused("weights.teacher", "/weights/siglip2", "weights.teacher set but unused")
  cfg = TokenizerConfig.from_dict(get_config("tiny").model)
  with pytest.raises(ValueError, match="teacher is set but nothing uses it"):
    dataclasses.replace(cfg, teacher=cfg.encoder)
  with pytest.raises(ValueError, match="cls_token_num=2"):
    GPTConfig(cls_token_num=2)
  with pytest.raises(ValueError, match="learnable_tok_embeddings=False"):
    GPTConfig(learnable_tok_embeddings=False)


def test_missing_weight_file_is_a_clear_error(tmp_path):
  from detailflow_jax.train import frozen_nets
  c = get_config("tiny")
  c.disc.type = "dino"
  c.weights.dino = str(tmp_path / "dino_deitsmall16_pretrain.pth")
  with pytest.raises(FileNotFoundError, match="dino_deitsmall16_pretrain.pth"):
    frozen_nets.build_discriminator(c)


def _train(workdir, steps, env=None):
  args = [sys.executable, str(ROOT / "launch" / "train.py"),
          "--config=" + str(ROOT / "configs" / "detailflow16_tokenizer.py") + ":tiny",
          f"--workdir={workdir}", f"--config.total_steps={steps}", "--config.data.batch_size=8",
          "--config.data.degradation_prob=0.0", "--config.disc.type=patchgan", "--config.losses.disc_start=3",
          "--config.checkpoint.save_every=2", "--config.checkpoint.async_save=False",
          "--config.log_every=1", "--config.recon_every=4", "--config.num_recon_images=2",
          "--config.model.encoder.num_layers=1", "--config.model.decoder.num_layers=1",
          "--config.losses.ema_decay=0.9"]
  # (The three runs share conftest's persistent compilation cache: each compiles once.)
  full_env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS="",
                  **(env or {}))
  return subprocess.run(args, capture_output=True, text=True, env=full_env, timeout=900)


def _losses(workdir):
  rows = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows}


def test_kill_and_resume_matches_a_straight_run(tmp_path):
  straight = _train(tmp_path / "straight", 6)
  assert straight.returncode == 0, straight.stderr[-3000:]
  killed = _train(tmp_path / "run", 6, {"DETAILFLOW_TEST_KILL_AFTER_STEP": "4"})
  assert killed.returncode == -9, killed.stderr[-3000:]
  resumed = _train(tmp_path / "run", 6)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step 4" in resumed.stderr
  want, got = _losses(tmp_path / "straight"), _losses(tmp_path / "run")
  assert sorted(want) == list(range(1, 7))
  for step in range(1, 7):
    assert got[step] == want[step], step  # bit-identical on CPU (data, noise, GAN, LeCam EMA)
  rows = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
  # The discriminator runs every step; its terms weigh in from global_step = disc_start (3: the
  # 3rd update), as the reference's adopt_weight(disc_weight, train_steps + 1, disc_start).
  assert [r["disc_weight"] for r in rows[:2]] == [0.0, 0.0] and rows[1]["disc_loss"] == 0.0
  assert rows[2]["disc_weight"] == pytest.approx(0.1) and rows[2]["disc_loss"] != 0.0
  assert "generator_adv_loss" in rows[5]

  png = tmp_path / "straight" / "reconstructions" / "step_0000004.png"
  with Image.open(png) as im:
    assert im.size[0] > 32 * 5 and im.size[1] > 32 * 2  # input + several decodes, two images
  from detailflow_jax.weights.load import load_tokenizer
  tok = load_tokenizer(tmp_path / "straight" / "export")
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  for t in (1, 4, 8, 16):
    out = tok.decode(tok.encode(images).quant, t)
    assert out.shape == (2, tok.schedule.decode_resolution(t), tok.schedule.decode_resolution(t), 3)
  a = jax.tree.leaves(__import__("flax").nnx.state(tok))
  b = jax.tree.leaves(__import__("flax").nnx.state(load_tokenizer(tmp_path / "run" / "export")))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  # Any saved step exports to the reference's format and reads back identically.
  from export_helpers import assert_workdir_export_round_trips

  def outputs(model):
    enc = model.encode(images)
    return [enc.indices, model.decode(enc.quant, 8)]

  assert_workdir_export_round_trips(tmp_path / "straight", tmp_path / "exported", "tokenizer", 4, outputs)
  # tiny towers (1 layer, MLP 2x): the reference's own `siglip2` builder (pretrained path: all
  # layers, every width from the SigLIP2 config the export ships for CACHE_DATA_PATH=RUN)
  run = tmp_path / "exported" / "tokenizer_run_4"
  written = json.loads((run / "config.json").read_text())
  assert (written["encoder_model"], written["enc_pretrained"]) == ("siglip2", True)
  siglip = json.loads((run / "siglip2-so400m-patch16-naflex" / "config.json").read_text())
  assert (siglip["num_hidden_layers"], siglip["hidden_size"], siglip["intermediate_size"]) == (1, 64, 128)


def test_reconstructions_too_small_for_the_discriminator_skip_the_gan_terms():
  from detailflow_jax import sharding as mesh_lib
  from detailflow_jax.models.tokenizer import Tokenizer
  from detailflow_jax.train import frozen_nets
  c = get_config("tiny")
  c.disc.type = "patchgan"
  c.losses.disc_start = 10
  cfg = TokenizerConfig.from_dict(c.model)
  tx, disc_tx = recipe.make_optimizers(c, 20)
  disc = frozen_nets.build_discriminator(c)
  trainer = recipe.TokenizerTrainer(Tokenizer(cfg, rngs=0), recipe.loss_config_from(c), tx,
                                    mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1]),
                                    discriminator=disc, disc_tx=disc_tx)
  assert trainer.disc_min_size == disc.min_input_size == 12  # 2 layers: 3 * 2^2
  batch = lambda t, res: {"t": t, "max_tokens": 16, "decode_res": res, "noise_idx": 0}
  # The discriminator runs from step 1 (its terms weigh 0 before disc_start): one program.
  assert trainer.programs(batch(4, 16)).gan
  assert not trainer.programs(batch(2, 8)).gan                # 8 px: no PatchGAN logits
