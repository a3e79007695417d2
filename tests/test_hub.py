"""Hub ids wherever a model is taken, offline against a Hub cache laid out as huggingface_hub
lays it out: the acceptance command, @revision and :path forms, the offline error, the cache of
conversions (hit, invalidation, damage) and damaged converted directories."""
import os
import pathlib
import subprocess
import sys

import hub_helpers as hh
import numpy as np
import pytest
from conftest import TINY
from flax import nnx

from detailflow_jax.convert.common import load_state_dict
from detailflow_jax.convert.gpt import torch_name
from detailflow_jax.weights import hub

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
  """HF_HOME=tmp, HF_HUB_OFFLINE=1 for this process (huggingface_hub reads both at import, so
  its constants are patched too); returns the hub cache directory."""
  import huggingface_hub.constants as constants
  home = tmp_path / "hf_home"
  monkeypatch.setenv("HF_HOME", str(home))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.delenv(hub.CACHE_ENV, raising=False)
  monkeypatch.setattr(constants, "HF_HOME", str(home))
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  return home / "hub"


def _gpt_params(directory):
  from detailflow_jax.weights.load import load_gpt
  return {torch_name(p): np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(load_gpt(directory)))}


def _assert_weights(directory, which):
  want = load_state_dict(TINY / "gpt" / "checkpoints" / "gpt.pt", which)
  got = _gpt_params(directory)
  key = "cls_embedding.embedding_table.weight"
  np.testing.assert_array_equal(got[key], want[key])


def test_parse_hub_id():
  assert hub.parse_hub_id("ByteFlow-AI/DetailFlow-16") == hub.HubId("ByteFlow-AI/DetailFlow-16")
  assert hub.parse_hub_id("a/b@v1.0:checkpoints/128.pt") == hub.HubId("a/b", "v1.0", "checkpoints/128.pt")
  assert hub.parse_hub_id("a/b:checkpoints/x.pt") == hub.HubId("a/b", None, "checkpoints/x.pt")
  assert str(hub.HubId("a/b", "main", "c/x.pt")) == "a/b@main:c/x.pt"
  for bad in ("DetailFlow-16", "/abs/path", "a/b/c", "../x", "a/b@"):
    assert hub.parse_hub_id(bad) is None, bad


def test_pick_checkpoint_released_layout():
  assert hub.pick_checkpoint(["config.json", "config.yaml", "checkpoints/128.pt", "README.md"], "r") == \
      "checkpoints/128.pt"
  assert hub.pick_checkpoint(["checkpoints/a.safetensors", "x.pt"], "r") == "x.pt"
  with pytest.raises(hub.HubError, match=r"2 checkpoints: checkpoints/a.pt, checkpoints/b.pt; pick one as r:"):
    hub.pick_checkpoint(["checkpoints/a.pt", "checkpoints/b.pt"], "r")
  with pytest.raises(hub.HubError, match="no checkpoint in the released layout"):
    hub.pick_checkpoint(["config.json"], "r")


def test_sample_cli_from_hub_ids_offline(tmp_path):
  """The README's first command, verbatim, from a populated cache with HF_HUB_OFFLINE=1."""
  home = tmp_path / "hf_home"
  hh.add_snapshot(home / "hub", hh.TOKENIZER_REPO, hh.tokenizer_files())
  hh.add_snapshot(home / "hub", hh.GPT_REPO, hh.imagenet_gpt_files())
  env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(ROOT), XLA_FLAGS="")
  env.pop(hub.CACHE_ENV, None)
  cmd = [sys.executable, "-m", "detailflow_jax.sample", "--tokenizer", "ByteFlow-AI/DetailFlow-16",
         "--gpt", "ByteFlow-AI/DetailFlow-16-GPT-L", "--labels", "207,360", "--out", "grid.png"]
  r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "gpt: converting ByteFlow-AI/DetailFlow-16-GPT-L@" in r.stderr
  assert "(ema weights: the reference's evaluation default)" in r.stderr
  assert "(model weights: the reference's evaluation default)" in r.stderr  # the tokenizer
  assert "sampled 2 x 32 tokens" in r.stdout
  from PIL import Image
  grid = np.asarray(Image.open(tmp_path / "grid.png"))
  assert grid.shape[0] >= 64 and grid.shape[1] >= 2 * 64 and grid.std() > 0
  converted = list((home / "detailflow_jax" / "gpt").rglob("source.json"))
  assert len(converted) == 1  # cached under $HF_HOME/detailflow_jax


