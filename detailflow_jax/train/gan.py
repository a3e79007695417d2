"""Adversarial pieces of the tokenizer recipe: GAN losses, LeCam regularisation, DiffAugment.

All functions are pure and jittable; randomness comes from explicit keys or draws. Images are NHWC in
[-1, 1] (the reference works in NCHW; every axis below is translated accordingly).
"""
from collections.abc import Callable

import flax
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


D_LOSSES: dict[str, Callable] = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss,
                                 "non-saturating": non_saturating_d_loss}
G_LOSSES: dict[str, Callable] = {"hinge": hinge_gen_loss, "non-saturating": non_saturating_gen_loss}


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
#
# Randomness is an input: `draw_augment` makes every draw of one DiffAugment call from a key (the
# trainer calls it in one place), `augment` turns the draws into the augmented batch. The draws are
# the raw values the reference's utils/diff_aug.py takes from torch (uniforms, integer offsets), so
# a test can feed the reference's own draws and the gate / ratio arithmetic stays under test.

TRANSLATION_RATIO = 0.125


@flax.struct.dataclass
class AugmentDraws:
  """Raw draws of one DiffAugment call on a batch of B images (P: policies in the call)."""
  gate_u: jax.Array         # [P] float32: policy p runs iff NOT (gate_u[p] > prob)
  brightness: jax.Array     # [B] float32 uniform: x + (u - 0.5)
  saturation: jax.Array     # [B] float32 uniform: (x - mean_c) * 2u + mean_c
  contrast: jax.Array       # [B] float32 uniform: (x - mean_hwc) * (u + 0.5) + mean_hwc
  translation_x: jax.Array  # [B] int32 shift along H, in [-s, s], s = int(H * 0.125 + 0.5)
  translation_y: jax.Array  # [B] int32 shift along W
  cutout_x: jax.Array       # [B] int32 square centre along H, in [0, H + 1 - c % 2)
  cutout_y: jax.Array       # [B] int32 square centre along W


def _policies(policy: str):
  names = policy.split(",") if policy else []
  for name in names:
    if name not in AUGMENTS:
      raise ValueError(f"unknown DiffAugment policy {name!r} (known: {sorted(AUGMENTS)})")
  return names


def _cutout_ratio(names) -> float:
  ratios = {float(n.split("_")[1]) for n in names if n.startswith("cutout_")}
  if len(ratios) > 1:
    raise ValueError(f"one cutout ratio per DiffAugment policy, got {sorted(ratios)}")
  return ratios.pop() if ratios else 0.2


def draw_augment(key: jax.Array, policy: str, batch: int, height: int, width: int) -> AugmentDraws:
  """Every draw one `augment(x, draws, policy, prob)` call reads, for x of [batch, height, width, C]."""
  names = _policies(policy)
  ratio = _cutout_ratio(names)
  k = jax.random.split(key, 8)
  sh, sw = int(height * TRANSLATION_RATIO + 0.5), int(width * TRANSLATION_RATIO + 0.5)
  ch, cw = int(height * ratio + 0.5), int(width * ratio + 0.5)
  uniform = lambda kk: jax.random.uniform(kk, (batch,), jnp.float32)
  return AugmentDraws(
      gate_u=jax.random.uniform(k[0], (len(names),), jnp.float32),
      brightness=uniform(k[1]), saturation=uniform(k[2]), contrast=uniform(k[3]),
      translation_x=jax.random.randint(k[4], (batch,), -sh, sh + 1),
      translation_y=jax.random.randint(k[5], (batch,), -sw, sw + 1),
      cutout_x=jax.random.randint(k[6], (batch,), 0, height + (1 - ch % 2)),
      cutout_y=jax.random.randint(k[7], (batch,), 0, width + (1 - cw % 2)))


def _per_image(u, x):
  return jnp.reshape(u, (x.shape[0], 1, 1, 1)).astype(x.dtype)


def brightness(x, u):
  return x + (_per_image(u, x) - 0.5)


def saturation(x, u):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  return (x - mean) * (_per_image(u, x) * 2.0) + mean


def contrast(x, u):
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  return (x - mean) * (_per_image(u, x) + 0.5) + mean


