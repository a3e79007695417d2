"""Shared test set-up: CPU with 8 virtual devices (mesh tests), fixtures, converted models."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# One persistent compilation cache for the session, this process and the CLIs / launches the
# tests start (they inherit the environment): the same tiny programs compile once, not once per
# test or process (a cached executable is the one a compile would give: results do not change).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="detailflow-jax-compile-cache-")

import pathlib

import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TINY = FIXTURES / "detailflow_tiny_a"
MANIFESTS = FIXTURES / "manifests"


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: multi-minute end-to-end runs (2-process launches, AOT memory plans); "
      "deselected by default, run them with `python -m pytest -q -m slow tests`")
  # Grain's multiprocess workers read absl flags; mark them parsed as absl.app.run would.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def golden():
  with np.load(TINY / "golden.npz") as data:
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def golden_images_nhwc(golden):
  return golden["images"].transpose(0, 2, 3, 1)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
  """The fixture tokenizer converted once per session with the real CLI code path."""
  from detailflow_jax.convert.tokenizer import convert_tokenizer
  out = tmp_path_factory.mktemp("converted") / "tokenizer"
  convert_tokenizer(TINY / "tokenizer" / "checkpoints" / "tokenizer.pt", out)
  return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
  from detailflow_jax.weights.load import load_tokenizer
  return load_tokenizer(tokenizer_dir)


def nchw_to_nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


@pytest.fixture(scope="session")
def inception_random_dir(tmp_path_factory):
  """Random Inception weights (tests/inception_helpers.py, golden seed) saved in the .pth layout
  and converted once per session with `python -m detailflow_jax.convert inception`."""
  import torch
  from inception_helpers import random_inception_state_dict

  from detailflow_jax.convert.__main__ import main
  tmp = tmp_path_factory.mktemp("inception")
  pth = tmp / "pt_inception-2015-12-05-6726825d.pth"
  # Without the num_batches_tracked counters, as torch-fidelity's converted file has them.
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in random_inception_state_dict().items()
              if not k.endswith("num_batches_tracked")}, pth)
  assert main(["inception", "--checkpoint", str(pth), "--out", str(tmp / "converted")]) == 0
  return tmp / "converted"


def run_two_processes(script, *args, timeout=240):
  """Runs `script PROCESS_ID PORT *args` as two localhost jax.distributed processes and returns
  the JSON objects they print on `RESULT ` lines (one each, or the test fails with the output)."""
  import json
  import socket
  import subprocess
  import sys
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  procs = [subprocess.Popen([sys.executable, str(script), str(i), port, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outputs.append(out)
    assert p.returncode == 0, out[-3000:]
  results = [json.loads(line[len("RESULT "):]) for out in outputs for line in out.splitlines()
             if line.startswith("RESULT ")]
  assert sorted(r["process"] for r in results) == [0, 1], outputs
  return results


def kill_9_when(cmd, ready, timeout: float, **popen_kwargs) -> None:
  """Starts `cmd` and SIGKILLs it as soon as `ready()` holds (polled every 20 ms); fails if the
  process ended first (nothing was interrupted) or `ready` never held within `timeout` s."""
  import os
  import signal
  import subprocess
  import time
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen_kwargs)
  deadline = time.time() + timeout
  try:
    while time.time() < deadline and proc.poll() is None and not ready():
      time.sleep(0.02)
    assert proc.poll() is None, "the job ended before it was ready to be killed"
    assert ready(), f"not ready after {timeout} s"
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()


def write_token_records(path, num_records: int = 64, length: int = 32, vocab: int = 64,
                        num_classes: int = 10):
  """Random (clean, input, target) code triples with class ids, as extraction writes them."""
  from detailflow_jax.data.sources import TokenRecordWriter
  rng = np.random.default_rng(0)
  writer = TokenRecordWriter(path)
  for i in range(num_records):
    writer.write(rng.integers(0, vocab, size=(length, 3)), label=i % num_classes)
  writer.close()
  return path
