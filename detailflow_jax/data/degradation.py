"""Per-batch multi-resolution degradation, done in the data workers (the reference's
get_input_output_img + get_noise_token_idx).

A batch is homogeneous in t: with probability `degradation_prob` one t is drawn for the whole
batch, the target images are area-downsampled to token2res[t] and brought to the decode
resolution token2dec_out_res[t] (bicubic up, identity when equal). Shapes therefore come from a
small fixed set, each compiling once: target sides 8 for the fixture config and 14 for
DetailFlow-16 at 256 px (`target_shapes`); decoder programs, one per (t, side) pair, 11 and 23.
"""
from typing import Dict, Optional

import numpy as np

from ..ops.resize import resize_images
from ..schedule import ResolutionSchedule, closest_resolution


def degrade_batch(images: np.ndarray, schedule: ResolutionSchedule, rng: np.random.Generator,
                  degradation_prob: float, correction_training: bool = True,
                  noise_prob: float = 1.0) -> Dict[str, np.ndarray]:
  """images: [B, H, W, C] float32 in [-1, 1] (square, H one of the schedule's best_res).

  Returns the input images, `target` (degraded, at `decode_res`), and scalars `t` (tokens the
  decoder sees), `decode_res`, `target_res`, `max_tokens` (cur_max_token_num) and `noise_idx`
  (-1 = no self-correction perturbation this batch).
  """
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
  return {"image": images, "target": np.ascontiguousarray(target, dtype=np.float32),
          "t": np.int32(t), "decode_res": np.int32(decode_res), "target_res": np.int32(target_res),
          "max_tokens": np.int32(max_tokens), "noise_idx": np.int32(-1 if noise_idx is None else noise_idx)}


def target_shapes(schedule: ResolutionSchedule, image_size: int) -> list:
  """The distinct target sides a pipeline at `image_size` can produce (each compiles once)."""
  max_tokens = schedule.decres2besttoken[image_size]
  ts = [t for t in schedule.token_list if t <= max_tokens - schedule.group_size]
  return sorted({schedule.token2dec_out_res[t] for t in ts} | {image_size})
