"""DetailFlow's class-conditional GPT: LlamaGen's Llama-style decoder with next-detail grouping.

Three changes to LlamaGen make it predict coarse-to-fine token groups:
- a group-causal mask over sequence positions: token-causal for the first `causal_num`
  positions, afterwards every position sees its whole group of `group_size` and earlier groups;
- `group_size - 1` learned special embeddings inserted after the first `causal_num` tokens, so
  the last `group_size` positions of any prefix predict the next group in parallel;
- 2D RoPE over a (block_size / group_size) x group_size grid of sequence positions.

Sequence layout for T >= causal_num tokens (length 1 + T + group_size - 1):
  [class, tok_0 .. tok_{c-1}, spe_0 .. spe_{g-2}, tok_c .. tok_{T-1}]
and [class, tok_0 .. tok_{T-1}] below causal_num. Logit position p predicts token p.

Module and parameter names mirror the reference state dict (conversion is a rename).
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ..schedule import causal_length
from ..sharding import logical_axes
from . import remat
from .attention import cached_attention, dot_product_attention
from .keys import InitKeys
from .masks import group_causal_mask
from .precision import Einsum, Linear
from .rope import apply_rope, rope_table_2d

# (n_layer, n_head, dim) of the reference's GPT_models presets.
PRESETS: dict[str, tuple[int, int, int]] = {
    "GPT-B": (12, 12, 768),
    "GPT-L": (24, 16, 1024),
    "GPT-XL": (36, 20, 1280),
    "GPT-XLPlus": (42, 22, 1408),
    "GPT-XXL": (48, 24, 1536),
    "GPT-XXLPlus": (48, 30, 1920),
    "GPT-XXXL": (48, 40, 2560),
    "GPT-1B": (22, 32, 2048),
    "GPT-3B": (24, 32, 3200),
    "GPT-7B": (32, 32, 4096),
}

# One KV cache entry per layer: (keys, values), each [batch, kv_heads, length, head_dim].
KVCache = tuple[tuple[jax.Array, jax.Array], ...]


def find_multiple(n: int, k: int) -> int:
  return n if n % k == 0 else n + k - (n % k)


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Every field of the reference ModelArgs that changes the math (c2i models only)."""
  dim: int = 1024
  n_layer: int = 24
  n_head: int = 16
  n_kv_head: int | None = None
  multiple_of: int = 256
  ffn_dim_multiplier: float | None = None
  rope_base: float = 10000.0
  norm_eps: float = 1e-5
  initializer_range: float = 0.02
  token_dropout_p: float = 0.1
  attn_dropout_p: float = 0.0
  resid_dropout_p: float = 0.1
  ffn_dropout_p: float = 0.1
  drop_path_rate: float = 0.0
  num_classes: int = 1000
  class_dropout_prob: float = 0.1
  vocab_size: int = 16384
  cls_token_num: int = 1
  block_size: int = 256
  group_size: int = 1
  causal_num: int | None = None
  learnable_tok_embeddings: bool = True  # only True: frozen token embeddings are not implemented

  def __post_init__(self):
    if self.dim % self.n_head:
      raise ValueError(f"dim={self.dim} is not divisible by n_head={self.n_head}")
    if self.n_head % self.num_kv_heads:
      raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
    if self.head_dim % 4:
      raise ValueError(f"head_dim={self.head_dim} must be divisible by 4 for 2D RoPE")
    if self.block_size % self.group_size:
      raise ValueError(f"block_size={self.block_size} is not a multiple of group_size={self.group_size}")
    if self.causal_len % self.group_size or not 0 < self.causal_len < self.block_size:
      raise ValueError(f"causal_num={self.causal_num} must be a positive multiple of "
                       f"group_size={self.group_size} below block_size={self.block_size}")
    if self.cls_token_num != 1:
      # The class embedding yields one conditioning token; more would shift every RoPE row.
      raise ValueError(f"cls_token_num={self.cls_token_num}: only 1 is supported (every released "
                       "DetailFlow GPT uses one class token)")
    if not self.learnable_tok_embeddings:
      raise ValueError("learnable_tok_embeddings=False (frozen token embeddings) is not "
                       "implemented; every released DetailFlow GPT trains them")
    if self.attn_dropout_p:
      raise ValueError("attn_dropout_p > 0 is not supported: the shared attention kernel has no "
                       "dropout (every released DetailFlow config uses 0)")

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_head

  @property
  def num_kv_heads(self) -> int:
    return self.n_head if self.n_kv_head is None else self.n_kv_head

  @property
  def causal_len(self) -> int:
    return causal_length(self.group_size, self.causal_num)

  @property
  def ffn_hidden(self) -> int:
    hidden = int(2 * (4 * self.dim) / 3)
    if self.ffn_dim_multiplier is not None:
      hidden = int(self.ffn_dim_multiplier * hidden)
    return find_multiple(hidden, self.multiple_of)

  def sequence_length(self, num_tokens: int) -> int:
    """Positions the network sees for `num_tokens` input tokens (class + special tokens)."""
    return 1 + num_tokens + (self.group_size - 1 if num_tokens >= self.causal_len else 0)

  @property
  def has_null_class(self) -> bool:
    """The label table has a null row (index num_classes) only when labels are dropped."""
    return self.class_dropout_prob > 0

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
    return cls(**d)

  @classmethod
  def preset(cls, name: str, **overrides) -> "GPTConfig":
    if name not in PRESETS:
      raise ValueError(f"unknown GPT preset {name!r} (known: {', '.join(PRESETS)})")
    n_layer, n_head, dim = PRESETS[name]
    return cls(n_layer=n_layer, n_head=n_head, dim=dim, **overrides)

  @classmethod
  def from_reference(cls, config_json: dict[str, Any], config_yaml: dict[str, Any]) -> "GPTConfig":
    """The reference's config.json (ModelArgs) + config.yaml (training args).

    Like the reference loader, dim/n_layer/n_head come from the preset that the yaml's
    `gpt_model` names, not from config.json; a name that is not a preset needs them under
    `gpt_model_dims`.
    """
    if config_json.get("model_type", "c2i") != "c2i":
      raise ValueError(f"only class-conditional (c2i) GPTs are supported, got model_type="
                       f"{config_json.get('model_type')!r}")
    name = config_yaml.get("gpt_model")
    if name in PRESETS:
      n_layer, n_head, dim = PRESETS[name]
    elif isinstance(config_yaml.get("gpt_model_dims"), dict):
      dims = config_yaml["gpt_model_dims"]
      n_layer, n_head, dim = dims["n_layer"], dims["n_head"], dims["dim"]
    else:
      raise ValueError(f"config.yaml gpt_model {name!r} is not a known preset "
                       f"({', '.join(PRESETS)}) and gives no gpt_model_dims")
    fields = {f.name for f in dataclasses.fields(cls)} - {"dim", "n_layer", "n_head"}
    kwargs = {k: config_json[k] for k in fields if k in config_json}
    return cls(dim=dim, n_layer=n_layer, n_head=n_head, **kwargs)


