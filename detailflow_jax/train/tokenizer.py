"""DetailFlow's tokenizer recipe: degradation curriculum, self-correction, perceptual and
adversarial losses, global-token (SigLIP2) alignment; two optimizers on the shared core.

One step (the reference's train_tokenizer.py loop body + VQLoss):
  1. generator: encode the full-resolution batch with cur_max_token_num tokens; with a noise
     index, also re-encode from a perturbed prefix (self-correction) and train both halves;
     decode the first t tokens at the batch's decode resolution; loss = reconstruction +
     perceptual (warm-up) + VQ terms + alignment + adversarial (after disc_start).
  2. discriminator (after disc_start): hinge on the degraded target vs the reconstruction (from
     the same forward, pre-update), DiffAugment, LeCam with its EMA, consistency regularisation.

The batch's t / decode resolution / token count select the program (shapes); the noise index is
a traced value. Frozen networks (LPIPS VGG16, the DINO backbone, the SigLIP2 teacher) are held
outside the optimized state and are not checkpointed: they come from weight files at start.
"""
import dataclasses
import logging
import pathlib
from typing import Any, Callable, Dict, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from .. import images as image_io
from ..data.degradation import DynamicResolution
from ..data.pipeline import ImagePipelineConfig, global_batch, image_dataset, image_iterator
from ..models.quantizer import l2_normalize
from ..models.tokenizer import Tokenizer, TokenizerConfig
from ..models.vit import ViTConfig
from . import driver, frozen_nets, gan
from . import mesh as mesh_lib
from .driver import total_steps, validate_run
from .extract import build_image_source
from .optim import train_only
from .state import apply_gradients, ema_update

log = logging.getLogger("detailflow_jax")

# Parameters that are never optimized: the SigLIP2 teacher inside the tokenizer and the
# pretrained backbone inside a discriminator (DINO).
FROZEN = nnx.Any(nnx.PathContains("repa_model"), nnx.PathContains("backbone"))
TRAINABLE = nnx.All(nnx.Param, nnx.Not(FROZEN))


def decoder_finetune_trainable(path: str) -> bool:
  """The parameters a decoder-only fine-tune trains (the reference's --finetune-decoder:
  'decoder.' and 'post_quant_conv'); encoder, quantizer (codebook) and the rest stay fixed."""
  return path.split("/")[0] in ("decoder", "post_quant_conv")


# --- the generator forward ---------------------------------------------------------------------

class GeneratorOutput(NamedTuple):
  recon: jax.Array     # [B or 2B, s, s, 3]: clean (and self-correction) reconstructions
  target: jax.Array    # the matching degraded targets
  losses: Dict[str, jax.Array]
  indices: jax.Array   # clean indices [B, m]


