"""The reference's tokenizer training YAML (train/train_tokenizer.py's --config) -> our run config.

`tokenizer_run_config(yaml_dict)` returns the ml_collections config `detailflow_jax.train.tokenizer`
trains from (`--config=configs/from_reference.py:path/to/vq.yaml`). The reference fills every key the
YAML leaves out from its argparse defaults; so does this converter (REFERENCE_DEFAULTS). Every key
is accounted for: mapped onto a config field, accepted as one that changes nothing in a DetailFlow
(siglip2, VQ) tokenizer's training (logging, paths, VQ-unused ModelArgs), or accepted only at the
value(s) we implement; anything else is an error naming the key. Weight files (SigLIP2, LPIPS, DINO)
are not in the reference's YAML (it downloads them): set them as --config.weights.*.

The model section goes through convert.tokenizer.config_from_reference (the one reading of the
reference's builder names), so a tokenizer trained from this config loads the reference's
checkpoints of the same YAML key for key.
"""
from collections.abc import Mapping
from typing import Any

import ml_collections

from .common import ConversionError
from .tokenizer import config_from_reference

# train_tokenizer.py's argparse defaults for the keys this converter reads (what the reference
# uses when the YAML leaves a key out).
REFERENCE_DEFAULTS: dict[str, Any] = {
    "vq_model": "VQ-16", "ema": True, "codebook_size": 16384, "codebook_embed_dim": 8,
    "codebook_l2_norm": True, "codebook_weight": 1.0, "entropy_loss_ratio": 0.0,
    "vq_loss_ratio": 1.0, "commit_loss_beta": 0.25, "reconstruction_weight": 1.0,
    "reconstruction_loss": "l2", "perceptual_weight": 1.0, "perceptual_loss": "vgg",
    "perceptual_model": "vgg", "perceptual_intermediate_loss": False,
    "perceptual_logit_loss": False, "perceptual_resize": False, "perceptual_warmup": None,
    "disc_weight": 0.5, "disc_start": 20000, "disc_dim": 64, "disc_type": "patchgan",
    "disc_loss": "hinge", "gen_loss": "hinge", "lecam_loss_weight": None, "use_diff_aug": False,
    "disc_cr_loss_weight": 0.0, "disc_adaptive_weight": False, "dropout_p": 0.0,
    "image_size": 256, "epochs": 40, "optimizer": "adam", "lr": 1e-4, "lr_warmup_epochs": 1,
    "lr_scheduler": "none", "weight_decay": 5e-2, "beta1": 0.9, "beta2": 0.95,
    "max_grad_norm": 1.0, "global_batch_size": 128, "global_seed": 0,
    "gradient_accumulation_steps": 1, "mixed_precision": "bf16", "enc_type": "cnn",
    "dec_type": "cnn", "num_latent_tokens": None,
    "encoder_model": "vit_small_patch14_dinov2.lvd142m",
    "decoder_model": "vit_small_patch14_dinov2.lvd142m", "encoder_tuning_method": "full",
    "decoder_tuning_method": "full", "encoder_pretrained": True, "decoder_pretrained": False,
    "encoder_patch_size": 16, "decoder_patch_size": 16, "repa": False,
    "repa_model": "vit_base_patch16_224", "repa_patch_size": 16, "repa_proj_dim": 1024,
    "repa_loss_weight": 0.1, "repa_align": "global", "repa_layer_indices": 1,
    "gradient_checkpointing_encoder": False, "gradient_checkpointing_decoder": False,
    "content_degradation": None, "degradation_prob": 0.0, "degradation_power": 2.0,
    "causal_encoder": False, "causal_decoder": False, "max_image_size": 256,
    "min_image_size": 256, "dynamic_max_image_size": None, "dynamic_resolution_prob": 0.0,
    "max_resolution_prob": 0.0, "adjust_bs_by_resolution": False, "group_size": 1,
    "global_token_loss_weight": 0.0, "correction_training": True, "causal_num": None,
    "finetune": False, "finetune_decoder": False, "vq_ckpt": None, "perceptual_dino_variants":
    "depth12_no_train", "kl_loss_weight": 1e-6, "tau": 0.1, "num_codebooks": 1,
}

# Keys that change nothing in the trained weights' math (logging, paths, the launcher; ModelArgs a
# VQ siglip2 tokenizer never reads; the loss position of a degraded batch the reference never reads).
NO_EFFECT = frozenset({
    "config", "exp_index", "data_path", "cloud_save_path", "no_local_save", "results_dir",
    "dataset", "num_workers", "log_every", "vis_every", "ckpt_every", "save_epochs", "compile",
    "resume_from_newest_ckpt", "debug_mode", "model_weight_strict", "kl_loss_weight", "tau",
    "num_codebooks", "degradation_loss_res", "perceptual_dino_variants",
})

