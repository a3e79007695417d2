"""Starting a run from existing weights (`init_from`): the reference's `--vq-ckpt`/`--gpt-ckpt`
with `--finetune` (weights loaded, step 0, fresh optimizer).

`c.init_from` is
- a converted model directory (ours, e.g. another run's workdir/export) or anything
  `hub.resolve_model_dir` resolves (a released run directory / .pt file, a Hub id);
- a training workdir of ours (config.json + checkpoints/): the Orbax step `c.init_from_step`
  (-1: the newest).

`c.init_from_mode`:
- strict: every trainable parameter and buffer of the new run is in the source with the same
  shape (the reference's strict load_state_dict), else an error listing what is missing;
- partial: what matches by name and shape is loaded, the rest keeps its fresh init; a report of
  what was not loaded and of what the source had that the run does not use (names, shapes) is
  logged (the reference's load_partial_state_dict).

Only at a fresh start: a run that has checkpoints of its own resumes from them instead. The
EMA starts from the source's EMA when it has one (an Orbax step's ema_params, a released
checkpoint's "ema"), else from the loaded weights, as the reference's fine-tune does; an Orbax
tokenizer step's discriminator is loaded too (the reference loads checkpoint["discriminator"]).
"""
import dataclasses
import json
import logging
from typing import Any

import jax
import numpy as np
from flax import nnx

from .. import paths
from ..convert.common import ConversionError
from ..weights import saved_steps
from ..weights.hub import resolve_model_dir
from ..weights.load import load_model_dir
from ..weights.model_dir import is_model_dir

log = logging.getLogger("detailflow_jax")

MODES = ("strict", "partial")
# How many names a log line / error lists before "... and N more".
MAX_LISTED = 40

Flat = dict[str, np.ndarray]  # "a/b/0/kernel" -> array


@dataclasses.dataclass
class InitSource:
  """Flat host arrays of the weights to start from, by group of the train state."""
  model: Flat                  # parameters and buffers
  ema: Flat | None          # the source's own EMA, when it has one
  disc: Flat | None         # discriminator parameters and buffers (Orbax tokenizer steps)
  origin: str


@dataclasses.dataclass
class InitReport:
  """What one group's load did: names (and shapes) loaded, not loaded, not used."""
  group: str
  loaded: list[str]
  missing: list[tuple[str, tuple]]                   # in the run, absent from the source
  mismatched: list[tuple[str, tuple, tuple]]         # (name, run's shape, source's shape)
  unused: list[tuple[str, tuple]]                    # in the source, not in the run

  def lines(self) -> list[str]:
    out = [f"{self.group}: loaded {len(self.loaded)} arrays"]
    for title, rows in (("not loaded (absent from the source; partial keeps the fresh init)",
                         [f"{n} {list(s)}" for n, s in self.missing]),
                        ("not loaded (shape differs; partial keeps the fresh init)",
                         [f"{n} run {list(a)} source {list(b)}" for n, a, b in self.mismatched]),
                        ("not used (in the source, not in this run)",
                         [f"{n} {list(s)}" for n, s in self.unused])):
      if rows:
        out.append(f"{self.group}: {len(rows)} {title}:")
        out += [f"  - {r}" for r in rows[:MAX_LISTED]]
        if len(rows) > MAX_LISTED:
          out.append(f"  ... and {len(rows) - MAX_LISTED} more")
    return out


def _key(path) -> str:
  return "/".join(str(getattr(p, "key", p)) for p in path)


def flat_of_pure(tree: Any) -> Flat:
  """Nested dicts of arrays (nnx pure dicts, SavedStep.weights) by "a/b/0/kernel"."""
  out = {}

  def walk(node, prefix):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(v, prefix + (str(k),))
    elif node is not None:
      out["/".join(prefix)] = np.asarray(node)
  walk(tree, ())
  return out


def _module_flat(module: nnx.Module) -> Flat:
  return flat_of_pure(nnx.to_pure_dict(nnx.state(module)))


def _is_workdir(path) -> bool:
  """A training workdir of ours: config.json names a task (a released run's config.json, beside
  its checkpoints/*.pt, holds model fields only)."""
  if not ((path / "config.json").is_file() and (path / "checkpoints").is_dir()) or is_model_dir(path):
    return False
  try:
    return "task" in json.loads((path / "config.json").read_text())
  except (json.JSONDecodeError, UnicodeDecodeError):
    return False


