"""KV-cache sampler: exact greedy parity, cache == full recomputation, filters, seeds, compiles."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from gpt_helpers import fixture_sampler, forward, loaded_gpt, random_gpt

from detailflow_jax.inference.sampler import (
  CACHE_ATTENTION_DEFAULTS,
  Sampler,
  SamplingOptions,
  default_cache_attention,
  filter_logits,
)
from detailflow_jax.sharding import batch_sharding, make_mesh, shardings_for

GREEDY = {
    "cfg1p5": SamplingOptions(cfg_scale=1.5, greedy=True),
    "cfg1p5_gradual": SamplingOptions(cfg_scale=1.5, greedy=True, gradual_cfg=True),
    "cfg4": SamplingOptions(cfg_scale=4.0, greedy=True),
}


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
  return loaded_gpt(tmp_path_factory)


@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
  return fixture_sampler(tmp_path_factory)


@pytest.fixture(scope="module")
def params(gpt):
  return nnx.state(gpt)


@pytest.mark.parametrize("name", sorted(GREEDY))
def test_greedy_tokens_and_logits_equal_reference(sampler, params, golden, name):
  tokens, logits = sampler.sample(params, golden["gen_labels"], jax.random.key(0), GREEDY[name],
                                  return_logits=True)
  np.testing.assert_array_equal(np.asarray(tokens), golden[f"gen_tokens_{name}"])
  np.testing.assert_allclose(np.asarray(logits), golden[f"gen_logits_{name}"], rtol=0, atol=1e-4)


def test_same_shapes_compile_once(sampler, params, golden):
  """Every option, the seed and the token budget are traced: one compile serves them all."""
  labels = golden["gen_labels"]
  sampler.precompile(params, labels, GREEDY["cfg1p5"])  # ahead-of-time; sample() reuses it
  before = sampler.trace_count
  sampler.sample(params, labels, jax.random.key(0), GREEDY["cfg1p5"])
  variants = [SamplingOptions(cfg_scale=3.0, temperature=0.7, top_k=5),
              SamplingOptions(cfg_scale=1.2, top_p=0.8, gradual_cfg=True, cfg_interval=3),
              SamplingOptions(cfg_scale=2.0, greedy=True)]
  for i, options in enumerate(variants):
    for budget in (None, 3, 13):
      sampler.sample(params, labels, jax.random.key(i), options, num_tokens=budget)
  assert sampler.trace_count == before


def test_same_seed_same_tokens_and_seeds_differ(sampler, params, golden):
  options = SamplingOptions(cfg_scale=2.0, temperature=1.0)
  a = sampler.sample(params, golden["gen_labels"], jax.random.key(11), options)
  b = sampler.sample(params, golden["gen_labels"], jax.random.key(11), options)
  c = sampler.sample(params, golden["gen_labels"], jax.random.key(12), options)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert (np.asarray(a) != np.asarray(c)).any()


def test_kv_cache_equals_full_forward_on_fixture(sampler, params, gpt, golden):
  tokens = golden["gen_tokens_cfg1p5"]
  cached = sampler.cached_logits(params, golden["gen_labels"], tokens)
  g = gpt.config.group_size
  full = forward(gpt, jnp.asarray(tokens[:, :-g]), jnp.asarray(golden["gen_labels"]))
  np.testing.assert_allclose(np.asarray(cached), np.asarray(full), rtol=0, atol=1e-4)


@pytest.mark.parametrize("config", [
    dict(n_kv_head=2, causal_num=8),                     # GQA, causal prefix of two groups
    dict(n_kv_head=1, group_size=3, block_size=21, causal_num=6, n_layer=1),
])
def test_kv_cache_equals_full_forward_random_configs(config):
  model = random_gpt(seed=5, **config)
  cfg = model.config
  sampler = Sampler(model)
  labels = np.array([1, 3])
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (2, cfg.block_size), 0, cfg.vocab_size))
  scale = 2.5
  guided = sampler.cached_logits(model, labels, tokens, SamplingOptions(cfg_scale=scale))
  cond = forward(model, jnp.asarray(tokens[:, :-cfg.group_size]), jnp.asarray(labels))
  uncond = forward(model, jnp.asarray(tokens[:, :-cfg.group_size]), jnp.full((2,), cfg.num_classes))
  expected = np.asarray(uncond) + (np.asarray(cond) - np.asarray(uncond)) * scale
  np.testing.assert_allclose(np.asarray(guided), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", ["chunked", "whole"])
def test_both_cache_attention_variants_equal_full_forward(variant):
  """Block 72: the chunked loop walks up to three 24-key chunks; "whole" is one pass."""
  model = random_gpt(seed=7, n_kv_head=2, block_size=72, group_size=4, causal_num=4, n_layer=1)
  cfg = model.config
  sampler = Sampler(model, cache_attention=variant)
  assert sampler.cache_attention == variant
  labels = np.array([0, 2])
  tokens = np.asarray(jax.random.randint(jax.random.key(3), (2, cfg.block_size), 0, cfg.vocab_size))
  cached = sampler.cached_logits(model, labels, tokens)
  full = forward(model, jnp.asarray(tokens[:, :-cfg.group_size]), jnp.asarray(labels))
  np.testing.assert_allclose(np.asarray(cached), np.asarray(full), rtol=0, atol=1e-4)


def test_cache_attention_default_follows_the_backend():
  assert default_cache_attention("cpu") == CACHE_ATTENTION_DEFAULTS["cpu"]
  assert default_cache_attention("some-other-backend") == "chunked"
  CACHE_ATTENTION_DEFAULTS["some-other-backend"] = "whole"
  try:
    assert default_cache_attention("some-other-backend") == "whole"
  finally:
    del CACHE_ATTENTION_DEFAULTS["some-other-backend"]
  assert Sampler(random_gpt(seed=1)).cache_attention == default_cache_attention()
  with pytest.raises(ValueError, match="cache_attention must be one of"):
    Sampler(random_gpt(seed=1), cache_attention="paged")


def _numpy_filter(logits, top_k, top_p):
  """The reference's top_k_top_p_filtering, written out in numpy for one row."""
  logits = logits.astype(np.float64).copy()
  if top_k > 0:
    kth = np.sort(logits)[::-1][min(top_k, logits.size) - 1]
    logits[logits < kth] = -np.inf
  if top_p < 1.0:
    order = np.argsort(-logits, kind="stable")
    probs = np.exp(logits[order] - logits[order][0])
    cumulative = np.cumsum(probs / probs.sum())
    remove = cumulative > top_p
    remove[1:] = remove[:-1].copy()
    remove[0] = False
    logits[order[remove]] = -np.inf
  return logits


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.6), (7, 0.9), (1, 1.0), (0, 0.0)])
def test_filter_logits_matches_reference_filtering(top_k, top_p):
  logits = np.asarray(jax.random.normal(jax.random.key(top_k), (6, 40))) * 3
  ours = np.asarray(filter_logits(jnp.asarray(logits), 1.0, top_k, top_p))
  for row in range(6):
    ref = _numpy_filter(logits[row], top_k, top_p)
    np.testing.assert_array_equal(np.isinf(ours[row]), np.isinf(ref))


