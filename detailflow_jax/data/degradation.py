"""Per-batch multi-resolution degradation, done in the data workers (the reference's
resize_batch_img, get_input_output_img and get_noise_token_idx, in that order, once per batch).

Why per batch: the tokenizer's decoder runs on t tokens and renders a target of side
token2dec_out_res[t]; both are shapes/static arguments of the jitted step. Drawing one t (and one
input resolution) for the whole batch keeps every batch rectangular and the set of shapes small
and fixed, so each compiles once. `batch_shapes` enumerates that set for a configuration.

Shape counts (image side, target side) and (image side, t, target side) programs, degradation on,
no dynamic resolution:
  fixture (max 64 px, 32 tokens, group 4, patch 8) at 64 px:        8 shapes, 11 programs
  DetailFlow-16 (max 256 px, 128 tokens, group 8, patch 16) at 256: 14 shapes, 23 programs
Each enabled dynamic resolution r adds its own set (targets up to r); `adjust_batch_size` makes the
batch dimension depend on r as well. The self-correction `noise_idx` is a per-batch scalar, not a
shape.
"""
import dataclasses

import numpy as np

from ..ops.resize import resize_images
from ..schedule import ResolutionSchedule, closest_resolution


@dataclasses.dataclass(frozen=True)
class DynamicResolution:
  """The reference's dynamic-resolution batches: with probability `dynamic_prob` the batch is
  resized to a schedule resolution drawn uniformly from [min_size, max_size]; with probability
  `max_prob` to max_size; otherwise to `image_size`. Crops are made at max_size beforehand."""
  image_size: int
  min_size: int
  max_size: int
  dynamic_prob: float = 0.0
  max_prob: float = 0.0
  adjust_batch_size: bool = False  # the reference's adjust_bs_by_resolution (fewer big images)

  def __post_init__(self):
    if not (0 <= self.dynamic_prob <= 1 and 0 <= self.max_prob <= 1
            and self.dynamic_prob + self.max_prob <= 1):
      raise ValueError(f"need 0 <= dynamic_prob, max_prob and their sum <= 1, got "
                       f"{self.dynamic_prob}, {self.max_prob}")
    if not self.min_size <= self.image_size <= self.max_size:
      raise ValueError(f"need min_size <= image_size <= max_size, got "
                       f"{self.min_size}, {self.image_size}, {self.max_size}")

  @property
  def enabled(self) -> bool:
    return self.dynamic_prob > 0 or self.max_prob > 0

  @property
  def crop_size(self) -> int:
    """Side of the per-image crops: the largest side a batch can be resized to."""
    return self.max_size if self.enabled else self.image_size


def draw_batch_resolution(schedule: ResolutionSchedule, dyn: DynamicResolution,
                          rng: np.random.Generator) -> int:
  """One side for the whole batch (resize_batch_img's choice)."""
  if dyn.min_size < schedule.min_dec_res:
    raise ValueError(f"min_size={dyn.min_size} is below the decoder minimum {schedule.min_dec_res}")
  p = rng.random()
  if dyn.dynamic_prob > 0 and dyn.min_size < dyn.max_size and p < dyn.dynamic_prob:
    # Snapping to the nearest schedule resolution can leave the range; retry like the reference.
    for _ in range(100):
      side = closest_resolution(int(rng.integers(dyn.min_size, dyn.max_size + 1)), schedule.best_res)
      if dyn.min_size <= side <= dyn.max_size:
        return side
    raise ValueError(f"no schedule resolution in [{dyn.min_size}, {dyn.max_size}]: {schedule.best_res}")
  if p < dyn.dynamic_prob + dyn.max_prob:
    return dyn.max_size
  return dyn.image_size


def batch_size_for(side: int, batch_size: int, adjust: bool) -> int:
  """adjust_bs_by_resolution: 50% of the batch above 480 px, 60% from 384 to 480 px."""
  if adjust and 480 < side <= 512:
    return int(batch_size * 0.5)
  if adjust and 384 <= side <= 480:
    return int(batch_size * 0.6)
  return batch_size


