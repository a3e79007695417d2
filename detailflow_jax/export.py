"""`python -m detailflow_jax.export`: our models and training runs in the PyTorch reference's
released format (or our converted layout).

  python -m detailflow_jax.export --model DIR --out RUN
  python -m detailflow_jax.export --workdir W [--step N] [--weights model|ema] --out RUN
  python -m detailflow_jax.export --workdir W --step N --format model_dir --out DIR

Sources: `--model DIR`, a converted model directory (one set of weights, stored as "model"), or
`--workdir W`, a training run of `launch/train.py` (its `config.json` names the task; the Orbax
train state of step N, default the newest, holds the `model` and, when trained with EMA, the
`ema` weights).

`--format reference` writes, atomically (a temporary directory renamed into place):
  RUN/config.json, RUN/config.yaml   what the reference's load_vq / load_ar_model read
  RUN/siglip2-so400m-patch16-naflex/ tokenizers: the SigLIP2 vision config the reference's
                                     builders take the tower widths from (load with
                                     CACHE_DATA_PATH=RUN; docs/export_reference.md)
  RUN/checkpoints/NAME.pt            torch.save({"model": sd, "ema": sd}) ("ema" when present)
  RUN/checkpoints/NAME.safetensors   one state dict (`--weights`; default: the GPT's ema, the
                                     tokenizer's model, as the reference evaluates), with
                                     metadata naming the producer, source, step and weights
NAME defaults to the step as the reference names checkpoints (0005000) or `model`. The state
dicts are our parameters through the same key tables the converters read them with, so the
converter reads the export back to identical weights.

`--format model_dir` writes one set of weights as our converted directory (`load_gpt(DIR)`).

Tokenizer runs export their inference model: the frozen SigLIP2 teacher and the alignment heads
exist only for training (the trainer's own workdir/export drops them too), so config.json says
repa false and global_token_loss_weight 0.
"""
import argparse
import dataclasses
import json
import logging
import pathlib
import sys
from typing import Any, Dict, List, Optional, Tuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import yaml
from flax import nnx

from . import __version__, paths
from .convert import gpt as gpt_format
from .convert import tokenizer as tokenizer_format
from .convert.common import ConversionError, state_dict_from_model, write_atomically
from .hub import DEFAULT_WEIGHTS, SOURCE_FILE
from .model_dir import is_model_dir, save_model_dir
from .models.gpt import GPT
from .models.keys import InitKeys
from .models.tokenizer import Tokenizer
from .pretrained import load_model_dir

# kind -> the module that reads and writes the reference's format for it.
REFERENCE_FORMATS = {"tokenizer": tokenizer_format, "gpt": gpt_format}

TASK_KINDS = {"ar": "gpt", "tokenizer": "tokenizer"}


@dataclasses.dataclass
class ExportSource:
  kind: str                    # "tokenizer" | "gpt"
  weights: Dict[str, Any]      # "model" (and "ema") -> nnx module
  step: Optional[int]
  origin: str                  # where it came from, for the metadata


def source_from_model_dir(directory) -> ExportSource:
  directory = paths.run_path(directory)
  if not is_model_dir(directory):
    raise FileNotFoundError(f"{directory} is not a converted model directory (config.json with a "
                            "model kind + params/)")
  try:
    kind = json.loads((directory / "config.json").read_text()).get("kind")
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{directory} is damaged: config.json is not valid JSON ({e})") from None
  if kind not in DEFAULT_WEIGHTS:
    raise ValueError(f"{directory}: config.json names the kind {kind!r}, not tokenizer or gpt")
  origin = str(directory)
  if (directory / SOURCE_FILE).is_file():  # a cached conversion: name what it came from
    record = json.loads((directory / SOURCE_FILE).read_text())
    origin += f" (converted from {record.get('source')}, {record.get('weights')} weights)"
  return ExportSource(kind, {"model": load_model_dir(directory, kind)}, None, origin)


