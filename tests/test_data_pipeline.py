"""Pipelines: same batches for any worker count, exact resume (state and Orbax), disjoint
process shards with a shared t per batch, global batch assembly, progress counters."""
import numpy as np
import pytest

from detailflow_jax.data.degradation import DynamicResolution, batch_shapes
from detailflow_jax.data.pipeline import (
  ImagePipelineConfig,
  Progress,
  global_batch,
  image_dataset,
  image_iterator,
  resolve_shard,
  to_iterator,
  token_dataset,
)
from detailflow_jax.data.sources import ProceduralShapes
from detailflow_jax.schedule import ResolutionSchedule

SCHEDULE = ResolutionSchedule(32, 16, 4, None, 1.5, 8, 8, 8)
SOURCE = ProceduralShapes(10, 40, 64, seed=1)


def _config(**kw):
  base = dict(image_size=32, batch_size=4, seed=5, degradation_prob=0.5, correction_training=True,
              shard_index=0, shard_count=1)
  base.update(kw)
  return ImagePipelineConfig(**base)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_same_seed_same_batches_for_any_worker_count():
  ref = _take(image_iterator(SOURCE, _config(), SCHEDULE), 6)
  assert len({int(b["t"]) for b in ref}) > 1  # degradation really varies between batches
  it = image_iterator(SOURCE, _config(num_workers=2), SCHEDULE)
  try:
    got = _take(it, 6)
    # Resuming a multi-worker iterator from its state continues the same sequence.
    state = it.get_state()
    expected = _take(it, 2)
  finally:
    it.close()
  for a, b in zip(ref, got):
    _same(a, b)
  resumed = image_iterator(SOURCE, _config(num_workers=2), SCHEDULE)
  try:
    resumed.set_state(state)
    for a, b in zip(expected, _take(resumed, 2)):
      _same(a, b)
  finally:
    resumed.close()
  other = next(image_iterator(SOURCE, _config(seed=6), SCHEDULE))
  assert not np.array_equal(other["image"], ref[0]["image"])


class _Records:
  """Ten token records whose codes and label are their own index."""

  def __len__(self):
    return 10

  def __getitem__(self, i):
    return {"tokens": np.full((2, 8, 1), i, np.int32), "label": np.int32(i)}


def test_epochs_are_reshuffled_and_eval_keeps_file_order():
  e0, e1 = list(to_iterator(token_dataset(_Records(), batch_size=10, seed=3, num_epochs=2,
                                          shard_index=0, shard_count=1)))
  assert sorted(e0["labels"]) == sorted(e1["labels"]) == list(range(10))
  assert list(e0["labels"]) != list(e1["labels"])
  ordered = list(to_iterator(token_dataset(_Records(), batch_size=10, shuffle=False, num_epochs=2,
                                           shard_index=0, shard_count=1)))
  assert [list(b["labels"]) for b in ordered] == [list(range(10))] * 2


def test_resume_from_state_gives_the_next_batch(tmp_path):
  it = image_iterator(SOURCE, _config(), SCHEDULE)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 2)
  fresh = image_iterator(SOURCE, _config(), SCHEDULE)
  fresh.set_state(state)
  for a, b in zip(expected, _take(fresh, 2)):
    _same(a, b)
  # Through Orbax (grain.checkpoint inside ocp.args.Composite) next to a train state, as the
  # trainers save it; the Progress wrapper is what they hold.
  import jax.numpy as jnp

  from detailflow_jax.train.checkpoint import Checkpointer
  it = image_iterator(SOURCE, _config(), SCHEDULE)
  _take(it, 3)
  ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, async_save=False)
  try:
    ckpt.save(3, {"w": jnp.ones(2)}, it, force=True)
    expected = _take(it, 2)
    fresh = image_iterator(SOURCE, _config(), SCHEDULE)
    step, restored = ckpt.restore({"w": jnp.zeros(2)}, fresh)
  finally:
    ckpt.close()
  assert step == 3 and float(restored["w"][0]) == 1.0
  assert list((tmp_path / "ckpt" / "3" / "data").glob("process_0-of-1.json"))
  for a, b in zip(expected, _take(fresh, 2)):
    _same(a, b)


