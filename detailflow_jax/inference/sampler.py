"""Compile-once KV-cache sampler for the next-detail GPT (the reference's generate_group_par).

The reference re-runs the whole prefix for every new token/group. Under the group-causal mask a
position's keys and values never depend on later positions, so here each step runs the network
only on its new positions (their embeddings come from `GPT.embed_positions`, which owns the
token layout) and writes their keys/values into a preallocated cache:

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

The Sampler holds static settings only (graph definition, config, cache attention, mesh); the
weights are an argument of every call, so new weights (a training step, EMA) never recompile.
Everything (both phases, sampling, guidance) is one jitted function of fixed shapes per
(batch, guidance on/off, one key or per-row keys); SamplingOptions' leaves and the token
budget are traced values, so changing them does not recompile.

Weights dtype (`weights_dtype`): at batch 1 a step reads every matmul kernel to make a handful
of rows, so its time is the kernels' bytes over memory bandwidth. "float32" (the default and
the parity path) runs the weights as they are; "bfloat16" stores the matmul kernels (q/k/v,
attention output, FFN, vocabulary projection) in bf16, halving the bytes a step streams, and
multiplies with the input rounded to bf16, float32 accumulation and a float32 result
(models/precision.py's weight-only policy): norms, embeddings, the residual stream,
attention, the KV cache and the logits stay float32. What it costs in tokens and logits is
measured by benchmarks/latency.py (docs/latency.md).

`Sampler.sample_stream` runs the same steps in segments (a generator of token prefixes, for
previews as the image arrives): one more compiled program, whose step range is traced, carries
the tokens and the KV cache from segment to segment.
"""
import dataclasses
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from ..models.gpt import GPT, GPTConfig, KVCache, cache_chunk
from ..models.precision import CONTRACTED_LAST_LAYERS, Precision, set_precision
from ..sharding import batch_sharding, replicated

CACHE_ATTENTION_VARIANTS = ("chunked", "whole")
# One entry per measured backend. CPU (2 cores, GPT-B, batch 8, CFG): "whole" was 1 % faster at
# 128 tokens, "chunked" 5 % faster at 512 (CPU seconds 25.0-25.7 vs 26.5-27.7). A backend not
# listed gets the chunked loop, whose cost stays linear in the tokens; the GPU entry is to come
# from benchmarks/accelerator.py's figures.
CACHE_ATTENTION_DEFAULTS = {"cpu": "chunked"}
PREFIX_CHUNK = 16  # keys per chunk in the single-position prefix steps
WEIGHTS_DTYPES = ("float32", "bfloat16")
# How prepared weights lay out the matmul kernels (see `Sampler.prepare_weights`): "as_stored"
# ([in, out], as the GPT holds them) or "contracted_last" ([out, in]). Defaults per (backend,
# weights dtype), from A/B runs of GPT-B 128 tokens CFG 1.5 on a 2-core CPU (as_stored /
# contracted_last seconds per call, rounds interleaved): float32 batch 1 1.12 / 0.91 (1.24x),
# batch 8 0.363 / 0.332 per image (1.09x) (2026-12-06); bfloat16, once its products were 2-D
# (models/precision.contracted_last_product), batch 1 0.652 / 0.484 (1.35x), batch 8 1.349 / 1.194 (1.13x)
# (2026-12-07). Elsewhere XLA assigns dot layouts itself: as stored.
KERNEL_LAYOUTS = ("as_stored", "contracted_last")
KERNEL_LAYOUT_DEFAULTS = {("cpu", "float32"): "contracted_last", ("cpu", "bfloat16"): "contracted_last"}


def check_weights_dtype(weights_dtype: str, key: str = "weights_dtype") -> str:
  """`weights_dtype` if it is one of WEIGHTS_DTYPES, else a ValueError naming `key`."""
  if weights_dtype not in WEIGHTS_DTYPES:
    raise ValueError(f"{key} must be one of {' | '.join(WEIGHTS_DTYPES)}, got {weights_dtype!r}")
  return weights_dtype


