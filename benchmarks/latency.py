"""Batch-1 sampling latency against the weight-streaming bound, side by side with the reference.

python -m benchmarks.latency [--quick] [--reference-dir DIR --reference-python PY]
  ->  one JSON object. Top level: the headline run (GPT-B, 128 tokens, batch 1, CFG 1.5,
      float32 weights): seconds_per_image, ms_per_step, weight_bytes_per_step, read_gb_per_s,
      bandwidth_fraction, reference_seconds_per_image, speedup; then `bfloat16` (the same keys
      for the headline run with --weights-dtype bfloat16), `runs` (every model x weights dtype
      x batch), `quality` (bf16 vs float32 weights per model), targets, load averages.

At batch 1 a step reads every matmul kernel to make a handful of rows, so its floor is the
bytes of weights it reads (`weight_bytes_per_step`: kernels and norm gains; embedding rows are
gathered, not streamed) over the machine's read bandwidth (`read_gb_per_s`, measured in the
same run, between rounds: the best of a jitted sum and a one-row matmul over a 400 MB array).
`bandwidth_fraction` = that floor over the measured step time (1.0 = at the bound).
`ms_per_step` = seconds per call / steps per call (causal_num single-token steps, then one step
per group). `seconds_per_image` = seconds per call / batch.

Both sides run the same random weights (the reference worker, benchmarks/reference_worker.py,
builds its GPT with seeded weights and writes a run directory that our converter reads), in
float32, one call at a time, rounds alternating which side goes first so drifting machine load
hits both; `speedup` = the reference's median seconds per image / ours, per round and of the
medians. The reference runs batch 1 only (its generate_group_par re-runs the whole prefix per
step). Without --reference-dir / --reference-python the reference keys are null.

quality (GPT per model, random weights): `greedy_token_agreement`, the fraction of greedy
tokens (CFG 1.5, 8 labels) a bf16-weights sampler draws identically to the float32 one
(free-running: one early difference changes every later token); `teacher_forced_argmax_
agreement` and `max_logit_diff`, both on the float32 run's tokens fed to both (the guided
logits each position is drawn from).

--quick: GPT-B only, batch 1, 2 rounds (a few minutes on 2 CPU cores). Full: GPT-B and GPT-L,
batches 1, 2, 4, 3 rounds.
"""
import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import add_side_by_side_flags  # noqa: E402
from benchmarks.vs_reference import Worker, checkpoint_in  # noqa: E402
from detailflow_jax.convert import gpt as gpt_convert  # noqa: E402
from detailflow_jax.convert.common import load_state_dict  # noqa: E402
from detailflow_jax.inference.sampler import (  # noqa: E402
    KERNEL_LAYOUTS,
    WEIGHTS_DTYPES,
    Sampler,
    SamplingOptions,
    default_kernel_layout,
    weight_bytes_per_step,
)
from detailflow_jax.models.gpt import GPTConfig  # noqa: E402
from detailflow_jax.models.keys import InitKeys  # noqa: E402

TARGETS = {"speedup_float32": 6.0, "speedup_bfloat16": 10.0, "bandwidth_fraction_float32": 0.8}
COMMON = dict(tokens=128, vocab_size=8192, group_size=8, num_classes=1000, cfg_scale=1.5, seed=0)
BANDWIDTH_BYTES = 400 * 2 ** 20


def log(*parts):
  print("latency:", *parts, file=sys.stderr, flush=True)


