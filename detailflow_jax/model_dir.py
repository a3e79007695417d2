"""A converted model on disk: `DIR/config.json` (kind + model config) and `DIR/params/` (Orbax).

Both the tokenizer and the GPT use this layout, so one saver and one restorer serve both.
"""
import json
import pathlib
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def _checkpointer():
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer()


def save_model_dir(directory, kind: str, config: Dict[str, Any], model: nnx.Module) -> None:
  """Writes `model`'s state (params and buffers) and its config into an existing directory."""
  directory = pathlib.Path(directory).absolute()
  state = nnx.to_pure_dict(nnx.state(model))
  float_dtypes = {str(x.dtype) for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)}
  if len(float_dtypes) > 1:
    raise ValueError(f"mixed parameter dtypes {sorted(float_dtypes)}; convert to one dtype first")
  ckpt = _checkpointer()
  ckpt.save(directory / PARAMS_DIR, state)
  ckpt.wait_until_finished()
  (directory / CONFIG_FILE).write_text(json.dumps(
      {"kind": kind, "format_version": FORMAT_VERSION,
       "param_dtype": float_dtypes.pop() if float_dtypes else "float32", "config": config},
      indent=2))


def read_model_config(directory, kind: str) -> Dict[str, Any]:
  return _read_meta(directory, kind)["config"]


def _read_meta(directory, kind: str) -> Dict[str, Any]:
  directory = pathlib.Path(directory)
  path = directory / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{directory} is not a converted model directory: no {CONFIG_FILE}")
  meta = json.loads(path.read_text())
  if meta.get("kind") != kind:
    raise ValueError(f"{directory} holds a {meta.get('kind')!r} model, not a {kind!r}")
  return meta


def restore_model_dir(directory, kind: str, build: Callable[[Dict[str, Any]], nnx.Module],
                      dtype=None) -> Tuple[nnx.Module, Dict[str, Any]]:
  """Builds the model from its saved config and fills it with the saved state.

  The model is built abstractly first (no random init of full-size weights), then the restored
  arrays are put in place. `dtype` casts floating parameters (e.g. jnp.bfloat16).
  """
  directory = pathlib.Path(directory).absolute()
  meta = _read_meta(directory, kind)
  config = meta["config"]
  dtype = jnp.dtype(dtype or meta.get("param_dtype", "float32"))
  abstract = nnx.eval_shape(lambda: build(config))
  graphdef, abstract_state = nnx.split(abstract)
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype),
      nnx.to_pure_dict(abstract_state))
  restored = _checkpointer().restore(directory / PARAMS_DIR, target)
  nnx.replace_by_pure_dict(abstract_state, restored)
  return nnx.merge(graphdef, abstract_state), config