def test_sampled_tokens_stay_inside_top_k_and_top_p(sampler, params, golden):
  """Over many seeds on the fixture model, every token lies in the filtered set of the exact
  logits it was drawn from (and the filters actually bind: plain sampling leaves them)."""
  labels = golden["gen_labels"]
  outside_k = outside_p = unfiltered_outside = 0
  for seed in range(12):
    key = jax.random.key(100 + seed)
    tokens, logits = sampler.sample(params, labels, key, SamplingOptions(cfg_scale=2.0, top_k=3),
                                    return_logits=True)
    kth = np.sort(np.asarray(logits), -1)[..., -3]
    chosen = np.take_along_axis(np.asarray(logits), np.asarray(tokens)[..., None], -1)[..., 0]
    outside_k += int((chosen < kth).sum())
    tokens, logits = sampler.sample(params, labels, key, SamplingOptions(cfg_scale=2.0, top_p=0.5),
                                    return_logits=True)
    kept = np.isfinite(np.asarray(filter_logits(logits, 1.0, 0, 0.5)))
    outside_p += int((~np.take_along_axis(kept, np.asarray(tokens)[..., None], -1)).sum())
    tokens, logits = sampler.sample(params, labels, key, SamplingOptions(cfg_scale=2.0, temperature=2.0),
                                    return_logits=True)
    kth = np.sort(np.asarray(logits), -1)[..., -3]
    chosen = np.take_along_axis(np.asarray(logits), np.asarray(tokens)[..., None], -1)[..., 0]
    unfiltered_outside += int((chosen < kth).sum())
  assert outside_k == 0 and outside_p == 0
  assert unfiltered_outside > 0


