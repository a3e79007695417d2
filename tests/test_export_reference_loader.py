"""Our reference-format exports load with the reference's own, unmodified loaders
(inference/load_vq.load_vq_model, autoregressive/sample/load_ar_model) and compute what ours do:
decodes within 1e-4, encoder indices and greedy tokens identical.

The reference runs in its own Python as a subprocess (tests/scripts/reference_loaders.py):
DETAILFLOW_REFERENCE_DIR names a tree of ByteFlow-AI/DetailFlow (c5f06cd) and
DETAILFLOW_REFERENCE_PYTHON a Python with torch, transformers 4.50, timm and ruamel.yaml (set up
as docs/export_reference.md says). Without both the module skips (CI).

Kinds: the tiny tokenizer recipe trained here (its MLP is 2x its width), checkpoints the
reference itself builds in released layouts (DetailFlow-16's builders, teacher included, on a
narrow SigLIP2 with a 1.5x MLP; a 48-wide MLP-96 tower pair) converted by us and exported back,
and the GPT fixture (the tiny GPT recipe's sizes). Figures are printed (pytest -s).
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY
from flax import nnx

from detailflow_jax import export
from detailflow_jax.convert.gpt import convert_gpt
from detailflow_jax.convert.tokenizer import convert_tokenizer
from detailflow_jax.inference.sampler import Sampler, SamplingOptions
from detailflow_jax.weights.export import source_from_workdir
from detailflow_jax.weights.load import load_model_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE_DIR = os.environ.get("DETAILFLOW_REFERENCE_DIR", "")
REFERENCE_PYTHON = os.environ.get("DETAILFLOW_REFERENCE_PYTHON", "")
pytestmark = pytest.mark.skipif(
    not (REFERENCE_DIR and (pathlib.Path(REFERENCE_DIR) / "inference" / "load_vq.py").is_file()
         and REFERENCE_PYTHON and os.access(REFERENCE_PYTHON, os.X_OK)),
    reason="needs DETAILFLOW_REFERENCE_DIR (a ByteFlow-AI/DetailFlow tree) and "
           "DETAILFLOW_REFERENCE_PYTHON (its torch/transformers Python)")

DECODE_TOLERANCE = 1e-4
# (tokens, output size) of every decode compared: partial and full budgets, at their own
# resolution and at others (the 32 px tokenizers here decode at 8 px per token group and up).
DECODES = np.array([[1, 8], [4, 16], [8, 24], [16, 32], [4, 32]])


def run_reference(tmp_path: pathlib.Path, jobs: list) -> dict:
  """Runs the jobs in the reference's Python; returns each job's arrays by its name."""
  tmp_path.mkdir(parents=True, exist_ok=True)
  for job in jobs:
    job["out"] = str(tmp_path / f"{job.pop('name')}.npz")
  (tmp_path / "jobs.json").write_text(json.dumps(jobs))
  run = subprocess.run([REFERENCE_PYTHON, str(ROOT / "tests" / "scripts" / "reference_loaders.py"),
                        "--reference-dir", REFERENCE_DIR, "--jobs", str(tmp_path / "jobs.json")],
                       capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, PYTHONPATH="", OMP_NUM_THREADS="2"))
  assert run.returncode == 0, run.stderr[-4000:]
  out = {}
  for job in jobs:
    with np.load(job["out"], allow_pickle=False) as data:
      out[pathlib.Path(job["out"]).stem] = {k: data[k] for k in data.files}
  return out


def tokenizer_inputs(path: pathlib.Path, codebook_size: int, seed: int = 0) -> str:
  rng = np.random.default_rng(seed)
  np.savez(path, images=rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32),
           codes=rng.integers(0, codebook_size, (2, 16)), decodes=DECODES)
  return str(path)


def compare_tokenizer(tok, inputs_path: str, theirs: dict, what: str) -> dict:
  """Our encode/decodes of the inputs against the reference's; asserts the acceptance bounds and
  returns the figures."""
  with np.load(inputs_path) as data:
    inputs = {k: data[k] for k in data.files}
  enc = tok.encode(jnp.asarray(inputs["images"].transpose(0, 2, 3, 1)))
  figures = {"indices_identical": bool((np.asarray(enc.indices) == theirs["indices"]).all()),
             "max_quant_diff": float(np.abs(np.asarray(enc.quant) - theirs["quant"]).max())}
  codes = jnp.asarray(inputs["codes"], jnp.int32)
  diffs = []
  for t, size in inputs["decodes"].tolist():
    ours = np.asarray(tok.decode_indices(codes, t, size)).transpose(0, 3, 1, 2)
    ref = theirs[f"decode_{t}_{size}"]
    assert ours.shape == ref.shape, (what, t, size)
    diffs.append(float(np.abs(ours - ref).max()))
  figures["max_decode_diff"] = max(diffs)
  print(f"\n{what}: {figures}")
  assert figures["indices_identical"], (what, figures)
  assert figures["max_decode_diff"] <= DECODE_TOLERANCE, (what, figures)
  return figures


# --- the tiny tokenizer recipe, trained here --------------------------------------------------

@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
  """The tiny recipe (towers 64 wide, MLP 128) trained 2 steps with an EMA by launch/train.py."""
  workdir = tmp_path_factory.mktemp("tiny_tokenizer") / "run"
  run = subprocess.run(
      [sys.executable, str(ROOT / "launch" / "train.py"),
       f"--config={ROOT / 'configs' / 'detailflow16_tokenizer.py'}:tiny", f"--workdir={workdir}",
       "--config.total_steps=2", "--config.data.batch_size=8", "--config.checkpoint.save_every=2",
       "--config.checkpoint.async_save=False", "--config.recon_every=0", "--config.losses.ema_decay=0.9"],
      capture_output=True, text=True, timeout=900,
      env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS=""))
  assert run.returncode == 0, run.stderr[-3000:]
  return workdir


def test_tiny_recipe_tokenizer_export_loads_in_the_reference(tiny_workdir, tmp_path):
  out = tmp_path / "RUN"
  assert export.main(["--workdir", str(tiny_workdir), "--format", "reference", "--out", str(out)]) == 0
  source = source_from_workdir(tiny_workdir)
  assert source.weights["model"].config.encoder.mlp_dim == 2 * source.weights["model"].config.encoder.hidden_size
  inputs = tokenizer_inputs(tmp_path / "inputs.npz", source.weights["model"].config.codebook_size)
  checkpoint = str(out / "checkpoints" / "0000002.pt")
  theirs = run_reference(tmp_path, [
      {"name": w, "job": "tokenizer", "checkpoint": checkpoint, "ema": w == "ema", "cache": str(out),
       "inputs": inputs} for w in ("model", "ema")])
  for w in ("model", "ema"):
    compare_tokenizer(source.weights[w], inputs, theirs[w], f"tiny recipe, trained, {w} weights")


# --- released layouts, built by the reference, converted by us and exported back --------------

_TOKENIZER_ARGS = dict(
    image_size=32, max_image_size=32, codebook_size=256, codebook_embed_dim=8, codebook_l2_norm=True,
    codebook_show_usage=True, enc_type="siglip2", dec_type="siglip2", num_latent_tokens=16,
    enc_patch_size=8, dec_patch_size=8, causal_encoder=True, causal_decoder=False, group_size=4,
    causal_num=None, correction_training=True, repa=False, repa_patch_size=8, repa_model="siglip2")


def _siglip2(hidden, mlp, layers, heads=4):
  return {"model_type": "siglip2_vision_model", "hidden_size": hidden, "intermediate_size": mlp,
          "num_hidden_layers": layers, "num_attention_heads": heads, "num_channels": 3,
          "num_patches": 16, "patch_size": 8, "hidden_act": "gelu_pytorch_tanh",
          "layer_norm_eps": 1e-6, "attention_dropout": 0.0}


RELEASED_LAYOUTS = {
    # DetailFlow-16's builders and global-token teacher (the whole SigLIP2, in the checkpoint) on
    # a 14-layer, 48-wide SigLIP2 with MLP 72: encoder = its first 12 layers, decoder 768 wide.
    "DetailFlow-16 builders, narrow SigLIP2": dict(
        siglip2=_siglip2(48, 72, 14),
        args=dict(_TOKENIZER_ARGS, encoder_model="siglip2_base", enc_pretrained=True,
                  decoder_model="siglip2_base", dec_pretrained=False, global_token_loss_weight=1.0)),
    # The second case: 48 wide, MLP 96, both towers all 3 layers of the SigLIP2.
    "48 wide, MLP 96, 3 layers": dict(
        siglip2=_siglip2(48, 96, 3),
        args=dict(_TOKENIZER_ARGS, encoder_model="siglip2", enc_pretrained=True,
                  decoder_model="siglip2", dec_pretrained=True, global_token_loss_weight=0.0)),
}


@pytest.mark.parametrize("layout", sorted(RELEASED_LAYOUTS))
def test_converted_released_layout_export_loads_in_the_reference(layout, tmp_path):
  spec = RELEASED_LAYOUTS[layout]
  original = tmp_path / "released"
  inputs = tokenizer_inputs(tmp_path / "inputs.npz", spec["args"]["codebook_size"])
  built = run_reference(tmp_path / "build", [
      {"name": "built", "job": "build_tokenizer", "run": str(original), "siglip2": spec["siglip2"],
       "args": spec["args"], "seed": 3, "inputs": inputs}])["built"]
  converted = convert_tokenizer(original / "checkpoints" / "tokenizer.pt", tmp_path / "converted")
  ours = load_model_dir(converted, "tokenizer")
  compare_tokenizer(ours, inputs, built, f"{layout}: converted vs the reference's own model")
  out = tmp_path / "RUN"
  assert export.main(["--model", str(converted), "--out", str(out)]) == 0
  written = json.loads((out / "config.json").read_text())
  for key in ("encoder_model", "enc_pretrained", "decoder_model", "dec_pretrained", "global_token_loss_weight"):
    assert written[key] == spec["args"][key], key
  theirs = run_reference(tmp_path, [
      {"name": "export", "job": "tokenizer", "checkpoint": str(out / "checkpoints" / "model.pt"),
       "ema": False, "cache": str(out), "inputs": inputs}])["export"]
  compare_tokenizer(ours, inputs, theirs, f"{layout}: export loaded by load_vq_model")


# --- the GPT (the tiny GPT recipe's sizes: the fixture) ------------------------------------------

def test_gpt_export_loads_in_the_reference(tmp_path):
  labels = np.array([1, 7, 3, 0])
  tokens = np.random.default_rng(0).integers(0, 64, (4, 28))
  cfg_scales = np.array([1.5, 4.0])
  np.savez(tmp_path / "inputs.npz", labels=labels, tokens=tokens, cfg_scales=cfg_scales)
  jobs, models = [], {}
  for weights in ("model", "ema"):
    converted = convert_gpt(TINY / "gpt" / "checkpoints" / "gpt.pt", tmp_path / f"gpt_{weights}", weights=weights)
    run = tmp_path / f"run_{weights}"
    assert export.main(["--model", str(converted), "--out", str(run)]) == 0
    models[weights] = load_model_dir(converted, "gpt")
    jobs.append({"name": weights, "job": "gpt", "checkpoint": str(run / "checkpoints" / "model.pt"),
                 "ema": False, "inputs": str(tmp_path / "inputs.npz")})
  theirs = run_reference(tmp_path, jobs)
  for weights, gpt in models.items():
    logits = np.asarray(gpt(jnp.asarray(tokens, jnp.int32), jnp.asarray(labels, jnp.int32)))
    figures = {"max_logit_diff": float(np.abs(logits - theirs[weights]["logits"]).max())}
    sampler = Sampler(gpt)
    for cfg in cfg_scales.tolist():
      for gradual in (False, True):
        name = f"greedy_{cfg:g}" + ("_gradual" if gradual else "")
        ours = sampler.sample(nnx.state(gpt), labels, jax.random.key(0),
                              SamplingOptions(cfg_scale=cfg, greedy=True, gradual_cfg=gradual))
        figures[name + "_identical"] = bool((np.asarray(ours) == theirs[weights][name]).all())
    print(f"\nGPT fixture ({weights} weights): {figures}")
    assert figures["max_logit_diff"] <= 1e-4, figures
    assert all(v for k, v in figures.items() if k.endswith("_identical")), figures
