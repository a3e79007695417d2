"""`python -m detailflow_jax.evaluate --reference REF.npz --samples SAMPLES.npz --inception DIR`

ADM's evaluator (guided-diffusion evaluations/evaluator.py) in JAX: prints Inception Score, FID,
sFID, Precision and Recall as it does. Both files are ADM batch files (`arr_0` uint8 NHWC; see
detailflow_jax/eval/reference.py); DIR is the output of `python -m detailflow_jax.convert
inception`. `--json OUT` also writes the five numbers (keys inception_score, fid, sfid,
precision, recall) with the SHA-256 of every input; `--save-features F.npz` writes the samples'
pool, spatial and logits arrays. Features are computed data-parallel over all devices.
"""
import argparse
import json
import pathlib
import sys

from .cli import add_compile_cache_flags, command, use_compile_cache
from .eval.evaluator import evaluate
from .weights.hub import cache_root


@command
def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m detailflow_jax.evaluate",
                                   description="ADM's FID / sFID / IS / precision / recall in JAX.")
  parser.add_argument("--reference", required=True, help="reference batch .npz (e.g. VIRTUAL_imagenet256_labeled.npz)")
  parser.add_argument("--samples", required=True, help="sample batch .npz (arr_0: uint8 [N, H, W, 3])")
  parser.add_argument("--inception", required=True, help="directory from `python -m detailflow_jax.convert inception`")
  parser.add_argument("--batch-size", type=int, default=256, help="global batch (rounded up to the device count)")
  parser.add_argument("--json", default=None, help="also write the scores and input hashes here")
  parser.add_argument("--save-features", default=None, help="write the samples' pool/spatial/logits .npz")
  add_compile_cache_flags(parser)
  args = parser.parse_args(argv)
  use_compile_cache(args, cache_root())
  if args.batch_size < 1:
    parser.error(f"--batch-size must be positive, got {args.batch_size}")
  result = evaluate(args.reference, args.samples, args.inception, args.batch_size, args.save_features)
  print("Inception Score:", result["inception_score"])
  print("FID:", result["fid"])
  print("sFID:", result["sfid"])
  print("Precision:", result["precision"])
  print("Recall:", result["recall"])
  if args.json:
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
