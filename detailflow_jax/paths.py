"""Run I/O paths through etils.epath, so a workdir or export may be local or `gs://...` (any
scheme epath has a backend for) with the same code. Local paths come back as pathlib.Path, as
before, so local callers see no difference. Also the one owner of atomic writes (a file or a
directory appears whole under its final name, or not at all)."""
import contextlib
import hashlib
import io
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator

from etils import epath

AnyPath = pathlib.Path | epath.Path


def is_remote(path) -> bool:
  """True for URI paths (gs://, s3://, memory://, ...)."""
  return "://" in os.fspath(path)


def run_path(path) -> AnyPath:
  """`path` as a pathlib.Path (local, absolute) or an epath.Path (remote)."""
  if is_remote(path):
    return epath.Path(os.fspath(path))
  return pathlib.Path(os.path.expanduser(os.fspath(path))).absolute()


def files_under(root: AnyPath) -> list[AnyPath]:
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
    shutil.rmtree(path)
  else:
    path.rmtree()


def save_image(image, path: AnyPath) -> None:
  """A PIL image as PNG at `path` (encoded in memory, one write: object stores have no seek)."""
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  path.write_bytes(buffer.getvalue())


@contextlib.contextmanager
def atomic_file(path, shared: bool = False) -> Iterator[pathlib.Path]:
  """A local temporary file to write; when the block succeeds it becomes `path`, when it raises
  it is deleted and `path` is untouched. `path` (its parent is made) may be remote: there the
  file is uploaded in one write at the end (an object appears only once complete).

  Local: the temporary file lies beside `path` (same filesystem: os.replace is atomic on POSIX)
  and its name ends in `.tmp`, so a glob for finished files (`*.array_record`, `chunk-*.npz`)
  never picks up a half-written one. It is `NAME.tmp`: a file has one writer, and a rerun after
  a kill -9 overwrites what the killed run left. shared=True (a cache several processes may
  fill at once) makes it unique per writer instead."""
  if is_remote(path):
    path = epath.Path(os.fspath(path))
    fd, name = tempfile.mkstemp(suffix=".tmp")
    os.close(fd)
    tmp = pathlib.Path(name)
  else:
    path = pathlib.Path(path)
    unique = f".{os.getpid()}-{uuid.uuid4().hex[:8]}" if shared else ""
    tmp = path.with_name(f"{path.name}{unique}.tmp")
  path.parent.mkdir(parents=True, exist_ok=True)
  try:
    yield tmp
    if is_remote(path):
      with open(tmp, "rb") as src, path.open("wb") as dst:  # streamed: a sample file can be GBs
        shutil.copyfileobj(src, dst, 1 << 24)
    else:
      os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_dir_atomically(out_dir, write: Callable[[AnyPath], None],
                         exists_error: type[Exception] = FileExistsError) -> AnyPath:
  """Runs `write(tmp_dir)` and renames tmp_dir to out_dir only if it succeeds.

  A failed write leaves nothing at out_dir; an existing out_dir is an `exists_error`, not
  overwritten. out_dir may be remote (gs://...: epath); there the rename is the store's (copy +
  delete on GCS), so readers must still check completeness (model directories list their files).
  """
  out_dir = run_path(out_dir)
  if out_dir.exists():
    raise exists_error(f"output directory already exists: {out_dir}")
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  if not is_remote(out_dir):
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
  else:
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
  try:
    write(tmp)
    tmp.rename(out_dir)
  except BaseException:
    if tmp.exists():
      rmtree(tmp)
    raise
  return out_dir


def file_sha256(path, chunk: int = 1 << 24) -> str:
  """The SHA-256 of a local or gs:// file, read in chunks."""
  digest = hashlib.sha256()
  with run_path(path).open("rb") as f:
    while block := f.read(chunk):
      digest.update(block)
  return digest.hexdigest()
