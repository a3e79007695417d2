"""The generation job on the fixture models: the pinned protocol, chunks and streaming
assembly, byte-identical files on 1 / 8 devices and under 2 processes, kill -9 + restart,
results.json, and token-for-token equality with the single-device Sampler."""
import json
import os
import pathlib
import sys
import tracemalloc

import jax
import numpy as np
import pytest
from generation_settings import CLI_ARGS, SETTINGS
from gpt_helpers import converted_gpt_dir, loaded_gpt

from detailflow_jax.data import protocol
from detailflow_jax.eval.chunks import ChunkStore, ChunkStoreError, write_npz_streaming

REPO = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------- protocol ----

def test_labels_and_keys_are_functions_of_seed_and_index():
  whole = protocol.labels_for(7, 0, 64, 1000, "uniform")
  parts = np.concatenate([protocol.labels_for(7, a, b, 1000, "uniform") for a, b in ((0, 5), (5, 41), (41, 64))])
  np.testing.assert_array_equal(whole, parts)
  assert whole.min() >= 0 and whole.max() < 1000 and len(set(whole.tolist())) > 50
  assert not np.array_equal(whole, protocol.labels_for(8, 0, 64, 1000, "uniform"))
  balanced = protocol.labels_for(0, 0, 50_000, 1000, "balanced")
  assert np.all(np.bincount(balanced, minlength=1000) == 50)
  keys = jax.random.key_data(protocol.row_keys(7, np.arange(10)))
  np.testing.assert_array_equal(keys[3:6], jax.random.key_data(protocol.row_keys(7, np.arange(3, 6))))
  assert len({tuple(k) for k in np.asarray(keys).tolist()}) == 10
  with pytest.raises(ValueError, match="label mode must be one of"):
    protocol.labels_for(0, 0, 4, 10, "stratified")


def test_noise_indices_as_the_reference_draws_them():
  # reconstruct_vq.py: [-1] + [i * g for i in [0, G // 4, G // 4 * 2, G // 4 * 3, G - 1]], G = t // g
  assert protocol.noise_indices(128, 8) == [-1, 0, 32, 64, 96, 120]
  assert protocol.noise_indices(256, 8) == [-1, 0, 64, 128, 192, 248]
  assert protocol.noise_indices(512, 8) == [-1, 0, 128, 256, 384, 504]
  assert protocol.noise_indices(40, 4) == [-1, 0, 8, 16, 24, 36]  # G = 10: G // 4 * 2 = 4, not 5
  assert protocol.noise_indices(128, 8, noisy_eval=False) == [-1]


# ------------------------------------------------------------------------ chunks + assembly --

ARRAYS = {"arr_0": ((32, 32, 3), "uint8"), "arr_1": ((), "int32")}


def _rows(start, stop):
  rng = np.random.default_rng(start)
  return rng.integers(0, 256, (stop - start, 32, 32, 3), dtype=np.uint8), np.arange(start, stop, dtype=np.int32)


def test_chunk_store_resumes_and_refuses_another_protocol(tmp_path):
  store = ChunkStore(tmp_path, {"seed": 0}, 10, 4, ARRAYS)
  assert store.pending() == [0, 1, 2] and store.rows(2) == (8, 10)
  images, labels = _rows(0, 4)
  store.write(0, arr_0=images, arr_1=labels)
  store.path(1).write_bytes(b"half a chunk")  # a file the manifest does not list: redone
  again = ChunkStore(tmp_path, {"seed": 0}, 10, 4, ARRAYS)
  assert again.pending() == [1, 2]
  np.testing.assert_array_equal(again.read(0, "arr_0"), images)
  with pytest.raises(ChunkStoreError, match=r"manifest.json belongs to another run: protocol.seed \(1 here, 0"):
    ChunkStore(tmp_path, {"seed": 1}, 10, 4, ARRAYS)
  with pytest.raises(ValueError, match=r"chunk 1: 'arr_0' is uint8 \(3, 32, 32, 3\), expected uint8 \(4, 32, 32, 3\)"):
    again.write(1, arr_0=images[:3], arr_1=labels[:3])


