"""Loading models: `load_tokenizer(SRC)` and `load_gpt(SRC)` return ready NNX modules.

SRC is a converted directory, a released run directory / checkpoint file, or a Hub id
(`org/name[@revision][:path/in/repo.pt]`); see `hub.resolve_model_dir`, the one resolver.
"""

from ..models.gpt import GPT, GPTConfig
from ..models.tokenizer import Tokenizer, TokenizerConfig
from .hub import resolve_model_dir
from .model_dir import restore_model_dir


def build_tokenizer(config):
  return Tokenizer(TokenizerConfig.from_dict(config))


def build_gpt(config):
  return GPT(GPTConfig.from_dict(config), rngs=0)


BUILDERS = {"tokenizer": build_tokenizer, "gpt": build_gpt}


def load_model_dir(directory, kind: str, dtype=None):
  """A converted model directory of `kind` ("tokenizer" | "gpt"), without resolving."""
  model, _ = restore_model_dir(directory, kind, BUILDERS[kind], dtype=dtype)
  return model


def load_tokenizer(source, dtype=None, weights=None):
  """A DetailFlow tokenizer; `weights` ('model'/'ema') picks the set of a released checkpoint."""
  return load_model_dir(resolve_model_dir(source, "tokenizer", weights), "tokenizer", dtype)


def load_gpt(source, dtype=None, weights=None):
  """A DetailFlow GPT; `weights` ('model'/'ema') picks the set of a released checkpoint."""
  return load_model_dir(resolve_model_dir(source, "gpt", weights), "gpt", dtype)
