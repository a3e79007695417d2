"""Released DetailFlow tokenizer (PyTorch) -> our Tokenizer, key for key, and back (export).

Layout of a released run: RUN/checkpoints/X.pt with RUN/config.json (the VQ ModelArgs) and
RUN/config.yaml (training args: vq_model, degradation power, image sizes, ...). The tower widths
are not in either file: the reference builds both towers from the SigLIP2 vision config it reads
from $CACHE_DATA_PATH/siglip2-so400m-patch16-naflex (for released runs, SigLIP2-so400m); our
exports ship that config in RUN/siglip2-so400m-patch16-naflex/ (see `reference_configs`).
"""
import itertools
import json
import pathlib
import re
from collections.abc import Iterator
from typing import Any

from ..models.tokenizer import Tokenizer, TokenizerConfig
from ..models.vit import ViTConfig
from .common import ConversionError, KeyMapping, ReferenceFormat, read_json, read_run_configs

# build_mlp's hidden width for global_token_proj in the reference's VQModel.
GLOBAL_TOKEN_HIDDEN = 1024
# The public SigLIP2-so400m-patch16-naflex vision tower the released models were built from.
SIGLIP2_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                  "num_attention_heads": 16, "num_patches": 256, "patch_size": 16,
                  "layer_norm_eps": 1e-6, "num_channels": 3}
# The directory under $CACHE_DATA_PATH the reference's towers read their SigLIP2 config (and,
# on the pretrained path, weights) from; an export writes one of that name inside RUN.
SIGLIP2_DIR = "siglip2-so400m-patch16-naflex"


def _vit(siglip: dict[str, Any], *, layers, hidden=None, heads=None, mlp=None, patch,
         patch_embedding=True) -> ViTConfig:
  grid = int(siglip["num_patches"] ** 0.5)
  return ViTConfig(hidden_size=hidden or siglip["hidden_size"],
                   num_layers=siglip["num_hidden_layers"] if layers is None else layers,
                   num_heads=heads or siglip["num_attention_heads"],
                   mlp_dim=mlp or (4 * hidden if hidden else siglip["intermediate_size"]),
                   position_grid=grid, patch_size=patch,
                   layer_norm_eps=siglip.get("layer_norm_eps", 1e-6),
                   patch_embedding=patch_embedding, num_channels=siglip.get("num_channels", 3))


def _tower(name: str, pretrained: bool, siglip: dict[str, Any], patch: int, is_encoder: bool,
           fixture_builder: dict[str, Any] | None) -> ViTConfig:
  """Sizes the reference's build_encoder/build_decoder give each builder name: a pretrained
  tower is the SigLIP2 config's width, heads and MLP with 12 (siglip2_base), 16 (siglip2_large)
  or all (siglip2) of its layers; the only tower from scratch is siglip2_base, 768 wide with 12
  heads and 12 layers, whose MLP the reference fixes at 4 x 768 (CustomSiglip2VisionModel).
  Position grid, layer-norm eps and channels always come from the SigLIP2 config."""
  kw = dict(patch=patch, patch_embedding=is_encoder)
  layers = {"siglip2_base": 12, "siglip2_large": 16, "siglip2": None}.get(name)
  if name in ("siglip2_base", "siglip2_large", "siglip2") and pretrained:
    if layers is not None and layers > siglip["num_hidden_layers"]:  # the reference asserts this
      raise ConversionError(f"builder {name!r} takes {layers} layers of a SigLIP2 config that has "
                            f"{siglip['num_hidden_layers']}")
    return _vit(siglip, layers=layers, **kw)
  if name == "siglip2_base":
    return _vit(siglip, layers=12, hidden=768, heads=12, **kw)
  if name in ("siglip2_large", "siglip2"):
    raise ConversionError(f"builder {name!r} without pretrained weights has no defined width "
                          "in the reference (embed_dim=None)")
  if fixture_builder is not None:  # the golden fixture's own builder entry (read only)
    part = fixture_builder["encoder" if is_encoder else "decoder"]
    if part.get("pretrained", True):
      return _vit(siglip, layers=part.get("layer_num"), **kw)
    return _vit(siglip, layers=part["layer_num"], hidden=part["embed_dim"],
                heads=part["num_heads"], mlp=part.get("intermediate_size"), **kw)
  raise ConversionError(f"unknown encoder/decoder builder {name!r} (known: siglip2_base, "
                        "siglip2_large, siglip2)")


