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


def _encoder(tokenizer, devices: int, self_correction: bool = True, precision: str = "float32"):
  import jax

  from detailflow_jax import sharding
  from detailflow_jax.models.precision import Precision
  return CodeEncoder(tokenizer, tokenizer.config.num_latent_tokens, self_correction,
                     mesh=sharding.make_mesh(devices=jax.devices()[:devices]),
                     precision=Precision.named(precision))


def _image_and_flip(images_nhwc):
  return np.stack([images_nhwc, images_nhwc[:, :, ::-1]], axis=1)  # [B, 2 views, H, W, 3]


def test_code_encoder_compiles_once_for_every_noise_index(tokenizer, golden_images_nhwc):
  """Per-image noise indices are traced: many batches, one compile (on a 2-device mesh, one
  image per device); row b of a mixed call equals row b of a call with that image's index for
  the whole batch, and image b encoded alone (1 device) equals its row: a record depends on
  its image, noise index and image index only."""
  images = _image_and_flip(np.asarray(golden_images_nhwc))
  m = tokenizer.config.num_latent_tokens
  encoder = _encoder(tokenizer, 2)
  rows = np.array([5, 9])  # image indices: the keys of their random top-k codes
  per_index = {i: encoder(images, np.full(len(images), i), rows) for i in (0, 2, 4, 8)}
  mixed = encoder(images, np.array([2, 8]), rows)
  assert encoder.trace_count == 1
  np.testing.assert_array_equal(mixed[0], per_index[2][0])
  np.testing.assert_array_equal(mixed[1], per_index[8][1])
  alone = _encoder(tokenizer, 1)(images[1:], np.array([8]), rows[1:])
  np.testing.assert_array_equal(alone[0], mixed[1])
  for i, codes in per_index.items():
    assert codes.shape == (len(images), 2, m, 3)
    span = 1 if i < tokenizer.config.causal_len else tokenizer.config.group_size
    np.testing.assert_array_equal(codes[..., :i + span, 2], codes[..., :i + span, 0])  # targets = clean
  assert not np.array_equal(mixed[..., 1], mixed[..., 0])  # the inputs were perturbed
  clean = _encoder(tokenizer, 2, self_correction=False)
  out = clean(images, np.zeros(len(images)), rows)
  np.testing.assert_array_equal(out[..., 0], per_index[0][..., 0])
  assert out.shape == (len(images), 2, m, 1) and clean.trace_count == 1


def test_precision_bfloat16_autocasts_the_encoder_matmuls(tokenizer, golden_images_nhwc):
  """bf16 (the reference's autocast): every matmul but the deliberate float32 HIGHEST ones
  (VQ distances, position-table resize) takes bf16 inputs and accumulates in float32;
  float32: no bf16 anywhere in the program."""
  import jax
  import jax.numpy as jnp
  from test_precision import eqns
  images = _image_and_flip(np.asarray(golden_images_nhwc))
  highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)

  def dots(precision):
    jaxpr = _encoder(tokenizer, 1, precision=precision).jaxpr(images, [2, 8], [0, 1]).jaxpr
    ops = list(eqns(jaxpr))
    dtypes = {v.aval.dtype for e in ops for v in (*e.invars, *e.outvars) if hasattr(v.aval, "dtype")}
    return [(tuple(v.aval.dtype for v in e.invars), e.params) for e in ops
            if e.primitive.name == "dot_general"], dtypes
  bf16, _ = dots("bfloat16")
  cast = [(ins, p) for ins, p in bf16 if p["precision"] != highest]
  assert len(cast) >= 6
  for ins, params in cast:
    assert ins == (jnp.bfloat16, jnp.bfloat16) and params["preferred_element_type"] == jnp.float32
  assert all(ins == (jnp.float32, jnp.float32) for ins, p in bf16 if p["precision"] == highest)
  f32, dtypes = dots("float32")
  assert len(f32) == len(bf16) and jnp.dtype(jnp.bfloat16) not in dtypes


