"""`python -m detailflow_jax.convert inception`: the .pth layout and the TF GraphDef give the
same model; bad files give errors naming the key, the node and the shapes."""

import numpy as np
import pytest
from inception_helpers import random_inception_state_dict, write_synthetic_graphdef

from detailflow_jax.convert.common import ConversionError
from detailflow_jax.convert.inception import read_graphdef, values_from_graphdef, values_from_state_dict, weights_sha256

# The 2015-12-05 graph's name for each conv layer (checked once against torch-fidelity's
# utils/util_convert_inception_weights.py); "a.b c" = torch prefix a.b, graph scope c.
GRAPH_NAMES = [line.split() for line in """
Conv2d_1a_3x3 conv
Conv2d_2a_3x3 conv_1
Conv2d_2b_3x3 conv_2
Conv2d_3b_1x1 conv_3
Conv2d_4a_3x3 conv_4
Mixed_5b.branch1x1 mixed/conv
Mixed_5b.branch3x3dbl_1 mixed/tower_1/conv
Mixed_5b.branch3x3dbl_2 mixed/tower_1/conv_1
Mixed_5b.branch3x3dbl_3 mixed/tower_1/conv_2
Mixed_5b.branch5x5_1 mixed/tower/conv
Mixed_5b.branch5x5_2 mixed/tower/conv_1
Mixed_5b.branch_pool mixed/tower_2/conv
Mixed_5c.branch1x1 mixed_1/conv
Mixed_5c.branch3x3dbl_1 mixed_1/tower_1/conv
Mixed_5c.branch3x3dbl_2 mixed_1/tower_1/conv_1
Mixed_5c.branch3x3dbl_3 mixed_1/tower_1/conv_2
Mixed_5c.branch5x5_1 mixed_1/tower/conv
Mixed_5c.branch5x5_2 mixed_1/tower/conv_1
Mixed_5c.branch_pool mixed_1/tower_2/conv
Mixed_5d.branch1x1 mixed_2/conv
Mixed_5d.branch3x3dbl_1 mixed_2/tower_1/conv
Mixed_5d.branch3x3dbl_2 mixed_2/tower_1/conv_1
Mixed_5d.branch3x3dbl_3 mixed_2/tower_1/conv_2
Mixed_5d.branch5x5_1 mixed_2/tower/conv
Mixed_5d.branch5x5_2 mixed_2/tower/conv_1
Mixed_5d.branch_pool mixed_2/tower_2/conv
Mixed_6a.branch3x3 mixed_3/conv
Mixed_6a.branch3x3dbl_1 mixed_3/tower/conv
Mixed_6a.branch3x3dbl_2 mixed_3/tower/conv_1
Mixed_6a.branch3x3dbl_3 mixed_3/tower/conv_2
""".strip().splitlines()]
for block, scope in (("Mixed_6b", "mixed_4"), ("Mixed_6c", "mixed_5"), ("Mixed_6d", "mixed_6"),
                     ("Mixed_6e", "mixed_7")):
  GRAPH_NAMES += [[f"{block}.branch1x1", f"{scope}/conv"]]
  GRAPH_NAMES += [[f"{block}.branch7x7_{i + 1}", f"{scope}/tower/conv" + (f"_{i}" if i else "")] for i in range(3)]
  GRAPH_NAMES += [[f"{block}.branch7x7dbl_{i + 1}", f"{scope}/tower_1/conv" + (f"_{i}" if i else "")] for i in range(5)]
  GRAPH_NAMES += [[f"{block}.branch_pool", f"{scope}/tower_2/conv"]]
GRAPH_NAMES += [line.split() for line in """
Mixed_7a.branch3x3_1 mixed_8/tower/conv
Mixed_7a.branch3x3_2 mixed_8/tower/conv_1
Mixed_7a.branch7x7x3_1 mixed_8/tower_1/conv
Mixed_7a.branch7x7x3_2 mixed_8/tower_1/conv_1
Mixed_7a.branch7x7x3_3 mixed_8/tower_1/conv_2
Mixed_7a.branch7x7x3_4 mixed_8/tower_1/conv_3
""".strip().splitlines()]
for block, scope in (("Mixed_7b", "mixed_9"), ("Mixed_7c", "mixed_10")):
  GRAPH_NAMES += [[f"{block}.{a}", f"{scope}/{b}"] for a, b in (
      ("branch1x1", "conv"), ("branch3x3_1", "tower/conv"), ("branch3x3_2a", "tower/mixed/conv"),
      ("branch3x3_2b", "tower/mixed/conv_1"), ("branch3x3dbl_1", "tower_1/conv"),
      ("branch3x3dbl_2", "tower_1/conv_1"), ("branch3x3dbl_3a", "tower_1/mixed/conv"),
      ("branch3x3dbl_3b", "tower_1/mixed/conv_1"), ("branch_pool", "tower_2/conv"))]


