"""The reference's own `load_ar_model` loads our export (strict `load_state_dict`) and computes
our logits. Runs only where a checkout of ByteFlow-AI/DetailFlow (c5f06cd) is named by
DETAILFLOW_REFERENCE_SRC and its imports (ruamel.yaml; timm's `trunc_normal_` is stood in for
by torch's) are available; CI has neither, so it skips there."""
import importlib.util
import os
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY

REFERENCE = os.environ.get("DETAILFLOW_REFERENCE_SRC", "")
pytestmark = pytest.mark.skipif(
    not REFERENCE or not os.path.isdir(os.path.join(REFERENCE, "autoregressive"))
    or importlib.util.find_spec("ruamel") is None,
    reason="needs DETAILFLOW_REFERENCE_SRC (a reference checkout) and ruamel.yaml")


def _reference_gpt_loader():
  import torch
  if importlib.util.find_spec("timm") is None:
    timm, layers = types.ModuleType("timm"), types.ModuleType("timm.layers")
    layers.trunc_normal_ = torch.nn.init.trunc_normal_
    timm.layers = layers
    sys.modules.setdefault("timm", timm)
    sys.modules.setdefault("timm.layers", layers)
  sys.path.insert(0, REFERENCE)
  from autoregressive.models import gpt as ref_gpt
  from autoregressive.sample.load_ar_model import load_ar_model
  return ref_gpt, load_ar_model


def test_reference_load_ar_model_reads_our_export(tmp_path):
  import torch
  from detailflow_jax import export
  from detailflow_jax.convert.gpt import CUSTOM_PRESET, convert_gpt
  from detailflow_jax.weights.load import load_model_dir
  ref_gpt, load_ar_model = _reference_gpt_loader()
  ref_gpt.GPT_models[CUSTOM_PRESET] = lambda **kw: ref_gpt.Transformer(
      ref_gpt.ModelArgs(dim=64, n_layer=2, n_head=4, **kw))
  converted = convert_gpt(TINY / "gpt" / "checkpoints" / "gpt.pt", tmp_path / "gpt", weights="ema")
  assert export.main(["--model", str(converted), "--out", str(tmp_path / "run")]) == 0
  model, _, _ = load_ar_model(str(tmp_path / "run" / "checkpoints" / "model.pt"))
  tokens = np.random.default_rng(0).integers(0, 64, (2, 12))
  labels = np.array([1, 7])
  with torch.no_grad():
    theirs = model(idx=torch.from_numpy(tokens), cond_idx=torch.from_numpy(labels),
                   basic_group_inference=True)
  theirs = (theirs[0] if isinstance(theirs, tuple) else theirs).numpy()
  ours = np.asarray(load_model_dir(converted, "gpt")(jnp.asarray(tokens, jnp.int32), jnp.asarray(labels, jnp.int32)))
  np.testing.assert_allclose(theirs, ours, atol=1e-4)
