"""The embedded CPU demo (`python -m detailflow_jax.demo`): DetailFlow end to end on the
procedural shapes, 32 px, 6 classes, each one shape in one colour: red disc, green square, blue
triangle, yellow ring, magenta cross, cyan diamond (data/sources.py:class_shape_colour), one
large near-centred shape on a flat dark background (shapes style "plain").

tokenizer: the detailflow16_tokenizer `tiny` recipe (16 tokens in groups of 4, codebook 256,
           degradation curriculum, self-correction; no GAN at this size). On the plain style its
           full-token reconstructions show the outlines after ~1600 steps (on the textured one,
           colour blobs); 128-wide towers cost 2.8x the CPU per step and were no better at equal
           CPU time (measured, see docs/demo.md).
gpt:       a 4-layer GPT over those 16 tokens (one causal group, then 3 parallel groups), trained
           on codes extracted from the same images (image + mirror, self-correction triples).
eval:      a judge CNN trained on clean procedural images only (shape and colour drawn
           independently, evaluation.train_judge) names the shape and the colour of held-out
           images, of their reconstructions and of the class-conditional samples.

Variant `quick` (the test suite's run) cuts every step count.
"""
import ml_collections

from .gpt_common import gpt_config
from .tokenizer_common import tokenizer_config

NUM_CLASSES = 6
SHAPES_STYLE = "plain"


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_classes = NUM_CLASSES
  t = tokenizer_config(tokens=16, variant="tiny")
  t.data.update(num_classes=NUM_CLASSES, shapes_style=SHAPES_STYLE)
  t.total_steps = 2400
  t.recon_every = 0        # the demo writes its own strips at the end
  t.checkpoint.async_save = False
  c.tokenizer = t

  g = gpt_config(tokens=16, preset="", variant="tiny")
  g.model.update(dim=128, n_layer=4, n_head=4, vocab_size=256, block_size=16,
                 group_size=4, num_classes=NUM_CLASSES, class_dropout_prob=0.1)
  g.data.update(batch_size=64, examples_per_epoch=2 * 8192)
  g.total_steps = 600
  g.optimizer.update(lr=2e-3, warmup_steps=50, weight_decay=0.0)
  g.ema_decay = 0.995
  g.log_every = 100
  g.checkpoint.update(save_every=500, keep=1, async_save=False)
  # Codes for the GPT: the tokenizer's own training images (as ImageNet train is for both).
  g.extract.update(source="shapes", num_images=8192, shapes_size=32, per_device_batch=256,
                   chunk_size=4096, ten_crop=False, self_correction=True,
                   num_classes=NUM_CLASSES, shapes_style=SHAPES_STYLE)
  c.gpt = g

  c.eval = ml_collections.ConfigDict(dict(
      num_images=1024,          # held-out labelled images (another seed): reconstructions
      judge_images=4096,        # clean images the judge learns from (its own seed)
      judge_steps=300,
      samples_per_class=12,
      cfg_scale=3.0, temperature=1.0, top_k=0, top_p=1.0))

  if variant == "quick":
    c.tokenizer.total_steps = 1000
    c.gpt.total_steps = 300
    c.gpt.extract.num_images = 4096
    c.eval.num_images = 512
    c.eval.judge_steps = 200
  elif variant:
    raise ValueError(f"unknown demo variant {variant!r} (known: quick)")
  return c
