"""The PatchGAN discriminator (pix2pix / taming NLayerDiscriminator) as the reference builds it.

Layout: conv 4x4/2 + LeakyReLU(0.2); (n_layers - 1) x [conv 4x4/2 (no bias) + BatchNorm +
LeakyReLU]; conv 4x4/1 (no bias) + BatchNorm + LeakyReLU; conv 4x4/1 -> 1 channel. Padding 1
everywhere. Init as the reference: conv weights N(0, 0.02) (biases keep torch's default uniform),
BatchNorm scale N(1, 0.02), bias 0. Batch norms are torch BatchNorm2d (eps 1e-5, momentum 0.1),
in training mode whenever the discriminator is trained, as in the reference. Under the bf16
autocast policy (models/precision.py) the convs are bf16 products with float32 accumulation and
the batch norms keep their bf16 dtype (disc_layers.BatchNorm), as under torch's autocast; the
logits come back float32.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from .disc_layers import BatchNorm, ensure_channels_last, leaky_relu
from .keys import torch_default_uniform
from .precision import Conv


def _conv(rngs, cin: int, cout: int, stride: int, bias: bool) -> Conv:
  return Conv(cin, cout, (4, 4), strides=stride, padding=((1, 1), (1, 1)), use_bias=bias,
              kernel_init=nnx.initializers.normal(0.02),
              bias_init=lambda key, shape, dtype=jnp.float32:
              torch_default_uniform(cin * 16)(key, shape, dtype),
              rngs=rngs)


def patchgan_channels(ndf: int, n_layers: int):
  """Output widths of the convs after the first: ndf * min(2^n, 8) for n = 1..n_layers."""
  return [ndf * min(2 ** n, 8) for n in range(1, n_layers + 1)]


class PatchGANDiscriminator(nnx.Module):

  def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, *, rngs=None):
    rngs = nnx.Rngs(0) if rngs is None else (nnx.Rngs(rngs) if isinstance(rngs, int) else rngs)
    self.in_channels = in_channels
    self.conv_in = _conv(rngs, in_channels, ndf, 2, True)
    convs, norms = [], []
    cin = ndf
    for n, cout in enumerate(patchgan_channels(ndf, n_layers), start=1):
      convs.append(_conv(rngs, cin, cout, 2 if n < n_layers else 1, False))
      norms.append(BatchNorm(cout, eps=1e-5, scale_init=lambda key, shape, dtype=jnp.float32:
                             1.0 + 0.02 * jax.random.normal(key, shape, dtype), rngs=rngs))
      cin = cout
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms)
    self.conv_out = _conv(rngs, cin, 1, 1, True)
    # Each 4x4/2 conv (padding 1) floors the side to half, each 4x4/1 conv takes one off:
    # side // 2^n_layers - 2 >= 1 logit per row.
    self.min_input_size = 3 * 2 ** n_layers

  def __call__(self, images: jax.Array, key: jax.Array | None = None,
               train: bool = True) -> jax.Array:
    """images [B, H, W, C] in [-1, 1] -> patch logits [B, H', W', 1] (float32; the reference's
    [B, 1, H', W'] in NHWC). `key` is unused: the signature matches DinoDiscriminator's."""
    del key
    ensure_channels_last(images, (self.in_channels,))
    if min(images.shape[1:3]) < self.min_input_size:
      raise ValueError(f"PatchGAN with {len(self.convs)} layers needs images of at least "
                       f"{self.min_input_size} px per side (it would return no logits), got "
                       f"{images.shape[1]}x{images.shape[2]}")
    x = leaky_relu(self.conv_in(images))
    for conv, norm in zip(self.convs, self.norms):
      x = leaky_relu(norm(conv(x), train))
    return self.conv_out(x).astype(jnp.float32)
