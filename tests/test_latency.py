"""Batch-1 latency work: the weight-only bf16 sampler (`weights_dtype`), the bytes a step
streams, the persistent compilation cache of the CLIs, and benchmarks/latency.py's helpers."""
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from gpt_helpers import converted_gpt_dir, fixture_sampler, loaded_gpt, random_gpt

from detailflow_jax import cli
from detailflow_jax.inference.sampler import Sampler, SamplingOptions, cast_kernels, weight_bytes_per_step
from detailflow_jax.models.gpt import GPTConfig
from detailflow_jax.models.precision import Linear, Precision

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import latency  # noqa: E402


def test_weight_only_policy_rounds_inputs_and_keeps_a_float32_product():
  layer = Linear(8, 4, use_bias=False, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (3, 8), jnp.float32)
  layer.mixed_precision = Precision("bfloat16", output_dtype="float32")
  y = layer(x)
  assert y.dtype == jnp.float32
  # The product of the bf16-rounded operands, summed in float64: float32 accumulation of
  # bf16 x bf16 terms (exact in float32) differs from it by float32 rounding only.
  expected = (np.asarray(x.astype(jnp.bfloat16), np.float64)
              @ np.asarray(layer.kernel[...].astype(jnp.bfloat16), np.float64))
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-6, atol=1e-6)
  assert not np.allclose(np.asarray(y), np.asarray(x) @ np.asarray(layer.kernel[...]), atol=1e-7)
  with pytest.raises(ValueError, match="output_dtype"):
    Precision(None, output_dtype="float32")
  with pytest.raises(ValueError, match="output_dtype"):
    Precision("bfloat16", output_dtype="float16")


def test_weight_bytes_per_step_counts_kernels_and_gains_not_embeddings():
  cfg = GPTConfig.preset("GPT-B", vocab_size=8192, block_size=128, group_size=8, num_classes=1000)
  abstract = nnx.state(nnx.eval_shape(lambda: __import__(
      "detailflow_jax.models.gpt", fromlist=["GPT"]).GPT(cfg)))
  d, f, hd = cfg.dim, cfg.ffn_hidden, cfg.head_dim
  kernels = cfg.n_layer * (d * (cfg.n_head + 2 * cfg.num_kv_heads) * hd + d * d + 3 * d * f) \
      + d * cfg.vocab_size
  gains = (2 * cfg.n_layer + 1) * d
  assert weight_bytes_per_step(abstract) == 4 * (kernels + gains)  # ~365 MB for GPT-B
  assert 360e6 < 4 * (kernels + gains) < 370e6
  bf16 = jax.eval_shape(lambda s: cast_kernels(s, "bfloat16"), abstract)
  assert weight_bytes_per_step(bf16) == 2 * kernels + 4 * gains


def test_cast_kernels_touches_matmul_kernels_only():
  params = nnx.state(random_gpt())
  cast = cast_kernels(params, "bfloat16")
  for path, x in jax.tree_util.tree_flatten_with_path(cast)[0]:
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    assert x.dtype == (jnp.bfloat16 if "kernel" in names else jnp.float32), names
  assert cast_kernels(params, "float32") is params
  with pytest.raises(ValueError, match="weights_dtype must be one of float32 | bfloat16"):
    cast_kernels(params, "int8")
  with pytest.raises(ValueError, match="weights_dtype"):
    Sampler(random_gpt(), weights_dtype="float16")


def test_float32_weights_are_the_default_path(tmp_path_factory, golden):
  gpt = loaded_gpt(tmp_path_factory)
  labels = golden["gen_labels"]
  opts = SamplingOptions(cfg_scale=1.5, greedy=True)
  tokens = Sampler(gpt, weights_dtype="float32").sample(gpt, labels, jax.random.key(0), opts)
  np.testing.assert_array_equal(np.asarray(tokens), golden["gen_tokens_cfg1p5"])


