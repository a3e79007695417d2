"""Metric writers with clu's MetricWriter methods, without TensorFlow.

`clu.metric_writers` imports TensorFlow when the package is imported (its SummaryWriter), which
would add ~1.5 GB to every install only to write event files. These writers implement the same
methods (write_scalars / write_images / write_texts / write_histograms / write_hparams / flush /
close) over tensorboardX, which writes the same TensorBoard event format without TensorFlow, so
the loop code reads exactly like a clu loop and a clu writer can be dropped in where TF exists.
Only process 0 writes files; every process may log lines.
"""
import logging
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

log = logging.getLogger("detailflow_jax")


def _scalar(v) -> float:
  return float(np.asarray(v))


class LoggingWriter:
  """Log lines `[step] name=value ...` (what a person watching the run reads)."""

  def __init__(self, prefix: str = ""):
    self.prefix = prefix

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    text = " ".join(f"{k}={_scalar(v):.5g}" for k, v in sorted(scalars.items()))
    log.info("%s[%d] %s", self.prefix, step, text)

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    log.info("%s[%d] images: %s", self.prefix, step,
             ", ".join(f"{k} {tuple(np.shape(v))}" for k, v in images.items()))

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for k, v in texts.items():
      log.info("%s[%d] %s: %s", self.prefix, step, k, v)

  def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets=None) -> None:
    pass  # Histograms are for TensorBoard only.

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    log.info("%shparams: %s", self.prefix, dict(hparams))

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class TensorBoardWriter:
  """TensorBoard event files via tensorboardX."""

  def __init__(self, logdir):
    from tensorboardX import SummaryWriter
    self.logdir = pathlib.Path(logdir)
    self._writer = SummaryWriter(str(self.logdir))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for k, v in scalars.items():
      self._writer.add_scalar(k, _scalar(v), global_step=step)

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """images: [N, H, W, C] or [H, W, C], uint8 or float in [0, 1]."""
    for k, v in images.items():
      v = np.asarray(v)
      if v.ndim == 3:
        v = v[None]
      self._writer.add_images(k, v, global_step=step, dataformats="NHWC")

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for k, v in texts.items():
      self._writer.add_text(k, v, global_step=step)

  def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets=None) -> None:
    for k, v in arrays.items():
      self._writer.add_histogram(k, np.asarray(v), global_step=step,
                                 bins=num_buckets[k] if num_buckets and k in num_buckets else "tensorflow")

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._writer.add_text("hparams", "\n".join(f"{k}: {v}" for k, v in sorted(hparams.items())))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class JsonlWriter:
  """One JSON line per write_scalars call in workdir/metrics.jsonl (easy to diff and plot)."""

  def __init__(self, path):
    import json
    self._json = json
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._file = open(self.path, "a")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._file.write(self._json.dumps({"step": int(step), **{k: _scalar(v) for k, v in scalars.items()}}) + "\n")
    self._file.flush()

  def write_images(self, step, images):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class MultiWriter:
  def __init__(self, writers: Sequence[Any]):
    self.writers = list(writers)

  def __getattr__(self, name):
    def call(*args, **kwargs):
      for w in self.writers:
        getattr(w, name)(*args, **kwargs)
    return call


def create_writer(workdir, *, process_index: int = 0, tensorboard: bool = True):
  """Log lines everywhere; metrics.jsonl and TensorBoard files under workdir on process 0 only."""
  writers = [LoggingWriter()]
  if process_index == 0:
    writers.append(JsonlWriter(pathlib.Path(workdir) / "metrics.jsonl"))
    if tensorboard:
      writers.append(TensorBoardWriter(pathlib.Path(workdir) / "tensorboard"))
  return MultiWriter(writers)
