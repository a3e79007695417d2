"""Code extraction (ten-crop/flip views, self-correction triples, resumable) and the tiny AR
run on the extracted records dropping well below the tokens' unigram entropy."""
import json
import logging

import numpy as np
import pytest

from configs.detailflow16_gpt_l import get_config
from detailflow_jax.data.sources import ProceduralShapes, TokenRecordSource
from detailflow_jax.train import ar
from detailflow_jax.train.extract import CodeEncoder, extract, ten_crops, views_of


def test_ten_crops_layout():
  img = np.arange(6 * 8).reshape(6, 8, 1)
  crops = ten_crops(img, 4)
  assert crops.shape == (10, 4, 4, 1)
  np.testing.assert_array_equal(crops[0], img[:4, :4])
  np.testing.assert_array_equal(crops[3], img[2:, 4:])
  np.testing.assert_array_equal(crops[4], img[1:5, 2:6])
  np.testing.assert_array_equal(crops[5], img[:4, :4][:, ::-1])
  shapes = ProceduralShapes(4, 80, 4)[0]["image"]
  assert views_of(shapes, 64, True, 1.1).shape == (10, 64, 64, 3)
  two = views_of(shapes, 64, False, 1.1)
  np.testing.assert_array_equal(two[1], two[0][:, ::-1])


def test_code_encoder_compiles_once_for_every_noise_index(tokenizer, golden_images_nhwc):
  """Per-image noise indices are traced: many batches, one compile; row b of a per-image call
  equals row b of a call with that image's index for the whole batch (same key)."""
  import jax
  images = np.asarray(golden_images_nhwc)
  m = tokenizer.config.num_latent_tokens
  encoder = CodeEncoder(tokenizer, m, self_correction=True)
  key = jax.random.key(0)
  per_index = {i: np.asarray(encoder(images, np.full(len(images), i), key)) for i in (0, 2, 4, 8)}
  mixed = np.asarray(encoder(images, np.array([2, 8]), key))
  assert encoder.trace_count == 1
  np.testing.assert_array_equal(mixed[0], per_index[2][0])
  np.testing.assert_array_equal(mixed[1], per_index[8][1])
  for i, codes in per_index.items():
    assert codes.shape == (len(images), m, 3)
    span = 1 if i < tokenizer.config.causal_len else tokenizer.config.group_size
    np.testing.assert_array_equal(codes[:, :i + span, 2], codes[:, :i + span, 0])  # targets = clean
  clean = CodeEncoder(tokenizer, m, self_correction=False)
  out = np.asarray(clean(images, np.zeros(len(images)), key))
  np.testing.assert_array_equal(out[..., 0], per_index[0][..., 0])
  assert out.shape[-1] == 1 and clean.trace_count == 1


@pytest.fixture(scope="module")
def extracted(tokenizer_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("codes")
  c = get_config("tiny")
  c.extract.update(num_images=128, chunk_size=64)
  extract(c, tokenizer_dir, out)
  return c, out


def test_records_hold_triples_for_every_view(extracted, tokenizer):
  c, out = extracted
  meta = json.loads((out / "codes.json").read_text())
  assert meta["ar_token_num"] == 32 and meta["views"] == 2 and meta["self_correction"]
  src = TokenRecordSource(out)
  assert len(src) == 128
  shapes = ProceduralShapes(c.extract.num_classes, 64, 128, c.extract.seed)
  first = src[0]
  tokens = np.asarray(first["tokens"]).reshape(-1, 32, 3)
  assert first["label"] == shapes[0]["label"]
  # The clean codes are exactly the tokenizer's codes of the centre crop (view 0).
  from detailflow_jax.data.transforms import to_float
  import jax.numpy as jnp
  clean = tokenizer.encode(jnp.asarray(to_float(shapes[0]["image"])[None])).indices
  all_views = np.asarray(tokens)
  assert any(np.array_equal(all_views[v, :, 0], np.asarray(clean[0])) for v in range(all_views.shape[0]))
  # Labels equal clean codes up to the end of the perturbed span, inputs differ somewhere there.
  for v in range(all_views.shape[0]):
    diff = np.nonzero(all_views[v, :, 0] != all_views[v, :, 1])[0]
    if diff.size:
      assert np.array_equal(all_views[v, : diff[0], 2], all_views[v, : diff[0], 0])


def test_extraction_resumes_without_redoing_chunks(extracted, tokenizer_dir, caplog):
  c, out = extracted
  before = {p.name: p.read_bytes() for p in out.glob("*.array_record")}
  (out / sorted(before)[1]).unlink()
  with caplog.at_level(logging.INFO, logger="detailflow_jax"):
    extract(c, tokenizer_dir, out)
  assert "already on disk" in caplog.text
  after = {p.name: p.read_bytes() for p in out.glob("*.array_record")}
  assert after == before  # the rebuilt chunk is identical


def test_tiny_ar_run_learns_below_unigram_entropy(extracted, tokenizer_dir, tmp_path):
  c, out = extracted
  src = TokenRecordSource(out)
  targets = np.concatenate([np.asarray(src[i]["tokens"])[..., 2].ravel() for i in range(len(src))])
  p = np.bincount(targets, minlength=64) / targets.size
  unigram = float(-(p[p > 0] * np.log(p[p > 0])).sum())
  c.data.path = str(out)
  c.total_steps = 200
  c.log_every = 25
  c.sample_every = 200
  c.tokenizer_dir = str(tokenizer_dir)
  ar.train(c, tmp_path / "run")
  rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  final = np.mean([r["loss"] for r in rows[-2:]])
  assert final < 0.6 * unigram, (final, unigram)
  assert (tmp_path / "run" / "export" / "config.json").is_file()
  from PIL import Image
  grid = np.asarray(Image.open(tmp_path / "run" / "samples" / "step_0000200.png"))
  assert grid.shape[0] > 8 * 64  # one row per class, decoded after every group
