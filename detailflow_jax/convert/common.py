"""Reading untrusted PyTorch checkpoints and the one key-mapping core.

Checkpoints are untrusted input: `.pt` files are opened with `torch.load(weights_only=True)`
(no arbitrary unpickling), `.safetensors` with safetensors. Every source key must be consumed
and every target parameter filled; anything else is a `ConversionError` naming the key.

A model's mapping to the reference is a `KeyMapping`: our parameter path -> the reference's
state-dict key and shape. `model_from_state_dict` applies it one way (conversion) and
`state_dict_from_model` the other way (export), so both directions use the same table.
"""
import dataclasses
import importlib.util
import json
import pathlib
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import ml_dtypes
import numpy as np
import yaml
from flax import nnx
from safetensors import safe_open

from .. import paths
from ..weights.model_dir import save_model_dir

# Wrappers that DDP/FSDP/torch.compile put in front of parameter names.
_WRAPPER_PREFIXES = ("module.", "_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")
_CONTAINER_KEYS = ("model", "ema", "module", "state_dict")


class ConversionError(ValueError):
  """A checkpoint or config that cannot be converted; the message names the culprit."""


def _to_numpy(name: str, tensor) -> np.ndarray:
  import torch  # Only needed to read .pt files.
  if not isinstance(tensor, torch.Tensor):
    raise ConversionError(f"entry {name!r} is a {type(tensor).__name__}, not a tensor")
  if tensor.dtype in (torch.bfloat16, torch.float16):
    tensor = tensor.float()
  return tensor.detach().cpu().numpy()


def _strip_wrappers(key: str) -> str:
  changed = True
  while changed:
    changed = False
    for prefix in _WRAPPER_PREFIXES:
      if key.startswith(prefix):
        key, changed = key[len(prefix):], True
    key = key.replace("._fsdp_wrapped_module.", ".").replace("._checkpoint_wrapped_module.", ".")
  return key


def _load_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  out = {}
  try:
    # The numpy framework cannot represent bfloat16; go through torch when it is there.
    framework = "pt" if importlib.util.find_spec("torch") is not None else "numpy"
    with safe_open(str(path), framework=framework) as f:
      for key in f.keys():
        value = f.get_tensor(key)
        out[key] = _to_numpy(key, value) if framework == "pt" else np.asarray(value)
  except ConversionError:
    raise
  except Exception as e:  # safetensors raises its own error types for truncated/corrupt files.
    raise ConversionError(f"cannot read safetensors file {path}: {e}") from e
  return out


def _load_pt(path: pathlib.Path, weights: str) -> dict[str, np.ndarray]:
  import torch  # Only needed to read .pt files.
  try:
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise ConversionError(
        f"refusing to load {path}: it is not a plain tensor checkpoint (weights_only load "
        f"failed: {str(e).splitlines()[0]})") from e
  except Exception as e:
    raise ConversionError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")
  state = None
  if weights in obj and isinstance(obj[weights], Mapping):
    state = obj[weights]
  elif weights in ("ema", "discriminator") and weights not in obj:
    raise ConversionError(f"{path} has no {weights!r} weights (top-level keys: {sorted(obj)[:8]})")
  else:
    for key in _CONTAINER_KEYS:
      if key in obj and isinstance(obj[key], Mapping):
        state = obj[key]
        break
  if state is None:
    state = obj  # A bare state dict.
  return {k: _to_numpy(k, v) for k, v in state.items()}


def weight_sets(path) -> tuple[str, ...]:
  """Which of "model" / "ema" a checkpoint holds: ("model",) for .safetensors and bare state
  dicts. A .pt is memory-mapped, so this reads the pickle, not the tensors."""
  path = pathlib.Path(path)
  if path.suffix == ".safetensors":
    return ("model",)
  import torch
  try:
    try:
      obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) .pt files cannot be memory-mapped
      obj = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:
    raise ConversionError(f"cannot read checkpoint {path}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")
  found = tuple(k for k in ("model", "ema") if isinstance(obj.get(k), Mapping))
  return found or ("model",)


