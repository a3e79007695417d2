"""Released DetailFlow tokenizer (PyTorch) -> our Tokenizer, key for key.

Layout of a released run: RUN/checkpoints/X.pt with RUN/config.json (the VQ ModelArgs) and
RUN/config.yaml (training args: vq_model, degradation power, image sizes, ...).
"""
import pathlib
import re
from typing import Any, Dict, Optional, Tuple

import numpy as np
from flax import nnx

from ..model_dir import save_model_dir
from ..models.tokenizer import Tokenizer, TokenizerConfig
from ..models.vit import ViTConfig
from .common import (ConversionError, StateDictReader, find_run_dir, load_state_dict,
                     read_json, read_run_configs, write_atomically)

# The public SigLIP2-so400m-patch16-naflex vision tower the released models were built from.
SIGLIP2_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                  "num_attention_heads": 16, "num_patches": 256, "patch_size": 16,
                  "layer_norm_eps": 1e-6, "num_channels": 3}


def _vit(siglip: Dict[str, Any], *, layers, hidden=None, heads=None, mlp=None, patch,
         patch_embedding=True) -> ViTConfig:
  grid = int(siglip["num_patches"] ** 0.5)
  return ViTConfig(hidden_size=hidden or siglip["hidden_size"],
                   num_layers=siglip["num_hidden_layers"] if layers is None else layers,
                   num_heads=heads or siglip["num_attention_heads"],
                   mlp_dim=mlp or (4 * hidden if hidden else siglip["intermediate_size"]),
                   position_grid=grid, patch_size=patch,
                   layer_norm_eps=siglip.get("layer_norm_eps", 1e-6),
                   patch_embedding=patch_embedding, num_channels=siglip.get("num_channels", 3))


def _tower(name: str, pretrained: bool, siglip: Dict[str, Any], patch: int, is_encoder: bool,
           fixture_builder: Optional[Dict[str, Any]]) -> ViTConfig:
  """Sizes the reference's build_encoder/build_decoder give each builder name."""
  kw = dict(patch=patch, patch_embedding=is_encoder)
  if name == "siglip2_base":
    if pretrained:
      return _vit(siglip, layers=12, **kw)
    return _vit(siglip, layers=12, hidden=768, heads=12, **kw)
  if name in ("siglip2_large", "siglip2"):
    if not pretrained:
      raise ConversionError(f"builder {name!r} without pretrained weights has no defined width "
                            "in the reference (embed_dim=None)")
    return _vit(siglip, layers=16 if name == "siglip2_large" else None, **kw)
  if fixture_builder is not None:
    part = fixture_builder["encoder" if is_encoder else "decoder"]
    if part.get("pretrained", True):
      return _vit(siglip, layers=part.get("layer_num"), **kw)
    return _vit(siglip, layers=part["layer_num"], hidden=part["embed_dim"],
                heads=part["num_heads"], mlp=part.get("intermediate_size"), **kw)
  raise ConversionError(f"unknown encoder/decoder builder {name!r} (known: siglip2_base, "
                        "siglip2_large, siglip2)")


def config_from_reference(config_json: Dict[str, Any], config_yaml: Dict[str, Any],
                          run_dir: Optional[pathlib.Path] = None,
                          siglip: Optional[Dict[str, Any]] = None) -> TokenizerConfig:
  """Builds our TokenizerConfig from the reference's config.json (+ config.yaml)."""
  try:
    fixture = config_yaml.get("fixture_builder")
    if siglip is None:
      if fixture is not None:
        siglip = read_json(pathlib.Path(run_dir) / fixture["siglip2_config"])
      else:
        siglip = SIGLIP2_SO400M
    if config_json.get("enc_type", "siglip2") != "siglip2" or config_json.get("dec_type", "siglip2") != "siglip2":
      raise ConversionError("only enc_type/dec_type 'siglip2' tokenizers are DetailFlow tokenizers")
    encoder = _tower(config_json["encoder_model"], config_json["enc_pretrained"], siglip,
                     config_json["enc_patch_size"], True, fixture)
    decoder = _tower(config_json["decoder_model"], config_json["dec_pretrained"], siglip,
                     config_json["dec_patch_size"], False, fixture)
    teacher = None
    if config_json.get("repa") or config_json.get("global_token_loss_weight"):
      teacher = _vit(siglip, layers=None, patch=config_json.get("repa_patch_size", 16))
    max_image_size = config_yaml.get("max_image_size", config_json["max_image_size"])
    return TokenizerConfig(
        encoder=encoder, decoder=decoder,
        image_size=config_json["image_size"], max_image_size=max_image_size,
        min_image_size=config_yaml.get("min_image_size", config_json["image_size"]),
        num_latent_tokens=config_json["num_latent_tokens"],
        group_size=config_json["group_size"], causal_num=config_json.get("causal_num"),
        codebook_size=config_json["codebook_size"],
        codebook_embed_dim=config_json["codebook_embed_dim"],
        codebook_l2_norm=config_json["codebook_l2_norm"],
        codebook_show_usage=config_json["codebook_show_usage"],
        commit_loss_beta=config_json["commit_loss_beta"],
        entropy_loss_ratio=config_json["entropy_loss_ratio"],
        vq_loss_ratio=config_json.get("vq_loss_ratio", 1.0),
        causal_encoder=config_json["causal_encoder"], causal_decoder=config_json["causal_decoder"],
        correction_training=config_json.get("correction_training", True),
        degradation_power=config_yaml.get("degradation_power", 1.5),
        global_token_loss_weight=config_json.get("global_token_loss_weight", 0.0),
        repa=config_json.get("repa", False), repa_proj_dim=config_json.get("repa_proj_dim", 1024),
        repa_layer_indices=config_json.get("repa_layer_indices", 1),
        repa_loss_weight=config_json.get("repa_loss_weight", 0.5), teacher=teacher)
  except KeyError as e:
    raise ConversionError(f"tokenizer config is missing the field {e.args[0]!r}") from e


