"""The tokenizer training recipe of DetailFlow, shared by the detailflow{16,32,64}_tokenizer configs.

Values follow the reference's configs/vq_8k_siglip_b_res_p02_pw15_enc.yaml and the README's
commands (--num-latent-tokens 128/256/512 --group-size 8 --epochs 250
--global-token-loss-weight 1): SigLIP2 encoder (the first 12 layers of siglip2-so400m-patch16,
pretrained), a 12-layer 768-wide decoder from scratch, codebook 8192 x 8 (l2-normalised),
degradation probability 0.2 with power 1.5, self-correction, l2 reconstruction + LPIPS (warm-up
10k steps) + DINO discriminator (hinge, weight 0.2, from step 40k, DiffAugment, LeCam 1e-3,
consistency 4.0), Adam lr 1e-4 (x batch/256) betas (0.9, 0.95), grad clip 1.0, timm's cosine over
all steps to 0.1 lr with one warm-up epoch from 1e-5 laid over it, global batch 256, bf16.

`model` maps field for field onto detailflow_jax.models.tokenizer.TokenizerConfig (encoder /
decoder / teacher onto ViTConfig); an unknown key is an error naming it. The reference's
checkpoint formats (builder names, enc_pretrained, ...) are read only by detailflow_jax/convert.
"""
import ml_collections

from .run_common import add_run_sections

IMAGENET_TRAIN_IMAGES = 1_281_167
# SigLIP2-so400m-patch16 (naflex) vision tower sizes: the encoder is its first 12 layers (the
# reference's siglip2_base builder, pretrained), the teacher all 27.
SIGLIP2_SO400M = dict(hidden_size=1152, num_heads=16, mlp_dim=4304, position_grid=16, patch_size=16)
# The reference's siglip2_base decoder from scratch: 12 layers, 768 wide (MLP 4x), no patch embedding.
DECODER_BASE = dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072, position_grid=16,
                    patch_size=16, patch_embedding=False)