def group_cosine_similarity(quant: jax.Array, group_size: int) -> jax.Array:
  """Mean cosine similarity between distinct tokens of the same group (a diagnostic)."""
  b, m, d = quant.shape
  g = l2_normalize(quant.reshape(b * m // group_size, group_size, d).astype(jnp.float32), 1e-8)
  sims = jnp.einsum("ngd,nhd->ngh", g, g)
  off_diagonal = 1.0 - jnp.eye(group_size)
  return jnp.mean(jnp.sum(sims * off_diagonal, (1, 2)) / (group_size * (group_size - 1)))


def generator_forward(model: Tokenizer, images: jax.Array, target: jax.Array, key: jax.Array, *,
                      num_tokens: int, max_tokens: int, decode_res: int, correct: bool,
                      noise_idx: jax.Array, top_k: int = 50) -> GeneratorOutput:
  """The reference VQModel.forward in training mode (encode_image + decode + alignment)."""
  cfg = model.config
  dtype = model.quant_conv.kernel.dtype
  x = images.astype(dtype)
  latents, _ = model.encoder(x, max_tokens)
  clean = model.quantize(model.quant_conv(latents))
  vq = model.quantize.losses(clean)
  usage_indices = [clean.indices]
  quant = clean.quant
  if correct:
    # Self-correction: positions [noise_idx, noise_end) get random top-k codes, the prefix is
    # fed back through refine_conv and the encoder re-encodes everything after it.
    noise_end = noise_idx + jnp.where(noise_idx < cfg.causal_len, 1, cfg.group_size)
    positions = jnp.arange(max_tokens)[None]
    noisy = model.quantize.random_topk_codes(clean, top_k, key)
    prefix_idx = jnp.where(positions < noise_idx, clean.indices, noisy)
    prefix_quant = jax.lax.stop_gradient(model.quantize.lookup(prefix_idx)).astype(dtype)
    latents2, _ = model.encoder(x, max_tokens, model.refine_conv(prefix_quant), noise_end)
    refined = model.quantize(model.quant_conv(latents2))
    vq_refined = model.quantize.losses(refined, noise_end)
    usage_indices.append(refined.indices)
    noisy_quant = jnp.where((positions < noise_end)[..., None], prefix_quant, refined.quant)
    # Both halves' VQ terms, weighted by how many positions each trains.
    total = 2 * max_tokens - noise_end
    w_clean, w_noisy = max_tokens / total, (max_tokens - noise_end) / total
    vq = {k: vq[k] * w_clean + vq_refined[k] * w_noisy for k in vq}
    quant = jnp.concatenate([clean.quant, noisy_quant], axis=0)
    target = jnp.concatenate([target, target], axis=0)
  usage = model.quantize.update_usage(jnp.concatenate([i.reshape(-1) for i in usage_indices]))
  losses = dict(vq, codebook_usage=usage,
                fea_cosine_sim=group_cosine_similarity(jax.lax.stop_gradient(quant), cfg.group_size))

  z = model.post_quant_conv(quant[:, :num_tokens])
  align = jnp.float32(0.0)
  if cfg.repa:
    recon, hidden = model.decoder(z, decode_res, capture_layer=cfg.repa_layer_indices)
    teacher = jax.lax.stop_gradient(model.repa_model(target.astype(dtype)))
    pred = l2_normalize(model.projection(hidden).astype(jnp.float32))
    align += cfg.repa_loss_weight * jnp.mean(-jnp.sum(pred * l2_normalize(teacher.astype(jnp.float32)), -1))
  else:
    recon = model.decoder(z, decode_res)
  if cfg.global_token_loss_weight:
    # The first (global) token, mapped by an MLP, points the way of the mean SigLIP2 feature
    # of the full-resolution input.
    teacher = jax.lax.stop_gradient(model.repa_model(x)).astype(jnp.float32)
    goal = l2_normalize(jnp.mean(teacher, axis=1))
    pred = l2_normalize(model.global_token_proj(clean.quant[:, 0]).astype(jnp.float32))
    losses["global_token_loss"] = jnp.mean(-jnp.sum(pred * goal, -1))
    align += cfg.global_token_loss_weight * losses["global_token_loss"]
  losses["align_loss"] = align
  return GeneratorOutput(recon.astype(jnp.float32), target.astype(jnp.float32), losses, clean.indices)


# --- the train state and step ------------------------------------------------------------------

@flax.struct.dataclass
class TokenizerTrainState:
  step: jax.Array
  params: Any            # trainable tokenizer parameters
  extras: Any            # tokenizer buffers (codebook usage)
  opt_state: Any
  ema_params: Any        # EMA of params, or None
  disc_params: Any       # trainable discriminator parameters, or None
  disc_extras: Any       # discriminator buffers (spectral-norm vectors, batch statistics)
  disc_opt_state: Any
  lecam_ema: jax.Array   # [2]: EMA of mean real / fake logits
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class LossConfig:
  reconstruction_loss: str = "l2"
  reconstruction_weight: float = 1.0
  perceptual_weight: float = 1.0
  perceptual_warmup: int = 0        # 0: full weight from the start
  disc_weight: float = 0.2
  disc_start: int = 0
  disc_loss: str = "hinge"
  gen_loss: str = "hinge"
  lecam_loss_weight: float = 0.0
  lecam_decay: float = 0.999
  disc_cr_loss_weight: float = 0.0
  use_diff_aug: bool = True
  codebook_weight: float = 1.0
  ema_decay: float = 0.0            # 0: no EMA weights

  def __post_init__(self):
    if self.reconstruction_loss not in ("l1", "l2"):
      raise ValueError(f"reconstruction_loss={self.reconstruction_loss!r} (l1 | l2)")
    if self.disc_loss not in gan.D_LOSSES:
      raise ValueError(f"disc_loss={self.disc_loss!r} (one of {sorted(gan.D_LOSSES)})")
    if self.gen_loss not in gan.G_LOSSES:
      raise ValueError(f"gen_loss={self.gen_loss!r} (one of {sorted(gan.G_LOSSES)})")


class StepPrograms(NamedTuple):
  """Static description of one batch's program."""
  num_tokens: int      # t: tokens the decoder sees
  max_tokens: int      # cur_max_token_num: tokens the encoder produces
  decode_res: int
  correct: bool        # self-correction this batch (noise_idx >= 0)
  gan: bool            # the discriminator is active (step >= disc_start)


def split_tokenizer(model: nnx.Module):
  """(graphdef, trainable params, frozen params, buffers)."""
  return nnx.split(model, TRAINABLE, FROZEN, ...)


class TokenizerTrainer:
  """Owns the graph definitions, frozen weights and optimizers; `step(state, batch)` runs one
  jitted generator + discriminator update (compiled once per StepPrograms)."""

  def __init__(self, tokenizer: Tokenizer, losses: LossConfig, tx: optax.GradientTransformation,
               mesh, *, perceptual: Optional[nnx.Module] = None,
               discriminator: Optional[nnx.Module] = None,
               disc_tx: Optional[optax.GradientTransformation] = None, seed: int = 0,
               rules=mesh_lib.DEFAULT_RULES):
    from .state import shardings_for
    if discriminator is not None and disc_tx is None:
      raise ValueError("a discriminator needs its own optimizer (disc_tx)")
    if losses.perceptual_weight and perceptual is None:
      raise ValueError("perceptual_weight > 0 needs a perceptual network (LPIPS)")
    self.losses, self.tx, self.disc_tx, self.mesh, self.rules = losses, tx, disc_tx, mesh, rules
    self.config = tokenizer.config
    graphdef, params, frozen, extras = split_tokenizer(tokenizer)
    self._graphdef = graphdef
    self._perc = nnx.split(perceptual) if perceptual is not None else None
    self._disc_graphdef = None
    # Reconstructions smaller than this get no adversarial terms (a PatchGAN has no logits for
    # them); DINO resizes every input to 224 and scores any size.
    self.disc_min_size = int(getattr(discriminator, "min_input_size", 1))
    self._skipped_gan_sizes = set()
    disc_params = disc_frozen = disc_extras = None
    if discriminator is not None:
      self._disc_graphdef, disc_params, disc_frozen, disc_extras = nnx.split(
          discriminator, TRAINABLE, FROZEN, ...)
    # Frozen weights: replicated/sharded once, passed to every step, never donated or saved.
    frozen_tree = {"tokenizer": frozen, "disc": disc_frozen,
                   "perceptual": self._perc[1] if self._perc else None}
    with jax.set_mesh(mesh):
      self.frozen = jax.device_put(frozen_tree, shardings_for(frozen_tree, mesh, rules))
    self._init_parts = (params, extras, disc_params, disc_extras)
    self._seed = seed
    self._jitted: Dict[StepPrograms, Callable] = {}

  # -- state ------------------------------------------------------------------------------------

  def init_state(self) -> TokenizerTrainState:
    from .state import shardings_for
    params, extras, disc_params, disc_extras = self._init_parts
    ema = self.losses.ema_decay > 0

    def init(params, extras, disc_params, disc_extras):
      return TokenizerTrainState(
          step=jnp.zeros((), jnp.int32), params=params, extras=extras,
          opt_state=self.tx.init(params), ema_params=jax.tree.map(jnp.copy, params) if ema else None,
          disc_params=disc_params, disc_extras=disc_extras,
          disc_opt_state=self.disc_tx.init(disc_params) if disc_params is not None else None,
          lecam_ema=jnp.zeros((2,), jnp.float32), rng=jax.random.key_data(jax.random.key(self._seed)))

    abstract = jax.eval_shape(init, params, extras, disc_params, disc_extras)
    self.state_shardings = shardings_for(abstract, self.mesh, self.rules)
    with jax.set_mesh(self.mesh):
      return jax.jit(init, out_shardings=self.state_shardings)(params, extras, disc_params, disc_extras)

  def model(self, state: TokenizerTrainState, ema: bool = False) -> Tokenizer:
    params = state.ema_params if ema and state.ema_params is not None else state.params
    return nnx.merge(self._graphdef, params, self.frozen["tokenizer"], state.extras)

  # -- the step ---------------------------------------------------------------------------------

  def _disc_apply(self, frozen, disc_params, disc_extras, images, key):
    extras = jax.tree.map(lambda x: x, disc_extras)  # fresh Variables owned by this trace
    disc = nnx.merge(self._disc_graphdef, disc_params, frozen["disc"], extras)
    logits = disc(images, key=key, train=True)
    return logits.astype(jnp.float32), nnx.state(disc, nnx.Not(nnx.Param))

  def _step(self, prog: StepPrograms, state: TokenizerTrainState, frozen, batch):
    lc = self.losses
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    k_noise, k_gaug, k_daug, k_dfake, k_dreal, k_cr = jax.random.split(rng, 6)
    step = state.step + 1  # the reference counts global_step from 1

    def gen_loss(params):
      extras = jax.tree.map(lambda x: x, state.extras)
      model = nnx.merge(self._graphdef, params, frozen["tokenizer"], extras)
      out = generator_forward(model, batch["image"], batch["target"], k_noise,
                              num_tokens=prog.num_tokens, max_tokens=prog.max_tokens,
                              decode_res=prog.decode_res, correct=prog.correct,
                              noise_idx=batch["noise_idx"])
      diff = out.recon - out.target
      rec = jnp.mean(jnp.abs(diff)) if lc.reconstruction_loss == "l1" else jnp.mean(jnp.square(diff))
      metrics = {"rec_loss": rec, **out.losses}
      loss = lc.reconstruction_weight * rec
      loss += lc.codebook_weight * (out.losses["vq_loss"] + out.losses["commit_loss"]
                                    + out.losses["entropy_loss"])
      loss += out.losses["align_loss"]
      if lc.perceptual_weight:
        perc = nnx.merge(self._perc[0], frozen["perceptual"])
        p = jnp.mean(perc(out.target, out.recon))
        warm = (jnp.minimum(1.0, step / lc.perceptual_warmup) if lc.perceptual_warmup
                else jnp.float32(1.0))
        loss += lc.perceptual_weight * warm * p
        metrics["perceptual_loss"] = p
      disc_extras = state.disc_extras
      if prog.gan:
        fake = out.recon
        if lc.use_diff_aug:
          fake = gan.diff_augment(fake, k_gaug, "color,translation,cutout_0.2", 0.5)
        logits_fake, disc_extras = self._disc_apply(frozen, state.disc_params, state.disc_extras, fake, k_dfake)
        g_adv = gan.G_LOSSES[lc.gen_loss](logits_fake)
        loss += lc.disc_weight * g_adv
        metrics["generator_adv_loss"] = g_adv
      metrics["loss"] = loss
      new_extras = nnx.state(model, nnx.Not(nnx.Param))
      return loss, (metrics, new_extras, disc_extras, out.recon, out.target)

    (loss, (metrics, extras, disc_extras, recon, target)), grads = jax.value_and_grad(
        gen_loss, has_aux=True)(state.params)
    params, opt_state = apply_gradients(state.params, grads, state.opt_state, self.tx)
    ema = state.ema_params
    if ema is not None:
      ema = ema_update(ema, params, lc.ema_decay)
    metrics["grad_norm"] = optax.tree.norm(grads)
    new = state.replace(step=state.step + 1, params=params, extras=extras, opt_state=opt_state,
                        ema_params=ema, disc_extras=disc_extras)

    if prog.gan:
      real, fake = jax.lax.stop_gradient(target), jax.lax.stop_gradient(recon)

      def disc_loss(disc_params):
        r, f = real, fake
        if lc.use_diff_aug:
          r = gan.diff_augment(r, jax.random.fold_in(k_daug, 0), "color,translation,cutout_0.2", 0.5)
          f = gan.diff_augment(f, jax.random.fold_in(k_daug, 1), "color,translation,cutout_0.2", 0.5)
        extras = disc_extras
        logits_real, extras = self._disc_apply(frozen, disc_params, extras, r, k_dreal)
        logits_fake, extras = self._disc_apply(frozen, disc_params, extras, f, k_dfake)
        d_loss, lecam_ema, d_metrics = gan.discriminator_losses(
            logits_real, logits_fake, state.lecam_ema, d_loss=lc.disc_loss,
            disc_weight=jnp.float32(lc.disc_weight), lecam_weight=lc.lecam_loss_weight, lecam_decay=lc.lecam_decay)
        if lc.disc_cr_loss_weight:
          # Consistency: logits on strongly augmented inputs match the plain ones.
          rs = gan.diff_augment(real, jax.random.fold_in(k_cr, 0), "color,translation,cutout_0.5", 1.0)
          fs = gan.diff_augment(fake, jax.random.fold_in(k_cr, 1), "color,translation,cutout_0.5", 1.0)
          logits_rs, extras = self._disc_apply(frozen, disc_params, extras, rs, k_dreal)
          logits_fs, extras = self._disc_apply(frozen, disc_params, extras, fs, k_dfake)
          cr = jnp.mean(jnp.square(jnp.concatenate([logits_real, logits_fake])
                                   - jnp.concatenate([logits_rs, logits_fs])))
          d_loss += lc.disc_cr_loss_weight * cr
          d_metrics["disc_cr_loss"] = cr
        return d_loss, (lecam_ema, extras, d_metrics)

      (d_loss, (lecam_ema, disc_extras, d_metrics)), d_grads = jax.value_and_grad(
          disc_loss, has_aux=True)(state.disc_params)
      disc_params, d_opt = apply_gradients(state.disc_params, d_grads, state.disc_opt_state,
                                           self.disc_tx)
      new = new.replace(disc_params=disc_params, disc_opt_state=d_opt, disc_extras=disc_extras,
                        lecam_ema=lecam_ema)
      metrics.update(d_metrics, disc_loss=d_loss, disc_grad_norm=optax.tree.norm(d_grads))
    return new, metrics

  def programs(self, batch, step: int) -> StepPrograms:
    decode_res = int(batch["decode_res"])
    gan_on = self._disc_graphdef is not None and step >= self.losses.disc_start
    if gan_on and decode_res < self.disc_min_size:
      gan_on = False
      if decode_res not in self._skipped_gan_sizes:
        self._skipped_gan_sizes.add(decode_res)
        log.info("decode resolution %d is below the discriminator's minimum input (%d px): "
                 "batches at it train without the adversarial terms", decode_res, self.disc_min_size)
    return StepPrograms(int(batch["t"]), int(batch["max_tokens"]), decode_res,
                        bool(self.config.correction_training and int(batch["noise_idx"]) >= 0),
                        bool(gan_on))

  def step(self, state: TokenizerTrainState, batch: Dict[str, Any], step: Optional[int] = None):
    """One update. `step` (the host's count, to avoid a device sync) defaults to state.step."""
    fn, arrays = self._program(state, batch, step)
    with jax.set_mesh(self.mesh):
      return fn(state, self.frozen, arrays)

  def compiled(self, state: TokenizerTrainState, batch: Dict[str, Any], step: Optional[int] = None):
    """The compiled executable `step` runs for this batch (for cost analysis)."""
    fn, arrays = self._program(state, batch, step)
    with jax.set_mesh(self.mesh):
      return fn.lower(state, self.frozen, arrays).compile()

  def _program(self, state, batch, step):
    step = int(jax.device_get(state.step)) if step is None else step
    prog = self.programs(batch, step)
    arrays = {"image": batch["image"], "target": batch["target"],
              "noise_idx": jnp.int32(batch["noise_idx"])}
    if prog not in self._jitted:
      batch_shardings = {k: mesh_lib.batch_sharding(self.mesh, np.ndim(v), self.rules)
                         if np.ndim(v) else mesh_lib.replicated(self.mesh) for k, v in arrays.items()}
      frozen_shardings = jax.tree.map(lambda x: x.sharding, self.frozen)
      fn = lambda state, frozen, batch, prog=prog: self._step(prog, state, frozen, batch)
      self._jitted[prog] = jax.jit(
          fn, in_shardings=(self.state_shardings, frozen_shardings, batch_shardings),
          out_shardings=(self.state_shardings, mesh_lib.replicated(self.mesh)), donate_argnums=(0,))
    return self._jitted[prog], arrays

  @property
  def num_programs(self) -> int:
    return len(self._jitted)


# --- config -> models ---------------------------------------------------------------------------

def tokenizer_config_from(c: ml_collections.ConfigDict) -> TokenizerConfig:
  """Our TokenizerConfig from the run config: the reference's config.json fields in c.model,
  with explicit tower sizes from c.towers when given."""
  from ..convert.tokenizer import config_from_reference
  m = c.model.to_dict()
  if c.get("towers"):
    t = c.towers.to_dict()
    # Builder names only size the towers; with explicit sizes they are bypassed.
    base = config_from_reference(dict(m, encoder_model="siglip2_base", decoder_model="siglip2_base",
                                      enc_pretrained=False, dec_pretrained=False,
                                      global_token_loss_weight=0.0, repa=False), {})
    teacher = ViTConfig(**t["teacher"]) if t.get("teacher") else None
    return dataclasses.replace(
        base, encoder=ViTConfig(**t["encoder"]), decoder=ViTConfig(**t["decoder"]), teacher=teacher,
        global_token_loss_weight=m["global_token_loss_weight"], repa=m["repa"])
  return config_from_reference(m, {"min_image_size": m["min_image_size"],
                                   "max_image_size": m["max_image_size"],
                                   "degradation_power": m["degradation_power"]})


def loss_config_from(c: ml_collections.ConfigDict) -> LossConfig:
  return LossConfig(**c.losses.to_dict())


def validate(c: ml_collections.ConfigDict, num_devices: int) -> TokenizerConfig:
  """Catches config mistakes before anything compiles or loads; messages name the field."""
  cfg = tokenizer_config_from(c)  # raises on group/causal/teacher inconsistencies
  loss_config_from(c)
  validate_run(c, num_devices)
  if c.disc.type not in ("dino", "patchgan", "none"):
    raise ValueError(f"disc.type={c.disc.type!r} (dino | patchgan | none)")
  if c.finetune_decoder and not c.init_from:
    raise ValueError("finetune_decoder=True without init_from: the encoder and codebook it keeps "
                     "fixed would stay at their initialisation")
  if not 0.0 <= c.data.degradation_prob <= 1.0:
    raise ValueError(f"data.degradation_prob={c.data.degradation_prob} is not a probability")
  needs = []
  if c.losses.perceptual_weight and not c.weights.lpips:
    needs.append("weights.lpips (LPIPS VGG16: torchvision vgg16 .pth + LPIPS vgg.pth)")
  if c.disc.type == "dino" and not c.weights.dino:
    needs.append("weights.dino (dino_deitsmall16_pretrain.pth)")
  if cfg.teacher is not None and not c.weights.teacher:
    needs.append("weights.teacher (SigLIP2 vision weights: HF safetensors or big_vision .npz)")
  if needs:
    raise ValueError("this config needs weight files that are not set: " + "; ".join(needs)
                     + ". Pass them as --config.<field>=PATH (nothing is downloaded at run time).")
  return cfg


def make_optimizers(c: ml_collections.ConfigDict, steps: int):
  """Adam (decoupled weight decay 0 = the reference's Adam) for the tokenizer and the
  discriminator, the same schedule for both."""
  from .optim import make_optimizer
  o = c.optimizer
  lr = o.lr * (c.data.batch_size / 256 if o.scale_lr_by_batch else 1.0)
  warmup = o.warmup_steps if o.warmup_steps >= 0 else int(
      o.warmup_epochs * c.data.examples_per_epoch // c.data.batch_size)
  make = lambda: make_optimizer(lr, steps, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                                max_grad_norm=o.max_grad_norm, warmup_steps=warmup,
                                schedule=o.schedule, end_lr_fraction=o.end_lr_fraction)
  return make(), make()


def inference_export(model: Tokenizer) -> Tokenizer:
  """The tokenizer without its training-only parts (teacher, alignment MLPs): what
  `load_tokenizer` and the sampler read."""
  cfg = dataclasses.replace(model.config, global_token_loss_weight=0.0, repa=False, teacher=None)
  state = nnx.to_pure_dict(nnx.state(model))
  for key in ("repa_model", "projection", "global_token_proj"):
    state.pop(key, None)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Tokenizer(cfg, rngs=0)))
  nnx.replace_by_pure_dict(abstract, state)
  return nnx.merge(graphdef, abstract)


# --- reconstructions for people to look at ------------------------------------------------------

def reconstruction_rows(model: Tokenizer, images: np.ndarray) -> list:
  """Per image: the input, then its coarse-to-fine decodes (images.coarse_to_fine_strips)."""
  enc = model.encode(jnp.asarray(images))
  counts = image_io.coarse_to_fine_counts(model.schedule.token_list, model.config.num_latent_tokens)
  return image_io.coarse_to_fine_strips(lambda t: model.decode(enc.quant, t), counts,
                                        images.shape[1], inputs=images)


def train(c: ml_collections.ConfigDict, workdir) -> Any:
  """Trains the tokenizer on c.data; resumes from the newest checkpoint in workdir; exports the
  final weights to workdir/export (a directory `load_tokenizer` reads)."""
  run = driver.Driver(c, workdir, validate)
  cfg, mesh, steps = tokenizer_config_from(c), run.mesh, total_steps(c)
  tokenizer = Tokenizer(cfg, rngs=c.seed)
  frozen_nets.load_tokenizer_weights(tokenizer, c.weights)
  perceptual = frozen_nets.build_perceptual(c) if c.losses.perceptual_weight else None
  discriminator = frozen_nets.build_discriminator(c)
  tx, disc_tx = make_optimizers(c, steps)
  if c.finetune_decoder:
    tx = train_only(tx, decoder_finetune_trainable)
  trainer = TokenizerTrainer(tokenizer, loss_config_from(c), tx, mesh, perceptual=perceptual,
                             discriminator=discriminator, disc_tx=disc_tx, seed=c.seed)
  state = trainer.init_state()
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree)) / 1e6 if tree is not None else 0.0
  log.info("tokenizer %.1fM trainable, discriminator %.1fM trainable, frozen %.1fM; mesh %s; %d steps",
           count(state.params), count(state.disc_params), count(trainer.frozen), dict(mesh.shape), steps)
  driver.log_parameter_overview("tokenizer (trainable)", state.params)

  d = c.data
  dynamic = None
  if d.dynamic_resolution_prob or d.max_resolution_prob:
    dynamic = DynamicResolution(cfg.image_size, cfg.min_image_size, cfg.max_image_size,
                                d.dynamic_resolution_prob, d.max_resolution_prob)
  source = build_image_source(d)
  pipeline = ImagePipelineConfig(
      image_size=cfg.image_size, batch_size=d.batch_size // jax.process_count(), seed=c.seed,
      degradation_prob=d.degradation_prob, correction_training=cfg.correction_training,
      dynamic=dynamic, num_workers=d.num_workers)
  data_iter = image_iterator(source, pipeline, tokenizer.schedule, log_every=0)
  batches = (global_batch(b, mesh) for b in data_iter)
  host_step = []  # the step count on the host, read from the (restored) state once

  def step_fn(state, batch):
    if not host_step:
      host_step.append(int(jax.device_get(state.step)))
    state, metrics = trainer.step(state, batch, host_step[0])
    host_step[0] += 1
    return state, metrics

  hooks = []
  if c.recon_every:
    eval_cfg = ImagePipelineConfig(image_size=cfg.image_size, batch_size=c.num_recon_images,
                                   train=False, seed=0, num_epochs=1, shard_index=0, shard_count=1)
    recon_images = next(iter(image_dataset(source, eval_cfg)))["image"]

    def write_reconstructions(step, state):
      # Every process takes part in gathering the (sharded) EMA weights; process 0 draws.
      graphdef, sharded = nnx.split(inference_export(trainer.model(state, ema=True)))
      host = driver.gather_to_host(sharded, mesh)
      if jax.process_index() != 0:
        return
      rows = reconstruction_rows(nnx.merge(graphdef, host), recon_images)
      path = image_io.save_grid(run.workdir / "reconstructions" / f"step_{step:07d}.png", rows)
      run.writer.write_images(step, {"reconstruction": (rows[0][-1][None] + 1) / 2})
      log.info("wrote %s", path)

    hooks.append(driver.Hook(c.recon_every, write_reconstructions))

  def export(state):
    model = inference_export(trainer.model(state, ema=True))
    return "tokenizer", model.config.to_dict(), model

  state = run.run(state=state, state_shardings=trainer.state_shardings, step_fn=step_fn,
                  data_iterator=data_iter, batches=batches, num_steps=steps, export=export, hooks=hooks)
  log.info("%d step programs compiled", trainer.num_programs)
  return state
