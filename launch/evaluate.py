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
from detailflow_jax.cli import launch_main
from detailflow_jax.eval.launch import ConfigError, run_from_config

if __name__ == "__main__":
  launch_main(run_from_config, config_help="a configs/*.py file with :eval",
              workdir_help="chunks, samples, results.json", usage_errors=(ConfigError,))
