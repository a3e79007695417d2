"""Loss curves as PNGs, drawn with PIL (no plotting library needed)."""
import json
import math
import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .. import paths

PANEL_W, PANEL_H, MARGIN = 360, 220, 44


def read_metrics(path, key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of `key` from a run's metrics.jsonl (rows without the key are skipped)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no metrics file at {path}")
  steps, values = [], []
  for line_no, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{line_no} is not JSON: {e}") from e
    if key in row:
      steps.append(row["step"])
      values.append(row[key])
  return np.asarray(steps, np.int64), np.asarray(values, np.float64)


def _fmt(v: float) -> str:
  return f"{v:.3g}"


def _panel(title: str, steps: Sequence[int], values: Sequence[float], x_label: str = "steps") -> Image.Image:
  img = Image.new("RGB", (PANEL_W, PANEL_H), "white")
  draw = ImageDraw.Draw(img)
  x0, y0, x1, y1 = MARGIN, 22, PANEL_W - 12, PANEL_H - 28
  draw.rectangle((x0, y0, x1, y1), outline=(160, 160, 160))
  draw.text((x0, 4), title, fill="black")
  pts = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
  if not pts:
    draw.text((x0 + 8, (y0 + y1) // 2), "no data", fill=(200, 0, 0))
    return img
  s = np.asarray([p[0] for p in pts], np.float64)
  v = np.asarray([p[1] for p in pts], np.float64)
  smin, smax = float(s.min()), float(max(s.max(), s.min() + 1))
  vmin, vmax = float(v.min()), float(v.max())
  if vmax - vmin < 1e-12:
    vmin, vmax = vmin - 0.5, vmax + 0.5
  px = x0 + (s - smin) / (smax - smin) * (x1 - x0)
  py = y1 - (v - vmin) / (vmax - vmin) * (y1 - y0)
  draw.line(list(zip(px.tolist(), py.tolist())), fill=(30, 90, 200), width=2)
  draw.text((2, y0), _fmt(vmax), fill="black")
  draw.text((2, y1 - 10), _fmt(vmin), fill="black")
  draw.text((x0, y1 + 4), str(int(smin)), fill="black")
  draw.text((x1 - 40, y1 + 4), f"{int(smax)} {x_label}", fill="black")
  return img


def save_curves(path, curves: dict[str, tuple[Sequence[int], Sequence[float]]],
                columns: int = 3, x_label: str = "steps") -> pathlib.Path:
  """One panel per named curve (title -> (steps, values)), `columns` panels per row."""
  if not curves:
    raise ValueError("save_curves needs at least one curve")
  panels: list[Image.Image] = [_panel(t, s, v, x_label) for t, (s, v) in curves.items()]
  rows = -(-len(panels) // columns)
  cols = min(columns, len(panels))
  sheet = Image.new("RGB", (cols * PANEL_W, rows * PANEL_H), "white")
  for i, p in enumerate(panels):
    sheet.paste(p, ((i % cols) * PANEL_W, (i // cols) * PANEL_H))
  path = paths.run_path(path)  # local or remote (gs://)
  path.parent.mkdir(parents=True, exist_ok=True)
  paths.save_image(sheet, path)
  return path