def tokenizer_config(*, tokens: int, variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "tokenizer"
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      encoder=dict(SIGLIP2_SO400M, num_layers=12), decoder=DECODER_BASE,
      teacher=dict(SIGLIP2_SO400M, num_layers=27),
      image_size=256, max_image_size=256, min_image_size=256, codebook_size=8192,
      codebook_embed_dim=8, codebook_l2_norm=True, codebook_show_usage=True, commit_loss_beta=0.25,
      entropy_loss_ratio=0.0, vq_loss_ratio=1.0, num_latent_tokens=tokens,
      group_size=8, causal_num=None, causal_encoder=True, causal_decoder=False,
      correction_training=True, degradation_power=1.5, global_token_loss_weight=1.0,
      global_token_hidden=1024, repa=False, repa_proj_dim=1024, repa_layer_indices=1,
      repa_loss_weight=0.5))
  # Pretrained / frozen weights the run reads at start (nothing is downloaded):
  c.weights = ml_collections.ConfigDict(dict(
      encoder_init="",        # SigLIP2 (HF safetensors dir/file or big_vision .npz): encoder init
      encoder_from_scratch=False,  # True: no encoder_init, a random encoder on purpose
      teacher="",             # the same SigLIP2, full depth: global-token / REPA teacher
      lpips="",               # LPIPS VGG16 (torchvision vgg16 .pth + LPIPS vgg.pth, or one file)
      dino="",                # DINO ViT-S/16 (dino_deitsmall16_pretrain.pth) for the discriminator
  ))
  c.losses = ml_collections.ConfigDict(dict(
      reconstruction_loss="l2", reconstruction_weight=1.0, perceptual_weight=1.0,
      perceptual_warmup=10000, disc_weight=0.2, disc_start=40000, disc_loss="hinge",
      gen_loss="hinge", lecam_loss_weight=0.001, lecam_decay=0.999, disc_cr_loss_weight=4.0,
      use_diff_aug=True, codebook_weight=1.0, ema_decay=0.0,
      lpips_dropout=0.5))  # the reference's LPIPS heads' Dropout(0.5), active in its training
  c.disc = ml_collections.ConfigDict(dict(type="dino", patchgan_dim=64, patchgan_layers=3,
                                          dino_depth=12, dino_key_depths=(2, 5, 8, 11),
                                          dino_num_heads=6))  # ViT-S/16: 384 wide, 6 heads
  c.data = ml_collections.ConfigDict(dict(
      source="imagefolder", path="", split="train", tfds_name="imagenet2012", batch_size=256,
      num_workers=8, examples_per_epoch=IMAGENET_TRAIN_IMAGES, degradation_prob=0.2,
      dynamic_resolution_prob=0.0, max_resolution_prob=0.0, num_classes=10, shapes_size=256,
      shapes_style="textured", num_images=0, seed=0))
  c.num_epochs = 250
  c.total_steps = -1  # -1: num_epochs * examples_per_epoch / batch_size
  c.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-4, scale_lr_by_batch=True, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
      max_grad_norm=1.0, warmup_epochs=1.0, warmup_steps=-1, schedule="cosine",
      warmup_lr=1e-5,         # timm's warmup_lr_init: the absolute lr the warm-up starts from
      end_lr_fraction=0.1))
  # bf16 autocast as the reference (models/precision.py): float32 master weights, bf16 matmuls.
  c.compute_dtype = "bfloat16"
  # Per-layer gradient checkpointing of the encoder / decoder towers: none | full | save_dots.
  # save_dots: the DF-16 step at 4 images per v5e chip needs 11.25 GiB of its 16 with it, 19.49
  # without (no remat), for +1.4 % FLOPs (full: 9.54 GiB, +15 %); benchmarks/memory_plan.py.
  c.remat = ml_collections.ConfigDict(dict(encoder="save_dots", decoder="save_dots"))
  add_run_sections(c)
  # Decoder-only fine-tune (the reference's --finetune-decoder): only decoder.* and
  # post_quant_conv train; the encoder and the codebook stay as init_from loaded them; no
  # global-token loss (REPA stays).
  c.finetune_decoder = False
  c.log_every = 50
  c.recon_every = 5000       # steps between reconstruction PNGs (0: off)
  c.num_recon_images = 4
  c.distributed = ml_collections.ConfigDict(dict(coordinator="", num_processes=1, process_id=0))

  if variant == "tiny":
    # A few CPU minutes on the procedural shapes: 32 px, 16 tokens in groups of 4.
    # From scratch a tiny l2-normalised codebook collapses to a handful of codes within 100
    # steps (measured: 1-13 % usage, the decoder then learns the mean image); the reference's
    # entropy term (LlamaGen's entropy_loss_ratio) keeps >= 95 % of the 256 codes in use.
    tower = dict(hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128, position_grid=4,
                 patch_size=8)
    c.model.update(image_size=32, max_image_size=32, min_image_size=32, codebook_size=256,
                   num_latent_tokens=16, group_size=4, global_token_loss_weight=0.0,
                   entropy_loss_ratio=0.02)
    c.model.encoder = tower
    c.model.decoder = dict(tower, patch_embedding=False)
    c.model.teacher = None  # no alignment loss at this size
    # No LPIPS (no VGG weights offline) and no GAN: a PatchGAN switched on after 2500 steps
    # made this model's reconstructions worse within 500 steps (rec loss 0.068 -> 0.09-0.15).
    # `--config.disc.type=patchgan` turns the small one below on (the resume test does).
    c.losses.update(perceptual_weight=0.0, perceptual_warmup=0, disc_start=2000, disc_weight=0.1,
                    disc_cr_loss_weight=0.0)
    c.disc.update(type="none", patchgan_dim=16, patchgan_layers=2)
    c.data.update(source="shapes", batch_size=32, num_workers=0, examples_per_epoch=8192,
                  degradation_prob=0.2, num_classes=10, shapes_size=32, num_images=8192)
    c.total_steps = 2500
    c.optimizer.update(lr=2e-3, scale_lr_by_batch=False, warmup_steps=20, end_lr_fraction=0.1)
    c.compute_dtype = "float32"
    c.remat.update(encoder="none", decoder="none")  # nothing to save at this size
    c.weights.encoder_from_scratch = True  # no SigLIP2 at this size
    c.checkpoint.update(save_every=500, keep=2, milestone_every=0)
    c.log_every = 100
    c.recon_every = 1000
  elif variant:
    raise ValueError(f"unknown config variant {variant!r} (known: tiny)")
  return c
