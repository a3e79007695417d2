"""The mixed-precision policy (models/precision.py): per-op dtypes in the traced programs, a
bf16 autocast train step's loss close to float32's, and float32 master weights / optimizer
state, for the GPT and the tokenizer (tiny configs)."""
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.detailflow16_gpt_l import get_config as gpt_config
from configs.detailflow16_tokenizer import get_config as tokenizer_config
from detailflow_jax.models.gpt import GPT
from detailflow_jax.models.precision import Linear, Precision, set_precision
from detailflow_jax.models.tokenizer import Tokenizer, TokenizerConfig
from detailflow_jax import sharding as mesh_lib
from detailflow_jax.train import ar
from detailflow_jax.train import tokenizer as recipe
from detailflow_jax.train.optim import make_optimizer
from detailflow_jax.train.state import create_train_state, make_train_step

BF16 = Precision("bfloat16")
# Measured (tiny configs, 2 steps), |bf16 - f32| / f32 of the loss: GPT 0 / 5.5e-6 (its
# zero-initialised output layer makes the first step's logits uniform in both), tokenizer
# 3.2e-3 / 4.7e-3; bf16 rounds each matmul input by up to 4e-3 relative.
LOSS_RTOL = 2e-2


def eqns(jaxpr):
  """Every equation of a jaxpr, recursing into sub-jaxprs (pjit, remat, custom_jvp, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from eqns(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from eqns(sub)


def dtypes_by_primitive(fn, *args):
  """{primitive name: [(input dtypes, output dtypes, params), ...]} of fn's jaxpr."""
  out = {}
  for eqn in eqns(jax.make_jaxpr(fn)(*args).jaxpr):
    ins = tuple(v.aval.dtype for v in eqn.invars if hasattr(v.aval, "dtype"))
    outs = tuple(v.aval.dtype for v in eqn.outvars)
    out.setdefault(eqn.primitive.name, []).append((ins, outs, eqn.params, eqn))
  return out


def assert_autocast_dtypes(ops, residual_shape):
  """Matmuls: bf16 inputs, float32 accumulation. Norms, softmax, residual adds: float32.
  The only float32 matmuls are the deliberate precision=HIGHEST ones (the position-table
  resize and the VQ distances, float32 like the reference's)."""
  highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
  dots = [d for d in ops["dot_general"] if d[2]["precision"] != highest]
  assert all(ins == (jnp.float32, jnp.float32) for ins, _, p, _ in ops["dot_general"]
             if p["precision"] == highest)
  assert len(dots) >= 6
  for ins, _, params, _ in dots:
    assert ins == (jnp.bfloat16, jnp.bfloat16), ins
    assert params["preferred_element_type"] == jnp.float32
  for name in ("rsqrt", "exp", "reduce_max"):   # RMS/Layer norm, softmax
    assert ops[name] and all(ins[0] == jnp.float32 for ins, *_ in ops[name]), name
  residual_adds = [e for *_, e in ops["add"] if e.outvars[0].aval.shape == residual_shape]
  assert residual_adds
  assert all(e.outvars[0].aval.dtype == jnp.float32 for e in residual_adds)


def tiny_gpt():
  c = gpt_config("tiny")
  return c, ar.gpt_config_from(c)


def gpt_batch(cfg, batch=4):
  tokens = jax.random.randint(jax.random.key(0), (batch, cfg.block_size, 3), 0, cfg.vocab_size)
  return {"tokens": tokens, "labels": jnp.arange(batch) % cfg.num_classes}


def test_native_policy_is_plain_nnx_linear():
  layer = Linear(8, 4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 8))
  reference = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(reference(x)))
  set_precision(layer, BF16)
  y = layer(x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(reference(x)), rtol=2e-2, atol=2e-2)


