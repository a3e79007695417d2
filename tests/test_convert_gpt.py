"""GPT conversion: .pt/.safetensors/ema/bf16, CLI, every error path, hostile pickles, manifests."""
import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml
from flax import nnx
from gpt_helpers import GPT_PT, GPT_RUN, GPT_SAFETENSORS, MANIFESTS, converted_gpt_dir, forward, loaded_gpt

from detailflow_jax.convert import __main__ as convert_cli
from detailflow_jax.convert.common import ConversionError
from detailflow_jax.convert.gpt import convert_gpt, expected_torch_keys, load_reference_config
from detailflow_jax.models.gpt import GPTConfig
from detailflow_jax.weights.load import load_gpt


@pytest.fixture(scope="module")
def state_dict():
  return torch.load(GPT_PT, map_location="cpu", weights_only=True)["model"]


def make_run(tmp_path: pathlib.Path, state, name="bad.pt", configs=("config.json", "config.yaml")):
  """A released-layout run dir (RUN/checkpoints/X.pt + configs) holding `state`."""
  (tmp_path / "checkpoints").mkdir(parents=True)
  for cfg in configs:
    shutil.copy(GPT_RUN / cfg, tmp_path / cfg)
  path = tmp_path / "checkpoints" / name
  torch.save(state, path)
  return path


def short_logits(model, golden):
  return np.asarray(forward(model, jnp.asarray(golden["gpt_tf_tokens"][:, :9]),
                            jnp.asarray(golden["gpt_tf_labels"])))


def params(model):
  return {p: np.asarray(v[...], np.float32) for p, v in nnx.to_flat_state(nnx.state(model))}


def test_pt_conversion_matches_reference(tmp_path_factory, golden):
  out = converted_gpt_dir(tmp_path_factory)
  meta = json.loads((out / "config.json").read_text())
  assert meta["kind"] == "gpt" and meta["param_dtype"] == "float32"
  model = loaded_gpt(tmp_path_factory)
  np.testing.assert_allclose(short_logits(model, golden), golden["gpt_tf_logits_short"], atol=1e-4)


def test_safetensors_gives_the_same_parameters(tmp_path, tmp_path_factory):
  out = convert_gpt(GPT_SAFETENSORS, tmp_path / "st")
  a, b = params(load_gpt(out)), params(loaded_gpt(tmp_path_factory))
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def test_ema_weights_match_reference(tmp_path, golden):
  out = convert_gpt(GPT_PT, tmp_path / "ema", weights="ema")
  np.testing.assert_allclose(short_logits(load_gpt(out), golden), golden["ema_gpt_tf_logits_short"],
                             atol=1e-4)


def test_cli_bfloat16(tmp_path, golden, capsys):
  out = tmp_path / "bf16"
  assert convert_cli.main(["gpt", "--checkpoint", str(GPT_PT), "--out", str(out),
                           "--dtype", "bfloat16"]) == 0
  assert "wrote" in capsys.readouterr().out
  assert json.loads((out / "config.json").read_text())["param_dtype"] == "bfloat16"
  model = load_gpt(out)
  assert model.tok_embeddings.embedding.dtype == jnp.bfloat16
  logits = short_logits(model, golden)
  ref = golden["gpt_tf_logits_short"]
  assert np.abs(logits - ref).max() < 0.05 * np.abs(ref).max()


def test_wrapped_and_bare_state_dicts(tmp_path, state_dict, golden):
  """Bare and FSDP/compile-prefixed state dicts under the other container keys load too."""
  cases = {"bare": {f"_orig_mod.{k}": v for k, v in state_dict.items()},
           "module": {"module": {f"module.{k}": v for k, v in state_dict.items()}},
           "state_dict": {"state_dict": state_dict}}
  for name, obj in cases.items():
    path = make_run(tmp_path / name, obj)
    out = convert_gpt(path, tmp_path / f"out_{name}")
    np.testing.assert_allclose(short_logits(load_gpt(out), golden), golden["gpt_tf_logits_short"],
                               atol=1e-4)


@pytest.mark.parametrize("case", ["truncated", "unexpected", "missing", "shape", "no_yaml",
                                  "no_json", "unknown_model", "no_ema"])