@pytest.fixture(scope="module")
def state():
  return random_inception_state_dict()


@pytest.fixture(scope="module")
def pth_values(state):
  return values_from_state_dict(state, "random")


@pytest.fixture(scope="module")
def graph_file(state, tmp_path_factory):
  assert len(GRAPH_NAMES) == 94
  return write_synthetic_graphdef(state, tmp_path_factory.mktemp("pb") / "classify_image_graph_def.pb",
                                  GRAPH_NAMES)


def test_graphdef_gives_the_pth_model(pth_values, graph_file):
  pb_values = values_from_graphdef(read_graphdef(graph_file), str(graph_file))
  assert pb_values.keys() == pth_values.keys()
  for path in pth_values:
    np.testing.assert_array_equal(pb_values[path], pth_values[path], err_msg=str(path))
  assert weights_sha256(pb_values) == weights_sha256(pth_values)


def test_cli_converts_both_formats_to_one_model(inception_random_dir, tmp_path):
  """The session's .pth conversion (golden seed) and the CLI on a GraphDef of the same weights."""
  from flax import nnx

  from detailflow_jax.convert.__main__ import main
  from detailflow_jax.eval.inception import load_inception
  from detailflow_jax.paths import file_sha256
  pb = write_synthetic_graphdef(random_inception_state_dict(), tmp_path / "classify_image_graph_def.pb", GRAPH_NAMES)
  assert main(["inception", "--checkpoint", str(pb), "--out", str(tmp_path / "b")]) == 0
  (model_a, info_a), (model_b, info_b) = load_inception(inception_random_dir), load_inception(tmp_path / "b")
  assert info_a["source_format"] == "state_dict" and info_b["source_format"] == "graphdef"
  assert info_a["weights_sha256"] == info_b["weights_sha256"] != info_a["source_sha256"]
  assert info_b["source_sha256"] == file_sha256(pb)
  flat_b = dict(nnx.to_flat_state(nnx.state(model_b)))
  for path, var in nnx.to_flat_state(nnx.state(model_a)):
    np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(flat_b[path].get_value()))
  # Options that only the DetailFlow converters have are refused, not ignored.
  assert main(["inception", "--checkpoint", str(pb), "--out", str(tmp_path / "c"), "--dtype", "bfloat16"]) == 2
  assert not (tmp_path / "c").exists()


def test_state_dict_errors_name_the_key(state):
  bad = dict(state)
  del bad["Mixed_6d.branch1x1.bn.running_var"]
  with pytest.raises(ConversionError, match=r"missing key 'Mixed_6d.branch1x1.bn.running_var' \(expected shape \(192,\)\)"):
    values_from_state_dict(bad, "f.pth")
  bad = dict(state, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
  with pytest.raises(ConversionError, match=r"'fc.weight' has shape \(1000, 2048\), expected \(1008, 2048\)"):
    values_from_state_dict(bad, "f.pth")
  bad = dict(state, **{"AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
  with pytest.raises(ConversionError, match=r"unexpected key\(s\) 'AuxLogits.fc.weight' \(1000, 768\)"):
    values_from_state_dict(bad, "f.pth")


def test_graphdef_errors_name_the_node(state, tmp_path):
  consts = read_graphdef(write_synthetic_graphdef(
      state, tmp_path / "extra.pb", GRAPH_NAMES, extra_consts={"logits/extra_weights": np.ones((10, 10), np.float32)}))
  with pytest.raises(ConversionError, match=r"unexpected key\(s\) 'logits/extra_weights' \(10, 10\)"):
    values_from_graphdef(consts, "extra.pb")
  del consts["logits/extra_weights"], consts["mixed_6/conv/conv2d_params"]
  with pytest.raises(ConversionError, match=r"missing key 'mixed_6/conv/conv2d_params' \(expected shape \(1, 1, 768, 192\)\)"):
    values_from_graphdef(consts, "extra.pb")
  eps = write_synthetic_graphdef(state, tmp_path / "eps.pb", GRAPH_NAMES[:1], bn_epsilon=1e-5)
  with pytest.raises(ConversionError, match=r"'conv/batchnorm' has variance_epsilon=1e-05"):
    read_graphdef(eps)


def test_missing_file_says_what_to_get(tmp_path):
  from detailflow_jax.convert.inception import read_values
  with pytest.raises(ConversionError, match="pt_inception-2015-12-05-6726825d.pth.*classify_image_graph_def.pb"):
    read_values(tmp_path / "nope.pth")
