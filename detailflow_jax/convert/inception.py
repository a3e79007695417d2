"""The 2015-12-05 Inception weights (ADM's evaluator network) -> our `InceptionV3`.

Accepted files (nothing is downloaded; see the README for where to get them):
  * pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` and torch-fidelity's
    `weights-inception-2015-12-05-6726825d.pth`: a torchvision-style state dict
    (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`, ..., `fc.weight`,
    `fc.bias`; `*.bn.num_batches_tracked` where present), read with torch.load(weights_only=True).
  * TensorFlow's `classify_image_graph_def.pb` (the file ADM's evaluator loads): a GraphDef
    parsed with tensorboardX's bundled protos, no TensorFlow. Its weights are Const nodes
    `<scope>/conv2d_params` [kh, kw, in, out], `<scope>/batchnorm/{gamma,beta,moving_mean,
    moving_variance}`, `softmax/weights` [2048, 1008] and `softmax/biases`, where <scope> is the
    graph's name for each layer (conv, conv_1, ..., mixed/tower_1/conv_2, ..., mixed_10/...).
Every weight tensor of the file is used (the graph's other Consts are shape/size scalars of at
most a few elements; a bigger unknown Const is an error), every parameter is filled, shapes are
checked, and the output directory appears only when complete. Its config records the source
file's SHA-256 and `weights_sha256`, a hash of the parameter values themselves: the same weights
from the .pth and the .pb give the same one, and reference statistics carry it.
"""
import functools
import hashlib
import pathlib
from collections.abc import Mapping

import numpy as np
from flax import nnx

from .. import paths
from ..eval.inception import InceptionV3
from ..weights.model_dir import save_model_dir
from .common import ConversionError, StateDictReader, load_state_dict, write_atomically

KIND = "inception"
Path = tuple
# Unknown Consts up to this many elements are graph plumbing (concat dims, sizes, reshape shapes).
MAX_PLUMBING_CONST = 8
# The graph's BatchNormWithGlobalNormalization ops must normalise as our BatchNorm does.
BN_EPSILON = 1e-3

# ------------------------------------------------------------------------------ layer names ---

_STEM = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
         "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4"}


def _numbered(prefix: str, names: list[str]) -> dict[str, str]:
  """torch branch names in order -> the graph's tower/conv, tower/conv_1, tower/conv_2, ..."""
  return {n: f"{prefix}conv" + (f"_{i}" if i else "") for i, n in enumerate(names)}


_BLOCK_SCOPES = {
    "A": {"branch1x1": "conv", **_numbered("tower/", ["branch5x5_1", "branch5x5_2"]),
          **_numbered("tower_1/", ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]),
          "branch_pool": "tower_2/conv"},
    "B": {"branch3x3": "conv",
          **_numbered("tower/", ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"])},
    "C": {"branch1x1": "conv",
          **_numbered("tower/", ["branch7x7_1", "branch7x7_2", "branch7x7_3"]),
          **_numbered("tower_1/", [f"branch7x7dbl_{i}" for i in range(1, 6)]),
          "branch_pool": "tower_2/conv"},
    "D": {**_numbered("tower/", ["branch3x3_1", "branch3x3_2"]),
          **_numbered("tower_1/", [f"branch7x7x3_{i}" for i in range(1, 5)])},
    "E": {"branch1x1": "conv", "branch3x3_1": "tower/conv",
          **_numbered("tower/mixed/", ["branch3x3_2a", "branch3x3_2b"]),
          **_numbered("tower_1/", ["branch3x3dbl_1", "branch3x3dbl_2"]),
          **_numbered("tower_1/mixed/", ["branch3x3dbl_3a", "branch3x3dbl_3b"]),
          "branch_pool": "tower_2/conv"},
}
# torch block name -> (graph scope, block type)
_BLOCKS = {"Mixed_5b": ("mixed", "A"), "Mixed_5c": ("mixed_1", "A"), "Mixed_5d": ("mixed_2", "A"),
           "Mixed_6a": ("mixed_3", "B"), "Mixed_6b": ("mixed_4", "C"), "Mixed_6c": ("mixed_5", "C"),
           "Mixed_6d": ("mixed_6", "C"), "Mixed_6e": ("mixed_7", "C"), "Mixed_7a": ("mixed_8", "D"),
           "Mixed_7b": ("mixed_9", "E"), "Mixed_7c": ("mixed_10", "E")}

# Our BatchNorm variables -> (torch suffix, graph suffix).
_BN_NAMES = {"scale": ("weight", "gamma"), "bias": ("bias", "beta"),
             "mean": ("running_mean", "moving_mean"), "var": ("running_var", "moving_variance")}


def graph_scope(layer: tuple[str, ...]) -> str:
  """Our conv layer path, e.g. ('Mixed_6d', 'branch1x1') -> the graph's 'mixed_6/conv'."""
  if len(layer) == 1 and layer[0] in _STEM:
    return _STEM[layer[0]]
  if len(layer) == 2 and layer[0] in _BLOCKS:
    scope, kind = _BLOCKS[layer[0]]
    if layer[1] in _BLOCK_SCOPES[kind]:
      return f"{scope}/{_BLOCK_SCOPES[kind][layer[1]]}"
  raise ConversionError(f"no graph name for layer {'.'.join(layer)}")


# ------------------------------------------------------------------------------ the model -----

@functools.lru_cache(maxsize=1)
def abstract_state():
  """Flat (path, abstract Variable) pairs of InceptionV3, without allocating weights (the
  architecture is fixed: computed once, read only)."""
  return nnx.to_flat_state(nnx.state(nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))))


