"""Checkpoints as a long run needs them: the `keep` newest plus milestones, a damaged newest step
skipped (named, moved aside) on resume, and `export --workdir --step N --weights` for any kept
step of a real tokenizer train state."""
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.detailflow16_tokenizer import get_config
from detailflow_jax import export
from detailflow_jax import sharding as mesh_lib
from detailflow_jax.train import tokenizer as recipe
from detailflow_jax.train.checkpoint import Checkpointer, DamagedCheckpointError
from detailflow_jax.weights import saved_steps


def _state(step):
  return {"step": jnp.int32(step), "w": jnp.full((16, 16), float(step), jnp.float32)}


def _save_steps(directory, steps, **kw):
  ckpt = Checkpointer(directory, save_every=1, async_save=False, **kw)
  for s in steps:
    assert ckpt.save(s, _state(s))
  ckpt.close()


def _saved(directory):
  return sorted(int(p.name) for p in pathlib.Path(directory).iterdir() if p.name.isdigit())


def _damage(step_dir: pathlib.Path):
  """Truncates the largest file of the saved state (the array data) to half."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
  biggest = max(files, key=lambda p: p.stat().st_size)
  data = biggest.read_bytes()
  biggest.write_bytes(data[:len(data) // 2])


def _abstract():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state(0))


def test_keeps_the_newest_plus_milestones(tmp_path):
  _save_steps(tmp_path / "a", range(1, 9), keep=2, milestone_every=3)
  assert _saved(tmp_path / "a") == [3, 6, 7, 8]
  _save_steps(tmp_path / "b", range(1, 9), keep=2)          # milestones off
  assert _saved(tmp_path / "b") == [7, 8]
  with pytest.raises(ValueError, match="checkpoint.milestone_every=5 .* checkpoint.save_every=2"):
    Checkpointer(tmp_path / "c", save_every=2, milestone_every=5)


def test_damaged_newest_step_resumes_from_the_newest_intact_one(tmp_path, caplog):
  d = tmp_path / "ckpt"
  _save_steps(d, range(1, 5), keep=3)
  _damage(d / "4")
  ckpt = Checkpointer(d, save_every=1, async_save=False)
  with caplog.at_level(logging.WARNING, logger="detailflow_jax"):
    step, state = ckpt.restore(_abstract())
  assert step == 3 and int(state["step"]) == 3
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full((16, 16), 3.0))
  text = caplog.text
  assert "checkpoint step 4" in text and "damaged" in text and "resuming from step 3" in text
  # Moved aside, so the resumed run saves step 4 again (and export does not list it).
  assert (d / "damaged-4").is_dir() and _saved(d) == [2, 3]
  assert ckpt.save(4, _state(4))
  ckpt.close()
  assert Checkpointer(d).restore(_abstract())[0] == 4


def test_no_intact_step_is_one_error_naming_the_damaged_steps(tmp_path):
  d = tmp_path / "ckpt"
  _save_steps(d, range(1, 3), keep=3)
  _damage(d / "1")
  _damage(d / "2")
  with pytest.raises(DamagedCheckpointError, match=r"damaged steps: 2 \(.*\); 1 \("):
    Checkpointer(d).restore(_abstract())
  with pytest.raises(DamagedCheckpointError, match="checkpoint step 2 .* cannot be read"):
    Checkpointer(d).restore(_abstract(), step=2)


# --- export of any retained step ----------------------------------------------------------------

def _tokenizer_workdir(workdir: pathlib.Path):
  """A tokenizer run's workdir: config.json + Orbax train states (EMA on) at steps 1..5, keep 1,
  milestones every 2; each step's params and EMA are offset so the steps differ."""
  from detailflow_jax.models.tokenizer import Tokenizer, TokenizerConfig
  c = get_config("tiny")
  c.model.encoder.num_layers = 1
  c.model.decoder.num_layers = 1
  c.losses.ema_decay = 0.9
  workdir.mkdir()
  (workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
  tx, disc_tx = recipe.make_optimizers(c, 10)
  trainer = recipe.TokenizerTrainer(Tokenizer(TokenizerConfig.from_dict(c.model), rngs=0),
                                    recipe.loss_config_from(c), tx,
                                    mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1]),
                                    disc_tx=disc_tx)
  base = trainer.init_state()
  ckpt = Checkpointer(workdir / "checkpoints", save_every=1, keep=1, milestone_every=2, async_save=False)
  states = {}
  for s in range(1, 6):
    state = base.replace(step=jnp.int32(s),
                         params=jax.tree.map(lambda x: x + s, base.params),
                         ema_params=jax.tree.map(lambda x: x - s, base.ema_params))
    states[s] = jax.device_get(state)
    assert ckpt.save(s, state)
  ckpt.close()
  return trainer, states


def test_export_reads_any_retained_step_with_either_weights(tmp_path, capsys):
  from detailflow_jax.weights.load import load_model_dir
  workdir = tmp_path / "run"
  trainer, states = _tokenizer_workdir(workdir)
  assert saved_steps.workdir_steps(workdir) == [2, 4, 5]         # milestones 2, 4 + the newest
  for step in (2, 4, 5):
    for weights, ema in (("model", False), ("ema", True)):
      out = tmp_path / f"{step}_{weights}"
      assert export.main(["--workdir", str(workdir), "--step", str(step), "--weights", weights,
                          "--format", "model_dir", "--out", str(out)]) == 0
      want = recipe.inference_export(trainer.model(states[step], ema=ema))
      got = load_model_dir(out, "tokenizer")
      for a, b in zip(jax.tree.leaves(nnx.state(want)), jax.tree.leaves(nnx.state(got))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  capsys.readouterr()
  assert export.main(["--workdir", str(workdir), "--step", "3", "--out", str(tmp_path / "x")]) == 2
  assert "no checkpoint of step 3 (saved steps: 2, 4, 5)" in capsys.readouterr().err
  _damage(workdir / "checkpoints" / "4")
  assert export.main(["--workdir", str(workdir), "--step", "4", "--out", str(tmp_path / "y")]) == 2
  assert "cannot read the saved train state" in capsys.readouterr().err
