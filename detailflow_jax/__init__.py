"""detailflow_jax: DetailFlow (coarse-to-fine 1D tokenizer + next-detail GPT) in JAX/Flax NNX."""

__version__ = "0.1.0"
