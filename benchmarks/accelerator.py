"""Accelerator figures in one run (prepared for one H200; --quick runs tiny shapes on CPU).

python -m benchmarks.accelerator [--quick] [--budget-s 450]
                                 [--reference-dir DIR --reference-python PY]
  ->  one JSON object:
  matmul: bf16 and float32 n x n matmul rates on this chip (the MFU denominators);
  sampler: GPT-L, 128 / 256 / 512 tokens, group 8, CFG 1.5, batch 8 / 32 / 128 / 256, bf16 and
           float32, both cache-attention variants ("chunked", "whole"): images/s after
           compile, compile s, peak device memory, MFU (matmul FLOPs of the call per second
           over the bf16 matmul rate);
  reference: generate_group_par on the same GPT-L shape (random weights), bf16 autocast, eager
           and torch.compile, batch 8 and 32 at 128 tokens (512 if the budget allows), and our
           speedup over it (only with --reference-dir/--reference-python);
  decode: DetailFlow-16 decode, batch 64, bf16; train steps: GPT-L AR batch 64 and the
           DF-16 tokenizer batch 8 (everything on), bf16: step time, throughput, MFU;
  cache_attention_choice: per dtype, the variant with more images/s at each shape.
Every measurement runs in its own child process (fresh compile caches and peak-memory
counters; the parent never touches the device). Sections run in priority order; what does not
fit in --budget-s is listed under skipped_for_budget instead of being run.
--quick: every section but the tokenizer train step, on CPU, with the benchmarks' --quick
models (4-layer GPT, 4-layer tokenizer), batch 1-2, 32 tokens, one run per dtype.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

VARIANTS = ("chunked", "whole")


def plan(quick: bool):
  """(name, kind, spec) in priority order."""
  if quick:
    # One run per dtype, each with the other cache-attention variant, so every code path runs
    # once; float32 where the CPU's bf16 matmuls would only add minutes. The tokenizer train
    # step is left out: its compile alone takes minutes on 2 CPU cores.
    return [("matmul", "matmul", {"n": 512}),
            ("sampler_bfloat16_chunked_32", "sampler",
             {"tokens": 32, "batches": [2], "dtype": "bfloat16", "cache_attention": "chunked",
              "matmul_n": 512}),
            ("sampler_float32_whole_32", "sampler",
             {"tokens": 32, "batches": [2], "dtype": "float32", "cache_attention": "whole",
              "matmul_n": 512}),
            ("reference_eager_32", "reference", {"tokens": 32, "batches": [2], "compile": False}),
            ("decode_df16_float32", "decode", {"batch": 1, "dtype": "float32", "matmul_n": 512}),
            ("train_ar_gpt_l_float32", "train_ar", {"batch": 2, "dtype": "float32", "matmul_n": 512})]
  tokens, batches, n = (128, 256, 512), (8, 32, 128, 256), 8192
  jobs = [("matmul", "matmul", {"n": n})]
  for variant in VARIANTS:  # bf16 sampler first: the MFU targets
    for t in tokens:
      jobs.append((f"sampler_bfloat16_{variant}_{t}", "sampler",
                   {"tokens": t, "batches": list(batches), "dtype": "bfloat16",
                    "cache_attention": variant, "matmul_n": n}))
  jobs += [("decode_df16_bfloat16", "decode", {"batch": 64, "dtype": "bfloat16", "matmul_n": n}),
           ("train_ar_gpt_l_bfloat16", "train_ar", {"batch": 64, "dtype": "bfloat16", "matmul_n": n}),
           ("train_tokenizer_df16_bfloat16", "train_tokenizer",
            {"batch": 8, "dtype": "bfloat16", "matmul_n": n})]
  for t in (128, 512):
    for compiled in (False, True):
      jobs.append((f"reference_{'compiled' if compiled else 'eager'}_{t}", "reference",
                   {"tokens": t, "batches": [8, 32], "compile": compiled}))
  for variant in VARIANTS:
    for t in tokens:
      jobs.append((f"sampler_float32_{variant}_{t}", "sampler",
                   {"tokens": t, "batches": list(batches), "dtype": "float32",
                    "cache_attention": variant, "matmul_n": n}))
  return jobs


def child(kind: str, spec: dict, quick: bool) -> dict:
  """One measurement in this (child) process."""
  import jax
  import jax.numpy as jnp
  if kind == "matmul":
    from benchmarks.common import matmul_flops_per_s
    return {f"{d}_gflop_per_s": matmul_flops_per_s(n=spec["n"], dtype=jnp.dtype(d)) / 1e9
            for d in ("bfloat16", "float32")} | {"n": spec["n"],
                                                  "device": str(jax.devices()[0].device_kind)}
  if kind == "sampler":
    from benchmarks.sampling import one_run
    runs = []
    for batch in spec["batches"]:
      try:  # e.g. float32 KV caches at batch 256 x 512 tokens may not fit: keep the rest
        runs.append(one_run(quick, spec["tokens"], batch, spec["dtype"], 2,
                            cache_attention=spec["cache_attention"], matmul_n=spec["matmul_n"]))
      except Exception as e:  # noqa: BLE001 (recorded in the JSON, not hidden)
        runs.append({"batch": batch, "tokens": spec["tokens"], "dtype": spec["dtype"],
                     "cache_attention": spec["cache_attention"],
                     "error": f"{type(e).__name__}: {str(e)[:500]}"})
    return {"runs": runs}
  if kind == "decode":
    from benchmarks.tokenizer import measure
    return measure(quick, spec["batch"], spec["dtype"], matmul_n=spec["matmul_n"], encode=False)
  if kind == "train_ar":
    from benchmarks.train_step import measure
    out = measure(quick, 1, spec["batch"], 2 if quick else 5, compute_dtype=spec["dtype"],
                  preset="" if not quick else "gpt_b", matmul_n=spec["matmul_n"])
    return out | {"batch": spec["batch"], "dtype": spec["dtype"]}
  if kind == "train_tokenizer":
    from benchmarks.tokenizer_train_step import measure
    return measure(quick, spec["batch"], 1 if quick else 3, compute_dtype=spec["dtype"],
                   matmul_n=spec["matmul_n"])
  raise ValueError(f"unknown measurement kind {kind!r}")


def reference_spec(quick: bool, spec: dict) -> dict:
  from benchmarks.sampling import model_config
  name, cfg = model_config(quick, spec["tokens"])
  out = dict(tokens=spec["tokens"], batches=spec["batches"], compile=spec["compile"],
             dtype="float32" if quick else "bfloat16", vocab_size=cfg.vocab_size, group_size=cfg.group_size,
             num_classes=cfg.num_classes, cfg_scale=1.5, seed=0, repeats=1 if quick else 2)
  if quick:
    out.update(gpt_model="GPT-quick", gpt_dims=dict(dim=cfg.dim, n_layer=cfg.n_layer,
                                                    n_head=cfg.n_head), device="cpu")
  else:
    out.update(gpt_model="GPT-L")
  return out


def run_job(kind: str, spec: dict, args, timeout: float) -> dict:
  if kind == "reference":
    cmd = [args.reference_python, str(ROOT / "benchmarks" / "reference_worker.py"),
           "--reference-dir", args.reference_dir, "--time-generation",
           "--spec", json.dumps(reference_spec(args.quick, spec))]
  else:
    cmd = [sys.executable, "-m", "benchmarks.accelerator", "--child", kind, "--spec", json.dumps(spec)]
    cmd += ["--quick"] if args.quick else []
  env = dict(os.environ)
  if args.quick:
    env.setdefault("JAX_PLATFORMS", "cpu")
  start = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - start}
  wall = time.perf_counter() - start
  if proc.returncode != 0:
    return {"error": f"rc={proc.returncode}: {proc.stderr.strip()[-1500:]}", "wall_s": wall}
  return json.loads(proc.stdout.strip().splitlines()[-1]) | {"wall_s": wall}


def summarize(results: dict) -> dict:
  """MFU against the bf16 matmul rate, the variant choice per shape, our speedups."""
  bf16 = results.get("matmul", {}).get("bfloat16_gflop_per_s")
  summary = {"bf16_matmul_gflop_per_s": bf16}
  best = {}
  for name, res in results.items():
    if not name.startswith("sampler_") or "runs" not in res:
      continue
    for run in res["runs"]:
      if "error" in run:
        continue
      if bf16:
        run["mfu_vs_bf16_matmul"] = run["gflops_per_call"] / run["seconds_per_call"] / bf16
      key = (run["dtype"], run["tokens"], run["batch"])
      if key not in best or run["images_per_s"] > best[key][1]:
        best[key] = (run["cache_attention"], run["images_per_s"], run)
  summary["cache_attention_choice"] = {f"{d}_tokens{t}_batch{b}": v[0]
                                       for (d, t, b), v in sorted(best.items())}
  for name, res in results.items():
    if not name.startswith(("decode_", "train_")):
      continue
    if bf16 and "error" not in res:
      rate = res.get("flops_fraction", 0.0) * res.get("matmul_gflop_per_s", 0.0)
      if name.startswith("decode"):
        rate = res["decode_flops_fraction"] * res["matmul_gflop_per_s"]
      summary[f"{name}_mfu_vs_bf16_matmul"] = rate / bf16
  speedups = {}
  for name, res in results.items():
    if not name.startswith("reference_") or "runs" not in res:
      continue
    for run in res["runs"]:
      ours = best.get((res["dtype"], res["tokens"], run["batch"]))
      if ours:
        speedups[f"{name}_batch{run['batch']}"] = ours[1] / run["images_per_s"]
  summary["speedup_over_reference"] = speedups
  return summary


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--budget-s", type=float, default=None,
                      help="wall-clock budget for all sections (default 450; --quick 240)")
  parser.add_argument("--reference-dir", default=None)
  parser.add_argument("--reference-python", default=None)
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--spec", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(child(args.child, json.loads(args.spec), args.quick)))
    return 0

  budget = args.budget_s or (240.0 if args.quick else 450.0)
  have_reference = bool(args.reference_dir and args.reference_python
                        and os.access(args.reference_python, os.X_OK))
  start = time.perf_counter()
  results, skipped = {}, []
  for name, kind, spec in plan(args.quick):
    if kind == "reference" and not have_reference:
      skipped.append(f"{name} (no --reference-dir/--reference-python)")
      continue
    left = budget - (time.perf_counter() - start)
    if left < 10:
      skipped.append(f"{name} (budget)")
      continue
    print(f"accelerator: {name} ({left:.0f} s left)", file=sys.stderr, flush=True)
    results[name] = run_job(kind, spec, args, timeout=left)
  out = {"results": results, "summary": summarize(results), "skipped": skipped,
         "budget_s": budget, "wall_s": time.perf_counter() - start, "quick": args.quick,
         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
