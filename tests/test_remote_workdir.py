"""Run I/O on a non-local filesystem: fsspec's in-memory store, registered with etils.epath as
`memory://` (the way gs:// goes through epath's fsspec backend). The driver's config.json, the
metrics.jsonl / TensorBoard writers (appending across a restart), PNG grids, the atomic
directory write and model-directory listing/verification all run against it. Orbax (train-state
checkpoints, model-directory arrays) writes through tensorstore, which cannot reach fsspec's
memory store: tests/test_gcs_workdir.py runs the whole path, Orbax included, on real gs://
against a local GCS emulator."""
import contextlib
import io
import os
from unittest import mock

import fsspec
import numpy as np
import pytest
from etils import epath
from etils.epath import backend, gpath, register
from gpt_helpers import converted_gpt_dir
from PIL import Image

from configs.detailflow16_gpt_l import get_config
from detailflow_jax import paths
from detailflow_jax.convert.common import ConversionError, write_atomically
from detailflow_jax.inference import images
from detailflow_jax.train import ar, driver
from detailflow_jax.train.metrics import create_writer
from detailflow_jax.weights.model_dir import DamagedModelError, is_model_dir, verify_model_dir


@pytest.fixture
def memory_fs():
  """`memory://` paths through epath's fsspec backend; a fresh store per test."""
  fs = fsspec.filesystem("memory")
  to_fs = backend._FileSystemSpecBackend.fs  # picks gcs / s3 / az / hf / file by prefix
  pick = lambda self, path: fs if os.fspath(path).startswith("memory://") else to_fs(self, path)
  with contextlib.ExitStack() as stack:
    stack.enter_context(mock.patch.object(backend._FileSystemSpecBackend, "fs", pick))
    stack.enter_context(mock.patch.object(gpath, "_URI_PREFIXES", gpath._URI_PREFIXES + ("memory://",)))
    stack.enter_context(mock.patch.object(gpath, "_URI_SCHEMES", gpath._URI_SCHEMES | {"memory"}))
    stack.enter_context(mock.patch.dict(gpath._URI_MAP_ROOT, {"memory://": "/memory/"}))
    stack.enter_context(mock.patch.dict(gpath._PREFIX_TO_BACKEND, {"memory": backend.fsspec_backend}))
    stack.enter_context(mock.patch.dict(register._URI_PREFIXES_TO_CLS, {"memory://": gpath.PosixGPath}))
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")
    yield fs
    fs.store.clear()


def test_driver_config_metrics_tensorboard_and_pngs(memory_fs):
  c = get_config("tiny")
  run = driver.Driver(c, "memory://bucket/run", ar.validate)
  assert isinstance(run.workdir, epath.Path) and paths.is_remote(run.workdir)
  assert memory_fs.exists("/bucket/run/config.json")
  assert '"task": "ar"' in memory_fs.cat("/bucket/run/config.json").decode()
  run.writer.write_scalars(2, {"loss": 1.5})
  run.writer.write_images(2, {"samples": np.zeros((1, 8, 8, 3), np.float32)})
  run.writer.flush()
  run.writer.close()
  # A restarted run appends to the same metrics.jsonl.
  writer = create_writer(run.workdir)
  writer.write_scalars(4, {"loss": 1.25})
  writer.close()
  lines = memory_fs.cat("/bucket/run/metrics.jsonl").decode().splitlines()
  assert [l for l in lines] == ['{"step": 2, "loss": 1.5}', '{"step": 4, "loss": 1.25}']
  events = [p for p in memory_fs.find("/bucket/run/tensorboard") if "tfevents" in p]
  assert len(events) == 2  # one per writer: the restart did not replace the first one's
  contents = sorted(memory_fs.cat(p) for p in events)
  assert sum(b"samples" in c for c in contents) == 1 and all(b"loss" in c for c in contents)

  rows = [[np.zeros((8, 8, 3), np.float32), np.ones((4, 4, 3), np.float32)]]
  path = images.save_grid(run.workdir / "samples" / "step_0000002.png", rows)
  assert os.fspath(path) == "memory://bucket/run/samples/step_0000002.png"
  with Image.open(io.BytesIO(memory_fs.cat("/bucket/run/samples/step_0000002.png"))) as im:
    assert im.size == (2 * 8 + 3 * 2, 8 + 2 * 2)


def test_atomic_directory_write(memory_fs):
  def write(tmp):
    (tmp / "a.txt").write_text("a")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "b.txt").write_text("b")

  out = write_atomically("memory://bucket/export", write)
  assert os.fspath(out) == "memory://bucket/export"
  assert sorted(memory_fs.find("/bucket")) == ["/bucket/export/a.txt", "/bucket/export/sub/b.txt"]
  with pytest.raises(ConversionError, match="already exists"):
    write_atomically("memory://bucket/export", write)

  def fail(tmp):
    (tmp / "a.txt").write_text("a")
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError):
    write_atomically("memory://bucket/other", fail)
  assert sorted(memory_fs.find("/bucket")) == ["/bucket/export/a.txt", "/bucket/export/sub/b.txt"]


def test_model_dir_listing_and_damage_on_remote(memory_fs, tmp_path_factory):
  local = converted_gpt_dir(tmp_path_factory)
  for f in paths.files_under(local):
    rel = f.relative_to(local).as_posix()
    memory_fs.pipe(f"/bucket/gpt/{rel}", f.read_bytes())
  remote = epath.Path("memory://bucket/gpt")
  assert is_model_dir(remote)
  meta = verify_model_dir(remote, "gpt", checksums=True)
  assert meta["files"] and all(name.startswith("params/") for name in meta["files"])
  victim = sorted(meta["files"])[-1]
  memory_fs.pipe(f"/bucket/gpt/{victim}", memory_fs.cat(f"/bucket/gpt/{victim}")[:-1])
  with pytest.raises(DamagedModelError, match=f"{victim} has"):
    verify_model_dir(remote, "gpt")


def test_token_records_written_to_and_read_from_remote(memory_fs, tmp_path):
  from detailflow_jax.data.sources import TokenRecordSource, TokenRecordWriter
  rng = np.random.default_rng(0)
  want = [(rng.integers(0, 64, size=(2, 8, 3)).astype(np.int32), i % 3) for i in range(5)]
  with TokenRecordWriter("memory://bucket/codes", prefix="tokens-p00000") as writer:
    for tokens, label in want:
      writer.write(tokens, label)
  assert memory_fs.find("/bucket/codes") == ["/bucket/codes/tokens-p00000-00000.array_record"]
  source = TokenRecordSource("memory://bucket/codes", cache_dir=tmp_path / "cache")
  assert len(source) == 5 and all(p.startswith(str(tmp_path / "cache")) for p in source.paths)
  for i, (tokens, label) in enumerate(want):
    np.testing.assert_array_equal(source[i]["tokens"], tokens)
    assert int(source[i]["label"]) == label
