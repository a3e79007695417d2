"""`--workdir=gs://...` against a GCS emulator on 127.0.0.1 (tests/gcs_emulator.py): every gs://
client the code has, Orbax's tensorstore (train-state checkpoints, model-directory arrays) and
etils.epath's gcsfs (config, metrics, TensorBoard, token records, listings, renames), talks to
a real GCS JSON API. What lands is read back from the emulator itself, not through the client
that wrote it.

The unmarked test drives checkpoints and export in-process; the slow one is the whole run
through launch/train.py: a crash right after a checkpoint, the resume from it, export, and
sampling the exported model."""
import io
import json
import os
import pathlib
import subprocess
import sys
import uuid

import fsspec
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from etils.epath import backend
from flax import nnx
from gcs_emulator import GcsEmulator
from safetensors import safe_open

from configs.detailflow16_gpt_l import get_config
from detailflow_jax import export, paths
from detailflow_jax import sharding as mesh_lib
from detailflow_jax.inference.sampler import Sampler, SamplingOptions
from detailflow_jax.models.gpt import GPT
from detailflow_jax.train import ar
from detailflow_jax.train.checkpoint import Checkpointer, abstract_with_shardings
from detailflow_jax.train.optim import make_optimizer
from detailflow_jax.train.state import create_train_state
from detailflow_jax.weights import saved_steps
from detailflow_jax.weights.load import load_gpt

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _fresh_gcs_clients():
  """Drops the cached gcsfs instances (epath keeps one per process, gcsfs one per set of
  arguments), so the next gs:// call builds one from the current environment; and forgets
  listings cached before other processes wrote (gcsfs caches every listing it made)."""
  import gcsfs
  backend._FileSystemSpecBackend._get_filesystem.cache_clear()
  gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def gcs_emulator(tmp_path_factory):
  emulator = GcsEmulator(tmp_path_factory.mktemp("gcs") / "requests.log")
  yield emulator
  emulator.stop()


@pytest.fixture
def gcs_bucket(gcs_emulator, monkeypatch, tmp_path):
  """A new bucket; gs:// in this process and in the subprocesses it starts goes to the
  emulator. The working directory is tmp_path, so a gs:// path mistaken for a local one lands
  where the test looks for it."""
  import gcsfs.core
  name = f"run-{uuid.uuid4().hex[:12]}"
  gcs_emulator.create_bucket(name)
  for key, value in gcs_emulator.env.items():
    monkeypatch.setenv(key, value)
  # The environment alone configures the subprocesses. Here fsspec read FSSPEC_* at import and
  # gcsfs chose its class at import: set both as the environment says.
  monkeypatch.setitem(fsspec.config.conf, "gcs", {"token": "anon"})
  registered = {protocol: fsspec.get_filesystem_class(protocol) for protocol in ("gs", "gcs")}
  for protocol in registered:
    fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
  monkeypatch.chdir(tmp_path)
  _fresh_gcs_clients()
  yield name
  _fresh_gcs_clients()
  for protocol, cls in registered.items():
    fsspec.register_implementation(protocol, cls, clobber=True)


def test_emulator_answers_what_tensorstore_and_gcsfs_need(gcs_emulator, gcs_bucket):
  """The answers tests/gcs_emulator.py adds: a read reports the object's generation, so
  tensorstore's conditional write of what it read goes through; a listing keeps to
  startOffset/endOffset; gcsfs renames with moveTo."""
  import tensorstore as ts
  bucket = gcs_bucket
  kv = ts.KvStore.open({"driver": "gcs", "bucket": bucket}).result()
  written = kv.write("manifest", b"1").result()
  read = kv.read("manifest").result()
  assert read.stamp.generation == written.generation
  kv.write("manifest", b"2", if_equal=read.stamp.generation).result()
  assert gcs_emulator.read_object(bucket, "manifest") == b"2"
  kv.write("dir/a", b"a").result()
  listed = ts.KvStore.open({"driver": "gcs", "bucket": bucket, "path": "dir/"}).result().list()
  assert listed.result() == [b"a"]
  fsspec.filesystem("gcs").mv(f"{bucket}/manifest", f"{bucket}/moved")
  assert gcs_emulator.list_objects(bucket) == ["dir/a", "moved"]
  with open(gcs_emulator.log_path) as log:
    assert f'"POST /storage/v1/b/{bucket}/o/manifest/moveTo/o/moved HTTP/1.1" 200' in log.read()


