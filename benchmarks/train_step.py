"""AR train-step throughput: GPT-B-sized DetailFlow GPT (128 tokens, group 8), random tokens.

python -m benchmarks.train_step [--quick]  ->  one JSON object:
  tokens_per_s (1 CPU device), flops_fraction (achieved FLOP/s over a jitted matmul measured in
  the same run), tokens_per_s_8_devices (same step on 8 forced CPU devices, mesh data=8, measured
  in a child process because the device count is fixed at start-up), and the details.
--quick: a 4-layer 256-wide model, finishes in well under 2 minutes on 2 cores.
"""
import argparse
import json
import os
import subprocess
import sys
import time


def measure(quick: bool, devices: int, batch: int, steps: int, compute_dtype: str = "float32",
            preset: str = "gpt_b", matmul_n: int = 2048):
  import jax
  import jax.numpy as jnp

  from benchmarks.common import matmul_flops_per_s, peak_rss_mb
  from configs.detailflow16_gpt_l import get_config
  from detailflow_jax import sharding
  from detailflow_jax.models.gpt import GPT
  from detailflow_jax.train import ar
  from detailflow_jax.train.optim import make_optimizer
  from detailflow_jax.train.state import create_train_state, make_train_step

  c = get_config(preset)
  if quick:
    c.model.update(preset="", dim=256, n_layer=4, n_head=4)
  c.data.batch_size = batch
  cfg = ar.gpt_config_from(c)
  mesh = sharding.make_mesh(devices, 1, 1, devices=jax.devices()[:devices])
  tx = make_optimizer(1e-4, 1000, warmup_steps=10)
  graphdef, state, shardings = create_train_state(lambda: GPT(cfg, rngs=0), tx, mesh)
  # float32 compute by default: on CPU bf16 matmuls are no faster; the roofline below is
  # measured in the compute dtype.
  dtype = jnp.dtype(compute_dtype)
  step = make_train_step(graphdef, ar.make_loss(cfg, 0.3, dtype),
                         tx, shardings, mesh)
  tokens = jax.random.randint(jax.random.key(0), (batch, cfg.block_size, 3), 0, cfg.vocab_size)
  batch_arrays = {"tokens": tokens, "labels": jnp.arange(batch) % cfg.num_classes}
  start = time.perf_counter()
  state, metrics = step(state, batch_arrays)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch_arrays)
  jax.block_until_ready(metrics)
  per_step = (time.perf_counter() - start) / steps
  out = {"tokens_per_s": batch * cfg.block_size / per_step, "step_s": per_step, "compile_s": compile_s,
         "peak_rss_mb": peak_rss_mb(), "params_m": sum(x.size for x in jax.tree.leaves(state.params)) / 1e6}
  if devices == 1:
    flops = _step_flops(graphdef, cfg, c, tx, state, batch_arrays)
    matmul = matmul_flops_per_s(n=matmul_n, dtype=dtype)
    out.update(flops_per_step=flops, matmul_gflop_per_s=matmul / 1e9,
               flops_fraction=flops / per_step / matmul)
  return out


def _step_flops(graphdef, cfg, c, tx, state, batch):
  """XLA's FLOP count of one unsharded train step (forward, backward, optimizer)."""
  import jax
  import optax
  from flax import nnx

  from detailflow_jax.train import ar
  loss_fn = ar.make_loss(cfg, 0.3)

  def step(params, opt_state, batch):
    def loss_of(p):
      return loss_fn(nnx.merge(graphdef, p, state.extras), batch, jax.random.key(0))[0]
    loss, grads = jax.value_and_grad(loss_of)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  from benchmarks.common import compiled_flops
  return compiled_flops(jax.jit(step).lower(state.params, state.opt_state, batch).compile())


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--child-devices", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  steps = args.steps or (3 if args.quick else 5)
  if args.child_devices:
    print("CHILD " + json.dumps(measure(args.quick, args.child_devices, args.batch, steps)), flush=True)
    return
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  one = measure(args.quick, 1, args.batch, steps)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "benchmarks.train_step", "--child-devices", "8", "--batch", str(args.batch),
         "--steps", str(steps)]
  if args.quick:
    cmd.append("--quick")
  child = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
  eight = json.loads(next(l for l in child.stdout.splitlines() if l.startswith("CHILD "))[6:])
  print(json.dumps({
      "tokens_per_s": one["tokens_per_s"], "flops_fraction": one["flops_fraction"],
      "tokens_per_s_8_devices": eight["tokens_per_s"],
      "batch": args.batch, "model": "tiny-256x4" if args.quick else "GPT-B", "block_size": 128,
      "details_1_device": one, "details_8_devices": eight, "quick": args.quick}))


if __name__ == "__main__":
  main()
