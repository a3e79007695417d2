"""Recipe options of the reference that the goldens do not exercise (issue 25), and values that
pin constants of the training recipe to the reference's formulas (each caught a one-line
mutation that passed every other training test; the table is in docs/training.md).

Every expected number is the reference's: either printed by the reference's own code
(ByteFlow-AI/DetailFlow @ c5f06cd under torch 2.13, the line cited beside it) or worked out from
the cited formula.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY

from configs.detailflow16_gpt_l import get_config as gpt_run_config
from detailflow_jax import sharding
from detailflow_jax.data.pipeline import MIX_PROB, token_dataset
from detailflow_jax.data.sources import TokenRecordSource, TokenRecordWriter
from detailflow_jax.models import gpt as gpt_model
from detailflow_jax.train import ar

# --- drop path (train_c2i.py --drop-path-rate) -----------------------------------------------------

def test_drop_path_rates_are_the_references_linspace_to_the_bit():
  # autoregressive/models/gpt.py Transformer.__init__: dpr = [x.item() for x in
  # torch.linspace(0, config.drop_path_rate, config.n_layer)]; values printed by torch 2.13.
  rates = gpt_model.drop_path_rates(0.1, 24)
  assert rates[0] == 0.0 and rates[1] == 0.004347826354205608 and rates[12] == 0.052173912525177
  assert rates[21] == 0.09130434691905975 and rates[23] == 0.10000000149011612
  rates = gpt_model.drop_path_rates(0.2, 36)
  assert rates[7] == 0.03999999910593033 and rates[18] == 0.10285715013742447
  assert rates[29] == 0.165714293718338
  assert gpt_model.drop_path_rates(0.3, 1) == [0.0] and gpt_model.drop_path_rates(0.3, 0) == []
  cfg = gpt_model.GPTConfig(dim=16, n_layer=3, n_head=2, vocab_size=8, block_size=8, group_size=2,
                            num_classes=4, drop_path_rate=0.05)
  assert [b.drop_path for b in gpt_model.GPT(cfg, rngs=0).layers] == [0.0, 0.02500000037252903,
                                                                      0.05000000074505806]


def test_drop_path_drops_whole_examples_and_scales_the_kept_by_one_over_keep():
  # utils/drop_path.py: mask [B, 1, ...] ~ Bernoulli(1 - p), x * mask.div_(1 - p).
  x = jnp.ones((4000, 3, 2), jnp.float32)
  out = np.asarray(gpt_model._drop_path(x, 0.3, gpt_model._DropKeys(jax.random.key(0))))
  per_example = out.reshape(len(out), -1)
  assert np.all(per_example == per_example[:, :1])  # one decision per example
  kept = per_example[:, 0] != 0
  # torch: torch.ones(1).div_(0.7).item() == 1.4285714626312256
  assert np.all(per_example[kept, 0] == np.float32(1.4285714626312256))
  assert abs(kept.mean() - 0.7) < 0.025


def test_drop_path_turns_residual_and_ffn_dropout_off_as_the_reference():
  # train_c2i.py: `if args.drop_path_rate > 0.0: dropout_p = 0.0` for resid and FFN dropout.
  c = gpt_run_config("tiny")
  c.model.drop_path_rate = 0.1
  with pytest.raises(ValueError, match=r"model.drop_path_rate=0.1 with model.resid_dropout_p=0.1"):
    ar.validate(c, 8)
  c.model.update(resid_dropout_p=0.0, ffn_dropout_p=0.0)
  cfg = ar.validate(c, 8)
  assert cfg.drop_path_rate == 0.1 and cfg.resid_dropout_p == cfg.ffn_dropout_p == 0.0
  # The step draws block keys for drop path alone, and the loss then depends on them.
  loss_fn = ar.make_loss(cfg, 0.0)
  model = gpt_model.GPT(cfg, rngs=0)
  # The output layer starts at 0 (as the reference's): random values make the loss see h.
  kernel = model.output.kernel
  kernel[...] = 0.05 * jax.random.normal(jax.random.key(2), kernel[...].shape)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (8, cfg.block_size)), jnp.int32)
  batch = {"tokens": tokens, "labels": jnp.arange(8, dtype=jnp.int32) % cfg.num_classes}
  draws = loss_fn.draw(jax.random.key(1), batch)
  assert draws.block_key is not None
  plain = dict(draws.__dict__, block_key=None)
  with_path = loss_fn(model, batch, draws)[0]
  without = loss_fn(model, batch, ar.GPTDraws(**plain))[0]
  assert float(with_path) != float(without)


# --- the ten_crop_105 code mix (dataset/imagenet.py CustomDataset) ------------------------------

def _records(directory, value: int, n: int, labels=None, views: int = 10, tokens: int = 4):
  directory.mkdir(parents=True, exist_ok=True)
  with TokenRecordWriter(directory) as w:
    for i in range(n):
      # view v of image i holds value*1000 + 10*v + 0..3: the source and the view read back.
      codes = value * 1000 + 10 * np.arange(views)[:, None, None] + np.arange(tokens)[None, :, None]
      w.write(codes.astype(np.int32), int(i % 5 if labels is None else labels[i]))
  return directory


def test_ten_crop_105_mix_reads_the_second_codes_half_the_time(tmp_path):
  n = 400
  base, mixed = _records(tmp_path / "ten_crop", 1, n), _records(tmp_path / "ten_crop_105", 2, n)
  # CustomDataset.__getitem__: `if self.aug_feature_dir is not None and torch.rand(1) < 0.5`.
  assert MIX_PROB == 0.5
  ds = token_dataset(TokenRecordSource(base), batch_size=n, seed=3, shuffle=False,
                     mix=TokenRecordSource(mixed))
  batch = ds[0]
  source = batch["tokens"][:, 0] // 1000
  view = (batch["tokens"][:, 0] % 1000) // 10
  assert set(np.unique(source)) == {1, 2} and abs((source == 2).mean() - 0.5) < 0.07
  assert set(np.unique(view)) == set(range(10))  # then one of the 10 views, uniformly
  np.testing.assert_array_equal(batch["labels"], np.arange(n) % 5)
  np.testing.assert_array_equal(ds[0]["tokens"], batch["tokens"])  # a function of the seed
  # Without the mix: data.path alone.
  alone = token_dataset(TokenRecordSource(base), batch_size=n, seed=3, shuffle=False)[0]
  assert set(np.unique(alone["tokens"][:, 0] // 1000)) == {1}


def test_ten_crop_105_mix_must_hold_the_same_images(tmp_path):
  base = _records(tmp_path / "a", 1, 20)
  with pytest.raises(ValueError, match="the mixed codes hold 19 records, data.path 20"):
    token_dataset(TokenRecordSource(base), batch_size=4, mix=TokenRecordSource(_records(tmp_path / "b", 2, 19)))
  other = _records(tmp_path / "c", 2, 20, labels=[7] * 20)
  ds = token_dataset(TokenRecordSource(base), batch_size=20, shuffle=False, mix=TokenRecordSource(other))
  with pytest.raises(ValueError, match="label 7 in the mixed codes"):
    ds[0]
  # The run config: both record sets need a codes.json, and they must agree but for the crop.
  c = gpt_run_config("tiny")
  c.data.update(path=str(base), mix_path=str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="data.mix_path=.*does not exist"):
    ar.check_mix_path(c)
  c.data.mix_path = str(other)
  with pytest.raises(ValueError, match="data.mix_path needs a codes.json"):
    ar.check_mix_path(c)
  meta = {"tokenizer": {"codebook_size": 64}, "ar_image_size": 64, "ar_token_num": 4, "views": 10,
          "self_correction": False, "num_images": 20, "crop_range": 1.1}
  (base / "codes.json").write_text(json.dumps(meta))
  (other / "codes.json").write_text(json.dumps(dict(meta, crop_range=1.05)))
  ar.check_mix_path(c)
  (other / "codes.json").write_text(json.dumps(dict(meta, ar_token_num=8)))
  with pytest.raises(ValueError, match="differs from data.path's in ar_token_num"):
    ar.check_mix_path(c)


# --- extraction from the tokenizer's EMA (extract_codes_c2i.py --vq-ema) ------------------------

def test_extraction_takes_the_ema_weights_when_asked(tmp_path, monkeypatch):
  """load_vq_model(ema=True) encodes with checkpoint['ema']: the records of
  extract.tokenizer_weights='ema' are those of a tokenizer converted from the 'ema' state dict,
  and differ from the 'model' weights' records."""
  from detailflow_jax.convert.tokenizer import convert_tokenizer
  from detailflow_jax.train.extract import extract
  monkeypatch.setenv("DETAILFLOW_JAX_CACHE", str(tmp_path / "cache"))
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  c = gpt_run_config("tiny")
  c.extract.update(num_images=2, chunk_size=2, per_device_batch=2)

  def records(source, weights, name):
    c.extract.tokenizer_weights = weights
    out = extract(c, source, tmp_path / name, mesh=mesh)
    src = TokenRecordSource(out)
    return [src[i]["tokens"] for i in range(len(src))], json.loads((out / "codes.json").read_text())

  ema_dir = tmp_path / "ema_converted"
  convert_tokenizer(TINY / "tokenizer" / "checkpoints" / "tokenizer.pt", ema_dir, weights="ema")
  asked, meta = records(TINY / "tokenizer", "ema", "asked")
  assert meta["tokenizer_weights"] == "ema"
  converted, meta = records(ema_dir, "", "converted")
  assert "tokenizer_weights" not in meta
  for a, b in zip(asked, converted, strict=True):
    np.testing.assert_array_equal(a, b)
  model, _ = records(TINY / "tokenizer", "model", "model")
  assert any(not np.array_equal(a, b) for a, b in zip(asked, model))
  with pytest.raises(ValueError, match="extract.tokenizer_weights='ema'.*already converted"):
    records(ema_dir, "ema", "again")
  with pytest.raises(ValueError, match="extract.tokenizer_weights='best'"):
    records(ema_dir, "best", "bad")


