"""Resumable chunked output and streaming, atomic assembly of ADM `.npz` batch files.

A job's rows (sample i = row i) are cut into fixed-size chunks; chunk k holds rows
k*chunk_size .. (k+1)*chunk_size-1 and is written, atomically, as `chunk-KKKKKK.npz` as soon as
it is complete, then recorded in `manifest.json` (written atomically too) with its SHA-256. A
restarted job (kill -9, preemption) keeps every chunk the manifest lists whose file is intact
and redoes the rest. The manifest also holds the job's protocol (seed, models, settings): a
workdir made under another protocol is refused, naming the first field that differs, so chunks
of two different runs are never mixed.

`write_npz_streaming` writes the final file member by member from an iterator of row blocks
(one chunk in memory at a time, never all N rows), with fixed zip timestamps so the same rows
give the same bytes, to a temporary name that is renamed into place at the end.

The workdir and the output may be local or remote (gs://...): every path goes through `paths`
(a remote file is written locally and uploaded in one piece when complete, so a kill -9 leaves
either the whole object or none).
"""
import io
import json
import logging
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np

from .. import paths
from ..cli import progress_bar

log = logging.getLogger("detailflow_jax")

MANIFEST = "manifest.json"
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: identical rows -> identical bytes


class ChunkStoreError(ValueError):
  """A workdir that cannot be resumed by this job; the message names the file and field."""


def write_json_atomically(path, obj) -> None:
  """The evaluation jobs' JSON files (manifest, results): sorted keys, written atomically."""
  with paths.atomic_file(path) as tmp:
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))


def _first_difference(a, b, prefix: str = "") -> str | None:
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      d = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
      if d:
        return d
    return None
  return None if a == b else f"{prefix[:-1]} ({a!r} here, {b!r} in the manifest)"


