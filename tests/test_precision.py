"""The mixed-precision policy (models/precision.py): per-op dtypes in the traced programs, a
bf16 autocast train step's loss close to float32's, and float32 master weights / optimizer
state, for the GPT, the tokenizer and the tokenizer's LPIPS and discriminators (tiny configs)."""
import re

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.detailflow16_gpt_l import get_config as gpt_config
from configs.detailflow16_tokenizer import get_config as tokenizer_config
from detailflow_jax import sharding as mesh_lib
from detailflow_jax.models.dino import DinoConfig, DinoDiscriminator
from detailflow_jax.models.disc_layers import BatchNorm, BatchNormLocal, Conv1d
from detailflow_jax.models.gpt import GPT
from detailflow_jax.models.lpips import VGG16_CONVS_PER_STAGE
from detailflow_jax.models.patchgan import PatchGANDiscriminator
from detailflow_jax.models.precision import Conv, Linear, Precision, set_precision
from detailflow_jax.models.tokenizer import Tokenizer, TokenizerConfig
from detailflow_jax.train import ar, frozen_nets
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


def test_native_policy_is_plain_nnx_conv():
  layer = Conv(3, 5, (4, 4), strides=2, padding=((1, 1), (1, 1)), rngs=nnx.Rngs(0))
  reference = nnx.Conv(3, 5, (4, 4), strides=2, padding=((1, 1), (1, 1)), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(reference(x)))
  y = set_precision(layer, BF16)(x)
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

  class PlainConv(nnx.Module):
    def __init__(self):
      self.conv = nnx.Conv(2, 2, (3, 3), rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="conv is a plain nnx.Conv"):
    set_precision(PlainConv(), BF16)


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


def _gpt_loss_of_params():
  _, cfg = tiny_gpt()
  graphdef, params, rest = nnx.split(set_precision(GPT(cfg, rngs=0), BF16), nnx.Param, ...)
  batch = gpt_batch(cfg)
  tokens = batch["tokens"][:, :-cfg.group_size, 0]
  return lambda p: nnx.merge(graphdef, p, rest).loss(
      tokens, batch["labels"], batch["tokens"][..., 0], key=jax.random.key(0))[0], params


def _tokenizer_loss_of_params():
  cfg = TokenizerConfig.from_dict(tokenizer_config("tiny").model)
  graphdef, params, rest = nnx.split(set_precision(Tokenizer(cfg, rngs=0), BF16), nnx.Param, ...)
  images = jax.random.uniform(jax.random.key(0), (2, cfg.image_size, cfg.image_size, 3))
  return lambda p: jnp.mean(jnp.square(nnx.merge(graphdef, p, rest)(images) - images)), params


@pytest.mark.parametrize("loss_of_params", [_gpt_loss_of_params, _tokenizer_loss_of_params])
def test_autocast_backward_products_are_bf16(loss_of_params):
  """torch autocast's backward of a bf16 product is bf16 (its grad_output is bf16): every
  gradient product here takes bf16 operands and gives bf16 (precision.float32_accumulated), where
  JAX's own derivative would feed the float32 cotangent of the float32-accumulated forward to
  float32 / mixed transposes. The gradients still reach the float32 parameters as float32."""
  loss, params = loss_of_params()
  highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
  forward = [d for d in dtypes_by_primitive(loss, params)["dot_general"] if d[2]["precision"] != highest]
  both = [d for d in dtypes_by_primitive(jax.grad(loss), params)["dot_general"]
          if d[2]["precision"] != highest]
  assert forward and all(ins == (jnp.bfloat16, jnp.bfloat16) for ins, *_ in both)
  products = [params["preferred_element_type"] for _, _, params, _ in both]
  assert products.count(jnp.float32) == len(forward)  # the forward's, float32-accumulated
  # Each forward product has two transposes (to both operands), bf16 in and out.
  assert products.count(jnp.bfloat16) >= 2 * len(forward)
  grads = jax.grad(loss)(params)
  assert_float32_state(grads)


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
    state, metrics = trainer.step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses, state


def test_tokenizer_bf16_step_close_to_float32_with_float32_master_state():
  f32, _ = _tokenizer_losses("float32")
  bf16, state = _tokenizer_losses("bfloat16")
  np.testing.assert_allclose(bf16, f32, rtol=LOSS_RTOL)
  assert bf16 != f32
  assert_float32_state(state.params, state.opt_state)


# --- LPIPS and the discriminators under the trainer's policy -----------------------------------

SMALL_DINO = DinoConfig(hidden_size=64, num_heads=2, mlp_dim=128, depth=2, image_size=64,
                        key_depths=(0, 1))
