"""Per-step metrics averaged over a logging window (clu.metrics), and metric writers with clu's
MetricWriter methods, without TensorFlow.

`clu.metric_writers` imports TensorFlow when the package is imported (its SummaryWriter), which
would add ~1.5 GB to every install only to write event files. These writers implement the same
methods (write_scalars / write_images / write_texts / write_histograms / write_hparams / flush /
close) over tensorboardX, which writes the same TensorBoard event format without TensorFlow, so
the loop code reads exactly like a clu loop and a clu writer can be dropped in where TF exists.
Only process 0 writes files; every process may log lines.
"""
import functools
import json
import logging
import pathlib
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from clu import metrics as clu_metrics
from tensorboardX import SummaryWriter

from .. import paths

log = logging.getLogger("detailflow_jax")


def _scalar(v) -> float:
  return float(np.asarray(v))


@functools.cache
def _collection(names: tuple[str, ...]):
  """A clu Collection class averaging the metrics `names` (each read from its own output)."""
  return clu_metrics.Collection.create(**{n: clu_metrics.Average.from_output(n) for n in names})


class MetricWindow:
  """Accumulates each step's scalar metrics in a clu.metrics Collection and returns their
  means over the steps since the last `compute()` (the logging window). A metric a step does
  not report (e.g. the discriminator's before disc_start) is averaged over the steps that do."""

  def __init__(self):
    self._acc = None

  def add(self, step_metrics: Mapping[str, Any]) -> None:
    names = tuple(sorted(step_metrics))
    update = _collection(names).single_from_model_output(
        **{k: np.asarray(v, np.float32) for k, v in step_metrics.items()})
    if self._acc is not None and tuple(sorted(self._names(self._acc))) != names:
      union = tuple(sorted(set(names) | set(self._names(self._acc))))
      self._acc, update = self._widen(self._acc, union), self._widen(update, union)
    self._acc = update if self._acc is None else self._acc.merge(update)

  def compute(self) -> dict[str, float]:
    """Means since the last compute (empty if nothing was added); starts a new window."""
    if self._acc is None:
      return {}
    means = {k: float(v) for k, v in self._acc.compute().items()}
    self._acc = None
    return means

  @staticmethod
  def _names(collection):
    return [k for k in collection.__annotations__ if k != "_reduction_counter"]

  @staticmethod
  def _widen(collection, names):
    cls = _collection(names)
    have = set(MetricWindow._names(collection))
    return cls(_reduction_counter=collection._reduction_counter,
               **{n: getattr(collection, n) if n in have else cls.__annotations__[n].empty()
                  for n in names})


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
  """TensorBoard event files via tensorboardX. A remote logdir (gs://...) gets the events
  written to a local staging directory and copied there at every flush (tensorboardX itself
  writes local files only, without TensorFlow)."""

  def __init__(self, logdir):
    self.logdir = paths.run_path(logdir)
    self._staging = tempfile.mkdtemp(prefix="tensorboard-") if paths.is_remote(self.logdir) else None
    # A restart within the same second would otherwise reuse the event file name (time and
    # host) and its upload replace the earlier run's events.
    suffix = f".{uuid.uuid4().hex[:8]}" if self._staging else ""
    self._writer = SummaryWriter(self._staging or str(self.logdir), filename_suffix=suffix)

  def _upload(self) -> None:
    if self._staging is None:
      return
    self.logdir.mkdir(parents=True, exist_ok=True)
    for local in pathlib.Path(self._staging).rglob("*"):
      if local.is_file():
        target = self.logdir / local.relative_to(self._staging).as_posix()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(local.read_bytes())

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
    self._upload()

  def close(self) -> None:
    self._writer.close()
    self._upload()


class JsonlWriter:
  """One JSON line per write_scalars call in workdir/metrics.jsonl (easy to diff and plot).
  Appended locally; on a remote path (gs://..., objects cannot be appended to) the file is
  rewritten whole at every write (a few hundred bytes per log_every steps)."""

  def __init__(self, path):
    self.path = paths.run_path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if paths.is_remote(self.path):
      self._file = None
      self._text = self.path.read_text() if self.path.exists() else ""
    else:
      self._file = open(self.path, "a")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    line = json.dumps({"step": int(step), **{k: _scalar(v) for k, v in scalars.items()}}) + "\n"
    if self._file is None:
      self._text += line
      self.path.write_text(self._text)
      return
    self._file.write(line)
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
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
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
    writers.append(JsonlWriter(paths.run_path(workdir) / "metrics.jsonl"))
    if tensorboard:
      writers.append(TensorBoardWriter(paths.run_path(workdir) / "tensorboard"))
  return MultiWriter(writers)
