"""The config sections the run driver (train/driver.py) reads for both recipes: the mesh,
checkpoints, and where a fine-tune starts from."""
import ml_collections


def add_run_sections(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # The reference keeps its 10 newest checkpoints plus a milestone every 50 epochs (~250k
  # ImageNet steps at batch 256); milestone_every is in steps, a multiple of save_every (0: off).
  c.checkpoint = ml_collections.ConfigDict(dict(save_every=5000, keep=10, milestone_every=250_000,
                                                async_save=True))
  # Fine-tuning (the reference's --vq-ckpt/--gpt-ckpt with --finetune): start a fresh run from
  # a model directory, released checkpoint, Hub id or training workdir (its Orbax step
  # init_from_step, -1: newest); strict | partial (see detailflow_jax/train/init_from.py).
  c.init_from = ""
  c.init_from_step = -1
  c.init_from_mode = "strict"
  return c
