"""The resolution-aware 1D tokenizer: ViT encoder with latent tokens, VQ, prefix decoder.

The encoder appends `num_latent_tokens` learned tokens to the image patches; under the
group-causal mask token k only sees patches and earlier tokens (earlier groups after the
causal prefix), so every prefix of the sequence is a self-contained code of the image. The
decoder renders an image of any side `image_size` from the first `num_tokens` codes.
"""
import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ..schedule import ResolutionSchedule, causal_length
from .config_mapping import dataclass_from_mapping
from .frozen import freeze
from .keys import InitKeys
from .masks import patch_latent_mask
from .quantizer import VectorQuantizer, l2_normalize
from .vit import VisionTower, ViTConfig, torch_linear, unpatchify


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """Everything that changes the tokenizer's math (the reference ModelArgs + builder sizes)."""
  encoder: ViTConfig
  decoder: ViTConfig
  image_size: int = 256
  max_image_size: int = 256
  min_image_size: int = 256
  num_latent_tokens: int = 128
  group_size: int = 8
  causal_num: int | None = None
  codebook_size: int = 8192
  codebook_embed_dim: int = 8
  codebook_l2_norm: bool = True
  codebook_show_usage: bool = True
  commit_loss_beta: float = 0.25
  entropy_loss_ratio: float = 0.0
  vq_loss_ratio: float = 1.0
  causal_encoder: bool = True
  causal_decoder: bool = False
  correction_training: bool = True
  degradation_power: float = 1.5
  global_token_loss_weight: float = 0.0
  global_token_hidden: int = 1024
  repa: bool = False
  repa_proj_dim: int = 1024
  repa_layer_indices: int = 1
  repa_loss_weight: float = 0.5
  teacher: ViTConfig | None = None  # frozen SigLIP2 tower for REPA / global-token alignment

  def __post_init__(self):
    if self.num_latent_tokens % self.group_size:
      raise ValueError(f"num_latent_tokens={self.num_latent_tokens} is not a multiple of "
                       f"group_size={self.group_size}")
    if self.causal_len % self.group_size or self.causal_len > self.num_latent_tokens:
      raise ValueError(f"causal_num={self.causal_num} must be a multiple of group_size and at "
                       f"most num_latent_tokens")
    aligned = self.repa or self.global_token_loss_weight
    if aligned and self.teacher is None:
      raise ValueError("repa / global_token_loss_weight need a `teacher` ViTConfig")
    if self.teacher is not None and not aligned:
      raise ValueError("teacher is set but nothing uses it (repa=False, global_token_loss_weight=0): "
                       "set teacher=None")
    if not self.encoder.patch_embedding:
      raise ValueError("encoder.patch_embedding=False: the encoder embeds image patches")
    if self.decoder.patch_embedding:
      raise ValueError("decoder.patch_embedding=True: the decoder reads mask tokens, it has no "
                       "patch embedding")

  @property
  def causal_len(self) -> int:
    return causal_length(self.group_size, self.causal_num)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], where: str = "model") -> "TokenizerConfig":
    """From a mapping (a run config's `model` section, or a model directory's config.json);
    an unknown key is an error naming it."""
    return dataclass_from_mapping(cls, d, where=where,
                                  nested={"encoder": ViTConfig, "decoder": ViTConfig, "teacher": ViTConfig})


class EncodeOutput(NamedTuple):
  quant: jax.Array             # [B, T, D] l2-normalised code vectors (straight-through)
  indices: jax.Array           # [B, T] int32
  latents: jax.Array           # [B, T, D] quant_conv output before quantization
  distances: jax.Array         # [B, T, V] squared distances to every code
  normalized_input: jax.Array  # [B, T, D] what the codes approximate (the VQ losses read it)


