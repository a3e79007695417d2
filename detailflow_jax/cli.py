"""What the command-line tools share: integer-list flags (`--labels 207,360`, `--num-tokens
1,4,16`, `--seeds 0,1`), parsed with errors that name the flag."""
from typing import List, Optional


def int_list(text: str, flag: str, *, low: Optional[int] = None, high: Optional[int] = None,
             distinct: bool = False) -> List[int]:
  """Comma-separated integers, each in [low, high] (an open end where None), all different
  with distinct=True. Raises ValueError naming `flag` and the offending values."""
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None
  if not values:
    raise ValueError(f"{flag} is empty")
  bad = [v for v in values if (low is not None and v < low) or (high is not None and v > high)]
  if bad:
    bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
    raise ValueError(f"{flag} values {bad} are outside {bounds}")
  if distinct and len(set(values)) != len(values):
    raise ValueError(f"{flag} values must be distinct, got {text!r}")
  return values