def test_bfloat16_weights_on_the_fixture_gpt(tmp_path_factory, golden):
  """Quality of weight-only bf16 on the reference's fixture GPT: greedy tokens and the logits
  they are drawn from, against the float32 sampler (whose tokens are the reference's)."""
  gpt = loaded_gpt(tmp_path_factory)
  labels = golden["gen_labels"]
  opts = SamplingOptions(cfg_scale=1.5, greedy=True)
  s32 = fixture_sampler(tmp_path_factory)
  s16 = Sampler(gpt, weights_dtype="bfloat16")
  params = s16.prepare_weights(gpt)
  tokens, logits = s16.sample(params, labels, jax.random.key(0), opts, return_logits=True)
  assert s16.trace_count == 1
  # float32 kernels are cast inside the call: the same program result
  np.testing.assert_array_equal(np.asarray(s16.sample(gpt, labels, jax.random.key(0), opts)),
                                np.asarray(tokens))
  reference_tokens = golden["gen_tokens_cfg1p5"]
  agreement = float(np.mean(np.asarray(tokens) == reference_tokens))
  forced32 = np.asarray(s32.cached_logits(gpt, labels, reference_tokens, opts))
  forced16 = np.asarray(s16.cached_logits(params, labels, reference_tokens, opts))
  assert logits.dtype == jnp.float32
  max_diff = float(np.abs(forced32 - forced16).max())
  argmax_agreement = float(np.mean(forced32.argmax(-1) == forced16.argmax(-1)))
  print(f"fixture GPT bf16 weights: greedy agreement {agreement:.3f}, teacher-forced argmax "
        f"agreement {argmax_agreement:.3f}, max logit diff {max_diff:.4f} "
        f"(max |logit| {np.abs(forced32).max():.2f})")
  assert 0 < max_diff < 0.05 * np.abs(forced32).max()
  # free-running: a difference early in a row changes every later token of it
  assert argmax_agreement >= 0.95 and agreement >= 0.8


def test_latency_benchmark_steps_and_bandwidth():
  cfg = GPTConfig.preset("GPT-B", vocab_size=8192, block_size=128, group_size=8, num_classes=1000)
  assert latency.steps_per_call(cfg, 128) == 23  # the paper's 23 steps for DetailFlow-16
  small = GPTConfig(dim=32, n_layer=1, n_head=4, vocab_size=24, num_classes=5, block_size=24,
                    group_size=4, multiple_of=32)
  # causal_len single steps, then the remaining groups; a budget inside a group runs it whole
  assert latency.steps_per_call(small, 24) == small.causal_len + 6 - small.causal_len // 4
  assert latency.steps_per_call(small, 2) == 2


def _sample_cli(args, env_extra):
  env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **env_extra)
  return subprocess.run([sys.executable, "-m", "detailflow_jax.sample"] + args, cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_compile_cache_flags(tmp_path, tmp_path_factory, tokenizer_dir):
  base = ["--tokenizer", str(tokenizer_dir), "--gpt", str(converted_gpt_dir(tmp_path_factory)),
          "--labels", "1", "--greedy", "--num-tokens", "4", "--weights-dtype", "bfloat16"]
  package_cache = tmp_path / "package_cache"
  env = {"DETAILFLOW_JAX_CACHE": str(package_cache), "PYTHONPATH": str(ROOT)}
  # default: under the package cache directory (with JAX's own variable unset)
  env_default = dict(env)
  run = _sample_cli(base + ["--out", str(tmp_path / "a.png"), "--save-tokens", str(tmp_path / "a.npy")],
                    dict(env_default, JAX_COMPILATION_CACHE_DIR=""))
  assert run.returncode == 0, run.stderr
  default_dir = package_cache / cli.COMPILE_CACHE_SUBDIR
  assert default_dir.is_dir() and any(default_dir.iterdir())
  # --compile-cache DIR: a second run reads what the first wrote, with the same tokens
  chosen = tmp_path / "chosen"
  for name in ("b", "c"):
    run = _sample_cli(base + ["--compile-cache", str(chosen), "--out", str(tmp_path / f"{name}.png"),
                              "--save-tokens", str(tmp_path / f"{name}.npy")], env)
    assert run.returncode == 0, run.stderr
    if name == "b":
      entries = sorted(p.name for p in chosen.iterdir())
      assert entries
  assert sorted(p.name for p in chosen.iterdir()) == entries  # all hits: nothing new written
  np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), np.load(tmp_path / "c.npy"))
  np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
  # --no-compile-cache: nothing written anywhere
  off_env = dict(env, DETAILFLOW_JAX_CACHE=str(tmp_path / "off"), JAX_COMPILATION_CACHE_DIR="")
  run = _sample_cli(base + ["--no-compile-cache", "--out", str(tmp_path / "d.png")], off_env)
  assert run.returncode == 0, run.stderr
  assert not (tmp_path / "off").exists()
  run = _sample_cli(base + ["--no-compile-cache", "--compile-cache", str(chosen)], env)
  assert run.returncode == 2 and "not allowed with argument" in run.stderr


