"""The `eval` sections of the `:eval` config variants (launch/evaluate.py).

Generation (configs/detailflow{16,32,64}_gpt_l.py:eval): the paper's settings per model, CFG
1.45 / 1.5 / 1.32, top-k and top-p off, GPT EMA weights, 50,000 samples with i.i.d. uniform
labels, the reference's bf16 precision and per-rank batch 4. Tokenizer
(configs/detailflow{16,32,64}_tokenizer.py:eval): ImageNet val centre crops, noisy eval on,
the coarse-to-fine curve over every token budget.
"""
import ml_collections

PAPER_CFG = {128: 1.45, 256: 1.5, 512: 1.32}  # DetailFlow-16 / 32 / 64 (gFID 2.96 / 2.75 / 2.59)


def generation_eval(c: ml_collections.ConfigDict, *, tokens: int) -> ml_collections.ConfigDict:
  c.task = "eval_generation"
  c.eval = ml_collections.ConfigDict(dict(
      tokenizer="", gpt="", gpt_weights="ema",   # dirs / run dirs / Hub ids
      vq_weights="model",  # the reference's use_vq_ema=False (released checkpoints only)
      num_samples=50_000, seeds="0", label_mode="uniform",  # seeds: "0,1,2" -> mean ± std
      cfg_scale=PAPER_CFG[tokens], gradual_cfg=False, temperature=1.0, top_k=0, top_p=1.0,
      cfg_interval=-1,  # LlamaGen's rule; the reference ignores its flag: -1 reproduces it
      image_size=0,       # decode side; 0: the tokenizer's image_size
      eval_image_size=0,  # stored side (torch bicubic from image_size); 0: image_size
      precision="bfloat16", per_device_batch=4, chunk_size=1000, param_layout="replicated",
      out="",          # default: WORKDIR/samples.npz (samples-seedS.npz for several seeds)
      png_dir="", reference="", inception="", inception_batch=256))
  return c


def tokenizer_eval(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.task = "eval_tokenizer"
  c.eval = ml_collections.ConfigDict(dict(
      tokenizer="", tokenizer_weights="",          # "" = as converted; model/ema for released runs
      inception="",
      data=ml_collections.ConfigDict(dict(source="imagefolder", path="", split="val",
                                          tfds_name="imagenet2012", num_images=0)),
      seed=0, noisy_eval=True, noise_top_k=50, curve=True, curve_tokens=(),
      image_size=0,       # reconstruct_vq.py --image-size; 0: the tokenizer's image_size
      image_size_eval=0,  # reconstruct_vq.py --image-size-eval; 0: image_size
      precision="bfloat16", per_device_batch=4, chunk_size=1000, inception_batch=256))
  return c