class SelfCorrection(NamedTuple):
  """The reference's encode(..., noise_idx): tokens [noise_idx, noise_end) replaced by random
  top-k codes, everything after re-encoded from that prefix."""
  clean: EncodeOutput     # the plain encoding
  refined: EncodeOutput   # re-encoding from the perturbed prefix (positions >= noise_end count)
  noise_end: jax.Array    # int32, the shape of noise_idx: first position after the perturbed span
  quant: jax.Array        # [B, T, D] clean prefix, noisy span, refined rest (what the decoder sees)
  inputs: jax.Array       # [B, T] the same as indices: what a GPT is fed
  targets: jax.Array      # [B, T] clean codes up to noise_end, refined after: what it should predict


class GeneratorOutput(NamedTuple):
  recon: jax.Array     # [B or 2B, s, s, 3] float32: clean (and self-correction) reconstructions
  target: jax.Array    # the matching degraded targets
  losses: dict[str, jax.Array]
  indices: jax.Array   # clean indices [B, m]


def group_cosine_similarity(quant: jax.Array, group_size: int) -> jax.Array:
  """Mean cosine similarity between distinct tokens of the same group (a diagnostic)."""
  b, m, d = quant.shape
  g = l2_normalize(quant.reshape(b * m // group_size, group_size, d).astype(jnp.float32), 1e-8)
  sims = jnp.einsum("ngd,nhd->ngh", g, g)
  off_diagonal = 1.0 - jnp.eye(group_size)
  return jnp.mean(jnp.sum(sims * off_diagonal, (1, 2)) / (group_size * (group_size - 1)))


def _before(m: int, position: jax.Array) -> jax.Array:
  """[B or 1, m] bool: index < position, for a scalar or per-image [B] (traced) position."""
  return jnp.arange(m)[None] < jnp.reshape(position, (-1, 1))


def _tokens_param(rngs, shape, axes):
  return nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), shape), eager_sharding=False, out_sharding=axes)


class Encoder(nnx.Module):

  def __init__(self, cfg: TokenizerConfig, *, rngs: nnx.Rngs):
    vit = cfg.encoder
    self.cfg = cfg
    self.visual_model = VisionTower(vit, rngs=rngs)
    shape = (cfg.num_latent_tokens, vit.hidden_size)
    self.latent_tokens = _tokens_param(rngs, shape, (None, "embed"))
    self.refined_tokens = _tokens_param(rngs, shape, (None, "embed"))
    self.latent_pos_embed = _tokens_param(rngs, shape, (None, "embed"))

  def __call__(self, images: jax.Array, num_tokens: int | None = None,
               prefix_tokens: jax.Array | None = None, prefix_len: jax.Array | None = None):
    """Returns (latent outputs [B, num_tokens, H], patch outputs [B, n, H]).

    With `prefix_tokens` [B, k, H] (refine_conv of a quantized prefix, k <= num_tokens), latent
    input i is prefix_tokens[:, i] for i < prefix_len and refined_tokens[i] after (instead of
    latent_tokens). prefix_len (default k) may be traced, a scalar or per image [B]: every
    prefix length shares one compiled program.
    """
    cfg = self.cfg
    m = cfg.num_latent_tokens if num_tokens is None else num_tokens
    if not 1 <= m <= cfg.num_latent_tokens:
      raise ValueError(f"num_tokens={m} outside [1, {cfg.num_latent_tokens}]")
    x = self.visual_model.embeddings.embed_patches(images)
    b, n, _ = x.shape
    if prefix_tokens is None:
      z = jnp.broadcast_to(self.latent_tokens[:m][None].astype(x.dtype), (b, m, x.shape[-1]))
    else:
      k = prefix_tokens.shape[1]
      if k > m:
        raise ValueError(f"refine prefix of {k} tokens is longer than num_tokens={m}")
      prefix = jnp.pad(prefix_tokens.astype(x.dtype), ((0, 0), (0, m - k), (0, 0)))
      z = jnp.where(_before(m, k if prefix_len is None else prefix_len)[..., None], prefix,
                    self.refined_tokens[:m][None].astype(x.dtype))
    z = z + self.latent_pos_embed[:m][None].astype(x.dtype)
    mask = None
    if cfg.causal_encoder:
      mask = jnp.asarray(patch_latent_mask(
          n, m, latent_causal=True, patches_see_latents=False, latents_see_patches=True,
          group_size=cfg.group_size, causal_num=cfg.causal_len))
    h = self.visual_model.run_layers(jnp.concatenate([x, z], axis=1), mask)
    return h[:, n:], h[:, :n]


