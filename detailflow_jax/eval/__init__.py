"""ADM's image-generation metrics (openai/guided-diffusion evaluations/evaluator.py) in JAX.

- `inception`: the 2015-12-05 Inception graph as ADM runs it (pool_3, mixed_6/conv, logits).
- `resize`: TensorFlow 1's legacy bilinear resize, which that graph applies to every input.
- `scores`: FID, sFID, Inception Score, precision and recall, on the host in float64.
- `reference`: ADM's reference-batch npz files, read and written.
- `features`: data-parallel feature extraction over all local devices.
The CLI is `python -m detailflow_jax.evaluate`.
"""