def read_source(spec: str, kind: str, step: int = -1) -> InitSource:
  """The weights `spec` names (see the module docstring), as flat host arrays."""
  path = paths.run_path(spec)
  if path.is_dir() and _is_workdir(path):
    saved = saved_steps.read_saved_step(path, None if step < 0 else step,
                                        groups=saved_steps.SAVED_GROUPS)
    if saved.kind != kind:
      raise ValueError(f"init_from={spec}: that run trains a {saved.kind}, this one a {kind}")
    model, ema, disc = (None if w is None else flat_of_pure(w) for w in
                        map(saved.weights, ("params", "ema_params", "disc_params")))
    return InitSource(model, ema, disc, f"{path} step {saved.step}")
  if step >= 0:
    raise ValueError(f"init_from_step={step} applies to a training workdir; init_from={spec} is not one")
  if path.is_dir() and is_model_dir(path):
    return InitSource(_module_flat(load_model_dir(path, kind)), None, None, str(path))
  # A released checkpoint (local or Hub): its "model" set, and its "ema" set when it has one.
  model = _module_flat(load_model_dir(resolve_model_dir(spec, kind, "model"), kind))
  try:
    ema = _module_flat(load_model_dir(resolve_model_dir(spec, kind, "ema"), kind))
  except ConversionError as e:
    log.info("init_from=%s has no ema weights (%s): the EMA starts from the model weights", spec, e)
    ema = None
  return InitSource(model, ema, None, str(spec))


def match(target: nnx.State, source: Flat, group: str) -> tuple[dict[str, np.ndarray], InitReport]:
  """The source arrays that fit `target` by name and shape (cast to the target's dtype), and
  the report of the rest."""
  loaded, missing, mismatched = {}, [], []
  names = set()
  for path, var in nnx.to_flat_state(target):
    name = _key(path)
    names.add(name)
    have = source.get(name)
    if have is None:
      missing.append((name, tuple(var.shape)))
    elif tuple(have.shape) != tuple(var.shape):
      mismatched.append((name, tuple(var.shape), tuple(have.shape)))
    else:
      loaded[name] = have.astype(var.dtype)
  unused = [(n, tuple(v.shape)) for n, v in sorted(source.items()) if n not in names]
  return loaded, InitReport(group, sorted(loaded), missing, mismatched, unused)


def _placed(value: np.ndarray, like: jax.Array) -> jax.Array:
  """`value` with the sharding of `like`; each process fills only its own shards (works
  across hosts, where device_put of a host array to a global sharding does not)."""
  return jax.make_array_from_callback(value.shape, like.sharding, lambda index: value[index])


def _replace(target: nnx.State, values: dict[str, np.ndarray]) -> nnx.State:
  flat = []
  for path, var in nnx.to_flat_state(target):
    name = _key(path)
    flat.append((path, var.replace(_placed(values[name], var.get_value())) if name in values else var))
  return nnx.from_flat_state(flat)


def initialize(state: Any, spec: str, kind: str, mode: str = "strict", step: int = -1) -> tuple[Any, list[InitReport]]:
  """`state` (a freshly initialised TrainState / TokenizerTrainState, sharded) with the weights
  of `spec` in params / extras / ema_params (and disc_params / disc_extras when the source has
  a discriminator). Step, optimizer state and rng stay fresh. Returns (state, reports)."""
  if mode not in MODES:
    raise ValueError(f"init_from_mode={mode!r} (strict | partial)")
  source = read_source(spec, kind, step)
  model_target = nnx.merge_state(state.params, state.extras) if state.extras is not None else state.params
  model_values, model_report = match(model_target, source.model, "model")
  reports = [model_report]
  problems = model_report.missing + model_report.mismatched
  if mode == "strict" and problems:
    raise ValueError(
        f"init_from={spec} (init_from_mode=strict): {len(problems)} of the run's arrays are not in "
        f"the source with the same shape (set init_from_mode=partial to load what matches):\n"
        + "\n".join(model_report.lines()[1:]))
  updates = {"params": _replace(state.params, model_values)}
  if state.extras is not None:
    updates["extras"] = _replace(state.extras, model_values)
  if state.ema_params is not None:
    ema_values = dict(model_values)
    if source.ema is not None:
      ema_loaded, ema_report = match(state.ema_params, source.ema, "ema")
      ema_values.update({k: v for k, v in ema_loaded.items() if k in model_values})
      log.info("init_from: the EMA starts from the source's EMA (%d arrays)", len(ema_loaded))
    else:
      log.info("init_from: the source has no EMA; the EMA starts from the loaded weights")
    updates["ema_params"] = _replace(state.ema_params, ema_values)
  disc_params = getattr(state, "disc_params", None)
  if source.disc is not None and disc_params is not None:
    disc_target = nnx.merge_state(disc_params, state.disc_extras) if state.disc_extras is not None else disc_params
    disc_values, disc_report = match(disc_target, source.disc, "discriminator")
    reports.append(disc_report)
    if mode == "strict" and (disc_report.missing or disc_report.mismatched):
      raise ValueError(f"init_from={spec} (init_from_mode=strict): the discriminator does not "
                       "match:\n" + "\n".join(disc_report.lines()[1:]))
    updates["disc_params"] = _replace(disc_params, disc_values)
    if state.disc_extras is not None:
      updates["disc_extras"] = _replace(state.disc_extras, disc_values)
  level = logging.INFO if all(not (r.missing or r.mismatched or r.unused) for r in reports) else logging.WARNING
  log.log(level, "init_from %s (%s):\n%s", source.origin, mode,
          "\n".join(line for r in reports for line in r.lines()))
  return state.replace(**updates), reports
