"""paths' atomic writers on local disk (the remote side runs in test_remote_workdir.py): a file
or directory appears whole under its final name or not at all, and no temporary is left."""
import os

import numpy as np
import pytest

from detailflow_jax import paths
from detailflow_jax.eval.reference import save_npz_atomically


def test_atomic_file_replaces_on_success_and_leaves_the_old_file_on_failure(tmp_path):
  target = tmp_path / "sub" / "results.json"
  with paths.atomic_file(target) as tmp:
    assert tmp.parent == target.parent and not target.exists()
    tmp.write_text("first")
  assert target.read_text() == "first"
  with pytest.raises(RuntimeError, match="midway"):
    with paths.atomic_file(target) as tmp:
      tmp.write_text("half")
      raise RuntimeError("midway")
  assert target.read_text() == "first"
  assert os.listdir(target.parent) == ["results.json"]
  # A killed writer's leftover is taken over by the next write of the same file, not kept.
  (target.parent / "results.json.tmp").write_text("killed midway")
  with paths.atomic_file(target) as tmp:
    tmp.write_text("second")
  assert target.read_text() == "second" and os.listdir(target.parent) == ["results.json"]


def test_shared_writers_get_their_own_temporary_files(tmp_path):
  target = tmp_path / "index.json"
  with paths.atomic_file(target, shared=True) as a, paths.atomic_file(target, shared=True) as b:
    assert a != b and a.name.endswith(".tmp") and b.name.endswith(".tmp")
    a.write_text("a")
    b.write_text("b")
  assert target.read_text() == "a" and os.listdir(tmp_path) == ["index.json"]


def test_npz_keeps_its_name(tmp_path):
  # np.savez appends ".npz" to a name without it; the temporary file must not end up elsewhere.
  path = save_npz_atomically(tmp_path / "batch.npz", arr_0=np.arange(4))
  assert os.listdir(tmp_path) == ["batch.npz"]
  with np.load(path) as data:
    np.testing.assert_array_equal(data["arr_0"], np.arange(4))


def test_directory_write(tmp_path):
  out = paths.write_dir_atomically(tmp_path / "model", lambda tmp: (tmp / "a.txt").write_text("a"))
  assert (out / "a.txt").read_text() == "a"
  with pytest.raises(FileExistsError, match="already exists"):
    paths.write_dir_atomically(out, lambda tmp: None)

  def fail(tmp):
    (tmp / "a.txt").write_text("a")
    raise RuntimeError("midway")
  with pytest.raises(RuntimeError, match="midway"):
    paths.write_dir_atomically(tmp_path / "other", fail)
  assert sorted(os.listdir(tmp_path)) == ["model"]
