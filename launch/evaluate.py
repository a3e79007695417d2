"""Evaluation jobs from a config's `:eval` variant, on one CPU/GPU or a multi-host TPU/GPU mesh.

  python launch/evaluate.py --config=configs/detailflow16_gpt_l.py:eval --workdir=DIR \
      --config.eval.tokenizer=TOK_DIR --config.eval.gpt=GPT_DIR \
      [--config.eval.reference=REF.npz --config.eval.inception=INCEPTION_DIR] [--config.eval.seeds=0,1,2]
  python launch/evaluate.py --config=configs/detailflow16_tokenizer.py:eval --workdir=DIR \
      --config.eval.tokenizer=TOK_DIR --config.eval.inception=INCEPTION_DIR \
      --config.eval.data.path=/data/imagenet

Generation: 50k samples (the paper's CFG, top-k/top-p off, EMA weights) as DIR/samples.npz,
scored into DIR/results.json. Tokenizer: PSNR, SSIM, rFID, noisy eval and the coarse-to-fine
curve in DIR/results.json, DIR/curve.json, DIR/curve.png. Both resume in DIR after a kill.
Multi-host: the same command on every host (TPU pods are detected; elsewhere
--config.distributed.coordinator/num_processes/process_id), as launch/train.py.
"""
import logging

from absl import app, flags
from ml_collections import config_flags

from detailflow_jax.eval.launch import ConfigError, run_from_config

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "a configs/*.py file with :eval", lock_config=True)
flags.DEFINE_string("workdir", None, "chunks, samples, results.json")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.getLogger("detailflow_jax").setLevel(logging.INFO)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    run_from_config(FLAGS.config, FLAGS.workdir)
  except ConfigError as e:
    raise app.UsageError(str(e))


if __name__ == "__main__":
  app.run(main)
