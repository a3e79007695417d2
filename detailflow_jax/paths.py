"""Run I/O paths through etils.epath, so a workdir or export may be local or `gs://...` (any
scheme epath has a backend for) with the same code. Local paths come back as pathlib.Path, as
before, so local callers see no difference."""
import io
import os
import pathlib
from typing import List, Union

from etils import epath

AnyPath = Union[pathlib.Path, epath.Path]


def is_remote(path) -> bool:
  """True for URI paths (gs://, s3://, memory://, ...)."""
  return "://" in os.fspath(path)


def run_path(path) -> AnyPath:
  """`path` as a pathlib.Path (local, absolute) or an epath.Path (remote)."""
  if is_remote(path):
    return epath.Path(os.fspath(path))
  return pathlib.Path(os.path.expanduser(os.fspath(path))).absolute()


def files_under(root: AnyPath) -> List[AnyPath]:
  """Every file below `root`, sorted. (epath has no recursive glob, and its walk() mangles
  fsspec URIs: it lists directory by directory.)"""
  root = run_path(root)
  if not is_remote(root):
    return sorted(p for p in root.rglob("*") if p.is_file())
  out, todo = [], [root]
  while todo:
    for child in todo.pop().iterdir():
      (todo if child.is_dir() else out).append(child)
  return sorted(out, key=os.fspath)


def file_size(path: AnyPath) -> int:
  return path.stat().st_size if isinstance(path, pathlib.Path) else path.stat().length


def rmtree(path: AnyPath) -> None:
  if isinstance(path, pathlib.Path):
    import shutil
    shutil.rmtree(path)
  else:
    path.rmtree()


def save_image(image, path: AnyPath) -> None:
  """A PIL image as PNG at `path` (encoded in memory, one write: object stores have no seek)."""
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  path.write_bytes(buffer.getvalue())