def test_generation_settings_weights_dtype():
  from detailflow_jax.eval.generation import GenerationSettings, precision_record
  default = GenerationSettings(num_samples=4)
  assert "weights_dtype" not in default.protocol()  # protocols from before the field still match
  bf16 = GenerationSettings(num_samples=4, weights_dtype="bfloat16")
  assert bf16.protocol()["weights_dtype"] == "bfloat16"
  assert precision_record("float32", "bfloat16")["weights_dtype"] == "bfloat16"
  with pytest.raises(ValueError, match="weights_dtype='bfloat16' .* needs precision='float32'"):
    GenerationSettings(num_samples=4, weights_dtype="bfloat16", precision="bfloat16")
  with pytest.raises(ValueError, match="weights_dtype must be one of"):
    GenerationSettings(num_samples=4, weights_dtype="int8")


def test_bfloat16_weights_stream_like_sample():
  gpt = random_gpt()
  sampler = Sampler(gpt, weights_dtype="bfloat16")
  params = sampler.prepare_weights(gpt)
  labels, key, opts = np.array([1, 3]), jax.random.key(5), SamplingOptions(cfg_scale=1.5)
  whole = np.asarray(sampler.sample(params, labels, key, opts))
  prefixes = [np.asarray(p) for p in sampler.sample_stream(params, labels, key, opts)]
  np.testing.assert_array_equal(prefixes[-1], whole)
  np.testing.assert_array_equal(whole, np.asarray(sampler.sample(gpt, labels, key, opts)))


def test_contracted_last_kernels_compute_the_same_products():
  """A kernel stored with its contracted axes last ([out, in]) gives the stored layout's product:
  Linear, and an Einsum with several free kernel axes and a bias (the 2-D product path)."""
  from detailflow_jax.models.precision import Einsum
  x = jax.random.normal(jax.random.key(1), (2, 3, 8))
  for layer in (Linear(8, 5, rngs=nnx.Rngs(0)),
                Einsum("bnd,dkh->bnkh", (8, 2, 3), (2, 3), rngs=nnx.Rngs(0)),
                Einsum("bnd,kdh->bnkh", (2, 8, 3), (2, 3), rngs=nnx.Rngs(0))):  # the generic einsum path
    if layer.bias is not None:
      layer.bias.set_value(jax.random.normal(jax.random.key(2), layer.bias.shape))
    expected = layer(x)
    kernel = layer.kernel[...]
    layer.kernel.set_value(jnp.transpose(kernel, layer.contracted_last_permutation()))
    assert layer.kernel.shape[-1] == 8  # the contracted axis is last
    layer.mixed_precision = Precision(kernels_contracted_last=True)
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(expected), rtol=1e-6, atol=1e-6)
    layer.mixed_precision = Precision("bfloat16", output_dtype="float32", kernels_contracted_last=True)
    layer.kernel.set_value(layer.kernel[...].astype(jnp.bfloat16))
    got = layer(x)
    layer.kernel.set_value(kernel.astype(jnp.bfloat16))
    layer.mixed_precision = Precision("bfloat16", output_dtype="float32")
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(layer(x)), rtol=1e-5, atol=1e-5)
  # A convolution has no contracted-last layout: asking for one is an error, not a wrong product.
  from detailflow_jax.models.precision import Conv
  conv = Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))
  conv.mixed_precision = Precision(kernels_contracted_last=True)
  with pytest.raises(ValueError, match="contracted-last"):
    conv(jnp.ones((1, 5, 5, 3)))