def test_bad_inputs_fail_clearly_and_write_nothing(tmp_path, state_dict, case):
  sd = dict(state_dict)
  configs = ("config.json", "config.yaml")
  expected = {
      "unexpected": "unexpected key.*'extra.weight' \\(3, 4\\)",
      "missing": "missing key 'layers.1.ffn_norm.weight' \\(expected shape \\(64,\\)\\)",
      "shape": "'output.weight' has shape \\(64, 32\\), expected \\(64, 64\\)",
      "no_yaml": "config file not found: .*config.yaml",
      "no_json": "config file not found: .*config.json",
      "truncated": "cannot read checkpoint",
      "unknown_model": "not a known preset",
      "no_ema": "no 'ema' weights",
  }[case]
  if case == "unexpected":
    sd["extra.weight"] = torch.zeros(3, 4)
  elif case == "missing":
    del sd["layers.1.ffn_norm.weight"]
  elif case == "shape":
    sd["output.weight"] = torch.zeros(64, 32)
  elif case == "no_yaml":
    configs = ("config.json",)
  elif case == "no_json":
    configs = ("config.yaml",)
  path = make_run(tmp_path / "run", {"model": sd}, configs=configs)
  if case == "truncated":
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
  elif case == "unknown_model":
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    cfg["gpt_model"] = "GPT-unknown"
    del cfg["gpt_model_dims"]
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(cfg))
  out = tmp_path / "out"
  with pytest.raises(ConversionError, match=expected):
    convert_gpt(path, out, weights="ema" if case == "no_ema" else "model")
  assert not out.exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dir left


def test_cli_reports_errors_with_exit_code(tmp_path, capsys):
  code = convert_cli.main(["gpt", "--checkpoint", str(tmp_path / "nope.pt"), "--out",
                           str(tmp_path / "o"), "--config-dir", str(GPT_RUN)])
  assert code == 2 and "not found" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()


class _Payload:
  """Unpickling this would run a shell command that creates a marker file."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    import os
    return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused(tmp_path, state_dict):
  marker = tmp_path / "pwned"
  path = make_run(tmp_path / "run", {"model": dict(state_dict), "evil": _Payload(marker)})
  with pytest.raises(ConversionError, match="refusing to load"):
    convert_gpt(path, tmp_path / "out")
  assert not marker.exists()
  assert not (tmp_path / "out").exists()


def test_preset_name_decides_dims():
  cfg = load_reference_config(GPT_RUN)
  assert (cfg.dim, cfg.n_layer, cfg.n_head, cfg.group_size, cfg.causal_len) == (64, 2, 4, 4, 4)


@pytest.mark.parametrize("manifest", sorted(MANIFESTS.glob("gpt_*.json")), ids=lambda p: p.stem)
def test_full_size_manifest_keys_and_shapes_map(manifest):
  data = json.loads(manifest.read_text())
  cfg = GPTConfig.from_reference(data["config_json"], {"gpt_model": "GPT-L"})
  expected = {k: tuple(v["shape"]) for k, v in data["state_dict"].items()}
  ours = expected_torch_keys(cfg)  # abstract shapes via nnx.eval_shape: no weights allocated
  assert sorted(ours) == sorted(expected)
  mismatched = {k: (ours[k], expected[k]) for k in expected if ours[k] != expected[k]}
  assert not mismatched
  assert sum(int(np.prod(s)) for s in ours.values()) == data["num_parameters"]


def test_gpt_directory_of_the_fused_qkv_format_is_refused(tmp_path):
  """Format-1 GPT directories hold the fused q/k/v kernel: loading one says to convert again."""
  import json

  from detailflow_jax.weights.load import load_model_dir
  from detailflow_jax.weights.model_dir import DamagedModelError
  out = convert_gpt(GPT_PT, tmp_path / "old")
  meta = json.loads((out / "config.json").read_text())
  (out / "config.json").write_text(json.dumps(dict(meta, format_version=1)))
  with pytest.raises(DamagedModelError, match="outdated gpt directory .*convert again"):
    load_model_dir(out, "gpt")