def _leaf_names(path) -> tuple:
  """The dict keys / attribute names along a pytree key path (an nnx.State's path)."""
  return tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)


def cast_kernels(params, weights_dtype: str):
  """params (an nnx.State, a tuple of them, or any pytree of a GPT's variables) with every
  floating matmul kernel (a leaf under a `kernel` key) cast to `weights_dtype`; embeddings,
  norm gains and integer leaves unchanged. Float32 returns params as they are."""
  dtype = jnp.dtype(check_weights_dtype(weights_dtype))
  if dtype == jnp.float32:
    return params

  def cast(path, x):
    is_kernel = "kernel" in _leaf_names(path)
    if is_kernel and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
      return x.astype(dtype)
    return x

  return jax.tree_util.tree_map_with_path(cast, params)


def weight_bytes_per_step(params) -> int:
  """Bytes of weights one sampling step reads: every kernel and norm gain in full; of the
  embedding tables (token, class, special) only a few rows, so they do not count."""
  total = 0
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = _leaf_names(path)
    if "embedding" in names or "spe_tok_embeddings" in names:
      continue
    total += x.size * x.dtype.itemsize
  return int(total)


def default_kernel_layout(weights_dtype: str = "float32", platform: str | None = None) -> str:
  """The kernel layout for `weights_dtype` on `platform` (default: the default JAX backend)."""
  return KERNEL_LAYOUT_DEFAULTS.get((platform or jax.default_backend(), weights_dtype), "as_stored")


def kernel_permutations(model: nnx.Module) -> dict[tuple, tuple[int, ...]]:
  """{module path: the axis order that moves its kernel's contracted axes last}, per layer that
  has that layout (CONTRACTED_LAST_LAYERS)."""
  return {tuple(path): module.contracted_last_permutation()
          for path, module in nnx.iter_modules(model) if isinstance(module, CONTRACTED_LAST_LAYERS)}


def set_kernel_layout(model: nnx.Module, kernel_layout: str) -> nnx.Module:
  """Tells every layer of `model` that can hold a contracted-last kernel (in place) which layout
  its kernel is stored in; other layers keep theirs."""
  for _, module in nnx.iter_modules(model):
    if isinstance(module, CONTRACTED_LAST_LAYERS):
      module.mixed_precision = dataclasses.replace(
          module.mixed_precision, kernels_contracted_last=kernel_layout == "contracted_last")
  return model


@struct.dataclass
class SamplingWeights:
  """A GPT's states as `Sampler.prepare_weights` left them: kernels cast to `weights_dtype` and
  stored in `kernel_layout`, once, so no call re-casts or re-lays 365 MB (GPT-B) of kernels."""
  states: tuple
  weights_dtype: str = struct.field(pytree_node=False)
  kernel_layout: str = struct.field(pytree_node=False)


def default_cache_attention(platform: str | None = None) -> str:
  """The cache-attention variant for `platform` (default: the default JAX backend)."""
  return CACHE_ATTENTION_DEFAULTS.get(platform or jax.default_backend(), "chunked")


