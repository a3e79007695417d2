"""The generation job with every output on gs:// (the GCS emulator, tests/gcs_emulator.py):
chunks, manifest, PNGs, samples.npz and results.json land in the bucket; a kill -9 mid-run and a
rerun resume from the bucket's manifest and give the bytes a local run gives; batch files are
read from the bucket. What landed is read back from the emulator itself."""
import io
import json
import os
import pathlib
import sys

import numpy as np
from conftest import kill_9_when
from generation_settings import CLI_ARGS
from gpt_helpers import converted_gpt_dir
from test_gcs_workdir import _assert_nothing_local_named_like, _fresh_gcs_clients, gcs_bucket, gcs_emulator  # noqa: F401

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_generation_workdir_on_gcs_with_kill_9_and_resume(gcs_emulator, gcs_bucket, tokenizer_dir,  # noqa: F811
                                                         tmp_path_factory, tmp_path):
  from detailflow_jax.generate import main
  bucket, emulator = gcs_bucket, gcs_emulator
  gpt = converted_gpt_dir(tmp_path_factory)
  models = ["--tokenizer", str(tokenizer_dir), "--gpt", str(gpt), *CLI_ARGS]
  remote = [*models, "--out", f"gs://{bucket}/eval/samples.npz", "--workdir", f"gs://{bucket}/eval",
            "--png-dir", f"gs://{bucket}/eval/png"]

  def chunks_listed():
    if "eval/chunks-seed3/manifest.json" not in emulator.list_objects(bucket, "eval/"):
      return False
    return bool(json.loads(emulator.read_object(bucket, "eval/chunks-seed3/manifest.json"))["chunks"])

  kill_9_when([sys.executable, "-m", "detailflow_jax.generate", *remote], chunks_listed, 500,
              cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)))
  done = len(json.loads(emulator.read_object(bucket, "eval/chunks-seed3/manifest.json"))["chunks"])
  objects = emulator.list_objects(bucket, "eval/")
  assert 1 <= done < 3 and "eval/samples.npz" not in objects and "eval/results.json" not in objects
  assert not any(o.endswith(".tmp") for o in objects)

  _fresh_gcs_clients()  # this process may have listed the bucket before the kill
  assert main(remote) == 0
  results = json.loads(emulator.read_object(bucket, "eval/results.json"))
  assert results["runs"][0]["summary"]["chunks_reused"] == done
  assert results["runs"][0]["samples"] == f"gs://{bucket}/eval/samples.npz"

  # The same job with a local workdir: the same samples file, byte for byte.
  local = tmp_path / "local"
  assert main([*models, "--out", str(local / "samples.npz"), "--workdir", str(local / "w")]) == 0
  remote_npz = emulator.read_object(bucket, "eval/samples.npz")
  assert remote_npz == (local / "samples.npz").read_bytes()
  with np.load(io.BytesIO(remote_npz), allow_pickle=False) as f:
    images = f["arr_0"]
  # The scorer's reader on the gs:// file (evaluate reads samples and references this way).
  from detailflow_jax.eval.reference import load_batch
  batch = load_batch(f"gs://{bucket}/eval/samples.npz", "0" * 64)
  np.testing.assert_array_equal(np.concatenate(list(batch.images.batches(3))), images)
  from PIL import Image
  pngs = sorted(o for o in emulator.list_objects(bucket, "eval/png/") if o.endswith(".png"))
  assert pngs == [f"eval/png/seed3/{i:06d}.png" for i in range(10)]
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(emulator.read_object(bucket, pngs[7])))), images[7])
  chunks = [o for o in emulator.list_objects(bucket, "eval/chunks-seed3/") if o.endswith(".npz")]
  assert chunks == [f"eval/chunks-seed3/chunk-{k:06d}.npz" for k in range(3)]
  _assert_nothing_local_named_like(bucket, tmp_path)
