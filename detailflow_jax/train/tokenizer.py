"""DetailFlow's tokenizer recipe: degradation curriculum, self-correction, perceptual and
adversarial losses, global-token (SigLIP2) alignment; two optimizers on the shared core.

One step (the reference's train_tokenizer.py loop body + VQLoss):
  1. generator: encode the full-resolution batch with cur_max_token_num tokens; with a noise
     index, also re-encode from a perturbed prefix (self-correction) and train both halves;
     decode the first t tokens at the batch's decode resolution; loss = reconstruction +
     perceptual (warm-up) + VQ terms + alignment + adversarial (weight 0 before disc_start).
  2. discriminator, every step as the reference: hinge on the degraded target vs the
     reconstruction (from the same forward, pre-update), DiffAugment, LeCam with its EMA,
     consistency regularisation; before disc_start its terms weigh 0, so its optimizer steps on
     zero gradients while the LeCam EMA and its batch statistics follow the logits.

The batch's t / decode resolution / token count select the program (shapes); the noise index is
a traced value. Frozen networks (LPIPS VGG16, the DINO backbone, the SigLIP2 teacher) are held
outside the optimized state and are not checkpointed: they come from weight files at start.
"""
import dataclasses
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from .. import sharding
from ..data import sources
from ..data.degradation import DynamicResolution
from ..data.pipeline import ImagePipelineConfig, global_batch, image_dataset, image_iterator
from ..inference import images as image_io
from ..inference import tokenizer as inference
from ..models import remat
from ..models.frozen import TRAINABLE, Frozen
from ..models.precision import Precision, set_precision
from ..models.tokenizer import Tokenizer, TokenizerConfig
from . import driver, frozen_nets, gan
from .driver import total_steps, validate_run
from .optim import train_only
from .state import apply_gradients, ema_update

log = logging.getLogger("detailflow_jax")

def decoder_finetune_trainable(path: str) -> bool:
  """The parameters a decoder-only fine-tune trains (the reference's --finetune-decoder:
  'decoder.' and 'post_quant_conv'); encoder, quantizer (codebook) and the rest stay fixed."""
  return path.split("/")[0] in ("decoder", "post_quant_conv")



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


@flax.struct.dataclass
class TokenizerDraws:
  """Every random draw of one tokenizer step, made in one place (`TokenizerTrainer.draw`) from
  the state's key, or passed in (a test feeds the reference's own draws). Raw values, as the
  reference draws them, so the rules turning a draw into a decision stay in the step.
  The batch's degradation (t, decode resolution) and noise index are drawn by the data
  pipeline (data/degradation.py) before the step: they choose its shapes."""
  topk_ranks: jax.Array | None                # [B, max_tokens] int32 rank in the top-50 (self-correction)
  gen_fake: gan.AugmentDraws | None           # DiffAugment on the reconstructions (generator step)
  disc_real: gan.AugmentDraws | None          # discriminator step: the target
  disc_fake: gan.AugmentDraws | None          # discriminator step: the reconstructions
  cr_real: gan.AugmentDraws | None            # consistency regularisation: the target
  cr_fake: gan.AugmentDraws | None            # consistency regularisation: the reconstructions
  lpips_keep: tuple[jax.Array, ...] | None    # LPIPS heads' dropout keep-masks (LPIPS.tap_shapes)
  disc_keys: jax.Array                           # [4] keys of the DINO random 224 crop (real, fake, cr_real, cr_fake)


# DiffAugment calls of a step: (draw field, policy, gate probability) as the reference's VQLoss.
GEN_AUGMENT = "color,translation,cutout_0.2"
CR_AUGMENT = "color,translation,cutout_0.5"
AUGMENT_CALLS = {"gen_fake": (GEN_AUGMENT, 0.5), "disc_real": (GEN_AUGMENT, 0.5),
                 "disc_fake": (GEN_AUGMENT, 0.5), "cr_real": (CR_AUGMENT, 1.0),
                 "cr_fake": (CR_AUGMENT, 1.0)}
