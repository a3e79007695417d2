"""DetailFlow-32 tokenizer: 256 tokens, group size 8 (variants: tiny, eval)."""
from detailflow_jax.configs.eval_common import tokenizer_eval
from detailflow_jax.configs.tokenizer_common import tokenizer_config


def get_config(variant: str = ""):
  if variant == "eval":
    return tokenizer_eval(tokenizer_config(tokens=256))
  return tokenizer_config(tokens=256, variant=variant)
