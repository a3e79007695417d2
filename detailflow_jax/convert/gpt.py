"""Released DetailFlow GPT (PyTorch) -> our GPT, key for key.

Layout of a released run: RUN/checkpoints/X.pt with RUN/config.json (the GPT ModelArgs) and
RUN/config.yaml (training args; its `gpt_model` preset name decides dim/n_layer/n_head, as in
the reference's load_ar_model). The GPT has no buffers: RoPE tables and the mask come from the
config.
"""
import pathlib
from typing import Dict, Tuple

import numpy as np
from flax import nnx

from ..model_dir import save_model_dir
from ..models.gpt import GPT, GPTConfig
from ..models.keys import InitKeys
from .common import (ConversionError, StateDictReader, find_run_dir, load_state_dict,
                     read_run_configs, write_atomically)


def load_reference_config(run_dir) -> GPTConfig:
  run_dir = pathlib.Path(run_dir)
  config_json, config_yaml = read_run_configs(run_dir)
  try:
    return GPTConfig.from_reference(config_json, config_yaml)
  except (KeyError, TypeError, ValueError) as e:
    raise ConversionError(f"cannot build a GPT config from {run_dir}: {e}") from e


def torch_name(path: Tuple) -> str:
  """Our parameter path -> the reference's state-dict key."""
  parts = [str(p) for p in path]
  if parts == ["spe_tok_embeddings"]:
    return "spe_tok_embeddings.special_embeddings.weight"
  if parts[-1] in ("kernel", "embedding"):
    parts[-1] = "weight"
  return ".".join(parts)


def torch_shape(path: Tuple, shape: Tuple[int, ...]) -> Tuple[int, ...]:
  return tuple(reversed(shape)) if path[-1] == "kernel" else tuple(shape)


def abstract_state(cfg: GPTConfig):
  """Flat (path, abstract Variable) pairs of a GPT of `cfg`, without allocating weights."""
  model = nnx.eval_shape(lambda: GPT(cfg, rngs=InitKeys(0)))
  return nnx.to_flat_state(nnx.state(model))


def expected_torch_keys(cfg: GPTConfig) -> Dict[str, Tuple[int, ...]]:
  """The state-dict keys (and shapes) a reference checkpoint of this config holds."""
  return {torch_name(p): torch_shape(p, v.shape) for p, v in abstract_state(cfg)}


def convert_state_dict(cfg: GPTConfig, state: Dict[str, np.ndarray], source: str,
                       dtype="float32") -> GPT:
  """A GPT holding exactly the weights of `state`: every key used, every parameter filled,
  shapes checked (errors name the key and both shapes)."""
  reader = StateDictReader(state, source)
  model = nnx.eval_shape(lambda: GPT(cfg, rngs=InitKeys(0)))
  graphdef, abstract = nnx.split(model)
  flat = []
  for path, var in nnx.to_flat_state(abstract):
    value = reader.take(torch_name(path), torch_shape(path, var.shape))
    if path[-1] == "kernel":
      value = value.T
    target = np.dtype(dtype) if np.issubdtype(var.dtype, np.floating) else var.dtype
    flat.append((path, var.replace(np.ascontiguousarray(value).astype(target))))
  reader.finish()
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def convert_gpt(checkpoint, out, weights="model", config_dir=None, dtype="float32"):
  """`python -m detailflow_jax.convert gpt`: .pt/.safetensors + configs -> Orbax DIR."""
  if dtype not in ("float32", "bfloat16"):
    raise ConversionError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
  cfg = load_reference_config(find_run_dir(checkpoint, config_dir))
  state = load_state_dict(checkpoint, weights)
  if dtype == "bfloat16":
    import ml_dtypes
    dtype = ml_dtypes.bfloat16
  model = convert_state_dict(cfg, state, source=str(checkpoint), dtype=dtype)
  return write_atomically(out, lambda tmp: save_model_dir(tmp, "gpt", cfg.to_dict(), model))
