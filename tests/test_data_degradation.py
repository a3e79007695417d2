"""Per-batch degradation: targets equal the tokenizer's resize ops under the fixture's tables (and
the reference's goldens), t / noise index drawn as the reference, dynamic resolution, shape counts."""
import json

import numpy as np
import pytest
from conftest import TINY

from detailflow_jax.data.degradation import DynamicResolution, batch_shapes, degrade_batch, draw_batch_resolution
from detailflow_jax.ops.resize import resize_images
from detailflow_jax.schedule import ResolutionSchedule

TABLES = json.loads((TINY / "degradation_tables.json").read_text())["fixture"]
ARGS = TABLES["args"]
SCHEDULE = ResolutionSchedule(ARGS["max_img_size"], ARGS["max_token_num"], ARGS["group_size"],
                              ARGS["causal_num"], ARGS["p"], ARGS["enc_patch_size"],
                              ARGS["dec_patch_size"], ARGS["min_dec_res"])
DETAILFLOW16 = ResolutionSchedule(256, 128, 8, None, 1.5, 16, 16, 16)


def test_degraded_targets_follow_the_fixture_tables(golden):
  images = golden["images"].transpose(0, 2, 3, 1)
  seen = set()
  for seed in range(40):
    out = degrade_batch(images, SCHEDULE, np.random.default_rng(seed), 1.0, correction_training=True)
    t = int(out["t"])
    seen.add(t)
    res, dec = TABLES["token2res"][str(t)], TABLES["token2dec_out_res"][str(t)]
    assert (out["target_res"], out["decode_res"], out["max_tokens"]) == (res, dec, 32)
    want = resize_images(resize_images(images, res), dec)  # the shared ops, NHWC as given
    np.testing.assert_allclose(out["target"], want, atol=1e-6)
    if t in (8, 16):  # the reference's own degraded image 0
      np.testing.assert_allclose(out["target"][:1], golden[f"resize_degrade_t{t}"].transpose(0, 2, 3, 1),
                                 atol=1e-5)
    np.testing.assert_array_equal(out["image"], images)  # the encoder always sees the full image
    # Self-correction index: any causal position, else a group start before the last group.
    idx = int(out["noise_idx"])
    if t == 1:
      assert idx == -1
    else:
      assert 0 <= idx < t and (idx < SCHEDULE.causal_len or idx % SCHEDULE.group_size == 0)
  # t is drawn from [1, 32 - group]: token-causal counts below 4, group multiples above.
  assert {8, 16} <= seen and seen <= {1, 2, 3, 4, 8, 12, 16, 20, 24, 28}


def test_no_degradation_and_no_correction():
  images = np.zeros((2, 64, 64, 3), np.float32)
  out = degrade_batch(images, SCHEDULE, np.random.default_rng(0), 0.0, correction_training=False)
  assert (out["t"], out["decode_res"], out["noise_idx"]) == (32, 64, -1)
  assert out["target"].shape == images.shape
  with pytest.raises(ValueError, match="resolutions"):
    degrade_batch(np.zeros((1, 60, 60, 3), np.float32), SCHEDULE, np.random.default_rng(0), 1.0)


def test_dynamic_resolution_batches():
  dyn = DynamicResolution(image_size=48, min_size=16, max_size=64, dynamic_prob=0.5, max_prob=0.25)
  assert dyn.crop_size == 64
  sides = [draw_batch_resolution(SCHEDULE, dyn, np.random.default_rng(s)) for s in range(200)]
  counts = {s: sides.count(s) for s in set(sides)}
  assert set(counts) <= {16, 24, 32, 40, 48, 56, 64}
  assert counts[64] > 200 * 0.25 * 0.8 and counts[48] > 200 * 0.25 * 0.6 and len(counts) >= 5
  images = np.random.default_rng(2).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  for seed in range(6):
    out = degrade_batch(images, SCHEDULE, np.random.default_rng(seed), 0.5, dynamic=dyn)
    side = out["image"].shape[1]
    np.testing.assert_allclose(out["image"], resize_images(images, side), atol=1e-6)
    assert out["max_tokens"] == SCHEDULE.decres2besttoken[side]
    assert out["target"].shape[1] == out["decode_res"] <= side
  with pytest.raises(ValueError):
    DynamicResolution(image_size=48, min_size=16, max_size=64, dynamic_prob=0.8, max_prob=0.3)
  big = DynamicResolution(image_size=256, min_size=256, max_size=512, max_prob=1.0, adjust_batch_size=True)
  sched512 = ResolutionSchedule(512, 256, 8, None, 1.5, 16, 16, 16)
  out = degrade_batch(np.zeros((10, 512, 512, 3), np.float32), sched512, np.random.default_rng(0), 0.0,
                      dynamic=big)
  assert out["image"].shape[0] == 5  # the reference halves the batch above 480 px


def test_shape_counts_are_small_and_fixed():
  fixture = batch_shapes(SCHEDULE, 64, degradation_prob=0.5)
  assert len(fixture["shapes"]) == 8 and len(fixture["programs"]) == 11
  assert {d for _, _, d in fixture["shapes"]} == {8, 16, 24, 32, 40, 48, 56, 64}
  df16 = batch_shapes(DETAILFLOW16, 256, degradation_prob=0.5, batch_size=32)
  assert len(df16["shapes"]) == 14 and len(df16["programs"]) == 23
  assert len(batch_shapes(DETAILFLOW16, 256, degradation_prob=0.0)["shapes"]) == 1
  # Everything degrade_batch emits is in the enumerated set.
  images = np.zeros((2, 64, 64, 3), np.float32)
  for seed in range(30):
    out = degrade_batch(images, SCHEDULE, np.random.default_rng(seed), 0.5)
    assert (None, 64, int(out["t"]), int(out["decode_res"])) in fixture["programs"]
