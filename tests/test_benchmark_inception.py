"""benchmarks/inception.py --quick runs and prints the keys the issue asks for."""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quick_benchmark_prints_one_json_object():
  run = subprocess.run([sys.executable, "-m", "benchmarks.inception", "--quick"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
  assert run.returncode == 0, run.stderr[-2000:]
  result = json.loads(run.stdout.strip().splitlines()[-1])
  for key in ("images_per_s", "flops_fraction", "compile_s", "peak_rss_mb"):
    assert result[key] > 0, key
  assert 0 < result["flops_fraction"] < 1.5 and result["batch"] == 4 and result["input_size"] == 256
  # XLA's count for resize + Inception at 299: about 5.7 G multiply-adds per image.
  assert 10 < result["gflops_per_image"] < 12.5
