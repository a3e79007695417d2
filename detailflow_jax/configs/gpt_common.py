"""The AR (GPT) training recipe of DetailFlow, shared by the detailflow{16,32,64}_gpt_* configs.

Values follow the reference's configs/ar_l.yaml and train_c2i.py: AdamW lr 1e-4, betas
(0.9, 0.95), weight decay 5e-2 on >= 2-D weights, grad clip 1.0, warm-up over 5% of the steps
from 0.005*lr then cosine to 0.01*lr, global batch 256, 300 epochs, EMA, dropout 0.1, label
dropout 0.1 (CFG), self-correction with probability 0.3, bf16 compute.
"""
import ml_collections
from ml_collections.config_dict import placeholder

from .run_common import add_run_sections

IMAGENET_TRAIN_IMAGES = 1_281_167
TEN_CROP_FLIP = 20  # extraction stores 10 crops x (image, flip) per image


def gpt_config(*, tokens: int, preset: str = "GPT-L", variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "ar"
  c.seed = 0
  # Exactly GPTConfig's fields (models/gpt.py) plus `preset`, which gives dim / n_layer / n_head
  # unless they are set here; any field may be overridden (--config.model.n_kv_head=4).
  # vocab_size, block_size, group_size and causal_num belong to the codes: with a codes.json
  # beside data.path (launch/extract_codes.py writes it) they are checked against it (a
  # mismatch is an error naming both values), and set to None they are read from it, as
  # train_c2i.py reads them from the codes' json.
  c.model = ml_collections.ConfigDict(dict(
      preset=preset, dim=placeholder(int), n_layer=placeholder(int), n_head=placeholder(int),
      n_kv_head=placeholder(int), multiple_of=256, ffn_dim_multiplier=placeholder(float),
      rope_base=10000.0, norm_eps=1e-5, initializer_range=0.02, token_dropout_p=0.1,
      attn_dropout_p=0.0, resid_dropout_p=0.1, ffn_dropout_p=0.1, drop_path_rate=0.0,
      num_classes=1000, class_dropout_prob=0.1, vocab_size=8192, cls_token_num=1,
      block_size=tokens, group_size=8, causal_num=placeholder(int),
      learnable_tok_embeddings=True))
  # mix_path: the reference's ten_crop_105 code mix (dataset/imagenet.py): a second records
  # directory of the same images in the same order, extracted from a 1.05x centre crop
  # (--config.extract.crop_range=1.05); each example reads its codes from it with probability
  # 0.5. "" (default): data.path alone, as the released recipe's script (no ten_crop_105 codes).
  c.data = ml_collections.ConfigDict(dict(
      source="token_records", path="", mix_path="", batch_size=256, num_workers=8,
      examples_per_epoch=IMAGENET_TRAIN_IMAGES))
  c.num_epochs = 300
  c.total_steps = -1  # -1: derived from num_epochs * examples_per_epoch / batch_size
  c.correction_prob = 0.3
  c.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-4, weight_decay=5e-2, b1=0.9, b2=0.95, eps=1e-8, max_grad_norm=1.0,
      warmup_ratio=0.05, warmup_steps=-1, warmup_start_fraction=0.005, schedule="cosine",
      end_lr_fraction=0.01))
  c.ema_decay = 0.9999
  c.compute_dtype = "bfloat16"  # autocast (models/precision.py): float32 master weights
  c.remat = "none"  # per-block gradient checkpointing: none | full | save_dots (models/remat.py)
  add_run_sections(c)
  c.log_every = 50
  c.sample_every = 0          # steps between sample PNGs (0: off); needs tokenizer_dir
  c.tokenizer_dir = ""
  c.distributed = ml_collections.ConfigDict(dict(coordinator="", num_processes=1, process_id=0))
  # launch/extract_codes.py: which images to encode, and how (the reference: ten crops of a
  # 1.1x centre crop, self-correction triples, bf16 autocast). On the config's mesh: every
  # device encodes per_device_batch images (x views) per step, whatever the device count;
  # precision: bfloat16 (autocast, float32 parameters) | float32. tokenizer_weights: which weights
  # of a released tokenizer checkpoint encode (the reference's --vq-ema): "ema" | "model" | ""
  # (the loader's default, 'model', as the reference's scripts/train_c2i_token.sh passes
  # --vq-ema False); a converted directory holds one set and takes only "".
  c.extract = ml_collections.ConfigDict(dict(
      source="imagefolder", path="", split="train", image_size=0, ten_crop=True, crop_range=1.1,
      self_correction=True, precision="bfloat16", per_device_batch=8, chunk_size=10000, seed=0,
      num_classes=10, shapes_size=64, shapes_style="textured", num_images=0, tokenizer_weights=""))

  if variant == "tiny":
    c.model.update(preset="", dim=64, n_layer=2, n_head=4, vocab_size=64,
                   block_size=32, group_size=4, num_classes=10)
    c.data.update(batch_size=16, num_workers=0, examples_per_epoch=256)
    c.num_epochs = 1
    c.total_steps = 200
    c.optimizer.update(lr=3e-3, warmup_steps=10, weight_decay=0.0)
    c.compute_dtype = "float32"
    c.ema_decay = 0.99
    c.checkpoint.update(save_every=50, keep=2, milestone_every=0)
    c.log_every = 20
    c.extract.update(source="shapes", num_images=512, shapes_size=64, per_device_batch=8,
                     chunk_size=256, ten_crop=False, precision="float32")
  elif variant:
    raise ValueError(f"unknown config variant {variant!r} (known: tiny)")
  return c
