"""Memory and step-time plan for a TPU pod, by simulation: AOT-compile the real train steps.

python -m benchmarks.memory_plan [--quick] [--devices N] [--mfu F] [--out FILE]
    [--cpu-scheduler memory_optimized|default]  ->  one JSON object

The GPT-L (DetailFlow-16, 128 tokens, batch 256) and DetailFlow-16 tokenizer (batch 256 at
256 px, everything on: self-correction, global-token teacher, LPIPS, DINO discriminator with
LeCam and consistency) train steps are lowered from abstract (never allocated) sharded states
through the recipes' own step builders (train/state.make_train_step, TokenizerTrainer), in the
configs' compute dtype (bf16 autocast) and mesh ((data, fsdp, tensor) as the configs set it:
data = all devices), on N forced CPU devices (default 64, a v5e-64's chip count), once per
remat policy. Per model and policy:
  argument_bytes / output_bytes / alias_bytes / temp_bytes (per device, compiled.memory_analysis),
  total_bytes = argument + output - alias (the donated state) + temp, fits_16GiB (v5e HBM),
  residual_bytes (activations the backward keeps, from the jaxpr: what remat controls),
  flops_per_step (per device, compiled.cost_analysis of the SPMD program; x devices = global),
  step_time_s_at_mfu = flops_per_step / (peak bf16 FLOP/s of a v5e chip x MFU), devices.
XLA:CPU's buffer assignment and schedule are not TPU's: argument/output bytes are exact (they
are the sharded state and batch), temp bytes are the CPU compiler's and may differ on TPU.
The CPU compiler schedules with XLA's memory-optimised scheduler here (--cpu-scheduler,
recorded as cpu_scheduler): its default concurrency-optimised one runs independent work early
for the thread pool, recomputed (remat'ed) blocks included, so its temp bytes did not move
with the remat policy at all (DF-16 tokenizer: 16.89 GiB under none, full and save_dots);
the memory-optimised one is what a TPU's memory-aware scheduler resembles, and it compiles
about 3x faster (tiny configs: GPT temp 2.95 -> 2.71 MB (none) / 2.19 MB (full); tokenizer
20.2 -> 12.0 MB).
--quick: the tiny configs (small frozen nets) on 4 devices, same keys. Results are appended to
--out (JSON lines) as they finish; a rerun skips what is there (resumes after kill -9).
"""
import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


V5E_PEAK_BF16_FLOPS = 197e12   # per chip
HBM_BYTES = 16 * 2 ** 30       # per v5e chip
POLICIES = ("none", "full", "save_dots")
CPU_SCHEDULERS = {"memory_optimized": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
                  "default": "CPU_SCHEDULER_TYPE_DEFAULT"}


def gpt_lowered(quick: bool, policy: str, devices):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from configs.detailflow16_gpt_l import get_config
  from detailflow_jax import sharding as mesh_lib
  from detailflow_jax.models import remat
  from detailflow_jax.models.gpt import GPT
  from detailflow_jax.train import ar
  from detailflow_jax.train.optim import make_optimizer
  from detailflow_jax.train.state import create_train_state, make_train_step

  c = get_config("tiny" if quick else "")
  c.compute_dtype = "bfloat16"
  if quick:
    c.data.batch_size = 16
  c.remat = policy
  cfg = ar.gpt_config_from(c)
  mesh = mesh_lib.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=devices)
  o = c.optimizer
  tx = make_optimizer(o.lr, 1000, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                      max_grad_norm=o.max_grad_norm, warmup_steps=10)
  graphdef, state, shardings = create_train_state(lambda: GPT(cfg, rngs=0), tx, mesh, abstract=True)
  loss_fn = ar.make_loss(cfg, c.correction_prob, c.compute_dtype, c.remat)
  step = make_train_step(graphdef, loss_fn, tx, shardings, mesh, ema_decay=c.ema_decay,
                         draw=loss_fn.draw)
  b = c.data.batch_size
  batch = {"tokens": jax.ShapeDtypeStruct((b, cfg.block_size, 3), jnp.int32),
           "labels": jax.ShapeDtypeStruct((b,), jnp.int32)}

  def residuals():
    # One device's share of the batch through the same loss (params are replicated: data only).
    per = b // mesh.devices.size
    local = {"tokens": jnp.zeros((per, cfg.block_size, 3), jnp.int32), "labels": jnp.zeros((per,), jnp.int32)}
    model = nnx.eval_shape(lambda: GPT(cfg, rngs=0))
    g, params, rest = nnx.split(model, nnx.Param, ...)
    return remat.saved_residual_bytes(
        lambda p: loss_fn(nnx.merge(g, p, rest), local, jax.random.key(0))[0], params)

  info = {"model": "GPT tiny" if quick else "GPT-L", "batch": b, "tokens": cfg.block_size,
          "mesh": dict(mesh.shape)}
  return step.lower(state, batch), residuals, info


