"""Two processes on localhost with jax.distributed (4 CPU devices each): train, save, restore."""
import json
import pathlib
import socket
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "two_process_train.py"


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_save_restore(tmp_path):
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(i), port, str(tmp_path / "ckpt")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outputs.append(out)
    assert p.returncode == 0, out[-3000:]
  results = [json.loads(line[len("RESULT "):]) for out in outputs for line in out.splitlines()
             if line.startswith("RESULT ")]
  assert len(results) == 2
  assert {r["process"] for r in results} == {0, 1}
  for r in results:
    assert r["devices"] == 8 and r["processes"] == 2 and r["restored_equal"]
    assert all(l == l for l in r["losses"])  # finite
  # Both processes see the same (global) loss at every step.
  assert results[0]["losses"] == results[1]["losses"]