class Decoder(nnx.Module):

  def __init__(self, cfg: TokenizerConfig, *, rngs: nnx.Rngs):
    vit = cfg.decoder
    self.cfg = cfg
    self.visual_model = VisionTower(vit, rngs=rngs)
    self.latent_pos_embed = _tokens_param(rngs, (cfg.num_latent_tokens, vit.hidden_size),
                                          (None, "embed"))
    self.mask_token = _tokens_param(rngs, (vit.hidden_size,), ("embed",))
    self.to_pixel = torch_linear(rngs, vit.hidden_size, vit.num_channels * vit.patch_size ** 2,
                                 ("embed", None))

  def __call__(self, z: jax.Array, image_size: int, capture_layer: int | None = None,
               num_valid: jax.Array | None = None):
    """z: [B, t, H] decoder-space latents (all of them are used, or with `num_valid` (traced)
    only the first num_valid: the rest are keys no query may attend to, so the patches come out
    as from z[:, :num_valid]). Returns NHWC pixels of side `image_size` (and the hidden states
    after `capture_layer` when asked, for REPA)."""
    cfg, vit = self.cfg, self.cfg.decoder
    if image_size % vit.patch_size:
      raise ValueError(f"image_size={image_size} is not a multiple of the decoder patch "
                       f"size {vit.patch_size}")
    grid = image_size // vit.patch_size
    # The residual stream is in the parameters' dtype: float32 under bf16 autocast (z is then a
    # bf16 projection), unchanged for native float32 or bf16 weights.
    z = z.astype(jnp.promote_types(z.dtype, self.latent_pos_embed.dtype))
    b, t, hidden = z.shape
    n = grid * grid
    x = self.mask_token[...].astype(z.dtype) + self.visual_model.embeddings.positions(grid, grid)
    x = jnp.broadcast_to(x[None].astype(z.dtype), (b, n, hidden))
    z = z + self.latent_pos_embed[:t][None].astype(z.dtype)
    mask = None
    if cfg.causal_decoder:
      mask = jnp.asarray(patch_latent_mask(
          n, t, latent_causal=True, patches_see_latents=True, latents_see_patches=False,
          group_size=cfg.group_size, causal_num=cfg.causal_len))
    if num_valid is not None:
      # Causal masks keep their prefix under truncation, so hiding the keys past the valid
      # latents is all it takes; exp(min - max) underflows to an exact 0 weight.
      keys = (jnp.arange(n + t) < n + num_valid)[None, :]
      mask = keys if mask is None else mask & keys
    out = self.visual_model.run_layers(jnp.concatenate([x, z], axis=1), mask,
                                       capture_layer=capture_layer, num_outputs=n)
    h, captured = out if capture_layer is not None else (out, None)
    pixels = unpatchify(self.to_pixel(h[:, :n]), vit.patch_size, vit.num_channels)
    if capture_layer is not None:
      return pixels, captured[:, :n]
    return pixels


class ProjectionMLP(nnx.Module):
  """Linear-SiLU-Linear-SiLU-Linear (the reference's build_mlp)."""

  def __init__(self, din: int, hidden: int, dout: int, *, rngs: nnx.Rngs):
    self.layers = nnx.List([torch_linear(rngs, din, hidden, (None, "mlp")),
                            torch_linear(rngs, hidden, hidden, ("mlp", "mlp")),
                            torch_linear(rngs, hidden, dout, ("mlp", "embed"))])

  def __call__(self, x):
    x = jax.nn.silu(self.layers[0](x))
    x = jax.nn.silu(self.layers[1](x))
    return self.layers[2](x)


