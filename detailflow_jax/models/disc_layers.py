"""Layers the discriminators share, with PyTorch's training-mode semantics.

The reference trains its discriminators in torch's train mode: batch norms normalise with the
batch's own statistics (and update running averages as a side effect), spectral-normalised
convolutions run one power iteration per call. Flax's stock BatchNorm differs in details that
matter for parity (biased running variance, momentum convention), so these are written out.

Side state (running statistics, power-iteration vectors) lives in nnx.BatchStat variables:
it is neither optimised nor part of the trainable parameters, and the trainer threads it
through steps as "extras" (`nnx.state(disc, nnx.Not(nnx.Param))`).
"""
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from .keys import torch_default_uniform
from .precision import PolicyLayer


class SpectralVector(nnx.BatchStat):
  """A power-iteration vector (torch's weight_u / weight_v) of a spectral-normalised weight."""


def _l2_normalize(x: jax.Array, eps: float) -> jax.Array:
  """torch.nn.functional.normalize: x / max(||x||, eps)."""
  return x / jnp.maximum(jnp.linalg.norm(x), eps)


class Conv1d(PolicyLayer, nnx.Module):
  """Conv1d on channels-last [B, L, C] (the reference runs [B, C, L]), optionally with torch's
  spectral norm (dim 0, one power iteration per training call, eps 1e-12).

  The kernel is stored [k, in, out]; the spectral norm reads it as torch's [out, in * k] matrix,
  so `u` [out] and `v` [in * k] are exactly torch's weight_u / weight_v.

  Under a bf16 `Precision` policy (a `PolicyLayer`) it computes what torch's autocast does with
  SpectralConv1d, whose spectral-norm hook runs inside the autocast region: the power
  iteration's mv products take bf16 inputs (float32 accumulation, rounded to bf16) and are
  normalised in float32 (normalize / norm are on the float32 list; the vectors stay float32
  buffers); sigma = dot(u, mv(W, v)) is a float32 dot of u with that bf16 product (dot promotes
  to its widest input); the normalised kernel is float32 and the convolution itself takes bf16
  input and kernel with float32 accumulation, output bf16.
  """

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
               circular: bool = False, spectral_norm: bool = False, rngs: nnx.Rngs):
    super().__init__()
    fan_in = in_channels * kernel_size
    init = torch_default_uniform(fan_in)
    self.kernel_size = kernel_size
    self.circular = circular
    self.spectral_norm = spectral_norm
    self.kernel = nnx.Param(init(rngs.params(), (kernel_size, in_channels, out_channels)))
    self.bias = nnx.Param(init(rngs.params(), (out_channels,)))
    if spectral_norm:
      self.u = SpectralVector(_l2_normalize(jax.random.normal(rngs.params(), (out_channels,)), 1e-12))
      self.v = SpectralVector(_l2_normalize(jax.random.normal(rngs.params(), (fan_in,)), 1e-12))

  def weight(self, train: bool) -> jax.Array:
    """The kernel actually applied: divided by its spectral-norm estimate when enabled."""
    kernel = self.kernel[...]
    if not self.spectral_norm:
      return kernel
    k, cin, cout = kernel.shape
    mat = kernel.transpose(2, 1, 0).reshape(cout, cin * k)
    u, v = self.u[...], self.v[...]
    matmul = self.mixed_precision.matmul
    if train:
      fixed = jax.lax.stop_gradient(mat).astype(jnp.float32)
      v = _l2_normalize(matmul(fixed.T, u).astype(jnp.float32), 1e-12)
      u = _l2_normalize(matmul(fixed, v).astype(jnp.float32), 1e-12)
      self.u[...] = u
      self.v[...] = v
    # Gradients reach the kernel through sigma too (u, v are constants), as in torch.
    sigma = jnp.dot(jax.lax.stop_gradient(u),
                    matmul(mat.astype(jnp.float32), jax.lax.stop_gradient(v)).astype(jnp.float32))
    return (kernel / sigma).astype(kernel.dtype)

  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    pad = self.kernel_size // 2
    if pad:
      mode = "wrap" if self.circular else "constant"
      x = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)), mode=mode)
    if self.mixed_precision.autocast:
      return self.autocast_product(x, self.weight(train))
    w = self.weight(train).astype(x.dtype)
    y = self._product(x, w, None)
    return y + self.bias[...].astype(y.dtype)

  def _product(self, x, kernel, preferred_element_type):
    return jax.lax.conv_general_dilated(x, kernel, (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"),
                                        preferred_element_type=preferred_element_type)


class BatchNorm(nnx.Module):
  """torch BatchNorm{1,2}d / SyncBatchNorm over every axis but the last (channels).

  Training: normalise with the batch mean and biased variance, and update running_mean /
  running_var (unbiased) with momentum 0.1. Under a data-parallel jit the batch axis is the
  global batch, so this is SyncBatchNorm's statistics. Evaluation: running statistics.
  Under autocast the input is a bf16 conv output; batch_norm is on neither of torch's autocast
  lists and its CUDA kernels take a bf16 input with float32 weights and statistics, accumulate
  in float32 and write the input's dtype: here likewise, float32 math, output in x.dtype.
  """

  def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1,
               scale_init=nnx.initializers.ones_init(), rngs: nnx.Rngs):
    self.eps, self.momentum = eps, momentum
    self.scale = nnx.Param(scale_init(rngs.params(), (num_features,)))
    self.bias = nnx.Param(jnp.zeros((num_features,)))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,)))
    self.var = nnx.BatchStat(jnp.ones((num_features,)))

  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    dtype = x.dtype
    x = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    if train:
      mean = jnp.mean(x, axes)
      var = jnp.mean(jnp.square(x - mean), axes)
      n = math.prod(x.shape[:-1])
      unbiased = var * (n / max(n - 1, 1))
      m = self.momentum
      self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
      self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased)
    else:
      mean, var = self.mean[...], self.var[...]
    y = (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
    return y.astype(dtype)


class BatchNormLocal(nnx.Module):
  """The reference's BatchNormLocal on [B, L, C]: the batch is cut into ceil(B / virtual_bs)
  equal groups and each group is normalised over (its examples, length) per channel. It keeps
  no running statistics, so training and evaluation compute the same thing. The output is
  float32 whatever the input (the reference's `x.float()`), also under autocast."""

  def __init__(self, num_features: int, *, virtual_bs: int = 8, eps: float = 1e-6,
               rngs: nnx.Rngs):
    del rngs
    self.virtual_bs, self.eps = virtual_bs, eps
    self.scale = nnx.Param(jnp.ones((num_features,)))
    self.bias = nnx.Param(jnp.zeros((num_features,)))

  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    del train
    b, length, c = x.shape
    groups = -(-b // self.virtual_bs)
    if b % groups:
      raise ValueError(f"BatchNormLocal: batch {b} does not split into {groups} equal groups "
                       f"(virtual_bs={self.virtual_bs}); the reference cannot view it either")
    g = x.astype(jnp.float32).reshape(groups, b // groups, length, c)
    mean = jnp.mean(g, (1, 2), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), (1, 2), keepdims=True)
    g = (g - mean) / jnp.sqrt(var + self.eps)
    return (g * self.scale[...] + self.bias[...]).reshape(b, length, c)


def leaky_relu(x: jax.Array) -> jax.Array:
  return jax.nn.leaky_relu(x, 0.2)


def ensure_channels_last(images: jax.Array, channels: Sequence[int] = (3,)) -> None:
  """Discriminators take NHWC; an NCHW tensor passed by habit is an error, not garbage."""
  if images.ndim != 4 or images.shape[-1] not in channels:
    raise ValueError(f"expected NHWC images with {tuple(channels)} channels, got shape "
                     f"{tuple(images.shape)}")
