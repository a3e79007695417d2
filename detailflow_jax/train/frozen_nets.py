"""The pretrained networks tokenizer training reads from weight files: SigLIP2 (encoder init and
teacher), LPIPS VGG16 (perceptual loss) and DINO ViT-S/16 (discriminator backbone).

Nothing is downloaded: every file is named in the config (c.weights.*); a missing one is a clear
error naming the file to supply (detailflow_jax.convert.frozen). `random_*` build the same
networks with random weights, for benchmarks and tests.
"""
import logging

import ml_collections

from ..convert.frozen import (
  dino_discriminator_from_torch,
  init_encoder_from_siglip2,
  load_teacher_from_siglip2,
  lpips_from_torch,
)
from ..models.dino import DinoConfig, DinoDiscriminator
from ..models.lpips import LPIPS, VGG16_WIDTHS
from ..models.patchgan import PatchGANDiscriminator

log = logging.getLogger("detailflow_jax")


def _split(path: str):
  """'a.pth' or 'a.pth,b.pth' (LPIPS: VGG16 file, heads file)."""
  parts = [p for p in str(path).split(",") if p]
  return parts[0], (parts[1] if len(parts) > 1 else None)


def load_tokenizer_weights(tokenizer, weights: ml_collections.ConfigDict) -> None:
  """Initialises the encoder from SigLIP2 (the reference's enc_pretrained) and fills the frozen
  teacher (global-token / REPA alignment), as configured."""
  if weights.get("encoder_init"):
    init_encoder_from_siglip2(tokenizer, weights.encoder_init)
    log.info("encoder initialised from SigLIP2 weights %s", weights.encoder_init)
  if getattr(tokenizer, "repa_model", None) is not None:
    load_teacher_from_siglip2(tokenizer, weights.teacher)
    log.info("SigLIP2 teacher loaded from %s", weights.teacher)


def check_weight_files_used(c: ml_collections.ConfigDict, teacher: bool) -> None:
  """A weight file named in c.weights that this config never reads is an error (a silently
  ignored file would let a run look configured when it is not)."""
  readers = {"teacher": teacher, "lpips": bool(c.losses.perceptual_weight),
             "dino": c.disc.type == "dino"}
  unused = [f"weights.{k}" for k, used in readers.items() if c.weights.get(k) and not used]
  if unused:
    raise ValueError(f"{', '.join(unused)} set but unused by this config (teacher: repa / "
                     "global_token_loss_weight; lpips: losses.perceptual_weight; dino: disc.type=dino)")


def build_perceptual(c: ml_collections.ConfigDict):
  """LPIPS (VGG16) from c.weights.lpips = 'vgg16.pth[,lpips_heads.pth]'."""
  vgg, heads = _split(c.weights.lpips)
  return lpips_from_torch(vgg, heads)


def build_discriminator(c: ml_collections.ConfigDict):
  """The discriminator c.disc.type names (None for 'none'), heads freshly initialised."""
  d = c.disc
  if d.type == "none":
    return None
  if d.type == "patchgan":
    return PatchGANDiscriminator(3, d.patchgan_dim, d.patchgan_layers, rngs=c.seed + 1)
  if d.type == "dino":
    return dino_discriminator_from_torch(c.weights.dino, key_depths=tuple(d.dino_key_depths),
                                         depth=d.dino_depth, num_heads=d.dino_num_heads, seed=c.seed + 1)
  raise ValueError(f"disc.type={d.type!r} (dino | patchgan | none)")


def random_perceptual(small: bool = False):
  """LPIPS with random weights: full VGG16 widths, or 1/8 of them when `small`."""
  widths = tuple(max(w // 8, 4) for w in VGG16_WIDTHS) if small else VGG16_WIDTHS
  return LPIPS(widths, rngs=0)


def random_discriminator(c: ml_collections.ConfigDict, small: bool = False):
  """The configured discriminator with a random DINO backbone (ViT-S/16, or a 2-block 64-wide
  one when `small`)."""
  d = c.disc
  if d.type != "dino":
    return build_discriminator(c)
  cfg = (DinoConfig(hidden_size=64, num_heads=2, mlp_dim=128, depth=2, image_size=64, key_depths=(0, 1))
         if small else DinoConfig(depth=d.dino_depth, num_heads=d.dino_num_heads,
                                  key_depths=tuple(d.dino_key_depths)))
  return DinoDiscriminator(cfg, rngs=c.seed + 1)