def test_two_process_shards_are_disjoint_and_share_t():
  src = ProceduralShapes(10, 16, 24, seed=0)
  schedule = ResolutionSchedule(16, 8, 2, None, 1.5, 8, 8, 8)
  shards = []
  for shard in range(2):
    cfg = ImagePipelineConfig(image_size=16, batch_size=6, train=False, num_epochs=1,
                              degradation_prob=1.0, shard_index=shard, shard_count=2)
    shards.append(list(to_iterator(image_dataset(src, cfg, schedule))))
  images = [{x.tobytes() for b in batches for x in b["image"]} for batches in shards]
  assert not images[0] & images[1] and len(images[0] | images[1]) == 24
  # Batch i has the same t (hence the same target shape) on every process.
  assert [int(b["t"]) for b in shards[0]] == [int(b["t"]) for b in shards[1]]
  # Training crops follow the global position, not the process count.
  one = list(to_iterator(image_dataset(src, _config(image_size=16, batch_size=4, num_epochs=1,
                                                    degradation_prob=0.0))))
  two = list(to_iterator(image_dataset(src, _config(image_size=16, batch_size=2, num_epochs=1,
                                                    degradation_prob=0.0, shard_count=2))))
  np.testing.assert_array_equal(one[0]["image"][0::2], two[0]["image"])
  with pytest.raises(ValueError, match="shard_index"):
    image_dataset(src, _config(shard_index=2, shard_count=2), SCHEDULE)
  import jax
  assert resolve_shard(None, None) == (jax.process_index(), jax.process_count())


def test_token_shards_are_disjoint():
  labels = [np.concatenate([b["labels"] for b in to_iterator(
      token_dataset(_Records(), batch_size=5, seed=3, num_epochs=1, shard_index=s, shard_count=2))])
      for s in range(2)]
  assert not set(labels[0]) & set(labels[1]) and sorted(np.concatenate(labels)) == list(range(10))


def test_global_batch_and_progress(caplog):
  import jax

  from detailflow_jax.sharding import make_mesh
  it = image_iterator(SOURCE, _config(), SCHEDULE, log_every=1)
  assert isinstance(it, Progress)
  with caplog.at_level("INFO", logger="detailflow_jax"):
    batch = next(it)
  assert "1 batches, 4 examples" in caplog.text
  mesh = make_mesh(4, 1, 1, devices=jax.devices()[:4])
  g = global_batch(batch, mesh)
  assert g["image"].shape == (4, 32, 32, 3) and len(g["image"].sharding.device_set) == 4
  np.testing.assert_array_equal(np.asarray(g["target"]), batch["target"])
  assert int(g["t"]) == int(batch["t"]) and it.examples == 4 and it.skipped == 0


def test_dynamic_resolution_batches_stay_in_the_enumerated_shapes():
  dyn = DynamicResolution(image_size=24, min_size=24, max_size=32, dynamic_prob=0.5, max_prob=0.25)
  cfg = _config(image_size=24, dynamic=dyn)
  programs = batch_shapes(SCHEDULE, 24, cfg.degradation_prob, dyn, batch_size=4)["programs"]
  sides = set()
  for batch in _take(image_iterator(SOURCE, cfg, SCHEDULE), 8):
    side = batch["image"].shape[1]
    sides.add(side)
    assert (4, side, int(batch["t"]), batch["target"].shape[1]) in programs
    assert batch["label"].shape == (4,) and batch["target"].shape[1] == int(batch["decode_res"])
  assert sides == {24, 32}
  # A side with too few tokens to degrade is refused when the pipeline is built.
  too_small = DynamicResolution(image_size=24, min_size=16, max_size=32, dynamic_prob=0.5)
  with pytest.raises(ValueError, match="too few to degrade"):
    image_dataset(SOURCE, _config(image_size=24, dynamic=too_small), SCHEDULE)