def tokenizer_lowered(quick: bool, policy: str, devices):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from configs.detailflow16_tokenizer import get_config
  from detailflow_jax import sharding as mesh_lib
  from detailflow_jax.models import remat
  from detailflow_jax.models.precision import Precision
  from detailflow_jax.models.tokenizer import Tokenizer, TokenizerConfig
  from detailflow_jax.train import frozen_nets
  from detailflow_jax.train import tokenizer as recipe

  c = get_config("tiny" if quick else "")
  c.compute_dtype = "bfloat16"
  c.losses.update(disc_start=0, perceptual_weight=1.0, disc_cr_loss_weight=4.0)
  c.disc.type = "dino"
  c.remat.update(encoder=policy, decoder=policy)
  if quick:
    c.data.batch_size = 8
    c.model.global_token_loss_weight = 1.0
    c.model.teacher = dict(hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128,
                            position_grid=4, patch_size=8)
  cfg = TokenizerConfig.from_dict(c.model)
  mesh = mesh_lib.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=devices)
  tx, disc_tx = recipe.make_optimizers(c, 1000)
  precision = Precision.named(c.compute_dtype)
  trainer = recipe.TokenizerTrainer(
      nnx.eval_shape(lambda: Tokenizer(cfg, rngs=0)), recipe.loss_config_from(c), tx, mesh,
      disc_tx=disc_tx, perceptual=nnx.eval_shape(lambda: frozen_nets.random_perceptual(quick)),
      discriminator=nnx.eval_shape(lambda: frozen_nets.random_discriminator(c, quick)),
      precision=precision, encoder_remat=policy, decoder_remat=policy)
  state = trainer.init_state(abstract=True)
  b, size, m = c.data.batch_size, cfg.image_size, cfg.num_latent_tokens
  images = jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32)
  noise_idx = cfg.causal_len + cfg.group_size
  batch = {"image": images, "target": images, "t": m, "max_tokens": m, "decode_res": size,
           "noise_idx": noise_idx}
  lowered = trainer.lower(state, batch)

  def residuals():
    # What the backward of the step's own generator loss keeps (tokenizer, teacher, LPIPS, the
    # discriminator's generator term) for one device's share of the batch. State, frozen
    # weights and images are arguments: they are abstract here (and held anyway).
    per = b // mesh.devices.size
    x = jax.ShapeDtypeStruct((per, size, size, 3), jnp.float32)
    local = {"image": x, "target": x, "noise_idx": jnp.int32(noise_idx)}
    prog = trainer.programs(batch)
    loss = lambda params, state, frozen, local: trainer.generator_loss(prog, state, frozen, local)(params)[0]
    return remat.saved_residual_bytes(loss, state.params, state, trainer.frozen, local)

  info = {"model": "tokenizer tiny" if quick else "DetailFlow-16 tokenizer", "batch": b,
          "image_size": size, "tokens": m, "mesh": dict(mesh.shape)}
  return lowered, residuals, info


