"""Released DetailFlow tokenizer (PyTorch) -> our Tokenizer, key for key.

Layout of a released run: RUN/checkpoints/X.pt with RUN/config.json (the VQ ModelArgs) and
RUN/config.yaml (training args: vq_model, degradation power, image sizes, ...).
"""
import pathlib
import re
from typing import Any, Dict, Optional, Tuple

from ..models.tokenizer import Tokenizer, TokenizerConfig
from ..models.vit import ViTConfig
from .common import ConversionError, KeyMapping, ReferenceFormat, read_json, read_run_configs

# build_mlp's hidden width for global_token_proj in the reference's VQModel.
GLOBAL_TOKEN_HIDDEN = 1024
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
        repa_loss_weight=config_json.get("repa_loss_weight", 0.5), teacher=teacher,
        # VQModel hard-codes the global-token MLP's width (1024); a fixture's builder block may
        # give a smaller one.
        global_token_hidden=int((fixture or {}).get("global_token_hidden", GLOBAL_TOKEN_HIDDEN)))
  except KeyError as e:
    raise ConversionError(f"tokenizer config is missing the field {e.args[0]!r}") from e


# --- our config -> the reference's files (export) ------------------------------------------

# ModelArgs fields the reference writes that change nothing in a DetailFlow (siglip2, VQ)
# tokenizer's forward pass; written with the values of the reference's training defaults / VQ-16.
_REFERENCE_ONLY_FIELDS = {
    "kl_loss_weight": 1e-6, "tau": 0.1, "num_codebooks": 1, "encoder_ch_mult": [1, 1, 2, 2, 4],
    "decoder_ch_mult": [1, 1, 2, 2, 4], "z_channels": 256, "dropout_p": 0.0,
    "enc_tuning_method": "full", "dec_tuning_method": "full", "enc_drop_path_rate": 0.0,
    "dec_drop_path_rate": 0.0, "repa_model": "siglip2", "repa_align": "global", "vq_mean": 0.0,
    "vq_std": 1.0, "gradient_checkpointing_encoder": False, "gradient_checkpointing_decoder": False}
CUSTOM_BUILDER = "siglip2_custom"
SIGLIP2_CONFIG_FILE = "siglip2_vision_config.json"
# The reference's own builders, tried in this order when exporting (name, pretrained).
_BUILDERS = (("siglip2_base", True), ("siglip2_base", False), ("siglip2_large", True), ("siglip2", True))


def _builder_for(tower: ViTConfig, is_encoder: bool) -> Optional[Tuple[str, bool]]:
  for name, pretrained in _BUILDERS:
    if _tower(name, pretrained, SIGLIP2_SO400M, tower.patch_size, is_encoder, None) == tower:
      return name, pretrained
  return None


