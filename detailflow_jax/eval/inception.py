"""The 2015-12-05 Inception graph (`classify_image_graph_def.pb`) as ADM's evaluator runs it.

Fed at `ExpandDims:0`: NHWC float images in uint8 range, any size; the graph resizes them to
299x299 with TF1's legacy bilinear resize, maps them to (x - 128) / 128, and runs 94 bias-free
convolutions, each followed by BatchNorm (eps 1e-3) and ReLU. Stride-2 convolutions and max
pools use VALID padding; the 3x3 average pools inside the mixed blocks exclude the padding;
Mixed_7c's pool branch is a 3x3 stride-1 max pool (a quirk of this graph that FID depends on).

Outputs (`InceptionV3.__call__`):
  pool    [N, 2048]  `pool_3:0`, the FID features;
  spatial [N, 2023]  `mixed_6/conv:0` (Mixed_6d's 1x1 branch after its ReLU, 17x17x192),
                     first 7 channels, flattened in (h, w, c) order: ADM's sFID features;
  logits  [N, 1008]  pool @ softmax/weights without the bias (`softmax/logits/MatMul`), which
                     ADM's Inception Score feeds to a softmax.
Module and attribute names follow torchvision / pytorch-fid / torch-fidelity (Conv2d_1a_3x3,
Mixed_5b.branch1x1, ..., fc) so the converter maps `.pth` keys one to one. Every conv and matmul
runs at full float32 precision (TPUs default to bf16 passes, GPUs to TF32). The model computes
in its parameters' dtype; cast them to float64 (with jax x64) for a float64 run.
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ..weights.model_dir import restore_model_dir
from .resize import tf1_resize_bilinear

INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
NUM_LOGITS = 1008
HIGHEST = jax.lax.Precision.HIGHEST

Size = int | tuple[int, int]


def _pair(x: Size) -> tuple[int, int]:
  return (x, x) if isinstance(x, int) else tuple(x)


def preprocess(images, dtype=jnp.float32) -> jax.Array:
  """uint8-range NHWC images of any size -> [N, 299, 299, 3] float `dtype` in (x - 128) / 128
  (the graph's ResizeBilinear, Sub and Mul; x * (1/128) and x / 128 are the same number)."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"Inception expects NHWC RGB images [N, H, W, 3], got shape {images.shape}")
  x = tf1_resize_bilinear(jnp.asarray(images).astype(dtype), INPUT_SIZE)
  return (x - 128) / 128


class BasicConv2d(nnx.Module):
  """Conv (no bias) -> BatchNorm(eps 1e-3, running statistics) -> ReLU."""

  def __init__(self, cin: int, cout: int, kernel: Size, stride: int = 1, padding: Size = 0, *,
               rngs: nnx.Rngs):
    ph, pw = _pair(padding)
    self.conv = nnx.Conv(cin, cout, _pair(kernel), strides=stride, padding=((ph, ph), (pw, pw)),
                         use_bias=False, precision=HIGHEST, rngs=rngs)
    self.bn = nnx.BatchNorm(cout, epsilon=1e-3, use_running_average=True, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


def _max_pool_3x3_s2(x):
  return nnx.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


def _avg_pool_3x3_exclusive(x):
  return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _chain(convs: Sequence[BasicConv2d], x):
  for conv in convs:
    x = conv(x)
  return x


class InceptionA(nnx.Module):
  """Mixed_5b/5c/5d (graph: mixed, mixed_1, mixed_2)."""

  def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch1x1(x),
        _chain([self.branch5x5_1, self.branch5x5_2], x),
        _chain([self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3], x),
        self.branch_pool(_avg_pool_3x3_exclusive(x))], axis=-1)


class InceptionB(nnx.Module):
  """Mixed_6a (graph: mixed_3), 35 -> 17."""

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch3x3(x),
        _chain([self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3], x),
        _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nnx.Module):
  """Mixed_6b..6e (graph: mixed_4..mixed_7), factorised 7x7 convolutions."""

  def __init__(self, cin: int, c7: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def branches(self, x) -> tuple[jax.Array, jax.Array]:
    """(block output, the 1x1 branch): the second is `mixed_N/conv`."""
    b1 = self.branch1x1(x)
    out = jnp.concatenate([
        b1,
        _chain([self.branch7x7_1, self.branch7x7_2, self.branch7x7_3], x),
        _chain([self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                self.branch7x7dbl_4, self.branch7x7dbl_5], x),
        self.branch_pool(_avg_pool_3x3_exclusive(x))], axis=-1)
    return out, b1

  def __call__(self, x):
    return self.branches(x)[0]


class InceptionD(nnx.Module):
  """Mixed_7a (graph: mixed_8), 17 -> 8."""

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate([
        _chain([self.branch3x3_1, self.branch3x3_2], x),
        _chain([self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4], x),
        _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nnx.Module):
  """Mixed_7b (average pool branch) and Mixed_7c (max pool branch) (graph: mixed_9, mixed_10)."""

  def __init__(self, cin: int, max_pool_branch: bool, *, rngs: nnx.Rngs):
    self.max_pool_branch = max_pool_branch
    self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3_1(x)
    b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    if self.max_pool_branch:
      pooled = nnx.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3_exclusive(x)
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch3x3_2a(b3), self.branch3x3_2b(b3),
        self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl),
        self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
  """InceptionV3(rngs=...) has random weights; load real ones with
  `detailflow_jax.eval.inception.load_inception(DIR)` after `python -m detailflow_jax.convert
  inception`."""

  def __init__(self, *, rngs: nnx.Rngs = None):
    rngs = nnx.Rngs(0) if rngs is None else rngs
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, max_pool_branch=False, rngs=rngs)
    self.Mixed_7c = InceptionE(2048, max_pool_branch=True, rngs=rngs)
    # The bias is part of the published weights; ADM's Inception Score does not use it.
    self.fc = nnx.Linear(POOL_DIM, NUM_LOGITS, precision=HIGHEST, rngs=rngs)

  @property
  def dtype(self):
    return self.fc.kernel.dtype

  def preprocess(self, images) -> jax.Array:
    return preprocess(images, self.dtype)

  def from_preprocessed(self, x: jax.Array) -> dict[str, jax.Array]:
    """[N, 299, 299, 3] normalised images -> {'pool', 'spatial', 'logits'}."""
    if x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
      raise ValueError(f"expected [N, {INPUT_SIZE}, {INPUT_SIZE}, 3] after preprocessing, got {x.shape}")
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = _max_pool_3x3_s2(x)
    x = _max_pool_3x3_s2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
    x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
    x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))
    x, mixed_6_conv = self.Mixed_6d.branches(x)
    x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
    pool = jnp.mean(x, axis=(1, 2))  # pool_3: 8x8 VALID average pool
    spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
    logits = jnp.matmul(pool, self.fc.kernel.get_value(), precision=HIGHEST)
    return {"pool": pool, "spatial": spatial, "logits": logits}

  def __call__(self, images) -> dict[str, jax.Array]:
    return self.from_preprocessed(self.preprocess(images))


def cast_model(model: InceptionV3, dtype) -> InceptionV3:
  """The same weights in another float dtype (float64 needs `jax.enable_x64`)."""
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
  return nnx.merge(graphdef, state)


def load_inception(directory):
  """(InceptionV3, info) from a converted directory (see `python -m detailflow_jax.convert
  inception`); info holds `weights_sha256`, `source_sha256`, `source_file`."""
  model, info = restore_model_dir(directory, "inception", lambda config: InceptionV3(rngs=nnx.Rngs(0)))
  return model, info