def test_token_budget_is_a_prefix_of_the_full_run(sampler, params, golden):
  labels = golden["gen_labels"]
  full = np.asarray(sampler.sample(params, labels, jax.random.key(0), GREEDY["cfg1p5"]))
  for budget in (1, 3, 4, 13, 20):
    part = np.asarray(sampler.sample(params, labels, jax.random.key(0), GREEDY["cfg1p5"], num_tokens=budget))
    assert part.shape == (4, budget) and part.dtype == np.int32
    np.testing.assert_array_equal(part, full[:, :budget])
  with pytest.raises(ValueError, match="num_tokens"):
    sampler.sample(params, labels, jax.random.key(0), GREEDY["cfg1p5"], num_tokens=33)


def test_cfg_interval_switches_to_conditional_logits(sampler, params, golden):
  """cfg_interval=k: decode steps after k (counted after the class prefill) use cond logits."""
  labels = golden["gen_labels"]
  options = SamplingOptions(cfg_scale=4.0, greedy=True, cfg_interval=4)
  tokens, logits = sampler.sample(params, labels, jax.random.key(0), options, return_logits=True)
  cond = np.asarray(sampler.cached_logits(params, labels, tokens))
  guided = np.asarray(sampler.cached_logits(params, labels, tokens, SamplingOptions(cfg_scale=4.0)))
  # decode step k -> token k + 1 (prefix); steps 3.. map to the groups from token 4 on, and
  # step 4 is the second group (tokens 8..11). Steps > 4 start at token 12.
  np.testing.assert_allclose(np.asarray(logits)[:, :12], guided[:, :12], atol=1e-4)
  np.testing.assert_allclose(np.asarray(logits)[:, 12:], cond[:, 12:], atol=1e-4)


def test_guidance_needs_a_null_class():
  model = random_gpt(seed=0, class_dropout_prob=0.0)
  with pytest.raises(ValueError, match="null class"):
    Sampler(model).sample(model, np.array([0]), jax.random.key(0), SamplingOptions(cfg_scale=2.0))


# --- weights per call, per-row keys, mesh ----------------------------------------------------

NON_GREEDY = SamplingOptions(cfg_scale=2.0, temperature=1.3, top_k=12)


@pytest.fixture(scope="module")
def small_gpt():
  return random_gpt(seed=3, n_layer=1, block_size=16, causal_num=4)


def test_new_weights_do_not_recompile(small_gpt):
  """The Sampler holds no weights: other params of the same shapes reuse the executable."""
  sampler = Sampler(nnx.graphdef(small_gpt))
  params = nnx.state(small_gpt)
  labels = np.arange(4) % small_gpt.config.num_classes
  options = SamplingOptions(cfg_scale=2.0, greedy=True)
  before = np.asarray(sampler.sample(params, labels, jax.random.key(0), options))
  count = sampler.trace_count
  shifted = jax.tree.map(lambda x: x + 0.3 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), params)
  after = np.asarray(sampler.sample(shifted, labels, jax.random.key(0), options))
  again = np.asarray(sampler.sample(small_gpt, labels, jax.random.key(0), options))  # a module
  assert sampler.trace_count == count
  graphdef, weights, rest = nnx.split(small_gpt, nnx.Param, ...)  # a filtered split's states
  split = np.asarray(Sampler(graphdef).sample((weights, rest), labels, jax.random.key(0), options))
  np.testing.assert_array_equal(before, split)
  assert (before != after).any()
  np.testing.assert_array_equal(before, again)


def test_per_row_keys_make_rows_independent_of_the_batch(small_gpt):
  """Keys [B]: row b's tokens depend only on keys[b] and labels[b], not on the other rows."""
  sampler = Sampler(small_gpt)
  labels = np.arange(8) % small_gpt.config.num_classes
  keys = jax.random.split(jax.random.key(21), 8)
  batch = np.asarray(sampler.sample(small_gpt, labels, keys, NON_GREEDY))
  for row in (0, 5):
    alone = np.asarray(sampler.sample(small_gpt, labels[row:row + 1], keys[row:row + 1], NON_GREEDY))
    np.testing.assert_array_equal(alone[0], batch[row])
  assert len({tuple(r) for r in batch}) > 1  # rows do differ (the keys are used)
  shuffled = np.asarray(sampler.sample(small_gpt, labels[::-1], keys[::-1], NON_GREEDY))
  np.testing.assert_array_equal(shuffled, batch[::-1])
  count = sampler.trace_count
  sampler.sample(small_gpt, labels, keys, SamplingOptions(cfg_scale=3.0, top_p=0.7))
  assert sampler.trace_count == count
  with pytest.raises(ValueError, match="one per row"):
    sampler.sample(small_gpt, labels, keys[:3], NON_GREEDY)


