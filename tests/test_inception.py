"""Inception parity with torch-fidelity 0.4.0's FeatureExtractorInceptionV3 (random weights).

The golden file (tests/scripts/make_inception_golden.py) holds torch-fidelity's pool / spatial /
logits for sizes 64..512, batches 1 and 3, float64 and float32. Here the same weights are
regenerated from the seed, converted by our converter and run: the resize is compiled per input
shape, the network once per (dtype, batch).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES
from flax import nnx
from inception_helpers import golden_inputs, random_inception_state_dict

from detailflow_jax.convert.inception import expected_torch_keys, model_from_values, values_from_state_dict
from detailflow_jax.eval.inception import cast_model, preprocess

SIZES = (64, 128, 256, 299, 512)
BATCHES = (1, 3)
OUTPUTS = ("pool", "spatial", "logits")
TOLERANCE = {"float64": 1e-9, "float32": 1e-4}


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def golden():
  with np.load(FIXTURES / "inception_golden.npz", allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def random_state():
  return random_inception_state_dict()


@pytest.fixture(scope="module")
def model(random_state):
  return model_from_values(values_from_state_dict(random_state, "random weights"))


def test_pth_layout_inventory(golden, random_state):
  layout = {k: tuple(v) for k, v in json.loads(str(golden["pth_layout"])).items()}
  ours = expected_torch_keys()
  assert ours == layout
  assert len(ours) == 566
  assert sum(int(np.prod(s)) for k, s in ours.items() if not k.endswith("num_batches_tracked")) == 23_885_392
  assert set(random_state) == set(layout)


def _run_all(model, dtype):
  network = nnx.jit(lambda m, x: m.from_preprocessed(x))
  resize = jax.jit(preprocess, static_argnums=1)
  out = {}
  for size in SIZES:
    for batch in BATCHES:
      x = resize(jnp.asarray(golden_inputs(size, batch)), jnp.dtype(dtype))
      out[size, batch] = {k: np.asarray(v) for k, v in network(model, x).items()}
  return out


@pytest.fixture(scope="module")
def ours(model):
  """Our outputs for every golden case, both dtypes (computed once for the module)."""
  out = {}
  for dtype in ("float64", "float32"):
    with jax.enable_x64(dtype == "float64"):
      out[dtype] = _run_all(cast_model(model, dtype), dtype)
  return out


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_parity_with_torch_fidelity(ours, golden, dtype):
  worst = {}
  for (size, batch), outs in ours[dtype].items():
    for name in OUTPUTS:
      ref = golden[f"{dtype}_{size}_b{batch}_{name}"]
      assert outs[name].dtype == np.dtype(dtype)
      worst[f"{size}_b{batch}_{name}"] = rel_err(outs[name], ref)
  print(dtype, "worst relative error", max(worst.values()))
  bad = {k: v for k, v in worst.items() if not v <= TOLERANCE[dtype]}
  assert not bad, f"{dtype}: relative errors above {TOLERANCE[dtype]}: {bad}"


def test_full_call_is_preprocess_then_network(model, golden):
  """model(images) (what feature extraction runs) = from_preprocessed(preprocess(images))."""
  out = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(golden_inputs(299, 1)))
  for name in OUTPUTS:
    assert rel_err(out[name], golden[f"float32_299_b1_{name}"]) <= TOLERANCE["float32"]


def test_live_torch_fidelity(ours, random_state, golden, tmp_path):
  """torch-fidelity itself, where it is installed: the golden file is what it computes (up to
  torch's thread-dependent summation order), and our outputs match it live."""
  try:
    from inception_helpers import import_torch_fidelity_inception, torch_fidelity_model, torch_fidelity_outputs
    import_torch_fidelity_inception()
  except ImportError as e:
    pytest.skip(f"torch-fidelity is not importable here ({e}); the golden file stands in for it")
  size, batch = 128, 3
  for dtype in ("float64", "float32"):
    live = torch_fidelity_outputs(torch_fidelity_model(random_state, dtype, tmp_path), golden_inputs(size, batch))
    for name, value in zip(OUTPUTS, live):
      assert rel_err(value, golden[f"{dtype}_{size}_b{batch}_{name}"]) <= {"float64": 1e-12, "float32": 1e-5}[dtype]
      assert rel_err(ours[dtype][size, batch][name], value) <= TOLERANCE[dtype]
