"""The resolution-aware 1D tokenizer: ViT encoder with latent tokens, VQ, prefix decoder.

The encoder appends `num_latent_tokens` learned tokens to the image patches; under the
group-causal mask token k only sees patches and earlier tokens (earlier groups after the
causal prefix), so every prefix of the sequence is a self-contained code of the image. The
decoder renders an image of any side `image_size` from the first `num_tokens` codes.
"""
import dataclasses
from typing import Any, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from ..schedule import ResolutionSchedule
from .keys import InitKeys
from .masks import patch_latent_mask
from .quantizer import VectorQuantizer
from .vit import ViTConfig, VisionTower, dense, unpatchify


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
  causal_num: Optional[int] = None
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
  teacher: Optional[ViTConfig] = None  # frozen SigLIP2 tower for REPA / global-token alignment

  def __post_init__(self):
    if self.num_latent_tokens % self.group_size:
      raise ValueError(f"num_latent_tokens={self.num_latent_tokens} is not a multiple of "
                       f"group_size={self.group_size}")
    if self.causal_len % self.group_size or self.causal_len > self.num_latent_tokens:
      raise ValueError(f"causal_num={self.causal_num} must be a multiple of group_size and at "
                       f"most num_latent_tokens")
    if (self.repa or self.global_token_loss_weight) and self.teacher is None:
      raise ValueError("repa / global_token_loss_weight need a `teacher` ViTConfig")

  @property
  def causal_len(self) -> int:
    return self.group_size if self.causal_num is None else self.causal_num

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Dict[str, Any]) -> "TokenizerConfig":
    d = dict(d)
    for key in ("encoder", "decoder", "teacher"):
      if d.get(key) is not None:
        d[key] = ViTConfig(**d[key])
    return cls(**d)


class EncodeOutput(NamedTuple):
  quant: jax.Array    # [B, T, D] l2-normalised code vectors (straight-through)
  indices: jax.Array  # [B, T] int32
  latents: jax.Array  # [B, T, D] quant_conv output before quantization


def _tokens_param(rngs, shape, axes):
  return nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), shape), out_sharding=axes)


class Encoder(nnx.Module):

  def __init__(self, cfg: TokenizerConfig, *, rngs: nnx.Rngs):
    vit = cfg.encoder
    self.cfg = cfg
    self.visual_model = VisionTower(vit, rngs=rngs)
    shape = (cfg.num_latent_tokens, vit.hidden_size)
    self.latent_tokens = _tokens_param(rngs, shape, (None, "embed"))
    self.refined_tokens = _tokens_param(rngs, shape, (None, "embed"))
    self.latent_pos_embed = _tokens_param(rngs, shape, (None, "embed"))

  def __call__(self, images: jax.Array, num_tokens: Optional[int] = None,
               noise_token: Optional[jax.Array] = None, noise_len: Optional[jax.Array] = None):
    """Returns (latent outputs [B, num_tokens, H], patch outputs [B, n, H]).

    With `noise_token` [B, k, H] (refine_conv of a given quantized prefix), the first k latent
    inputs are those and the rest come from `refined_tokens` instead of `latent_tokens`.
    With `noise_len` (possibly traced), `noise_token` spans all num_tokens positions and only
    its first noise_len are used: one compiled program for every prefix length (training).
    """
    cfg = self.cfg
    m = cfg.num_latent_tokens if num_tokens is None else num_tokens
    if not 1 <= m <= cfg.num_latent_tokens:
      raise ValueError(f"num_tokens={m} outside [1, {cfg.num_latent_tokens}]")
    x = self.visual_model.embeddings.embed_patches(images)
    b, n, _ = x.shape
    if noise_token is None:
      z = jnp.broadcast_to(self.latent_tokens[:m][None], (b, m, x.shape[-1]))
    elif noise_len is not None:
      if noise_token.shape[1] != m:
        raise ValueError(f"with noise_len, noise_token must span num_tokens={m} positions, "
                         f"got {noise_token.shape[1]}")
      use_noise = (jnp.arange(m) < noise_len)[None, :, None]
      z = jnp.where(use_noise, noise_token.astype(x.dtype), self.refined_tokens[:m][None].astype(x.dtype))
    else:
      k = noise_token.shape[1]
      if k > m:
        raise ValueError(f"refine prefix of {k} tokens is longer than num_tokens={m}")
      rest = jnp.broadcast_to(self.refined_tokens[k:m][None], (b, m - k, x.shape[-1]))
      z = jnp.concatenate([noise_token.astype(x.dtype), rest], axis=1)
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
    self.to_pixel = dense(rngs, vit.hidden_size, vit.num_channels * vit.patch_size ** 2,
                            ("embed", None))

  def __call__(self, z: jax.Array, image_size: int, capture_layer: Optional[int] = None):
    """z: [B, t, H] decoder-space latents (all of them are used). Returns NHWC pixels of side
    `image_size` (and the hidden states after `capture_layer` when asked, for REPA)."""
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
    self.layers = nnx.List([dense(rngs, din, hidden, (None, "mlp")),
                            dense(rngs, hidden, hidden, ("mlp", "mlp")),
                            dense(rngs, hidden, dout, ("mlp", "embed"))])

  def __call__(self, x):
    x = jax.nn.silu(self.layers[0](x))
    x = jax.nn.silu(self.layers[1](x))
    return self.layers[2](x)


