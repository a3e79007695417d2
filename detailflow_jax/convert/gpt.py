"""Released DetailFlow GPT (PyTorch) -> our GPT, key for key.

Layout of a released run: RUN/checkpoints/X.pt with RUN/config.json (the GPT ModelArgs) and
RUN/config.yaml (training args; its `gpt_model` preset name decides dim/n_layer/n_head, as in
the reference's load_ar_model). The GPT has no buffers: RoPE tables and the mask come from the
config.
"""
import dataclasses
import pathlib

import numpy as np

from ..models.gpt import GPT, PRESETS, Attention, GPTConfig
from ..models.keys import InitKeys
from .common import ConversionError, KeyMapping, ReferenceFormat, read_run_configs, relayout


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


def reference_configs(cfg: GPTConfig) -> tuple[dict, dict, dict]:
  """(config.json, config.yaml, extra files: none) of a released run for `cfg`.

  Sizes of one of the reference's GPT_models presets get its name (load_ar_model loads it
  unchanged); other sizes get `gpt_model: GPT-custom` plus `gpt_model_dims`, which our converter
  reads and the reference reads once that name is registered in its GPT_models. Checked by
  reading it back."""
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


def torch_name(path: tuple) -> str:
  """Our parameter path -> the reference's state-dict key."""
  parts = [str(p) for p in path]
  if parts == ["spe_tok_embeddings"]:
    return "spe_tok_embeddings.special_embeddings.weight"
  if parts[-1] in ("kernel", "embedding"):
    parts[-1] = "weight"
  return ".".join(parts)


def _is_qkv(path: tuple) -> bool:
  return len(path) >= 2 and path[-2:] == ("wqkv", "kernel")


def torch_shape(path: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
  if _is_qkv(path):  # ours [dim, K, R + 2, hd] (see models.gpt.Attention) -> [(H + 2K) hd, dim]
    dim, kv, groups, hd = shape
    return (kv * groups * hd, dim)
  return tuple(reversed(shape)) if path[-1] == "kernel" else tuple(shape)


def _to_ours(path: tuple, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if _is_qkv(path):
    return np.ascontiguousarray(Attention.group_qkv(value.T, shape[1], shape[3]))
  return relayout(path, value, shape)


def _to_theirs(path: tuple, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if _is_qkv(path):
    return np.ascontiguousarray(Attention.fuse_qkv(value).T)
  return relayout(path, value, shape)


MAPPING = KeyMapping(torch_name, torch_shape, to_ours=_to_ours, to_theirs=_to_theirs)
FORMAT = ReferenceFormat("gpt", lambda cfg: GPT(cfg, rngs=InitKeys(0)), MAPPING,
                         load_reference_config)
expected_torch_keys = FORMAT.expected_torch_keys
convert_state_dict = FORMAT.convert_state_dict
convert_gpt = FORMAT.convert
