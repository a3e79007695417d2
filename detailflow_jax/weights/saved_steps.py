"""A training run's saved steps: which steps of a workdir are finished, and the arrays of one
(params, EMA, discriminator and their buffers) read to host memory, plus the task registry
(a run's `config.json` task -> the kind of model it trains). Read by the export, `init_from`
and the run driver."""
import dataclasses
import json
import logging
import pathlib
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from .. import paths
from ..convert.common import ConversionError

# A run config's `task` -> the kind of model it trains ("tokenizer" | "gpt").
TASK_KINDS = {"ar": "gpt", "tokenizer": "tokenizer"}


def workdir_steps(workdir) -> list[int]:
  """Steps with a finished Orbax checkpoint in workdir/checkpoints, oldest first. (On gs://
  Orbax writes a step in place and marks it finished last, with commit_success.txt: a step
  directory alone may be one still being written, or one a crash cut short.)"""
  root = paths.run_path(workdir) / "checkpoints"
  if not root.is_dir():
    return []
  return sorted(int(p.name) for p in root.iterdir()
                if p.name.isdigit() and (p / "state").is_dir() and ocp.step.is_path_finalized(p))


def _merge_trees(a: dict, b: dict) -> dict:
  out = dict(a)
  for key, value in b.items():
    out[key] = _merge_trees(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
  return out


def _unwrapped(node):
  """Orbax stores an nnx Variable as {"value": array}: the tree with each such dict replaced
  by its array."""
  while isinstance(node, dict) and set(node) == {"value"}:
    node = node["value"]
  return {k: _unwrapped(v) for k, v in node.items()} if isinstance(node, dict) else node


SAVED_GROUPS = ("params", "extras", "ema_params", "disc_params", "disc_extras")
# The non-trainable state (buffers) that completes each set of weights; the EMA shares the model's.
_EXTRAS_OF = {"params": "extras", "ema_params": "extras", "disc_params": "disc_extras"}


@dataclasses.dataclass
class SavedStep:
  """The arrays of one saved step of a training run, as Orbax stores them (nested dicts with
  string keys, nnx Variables as {"value": array}), read to host memory."""
  config: Any                  # the run's ml_collections.ConfigDict (workdir/config.json)
  kind: str                    # "tokenizer" | "gpt"
  step: int
  path: pathlib.Path           # .../checkpoints/STEP/state
  arrays: dict[str, Any]       # the saved subset of params / extras / ema_params / disc_params / disc_extras

  def weights(self, group: str = "params") -> dict | None:
    """One module's weights as nested dicts of arrays (string keys): `group` (params,
    ema_params or disc_params) with its buffers (extras / disc_extras) merged in, Variable
    wrappers removed. None when the run did not save `group` (no EMA, no discriminator)."""
    if not self.arrays.get(group):
      return None
    return _merge_trees(_unwrapped(self.arrays.get(_EXTRAS_OF[group]) or {}),
                        _unwrapped(self.arrays[group]))


def read_saved_step(workdir, step: int | None = None,
                    groups: tuple[str, ...] = ("params", "extras", "ema_params")) -> SavedStep:
  """The `groups` of the train state saved at `step` (default: the newest) of a training run,
  on the host's CPU device; groups the run did not save are absent."""
  workdir = paths.run_path(workdir)
  if not (workdir / "config.json").is_file():
    raise FileNotFoundError(f"{workdir} is not a training workdir: no config.json")
  c = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  kind = TASK_KINDS.get(c.get("task"))
  if kind is None:
    raise ValueError(f"{workdir}/config.json: task {c.get('task')!r} (known: {', '.join(TASK_KINDS)})")
  steps = workdir_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"{workdir}/checkpoints holds no finished checkpoint")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ValueError(f"{workdir}: no checkpoint of step {step} (saved steps: "
                     f"{', '.join(map(str, steps))})")
  path = workdir / "checkpoints" / str(step) / "state"
  checkpointer = ocp.PyTreeCheckpointer()
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)  # "no _CHECKPOINT_METADATA" for a manager's item: expected
  try:
    meta = checkpointer.metadata(path)
  finally:
    absl_log.setLevel(level)
  tree = getattr(meta, "item_metadata", meta)
  wanted = {k: tree[k] for k in groups if tree.get(k)}
  device = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), wanted)
  args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=device, global_shape=s.shape, dtype=s.dtype),
                      target)
  try:
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=args, partial_restore=True))
  except Exception as e:
    raise ConversionError(f"{path}: cannot read the saved train state "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
  return SavedStep(c, kind, step, path, restored)
