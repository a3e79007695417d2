"""Orbax checkpoints of the train state, with the Grain iterator state in the same step.

Saves are asynchronous, every `save_every` steps, keeping the newest `keep`. Restoring uses the
state's abstract shapes and shardings, so every shard is read straight to its device.
"""
import signal
import threading
from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from .. import paths


class Checkpointer:

  def __init__(self, directory, *, save_every: int = 1000, keep: int = 3, async_save: bool = True):
    self.directory = paths.run_path(directory)  # Orbax takes local and gs:// paths
    options = ocp.CheckpointManagerOptions(save_interval_steps=max(save_every, 1), max_to_keep=keep,
                                           enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  @property
  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iterator=None, *, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      import grain
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state: Any, data_iterator=None, step: Optional[int] = None) -> Tuple[int, Any]:
    """Restores `step` (default: latest) into the structure/shardings of `abstract_state`
    (a tree of jax.ShapeDtypeStruct with .sharding); the data iterator is restored in place."""
    step = self.latest_step if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      import grain
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return step, restored["state"]

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
