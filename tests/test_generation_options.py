"""The options of the reference's sample_c2i_ddp.py in the generation job: --gradual-cfg,
--image-size (the tokenizer table's token budget), --eval-image-size (torch's bicubic, pinned
by a golden file made with torch), --vq-weights, a GPT that makes fewer tokens than the
tokenizer holds, the bf16 decode under autocast; byte-identical on 1 and 8 devices."""
import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from gpt_helpers import random_gpt

from detailflow_jax.eval.generation import CFG_INTERVAL_NOTE, GenerationSettings, decode_plan
from detailflow_jax.inference.images import to_uint8
from detailflow_jax.ops.resize import resize_bicubic

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TOKENIZER_RUN = FIXTURES / "detailflow_tiny_a" / "tokenizer"
BICUBIC_GOLDEN = FIXTURES / "bicubic_torch_golden.npz"  # tests/scripts/make_bicubic_golden.py


def test_bicubic_resize_equals_torch_golden():
  with np.load(BICUBIC_GOLDEN, allow_pickle=False) as g:
    names = [k[3:] for k in g.files if k.startswith("in_")]
    assert len(names) == 4
    for name in names:
      x, want = g[f"in_{name}"], g[f"out_{name}"]
      np.testing.assert_allclose(resize_bicubic(x, want.shape[1:3]), want, atol=1e-5, rtol=0, err_msg=name)
      jitted = jax.jit(resize_bicubic, static_argnums=1)(jnp.asarray(x), want.shape[1:3])
      np.testing.assert_allclose(np.asarray(jitted), want, atol=1e-5, rtol=0, err_msg=name)


def test_bf16_uint8_as_torch_computes_it():
  """clamp(127.5 x + 128, 0, 255).to(uint8) on a bf16 tensor, each op rounded to bf16."""
  import torch
  rng = np.random.default_rng(0)
  x = rng.uniform(-1.1, 1.1, 20_000).astype(np.float32)
  xb = x.astype(ml_dtypes.bfloat16)
  t = torch.from_numpy(xb.astype(np.float32)).to(torch.bfloat16)
  want = torch.clamp(127.5 * t + 128.0, 0, 255).to(torch.uint8).numpy()
  np.testing.assert_array_equal(to_uint8(xb), want)
  # In float32 the same values truncate differently in places (what the policy changes).
  assert np.any(to_uint8(xb.astype(np.float32)) != want)


def test_decode_plan_follows_the_reference_tables(tokenizer):
  """decres2besttoken from the reference's own tables (degradation_tables.json)."""
  tables = json.loads((FIXTURES / "detailflow_tiny_a" / "degradation_tables.json").read_text())["fixture"]
  best = {int(k): v for k, v in tables["decres2besttoken"].items()}
  cfg, schedule = tokenizer.config, tokenizer.schedule
  assert decode_plan(cfg, schedule, 32) == {"image_size": 64, "num_tokens": 32, "table_tokens": 32}
  assert decode_plan(cfg, schedule, 24, 64) == {"image_size": 64, "num_tokens": 24, "table_tokens": 32}
  # The fixture's min_image_size is 64 (sample_c2i_ddp.py asserts min <= size <= max); lowered:
  wide = dataclasses.replace(cfg, min_image_size=8)
  for size, tokens in best.items():
    plan = decode_plan(wide, schedule, 32, size)
    assert plan == {"image_size": size, "num_tokens": tokens, "table_tokens": tokens}
  assert decode_plan(wide, schedule, 16, 48)["num_tokens"] == 16  # the GPT's budget is smaller
  with pytest.raises(ValueError, match=r"image_size=48: the tokenizer decodes .*min_image_size=64"):
    decode_plan(cfg, schedule, 32, 48)
  with pytest.raises(ValueError, match=r"image_size=50: the tokenizer decodes \[8, 16, 24"):
    decode_plan(wide, schedule, 32, 50)


def test_settings_check_the_sampling_options():
  with pytest.raises(ValueError, match="cfg_interval must be an integer >= -1"):
    GenerationSettings(num_samples=4, cfg_interval=-3)
  with pytest.raises(ValueError, match="eval_image_size must be positive"):
    GenerationSettings(num_samples=4, eval_image_size=-1)
  assert GenerationSettings().cfg_interval == -1 and not GenerationSettings().gradual_cfg


@pytest.fixture(scope="module")
def short_gpt_dir(tmp_path_factory):
  """A GPT making 24 tokens (the fixture tokenizer holds 32) with a null class, random weights."""
  from detailflow_jax.weights.model_dir import save_model_dir
  gpt = random_gpt(seed=3, dim=32, n_layer=2, n_head=4, vocab_size=64, num_classes=10, block_size=24,
                   group_size=4, class_dropout_prob=0.1, output_scale=2.0)
  out = tmp_path_factory.mktemp("short_gpt") / "gpt"
  out.mkdir()
  save_model_dir(out, "gpt", dataclasses.asdict(gpt.config), gpt)
  return out


