"""XLA:CPU dot paths A/B: the same sampler program compiled with each option set, timed in turns.

python -m benchmarks.xla_options [--quick] [--rounds N]
  ->  one JSON object: per workload and option set, seconds per call (every round), the median,
      and speedup = default's median / its median; `compiles` says which option sets this jaxlib
      accepted and how many library (YNNPACK / XNNPACK / oneDNN) fusions each program holds.

Option sets are XLA debug options passed to `jit(...).lower(...).compile(options)`, so every
variant lives in one process and the rounds interleave them (drifting machine load hits all
alike). The sampler streams the weights `sample` streams (`Sampler.prepare_weights`: this
backend's kernel layout). This jaxlib (0.10.2) routes dots to YNNPACK by default
(`xla_cpu_experimental_ynn_fusion_type`); "" turns that off (XLA's own dot emitter). The
XNNPACK and oneDNN fusion types and `xla_cpu_use_onednn` are accepted but, in this build,
create no fusions; `xla_cpu_enable_custom_matmul_tiling` is not an option of this jaxlib.
Workloads (random weights, float32, CFG 1.5, 128 tokens, group 8): GPT-B batch 1 and batch 8
(--quick: batch 1 only).
"""
import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

from benchmarks.latency import COMMON, model_config, random_reference_like_gpt
from detailflow_jax.inference.sampler import Sampler, SamplingOptions

OPTION_SETS = {
    "default": {},
    "ynn_off": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "ynn_dot_only": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "xnn_dot": {"xla_cpu_experimental_ynn_fusion_type": "",
                "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "onednn_dot": {"xla_cpu_experimental_ynn_fusion_type": "",
                   "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
}
LIBRARY_MARKS = ("__ynn_fusion", "__xnn_fusion", "__onednn")  # fusion kinds in backend_config


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--model", default="GPT-B")
  parser.add_argument("--batches", default=None, help="comma-separated (default 1,8; quick 1)")
  parser.add_argument("--sets", default=None,
                      help=f"comma-separated option sets (default all: {', '.join(OPTION_SETS)})")
  args = parser.parse_args(argv)
  batches = [int(b) for b in (args.batches or ("1" if args.quick else "1,8")).split(",")]
  sets = args.sets.split(",") if args.sets else list(OPTION_SETS)
  unknown = sorted(set(sets) - set(OPTION_SETS))
  if unknown or "default" not in sets:
    parser.error(f"--sets must include default and name only {', '.join(OPTION_SETS)}; got {unknown}")
  rounds = args.rounds or (2 if args.quick else 3)
  gpt = random_reference_like_gpt(model_config(args.model), COMMON["seed"])
  sampler = Sampler(gpt)
  params = sampler.prepare_weights(gpt)  # what `sample` streams: this backend's kernel layout
  options = SamplingOptions(cfg_scale=COMMON["cfg_scale"])
  result = {"model": args.model, "rounds": rounds, "compiles": {}, "workloads": {},
            "loadavg": [os.getloadavg()]}
  for batch in batches:
    labels = np.arange(batch) % gpt.config.num_classes
    key = jax.random.key(0)
    # The arguments Sampler.sample passes its jitted program (a benchmark may reach inside).
    key_data, key_impl = sampler._key(key, batch)
    call_args = (sampler._params(params), sampler._labels(labels, True), key_data,
                 options.as_arrays(), jax.numpy.int32(COMMON["tokens"]), None)
    lowered = sampler._jitted.lower(*call_args, guidance=True, record_logits=False,
                                    key_impl=key_impl)
    compiled = {}
    for name in sets:
      opts = OPTION_SETS[name]
      try:
        start = time.perf_counter()
        compiled[name] = lowered.compile(opts)
        text = compiled[name].as_text()
        result["compiles"][f"batch{batch}/{name}"] = {
            "compile_s": time.perf_counter() - start,
            **{mark: text.count(f'"kind":"{mark}') for mark in LIBRARY_MARKS}}
      except Exception as e:  # an option this jaxlib does not know: recorded, not fatal
        result["compiles"][f"batch{batch}/{name}"] = {"error": str(e)[:300]}
    reference_tokens = None
    for name, fn in compiled.items():  # warm-up, and every variant must give the same tokens
      tokens = np.asarray(jax.block_until_ready(fn(*call_args))[0])
      if reference_tokens is None:
        reference_tokens = tokens
      result["compiles"][f"batch{batch}/{name}"]["same_tokens_as_default"] = bool(
          np.array_equal(tokens, reference_tokens))
    times = {name: [] for name in compiled}
    for r in range(rounds):
      order = list(compiled) if r % 2 == 0 else list(reversed(compiled))
      for name in order:
        start = time.perf_counter()
        jax.block_until_ready(compiled[name](*call_args))
        times[name].append(time.perf_counter() - start)
      result["loadavg"].append(os.getloadavg())
    base = statistics.median(times["default"])
    result["workloads"][f"batch{batch}"] = {
        name: {"seconds": ts, "median_s": statistics.median(ts),
               "speedup": base / statistics.median(ts)} for name, ts in times.items()}
  result.update(jax=jax.__version__, backend=jax.default_backend(), cpu_count=os.cpu_count(),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
