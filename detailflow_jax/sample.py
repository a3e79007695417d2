"""`python -m detailflow_jax.sample`: class-conditional images from a GPT + tokenizer.

Each of --tokenizer / --gpt is a converted directory, a released run directory, or a Hub id
(`python -m detailflow_jax.sample --tokenizer ByteFlow-AI/DetailFlow-16 --gpt
ByteFlow-AI/DetailFlow-16-GPT-L --labels 207,360 --out grid.png` downloads, converts and caches
both on first use; see detailflow_jax/weights/hub.py).

Samples one token sequence per label with the KV-cache sampler, decodes each with the tokenizer
at the resolution its tokens stand for, and writes a PNG grid. `--progressive` also writes, per
image, the decode after the causal prefix tokens and after every group: the coarse-to-fine
sequence the model generated, shown enlarged (nearest neighbour) to the full size.
"""
import argparse
import sys
import time

import numpy as np

from .cli import add_compile_cache_flags, command, int_list, use_compile_cache
from .inference import images as image_io
from .weights.hub import add_model_flags, cache_root


@command
def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m detailflow_jax.sample", description=__doc__)
  add_model_flags(parser, "tokenizer", "--tokenizer", "--tokenizer-weights")
  add_model_flags(parser, "GPT", "--gpt", "--gpt-weights")
  parser.add_argument("--labels", required=True, help="comma-separated class ids, one image each")
  parser.add_argument("--cfg-scale", type=float, default=1.5,
                      help="classifier-free guidance scale (> 1 enables guidance)")
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top-k", type=int, default=0, help="0 = no top-k filtering")
  parser.add_argument("--top-p", type=float, default=1.0, help="1.0 = no nucleus filtering")
  parser.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--row-keys", action="store_true",
                      help="one key per image, jax.random.split(key(seed), images): each image "
                           "depends only on its seed, label and place, not on the batch (the app's "
                           "keys; its command lines use this)")
  parser.add_argument("--gradual-cfg", action="store_true",
                      help="guidance decays over groups: scale * (G - i + 1) / (G + 1)")
  parser.add_argument("--cfg-interval", type=int, default=-1,
                      help="decode steps after this one use the conditional logits only (-1 = never)")
  parser.add_argument("--num-tokens", type=int, default=None,
                      help="token budget (default: all); fewer tokens give a coarser image")
  parser.add_argument("--out", default="samples.png", help="grid PNG to write")
  parser.add_argument("--save-tokens", default=None, help=".npy of int32 tokens [batch, tokens]")
  parser.add_argument("--progressive", default=None,
                      help="PNG strip per image (one row each): the decode after every group")
  parser.add_argument("--per-row", type=int, default=8, help="images per grid row")
  parser.add_argument("--weights-dtype", choices=["float32", "bfloat16"], default="float32",
                      help="GPT matmul weights: float32 (the parity path) or bfloat16 (weight-only: "
                           "half the bytes per step, float32 activations and logits; "
                           "docs/latency.md)")
  add_compile_cache_flags(parser)
  args = parser.parse_args(argv)
  use_compile_cache(args, cache_root())

  import jax

  from .inference.sampler import Sampler, SamplingOptions
  from .inference.tokenizer import TokenizerFns
  from .weights.load import load_gpt, load_tokenizer

  start = time.time()
  gpt = load_gpt(args.gpt, weights=args.gpt_weights)
  tokenizer = load_tokenizer(args.tokenizer, weights=args.tokenizer_weights)
  cfg = gpt.config
  labels = int_list(args.labels, "--labels", low=0, high=cfg.num_classes - 1)
  if cfg.vocab_size != tokenizer.config.codebook_size:
    raise ValueError(f"GPT vocabulary ({cfg.vocab_size}) does not match the tokenizer codebook "
                     f"({tokenizer.config.codebook_size})")
  if cfg.block_size > tokenizer.config.num_latent_tokens:
    raise ValueError(f"GPT block_size {cfg.block_size} exceeds the tokenizer's "
                     f"{tokenizer.config.num_latent_tokens} tokens")
  num_tokens = cfg.block_size if args.num_tokens is None else args.num_tokens
  if not 1 <= num_tokens <= cfg.block_size:
    raise ValueError(f"--num-tokens must be in [1, {cfg.block_size}], got {num_tokens}")
  options = SamplingOptions(cfg_scale=args.cfg_scale, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, greedy=args.greedy,
                            gradual_cfg=args.gradual_cfg, cfg_interval=args.cfg_interval)
  print(f"loaded GPT ({cfg.n_layer} layers, dim {cfg.dim}, {cfg.block_size} tokens, group "
        f"{cfg.group_size}) and tokenizer in {time.time() - start:.1f}s", flush=True)

  sampler = Sampler(gpt, weights_dtype=args.weights_dtype)
  params = sampler.prepare_weights(gpt)
  start = time.time()
  key = jax.random.key(args.seed)
  if args.row_keys:
    key = jax.random.split(key, len(labels))
  tokens = sampler.sample(params, np.asarray(labels), key, options, num_tokens=num_tokens)
  tokens = np.asarray(jax.block_until_ready(tokens))
  print(f"sampled {len(labels)} x {num_tokens} tokens in {time.time() - start:.1f}s "
        f"(incl. compile; cfg {args.cfg_scale}{', greedy' if args.greedy else ''}, "
        f"{args.weights_dtype} weights)", flush=True)
  if args.save_tokens:
    np.save(args.save_tokens, tokens.astype(np.int32))
    print(f"wrote {args.save_tokens}")

  fns = TokenizerFns(tokenizer)
  start = time.time()
  decoded = np.asarray(fns.decode(tokens, num_tokens), dtype=np.float32)
  print(f"decoded at {decoded.shape[1]}px in {time.time() - start:.1f}s", flush=True)
  per_row = max(1, args.per_row)
  rows = [list(decoded[i:i + per_row]) for i in range(0, len(decoded), per_row)]
  out = image_io.save_grid(args.out, rows)
  print(f"wrote {out}")

  if args.progressive:
    counts = image_io.coarse_to_fine_counts(fns.schedule.token_list, num_tokens)
    start = time.time()
    strips = image_io.coarse_to_fine_strips(lambda t: fns.decode(tokens, t), counts,
                                            tokenizer.config.image_size)
    out = image_io.save_grid(args.progressive, strips)
    print(f"wrote {out} in {time.time() - start:.1f}s (columns: t = {', '.join(map(str, counts))})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
