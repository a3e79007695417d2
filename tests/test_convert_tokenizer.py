"""Conversion: containers, safetensors, full-size key coverage, and every kind of bad input."""
import json
import os
import pickle
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import MANIFESTS, TINY
from safetensors.torch import save_file

from detailflow_jax.convert.__main__ import main as convert_main
from detailflow_jax.convert.common import ConversionError, load_state_dict
from detailflow_jax.convert.tokenizer import config_from_reference, convert_tokenizer, expected_torch_keys
from detailflow_jax.weights.load import load_tokenizer

CKPT = TINY / "tokenizer" / "checkpoints" / "tokenizer.pt"


def _run_dir(tmp_path, state_obj, name="tokenizer.pt", with_yaml=True, with_json=True):
  """A released-layout run directory holding `state_obj` as its checkpoint."""
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  if with_json:
    shutil.copy(TINY / "tokenizer" / "config.json", run / "config.json")
  if with_yaml:
    shutil.copy(TINY / "tokenizer" / "config.yaml", run / "config.yaml")
  shutil.copytree(TINY / "cache_data", tmp_path / "cache_data")
  path = run / "checkpoints" / name
  if isinstance(state_obj, bytes):
    path.write_bytes(state_obj)
  else:
    torch.save(state_obj, path)
  return path


@pytest.fixture(scope="module")
def model_state():
  return torch.load(CKPT, map_location="cpu", weights_only=True)["model"]


def _assert_matches_golden(out_dir, golden, golden_images_nhwc):
  model = load_tokenizer(out_dir)
  indices = model.encode(jnp.asarray(golden_images_nhwc)).indices
  np.testing.assert_array_equal(indices, golden["tok_indices_full"])


@pytest.mark.parametrize("container", ["bare", "state_dict", "module", "fsdp_prefixed"])
def test_containers(tmp_path, model_state, container, golden, golden_images_nhwc):
  if container == "bare":
    obj = dict(model_state)
  elif container == "fsdp_prefixed":
    obj = {"model": {f"_fsdp_wrapped_module.{k}": v for k, v in model_state.items()}}
  else:
    obj = {container: dict(model_state)}
  ckpt = _run_dir(tmp_path, obj)
  out = convert_tokenizer(ckpt, tmp_path / "out")
  _assert_matches_golden(out, golden, golden_images_nhwc)


def test_safetensors(tmp_path, model_state, golden, golden_images_nhwc):
  ckpt = _run_dir(tmp_path, {"model": {}}, name="unused.pt")
  st = ckpt.parent / "tokenizer.safetensors"
  save_file({k: v.contiguous() for k, v in model_state.items()}, str(st))
  assert convert_main(["tokenizer", "--checkpoint", str(st), "--out", str(tmp_path / "out")]) == 0
  _assert_matches_golden(tmp_path / "out", golden, golden_images_nhwc)
  assert json.loads((tmp_path / "out" / "config.json").read_text())["kind"] == "tokenizer"


def _expect_failure(tmp_path, ckpt, match, capsys=None):
  out = tmp_path / "out"
  with pytest.raises(ConversionError, match=match):
    convert_tokenizer(ckpt, out)
  assert not out.exists()
  assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.tmp")]


def test_truncated_checkpoint(tmp_path):
  data = CKPT.read_bytes()
  _expect_failure(tmp_path, _run_dir(tmp_path, data[: len(data) // 2]), "cannot read checkpoint")


def test_unexpected_key(tmp_path, model_state):
  sd = dict(model_state, **{"decoder.extra.weight": torch.zeros(3, 4)})
  _expect_failure(tmp_path, _run_dir(tmp_path, {"model": sd}), r"unexpected key.*'decoder\.extra\.weight' \(3, 4\)")


def test_missing_key(tmp_path, model_state):
  sd = {k: v for k, v in model_state.items() if k != "decoder.mask_token"}
  _expect_failure(tmp_path, _run_dir(tmp_path, {"model": sd}), r"missing key 'decoder\.mask_token' \(expected shape \(1, 1, 64\)\)")


def test_wrong_shape(tmp_path, model_state):
  sd = dict(model_state)
  sd["quant_conv.weight"] = torch.zeros(8, 32)
  _expect_failure(tmp_path, _run_dir(tmp_path, {"model": sd}),
                  r"'quant_conv\.weight' has shape \(8, 32\), expected \(8, 64\)")


@pytest.mark.parametrize("missing", ["config.json", "config.yaml"])
def test_missing_config(tmp_path, model_state, missing):
  ckpt = _run_dir(tmp_path, {"model": dict(model_state)},
                  with_json=missing != "config.json", with_yaml=missing != "config.yaml")
  _expect_failure(tmp_path, ckpt, f"config file not found: .*{missing}")


def test_missing_checkpoint_file_via_cli(tmp_path, capsys):
  code = convert_main(["tokenizer", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "out")])
  assert code == 2 and "checkpoint file not found" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def test_existing_output_is_not_overwritten(tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("mine")
  with pytest.raises(ConversionError, match="already exists"):
    convert_tokenizer(CKPT, tmp_path / "out")
  assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


class _Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  ckpt = _run_dir(tmp_path, pickle.dumps({"model": _Exploit(marker)}))
  # torch.save would refuse to write it; a hand-made pickle is what an attacker ships.
  _expect_failure(tmp_path, ckpt, "refusing to load")
  assert not marker.exists()


def test_ema_is_an_error_for_safetensors(tmp_path, model_state):
  st = tmp_path / "x.safetensors"
  save_file({k: v.contiguous() for k, v in model_state.items()}, str(st))
  with pytest.raises(ConversionError, match="single state dict"):
    load_state_dict(st, weights="ema")


@pytest.mark.parametrize("name", ["DetailFlow-16", "DetailFlow-32", "DetailFlow-64"])
def test_full_size_manifest_coverage(name):
  """Every key of the released checkpoints maps to a parameter of the same shape (abstract)."""
  manifest = json.loads((MANIFESTS / f"tokenizer_{name}.json").read_text())
  cfg = config_from_reference(manifest["config_json"], {"max_image_size": 256},
                              siglip=manifest["siglip2_vision_config"])
  ours = expected_torch_keys(cfg)
  theirs = {k: tuple(v["shape"]) for k, v in manifest["state_dict"].items()}
  assert set(ours) == set(theirs)
  assert {k: v for k, v in ours.items() if theirs[k] != v} == {}
  assert cfg.encoder.num_layers == 12 and cfg.teacher.num_layers == 27