# --- constants of the recipe pinned to the reference (the mutation audit, docs/training.md) -----

def test_entropy_loss_is_the_references_value():
  """modelling/quantizers/vq.py: entropy_loss = entropy_loss_ratio * compute_entropy_loss(-d)
  (temperature 0.01, sample entropy minus the mean distribution's). Expected values: the
  reference's VectorQuantizer(16, 4, beta 0.25, entropy_loss_ratio 0.1, l2_norm) in train mode
  on these inputs, torch 2.13 float32."""
  from flax import nnx

  from detailflow_jax.models.quantizer import VectorQuantizer
  rng = np.random.default_rng(0)
  table = rng.uniform(-1 / 16, 1 / 16, (16, 4)).astype(np.float32)
  z = jnp.asarray(rng.normal(size=(2, 6, 4)).astype(np.float32))
  q = VectorQuantizer(16, 4, beta=0.25, entropy_loss_ratio=0.1, show_usage=False, rngs=nnx.Rngs(0))
  q.embedding[...] = jnp.asarray(table)
  losses = q.losses(q(z))
  np.testing.assert_allclose(float(losses["entropy_loss"]), -0.20740270614624023, rtol=1e-5)
  np.testing.assert_allclose(float(losses["vq_loss"]), 0.11080357432365417, rtol=1e-5)
  np.testing.assert_allclose(float(losses["commit_loss"]), 0.027700893580913544, rtol=1e-5)
  # d(entropy_loss)/dz: its norm, as torch's backward gives it.
  grad = jax.grad(lambda z: q.losses(q(z))["entropy_loss"])(z)
  np.testing.assert_allclose(float(jnp.linalg.norm(grad)), 0.06744889914989471, rtol=1e-4)