def siglip2_vision_config(raw: dict[str, Any]) -> dict[str, Any]:
  """The vision part of a SigLIP2 config file: a bare Siglip2VisionConfig as it is, or the
  `vision_config` of a full (text + vision) Siglip2Config, as transformers takes it."""
  vision = raw.get("vision_config", raw)
  missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads", "num_patches") if k not in vision]
  if missing:
    raise ConversionError(f"SigLIP2 config lacks {', '.join(missing)}")
  return vision


def config_from_reference(config_json: dict[str, Any], config_yaml: dict[str, Any],
                          run_dir: pathlib.Path | None = None,
                          siglip: dict[str, Any] | None = None) -> TokenizerConfig:
  """Builds our TokenizerConfig from the reference's config.json (+ config.yaml)."""
  try:
    fixture = config_yaml.get("fixture_builder")
    if siglip is None:
      if fixture is not None:
        siglip = read_json(pathlib.Path(run_dir) / fixture["siglip2_config"])
      elif run_dir is not None and (pathlib.Path(run_dir) / SIGLIP2_DIR / "config.json").is_file():
        siglip = siglip2_vision_config(read_json(pathlib.Path(run_dir) / SIGLIP2_DIR / "config.json"))
      else:  # a released run: the reference reads SigLIP2-so400m's config
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
# The reference's own builders (name, pretrained), tried in this order when exporting.
_BUILDERS = (("siglip2_base", True), ("siglip2_base", False), ("siglip2_large", True), ("siglip2", True))
# safetensors metadata of the weights file an export puts beside its SigLIP2 config.
_EMPTY_WEIGHTS_NOTE = ("no tensors: the pretrained path's from_pretrained needs a weights file; the "
                       "tokenizer checkpoint holds every tower tensor and load_state_dict replaces them")


def _siglip2_of(tower: ViTConfig, num_layers: int, patch_size: int) -> dict[str, Any]:
  """A SigLIP2 vision config whose width, heads, MLP, grid and eps are `tower`'s."""
  return {"model_type": "siglip2_vision_model", "hidden_size": tower.hidden_size,
          "intermediate_size": tower.mlp_dim, "num_hidden_layers": num_layers,
          "num_attention_heads": tower.num_heads, "num_channels": tower.num_channels,
          "num_patches": tower.position_grid ** 2, "patch_size": patch_size,
          "layer_norm_eps": tower.layer_norm_eps, "hidden_act": "gelu_pytorch_tanh",
          "attention_dropout": 0.0}


def _widths(tower: ViTConfig) -> tuple[int, int, int]:
  return tower.hidden_size, tower.num_heads, tower.mlp_dim


def _describe(tower: ViTConfig) -> str:
  return (f"{tower.num_layers} layers, {tower.hidden_size} wide, {tower.num_heads} heads, MLP {tower.mlp_dim}, "
          f"{tower.position_grid}x{tower.position_grid} positions, eps {tower.layer_norm_eps}")


def _siglip2_candidates(cfg: TokenizerConfig) -> Iterator[dict[str, Any]]:
  """SigLIP2 configs both towers (and the teacher) might be read from: SigLIP2-so400m first (a
  released layout keeps its real SigLIP2), then one with a tower's widths. With a teacher the
  config is the teacher (the reference's repa model is the whole SigLIP2 tower, at the
  decoder's patch size); without, it has as many layers as the deepest tower of those widths."""
  yield dict(SIGLIP2_SO400M, model_type="siglip2_vision_model", hidden_act="gelu_pytorch_tanh",
             attention_dropout=0.0)
  if cfg.teacher is not None:
    yield _siglip2_of(cfg.teacher, cfg.teacher.num_layers, cfg.teacher.patch_size)
    return
  for like in (cfg.encoder, cfg.decoder):
    depth = max(t.num_layers for t in (cfg.encoder, cfg.decoder) if _widths(t) == _widths(like))
    yield _siglip2_of(like, depth, cfg.encoder.patch_size)


def _tower_or_none(name, pretrained, siglip, tower: ViTConfig, is_encoder: bool) -> ViTConfig | None:
  try:
    return _tower(name, pretrained, siglip, tower.patch_size, is_encoder, None)
  except ConversionError:  # e.g. siglip2_base's 12 layers from a shallower SigLIP2
    return None


