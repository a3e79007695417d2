"""Tokenizer train-step throughput: one DetailFlow-16-sized step, everything on.

python -m benchmarks.tokenizer_train_step [--quick] [--batch N]  ->  one JSON object:
  images_per_s, flops_fraction (XLA's FLOP count of the compiled step per second, over a jitted
  float32 matmul measured in the same run), step_s, compile_s, peak_rss_mb and the details.

The step is the full recipe after disc_start: the SigLIP2 encoder (12 so400m layers) run twice
(self-correction), the 768-wide decoder on both halves, the global-token loss through the frozen
27-layer SigLIP2 teacher, LPIPS (VGG16) and the DINO discriminator (generator and discriminator
updates, DiffAugment, LeCam, consistency). Weights are random; float32 (the fast dtype on CPU).
--quick: the same step with the tiny config's towers and small frozen networks (< 2 minutes).
"""
import argparse
import json
import time


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--steps", type=int, default=None)
  args = parser.parse_args(argv)
  print(json.dumps(measure(args.quick, args.batch, args.steps)))


def measure(quick: bool, batch=None, steps=None, compute_dtype: str = "float32",
            matmul_n: int = 2048) -> dict:
  """One JSON-able dict of the step's figures (the roofline is measured in compute_dtype)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from benchmarks.common import compiled_flops, matmul_flops_per_s, peak_rss_mb
  from configs.detailflow16_tokenizer import get_config
  from detailflow_jax import sharding
  from detailflow_jax.models.tokenizer import Tokenizer, TokenizerConfig
  from detailflow_jax.train import frozen_nets
  from detailflow_jax.train import tokenizer as recipe

  c = get_config("tiny" if quick else "")
  batch = batch or (4 if quick else 2)
  steps = steps or (3 if quick else 2)
  c.data.batch_size = batch
  c.compute_dtype = compute_dtype
  c.losses.update(disc_start=0, perceptual_weight=1.0, disc_cr_loss_weight=4.0)
  c.disc.type = "dino"
  if quick:
    c.model.global_token_loss_weight = 1.0
    c.model.teacher = dict(hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128,
                            position_grid=4, patch_size=8)
  cfg = TokenizerConfig.from_dict(c.model)
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  tokenizer = Tokenizer(cfg, rngs=0)
  small = quick  # reduced-width VGG16 / DINO for --quick
  tx, disc_tx = recipe.make_optimizers(c, 1000)
  trainer = recipe.TokenizerTrainer(
      tokenizer, recipe.loss_config_from(c), tx, mesh, disc_tx=disc_tx,
      perceptual=frozen_nets.random_perceptual(small),
      discriminator=frozen_nets.random_discriminator(c, small))
  state = trainer.init_state()
  size, m = cfg.image_size, cfg.num_latent_tokens
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  batch_dict = {"image": images, "target": images, "t": np.int32(m), "max_tokens": np.int32(m),
                "decode_res": np.int32(size), "noise_idx": np.int32(cfg.causal_len + cfg.group_size)}

  start = time.perf_counter()
  compiled = trainer.compiled(state, batch_dict)
  compile_s = time.perf_counter() - start
  flops = compiled_flops(compiled)
  state, metrics = trainer.step(state, batch_dict)  # warm-up through the same program
  jax.block_until_ready(metrics)
  best = float("inf")
  for i in range(steps):
    start = time.perf_counter()
    state, metrics = trainer.step(state, batch_dict)
    jax.block_until_ready(metrics)
    best = min(best, time.perf_counter() - start)
  assert trainer.num_programs == 1, "the step recompiled"
  matmul = matmul_flops_per_s(n=matmul_n, dtype=jnp.dtype(compute_dtype))
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree)) / 1e6
  return {
      "images_per_s": batch / best, "flops_fraction": flops / best / matmul, "step_s": best,
      "compile_s": compile_s, "peak_rss_mb": peak_rss_mb(), "batch": batch, "image_size": size,
      "num_tokens": m, "gflops_per_step": flops / 1e9, "matmul_gflop_per_s": matmul / 1e9,
      "trainable_params_m": count(state.params), "disc_params_m": count(state.disc_params),
      "frozen_params_m": count(trainer.frozen), "quick": quick, "compute_dtype": compute_dtype,
      "loss": float(metrics["loss"]), "device": str(jax.devices()[0].device_kind)}


if __name__ == "__main__":
  main()
