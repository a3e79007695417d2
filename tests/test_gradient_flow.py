"""Where each loss term's gradient goes, against the reference's detach() calls
(modelling/quantizers/vq.py, losses/vq_loss.py, train/train_tokenizer.py):

  codebook loss   ||zq - z.detach()||^2       -> the codebook only
  commitment      ||zq.detach() - z||^2       -> the encoder side only (never the codebook)
  quantized code  z + (zq - z).detach()       -> straight through to the encoder, not the codebook
  entropy         on -d (not detached)        -> both
  frozen nets     (SigLIP2 teacher, DINO backbone, LPIPS) -> nothing, and outside the optimized set
  discriminator   on reconstructions.detach() -> its update leaves the generator alone
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs.detailflow16_tokenizer import get_config
from detailflow_jax import sharding as mesh_lib
from detailflow_jax.models.frozen import Frozen
from detailflow_jax.models.quantizer import VectorQuantizer
from detailflow_jax.models.tokenizer import Tokenizer, TokenizerConfig
from detailflow_jax.train import frozen_nets
from detailflow_jax.train import tokenizer as recipe


def _quantizer():
  return VectorQuantizer(16, 4, beta=0.25, entropy_loss_ratio=0.1, rngs=nnx.Rngs(0))


def _quantizer_grads(term):
  """d term / d codebook and d term / d (pre-quantization) z."""
  q = _quantizer()
  z = jax.random.normal(jax.random.key(1), (2, 6, 4))
  graphdef, params, rest = nnx.split(q, nnx.Param, ...)

  def f(params, z):
    m = nnx.merge(graphdef, params, rest)
    out = m(z)
    if term == "quant":
      return jnp.sum(out.quant * jnp.arange(4.0))
    return m.losses(out)[term]

  g_params, g_z = jax.grad(f, argnums=(0, 1))(params, z)
  return np.abs(np.asarray(g_params["embedding"][...])).max(), np.abs(np.asarray(g_z)).max()


def test_codebook_loss_moves_the_codebook_only():
  codebook, z = _quantizer_grads("vq_loss")
  assert codebook > 1e-4 and z == 0.0


def test_commitment_loss_moves_the_encoder_side_only():
  codebook, z = _quantizer_grads("commit_loss")
  assert codebook == 0.0 and z > 1e-4


def test_straight_through_codes_pass_gradients_to_z_not_the_codebook():
  codebook, z = _quantizer_grads("quant")
  assert codebook == 0.0 and z > 1e-4


def test_entropy_loss_reaches_both_sides():
  codebook, z = _quantizer_grads("entropy_loss")
  assert codebook > 0.0 and z > 0.0


# --- the whole tokenizer: which parameter groups each term reaches ----------------------------

@pytest.fixture(scope="module")
def tokenizer_with_teacher():
  c = get_config("tiny")
  c.model.encoder.num_layers = 1
  c.model.decoder.num_layers = 1
  c.model.teacher = dict(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, position_grid=4,
                          patch_size=8)
  c.model.global_token_loss_weight = 1.0
  return Tokenizer(TokenizerConfig.from_dict(c.model), rngs=0)


def _group(path) -> str:
  """Top-level part of the tokenizer a parameter belongs to ('quantize' = the codebook)."""
  return str(path[0].key if hasattr(path[0], "key") else path[0])


TERMS = ("rec_loss", "vq_loss", "commit_loss", "global_token_loss")


@pytest.fixture(scope="module")
def reached(tokenizer_with_teacher):
  """term -> the parameter groups (encoder, quantize, decoder, repa_model, ...) with a non-zero
  gradient of it, over ALL parameters, frozen ones included (one compiled function)."""
  model = tokenizer_with_teacher
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  t = model.config.num_latent_tokens

  def term(params, name):
    m = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))
    out = m.train_forward(images, images, jax.random.key(1), num_tokens=t, max_tokens=t,
                          decode_res=32)
    if name == "rec_loss":
      return jnp.mean(jnp.square(out.recon - out.target))
    return out.losses[name]

  grads = jax.jit(lambda p: {n: jax.grad(term)(p, n) for n in TERMS})(params)
  out = {}
  for name in TERMS:
    out[name] = {_group(path) for path, g in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads[name]))
                 if np.abs(np.asarray(g)).max() > 0}
  return out


def test_each_term_reaches_only_what_the_reference_allows(reached):
  encoder_side = {"encoder", "quant_conv"}
  # Reconstruction: decoder, and through the straight-through estimator the encoder; the
  # codebook gets nothing from it.
  rec = reached["rec_loss"]
  assert {"decoder", "post_quant_conv"} <= rec and encoder_side <= rec
  assert "quantize" not in rec and "repa_model" not in rec
  assert reached["vq_loss"] == {"quantize"}
  assert reached["commit_loss"] == encoder_side
  # Global-token alignment: the projection MLP and the encoder side; the teacher is detached.
  glob = reached["global_token_loss"]
  assert "global_token_proj" in glob and encoder_side <= glob
  assert "repa_model" not in glob and "decoder" not in glob


def test_frozen_networks_are_outside_the_optimized_parameters(tokenizer_with_teacher):
  _, params, frozen, _ = recipe.split_trainable(tokenizer_with_teacher)
  groups = lambda tree: {_group(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(tree))}
  assert groups(frozen) == {"repa_model"} and "repa_model" not in groups(params)
  c = get_config("tiny")
  c.disc.type = "dino"
  disc = frozen_nets.random_discriminator(c, small=True)
  _, d_params, d_frozen, _ = nnx.split(disc, recipe.TRAINABLE, Frozen, ...)
  assert groups(d_frozen) == {"backbone"} and "backbone" not in groups(d_params)


def test_the_discriminator_update_leaves_the_generator_alone():
  """A GAN step with the generator's optimizer switched off: the discriminator trains, no
  tokenizer parameter moves (its loss sees detached reconstructions). The opposite direction
  (generator steps never move the discriminator) is the pre-disc_start part of
  test_tokenizer_training_rules.py."""
  c = get_config("tiny")
  c.disc.type = "patchgan"
  c.model.encoder.num_layers = 1
  c.model.decoder.num_layers = 1
  c.losses.update(disc_start=0, use_diff_aug=False)
  _, disc_tx = recipe.make_optimizers(c, 10)
  trainer = recipe.TokenizerTrainer(
      Tokenizer(TokenizerConfig.from_dict(c.model), rngs=0), recipe.loss_config_from(c),
      optax.set_to_zero(), mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1]),
      discriminator=frozen_nets.build_discriminator(c), disc_tx=disc_tx)
  state = trainer.init_state()
  params0, disc0 = jax.device_get((state.params, state.disc_params))
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  batch = {"image": images, "target": images, "noise_idx": -1, "t": 16, "max_tokens": 16,
           "decode_res": 32}
  state, metrics = trainer.step(state, batch)
  assert float(metrics["disc_grad_norm"]) > 0 and float(metrics["grad_norm"]) > 0
  for a, b in zip(jax.tree.leaves(params0), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert any(not np.array_equal(a, np.asarray(b))
             for a, b in zip(jax.tree.leaves(disc0), jax.tree.leaves(state.disc_params)))
