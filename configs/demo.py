"""The embedded CPU demo (`python -m detailflow_jax.demo`): DetailFlow end to end on the
procedural shapes, 32 px, 10 classes (shape x colour).

tokenizer: the detailflow16_tokenizer `tiny` recipe (16 tokens in groups of 4, codebook 256,
           degradation curriculum, self-correction; no GAN at this size).
gpt:       a 4-layer GPT over those 16 tokens (one causal group, then 3 parallel groups), trained
           on codes extracted from the same images (image + mirror, self-correction triples).
eval:      a small CNN trained on tokenizer reconstructions of held-out labelled images
           classifies the class-conditional samples; the demo reports its accuracy.

Variant `quick` (the test suite's run) cuts every step count.
"""
import ml_collections

from configs.gpt_common import gpt_config
from configs.tokenizer_common import tokenizer_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_classes = 10
  c.tokenizer = tokenizer_config(tokens=16, variant="tiny")
  c.tokenizer.total_steps = 1600
  c.tokenizer.recon_every = 0        # the demo writes its own strips at the end
  c.tokenizer.checkpoint.async_save = False

  g = gpt_config(tokens=16, preset="", variant="tiny")
  g.model.update(dims=dict(dim=128, n_layer=4, n_head=4), vocab_size=256, block_size=16,
                 group_size=4, num_classes=10, class_dropout_prob=0.1)
  g.data.update(batch_size=64, examples_per_epoch=2 * 8192)
  g.total_steps = 600
  g.optimizer.update(lr=2e-3, warmup_steps=50, weight_decay=0.0)
  g.ema_decay = 0.995
  g.log_every = 100
  g.checkpoint.update(save_every=500, keep=1, async_save=False)
  # Codes for the GPT: the tokenizer's own training images (as ImageNet train is for both).
  g.extract.update(source="shapes", num_images=8192, shapes_size=32, batch_size=256,
                   chunk_size=4096, ten_crop=False, self_correction=True)
  c.gpt = g

  c.eval = ml_collections.ConfigDict(dict(
      num_images=2048,          # held-out labelled images (another seed) for the classifier
      classifier_steps=400,
      samples_per_class=8,
      cfg_scale=3.0, temperature=1.0, top_k=0, top_p=1.0))
  c.num_strip_images = 4        # reconstructions shown coarse to fine

  if variant == "quick":
    c.tokenizer.total_steps = 1000
    c.gpt.total_steps = 400
    c.gpt.extract.num_images = 4096
    c.eval.num_images = 1024
    c.eval.classifier_steps = 300
  elif variant:
    raise ValueError(f"unknown demo variant {variant!r} (known: quick)")
  return c
