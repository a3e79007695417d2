"""Encode a dataset with a trained/converted tokenizer into token records for AR training.

  python launch/extract_codes.py --config=configs/detailflow16_gpt_l.py[:variant] \
      --tokenizer=DIR --workdir=CODES_DIR [--config.extract.path=IMAGENET ...]

Runs on the config's mesh (every device of every process: the same command on each host, as for
training), extract.per_device_batch images per device per step, extract.precision bfloat16
(autocast, as the reference) or float32. Resumable (finished chunks are kept), progress in the log.
"""
import logging

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "a configs/*.py file, optionally :variant", lock_config=True)
flags.DEFINE_string("tokenizer", None, "tokenizer: converted or exported directory, released run "
                    "directory or Hub id (org/name[@revision][:path/in/repo.pt])")
flags.DEFINE_string("workdir", None, "where the token records go")
flags.mark_flags_as_required(["config", "tokenizer", "workdir"])


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)
  from detailflow_jax import sharding
  from detailflow_jax.train.extract import extract
  sharding.maybe_initialize_distributed(FLAGS.config)
  out = extract(FLAGS.config, FLAGS.tokenizer, FLAGS.workdir)
  logging.getLogger("detailflow_jax").info("token records in %s", out)


if __name__ == "__main__":
  app.run(main)
