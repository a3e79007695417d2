"""Shared, once-per-session set-up for the GPT tests (conversion, loaded model, sampler).

conftest.py holds the tokenizer's session fixtures; these live here so the GPT test modules
can share one converted model and one compiled sampler without each converting again.
"""
import pathlib

import jax
import numpy as np
from flax import nnx

from detailflow_jax.convert.gpt import convert_gpt
from detailflow_jax.inference.sampler import Sampler
from detailflow_jax.models.gpt import GPT, GPTConfig
from detailflow_jax.models.keys import InitKeys
from detailflow_jax.weights.load import load_gpt

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TINY = FIXTURES / "detailflow_tiny_a"
GPT_RUN = TINY / "gpt"
GPT_PT = GPT_RUN / "checkpoints" / "gpt.pt"
GPT_SAFETENSORS = GPT_RUN / "checkpoints" / "gpt.safetensors"
MANIFESTS = FIXTURES / "manifests"

_cache = {}


def converted_gpt_dir(tmp_path_factory) -> pathlib.Path:
  """The fixture GPT ('model' weights) converted once per session by the CLI code path."""
  key = ("dir", id(tmp_path_factory))
  if key not in _cache:
    out = tmp_path_factory.mktemp("converted_gpt") / "gpt"
    _cache[key] = convert_gpt(GPT_PT, out)
  return _cache[key]


def loaded_gpt(tmp_path_factory):
  key = ("model", id(tmp_path_factory))
  if key not in _cache:
    _cache[key] = load_gpt(converted_gpt_dir(tmp_path_factory))
  return _cache[key]


def fixture_sampler(tmp_path_factory):
  """One Sampler (and so one set of compiled functions) for every test of the fixture GPT."""
  key = ("sampler", id(tmp_path_factory))
  if key not in _cache:
    _cache[key] = Sampler(loaded_gpt(tmp_path_factory))
  return _cache[key]


def random_gpt(seed: int = 0, output_scale: float = 6.0, **config):
  """A tiny GPT with numpy-random weights (built abstractly, so no per-shape JAX init
  compiles). Unlike the reference init, the output layer is non-zero and norm gains are not
  all one, so every parameter matters and logits have clear margins."""
  defaults = dict(dim=32, n_layer=2, n_head=4, vocab_size=24, num_classes=5, block_size=24,
                  group_size=4, multiple_of=32)
  defaults.update(config)
  cfg = GPTConfig(**defaults)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=InitKeys(0))))
  rng = np.random.default_rng(seed)
  flat = []
  for path, var in nnx.to_flat_state(abstract):
    if path[-1] == "weight":  # RMSNorm gains
      value = 1 + 0.1 * rng.normal(size=var.shape)
    elif path[-1] in ("embedding", "spe_tok_embeddings"):
      value = 0.5 * rng.normal(size=var.shape)
    else:  # kernels [in, out]
      scale = output_scale if path[0] == "output" else 1.0
      value = rng.normal(0, scale / np.sqrt(var.shape[0]), var.shape)
    flat.append((path, var.replace(jax.numpy.asarray(value, np.float32))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


@nnx.jit
def forward(model, tokens, labels):
  """Teacher-forced logits, jitted (eager op-by-op dispatch is slow on CPU)."""
  return model(tokens, labels)
