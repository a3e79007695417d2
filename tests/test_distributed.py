"""Two processes on localhost with jax.distributed (4 CPU devices each): train, save, restore."""
import pathlib

from conftest import run_two_processes

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "two_process_train.py"


def test_two_processes_train_save_restore(tmp_path):
  results = run_two_processes(SCRIPT, tmp_path / "ckpt")
  for r in results:
    assert r["devices"] == 8 and r["processes"] == 2 and r["restored_equal"]
    assert all(l == l for l in r["losses"])  # finite
  # Both processes see the same (global) loss at every step.
  assert results[0]["losses"] == results[1]["losses"]
