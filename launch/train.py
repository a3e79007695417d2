"""Train DetailFlow models from one config, on one CPU or a multi-host TPU/GPU mesh.

  python launch/train.py --config=configs/detailflow16_tokenizer.py[:variant] --workdir=DIR \
      [--config.data.path=IMAGENET_DIR] [--config.weights.lpips=...] [--config.key=value ...]
  python launch/train.py --config=configs/detailflow16_gpt_l.py[:variant] --workdir=DIR \
      [--config.data.path=TOKENS_DIR] [--config.key=value ...]

The run resumes from the newest checkpoint in DIR. Multi-host: the same command on every host;
TPU pods are detected automatically, elsewhere set --config.distributed.coordinator=HOST:PORT,
--config.distributed.num_processes=N and --config.distributed.process_id=I.
"""
from detailflow_jax.cli import launch_main
from detailflow_jax.train import ar, tokenizer

RECIPES = {"ar": ar.train, "tokenizer": tokenizer.train}


def train(c, workdir):
  if c.task not in RECIPES:
    raise KeyError(f"config task {c.task!r} has no trainer (known: {', '.join(RECIPES)})")
  RECIPES[c.task](c, workdir)


if __name__ == "__main__":
  launch_main(train, config_help="a configs/*.py file, optionally :variant",
              workdir_help="checkpoints, metrics, exports", usage_errors=(KeyError,))