OPTION_ARGS = ["--num-samples", "6", "--seed", "5", "--cfg-scale", "3.0", "--gradual-cfg",
               "--image-size", "64", "--eval-image-size", "48", "--vq-weights", "ema",
               "--precision", "bfloat16", "--chunk-size", "4", "--per-device-batch", "1"]


def test_options_give_the_same_bytes_on_one_and_eight_devices(short_gpt_dir, tmp_path, monkeypatch):
  from detailflow_jax import sharding as mesh_lib
  from detailflow_jax.eval.generation import GenerationJob, resolve_models
  from detailflow_jax.generate import main
  from detailflow_jax.weights.load import load_model_dir
  monkeypatch.setenv("DETAILFLOW_JAX_CACHE", str(tmp_path / "cache"))  # the run dir's conversion
  assert jax.device_count() == 8
  rc = main(["--tokenizer", str(TOKENIZER_RUN), "--gpt", str(short_gpt_dir), *OPTION_ARGS,
             "--out", str(tmp_path / "eight.npz"), "--workdir", str(tmp_path / "w8"),
             "--png-dir", str(tmp_path / "png")])
  assert rc == 0
  results = json.loads((tmp_path / "w8" / "results.json").read_text())
  p = results["protocol"]
  assert (p["gradual_cfg"], p["cfg_interval"], p["cfg_interval_note"]) == (True, -1, CFG_INTERVAL_NOTE)
  assert (p["image_size"], p["eval_image_size"], p["decoded_tokens"], p["table_tokens"],
          p["gpt_block_size"], p["tokenizer_latent_tokens"]) == (64, 48, 24, 32, 24, 32)
  assert results["models"]["tokenizer"]["weights_requested"] == "ema"
  tok_dir = pathlib.Path(results["models"]["tokenizer"]["path"])
  assert json.loads((tok_dir / "source.json").read_text())["weights"] == "ema"
  assert "autocast" in results["precision"]["tokenizer_decode"]
  with np.load(tmp_path / "eight.npz", allow_pickle=False) as f:
    images = f["arr_0"]
  assert images.shape == (6, 48, 48, 3) and len({im.tobytes() for im in images}) == 6
  from PIL import Image
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "png" / "seed5" / "000005.png")), images[5])

  # One device, the job built by hand from the same settings: the same file, byte for byte.
  settings = GenerationSettings(num_samples=6, seed=5, cfg_scale=3.0, gradual_cfg=True, image_size=64,
                                eval_image_size=48, precision="bfloat16", chunk_size=4, per_device_batch=1)
  tok_dir2, gpt_dir = resolve_models(TOKENIZER_RUN, short_gpt_dir, None, "ema")
  assert tok_dir2 == tok_dir
  job = GenerationJob(load_model_dir(gpt_dir, "gpt"), load_model_dir(tok_dir, "tokenizer"), settings,
                      mesh=mesh_lib.make_mesh(devices=jax.devices()[:1]))
  extra = {k: results["models"][m]["weights_sha256"] for k, m in (("tokenizer_sha256", "tokenizer"),
                                                                   ("gpt_sha256", "gpt"))}
  job.run(tmp_path / "w1", tmp_path / "one.npz", protocol_extra=extra)
  assert (tmp_path / "one.npz").read_bytes() == (tmp_path / "eight.npz").read_bytes()

  # The stored images are the reference's pipeline on this job's tokens: decode 24 tokens at
  # 64 under autocast (bf16 out), torch bicubic to 48, uint8 in bf16.
  from detailflow_jax.data import protocol
  from detailflow_jax.eval.device import decode_tokens
  labels = protocol.labels_for(5, 0, 2, 10, "uniform")
  from detailflow_jax.eval.generation import _row_keys
  tokens = job.sampler.sample(job.gpt_params, labels, _row_keys(jnp.uint32(5), np.arange(2, dtype=np.int32)),
                              settings.options)
  full = decode_tokens(job.tok_graphdef, job.tok_params, tokens, policy=job.decode_policy,
                       num_tokens=24, image_size=64)
  assert full.dtype == jnp.bfloat16 and full.shape == (2, 64, 64, 3)
  resized = resize_bicubic(full, 48)  # float32 inside, rounded back to bf16 as torch's kernel
  assert resized.dtype == jnp.bfloat16
  np.testing.assert_array_equal(to_uint8(np.asarray(resized)), images[:2])
