"""SigLIP2 ViT pieces as DetailFlow uses them: patchify, resizable position grid, pre-LN blocks.

Parameter names follow the HF SigLIP2 module tree (embeddings / layers / post_layernorm;
self_attn.{q,k,v,out}_proj, mlp.fc1/fc2, layer_norm1/2) so conversion is a plain rename.

From-scratch initialisation is HF SigLIP2's `_init_weights`, what the reference's non-pretrained
towers get: attention and MLP kernels xavier-uniform, attention biases 0, MLP biases N(0, 1e-6),
the patch embedding lecun-normal (truncated), the position table N(0, 1/sqrt(width)), norms 1/0.
"""
import dataclasses

import jax
from flax import nnx

from ..ops.resize import resize_grid_bilinear_aa
from ..sharding import logical_axes
from . import remat
from .attention import dot_product_attention
from .keys import torch_default_uniform
from .precision import Linear


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  position_grid: int       # side of the learned position table (sqrt of SigLIP2 num_patches)
  patch_size: int
  layer_norm_eps: float = 1e-6
  patch_embedding: bool = True   # the decoder has none (mask tokens instead)
  num_channels: int = 3


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C]; patch vector = (row, col, channel), channel fastest."""
  b, h, w, c = images.shape
  if h % patch or w % patch:
    raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: jax.Array, patch: int, channels: int = 3) -> jax.Array:
  """Inverse of patchify for a square grid: [B, g*g, p*p*C] -> [B, g*p, g*p, C]."""
  b, n, _ = patches.shape
  g = int(round(n ** 0.5))
  if g * g != n:
    raise ValueError(f"{n} patches do not form a square grid")
  x = patches.reshape(b, g, g, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, g * patch, g * patch, channels)


def dense(rngs, din: int, dout: int, axes, kernel_init=nnx.initializers.lecun_normal(),
          bias_init=nnx.initializers.zeros_init()) -> Linear:
  """A biased Linear whose kernel/bias carry logical axis names `axes` = (in_axis, out_axis);
  lecun-normal kernel and zero bias unless given (HF SigLIP2's init of a plain Linear)."""
  return Linear(din, dout, rngs=rngs, kernel_init=logical_axes(kernel_init, axes),
                bias_init=logical_axes(bias_init, (axes[1],)))


def torch_linear(rngs, din: int, dout: int, axes) -> Linear:
  """dense() initialised as torch's default nn.Linear (weight and bias U(+-1/sqrt(din))): the
  layers the reference builds as plain nn.Linear outside any HF model."""
  init = torch_default_uniform(din)
  return dense(rngs, din, dout, axes, kernel_init=init, bias_init=init)


def _xavier_dense(rngs, din, dout, axes, bias_init=nnx.initializers.zeros_init()):
  return dense(rngs, din, dout, axes, kernel_init=nnx.initializers.xavier_uniform(), bias_init=bias_init)


def _layer_norm(rngs, dim, eps):
  return nnx.LayerNorm(dim, epsilon=eps, rngs=rngs,
                       scale_init=logical_axes(nnx.initializers.ones_init(), ("embed",)),
                       bias_init=logical_axes(nnx.initializers.zeros_init(), ("embed",)))


class SelfAttention(nnx.Module):
  """Multi-head attention with biased q/k/v/out projections."""

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
    self.num_heads = num_heads
    self.q_proj = _xavier_dense(rngs, dim, dim, ("embed", "heads"))
    self.k_proj = _xavier_dense(rngs, dim, dim, ("embed", "heads"))
    self.v_proj = _xavier_dense(rngs, dim, dim, ("embed", "heads"))
    self.out_proj = _xavier_dense(rngs, dim, dim, ("heads", "embed"))

  def __call__(self, x: jax.Array, mask: jax.Array | None,
               num_queries: int | None = None) -> jax.Array:
    """x [B, n, d] -> [B, m, d]: the first m = num_queries (default n) positions attend over
    all n (mask rows beyond m are dropped)."""
    b, n, d = x.shape
    m = n if num_queries is None else num_queries
    split = lambda t: t.reshape(b, t.shape[1], self.num_heads, d // self.num_heads)
    if mask is not None and m < n:
      mask = mask[..., :m, :]
    out = dot_product_attention(split(self.q_proj(x[:, :m])), split(self.k_proj(x)),
                                split(self.v_proj(x)), mask)
    return self.out_proj(out.reshape(b, m, d))


class MLP(nnx.Module):
  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    bias = nnx.initializers.normal(1e-6)
    self.fc1 = _xavier_dense(rngs, dim, hidden, ("embed", "mlp"), bias)
    self.fc2 = _xavier_dense(rngs, hidden, dim, ("mlp", "embed"), bias)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class EncoderLayer(nnx.Module):
  """Pre-LayerNorm transformer block (SigLIP2)."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.layer_norm1 = _layer_norm(rngs, cfg.hidden_size, cfg.layer_norm_eps)
    self.self_attn = SelfAttention(cfg.hidden_size, cfg.num_heads, rngs=rngs)
    self.layer_norm2 = _layer_norm(rngs, cfg.hidden_size, cfg.layer_norm_eps)
    self.mlp = MLP(cfg.hidden_size, cfg.mlp_dim, rngs=rngs)
    self.remat_policy = "none"  # see models/remat.py; set with remat.set_remat

  def __call__(self, x, mask=None, num_queries: int | None = None):
    """Outputs for the first num_queries positions (default all); every position still
    supplies keys and values."""
    if self.remat_policy != "none":
      forward = lambda layer, x: layer._forward(x, mask, num_queries)
      return remat.checkpointed(forward, self.remat_policy)(self, x)
    return self._forward(x, mask, num_queries)

  def _forward(self, x, mask, num_queries: int | None):
    x = x[:, :num_queries] + self.self_attn(self.layer_norm1(x), mask, num_queries)
    return x + self.mlp(self.layer_norm2(x))


class Embeddings(nnx.Module):
  """Linear patch embedding (optional) + a learned position table resized to the patch grid."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    if cfg.patch_embedding:
      self.patch_embedding = dense(rngs, cfg.num_channels * cfg.patch_size ** 2,
                                    cfg.hidden_size, (None, "embed"))
    init = nnx.initializers.normal(cfg.hidden_size ** -0.5)
    self.position_embedding = nnx.Param(
        init(rngs.params(), (cfg.position_grid ** 2, cfg.hidden_size)),
        eager_sharding=False, out_sharding=(None, "embed"))

  def positions(self, grid_h: int, grid_w: int) -> jax.Array:
    """[grid_h * grid_w, hidden]: the table resized with antialiased bilinear (torch semantics),
    also when the grid is unchanged in size (then it is the identity)."""
    g = self.cfg.position_grid
    table = self.position_embedding[...].reshape(g, g, -1)
    return resize_grid_bilinear_aa(table, (grid_h, grid_w)).reshape(grid_h * grid_w, -1)

  def embed_patches(self, images: jax.Array) -> jax.Array:
    p = self.cfg.patch_size
    patches = patchify(images, p)
    h, w = images.shape[1] // p, images.shape[2] // p
    return self.patch_embedding(patches) + self.positions(h, w)[None]


class VisionTower(nnx.Module):
  """embeddings + N pre-LN layers + post_layernorm: the SigLIP2 vision transformer body."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embeddings = Embeddings(cfg, rngs=rngs)
    self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.post_layernorm = _layer_norm(rngs, cfg.hidden_size, cfg.layer_norm_eps)

  def run_layers(self, x: jax.Array, mask=None, capture_layer: int | None = None,
                 num_outputs: int | None = None):
    """Applies all layers then post_layernorm; optionally also returns the hidden states after
    layer `capture_layer` (REPA alignment reads an intermediate decoder layer).

    num_outputs: only the first num_outputs positions are returned, and the last layer runs
    its queries, output projection and MLP for those alone (its keys/values still cover every
    position), so a caller that reads a prefix does not pay for the rest of that layer.
    """
    captured = None
    last = len(self.layers) - 1
    for i, layer in enumerate(self.layers):
      x = layer(x, mask, num_outputs if i == last else None)
      if capture_layer is not None and i == capture_layer:
        captured = x
    x = self.post_layernorm(x)
    return (x, captured) if capture_layer is not None else x

  def __call__(self, images: jax.Array) -> jax.Array:
    """Plain feature extraction (the frozen REPA/global-token teacher): patch features."""
    return self.run_layers(self.embeddings.embed_patches(images))
