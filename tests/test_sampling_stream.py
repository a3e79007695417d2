"""Sampler.sample_stream: token prefixes every k decode steps, ending with exactly `sample`'s
tokens, compiled once, the KV cache carried from segment to segment (1 device and 8)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from gpt_helpers import fixture_sampler, loaded_gpt, random_gpt

from detailflow_jax.inference.sampler import Sampler, SamplingOptions
from detailflow_jax.sharding import batch_sharding, make_mesh

OPTIONS = {
    "cfg": SamplingOptions(cfg_scale=2.0, temperature=1.3, top_k=12),
    "cfg_gradual": SamplingOptions(cfg_scale=1.5, gradual_cfg=True, top_p=0.9),
    "no_cfg": SamplingOptions(cfg_scale=1.0, temperature=0.9),
}


@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
  return fixture_sampler(tmp_path_factory)


@pytest.fixture(scope="module")
def params(tmp_path_factory):
  return nnx.state(loaded_gpt(tmp_path_factory))


def stream(sampler, *args, **kwargs):
  return [np.asarray(t) for t in sampler.sample_stream(*args, **kwargs)]


def test_step_token_counts_are_the_schedule_boundaries(sampler):
  # fixture GPT: 32 tokens, groups of 4, causal prefix of 4 (the schedule's token_list)
  assert sampler.step_token_counts() == [1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32]
  assert sampler.step_token_counts(13) == [1, 2, 3, 4, 8, 12, 13]
  assert sampler.step_token_counts(3) == [1, 2, 3]


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_stream_ends_with_the_tokens_sample_returns(sampler, params, golden, name):
  labels, options = golden["gen_labels"], OPTIONS[name]
  key = jax.random.key(7)
  for budget in (None, 13, 3):
    expected = np.asarray(sampler.sample(params, labels, key, options, num_tokens=budget))
    counts = sampler.step_token_counts(budget)
    for every in (1, 2, 3, 100):
      prefixes = stream(sampler, params, labels, key, options, num_tokens=budget, every=every)
      want = counts[every - 1::every]
      if not want or want[-1] != counts[-1]:
        want.append(counts[-1])
      assert [p.shape[1] for p in prefixes] == want, (budget, every)
      np.testing.assert_array_equal(prefixes[-1], expected)
      for p in prefixes:  # every yield is a prefix of the final tokens
        np.testing.assert_array_equal(p, expected[:, :p.shape[1]])


def test_stream_compiles_once_for_every_segment_call_and_option(sampler, params, golden):
  labels = golden["gen_labels"]
  list(sampler.sample_stream(params, labels, jax.random.key(0), OPTIONS["cfg"], every=2))  # warm
  before = sampler.trace_count
  for i, options in enumerate([OPTIONS["cfg"], OPTIONS["cfg_gradual"],
                               SamplingOptions(cfg_scale=3.0, greedy=True, cfg_interval=2)]):
    for every, budget in ((1, None), (4, 13), (3, 5)):
      list(sampler.sample_stream(params, labels, jax.random.key(i), options, num_tokens=budget,
                                 every=every))
  assert sampler.trace_count == before


def test_stream_at_chosen_steps(sampler, params, golden):
  """at_steps: one segment per chosen step (and the last), the same tokens, no new program."""
  labels, options = golden["gen_labels"], OPTIONS["cfg"]
  expected = np.asarray(sampler.sample(params, labels, jax.random.key(3), options))
  list(sampler.sample_stream(params, labels, jax.random.key(0), options, every=2))  # warm
  before = sampler.trace_count
  for at_steps, lengths in (([1, 4, 5], [1, 4, 8, 32]), ([11, 2], [2, 32]), ([], [32])):
    prefixes = stream(sampler, params, labels, jax.random.key(3), options, at_steps=at_steps)
    assert [p.shape[1] for p in prefixes] == lengths
    np.testing.assert_array_equal(prefixes[-1], expected)
  assert sampler.trace_count == before
  for at_steps in ([0], [12]):
    with pytest.raises(ValueError, match="at_steps must lie in \\[1, 11\\]"):
      sampler.sample_stream(params, labels, jax.random.key(0), at_steps=at_steps)
  with pytest.raises(ValueError, match="every or at_steps"):
    sampler.sample_stream(params, labels, jax.random.key(0), every=2, at_steps=[1])


def test_segments_read_the_carried_kv_cache(sampler, params, golden):
  """The second segment runs only its own steps: it reads the first segment's keys/values
  from the carried cache (zeroing that cache changes its tokens; the prefix stays)."""
  labels, options = golden["gen_labels"], SamplingOptions(cfg_scale=1.5, greedy=True)
  expected = np.asarray(sampler.sample(params, labels, jax.random.key(0), options))
  key_data, key_impl = sampler._key(jax.random.key(0), len(labels))
  labels = sampler._labels(labels, True)
  run = lambda state, first, end: sampler._stream_segment(
      params, labels, key_data, options.as_arrays(), jnp.int32(32), state, jnp.int32(first),
      jnp.int32(end), guidance=True, key_impl=key_impl)
  state = run(sampler._stream_start(params, labels, guidance=True), 0, 6)  # 12 tokens
  prefix = np.asarray(state.tokens[:, :12])
  zeroed = state.replace(caches=jax.tree.map(jnp.zeros_like, state.caches))
  carried = jax.tree.map(jnp.copy, state)
  np.testing.assert_array_equal(np.asarray(run(carried, 6, 11).tokens), expected)
  with pytest.raises(RuntimeError, match="deleted"):  # the segment took (donated) its state
    np.asarray(carried.tokens)
  broken = np.asarray(run(zeroed, 6, 11).tokens)
  np.testing.assert_array_equal(broken[:, :12], prefix)
  assert (broken[:, 12:] != expected[:, 12:]).any()


def test_stream_rejects_a_bad_every_before_running(sampler, params, golden):
  for every in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="every must be"):
      sampler.sample_stream(params, golden["gen_labels"], jax.random.key(0), every=every)
  with pytest.raises(ValueError, match="num_tokens=0"):
    sampler.sample_stream(params, golden["gen_labels"], jax.random.key(0), num_tokens=0)


@pytest.mark.parametrize("per_row_keys", [True, False])
def test_stream_on_8_devices_equals_one_device_sample(per_row_keys):
  gpt = random_gpt(seed=3, n_layer=1, block_size=16, causal_num=4)
  labels = np.arange(8) % gpt.config.num_classes
  key = jax.random.split(jax.random.key(5), 8) if per_row_keys else jax.random.key(9)
  params = nnx.state(gpt)
  for options in (OPTIONS["cfg"], OPTIONS["no_cfg"]):
    one_device = np.asarray(Sampler(gpt).sample(params, labels, key, options))
    sampler = Sampler(nnx.graphdef(gpt), mesh=make_mesh(8, 1, 1))
    for every in (1, 3):
      prefixes = list(sampler.sample_stream(params, labels, key, options, every=every))
      assert prefixes[-1].sharding.is_equivalent_to(batch_sharding(sampler.mesh, 2), 2)
      np.testing.assert_array_equal(np.asarray(prefixes[-1]), one_device)
    assert sampler.trace_count == 2  # the start state and the segment, once each