def _assert_nothing_local_named_like(bucket, tmp_path):
  """No gs://BUCKET/... path was taken for a local one (`gs:/BUCKET/...` under the working
  directory, tmp_path, or under the checkout)."""
  for p in tmp_path.rglob("*"):
    assert p.name not in ("gs:", bucket), f"a gs:// path was written locally: {p}"
  assert not (ROOT / "gs:").exists()


def _tiny_gpt_state():
  c = get_config("tiny")
  mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  graphdef, state, shardings = create_train_state(lambda: GPT(ar.gpt_config_from(c), rngs=0),
                                                  make_optimizer(1e-3, 10), mesh)
  return c, state, shardings


def _with_step(state, step):
  """A distinct state per step; the EMA differs from the params (export takes the EMA)."""
  return state.replace(step=jnp.int32(step), params=jax.tree.map(lambda x: x + step, state.params),
                       ema_params=jax.tree.map(lambda x: x * 0.5 - step, state.params))


def _same_arrays(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoints_and_export_on_gcs(gcs_emulator, gcs_bucket, tmp_path):
  bucket, emulator = gcs_bucket, gcs_emulator
  workdir = f"gs://{bucket}/run"
  c, state, shardings = _tiny_gpt_state()
  abstract = abstract_with_shardings(state, shardings)
  (paths.run_path(workdir) / "config.json").write_text(c.to_json_best_effort(indent=2))

  # Asynchronous saves, keep=2: the oldest step is deleted from the bucket.
  ckpt = Checkpointer(f"{workdir}/checkpoints", save_every=1, keep=2, async_save=True)
  for step in (1, 2, 3):
    assert ckpt.save(step, _with_step(state, step))
  ckpt.close()
  objects = emulator.list_objects(bucket)
  assert {o.split("/")[2] for o in objects if o.startswith("run/checkpoints/")} == {"2", "3"}
  assert "run/checkpoints/3/commit_success.txt" in objects  # Orbax's finish mark on GCS

  # A damaged newest step is skipped and moved aside (a rename on GCS: copy, then delete).
  data = [o for o in objects if o.startswith("run/checkpoints/3/state/ocdbt.process_0/d/")]
  victim = max(data, key=lambda o: len(emulator.read_object(bucket, o)))
  content = emulator.read_object(bucket, victim)
  emulator.write_object(bucket, victim, content[:len(content) // 2])
  at, restored = Checkpointer(f"{workdir}/checkpoints").restore(abstract)
  assert at == 2
  _same_arrays(restored, _with_step(state, 2))
  objects = emulator.list_objects(bucket)
  assert any(o.startswith("run/checkpoints/damaged-3/state/") for o in objects)
  assert not any(o.startswith("run/checkpoints/3/") for o in objects)

  # A step without Orbax's finish mark (being written, or cut short) is not exported.
  ckpt = Checkpointer(f"{workdir}/checkpoints", save_every=1, keep=2, async_save=False)
  assert ckpt.save(4, _with_step(state, 4))
  ckpt.close()
  assert saved_steps.workdir_steps(workdir) == [2, 4]
  emulator.delete_object(bucket, "run/checkpoints/4/commit_success.txt")
  _fresh_gcs_clients()
  assert saved_steps.workdir_steps(workdir) == [2]

  assert export.main(["--workdir", workdir, "--format", "model_dir",
                      "--out", f"gs://{bucket}/model"]) == 0
  model_files = emulator.list_objects(bucket, "model/")
  assert "model/config.json" in model_files and "model/params/manifest.ocdbt" in model_files
  meta = json.loads(emulator.read_object(bucket, "model/config.json"))
  assert sorted(meta["files"]) == [f[len("model/"):] for f in model_files if f.startswith("model/params/")]
  _same_arrays(nnx.state(load_gpt(f"gs://{bucket}/model"), nnx.Param), _with_step(state, 2).ema_params)

  assert export.main(["--workdir", workdir, "--out", f"gs://{bucket}/reference"]) == 0
  pt = torch.load(io.BytesIO(emulator.read_object(bucket, "reference/checkpoints/0000002.pt")),
                  weights_only=True)
  assert sorted(pt) == ["ema", "model"]
  local = tmp_path / "reference.safetensors"
  local.write_bytes(emulator.read_object(bucket, "reference/checkpoints/0000002.safetensors"))
  with safe_open(str(local), framework="pt") as f:
    assert f.metadata()["weights"] == "ema" and f.metadata()["step"] == "2"
    assert sorted(f.keys()) == sorted(pt["ema"])
  assert not any("tmp" in o for o in emulator.list_objects(bucket))  # the renames finished
  _assert_nothing_local_named_like(bucket, tmp_path)


def _train(workdir, tokens, cwd, env_extra=None):
  cmd = [sys.executable, str(ROOT / "launch" / "train.py"),
         f"--config={ROOT / 'configs' / 'detailflow16_gpt_l.py'}:tiny", f"--workdir={workdir}",
         f"--config.data.path={tokens}", "--config.total_steps=8", "--config.log_every=1",
         "--config.checkpoint.save_every=4"]
  return subprocess.run(cmd, env=_subprocess_env(cwd, env_extra), cwd=cwd, capture_output=True,
                        text=True, timeout=400)


def _subprocess_env(cwd, env_extra=None):
  return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
              XLA_FLAGS="--xla_force_host_platform_device_count=2",
              DETAILFLOW_CACHE=str(pathlib.Path(cwd) / "cache"), **(env_extra or {}))


def _losses(text):
  return {r["step"]: r["loss"] for r in map(json.loads, text.splitlines())}


@pytest.mark.slow
def test_train_crash_resume_export_and_sample_on_gcs(gcs_emulator, gcs_bucket, tmp_path):
  from detailflow_jax.data.sources import TokenRecordWriter
  bucket, emulator = gcs_bucket, gcs_emulator
  tokens, workdir = f"gs://{bucket}/tokens", f"gs://{bucket}/run"
  rng = np.random.default_rng(0)
  with TokenRecordWriter(tokens) as writer:
    for i in range(64):
      writer.write(rng.integers(0, 64, size=(32, 3)), label=i % 10)

  straight = _train(tmp_path / "straight", tokens, tmp_path)  # a local workdir, same data
  assert straight.returncode == 0, straight.stderr[-3000:]
  killed = _train(workdir, tokens, tmp_path, {"DETAILFLOW_TEST_KILL_AFTER_STEP": "4"})
  assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL right after step 4 was saved
  objects = emulator.list_objects(bucket, "run/")
  assert "run/checkpoints/4/commit_success.txt" in objects and "run/config.json" in objects
  assert not any(o.startswith("run/export/") for o in objects)
  # TensorBoard events are staged locally and copied to gs:// with every checkpoint saved.
  assert sum(o.startswith("run/tensorboard/events.out.tfevents.") for o in objects) == 1
  resumed = _train(workdir, tokens, tmp_path)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step 4" in resumed.stderr

  objects = emulator.list_objects(bucket, "run/")
  for step in (4, 8):
    assert f"run/checkpoints/{step}/commit_success.txt" in objects
    assert f"run/checkpoints/{step}/state/manifest.ocdbt" in objects
    assert f"run/checkpoints/{step}/data/process_0-of-1.json" in objects  # the data iterator
  assert "run/export/config.json" in objects and "run/export/params/manifest.ocdbt" in objects
  assert sum(o.startswith("run/tensorboard/events.out.tfevents.") for o in objects) == 2  # one a run
  want = _losses((tmp_path / "straight" / "metrics.jsonl").read_text())
  got = _losses(emulator.read_object(bucket, "run/metrics.jsonl").decode())
  assert sorted(want) == list(range(1, 9)) and got == want  # bit-identical on CPU

  out = f"gs://{bucket}/exported"
  done = subprocess.run([sys.executable, "-m", "detailflow_jax.export", "--workdir", workdir,
                         "--step", "8", "--format", "model_dir", "--out", out],
                        env=_subprocess_env(tmp_path), cwd=tmp_path, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"wrote {out}" in done.stdout
  exported = emulator.list_objects(bucket, "exported/")
  assert "exported/config.json" in exported and "exported/params/manifest.ocdbt" in exported

  _fresh_gcs_clients()  # this process listed the bucket before the subprocesses wrote to it
  model = load_gpt(out)
  local = load_gpt(tmp_path / "straight" / "export")
  _same_arrays(nnx.state(model), nnx.state(local))
  _same_arrays(nnx.state(model), nnx.state(load_gpt(f"{workdir}/export")))
  sampler = Sampler(model)
  labels = jnp.asarray([1, 7], jnp.int32)
  tokens_out = sampler.sample(nnx.state(model), labels, jax.random.key(0), SamplingOptions())
  assert tokens_out.shape == (2, model.config.block_size)
  assert int(tokens_out.min()) >= 0 and int(tokens_out.max()) < model.config.vocab_size
  np.testing.assert_array_equal(np.asarray(tokens_out), np.asarray(
      sampler.sample(nnx.state(local), labels, jax.random.key(0), SamplingOptions())))
  _assert_nothing_local_named_like(bucket, tmp_path)
