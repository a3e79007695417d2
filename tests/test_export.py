"""Export to the reference's released format: the fixture checkpoints come back key for key
(both models, both weight sets). Runs trained here are exported and read back in the trainers'
own tests (tests/test_ar_train.py, tests/test_tokenizer_train.py via export_helpers.py), which
already run the real trainers."""
import json

import pytest
import torch
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


def test_configs_the_reference_format_cannot_hold_are_errors():
  import dataclasses
  from detailflow_jax.convert.common import ConversionError
  from detailflow_jax.convert.tokenizer import load_reference_config, reference_configs
  cfg = load_reference_config(TINY / "tokenizer")
  with pytest.raises(ConversionError, match="global_token_hidden would read back differently"):
    reference_configs(dataclasses.replace(cfg, global_token_hidden=512))
