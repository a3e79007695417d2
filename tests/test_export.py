"""Export to the reference's released format: the fixture checkpoints come back key for key
(both models, both weight sets), and runs trained here read back through our converter to the
same weights and outputs."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open

from conftest import TINY
from detailflow_jax import __version__, export
from detailflow_jax.convert.gpt import convert_gpt
from detailflow_jax.convert.tokenizer import convert_tokenizer

CHECKPOINTS = {"tokenizer": TINY / "tokenizer" / "checkpoints" / "tokenizer.pt",
               "gpt": TINY / "gpt" / "checkpoints" / "gpt.pt"}
CONVERTERS = {"tokenizer": convert_tokenizer, "gpt": convert_gpt}


def _assert_same_state(got, want, what):
  assert set(got) == set(want), (what, sorted(set(got) ^ set(want))[:5])
  for key in want:
    assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, (what, key)
    assert torch.equal(got[key], want[key]), (what, key)


@pytest.mark.parametrize("kind", ["tokenizer", "gpt"])
def test_fixture_checkpoint_round_trips_exactly(kind, tmp_path, capsys):
  original = torch.load(CHECKPOINTS[kind], weights_only=True)
  for weights in ("model", "ema"):
    converted = CONVERTERS[kind](CHECKPOINTS[kind], tmp_path / f"{weights}_dir", weights=weights)
    run = tmp_path / f"{weights}_run"
    assert export.main(["--model", str(converted), "--out", str(run)]) == 0
    assert "wrote" in capsys.readouterr().out
    pt = torch.load(run / "checkpoints" / "model.pt", weights_only=True)
    assert list(pt) == ["model"]
    # every key, buffers included (the tokenizer's quantize.codebook_used), as the reference wrote it
    _assert_same_state(pt["model"], original[weights], f"{kind} {weights} .pt")
    with safe_open(str(run / "checkpoints" / "model.safetensors"), framework="pt") as f:
      _assert_same_state({k: f.get_tensor(k) for k in f.keys()}, original[weights], f"{kind} .safetensors")
      meta = f.metadata()
    assert meta["producer"] == f"detailflow_jax {__version__}" and meta["weights"] == "model"
    assert meta["step"] == "unknown" and str(converted) in meta["source"]
  if kind == "gpt":  # the same ModelArgs the reference wrote
    assert json.loads((run / "config.json").read_text()) == json.loads((TINY / "gpt" / "config.json").read_text())
  assert export.main(["--model", str(converted), "--out", str(run)]) == 2  # never overwrites
  assert "already exists" in capsys.readouterr().err


def _write_tokens(path, n=32):
  from detailflow_jax.data.sources import TokenRecordWriter
  rng = np.random.default_rng(0)
  w = TokenRecordWriter(path)
  for i in range(n):
    w.write(rng.integers(0, 64, size=(32, 3)), label=i % 10)
  w.close()


def _read_back(run, kind, weights):
  """The exported .pt through our converter (the code path a released checkpoint takes)."""
  out = run.parent / f"{run.name}_{weights}_converted"
  if not out.exists():
    CONVERTERS[kind](next((run / "checkpoints").glob("*.pt")), out, weights=weights)
  from detailflow_jax.pretrained import load_model_dir
  return load_model_dir(out, kind)


def _same_params(a, b):
  la, lb = jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_trained_gpt_and_tokenizer_export_and_read_back(tmp_path, capsys):
  """Tiny runs through the real trainers (a few steps), exported at a saved step with both
  weight sets, read back by the converter: identical parameters and outputs."""
  from configs.detailflow16_gpt_l import get_config as gpt_config
  from configs.detailflow16_tokenizer import get_config as tokenizer_config
  from detailflow_jax.train import ar
  from detailflow_jax.train import tokenizer as recipe

  _write_tokens(tmp_path / "tokens")
  c = gpt_config("tiny")
  c.data.path, c.total_steps, c.log_every = str(tmp_path / "tokens"), 3, 1
  c.checkpoint.update(save_every=2, async_save=False)
  ar.train(c, tmp_path / "ar")
  assert export.main(["--workdir", str(tmp_path / "ar"), "--step", "2", "--out", str(tmp_path / "ar_run")]) == 0
  assert export.main(["--workdir", str(tmp_path / "ar"), "--out", str(tmp_path / "ar_run3")]) == 0
  assert export.main(["--workdir", str(tmp_path / "ar"), "--step", "1", "--out", str(tmp_path / "x")]) == 2
  assert "no checkpoint of step 1 (saved steps: 2, 3)" in capsys.readouterr().err
  run = tmp_path / "ar_run"
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["0000002.pt", "0000002.safetensors"]
  assert sorted(torch.load(run / "checkpoints" / "0000002.pt", weights_only=True)) == ["ema", "model"]
  with safe_open(str(run / "checkpoints" / "0000002.safetensors"), framework="pt") as f:
    assert f.metadata()["step"] == "2" and f.metadata()["weights"] == "ema"
  # The newest step's EMA weights are what the trainer itself exported.
  from detailflow_jax.pretrained import load_model_dir
  trained_ema = load_model_dir(tmp_path / "ar" / "export", "gpt")
  back = _read_back(tmp_path / "ar_run3", "gpt", "ema")
  _same_params(back, trained_ema)
  source = export.source_from_workdir(tmp_path / "ar", step=2)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 12)), jnp.int32)
  labels = jnp.asarray([1, 7], jnp.int32)
  for weights in ("model", "ema"):
    back = _read_back(run, "gpt", weights)
    _same_params(back, source.weights[weights])
    np.testing.assert_array_equal(np.asarray(back(tokens, labels)),
                                  np.asarray(source.weights[weights](tokens, labels)))
  # The model_dir format: any saved step as a directory load_gpt reads.
  assert export.main(["--workdir", str(tmp_path / "ar"), "--step", "2", "--weights", "model",
                      "--format", "model_dir", "--out", str(tmp_path / "ar_dir")]) == 0
  _same_params(load_model_dir(tmp_path / "ar_dir", "gpt"), source.weights["model"])

  t = tokenizer_config("tiny")
  t.total_steps, t.data.batch_size, t.data.degradation_prob, t.recon_every, t.log_every = 1, 8, 0.0, 0, 1
  t.checkpoint.update(save_every=1, async_save=False)
  t.losses.ema_decay = 0.9
  t.towers.encoder.num_layers = t.towers.decoder.num_layers = 1
  recipe.train(t, tmp_path / "tok")
  assert export.main(["--workdir", str(tmp_path / "tok"), "--out", str(tmp_path / "tok_run")]) == 0
  config_yaml = (tmp_path / "tok_run" / "config.yaml").read_text()
  assert "siglip2_custom" in config_yaml  # tiny towers: not a reference builder size
  source = export.source_from_workdir(tmp_path / "tok")
  images = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  for weights in ("model", "ema"):
    back = _read_back(tmp_path / "tok_run", "tokenizer", weights)
    _same_params(back, source.weights[weights])
    ours, theirs = source.weights[weights].encode(images), back.encode(images)
    np.testing.assert_array_equal(np.asarray(theirs.indices), np.asarray(ours.indices))
    np.testing.assert_array_equal(np.asarray(back.decode(theirs.quant, 8)),
                                  np.asarray(source.weights[weights].decode(ours.quant, 8)))
  _same_params(_read_back(tmp_path / "tok_run", "tokenizer", "ema"),
               load_model_dir(tmp_path / "tok" / "export", "tokenizer"))


def test_configs_the_reference_format_cannot_hold_are_errors():
  import dataclasses
  from detailflow_jax.convert.common import ConversionError
  from detailflow_jax.convert.tokenizer import load_reference_config, reference_configs
  cfg = load_reference_config(TINY / "tokenizer")
  with pytest.raises(ConversionError, match="global_token_hidden would read back differently"):
    reference_configs(dataclasses.replace(cfg, global_token_hidden=512))