# name: (build, call) of the networks the tokenizer step runs under its policy, tiny widths.
GAN_NETS = {
    "dino_sbn": (lambda: DinoDiscriminator(SMALL_DINO, norm_type="sbn", rngs=1),
                 lambda m, x: m(x, key=jax.random.key(0), train=True)),
    "dino_bn": (lambda: DinoDiscriminator(SMALL_DINO, norm_type="bn", virtual_bs=2, rngs=1),
                lambda m, x: m(x, key=jax.random.key(0), train=True)),
    "patchgan": (lambda: PatchGANDiscriminator(3, 16, 2, rngs=0), lambda m, x: m(x, train=True)),
    "lpips": (lambda: frozen_nets.random_perceptual(small=True), lambda m, x: m(x, -0.5 * x)),
}


def gan_images():
  return jax.random.uniform(jax.random.key(1), (4, 32, 32, 3), minval=-1.0, maxval=1.0)


def merged_in_trace(model, call):
  """call(model, x) as a function of (state, x), the model merged inside the trace as the trainer
  does (a training-mode discriminator writes its batch statistics / power-iteration vectors)."""
  graphdef, state = nnx.split(model)
  return (lambda state, x: call(nnx.merge(graphdef, state), x)), state


@pytest.mark.parametrize("name", list(GAN_NETS))
def test_lpips_and_discriminators_autocast_per_op_dtypes(name):
  build, call = GAN_NETS[name]
  fn, state = merged_in_trace(set_precision(build(), BF16), call)
  images = gan_images()
  ops = dtypes_by_primitive(fn, state, images)
  # Convolutions (VGG16, PatchGAN, the DINO heads): bf16 input and kernel, float32 accumulation.
  assert ops["conv_general_dilated"]
  for ins, _, params, _ in ops["conv_general_dilated"]:
    assert ins == (jnp.bfloat16, jnp.bfloat16) and params["preferred_element_type"] == jnp.float32
  # Matmuls (ViT linears and attention, LPIPS' 1x1 heads, the spectral norm's mv): bf16 with
  # float32 accumulation. Float32 ones only where deliberate: the precision=HIGHEST resize to
  # DINO's 224 (autocast is off there in the reference) and sigma = dot(u, W v), a vector dot
  # that torch promotes to its widest (float32) input.
  highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
  for ins, _, params, eqn in ops.get("dot_general", []):
    if ins == (jnp.bfloat16, jnp.bfloat16):
      assert params["preferred_element_type"] == jnp.float32
    else:
      assert ins == (jnp.float32, jnp.float32)
      assert params["precision"] == highest or eqn.outvars[0].aval.ndim == 0, eqn
  if name.startswith("dino"):
    assert sum(ins == (jnp.bfloat16, jnp.bfloat16) for ins, *_ in ops["dot_general"]) >= 8
    grid_tokens = (4, SMALL_DINO.grid ** 2 + 1, SMALL_DINO.hidden_size)
    residual_adds = [e for *_, e in ops["add"] if e.outvars[0].aval.shape == grid_tokens]
    assert residual_adds and all(e.outvars[0].aval.dtype == jnp.float32 for e in residual_adds)
  # Norms (layer / batch norms, LPIPS' unit normalisation, the spectral norm's normalize) and
  # softmax in float32.
  for prim in ("rsqrt", "sqrt", "exp", "reduce_max"):
    assert all(ins[0] == jnp.float32 for ins, *_ in ops.get(prim, [])), prim
  assert ops.get("rsqrt") or ops.get("sqrt")
  assert jax.eval_shape(fn, state, images).dtype == jnp.float32


@pytest.mark.parametrize("name", list(GAN_NETS))
def test_native_policy_leaves_lpips_and_discriminators_untouched(name):
  build, call = GAN_NETS[name]
  model = set_precision(set_precision(build(), BF16), Precision())
  fn, state = merged_in_trace(model, call)
  images = gan_images()
  jaxpr = jax.make_jaxpr(fn)(state, images).jaxpr
  assert not [e for e in eqns(jaxpr) for v in e.outvars if v.aval.dtype == jnp.bfloat16]
  np.testing.assert_array_equal(np.asarray(call(model, images)), np.asarray(call(build(), images)))


def test_batch_norms_of_a_bf16_input():
  """What a bf16 conv output means to the norms (see disc_layers): BatchNorm (torch's
  batch_norm, on neither autocast list) computes in float32 and returns bf16; BatchNormLocal
  returns float32 like the reference's x.float()."""
  x = jax.random.normal(jax.random.key(0), (8, 5, 6)).astype(jnp.bfloat16)
  bn, bn_f32 = BatchNorm(6, rngs=nnx.Rngs(0)), BatchNorm(6, rngs=nnx.Rngs(0))
  y = bn(x)
  assert y.dtype == jnp.bfloat16 and bn.mean[...].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(y), np.asarray(bn_f32(x.astype(jnp.float32)).astype(jnp.bfloat16)))
  np.testing.assert_array_equal(np.asarray(bn.var[...]), np.asarray(bn_f32.var[...]))
  local = BatchNormLocal(6, virtual_bs=4, rngs=nnx.Rngs(0))
  assert local(x).dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(local(x)), np.asarray(local(x.astype(jnp.float32))))