SELF_CORRECTION_TOP_K = 50


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
  # The reference's LPIPS heads hold Dropout(0.5), active in training (train_tokenizer.py calls
  # vq_loss.train()): its perceptual term is a noisy, unbiased estimate. 0 turns it off.
  lpips_dropout: float = 0.5

  def __post_init__(self):
    if self.reconstruction_loss not in ("l1", "l2"):
      raise ValueError(f"reconstruction_loss={self.reconstruction_loss!r} (l1 | l2)")
    if self.disc_loss not in gan.D_LOSSES:
      raise ValueError(f"disc_loss={self.disc_loss!r} (one of {sorted(gan.D_LOSSES)})")
    if self.gen_loss not in gan.G_LOSSES:
      raise ValueError(f"gen_loss={self.gen_loss!r} (one of {sorted(gan.G_LOSSES)})")
    if not 0.0 <= self.lpips_dropout < 1.0:
      raise ValueError(f"lpips_dropout={self.lpips_dropout} must be in [0, 1)")


class StepPrograms(NamedTuple):
  """Static description of one batch's program."""
  num_tokens: int      # t: tokens the decoder sees
  max_tokens: int      # cur_max_token_num: tokens the encoder produces
  decode_res: int
  correct: bool        # self-correction this batch (noise_idx >= 0)
  gan: bool            # the discriminator runs on this batch (its terms weigh 0 before disc_start)


def split_trainable(model: nnx.Module):
  """(graphdef, trainable params, Frozen weights, buffers): frozen by Variable type."""
  return nnx.split(model, TRAINABLE, Frozen, ...)