def reference_configs(cfg: TokenizerConfig) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
  """(config.json, config.yaml, extra JSON files) of a released run for `cfg`.

  Towers of the reference's builder sizes get its builder names (loadable by its load_vq
  unchanged); other sizes get a `fixture_builder` entry with explicit sizes and a SigLIP2 vision
  config file, which our converter reads and the reference reads with that builder entry
  registered (see tests/fixtures/detailflow_tiny_a/README.md). The result is checked by
  converting it back: a config the format cannot express is an error, never a silent change.
  """
  encoder, decoder = _builder_for(cfg.encoder, True), _builder_for(cfg.decoder, False)
  standard = encoder is not None and decoder is not None and (
      cfg.teacher is None or cfg.teacher == _vit(SIGLIP2_SO400M, layers=None, patch=cfg.teacher.patch_size))
  config_json = dict(_REFERENCE_ONLY_FIELDS,
      image_size=cfg.image_size, max_image_size=cfg.max_image_size,
      codebook_size=cfg.codebook_size, codebook_embed_dim=cfg.codebook_embed_dim,
      codebook_l2_norm=cfg.codebook_l2_norm, codebook_show_usage=cfg.codebook_show_usage,
      commit_loss_beta=cfg.commit_loss_beta, entropy_loss_ratio=cfg.entropy_loss_ratio,
      vq_loss_ratio=cfg.vq_loss_ratio, enc_type="siglip2", dec_type="siglip2",
      num_latent_tokens=cfg.num_latent_tokens, enc_patch_size=cfg.encoder.patch_size,
      dec_patch_size=cfg.decoder.patch_size, repa=cfg.repa,
      repa_patch_size=cfg.teacher.patch_size if cfg.teacher else 16,
      repa_proj_dim=cfg.repa_proj_dim, repa_layer_indices=cfg.repa_layer_indices,
      repa_loss_weight=cfg.repa_loss_weight, causal_encoder=cfg.causal_encoder,
      causal_decoder=cfg.causal_decoder, group_size=cfg.group_size, causal_num=cfg.causal_num,
      global_token_loss_weight=cfg.global_token_loss_weight,
      correction_training=cfg.correction_training)
  config_yaml = {"vq_model": "VQ-16", "image_size": cfg.image_size,
                 "max_image_size": cfg.max_image_size, "min_image_size": cfg.min_image_size,
                 "content_degradation": "resolution_power", "degradation_power": cfg.degradation_power,
                 "enc_type": "siglip2", "dec_type": "siglip2",
                 "num_latent_tokens": cfg.num_latent_tokens, "group_size": cfg.group_size,
                 "causal_num": cfg.causal_num, "codebook_size": cfg.codebook_size,
                 "codebook_embed_dim": cfg.codebook_embed_dim}
  files: Dict[str, Any] = {}
  if standard:
    siglip = SIGLIP2_SO400M
    config_json.update(encoder_model=encoder[0], enc_pretrained=encoder[1],
                       decoder_model=decoder[0], dec_pretrained=decoder[1])
  else:
    like = cfg.teacher or cfg.encoder
    siglip = {"model_type": "siglip2_vision_model", "hidden_size": like.hidden_size,
              "intermediate_size": like.mlp_dim, "num_hidden_layers": like.num_layers,
              "num_attention_heads": like.num_heads, "num_channels": like.num_channels,
              "num_patches": like.position_grid ** 2, "patch_size": like.patch_size,
              "layer_norm_eps": like.layer_norm_eps, "hidden_act": "gelu_pytorch_tanh",
              "attention_dropout": 0.0}
    part = lambda t: {"pretrained": False, "layer_num": t.num_layers, "embed_dim": t.hidden_size,
                      "num_heads": t.num_heads, "intermediate_size": t.mlp_dim}
    config_json.update(encoder_model=CUSTOM_BUILDER, enc_pretrained=False,
                       decoder_model=CUSTOM_BUILDER, dec_pretrained=False)
    config_yaml["fixture_builder"] = {"siglip2_config": SIGLIP2_CONFIG_FILE,
                                      "encoder": part(cfg.encoder), "decoder": part(cfg.decoder)}
    files[SIGLIP2_CONFIG_FILE] = siglip
  config_yaml.update(encoder_model=config_json["encoder_model"],
                     decoder_model=config_json["decoder_model"])
  back = config_from_reference(config_json, config_yaml, siglip=siglip)
  if back != cfg:
    diff = [k for k in cfg.to_dict() if cfg.to_dict()[k] != back.to_dict()[k]]
    raise ConversionError(f"this tokenizer config cannot be written in the reference's format: "
                          f"{', '.join(diff)} would read back differently")
  return config_json, config_yaml, files


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


MAPPING = KeyMapping(torch_name, torch_shape)
FORMAT = ReferenceFormat("tokenizer", Tokenizer, MAPPING, load_reference_config)
expected_torch_keys = FORMAT.expected_torch_keys
convert_state_dict = FORMAT.convert_state_dict
convert_tokenizer = FORMAT.convert
