"""Cold vs warm start of `python -m detailflow_jax.sample` with the persistent compilation cache.

python -m benchmarks.start_time [--quick] [--runs N]
  ->  one JSON object: wall seconds of each `sample` process (no cache, cold = an empty cache
      directory, warm = the same directory again), the sampled and decode times they print,
      warm_speedup = cold / warm (median over --runs pairs), the cache's size on disk.

The GPT has GPT-L's width and depth (dim 1024, 24 layers, 16 heads; --quick: GPT-B's) with
seeded random weights, and the fixture tokenizer's vocabulary and token count
(tests/fixtures/detailflow_tiny_a), so the program the sampler compiles is GPT-L's while
decoding stays small. Each run is a fresh process, one label, CFG 1.5, the full token budget.
"""
import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "detailflow_tiny_a"


def build_models(tmp: pathlib.Path, preset: str):
  from benchmarks.latency import random_reference_like_gpt
  from detailflow_jax.convert import gpt as gpt_convert
  from detailflow_jax.convert.tokenizer import convert_tokenizer
  from detailflow_jax.models.gpt import PRESETS, GPTConfig
  from detailflow_jax.weights.model_dir import save_model_dir
  fixture = gpt_convert.load_reference_config(FIXTURE / "gpt")
  n_layer, n_head, dim = PRESETS[preset]
  cfg = GPTConfig(**dict(fixture.to_dict(), dim=dim, n_layer=n_layer, n_head=n_head, n_kv_head=None))
  gpt_dir = tmp / "gpt"
  gpt_dir.mkdir()
  save_model_dir(gpt_dir, "gpt", cfg.to_dict(), random_reference_like_gpt(cfg, 0))
  tok_dir = convert_tokenizer(FIXTURE / "tokenizer" / "checkpoints" / "tokenizer.pt", tmp / "tokenizer")
  return gpt_dir, tok_dir, cfg


def run_sample(gpt_dir, tok_dir, out: pathlib.Path, cache_args) -> dict:
  cmd = [sys.executable, "-m", "detailflow_jax.sample", "--tokenizer", str(tok_dir), "--gpt",
         str(gpt_dir), "--labels", "0", "--out", str(out)] + cache_args
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  start = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
  wall = time.perf_counter() - start
  if proc.returncode:
    raise SystemExit(f"sample failed ({proc.returncode}): {proc.stderr[-2000:]}")
  found = lambda pattern: float(m.group(1)) if (m := re.search(pattern, proc.stdout)) else None
  return {"wall_s": wall, "sampled_s": found(r"tokens in ([\d.]+)s"),
          "decoded_s": found(r"decoded at \d+px in ([\d.]+)s")}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--runs", type=int, default=None, help="cold/warm pairs (default 2; quick 1)")
  args = parser.parse_args(argv)
  preset = "GPT-B" if args.quick else "GPT-L"
  runs = args.runs or (1 if args.quick else 2)
  loads = [os.getloadavg()]
  with tempfile.TemporaryDirectory(prefix="start_time_") as tmp:
    tmp = pathlib.Path(tmp)
    gpt_dir, tok_dir, cfg = build_models(tmp, preset)
    no_cache = run_sample(gpt_dir, tok_dir, tmp / "n.png", ["--no-compile-cache"])
    cold, warm, cache_mb = [], [], []
    for i in range(runs):
      cache = tmp / f"cache{i}"
      cold.append(run_sample(gpt_dir, tok_dir, tmp / "c.png", ["--compile-cache", str(cache)]))
      warm.append(run_sample(gpt_dir, tok_dir, tmp / "w.png", ["--compile-cache", str(cache)]))
      cache_mb.append(sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 2 ** 20)
      loads.append(os.getloadavg())
  med = lambda runs, key: statistics.median(r[key] for r in runs)
  print(json.dumps({
      "model": f"{preset}-sized (dim {cfg.dim}, {cfg.n_layer} layers, {cfg.n_head} heads), vocab "
               f"{cfg.vocab_size}, {cfg.block_size} tokens, group {cfg.group_size}",
      "no_cache": no_cache, "cold": cold, "warm": warm,
      "cold_wall_s": med(cold, "wall_s"), "warm_wall_s": med(warm, "wall_s"),
      "warm_speedup": med(cold, "wall_s") / med(warm, "wall_s"),
      "target_warm_speedup": 3.0, "cache_mb": cache_mb, "loadavg": loads,
      "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
