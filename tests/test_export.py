"""Export to the reference's released format: the fixture checkpoints come back key for key
(both models, both weight sets), and a tokenizer export's config has the shape the reference's
builders apply (tower widths from the SigLIP2 config they read; the loaders themselves run in
tests/test_export_reference_loader.py where the reference is installed). Runs trained here are
exported and read back in the trainers' own tests (tests/test_ar_train.py,
tests/test_tokenizer_train.py via export_helpers.py), which already run the real trainers."""
import dataclasses
import json

import pytest
import torch
from conftest import MANIFESTS, TINY
from safetensors import safe_open

from detailflow_jax import __version__, export
from detailflow_jax.convert.common import ConversionError, state_dict_from_model
from detailflow_jax.convert.gpt import convert_gpt
from detailflow_jax.convert.tokenizer import (
  MAPPING,
  SIGLIP2_DIR,
  config_from_reference,
  convert_tokenizer,
  expected_torch_keys,
  load_reference_config,
  reference_configs,
)
from detailflow_jax.models.tokenizer import TokenizerConfig
from detailflow_jax.weights.export import _torch_state
from detailflow_jax.weights.load import load_model_dir

CHECKPOINTS = {"tokenizer": TINY / "tokenizer" / "checkpoints" / "tokenizer.pt",
               "gpt": TINY / "gpt" / "checkpoints" / "gpt.pt"}
CONVERTERS = {"tokenizer": convert_tokenizer, "gpt": convert_gpt}


def _assert_same_state(got, want, what):
  assert set(got) == set(want), (what, sorted(set(got) ^ set(want))[:5])
  for key in want:
    assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, (what, key)
    assert torch.equal(got[key], want[key]), (what, key)


def test_fixture_tokenizer_key_table_round_trips_exactly(tmp_path):
  """Every key, buffers included (quantize.codebook_used), as the reference wrote it. (The
  fixture's towers, an MLP-128 encoder beside an MLP-256 decoder, were made with a patched
  builder the unmodified reference lacks: its export is refused, see below.)"""
  original = torch.load(CHECKPOINTS["tokenizer"], weights_only=True)
  for weights in ("model", "ema"):
    converted = convert_tokenizer(CHECKPOINTS["tokenizer"], tmp_path / weights, weights=weights)
    state = _torch_state(state_dict_from_model(load_model_dir(converted, "tokenizer"), MAPPING))
    _assert_same_state(state, original[weights], f"tokenizer {weights}")


@pytest.mark.parametrize("kind", ["gpt"])
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


def test_configs_the_reference_format_cannot_hold_are_errors(tmp_path, capsys):
  cfg = _recipe_tokenizer("tiny")
  with pytest.raises(ConversionError, match="global_token_hidden would read back differently"):
    reference_configs(dataclasses.replace(cfg, global_token_hidden=512))
  # The fixture: one SigLIP2 config cannot give an MLP-128 encoder and an MLP-256 decoder.
  with pytest.raises(ConversionError, match=r"reads both from one SigLIP2 vision config.*MLP 128.*MLP 256"):
    reference_configs(load_reference_config(TINY / "tokenizer"))
  # 2 and 3 layers of one width: a pretrained tower has 12, 16 or all of the config's layers.
  with pytest.raises(ConversionError, match="encoder: 2 layers.*decoder: 3 layers"):
    reference_configs(dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, num_layers=3)))
  converted = convert_tokenizer(CHECKPOINTS["tokenizer"], tmp_path / "fixture")
  assert export.main(["--model", str(converted), "--out", str(tmp_path / "run")]) == 2
  assert "--format model_dir writes any tokenizer" in capsys.readouterr().err
  assert not (tmp_path / "run").exists()


# --- the rule the reference's builders apply (modelling/model_builder.py, siglip2_vit.py) -----

def _recipe_tokenizer(variant: str, **towers) -> TokenizerConfig:
  from configs.detailflow16_tokenizer import get_config
  c = get_config(variant).model
  for name, changes in towers.items():
    getattr(c, name).update(changes)
  return TokenizerConfig.from_dict(c)


def _towers_the_reference_builds(config_json: dict, siglip: dict) -> dict:
  """(layers, hidden, heads, MLP, position grid) of each tower VQModel(**config_json) builds
  with CACHE_DATA_PATH holding `siglip`, restated from the reference's code: build_encoder /
  build_decoder pass layer_num 12 (siglip2_base), 16 (siglip2_large) or None (siglip2; all
  layers); a pretrained tower is Siglip2VisionModel.from_pretrained, every width the config's;
  the only tower from scratch (siglip2_base) is 768 wide with 12 heads and MLP int(768 * 4),
  whatever the config says; num_patches comes from the config either way."""
  grid = int(siglip["num_patches"] ** 0.5)
  out = {}
  for tower, prefix in (("encoder", "enc"), ("decoder", "dec")):
    name, pretrained = config_json[f"{tower}_model"], config_json[f"{prefix}_pretrained"]
    assert name in ("siglip2_base", "siglip2_large", "siglip2"), name  # build_* raise otherwise
    if pretrained:
      layers = {"siglip2_base": 12, "siglip2_large": 16, "siglip2": None}[name]
      assert layers is None or layers <= siglip["num_hidden_layers"]  # the reference asserts this
      out[tower] = (layers or siglip["num_hidden_layers"], siglip["hidden_size"],
                    siglip["num_attention_heads"], siglip["intermediate_size"], grid)
    else:
      assert name == "siglip2_base"  # the others pass embed_dim=None
      out[tower] = (12, 768, 12, 4 * 768, grid)
  return out


