"""Image I/O helpers: [-1, 1] float arrays <-> uint8 PNGs, grids of images, and the one
coarse-to-fine strip drawer (samples, reconstructions, the trainers' periodic PNGs, the demo)."""
import pathlib
from collections.abc import Callable, Sequence

import ml_dtypes
import numpy as np
from PIL import Image

from .. import paths
from ..data.transforms import center_crop_arr


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8 the way the reference's samplers write PNGs.

  uint8(clamp(127.5 * x + 128, 0, 255)): truncation with offset 128 (= round-half-up of 127.5x+127.5).
  bfloat16 pixels (a decode under bf16 autocast) are computed as torch does on a bf16 tensor:
  each op in float32, its result rounded to bfloat16 (so 127.5 x + 128 is rounded to a
  bfloat16 value, an integer above 128, before the truncation); other dtypes in float32.
  """
  x = np.asarray(images)
  if x.dtype == ml_dtypes.bfloat16:
    bf16 = ml_dtypes.bfloat16
    scaled = (np.float32(127.5) * x.astype(np.float32)).astype(bf16)
    shifted = (scaled.astype(np.float32) + np.float32(128.0)).astype(bf16)
    return np.clip(shifted.astype(np.float32), 0, 255).astype(np.uint8)
  x = x.astype(np.float32)
  return np.clip(127.5 * x + 128.0, 0, 255).astype(np.uint8)


def load_image(path, size: int = None) -> np.ndarray:
  """Reads an image file as float32 HWC in [-1, 1] (RGB), optionally center-cropped to `size`.

  float32(u8 / 127.5 - 1) computed in float64, as the fixtures define it.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"image not found: {path}")
  try:
    with Image.open(path) as img:
      img = img.convert("RGB")
      if size is not None:
        arr = center_crop_arr(img, size)
      else:
        arr = np.asarray(img, dtype=np.uint8)
  except OSError as e:
    raise ValueError(f"cannot read image {path}: {e}") from e
  return (arr.astype(np.float64) / 127.5 - 1.0).astype(np.float32)


def save_grid(path, rows: Sequence[Sequence[np.ndarray]], pad: int = 2, background: int = 255) -> pathlib.Path:
  """Saves a grid PNG: rows of HWC [-1, 1] images; smaller images are centred in their cell.

  Images of different sizes may share a row (coarse-to-fine strips); each is shown at its own
  size so that the resolution a partial decode stands for stays visible.
  """
  path = paths.run_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  paths.save_image(Image.fromarray(grid_canvas(rows, pad, background)), path)
  return path


def grid_canvas(rows: Sequence[Sequence[np.ndarray]], pad: int = 2, background: int = 255) -> np.ndarray:
  """The uint8 HWC canvas save_grid writes (for callers that show it instead of saving it).
  uint8 images are placed as they are (already converted: to_uint8 of an enlarged image costs
  the enlargement's square)."""
  if not rows or not any(len(r) for r in rows):
    raise ValueError("save_grid needs at least one image")
  cell_h = max(img.shape[0] for row in rows for img in row)
  cell_w = max(img.shape[1] for row in rows for img in row)
  ncols = max(len(r) for r in rows)
  height = len(rows) * cell_h + (len(rows) + 1) * pad
  width = ncols * cell_w + (ncols + 1) * pad
  canvas = np.full((height, width, 3), background, dtype=np.uint8)
  for r, row in enumerate(rows):
    for c, img in enumerate(row):
      img8 = img if img.dtype == np.uint8 else to_uint8(img)
      h, w = img8.shape[:2]
      top = pad + r * (cell_h + pad) + (cell_h - h) // 2
      left = pad + c * (cell_w + pad) + (cell_w - w) // 2
      canvas[top:top + h, left:left + w] = img8
  return canvas


def enlarge_nearest(image: np.ndarray, size: int) -> np.ndarray:
  """Integer-factor-free nearest-neighbour enlargement of an HWC image to size x size."""
  h, w = image.shape[:2]
  rows = (np.arange(size) * h) // size
  cols = (np.arange(size) * w) // size
  return image[rows][:, cols]


def coarse_to_fine_counts(token_list: Sequence[int], num_tokens: int) -> list[int]:
  """Token counts a strip shows: every boundary of the schedule (1 .. causal_len one by one,
  then each group) up to `num_tokens`, and `num_tokens` itself."""
  counts = [t for t in token_list if t <= num_tokens]
  if not counts or counts[-1] != num_tokens:
    counts.append(num_tokens)
  return counts


def coarse_to_fine_strips(decode: Callable[[int], np.ndarray], counts: Sequence[int], size: int,
                          inputs: np.ndarray | None = None) -> list[list[np.ndarray]]:
  """One row per image: (its input, then) the decode of its first t tokens for every t in
  `counts`, each decoded at the resolution t stands for and enlarged (nearest) to size x size,
  so the coarse decodes' pixels stay visible. `decode(t)` decodes the whole batch at once:
  -> [B, s_t, s_t, 3] in [-1, 1] (clipped here). Rows for save_grid."""
  columns = [np.clip(np.asarray(decode(t), np.float32), -1, 1) for t in counts]
  rows = [[enlarge_nearest(c[b], size) for c in columns] for b in range(len(columns[0]))]
  if inputs is not None:
    rows = [[enlarge_nearest(np.asarray(x, np.float32), size)] + row for x, row in zip(inputs, rows)]
  return rows
