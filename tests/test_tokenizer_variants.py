"""Config fields that change the math: causal decoder, no l2 codebook, REPA/global-token heads."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from detailflow_jax.models.quantizer import VectorQuantizer
from detailflow_jax.models.tokenizer import Tokenizer, TokenizerConfig
from detailflow_jax.models.vit import ViTConfig


def _small_config(**overrides):
  enc = ViTConfig(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, position_grid=4, patch_size=8)
  dec = dataclasses.replace(enc, patch_embedding=False)
  base = dict(encoder=enc, decoder=dec, image_size=32, max_image_size=32, min_image_size=32,
              num_latent_tokens=8, group_size=2, codebook_size=16, codebook_embed_dim=4)
  base.update(overrides)
  return TokenizerConfig(**base)


def _layer_norm(x, scale, bias, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def _numpy_layer(layer, x, blocked):
  """One SigLIP2 block in float64 numpy with an additive finfo.min mask (True = blocked)."""
  p = lambda m: (np.asarray(m.kernel[...], np.float64), np.asarray(m.bias[...], np.float64))
  ln = lambda m: (np.asarray(m.scale[...], np.float64), np.asarray(m.bias[...], np.float64))
  heads = layer.self_attn.num_heads
  h = _layer_norm(x, *ln(layer.layer_norm1), 1e-6)
  q, k, v = [h @ w + b for w, b in (p(layer.self_attn.q_proj), p(layer.self_attn.k_proj), p(layer.self_attn.v_proj))]
  split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(0, 2, 1, 3)
  q, k, v = split(q), split(k), split(v)
  scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]) + np.where(blocked, np.finfo(np.float32).min, 0.0)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  attn = (probs @ v).transpose(0, 2, 1, 3).reshape(x.shape)
  w, b = p(layer.self_attn.out_proj)
  x = x + attn @ w + b
  h = _layer_norm(x, *ln(layer.layer_norm2), 1e-6)
  w1, b1 = p(layer.mlp.fc1)
  w2, b2 = p(layer.mlp.fc2)
  u = h @ w1 + b1
  gelu = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
  return x + gelu @ w2 + b2


@pytest.mark.parametrize("causal_decoder", [False, True])
def test_decoder_mask_matches_numpy_reference(causal_decoder):
  cfg = _small_config(causal_decoder=causal_decoder)
  model = Tokenizer(cfg, rngs=3)
  z = jax.random.normal(jax.random.key(0), (2, 6, 32))  # 6 of 8 tokens, decoder space
  dec = model.decoder
  pixels = dec(z, 16)
  # Rebuild the same forward in numpy with the reference's rule for the mask.
  n, t = 4, 6
  blocked = np.zeros((n + t, n + t), bool)
  if causal_decoder:
    blocked[n:, :n] = True  # latents do not see patches; patches see everything
    for i in range(t):
      for j in range(t):
        blocked[n + i, n + j] = (j > i) if i < cfg.causal_len else (j // 2 > i // 2)
  pos = np.asarray(dec.visual_model.embeddings.positions(2, 2), np.float64)
  x = np.broadcast_to(np.asarray(dec.mask_token[...], np.float64) + pos, (2, n, 32))
  zz = np.asarray(z, np.float64) + np.asarray(dec.latent_pos_embed[:t], np.float64)
  h = np.concatenate([x, zz], 1)
  for layer in dec.visual_model.layers:
    h = _numpy_layer(layer, h, blocked)
  post = dec.visual_model.post_layernorm
  h = _layer_norm(h, np.asarray(post.scale[...]), np.asarray(post.bias[...]), 1e-6)
  out = h[:, :n] @ np.asarray(dec.to_pixel.kernel[...]) + np.asarray(dec.to_pixel.bias[...])
  out = out.reshape(2, 2, 2, 8, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 16, 3)
  np.testing.assert_allclose(pixels, out, atol=2e-4)


def test_causal_encoder_prefix_independence():
  """With the group-causal encoder, the first k codes do not depend on how many follow."""
  model = Tokenizer(_small_config(), rngs=1)
  images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
  full = model.encode(images).latents
  short = model.encode(images, 4).latents
  np.testing.assert_allclose(short, full[:, :4], atol=1e-5)
  non_causal = Tokenizer(_small_config(causal_encoder=False), rngs=1)
  assert not np.allclose(non_causal.encode(images, 4).latents, non_causal.encode(images).latents[:, :4], atol=1e-3)


def test_plain_codebook_without_l2():
  q = VectorQuantizer(3, 2, l2_norm=False, show_usage=False, rngs=nnx.Rngs(0))
  q.embedding[...] = jnp.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
  out = q(jnp.array([[[4.0, 0.0], [6.0, 0.0], [1.0, 9.0]]]))
  np.testing.assert_array_equal(out.indices, [[0, 1, 2]])
  np.testing.assert_allclose(out.quant, [[[0, 0], [10, 0], [0, 10]]])


def test_repa_and_global_token_heads():
  teacher = ViTConfig(hidden_size=24, num_layers=1, num_heads=2, mlp_dim=48, position_grid=2, patch_size=8)
  cfg = _small_config(repa=True, global_token_loss_weight=1.0, teacher=teacher, repa_proj_dim=16,
                      global_token_hidden=20)
  model = Tokenizer(cfg, rngs=0)
  assert model.projection.layers[2].kernel.shape == (16, 24)
  assert model.global_token_proj.layers[0].kernel.shape == (4, 20)
  images = jnp.zeros((1, 32, 32, 3))
  assert model.repa_model(images).shape == (1, 16, 24)
  z = model.post_quant_conv(model.encode(images).quant)
  pixels, hidden = model.decoder(z, 32, capture_layer=0)
  assert pixels.shape == (1, 32, 32, 3) and hidden.shape == (1, 16, 32)
  with pytest.raises(ValueError, match="teacher"):
    _small_config(repa=True)
