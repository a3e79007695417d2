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
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "a configs/*.py file with :eval", lock_config=True)
flags.DEFINE_string("workdir", None, "chunks, samples, results.json")
flags.mark_flags_as_required(["config", "workdir"])


def _seeds(value):
  if isinstance(value, str):
    return [int(v) for v in value.split(",") if v.strip()]
  if isinstance(value, int):
    return [value]
  return [int(v) for v in value]


def run(c, workdir):
  from detailflow_jax.train import mesh as mesh_lib
  if c.get("task") not in ("eval_generation", "eval_tokenizer"):
    raise app.UsageError(f"config task {c.get('task')!r} is not an evaluation; use a :eval variant "
                         "(e.g. configs/detailflow16_gpt_l.py:eval)")
  mesh_lib.maybe_initialize_distributed(c)
  mesh = mesh_lib.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
  workdir = pathlib.Path(workdir)
  e = c.eval
  if c.task == "eval_tokenizer":
    from detailflow_jax.eval.reconstruction import run_tokenizer_eval
    return run_tokenizer_eval(e, workdir, mesh=mesh)
  from detailflow_jax.eval.generation import GenerationSettings, run_generation
  for key in ("tokenizer", "gpt"):
    if not e[key]:
      raise app.UsageError(f"eval.{key} is empty: give --config.eval.{key}=DIR")
  if bool(e.reference) != bool(e.inception):
    raise app.UsageError("scoring needs both eval.reference and eval.inception (or neither)")
  seeds = _seeds(e.seeds)
  settings = GenerationSettings(
      num_samples=e.num_samples, seed=seeds[0], label_mode=e.label_mode, cfg_scale=e.cfg_scale,
      temperature=e.temperature, top_k=e.top_k, top_p=e.top_p, precision=e.precision,
      per_device_batch=e.per_device_batch, chunk_size=e.chunk_size, param_layout=e.param_layout)
  return run_generation(e.tokenizer, e.gpt, settings, seeds=seeds, workdir=workdir,
                        out=e.out or workdir / "samples.npz", reference=e.reference or None,
                        inception=e.inception or None, gpt_weights=e.gpt_weights or None,
                        png_dir=e.png_dir or None, mesh=mesh, inception_batch=e.inception_batch)


def main(argv):
  del argv
  logging.getLogger("detailflow_jax").setLevel(logging.INFO)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)
  run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