def workdir_steps(workdir) -> List[int]:
  """Steps with a finished Orbax checkpoint in workdir/checkpoints, oldest first. (On gs://
  Orbax writes a step in place and marks it finished last, with commit_success.txt: a step
  directory alone may be one still being written, or one a crash cut short.)"""
  root = paths.run_path(workdir) / "checkpoints"
  if not root.is_dir():
    return []
  return sorted(int(p.name) for p in root.iterdir()
                if p.name.isdigit() and (p / "state").is_dir() and ocp.step.is_path_finalized(p))


def _pure_like(restored, like, where: str):
  """`restored` (SavedStep.weights: dicts with string keys) in the key structure of `like` (the
  model's pure dict); keys the model does not have are left out, missing ones are an error."""
  if not isinstance(like, dict):
    return restored
  if not isinstance(restored, dict):
    raise ConversionError(f"{where}: the checkpoint holds an array where the model has a module")
  out = {}
  for key, sub in like.items():
    if str(key) not in restored:
      raise ConversionError(f"{where}: the checkpoint has no {where}/{key}")
    out[key] = _pure_like(restored[str(key)], sub, f"{where}/{key}")
  return out


def _abstract_model(c, kind: str):
  """The inference model of a run's config, built abstractly (no weights allocated)."""
  # Imported here, not at the top: train/ imports this module (driver: TASK_KINDS, init_from:
  # read_saved_step), so a top-level import would be circular; and only workdir exports need
  # the recipe's config rules (and the training stack train.ar loads with them).
  if kind == "gpt":
    from .train.ar import gpt_config_from
    cfg = gpt_config_from(c)
    return nnx.eval_shape(lambda: GPT(cfg, rngs=InitKeys(0)))
  from .models.tokenizer import TokenizerConfig
  cfg = dataclasses.replace(TokenizerConfig.from_dict(c.model), global_token_loss_weight=0.0,
                            repa=False, teacher=None)
  return nnx.eval_shape(lambda: Tokenizer(cfg, rngs=0))


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
  arrays: Dict[str, Any]       # the saved subset of params / extras / ema_params / disc_params / disc_extras

  def weights(self, group: str = "params") -> Optional[dict]:
    """One module's weights as nested dicts of arrays (string keys): `group` (params,
    ema_params or disc_params) with its buffers (extras / disc_extras) merged in, Variable
    wrappers removed. None when the run did not save `group` (no EMA, no discriminator)."""
    if not self.arrays.get(group):
      return None
    return _merge_trees(_unwrapped(self.arrays.get(_EXTRAS_OF[group]) or {}),
                        _unwrapped(self.arrays[group]))


def read_saved_step(workdir, step: Optional[int] = None,
                    groups: Tuple[str, ...] = ("params", "extras", "ema_params")) -> SavedStep:
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


def source_from_workdir(workdir, step: Optional[int] = None) -> ExportSource:
  """The model (and EMA) weights of one saved step of a training run."""
  saved = read_saved_step(workdir, step)
  c, kind, step, path = saved.config, saved.kind, saved.step, saved.path
  workdir = paths.run_path(workdir)
  models = {}
  for name, params_key in (("model", "params"), ("ema", "ema_params")):
    weights = saved.weights(params_key)
    if weights is None:
      continue
    graphdef, state = nnx.split(_abstract_model(c, kind))
    like = nnx.to_pure_dict(state)
    pure = _pure_like(weights, like, f"{path}:{params_key}")
    for (p, want), have in zip(jax.tree_util.tree_leaves_with_path(like), jax.tree.leaves(pure)):
      if tuple(want.shape) != tuple(have.shape):
        raise ConversionError(f"{path}: {jax.tree_util.keystr(p)} has shape {have.shape}, the run's "
                              f"config builds {want.shape}")
    nnx.replace_by_pure_dict(state, jax.tree.map(np.asarray, pure))
    models[name] = nnx.merge(graphdef, state)
  return ExportSource(kind, models, step, f"{workdir} step {step}")


def choose_weights(source: ExportSource, weights: Optional[str]) -> str:
  if weights is not None:
    if weights not in source.weights:
      raise ValueError(f"{source.origin} has no {weights!r} weights (it has: "
                       f"{', '.join(source.weights)})")
    return weights
  default = DEFAULT_WEIGHTS[source.kind]
  return default if default in source.weights else "model"