@struct.dataclass
class SamplingOptions:
  """How tokens are chosen. Defaults match the reference's sample_c2i arguments. Every field is
  a pytree leaf, traced inside the sampler (changing one never recompiles); only whether
  cfg_scale > 1 (guidance on/off) is read on the host."""
  cfg_scale: float = 1.5
  temperature: float = 1.0
  top_k: int = 0            # 0 = off
  top_p: float = 1.0        # 1.0 = off
  greedy: bool = False      # argmax of the filtered distribution (reference sample_logits=False)
  gradual_cfg: bool = False  # group i uses cfg_scale * (G - i + 1) / (G + 1), G = groups sampled
  cfg_interval: int = -1    # >= 0: decode steps after it use the conditional logits only

  @property
  def guidance(self) -> bool:
    return bool(self.cfg_scale > 1.0)

  def check(self) -> "SamplingOptions":
    """Raises ValueError naming the first out-of-range field (host values only)."""
    rules = [("cfg_scale", self.cfg_scale >= 0, ">= 0"),
             ("temperature", self.temperature > 0, "> 0"),
             ("top_k", self.top_k >= 0 and int(self.top_k) == self.top_k, "an integer >= 0 (0 = off)"),
             ("top_p", 0 <= self.top_p <= 1, "in [0, 1] (1 = off)"),
             ("cfg_interval", self.cfg_interval >= -1 and int(self.cfg_interval) == self.cfg_interval,
              "an integer >= -1 (-1 = off)")]
    for name, ok, expected in rules:
      if not ok:
        raise ValueError(f"SamplingOptions.{name} must be {expected}, got {getattr(self, name)!r}")
    return self

  def as_arrays(self) -> "SamplingOptions":
    """The same options as fixed-dtype scalars (so a Python int vs float never retraces)."""
    return SamplingOptions(
        cfg_scale=jnp.float32(self.cfg_scale), temperature=jnp.float32(self.temperature),
        top_k=jnp.int32(self.top_k), top_p=jnp.float32(self.top_p),
        greedy=jnp.bool_(self.greedy), gradual_cfg=jnp.bool_(self.gradual_cfg),
        cfg_interval=jnp.int32(self.cfg_interval))


@struct.dataclass
class SamplingState:
  """The decode loop's carry.

  tokens: int32 [B, block_size], chosen (or forced) tokens; those past the current step are 0.
  caches: per layer (keys, values) [rows, kv_heads, block_size, head_dim]; rows = 2B under
    guidance (GPT.guidance_labels' row order), else B.
  logits: float32 [B, block_size, V], the guided logits each token was drawn from; None when
    not recorded.
  """
  tokens: jax.Array
  caches: KVCache
  logits: jax.Array | None = None

  def write(self, start, chosen: jax.Array, logits: jax.Array) -> "SamplingState":
    """Stores tokens [B, n] (and their logits [B, n, V]) at positions start .. start+n-1."""
    tokens = jax.lax.dynamic_update_slice_in_dim(self.tokens, chosen, start, axis=1)
    record = self.logits
    if record is not None:
      record = jax.lax.dynamic_update_slice_in_dim(record, logits, start, axis=1)
    return self.replace(tokens=tokens, logits=record)


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
  reference's sorted-cumsum rule, shifted to keep the first token past the threshold: mass
  exactly top_p keeps it). Tokens tied with the last one kept are all kept, where the
  reference keeps those its sort order puts first. Both
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


