"""DetailFlow-16 tokenizer: 128 tokens, group size 8 (variant: tiny)."""
from detailflow_jax.configs.tokenizer_common import tokenizer_config


def get_config(variant: str = ""):
  return tokenizer_config(tokens=128, variant=variant)