@pytest.mark.parametrize("fsdp", [False, True])
def test_mesh_sampler_equals_one_device(small_gpt, fsdp):
  """8 CPU devices, batch sharded over the data axes: token for token the 1-device result for
  the same per-row keys (non-greedy), with replicated or FSDP-sharded params."""
  labels = np.arange(8) % small_gpt.config.num_classes
  keys = jax.random.split(jax.random.key(5), 8)
  params = nnx.state(small_gpt)
  one_device = np.asarray(Sampler(small_gpt).sample(params, labels, keys, NON_GREEDY))
  mesh = make_mesh(2, 4, 1) if fsdp else make_mesh(8, 1, 1)
  if fsdp:
    params = jax.device_put(params, shardings_for(params, mesh))
    sharded_leaves = [x for x in jax.tree.leaves(params) if not x.sharding.is_fully_replicated]
    assert sharded_leaves
  sampler = Sampler(nnx.graphdef(small_gpt), mesh=mesh)
  tokens = sampler.sample(params, labels, keys, NON_GREEDY)
  assert tokens.sharding.is_equivalent_to(batch_sharding(mesh, 2), 2)
  np.testing.assert_array_equal(np.asarray(tokens), one_device)
  if not fsdp:  # one key for the whole batch: the same draws, however the batch is split
    key = jax.random.key(9)
    np.testing.assert_array_equal(np.asarray(sampler.sample(params, labels, key, NON_GREEDY)),
                                  np.asarray(Sampler(small_gpt).sample(params, labels, key, NON_GREEDY)))
  with pytest.raises(ValueError, match="batch shards"):
    sampler.sample(params, labels[:6], keys[:6], NON_GREEDY)


def test_embed_positions_windows_equal_the_whole_sequence():
  """The sampler's windows (traced start) are slices of the teacher-forced input sequence,
  and guidance rows interleave (example, null class)."""
  model = random_gpt(seed=2, group_size=3, block_size=21, causal_num=6, n_layer=1)
  cfg = model.config
  tokens = jax.random.randint(jax.random.key(0), (2, cfg.block_size), 0, cfg.vocab_size)
  labels = jnp.array([1, 4])
  whole = np.asarray(model.embed_sequence(tokens[:, :-cfg.group_size], labels))
  window = jax.jit(lambda s, n, guidance: model.embed_positions(tokens, labels, s, n,
                                                                guidance=guidance),
                   static_argnums=(1, 2))
  for start, n in [(0, 1), (3, 1), (6, 3), (9, 3), (18, 3)]:
    np.testing.assert_array_equal(np.asarray(window(start, n, False)), whole[:, start:start + n])
  guided = np.asarray(window(6, 3, True))
  null = np.asarray(model.embed_sequence(tokens[:, :-cfg.group_size],
                                         jnp.full((2,), cfg.num_classes)))
  np.testing.assert_array_equal(guided[0::2], whole[:, 6:9])
  np.testing.assert_array_equal(guided[1::2], null[:, 6:9])
  np.testing.assert_array_equal(np.asarray(window(0, 1, True))[1::2], null[:, :1])


# --- filters at their boundaries -------------------------------------------------------------

def _exact_log(p: float) -> np.float32:
  """A float32 logit whose jnp.exp is exactly p (searched among the ulps around log p), so the
  softmax below yields exactly representable probabilities."""
  x = np.float32(np.log(p))
  for _ in range(8):
    got = float(jnp.exp(jnp.float32(x)))
    if got == p:
      return x
    x = np.nextafter(x, np.float32(np.inf if got < p else -np.inf), dtype=np.float32)
  raise AssertionError(f"no float32 logit with exp == {p}")