# Keys accepted only at these values (what we implement); another value is an error naming the key.
ONLY = {
    "vq_model": ("VQ-16",), "enc_type": ("siglip2",), "dec_type": ("siglip2",),
    "encoder_tuning_method": ("full",), "decoder_tuning_method": ("full",),
    "perceptual_loss": ("vgg",), "perceptual_model": ("vgg",), "perceptual_intermediate_loss": (False,),
    "perceptual_logit_loss": (False,), "perceptual_resize": (False,), "disc_adaptive_weight": (False,),
    "dropout_p": (0.0,), "gradient_accumulation_steps": (1,), "mixed_precision": ("none", "bf16"),
    "optimizer": ("adam", "adamw"), "lr_scheduler": ("cosine", "none"), "repa_align": ("global",),
    "repa_model": ("siglip2",), "content_degradation": ("resolution_power",),
    "disc_type": ("dino", "patchgan"), "dynamic_max_image_size": (None,),
    "adjust_bs_by_resolution": (False,), "decoder_pretrained": (False,), "finetune": (False,),
    "finetune_decoder": (False,), "vq_ckpt": (None,),
}
WHY_NOT = {
    "decoder_pretrained": "the SigLIP2-pretrained decoder variant (vq_8k_siglip_res_p02_pw15) is not "
                          "implemented: its decoder would start from random weights",
    "dynamic_max_image_size": "the dynamic-resolution crop size is the max_image_size here",
    "adjust_bs_by_resolution": "the per-resolution batch size is not wired into the run config",
    "finetune": "start a fine-tune with --config.init_from instead",
    "finetune_decoder": "set --config.finetune_decoder=True with --config.init_from instead",
    "vq_ckpt": "start from a checkpoint with --config.init_from instead",
    "content_degradation": "without 'resolution_power' the reference trains without degradation "
                           "and without self-correction, which this recipe does not express",
    "mixed_precision": "fp16 with a grad scaler is not implemented (none | bf16)",
}

MAPPED = frozenset({
    "ema", "codebook_size", "codebook_embed_dim", "codebook_l2_norm", "codebook_weight",
    "entropy_loss_ratio", "vq_loss_ratio", "commit_loss_beta", "reconstruction_weight",
    "reconstruction_loss", "perceptual_weight", "perceptual_warmup", "disc_weight", "disc_start",
    "disc_dim", "disc_type", "disc_loss", "gen_loss", "lecam_loss_weight", "use_diff_aug",
    "disc_cr_loss_weight", "image_size", "epochs", "optimizer", "lr", "lr_warmup_epochs",
    "lr_scheduler", "weight_decay", "beta1", "beta2", "max_grad_norm", "global_batch_size",
    "global_seed", "mixed_precision", "num_latent_tokens", "encoder_model", "decoder_model",
    "encoder_pretrained", "decoder_pretrained", "encoder_patch_size", "decoder_patch_size", "repa",
    "repa_patch_size", "repa_proj_dim", "repa_loss_weight", "repa_layer_indices",
    "gradient_checkpointing_encoder", "gradient_checkpointing_decoder", "degradation_prob",
    "degradation_power", "causal_encoder", "causal_decoder", "max_image_size", "min_image_size",
    "dynamic_resolution_prob", "max_resolution_prob", "group_size", "global_token_loss_weight",
    "correction_training", "causal_num",
})
KNOWN = frozenset(REFERENCE_DEFAULTS) | NO_EFFECT | frozenset(ONLY)
EMA_DECAY = 0.9999  # utils/ema.update_ema's default, the only one train_tokenizer.py uses


def check_keys(yaml: Mapping[str, Any], where: str = "training YAML") -> dict[str, Any]:
  """The YAML with the reference's defaults filled in; unknown keys and unsupported values are
  errors naming the key."""
  unknown = sorted(set(yaml) - KNOWN)
  if unknown:
    hint = (" ('fixture_builder' is a test fixture's block: the test maps it, a run config has none)"
            if "fixture_builder" in unknown else "")
    raise ConversionError(f"{where}: unknown key(s) {', '.join(unknown)}{hint}")
  args = dict(REFERENCE_DEFAULTS, **{k: v for k, v in yaml.items()})
  for key, allowed in ONLY.items():
    if key in args and args[key] not in allowed:
      why = WHY_NOT.get(key, "not implemented")
      raise ConversionError(f"{where}: {key}={args[key]!r} is not supported (accepted: "
                            f"{', '.join(repr(a) for a in allowed)}): {why}")
  if args["num_latent_tokens"] is None:
    raise ConversionError(f"{where}: num_latent_tokens is not set (a DetailFlow tokenizer needs it)")
  return args


