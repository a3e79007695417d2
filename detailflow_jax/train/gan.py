"""Adversarial pieces of the tokenizer recipe: GAN losses, LeCam regularisation, DiffAugment.

All functions are pure and jittable; randomness comes from explicit keys. Images are NHWC in
[-1, 1] (the reference works in NCHW; every axis below is translated accordingly).
"""
from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp


# --- discriminator / generator losses ----------------------------------------------------------

def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


def non_saturating_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """Binary cross-entropy with real=1, fake=0. (The reference passes the arguments of
  binary_cross_entropy_with_logits swapped, i.e. targets as logits; we use the intended loss.
  Its released configs use hinge.)"""
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


def hinge_gen_loss(logits_fake: jax.Array) -> jax.Array:
  return -jnp.mean(logits_fake)


def non_saturating_gen_loss(logits_fake: jax.Array) -> jax.Array:
  return jnp.mean(jax.nn.softplus(-logits_fake))


D_LOSSES: Dict[str, Callable] = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss,
                                 "non-saturating": non_saturating_d_loss}
G_LOSSES: Dict[str, Callable] = {"hinge": hinge_gen_loss, "non-saturating": non_saturating_gen_loss}


def lecam_update(ema: jax.Array, logits_real: jax.Array, logits_fake: jax.Array,
                 decay: float = 0.999) -> jax.Array:
  """ema = [real_ema, fake_ema] (float32 [2]); the reference updates it before using it."""
  means = jnp.stack([jnp.mean(logits_real), jnp.mean(logits_fake)]).astype(jnp.float32)
  return ema * decay + jax.lax.stop_gradient(means) * (1.0 - decay)


def lecam_reg(logits_real: jax.Array, logits_fake: jax.Array, ema: jax.Array) -> jax.Array:
  """LeCam: real logits pulled below the fake EMA, fake logits above the real EMA."""
  return (jnp.mean(jnp.square(jax.nn.relu(logits_real - ema[1])))
          + jnp.mean(jnp.square(jax.nn.relu(ema[0] - logits_fake))))


def adopt_weight(weight: float, step: jax.Array, start: int) -> jax.Array:
  """`weight` once step >= start, else 0 (the reference's adopt_weight)."""
  return jnp.where(step >= start, jnp.float32(weight), jnp.float32(0.0))


# --- DiffAugment (Zhao et al. 2020), per example, NHWC -------------------------------------------

def _uniform(key, x):
  return jax.random.uniform(key, (x.shape[0], 1, 1, 1), x.dtype)


def rand_brightness(x, key):
  return x + (_uniform(key, x) - 0.5)


def rand_saturation(x, key):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  return (x - mean) * (_uniform(key, x) * 2.0) + mean


def rand_contrast(x, key):
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  return (x - mean) * (_uniform(key, x) + 0.5) + mean


def rand_translation(x, key, ratio: float = 0.125):
  """Shift each image by up to ratio*side pixels along each axis; uncovered pixels are zero."""
  b, h, w, _ = x.shape
  sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
  kh, kw = jax.random.split(key)
  th = jax.random.randint(kh, (b, 1, 1), -sh, sh + 1)
  tw = jax.random.randint(kw, (b, 1, 1), -sw, sw + 1)
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  rows = jnp.clip(jnp.arange(h)[None, :, None] + th + 1, 0, h + 1)
  cols = jnp.clip(jnp.arange(w)[None, None, :] + tw + 1, 0, w + 1)
  batch = jnp.arange(b)[:, None, None]
  return padded[batch, rows, cols]


def rand_cutout(x, key, ratio: float = 0.2):
  """Zero one square of side ratio*side per image, centred uniformly (clipped at the border)."""
  b, h, w, _ = x.shape
  ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
  kh, kw = jax.random.split(key)
  oh = jax.random.randint(kh, (b, 1, 1), 0, h + (1 - ch % 2))
  ow = jax.random.randint(kw, (b, 1, 1), 0, w + (1 - cw % 2))
  # The reference clips the square's index grid to the image, so a square hanging over an
  # edge covers the clipped band: rows [max(o - c//2, 0), min(o - c//2 + c - 1, h - 1)].
  r0, c0 = oh - ch // 2, ow - cw // 2
  rows, cols = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
  in_rows = (rows >= jnp.clip(r0, 0, h - 1)) & (rows <= jnp.clip(r0 + ch - 1, 0, h - 1))
  in_cols = (cols >= jnp.clip(c0, 0, w - 1)) & (cols <= jnp.clip(c0 + cw - 1, 0, w - 1))
  mask = 1.0 - (in_rows & in_cols).astype(x.dtype)
  return x * mask[..., None]


AUGMENTS = {
    "color": (rand_brightness, rand_saturation, rand_contrast),
    "translation": (rand_translation,),
    "cutout_0.2": (lambda x, k: rand_cutout(x, k, 0.2),),
    "cutout_0.5": (lambda x, k: rand_cutout(x, k, 0.5),),
}


def diff_augment(x: jax.Array, key: jax.Array, policy: str = "color,translation,cutout_0.2",
                 prob: float = 0.5) -> jax.Array:
  """Each policy of the comma-separated list is applied to the whole batch with probability
  `prob` (one draw per policy, as the reference), with fresh per-example parameters."""
  if not policy:
    return x
  for i, name in enumerate(policy.split(",")):
    if name not in AUGMENTS:
      raise ValueError(f"unknown DiffAugment policy {name!r} (known: {sorted(AUGMENTS)})")
    pkey = jax.random.fold_in(key, i)
    gate_key, *fn_keys = jax.random.split(pkey, 1 + len(AUGMENTS[name]))
    augmented = x
    for fn, k in zip(AUGMENTS[name], fn_keys):
      augmented = fn(augmented, k)
    apply = jax.random.uniform(gate_key) < prob
    x = jnp.where(apply, augmented, x)
  return x


def discriminator_losses(logits_real: jax.Array, logits_fake: jax.Array, lecam_ema: jax.Array, *,
                         d_loss: str, disc_weight: jax.Array, lecam_weight: float,
                         lecam_decay: float = 0.999) -> Tuple[jax.Array, jax.Array, Dict]:
  """The discriminator objective (without consistency regularisation): returns
  (loss, new LeCam EMA, metrics)."""
  base = D_LOSSES[d_loss](logits_real, logits_fake)
  if lecam_weight:
    lecam_ema = lecam_update(lecam_ema, logits_real, logits_fake, lecam_decay)
    lecam = lecam_reg(logits_real, logits_fake, lecam_ema)
    loss = disc_weight * (lecam * lecam_weight + base)
  else:
    lecam = jnp.float32(0.0)
    loss = disc_weight * base
  return loss, lecam_ema, {"d_base_loss": base, "lecam_loss": lecam,
                           "logits_real": jnp.mean(logits_real), "logits_fake": jnp.mean(logits_fake)}
