"""Orbax checkpoints of the train state, with the Grain iterator state in the same step.

Saves are asynchronous, every `save_every` steps, keeping the newest `keep` plus a milestone
every `milestone_every` steps (the reference keeps its 10 newest and one every 50 epochs).
Restoring uses the state's abstract shapes and shardings, so every shard is read straight to its
device. Resuming skips a damaged newest step (a truncated or corrupted file): it is named in the
log, moved aside to DIR/damaged-STEP, and the newest intact step is restored instead.
"""
import logging
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from .. import paths

log = logging.getLogger("detailflow_jax")


class DamagedCheckpointError(RuntimeError):
  """No saved step of a checkpoint directory could be restored."""


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


class Checkpointer:

  def __init__(self, directory, *, save_every: int = 1000, keep: int = 3, async_save: bool = True,
               milestone_every: int = 0):
    self.directory = paths.run_path(directory)  # Orbax takes local and gs:// paths
    if milestone_every < 0 or (milestone_every and milestone_every % max(save_every, 1)):
      raise ValueError(f"checkpoint.milestone_every={milestone_every} must be 0 (off) or a multiple "
                       f"of checkpoint.save_every={save_every} (milestones are saved steps kept)")
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(save_every, 1), max_to_keep=keep,
        keep_period=milestone_every or None, enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  @property
  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  @property
  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iterator=None, *, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      import grain
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state: Any, data_iterator=None, step: int | None = None) -> tuple[int, Any]:
    """Restores `step` (default: the newest intact one) into the structure/shardings of
    `abstract_state` (a tree of jax.ShapeDtypeStruct with .sharding); the data iterator is
    restored in place. Without `step`, a step that fails to read is logged and moved aside and
    the next older one is tried; DamagedCheckpointError names them all when none reads."""
    if step is not None:
      try:
        return step, self._restore(step, abstract_state, data_iterator)
      except FileNotFoundError:
        raise
      except Exception as e:
        raise DamagedCheckpointError(f"checkpoint step {step} in {self.directory} cannot be read "
                                     f"({_first_line(e)})") from e
    steps = self.all_steps
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    damaged = []
    for candidate in reversed(steps):
      error = None
      try:
        state = self._restore(candidate, abstract_state, data_iterator)
      except Exception as e:  # Orbax / TensorStore / JSON errors all mean "this step is unreadable"
        error = _first_line(e)
      if jax.process_count() > 1:
        # A shard only some processes read may be the damaged one: all agree to skip the step.
        from jax.experimental import multihost_utils
        failed = multihost_utils.process_allgather(jax.numpy.int32(error is not None))
        if error is None and int(failed.max()):
          error = "unreadable on another process"
      if error is not None:
        log.error("checkpoint step %d in %s is damaged (%s); trying the next older step",
                  candidate, self.directory, error)
        damaged.append((candidate, error))
        continue
      if damaged:
        self._move_aside([s for s, _ in damaged])
        log.warning("resuming from step %d, the newest intact checkpoint (damaged: %s)", candidate,
                    ", ".join(str(s) for s, _ in damaged))
      return candidate, state
    raise DamagedCheckpointError(
        f"no checkpoint in {self.directory} can be restored; damaged steps: "
        + "; ".join(f"{s} ({why})" for s, why in damaged)
        + ". Move them away to start from scratch, or restore a copy.")

  def _restore(self, step: int, abstract_state: Any, data_iterator) -> Any:
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      import grain
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self._manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def _move_aside(self, steps: list[int]) -> None:
    """Damaged steps go to DIR/damaged-STEP (kept for a post-mortem, out of Orbax's listing) so
    the resumed run can save those steps again."""
    if jax.process_index() == 0:
      for s in steps:
        src = self.directory / str(s)
        if src.exists():
          src.rename(self.directory / f"damaged-{s}")
          log.warning("moved damaged checkpoint %s to %s", src, self.directory / f"damaged-{s}")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("detailflow_jax checkpoint: damaged steps moved aside")
    self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings, the restore target for `state`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


class PreemptionGuard:
  """Turns SIGTERM (TPU/GPU preemption notice) into a flag the loop checks between steps, so
  the loop saves a checkpoint and exits cleanly instead of dying mid-write."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def requested(self, step: int) -> bool:
    """True once a stop was asked for. On multi-host runs every process must call this at the
    same steps: JAX's coordination service then agrees on one step for all hosts to stop at."""
    if jax.process_count() > 1:
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          return True
      except RuntimeError:  # No preemption sync manager (not started by jax.distributed).
        pass
    return self._event.is_set()
