"""Compile-once KV-cache sampler for the next-detail GPT (the reference's generate_group_par).

The reference re-runs the whole prefix for every new token/group. Under the group-causal mask a
position's keys and values never depend on later positions, so here each step runs the network
only on its new positions and writes their keys/values into a preallocated cache:

  step k = 0 .. causal_num-1: position k (the class token, then tok_{k-1}) -> tok_k;
  group i = causal_num/g .. : positions i*g .. i*g+g-1 (tok_{c-1} + the special tokens for the
                              first group, else the previous group's tokens) -> the next g tokens.

Cache attention comes in two variants (`cache_attention`): "chunked" walks the filled front of
the cache in fixed-size key chunks (a while loop with an online softmax), so the work per
step follows the filled length, not block_size; "whole" runs one masked softmax over the whole
cache (work follows block_size, but no loop). The single-position prefix steps always use the
chunked loop with short chunks (they read at most causal_num + 1 keys). The default depends
on the backend (CACHE_ATTENTION_DEFAULTS, from benchmarks/vs_reference.py and
benchmarks/accelerator.py figures).

Everything (both phases, sampling, guidance) is one jitted function of fixed shapes per
(batch, guidance on/off); cfg scale, temperature, top-k/top-p, greedy, gradual cfg, cfg interval
and the token budget are traced values, so changing them does not recompile.
"""
import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .models.gpt import cache_chunk

CACHE_ATTENTION_VARIANTS = ("chunked", "whole")
# One entry per measured backend. CPU (2 cores, GPT-B, batch 8, CFG): "whole" was 1 % faster at
# 128 tokens, "chunked" 5 % faster at 512 (CPU seconds 25.0-25.7 vs 26.5-27.7). A backend not
# listed gets the chunked loop, whose cost stays linear in the tokens; the GPU entry is to come
# from benchmarks/accelerator.py's figures.
CACHE_ATTENTION_DEFAULTS = {"cpu": "chunked"}
PREFIX_CHUNK = 16  # keys per chunk in the single-position prefix steps


def default_cache_attention(platform: Optional[str] = None) -> str:
  """The cache-attention variant for `platform` (default: the default JAX backend)."""
  return CACHE_ATTENTION_DEFAULTS.get(platform or jax.default_backend(), "chunked")


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """How tokens are chosen. Defaults match the reference's sample_c2i arguments."""
  cfg_scale: float = 1.5
  temperature: float = 1.0
  top_k: int = 0            # 0 = off
  top_p: float = 1.0        # 1.0 = off
  greedy: bool = False      # argmax of the filtered distribution (reference sample_logits=False)
  gradual_cfg: bool = False  # group i uses cfg_scale * (G - i + 1) / (G + 1), G = groups sampled
  cfg_interval: int = -1    # >= 0: decode steps after it use the conditional logits only

  def as_arrays(self):
    return dict(cfg_scale=jnp.float32(self.cfg_scale), temperature=jnp.float32(self.temperature),
                top_k=jnp.int32(self.top_k), top_p=jnp.float32(self.top_p),
                greedy=jnp.bool_(self.greedy), gradual_cfg=jnp.bool_(self.gradual_cfg),
                cfg_interval=jnp.int32(self.cfg_interval))