def test_assembly_streams_one_chunk_at_a_time(tmp_path):
  chunk, n = 64, 64 * 20  # 20 chunks of 196 KB: 3.9 MB of images in all
  store = ChunkStore(tmp_path / "w", {"seed": 0}, n, chunk, ARRAYS)
  for k in store.pending():
    store.write(k, **dict(zip(("arr_0", "arr_1"), _rows(*store.rows(k)))))
  tracemalloc.start()
  try:
    write_npz_streaming(tmp_path / "out.npz", {"arr_0": store.member("arr_0"), "arr_1": store.member("arr_1")})
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  chunk_bytes = chunk * 32 * 32 * 3
  # A chunk read from its file plus its zip buffer; all N would be 20 chunks.
  assert peak < 5 * chunk_bytes, (peak, chunk_bytes)
  with np.load(tmp_path / "out.npz", allow_pickle=False) as f:
    np.testing.assert_array_equal(f["arr_0"], np.concatenate([_rows(*store.rows(k))[0] for k in range(20)]))
    np.testing.assert_array_equal(f["arr_1"], np.arange(n))
  assert not list(tmp_path.glob(".out.npz.tmp*"))
  first = (tmp_path / "out.npz").read_bytes()
  write_npz_streaming(tmp_path / "again.npz", {"arr_0": store.member("arr_0"), "arr_1": store.member("arr_1")})
  assert (tmp_path / "again.npz").read_bytes() == first  # fixed timestamps: same rows, same bytes


# --------------------------------------------------------------------------- the job itself --

@pytest.fixture(scope="module")
def models(tokenizer_dir, tmp_path_factory):
  return tokenizer_dir, converted_gpt_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(inception_random_dir, tmp_path_factory):
  """A small ADM-format reference batch (no statistics: the job computes them)."""
  path = tmp_path_factory.mktemp("ref") / "ref.npz"
  np.savez(path, arr_0=np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8))
  return path


@pytest.fixture(scope="module")
def eight_devices(models, reference, inception_random_dir, tmp_path_factory):
  """The CLI on all 8 devices, scored: (workdir, samples path, results)."""
  from detailflow_jax.generate import main
  tok, gpt = models
  work = tmp_path_factory.mktemp("gen8")
  rc = main(["--tokenizer", str(tok), "--gpt", str(gpt), *CLI_ARGS, "--out", str(work / "samples.npz"),
             "--workdir", str(work / "w"), "--reference", str(reference),
             "--inception", str(inception_random_dir), "--inception-batch", "8"])
  assert rc == 0
  return work, work / "samples.npz", json.loads((work / "w" / "results.json").read_text())