def degrade_batch(images: np.ndarray, schedule: ResolutionSchedule, rng: np.random.Generator,
                  degradation_prob: float, correction_training: bool = True,
                  noise_prob: float = 1.0,
                  dynamic: DynamicResolution | None = None) -> dict[str, np.ndarray]:
  """images: [B, H, W, C] float32 in [-1, 1], square.

  Returns `image` (the encoder input, resized to the batch resolution when `dynamic` is given),
  `target` (degraded to token2res[t], then brought to `decode_res`), and per-batch scalars `t`
  (tokens the decoder sees), `decode_res`, `target_res`, `max_tokens` (cur_max_token_num) and
  `noise_idx` (-1 = no self-correction perturbation for this batch).
  """
  if dynamic is not None and dynamic.enabled:
    side = draw_batch_resolution(schedule, dynamic, rng)
    images = images[:batch_size_for(side, images.shape[0], dynamic.adjust_batch_size)]
    images = resize_images(images, side)
  height = images.shape[1]
  if height != closest_resolution(height, schedule.best_res):
    raise ValueError(f"image size {height} is not one of the schedule's resolutions {schedule.best_res}")
  max_tokens = schedule.decres2besttoken[height]
  t, target_res, decode_res, target = max_tokens, height, height, images
  if degradation_prob and rng.random() < degradation_prob:
    t = schedule.sample_degradation(rng, max_tokens)
    target_res = schedule.token2res[t]
    decode_res = schedule.token2dec_out_res[t]
    target = resize_images(resize_images(images, target_res), decode_res)
  noise_idx = schedule.sample_noise_index(t, rng, noise_prob, correction_training)
  return {"image": np.ascontiguousarray(images, dtype=np.float32),
          "target": np.ascontiguousarray(target, dtype=np.float32),
          "t": np.int32(t), "decode_res": np.int32(decode_res), "target_res": np.int32(target_res),
          "max_tokens": np.int32(max_tokens),
          "noise_idx": np.int32(-1 if noise_idx is None else noise_idx)}


def _degradable_tokens(schedule: ResolutionSchedule, max_tokens: int) -> list[int]:
  """The t values sample_degradation can return below `max_tokens` (ceil to group multiples
  only ever lands on listed counts)."""
  return [t for t in schedule.token_list if t <= max_tokens - schedule.group_size]


def reachable_sides(schedule: ResolutionSchedule, image_size: int,
                    dynamic: DynamicResolution | None = None) -> list[int]:
  """Every encoder-input side a configuration can produce."""
  sides = {image_size}
  if dynamic is not None and dynamic.enabled:
    if dynamic.max_prob > 0:
      sides.add(dynamic.max_size)
    if dynamic.dynamic_prob > 0 and dynamic.min_size < dynamic.max_size:
      snapped = {closest_resolution(r, schedule.best_res)
                 for r in range(dynamic.min_size, dynamic.max_size + 1)}
      sides |= {s for s in snapped if dynamic.min_size <= s <= dynamic.max_size}
  return sorted(sides)


def check_config(schedule: ResolutionSchedule, image_size: int, degradation_prob: float,
                 dynamic: DynamicResolution | None = None) -> None:
  """Fails at pipeline construction, not in a worker hours later, on sides the schedule cannot
  serve: not one of its resolutions, or too few tokens to degrade (< group_size + causal_len)."""
  if dynamic is not None and dynamic.image_size != image_size:
    raise ValueError(f"dynamic.image_size={dynamic.image_size} differs from image_size={image_size}")
  for side in reachable_sides(schedule, image_size, dynamic):
    if side not in schedule.decres2besttoken:
      raise ValueError(f"image side {side} is not one of the schedule's resolutions {schedule.best_res}")
    tokens = schedule.decres2besttoken[side]
    if degradation_prob > 0 and tokens < schedule.group_size + schedule.causal_len:
      raise ValueError(f"side {side} has {tokens} tokens, too few to degrade (needs "
                       f"group_size + causal_len = {schedule.group_size + schedule.causal_len})")


def batch_shapes(schedule: ResolutionSchedule, image_size: int, degradation_prob: float,
                 dynamic: DynamicResolution | None = None,
                 batch_size: int | None = None) -> dict[str, list[tuple[int, ...]]]:
  """Every shape a pipeline configuration can emit.

  "shapes": distinct (batch, image side, target side) array shapes (batch is None when not
  given); "programs": distinct (batch, image side, t, target side), i.e. what a step that takes t
  as a static argument compiles for.
  """
  check_config(schedule, image_size, degradation_prob, dynamic)
  programs = set()
  for side in reachable_sides(schedule, image_size, dynamic):
    b = None if batch_size is None else batch_size_for(
        side, batch_size, dynamic is not None and dynamic.adjust_batch_size)
    max_tokens = schedule.decres2besttoken[side]
    programs.add((b, side, max_tokens, side))
    if degradation_prob > 0:
      programs |= {(b, side, t, schedule.token2dec_out_res[t])
                   for t in _degradable_tokens(schedule, max_tokens)}
  key = lambda p: tuple(-1 if x is None else x for x in p)
  return {"shapes": sorted({(b, s, d) for b, s, _, d in programs}, key=key),
          "programs": sorted(programs, key=key)}
