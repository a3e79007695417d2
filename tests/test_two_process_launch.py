"""Both recipes through the real launch/train.py as two jax.distributed processes (4 CPU devices
each) with FSDP spanning the processes (mesh data=1 x fsdp=8): training, the periodic PNG hooks
(which compute on weights sharded across both hosts) and the export all complete; the exported
directory loads and runs; each PNG is written once (by process 0)."""
import pathlib

import jax
import numpy as np
import pytest
from conftest import run_two_processes, write_token_records
from PIL import Image

from detailflow_jax.weights.load import load_gpt, load_tokenizer

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "two_process_launch.py"


@pytest.mark.slow
def test_gpt_recipe_on_two_processes(tmp_path, tokenizer_dir):
  tokens = write_token_records(tmp_path / "tokens")
  workdir = tmp_path / "run"
  results = run_two_processes(
      SCRIPT, workdir, "configs/detailflow16_gpt_l.py:tiny", f"--config.data.path={tokens}",
      "--config.total_steps=4", "--config.sample_every=2", f"--config.tokenizer_dir={tokenizer_dir}",
      "--config.log_every=2", "--config.checkpoint.save_every=2", "--config.checkpoint.async_save=False",
      timeout=900)
  assert sorted(r["pngs_written"] for r in results) == [0, 2]  # process 0 only, steps 2 and 4
  for step in (2, 4):
    with Image.open(workdir / "samples" / f"step_{step:07d}.png") as im:
      assert im.size[1] > 8 * 64  # one strip per class (8 of the 10)
  gpt = load_gpt(workdir / "export")
  assert gpt.config.n_layer == 2 and gpt.config.vocab_size == 64
  logits = gpt(jax.numpy.zeros((2, 12), jax.numpy.int32), jax.numpy.asarray([1, 2]))
  assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.slow
def test_tokenizer_recipe_on_two_processes(tmp_path):
  workdir = tmp_path / "run"
  results = run_two_processes(
      SCRIPT, workdir, "configs/detailflow16_tokenizer.py:tiny", "--config.total_steps=2",
      "--config.data.batch_size=8", "--config.recon_every=2", "--config.num_recon_images=2",
      "--config.log_every=2", "--config.checkpoint.save_every=2", "--config.checkpoint.async_save=False",
      "--config.model.encoder.num_layers=1", "--config.model.decoder.num_layers=1",
      timeout=900)
  assert sorted(r["pngs_written"] for r in results) == [0, 1]  # process 0 only, step 2
  assert sorted(p.name for p in (workdir / "reconstructions").iterdir()) == ["step_0000002.png"]
  tok = load_tokenizer(workdir / "export")
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  out = tok.decode(tok.encode(images).quant, 16)
  assert out.shape == (2, 32, 32, 3) and np.isfinite(np.asarray(out)).all()