def test_diff_augment_draw_ranges_are_the_references():
  """utils/diff_aug.py: rand_translation(ratio=0.125) shifts by randint(-s, s + 1) with
  s = int(side * 0.125 + 0.5); rand_cutout(ratio) centres by randint(0, side + (1 - c % 2)),
  c = int(side * ratio + 0.5). The draws are made here (the goldens feed them in), so their
  ranges are pinned here: every value of the range, and nothing outside it."""
  from detailflow_jax.train import gan
  for side, shift, cutout_high in ((32, 4, 32), (24, 3, 24), (20, 3, 20)):
    d = gan.draw_augment(jax.random.key(side), "color,translation,cutout_0.2", 4096, side, side)
    for values in (d.translation_x, d.translation_y):
      assert set(np.unique(np.asarray(values))) == set(range(-shift, shift + 1)), side
    for values in (d.cutout_x, d.cutout_y):  # c = 6 / 5 / 4: side + 1 / side / side + 1 values
      c = int(side * 0.2 + 0.5)
      assert set(np.unique(np.asarray(values))) == set(range(side + (1 - c % 2))), side
    assert max(np.asarray(d.cutout_x)) == cutout_high - (c % 2)
    assert d.gate_u.shape == (3,)
  # The key-taking forms default to the reference's ratios: 0.125 translation, 0.2 cutout.
  x = jnp.ones((512, 16, 16, 1), jnp.float32)
  cut = np.asarray(gan.rand_cutout(x, jax.random.key(0)))
  assert set(np.unique((cut == 0).reshape(512, -1).sum(axis=1))) >= {9}  # int(16 * 0.2 + 0.5)^2 = 3 x 3
  assert (cut == 0).reshape(512, -1).sum(axis=1).max() == 9
  moved = np.asarray(gan.rand_translation(x, jax.random.key(1)))
  empty = moved[..., 0] == 0
  # s = int(16 * 0.125 + 0.5) = 2: up to 2 rows and 2 columns uncovered, each count drawn.
  assert set(np.unique(empty.all(axis=2).sum(axis=1))) == {0, 1, 2}
  assert set(np.unique(empty.all(axis=1).sum(axis=1))) == {0, 1, 2}