def model_args(args: Mapping[str, Any]) -> dict[str, Any]:
  """The VQ ModelArgs train_tokenizer.py builds from its arguments (config.json's fields)."""
  return {
      "image_size": args["image_size"], "max_image_size": args["max_image_size"],
      "codebook_size": args["codebook_size"], "codebook_embed_dim": args["codebook_embed_dim"],
      "codebook_l2_norm": args["codebook_l2_norm"], "codebook_show_usage": True,
      "commit_loss_beta": args["commit_loss_beta"], "entropy_loss_ratio": args["entropy_loss_ratio"],
      "vq_loss_ratio": args["vq_loss_ratio"], "enc_type": args["enc_type"], "dec_type": args["dec_type"],
      "encoder_model": args["encoder_model"], "decoder_model": args["decoder_model"],
      "num_latent_tokens": args["num_latent_tokens"], "enc_pretrained": args["encoder_pretrained"],
      "dec_pretrained": args["decoder_pretrained"], "enc_patch_size": args["encoder_patch_size"],
      "dec_patch_size": args["decoder_patch_size"], "repa": args["repa"],
      "repa_patch_size": args["repa_patch_size"], "repa_proj_dim": args["repa_proj_dim"],
      "repa_layer_indices": args["repa_layer_indices"], "repa_loss_weight": args["repa_loss_weight"],
      "causal_encoder": args["causal_encoder"], "causal_decoder": args["causal_decoder"],
      "group_size": args["group_size"], "causal_num": args["causal_num"],
      "global_token_loss_weight": args["global_token_loss_weight"],
      "correction_training": args["correction_training"],
  }


def tokenizer_run_config(yaml: Mapping[str, Any], *, siglip: Mapping[str, Any] | None = None,
                         fixture_builder: Mapping[str, Any] | None = None,
                         run_dir=None, where: str = "training YAML") -> ml_collections.ConfigDict:
  """Our tokenizer run config from the reference's training YAML (as a dict).

  siglip: the SigLIP2 vision config the builders size their towers from (default the released
  siglip2-so400m-patch16-naflex); fixture_builder / run_dir: a test fixture's explicit tower sizes
  (see convert.tokenizer.config_from_reference), passed apart from the YAML."""
  from ..configs.tokenizer_common import tokenizer_config
  args = check_keys(yaml, where)
  yaml_view = {"max_image_size": args["max_image_size"], "min_image_size": args["min_image_size"],
               "degradation_power": args["degradation_power"]}
  if fixture_builder is not None:
    yaml_view["fixture_builder"] = dict(fixture_builder)
  model = config_from_reference(model_args(args), yaml_view, run_dir, siglip=siglip)

  c = tokenizer_config(tokens=args["num_latent_tokens"])
  c.model = ml_collections.ConfigDict(model.to_dict())
  c.seed = int(args["global_seed"])
  c.losses.update(
      reconstruction_loss=args["reconstruction_loss"],
      reconstruction_weight=float(args["reconstruction_weight"]),
      perceptual_weight=float(args["perceptual_weight"]),
      perceptual_warmup=int(args["perceptual_warmup"] or 0),  # None: full weight from the start
      disc_weight=float(args["disc_weight"]), disc_start=int(args["disc_start"]),
      disc_loss=args["disc_loss"], gen_loss=args["gen_loss"],
      lecam_loss_weight=float(args["lecam_loss_weight"] or 0.0),  # None: no LeCam
      disc_cr_loss_weight=float(args["disc_cr_loss_weight"]), use_diff_aug=bool(args["use_diff_aug"]),
      codebook_weight=float(args["codebook_weight"]),
      ema_decay=EMA_DECAY if args["ema"] else 0.0)
  c.disc.type = args["disc_type"]
  c.disc.patchgan_dim = int(args["disc_dim"])
  c.data.update(batch_size=int(args["global_batch_size"]), degradation_prob=float(args["degradation_prob"]),
                dynamic_resolution_prob=float(args["dynamic_resolution_prob"]),
                max_resolution_prob=float(args["max_resolution_prob"]))
  c.num_epochs = int(args["epochs"])
  o = c.optimizer
  o.update(lr=float(args["lr"]), scale_lr_by_batch=True, b1=float(args["beta1"]),
           b2=float(args["beta2"]), max_grad_norm=float(args["max_grad_norm"]),
           # torch.optim.Adam gets no weight decay in train_tokenizer.py; AdamW gets it on the
           # reference's decay groups (>= 2-D torch shapes, no biases).
           weight_decay=float(args["weight_decay"]) if args["optimizer"] == "adamw" else 0.0)
  if args["lr_scheduler"] == "cosine":
    o.update(schedule="cosine", warmup_epochs=float(args["lr_warmup_epochs"]), warmup_steps=-1)
  else:  # 'none': no scheduler at all, the optimizer's lr throughout (no warm-up)
    o.update(schedule="constant", warmup_steps=0)
  c.compute_dtype = "float32" if args["mixed_precision"] == "none" else "bfloat16"
  c.remat.update(encoder="full" if args["gradient_checkpointing_encoder"] else "none",
                 decoder="full" if args["gradient_checkpointing_decoder"] else "none")
  c.weights.encoder_from_scratch = not args["encoder_pretrained"]
  return c