def test_extract_rejects_bad_settings(tmp_path):
  for key, value, message in (("precision", "float16", r"extract.precision='float16' \(float32 \| bfloat16\)"),
                              ("per_device_batch", 0, "extract.per_device_batch must be positive")):
    c = get_config("tiny")
    c.extract[key] = value
    with pytest.raises(ValueError, match=message):
      extract(c, tmp_path / "no-tokenizer", tmp_path / "codes")


def _tiny_extract_config(**extract):
  c = get_config("tiny")
  # 3 chunks (48, 48, 32 images); 8 devices x 8 images per step: every chunk's batch is padded.
  c.extract.update(dict(dict(num_images=128, chunk_size=48), **extract))
  return c


def _files(directory):
  return {p.name: p.read_bytes() for p in sorted(directory.glob("*.array_record"))}


@pytest.fixture(scope="module")
def extracted(tokenizer_dir, tmp_path_factory):
  """The tiny config on all 8 devices (data=8)."""
  out = tmp_path_factory.mktemp("codes")
  c = _tiny_extract_config()
  extract(c, tokenizer_dir, out)
  return c, out


def test_records_hold_triples_for_every_view(extracted, tokenizer):
  c, out = extracted
  meta = json.loads((out / "codes.json").read_text())
  assert meta["ar_token_num"] == 32 and meta["views"] == 2 and meta["self_correction"]
  assert meta["precision"] == "float32" and meta["chunk_size"] == 48
  assert sorted(_files(out)) == [f"tokens-c{k:06d}-00000.array_record" for k in range(3)]
  src = TokenRecordSource(out)
  assert len(src) == 128
  shapes = ProceduralShapes(c.extract.num_classes, 64, 128, c.extract.seed)
  assert [src[i]["label"] for i in range(128)] == [shapes[i]["label"] for i in range(128)]  # in order
  import jax.numpy as jnp

  from detailflow_jax.data.transforms import to_float
  for i in (0, 47, 48, 127):  # the first and last images of chunks 0, 1 and 2
    views = np.asarray(src[i]["tokens"]).reshape(2, 32, 3)
    image = to_float(shapes[i]["image"])
    # The clean codes are exactly the tokenizer's codes of the image and of its mirror image.
    clean = tokenizer.encode(jnp.asarray(np.stack([image, image[:, ::-1]]))).indices
    np.testing.assert_array_equal(views[..., 0], np.asarray(clean))
    # Labels equal clean codes up to the end of the perturbed span, inputs differ somewhere there.
    for v in range(2):
      diff = np.nonzero(views[v, :, 0] != views[v, :, 1])[0]
      if diff.size:
        assert np.array_equal(views[v, : diff[0], 2], views[v, : diff[0], 0])


def test_one_device_and_fsdp_params_write_the_same_bytes(extracted, tokenizer_dir, tokenizer, tmp_path):
  import jax

  from detailflow_jax import sharding
  _, out = extracted
  one = sharding.make_mesh(devices=jax.devices()[:1])
  extract(_tiny_extract_config(), tokenizer_dir, tmp_path / "one", mesh=one)
  assert _files(tmp_path / "one") == _files(out)
  fsdp = sharding.make_mesh(data=4, fsdp=2)
  params = CodeEncoder(tokenizer, 32, True, mesh=fsdp).params
  assert [x for x in jax.tree.leaves(params) if "fsdp" in str(x.sharding.spec)]
  extract(_tiny_extract_config(), tokenizer_dir, tmp_path / "fsdp", mesh=fsdp)
  assert _files(tmp_path / "fsdp") == _files(out)