def test_tokenizer_optimizers_clip_at_max_grad_norm_as_torch():
  """train_tokenizer.py: clip_grad_norm_(params, max_grad_norm) before each Adam step (both the
  tokenizer's and the discriminator's): every gradient times min(1, max_norm / (norm + 1e-6)).
  The golden step cannot see the factor in the updated weights (Adam's first step is
  g / |g| whatever g's scale), so it is read here from Adam's first moment, (1 - beta1) x the
  clipped gradient."""
  import optax

  from configs.detailflow16_tokenizer import get_config as tokenizer_run_config
  from detailflow_jax.train import tokenizer as recipe
  c = tokenizer_run_config("tiny")
  assert c.optimizer.max_grad_norm == 1.0
  _, disc_tx = recipe.make_optimizers(c, 100)
  for norm in (10.0, 0.5):
    grads = {"a": jnp.full((3, 4), norm / np.sqrt(24.0), jnp.float32),
             "b": jnp.full((12,), -norm / np.sqrt(24.0), jnp.float32)}
    params = jax.tree.map(jnp.zeros_like, grads)
    _, opt_state = disc_tx.update(grads, disc_tx.init(params), params)
    mu = optax.tree_utils.tree_get(opt_state, "mu")
    factor = min(1.0, c.optimizer.max_grad_norm / (norm + 1e-6))
    for k in grads:
      np.testing.assert_allclose(np.asarray(mu[k]), (1 - c.optimizer.b1) * factor * np.asarray(grads[k]),
                                 rtol=2e-6)