def load_state_dict(path, weights: str = "model") -> dict[str, np.ndarray]:
  """Loads a PyTorch state dict as float32/int numpy arrays with wrapper prefixes removed.

  Args:
    path: `.pt`/`.pth`/`.bin` (torch.save of {"model"|"ema"|"module"|"state_dict": sd} or a bare
      sd) or `.safetensors`.
    weights: "model" or "ema": which of the two the released `.pt` files carry;
      "discriminator": a tokenizer training checkpoint's discriminator state.
  """
  path = pathlib.Path(path)
  if weights not in ("model", "ema", "discriminator"):
    raise ConversionError(f"--weights must be 'model' or 'ema', got {weights!r}")
  if not path.is_file():
    raise ConversionError(f"checkpoint file not found: {path}")
  if path.suffix == ".safetensors":
    if weights != "model":
      raise ConversionError(f"{path}: .safetensors files hold a single state dict; use --weights model")
    raw = _load_safetensors(path)
  else:
    raw = _load_pt(path, weights)
  out = {}
  for key, value in raw.items():
    clean = _strip_wrappers(key)
    if clean in out:
      raise ConversionError(f"{path}: two entries map to the key {clean!r}")
    out[clean] = value
  return out


class StateDictReader:
  """Hands out state-dict entries by key and remembers which were used."""

  def __init__(self, state: Mapping[str, np.ndarray], source: str = "checkpoint"):
    self._state = dict(state)
    self._used = set()
    self.source = source

  def __contains__(self, key: str) -> bool:
    return key in self._state

  def keys(self):
    return self._state.keys()

  def take(self, key: str, shape: Sequence[int] | None = None) -> np.ndarray:
    if key not in self._state:
      raise ConversionError(f"{self.source}: missing key {key!r}"
                            + (f" (expected shape {tuple(shape)})" if shape is not None else ""))
    value = self._state[key]
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise ConversionError(f"{self.source}: key {key!r} has shape {tuple(value.shape)}, "
                            f"expected {tuple(shape)}")
    self._used.add(key)
    return value

  def skip(self, key: str) -> None:
    """Marks a key as deliberately unused (e.g. a usage-statistics buffer)."""
    self.take(key)

  def finish(self) -> None:
    unused = sorted(set(self._state) - self._used)
    if unused:
      shown = ", ".join(f"{k!r} {tuple(self._state[k].shape)}" for k in unused[:10])
      more = f" and {len(unused) - 10} more" if len(unused) > 10 else ""
      raise ConversionError(f"{self.source}: unexpected key(s) {shown}{more}")


