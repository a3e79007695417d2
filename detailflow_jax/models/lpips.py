"""LPIPS over VGG16, DetailFlow's perceptual loss (the taming-transformers / LPIPS v0.1 recipe).

distance(x, y) = sum over the five VGG16 taps (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) of
  spatial_mean( lin_k( (n(f_k(x)) - n(f_k(y)))^2 ) ),
where n() divides each pixel's feature vector by its L2 norm (+1e-10) and lin_k is a bias-free
1x1 conv to one channel. Inputs are scaled as the reference's ScalingLayer does.

Mixed precision (models/precision.py; the reference computes it inside its bf16 autocast): the
input scaling is float32; the VGG convs and the 1x1 heads are bf16 products with float32
accumulation (ReLU and max-pool follow in bf16); the unit normalisation and the squared
difference are float32 (torch's pow / sum are on the float32 list); the spatial means and the
sum over taps stay float32 (torch rounds each mean of a bf16 head output to bf16, a 2^-9
relative change of the value), so the distance is float32.

Frozen: every weight is a `Frozen` variable (models/frozen.py); the trainer only differentiates
with respect to the images. Nothing here is trained.
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from .frozen import freeze
from .precision import Conv, Linear

VGG16_CONVS_PER_STAGE = (2, 2, 3, 3, 3)
VGG16_WIDTHS = (64, 128, 256, 512, 512)
# ImageNet statistics expressed for inputs in [-1, 1] (LPIPS' ScalingLayer).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class VGG16Features(nnx.Module):
  """torchvision vgg16.features up to relu5_3 (3x3 convs, padding 1, ReLU; a 2x2 max-pool opens
  every stage but the first), NHWC. Widths are configurable so tests can shrink the network."""

  def __init__(self, widths: Sequence[int] = VGG16_WIDTHS, *, rngs: nnx.Rngs):
    if len(widths) != len(VGG16_CONVS_PER_STAGE):
      raise ValueError(f"VGG16 has {len(VGG16_CONVS_PER_STAGE)} stages, got widths {tuple(widths)}")
    self.widths = tuple(widths)
    convs = []
    cin = 3
    for width, count in zip(widths, VGG16_CONVS_PER_STAGE):
      for _ in range(count):
        convs.append(Conv(cin, width, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs))
        cin = width
    self.convs = nnx.List(convs)

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    """[B, H, W, 3] -> the five stage outputs (after each stage's last ReLU)."""
    taps, i = [], 0
    for stage, count in enumerate(VGG16_CONVS_PER_STAGE):
      if stage:
        x = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      for _ in range(count):
        x = jax.nn.relu(self.convs[i](x))
        i += 1
      taps.append(x)
    return taps


def _unit_channels(x: jax.Array, eps: float = 1e-10) -> jax.Array:
  """x / (||x||_channels + eps). Where a pixel's features are all zero the value is 0 as in the
  reference, but the gradient is kept finite (sqrt at 0 would make it NaN)."""
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return x / (norm + eps)


class LPIPS(nnx.Module):
  """LPIPS(widths=VGG16_WIDTHS, rngs=...) with random weights; load real ones with
  `detailflow_jax.convert.frozen.lpips_from_torch(vgg_path, lin_path)`."""

  def __init__(self, widths: Sequence[int] = VGG16_WIDTHS, *, rngs=None):
    rngs = nnx.Rngs(0) if rngs is None else (nnx.Rngs(rngs) if isinstance(rngs, int) else rngs)
    self.net = VGG16Features(widths, rngs=rngs)
    self.lins = nnx.List([Linear(w, 1, use_bias=False, rngs=rngs) for w in widths])
    freeze(self)

  def tap_shapes(self, batch: int, height: int, width: int) -> list[tuple]:
    """Shapes [B, h, w, C] of the five squared feature differences the heads read (what a
    dropout keep-mask covers)."""
    shapes = []
    for stage, w in enumerate(self.net.widths):
      if stage:
        height, width = height // 2, width // 2
      shapes.append((batch, height, width, w))
    return shapes

  def __call__(self, x: jax.Array, y: jax.Array, dropout_keep: Sequence[jax.Array] | None = None,
               dropout_rate: float = 0.0) -> jax.Array:
    """x, y: [B, H, W, 3] images in [-1, 1] -> float32 distances [B] (the reference returns
    [B, 1, 1, 1]; its loss takes the mean, as `jnp.mean` of this does). Differentiable with
    respect to x and y.

    dropout_keep / dropout_rate: the heads' Dropout(p) of the reference's NetLinLayer, active in
    its training (train_tokenizer.py puts VQLoss, LPIPS included, in train mode): five bool
    keep-masks of `tap_shapes` (drawn by the caller); kept values are scaled by 1 / (1 - p)."""
    if dropout_rate and dropout_keep is None:
      raise ValueError(f"LPIPS dropout_rate={dropout_rate} needs dropout_keep masks")
    if dropout_keep is not None and len(dropout_keep) != len(self.lins):
      raise ValueError(f"LPIPS dropout_keep holds {len(dropout_keep)} masks, the heads are {len(self.lins)}")
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"LPIPS expects two NHWC RGB batches of one shape, got {x.shape} and {y.shape}")
    dtype = self.lins[0].kernel.dtype
    shift = jnp.asarray(SHIFT, jnp.float32)
    scale = jnp.asarray(SCALE, jnp.float32)
    both = jnp.concatenate([x, y]).astype(jnp.float32)
    both = ((both - shift) / scale).astype(dtype)
    b = x.shape[0]
    total = jnp.zeros((b,), jnp.float32)
    for k, (feats, lin) in enumerate(zip(self.net(both), self.lins)):
      feats = _unit_channels(feats.astype(jnp.float32))
      diff = jnp.square(feats[:b] - feats[b:])
      if dropout_keep is not None:
        keep = dropout_keep[k]
        if keep.shape != diff.shape:
          raise ValueError(f"LPIPS dropout_keep[{k}] has shape {keep.shape}, the tap is {diff.shape}")
        diff = diff * (keep.astype(jnp.float32) * jnp.float32(1.0 / (1.0 - dropout_rate)))
      total = total + jnp.mean(lin(diff.astype(dtype)).astype(jnp.float32), axis=(1, 2, 3))
    return total
