"""Fine-tuning at pod shape, on two jax.distributed processes (4 CPU devices each, FSDP over
both: mesh data=1 x fsdp=8) through the real launch/train.py: init_from a converted fixture
GPT, checkpoints, kill -9 after step 4, resume, finish; the final weights equal an
uninterrupted run's; a mid-run step exported with `python -m detailflow_jax.export` loads and
samples."""
import pathlib

import jax
import numpy as np
import pytest
from conftest import run_two_processes, write_token_records
from flax import nnx
from gpt_helpers import converted_gpt_dir, loaded_gpt

from detailflow_jax import export
from detailflow_jax.inference.sampler import Sampler
from detailflow_jax.train.driver import KILL_AFTER_STEP_ENV
from detailflow_jax.weights import export as weights_export
from detailflow_jax.weights import saved_steps
from detailflow_jax.weights.load import load_gpt

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "two_process_launch.py"


def _flat(module):
  return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(module))}


@pytest.mark.slow
def test_finetune_kill_resume_export_on_two_processes(tmp_path, tmp_path_factory, monkeypatch):
  tokens = write_token_records(tmp_path / "tokens")
  fixture = converted_gpt_dir(tmp_path_factory)
  args = ["configs/detailflow16_gpt_l.py:tiny", f"--config.data.path={tokens}",
          f"--config.init_from={fixture}", "--config.total_steps=6", "--config.log_every=2",
          "--config.checkpoint.save_every=2", "--config.checkpoint.keep=5",
          "--config.checkpoint.async_save=False"]

  straight = tmp_path / "straight"
  run_two_processes(SCRIPT, straight, *args, timeout=600)

  resumed = tmp_path / "resumed"
  monkeypatch.setenv(KILL_AFTER_STEP_ENV, "4")
  results = run_two_processes(SCRIPT, resumed, *args, timeout=600)
  assert [r["returncode"] for r in results] == [-9, -9]
  steps = saved_steps.workdir_steps(resumed)
  assert 2 in steps and steps[-1] == 4 and not (resumed / "export").exists()
  monkeypatch.delenv(KILL_AFTER_STEP_ENV)
  run_two_processes(SCRIPT, resumed, *args, timeout=600)

  # Resumed == uninterrupted, for the final checkpoint (model and EMA) and the export.
  for weights in ("model", "ema"):
    a = _flat(weights_export.source_from_workdir(straight, 6).weights[weights])
    b = _flat(weights_export.source_from_workdir(resumed, 6).weights[weights])
    for name in a:
      np.testing.assert_array_equal(a[name], b[name], err_msg=f"{weights} {name}")
  a, b = _flat(load_gpt(straight / "export")), _flat(load_gpt(resumed / "export"))
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)

  # The run started from the fixture's weights (a fresh GPT's output layer is zero; the
  # fixture's is ~N(0, 0.75)): after 2 steps at a warm-up learning rate it is still close.
  mid = tmp_path / "mid_export"
  assert export.main(["--workdir", str(resumed), "--step", "2", "--format", "model_dir",
                      "--out", str(mid)]) == 0
  gpt = load_gpt(mid)
  start = _flat(loaded_gpt(tmp_path_factory))
  got = _flat(gpt)
  assert set(got) == set(start)
  kernel = start["output/kernel"]
  assert np.abs(kernel).mean() > 0.3
  assert np.abs(got["output/kernel"] - kernel).max() < 0.05 * np.abs(kernel).max()
  assert not np.array_equal(got["output/kernel"], kernel)

  labels = np.arange(4, dtype=np.int32)
  sampled = np.asarray(Sampler(gpt).sample(nnx.state(gpt), labels, jax.random.key(0)))
  assert sampled.shape == (4, gpt.config.block_size)
  assert sampled.min() >= 0 and sampled.max() < gpt.config.vocab_size