def test_contracted_last_sampler_draws_the_reference_tokens(tmp_path_factory, golden):
  """Prepared weights in the contracted-last layout (the CPU default): every kernel stored
  transposed once, and the greedy tokens still the reference's."""
  gpt = loaded_gpt(tmp_path_factory)
  labels = golden["gen_labels"]
  opts = SamplingOptions(cfg_scale=1.5, greedy=True)
  sampler = Sampler(gpt, kernel_layout="contracted_last")
  params = sampler.prepare_weights(gpt)
  assert (params.weights_dtype, params.kernel_layout) == ("float32", "contracted_last")
  stored = {p: x.shape for p, x in nnx.to_flat_state(nnx.state(gpt)) if p[-1] == "kernel"}
  laid = {p: x.shape for p, x in nnx.to_flat_state(params.states[0]) if p[-1] == "kernel"}
  assert stored and stored.keys() == laid.keys()
  assert all(laid[p][-1] == shape[0] and laid[p] != shape for p, shape in stored.items()
             if len(set(shape)) > 1)
  tokens = sampler.sample(params, labels, jax.random.key(0), opts)
  np.testing.assert_array_equal(np.asarray(tokens), golden["gen_tokens_cfg1p5"])
  with pytest.raises(ValueError, match="kernel_layout"):
    Sampler(gpt, kernel_layout="as_stored").sample(params, labels, jax.random.key(0), opts)
  with pytest.raises(ValueError, match="kernel_layout"):
    Sampler(gpt, kernel_layout="columns")


@pytest.mark.parametrize("weights_dtype", ["float32", "bfloat16"])
def test_contracted_last_program_never_copies_a_kernel(weights_dtype):
  """The compiled sampler streams the prepared [out, in] kernels as they are: XLA:CPU copied
  bf16 kernels back to [in, out] in every call while Linear multiplied [B, n, in] inputs (a 3-D
  product), which cost bf16 GPT-B 1.35x at batch 1."""
  gpt = random_gpt()
  sampler = Sampler(gpt, weights_dtype=weights_dtype, kernel_layout="contracted_last")
  params = sampler.prepare_weights(gpt)
  text = sampler._call(params, np.array([1, 3]), jax.random.key(0), SamplingOptions(cfg_scale=1.5),
                       sampler.config.block_size, None, False, lower=True).as_text()
  kernels = {tuple(x.shape) for p, x in nnx.to_flat_state(params.states[0]) if p[-1] == "kernel"}
  dtype = {"float32": "f32", "bfloat16": "bf16"}[weights_dtype]
  copied = [line.strip()[:160] for line in text.splitlines()
            if " copy(" in line and any(f"{dtype}[{','.join(map(str, s[::-1]))}]" in line
                                        or f"{dtype}[{','.join(map(str, s))}]" in line for s in kernels)]
  assert not copied, copied


def test_xla_options_benchmark_times_each_option_set(monkeypatch, capsys):
  """benchmarks/xla_options.py on a tiny GPT: each option set compiles the same program, draws
  the default's tokens, and "ynn_off" really has no YNNPACK fusion left while the default has
  some (so the A/B compares two different dot paths)."""
  import json

  from benchmarks import xla_options
  monkeypatch.setattr(xla_options, "model_config", lambda name: random_gpt().config)
  monkeypatch.setattr(xla_options, "random_reference_like_gpt", lambda cfg, seed: random_gpt())
  monkeypatch.setitem(xla_options.COMMON, "tokens", 24)
  assert xla_options.main(["--quick", "--rounds", "1", "--sets", "default,ynn_off"]) == 0
  out = json.loads(capsys.readouterr().out)
  default, off = out["compiles"]["batch1/default"], out["compiles"]["batch1/ynn_off"]
  assert default["__ynn_fusion"] > 0 and off["__ynn_fusion"] == 0
  assert default["same_tokens_as_default"] and off["same_tokens_as_default"]
  timing = out["workloads"]["batch1"]
  assert set(timing) == {"default", "ynn_off"} and timing["default"]["speedup"] == 1.0
  assert all(len(t["seconds"]) == 1 and t["median_s"] > 0 for t in timing.values())