def test_revisions_paths_cache_hits_and_invalidation(offline_cache, monkeypatch, capsys):
  repo = hh.GPT_REPO
  main = hh.add_snapshot(offline_cache, repo, hh.gpt_files())
  files = dict(hh.gpt_files(), **{"checkpoints/swapped.pt": hh.swapped_gpt_checkpoint()})
  two = hh.add_snapshot(offline_cache, repo, files, ref="v2")

  first = hub.resolve_model_dir(repo, "gpt")
  assert "converting" in capsys.readouterr().err
  _assert_weights(first, "ema")  # the GPT default
  assert first.parent.name == main

  # A second call reuses the conversion without converting.
  with monkeypatch.context() as m:
    m.setattr(hub, "_converter", lambda kind: pytest.fail("converted again"))
    assert hub.resolve_model_dir(repo, "gpt") == first
    assert "(ema weights), cached conversion" in capsys.readouterr().err
    assert hub.resolve_model_dir(f"{repo}@{main}", "gpt") == first  # a commit hash

  # A revision with two checkpoints: an error listing both; :path picks one.
  with pytest.raises(hub.HubError, match=r"2 checkpoints: checkpoints/gpt.pt, checkpoints/swapped.pt"):
    hub.resolve_model_dir(f"{repo}@v2", "gpt")
  swapped = hub.resolve_model_dir(f"{repo}@v2:checkpoints/swapped.pt", "gpt", weights="model")
  assert swapped.parent.name == two and "(model weights: asked for)" in capsys.readouterr().err
  _assert_weights(swapped, "ema")  # its 'model' set is the fixture's EMA set

  # A changed config (same checkpoint) invalidates the conversion.
  yaml_link = offline_cache / f"models--{repo.replace('/', '--')}" / "snapshots" / main / "config.yaml"
  blob = yaml_link.resolve()
  blob.write_text(blob.read_text() + "# edited\n")
  assert hub.resolve_model_dir(repo, "gpt") == first
  err = capsys.readouterr().err
  assert "was made from other files (config.yaml changed); converting again" in err
  _assert_weights(first, "ema")


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_cached_conversion_is_redone(offline_cache, capsys, damage):
  hh.add_snapshot(offline_cache, hh.TOKENIZER_REPO, hh.tokenizer_files())
  directory = hub.resolve_model_dir(hh.TOKENIZER_REPO, "tokenizer")
  capsys.readouterr()
  victim = max((p for p in (directory / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(victim.read_bytes())
  if damage == "flip":
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
  else:
    victim.write_bytes(bytes(data[: len(data) // 3]))
  assert hub.resolve_model_dir(hh.TOKENIZER_REPO, "tokenizer") == directory
  err = capsys.readouterr().err
  assert "converting again" in err
  assert ("has changed (SHA-256 differs)" if damage == "flip" else "bytes, ") in err
  from conftest import nchw_to_nhwc

  from detailflow_jax.weights.load import load_tokenizer
  with np.load(TINY / "golden.npz") as g:
    images, want = nchw_to_nhwc(g["images"]), g["tok_indices_full"]
  tok = load_tokenizer(directory)
  np.testing.assert_array_equal(np.asarray(tok.encode(images).indices), want)


def test_offline_with_an_empty_cache_is_one_clear_error(offline_cache, tmp_path, capsys):
  from detailflow_jax import reconstruct
  with pytest.raises(hub.HubError) as e:
    hub.resolve_model_dir(hh.GPT_REPO, "gpt")
  message = str(e.value)
  assert hh.GPT_REPO in message and "HF_HUB_OFFLINE=1" in message and "network access" in message
  assert reconstruct.main(["--tokenizer", "ByteFlow-AI/DetailFlow-16", "--images",
                           str(TINY / "images" / "input_0.png"), "--out", str(tmp_path / "x.png")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "ByteFlow-AI/DetailFlow-16 is not in the Hugging Face cache" in err[0]
  with pytest.raises(FileNotFoundError, match="neither an existing path nor a Hub id"):
    hub.resolve_model_dir("no_such_dir", "gpt")


def test_local_run_directory_and_weights_flag(tmp_path, monkeypatch, tokenizer_dir, capsys):
  monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
  directory = hub.resolve_model_dir(TINY / "gpt", "gpt", weights="model")
  assert directory.is_relative_to(tmp_path / "cache")
  _assert_weights(directory, "model")
  with pytest.raises(ValueError, match="already converted"):
    hub.resolve_model_dir(tokenizer_dir, "tokenizer", weights="ema")
  assert hub.resolve_model_dir(tokenizer_dir, "tokenizer") == tokenizer_dir


def test_damaged_model_directory_is_one_clear_line(tmp_path, capsys):
  """A truncated array file (subprocess: what a user sees) and a deleted one (in process)."""
  from detailflow_jax import reconstruct
  from detailflow_jax.convert.tokenizer import convert_tokenizer
  directory = convert_tokenizer(TINY / "tokenizer" / "checkpoints" / "tokenizer.pt", tmp_path / "tok")
  files = sorted((p for p in (directory / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  with open(files[-1], "r+b") as f:
    f.truncate(files[-1].stat().st_size // 2)
  cmd = [sys.executable, "-m", "detailflow_jax.reconstruct", "--tokenizer", str(directory),
         "--images", str(TINY / "images" / "input_0.png"), "--out", str(tmp_path / "x.png")]
  r = subprocess.run(cmd, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS=""),
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1, r.stderr
  assert str(directory) in lines[0] and "is damaged" in lines[0] and "convert again" in lines[0]
  assert "Event loop is closed" not in r.stderr and not (tmp_path / "x.png").exists()

  files[-2].unlink()
  assert reconstruct.main(cmd[3:]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "is missing" in err[0] and str(directory) in err[0]

  # A directory written before config.json listed its files: Orbax's error, in one line.
  import json
  meta = json.loads((directory / "config.json").read_text())
  del meta["files"]
  (directory / "config.json").write_text(json.dumps(meta))
  assert reconstruct.main(cmd[3:]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "its arrays cannot be read" in err[0] and "convert again" in err[0]
