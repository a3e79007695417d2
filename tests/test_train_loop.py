"""The shared loop: resume gives identical losses/params, NaN stops without saving, writers."""
import itertools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_state import _config, _loss

from detailflow_jax import sharding as mesh_lib
from detailflow_jax.models.tokenizer import Tokenizer
from detailflow_jax.train.checkpoint import Checkpointer, abstract_with_shardings
from detailflow_jax.train.loop import NonFiniteLossError, run_training
from detailflow_jax.train.metrics import create_writer
from detailflow_jax.train.optim import make_optimizer
from detailflow_jax.train.state import create_train_state, make_train_step


def _batches(seed=0):
  for i in itertools.count():
    yield jax.random.uniform(jax.random.fold_in(jax.random.key(seed), i), (4, 16, 16, 3), minval=-1, maxval=1)


class _Resumable:
  """A deterministic batch stream whose position can be restored (stands in for Grain here)."""

  def __init__(self):
    self.position = 0

  def __next__(self):
    batch = jax.random.uniform(jax.random.fold_in(jax.random.key(0), self.position), (4, 16, 16, 3),
                               minval=-1, maxval=1)
    self.position += 1
    return batch


_TX = make_optimizer(1e-3, 8, warmup_steps=1)
_STEPS = {}


def _setup(mesh):
  """A fresh state each call; the jitted step is built once (one compile for the module)."""
  graphdef, state, shardings = create_train_state(lambda: Tokenizer(_config(), rngs=0), _TX, mesh)
  if "step" not in _STEPS:
    _STEPS["step"] = make_train_step(graphdef, _loss, _TX, shardings, mesh, ema_decay=0.9)
  return state, shardings, _STEPS["step"]


def _mesh():
  return mesh_lib.make_mesh(2, 1, 1, devices=jax.devices()[:2])


def test_resume_gives_identical_losses_and_params(tmp_path, caplog):
  mesh = _mesh()
  state, shardings, step = _setup(mesh)
  straight = []
  final = run_training(state, step, _Resumable(), num_steps=6, loss_history=straight, log_every=3)

  state, shardings, step = _setup(mesh)
  first = []
  stream = _Resumable()
  ckpt = Checkpointer(tmp_path / "ckpt", save_every=3)
  writer = create_writer(tmp_path)
  with caplog.at_level(logging.INFO, logger="detailflow_jax"):
    run_training(state, step, stream, num_steps=3, checkpointer=ckpt, writer=writer, loss_history=first, log_every=1)
  assert any("ETA" in r.getMessage() for r in caplog.records)
  ckpt.close()
  del state
  # A fresh process would rebuild everything and restore the latest checkpoint.
  fresh, shardings, step = _setup(mesh)
  ckpt = Checkpointer(tmp_path / "ckpt", save_every=3)
  at, restored = ckpt.restore(abstract_with_shardings(fresh, shardings))
  assert at == 3
  stream = _Resumable()
  stream.position = at
  second = []
  resumed = run_training(restored, step, stream, num_steps=6, checkpointer=ckpt, loss_history=second)
  np.testing.assert_array_equal(first + second, straight)
  for a, b in zip(jax.tree.leaves(final.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_non_finite_loss_stops_before_saving(tmp_path):
  mesh = _mesh()
  state, shardings, step = _setup(mesh)

  def poisoned():
    for i, batch in enumerate(_batches()):
      yield batch * (jnp.nan if i == 4 else 1.0)

  ckpt = Checkpointer(tmp_path / "ckpt", save_every=2, async_save=False)
  with pytest.raises(NonFiniteLossError, match="at step 5"):
    run_training(state, step, poisoned(), num_steps=8, checkpointer=ckpt)
  ckpt.wait()
  assert ckpt.latest_step == 4


def test_sigterm_saves_and_stops(tmp_path):
  import os
  import signal
  mesh = _mesh()
  state, shardings, step = _setup(mesh)

  def preempted():
    for i, batch in enumerate(_batches()):
      if i == 2:
        os.kill(os.getpid(), signal.SIGTERM)  # the preemption notice arrives during step 3
      yield batch

  ckpt = Checkpointer(tmp_path / "ckpt", save_every=100)
  final = run_training(state, step, preempted(), num_steps=8, checkpointer=ckpt)
  assert int(final.step) == 3
  assert ckpt.latest_step == 3  # saved although step 3 is not a save step
  ckpt.close()
