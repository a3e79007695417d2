"""KV-cache sampler throughput: GPT-L, 128/256/512 tokens, group size 8, CFG, batch 8 and 32.

python -m benchmarks.sampling [--quick] [--dtype float32|bfloat16] [--cache-attention V]
  ->  one JSON object:
  runs: [{model, tokens, batch, images_per_s, flops_fraction, compile_s, peak_rss_mb, ...}],
  time_ratio_512_over_128 (largest batch; linear in tokens gives ~4, quadratic ~16).
Weights are random (built with nnx; float32 by default, the fast dtype on CPU). Each run is a
fresh subprocess so compile time (ahead-of-time lower + compile) and peak RSS belong to that run
alone; images_per_s is from the best of --repeats full calls after a one-token warm-up. flops_fraction is the
analytic matmul FLOPs of one sampling call (projections, FFN, output layer, attention over the
cache) per second, over a jitted n x n matmul measured in the same process.
--quick: same keys with a 4-layer, 256-wide model, one timed call per run (under 2 minutes
on 2 CPU cores).
"""
import argparse
import json
import subprocess
import sys
import time

import jax  # noqa: E402  (after the path insert)
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import matmul_flops_per_s, peak_device_memory_mb, peak_rss_mb  # noqa: E402
from detailflow_jax.inference.sampler import Sampler, SamplingOptions, sampling_flops  # noqa: E402
from detailflow_jax.models.gpt import GPT, GPTConfig  # noqa: E402
from detailflow_jax.models.keys import InitKeys  # noqa: E402

TOKENS = (128, 256, 512)
BATCHES = (8, 32)


def model_config(quick: bool, tokens: int):
  common = dict(vocab_size=8192, num_classes=1000, block_size=tokens, group_size=8)
  if quick:
    return "GPT-quick(dim256,4L,4H,vocab4096)", GPTConfig(
        dim=256, n_layer=4, n_head=4, **dict(common, vocab_size=4096))
  return "GPT-L", GPTConfig.preset("GPT-L", **common)


def random_model(cfg, dtype):
  """A GPT with random weights everywhere (the output layer too, so logits are not flat)."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=InitKeys(0))))
  flat = []
  for i, (path, var) in enumerate(nnx.to_flat_state(abstract)):
    key = jax.random.key(i)
    if path[-1] == "weight":
      value = jnp.ones(var.shape, dtype)
    else:
      value = (jax.random.normal(key, var.shape, jnp.float32) * 0.02).astype(dtype)
    flat.append((path, var.replace(value)))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def one_run(quick: bool, tokens: int, batch: int, dtype_name: str, repeats: int,
            cache_attention=None, matmul_n: int = 2048):

  dtype = jnp.dtype(dtype_name)
  name, cfg = model_config(quick, tokens)
  gpt = random_model(cfg, dtype)
  sampler = Sampler(gpt, cache_attention=cache_attention)
  params = nnx.state(gpt)
  labels = jax.numpy.arange(batch) % cfg.num_classes
  options = SamplingOptions(cfg_scale=1.5, temperature=1.0, top_k=0, top_p=1.0)

  start = time.perf_counter()
  sampler.precompile(params, labels, options)
  compile_s = time.perf_counter() - start
  # Warm-up through the same executable (the budget is traced): one token only.
  jax.block_until_ready(sampler.sample(params, labels, jax.random.key(0), options, num_tokens=1))
  peak = matmul_flops_per_s(n=matmul_n, dtype=dtype)
  best = float("inf")
  for r in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(sampler.sample(params, labels, jax.random.key(r + 1), options))
    best = min(best, time.perf_counter() - start)
  assert sampler.trace_count == 1, "sampler recompiled"
  flops = sampling_flops(cfg, batch, tokens, guidance=True)
  # The machine may be shared: take the better of the matmul rates measured around the run.
  peak = max(peak, matmul_flops_per_s(n=matmul_n, dtype=dtype))
  return {"model": name, "tokens": tokens, "batch": batch, "images_per_s": batch / best,
          "flops_fraction": flops / best / peak, "compile_s": compile_s,
          "peak_rss_mb": peak_rss_mb(), "peak_device_memory_mb": peak_device_memory_mb(),
          "seconds_per_call": best, "cache_attention": sampler.cache_attention,
          "gflops_per_call": flops / 1e9, "matmul_gflop_per_s": peak / 1e9, "dtype": dtype_name,
          "group_size": cfg.group_size, "cfg_scale": 1.5,
          "device": str(jax.devices()[0].device_kind)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--cache-attention", choices=["chunked", "whole"], default=None,
                      help="Sampler cache-attention variant (default: the backend's)")
  parser.add_argument("--single", default=None, help=argparse.SUPPRESS)  # "tokens,batch" child
  args = parser.parse_args(argv)
  repeats = args.repeats or 1

  if args.single:
    tokens, batch = (int(v) for v in args.single.split(","))
    print(json.dumps(one_run(args.quick, tokens, batch, args.dtype, repeats,
                             cache_attention=args.cache_attention)))
    return

  runs = []
  for batch in BATCHES:
    for tokens in TOKENS:
      cmd = [sys.executable, "-m", "benchmarks.sampling", "--single", f"{tokens},{batch}",
             "--dtype", args.dtype, "--repeats", str(repeats)] + (["--quick"] if args.quick else [])
      if args.cache_attention:
        cmd += ["--cache-attention", args.cache_attention]
      out = subprocess.run(cmd, check=True, capture_output=True, text=True)
      runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
      print(f"{runs[-1]['model']} tokens={tokens} batch={batch}: "
            f"{runs[-1]['images_per_s']:.2f} images/s", file=sys.stderr, flush=True)
  by_batch = {}
  for batch in BATCHES:
    t = {r["tokens"]: r["seconds_per_call"] for r in runs if r["batch"] == batch}
    by_batch[str(batch)] = t[512] / t[128]
  print(json.dumps({"runs": runs, "time_ratio_512_over_128": by_batch[str(max(BATCHES))],
                    "time_ratio_512_over_128_by_batch": by_batch, "quick": args.quick,
                    "dtype": args.dtype}))


if __name__ == "__main__":
  main()
