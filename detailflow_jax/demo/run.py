"""`python -m detailflow_jax.demo [--workdir DIR] [--quick]`: DetailFlow end to end on CPU.

Trains a tiny tokenizer and a tiny GPT on the procedural shapes (6 classes: red disc, green
square, blue triangle, yellow ring, magenta cross, cyan diamond; 32 px) with the same trainers,
extraction and sampler the ImageNet recipe uses, then writes:

  samples.png                       class-conditional samples, one row per class
  samples_coarse_to_fine.png        one sample per class decoded after 1, 2, 3, 4, 8, 12, 16 tokens
  reconstructions_coarse_to_fine.png one held-out image per class, then its decodes after
                                    1, 2, 3, 4, 8, 12, 16 tokens
  loss_curves.png                   tokenizer and GPT losses
  metrics.json                      shape and colour accuracy, as a judge CNN trained on clean
                                    procedural images sees them, of held-out images, their
                                    reconstructions and the samples (also drawn with bf16 GPT
                                    weights); coarse-to-fine errors; per-stage wall and CPU
                                    seconds

A rerun with the same workdir resumes: finished stages load their exports. The settings are
detailflow_jax/configs/demo.py (`--quick` is its reduced variant, the one the test suite runs).
"""
import argparse
import json
import logging
import pathlib
import time

import jax
import numpy as np

from ..configs import demo as demo_settings
from ..data.sources import COLOURS, SHAPES, ProceduralShapes, class_shape_colour_index
from ..inference.images import coarse_to_fine_counts, coarse_to_fine_strips, enlarge_nearest, save_grid
from ..inference.plots import read_metrics, save_curves
from ..inference.sampler import Sampler, SamplingOptions
from ..inference.tokenizer import TokenizerFns
from ..train import ar as ar_recipe
from ..train import tokenizer as tokenizer_recipe
from ..train.extract import extract
from ..weights.load import load_gpt, load_tokenizer
from .judge import coarse_to_fine_errors, judge_images, train_judge


def load_demo_config(variant: str = ""):
  """The demo's settings: detailflow_jax/configs/demo.py:get_config(variant)."""
  return demo_settings.get_config(variant)


def labelled_images(num_classes: int, size: int, count: int, seed: int, style: str = "textured"):
  """[count, size, size, 3] float32 in [-1, 1] and int labels from the procedural shapes."""
  source = ProceduralShapes(num_classes, size, count, seed=seed, style=style)
  records = [source[i] for i in range(count)]
  images = np.stack([np.asarray(r["image"], np.float32) / 127.5 - 1.0 for r in records])
  return images, np.asarray([r["label"] for r in records], np.int32)


def class_factors(num_classes: int):
  """(shape index [num_classes], colour index [num_classes]) of each class, into SHAPES / COLOURS."""
  pairs = np.asarray([class_shape_colour_index(k) for k in range(num_classes)], np.int64)
  return pairs[:, 0], pairs[:, 1]


def class_names(num_classes: int):
  """["red disc", "green square", ...]: what each class shows."""
  shape, colour = class_factors(num_classes)
  return [f"{COLOURS[c]} {SHAPES[s]}" for s, c in zip(shape, colour)]


class Stages:
  """Numbered stage banners with elapsed time, and per-stage seconds for metrics.json."""

  def __init__(self, names):
    self.names, self.seconds, self.cpu_seconds = list(names), {}, {}
    self._start, self._cpu_start = time.time(), time.process_time()
    self._current, self._t0, self._cpu0 = None, None, None

  def begin(self, name: str):
    self.end()
    self._current, self._t0, self._cpu0 = name, time.time(), time.process_time()
    i = self.names.index(name) + 1
    print(f"[{i}/{len(self.names)}] {name} (elapsed {time.time() - self._start:.0f}s)", flush=True)

  def end(self):
    if self._current is not None:
      self.seconds[self._current] = round(time.time() - self._t0, 1)
      self.cpu_seconds[self._current] = round(time.process_time() - self._cpu0, 1)
      self._current = None

  @property
  def total(self) -> float:
    return round(time.time() - self._start, 1)

  @property
  def cpu_total(self) -> float:
    """Process CPU seconds (user + system, all threads): on a shared machine the wall time
    says little, this says what the run cost."""
    return round(time.process_time() - self._cpu_start, 1)


