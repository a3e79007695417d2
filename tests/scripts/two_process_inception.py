"""One of two localhost processes (4 CPU devices each) extracting Inception features of the
golden inputs with `eval.features.extract_features`; prints the features' deviation from the
torch-fidelity golden file. Run by tests/test_evaluate.py."""
import os
import sys

process_id, port, inception_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(here, "..", ".."), os.path.join(here, "..")]

import jax

jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=process_id)

import json

import numpy as np
from inception_helpers import golden_inputs

from detailflow_jax.eval.features import extract_features
from detailflow_jax.eval.inception import load_inception

SIZE = 64
model, _ = load_inception(inception_dir)
# Every process reads the same stream: a batch of 3 and one of 1, each padded to 8 rows that
# the two processes feed 4 apiece.
feats = extract_features(model, iter([golden_inputs(SIZE, 3), golden_inputs(SIZE, 1)]), 4, batch_size=5)
with np.load(os.path.join(here, "..", "fixtures", "inception_golden.npz"), allow_pickle=False) as golden:
  errors = {}
  for name in ("pool", "spatial", "logits"):
    ref = np.concatenate([golden[f"float32_{SIZE}_b3_{name}"], golden[f"float32_{SIZE}_b1_{name}"]])
    assert feats[name].shape == ref.shape, (name, feats[name].shape, ref.shape)
    errors[name] = float(np.max(np.abs(feats[name] - ref)) / np.max(np.abs(ref)))
print("RESULT " + json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                              "processes": jax.process_count(), "relative_errors": errors,
                              "pool_sum": float(np.sum(feats["pool"], dtype=np.float64))}), flush=True)
