"""Sharded train state: mesh resolution, rules, and 8-device steps equal to 1-device steps."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from detailflow_jax import sharding as mesh_lib
from detailflow_jax.models.tokenizer import Tokenizer, TokenizerConfig
from detailflow_jax.models.vit import ViTConfig
from detailflow_jax.train.optim import make_optimizer
from detailflow_jax.train.state import create_train_state, make_train_step


def test_mesh_shape_resolution():
  assert mesh_lib.resolve_mesh_shape(-1, 2, 2, 8) == (2, 2, 2)
  assert mesh_lib.resolve_mesh_shape(1, -1, 1, 8) == (1, 8, 1)
  with pytest.raises(ValueError, match="at most one"):
    mesh_lib.resolve_mesh_shape(-1, -1, 1, 8)
  with pytest.raises(ValueError, match="needs 12 devices"):
    mesh_lib.resolve_mesh_shape(3, 2, 2, 8)
  with pytest.raises(ValueError, match="cannot be split"):
    mesh_lib.resolve_mesh_shape(3, -1, 1, 8)


def test_logical_rules():
  mesh = mesh_lib.make_mesh(2, 2, 2)
  assert mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh_lib.logical_to_spec(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
  # Not divisible -> replicated; a mesh axis is used once per array.
  assert mesh_lib.logical_to_spec(("embed", None), (63, 8), mesh) == P(None, None)
  assert mesh_lib.logical_to_spec(("mlp", "mlp"), (64, 64), mesh) == P("tensor", None)
  assert mesh_lib.batch_sharding(mesh, 4).spec == P(("data", "fsdp"), None, None, None)


def _config():
  enc = ViTConfig(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, position_grid=2, patch_size=8)
  return TokenizerConfig(encoder=enc, decoder=dataclasses.replace(enc, patch_embedding=False),
                         image_size=16, max_image_size=16, min_image_size=16, num_latent_tokens=4,
                         group_size=2, codebook_size=16, codebook_embed_dim=4)


def _loss(model, batch, rng):
  enc = model.encode(batch)
  recon = model.decode(enc.quant, image_size=16)
  vq = model.quantize.losses(model.quantize(enc.latents))
  usage = model.quantize.update_usage(enc.indices)
  loss = jnp.mean(jnp.square(recon - batch)) + vq["vq_loss"] + vq["commit_loss"]
  return loss, {"usage": usage}


def _run(mesh, steps=2):
  tx = make_optimizer(1e-3, 10, weight_decay=0.05, warmup_steps=2)
  graphdef, state, shardings = create_train_state(lambda: Tokenizer(_config(), rngs=0), tx, mesh)
  step = make_train_step(graphdef, _loss, tx, shardings, mesh, ema_decay=0.9)
  images = jax.random.uniform(jax.random.key(1), (8, 16, 16, 3), minval=-1, maxval=1)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, images)
    losses.append(float(metrics["loss"]))
  return state, losses


def test_eight_devices_match_one():
  assert jax.device_count() == 8
  one = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  eight = mesh_lib.make_mesh(2, 2, 2)
  state1, losses1 = _run(one)
  state8, losses8 = _run(eight)
  np.testing.assert_allclose(losses8, losses1, atol=1e-5)
  kernel = state8.params["encoder"]["visual_model"]["layers"][0]["mlp"]["fc1"]["kernel"]
  assert kernel[...].sharding.spec == P("fsdp", "tensor")
  flat1 = jax.tree_util.tree_leaves_with_path(state1.params)
  flat8 = jax.tree.leaves(state8.params)
  for (path, a), b in zip(flat1, flat8):
    if "k_proj" in jax.tree_util.keystr(path) and "bias" in jax.tree_util.keystr(path):
      # A key bias shifts every score of a query equally, so softmax cancels it: its gradient is
      # analytically zero and Adam normalises pure rounding noise into steps of up to ~lr.
      # Those values agree only to the learning rate; everything else to 1e-5.
      assert np.abs(np.asarray(a) - np.asarray(b)).max() < 1e-3
      continue
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=jax.tree_util.keystr(path))
  for a, b in zip(jax.tree.leaves(state1.ema_params), jax.tree.leaves(state8.ema_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  assert int(state8.step) == 2
  # The usage buffer is carried through the step.
  # (The window starts as zeros, as the reference's buffer: the step's 2 x 8 x 4 indices fill
  # its tail, everything before stays 0.)
  used = np.asarray(state8.extras["quantize"]["codebook_used"][...])
  assert not used[:-2 * 8 * 4].any() and used[-2 * 8 * 4:].any()


def test_checkpoint_roundtrip_keeps_values_and_shardings(tmp_path):
  from detailflow_jax.train.checkpoint import Checkpointer, PreemptionGuard, abstract_with_shardings
  mesh = mesh_lib.make_mesh(2, 2, 2)
  tx = make_optimizer(1e-3, 10)
  graphdef, state, shardings = create_train_state(lambda: Tokenizer(_config(), rngs=0), tx, mesh)
  ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, state)
  ckpt.wait()
  assert ckpt.latest_step == 3
  assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == [2, 3]
  step, restored = ckpt.restore(abstract_with_shardings(state, shardings))
  assert step == 3
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding == b.sharding
  ckpt.close()
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    Checkpointer(tmp_path / "empty").restore(abstract_with_shardings(state, shardings))
  with PreemptionGuard() as guard:
    assert not guard.requested(0)
    import os
    import signal
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.requested(1)


def test_reference_learning_rate_schedule_and_decay_mask():
  from detailflow_jax.train.optim import decay_mask, learning_rate_schedule
  sched = learning_rate_schedule(1e-4, 1000, warmup_steps=50, schedule="cosine",
                                 end_lr_fraction=0.01, warmup_start_fraction=0.005)
  np.testing.assert_allclose(float(sched(0)), 5e-7, rtol=1e-5)
  np.testing.assert_allclose(float(sched(25)), 1e-4 * (0.005 + 0.5 * 0.995), rtol=1e-5)
  np.testing.assert_allclose(float(sched(50)), 1e-4, rtol=1e-5)
  np.testing.assert_allclose(float(sched(1000)), 1e-6, rtol=1e-4)
  mask = decay_mask({"w": jnp.zeros((3, 4)), "b": jnp.zeros((4,))})
  assert mask == {"w": True, "b": False}