def first_argmax(x: jax.Array) -> jax.Array:
  """jnp.argmax(x, -1) (the first maximum; the first NaN where a row has one) as a max and a
  min over an index mask: XLA:CPU's variadic argmax reduce, fused with the Gumbel draws of
  `choose_tokens`, took 7.3 ms on [8, 8, 8192] logits where this takes 3.2 (same tokens)."""
  top = jnp.max(x, axis=-1, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  hit = (x == top) | jnp.isnan(x)
  return jnp.min(jnp.where(hit, index, x.shape[-1]), axis=-1)


def choose_tokens(logits: jax.Array, key: jax.Array, opts: SamplingOptions) -> jax.Array:
  """[B, n, V] guided logits -> int32 [B, n] tokens (categorical, or argmax when greedy).
  `key`: one key for the whole batch, or keys [B] (row b draws from key[b] only).
  The draws are jax.random.categorical's (argmax of logits + Gumbel noise from the same key
  and shape), token for token."""
  filtered = filter_logits(logits, opts.temperature, opts.top_k, opts.top_p)

  def greedy(filtered):  # the reference takes the argmax of the probabilities
    return first_argmax(jax.nn.softmax(filtered, axis=-1))

  def sampled(filtered):
    if key.ndim:
      noise = jax.vmap(lambda k: jax.random.gumbel(k, filtered.shape[1:], filtered.dtype))(key)
    else:
      noise = jax.random.gumbel(key, filtered.shape, filtered.dtype)
    return first_argmax(noise + filtered)

  return jax.lax.cond(opts.greedy, greedy, sampled, filtered).astype(jnp.int32)


def _generate(model: GPT, labels, key, opts: SamplingOptions, num_tokens, forced_tokens, *,
              guidance: bool, record_logits: bool, cache_attention: str, constrain,
              state: SamplingState | None = None, steps=None):
  """The final SamplingState: tokens [B, block_size] (valid up to num_tokens) and, with
  `record_logits`, the guided logits each was chosen from. With `forced_tokens`, those tokens
  are fed instead of the chosen ones (teacher forcing through the cache). `constrain` pins a
  batch-leading array's sharding (identity off a mesh).

  Streaming: `steps` = (first, end), traced, runs only decode steps first .. end-1 (the causal
  prefix's single-token steps, then one step per group; see step_token_counts) on `state`, the
  state the steps before `first` left (its tokens and KV cache), so no step runs twice."""
  cfg = model.config
  g, c, block = cfg.group_size, cfg.causal_len, cfg.block_size
  prefix_chunk = cache_chunk(block, PREFIX_CHUNK)
  group_chunk = block if cache_attention == "whole" else cache_chunk(block)
  batch = labels.shape[0]
  num_groups = (num_tokens + g - 1) // g
  step_key = ((lambda s: jax.vmap(jax.random.fold_in, (0, None))(key, s)) if key.ndim
              else (lambda s: jax.random.fold_in(key, s)))

  def guide(logits, decode_step, scale):
    """[rows, n, V] -> [B, n, V]: uncond + (cond - uncond) * scale, or cond alone past
    cfg_interval (decode steps are counted after the class prefill, as LlamaGen counts)."""
    if not guidance:
      return logits
    cond_logits, uncond_logits = model.split_guidance(logits)
    guided = uncond_logits + (cond_logits - uncond_logits) * scale
    off = (opts.cfg_interval > -1) & (decode_step > opts.cfg_interval)
    return jnp.where(off, cond_logits, guided)

  def advance(state, start, n, chunk, decode_step, scale):
    h = model.embed_positions(state.tokens, labels, start, n, guidance=guidance)
    logits, caches = model.run(h, start=start, caches=state.caches, cache_chunk_len=chunk)
    logits = guide(logits, decode_step, scale)
    if forced_tokens is None:
      chosen = choose_tokens(logits, step_key(start), opts)                # [B, n]
    else:
      chosen = jax.lax.dynamic_slice_in_dim(forced_tokens, start, n, axis=1)
    return state.replace(caches=caches).write(start, chosen, logits)

  def prefix_step(k, state):
    return advance(state, k, 1, prefix_chunk, k - 1, opts.cfg_scale)

  def group_step(i, state):
    gradual = (opts.cfg_scale * (num_groups - i + 1).astype(jnp.float32)
               / (num_groups + 1).astype(jnp.float32))
    scale = jnp.where(opts.gradual_cfg, gradual, opts.cfg_scale)
    return advance(state, i * g, g, group_chunk, (c - 1) + (i - c // g), scale)

  if steps is not None:
    first, end = steps
    prefix_end = jnp.minimum(num_tokens, c)
    state = jax.lax.fori_loop(jnp.minimum(first, prefix_end), jnp.minimum(end, prefix_end),
                              prefix_step, state)
    group_of = lambda step: c // g + jnp.maximum(step - c, 0)  # step c is group c // g
    state = jax.lax.fori_loop(group_of(first), jnp.minimum(group_of(end), num_groups), group_step,
                              state)
    return jax.tree.map(constrain, state)
  rows = 2 * batch if guidance else batch
  state = SamplingState(
      tokens=constrain(jnp.zeros((batch, block), jnp.int32)),
      caches=jax.tree.map(constrain, model.init_cache(rows)),
      logits=constrain(jnp.zeros((batch, block, cfg.vocab_size), jnp.float32))
      if record_logits else None)
  state = jax.lax.fori_loop(0, jnp.minimum(num_tokens, c), prefix_step, state)
  state = jax.lax.fori_loop(c // g, num_groups, group_step, state)
  return jax.tree.map(constrain, state)


def _config_of(graphdef) -> GPTConfig:
  """The GPTConfig a GPT graph definition carries as a static attribute."""
  for name, attribute in graphdef.attributes:
    value = getattr(attribute, "value", None)
    if name == "config" and isinstance(value, GPTConfig):
      return value
  raise TypeError("Sampler needs a GPT or the graphdef of one (nnx.split(gpt)[0])")


class Sampler:
  """Jitted generation for one GPT architecture. Holds no weights: every call takes `params`,
  the GPT's nnx.State (nnx.state(gpt)), or the tuple of states a filtered nnx.split gave with
  this graphdef (e.g. (params, extras)); a GPT module is also accepted. Compiles once per
  (batch size, guidance on/off, one key or per-row keys, record_logits/forced); `trace_count`
  counts traces so tests can assert reuse.

  cache_attention: "chunked" or "whole" (see the module docstring); None = the backend's default.
  weights_dtype: "float32" (default; the weights as given) or "bfloat16" (weight-only bf16, see
    the module docstring). Kernels that arrive float32 are cast inside every call; pass
    `sampler.prepare_weights(params)` once to stream the bf16 copy only.
  kernel_layout: "as_stored" or "contracted_last" (see KERNEL_LAYOUTS); None = the backend's
    default. It applies to weights given through `prepare_weights`.
  mesh: labels, keys, caches and outputs are sharded over the mesh's batch axes (the batch must
    divide by their size); params keep the shardings they arrive with (arrays not on the mesh
    are replicated onto it). Outputs come back as batch-sharded jax.Arrays.
  """

  def __init__(self, gpt_or_graphdef, *, cache_attention: str | None = None,
               mesh: Mesh | None = None, weights_dtype: str = "float32",
               kernel_layout: str | None = None):
    cache_attention = cache_attention or default_cache_attention()
    kernel_layout = kernel_layout or default_kernel_layout(check_weights_dtype(weights_dtype))
    if kernel_layout not in KERNEL_LAYOUTS:
      raise ValueError(f"kernel_layout must be one of {' | '.join(KERNEL_LAYOUTS)}, got {kernel_layout!r}")
    if cache_attention not in CACHE_ATTENTION_VARIANTS:
      raise ValueError(f"cache_attention must be one of {CACHE_ATTENTION_VARIANTS}, "
                       f"got {cache_attention!r}")
    if isinstance(gpt_or_graphdef, nnx.Module):
      gpt_or_graphdef = nnx.graphdef(gpt_or_graphdef)
    self.graphdef = gpt_or_graphdef
    self.config = _config_of(self.graphdef)
    self.cache_attention = cache_attention
    self.weights_dtype = check_weights_dtype(weights_dtype)
    self.kernel_layout = kernel_layout
    self.mesh = mesh
    self.trace_count = 0
    self._jitted = jax.jit(self._impl, static_argnames=("guidance", "record_logits", "key_impl"))
    self._stream_start = jax.jit(self._stream_start_impl, static_argnames=("guidance",))
    self._stream_segment = jax.jit(self._stream_segment_impl, static_argnames=("guidance", "key_impl"),
                                   donate_argnames=("state",))

  def _model(self, params) -> GPT:
    """The GPT of `params` (inside a trace) in this sampler's weights dtype: kernels that arrive
    float32 are cast here, and bf16 kernels run under the weight-only policy. Prepared weights
    (`prepare_weights`) come cast and laid out; other params keep the stored layout (laying out
    365 MB of kernels inside every call costs more than the faster dots win)."""
    if isinstance(params, SamplingWeights):
      if (params.weights_dtype, params.kernel_layout) != (self.weights_dtype, self.kernel_layout):
        raise ValueError(f"weights prepared for weights_dtype={params.weights_dtype!r}, kernel_layout="
                         f"{params.kernel_layout!r}; this sampler has {self.weights_dtype!r}, "
                         f"{self.kernel_layout!r}")
      states, kernel_layout = params.states, params.kernel_layout
    else:
      states = cast_kernels(params if isinstance(params, tuple) else (params,), self.weights_dtype)
      kernel_layout = "as_stored"
    model = nnx.merge(self.graphdef, *states)
    if self.weights_dtype != "float32":
      set_precision(model, Precision(self.weights_dtype, output_dtype="float32"))
    return set_kernel_layout(model, kernel_layout)

  def _impl(self, params, labels, key_data, opts, num_tokens, forced_tokens, *, guidance,
            record_logits, key_impl):
    self.trace_count += 1  # Python side effect: runs only while tracing
    key = jax.random.wrap_key_data(key_data, impl=key_impl)
    state = _generate(self._model(params), labels, key, opts, num_tokens,
                      forced_tokens, guidance=guidance, record_logits=record_logits,
                      cache_attention=self.cache_attention, constrain=self._constrain)
    return state.tokens, state.logits

  def _stream_start_impl(self, params, labels, *, guidance):
    """The empty SamplingState a stream starts from (zero tokens, zero caches)."""
    self.trace_count += 1
    model = self._model(params)
    rows = 2 * labels.shape[0] if guidance else labels.shape[0]
    return SamplingState(tokens=self._constrain(jnp.zeros((labels.shape[0], self.config.block_size),
                                                          jnp.int32)),
                         caches=jax.tree.map(self._constrain, model.init_cache(rows)))

  def _stream_segment_impl(self, params, labels, key_data, opts, num_tokens, state, first, end, *,
                           guidance, key_impl):
    """Decode steps first .. end-1 (traced: one program serves every segment) on `state`."""
    self.trace_count += 1
    key = jax.random.wrap_key_data(key_data, impl=key_impl)
    return _generate(self._model(params), labels, key, opts, num_tokens, None,
                     guidance=guidance, record_logits=False, cache_attention=self.cache_attention,
                     constrain=self._constrain, state=state, steps=(first, end))

  # --- placement ----------------------------------------------------------------------

  def _constrain(self, x: jax.Array) -> jax.Array:
    if self.mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, batch_sharding(self.mesh, x.ndim))

  def _put(self, x: np.ndarray, batch: bool = True) -> jax.Array:
    """A host array every process holds in full -> a batch-sharded (or replicated) array on
    the mesh, built shard by shard so it also works across processes; off a mesh, local."""
    if self.mesh is None:
      return jnp.asarray(x)
    sharding = batch_sharding(self.mesh, x.ndim) if batch else replicated(self.mesh)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  def _params(self, params):
    if isinstance(params, nnx.Module):
      params = nnx.state(params)
    if self.mesh is None:
      return params
    devices = set(self.mesh.devices.flat)
    on_mesh = lambda x: not isinstance(x, jax.Array) or set(x.sharding.device_set) == devices
    if all(on_mesh(x) for x in jax.tree.leaves(params)):
      return params
    return jax.tree.map(lambda x: x if on_mesh(x) else self._put(np.asarray(x), batch=False),
                        params)

  def _labels(self, labels, guidance):
    cfg = self.config
    if guidance and not cfg.has_null_class:
      raise ValueError("this GPT has no null class (class_dropout_prob=0): use cfg_scale <= 1")
    if isinstance(labels, jax.Array) and not labels.is_fully_addressable:
      if labels.ndim != 1:
        raise ValueError(f"labels must be a 1D array of class ids, got shape {labels.shape}")
      return labels.astype(jnp.int32)
    labels = np.asarray(labels, np.int32)
    if labels.ndim != 1 or labels.size == 0:
      raise ValueError(f"labels must be a non-empty 1D array of class ids, got shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= cfg.num_classes:
      raise ValueError(f"labels must lie in [0, {cfg.num_classes}), got {labels.tolist()}")
    if self.mesh is not None:
      shards = math.prod(self.mesh.shape[a] for a in batch_sharding(self.mesh, 1).spec[0])
      if labels.size % shards:
        raise ValueError(f"batch of {labels.size} labels does not divide over the mesh's "
                         f"{shards} batch shards")
    return self._put(labels)

  def _key(self, key, batch: int):
    """(uint32 key data, impl): one key (shape ()) or per-row keys (shape [batch])."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      key = jax.random.wrap_key_data(key)  # a raw uint32 key (jax.random.PRNGKey)
    if key.shape not in ((), (batch,)):
      raise ValueError(f"key must be one PRNG key or one per row (shape [{batch}]), "
                       f"got shape {key.shape}")
    data = jax.random.key_data(key)
    if self.mesh is not None and data.is_fully_addressable:  # else: already global
      data = self._put(np.asarray(data), batch=bool(key.shape))
    return data, jax.random.key_impl(key)

  def _num_tokens(self, num_tokens) -> int:
    block = self.config.block_size
    num_tokens = block if num_tokens is None else int(num_tokens)
    if not 1 <= num_tokens <= block:
      raise ValueError(f"num_tokens={num_tokens} outside [1, {block}]")
    return num_tokens

  def _call(self, params, labels, key, options, num_tokens, forced, record_logits, *,
            lower=False):
    guidance = options.check().guidance
    labels = self._labels(labels, guidance)
    key_data, key_impl = self._key(key, labels.shape[0])
    if forced is not None:
      forced = self._put(np.asarray(forced, np.int32))
    args = (self._params(params), labels, key_data, options.as_arrays(), jnp.int32(num_tokens),
            forced)
    kwargs = dict(guidance=guidance, record_logits=record_logits, key_impl=key_impl)
    if lower:
      return self._jitted.lower(*args, **kwargs).compile()
    return self._jitted(*args, **kwargs)

  # --- public API ---------------------------------------------------------------------

  def prepare_weights(self, params) -> SamplingWeights:
    """params (a GPT, its nnx.State or a tuple of states) with the matmul kernels in this
    sampler's weights_dtype and kernel_layout, done once: pass the result to every call, so a
    call streams the low-precision copy in the fast layout and prepares nothing."""
    if isinstance(params, SamplingWeights):
      return params
    params = self._params(params)
    states = cast_kernels(params if isinstance(params, tuple) else (params,), self.weights_dtype)
    if self.kernel_layout == "contracted_last":
      permutations = kernel_permutations(nnx.merge(self.graphdef, *states))

      def lay_out(path, x):
        names = _leaf_names(path)
        names = names[:-1] if names[-1] == "value" else names
        module = names[:-1]
        return jnp.transpose(x, permutations[module]) if names[-1] == "kernel" and module in permutations else x

      states = [jax.tree_util.tree_map_with_path(lay_out, state) for state in states]
    return SamplingWeights(states=tuple(states), weights_dtype=self.weights_dtype,
                           kernel_layout=self.kernel_layout)

  def precompile(self, params, labels, options: SamplingOptions = SamplingOptions(),
                 return_logits: bool = False, key=None) -> None:
    """Compiles ahead of time what `sample` with labels of this shape (and a key like `key`,
    default one key) will run: every option value and budget shares it, so compile time can
    be measured apart from sampling."""
    self._call(params, labels, jax.random.key(0) if key is None else key, options,
               self.config.block_size, None, return_logits, lower=True)

  def sample(self, params, labels, key: jax.Array, options: SamplingOptions = SamplingOptions(),
             *, num_tokens: int | None = None, return_logits: bool = False):
    """int32 tokens [B, num_tokens] for class `labels` [B] (default: all block_size tokens).

    `key`: one PRNG key for the whole batch, or keys [B] (row b draws only from key[b], so its
    tokens do not depend on the other rows or the batch size). Classifier-free guidance runs
    when cfg_scale > 1 (as in the reference). A budget below block_size stops early; a budget
    that ends inside a group still runs that whole group. With `return_logits`, also returns
    the guided float32 logits [B, num_tokens, V] each token was drawn from.
    """
    num_tokens = self._num_tokens(num_tokens)
    tokens, record = self._call(params, labels, key, options, num_tokens, None, return_logits)
    if return_logits:
      return tokens[:, :num_tokens], record[:, :num_tokens]
    return tokens[:, :num_tokens]

  def step_token_counts(self, num_tokens: int | None = None) -> list[int]:
    """Tokens known after each decode step for a budget of `num_tokens`: 1 .. causal_len one
    by one, then one group per step, the last cut to the budget (the schedule's token_list for
    the full budget)."""
    num_tokens = self._num_tokens(num_tokens)
    g, c = self.config.group_size, self.config.causal_len
    counts = list(range(1, min(num_tokens, c) + 1))
    counts += [min((i + 1) * g, num_tokens) for i in range(c // g, -(-num_tokens // g))]
    return counts

  def sample_stream(self, params, labels, key: jax.Array, options: SamplingOptions = SamplingOptions(),
                    *, num_tokens: int | None = None, every: int = 1,
                    at_steps=None) -> Iterator[jax.Array]:
    """`sample`, streamed: a generator of int32 token prefixes [B, t] after every `every` decode
    steps (step_token_counts: each causal-prefix token, then each group), the last of which is
    exactly what `sample(params, labels, key, options, num_tokens=...)` returns. `at_steps`
    (instead of `every`): yield after these decode steps only (counts of steps run, in
    [1, len(step_token_counts)]), and after the last: as few segments as the caller needs.

    The KV cache and tokens carry from one segment to the next (donated), so no step runs
    twice; the step range is traced, so one compiled segment program (plus one for the empty
    start state) per (batch, guidance, key kind) serves every segment, call and `every`. The
    arguments are checked here, before the first segment runs.
    """
    num_tokens = self._num_tokens(num_tokens)
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
      raise ValueError(f"every must be an integer >= 1 (decode steps per yield), got {every!r}")
    counts = self.step_token_counts(num_tokens)
    if at_steps is None:
      ends = list(range(every, len(counts), every))
    else:
      if every != 1:
        raise ValueError("pass every or at_steps, not both")
      ends = sorted({int(s) for s in at_steps})
      if ends and not 1 <= ends[0] <= ends[-1] <= len(counts):
        raise ValueError(f"at_steps must lie in [1, {len(counts)}] (decode steps for "
                         f"{num_tokens} tokens), got {list(at_steps)}")
    ends = [e for e in ends if e < len(counts)] + [len(counts)]
    guidance = options.check().guidance
    labels = self._labels(labels, guidance)
    key_data, key_impl = self._key(key, labels.shape[0])
    params = self._params(params)
    args = (options.as_arrays(), jnp.int32(num_tokens))

    def segments():
      state = self._stream_start(params, labels, guidance=guidance)
      for first, end in zip([0] + ends[:-1], ends):
        state = self._stream_segment(params, labels, key_data, *args, state, jnp.int32(first),
                                     jnp.int32(end), guidance=guidance, key_impl=key_impl)
        yield state.tokens[:, :counts[end - 1]]

    return segments()

  def cached_logits(self, params, labels, tokens,
                    options: SamplingOptions = SamplingOptions(cfg_scale=1.0)):
    """Teacher forcing through the KV-cache path: the (guided) logits [B, block_size, V] the
    sampler would draw each of `tokens` [B, block_size] from, given the earlier ones."""
    return self._call(params, labels, jax.random.key(0), options, self.config.block_size,
                      tokens, True)[1]


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
