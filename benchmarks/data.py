"""Input pipeline throughput: ImageNet-like JPEGs (~500x375) -> 256 px train crops + flip, with
per-batch degradation (DetailFlow-16 schedule) and self-correction indices, through the real
ImageFolderSource -> Grain pipeline.

python -m benchmarks.data [--quick] [--degradation-prob P]
prints one JSON object {"images_per_s": {"0": .., "1": .., "2": ..}, ...}; keys are worker
processes ("0" = everything in the main process). Rates are steady state: timing starts once the
workers have filled their prefetch buffers' worth of batches, so start-up and buffered batches do
not inflate them.
"""
import argparse
import json
import os
import pathlib
import tempfile
import time

import numpy as np
from PIL import Image

from detailflow_jax.data.pipeline import ImagePipelineConfig, image_dataset, to_iterator
from detailflow_jax.data.sources import ImageFolderSource
from detailflow_jax.schedule import ResolutionSchedule

DETAILFLOW16 = ResolutionSchedule(256, 128, 8, None, 1.5, 16, 16, 16)


def make_jpegs(root: pathlib.Path, count: int, classes: int = 4) -> int:
  """Photo-like 500x375 JPEGs (smooth colour fields + noise, quality 90); returns total bytes."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
  total = 0
  for i in range(count):
    d = root / "train" / f"n{i % classes:08d}"
    d.mkdir(parents=True, exist_ok=True)
    phase = rng.uniform(0, 6.3, size=3)
    img = np.stack([127 + 100 * np.sin(xx / (30 + 10 * c) + yy / 45 + phase[c]) for c in range(3)], -1)
    img += rng.normal(0, 12, img.shape)
    path = d / f"img_{i}.JPEG"
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
    total += path.stat().st_size
  return total


def measure(source, workers: int, batches: int, batch_size: int,
            degradation_prob: float) -> tuple[float, float]:
  """-> (images per wall-clock second, images per CPU second of the main process). The second
  is only meaningful with 0 workers (all work in this process) and is robust to other load on
  the machine: it is the per-core rate one worker can reach."""
  cfg = ImagePipelineConfig(image_size=256, batch_size=batch_size, seed=0,
                            degradation_prob=degradation_prob, correction_training=True,
                            num_workers=workers, worker_buffer_size=1, shard_index=0, shard_count=1)
  it = to_iterator(image_dataset(source, cfg, DETAILFLOW16), workers, cfg.worker_buffer_size,
                   cfg.read_threads, cfg.read_buffer)
  # Drain what was built during start-up: the first batch, then read-ahead and hand-over buffers.
  skip = 1 + cfg.read_buffer * max(workers, 1) + cfg.worker_buffer_size * workers
  for _ in range(skip):
    next(it)
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(it)
  elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
  it.close()
  return batches * batch_size / elapsed, batches * batch_size / max(cpu, 1e-9)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--degradation-prob", type=float, default=0.5)
  args = parser.parse_args()
  from absl import flags
  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  batch_size = 8
  batches = 10 if args.quick else 40
  num_images = batch_size * (batches + 16)  # about one pass: timed batches read fresh files
  with tempfile.TemporaryDirectory() as tmp:
    jpeg_bytes = make_jpegs(pathlib.Path(tmp), num_images)
    source = ImageFolderSource(tmp, "train", cache_dir=pathlib.Path(tmp) / "cache")
    results = {str(w): measure(source, w, batches, batch_size, args.degradation_prob) for w in (0, 1, 2)}
  rates = {k: wall for k, (wall, _) in results.items()}
  print(json.dumps({
      "images_per_s": {k: round(v, 1) for k, v in rates.items()},
      "images_per_s_per_worker": {k: round(v / max(int(k), 1), 1) for k, v in rates.items()},
      "images_per_cpu_s_in_process": round(results["0"][1], 1),
      "image_size": 256, "source_jpeg": "500x375", "mean_jpeg_kb": round(jpeg_bytes / num_images / 1024, 1),
      "batch_size": batch_size, "timed_batches": batches, "degradation_prob": args.degradation_prob,
      "schedule": "DetailFlow-16", "cpu_cores": os.cpu_count(),
      "load_avg_1min": round(os.getloadavg()[0], 1), "quick": args.quick}))


if __name__ == "__main__":
  main()
