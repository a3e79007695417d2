"""The DINO discriminator (StyleGAN-T / VAR style) that DetailFlow trains its tokenizer against.

A frozen DINO ViT-S/16 reads the image; the token sequences after the embedding and after a few
blocks (cls token added to every patch token) feed small trainable 1D-conv heads, each giving
one logit per patch. The reference's details kept here:
  * input in [-1, 1] mapped to ImageNet normalisation, then brought to 224: a random 224 crop
    with probability 1/2 when both sides exceed 224 (one offset for the whole batch, as
    torchvision's RandomCrop on a batch tensor), otherwise area resize (larger) or bicubic
    (smaller). Randomness comes from an explicit key; without one there is no crop.
  * the ViT MLP uses tanh-approximated GELU, LayerNorm eps 1e-6, the final norm is unused and
    the key part of the fused qkv bias is zeroed at load (softmax-invariant anyway).
  * heads: [Conv1d k=1 + norm + LeakyReLU(0.2)], a residual [Conv1d k=9 circular + norm +
    LeakyReLU] averaged as (f(x) + x) / sqrt(2), then Conv1d(C, 1, k=1); spectral norm on every
    conv; norm 'sbn' (SyncBatchNorm, the reference default) or 'bn' (BatchNormLocal).

Mixed precision (models/precision.py; the reference runs the discriminator inside its bf16
autocast): image preparation and the embedding sum are float32 (autocast disabled there in the
reference), the ViT is the tokenizer's (bf16 linears and attention matmuls with float32
accumulation, float32 LayerNorm, softmax and residual stream), readouts float32; the heads'
spectral-norm convs are bf16 products (disc_layers.Conv1d), 'sbn' keeps their bf16 dtype
through the norm and LeakyReLU while 'bn' returns float32; logits come back float32.

Frozen vs trainable: the backbone's weights are `Frozen` variables (models/frozen.py), which
trainers keep out of the optimised parameters by type; the heads are nnx.Params; spectral-norm
vectors and batch-norm statistics are nnx.BatchStat side state.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ..ops.resize import resize_area, resize_bicubic
from .disc_layers import BatchNorm, BatchNormLocal, Conv1d, ensure_channels_last, leaky_relu
from .frozen import freeze
from .vit import EncoderLayer, ViTConfig, dense, patchify

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DinoConfig:
  """DINO ViT-S/16 by default; `key_depths` are the blocks whose outputs are read out (besides
  the embedding), those >= depth are dropped as the reference does."""
  hidden_size: int = 384
  num_heads: int = 6
  mlp_dim: int = 1536
  depth: int = 12
  patch_size: int = 16
  image_size: int = 224
  key_depths: tuple[int, ...] = (2, 5, 8, 11)
  layer_norm_eps: float = 1e-6

  @property
  def readout_depths(self) -> tuple[int, ...]:
    return tuple(sorted(d for d in set(self.key_depths) if d < self.depth))

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  def vit(self) -> ViTConfig:
    return ViTConfig(hidden_size=self.hidden_size, num_layers=self.depth, num_heads=self.num_heads,
                     mlp_dim=self.mlp_dim, position_grid=self.grid, patch_size=self.patch_size,
                     layer_norm_eps=self.layer_norm_eps)


class DinoBackbone(nnx.Module):
  """Patch embedding (a Linear over patchify()'d patches, i.e. the stride-16 conv) + cls token +
  learned positions (1 + grid^2) + pre-LN blocks. Returns readouts, not a final feature."""

  def __init__(self, cfg: DinoConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    vit = cfg.vit()
    d = cfg.hidden_size
    self.patch_embed = dense(rngs, 3 * cfg.patch_size ** 2, d, (None, "embed"))
    init = nnx.initializers.normal(0.02)
    self.cls_token = nnx.Param(init(rngs.params(), (d,)))
    self.pos_embed = nnx.Param(init(rngs.params(), (cfg.grid ** 2 + 1, d)))
    self.layers = nnx.List([EncoderLayer(vit, rngs=rngs) for _ in range(cfg.depth)])
    freeze(self)  # pretrained DINO: never trained

  def prepare(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """[-1, 1] NHWC -> ImageNet-normalised [B, S, S, 3] with S = image_size (float32)."""
    s = self.cfg.image_size
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    x = (0.5 / std) * images.astype(jnp.float32) + (0.5 - mean) / std
    h, w = x.shape[1], x.shape[2]
    if h == s and w == s:
      return x
    resized = resize_area(x, (s, s)) if h > s else resize_bicubic(x, (s, s))
    if key is None or not (h > s and w > s):
      return resized
    k_coin, k_top, k_left = jax.random.split(key, 3)
    top = jax.random.randint(k_top, (), 0, h - s + 1)
    left = jax.random.randint(k_left, (), 0, w - s + 1)
    crop = jax.lax.dynamic_slice(x, (0, top, left, 0), (x.shape[0], s, s, x.shape[3]))
    return jnp.where(jax.random.uniform(k_coin) <= 0.5, crop, resized)

  def __call__(self, images: jax.Array, key: jax.Array | None = None) -> list[jax.Array]:
    """images [B, H, W, 3] in [-1, 1] -> readouts [B, grid^2, C] (patch tokens + cls token):
    after the embedding and after each block in readout_depths."""
    cfg = self.cfg
    x = self.prepare(images, key)
    dtype = self.patch_embed.kernel.dtype
    # The embedding sum is in the parameters' dtype: under autocast the bf16 patch embedding
    # is cast up, as the reference adds cls token and positions with autocast disabled.
    tokens = self.patch_embed(patchify(x.astype(dtype), cfg.patch_size)).astype(dtype)
    cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (tokens.shape[0], 1, tokens.shape[2]))
    x = jnp.concatenate([cls, tokens], axis=1) + self.pos_embed[...][None].astype(dtype)
    readout = lambda t: (t[:, 1:].astype(jnp.float32) + t[:, :1].astype(jnp.float32))
    acts = [readout(x)]
    depths = cfg.readout_depths
    for i in range(depths[-1] + 1 if depths else 0):
      x = self.layers[i](x)
      if i in depths:
        acts.append(readout(x))
    return acts


class DinoHead(nnx.Module):
  """One readout's head: [B, L, C] -> [B, L] logits."""

  def __init__(self, channels: int, *, kernel_size: int = 9, norm_type: str = "sbn",
               norm_eps: float = 1e-6, virtual_bs: int = 8, spectral_norm: bool = True,
               rngs: nnx.Rngs):
    def norm():
      if norm_type == "sbn":
        return BatchNorm(channels, eps=norm_eps, rngs=rngs)
      if norm_type == "bn":
        return BatchNormLocal(channels, virtual_bs=virtual_bs, eps=norm_eps, rngs=rngs)
      raise ValueError(f"DINO head norm_type {norm_type!r} is not supported (known: 'sbn', 'bn')")

    conv = lambda cin, cout, k, circular: Conv1d(cin, cout, k, circular=circular,
                                                 spectral_norm=spectral_norm, rngs=rngs)
    self.conv_in = conv(channels, channels, 1, True)
    self.norm_in = norm()
    self.conv_res = conv(channels, channels, kernel_size, True)
    self.norm_res = norm()
    self.conv_out = conv(channels, 1, 1, False)

  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    x = leaky_relu(self.norm_in(self.conv_in(x, train), train))
    r = leaky_relu(self.norm_res(self.conv_res(x, train), train))
    # A weak-typed scale: a bf16 sum (autocast, 'sbn') stays bf16 as in torch's `mul_`.
    x = (r + x) * (1.0 / math.sqrt(2.0))
    return self.conv_out(x, train)[..., 0]


class DinoDiscriminator(nnx.Module):
  """DinoDiscriminator(DinoConfig(), norm_type='sbn', rngs=...): call
  `disc(images, key=key, train=True)` -> logits [B, n_readouts * grid^2] (float32)."""

  def __init__(self, cfg: DinoConfig = DinoConfig(), *, kernel_size: int = 9,
               norm_type: str = "sbn", norm_eps: float = 1e-6, virtual_bs: int = 8,
               spectral_norm: bool = True, backbone: DinoBackbone | None = None, rngs=None):
    """`backbone`: an already loaded DinoBackbone of `cfg` (the converter passes one, so the
    frozen weights are not randomly initialised first)."""
    rngs = nnx.Rngs(0) if rngs is None else (nnx.Rngs(rngs) if isinstance(rngs, int) else rngs)
    if backbone is not None and backbone.cfg != cfg:
      raise ValueError(f"backbone config {backbone.cfg} differs from {cfg}")
    self.backbone = backbone if backbone is not None else DinoBackbone(cfg, rngs=rngs)
    self.heads = nnx.List([
        DinoHead(cfg.hidden_size, kernel_size=kernel_size, norm_type=norm_type,
                 norm_eps=norm_eps, virtual_bs=virtual_bs, spectral_norm=spectral_norm, rngs=rngs)
        for _ in range(len(cfg.readout_depths) + 1)])

  def __call__(self, images: jax.Array, key: jax.Array | None = None,
               train: bool = True) -> jax.Array:
    """images [B, H, W, 3] in [-1, 1]; `key` drives the random crop (None: never crop);
    `train` runs batch statistics and a power iteration (updating the side state)."""
    ensure_channels_last(images)
    acts = self.backbone(images, key)
    logits = jnp.concatenate([head(a, train) for head, a in zip(self.heads, acts)], axis=1)
    return logits.astype(jnp.float32)  # bf16 under autocast: the losses take float32