def _torch_state(state: Dict[str, np.ndarray]):
  import torch
  out = {}
  for key, value in state.items():
    if value.dtype.name == "bfloat16":
      out[key] = torch.from_numpy(value.view(np.uint16).copy()).view(torch.bfloat16)
    else:
      out[key] = torch.from_numpy(np.ascontiguousarray(value).copy())
  return out


def write_reference(source: ExportSource, out, weights: Optional[str] = None,
                    name: Optional[str] = None) -> pathlib.Path:
  """RUN/config.json, RUN/config.yaml, RUN/checkpoints/NAME.{pt,safetensors} (see above)."""
  import torch  # Only needed to write .pt files.
  from safetensors.torch import save as safetensors_bytes
  reference = REFERENCE_FORMATS[source.kind]
  config_json, config_yaml, extra_files = reference.reference_configs(
      next(iter(source.weights.values())).config)
  chosen = choose_weights(source, weights)
  name = name or (f"{source.step:07d}" if source.step is not None else "model")
  mapping = reference.MAPPING
  states = {w: _torch_state(state_dict_from_model(m, mapping)) for w, m in source.weights.items()}
  metadata = {"format": "pt", "producer": f"detailflow_jax {__version__}", "kind": source.kind,
              "source": source.origin, "step": "unknown" if source.step is None else str(source.step),
              "weights": chosen}

  def write(tmp: pathlib.Path):
    (tmp / "config.json").write_text(json.dumps(config_json, indent=4))
    (tmp / "config.yaml").write_text(
        "# Written by detailflow_jax.export (the keys the reference's loaders read).\n"
        + yaml.safe_dump(config_yaml, sort_keys=False))
    for filename, content in extra_files.items():
      (tmp / filename).parent.mkdir(parents=True, exist_ok=True)
      (tmp / filename).write_bytes(content)
    (tmp / "checkpoints").mkdir()
    # Through file objects: torch and safetensors open local files only (tmp may be gs://...).
    with (tmp / "checkpoints" / f"{name}.pt").open("wb") as f:
      torch.save(states, f)
    (tmp / "checkpoints" / f"{name}.safetensors").write_bytes(
        safetensors_bytes(states[chosen], metadata=metadata))

  return write_atomically(out, write)


def write_model_dir(source: ExportSource, out, weights: Optional[str] = None) -> pathlib.Path:
  model = source.weights[choose_weights(source, weights)]
  return write_atomically(out, lambda tmp: save_model_dir(tmp, source.kind, model.config.to_dict(), model))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m detailflow_jax.export", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  where = parser.add_mutually_exclusive_group(required=True)
  where.add_argument("--workdir", help="a training run directory (launch/train.py --workdir)")
  where.add_argument("--model", help="a converted model directory")
  parser.add_argument("--step", type=int, default=None, help="--workdir: the saved step (default: newest)")
  parser.add_argument("--format", choices=["reference", "model_dir"], default="reference")
  parser.add_argument("--weights", choices=["model", "ema"], default=None,
                      help="the weights of the .safetensors file / the model_dir (default: GPT ema, "
                           "tokenizer model, when present); the .pt always holds every set")
  parser.add_argument("--name", default=None, help="checkpoint file name without suffix "
                                                   "(default: the step, 7 digits, or 'model')")
  parser.add_argument("--out", required=True, help="output directory (must not exist)")
  args = parser.parse_args(argv)
  if args.model and args.step is not None:
    parser.error("--step applies to --workdir")
  try:
    source = (source_from_workdir(args.workdir, args.step) if args.workdir
              else source_from_model_dir(args.model))
    chosen = choose_weights(source, args.weights)
    if args.format == "reference":
      out = write_reference(source, args.out, args.weights, args.name)
      print(f"wrote {out}: checkpoints/*.pt with {' + '.join(source.weights)} weights, "
            f".safetensors with the {chosen} weights ({source.kind}, {source.origin})")
    else:
      if args.name:
        parser.error("--name applies to --format reference")
      out = write_model_dir(source, args.out, args.weights)
      print(f"wrote {out} ({source.kind}, {chosen} weights of {source.origin})")
  except (ConversionError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
