"""Decoder-only fine-tune (the reference's --finetune-decoder): after steps, the encoder, the
quantizer's codebook and every other non-decoder parameter are bit-identical; the decoder and
post_quant_conv change; the global-token loss (and its teacher pass) is skipped, REPA is not."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.detailflow16_tokenizer import get_config
from detailflow_jax import sharding as mesh_lib
from detailflow_jax.models import tokenizer as tokenizer_lib
from detailflow_jax.models.tokenizer import Tokenizer, TokenizerConfig
from detailflow_jax.train import tokenizer as recipe

TEACHER = dict(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, position_grid=4, patch_size=8)


def aligned_config():
  """The tiny tokenizer (1-layer towers) with both alignments on: REPA and the global token."""
  c = get_config("tiny")
  c.model.encoder.num_layers = 1
  c.model.decoder.num_layers = 1
  c.model.update(teacher=TEACHER, global_token_loss_weight=1.0, repa=True, repa_proj_dim=32,
                 repa_layer_indices=0)
  return c


def flat(tree):
  return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(tree)}


def test_only_the_decoder_trains():
  c = aligned_config()
  cfg = TokenizerConfig.from_dict(c.model)
  tx, _ = recipe.make_optimizers(c, 10)
  trainer = recipe.TokenizerTrainer(Tokenizer(cfg, rngs=0), recipe.loss_config_from(c), tx,
                                    mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1]),
                                    finetune_decoder=True)
  state = trainer.init_state()
  before = flat(state.params)
  rng = np.random.default_rng(0)
  for step in range(3):
    images = rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    batch = {"image": images, "target": images, "t": 16, "max_tokens": 16, "decode_res": 32,
             "noise_idx": 2}  # self-correction on: the refine path's parameters stay fixed too
    state, metrics = trainer.step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    # The reference's decoder_finetune: no global-token term; REPA's alignment remains.
    assert "global_token_loss" not in metrics and float(metrics["align_loss"]) != 0.0
  after = flat(state.params)
  trained = {n for n in before if n.split("/")[0] in ("decoder", "post_quant_conv")}
  assert trained and any(n.startswith("quantize/") for n in before)
  assert any(n.startswith("encoder/") for n in before) and any(n.startswith("refine_conv/") for n in before)
  assert any(n.startswith("global_token_proj/") for n in before)
  for name in before:
    if name in trained:
      assert not np.array_equal(after[name], before[name]), name
    else:
      np.testing.assert_array_equal(after[name], before[name], err_msg=name)


@pytest.fixture
def teacher_passes(monkeypatch):
  """The input shapes of every teacher (SigLIP2) pass traced from here on."""
  shapes = []
  teacher_call = tokenizer_lib.Teacher.__call__
  monkeypatch.setattr(tokenizer_lib.Teacher, "__call__",
                      lambda self, x: shapes.append(x.shape) or teacher_call(self, x))
  return shapes


def train_forward_losses(c, images, target, decoder_finetune, teacher_passes):
  """(losses, teacher passes) of one train_forward of a tiny tokenizer built from `c`."""
  graphdef, state = nnx.split(Tokenizer(TokenizerConfig.from_dict(c.model), rngs=0))
  teacher_passes.clear()
  forward = jax.jit(lambda state, x, y: nnx.merge(graphdef, state).train_forward(
      x, y, jax.random.key(0), num_tokens=16, max_tokens=16, decode_res=y.shape[1],
      decoder_finetune=decoder_finetune).losses)
  return jax.device_get(forward(state, images, target)), len(teacher_passes)


IMAGES = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)


def test_decoder_finetune_skips_the_global_token_loss_and_its_teacher_pass(teacher_passes):
  c = aligned_config()
  c.model.repa = False  # the global token's is then the only teacher pass
  full, full_passes = train_forward_losses(c, IMAGES, IMAGES, False, teacher_passes)
  finetune, finetune_passes = train_forward_losses(c, IMAGES, IMAGES, True, teacher_passes)
  assert full_passes == 1 and finetune_passes == 0
  assert "global_token_loss" in full and "global_token_loss" not in finetune
  assert float(finetune["align_loss"]) == 0.0 and float(full["align_loss"]) != 0.0


def test_decoder_finetune_keeps_repa(teacher_passes):
  c = aligned_config()
  full, full_passes = train_forward_losses(c, IMAGES, IMAGES, False, teacher_passes)
  finetune, finetune_passes = train_forward_losses(c, IMAGES, IMAGES, True, teacher_passes)
  assert full_passes == finetune_passes == 1  # REPA's target pass, which the global token reuses
  assert "global_token_loss" in full and "global_token_loss" not in finetune
  repa = float(finetune["align_loss"])
  assert repa != 0.0
  np.testing.assert_allclose(float(full["align_loss"]),
                             repa + c.model.global_token_loss_weight * float(full["global_token_loss"]),
                             rtol=1e-6)


def test_global_token_reuses_repa_features_of_a_target_of_the_input_size(teacher_passes):
  """The reference (VQModel.forward): with REPA on and a target of the input's size, the global
  token's goal is the mean of REPA's teacher features of the target (degraded, at a degraded
  step), with no second teacher pass; a target of another size takes a pass over the input."""
  c = aligned_config()
  degraded = (IMAGES * 0.5).astype(np.float32)  # stands for a degraded target of the same size
  reused, passes = train_forward_losses(c, IMAGES, degraded, False, teacher_passes)
  assert passes == 1
  model = Tokenizer(TokenizerConfig.from_dict(c.model), rngs=0)  # the same weights
  pred = tokenizer_lib.l2_normalize(model.global_token_proj(model.encode(IMAGES, 16).quant[:, 0]))

  def loss_towards(x):
    goal = tokenizer_lib.l2_normalize(jnp.mean(model.repa_model(x), axis=1))
    return float(jnp.mean(-jnp.sum(pred * goal, -1)))
  np.testing.assert_allclose(float(reused["global_token_loss"]), loss_towards(degraded), rtol=1e-5)
  assert abs(loss_towards(degraded) - loss_towards(IMAGES)) > 1e-3  # the test tells them apart
  smaller = IMAGES[:, ::2, ::2]
  _, passes = train_forward_losses(c, IMAGES, smaller, False, teacher_passes)
  assert passes == 2  # REPA's over the 16 px target, the global token's over the 32 px input


def test_finetune_decoder_needs_init_from():
  c = get_config("tiny")
  c.finetune_decoder = True
  with pytest.raises(ValueError, match="finetune_decoder=True without init_from"):
    recipe.validate(c, 8)
