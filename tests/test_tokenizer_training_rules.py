"""The tokenizer recipe's training rules against the reference's (train/train_tokenizer.py,
losses/vq_loss.py, timm's CosineLRScheduler): the learning-rate schedule, the GAN phase (when it
switches on, the discriminator's optimizer and the LeCam EMA from step 1) and the encoder-init
check."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.detailflow16_tokenizer import get_config
from detailflow_jax import sharding as mesh_lib
from detailflow_jax.models.tokenizer import Tokenizer, TokenizerConfig
from detailflow_jax.train import frozen_nets
from detailflow_jax.train import tokenizer as recipe

# --- learning-rate schedule -----------------------------------------------------------------------

def timm_cosine_lr(t, base_lr, t_initial, warmup_t, warmup_lr_init, lr_min):
  """timm.scheduler.CosineLRScheduler._get_lr(t) transcribed for the arguments the reference's
  create_scheduler_v2 call passes (step_on_epochs=False -> t_initial and warmup_t in updates,
  warmup_prefix=False, cycle_mul=1, cycle_decay=1 (i <= 0 only), cycle_limit=1, k_decay=1)."""
  if t < warmup_t:
    return warmup_lr_init + t * (base_lr - warmup_lr_init) / warmup_t
  i = t // t_initial
  t_curr = t - t_initial * i
  if i < 1:
    return lr_min + 0.5 * (base_lr - lr_min) * (1 + math.cos(math.pi * t_curr / t_initial))
  return lr_min


def applied_learning_rates(tx, steps):
  """The lr Adam applied at each update: with a constant gradient 1 on a scalar, Adam's
  bias-corrected step is 1 / (1 + eps), so -update = lr."""
  params = {"w": jnp.zeros((), jnp.float32)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for _ in range(steps):
    u, state = update({"w": jnp.ones((), jnp.float32)}, state, params)
    out.append(-float(u["w"]) * (1 + 1e-8))
  return np.array(out)


def test_tokenizer_lr_schedule_is_the_references_timm_cosine():
  c = get_config()
  c.data.update(batch_size=8, examples_per_epoch=40)   # 5 updates per epoch
  c.num_epochs = 4
  steps = recipe.total_steps(c)
  assert steps == 20
  tx, disc_tx = recipe.make_optimizers(c, steps)
  lr = 1e-4 * 8 / 256                                   # scaled by batch / 256
  want = [timm_cosine_lr(t, lr, 20, 5, 1e-5, 0.1 * lr) for t in range(22)]
  np.testing.assert_allclose(applied_learning_rates(tx, 22), want, rtol=1e-5)
  np.testing.assert_allclose(applied_learning_rates(disc_tx, 22), want, rtol=1e-5)
  # The warm-up starts at the absolute 1e-5 (above this lr), the cosine already left the peak
  # when it ends, and past the last step the lr stays at min_lr.
  assert want[0] == 1e-5 and want[5] < lr and want[21] == 0.1 * lr
  c.optimizer.schedule = "constant"   # the same warm-up, then flat (warmup_steps=0: timm's 'none')
  tx, _ = recipe.make_optimizers(c, steps)
  flat = [timm_cosine_lr(t, lr, 20, 5, 1e-5, lr) for t in range(22)]
  np.testing.assert_allclose(applied_learning_rates(tx, 22), flat, rtol=1e-5)
  assert flat[5:] == [lr] * 17
  c.optimizer.schedule = "linear"
  with pytest.raises(ValueError, match="optimizer.schedule='linear'"):
    recipe.make_optimizers(c, steps)


def test_released_recipe_schedule_at_its_landmarks():
  from detailflow_jax.train.optim import timm_cosine_schedule
  c = get_config()
  steps = recipe.total_steps(c)                          # 250 epochs x 5004 updates
  warm = 1_281_167 // 256
  sched = timm_cosine_schedule(1e-4, steps, warm, 1e-5, 1e-5)
  tx, _ = recipe.make_optimizers(c, steps)
  for t in (0, 1, warm // 2, warm - 1, warm, steps // 2, steps - 1, steps):
    want = timm_cosine_lr(t, 1e-4, steps, warm, 1e-5, 1e-5)
    np.testing.assert_allclose(float(sched(t)), want, rtol=1e-5, err_msg=str(t))
  np.testing.assert_allclose(float(sched(0)), 1e-5)
  np.testing.assert_allclose(float(sched(steps // 2)), 1e-5 + 0.5 * 9e-5, rtol=1e-5)
  assert applied_learning_rates(tx, 1)[0] == pytest.approx(1e-5, rel=1e-5)


# --- encoder initialisation ---------------------------------------------------------------------

def _with_weight_files(c):
  c.weights.update(lpips="vgg.pth", dino="dino.pth", teacher="siglip2")
  return c


def test_encoder_without_weights_is_an_error_unless_from_scratch():
  c = _with_weight_files(get_config())
  with pytest.raises(ValueError, match="weights.encoder_init is empty.*"
                                       "weights.encoder_from_scratch=True"):
    recipe.validate(c, 8)
  c.weights.encoder_from_scratch = True
  recipe.validate(c, 8)
  c.weights.encoder_init = "siglip2"
  with pytest.raises(ValueError, match="weights.encoder_from_scratch=True and weights.encoder_init"):
    recipe.validate(c, 8)
  c.weights.encoder_from_scratch = False
  recipe.validate(c, 8)
  recipe.validate(get_config("tiny"), 8)  # the tiny variant asks for from scratch


# --- the GAN phase ------------------------------------------------------------------------------

def _gan_trainer(disc_start=3, lecam_decay=0.9):
  c = get_config("tiny")
  c.disc.type = "patchgan"
  c.model.encoder.num_layers = 1
  c.model.decoder.num_layers = 1
  c.losses.update(disc_start=disc_start, lecam_loss_weight=0.1, lecam_decay=lecam_decay,
                  use_diff_aug=False)
  c.data.batch_size = 4
  c.optimizer.update(warmup_steps=0)
  cfg = TokenizerConfig.from_dict(c.model)
  tx, disc_tx = recipe.make_optimizers(c, 20)
  trainer = recipe.TokenizerTrainer(
      Tokenizer(cfg, rngs=0), recipe.loss_config_from(c), tx,
      mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1]),
      discriminator=frozen_nets.build_discriminator(c), disc_tx=disc_tx)
  images = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
  t = cfg.num_latent_tokens
  batch = {"image": images, "target": images, "noise_idx": -1, "t": t, "max_tokens": t,
           "decode_res": trainer.model(trainer.init_state()).schedule.decode_resolution(t)}
  return trainer, batch, c


def _counts(opt_state):
  """Every optax step counter (Adam's bias correction, the schedule) in the state."""
  return sorted({int(x) for x in jax.tree.leaves(opt_state) if np.ndim(x) == 0})


def test_gan_phase_follows_the_reference_from_step_one():
  trainer, batch, c = _gan_trainer(disc_start=3, lecam_decay=0.9)
  state = trainer.init_state()
  disc0 = jax.tree.map(np.asarray, state.disc_params)
  ema, history = np.zeros(2), []
  for k in range(1, 5):   # k: the reference's global_step = train_steps + 1
    before = jax.tree.map(np.asarray, state.disc_params)
    state, m = trainer.step(state, batch)
    m = jax.device_get(m)
    history.append(m)
    # The discriminator optimizer advances every step, GAN or not (reference: optimizer_disc.step()
    # and disc_lr_scheduler.step_update every iteration).
    assert _counts(state.disc_opt_state) == [k], k
    # LeCam EMA: updated from the real/fake logits from step 1 (LeCAM_EMA.update runs before
    # the adopt_weight factor is applied).
    ema = ema * 0.9 + 0.1 * np.array([m["logits_real"], m["logits_fake"]])
    np.testing.assert_allclose(np.asarray(state.lecam_ema), ema, rtol=1e-5, atol=1e-7)
    # The GAN switches on at global_step >= disc_start: the 3rd update (adopt_weight).
    on = k >= 3
    assert float(m["disc_weight"]) == pytest.approx(c.losses.disc_weight if on else 0.0), k
    assert (float(m["disc_grad_norm"]) > 0) == on, k
    assert (float(m["disc_loss"]) != 0) == on, k
    moved = any(not np.array_equal(a, b) for a, b in
                zip(jax.tree.leaves(before), jax.tree.leaves(jax.tree.map(np.asarray, state.disc_params))))
    assert moved == on, k
    if k == 3:
      # Adam's first non-zero step at count 3: the bias corrections 1 - b^3 (not 1 - b^1), so
      # |update| / lr = ((1-b1)/(1-b1^3)) / sqrt((1-b2)/(1-b2^3)) elementwise (|g| >> eps).
      b1, b2 = c.optimizer.b1, c.optimizer.b2
      ratio = ((1 - b1) / (1 - b1 ** 3)) / math.sqrt((1 - b2) / (1 - b2 ** 3))
      lr_k = c.optimizer.lr * (1 + c.optimizer.end_lr_fraction
                               + (1 - c.optimizer.end_lr_fraction) * math.cos(math.pi * 2 / 20)) / 2
      delta = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel() for a, b in
                              zip(jax.tree.leaves(before), jax.tree.leaves(state.disc_params))])
      # (eps only lowers the ratio of the smallest gradients; with the count starting at
      # disc_start every element would move by lr: ratio 1.)
      moved_by = delta[delta > 0] / lr_k
      assert moved_by.size > 0.9 * delta.size
      np.testing.assert_allclose(np.median(moved_by), ratio, rtol=1e-4)
      assert moved_by.max() <= ratio * (1 + 1e-4)
    if k == 2:  # before disc_start: Adam on exact zero gradients (no decay) left them as built
      for a, b in zip(jax.tree.leaves(disc0), jax.tree.leaves(state.disc_params)):
        np.testing.assert_array_equal(a, np.asarray(b))
  # Every step ran the same program: no GAN on/off recompilation.
  assert trainer.num_programs == 1
  assert all("generator_adv_loss" in h for h in history)