class _DropKeys:
  """Dropout keys fold_in(key, 1), fold_in(key, 2), ...; None means deterministic."""

  def __init__(self, key: jax.Array | None):
    self._key = key
    self._count = 0

  @property
  def active(self) -> bool:
    return self._key is not None

  def __call__(self) -> jax.Array:
    self._count += 1
    return jax.random.fold_in(self._key, self._count)


def _dropout(x: jax.Array, rate: float, keys: _DropKeys) -> jax.Array:
  if not keys.active or rate == 0.0:
    return x
  return apply_dropout_mask(x, jax.random.bernoulli(keys(), 1.0 - rate, x.shape), rate)


def apply_dropout_mask(x: jax.Array, keep: jax.Array, rate: float) -> jax.Array:
  """Dropout with a given kept-mask: x * (keep / (1 - rate)), the scale formed first as torch's
  nn.Dropout does (its noise.div_(1 - p)), so the result rounds as the reference's."""
  return (x * (keep.astype(x.dtype) / (1.0 - rate))).astype(x.dtype)


def _drop_path(x: jax.Array, rate: float, keys: _DropKeys) -> jax.Array:
  """Stochastic depth: drops the whole residual branch per example."""
  if not keys.active or rate == 0.0:
    return x
  keep = jax.random.bernoulli(keys(), 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  # The reference's drop_path: x * (mask / keep_prob), rounded as dropout's.
  return apply_dropout_mask(x, keep, rate)


def drop_path_rates(rate: float, n_layer: int) -> list[float]:
  """Layer i's drop-path rate: the reference's [x.item() for x in torch.linspace(0, rate,
  n_layer)], to the bit: a float32 step, then (as torch's CPU kernel) start + step * i for the
  first half and end - step * (n - 1 - i) for the second, rounded once to float32."""
  if n_layer <= 1:
    return [0.0] * n_layer
  step = np.float32(rate) / np.float32(n_layer - 1)
  i = np.arange(n_layer, dtype=np.float64)
  wide = np.where(i < n_layer // 2, np.float64(step) * i,
                  np.float64(np.float32(rate)) - np.float64(step) * (n_layer - 1 - i))
  return [float(x) for x in wide.astype(np.float32)]


def _linear(rngs, din: int, dout: int, axes, init) -> Linear:
  return Linear(din, dout, use_bias=False, rngs=rngs,
                kernel_init=logical_axes(init, axes))


class RMSNorm(nnx.Module):
  """x / rms(x) computed in float32, cast back, then scaled (the reference's order)."""

  def __init__(self, dim: int, eps: float):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32), eager_sharding=False, out_sharding=("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return normed.astype(x.dtype) * self.weight[...]


class FeedForward(nnx.Module):
  """SwiGLU: w2(silu(w1 x) * w3 x)."""

  def __init__(self, cfg: GPTConfig, *, rngs):
    init = nnx.initializers.normal(cfg.initializer_range)
    self.w1 = _linear(rngs, cfg.dim, cfg.ffn_hidden, ("embed", "mlp"), init)
    self.w3 = _linear(rngs, cfg.dim, cfg.ffn_hidden, ("embed", "mlp"), init)
    self.w2 = _linear(rngs, cfg.ffn_hidden, cfg.dim, ("mlp", "embed"), init)

  def __call__(self, x):
    return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


class Attention(nnx.Module):
  """q/k/v projection (no bias) grouped by kv head, grouped kv heads, 2D RoPE, optional KV cache.

  The projection kernel is [dim, kv_heads, R + 2, head_dim] (R = n_head / kv_heads): for kv head
  j, its R query heads j*R .. j*R+R-1, then its key, then its value. One matmul makes all three,
  and sharding the kv_heads axis over `tensor` gives every shard whole query groups with their
  own keys and values, so tensor parallelism never splits a head or crosses the q|k|v boundary.
  The reference's fused [dim, (n_head + 2 kv_heads) * head_dim] layout maps to it with
  `group_qkv` / `fuse_qkv` (same values, reordered columns).
  """

  def __init__(self, cfg: GPTConfig, *, rngs):
    self.cfg = cfg
    init = nnx.initializers.normal(cfg.initializer_range)
    kv, hd = cfg.num_kv_heads, cfg.head_dim
    fused_dim = (cfg.n_head + 2 * kv) * hd

    def grouped_init(key, shape, dtype=jnp.float32):
      # Draw the reference's fused layout and regroup it: the same values as a fused kernel.
      return Attention.group_qkv(init(key, (cfg.dim, fused_dim), dtype), kv, hd)

    self.wqkv = Einsum("bnd,dkgh->bnkgh", (cfg.dim, kv, cfg.n_head // kv + 2, hd), rngs=rngs,
                      kernel_init=logical_axes(
                          grouped_init, ("embed", "kv_heads", None, None)))
    self.wo = _linear(rngs, cfg.dim, cfg.dim, ("heads", "embed"), init)

  @staticmethod
  def group_qkv(fused, num_kv_heads: int, head_dim: int):
    """Fused [dim, (H + 2K) * hd] (q heads | k heads | v heads) -> grouped [dim, K, H/K + 2, hd].
    numpy in, numpy out; jax in, jax out."""
    cat = np.concatenate if isinstance(fused, np.ndarray) else jnp.concatenate
    dim, k, hd = fused.shape[0], num_kv_heads, head_dim
    q_dim = fused.shape[1] - 2 * k * hd
    q = fused[:, :q_dim].reshape(dim, k, q_dim // (k * hd), hd)
    keys = fused[:, q_dim:q_dim + k * hd].reshape(dim, k, 1, hd)
    values = fused[:, q_dim + k * hd:].reshape(dim, k, 1, hd)
    return cat([q, keys, values], axis=2)

  @staticmethod
  def fuse_qkv(grouped):
    """Grouped [dim, K, R + 2, hd] -> the reference's fused [dim, (K*R + 2K) * hd]."""
    cat = np.concatenate if isinstance(grouped, np.ndarray) else jnp.concatenate
    dim, k, g, hd = grouped.shape
    return cat([grouped[:, :, :g - 2].reshape(dim, -1), grouped[:, :, g - 2].reshape(dim, -1),
                grouped[:, :, g - 1].reshape(dim, -1)], axis=1)

  def __call__(self, x: jax.Array, rope: jax.Array, mask: jax.Array,
               cache: tuple[jax.Array, jax.Array] | None = None,
               start: jax.Array | None = None, chunk: int | None = None):
    """x [B, n, dim] at sequence positions start .. start+n-1.

    Without a cache the keys are x's own positions. With one, x's keys/values are written
    into the cache at `start` and the queries attend, chunk by chunk (`chunk` keys, default
    `cache_chunk`; the cache length = one masked pass over the whole cache), over the filled
    front of the cache (`mask` [n, S] hides what they may not see). Returns
    (output, updated cache or None).
    """
    cfg = self.cfg
    b, n, _ = x.shape
    r = cfg.n_head // cfg.num_kv_heads
    qkv = self.wqkv(x)                                            # [B, n, K, R + 2, hd]
    q = qkv[:, :, :, :r].reshape(b, n, cfg.n_head, cfg.head_dim)  # head j*R + i: kv head j's
    k = qkv[:, :, :, r]                                           # [B, n, K, hd]
    v = qkv[:, :, :, r + 1]
    q = apply_rope(q, rope)
    k = apply_rope(k, rope)
    if cache is not None:
      # Caches are [B, kv_heads, S, head_dim]: the attention einsums then read them without
      # the per-step transposed copy of the whole cache a [B, S, heads, D] layout costs on CPU.
      k_cache, v_cache = cache
      at = (0, 0, start, 0)
      k_cache = jax.lax.dynamic_update_slice(k_cache, jnp.swapaxes(k, 1, 2).astype(k_cache.dtype), at)
      v_cache = jax.lax.dynamic_update_slice(v_cache, jnp.swapaxes(v, 1, 2).astype(v_cache.dtype), at)
      cache = (k_cache, v_cache)
      out = cached_attention(q, k_cache, v_cache, mask, start + n,
                             chunk or cache_chunk(k_cache.shape[2]))
    else:
      out = dot_product_attention(q, k, v, mask)
    return self.wo(out.reshape(b, n, cfg.dim)), cache


def cache_chunk(length: int, target: int = 64) -> int:
  """Key-chunk length for cached attention: the largest multiple of 8 dividing `length` that is
  at most `target` (block sizes are multiples of the group size), else the whole cache."""
  for chunk in range(min(target, length) // 8 * 8, 0, -8):
    if length % chunk == 0:
      return chunk
  return length


class TransformerBlock(nnx.Module):

  def __init__(self, cfg: GPTConfig, drop_path: float, *, rngs):
    self.cfg = cfg
    self.drop_path = drop_path
    self.attention = Attention(cfg, rngs=rngs)
    self.feed_forward = FeedForward(cfg, rngs=rngs)
    self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
    self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
    self.remat_policy = "none"  # see models/remat.py; set with remat.set_remat

  def __call__(self, x, rope, mask, cache=None, start=None, keys: _DropKeys | None = None,
               chunk: int | None = None):
    keys = keys or _DropKeys(None)
    if cache is None and self.remat_policy != "none":
      # Teacher forcing (training): the block runs under jax.checkpoint. The dropout keys are
      # drawn while tracing it once, so recomputation reuses the same masks.
      forward = lambda block, x: block._forward(x, rope, mask, None, start, keys, chunk)[0]
      return remat.checkpointed(forward, self.remat_policy)(self, x), None
    return self._forward(x, rope, mask, cache, start, keys, chunk)

  def _forward(self, x, rope, mask, cache, start, keys: _DropKeys, chunk: int | None):
    attn, cache = self.attention(self.attention_norm(x), rope, mask, cache, start, chunk)
    attn = _dropout(attn, self.cfg.resid_dropout_p, keys)
    h = x + _drop_path(attn, self.drop_path, keys)
    ffn = _dropout(self.feed_forward(self.ffn_norm(h)), self.cfg.ffn_dropout_p, keys)
    return h + _drop_path(ffn, self.drop_path, keys), cache


class GPT(nnx.Module):
  """Class-conditional next-detail GPT (the reference's Transformer, model_type 'c2i')."""

  def __init__(self, config: GPTConfig, *, rngs=None):
    # rngs: nnx.Rngs / InitKeys / int seed; used only to initialise (dropout keys are passed
    # to __call__), so the module state holds parameters only.
    rngs = InitKeys(rngs or 0) if rngs is None or isinstance(rngs, int) else rngs
    cfg = config
    self.config = cfg
    init = nnx.initializers.normal(cfg.initializer_range)
    self.cls_embedding = _LabelEmbedder(cfg, rngs=rngs)
    self.tok_embeddings = nnx.Embed(cfg.vocab_size, cfg.dim, rngs=rngs,
                                    embedding_init=logical_axes(init, ("vocab", "embed")))
    self.layers = nnx.List([TransformerBlock(cfg, r, rngs=rngs)
                            for r in drop_path_rates(cfg.drop_path_rate, cfg.n_layer)])
    self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
    # The reference zero-initialises the output layer.
    self.output = _linear(rngs, cfg.dim, cfg.vocab_size, ("embed", "vocab"),
                          nnx.initializers.zeros_init())
    # N(0, 1), not initializer_range: the reference builds its special-token nn.Embedding after
    # initialize_weights, so it keeps torch's own Embedding init.
    self.spe_tok_embeddings = nnx.Param(
        jax.random.normal(rngs.params(), (cfg.group_size - 1, cfg.dim)), eager_sharding=False,
        out_sharding=(None, "embed"))

  # --- constants derived from the config -----------------------------------------------

  def rope_table(self) -> np.ndarray:
    cfg = self.config
    return rope_table_2d(cfg.block_size // cfg.group_size, cfg.group_size, cfg.head_dim,
                         cfg.rope_base, cfg.cls_token_num)

  def attention_mask(self) -> np.ndarray:
    cfg = self.config
    return group_causal_mask(cfg.block_size, cfg.group_size, cfg.causal_len)

  @property
  def dtype(self):
    return self.tok_embeddings.embedding.dtype

  # --- embeddings: the token layout -------------------------------------------------------

  def embed_positions(self, tokens: jax.Array, labels: jax.Array, start, n: int, *,
                      guidance: bool = False, keys: _DropKeys | None = None,
                      drop_labels: jax.Array | None = None) -> jax.Array:
    """Input embeddings [rows, n, dim] of sequence positions start .. start+n-1 (module docstring
    layout): position 0 is the class token, 1 .. c read tok_0 .. tok_{c-1}, the next g - 1 are
    the special tokens, position p >= c + g reads tok_{p-g}.

    tokens [B, T] (only the tokens the positions read need to be filled), labels [B]; `start`
    may be traced, `n` is static. With `guidance`, rows = 2B: row 2b is example b, row 2b+1 the
    same tokens under the null class (see `guidance_labels`); else rows = B.
    """
    keys = keys or _DropKeys(None)
    c, g = self.config.causal_len, self.config.group_size
    pos = start + jnp.arange(n)
    source = jnp.clip(jnp.where(pos <= c, pos - 1, pos - g), 0, tokens.shape[1] - 1)
    h = self.tok_embeddings(jnp.take(tokens, source, axis=1))              # [B, n, dim]
    if guidance:
      h, labels = jnp.repeat(h, 2, axis=0), self.guidance_labels(labels)
    if g > 1:
      special = self.special_embeddings()[jnp.clip(pos - c - 1, 0, g - 2)]  # [n, dim]
      h = jnp.where(((pos > c) & (pos < c + g))[:, None], special, h)
    cls = self.cls_embedding(labels, keys, drop_labels)[:, None]           # [rows, 1, dim]
    return jnp.where((pos == 0)[:, None], cls, h)

  def embed_sequence(self, tokens: jax.Array, labels: jax.Array,
                     keys: _DropKeys | None = None,
                     drop_labels: jax.Array | None = None) -> jax.Array:
    """[B, T] tokens + [B] labels -> [B, L, dim], the whole teacher-forced input sequence."""
    return self.embed_positions(tokens, labels, 0, self.sequence_length(tokens.shape[1]),
                                keys=keys, drop_labels=drop_labels)

  def guidance_labels(self, labels: jax.Array) -> jax.Array:
    """[B] class ids -> [2B] classifier-free-guidance rows: (label_b, null class) per example,
    interleaved so a batch shard holds both rows of its examples."""
    if not self.config.has_null_class:
      raise ValueError("this GPT has no null class (class_dropout_prob=0): use cfg_scale <= 1")
    return jnp.stack([labels, jnp.full_like(labels, self.config.num_classes)], 1).reshape(-1)

  @staticmethod
  def split_guidance(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[2B, ...] outputs of `guidance_labels` rows -> (conditional, unconditional), each [B, ...]."""
    pairs = x.reshape((x.shape[0] // 2, 2) + x.shape[1:])
    return pairs[:, 0], pairs[:, 1]

  def sequence_length(self, num_tokens: int) -> int:
    """Positions the network sees for `num_tokens` input tokens (class + special tokens)."""
    return self.config.sequence_length(num_tokens)

  def special_embeddings(self) -> jax.Array:
    return self.spe_tok_embeddings[...]

  # --- the network over a window of positions -----------------------------------------

  def run(self, h: jax.Array, start=0, caches: KVCache | None = None,
          keys: _DropKeys | None = None,
          cache_chunk_len: int | None = None) -> tuple[jax.Array, KVCache | None]:
    """Embeddings h [B, n, dim] at positions start .. start+n-1 -> float32 logits [B, n, V].

    Without caches, h is the whole sequence from position 0. With caches (from `init_cache`),
    only the new positions run; they attend over every cached position the group-causal mask
    allows (in key chunks of `cache_chunk_len`, see `cached_attention`), and their
    keys/values are written into the caches.
    """
    cfg = self.config
    n = h.shape[1]
    table = jnp.asarray(self.rope_table())
    full_mask = jnp.asarray(self.attention_mask())
    if caches is None:
      if n > cfg.block_size:
        raise ValueError(f"sequence of {n} positions exceeds block_size={cfg.block_size}")
      rope, mask = table[:n], full_mask[:n, :n]
    else:
      rope = jax.lax.dynamic_slice_in_dim(table, start, n, axis=0)
      mask = jax.lax.dynamic_slice_in_dim(full_mask, start, n, axis=0)
    new_caches = []
    for i, layer in enumerate(self.layers):
      h, cache = layer(h, rope, mask, None if caches is None else caches[i], start, keys,
                       cache_chunk_len)
      new_caches.append(cache)
    logits = self.output(self.norm(h)).astype(jnp.float32)
    return logits, (tuple(new_caches) if caches is not None else None)

  def init_cache(self, batch: int, dtype=None) -> KVCache:
    """Zeroed per-layer (keys, values) [batch, kv_heads, block_size, head_dim]."""
    cfg = self.config
    shape = (batch, cfg.num_kv_heads, cfg.block_size, cfg.head_dim)
    dtype = dtype or self.dtype
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in self.layers)

  # --- teacher forcing -----------------------------------------------------------------

  def __call__(self, tokens: jax.Array, labels: jax.Array, *, key: jax.Array | None = None,
               drop_labels: jax.Array | None = None,
               token_keep: jax.Array | None = None) -> jax.Array:
    """Teacher-forced logits [B, L, V] float32 (L = 1 + T (+ group_size - 1 if T >= causal_num)).

    `key` switches training mode on: label dropout for CFG, token/residual/FFN dropout and
    drop path, each drawn from it unless given. Given draws (the trainer's, train/ar.py):
    `drop_labels` ([B] bool) forces the null class for chosen examples; `token_keep`
    ([B, L, dim] bool) is token dropout's kept-mask (scaled by 1 / (1 - token_dropout_p)).
    """
    keys = _DropKeys(key)
    h = self.embed_sequence(tokens, labels, keys, drop_labels)
    if token_keep is not None:
      if token_keep.shape != h.shape:
        raise ValueError(f"token_keep has shape {token_keep.shape}; the embedded sequence is {h.shape}")
      h = apply_dropout_mask(h, token_keep, self.config.token_dropout_p)
    else:
      h = _dropout(h, self.config.token_dropout_p, keys)
    return self.run(h, keys=keys)[0]

  def loss(self, tokens: jax.Array, labels: jax.Array, targets: jax.Array,
           valid: jax.Array | None = None, *, key: jax.Array | None = None,
           drop_labels: jax.Array | None = None,
           token_keep: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Mean next-detail cross-entropy and the logits it came from.

    Training feeds tokens[:, :-group_size] and targets all block_size tokens: logit position p
    predicts target p. `valid` ([B] bool/float) excludes whole examples, as the reference.
    """
    cfg = self.config
    num_logits = self.sequence_length(tokens.shape[1]) - (cfg.cls_token_num - 1)
    if num_logits != targets.shape[1]:
      raise ValueError(f"{num_logits} logit positions for {targets.shape[1]} targets")
    logits = self(tokens, labels, key=key, drop_labels=drop_labels,
                  token_keep=token_keep)[:, cfg.cls_token_num - 1:]
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    if valid is None:
      return per_token.mean(), logits
    weights = jnp.broadcast_to(valid.astype(jnp.float32)[:, None], per_token.shape)
    return (per_token * weights).sum() / jnp.maximum(weights.sum(), 1.0), logits


class _LabelEmbedder(nnx.Module):
  """Class embedding table with a null row (index num_classes) for classifier-free guidance."""

  def __init__(self, cfg: GPTConfig, *, rngs):
    self.num_classes = cfg.num_classes
    self.dropout_prob = cfg.class_dropout_prob
    rows = cfg.num_classes + int(cfg.has_null_class)
    init = nnx.initializers.normal(cfg.initializer_range)
    self.embedding_table = nnx.Embed(rows, cfg.dim, rngs=rngs,
                                     embedding_init=logical_axes(init, ("classes", "embed")))

  def __call__(self, labels: jax.Array, keys: _DropKeys,
               drop_labels: jax.Array | None = None) -> jax.Array:
    drop = None
    if drop_labels is not None:
      drop = drop_labels.astype(bool)
    elif keys.active and self.dropout_prob > 0:
      drop = jax.random.uniform(keys(), labels.shape) < self.dropout_prob
    if drop is not None:
      labels = jnp.where(drop, self.num_classes, labels)
    return self.embedding_table(labels)


def count_params(model: nnx.Module) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
