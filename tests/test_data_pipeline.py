"""Degradation matches the resize ops + fixture tables; determinism, resume, sharding."""
import json

import numpy as np
import pytest

from detailflow_jax.data.degradation import degrade_batch, target_shapes
from detailflow_jax.data.pipeline import ImagePipelineConfig, Progress, global_batch, image_dataset, to_iterator
from detailflow_jax.data.sources import ProceduralShapes
from detailflow_jax.ops.resize import resize_images
from detailflow_jax.schedule import ResolutionSchedule

from conftest import TINY

SCHEDULE = ResolutionSchedule(64, 32, 4, None, 1.5, 8, 8, 8)


def test_degraded_targets_follow_the_tables(golden):
  tables = json.loads((TINY / "degradation_tables.json").read_text())["fixture"]
  images = np.repeat(golden["images"].transpose(0, 2, 3, 1)[:1], 2, axis=0)
  seen = set()
  for seed in range(40):
    out = degrade_batch(images, SCHEDULE, np.random.default_rng(seed), 1.0, correction_training=True)
    t = int(out["t"])
    seen.add(t)
    assert out["target_res"] == tables["token2res"][str(t)]
    assert out["decode_res"] == tables["token2dec_out_res"][str(t)]
    want = resize_images(resize_images(images, tables["token2res"][str(t)]), tables["token2dec_out_res"][str(t)])
    np.testing.assert_allclose(out["target"], want, atol=1e-6)
    if t in (8, 16):
      np.testing.assert_allclose(out["target"][:1], golden[f"resize_degrade_t{t}"].transpose(0, 2, 3, 1), atol=1e-4)
    idx = int(out["noise_idx"])
    assert idx == -1 if t == 1 else 0 <= idx < t
  assert {8, 16} <= seen and max(seen) <= 28
  plain = degrade_batch(images, SCHEDULE, np.random.default_rng(0), 0.0)
  assert plain["t"] == 32 and plain["target"].shape == images.shape
  assert target_shapes(SCHEDULE, 64) == [8, 16, 24, 32, 40, 48, 56, 64]


def _pipeline(workers=0, **kw):
  src = ProceduralShapes(10, 32, 64, seed=1)
  cfg = ImagePipelineConfig(image_size=32, batch_size=4, seed=5, degradation_prob=0.5,
                            correction_training=True, num_workers=workers, **kw)
  schedule = ResolutionSchedule(32, 16, 4, None, 1.5, 8, 8, 8)
  return image_dataset(src, cfg, schedule)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_same_seed_same_batches_for_any_worker_count():
  ref = _take(to_iterator(_pipeline()), 6)
  it = to_iterator(_pipeline(), num_workers=2)
  try:
    got = _take(it, 6)
  finally:
    it.close() if hasattr(it, "close") else None
  for a, b in zip(ref, got):
    _same(a, b)
  other = _take(to_iterator(image_dataset(ProceduralShapes(10, 32, 64, seed=1),
                                          ImagePipelineConfig(image_size=32, batch_size=4, seed=6))), 1)
  assert not np.array_equal(other[0]["image"], ref[0]["image"])


def test_resume_from_state_gives_the_next_batch(tmp_path):
  it = to_iterator(_pipeline())
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 2)
  fresh = to_iterator(_pipeline())
  fresh.set_state(state)
  for a, b in zip(expected, _take(fresh, 2)):
    _same(a, b)
  # Through Orbax, next to a train state, as the trainers save it.
  from detailflow_jax.train.checkpoint import Checkpointer
  import jax.numpy as jnp
  it = to_iterator(_pipeline())
  _take(it, 3)
  ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, async_save=False)
  ckpt.save(3, {"w": jnp.ones(2)}, it, force=True)
  expected = _take(it, 2)
  fresh = to_iterator(_pipeline())
  step, state = ckpt.restore({"w": jnp.zeros(2)}, fresh)
  assert step == 3 and float(state["w"][0]) == 1.0
  for a, b in zip(expected, _take(fresh, 2)):
    _same(a, b)
  ckpt.close()


def test_process_shards_are_disjoint_and_cover_the_data():
  src = ProceduralShapes(10, 16, 12, seed=0)
  seen = []
  for shard in range(2):
    cfg = ImagePipelineConfig(image_size=16, batch_size=6, train=False, num_epochs=1,
                              shard_index=shard, shard_count=2)
    (batch,) = list(to_iterator(image_dataset(src, cfg)))
    seen.append({bytes(x.tobytes()) for x in batch["image"]})
  assert not seen[0] & seen[1]
  assert len(seen[0] | seen[1]) == 12
  with pytest.raises(ValueError, match="shard_index"):
    image_dataset(src, ImagePipelineConfig(image_size=16, batch_size=6, shard_index=2, shard_count=2))


def test_global_batch_and_progress():
  import jax
  from detailflow_jax.train.mesh import make_mesh
  it = Progress(to_iterator(_pipeline()), log_every=1)
  batch = next(it)
  mesh = make_mesh(4, 1, 1, devices=jax.devices()[:4])
  g = global_batch(batch, mesh)
  assert g["image"].shape == (4, 32, 32, 3) and len(g["image"].sharding.device_set) == 4
  assert int(g["t"]) == int(batch["t"])
  assert it.images == 4
