"""The token <-> resolution schedule equals the reference's tables, order included."""
import json

import numpy as np
import pytest
from conftest import TINY

from detailflow_jax.schedule import ResolutionSchedule, closest_resolution

TABLES = json.loads((TINY / "degradation_tables.json").read_text())


def _schedule(args):
  return ResolutionSchedule(
      max_image_size=args["max_img_size"], max_tokens=args["max_token_num"],
      group_size=args["group_size"], causal_num=args["causal_num"], power=args["p"],
      enc_patch_size=args["enc_patch_size"], dec_patch_size=args["dec_patch_size"],
      min_dec_res=args["min_dec_res"])


@pytest.mark.parametrize("name", sorted(TABLES))
def test_tables_identical(name):
  ref = TABLES[name]
  ours = _schedule(ref["args"]).tables()
  for key, value in ref.items():
    if key == "args":
      continue
    if isinstance(value, dict):
      assert [(str(k), v) for k, v in ours[key].items()] == list(value.items()), key
    else:
      assert ours[key] == value, key


def test_golden_arrays(golden):
  s = _schedule(TABLES["fixture"]["args"])
  assert s.token_list == golden["deg_token_list"].tolist()
  for name in ("token2res", "token2enc_res", "token2dec_res", "token2dec_out_res"):
    assert [getattr(s, name)[t] for t in s.token_list] == golden[f"deg_{name}"].tolist()
  assert s.best_res == golden["deg_best_res"].tolist()
  assert [s.decres2besttoken[r] for r in s.best_res] == golden["deg_best_res_token"].tolist()


def test_decode_resolution_and_closest():
  s = _schedule(TABLES["DetailFlow-16"]["args"])
  assert s.decode_resolution(128) == 256 and s.decode_resolution(8) == 32
  assert s.decode_resolution(13) == s.token2dec_out_res[8]  # mid-group budget
  assert closest_resolution(250, s.best_res) == 256
  with pytest.raises(ValueError):
    s.decode_resolution(0)


@pytest.mark.parametrize("name", sorted(TABLES))
def test_decode_token_bucket_from_the_reference_tables(name):
  """Every count decoding at a resolution pads to one bucket: the reference's decres2maxtoken
  (the largest listed count at that decoder resolution) up to just before the next listed
  count, whose resolution is larger; the resolution never falls as t grows."""
  ref, s = TABLES[name], _schedule(TABLES[name]["args"])
  listed = ref["token_list"]
  for res, last in ref["decres2maxtoken"].items():
    following = [t for t in listed if t > last]
    bucket = following[0] - 1 if following else ref["args"]["max_token_num"]
    first = ref["decres2mintoken"][res]
    for t in range(first, bucket + 1):
      assert s.decode_token_bucket(t) == bucket, (res, t)
      assert s.decode_resolution(t) == max(int(res), ref["args"]["min_dec_res"])
  sides = [s.decode_resolution(t) for t in range(1, s.max_tokens + 1)]
  assert sides == sorted(sides)


def test_degradation_and_noise_draws_follow_the_rules():
  s = _schedule(TABLES["DetailFlow-16"]["args"])
  rng = np.random.default_rng(0)
  ts = [s.sample_degradation(rng) for _ in range(2000)]
  assert set(ts) <= set(s.token_list) and max(ts) <= 120 and min(ts) == 1
  for t in (1, 5, 8, 16, 64, 128):
    for _ in range(200):
      idx = s.sample_noise_index(t, rng, prob=1.0)
      if t == 1:
        assert idx is None
        continue
      if t <= s.causal_len:
        assert 0 <= idx < t
      elif idx < s.causal_len:
        assert s.noise_span(idx) == 1  # a single token inside the causal prefix
      else:
        # A group start, never the last group (its span must leave one group to predict).
        assert idx % s.group_size == 0 and idx <= t - 2 * s.group_size
  assert s.sample_noise_index(64, rng, prob=0.0) is None
  assert s.sample_noise_index(64, rng, prob=1.0, correction_training=False) is None


def test_invalid_configs_are_rejected():
  with pytest.raises(ValueError, match="group_size"):
    ResolutionSchedule(256, 130, 8, None, 1.5, 16, 16, 16)
  with pytest.raises(ValueError, match="min_dec_res"):
    ResolutionSchedule(256, 128, 8, None, 1.5, 16, 16, 24)