def _torch_entry(path: Path, shape) -> tuple[str, tuple[int, ...]]:
  """Our parameter -> (.pth key, .pth shape)."""
  *layer, module, leaf = [str(p) for p in path]
  if module == "conv":
    h, w, i, o = shape
    return ".".join([*layer, "conv", "weight"]), (o, i, h, w)
  if module == "bn":
    return ".".join([*layer, "bn", _BN_NAMES[leaf][0]]), tuple(shape)
  if module == "fc" and not layer:
    return ("fc.weight", tuple(reversed(shape))) if leaf == "kernel" else ("fc.bias", tuple(shape))
  raise ConversionError(f"no .pth key for parameter {'/'.join(map(str, path))}")


def expected_torch_keys(with_batch_counters: bool = True) -> dict[str, tuple[int, ...]]:
  """The `.pth` layout: key -> shape (566 entries with the BatchNorm
  `num_batches_tracked` counters, 472 without; 23,885,392 float values either way)."""
  out = {}
  for path, var in abstract_state():
    key, shape = _torch_entry(path, var.shape)
    out[key] = shape
    if with_batch_counters and key.endswith(".bn.running_var"):
      out[key[:-len("running_var")] + "num_batches_tracked"] = ()
  return out


def values_from_state_dict(state: Mapping[str, np.ndarray], source: str) -> dict[Path, np.ndarray]:
  """A pytorch-fid / torch-fidelity state dict -> {our path: array}."""
  reader = StateDictReader(state, source)
  values = {}
  for path, var in abstract_state():
    key, shape = _torch_entry(path, var.shape)
    value = reader.take(key, shape)
    if path[-1] == "kernel":
      value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    values[path] = np.ascontiguousarray(value, dtype=np.float32)
    counter = key[:-len("running_var")] + "num_batches_tracked"
    if key.endswith(".bn.running_var") and counter in reader:
      reader.skip(counter)  # Training bookkeeping; eval-mode BatchNorm never reads it.
  reader.finish()
  return values


# ------------------------------------------------------------------------------ the GraphDef --

_TF_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64}


def _tensor_to_numpy(tensor, name: str) -> np.ndarray:
  """A TensorProto (numeric dtypes) -> numpy, from tensor_content or the *_val fields."""
  if tensor.dtype not in _TF_DTYPES:
    return np.zeros((0,), np.uint8)  # strings and other non-numeric Consts carry no weights
  dtype = np.dtype(_TF_DTYPES[tensor.dtype]).newbyteorder("<")
  shape = tuple(int(d.size) for d in tensor.tensor_shape.dim)
  count = int(np.prod(shape)) if shape else 1
  if tensor.tensor_content:
    flat = np.frombuffer(tensor.tensor_content, dtype=dtype)
  else:
    field = {np.float32: tensor.float_val, np.float64: tensor.double_val, np.int32: tensor.int_val,
             np.int64: tensor.int64_val}[_TF_DTYPES[tensor.dtype]]
    flat = np.asarray(list(field), dtype=dtype)
    if flat.size == 1 and count > 1:
      flat = np.full(count, flat[0], dtype)  # TF repeats a single value to fill the shape
    elif flat.size == 0:
      flat = np.zeros(count, dtype)
  if flat.size != count:
    raise ConversionError(f"Const {name!r}: {flat.size} values for shape {shape}")
  return flat.astype(dtype.newbyteorder("=")).reshape(shape)


