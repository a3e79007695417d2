"""Writes tests/fixtures/inception_golden.npz: torch-fidelity 0.4.0's FeatureExtractorInceptionV3
outputs with the random weights of tests/inception_helpers.py (seed GOLDEN_SEED).

python tests/scripts/make_inception_golden.py   (needs torch and torch-fidelity, --no-deps)

For float64 and float32, input sizes 64, 128, 256, 299, 512 and batches 1 and 3: pool [N, 2048],
spatial [N, 2023] (ADM's sFID features) and unbiased logits [N, 1008], in that dtype; plus the
`.pth` layout torch-fidelity's module has (key -> shape, JSON) for the inventory test.
"""
import json
import pathlib
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from inception_helpers import (  # noqa: E402
  GOLDEN_SEED,
  golden_inputs,
  random_inception_state_dict,
  torch_fidelity_model,
  torch_fidelity_outputs,
)

SIZES = (64, 128, 256, 299, 512)
BATCHES = (1, 3)
DTYPES = ("float64", "float32")
OUT = ROOT / "tests" / "fixtures" / "inception_golden.npz"


def main():
  import importlib.metadata

  import torch
  torch.set_num_threads(2)
  state = random_inception_state_dict(GOLDEN_SEED)
  arrays = {}
  with tempfile.TemporaryDirectory() as tmp:
    for dtype in DTYPES:
      model = torch_fidelity_model(state, dtype, tmp)
      if dtype == DTYPES[0]:
        layout = {k: list(v.shape) for k, v in model.state_dict().items()}
        arrays["pth_layout"] = np.array(json.dumps(layout))
      for size in SIZES:
        for batch in BATCHES:
          pool, spatial, logits = torch_fidelity_outputs(model, golden_inputs(size, batch))
          for name, value in (("pool", pool), ("spatial", spatial), ("logits", logits)):
            arrays[f"{dtype}_{size}_b{batch}_{name}"] = value
          print(dtype, size, batch, float(np.abs(pool).mean()), flush=True)
  arrays["meta"] = np.array(json.dumps({"seed": GOLDEN_SEED, "torch_fidelity": importlib.metadata.version("torch-fidelity"),
                                        "torch": torch.__version__}))
  np.savez_compressed(OUT, **arrays)
  print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
  main()
