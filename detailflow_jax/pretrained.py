"""Loading converted models: `load_tokenizer(DIR)` and `load_gpt(DIR)` return ready NNX modules."""
from .model_dir import restore_model_dir


def load_tokenizer(directory, dtype=None):
  """A converted DetailFlow tokenizer (see `python -m detailflow_jax.convert tokenizer`)."""
  from .models.tokenizer import Tokenizer, TokenizerConfig

  def build(config):
    return Tokenizer(TokenizerConfig.from_dict(config))

  model, _ = restore_model_dir(directory, "tokenizer", build, dtype=dtype)
  return model


def load_gpt(directory, dtype=None):
  """A converted DetailFlow GPT (see `python -m detailflow_jax.convert gpt`)."""
  from .models.gpt import GPT, GPTConfig

  def build(config):
    return GPT(GPTConfig.from_dict(config), rngs=0)

  model, _ = restore_model_dir(directory, "gpt", build, dtype=dtype)
  return model


def load_inception(directory):
  """(InceptionV3, info) from a converted directory (see `python -m detailflow_jax.convert
  inception`); info holds `weights_sha256`, `source_sha256`, `source_file`."""
  from flax import nnx
  from .eval.inception import InceptionV3
  model, info = restore_model_dir(directory, "inception", lambda config: InceptionV3(rngs=nnx.Rngs(0)))
  return model, info
