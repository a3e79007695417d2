"""Train DetailFlow models from one config, on one CPU or a multi-host TPU/GPU mesh.

  python launch/train.py --config=configs/detailflow16_tokenizer.py[:variant] --workdir=DIR \
      [--config.data.path=IMAGENET_DIR] [--config.weights.lpips=...] [--config.key=value ...]
  python launch/train.py --config=configs/detailflow16_gpt_l.py[:variant] --workdir=DIR \
      [--config.data.path=TOKENS_DIR] [--config.key=value ...]

The run resumes from the newest checkpoint in DIR. Multi-host: the same command on every host;
TPU pods are detected automatically, elsewhere set --config.distributed.coordinator=HOST:PORT,
--config.distributed.num_processes=N and --config.distributed.process_id=I.
"""
import logging


from absl import app, flags
from ml_collections import config_flags

from detailflow_jax.train import ar, tokenizer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "a configs/*.py file, optionally :variant", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, metrics, exports")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.getLogger("detailflow_jax").setLevel(logging.INFO)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every file it writes
  c = FLAGS.config
  recipes = {"ar": ar.train, "tokenizer": tokenizer.train}
  if c.task not in recipes:
    raise app.UsageError(f"config task {c.task!r} has no trainer (known: {', '.join(recipes)})")
  recipes[c.task](c, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