RULE_CASES = {
    "tiny recipe (MLP 2x)": lambda: _recipe_tokenizer("tiny"),
    "48 wide, MLP 96, 3 layers": lambda: _recipe_tokenizer(
        "tiny", encoder=dict(hidden_size=48, mlp_dim=96, num_layers=3),
        decoder=dict(hidden_size=48, mlp_dim=96, num_layers=3)),
    "encoder 12, decoder 16 layers": lambda: _recipe_tokenizer(
        "tiny", encoder=dict(num_layers=12), decoder=dict(num_layers=16)),
    # DetailFlow-16's builders (siglip2_base pretrained + siglip2_base from scratch) on a
    # narrow SigLIP2: the decoder is 768 wide whatever the config says.
    "released layout, narrow SigLIP2": lambda: dataclasses.replace(
        _recipe_tokenizer("tiny", encoder=dict(hidden_size=48, mlp_dim=96, num_layers=12)),
        decoder=dataclasses.replace(_recipe_tokenizer("").decoder, position_grid=4, patch_size=8)),
    "DetailFlow-16 recipe (teacher)": lambda: _recipe_tokenizer(""),
}


@pytest.mark.parametrize("case", sorted(RULE_CASES))
def test_exported_tokenizer_config_has_the_shape_the_reference_builds(case, tmp_path):
  cfg = RULE_CASES[case]()
  config_json, config_yaml, files = reference_configs(cfg)
  siglip = json.loads(files[f"{SIGLIP2_DIR}/config.json"])
  assert "fixture_builder" not in config_yaml and siglip["model_type"] == "siglip2_vision_model"
  built = _towers_the_reference_builds(config_json, siglip)
  for tower in ("encoder", "decoder"):
    t = getattr(cfg, tower)
    assert built[tower] == (t.num_layers, t.hidden_size, t.num_heads, t.mlp_dim, t.position_grid), tower
  if cfg.teacher is not None:  # build_repa_model: the whole SigLIP2 at the decoder's patch size
    assert (siglip["num_hidden_layers"], siglip["hidden_size"], siglip["intermediate_size"]) == (
        cfg.teacher.num_layers, cfg.teacher.hidden_size, cfg.teacher.mlp_dim)
    assert config_json["repa_patch_size"] == config_json["dec_patch_size"] == siglip["patch_size"]
  # The tensors the load failed on have the shapes those towers hold.
  keys = expected_torch_keys(cfg)
  for tower in ("encoder", "decoder"):
    layers, hidden, _, mlp, _ = built[tower]
    assert keys[f"{tower}.visual_model.encoder.layers.{layers - 1}.mlp.fc1.weight"] == (mlp, hidden)
    assert f"{tower}.visual_model.encoder.layers.{layers}.mlp.fc1.weight" not in keys
  # from_pretrained needs a weights file; this one holds no tensors (the checkpoint has them all).
  weights = tmp_path / "model.safetensors"
  weights.write_bytes(files[f"{SIGLIP2_DIR}/model.safetensors"])
  with safe_open(str(weights), framework="pt") as f:
    assert list(f.keys()) == [] and f.metadata()["format"] == "pt"
  assert config_from_reference(config_json, config_yaml, siglip=siglip) == cfg


def test_released_layout_exports_as_the_reference_built_it():
  """The DetailFlow-16 recipe's export names the builders of the reference's own DetailFlow-16
  ModelArgs (tests/fixtures/manifests, built by the reference) and SigLIP2-so400m's widths."""
  manifest = json.loads((MANIFESTS / "tokenizer_DetailFlow-16.json").read_text())
  config_json, _, files = reference_configs(_recipe_tokenizer(""))
  fields = ("encoder_model", "enc_pretrained", "decoder_model", "dec_pretrained", "enc_patch_size",
            "dec_patch_size", "repa_patch_size", "global_token_loss_weight", "num_latent_tokens")
  assert {k: config_json[k] for k in fields} == {k: manifest["config_json"][k] for k in fields}
  siglip = json.loads(files[f"{SIGLIP2_DIR}/config.json"])
  assert {k: siglip[k] for k in manifest["siglip2_vision_config"]} == manifest["siglip2_vision_config"]
