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
from .common import (ConversionError, KeyMapping, find_run_dir, load_state_dict,
                     model_from_state_dict, read_run_configs, write_atomically)


def load_reference_config(run_dir) -> GPTConfig:
  run_dir = pathlib.Path(run_dir)
  config_json, config_yaml = read_run_configs(run_dir)
  try:
    return GPTConfig.from_reference(config_json, config_yaml)
  except (KeyError, TypeError, ValueError) as e:
    raise ConversionError(f"cannot build a GPT config from {run_dir}: {e}") from e


# ModelArgs fields the reference writes that a c2i GPT does not use.
_REFERENCE_ONLY_FIELDS = {"caption_dim": 2048, "model_type": "c2i", "max_batch_size": 32,
                          "max_seq_len": 2048}
CUSTOM_PRESET = "GPT-custom"


def reference_configs(cfg: GPTConfig) -> Tuple[Dict, Dict, Dict]:
  """(config.json, config.yaml, extra files: none) of a released run for `cfg`.

  Sizes of one of the reference's GPT_models presets get its name (load_ar_model loads it
  unchanged); other sizes get `gpt_model: GPT-custom` plus `gpt_model_dims`, which our converter
  reads and the reference reads once that name is registered in its GPT_models. Checked by
  reading it back."""
  import dataclasses
  from ..models.gpt import PRESETS
  config_json = dict(dataclasses.asdict(cfg), **_REFERENCE_ONLY_FIELDS)
  dims = (cfg.n_layer, cfg.n_head, cfg.dim)
  name = next((n for n, d in PRESETS.items() if d == dims), CUSTOM_PRESET)
  config_yaml = {"gpt_model": name, "gpt_type": "c2i", "cls_token_num": cfg.cls_token_num,
                 "num_classes": cfg.num_classes, "class_dropout_prob": cfg.class_dropout_prob}
  if name == CUSTOM_PRESET:
    config_yaml["gpt_model_dims"] = {"dim": cfg.dim, "n_layer": cfg.n_layer, "n_head": cfg.n_head}
  back = GPTConfig.from_reference(config_json, config_yaml)
  if back != cfg:
    raise ConversionError(f"this GPT config cannot be written in the reference's format: {cfg}")
  return config_json, config_yaml, {}


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


MAPPING = KeyMapping(torch_name, torch_shape)


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
  return model_from_state_dict(nnx.eval_shape(lambda: GPT(cfg, rngs=InitKeys(0))), MAPPING, state,
                               source, dtype)


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
