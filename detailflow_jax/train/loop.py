"""The training loop both trainers share: steps, logging with ETA, checkpoints, stop rules."""
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax

from ..cli import format_duration, progress_bar
from .checkpoint import Checkpointer, PreemptionGuard
from .metrics import MetricWindow

log = logging.getLogger("detailflow_jax")


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN/inf; the last checkpoint on disk predates it."""


def run_training(state: Any, step_fn: Callable, batches: Iterator, *, num_steps: int,
                 checkpointer: Checkpointer | None = None, data_iterator=None, writer=None,
                 log_every: int = 50, every_n_steps: Callable[[int, Any], None] | None = None,
                 callback_every: int = 0, guard: PreemptionGuard | None = None,
                 loss_history: list | None = None) -> Any:
  """Runs `step_fn` from `state.step` to `num_steps`.

  - Every step's loss is checked: NaN/inf stops the run (NonFiniteLossError naming the step)
    before anything is saved, so the last good checkpoint stays the newest.
  - Checkpoints go through `checkpointer` (its own interval) with the data iterator state, and
    always at the end or when a preemption (SIGTERM) is requested.
  - Every `log_every` steps the metrics averaged over those steps (a clu.metrics collection)
    go to `writer`, and a progress line: loss, steps/s, ETA. The writer is flushed with every
    checkpoint saved: what a resume starts from has its metrics written too.
  """
  guard = guard or PreemptionGuard()
  start_step = int(jax.device_get(state.step))
  if start_step >= num_steps:
    log.info("nothing to do: state is at step %d of %d", start_step, num_steps)
    return state
  t0 = time.time()
  window_start, window_steps = time.time(), 0
  window = MetricWindow()
  with guard:
    for step in range(start_step, num_steps):
      batch = next(batches)
      state, metrics = step_fn(state, batch)
      done = step + 1
      metrics = jax.device_get(metrics)  # one host transfer per step, all scalars
      loss = float(metrics["loss"])
      if not math.isfinite(loss):
        raise NonFiniteLossError(f"loss is {loss} at step {done}; stopping without saving "
                                 f"(last checkpoint: {checkpointer.latest_step if checkpointer else None})")
      if loss_history is not None:
        loss_history.append(loss)
      window_steps += 1
      window.add(metrics)
      if done % log_every == 0 or done == num_steps:
        elapsed = time.time() - window_start
        rate = window_steps / max(elapsed, 1e-9)
        scalars = window.compute()
        scalars["steps_per_s"] = rate
        if writer is not None:
          writer.write_scalars(done, scalars)
        log.info("step %d/%d %s loss %.4f | %.2f steps/s | elapsed %s | ETA %s", done, num_steps,
                 progress_bar(done, num_steps), scalars["loss"], rate, format_duration(time.time() - t0),
                 format_duration((num_steps - done) / rate))
        window_start, window_steps = time.time(), 0
      stop = guard.requested(done)
      if checkpointer is not None:
        saved = checkpointer.save(done, state, data_iterator, force=stop or done == num_steps)
        if saved and writer is not None:
          writer.flush()  # a gs:// workdir gets its TensorBoard events only when flushed
      if every_n_steps is not None and callback_every and done % callback_every == 0:
        every_n_steps(done, state)  # after the save, so callbacks see a checkpointed step
      if stop:
        log.warning("preemption requested: saved step %d and stopping", done)
        break
  if checkpointer is not None:
    checkpointer.wait()
  if writer is not None:
    writer.flush()
  return state