class TokenizerTrainer:
  """Owns the graph definitions, frozen weights and optimizers; `step(state, batch)` runs one
  jitted generator + discriminator update (compiled once per StepPrograms)."""

  def __init__(self, tokenizer: Tokenizer, losses: LossConfig, tx: optax.GradientTransformation,
               mesh, *, perceptual: nnx.Module | None = None,
               discriminator: nnx.Module | None = None,
               disc_tx: optax.GradientTransformation | None = None, seed: int = 0,
               rules=sharding.DEFAULT_RULES, precision: Precision = Precision(),
               encoder_remat: str = "none", decoder_remat: str = "none",
               finetune_decoder: bool = False):
    """precision: the mixed-precision policy (models/precision.py) of every forward in the
    step, as the reference's autocast block covers the generator, LPIPS and both discriminator
    passes. encoder_remat / decoder_remat: per-layer gradient checkpointing of the two towers
    (models/remat.py). finetune_decoder: the reference's --finetune-decoder: `tx` updates only
    the decoder and post_quant_conv (decoder_finetune_trainable) and the forward skips the
    global-token loss (its teacher pass included)."""
    if discriminator is not None and disc_tx is None:
      raise ValueError("a discriminator needs its own optimizer (disc_tx)")
    if losses.perceptual_weight and perceptual is None:
      raise ValueError("perceptual_weight > 0 needs a perceptual network (LPIPS)")
    if finetune_decoder:
      tx = train_only(tx, decoder_finetune_trainable)
    self.losses, self.tx, self.disc_tx, self.mesh, self.rules = losses, tx, disc_tx, mesh, rules
    self.precision = precision
    self.finetune_decoder = finetune_decoder
    self.remat = {"encoder": remat.check_policy(encoder_remat, "remat.encoder"),
                  "decoder": remat.check_policy(decoder_remat, "remat.decoder")}
    self.config = tokenizer.config
    graphdef, params, frozen, extras = split_trainable(tokenizer)
    self._graphdef = graphdef
    self._perc = nnx.split(perceptual) if perceptual is not None else None
    self._lpips_tap_shapes = perceptual.tap_shapes if perceptual is not None else None
    self._disc_graphdef = None
    # Reconstructions smaller than this get no adversarial terms (a PatchGAN has no logits for
    # them); DINO resizes every input to 224 and scores any size.
    self.disc_min_size = int(getattr(discriminator, "min_input_size", 1))
    self._skipped_gan_sizes = set()
    disc_params = disc_frozen = disc_extras = None
    if discriminator is not None:
      self._disc_graphdef, disc_params, disc_frozen, disc_extras = split_trainable(discriminator)
    # Frozen weights: replicated/sharded once, passed to every step, never donated or saved.
    frozen_tree = {"tokenizer": frozen, "disc": disc_frozen,
                   "perceptual": self._perc[1] if self._perc else None}
    self.frozen = _place(frozen_tree, sharding.shardings_for(frozen_tree, mesh, rules), mesh)
    self._init_parts = (params, extras, disc_params, disc_extras)
    self._seed = seed
    self._jitted: dict[StepPrograms, Callable] = {}

  # -- state ------------------------------------------------------------------------------------

  def init_state(self, abstract: bool = False) -> TokenizerTrainState:
    """The initial state, sharded. abstract=True (also implied by an abstract tokenizer, from
    nnx.eval_shape): ShapeDtypeStructs with the shardings, for AOT lowering (`compiled`)."""
    params, extras, disc_params, disc_extras = self._init_parts
    ema = self.losses.ema_decay > 0

    def init(params, extras, disc_params, disc_extras):
      return TokenizerTrainState(
          step=jnp.zeros((), jnp.int32), params=params, extras=extras,
          opt_state=self.tx.init(params), ema_params=jax.tree.map(jnp.copy, params) if ema else None,
          disc_params=disc_params, disc_extras=disc_extras,
          disc_opt_state=self.disc_tx.init(disc_params) if disc_params is not None else None,
          lecam_ema=jnp.zeros((2,), jnp.float32), rng=jax.random.key_data(jax.random.key(self._seed)))

    shapes = jax.eval_shape(init, params, extras, disc_params, disc_extras)
    self.state_shardings = sharding.shardings_for(shapes, self.mesh, self.rules)
    sharding.log_replicated_report(shapes.params, self.state_shardings.params, self.mesh)
    if abstract or _is_abstract(params):
      return _place(shapes, self.state_shardings, self.mesh)
    with jax.set_mesh(self.mesh):
      return jax.jit(init, out_shardings=self.state_shardings)(params, extras, disc_params, disc_extras)

  def model(self, state: TokenizerTrainState, ema: bool = False) -> Tokenizer:
    params = state.ema_params if ema and state.ema_params is not None else state.params
    return nnx.merge(self._graphdef, params, self.frozen["tokenizer"], state.extras)

  # -- the step ---------------------------------------------------------------------------------

  def _disc_apply(self, frozen, disc_params, disc_extras, images, key):
    extras = jax.tree.map(lambda x: x, disc_extras)  # fresh Variables owned by this trace
    disc = nnx.merge(self._disc_graphdef, disc_params, frozen["disc"], extras)
    set_precision(disc, self.precision)  # merged in this trace: the policy is local to it
    logits = disc(images, key=key, train=True)
    return logits.astype(jnp.float32), nnx.state(disc, nnx.Not(nnx.Param))

  def draw(self, prog: "StepPrograms", state: TokenizerTrainState, batch_size: int) -> TokenizerDraws:
    """Every draw of the step for a batch of `batch_size` images, from the state's key folded
    with its step (the one place the tokenizer step takes randomness)."""
    lc = self.losses
    keys = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step), 8)
    rows = 2 * batch_size if prog.correct else batch_size  # self-correction doubles the batch
    side = prog.decode_res
    aug = lambda i, name: gan.draw_augment(keys[i], AUGMENT_CALLS[name][0], rows, side, side)
    gan_aug = prog.gan and lc.use_diff_aug
    cr = prog.gan and bool(lc.disc_cr_loss_weight)
    lpips_keep = None
    if lc.perceptual_weight and lc.lpips_dropout:
      shapes = self._lpips_tap_shapes(rows, side, side)
      lpips_keep = tuple(jax.random.bernoulli(k, 1.0 - lc.lpips_dropout, shape)
                         for k, shape in zip(jax.random.split(keys[6], len(shapes)), shapes))
    return TokenizerDraws(
        topk_ranks=(jax.random.randint(keys[0], (batch_size, prog.max_tokens), 0,
                                       min(SELF_CORRECTION_TOP_K, self.config.codebook_size))
                    if prog.correct else None),
        gen_fake=aug(1, "gen_fake") if gan_aug else None,
        disc_real=aug(2, "disc_real") if gan_aug else None,
        disc_fake=aug(3, "disc_fake") if gan_aug else None,
        cr_real=aug(4, "cr_real") if cr else None,
        cr_fake=aug(5, "cr_fake") if cr else None,
        lpips_keep=lpips_keep, disc_keys=jax.random.split(keys[7], 4))

  def _gan_weight(self, state: TokenizerTrainState):
    # The reference runs the discriminator every step and weights its terms by
    # adopt_weight(disc_weight, global_step, disc_start): before disc_start the logits still
    # move the LeCam EMA and the discriminator's batch statistics / spectral-norm vectors, and
    # its optimizer steps on zero gradients (count, bias correction and schedule advance).
    step = state.step + 1  # the reference counts global_step from 1
    return gan.adopt_weight(self.losses.disc_weight, step, self.losses.disc_start)

  def generator_loss(self, prog: StepPrograms, state: TokenizerTrainState, frozen, batch,
                     draws: TokenizerDraws | None = None):
    """The generator's loss as a function of the trainable parameters, params -> (loss, (metrics,
    buffers, discriminator buffers, reconstruction, target)): reconstruction, VQ, alignment,
    perceptual and adversarial terms, as the step differentiates it (benchmarks/memory_plan.py
    reads the activations its backward keeps). `draws`: the step's (default: `draw`). The
    metrics also hold the per-image LPIPS distances and the generator step's logits."""
    lc = self.losses
    if draws is None:
      draws = self.draw(prog, state, batch["image"].shape[0])
    step = state.step + 1
    gan_weight = self._gan_weight(state)

    def gen_loss(params):
      extras = jax.tree.map(lambda x: x, state.extras)
      model = nnx.merge(self._graphdef, params, frozen["tokenizer"], extras)
      # Merged inside this trace: the policies below are local to this forward (autocast).
      set_precision(model, self.precision)
      remat.set_remat(model.encoder, self.remat["encoder"], "remat.encoder")
      remat.set_remat(model.decoder, self.remat["decoder"], "remat.decoder")
      out = model.train_forward(batch["image"], batch["target"], None,
                                num_tokens=prog.num_tokens, max_tokens=prog.max_tokens,
                                decode_res=prog.decode_res,
                                noise_idx=batch["noise_idx"] if prog.correct else None,
                                top_k=SELF_CORRECTION_TOP_K, topk_ranks=draws.topk_ranks,
                                decoder_finetune=self.finetune_decoder)
      diff = out.recon - out.target
      rec = jnp.mean(jnp.abs(diff)) if lc.reconstruction_loss == "l1" else jnp.mean(jnp.square(diff))
      metrics = {"rec_loss": rec, **out.losses}
      trace = {"recon": out.recon, "target": out.target, "indices": out.indices}
      loss = lc.reconstruction_weight * rec
      loss += lc.codebook_weight * (out.losses["vq_loss"] + out.losses["commit_loss"]
                                    + out.losses["entropy_loss"])
      loss += out.losses["align_loss"]
      if lc.perceptual_weight:
        perc = set_precision(nnx.merge(self._perc[0], frozen["perceptual"]), self.precision)
        per_image = perc(out.target, out.recon, draws.lpips_keep,
                         lc.lpips_dropout if draws.lpips_keep is not None else 0.0)
        p = jnp.mean(per_image)
        trace["lpips_per_image"] = per_image
        warm = (jnp.minimum(1.0, step / lc.perceptual_warmup) if lc.perceptual_warmup
                else jnp.float32(1.0))
        loss += lc.perceptual_weight * warm * p
        metrics.update(perceptual_loss=p, perceptual_weight=lc.perceptual_weight * warm)
      disc_extras = state.disc_extras
      if prog.gan:
        fake = out.recon
        if lc.use_diff_aug:
          fake = gan.augment(fake, draws.gen_fake, *AUGMENT_CALLS["gen_fake"])
        logits_fake, disc_extras = self._disc_apply(frozen, state.disc_params, state.disc_extras, fake,
                                                    draws.disc_keys[1])
        g_adv = gan.G_LOSSES[lc.gen_loss](logits_fake)
        loss += gan_weight * g_adv
        metrics.update(generator_adv_loss=g_adv, disc_weight=gan_weight)
        trace["gen_logits_fake"] = logits_fake
      metrics["loss"] = loss
      new_extras = nnx.state(model, nnx.Not(nnx.Param))
      return loss, (metrics, new_extras, disc_extras, out.recon, out.target, trace)
    return gen_loss

  def discriminator_loss(self, prog: StepPrograms, state: TokenizerTrainState, frozen,
                         disc_extras, real, fake, draws: TokenizerDraws):
    """The discriminator's loss as a function of its parameters, disc_params -> (loss, (LeCam
    EMA, buffers, metrics, logits by call)): hinge (or the configured loss) on the DiffAugmented
    target vs reconstruction, LeCam with its EMA updated first, consistency regularisation; the
    calls run in the reference's order (real, fake, cr_real, cr_fake), each one updating the
    buffers (batch statistics, spectral-norm vectors) the next one reads."""
    lc = self.losses
    step = state.step + 1  # the reference counts global_step from 1
    gan_weight = self._gan_weight(state)

    def disc_loss(disc_params):
      r, f = real, fake
      if lc.use_diff_aug:
        r = gan.augment(r, draws.disc_real, *AUGMENT_CALLS["disc_real"])
        f = gan.augment(f, draws.disc_fake, *AUGMENT_CALLS["disc_fake"])
      extras = disc_extras
      logits_real, extras = self._disc_apply(frozen, disc_params, extras, r, draws.disc_keys[0])
      logits_fake, extras = self._disc_apply(frozen, disc_params, extras, f, draws.disc_keys[1])
      logits = {"disc_real": logits_real, "disc_fake": logits_fake}
      d_loss, lecam_ema, d_metrics = gan.discriminator_losses(
          logits_real, logits_fake, state.lecam_ema, d_loss=lc.disc_loss,
          disc_weight=gan_weight, lecam_weight=lc.lecam_loss_weight, lecam_decay=lc.lecam_decay)
      if lc.disc_cr_loss_weight:
        # Consistency: logits on strongly augmented inputs match the plain ones.
        rs = gan.augment(real, draws.cr_real, *AUGMENT_CALLS["cr_real"])
        fs = gan.augment(fake, draws.cr_fake, *AUGMENT_CALLS["cr_fake"])
        logits_rs, extras = self._disc_apply(frozen, disc_params, extras, rs, draws.disc_keys[2])
        logits_fs, extras = self._disc_apply(frozen, disc_params, extras, fs, draws.disc_keys[3])
        logits.update(cr_real=logits_rs, cr_fake=logits_fs)
        cr = jnp.mean(jnp.square(jnp.concatenate([logits_real, logits_fake])
                                 - jnp.concatenate([logits_rs, logits_fs])))
        d_loss += jnp.where(step >= lc.disc_start, lc.disc_cr_loss_weight, 0.0) * cr
        d_metrics["disc_cr_loss"] = cr
      return d_loss, (lecam_ema, extras, d_metrics, logits)
    return disc_loss

  def _step(self, prog: StepPrograms, state: TokenizerTrainState, frozen, batch,
            draws: TokenizerDraws | None = None):
    lc = self.losses
    if draws is None:
      draws = self.draw(prog, state, batch["image"].shape[0])
    gen_loss = self.generator_loss(prog, state, frozen, batch, draws)
    (loss, (metrics, extras, disc_extras, recon, target, _)), grads = jax.value_and_grad(
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
      disc_loss = self.discriminator_loss(prog, state, frozen, disc_extras, real, fake, draws)
      (d_loss, (lecam_ema, disc_extras, d_metrics, _)), d_grads = jax.value_and_grad(
          disc_loss, has_aux=True)(state.disc_params)
      disc_params, d_opt = apply_gradients(state.disc_params, d_grads, state.disc_opt_state,
                                           self.disc_tx)
      new = new.replace(disc_params=disc_params, disc_opt_state=d_opt, disc_extras=disc_extras,
                        lecam_ema=lecam_ema)
      metrics.update(d_metrics, disc_loss=d_loss, disc_grad_norm=optax.tree.norm(d_grads))
    elif state.disc_params is not None:
      # No logits at this resolution (see programs): the optimizer still takes its step, on
      # zero gradients, so its count and schedule stay at the step's position.
      zeros = jax.tree.map(jnp.zeros_like, state.disc_params)
      d_updates, d_opt = self.disc_tx.update(zeros, state.disc_opt_state, state.disc_params)
      new = new.replace(disc_params=optax.apply_updates(state.disc_params, d_updates), disc_opt_state=d_opt)
    return new, metrics

  def programs(self, batch) -> StepPrograms:
    """The static settings of the program that runs `batch` (the GAN weight and the step count
    are traced, so they never select one)."""
    decode_res = int(batch["decode_res"])
    gan_on = self._disc_graphdef is not None
    if gan_on and decode_res < self.disc_min_size:
      gan_on = False
      if decode_res not in self._skipped_gan_sizes:
        self._skipped_gan_sizes.add(decode_res)
        log.info("decode resolution %d is below the discriminator's minimum input (%d px): "
                 "batches at it train without the adversarial terms", decode_res, self.disc_min_size)
    return StepPrograms(int(batch["t"]), int(batch["max_tokens"]), decode_res,
                        bool(self.config.correction_training and int(batch["noise_idx"]) >= 0),
                        bool(gan_on))

  def step(self, state: TokenizerTrainState, batch: dict[str, Any], draws: TokenizerDraws | None = None):
    """One update. `draws`: the step's random draws (default: drawn inside the step from
    state.rng)."""
    fn, arrays = self._program(batch, draws is not None)
    with jax.set_mesh(self.mesh):
      if draws is not None:
        return fn(state, self.frozen, arrays, draws)
      return fn(state, self.frozen, arrays)

  def compiled(self, state: TokenizerTrainState, batch: dict[str, Any]):
    """The compiled executable `step` runs for this batch (for cost analysis)."""
    return self.lower(state, batch).compile()

  def lower(self, state: TokenizerTrainState, batch: dict[str, Any]):
    """The program `step` runs for this batch, lowered ahead of time (state and images may be
    ShapeDtypeStructs, e.g. from init_state(abstract=True))."""
    fn, arrays = self._program(batch)
    with jax.set_mesh(self.mesh):
      return fn.lower(state, self.frozen, arrays)

  def _program(self, batch, given_draws: bool = False):
    prog = self.programs(batch)
    # (image/target may be ShapeDtypeStructs when lowering ahead of time)
    arrays = {"image": batch["image"], "target": batch["target"],
              "noise_idx": jnp.int32(batch["noise_idx"])}
    if (prog, given_draws) not in self._jitted:
      batch_shardings = {k: sharding.batch_sharding(self.mesh, len(np.shape(v)), self.rules)
                         if len(np.shape(v)) else sharding.replicated(self.mesh) for k, v in arrays.items()}
      frozen_shardings = jax.tree.map(lambda x: x.sharding, self.frozen)
      in_shardings = (self.state_shardings, frozen_shardings, batch_shardings)
      if given_draws:  # draws passed in (tests feeding a reference's draws): replicated
        fn = lambda state, frozen, batch, draws, prog=prog: self._step(prog, state, frozen, batch, draws)
        in_shardings += (sharding.replicated(self.mesh),)
      else:
        fn = lambda state, frozen, batch, prog=prog: self._step(prog, state, frozen, batch)
      self._jitted[(prog, given_draws)] = jax.jit(
          fn, in_shardings=in_shardings,
          out_shardings=(self.state_shardings, sharding.replicated(self.mesh)), donate_argnums=(0,))
    return self._jitted[(prog, given_draws)], arrays

  @property
  def num_programs(self) -> int:
    return len(self._jitted)


def _is_abstract(tree) -> bool:
  leaves = jax.tree.leaves(tree)
  return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def _place(tree, shardings, mesh):
  """Arrays put on the mesh with `shardings`; ShapeDtypeStructs (abstract models) become
  ShapeDtypeStructs that carry them."""
  def one(x, s):
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    return jax.device_put(x, s)
  with jax.set_mesh(mesh):
    return jax.tree.map(one, tree, shardings)


# --- config -> models ---------------------------------------------------------------------------

def loss_config_from(c: ml_collections.ConfigDict) -> LossConfig:
  return LossConfig(**c.losses.to_dict())


def check_encoder_init(c: ml_collections.ConfigDict) -> None:
  """The released recipes start the encoder from SigLIP2 (the reference's enc_pretrained); a
  run without weights.encoder_init would train it from random weights without a word, so
  from scratch has to be asked for (weights.encoder_from_scratch)."""
  w = c.weights
  if w.encoder_from_scratch and w.encoder_init:
    raise ValueError(f"weights.encoder_from_scratch=True and weights.encoder_init={w.encoder_init!r} "
                     "contradict each other: set one of them")
  if not w.encoder_init and not w.encoder_from_scratch:
    raise ValueError("weights.encoder_init is empty: the encoder would train from random weights. "
                     "Pass the SigLIP2 weights as --config.weights.encoder_init=PATH, or set "
                     "--config.weights.encoder_from_scratch=True to train it from scratch on purpose.")


def validate(c: ml_collections.ConfigDict, num_devices: int) -> TokenizerConfig:
  """Catches config mistakes before anything compiles or loads; messages name the field."""
  cfg = TokenizerConfig.from_dict(c.model)  # raises on unknown keys, group/causal/teacher mistakes
  loss_config_from(c)
  validate_run(c, num_devices)
  if c.disc.type not in ("dino", "patchgan", "none"):
    raise ValueError(f"disc.type={c.disc.type!r} (dino | patchgan | none)")
  if c.finetune_decoder and not c.init_from:
    raise ValueError("finetune_decoder=True without init_from: the encoder and codebook it keeps "
                     "fixed would stay at their initialisation")
  if not 0.0 <= c.data.degradation_prob <= 1.0:
    raise ValueError(f"data.degradation_prob={c.data.degradation_prob} is not a probability")
  remat.check_policy(c.remat.encoder, "remat.encoder")
  remat.check_policy(c.remat.decoder, "remat.decoder")
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
  frozen_nets.check_weight_files_used(c, cfg.teacher is not None)
  check_encoder_init(c)
  return cfg


def learning_rate(c: ml_collections.ConfigDict, steps: int):
  """The schedule both optimizers follow: the reference's timm scheduler (lr_scheduler cosine:
  warm-up from the absolute warmup_lr, cosine over all steps to end_lr_fraction * lr), or a
  constant lr (after an optional warm-up; the reference's lr_scheduler none has none). lr is
  scaled by batch/256 as the reference does."""
  from .optim import timm_cosine_schedule
  o = c.optimizer
  lr = o.lr * (c.data.batch_size / 256 if o.scale_lr_by_batch else 1.0)
  warmup = o.warmup_steps if o.warmup_steps >= 0 else int(
      o.warmup_epochs * c.data.examples_per_epoch // c.data.batch_size)
  if o.schedule == "cosine":
    return timm_cosine_schedule(lr, steps, warmup, o.warmup_lr, o.end_lr_fraction * lr)
  if o.schedule == "constant":
    return timm_cosine_schedule(lr, steps, warmup, o.warmup_lr, lr)  # min_lr = lr: flat
  raise ValueError(f"optimizer.schedule={o.schedule!r} (cosine | constant)")


def make_optimizers(c: ml_collections.ConfigDict, steps: int):
  """Adam(W) for the tokenizer and the discriminator on the same schedule (`learning_rate`):
  decoupled weight decay on the reference's decay groups (torch.optim.Adam = weight_decay 0),
  global-norm clipping at max_grad_norm (0: none)."""
  from ..convert.tokenizer import MAPPING
  from .optim import clipped_adamw, reference_decay_mask
  o = c.optimizer
  sched = learning_rate(c, steps)
  make = lambda mask: clipped_adamw(sched, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                                    max_grad_norm=o.max_grad_norm, mask=mask)
  # The tokenizer's groups follow the reference's torch shapes (its decoder.mask_token is
  # [1, 1, D], so it decays); the discriminators' layouts have the torch ranks already.
  return make(reference_decay_mask(MAPPING)), make(None)


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

def reconstruction_rows(fns: inference.TokenizerFns, images: np.ndarray) -> list:
  """Per image: the input, then its coarse-to-fine decodes (images.coarse_to_fine_strips),
  through the jitted entry points (eager decodes took 19.5 s for the tiny tokenizer's 7 columns,
  jitted 3.8 s with the compiles; later calls reuse them)."""
  indices, _ = fns.encode(images)
  counts = image_io.coarse_to_fine_counts(fns.schedule.token_list, fns.config.num_latent_tokens)
  return image_io.coarse_to_fine_strips(lambda t: fns.decode(indices, t), counts,
                                        images.shape[1], inputs=images)


def train(c: ml_collections.ConfigDict, workdir) -> Any:
  """Trains the tokenizer on c.data; resumes from the newest checkpoint in workdir; exports the
  final weights to workdir/export (a directory `load_tokenizer` reads)."""
  run = driver.Driver(c, workdir, validate)
  cfg, mesh, steps = TokenizerConfig.from_dict(c.model), run.mesh, total_steps(c)
  tokenizer = Tokenizer(cfg, rngs=c.seed)
  frozen_nets.load_tokenizer_weights(tokenizer, c.weights)
  if c.compute_dtype != "float32":
    log.info("compute dtype %s autocast: parameters and optimizer state stay float32", c.compute_dtype)
  perceptual = frozen_nets.build_perceptual(c) if c.losses.perceptual_weight else None
  discriminator = frozen_nets.build_discriminator(c)
  tx, disc_tx = make_optimizers(c, steps)
  trainer = TokenizerTrainer(tokenizer, loss_config_from(c), tx, mesh, perceptual=perceptual,
                             discriminator=discriminator, disc_tx=disc_tx, seed=c.seed,
                             precision=Precision.named(c.compute_dtype),
                             encoder_remat=c.remat.encoder, decoder_remat=c.remat.decoder,
                             finetune_decoder=c.finetune_decoder)
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
  source = sources.build_image_source(d)
  pipeline = ImagePipelineConfig(
      image_size=cfg.image_size, batch_size=d.batch_size // jax.process_count(), seed=c.seed,
      degradation_prob=d.degradation_prob, correction_training=cfg.correction_training,
      dynamic=dynamic, num_workers=d.num_workers)
  data_iter = image_iterator(source, pipeline, tokenizer.schedule, log_every=0)
  batches = (global_batch(b, mesh) for b in data_iter)

  hooks = []
  if c.recon_every:
    eval_cfg = ImagePipelineConfig(image_size=cfg.image_size, batch_size=c.num_recon_images,
                                   train=False, seed=0, num_epochs=1, shard_index=0, shard_count=1)
    recon_images = next(iter(image_dataset(source, eval_cfg)))["image"]
    recon_fns = []  # one TokenizerFns: its programs compile at the first hook only

    def write_reconstructions(step, state):
      # Every process takes part in gathering the (sharded) EMA weights; process 0 draws.
      graphdef, sharded = nnx.split(inference_export(trainer.model(state, ema=True)))
      host = driver.gather_to_host(sharded, mesh)
      if jax.process_index() != 0:
        return
      model = nnx.merge(graphdef, host)
      if recon_fns:
        recon_fns[0].load_weights(model)
      else:
        recon_fns.append(inference.TokenizerFns(model))
      rows = reconstruction_rows(recon_fns[0], recon_images)
      path = image_io.save_grid(run.workdir / "reconstructions" / f"step_{step:07d}.png", rows)
      run.writer.write_images(step, {"reconstruction": (rows[0][-1][None] + 1) / 2})
      log.info("wrote %s", path)

    hooks.append(driver.Hook(c.recon_every, write_reconstructions))

  def export(state):
    model = inference_export(trainer.model(state, ema=True))
    return "tokenizer", model.config.to_dict(), model

  state = run.run(state=state, state_shardings=trainer.state_shardings, step_fn=trainer.step,
                  data_iterator=data_iter, batches=batches, num_steps=steps, export=export, hooks=hooks)
  log.info("%d step programs compiled", trainer.num_programs)
  return state