def test_extraction_resumes_without_redoing_chunks(extracted, tokenizer_dir, caplog):
  c, out = extracted
  before = _files(out)
  (out / sorted(before)[1]).unlink()
  with caplog.at_level(logging.INFO, logger="detailflow_jax"):
    extract(c, tokenizer_dir, out)
  assert "2 chunk(s) were already on disk" in caplog.text
  assert "compiled 1 program(s)" in caplog.text
  assert _files(out) == before  # the rebuilt chunk is identical
  other = _tiny_extract_config(precision="bfloat16")
  with pytest.raises(ValueError, match=r"belongs to another extraction \(precision differ\)"):
    extract(other, tokenizer_dir, out)


def test_precision_bfloat16_reaches_the_records(extracted, tokenizer_dir, tmp_path):
  """extract.precision=bfloat16 (the config default outside :tiny): codes.json says so and the
  codes differ from float32's in a few places (bf16 matmul inputs move some distances past a
  tie), the labels and record count not at all."""
  _, out = extracted
  extract(_tiny_extract_config(precision="bfloat16"), tokenizer_dir, tmp_path)
  assert json.loads((tmp_path / "codes.json").read_text())["precision"] == "bfloat16"
  f32, bf16 = TokenRecordSource(out), TokenRecordSource(tmp_path)
  assert len(bf16) == len(f32)
  assert [bf16[i]["label"] for i in range(len(f32))] == [f32[i]["label"] for i in range(len(f32))]
  a = np.stack([np.asarray(f32[i]["tokens"])[..., 0] for i in range(len(f32))])
  b = np.stack([np.asarray(bf16[i]["tokens"])[..., 0] for i in range(len(f32))])
  assert 0.5 < np.mean(a == b) < 1.0


def _records(directory):
  from array_record.python.array_record_module import ArrayRecordReader
  out = []
  for path in sorted(directory.glob("*.array_record")):
    reader = ArrayRecordReader(str(path))
    out += reader.read_all()
    reader.close()
  return out


def test_kill_9_and_rerun_gives_the_same_records(extracted, tokenizer_dir, tmp_path):
  """The CLI killed after its first chunk, then rerun: the records equal the fixture's, record
  for record, though its chunks are 8 images (one padded step each): a record is a function of
  its image alone."""
  import os
  import pathlib
  import sys

  from conftest import kill_9_when
  _, out = extracted
  repo = pathlib.Path(__file__).resolve().parents[1]
  work = tmp_path / "codes"
  cmd = [sys.executable, str(repo / "launch" / "extract_codes.py"),
         f"--config={repo / 'configs' / 'detailflow16_gpt_l.py'}:tiny", f"--tokenizer={tokenizer_dir}",
         f"--workdir={work}", "--config.extract.num_images=128", "--config.extract.chunk_size=8"]
  kill_9_when(cmd, lambda: bool(list(work.glob("*.array_record"))), 300,
              env=dict(os.environ, PYTHONPATH=str(repo)))
  done = len(list(work.glob("*.array_record")))
  assert 1 <= done < 16
  extract(_tiny_extract_config(chunk_size=8), tokenizer_dir, work)
  assert len(list(work.glob("*.array_record"))) == 16
  assert not list(work.glob("*.tmp"))
  assert _records(work) == _records(out)


def test_two_processes_write_the_same_bytes(extracted, tokenizer_dir, tmp_path):
  """launch/extract_codes.py as two jax.distributed processes (4 CPU devices each, mesh
  data=4 x fsdp=2 spanning both): each process writes its own chunks; the files equal the
  single-process ones."""
  import pathlib

  from conftest import run_two_processes
  _, out = extracted
  script = pathlib.Path(__file__).parent / "scripts" / "two_process_extract.py"
  results = run_two_processes(script, tokenizer_dir, tmp_path / "codes", "--config.mesh.fsdp=2",
                              "--config.extract.num_images=128", "--config.extract.chunk_size=48",
                              timeout=300)
  assert all(r["returncode"] == 0 for r in results), results
  assert _files(tmp_path / "codes") == _files(out)


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