def translate(x, shift_h, shift_w):
  """Output pixel (i, j) = padded[i + shift_h + 1, j + shift_w + 1] of the 1-pixel zero-padded
  image (indices clipped): a shift with zeros where nothing is covered."""
  b, h, w, _ = x.shape
  th, tw = jnp.reshape(shift_h, (b, 1, 1)), jnp.reshape(shift_w, (b, 1, 1))
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  rows = jnp.clip(jnp.arange(h)[None, :, None] + th + 1, 0, h + 1)
  cols = jnp.clip(jnp.arange(w)[None, None, :] + tw + 1, 0, w + 1)
  batch = jnp.arange(b)[:, None, None]
  return padded[batch, rows, cols]


def cutout(x, centre_h, centre_w, ratio: float):
  """Zeroes one square of side int(side * ratio + 0.5) per image around the given centre."""
  b, h, w, _ = x.shape
  ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
  # The reference clips the square's index grid to the image, so a square hanging over an
  # edge covers the clipped band: rows [max(o - c//2, 0), min(o - c//2 + c - 1, h - 1)].
  r0 = jnp.reshape(centre_h, (b, 1, 1)) - ch // 2
  c0 = jnp.reshape(centre_w, (b, 1, 1)) - cw // 2
  rows, cols = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
  in_rows = (rows >= jnp.clip(r0, 0, h - 1)) & (rows <= jnp.clip(r0 + ch - 1, 0, h - 1))
  in_cols = (cols >= jnp.clip(c0, 0, w - 1)) & (cols <= jnp.clip(c0 + cw - 1, 0, w - 1))
  mask = 1.0 - (in_rows & in_cols).astype(x.dtype)
  return x * mask[..., None]


# Key-taking forms of the single operations (one draw + the operation above).
def rand_brightness(x, key):
  return brightness(x, jax.random.uniform(key, (x.shape[0],), jnp.float32))


def rand_saturation(x, key):
  return saturation(x, jax.random.uniform(key, (x.shape[0],), jnp.float32))


def rand_contrast(x, key):
  return contrast(x, jax.random.uniform(key, (x.shape[0],), jnp.float32))


def rand_translation(x, key, ratio: float = TRANSLATION_RATIO):
  """Shift each image by up to ratio*side pixels along each axis; uncovered pixels are zero."""
  b, h, w, _ = x.shape
  sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
  kh, kw = jax.random.split(key)
  return translate(x, jax.random.randint(kh, (b,), -sh, sh + 1), jax.random.randint(kw, (b,), -sw, sw + 1))


def rand_cutout(x, key, ratio: float = 0.2):
  """Zero one square of side ratio*side per image, centred uniformly (clipped at the border)."""
  b, h, w, _ = x.shape
  ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
  kh, kw = jax.random.split(key)
  return cutout(x, jax.random.randint(kh, (b,), 0, h + (1 - ch % 2)),
                jax.random.randint(kw, (b,), 0, w + (1 - cw % 2)), ratio)


AUGMENTS = {
    "color": lambda x, d: contrast(saturation(brightness(x, d.brightness), d.saturation), d.contrast),
    "translation": lambda x, d: translate(x, d.translation_x, d.translation_y),
    "cutout_0.2": lambda x, d: cutout(x, d.cutout_x, d.cutout_y, 0.2),
    "cutout_0.5": lambda x, d: cutout(x, d.cutout_x, d.cutout_y, 0.5),
}


def augment(x: jax.Array, draws: AugmentDraws, policy: str = "color,translation,cutout_0.2",
            prob: float = 0.5) -> jax.Array:
  """DiffAugment from its draws: each policy of the comma-separated list is applied to the whole
  batch iff NOT (gate_u > prob) (the reference's `if torch.rand(1) > prob: continue`), with
  per-example parameters from `draws`."""
  names = _policies(policy)
  if draws.gate_u.shape != (len(names),):
    raise ValueError(f"DiffAugment draws hold {draws.gate_u.shape} gates for policy {policy!r}")
  for i, name in enumerate(names):
    x = jnp.where(draws.gate_u[i] > prob, x, AUGMENTS[name](x, draws))
  return x


def diff_augment(x: jax.Array, key: jax.Array, policy: str = "color,translation,cutout_0.2",
                 prob: float = 0.5) -> jax.Array:
  """`augment` with its draws made from `key`."""
  if not policy:
    return x
  return augment(x, draw_augment(key, policy, x.shape[0], x.shape[1], x.shape[2]), policy, prob)


def discriminator_losses(logits_real: jax.Array, logits_fake: jax.Array, lecam_ema: jax.Array, *,
                         d_loss: str, disc_weight: jax.Array, lecam_weight: float,
                         lecam_decay: float = 0.999) -> tuple[jax.Array, jax.Array, dict]:
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
