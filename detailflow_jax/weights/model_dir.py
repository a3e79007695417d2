"""A converted model on disk: `DIR/config.json` (kind + model config) and `DIR/params/` (Orbax).

Both the tokenizer and the GPT use this layout, so one saver and one restorer serve both.
`config.json` also lists every file under `params/` with its size and SHA-256, written after
the arrays: a truncated or missing array file is caught before Orbax reads anything (Orbax
itself reports an OCDBT byte-range error and leaves tensorstore callbacks printing "Event loop
is closed" tracebacks), and `verify_model_dir(..., checksums=True)` also catches changed bytes.
"""
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from .. import paths

# 2: the GPT's q/k/v kernel is grouped by kv head ([dim, kv_heads, R + 2, head_dim], see
# models.gpt.Attention); format-1 GPT directories hold the fused [dim, (H + 2K) * hd] kernel.
FORMAT_VERSION = 2
# kind -> the oldest format this code reads unchanged.
_OLDEST_READABLE = {"gpt": 2}
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


class DamagedModelError(ValueError):
  """A converted model directory whose files are missing, truncated or changed."""


def _params_files(directory) -> dict[str, dict[str, Any]]:
  root = directory / PARAMS_DIR
  return {f"{PARAMS_DIR}/{os.fspath(p)[len(os.fspath(root)) + 1:]}":
          {"size": paths.file_size(p), "sha256": paths.file_sha256(p)} for p in paths.files_under(root)}


def _checkpointer(process_local: bool = False):
  if not process_local:
    return ocp.StandardCheckpointer()
  # Written by the calling process alone (host arrays): Orbax must not wait for the others.
  me = jax.process_index()
  return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}))


def save_model_dir(directory, kind: str, config: dict[str, Any], model: nnx.Module) -> None:
  """Writes `model`'s state (params and buffers) and its config into an existing directory,
  from the calling process alone: the arrays must be addressable here (e.g. host copies)."""
  directory = paths.run_path(directory)
  state = nnx.to_pure_dict(nnx.state(model))
  float_dtypes = {str(x.dtype) for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)}
  if len(float_dtypes) > 1:
    raise ValueError(f"mixed parameter dtypes {sorted(float_dtypes)}; convert to one dtype first")
  ckpt = _checkpointer(process_local=True)
  ckpt.save(directory / PARAMS_DIR, state)
  ckpt.wait_until_finished()
  (directory / CONFIG_FILE).write_text(json.dumps(
      {"kind": kind, "format_version": FORMAT_VERSION,
       "param_dtype": float_dtypes.pop() if float_dtypes else "float32", "config": config,
       "files": _params_files(directory)},
      indent=2))


def read_model_config(directory, kind: str) -> dict[str, Any]:
  return _read_meta(directory, kind)["config"]


def is_model_dir(directory) -> bool:
  """True for a converted model directory (ours), False for anything else (e.g. a released run
  directory, whose config.json has no "kind")."""
  path = paths.run_path(directory) / CONFIG_FILE
  if not path.is_file() or not (paths.run_path(directory) / PARAMS_DIR).is_dir():
    return False
  try:
    return "kind" in json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError):
    return True  # ours, but damaged: restoring it says so


def _redo_hint(directory) -> str:
  return (f"delete {directory} and convert again (python -m detailflow_jax.convert ... --out "
          f"{directory}, or pass the Hub id / run directory it came from)")


def _read_meta(directory, kind: str) -> dict[str, Any]:
  directory = paths.run_path(directory)
  path = directory / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{directory} is not a converted model directory: no {CONFIG_FILE}")
  try:
    meta = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DamagedModelError(f"{directory} is damaged: {CONFIG_FILE} is not valid JSON ({e}); "
                            f"{_redo_hint(directory)}") from None
  if meta.get("kind") != kind:
    raise ValueError(f"{directory} holds a {meta.get('kind')!r} model, not a {kind!r}")
  version = meta.get("format_version", 1)
  if version < _OLDEST_READABLE.get(kind, 1):
    raise DamagedModelError(f"{directory} is an outdated {kind} directory (format {version}, the "
                            f"parameter layout changed in format {_OLDEST_READABLE[kind]}); "
                            f"{_redo_hint(directory)}")
  return meta


def verify_model_dir(directory, kind: str, checksums: bool = False) -> dict[str, Any]:
  """Checks every listed array file exists with its recorded size (and SHA-256 with
  `checksums`); returns the metadata. Directories written before the listing existed are
  checked for the params directory only."""
  directory = paths.run_path(directory)
  meta = _read_meta(directory, kind)
  if not (directory / PARAMS_DIR).is_dir():
    raise DamagedModelError(f"{directory} is damaged: no {PARAMS_DIR}/ directory; {_redo_hint(directory)}")
  problems = []  # all of them, so the one line says everything that is wrong
  for name, want in (meta.get("files") or {}).items():
    path = directory / name
    if not path.is_file():
      problems.append(f"{name} is missing")
    elif paths.file_size(path) != want["size"]:
      problems.append(f"{name} has {paths.file_size(path)} bytes, {want['size']} were written")
    elif checksums and paths.file_sha256(path) != want["sha256"]:
      problems.append(f"{name} has changed (SHA-256 differs)")
  if problems:
    raise DamagedModelError(f"{directory} is damaged: {', '.join(problems)}; {_redo_hint(directory)}")
  return meta


def restore_model_dir(directory, kind: str, build: Callable[[dict[str, Any]], nnx.Module],
                      dtype=None) -> tuple[nnx.Module, dict[str, Any]]:
  """Builds the model from its saved config and fills it with the saved state.

  The model is built abstractly first (no random init of full-size weights), then the restored
  arrays are put in place. `dtype` casts floating parameters (e.g. jnp.bfloat16).
  """
  directory = paths.run_path(directory)
  meta = verify_model_dir(directory, kind)
  config = meta["config"]
  dtype = jnp.dtype(dtype or meta.get("param_dtype", "float32"))
  abstract = nnx.eval_shape(lambda: build(config))
  graphdef, abstract_state = nnx.split(abstract)
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype),
      nnx.to_pure_dict(abstract_state))
  try:
    restored = _checkpointer().restore(directory / PARAMS_DIR, target)
  except Exception as e:  # tensorstore/Orbax errors have many types; all mean unreadable arrays
    # Other reads are still in flight; if the caller exits at once, their callbacks reach the
    # closed event loop during interpreter shutdown and print "Event loop is closed"
    # tracebacks. Only directories without a file listing (written before it) get here.
    time.sleep(1.0)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DamagedModelError(f"{directory} is damaged: its arrays cannot be read ({first[:300]}); "
                            f"{_redo_hint(directory)}") from None
  nnx.replace_by_pure_dict(abstract_state, restored)
  return nnx.merge(graphdef, abstract_state), config