def test_spectral_norm_conv_under_autocast():
  """The power iteration runs as torch's autocast runs it (bf16 mv products, float32
  normalisation): its vectors stay float32 and within bf16 rounding of the native ones."""
  x = jax.random.normal(jax.random.key(0), (2, 7, 6))
  native = Conv1d(6, 5, 3, circular=True, spectral_norm=True, rngs=nnx.Rngs(0))
  cast = set_precision(Conv1d(6, 5, 3, circular=True, spectral_norm=True, rngs=nnx.Rngs(0)), BF16)
  y_native, y = native(x), cast(x)
  assert y.dtype == jnp.bfloat16 and y_native.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_native), rtol=3e-2, atol=3e-2)
  for vector in ("u", "v"):
    got, want = getattr(cast, vector)[...], getattr(native, vector)[...]
    assert got.dtype == jnp.float32
    assert not np.array_equal(np.asarray(got), np.asarray(want))  # bf16 products really ran
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-2)


# Measured (1-layer tiny tokenizer, LPIPS at 1/8 widths, frozen_nets' small DINO: 2 blocks, 64
# wide, 64 px; disc_start 0, 32 px images, batch 4, 2 steps), |bf16 - f32| / f32: loss 2.5e-4 /
# 1.3e-3, disc loss (hinge + LeCam) 2.4e-4 / 3.0e-3, generator adversarial loss 8.6e-4 /
# 2.1e-3. With 2-layer towers, self-correction and consistency regularisation on (3 steps): loss
# up to 7.2e-3, generator adversarial 2.0e-2, disc loss 3.3e-2 (its CR term, a squared
# difference of logits, carries the logits' bf16 error). A 1-block 32-wide DINO's mean logit is
# near 0 (0.07), and its generator adversarial loss differed by 1.5e-1 relative (1e-2 absolute).
CONVOLUTION = re.compile(r"stablehlo\.convolution.*: \(tensor<\S*x(\w+)>, tensor<\S*x(\w+)>\) "
                         r"-> tensor<\S*x(\w+)>")


def _tokenizer_gan_metrics(compute_dtype, steps=2, convolutions=False):
  c = tokenizer_config("tiny")
  c.model.encoder.num_layers = c.model.decoder.num_layers = 1
  c.disc.type = "dino"
  c.losses.update(disc_start=0, perceptual_weight=1.0)
  cfg = TokenizerConfig.from_dict(c.model)
  tx, disc_tx = recipe.make_optimizers(c, 100)
  trainer = recipe.TokenizerTrainer(
      Tokenizer(cfg, rngs=0), recipe.loss_config_from(c), tx,
      mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1]), disc_tx=disc_tx,
      perceptual=frozen_nets.random_perceptual(small=True),
      discriminator=frozen_nets.random_discriminator(c, small=True),
      precision=Precision.named(compute_dtype))
  state = trainer.init_state()
  images = np.asarray(gan_images())
  batch = {"image": images, "target": images, "t": 16, "max_tokens": 16,
           "decode_res": cfg.image_size, "noise_idx": -1}
  # Every convolution of the step (LPIPS and the discriminator heads, in the generator's
  # terms, the discriminator update and their backward passes): operand and result dtypes.
  convs = CONVOLUTION.findall(trainer.lower(state, batch).as_text()) if convolutions else None
  metrics = []
  for i in range(steps):
    state, m = trainer.step(state, batch)
    metrics.append({k: float(m[k]) for k in ("loss", "disc_loss", "generator_adv_loss")})
  return metrics, convs


def test_tokenizer_bf16_step_with_lpips_and_dino_close_to_float32():
  f32, _ = _tokenizer_gan_metrics("float32")
  bf16, bf16_convs = _tokenizer_gan_metrics("bfloat16", convolutions=True)
  # Forward: LPIPS' 13 VGG16 convs (both images in one batch) and the 3 heads x 3 convs of the
  # DINO discriminator in each of its 3 passes (generator term, real, fake), bf16 in, float32
  # accumulation. The backward's convs are bf16 as torch autocast's (models/precision.py,
  # 'Backward'): none runs in float32 (JAX's own derivative made 52 of these 92 float32).
  assert bf16_convs.count(("bf16", "bf16", "f32")) == sum(VGG16_CONVS_PER_STAGE) + 3 * 3 * 3
  assert set(bf16_convs) == {("bf16", "bf16", "f32"), ("bf16", "bf16", "bf16")}
  assert bf16_convs.count(("bf16", "bf16", "bf16")) >= sum(VGG16_CONVS_PER_STAGE)
  for name in ("loss", "disc_loss", "generator_adv_loss"):
    np.testing.assert_allclose([m[name] for m in bf16], [m[name] for m in f32],
                               rtol=LOSS_RTOL, err_msg=name)
  assert bf16 != f32