class Teacher(nnx.Module):
  """Frozen SigLIP2 vision tower whose features the global token (and REPA) align to (its
  weights are `Frozen`: loaded from a file, never trained)."""

  def __init__(self, vit: ViTConfig, *, rngs: nnx.Rngs):
    self.visual_model = freeze(VisionTower(vit, rngs=rngs))

  def __call__(self, images):
    # The reference takes HF's last_hidden_state (already post-LayerNormed) and applies
    # post_layernorm once more; we keep that so aligned targets match its training.
    return self.visual_model.post_layernorm(self.visual_model(images))


class Tokenizer(nnx.Module):

  def __init__(self, cfg: TokenizerConfig, *, rngs=None):
    # rngs: an nnx.Rngs, an InitKeys, or an int seed (default 0). The tokenizer has no dropout,
    # so keys are only needed for initialisation.
    rngs = InitKeys(rngs or 0) if rngs is None or isinstance(rngs, int) else rngs
    self.config = cfg
    enc_dim, dec_dim, code_dim = cfg.encoder.hidden_size, cfg.decoder.hidden_size, cfg.codebook_embed_dim
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)
    # Plain nn.Linear layers in the reference: torch's default init.
    self.quant_conv = torch_linear(rngs, enc_dim, code_dim, ("embed", None))
    self.post_quant_conv = torch_linear(rngs, code_dim, dec_dim, (None, "embed"))
    if cfg.correction_training:
      self.refine_conv = torch_linear(rngs, code_dim, enc_dim, (None, "embed"))
    self.quantize = VectorQuantizer(
        cfg.codebook_size, code_dim, beta=cfg.commit_loss_beta,
        entropy_loss_ratio=cfg.entropy_loss_ratio, l2_norm=cfg.codebook_l2_norm,
        show_usage=cfg.codebook_show_usage, vq_loss_ratio=cfg.vq_loss_ratio, rngs=rngs)
    if cfg.repa or cfg.global_token_loss_weight:
      self.repa_model = Teacher(cfg.teacher, rngs=rngs)
      if cfg.repa:
        self.projection = ProjectionMLP(dec_dim, cfg.repa_proj_dim, cfg.teacher.hidden_size, rngs=rngs)
      if cfg.global_token_loss_weight:
        self.global_token_proj = ProjectionMLP(code_dim, cfg.global_token_hidden,
                                               cfg.teacher.hidden_size, rngs=rngs)

  @property
  def schedule(self) -> ResolutionSchedule:
    cfg = self.config
    return ResolutionSchedule(
        max_image_size=cfg.max_image_size, max_tokens=cfg.num_latent_tokens,
        group_size=cfg.group_size, causal_num=cfg.causal_num, power=cfg.degradation_power,
        enc_patch_size=cfg.encoder.patch_size, dec_patch_size=cfg.decoder.patch_size,
        min_dec_res=cfg.decoder.patch_size)

  @property
  def param_dtype(self):
    return self.quant_conv.kernel.dtype

  # --- encoding -------------------------------------------------------------------------

  def _encode(self, images, num_tokens, prefix_tokens=None, prefix_len=None) -> EncodeOutput:
    latents, _ = self.encoder(images.astype(self.param_dtype), num_tokens, prefix_tokens, prefix_len)
    h = self.quant_conv(latents)
    q = self.quantize(h)
    return EncodeOutput(q.quant, q.indices, h, q.distances, q.normalized_input)

  def encode(self, images: jax.Array, num_tokens: int | None = None) -> EncodeOutput:
    """images: NHWC in [-1, 1]. Encodes the first `num_tokens` tokens (default: all)."""
    return self._encode(images, num_tokens)

  def refine(self, images: jax.Array, prefix_quant: jax.Array, num_tokens: int | None = None,
             prefix_len: jax.Array | None = None) -> EncodeOutput:
    """Self-correction encode: the first prefix_len (default k; traced, scalar or [B]) positions
    are seeded with refine_conv(prefix_quant) ([B, k, D], a possibly perturbed quantized
    prefix); returns codes for all num_tokens positions (callers keep positions >= prefix_len,
    as the reference does)."""
    if not self.config.correction_training:
      raise ValueError("this tokenizer has no refine path (correction_training=False)")
    return self._encode(images, num_tokens, self.refine_conv(prefix_quant.astype(self.param_dtype)),
                        prefix_len)

  def self_correct(self, images: jax.Array, noise_idx: jax.Array, key: jax.Array | None,
                   num_tokens: int | None = None, top_k: int = 50,
                   topk_ranks: jax.Array | None = None) -> SelfCorrection:
    """Perturbs tokens [noise_idx, noise_end) with random top-k codes and re-encodes the rest
    conditioned on that prefix. noise_idx: int32, a scalar or per image [B], may be traced
    (one compiled program for every noise index); the span is 1 token inside the causal
    prefix, a whole group after it. The random codes: `topk_ranks` [B, num_tokens] (the rank
    of each position's code among its top_k nearest, a draw made by the caller), or ranks
    drawn from `key` when not given."""
    cfg = self.config
    clean = self.encode(images, num_tokens)
    m = clean.indices.shape[1]
    noise_idx = jnp.asarray(noise_idx, jnp.int32)
    noise_end = noise_idx + jnp.where(noise_idx < cfg.causal_len, 1, cfg.group_size).astype(jnp.int32)
    if topk_ranks is None:
      noisy = self.quantize.random_topk_codes(clean, top_k, key)
    else:
      noisy = self.quantize.topk_codes(clean, top_k, topk_ranks)
    prefix_idx = jnp.where(_before(m, noise_idx), clean.indices, noisy)
    prefix_quant = jax.lax.stop_gradient(self.quantize.lookup(prefix_idx))
    refined = self.refine(images, prefix_quant, num_tokens, noise_end)
    in_prefix = _before(m, noise_end)
    quant = jnp.where(in_prefix[..., None], prefix_quant.astype(refined.quant.dtype), refined.quant)
    return SelfCorrection(clean, refined, noise_end, quant,
                          jnp.where(in_prefix, prefix_idx, refined.indices),
                          jnp.where(in_prefix, clean.indices, refined.indices))

  # --- decoding -------------------------------------------------------------------------

  def decode(self, quant: jax.Array, num_tokens: int | None = None,
             image_size: int | None = None, capture_layer: int | None = None):
    """Renders NHWC pixels (not clipped) of side `image_size` from the first `num_tokens` codes
    (and the decoder's hidden states after `capture_layer` when asked, for REPA).

    `image_size` defaults to the resolution those tokens stand for (token2dec_out_res).
    """
    t = quant.shape[1] if num_tokens is None else num_tokens
    if not 1 <= t <= quant.shape[1]:
      raise ValueError(f"num_tokens={t} outside [1, {quant.shape[1]}]")
    if image_size is None:
      image_size = self.schedule.decode_resolution(t)
    z = self.post_quant_conv(quant[:, :t].astype(self.param_dtype))
    return self.decoder(z, image_size, capture_layer)

  def decode_indices(self, indices: jax.Array, num_tokens: int | None = None,
                     image_size: int | None = None) -> jax.Array:
    return self.decode(self.quantize.lookup(indices), num_tokens, image_size)

  def decode_prefix(self, indices: jax.Array, num_tokens: jax.Array, image_size: int) -> jax.Array:
    """decode_indices(indices, num_tokens, image_size) with num_tokens traced: all L =
    indices.shape[1] positions run and those at or past num_tokens are masked out, so one
    compiled program (per L and image_size) serves every count up to L; what the positions past
    num_tokens hold does not matter. Callers pad a prefix to its resolution's
    `ResolutionSchedule.decode_token_bucket`: one program per decode resolution."""
    z = self.post_quant_conv(self.quantize.lookup(indices).astype(self.param_dtype))
    return self.decoder(z, image_size, num_valid=num_tokens)

  def __call__(self, images: jax.Array, num_tokens: int | None = None,
               image_size: int | None = None) -> jax.Array:
    """Reconstruction: encode then decode with the same tokens at `image_size` (default: input)."""
    enc = self.encode(images, num_tokens)
    return self.decode(enc.quant, None, image_size or images.shape[1])


  # --- training -------------------------------------------------------------------------

  def train_forward(self, images: jax.Array, target: jax.Array, key: jax.Array | None, *,
                    num_tokens: int, max_tokens: int, decode_res: int,
                    noise_idx: jax.Array | None = None, top_k: int = 50,
                    decoder_finetune: bool = False,
                    topk_ranks: jax.Array | None = None) -> GeneratorOutput:
    """The reference VQModel.forward in training mode: encode `max_tokens` tokens; with a
    (traced, scalar) noise_idx also the self-correction half (batch doubled, targets repeated);
    decode the first `num_tokens` at `decode_res`; VQ terms and alignment losses. Updates the
    codebook-usage window. decoder_finetune (the reference's keyword): no global-token loss (its
    gradients reach only the encoder side and its projection, which a decoder-only fine-tune
    keeps fixed), so no teacher pass for it; REPA stays. With REPA and a target of the input's
    size the global token's teacher features are REPA's, of the target (the reference's reuse).
    topk_ranks: self-correction's draws (see self_correct); `key` is used only without them."""
    cfg = self.config
    if noise_idx is None:
      clean = self.encode(images, max_tokens)
      vq = self.quantize.losses(clean)
      quant, usage = clean.quant, self.quantize.update_usage(clean.indices.reshape(-1))
    else:
      sc = self.self_correct(images, noise_idx, key, max_tokens, top_k, topk_ranks)
      clean = sc.clean
      vq_clean, vq_refined = self.quantize.losses(clean), self.quantize.losses(sc.refined, sc.noise_end)
      # Both halves' VQ terms, weighted by how many positions each trains.
      total = 2 * max_tokens - sc.noise_end
      w_clean, w_noisy = max_tokens / total, (max_tokens - sc.noise_end) / total
      vq = {k: vq_clean[k] * w_clean + vq_refined[k] * w_noisy for k in vq_clean}
      quant = jnp.concatenate([clean.quant, sc.quant], axis=0)
      target = jnp.concatenate([target, target], axis=0)
      # The reference's quantizer measures usage in each call (the clean encode's indices
      # pushed first, then all of the refine encode's) and weights the two like the losses.
      usage = (w_clean * self.quantize.update_usage(clean.indices.reshape(-1))
               + w_noisy * self.quantize.update_usage(sc.refined.indices.reshape(-1)))
    losses = dict(vq, codebook_usage=usage,
                  fea_cosine_sim=group_cosine_similarity(jax.lax.stop_gradient(quant), cfg.group_size))
    align = jnp.float32(0.0)
    teacher = None
    if cfg.repa:
      recon, hidden = self.decode(quant, num_tokens, decode_res, capture_layer=cfg.repa_layer_indices)
      teacher = jax.lax.stop_gradient(self.repa_model(target.astype(self.param_dtype)))
      pred = l2_normalize(self.projection(hidden).astype(jnp.float32))
      losses["repa_loss"] = jnp.mean(-jnp.sum(pred * l2_normalize(teacher.astype(jnp.float32)), -1))
      align += cfg.repa_loss_weight * losses["repa_loss"]
    else:
      recon = self.decode(quant, num_tokens, decode_res)
    if cfg.global_token_loss_weight and not decoder_finetune:
      # The first (global) token, mapped by an MLP, points the way of the mean SigLIP2 feature
      # of the full-resolution input; as the reference, REPA's features of a target of the
      # input's size serve instead (one teacher pass; a degraded target's features, then).
      if teacher is not None and target.shape[1:3] == images.shape[1:3]:
        features = teacher[:images.shape[0]]
      else:
        features = jax.lax.stop_gradient(self.repa_model(images.astype(self.param_dtype)))
      goal = l2_normalize(jnp.mean(features.astype(jnp.float32), axis=1))
      pred = l2_normalize(self.global_token_proj(clean.quant[:, 0]).astype(jnp.float32))
      losses["global_token_loss"] = jnp.mean(-jnp.sum(pred * goal, -1))
      align += cfg.global_token_loss_weight * losses["global_token_loss"]
    losses["align_loss"] = align
    return GeneratorOutput(recon.astype(jnp.float32), target.astype(jnp.float32), losses, clean.indices)