def steps_per_call(cfg: GPTConfig, tokens: int) -> int:
  """Network passes of one sampling call: causal_len single-token steps, then one per group."""
  c, g = cfg.causal_len, cfg.group_size
  return min(tokens, c) + max(0, -(-tokens // g) - c // g)


def read_bandwidth() -> dict:
  """GB/s at which this process streams a 400 MB float32 array: a jitted sum and a one-row
  matmul (the batch-1 step's own access pattern), best of 3 each."""
  n = BANDWIDTH_BYTES // 4
  x = jnp.ones((n,), jnp.float32)
  w = x.reshape(-1, 1024)
  v = jnp.ones((1, w.shape[0]), jnp.float32)
  total = jax.jit(jnp.sum)
  gemv = jax.jit(lambda v, w: v @ w)
  rates = {}
  for name, fn, args in (("sum", total, (x,)), ("gemv", gemv, (v, w))):
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(3):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      best = min(best, time.perf_counter() - start)
    rates[name] = BANDWIDTH_BYTES / best / 1e9
  return rates


def random_reference_like_gpt(cfg: GPTConfig, seed: int):
  """Our GPT with the reference worker's kind of random weights (norm gains 1, the rest
  N(0, 0.02)), for runs without the reference."""
  from detailflow_jax.models.gpt import GPT
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=InitKeys(0))))
  rng = np.random.default_rng(seed)
  flat = []
  for path, var in nnx.to_flat_state(abstract):
    value = (np.ones(var.shape, np.float32) if path[-1] == "weight"
             else (rng.standard_normal(var.shape, np.float32) * 0.02))
    flat.append((path, var.replace(jnp.asarray(value))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


class OurModel:
  """One GPT, a sampler per weights dtype (the backend's default kernel layout; with
  `layouts`, one per (dtype, layout) too), precompiled per batch."""

  def __init__(self, name: str, gpt, batches, dtypes, layouts=()):
    self.name, self.cfg = name, gpt.config
    self.labels = {b: np.arange(b) % self.cfg.num_classes for b in batches}
    self.options = SamplingOptions(cfg_scale=COMMON["cfg_scale"])
    self.samplers, self.params, self.compile_s = {}, {}, {}
    params = nnx.state(gpt)
    variants = [(dtype, None) for dtype in dtypes] + [(d, k) for d in dtypes for k in layouts]
    for dtype, layout in variants:
      sampler = Sampler(gpt, weights_dtype=dtype, kernel_layout=layout)
      key = dtype if layout is None else (dtype, layout)
      self.samplers[key] = sampler
      self.params[key] = jax.block_until_ready(sampler.prepare_weights(params))
      for b in batches:
        start = time.perf_counter()
        sampler.precompile(self.params[key], self.labels[b], self.options)
        self.compile_s[(key, b)] = time.perf_counter() - start
        self.call(key, b, 0)  # untimed: first-call allocations are not the rate
    self.steps = steps_per_call(self.cfg, COMMON["tokens"])

  def call(self, key, batch: int, round_: int) -> float:
    """Seconds of one call of the sampler `key` (a weights dtype, or (dtype, kernel layout))."""
    start = time.perf_counter()
    jax.block_until_ready(self.samplers[key].sample(
        self.params[key], self.labels[batch], jax.random.key(round_), self.options,
        num_tokens=COMMON["tokens"]))
    return time.perf_counter() - start

  def quality(self) -> dict:
    """bf16 weights vs float32 on greedy sampling (see the module docstring)."""
    labels = np.arange(8) * 97 % self.cfg.num_classes
    greedy = SamplingOptions(cfg_scale=COMMON["cfg_scale"], greedy=True)
    s32, s16 = self.samplers["float32"], self.samplers["bfloat16"]
    t32 = s32.sample(self.params["float32"], labels, jax.random.key(0), greedy)
    t16 = s16.sample(self.params["bfloat16"], labels, jax.random.key(0), greedy)
    l32 = s32.cached_logits(self.params["float32"], labels, t32, greedy)
    l16 = s16.cached_logits(self.params["bfloat16"], labels, t32, greedy)
    return {"greedy_token_agreement": float(jnp.mean(t32 == t16)),
            "teacher_forced_argmax_agreement": float(jnp.mean(l32.argmax(-1) == l16.argmax(-1))),
            "max_logit_diff": float(jnp.max(jnp.abs(l32 - l16))),
            "max_abs_logit": float(jnp.max(jnp.abs(l32))), "labels": labels.tolist()}


def model_config(name: str) -> GPTConfig:
  return GPTConfig.preset(name, vocab_size=COMMON["vocab_size"], block_size=COMMON["tokens"],
                          group_size=COMMON["group_size"], num_classes=COMMON["num_classes"])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_side_by_side_flags(parser)
  parser.add_argument("--models", default=None, help="comma-separated GPT presets "
                      "(default: GPT-B with --quick, else GPT-B,GPT-L)")
  parser.add_argument("--batches", default=None, help="comma-separated (default 1; full: 1,2,4)")
  parser.add_argument("--compare-kernel-layouts", action="store_true",
                      help="also time every kernel layout (KERNEL_LAYOUTS) per dtype and batch in the same "
                           "rounds: `kernel_layouts` in the output (the evidence for KERNEL_LAYOUT_DEFAULTS)")
  args = parser.parse_args(argv)

  models = (args.models or ("GPT-B" if args.quick else "GPT-B,GPT-L")).split(",")
  batches = [int(b) for b in (args.batches or ("1" if args.quick else "1,2,4")).split(",")]
  if 1 not in batches:
    raise SystemExit("--batches must include 1 (the headline and the reference run batch 1)")
  rounds = args.rounds or (2 if args.quick else 3)
  dtypes = list(WEIGHTS_DTYPES)
  with_reference = bool(args.reference_dir and args.reference_python)
  if with_reference:
    ref_dir = pathlib.Path(args.reference_dir)
    if not (ref_dir / "autoregressive" / "models" / "generate.py").is_file():
      raise SystemExit(f"{ref_dir} is not a DetailFlow tree (no autoregressive/models/generate.py)")
    if not os.access(args.reference_python, os.X_OK):
      raise SystemExit(f"reference python {args.reference_python} is not an executable")

  times = {}  # (model, dtype, batch) or (model, "reference") -> seconds per call, per round
  bandwidth = []
  quality, compile_s, weight_bytes, ref_ready = {}, {}, {}, {}
  loads = [os.getloadavg()]
  with tempfile.TemporaryDirectory(prefix="latency_") as tmp:
    for name in models:
      cfg = model_config(name)
      ref = None
      if with_reference:
        spec = {"sampler": dict(COMMON, gpt_model=name, batch=1)}
        run_dir = pathlib.Path(tmp) / name
        log(f"building the reference {name}")
        ref = Worker("reference", [args.reference_python, str(ROOT / "benchmarks" / "reference_worker.py"),
                                   "--reference-dir", str(ref_dir), "--out", str(run_dir),
                                   "--spec", json.dumps(spec)])
        ref_ready = ref.ready
        ckpt = checkpoint_in(run_dir / "gpt")
        gpt = gpt_convert.convert_state_dict(gpt_convert.load_reference_config(run_dir / "gpt"),
                                             load_state_dict(ckpt), str(ckpt))
      else:
        gpt = random_reference_like_gpt(cfg, COMMON["seed"])
      try:
        log(f"compiling ours ({name}, batches {batches})")
        layouts = KERNEL_LAYOUTS if args.compare_kernel_layouts else ()
        ours = OurModel(name, gpt, batches, dtypes, layouts)
        del gpt
        for (key, b), seconds in ours.compile_s.items():
          compile_s[f"{name}/{'/'.join(key) if isinstance(key, tuple) else key}/batch{b}"] = seconds
        for dtype in dtypes:
          weight_bytes[(name, dtype)] = weight_bytes_per_step(ours.params[dtype])
        if ref is not None:
          ref.ask("sampler")  # untimed warm-up
        for r in range(rounds):
          ours_first = r % 2 == 1
          sides = ["ours", "reference"] if ours_first else ["reference", "ours"]
          for side in sides:
            if side == "reference" and ref is not None:
              times.setdefault((name, "reference"), []).append(ref.ask("sampler")["seconds"])
            elif side == "ours":
              for key in ours.samplers:
                for b in batches:
                  times.setdefault((name, key, b), []).append(ours.call(key, b, r + 1))
          bandwidth.append(read_bandwidth())
          loads.append(os.getloadavg())
          log(f"{name} round {r + 1}/{rounds} done")
        quality[name] = ours.quality()
        steps = ours.steps
        del ours
      finally:
        if ref is not None:
          ref.close()
      times[(name, "steps")] = steps

  read_gb_per_s = max(max(b.values()) for b in bandwidth)

  def summary(name: str, dtype: str, batch: int) -> dict:
    ts = times[(name, dtype, batch)]
    steps = times[(name, "steps")]
    med = statistics.median(ts)
    ms_per_step = 1e3 * med / steps
    nbytes = weight_bytes[(name, dtype)]
    out = {"model": name, "weights_dtype": dtype, "batch": batch, "tokens": COMMON["tokens"],
           "steps_per_call": steps, "seconds_per_call": ts, "seconds_per_image": med / batch,
           "ms_per_step": ms_per_step, "weight_bytes_per_step": nbytes,
           "read_gb_per_s": read_gb_per_s,
           "bandwidth_fraction": nbytes / (ms_per_step / 1e3) / (read_gb_per_s * 1e9),
           "reference_seconds_per_image": None, "speedup": None}
    ref_ts = times.get((name, "reference"))
    if ref_ts:
      out["reference_seconds_per_call"] = ref_ts
      out["reference_seconds_per_image"] = statistics.median(ref_ts)
      # Per image: the reference runs batch 1, so a batch of b images costs it b calls.
      out["speedup"] = out["reference_seconds_per_image"] / out["seconds_per_image"]
      if batch == 1:
        out["speedup_per_round"] = [a / b for a, b in zip(ref_ts, ts)]
    return out

  runs = [summary(name, dtype, b) for name in models for dtype in dtypes for b in batches]
  kernel_layouts = [
      {"model": name, "weights_dtype": dtype, "batch": b,
       **{f"{layout}_seconds_per_image": statistics.median(times[(name, (dtype, layout), b)]) / b
          for layout in KERNEL_LAYOUTS},
       "contracted_last_speedup": statistics.median(times[(name, (dtype, "as_stored"), b)])
       / statistics.median(times[(name, (dtype, "contracted_last"), b)])}
      for name in models for dtype in dtypes for b in batches if (name, (dtype, "as_stored"), b) in times]
  head = models[0]
  result = summary(head, "float32", 1)
  result["bfloat16"] = summary(head, "bfloat16", 1)
  result.update(
      runs=runs, kernel_layout={d: default_kernel_layout(d) for d in dtypes}, kernel_layouts=kernel_layouts or None,
      quality=quality, rounds=rounds, quick=args.quick, targets=TARGETS,
      meets_targets=None if result["speedup"] is None else {
          "speedup_float32": result["speedup"] >= TARGETS["speedup_float32"],
          "speedup_bfloat16": result["bfloat16"]["speedup"] >= TARGETS["speedup_bfloat16"],
          "bandwidth_fraction_float32":
              result["bandwidth_fraction"] >= TARGETS["bandwidth_fraction_float32"]},
      read_bandwidth_per_round=bandwidth, compile_s=compile_s, loadavg=loads,
      cpu_count=os.cpu_count(), jax=jax.__version__, backend=jax.default_backend(),
      device=str(jax.devices()[0].device_kind), torch=ref_ready.get("torch"),
      torch_threads=ref_ready.get("threads"), workload=dict(COMMON, models=models, batches=batches),
      date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
      note="ratios are the reference's median seconds per image / ours within this run")
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