def load_reference_config(run_dir) -> TokenizerConfig:
  run_dir = pathlib.Path(run_dir)
  config_json, config_yaml = read_run_configs(run_dir)
  return config_from_reference(config_json, config_yaml, run_dir)


# --- key mapping ----------------------------------------------------------------------------

_MLP_PARENTS = ("global_token_proj", "projection")


def torch_name(path: Tuple) -> str:
  """Our parameter path -> the reference's state-dict key."""
  parts = [str(p) for p in path]
  leaf = parts[-1]
  stem = ".".join(parts[:-1])
  stem = stem.replace("visual_model.layers.", "visual_model.encoder.layers.")
  stem = re.sub(rf"({'|'.join(_MLP_PARENTS)})\.layers\.(\d+)",
                lambda m: f"{m[1]}.{2 * int(m[2])}", stem)
  stem = re.sub(r"(^|\.)to_pixel$", r"\1to_pixel.model", stem)
  if leaf in ("kernel", "scale"):
    leaf = "weight"
  elif leaf in ("embedding", "position_embedding"):
    stem, leaf = f"{stem}.{leaf}", "weight"
  return f"{stem}.{leaf}" if stem else leaf


def torch_shape(path: Tuple, shape: Tuple[int, ...]) -> Tuple[int, ...]:
  leaf = path[-1]
  if leaf == "kernel":
    return tuple(reversed(shape))
  if leaf in ("latent_tokens", "refined_tokens", "latent_pos_embed"):
    return (1,) + tuple(shape)
  if leaf == "mask_token":
    return (1, 1) + tuple(shape)
  return tuple(shape)


def from_torch(path: Tuple, value: np.ndarray, shape: Tuple[int, ...], dtype) -> np.ndarray:
  if path[-1] == "kernel":
    value = value.T
  return np.ascontiguousarray(value.reshape(shape)).astype(dtype)


def abstract_state(cfg: TokenizerConfig):
  model = nnx.eval_shape(lambda: Tokenizer(cfg))
  return nnx.to_flat_state(nnx.state(model))


def expected_torch_keys(cfg: TokenizerConfig) -> Dict[str, Tuple[int, ...]]:
  """The state-dict keys (and shapes) a reference checkpoint of this config must hold."""
  return {torch_name(p): torch_shape(p, v.shape) for p, v in abstract_state(cfg)}


def convert_state_dict(cfg: TokenizerConfig, state: Dict[str, np.ndarray], source: str,
                       dtype="float32") -> Tokenizer:
  """Builds a Tokenizer holding exactly the weights of `state` (every key used, every
  parameter filled, shapes checked)."""
  reader = StateDictReader(state, source)
  model = nnx.eval_shape(lambda: Tokenizer(cfg))
  graphdef, abstract = nnx.split(model)
  flat = []
  for path, var in nnx.to_flat_state(abstract):
    value = reader.take(torch_name(path), torch_shape(path, var.shape))
    target_dtype = var.dtype if not np.issubdtype(var.dtype, np.floating) else np.dtype(dtype)
    flat.append((path, var.replace(from_torch(path, value, var.shape, target_dtype))))
  reader.finish()
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def convert_tokenizer(checkpoint, out, weights="model", config_dir=None, dtype="float32"):
  """`python -m detailflow_jax.convert tokenizer`: .pt/.safetensors + configs -> Orbax DIR."""
  state = load_state_dict(checkpoint, weights)
  cfg = load_reference_config(find_run_dir(checkpoint, config_dir))
  model = convert_state_dict(cfg, state, source=str(checkpoint), dtype=dtype)
  return write_atomically(out, lambda tmp: save_model_dir(tmp, "tokenizer", cfg.to_dict(), model))
