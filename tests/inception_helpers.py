"""Deterministic random Inception weights in the `.pth` layout, and a synthetic TF GraphDef.

No real Inception weights exist on the test machines, so parity is checked with random weights
that both sides regenerate from a numpy seed: tests/scripts/make_inception_golden.py feeds them
to torch-fidelity's FeatureExtractorInceptionV3, the tests to our converter.
"""
import functools

import numpy as np

GOLDEN_SEED = 20151205


@functools.lru_cache(maxsize=2)
def random_inception_state_dict(seed: int = GOLDEN_SEED):
  """{.pth key: float32 array (int64 for num_batches_tracked)} with He-scaled conv weights and
  BatchNorm statistics near identity, so activations stay O(1) through all 94 layers. Cached:
  callers must not modify the arrays in place."""
  from detailflow_jax.convert.inception import expected_torch_keys
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in sorted(expected_torch_keys().items()):
    if key.endswith("num_batches_tracked"):
      out[key] = np.asarray(int(rng.integers(0, 1000)), np.int64)
    elif key.endswith("conv.weight"):
      fan_in = shape[1] * shape[2] * shape[3]
      out[key] = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    elif key.endswith("bn.weight"):
      out[key] = rng.uniform(0.8, 1.2, shape)
    elif key.endswith("bn.bias") or key.endswith("bn.running_mean"):
      out[key] = rng.standard_normal(shape) * 0.1
    elif key.endswith("bn.running_var"):
      out[key] = rng.uniform(0.5, 1.5, shape)
    elif key == "fc.weight":
      out[key] = rng.standard_normal(shape) / np.sqrt(shape[1])
    elif key == "fc.bias":
      out[key] = rng.standard_normal(shape) * 0.1
    else:
      raise KeyError(f"no random initialiser for {key}")
    if out[key].dtype == np.float64:
      out[key] = out[key].astype(np.float32)
  return out


def golden_inputs(size: int, batch: int, seed: int = GOLDEN_SEED) -> np.ndarray:
  """uint8 NHWC images for one (size, batch) case of the golden file."""
  rng = np.random.default_rng([seed, size, batch])
  return rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def import_torch_fidelity_inception():
  """torch-fidelity's FeatureExtractorInceptionV3 class, imported without the package
  `__init__` (which imports torchvision). Raises ImportError when torch-fidelity is absent."""
  import importlib.util
  import sys
  import types
  if "torch_fidelity" not in sys.modules:
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
      raise ImportError("torch-fidelity is not installed (pip install --no-deps torch-fidelity==0.4.0)")
    stub = types.ModuleType("torch_fidelity")
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = stub
  from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
  return FeatureExtractorInceptionV3


def torch_fidelity_model(state_dict, dtype: str, tmp_dir):
  """torch-fidelity's module holding `state_dict` (loaded strictly, via its own weights-path
  argument) computing in `dtype` ('float32' or 'float64')."""
  import pathlib

  import torch
  cls = import_torch_fidelity_inception()
  path = pathlib.Path(tmp_dir) / "random-inception.pth"
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, path)
  model = cls("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path),
              feature_extractor_internal_dtype=dtype)
  # torch-fidelity 0.4.0's helpers.text_to_dtype maps "float64" to torch.float32, so its float64
  # option silently computes in float32. Set the dtype it casts the module and inputs to ourselves.
  model.feature_extractor_internal_dtype = getattr(torch, dtype)
  return model.to(getattr(torch, dtype))