def test_policy_names_and_errors():
  assert Precision.named("float32") == Precision() and not Precision().autocast
  assert Precision.named(jnp.bfloat16) == BF16
  with pytest.raises(ValueError, match="compute_dtype='float16'"):
    Precision.named("float16")

  class Plain(nnx.Module):
    def __init__(self):
      self.proj = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="proj is a plain nnx.Linear"):
    set_precision(Plain(), BF16)


def test_gpt_autocast_per_op_dtypes():
  _, cfg = tiny_gpt()
  model = set_precision(GPT(cfg, rngs=0), BF16)
  batch = gpt_batch(cfg)
  tokens = batch["tokens"][:, :-cfg.group_size, 0]
  ops = dtypes_by_primitive(lambda t, l: model.loss(t, l, batch["tokens"][..., 0],
                                                    key=jax.random.key(0))[0],
                            tokens, batch["labels"])
  assert_autocast_dtypes(ops, (4, model.sequence_length(tokens.shape[1]), cfg.dim))
  # embeddings are float32 (master parameters, not cast); the other gathers pick token ids
  assert {outs[0] for ins, outs, *_ in ops["gather"]
          if jnp.issubdtype(ins[0], jnp.floating)} == {jnp.dtype(jnp.float32)}


def test_tokenizer_autocast_per_op_dtypes():
  cfg = TokenizerConfig.from_dict(tokenizer_config("tiny").model)
  model = set_precision(Tokenizer(cfg, rngs=0), BF16)
  images = jnp.zeros((2, cfg.image_size, cfg.image_size, 3))
  ops = dtypes_by_primitive(lambda x: model(x), images)
  assert_autocast_dtypes(ops, (2, (cfg.image_size // cfg.encoder.patch_size) ** 2
                               + cfg.num_latent_tokens, cfg.encoder.hidden_size))
  assert model(images).dtype == jnp.bfloat16  # the to_pixel projection's output


def _gpt_losses(compute_dtype, steps=2):
  c, cfg = tiny_gpt()
  mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  tx = make_optimizer(1e-3, 100, warmup_steps=0)
  graphdef, state, shardings = create_train_state(lambda: GPT(cfg, rngs=0), tx, mesh)
  step = make_train_step(graphdef, ar.make_loss(cfg, 0.3, compute_dtype), tx, shardings, mesh)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, gpt_batch(cfg))
    losses.append(float(metrics["loss"]))
  return losses, state


def assert_float32_state(*trees):
  floats = [x for t in trees for x in jax.tree.leaves(t) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.float32 for x in floats)


def test_gpt_bf16_step_close_to_float32_with_float32_master_state():
  f32, _ = _gpt_losses(jnp.float32)
  bf16, state = _gpt_losses(jnp.bfloat16)
  np.testing.assert_allclose(bf16, f32, rtol=LOSS_RTOL)
  assert bf16 != f32  # bf16 really ran
  assert_float32_state(state.params, state.opt_state, state.ema_params)


def _tokenizer_losses(compute_dtype, steps=2):
  c = tokenizer_config("tiny")
  cfg = TokenizerConfig.from_dict(c.model)
  tx, _ = recipe.make_optimizers(c, 100)
  trainer = recipe.TokenizerTrainer(Tokenizer(cfg, rngs=0), recipe.loss_config_from(c), tx,
                                    mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1]),
                                    precision=Precision.named(compute_dtype))
  state = trainer.init_state()
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (4, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  batch = {"image": images, "target": images, "t": 16, "max_tokens": 16,
           "decode_res": cfg.image_size, "noise_idx": cfg.causal_len + cfg.group_size}
  losses = []
  for i in range(steps):
    state, metrics = trainer.step(state, batch, i)
    losses.append(float(metrics["loss"]))
  return losses, state


def test_tokenizer_bf16_step_close_to_float32_with_float32_master_state():
  f32, _ = _tokenizer_losses("float32")
  bf16, state = _tokenizer_losses("bfloat16")
  np.testing.assert_allclose(bf16, f32, rtol=LOSS_RTOL)
  assert bf16 != f32
  assert_float32_state(state.params, state.opt_state)