class ChunkStore:
  """Chunks of `num_rows` rows of the named arrays (`arrays`: name -> (row shape, dtype))."""

  def __init__(self, directory, protocol: Mapping, num_rows: int, chunk_size: int,
               arrays: Mapping[str, tuple[Sequence[int], str]], writer: bool = True):
    if num_rows < 1 or chunk_size < 1:
      raise ValueError(f"num_rows ({num_rows}) and chunk_size ({chunk_size}) must be positive")
    self.directory = paths.run_path(directory)
    self.num_rows, self.chunk_size, self.writer = int(num_rows), int(chunk_size), writer
    self.arrays = {k: (tuple(int(d) for d in s), np.dtype(t).str) for k, (s, t) in arrays.items()}
    header = {"protocol": json.loads(json.dumps(dict(protocol))), "num_rows": self.num_rows,
              "chunk_size": self.chunk_size,
              "arrays": {k: [list(s), t] for k, (s, t) in self.arrays.items()}}
    path = self.directory / MANIFEST
    if path.is_file():
      try:
        stored = json.loads(path.read_text())
      except json.JSONDecodeError as e:
        raise ChunkStoreError(f"{path} is not valid JSON ({e}); delete the workdir to start over") from e
      diff = _first_difference(header, {k: stored.get(k) for k in header})
      if diff:
        raise ChunkStoreError(f"{path} belongs to another run: {diff}; use another workdir or delete it")
      self.chunks = dict(stored.get("chunks", {}))
    else:
      self.chunks = {}
      if writer:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_json_atomically(path, dict(header, chunks={}))
    self._header = header

  @property
  def num_chunks(self) -> int:
    return -(-self.num_rows // self.chunk_size)

  def rows(self, k: int) -> tuple[int, int]:
    start = k * self.chunk_size
    return start, min(start + self.chunk_size, self.num_rows)

  def path(self, k: int) -> paths.AnyPath:
    return self.directory / f"chunk-{k:06d}.npz"

  def is_done(self, k: int) -> bool:
    entry = self.chunks.get(str(k))
    p = self.path(k)
    return bool(entry) and p.is_file() and paths.file_size(p) == entry["size"]

  def pending(self) -> list[int]:
    return [k for k in range(self.num_chunks) if not self.is_done(k)]

  def fill(self, make_chunk: Callable[[int, int], Mapping[str, np.ndarray]], name: str,
           log_every_s: float = 10.0,
           after_chunk: Callable[[int, Mapping[str, np.ndarray]], None] | None = None):
    """Makes and writes every pending chunk: `make_chunk(start, stop)` -> its arrays (every
    process calls it: the work is sharded; only the writer writes), with `after_chunk(start,
    arrays)` (e.g. PNGs) run before the chunk is recorded, so a resumed run never skips it. Logs
    rate, chunks done and ETA. Returns (rows made, seconds)."""
    pending = self.pending()
    todo = sum(self.rows(k)[1] - self.rows(k)[0] for k in pending)
    t0, made, last = time.time(), 0, 0.0
    for k in pending:
      start, stop = self.rows(k)
      arrays = make_chunk(start, stop)
      if after_chunk is not None:  # before the manifest lists the chunk: a kill in between redoes both
        after_chunk(start, arrays)
      self.write(k, **arrays)
      made += stop - start
      now = time.time()
      if now - last >= log_every_s or made == todo:
        rate = made / max(now - t0, 1e-9)
        log.info("%s: %s chunk %d/%d, %d/%d new rows, %.2f rows/s, ETA %.0fs", name,
                 progress_bar(made, todo), k + 1, self.num_chunks, made, todo, rate,
                 (todo - made) / max(rate, 1e-9))
        last = now
    return made, time.time() - t0

  def write(self, k: int, **arrays: np.ndarray) -> None:
    """Writes chunk k (every array, rows of this chunk only) and records it."""
    start, stop = self.rows(k)
    if set(arrays) != set(self.arrays):
      raise ValueError(f"chunk {k}: arrays {sorted(arrays)} != {sorted(self.arrays)}")
    for name, value in arrays.items():
      shape, dtype = self.arrays[name]
      if value.shape != (stop - start,) + shape or value.dtype.str != dtype:
        raise ValueError(f"chunk {k}: {name!r} is {value.dtype} {value.shape}, expected "
                         f"{np.dtype(dtype)} {(stop - start,) + shape}")
    if not self.writer:
      return
    with paths.atomic_file(self.path(k)) as tmp:  # hashed locally, before any upload
      with open(tmp, "wb") as f:  # a file object: np.savez adds no ".npz"
        np.savez(f, **arrays)
      size, sha256 = tmp.stat().st_size, paths.file_sha256(tmp)
    self.chunks[str(k)] = {"rows": [start, stop], "size": size, "sha256": sha256}
    write_json_atomically(self.directory / MANIFEST, dict(self._header, chunks=self.chunks))

  def read(self, k: int, name: str) -> np.ndarray:
    p = self.path(k)
    entry = self.chunks.get(str(k))
    if entry is None or not p.is_file():
      raise ChunkStoreError(f"{p}: chunk {k} is not finished")
    source = io.BytesIO(p.read_bytes()) if paths.is_remote(p) else p
    with np.load(source, allow_pickle=False) as data:
      value = data[name]
    start, stop = self.rows(k)
    shape, dtype = self.arrays[name]
    if value.shape != (stop - start,) + shape or value.dtype.str != dtype:
      raise ChunkStoreError(f"{p}: {name!r} is {value.dtype} {value.shape}, expected {(stop - start,) + shape}")
    return value

  def blocks(self, name: str) -> Iterator[np.ndarray]:
    """The rows of `name` in order, one chunk at a time."""
    for k in range(self.num_chunks):
      yield self.read(k, name)

  def member(self, name: str):
    """(shape, dtype, blocks) of the whole array `name`, for write_npz_streaming."""
    shape, dtype = self.arrays[name]
    return (self.num_rows,) + shape, np.dtype(dtype), self.blocks(name)


def write_npz_streaming(path, members: Mapping[str, object]) -> paths.AnyPath:
  """An uncompressed `.npz` (what np.savez writes) from row blocks, atomically.

  members, written in order: key -> (full shape, dtype, iterable of C-contiguous row blocks
  that add up to it), or key -> a callable returning a whole (small) array, called only when
  its turn comes (so it may use what the blocks before it computed).
  """
  path = paths.run_path(path)
  with paths.atomic_file(path) as tmp:
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
      for key, member in members.items():
        info = zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_EPOCH)
        info.external_attr = 0o600 << 16
        with archive.open(info, "w", force_zip64=True) as f:
          if callable(member):
            np.lib.format.write_array(f, np.asarray(member()), allow_pickle=False)
            continue
          shape, dtype, blocks = member
          shape, dtype = tuple(int(d) for d in shape), np.dtype(dtype)
          np.lib.format.write_array_header_1_0(
              f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
          rows = 0
          for block in blocks:
            block = np.ascontiguousarray(block, dtype=dtype)
            if block.shape[1:] != shape[1:]:
              raise ValueError(f"{path}: a block of {key!r} has shape {block.shape}, rows of {shape[1:]} expected")
            f.write(memoryview(block.reshape(-1).view(np.uint8)))  # no copy
            rows += len(block)
          if rows != shape[0]:
            raise ValueError(f"{path}: {key!r} got {rows} rows, {shape[0]} expected")
  return path