class Teacher(nnx.Module):
  """Frozen SigLIP2 vision tower whose features the global token (and REPA) align to."""

  def __init__(self, vit: ViTConfig, *, rngs: nnx.Rngs):
    self.visual_model = VisionTower(vit, rngs=rngs)

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
    self.quant_conv = dense(rngs, enc_dim, code_dim, ("embed", None))
    self.post_quant_conv = dense(rngs, code_dim, dec_dim, (None, "embed"))
    if cfg.correction_training:
      self.refine_conv = dense(rngs, code_dim, enc_dim, (None, "embed"))
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

  def _compute_dtype(self):
    return self.quant_conv.kernel.dtype

  # --- encoding -------------------------------------------------------------------------

  def encode(self, images: jax.Array, num_tokens: Optional[int] = None) -> EncodeOutput:
    """images: NHWC in [-1, 1]. Encodes the first `num_tokens` tokens (default: all)."""
    latents, _ = self.encoder(images.astype(self._compute_dtype()), num_tokens)
    h = self.quant_conv(latents)
    out = self.quantize(h)
    return EncodeOutput(out.quant, out.indices, h)

  def refine(self, images: jax.Array, prefix_quant: jax.Array,
             num_tokens: Optional[int] = None) -> EncodeOutput:
    """Self-correction encode: the first k positions are seeded with refine_conv(prefix_quant)
    ([B, k, D], a possibly perturbed quantized prefix); returns codes for all num_tokens
    positions (callers keep positions >= k, as the reference does)."""
    if not self.config.correction_training:
      raise ValueError("this tokenizer has no refine path (correction_training=False)")
    noise_token = self.refine_conv(prefix_quant.astype(self._compute_dtype()))
    latents, _ = self.encoder(images.astype(self._compute_dtype()), num_tokens, noise_token)
    h = self.quant_conv(latents)
    out = self.quantize(h)
    return EncodeOutput(out.quant, out.indices, h)

  def encode_noisy(self, images: jax.Array, noise_idx: int, key: jax.Array,
                   num_tokens: Optional[int] = None, top_k: int = 50):
    """The reference's encode(..., noise_idx): perturb tokens [noise_idx, noise_end) with
    random top-k codes, re-encode the rest conditioned on that prefix.

    Returns a dict with `quant` ([B, T, D]: clean prefix, noisy span, refined rest), and the
    index triple `clean`, `input` (what a GPT sees), `label` (what it should predict).
    """
    clean_lat, _ = self.encoder(images.astype(self._compute_dtype()), num_tokens)
    h = self.quant_conv(clean_lat)
    clean = self.quantize(h)
    noise_end = noise_idx + (1 if noise_idx < self.config.causal_len else self.config.group_size)
    noisy_idx = self.quantize.random_topk_codes(clean, top_k, key)
    prefix_idx = jnp.concatenate([clean.indices[:, :noise_idx], noisy_idx[:, noise_idx:noise_end]], 1)
    prefix_quant = jax.lax.stop_gradient(self.quantize.lookup(prefix_idx))
    refined = self.refine(images, prefix_quant, num_tokens)
    quant = jnp.concatenate([prefix_quant, refined.quant[:, noise_end:]], axis=1)
    input_idx = jnp.concatenate([prefix_idx, refined.indices[:, noise_end:]], axis=1)
    label_idx = jnp.concatenate([clean.indices[:, :noise_end], refined.indices[:, noise_end:]], 1)
    return {"quant": quant, "clean_quant": clean.quant, "clean": clean.indices,
            "input": input_idx, "label": label_idx, "noise_end": noise_end}

  # --- decoding -------------------------------------------------------------------------

  def decode(self, quant: jax.Array, num_tokens: Optional[int] = None,
             image_size: Optional[int] = None) -> jax.Array:
    """Renders NHWC pixels (not clipped) of side `image_size` from the first `num_tokens` codes.

    `image_size` defaults to the resolution those tokens stand for (token2dec_out_res).
    """
    t = quant.shape[1] if num_tokens is None else num_tokens
    if not 1 <= t <= quant.shape[1]:
      raise ValueError(f"num_tokens={t} outside [1, {quant.shape[1]}]")
    if image_size is None:
      image_size = self.schedule.decode_resolution(t)
    z = self.post_quant_conv(quant[:, :t].astype(self._compute_dtype()))
    return self.decoder(z, image_size)

  def decode_indices(self, indices: jax.Array, num_tokens: Optional[int] = None,
                     image_size: Optional[int] = None) -> jax.Array:
    return self.decode(self.quantize.lookup(indices), num_tokens, image_size)

  def __call__(self, images: jax.Array, num_tokens: Optional[int] = None,
               image_size: Optional[int] = None) -> jax.Array:
    """Reconstruction: encode then decode with the same tokens at `image_size` (default: input)."""
    enc = self.encode(images, num_tokens)
    return self.decode(enc.quant, None, image_size or images.shape[1])
