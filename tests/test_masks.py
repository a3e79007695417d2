"""Masks identical to the reference's (its tokenizer masks are True = blocked)."""
import numpy as np
import pytest

from detailflow_jax.models.masks import group_causal_mask, patch_latent_mask


def test_encoder_masks(golden):
  full = patch_latent_mask(64, 32, latent_causal=True, patches_see_latents=False,
                           latents_see_patches=True, group_size=4, causal_num=4)
  np.testing.assert_array_equal(full, ~golden["mask_enc_full"])
  partial = patch_latent_mask(64, 24, latent_causal=True, patches_see_latents=False,
                              latents_see_patches=True, group_size=4, causal_num=4)
  np.testing.assert_array_equal(partial, ~golden["mask_enc_partial"])


def test_causal_decoder_mask(golden):
  mask = patch_latent_mask(64, 32, latent_causal=True, patches_see_latents=True,
                           latents_see_patches=False, group_size=4, causal_num=4)
  np.testing.assert_array_equal(mask, ~golden["mask_dec_causal"])


def test_gpt_group_causal_mask(golden):
  np.testing.assert_array_equal(group_causal_mask(32, 4, 4), golden["gpt_group_causal_mask"])


def test_longer_causal_prefix():
  mask = group_causal_mask(12, 4, 8)
  assert not mask[5, 6] and mask[6, 5]          # token-causal inside the first 8
  assert mask[8, 11] and not mask[7, 8]          # group 8..11 sees itself entirely
  with pytest.raises(ValueError, match="multiple"):
    group_causal_mask(12, 4, 6)
