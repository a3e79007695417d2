"""GPT model: parity with the reference's teacher-forced logits, RoPE, mask, GQA, loss, dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from gpt_helpers import forward, loaded_gpt, random_gpt

from detailflow_jax.models.gpt import GPT, PRESETS, Attention, GPTConfig, count_params
from detailflow_jax.models.keys import InitKeys
from detailflow_jax.models.rope import apply_rope, rope_table_2d

TF_LENGTHS = {"full": 28, "short": 9, "prefix": 3}


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
  return loaded_gpt(tmp_path_factory)


def test_rope_table_matches_reference(golden):
  table = rope_table_2d(32 // 4, 4, 64 // 4, 10000, cls_token_num=1)
  ref = golden["gpt_freqs_cis"]
  assert table.shape == ref.shape == (33, 8, 2)
  assert not table[0].any()  # class row is all zero (queries/keys zeroed there)
  # Our cos/sin are correctly rounded; torch's vectorised float32 ones are one ulp off for
  # ~6% of the entries here, so allow exactly one ulp and nothing more.
  np.testing.assert_array_max_ulp(table, ref, maxulp=1)
  assert np.mean(table == ref) > 0.9


def test_rope_rotates_interleaved_pairs_by_row_then_column():
  table = rope_table_2d(3, 2, 8, 10000, cls_token_num=1)
  x = jnp.ones((1, 7, 1, 8), jnp.float32)
  out = np.asarray(apply_rope(x, jnp.asarray(table)))
  assert not out[0, 0].any()
  # Position 1 + 2*row + col: channel pairs 0-1 turn with the row, pairs 2-3 with the column.
  pos = 1 + 2 * 2 + 1  # row 2, col 1
  angle_row, angle_col = 2 * 1.0, 1 * 1.0
  np.testing.assert_allclose(out[0, pos, 0, :2], [np.cos(angle_row) - np.sin(angle_row),
                                                   np.sin(angle_row) + np.cos(angle_row)], rtol=1e-5)
  np.testing.assert_allclose(out[0, pos, 0, 4:6], [np.cos(angle_col) - np.sin(angle_col),
                                                    np.sin(angle_col) + np.cos(angle_col)], rtol=1e-5)


def test_group_causal_mask_matches_reference(gpt, golden):
  np.testing.assert_array_equal(gpt.attention_mask(), golden["gpt_group_causal_mask"])


@pytest.mark.parametrize("name", sorted(TF_LENGTHS))
def test_teacher_forced_logits_match_reference(gpt, golden, name):
  tokens = golden["gpt_tf_tokens"][:, :TF_LENGTHS[name]]
  logits = forward(gpt, jnp.asarray(tokens), jnp.asarray(golden["gpt_tf_labels"]))
  ref = golden[f"gpt_tf_logits_{name}"]
  assert logits.shape == ref.shape and logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits), ref, rtol=0, atol=1e-4)


def test_special_tokens_inserted_after_causal_prefix(gpt, golden):
  tokens = jnp.asarray(golden["gpt_tf_tokens"][:, :9])
  labels = jnp.asarray(golden["gpt_tf_labels"])
  seq = np.asarray(gpt.embed_sequence(tokens, labels))
  c, g = gpt.config.causal_len, gpt.config.group_size
  assert seq.shape[1] == 1 + 9 + g - 1
  np.testing.assert_array_equal(seq[:, 0], np.asarray(gpt.cls_embedding.embedding_table(labels)))
  tok = np.asarray(gpt.tok_embeddings(tokens))
  np.testing.assert_array_equal(seq[:, 1:1 + c], tok[:, :c])
  np.testing.assert_array_equal(seq[0, 1 + c:c + g], np.asarray(gpt.special_embeddings()))
  np.testing.assert_array_equal(seq[:, c + g:], tok[:, c:])
  short = gpt.embed_sequence(tokens[:, :c - 1], labels)
  assert short.shape[1] == c  # below causal_num: no special tokens


def test_grouped_query_attention_equals_repeated_kv_heads():
  """n_kv_head < n_head: kv head j serves query heads j*r .. j*r+r-1 (repeat_interleave)."""
  gqa = random_gpt(seed=3, n_kv_head=2)
  cfg = gqa.config
  mha = random_gpt(seed=4, n_kv_head=None)
  hd, r = cfg.head_dim, cfg.n_head // cfg.num_kv_heads
  src, dst = nnx.to_flat_state(nnx.state(gqa)), dict(nnx.to_flat_state(nnx.state(mha)))
  for path, var in src:
    value = np.asarray(var[...])
    if path[-1] == "kernel" and "wqkv" in path:
      q, k, v = np.split(Attention.fuse_qkv(value), [cfg.dim, cfg.dim + cfg.num_kv_heads * hd], axis=1)
      repeat = lambda w: np.repeat(w.reshape(cfg.dim, cfg.num_kv_heads, hd), r, axis=1).reshape(cfg.dim, -1)
      value = Attention.group_qkv(np.concatenate([q, repeat(k), repeat(v)], axis=1), cfg.n_head, hd)
    dst[path][...] = value
  tokens = jax.random.randint(jax.random.key(1), (2, 15), 0, cfg.vocab_size)
  labels = jnp.array([1, 4])
  np.testing.assert_allclose(np.asarray(forward(gqa, tokens, labels)), np.asarray(forward(mha, tokens, labels)),
                             atol=1e-5)


def test_loss_is_mean_cross_entropy_with_valid_mask():
  model = random_gpt(seed=1)
  cfg = model.config
  targets = jax.random.randint(jax.random.key(2), (3, cfg.block_size), 0, cfg.vocab_size)
  labels = jnp.array([0, 2, 4])
  loss_fn = nnx.jit(lambda m, *a: m.loss(*a))
  loss, logits = loss_fn(model, targets[:, :-cfg.group_size], labels, targets)
  logits = np.asarray(logits, np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), nll.mean(), rtol=1e-5)
  valid = jnp.array([True, False, True])
  masked, _ = loss_fn(model, targets[:, :-cfg.group_size], labels, targets, valid)
  np.testing.assert_allclose(float(masked), nll[[0, 2]].mean(), rtol=1e-5)
  with pytest.raises(ValueError, match="logit positions"):
    model.loss(targets[:, :-cfg.group_size - 1], labels, targets)


def test_training_mode_dropout_is_keyed_and_label_drop_uses_null_class():
  model = random_gpt(seed=2, token_dropout_p=0.1, resid_dropout_p=0.1, ffn_dropout_p=0.1,
                     drop_path_rate=0.1, class_dropout_prob=0.5)
  tokens = jnp.ones((4, 12), jnp.int32)
  labels = jnp.array([0, 1, 2, 3])
  run = nnx.jit(lambda m, t, l, key, drop: m(t, l, key=key, drop_labels=drop))
  eval_logits = run(model, tokens, labels, None, None)
  train_a = run(model, tokens, labels, jax.random.key(7), None)
  train_b = run(model, tokens, labels, jax.random.key(7), None)
  np.testing.assert_array_equal(np.asarray(train_a), np.asarray(train_b))
  assert np.abs(np.asarray(train_a) - np.asarray(eval_logits)).max() > 1e-3
  forced = run(model, tokens, labels, None, jnp.array([True, False, True, False]))
  null = run(model, tokens, jnp.full((4,), model.config.num_classes), None, None)
  np.testing.assert_array_equal(np.asarray(forced)[[0, 2]], np.asarray(null)[[0, 2]])
  np.testing.assert_array_equal(np.asarray(forced)[[1, 3]], np.asarray(eval_logits)[[1, 3]])


def test_too_long_sequence_is_rejected():
  model = random_gpt(seed=0)
  with pytest.raises(ValueError, match="block_size"):
    model(jnp.zeros((1, model.config.block_size), jnp.int32), jnp.array([0]))


def test_presets_have_reference_sizes_and_gpt_l_parameter_count():
  assert PRESETS["GPT-B"] == (12, 12, 768) and PRESETS["GPT-L"] == (24, 16, 1024)
  assert PRESETS["GPT-XL"] == (36, 20, 1280) and PRESETS["GPT-XXL"] == (48, 24, 1536)
  assert PRESETS["GPT-XXXL"] == (48, 40, 2560) and PRESETS["GPT-1B"] == (22, 32, 2048)
  assert PRESETS["GPT-3B"] == (24, 32, 3200) and PRESETS["GPT-7B"] == (32, 32, 4096)
  cfg = GPTConfig.preset("GPT-L", vocab_size=8192, num_classes=1000, block_size=128, group_size=8)
  assert cfg.ffn_hidden == 2816
  model = nnx.eval_shape(lambda: GPT(cfg, rngs=InitKeys(0)))
  assert count_params(model) == 326_140_928  # the reference's count (manifest)


def test_from_reference_takes_dims_from_the_named_preset():
  config_json = dict(dim=64, n_layer=2, n_head=4, vocab_size=16, num_classes=3, block_size=32,
                     group_size=4, causal_num=None, model_type="c2i", max_seq_len=2048)
  cfg = GPTConfig.from_reference(config_json, {"gpt_model": "GPT-B"})
  assert (cfg.dim, cfg.n_layer, cfg.n_head) == (768, 12, 12)
  cfg = GPTConfig.from_reference(config_json, {"gpt_model": "custom",
                                               "gpt_model_dims": dict(dim=32, n_layer=1, n_head=2)})
  assert (cfg.dim, cfg.n_layer, cfg.n_head, cfg.vocab_size) == (32, 1, 2, 16)
  with pytest.raises(ValueError, match="not a known preset"):
    GPTConfig.from_reference(config_json, {"gpt_model": "custom"})
  with pytest.raises(ValueError, match="c2i"):
    GPTConfig.from_reference(dict(config_json, model_type="t2i"), {"gpt_model": "GPT-B"})


def test_params_carry_logical_axis_names():
  model = nnx.eval_shape(lambda: GPT(GPTConfig(dim=32, n_layer=1, n_head=2, vocab_size=8,
                                               num_classes=2, block_size=8, group_size=2), rngs=0))
  axes = {"/".join(map(str, p)): v.get_metadata().get("out_sharding")
          for p, v in nnx.to_flat_state(nnx.state(model))}
  assert axes["tok_embeddings/embedding"] == ("vocab", "embed")
  assert axes["cls_embedding/embedding_table/embedding"] == ("classes", "embed")
  assert axes["layers/0/attention/wqkv/kernel"] == ("embed", "kv_heads", None, None)
  assert axes["layers/0/feed_forward/w2/kernel"] == ("mlp", "embed")
  assert axes["output/kernel"] == ("embed", "vocab")
  assert all(v is not None for v in axes.values())
