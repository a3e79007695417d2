"""Input pipeline throughput: ImageNet-like JPEGs (~500x375) -> 256 px train crops with
degradation (DetailFlow-16 schedule, prob 0.2) and self-correction indices.

python benchmarks/data.py [--quick]  ->  one JSON object {"images_per_s": {"0": .., "1": .., "2": ..}, ...}
(keys = number of worker processes; "0" runs in the main process).
"""
import argparse
import io
import json
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image

from detailflow_jax.data.pipeline import ImagePipelineConfig, image_dataset, to_iterator
from detailflow_jax.data.sources import ImageFolderSource
from detailflow_jax.schedule import ResolutionSchedule


def make_jpegs(root: pathlib.Path, count: int, classes: int = 4) -> None:
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
  for i in range(count):
    d = root / "train" / f"n{i % classes:08d}"
    d.mkdir(parents=True, exist_ok=True)
    # Smooth colour fields plus noise compress like photos (~100 KB at quality 90).
    phase = rng.uniform(0, 6.3, size=3)
    img = np.stack([127 + 100 * np.sin(xx / (30 + 10 * c) + yy / 45 + phase[c]) for c in range(3)], -1)
    img += rng.normal(0, 12, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"img_{i}.JPEG", quality=90)


def measure(source, workers: int, batches: int, batch_size: int) -> float:
  schedule = ResolutionSchedule(256, 128, 8, None, 1.5, 16, 16, 16)
  cfg = ImagePipelineConfig(image_size=256, batch_size=batch_size, seed=0, degradation_prob=0.2,
                            correction_training=True, num_workers=workers)
  it = to_iterator(image_dataset(source, cfg, schedule), num_workers=workers)
  next(it)  # start-up (worker processes, first batch) is not throughput
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  elapsed = time.perf_counter() - start
  if hasattr(it, "close"):
    it.close()
  return batches * batch_size / elapsed


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  from absl import flags
  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  num_images = 64 if args.quick else 256
  batches = 10 if args.quick else 30
  batch_size = 16
  with tempfile.TemporaryDirectory() as tmp:
    make_jpegs(pathlib.Path(tmp), num_images)
    source = ImageFolderSource(tmp, "train", cache_dir=pathlib.Path(tmp) / "cache")
    rates = {str(w): measure(source, w, batches, batch_size) for w in (0, 1, 2)}
  print(json.dumps({"images_per_s": rates, "images_per_s_per_worker":
                    {k: v / max(int(k), 1) for k, v in rates.items()},
                    "image_size": 256, "source_jpeg": "500x375", "batch_size": batch_size,
                    "degradation_prob": 0.2, "quick": args.quick}))


if __name__ == "__main__":
  main()