@pytest.mark.parametrize("top_p,kept", [(0.5, 2), (0.75, 3), (0.875, 4), (0.4, 1)])
def test_top_p_keeps_the_token_at_the_exact_boundary(top_p, kept):
  """Probabilities exactly 1/2, 1/4, 1/8, 1/16, 1/16: when the mass above a token equals top_p
  the reference (cumulative > top_p, shifted right by one) keeps that token."""
  logits = jnp.array([0.0, _exact_log(0.5), _exact_log(0.25), _exact_log(0.125),
                      _exact_log(0.125)], jnp.float32)
  probs = np.asarray(jax.nn.softmax(logits))
  np.testing.assert_array_equal(probs, [0.5, 0.25, 0.125, 0.0625, 0.0625])  # exact precondition
  ours = np.isfinite(np.asarray(filter_logits(logits[None], 1.0, 0, top_p)))[0]
  np.testing.assert_array_equal(ours, np.arange(5) < kept if kept < 4 else np.ones(5, bool))
  order = np.argsort(-probs, kind="stable")  # the reference's rule on the exact probabilities
  remove = np.cumsum(probs[order]) > top_p
  remove[1:], remove[0] = remove[:-1].copy(), False
  if kept < 4:
    np.testing.assert_array_equal(ours[order], ~remove)


@pytest.mark.parametrize("row,top_k,kept", [
    ([3.0, 1.0, 1.0, 0.0, -2.0], 2, [1, 1, 1, 0, 0]),   # a tie at the k-th value: both kept
    ([2.0, 2.0, 0.0, -1.0, -1.0], 1, [1, 1, 0, 0, 0]),  # a tie for the largest, k = 1
    ([1.0, -1.0, 4.0, 1.0, 2.0], 3, [1, 0, 1, 1, 1]),   # a tie at the k-th, spread out
    ([0.5, -1.0, 4.0, -3.0, 2.0], 3, [1, 0, 1, 0, 1]),
])
def test_top_k_keeps_ties_with_the_kth_largest(row, top_k, kept):
  logits = np.asarray(row, np.float32)
  ours = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits)[None], 1.0, top_k, 1.0)))[0]
  np.testing.assert_array_equal(ours, np.asarray(kept, bool))
  np.testing.assert_array_equal(ours, np.isfinite(_numpy_filter(logits, top_k, 1.0)))


@pytest.mark.parametrize("field,value", [("temperature", 0.0), ("top_k", -1), ("top_k", 2.5),
                                         ("top_p", 1.5), ("cfg_interval", -2), ("cfg_scale", -1.0)])
def test_out_of_range_options_name_the_field(small_gpt, field, value):
  options = SamplingOptions(cfg_scale=1.0).replace(**{field: value})
  with pytest.raises(ValueError, match=f"SamplingOptions.{field} must be"):
    Sampler(small_gpt).sample(small_gpt, np.array([0]), jax.random.key(0), options)


def test_first_argmax_is_jnp_argmax_on_ties_infinities_and_nans():
  from detailflow_jax.inference.sampler import first_argmax
  rng = np.random.default_rng(0)
  x = np.round(rng.normal(size=(5, 3, 40)), 1).astype(np.float32)  # many ties
  x[0, 0, :] = -np.inf
  x[0, 1, 7:] = -np.inf
  x[1, 0, [3, 9]] = np.nan
  x[1, 1, :] = x[1, 1, 0]
  x[2, 2, [4, 30]] = np.inf
  np.testing.assert_array_equal(first_argmax(jnp.asarray(x)), jnp.argmax(jnp.asarray(x), -1))
  assert first_argmax(jnp.asarray(x))[1, 0] == 3 and first_argmax(jnp.asarray(x))[2, 2] == 4


@pytest.mark.parametrize("per_row_keys", [False, True])
def test_choose_tokens_draws_jax_categorical(per_row_keys):
  """The Gumbel draw equals jax.random.categorical's, key for key (tokens do not change)."""
  from detailflow_jax.inference.sampler import choose_tokens
  logits = jax.random.normal(jax.random.key(3), (4, 8, 512)) * 3
  key = jax.random.split(jax.random.key(5), 4) if per_row_keys else jax.random.key(5)
  opts = SamplingOptions(top_k=50).as_arrays()
  filtered = filter_logits(logits, opts.temperature, opts.top_k, opts.top_p)
  if per_row_keys:
    want = jax.vmap(lambda k, x: jax.random.categorical(k, x, axis=-1))(key, filtered)
  else:
    want = jax.random.categorical(key, filtered, axis=-1)
  got = jax.jit(choose_tokens)(logits, key, opts)
  np.testing.assert_array_equal(got, want)
  greedy = SamplingOptions(top_k=50, greedy=True).as_arrays()
  np.testing.assert_array_equal(jax.jit(choose_tokens)(logits, key, greedy),
                                jnp.argmax(jax.nn.softmax(filtered, -1), -1))