def measure(name: str, quick: bool, policy: str, num_devices: int, mfu: float) -> dict:
  import jax

  from benchmarks.common import compiled_flops
  devices = jax.devices()[:num_devices]
  build = {"gpt": gpt_lowered, "tokenizer": tokenizer_lowered}[name]
  start = time.perf_counter()
  lowered, residuals, info = build(quick, policy, devices)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  flops = compiled_flops(compiled)
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes)
  return dict(info, policy=policy, devices=num_devices,
              argument_bytes=int(mem.argument_size_in_bytes),
              output_bytes=int(mem.output_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
              temp_bytes=int(mem.temp_size_in_bytes), total_bytes=int(total),
              total_gib=total / 2 ** 30, fits_16GiB=bool(total <= HBM_BYTES),
              residual_bytes=residuals(), flops_per_step=flops,
              global_flops_per_step=flops * num_devices,
              step_time_s_at_mfu=flops / (V5E_PEAK_BF16_FLOPS * mfu), mfu=mfu,
              compile_s=compile_s)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--devices", type=int, default=None, help="forced CPU devices (64; quick 4)")
  parser.add_argument("--mfu", type=float, default=0.4, help="MFU the step times assume")
  parser.add_argument("--models", default="gpt,tokenizer")
  parser.add_argument("--policies", default=",".join(POLICIES))
  parser.add_argument("--out", default=None, help="JSON-lines file of finished entries (resume)")
  parser.add_argument("--cpu-scheduler", default="memory_optimized", choices=sorted(CPU_SCHEDULERS),
                      help="XLA:CPU's instruction scheduler (see the module docstring)")
  args = parser.parse_args(argv)
  devices = args.devices or (4 if args.quick else 64)
  # The device count is fixed when jax starts: set it before the first import of jax.
  if "jax" in sys.modules:
    raise RuntimeError("memory_plan.main must run before jax is imported (it forces the CPU device count)")
  os.environ["JAX_PLATFORMS"] = "cpu"
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_scheduler_type" in flags:
    raise ValueError("XLA_FLAGS sets xla_cpu_scheduler_type: choose it with --cpu-scheduler")
  os.environ["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count={devices} "
                             f"--xla_cpu_scheduler_type={CPU_SCHEDULERS[args.cpu_scheduler]}").strip()
  done = {}
  out = pathlib.Path(args.out) if args.out else None
  if out is not None and out.exists():
    for line in out.read_text().splitlines():
      if line.strip():
        entry = json.loads(line)
        done[(entry["name"], entry["policy"])] = entry
  todo = [(m, p) for m in args.models.split(",") for p in args.policies.split(",")]
  results = {}
  start = time.perf_counter()
  for i, (model, policy) in enumerate(todo):
    previous = done.get((model, policy), {})
    if previous.get("devices") == devices and previous.get("cpu_scheduler") == args.cpu_scheduler:
      entry = previous
    else:
      entry = dict(measure(model, args.quick, policy, devices, args.mfu), name=model,
                   cpu_scheduler=args.cpu_scheduler)
      if out is not None:
        with out.open("a") as f:
          f.write(json.dumps(entry) + "\n")
    results.setdefault(model, {})[policy] = entry
    elapsed = time.perf_counter() - start
    print(f"[{i + 1}/{len(todo)}] {model} {policy}: {entry['total_gib']:.2f} GiB/device, "
          f"compile {entry['compile_s']:.0f} s; elapsed {elapsed:.0f} s, "
          f"ETA {elapsed / (i + 1) * (len(todo) - i - 1):.0f} s", file=sys.stderr, flush=True)
  print(json.dumps({"devices": devices, "mfu": args.mfu, "cpu_scheduler": args.cpu_scheduler,
                    "peak_flops_per_chip": V5E_PEAK_BF16_FLOPS,
                    "hbm_bytes_per_chip": HBM_BYTES, "quick": args.quick, "results": results}))


if __name__ == "__main__":
  main()