def reference_layout(cfg: TokenizerConfig) -> tuple[dict[str, Any], tuple[str, bool], tuple[str, bool]]:
  """(SigLIP2 vision config, (encoder builder, pretrained), (decoder builder, pretrained)) with
  which the reference's unmodified build_encoder/build_decoder (and build_repa_model, for a
  teacher) build exactly `cfg`'s towers; a ConversionError saying why when none does."""
  for siglip in _siglip2_candidates(cfg):
    if cfg.teacher is not None and (
        cfg.teacher != _vit(siglip, layers=None, patch=cfg.teacher.patch_size)
        or not cfg.teacher.patch_size == cfg.decoder.patch_size == siglip["patch_size"]):
      continue  # build_repa_model: the whole SigLIP2, its patch size == the decoder's
    for enc, dec in itertools.product(_BUILDERS, _BUILDERS):
      if (_tower_or_none(*enc, siglip, cfg.encoder, True) == cfg.encoder
          and _tower_or_none(*dec, siglip, cfg.decoder, False) == cfg.decoder):
        return siglip, enc, dec
  teacher = f"; teacher ({_describe(cfg.teacher)})" if cfg.teacher is not None else ""
  raise ConversionError(
      "the reference cannot build these towers: it reads both from one SigLIP2 vision config, "
      "a pretrained tower taking that config's width, heads and MLP with 12 (siglip2_base), 16 "
      "(siglip2_large) or all (siglip2) of its layers, the only other tower being siglip2_base "
      "from scratch (12 layers, 768 wide, 12 heads, MLP 3072); position grid and eps are shared"
      f" (encoder: {_describe(cfg.encoder)}; decoder: {_describe(cfg.decoder)}{teacher}). "
      "--format model_dir writes any tokenizer")


def reference_configs(cfg: TokenizerConfig) -> tuple[dict[str, Any], dict[str, Any], dict[str, bytes]]:
  """(config.json, config.yaml, extra files {relative path: bytes}) of a released run for `cfg`.

  The builder names are the reference's own (`reference_layout`), and the SigLIP2 vision config
  they read goes to RUN/siglip2-so400m-patch16-naflex/config.json with a weights file holding
  no tensors (the pretrained path's from_pretrained needs one; the checkpoint fills every
  tower tensor): the unmodified reference loads the export with CACHE_DATA_PATH=RUN. The
  result is checked by converting it back: a config the format cannot express is an error,
  never a silent change.
  """
  from safetensors.numpy import save as safetensors_bytes
  siglip, encoder, decoder = reference_layout(cfg)
  config_json = dict(_REFERENCE_ONLY_FIELDS,
      image_size=cfg.image_size, max_image_size=cfg.max_image_size,
      codebook_size=cfg.codebook_size, codebook_embed_dim=cfg.codebook_embed_dim,
      codebook_l2_norm=cfg.codebook_l2_norm, codebook_show_usage=cfg.codebook_show_usage,
      commit_loss_beta=cfg.commit_loss_beta, entropy_loss_ratio=cfg.entropy_loss_ratio,
      vq_loss_ratio=cfg.vq_loss_ratio, enc_type="siglip2", dec_type="siglip2",
      encoder_model=encoder[0], decoder_model=decoder[0],
      num_latent_tokens=cfg.num_latent_tokens, enc_pretrained=encoder[1], dec_pretrained=decoder[1],
      enc_patch_size=cfg.encoder.patch_size, dec_patch_size=cfg.decoder.patch_size, repa=cfg.repa,
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
                 "encoder_model": encoder[0], "decoder_model": decoder[0],
                 "num_latent_tokens": cfg.num_latent_tokens, "group_size": cfg.group_size,
                 "causal_num": cfg.causal_num, "codebook_size": cfg.codebook_size,
                 "codebook_embed_dim": cfg.codebook_embed_dim}
  back = config_from_reference(config_json, config_yaml, siglip=siglip)
  if back != cfg:
    diff = [k for k in cfg.to_dict() if cfg.to_dict()[k] != back.to_dict()[k]]
    raise ConversionError(f"this tokenizer config cannot be written in the reference's format: "
                          f"{', '.join(diff)} would read back differently")
  files = {f"{SIGLIP2_DIR}/config.json": json.dumps(siglip, indent=2).encode(),
           f"{SIGLIP2_DIR}/model.safetensors": safetensors_bytes(
               {}, metadata={"format": "pt", "note": _EMPTY_WEIGHTS_NOTE})}
  return config_json, config_yaml, files


def load_reference_config(run_dir) -> TokenizerConfig:
  run_dir = pathlib.Path(run_dir)
  config_json, config_yaml = read_run_configs(run_dir)
  return config_from_reference(config_json, config_yaml, run_dir)


# --- key mapping ----------------------------------------------------------------------------

_MLP_PARENTS = ("global_token_proj", "projection")


def torch_name(path: tuple) -> str:
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


def torch_shape(path: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
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
