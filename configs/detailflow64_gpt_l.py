"""DetailFlow-64 GPT-L: 512 tokens, group size 8 (variants: tiny, gpt_b, gpt_xl, eval)."""
from detailflow_jax.configs.eval_common import generation_eval
from detailflow_jax.configs.gpt_common import gpt_config


def get_config(variant: str = ""):
  presets = {"gpt_b": "GPT-B", "gpt_xl": "GPT-XL"}
  if variant == "eval":
    return generation_eval(gpt_config(tokens=512), tokens=512)
  if variant in presets:
    return gpt_config(tokens=512, preset=presets[variant])
  return gpt_config(tokens=512, variant=variant)