def run(c, workdir: pathlib.Path) -> dict:
  """The whole demo; returns the metrics it also writes to workdir/metrics.json."""
  stages = Stages(["train the tokenizer", "extract codes", "train the GPT", "sample",
                   "evaluate and draw"])
  workdir.mkdir(parents=True, exist_ok=True)
  tok_run, codes_dir, gpt_run = workdir / "tokenizer", workdir / "codes", workdir / "gpt"

  stages.begin("train the tokenizer")
  tokenizer_recipe.train(c.tokenizer, tok_run)

  stages.begin("extract codes")
  extract(c.gpt, tok_run / "export", codes_dir)

  stages.begin("train the GPT")
  with c.gpt.unlocked():
    c.gpt.data.path = str(codes_dir)
  ar_recipe.train(c.gpt, gpt_run)

  stages.begin("sample")
  fns = TokenizerFns(load_tokenizer(tok_run / "export"))
  gpt = load_gpt(gpt_run / "export")
  sampler = Sampler(gpt)
  e = c.eval
  per_class = e.samples_per_class
  labels = np.repeat(np.arange(c.num_classes, dtype=np.int32), per_class)
  options = SamplingOptions(cfg_scale=e.cfg_scale, temperature=e.temperature, top_k=e.top_k,
                            top_p=e.top_p)
  tokens = np.asarray(sampler.sample(gpt, labels, jax.random.key(c.seed), options))
  samples = np.asarray(fns.decode(tokens), np.float32)
  # The same draws with the GPT's matmul kernels in bf16 (`--weights-dtype bfloat16`): what the
  # weight-only low precision costs, as the judge sees it.
  bf16_sampler = Sampler(gpt, weights_dtype="bfloat16")
  tokens_bf16 = np.asarray(bf16_sampler.sample(bf16_sampler.prepare_weights(gpt), labels,
                                               jax.random.key(c.seed), options))
  samples_bf16 = np.asarray(fns.decode(tokens_bf16), np.float32)
  size = samples.shape[1]
  shown = 2 * size  # nearest-enlarged so 32 px images are visible
  counts = coarse_to_fine_counts(fns.schedule.token_list, tokens.shape[1])
  paths = {}
  paths["samples"] = save_grid(workdir / "samples.png", [
      [enlarge_nearest(np.clip(samples[k * per_class + j], -1, 1), shown) for j in range(per_class)]
      for k in range(c.num_classes)])
  firsts = tokens[::per_class]
  paths["samples_coarse_to_fine"] = save_grid(workdir / "samples_coarse_to_fine.png",
                                              coarse_to_fine_strips(lambda t: fns.decode(firsts, t),
                                                                    counts, shown))

  stages.begin("evaluate and draw")
  size_cfg = fns.config.image_size
  style = c.tokenizer.data.shapes_style
  class_shape, class_colour = class_factors(c.num_classes)
  judge = train_judge(sorted(set(class_shape)), sorted(set(class_colour)), size_cfg, style=style,
                      num_images=e.judge_images, steps=e.judge_steps, seed=c.seed)
  held_out, held_labels = labelled_images(c.num_classes, size_cfg, e.num_images, seed=c.seed + 1000,
                                          style=style)
  idx, _ = fns.encode(held_out)
  recon = np.asarray(fns.decode(idx), np.float32)
  verdicts = {"clean": (held_out, held_labels), "reconstruction": (recon, held_labels),
              "sample": (samples, labels), "sample_bf16_weights": (samples_bf16, labels)}
  accuracy = {}
  for name, (images, truth) in verdicts.items():
    shape_pred, colour_pred = judge_images(judge, images)
    accuracy[name] = (shape_pred == class_shape[truth], colour_pred == class_colour[truth])
  per_class_shape = [float(np.mean(accuracy["sample"][0][labels == k])) for k in range(c.num_classes)]

  # One held-out image of each class (the first), so every class's shape is shown.
  firsts_held = np.asarray([np.flatnonzero(held_labels == k)[0] for k in range(c.num_classes)
                           if np.any(held_labels == k)], np.int32)
  paths["reconstructions_coarse_to_fine"] = save_grid(
      workdir / "reconstructions_coarse_to_fine.png",
      coarse_to_fine_strips(lambda t: fns.decode(idx[firsts_held], t), counts, shown,
                            inputs=held_out[firsts_held]))
  c2f = coarse_to_fine_errors(fns, held_out[:256])

  tok_steps, tok_rec = read_metrics(tok_run / "metrics.jsonl", "rec_loss")
  curves = {"tokenizer reconstruction loss": (tok_steps, tok_rec),
            "tokenizer codebook usage": read_metrics(tok_run / "metrics.jsonl", "codebook_usage"),
            "GPT cross-entropy": read_metrics(gpt_run / "metrics.jsonl", "loss")}
  paths["loss_curves"] = save_curves(workdir / "loss_curves.png", curves)
  stages.end()

  metrics = {
      "classes": class_names(c.num_classes),
      **{f"{name}_{factor}_accuracy": float(np.mean(hits[i]))
         for name, hits in accuracy.items() for i, factor in enumerate(("shape", "colour"))},
      "sample_shape_accuracy_per_class": per_class_shape,
      "shape_chance": 1.0 / len(set(class_shape)), "colour_chance": 1.0 / len(set(class_colour)),
      "samples_per_class": per_class, "cfg_scale": e.cfg_scale,
      "bf16_weights_token_agreement": float(np.mean(tokens_bf16 == tokens)),
      "tokenizer_rec_loss_first": float(tok_rec[0]) if len(tok_rec) else None,
      "tokenizer_rec_loss_last": float(tok_rec[-1]) if len(tok_rec) else None,
      "coarse_to_fine": c2f,
      "stage_seconds": stages.seconds, "total_seconds": stages.total,
      "stage_cpu_seconds": stages.cpu_seconds, "total_cpu_seconds": stages.cpu_total,
      "pngs": {k: str(v) for k, v in paths.items()},
  }
  (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2))
  return metrics


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m detailflow_jax.demo", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="detailflow_demo", help="where runs and PNGs go")
  parser.add_argument("--quick", action="store_true", help="the reduced run (fewer steps)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                      force=True)  # an imported library may have put a handler on the root logger
  for noisy in ("absl", "jax._src.xla_bridge", "orbax", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  c = load_demo_config("quick" if args.quick else "")
  workdir = pathlib.Path(args.workdir).absolute()
  metrics = run(c, workdir)
  print(f"\nclasses: {', '.join(metrics['classes'])}")
  print("the judge (trained on clean images only) names shape / colour correctly for:")
  for name, what in (("clean", "held-out clean images"),
                     ("reconstruction", "their full-token reconstructions"),
                     ("sample", "class-conditional samples"),
                     ("sample_bf16_weights", "the same, bf16 GPT weights")):
    print(f"  {what:<34} {metrics[name + '_shape_accuracy']:.0%} / "
          f"{metrics[name + '_colour_accuracy']:.0%}")
  print(f"  (chance {metrics['shape_chance']:.0%} / {metrics['colour_chance']:.0%})")
  print("coarse to fine (MSE of t-token decodes vs the degraded target / vs the full image):")
  for row in metrics["coarse_to_fine"]:
    print(f"  t={row['tokens']:>2} ({row['target_res']:>2} px): {row['mse_degraded']:.4f} / "
          f"{row['mse_full']:.4f}")
  print(f"done in {metrics['total_seconds']:.0f}s ({metrics['total_cpu_seconds']:.0f} CPU s); wrote:")
  for path in metrics["pngs"].values():
    print(f"  {path}")
  print(f"  {workdir / 'metrics.json'}")
  return 0
