"""init_from: a fresh run's weights from a converted model directory (strict / partial with a
report) or a training workdir's Orbax step (model, EMA); step and optimizer stay fresh."""
import logging

import jax
import numpy as np
import pytest
from flax import nnx
from gpt_helpers import converted_gpt_dir, loaded_gpt

from configs.detailflow16_gpt_l import get_config
from detailflow_jax import sharding as mesh_lib
from detailflow_jax.models.gpt import GPT
from detailflow_jax.train import init_from
from detailflow_jax.train.ar import gpt_config_from
from detailflow_jax.train.checkpoint import Checkpointer
from detailflow_jax.train.optim import make_optimizer
from detailflow_jax.train.state import create_train_state


def fresh_state(seed=0, **model):
  c = get_config("tiny")
  c.model.update(**model)
  mesh = mesh_lib.make_mesh(1, -1, 1)  # fsdp over all 8 devices: loads must keep the sharding
  tx = make_optimizer(1e-3, 10)
  cfg = gpt_config_from(c)
  _, state, _ = create_train_state(lambda: GPT(cfg, rngs=seed), tx, mesh, seed=seed)
  return c, state


def flat(tree):
  return {init_from._key(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(tree)}


def test_strict_from_model_dir_loads_every_parameter_ema_too(tmp_path_factory):
  _, state = fresh_state()
  want = init_from._module_flat(loaded_gpt(tmp_path_factory))
  sharding_before = jax.tree.map(lambda x: x.sharding, state.params)
  new, reports = init_from.initialize(state, str(converted_gpt_dir(tmp_path_factory)), "gpt", "strict")
  got, ema = flat(new.params), flat(new.ema_params)
  assert set(got) == set(want) and not reports[0].missing and not reports[0].unused
  for name in want:
    np.testing.assert_array_equal(got[name], want[name])
    np.testing.assert_array_equal(ema[name], want[name])  # one set of weights: EMA = loaded
  assert jax.tree.map(lambda x: x.sharding, new.params) == sharding_before
  assert int(new.step) == 0
  # The optimizer state is the fresh one (Adam moments zero).
  assert all(float(np.abs(np.asarray(x)).max()) == 0.0 for x in jax.tree.leaves(new.opt_state)
             if np.asarray(x).dtype.kind == "f")


def test_strict_refuses_a_shape_mismatch_partial_loads_the_rest_and_reports(tmp_path_factory, caplog):
  source = str(converted_gpt_dir(tmp_path_factory))
  _, state = fresh_state(vocab_size=72)
  fresh = flat(state.params)
  with pytest.raises(ValueError, match=r"(?s)init_from_mode=strict.*.*tok_embeddings/embedding run \[72, 64\] source \[64, 64\]"):
    init_from.initialize(state, source, "gpt", "strict")
  _, state = fresh_state(vocab_size=72)
  with caplog.at_level(logging.INFO, logger="detailflow_jax"):
    new, (report,) = init_from.initialize(state, source, "gpt", "partial")
  mismatched = {n for n, _, _ in report.mismatched}
  assert mismatched == {"tok_embeddings/embedding", "output/kernel"}
  assert "output/kernel run [64, 72] source [64, 64]" in caplog.text
  want = init_from._module_flat(loaded_gpt(tmp_path_factory))
  got = flat(new.params)
  for name in got:
    np.testing.assert_array_equal(got[name], fresh[name] if name in mismatched else want[name])


def test_partial_reports_parameters_the_source_lacks_and_does_not_use(tmp_path_factory):
  _, state = fresh_state(n_layer=3)
  new, (report,) = init_from.initialize(state, str(converted_gpt_dir(tmp_path_factory)), "gpt", "partial")
  assert report.missing and all(n.startswith("layers/2/") for n, _ in report.missing)
  _, state = fresh_state(n_layer=1)
  new, (report,) = init_from.initialize(state, str(converted_gpt_dir(tmp_path_factory)), "gpt", "partial")
  assert report.unused and all(n.startswith("layers/1/") for n, _ in report.unused)
  assert not report.missing


def test_from_a_training_workdir_step_model_and_ema(tmp_path):
  c, saved = fresh_state(seed=3)
  saved = saved.replace(ema_params=jax.tree.map(lambda x: x * 0.5, saved.ema_params), step=saved.step + 7)
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  (workdir / "config.json").write_text(c.to_json_best_effort())
  ckpt = Checkpointer(workdir / "checkpoints", save_every=1, async_save=False)
  ckpt.save(7, saved, force=True)
  ckpt.close()
  _, state = fresh_state(seed=0)
  new, _ = init_from.initialize(state, str(workdir), "gpt", "strict", step=7)
  for name, value in flat(saved.params).items():
    np.testing.assert_array_equal(flat(new.params)[name], value)
    np.testing.assert_array_equal(flat(new.ema_params)[name], flat(saved.ema_params)[name])
  assert int(new.step) == 0
  with pytest.raises(ValueError, match="no checkpoint of step 8"):
    init_from.initialize(state, str(workdir), "gpt", "strict", step=8)
  with pytest.raises(ValueError, match="trains a gpt, this one a tokenizer"):
    init_from.initialize(state, str(workdir), "tokenizer", "strict")


def test_config_keys_are_checked(tmp_path_factory):
  from detailflow_jax.train.driver import validate_run
  c = get_config("tiny")
  c.init_from_mode = "loose"
  with pytest.raises(ValueError, match="init_from_mode='loose'"):
    validate_run(c, 8)
  c = get_config("tiny")
  c.init_from_step = 3
  with pytest.raises(ValueError, match="init_from_step=3 without init_from"):
    validate_run(c, 8)
  _, state = fresh_state()
  with pytest.raises(ValueError, match="init_from_step=2 applies to a training workdir"):
    init_from.initialize(state, str(converted_gpt_dir(tmp_path_factory)), "gpt", "strict", step=2)


def test_from_a_released_run_model_and_its_ema(tmp_path, monkeypatch):
  """A released run directory (torch.save({'model', 'ema'})): the weights are 'model', the EMA
  starts from the file's 'ema' (the reference's fine-tune loads checkpoint['ema'])."""
  from gpt_helpers import GPT_RUN

  from detailflow_jax.weights.hub import CACHE_ENV
  from detailflow_jax.weights.load import load_gpt
  monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
  _, state = fresh_state()
  new, _ = init_from.initialize(state, str(GPT_RUN), "gpt", "strict")
  model = init_from._module_flat(load_gpt(GPT_RUN, weights="model"))
  ema = init_from._module_flat(load_gpt(GPT_RUN, weights="ema"))
  assert any(not np.array_equal(model[n], ema[n]) for n in model)
  for name in model:
    np.testing.assert_array_equal(flat(new.params)[name], model[name])
    np.testing.assert_array_equal(flat(new.ema_params)[name], ema[name])
