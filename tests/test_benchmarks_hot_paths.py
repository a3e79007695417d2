"""benchmarks/vs_reference.py and benchmarks/accelerator.py: the skip path, our side of the
side-by-side run on the fixture checkpoints, the accelerator script's --quick mode, and
benchmarks/memory_plan.py --quick."""
import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import vs_reference  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "detailflow_tiny_a"


def _run_main(argv):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rc = vs_reference.main(argv)
  return rc, json.loads(out.getvalue().strip().splitlines()[-1])


def test_vs_reference_skips_with_a_reason(tmp_path):
  rc, result = _run_main(["--quick"])
  assert rc == 0 and result["skipped"] and "--reference-dir" in result["reason"]
  rc, result = _run_main(["--quick", "--reference-dir", str(tmp_path),
                          "--reference-python", sys.executable])
  assert rc == 0 and result["skipped"] and str(tmp_path) in result["reason"]
  (tmp_path / "autoregressive" / "models").mkdir(parents=True)
  (tmp_path / "autoregressive" / "models" / "generate.py").write_text("")
  rc, result = _run_main(["--reference-dir", str(tmp_path),
                          "--reference-python", str(tmp_path / "no-python")])
  assert rc == 0 and result["skipped"] and "no-python" in result["reason"]


def test_reference_flop_count_matches_the_issue_figure():
  """generate_group_par re-runs the prefix: 8.7x our KV-cache FLOPs at GPT-B, 128 tokens."""
  from detailflow_jax.inference.sampler import sampling_flops
  from detailflow_jax.models.gpt import GPTConfig
  cfg = GPTConfig.preset("GPT-B", vocab_size=8192, block_size=128, group_size=8)
  ratio = vs_reference.reference_sampler_flops(cfg, 8, 128) / sampling_flops(cfg, 8, 128)
  assert 8.6 < ratio < 8.9


def test_our_side_runs_converted_reference_checkpoints():
  """The run-directory layout the reference worker writes is what the fixture holds."""
  spec = vs_reference.workload(quick=True)
  side = vs_reference.OurSide(FIXTURE, spec)
  first, second = side.run("sampler"), side.run("sampler")
  assert first["shape"] == [spec["sampler"]["batch"], side.tokens] == second["shape"]
  assert side.sampler.trace_count == 1
  decoded = side.run("decode")
  assert decoded["shape"] == [spec["decode"]["batch"], 64, 64, 3]
  assert decoded["seconds"] > 0 and decoded["cpu_seconds"] >= 0
  assert side.decode_flops > 0 and np.isfinite(side.decode_flops)


def test_accelerator_quick_covers_every_section():
  # A generous wall-clock budget: the test checks that every section runs and reports, not
  # how fast (the benchmark's own --quick budget of 240 s is for a quiet machine).
  out = subprocess.run([sys.executable, "-m", "benchmarks.accelerator", "--quick", "--budget-s", "1500"],
                       capture_output=True, text=True, check=True, cwd=ROOT, timeout=1800)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  names = set(result["results"])
  assert {"matmul", "sampler_bfloat16_chunked_32", "sampler_float32_whole_32",
          "decode_df16_float32", "train_ar_gpt_l_float32"} <= names
  for name, res in result["results"].items():
    assert "error" not in res, (name, res.get("error"))
  runs = [r for name in names if name.startswith("sampler_")
          for r in result["results"][name]["runs"]]
  assert {r["cache_attention"] for r in runs} == {"chunked", "whole"}
  assert all(0 < r["mfu_vs_bf16_matmul"] and r["images_per_s"] > 0 for r in runs)
  assert set(result["summary"]["cache_attention_choice"]) == {
      "bfloat16_tokens32_batch2", "float32_tokens32_batch2"}
  assert result["summary"]["decode_df16_float32_mfu_vs_bf16_matmul"] > 0
  assert any(s.startswith("reference_eager_32") for s in result["skipped"])


@pytest.mark.slow
def test_memory_plan_quick_reports_every_model_and_policy():
  """benchmarks/memory_plan.py --quick: both recipes' train steps compiled ahead of time from
  abstract states, once per remat policy, with the full-run keys."""
  out = subprocess.run([sys.executable, "-m", "benchmarks.memory_plan", "--quick"],
                       capture_output=True, text=True, check=True, cwd=ROOT, timeout=1200,
                       env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["devices"] == 4 and result["mfu"] == 0.4
  keys = {"argument_bytes", "output_bytes", "temp_bytes", "total_bytes", "fits_16GiB",
          "flops_per_step", "step_time_s_at_mfu", "devices", "residual_bytes"}
  for model in ("gpt", "tokenizer"):
    entries = result["results"][model]
    assert set(entries) == {"none", "full", "save_dots"}
    for policy, entry in entries.items():
      assert keys <= set(entry), (model, policy)
      assert entry["argument_bytes"] > 0 and entry["flops_per_step"] > 0 and entry["fits_16GiB"]
      assert entry["step_time_s_at_mfu"] == entry["flops_per_step"] / (197e12 * 0.4)
    # remat keeps fewer activations, and recomputes (more FLOPs)
    assert entries["full"]["residual_bytes"] < entries["save_dots"]["residual_bytes"] \
        < entries["none"]["residual_bytes"], model
    assert entries["full"]["flops_per_step"] > entries["none"]["flops_per_step"], model
