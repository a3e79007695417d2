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
import logging
import pathlib
import sys
from typing import Dict

import numpy as np

from .cli import add_compile_cache_flags, use_compile_cache
from .convert.inception import file_sha256
from .hub import cache_root
from .eval import scores
from .eval.reference import (EvalInputError, HASH_KEY, batch_statistics, load_batch,
                             save_npz_atomically)

log = logging.getLogger("detailflow_jax")


def _features(model, batch, batch_size: int, name: str) -> Dict[str, np.ndarray]:
  from .eval.features import extract_features
  return extract_features(model, batch.images.batches(batch_size), len(batch.images), batch_size, name=name)


def evaluate(reference, samples, inception_dir, batch_size: int = 256, save_features=None) -> Dict:
  """The five ADM numbers and the inputs' hashes."""
  from .model_dir import read_model_config
  from .pretrained import load_inception
  if not (pathlib.Path(inception_dir) / "config.json").is_file():
    raise EvalInputError(f"{inception_dir} is not a converted Inception directory; make one with "
                         "`python -m detailflow_jax.convert inception --checkpoint FILE --out DIR` "
                         "(FILE: see the README section on evaluating samples)")
  info = read_model_config(inception_dir, "inception")
  weights = info["weights_sha256"]
  # Both files are checked before any network runs; k = 3 neighbours need 4 points per set.
  ref = load_batch(reference, weights, min_images=scores.PR_NEIGHBOURHOOD + 1)
  smp = load_batch(samples, weights, min_images=scores.PR_NEIGHBOURHOOD + 1)
  model, _ = load_inception(inception_dir)
  ref_feats = None
  if ref.pool is None or ref.stats is None:
    log.info("computing reference batch activations (%d images)...", len(ref.images))
    ref_feats = _features(model, ref, batch_size, "reference")
  ref_pool = ref.pool if ref.pool is not None else ref_feats["pool"]
  ref_stats = batch_statistics(ref, ref_feats)
  log.info("computing sample batch activations (%d images)...", len(smp.images))
  smp_feats = _features(model, smp, batch_size, "samples")
  if save_features:
    save_npz_atomically(save_features, **smp_feats, **{HASH_KEY: np.array(weights)})
  smp_stats = batch_statistics(smp, smp_feats)
  log.info("computing evaluations...")
  precision, recall = scores.precision_recall(ref_pool, smp_feats["pool"])
  return {
      "inception_score": scores.inception_score(smp_feats["logits"]),
      "fid": scores.frechet_distance(smp_stats["mu"], smp_stats["sigma"], ref_stats["mu"], ref_stats["sigma"]),
      "sfid": scores.frechet_distance(smp_stats["mu_s"], smp_stats["sigma_s"],
                                      ref_stats["mu_s"], ref_stats["sigma_s"]),
      "precision": precision,
      "recall": recall,
      "inputs": {
          "reference": {"path": str(reference), "sha256": file_sha256(reference)},
          "samples": {"path": str(samples), "sha256": file_sha256(samples)},
          "inception": {"path": str(inception_dir), "weights_sha256": weights,
                        "source_sha256": info["source_sha256"], "source_file": info["source_file"]},
      },
  }


def main(argv=None) -> int:
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
  logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
  if args.batch_size < 1:
    parser.error(f"--batch-size must be positive, got {args.batch_size}")
  try:
    use_compile_cache(args, cache_root())
    result = evaluate(args.reference, args.samples, args.inception, args.batch_size, args.save_features)
  except (EvalInputError, scores.ScoreError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
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
