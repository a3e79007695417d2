"""The reference's training YAML -> our run config (convert/training_yaml.py), and the optimizer's
decay groups following the reference's torch shapes."""
import jax
import numpy as np
import pytest
from conftest import TINY

from detailflow_jax.convert.common import ConversionError, load_state_dict
from detailflow_jax.convert.tokenizer import MAPPING, load_reference_config
from detailflow_jax.convert.training_yaml import tokenizer_run_config
from detailflow_jax.models.tokenizer import Tokenizer, TokenizerConfig
from detailflow_jax.train import tokenizer as recipe
from detailflow_jax.train.optim import param_path


def _released_yaml():
  """The values of the reference's configs/vq_8k_siglip_b_res_p02_pw15_enc.yaml with the
  README's DF-16 command-line values (num_latent_tokens 128, group_size 8,
  global_token_loss_weight 1, epochs 250) set, as train_tokenizer.py would read them."""
  return {
      # logging / paths (no effect on the weights)
      "results_dir": "experiments/tokenizer", "cloud_save_path": "experiments/tokenizer", "compile": False,
      "log_every": 50, "vis_every": 5000, "save_epochs": 1, "no_local_save": True, "dataset": "imagenet",
      "data_path": "./ImageNet/train", "tau": 0.07, "num_codebooks": 1,
      # data and degradation
      "global_seed": 42, "mixed_precision": "bf16", "image_size": 256, "max_image_size": 256,
      "min_image_size": 256, "content_degradation": "resolution_power", "causal_encoder": True,
      "causal_decoder": False, "degradation_prob": 0.2, "degradation_power": 1.5,
      "dynamic_resolution_prob": 0,
      # quantizer and losses
      "vq_model": "VQ-16", "ema": False, "codebook_size": 8192, "codebook_embed_dim": 8,
      "entropy_loss_ratio": 0.0, "vq_loss_ratio": 1.0, "commit_loss_beta": 0.25,
      "reconstruction_weight": 1.0, "perceptual_weight": 1.0, "perceptual_warmup": 10000,
      "disc_weight": 0.2, "use_diff_aug": True, "disc_cr_loss_weight": 4.0, "disc_start": 40000,
      "disc_type": "dino", "disc_loss": "hinge", "gen_loss": "hinge", "lecam_loss_weight": 0.001,
      # towers
      "enc_type": "siglip2", "encoder_model": "siglip2_base", "encoder_pretrained": True,
      "encoder_patch_size": 16, "encoder_tuning_method": "full", "dec_type": "siglip2",
      "decoder_model": "siglip2_base", "decoder_pretrained": False, "decoder_patch_size": 16,
      "decoder_tuning_method": "full", "num_latent_tokens": 128, "group_size": 8,
      "global_token_loss_weight": 1.0,
      "repa": False, "repa_model": "siglip2", "repa_patch_size": 16, "repa_proj_dim": 1024,
      "repa_loss_weight": 0.5, "repa_layer_indices": 1,
      # optimizer
      "epochs": 250, "lr": 1.0e-4, "optimizer": "adam", "lr_scheduler": "cosine", "weight_decay": 0.0001,
      "beta1": 0.9, "beta2": 0.95, "max_grad_norm": 1.0, "global_batch_size": 256,
  }


def test_released_recipe_converts_to_our_df16_config():
  from configs.detailflow16_tokenizer import get_config
  c = tokenizer_run_config(_released_yaml())
  ours = get_config()
  assert TokenizerConfig.from_dict(c.model) == TokenizerConfig.from_dict(ours.model)
  assert c.losses.to_dict() == ours.losses.to_dict()
  assert c.optimizer.lr == ours.optimizer.lr and c.optimizer.schedule == "cosine"
  assert c.optimizer.weight_decay == 0.0  # torch.optim.Adam: no decay
  assert c.data.batch_size == 256 and c.data.degradation_prob == 0.2
  assert c.seed == 42 and c.compute_dtype == "bfloat16" and c.num_epochs == 250


def test_unknown_and_unsupported_keys_are_errors_naming_them():
  y = _released_yaml()
  with pytest.raises(ConversionError, match="unknown key.*lr_decay"):
    tokenizer_run_config(dict(y, lr_decay=0.5))
  with pytest.raises(ConversionError, match="fixture_builder"):
    tokenizer_run_config(dict(y, fixture_builder={}))
  for key, value in (("decoder_pretrained", True), ("dynamic_max_image_size", 512),
                     ("adjust_bs_by_resolution", True), ("disc_adaptive_weight", True),
                     ("mixed_precision", "fp16"), ("disc_type", "stylegan"), ("dropout_p", 0.1)):
    with pytest.raises(ConversionError, match=key):
      tokenizer_run_config(dict(y, **{key: value}))


def test_lr_scheduler_none_is_a_flat_lr_without_warmup():
  c = tokenizer_run_config(dict(_released_yaml(), lr_scheduler="none"))
  sched = recipe.learning_rate(c, 1000)
  lr = 1e-4 * 256 / 256
  np.testing.assert_allclose([float(sched(t)) for t in (0, 1, 500, 999, 5000)], lr, rtol=1e-6)


def test_adamw_and_defaults_follow_the_reference():
  y = dict(_released_yaml(), optimizer="adamw", weight_decay=0.05, ema=True)
  del y["lecam_loss_weight"], y["perceptual_warmup"]  # argparse defaults: None -> off / no warm-up
  c = tokenizer_run_config(y)
  assert c.optimizer.weight_decay == 0.05
  assert c.losses.lecam_loss_weight == 0.0 and c.losses.perceptual_warmup == 0
  assert c.losses.ema_decay == 0.9999


def test_decay_groups_follow_the_reference_torch_shapes():
  """param_groups_weight_decay: decay iff the torch tensor has ndim >= 2 and is not a bias. The
  decoder's mask_token is [1, 1, D] there (decayed) and [D] here."""
  cfg = load_reference_config(TINY / "tokenizer")
  state = load_state_dict(TINY / "tokenizer" / "checkpoints" / "tokenizer.pt")
  graphdef, params, *_ = recipe.split_trainable(Tokenizer(cfg, rngs=0))
  from detailflow_jax.train.optim import reference_decay_mask
  mask = reference_decay_mask(MAPPING)(params)
  checked = 0
  for path, decays in jax.tree_util.tree_flatten_with_path(mask)[0]:
    name = MAPPING.name(tuple(param_path(path).split("/")))
    torch_value = state[name]
    assert decays == (torch_value.ndim >= 2 and not name.endswith(".bias")), name
    checked += 1
  assert checked > 50
  flat = {param_path(p): d for p, d in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert flat["decoder/mask_token"] is True
