"""Export a training workdir to the reference's format and read it back through our converter:
the trainers' own tests call this on the runs they already make."""
import jax
import numpy as np
import torch
from flax import nnx
from safetensors import safe_open

from detailflow_jax import export
from detailflow_jax.convert.gpt import convert_gpt
from detailflow_jax.convert.tokenizer import convert_tokenizer
from detailflow_jax.weights import export as weights_export
from detailflow_jax.weights import hub
from detailflow_jax.weights.load import load_model_dir

CONVERTERS = {"tokenizer": convert_tokenizer, "gpt": convert_gpt}


def _same_params(a, b):
  la, lb = jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_workdir_export_round_trips(workdir, out_root, kind, step, outputs):
  """`export --workdir W --step N` -> RUN; RUN's .pt through the converter gives the saved
  step's model and EMA weights exactly, and `outputs(model)` (arrays) are identical; the
  newest step's EMA (the default) equals the trainer's own WORKDIR/export."""
  run = out_root / f"{kind}_run_{step}"
  assert export.main(["--workdir", str(workdir), "--step", str(step), "--out", str(run)]) == 0
  name = f"{step:07d}"
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"{name}.pt", f"{name}.safetensors"]
  assert sorted(torch.load(run / "checkpoints" / f"{name}.pt", weights_only=True)) == ["ema", "model"]
  with safe_open(str(run / "checkpoints" / f"{name}.safetensors"), framework="pt") as f:
    meta = f.metadata()
  assert meta["step"] == str(step) and meta["weights"] == hub.DEFAULT_WEIGHTS[kind]
  source = weights_export.source_from_workdir(workdir, step=step)
  for weights in ("model", "ema"):
    back_dir = CONVERTERS[kind](run / "checkpoints" / f"{name}.pt", out_root / f"{kind}_{step}_{weights}",
                                weights=weights)
    back = load_model_dir(back_dir, kind)
    _same_params(back, source.weights[weights])
    for theirs, ours in zip(outputs(back), outputs(source.weights[weights])):
      np.testing.assert_array_equal(np.asarray(theirs), np.asarray(ours))

  newest = out_root / f"{kind}_newest"
  assert export.main(["--workdir", str(workdir), "--weights", "ema", "--format", "model_dir",
                      "--out", str(newest)]) == 0
  _same_params(load_model_dir(newest, kind), load_model_dir(workdir / "export", kind))
  assert export.main(["--workdir", str(workdir), "--step", "999", "--out", str(out_root / "x")]) == 2