def test_output_file_and_results_json(eight_devices, models, reference):
  _, samples, results = eight_devices
  with np.load(samples, allow_pickle=False) as f:
    assert f["arr_0"].shape == (10, 64, 64, 3) and f["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(f["arr_1"], protocol.labels_for(3, 0, 10, 10, "uniform"))
    assert len({f["arr_0"][i].tobytes() for i in range(10)}) == 10
  p = results["protocol"]
  assert (p["num_samples"], p["seeds"], p["label_mode"], p["cfg_scale"], p["top_k"], p["top_p"]) == \
      (10, [3], "uniform", 1.5, 0, 1.0)
  assert results["precision"]["name"] == "float32"
  for kind, directory in zip(("tokenizer", "gpt"), models):
    assert results["models"][kind]["path"] == str(directory)
    assert len(results["models"][kind]["weights_sha256"]) == 64
  assert {"python", "jax", "jaxlib", "flax", "numpy", "scipy"} <= set(results["packages"])
  assert results["devices"]["count"] == 8
  run = results["runs"][0]
  assert run["summary"]["images_made"] == 10 and run["summary"]["chunks_made"] == 3
  assert run["summary"]["images_per_second"] > 0
  from detailflow_jax.paths import file_sha256
  assert run["scores"]["inputs"]["samples"]["sha256"] == file_sha256(samples)
  assert results["inputs"]["reference"]["path"] == str(reference)
  for k in ("inception_score", "fid", "sfid", "precision", "recall"):
    assert results["scores"][k]["values"] == [run["scores"][k]] and results["scores"][k]["std"] == 0.0
    assert np.isfinite(run["scores"][k])


def test_one_device_gives_the_same_bytes(eight_devices, models, tmp_path):
  from detailflow_jax import sharding as mesh_lib
  from detailflow_jax.eval.generation import GenerationJob
  from detailflow_jax.weights.load import load_gpt, load_tokenizer
  _, samples, _ = eight_devices
  one = mesh_lib.make_mesh(devices=jax.devices()[:1])
  job = GenerationJob(load_gpt(models[1]), load_tokenizer(models[0]), SETTINGS, mesh=one)
  assert job.batch == 1
  seen = []
  images = job.images
  job.images = lambda a, b: seen.append(b - a) or images(a, b)
  job.run(tmp_path / "w", tmp_path / "one.npz")
  assert max(seen) == SETTINGS.chunk_size  # never more rows in memory than a chunk
  assert (tmp_path / "one.npz").read_bytes() == samples.read_bytes()


def test_sharded_sampler_equals_single_device_sampler_token_for_token(models, tmp_path_factory):
  """The job's sampling call (8-device mesh, per-row keys of (seed, i)) against the
  single-device Sampler run one row at a time with the same key."""
  from flax import nnx

  from detailflow_jax import sharding as mesh_lib
  from detailflow_jax.inference.sampler import Sampler
  gpt = loaded_gpt(tmp_path_factory)
  mesh = mesh_lib.make_mesh()
  idx = np.arange(100, 108, dtype=np.int32)
  labels = protocol.labels_for(5, 100, 108, gpt.config.num_classes, "uniform")
  graphdef, state = nnx.split(gpt)
  keys = protocol.row_keys(5, idx)
  tokens = Sampler(graphdef, mesh=mesh).sample(jax.device_put(state, mesh_lib.replicated(mesh)),
                                               labels, keys, SETTINGS.options)
  assert tokens.sharding.is_equivalent_to(mesh_lib.batch_sharding(mesh, 2), 2)
  single = Sampler(graphdef)
  for b, i in enumerate(idx):
    one = single.sample(state, labels[b:b + 1], protocol.row_keys(5, [i]), SETTINGS.options)
    np.testing.assert_array_equal(np.asarray(tokens)[b], np.asarray(one)[0])


def test_two_processes_give_the_same_bytes(eight_devices, models, tmp_path):
  from conftest import run_two_processes
  _, samples, _ = eight_devices
  script = pathlib.Path(__file__).parent / "scripts" / "two_process_generation.py"
  results = run_two_processes(script, *models, tmp_path / "w", tmp_path / "two.npz", timeout=600)
  assert all(r["devices"] == 8 and r["processes"] == 2 for r in results)
  assert (tmp_path / "two.npz").read_bytes() == samples.read_bytes()


def test_kill_9_and_restart_gives_the_same_file(eight_devices, models, reference, inception_random_dir, tmp_path):
  from detailflow_jax.generate import main
  _, samples, _ = eight_devices
  tok, gpt = models
  args = ["--tokenizer", str(tok), "--gpt", str(gpt), *CLI_ARGS, "--out", str(tmp_path / "s.npz"),
          "--workdir", str(tmp_path / "w")]
  from conftest import kill_9_when
  manifest = tmp_path / "w" / "chunks-seed3" / "manifest.json"
  kill_9_when([sys.executable, "-m", "detailflow_jax.generate", *args],
              lambda: manifest.is_file() and bool(json.loads(manifest.read_text())["chunks"]),
              500, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
  done = len(json.loads(manifest.read_text())["chunks"])
  assert 1 <= done < 3 and not (tmp_path / "s.npz").exists()
  assert main(args) == 0
  results = json.loads((tmp_path / "w" / "results.json").read_text())
  assert results["runs"][0]["summary"]["chunks_reused"] == done
  assert (tmp_path / "s.npz").read_bytes() == samples.read_bytes()


def test_eval_config_variants_hold_the_paper_settings():
  import importlib
  for n, cfg in ((16, 1.45), (32, 1.5), (64, 1.32)):
    c = importlib.import_module(f"configs.detailflow{n}_gpt_l").get_config("eval")
    assert c.task == "eval_generation" and c.model.block_size == n * 8
    e = c.eval
    assert (e.cfg_scale, e.top_k, e.top_p, e.gpt_weights, e.num_samples, e.label_mode) == \
        (cfg, 0, 1.0, "ema", 50_000, "uniform")
    t = importlib.import_module(f"configs.detailflow{n}_tokenizer").get_config("eval")
    assert t.task == "eval_tokenizer" and t.eval.noisy_eval and t.model.num_latent_tokens == n * 8


def test_launcher_refuses_a_training_config():
  from configs.detailflow16_gpt_l import get_config
  from detailflow_jax.eval.launch import ConfigError, run_from_config
  with pytest.raises(ConfigError, match="is not an evaluation; use a :eval variant"):
    run_from_config(get_config(), "/nonexistent")
  with pytest.raises(ConfigError, match="eval.tokenizer is empty"):
    run_from_config(get_config("eval"), "/nonexistent")


def test_fsdp_sharded_gpt_params_give_the_same_bytes(eight_devices, models, tmp_path):
  import dataclasses

  from detailflow_jax import sharding as mesh_lib
  from detailflow_jax.eval.generation import GenerationJob
  from detailflow_jax.weights.load import load_gpt, load_tokenizer
  _, samples, _ = eight_devices
  mesh = mesh_lib.make_mesh(data=4, fsdp=2)
  settings = dataclasses.replace(SETTINGS, param_layout="fsdp")
  job = GenerationJob(load_gpt(models[1]), load_tokenizer(models[0]), settings, mesh=mesh)
  sharded = [v for v in jax.tree.leaves(job.gpt_params) if "fsdp" in str(v.sharding.spec)]
  assert sharded and job.batch == 8
  job.run(tmp_path / "w", tmp_path / "fsdp.npz")
  assert (tmp_path / "fsdp.npz").read_bytes() == samples.read_bytes()
