"""Tokenizer encode/decode throughput at DetailFlow-16 size (random weights).

python -m benchmarks.tokenizer [--quick] [--batch 8]  ->  one JSON object:
  encode_images_per_s, decode_images_per_s, flops_fraction (achieved FLOP/s of encode+decode
  over a jitted matmul measured in the same run), compile_s, peak_rss_mb, and the details.
--quick: same keys, a 4-layer model and batch 2 (finishes in well under 2 minutes on 2 cores).
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import compiled_flops, matmul_flops_per_s, peak_device_memory_mb, peak_rss_mb, time_call
from detailflow_jax.convert.tokenizer import SIGLIP2_SO400M, _vit
from detailflow_jax.models.tokenizer import Tokenizer, TokenizerConfig


def detailflow16_config(layers: int = 12) -> TokenizerConfig:
  """DetailFlow-16 (128 tokens, 256 px): so400m-width encoder, siglip2_base decoder."""
  encoder = _vit(SIGLIP2_SO400M, layers=layers, patch=16)
  decoder = _vit(SIGLIP2_SO400M, layers=layers, hidden=768, heads=12, patch=16, patch_embedding=False)
  return TokenizerConfig(encoder=encoder, decoder=decoder, num_latent_tokens=128, group_size=8,
                         codebook_size=8192, codebook_embed_dim=8)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  args = parser.parse_args(argv)
  print(json.dumps(measure(args.quick, args.batch, args.dtype)))


def measure(quick: bool, batch=None, dtype_name: str = "float32", matmul_n: int = 2048,
            encode: bool = True) -> dict:
  """Encode (unless `encode=False`) and decode figures as one JSON-able dict."""
  batch = batch or (2 if quick else 8)
  layers = 4 if quick else 12
  dtype = jnp.dtype(dtype_name)

  cfg = detailflow16_config(layers)
  model = Tokenizer(cfg, rngs=0)
  if dtype != jnp.float32:
    state = nnx.state(model)
    nnx.update(model, jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state))
  graphdef, state = nnx.split(model)
  images = jax.random.uniform(jax.random.key(0), (batch, 256, 256, 3), jnp.float32, -1, 1)

  def encode_fn(state, images):
    return nnx.merge(graphdef, state).encode(images).indices

  def decode_fn(state, indices):
    return nnx.merge(graphdef, state).decode_indices(indices, image_size=256)

  start = time.perf_counter()
  indices = jax.random.randint(jax.random.key(1), (batch, cfg.num_latent_tokens), 0,
                               cfg.codebook_size)
  if encode:
    enc = jax.jit(encode_fn).lower(state, images).compile()
    indices = enc(state, images)
  dec = jax.jit(decode_fn).lower(state, indices).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(dec(state, indices))

  repeats = 2 if quick else 3
  enc_s = time_call(enc, state, images, repeats=repeats) if encode else 0.0
  dec_s = time_call(dec, state, indices, repeats=repeats)
  dec_flops = compiled_flops(dec)
  flops = (compiled_flops(enc) if encode else 0.0) + dec_flops
  peak = matmul_flops_per_s(n=matmul_n, dtype=dtype)
  result = {
      "decode_images_per_s": batch / dec_s,
      "decode_s": dec_s,
      "decode_flops_fraction": dec_flops / dec_s / peak,
      "flops_fraction": flops / (enc_s + dec_s) / peak,
      "compile_s": compile_s,
      "peak_rss_mb": peak_rss_mb(), "peak_device_memory_mb": peak_device_memory_mb(),
      "batch": batch, "layers": layers, "dtype": dtype_name, "image_size": 256,
      "num_tokens": cfg.num_latent_tokens,
      "gflops_per_image": flops / batch / 1e9,
      "matmul_gflop_per_s": peak / 1e9,
      "device": str(jax.devices()[0].device_kind), "quick": quick,
  }
  if encode:
    result["encode_images_per_s"] = batch / enc_s
  return result


if __name__ == "__main__":
  main()
