"""Per-image transforms: robust decoding, the reference's crops, flip, [-1, 1] scaling.

Decoding never raises on a bad file: it returns None and the caller substitutes another image
deterministically and counts the skip (see pipeline.py). Formats PIL can read are converted
(CMYK, grayscale, palette, RGBA -> RGB; a PNG named .JPEG decodes by content).
"""
import io
import logging
import math
import warnings

import numpy as np
from PIL import Image

log = logging.getLogger("detailflow_jax")


def decode_image(data, name: str = "?") -> Image.Image | None:
  """Encoded bytes (or an HWC uint8 array) -> RGB PIL image, or None with a warning naming
  the file when it cannot be read."""
  if isinstance(data, np.ndarray):  # already decoded (TFDS, procedural): only fix channels
    arr = data[..., None] if data.ndim == 2 else data
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or min(arr.shape[:2]) < 1:
      log.warning("skipping %s: not an image array (shape %s)", name, data.shape)
      return None
    arr = np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr[..., :3]
    return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))
  if not data:
    log.warning("skipping %s: empty or unreadable file", name)
    return None
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      img = Image.open(io.BytesIO(data))
      img.load()  # Truncated files fail here rather than later.
      if img.mode != "RGB":
        img = img.convert("RGB")
    return img
  except Exception as e:  # PIL raises many types for corrupt data.
    log.warning("skipping %s: cannot decode image (%s: %s)", name, type(e).__name__, e)
    return None


def center_crop_arr(img: Image.Image, size: int) -> np.ndarray:
  """ADM centre crop (the reference's eval transform): BOX-halve while >= 2x, BICUBIC so the
  short side is `size`, crop the centre. Works for images smaller than `size` (upsamples)."""
  while min(*img.size) >= 2 * size:
    img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
  scale = size / min(*img.size)
  img = img.resize(tuple(max(size, round(x * scale)) for x in img.size), resample=Image.BICUBIC)
  arr = np.asarray(img)
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  return arr[top:top + size, left:left + size]


def random_crop_arr(img: Image.Image, size: int, rng: np.random.Generator,
                    min_crop_frac: float = 0.8, max_crop_frac: float = 1.0) -> np.ndarray:
  """The reference's train crop: resize so the short side is uniform in
  [size / max_frac, size / min_frac], then a uniformly placed size x size crop."""
  lo = math.ceil(size / max_crop_frac)
  hi = math.ceil(size / min_crop_frac)
  short = int(rng.integers(lo, hi + 1))
  while min(*img.size) >= 2 * short:
    img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
  scale = short / min(*img.size)
  img = img.resize(tuple(max(size, round(x * scale)) for x in img.size), resample=Image.BICUBIC)
  arr = np.asarray(img)
  top = int(rng.integers(arr.shape[0] - size + 1))
  left = int(rng.integers(arr.shape[1] - size + 1))
  return arr[top:top + size, left:left + size]


def to_float(arr: np.ndarray) -> np.ndarray:
  """uint8 HWC -> float32 in [-1, 1] (ToTensor + Normalize(0.5, 0.5), computed in float32)."""
  x = arr.astype(np.float32, order="C")  # also materialises a flipped view in the same pass
  x /= 255.0  # in place, same float32 operations and rounding as the reference, fewer copies
  x -= 0.5
  x /= 0.5
  return x


def train_transform(img: Image.Image, size: int, rng: np.random.Generator, flip: bool = True) -> np.ndarray:
  arr = random_crop_arr(img, size, rng)
  if flip and rng.random() < 0.5:
    arr = arr[:, ::-1]
  return to_float(arr)


def eval_transform(img: Image.Image, size: int) -> np.ndarray:
  return to_float(center_crop_arr(img, size))