def _order_keys(x: jax.Array) -> jax.Array:
  """float32 -> uint32 with the same order (so thresholds can be bisected exactly)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  return jnp.where((bits >> 31) == 1, ~bits, bits | jnp.uint32(0x80000000))


def _smallest_key(keys: jax.Array, predicate) -> jax.Array:
  """Per row of keys [..., V]: the smallest uint32 t with predicate(t) (monotone in t and true
  at the row maximum), by 32 bisection steps over the key range."""
  def step(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    ok = predicate(mid)
    return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

  bounds = (keys.min(-1, keepdims=True), keys.max(-1, keepdims=True))
  return jax.lax.fori_loop(0, 32, step, bounds)[1]


def filter_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
  """logits / temperature with the reference's top-k then top-p filtering (-inf = removed).

  top-k keeps x iff fewer than k logits exceed x (= x >= the k-th largest, ties kept, as the
  reference). top-p keeps x iff the probability mass of the logits above x is <= top_p (the
  reference's sorted-cumsum rule, shifted to keep the first token past the threshold). Both
  thresholds are found by bisection instead of a sort (XLA's CPU sort is ~20x slower) and k, p
  are traced values; with neither filter on, the work is skipped.
  """
  logits = logits / jnp.maximum(temperature, 1e-5)
  use_k, use_p = top_k > 0, top_p < 1.0

  def apply(logits):
    keys = _order_keys(logits)
    k = jnp.clip(top_k, 1, logits.shape[-1])
    kth = _smallest_key(keys, lambda t: jnp.sum(keys > t, -1, keepdims=True) < k)
    logits = jnp.where(use_k & (keys < kth), -jnp.inf, logits)
    probs = jax.nn.softmax(logits, axis=-1)
    mass_above = lambda t: jnp.sum(jnp.where(keys > t, probs, 0.0), -1, keepdims=True)
    cutoff = _smallest_key(keys, lambda t: mass_above(t) <= top_p)
    return jnp.where(use_p & (keys < cutoff), -jnp.inf, logits)

  return jax.lax.cond(use_k | use_p, apply, lambda x: x, logits)


def choose_tokens(logits: jax.Array, key: jax.Array, opts) -> jax.Array:
  """[..., V] guided logits -> int32 [...] tokens (categorical, or argmax when greedy)."""
  filtered = filter_logits(logits, opts["temperature"], opts["top_k"], opts["top_p"])
  probs = jax.nn.softmax(filtered, axis=-1)
  greedy = jnp.argmax(probs, axis=-1)
  sampled = jax.random.categorical(key, filtered, axis=-1)
  return jnp.where(opts["greedy"], greedy, sampled).astype(jnp.int32)


def _generate(model, labels, key, opts, num_tokens, forced_tokens, *, guidance: bool,
              record_logits: bool, cache_attention: str = "chunked"):
  """Tokens [B, block_size] (valid up to num_tokens) and optionally the guided logits each
  token was chosen from. With `forced_tokens`, those tokens are fed instead of the chosen
  ones (teacher forcing through the cache)."""
  cfg = model.config
  g, c, block = cfg.group_size, cfg.causal_len, cfg.block_size
  prefix_chunk = cache_chunk(block, PREFIX_CHUNK)
  group_chunk = block if cache_attention == "whole" else cache_chunk(block)
  batch = labels.shape[0]
  rows = 2 * batch if guidance else batch
  cond = labels.astype(jnp.int32)
  if guidance:
    cond = jnp.concatenate([cond, jnp.full_like(cond, cfg.num_classes)])
  cls_emb = model.cls_embedding.embedding_table(cond)[:, None]            # [rows, 1, dim]
  special = model.special_embeddings()
  num_groups = (num_tokens + g - 1) // g

  def embed(tok):  # [B, n] -> [rows, n, dim]: both CFG halves see the same tokens
    emb = model.tok_embeddings(tok)
    return jnp.concatenate([emb, emb]) if guidance else emb

  def guide(logits, decode_step, scale):
    """[rows, n, V] -> [B, n, V]: uncond + (cond - uncond) * scale, or cond alone past
    cfg_interval (decode steps are counted after the class prefill, as LlamaGen counts)."""
    if not guidance:
      return logits
    cond_logits, uncond_logits = logits[:batch], logits[batch:]
    guided = uncond_logits + (cond_logits - uncond_logits) * scale
    interval = opts["cfg_interval"]
    off = (interval > -1) & (decode_step > interval)
    return jnp.where(off, cond_logits, guided)

  def emit(tokens, record, start, logits, step_key):
    chosen = choose_tokens(logits, step_key, opts)                        # [B, n]
    if forced_tokens is not None:
      chosen = jax.lax.dynamic_slice_in_dim(forced_tokens, start, logits.shape[1], axis=1)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, chosen, start, axis=1)
    if record is not None:
      record = jax.lax.dynamic_update_slice_in_dim(record, logits, start, axis=1)
    return tokens, record

  def prefix_step(k, carry):
    tokens, caches, record = carry
    prev = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(k - 1, 0), 1, axis=1)
    h = jnp.where(k == 0, cls_emb, embed(prev))
    logits, caches = model.run(h, start=k, caches=caches, cache_chunk_len=prefix_chunk)
    logits = guide(logits, k - 1, opts["cfg_scale"])
    tokens, record = emit(tokens, record, k, logits, jax.random.fold_in(key, k))
    return tokens, caches, record

  def group_step(i, carry):
    tokens, caches, record = carry
    start = i * g
    previous = embed(jax.lax.dynamic_slice_in_dim(tokens, start - g, g, axis=1))
    last_prefix = embed(tokens[:, c - 1:c])
    first = jnp.concatenate(
        [last_prefix, jnp.broadcast_to(special[None], (rows,) + special.shape)], axis=1)
    h = jnp.where(i == c // g, first, previous)
    logits, caches = model.run(h, start=start, caches=caches, cache_chunk_len=group_chunk)
    scale = jnp.where(
        opts["gradual_cfg"],
        opts["cfg_scale"] * (num_groups - i + 1).astype(jnp.float32) / (num_groups + 1).astype(jnp.float32),
        opts["cfg_scale"])
    logits = guide(logits, (c - 1) + (i - c // g), scale)
    tokens, record = emit(tokens, record, start, logits, jax.random.fold_in(key, start))
    return tokens, caches, record

  tokens = jnp.zeros((batch, block), jnp.int32)
  record = jnp.zeros((batch, block, cfg.vocab_size), jnp.float32) if record_logits else None
  carry = (tokens, model.init_cache(rows), record)
  carry = jax.lax.fori_loop(0, jnp.minimum(num_tokens, c), prefix_step, carry)
  carry = jax.lax.fori_loop(c // g, num_groups, group_step, carry)
  tokens, _, record = carry
  return tokens, record


class Sampler:
  """Jitted generation for one GPT. Compiles once per (batch size, guidance on/off,
  record_logits/forced); `trace_count` counts traces so tests can assert reuse.
  `cache_attention`: "chunked" or "whole" (see the module docstring); None = the backend's
  default."""

  def __init__(self, model, cache_attention: Optional[str] = None):
    cache_attention = cache_attention or default_cache_attention()
    if cache_attention not in CACHE_ATTENTION_VARIANTS:
      raise ValueError(f"cache_attention must be one of {CACHE_ATTENTION_VARIANTS}, "
                       f"got {cache_attention!r}")
    self.cache_attention = cache_attention
    self.config = model.config
    self._graphdef, self._state = nnx.split(model)
    self.trace_count = 0
    self._jitted = jax.jit(self._impl, static_argnames=("guidance", "record_logits"))

  def _impl(self, state, labels, key, opts, num_tokens, forced_tokens, *, guidance, record_logits):
    self.trace_count += 1  # Python side effect: runs only while tracing
    model = nnx.merge(self._graphdef, state)
    return _generate(model, labels, key, opts, num_tokens, forced_tokens,
                     guidance=guidance, record_logits=record_logits,
                     cache_attention=self.cache_attention)

  def _check(self, labels, num_tokens, guidance):
    cfg = self.config
    num_tokens = cfg.block_size if num_tokens is None else int(num_tokens)
    if not 1 <= num_tokens <= cfg.block_size:
      raise ValueError(f"num_tokens={num_tokens} outside [1, {cfg.block_size}]")
    labels = jnp.asarray(labels, jnp.int32)
    if labels.ndim != 1 or labels.size == 0:
      raise ValueError(f"labels must be a non-empty 1D array of class ids, got shape {labels.shape}")
    if int(labels.min()) < 0 or int(labels.max()) >= cfg.num_classes:
      raise ValueError(f"labels must lie in [0, {cfg.num_classes}), got {np.asarray(labels).tolist()}")
    if guidance and not cfg.has_null_class:
      raise ValueError("this GPT has no null class (class_dropout_prob=0): use cfg_scale <= 1")
    return labels, num_tokens

  def precompile(self, labels, options: SamplingOptions = SamplingOptions(),
                 return_logits: bool = False) -> None:
    """Compiles ahead of time what `sample` with labels of this shape will run (every option
    value and budget shares it), so compile time can be measured apart from sampling."""
    guidance = options.cfg_scale > 1.0
    labels, num_tokens = self._check(labels, None, guidance)
    self._jitted.lower(self._state, labels, jax.random.key(0), options.as_arrays(),
                       jnp.int32(num_tokens), None, guidance=guidance,
                       record_logits=return_logits).compile()

  def sample(self, labels, key: jax.Array, options: SamplingOptions = SamplingOptions(),
             num_tokens: Optional[int] = None, return_logits: bool = False):
    """int32 tokens [B, num_tokens] for class `labels` [B] (default: all block_size tokens).

    Classifier-free guidance runs when cfg_scale > 1 (as in the reference). A budget below
    block_size stops early; a budget that ends inside a group still runs that whole group.
    With `return_logits`, also returns the guided float32 logits [B, num_tokens, V] each token
    was drawn from.
    """
    guidance = options.cfg_scale > 1.0
    labels, num_tokens = self._check(labels, num_tokens, guidance)
    tokens, record = self._jitted(self._state, labels, key, options.as_arrays(),
                                  jnp.int32(num_tokens), None, guidance=guidance,
                                  record_logits=return_logits)
    if return_logits:
      return tokens[:, :num_tokens], record[:, :num_tokens]
    return tokens[:, :num_tokens]

  def cached_logits(self, labels, tokens, options: SamplingOptions = SamplingOptions(cfg_scale=1.0)):
    """Teacher forcing through the KV-cache path: the (guided) logits [B, block_size, V] the
    sampler would draw each of `tokens` [B, block_size] from, given the earlier ones."""
    guidance = options.cfg_scale > 1.0
    labels, _ = self._check(labels, None, guidance)
    _, record = self._jitted(self._state, labels, jax.random.key(0), options.as_arrays(),
                             jnp.int32(self.config.block_size), jnp.asarray(tokens, jnp.int32),
                             guidance=guidance, record_logits=True)
    return record


def sampling_flops(config, batch: int, num_tokens: int, guidance: bool = True) -> float:
  """Useful matmul FLOPs of one sampling call: projections, FFN and output layer for every
  position run, plus attention scores/values over the keys each step's queries may see (so
  the unread rest of the cache and the masked keys of a chunk do not count as work)."""
  cfg = config
  rows = batch * (2 if guidance else 1)
  g, c = cfg.group_size, cfg.causal_len
  hd, kvh = cfg.head_dim, cfg.num_kv_heads
  per_position = 2 * (cfg.dim * (cfg.n_head + 2 * kvh) * hd + cfg.dim * cfg.dim
                      + 3 * cfg.dim * cfg.ffn_hidden) * cfg.n_layer + 2 * cfg.dim * cfg.vocab_size
  per_query_key = 4 * cfg.n_head * hd * cfg.n_layer  # q.k and p.v
  steps = [(k, 1) for k in range(min(num_tokens, c))]
  steps += [(i * g, g) for i in range(c // g, math.ceil(num_tokens / g))]
  flops = sum(n * per_position + n * (start + n) * per_query_key for start, n in steps)
  return float(rows * flops)
