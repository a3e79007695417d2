"""Our models and training runs in the PyTorch reference's released format, or in our converted
layout (see `python -m detailflow_jax.export --help` for the files written). The state dicts are
our parameters through the same key tables the converters read them with, so the converter reads
an export back to identical weights."""
import dataclasses
import json
import pathlib
from typing import Any

import jax
import numpy as np
import yaml
from flax import nnx

from .. import __version__, paths
from ..convert import gpt as gpt_format
from ..convert import tokenizer as tokenizer_format
from ..convert.common import ConversionError, state_dict_from_model, write_atomically
from ..models.config_mapping import gpt_config_from
from ..models.gpt import GPT
from ..models.keys import InitKeys
from ..models.tokenizer import Tokenizer, TokenizerConfig
from .hub import DEFAULT_WEIGHTS, SOURCE_FILE
from .load import load_model_dir
from .model_dir import is_model_dir, save_model_dir
from .saved_steps import read_saved_step

# kind -> the module that reads and writes the reference's format for it.
REFERENCE_FORMATS = {"tokenizer": tokenizer_format, "gpt": gpt_format}


@dataclasses.dataclass
class ExportSource:
  kind: str                    # "tokenizer" | "gpt"
  weights: dict[str, Any]      # "model" (and "ema") -> nnx module
  step: int | None
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
  if kind == "gpt":
    cfg = gpt_config_from(c)
    return nnx.eval_shape(lambda: GPT(cfg, rngs=InitKeys(0)))
  cfg = dataclasses.replace(TokenizerConfig.from_dict(c.model), global_token_loss_weight=0.0,
                            repa=False, teacher=None)
  return nnx.eval_shape(lambda: Tokenizer(cfg, rngs=0))


def source_from_workdir(workdir, step: int | None = None) -> ExportSource:
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


def choose_weights(source: ExportSource, weights: str | None) -> str:
  if weights is not None:
    if weights not in source.weights:
      raise ValueError(f"{source.origin} has no {weights!r} weights (it has: "
                       f"{', '.join(source.weights)})")
    return weights
  default = DEFAULT_WEIGHTS[source.kind]
  return default if default in source.weights else "model"


def _torch_state(state: dict[str, np.ndarray]):
  import torch
  out = {}
  for key, value in state.items():
    if value.dtype.name == "bfloat16":
      out[key] = torch.from_numpy(value.view(np.uint16).copy()).view(torch.bfloat16)
    else:
      out[key] = torch.from_numpy(np.ascontiguousarray(value).copy())
  return out


def write_reference(source: ExportSource, out, weights: str | None = None,
                    name: str | None = None) -> pathlib.Path:
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
    for filename, content in extra_files.items():  # bytes, by path relative to RUN
      (tmp / filename).parent.mkdir(parents=True, exist_ok=True)
      (tmp / filename).write_bytes(content)
    (tmp / "checkpoints").mkdir()
    # Through file objects: torch and safetensors open local files only (tmp may be gs://...).
    with (tmp / "checkpoints" / f"{name}.pt").open("wb") as f:
      torch.save(states, f)
    (tmp / "checkpoints" / f"{name}.safetensors").write_bytes(
        safetensors_bytes(states[chosen], metadata=metadata))

  return write_atomically(out, write)


def write_model_dir(source: ExportSource, out, weights: str | None = None) -> pathlib.Path:
  model = source.weights[choose_weights(source, weights)]
  return write_atomically(out, lambda tmp: save_model_dir(tmp, source.kind, model.config.to_dict(), model))