def relayout(path: tuple, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """One array between the two layouts, either way: torch Linear weights are [out, in], flax
  kernels [in, out] (a transpose is its own inverse); every other difference is a reshape
  (leading singleton axes of token tables)."""
  if path[-1] == "kernel":
    value = value.T
  return np.ascontiguousarray(value.reshape(shape))


class KeyMapping(NamedTuple):
  """How a model's parameters are named and shaped in the reference's state dict."""
  name: Callable[[tuple], str]                          # our path -> reference key
  shape: Callable[[tuple, tuple[int, ...]], tuple[int, ...]]  # our path, our shape -> theirs
  # (our path, value in one layout, shape in the other) -> value in the other layout
  to_ours: Callable[[tuple, np.ndarray, tuple[int, ...]], np.ndarray] = relayout
  to_theirs: Callable[[tuple, np.ndarray, tuple[int, ...]], np.ndarray] = relayout


def float_dtype(name) -> np.dtype:
  """--dtype of a converted model: "float32" or "bfloat16" (error names the flag)."""
  if name in ("float32", np.float32):
    return np.dtype(np.float32)
  if name in ("bfloat16", ml_dtypes.bfloat16):
    return np.dtype(ml_dtypes.bfloat16)
  raise ConversionError(f"--dtype must be float32 or bfloat16, got {name!r}")


def model_from_state_dict(abstract_model, mapping: KeyMapping, state: Mapping[str, np.ndarray],
                          source: str, dtype="float32"):
  """Fills an abstract model (`nnx.eval_shape`) with exactly the weights of `state`: every key
  used, every parameter and buffer filled, shapes checked. Floating arrays take `dtype`
  ("float32" / "bfloat16"), the others keep the model's dtype."""
  dtype = float_dtype(dtype)
  reader = StateDictReader(state, source)
  graphdef, abstract = nnx.split(abstract_model)
  flat = []
  for path, var in nnx.to_flat_state(abstract):
    value = reader.take(mapping.name(path), mapping.shape(path, var.shape))
    target = dtype if np.issubdtype(var.dtype, np.floating) else var.dtype
    flat.append((path, var.replace(mapping.to_ours(path, value, var.shape).astype(target))))
  reader.finish()
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def state_dict_from_model(model, mapping: KeyMapping) -> dict[str, np.ndarray]:
  """The reference's state dict of `model` (numpy, keyed and shaped as the reference's).

  The reference's state dicts hold floating tensors only (its integer-valued codebook-usage
  buffer is a float tensor), so integer arrays are written as float32; floating arrays keep
  their dtype."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model)):
    value = np.asarray(jax.device_get(var[...]))
    if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
      value = value.astype(np.float32)
    key = mapping.name(path)
    if key in out:
      raise ConversionError(f"two parameters map to the reference key {key!r}")
    out[key] = mapping.to_theirs(path, value, mapping.shape(path, value.shape))
  return out


@dataclasses.dataclass(frozen=True)
class ReferenceFormat:
  """One model kind's released-checkpoint format: everything the generic conversion needs.

  kind: the model directory's kind ("gpt", "tokenizer"); build(cfg): the model (called only
  under nnx.eval_shape); read_config(run_dir): our config from the run's files."""
  kind: str
  build: Callable[[Any], Any]
  mapping: KeyMapping
  read_config: Callable[[pathlib.Path], Any]

  def abstract_model(self, cfg):
    return nnx.eval_shape(lambda: self.build(cfg))

  def expected_torch_keys(self, cfg) -> dict[str, tuple[int, ...]]:
    """The state-dict keys (and shapes) a reference checkpoint of `cfg` holds (abstract
    shapes: no weights allocated)."""
    return {self.mapping.name(p): self.mapping.shape(p, v.shape)
            for p, v in nnx.to_flat_state(nnx.state(self.abstract_model(cfg)))}

  def convert_state_dict(self, cfg, state: dict[str, np.ndarray], source: str, dtype="float32"):
    """A model holding exactly the weights of `state`: every key used, every parameter
    filled, shapes checked (errors name the key and both shapes)."""
    return model_from_state_dict(self.abstract_model(cfg), self.mapping, state, source, dtype)

  def convert(self, checkpoint, out, weights="model", config_dir=None, dtype="float32"):
    """`python -m detailflow_jax.convert KIND`: .pt/.safetensors + the run's configs -> an
    Orbax model directory at `out` (written atomically)."""
    float_dtype(dtype)  # a bad flag fails before any file is read
    state = load_state_dict(checkpoint, weights)
    cfg = self.read_config(find_run_dir(checkpoint, config_dir))
    model = self.convert_state_dict(cfg, state, source=str(checkpoint), dtype=dtype)
    return write_atomically(out, lambda tmp: save_model_dir(tmp, self.kind, cfg.to_dict(), model))


def write_atomically(out_dir, write: Callable[[pathlib.Path], None]) -> pathlib.Path:
  """paths.write_dir_atomically with an existing out_dir reported as a ConversionError (what the
  convert and export CLIs report as a bad request)."""
  return paths.write_dir_atomically(out_dir, write, exists_error=ConversionError)


def read_json(path) -> dict:
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConversionError(f"config file not found: {path}")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConversionError(f"config file {path} is not valid JSON: {e}") from e


def read_run_configs(run_dir) -> tuple[dict, dict]:
  """A released run's RUN/config.json (model arguments) and RUN/config.yaml (training args)."""
  run_dir = pathlib.Path(run_dir)
  config_json = read_json(run_dir / "config.json")
  yaml_path = run_dir / "config.yaml"
  if not yaml_path.is_file():
    raise ConversionError(f"config file not found: {yaml_path}")
  try:
    config_yaml = yaml.safe_load(yaml_path.read_text()) or {}
  except yaml.YAMLError as e:
    raise ConversionError(f"config file {yaml_path} is not valid YAML: {e}") from e
  return config_json, config_yaml


def find_run_dir(checkpoint, config_dir=None) -> pathlib.Path:
  """The released layout is RUN/checkpoints/X.pt with RUN/config.json beside `checkpoints/`."""
  if config_dir is not None:
    return pathlib.Path(config_dir)
  checkpoint = pathlib.Path(checkpoint).absolute()
  parent = checkpoint.parent
  return parent.parent if parent.name == "checkpoints" else parent