def torch_fidelity_outputs(model, images_u8):
  """(pool [N, 2048], spatial [N, 2023], logits [N, 1008]) as numpy in the model's dtype.

  torch-fidelity casts its outputs to float32, so the float64 values are taken where they are
  computed: pool from a forward hook on `AvgPool`, the unbiased logits as the module computes
  them (pool.mm(fc.weight.T)). It has no sFID output: ADM's `mixed_6/conv:0` is the output of
  `Mixed_6d.branch1x1` (after its ReLU), caught with a forward hook, first 7 channels, NCHW
  permuted to NHWC and flattened in (h, w, c) order.
  """
  import torch
  caught = {}
  hooks = [model.AvgPool.register_forward_hook(lambda m, i, o: caught.__setitem__("pool", o.clone())),
           model.Mixed_6d.branch1x1.register_forward_hook(
               lambda m, i, o: caught.__setitem__("mixed_6_conv", o.clone()))]
  try:
    with torch.no_grad():
      x = torch.from_numpy(np.ascontiguousarray(images_u8.transpose(0, 3, 1, 2)))
      pool32, logits32 = model(x)
      pool = torch.flatten(caught["pool"], 1)
      logits = pool.mm(model.fc.weight.T)
      spatial = caught["mixed_6_conv"][:, :7].permute(0, 2, 3, 1).reshape(len(x), -1)
  finally:
    for h in hooks:
      h.remove()
  # The hooks see what the module returns (up to its final cast to float32).
  assert torch.equal(pool.to(torch.float32), pool32) and torch.equal(logits.to(torch.float32), logits32)
  return pool.numpy(), spatial.numpy(), logits.numpy()


def write_synthetic_graphdef(state_dict, path, layer_names, extra_consts=None, bn_epsilon=1e-3):
  """A GraphDef shaped like classify_image_graph_def.pb holding `state_dict`'s weights.

  layer_names: [(torch prefix, graph scope)] for the 94 conv layers. Each layer gets the
  graph's Const nodes (<scope>/conv2d_params as [kh, kw, in, out], <scope>/batchnorm/{gamma,
  beta,moving_mean,moving_variance}) and its Conv2D / BatchNormWithGlobalNormalization / Relu
  ops; plus softmax/weights [2048, 1008], softmax/biases, and the graph's small plumbing Consts
  (sizes, concat dims, the (x - 128) * (1/128) scalars) and a string Const.
  """
  from tensorboardX.proto import graph_pb2
  graph = graph_pb2.GraphDef()

  def const(name, value):
    value = np.asarray(value)
    node = graph.node.add(name=name, op="Const")
    tensor = node.attr["value"].tensor
    tensor.dtype = {np.dtype(np.float32): 1, np.dtype(np.int32): 3}[value.dtype]
    for d in value.shape:
      tensor.tensor_shape.dim.add(size=d)
    if value.ndim == 0:  # scalars the way TF writes them: a *_val field, no tensor_content
      (tensor.float_val if value.dtype == np.float32 else tensor.int_val).append(value.item())
    else:
      tensor.tensor_content = value.astype(value.dtype.newbyteorder("<")).tobytes()

  string = graph.node.add(name="DecodeJpeg/contents", op="Const")
  string.attr["value"].tensor.dtype = 7
  string.attr["value"].tensor.string_val.append(b"")
  const("ExpandDims/dim", np.int32(0))
  const("ResizeBilinear/size", np.array([299, 299], np.int32))
  const("Sub/y", np.float32(128))
  const("Mul/y", np.float32(1 / 128))
  previous = "Mul"
  for prefix, scope in layer_names:
    const(f"{scope}/conv2d_params", state_dict[f"{prefix}.conv.weight"].transpose(2, 3, 1, 0))
    for ours, theirs in (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
                         ("running_var", "moving_variance")):
      const(f"{scope}/batchnorm/{theirs}", state_dict[f"{prefix}.bn.{ours}"])
    graph.node.add(name=f"{scope}/Conv2D", op="Conv2D", input=[previous, f"{scope}/conv2d_params"])
    bn = graph.node.add(name=f"{scope}/batchnorm", op="BatchNormWithGlobalNormalization",
                        input=[f"{scope}/Conv2D"] + [f"{scope}/batchnorm/{s}" for s in
                                                     ("moving_mean", "moving_variance", "beta", "gamma")])
    bn.attr["variance_epsilon"].f = bn_epsilon
    bn.attr["scale_after_normalization"].b = True
    graph.node.add(name=scope, op="Relu", input=[f"{scope}/batchnorm"])
    previous = scope
    if scope.endswith("tower_2/conv"):
      const(scope.split("/")[0] + "/join/concat_dim", np.int32(3))
  const("pool_3/_reshape/shape", np.array([1, 2048], np.int32))
  const("softmax/weights", np.ascontiguousarray(state_dict["fc.weight"].T))
  const("softmax/biases", state_dict["fc.bias"])
  for name, value in (extra_consts or {}).items():
    const(name, value)
  with open(path, "wb") as f:
    f.write(graph.SerializeToString())
  return path
