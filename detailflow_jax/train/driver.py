"""The one run driver both recipes (train/ar.py, train/tokenizer.py) hand their pieces to.

A recipe builds its state, step function, batches, periodic hooks and export; the driver does
the rest the same way for both:

  prepare   jax.distributed, config validation, workdir/config.json (process 0), the mesh,
            the metric writers;
  resume    the newest Orbax checkpoint in workdir/checkpoints (state + data iterator);
  loop      train/loop.run_training: checkpoints, preemption (SIGTERM), logging, hooks;
  export    the final weights as a model directory (workdir/export) under one multi-host
            policy: every process takes part in gathering the (possibly FSDP-sharded) arrays
            to host memory, process 0 alone writes them to a temporary directory and renames
            it into place, and all processes wait at a barrier before going on.
"""
import dataclasses
import logging
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import parameter_overview
from flax import nnx

from .. import paths, sharding
from ..weights.model_dir import save_model_dir
from ..weights.saved_steps import TASK_KINDS
from . import init_from as init_from_lib
from .checkpoint import Checkpointer, abstract_with_shardings
from .loop import run_training
from .metrics import create_writer

log = logging.getLogger("detailflow_jax")

# Test hook: a hard crash (SIGKILL, no cleanup) right after the checkpoint of this step is
# durable (the resume tests).
KILL_AFTER_STEP_ENV = "DETAILFLOW_TEST_KILL_AFTER_STEP"


def total_steps(c: ml_collections.ConfigDict) -> int:
  """c.total_steps, or (when <= 0) num_epochs full passes of data.examples_per_epoch."""
  if c.total_steps > 0:
    return c.total_steps
  return c.num_epochs * (c.data.examples_per_epoch // c.data.batch_size)


def validate_run(c: ml_collections.ConfigDict, num_devices: int) -> None:
  """The checks every recipe's config needs (mesh and batch, steps, compute dtype)."""
  data, fsdp, _ = sharding.resolve_mesh_shape(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, num_devices)
  if c.data.batch_size % (data * fsdp):
    raise ValueError(f"data.batch_size={c.data.batch_size} is not divisible by the batch mesh axes "
                     f"data x fsdp = {data} x {fsdp}")
  if total_steps(c) <= 0:
    raise ValueError("the run has no steps: set total_steps or num_epochs/examples_per_epoch")
  if c.compute_dtype not in ("float32", "bfloat16"):
    raise ValueError(f"compute_dtype={c.compute_dtype!r} (float32 | bfloat16)")
  if c.init_from_mode not in init_from_lib.MODES:
    raise ValueError(f"init_from_mode={c.init_from_mode!r} (strict | partial)")
  if c.init_from_step >= 0 and not c.init_from:
    raise ValueError(f"init_from_step={c.init_from_step} without init_from (a training workdir)")


@dataclasses.dataclass(frozen=True)
class Hook:
  """`fn(step, state)` after every `every` steps (after that step's checkpoint save). Runs on
  every process: hooks that compute on sharded arrays need all of them; only process 0 writes."""
  every: int
  fn: Callable[[int, Any], None]


# (kind, model config dict, nnx module) of what goes to workdir/export, from the final state.
ExportFn = Callable[[Any], tuple[str, dict[str, Any], nnx.Module]]


def gather_to_host(tree: Any, mesh) -> Any:
  """Host numpy copies of a tree of (possibly sharded, multi-process) jax.Arrays. Every
  process must call it: one jitted reshard to replicated, then each process reads its own
  replica (`jax.device_get` alone cannot fetch shards that live on other hosts)."""
  with jax.set_mesh(mesh):
    replicated = jax.jit(_identity, out_shardings=sharding.replicated(mesh))(tree)
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), replicated)


def _identity(tree):
  return tree


def export_model_dir(directory, kind: str, config: dict[str, Any], model: nnx.Module, mesh) -> None:
  """The multi-host export policy: gather on every process, process 0 writes into a temporary
  directory renamed to DIRECTORY when complete, then a barrier (no process goes on before the
  directory is whole)."""
  directory = paths.run_path(directory)
  graphdef, state = nnx.split(model)
  host_state = gather_to_host(state, mesh)
  if jax.process_index() == 0:
    if directory.exists():  # a rerun of a finished run exports again
      paths.rmtree(directory)
    paths.write_dir_atomically(directory, lambda tmp: save_model_dir(
        tmp, kind, config, nnx.merge(graphdef, host_state)))
  sharding.barrier(f"export {directory}")


def log_parameter_overview(name: str, params: Any) -> None:
  """clu's parameter table (names, shapes, sizes; no statistics: they would compute on every
  shard), logged once at start."""
  table = parameter_overview.get_parameter_overview(nnx.to_pure_dict(params), include_stats=False)
  log.info("%s parameters:\n%s", name, table)


class Driver:
  """One training run in `workdir`: `Driver(c, workdir, validate)` prepares, `run(...)` resumes,
  trains and exports. `validate(c, num_devices)` raises on config mistakes (naming the key)."""

  def __init__(self, c: ml_collections.ConfigDict, workdir, validate: Callable):
    sharding.maybe_initialize_distributed(c)
    validate(c, jax.device_count())
    self.config = c
    self.workdir = paths.run_path(workdir)  # local, or gs://... (etils.epath)
    if jax.process_index() == 0:
      self.workdir.mkdir(parents=True, exist_ok=True)
      (self.workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
    sharding.barrier("workdir")
    self.mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    self.writer = create_writer(self.workdir, process_index=jax.process_index())

  def run(self, *, state: Any, state_shardings: Any, step_fn: Callable, data_iterator,
          batches: Iterator, num_steps: int, export: ExportFn, hooks: Sequence[Hook] = ()) -> Any:
    """Trains `state` (restored from the newest checkpoint if there is one) to `num_steps`
    with `step_fn(state, batch) -> (state, metrics)`, then exports. Returns the final state."""
    c = self.config
    ckpt = Checkpointer(self.workdir / "checkpoints", save_every=c.checkpoint.save_every,
                        keep=c.checkpoint.keep, async_save=c.checkpoint.async_save,
                        milestone_every=c.checkpoint.milestone_every)
    if ckpt.latest_step is not None:
      at, state = ckpt.restore(abstract_with_shardings(state, state_shardings), data_iterator)
      log.info("resumed from step %d", at)
    elif c.init_from:  # a fresh start from existing weights; the run's own checkpoints win
      state, _ = init_from_lib.initialize(state, c.init_from, TASK_KINDS[c.task], c.init_from_mode,
                                          c.init_from_step)
    hooks = [h for h in hooks if h.every > 0]
    kill_after = int(os.environ.get(KILL_AFTER_STEP_ENV, "0"))

    def after_step(step, state):
      for hook in hooks:
        if step % hook.every == 0:
          hook.fn(step, state)
      if kill_after and step == kill_after:
        ckpt.wait()
        os.kill(os.getpid(), signal.SIGKILL)

    callbacks = bool(hooks or kill_after)
    state = run_training(state, step_fn, batches, num_steps=num_steps, checkpointer=ckpt,
                         data_iterator=data_iterator, writer=self.writer, log_every=c.log_every,
                         every_n_steps=after_step if callbacks else None,
                         callback_every=1 if callbacks else 0)
    ckpt.close()
    if int(jax.device_get(state.step)) >= num_steps:
      directory = self.workdir / "export"
      kind, config, model = export(state)
      export_model_dir(directory, kind, config, model, self.mesh)
      log.info("exported the %s to %s", kind, directory)
    self.writer.close()
    return state
