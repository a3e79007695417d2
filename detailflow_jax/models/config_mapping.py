"""Config sections -> model config dataclasses (big_vision passes `config.model` straight on).

A key the dataclass does not have is an error naming it: no config field is silently ignored.
"""
import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from .gpt import PRESETS, GPTConfig

T = TypeVar("T")


def _plain(value: Any) -> Any:
  # ml_collections.ConfigDict (and FrozenConfigDict) -> nested dicts.
  return value.to_dict() if hasattr(value, "to_dict") and not dataclasses.is_dataclass(value) else value


def dataclass_from_mapping(cls: type[T], mapping: Mapping[str, Any], *, where: str = "model",
                           nested: dict[str, type] | None = None) -> T:
  """cls(**mapping), where the fields named in `nested` (field -> dataclass) are themselves
  built from mappings (None stays None). `where` names the section in error messages."""
  mapping = dict(_plain(mapping))
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(mapping) - known)
  if unknown:
    raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} for {cls.__name__} "
                     f"(known: {', '.join(sorted(known))})")
  for name, sub in (nested or {}).items():
    value = _plain(mapping.get(name))
    if isinstance(value, Mapping):
      mapping[name] = dataclass_from_mapping(sub, value, where=f"{where}.{name}")
  try:
    return cls(**mapping)
  except TypeError as e:  # a required field is missing
    raise ValueError(f"{where}: {e}") from e


GPT_FIELDS = tuple(f.name for f in dataclasses.fields(GPTConfig))


def gpt_config_from(c) -> GPTConfig:
  """c.model (a GPT run config's section) -> GPTConfig: `preset` gives dim / n_layer / n_head,
  every other key is the GPTConfig field of its name (unset = None = GPTConfig's default);
  unknown keys are errors."""
  m = _plain(c.model)
  preset = m.pop("preset", "")
  unknown = sorted(set(m) - set(GPT_FIELDS))
  if unknown:
    raise ValueError(f"model.{unknown[0]} is not a GPTConfig field (fields: {', '.join(GPT_FIELDS)})")
  fields = {k: v for k, v in m.items() if v is not None}
  if preset:
    if preset not in PRESETS:
      raise ValueError(f"model.preset={preset!r} is not a GPT preset (known: {', '.join(PRESETS)})")
    fields = {**dict(zip(("n_layer", "n_head", "dim"), PRESETS[preset])), **fields}
  else:
    missing = [k for k in ("dim", "n_layer", "n_head") if k not in fields]
    if missing:
      raise ValueError(f"model.preset is empty: set model.{', model.'.join(missing)}")
  try:
    return GPTConfig(**fields)
  except ValueError as e:  # GPTConfig's own checks name the field; here it is a config key
    raise ValueError(f"model.{e}") from None
