"""`python -m detailflow_jax.reconstruct`: coarse-to-fine reconstructions as a PNG strip.

Each image is center-cropped to the tokenizer's resolution, encoded once, and decoded from its
first t tokens at the resolution those t tokens stand for; one row per image, one column per t
(after the input), coarse decodes shown enlarged with nearest-neighbour so their pixels stay
visible.
"""
import argparse
import sys
import time

import numpy as np

from .cli import add_compile_cache_flags, command, int_list, use_compile_cache
from .inference import images as image_io
from .inference.images import enlarge_nearest
from .weights.hub import add_model_flags, cache_root


@command
def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m detailflow_jax.reconstruct", description=__doc__)
  add_model_flags(parser, "tokenizer", "--tokenizer", "--weights")
  parser.add_argument("--images", nargs="+", required=True, help="image files (PNG/JPEG)")
  parser.add_argument("--num-tokens", default=None,
                      help="comma-separated token counts (default: every group boundary)")
  parser.add_argument("--out", default="reconstruction.png", help="strip PNG to write")
  parser.add_argument("--save-indices", default=None, help=".npy of int32 indices [B, T]")
  parser.add_argument("--save-pixels", default=None,
                      help=".npz of float32 NHWC decodes before clipping, keys t{t}")
  parser.add_argument("--no-enlarge", action="store_true",
                      help="show partial decodes at their own size instead of enlarged")
  add_compile_cache_flags(parser)
  args = parser.parse_args(argv)
  use_compile_cache(args, cache_root())

  from .inference.tokenizer import TokenizerFns
  from .weights.load import load_tokenizer

  model = load_tokenizer(args.tokenizer, weights=args.weights)
  fns = TokenizerFns(model)
  size, max_tokens = model.config.image_size, model.config.num_latent_tokens
  ts = (int_list(args.num_tokens, "--num-tokens", low=1, high=max_tokens) if args.num_tokens
        else list(fns.schedule.token_list))
  batch = np.stack([image_io.load_image(p, size) for p in args.images])

  start = time.time()
  indices, _ = fns.encode(batch)
  indices = np.asarray(indices)
  print(f"encoded {len(batch)} image(s) into {indices.shape[1]} tokens "
        f"({time.time() - start:.1f}s incl. compile)", flush=True)
  decodes = {}
  for i, t in enumerate(ts):
    decodes[t] = np.asarray(fns.decode(indices, t), dtype=np.float32)
    print(f"[{i + 1}/{len(ts)}] t={t}: {decodes[t].shape[1]}px", flush=True)

  show = (lambda x: x) if args.no_enlarge else (lambda x: enlarge_nearest(x, size))
  rows = [[batch[b]] + [show(decodes[t][b]) for t in ts] for b in range(len(batch))]
  out = image_io.save_grid(args.out, rows)
  print(f"wrote {out} (columns: input, t = {', '.join(map(str, ts))})")
  if args.save_indices:
    np.save(args.save_indices, indices.astype(np.int32))
    print(f"wrote {args.save_indices}")
  if args.save_pixels:
    np.savez(args.save_pixels, **{f"t{t}": v for t, v in decodes.items()})
    print(f"wrote {args.save_pixels}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
