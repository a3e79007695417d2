"""DetailFlow-32 tokenizer: 256 tokens, group size 8 (variant: tiny)."""
from detailflow_jax.configs.tokenizer_common import tokenizer_config


def get_config(variant: str = ""):
  return tokenizer_config(tokens=256, variant=variant)
