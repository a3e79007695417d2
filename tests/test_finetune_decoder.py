"""Decoder-only fine-tune (the reference's --finetune-decoder): after steps, the encoder, the
quantizer's codebook and every other non-decoder parameter are bit-identical; the decoder and
post_quant_conv change."""
import jax
import numpy as np
import pytest
from flax import nnx

from configs.detailflow16_tokenizer import get_config
from detailflow_jax.models.tokenizer import Tokenizer, TokenizerConfig
from detailflow_jax import sharding as mesh_lib
from detailflow_jax.train import tokenizer as recipe
from detailflow_jax.train.optim import train_only


def flat(tree):
  return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(tree)}


def test_only_the_decoder_trains():
  c = get_config("tiny")
  c.model.encoder.num_layers = 1
  c.model.decoder.num_layers = 1
  cfg = TokenizerConfig.from_dict(c.model)
  tx, _ = recipe.make_optimizers(c, 10)
  trainer = recipe.TokenizerTrainer(Tokenizer(cfg, rngs=0), recipe.loss_config_from(c),
                                    train_only(tx, recipe.decoder_finetune_trainable),
                                    mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  state = trainer.init_state()
  before = flat(state.params)
  rng = np.random.default_rng(0)
  for step in range(3):
    images = rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    batch = {"image": images, "target": images, "t": 16, "max_tokens": 16, "decode_res": 32,
             "noise_idx": 2}  # self-correction on: the refine path's parameters stay fixed too
    state, metrics = trainer.step(state, batch, step)
    assert np.isfinite(float(metrics["loss"]))
  after = flat(state.params)
  trained = {n for n in before if n.split("/")[0] in ("decoder", "post_quant_conv")}
  assert trained and any(n.startswith("quantize/") for n in before)
  assert any(n.startswith("encoder/") for n in before) and any(n.startswith("refine_conv/") for n in before)
  for name in before:
    if name in trained:
      assert not np.array_equal(after[name], before[name]), name
    else:
      np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_finetune_decoder_needs_init_from():
  c = get_config("tiny")
  c.finetune_decoder = True
  with pytest.raises(ValueError, match="finetune_decoder=True without init_from"):
    recipe.validate(c, 8)
