"""ADM's image-generation metrics (openai/guided-diffusion evaluations/evaluator.py) in JAX, and
the evaluation jobs built on them.

- `inception`, `resize`: the 2015-12-05 Inception graph as ADM runs it, and TF1's legacy bilinear
  resize it applies to every input; `features`: Inception features over every device.
- `scores`: FID, sFID, Inception Score, precision and recall (host, float64); `evaluator`: two
  batch files -> the five numbers; `reference`: ADM's batch files, read and written.
- `generation`: the sharded resumable generation job (gFID); `reconstruction` + `pixel_metrics`:
  the tokenizer job (rFID, PSNR, SSIM, noisy eval, coarse-to-fine curve); `chunks`: their
  resumable chunk store; `device`: placement and precision helpers; `launch`: job selection
  from a `:eval` config.
The CLIs are `python -m detailflow_jax.evaluate` and `python -m detailflow_jax.generate`.
"""