def read_graphdef(path) -> dict[str, np.ndarray]:
  """Every numeric Const node of a GraphDef file, by node name; checks the BatchNorm ops' eps."""
  from google.protobuf.message import DecodeError
  from tensorboardX.proto import graph_pb2
  path = pathlib.Path(path)
  graph = graph_pb2.GraphDef()
  try:
    graph.ParseFromString(path.read_bytes())
  except DecodeError as e:
    raise ConversionError(f"{path} is not a TensorFlow GraphDef: {e}") from e
  consts = {}
  for node in graph.node:
    if node.op == "Const":
      consts[node.name] = _tensor_to_numpy(node.attr["value"].tensor, node.name)
    elif node.op == "BatchNormWithGlobalNormalization":
      eps = node.attr["variance_epsilon"].f  # a float32 attr
      scaled = node.attr["scale_after_normalization"].b
      if abs(eps - BN_EPSILON) > 1e-9 or not scaled:
        raise ConversionError(f"{path}: node {node.name!r} has variance_epsilon={eps:.7g}, "
                              f"scale_after_normalization={scaled}; expected {BN_EPSILON}, True")
  if not consts:
    raise ConversionError(f"{path}: the GraphDef has no Const nodes (is it a frozen graph?)")
  return consts


def values_from_graphdef(consts: Mapping[str, np.ndarray], source: str) -> dict[Path, np.ndarray]:
  """The graph's weight Consts -> {our path: array}; every weight-sized Const must be used."""
  reader = StateDictReader(consts, source)
  values = {}
  for path, var in abstract_state():
    *layer, module, leaf = [str(p) for p in path]
    if module == "conv":
      node = f"{graph_scope(tuple(layer))}/conv2d_params"
    elif module == "bn":
      node = f"{graph_scope(tuple(layer))}/batchnorm/{_BN_NAMES[leaf][1]}"
    else:
      node = "softmax/weights" if leaf == "kernel" else "softmax/biases"
    values[path] = np.ascontiguousarray(reader.take(node, var.shape), dtype=np.float32)
  for name in reader.keys():
    if name not in values and consts[name].size <= MAX_PLUMBING_CONST:
      reader.skip(name)
  reader.finish()
  return values


# ------------------------------------------------------------------------------ output --------

def weights_sha256(values: Mapping[Path, np.ndarray]) -> str:
  """A hash of the parameter values (path, shape and float32 bytes, in path order)."""
  h = hashlib.sha256()
  for path in sorted(values, key=lambda p: tuple(map(str, p))):
    arr = np.ascontiguousarray(values[path], dtype="<f4")
    h.update("/".join(map(str, path)).encode() + repr(arr.shape).encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def model_from_values(values: Mapping[Path, np.ndarray]) -> InceptionV3:
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0))))
  flat = [(p, var.replace(np.asarray(values[p]))) for p, var in nnx.to_flat_state(abstract)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def read_values(checkpoint) -> tuple[dict[Path, np.ndarray], str]:
  """(values, format) of a .pth/.pt/.bin state dict or a .pb GraphDef."""
  checkpoint = pathlib.Path(checkpoint)
  if not checkpoint.is_file():
    raise ConversionError(
        f"Inception weights not found: {checkpoint}. Get pytorch-fid's "
        "pt_inception-2015-12-05-6726825d.pth (github.com/mseitzer/pytorch-fid releases), "
        "torch-fidelity's weights-inception-2015-12-05-6726825d.pth (github.com/toshas/"
        "torch-fidelity releases v0.2.0) or classify_image_graph_def.pb (inside "
        "download.tensorflow.org/models/image/imagenet/inception-2015-12-05.tgz)")
  if checkpoint.suffix == ".pb":
    return values_from_graphdef(read_graphdef(checkpoint), str(checkpoint)), "graphdef"
  return values_from_state_dict(load_state_dict(checkpoint), str(checkpoint)), "state_dict"


def convert_inception(checkpoint, out) -> pathlib.Path:
  """`python -m detailflow_jax.convert inception --checkpoint FILE --out DIR`."""
  values, fmt = read_values(checkpoint)
  model = model_from_values(values)
  config = {"source_file": pathlib.Path(checkpoint).name, "source_format": fmt,
            "source_sha256": paths.file_sha256(checkpoint), "weights_sha256": weights_sha256(values)}
  return write_atomically(out, lambda tmp: save_model_dir(tmp, KIND, config, model))
