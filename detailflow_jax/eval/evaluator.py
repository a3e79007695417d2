"""ADM's evaluator (guided-diffusion evaluations/evaluator.py) as one function: a reference
batch and a sample batch (ADM npz files) -> Inception Score, FID, sFID, precision and recall,
with the SHA-256 of every input. The CLI is `python -m detailflow_jax.evaluate`; the generation
job scores its samples through the same function."""
import logging
import pathlib

import numpy as np

from .. import paths
from ..weights.model_dir import read_model_config
from . import scores
from .features import extract_features
from .inception import load_inception
from .reference import HASH_KEY, EvalInputError, batch_statistics, load_batch, save_npz_atomically

log = logging.getLogger("detailflow_jax")


def _features(model, batch, batch_size: int, name: str) -> dict[str, np.ndarray]:
  return extract_features(model, batch.images.batches(batch_size), len(batch.images), batch_size, name=name)


def evaluate(reference, samples, inception_dir, batch_size: int = 256, save_features=None) -> dict:
  """The five ADM numbers and the inputs' hashes."""
  if not (pathlib.Path(inception_dir) / "config.json").is_file():
    raise EvalInputError(f"{inception_dir} is not a converted Inception directory; make one with "
                         "`python -m detailflow_jax.convert inception --checkpoint FILE --out DIR` "
                         "(FILE: see docs/evaluation.md)")
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
          "reference": {"path": str(reference), "sha256": paths.file_sha256(reference)},
          "samples": {"path": str(samples), "sha256": paths.file_sha256(samples)},
          "inception": {"path": str(inception_dir), "weights_sha256": weights,
                        "source_sha256": info["source_sha256"], "source_file": info["source_file"]},
      },
  }
