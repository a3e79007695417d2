"""Config sections -> model config dataclasses (big_vision passes `config.model` straight on).

A key the dataclass does not have is an error naming it: no config field is silently ignored.
"""
import dataclasses
from typing import Any, Dict, Mapping, Optional, Type, TypeVar

T = TypeVar("T")


def _plain(value: Any) -> Any:
  # ml_collections.ConfigDict (and FrozenConfigDict) -> nested dicts.
  return value.to_dict() if hasattr(value, "to_dict") and not dataclasses.is_dataclass(value) else value


def dataclass_from_mapping(cls: Type[T], mapping: Mapping[str, Any], *, where: str = "model",
                           nested: Optional[Dict[str, type]] = None) -> T:
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
