"""Attention masks. Convention everywhere in this package: True = may attend.

The reference builds its tokenizer masks with True = blocked and its GPT mask with True =
allowed; we keep one convention and convert only in tests.
"""
import numpy as np


def group_causal_mask(length: int, group_size: int, causal_num: int) -> np.ndarray:
  """[length, length] bool: token-causal below `causal_num`, group-causal after.

  Query i < causal_num sees keys j <= i. Query i >= causal_num sees every key in its own
  group of `group_size` (groups counted from position 0) and all earlier groups. This is the
  latent-token mask of the tokenizer and the GPT's next-detail mask alike.
  """
  if group_size < 1 or causal_num % group_size:
    raise ValueError(f"causal_num={causal_num} must be a multiple of group_size={group_size}")
  i = np.arange(length)[:, None]
  j = np.arange(length)[None, :]
  causal = j <= i
  grouped = (j // group_size) <= (i // group_size)
  return np.where(i < causal_num, causal, grouped)


def patch_latent_mask(num_patches: int, num_latents: int, *, latent_causal: bool,
                      patches_see_latents: bool, latents_see_patches: bool,
                      group_size: int, causal_num: int) -> np.ndarray:
  """[n + m, n + m] bool mask over [patches..., latents...] (the reference's x/z mask).

  Encoder: patches_see_latents=False, latents_see_patches=True. A causal decoder:
  patches_see_latents=True, latents_see_patches=False.
  """
  if num_latents % group_size:
    raise ValueError(f"num_latents={num_latents} must be divisible by group_size={group_size}")
  n, m = num_patches, num_latents
  mask = np.ones((n + m, n + m), dtype=bool)
  if not patches_see_latents:
    mask[:n, n:] = False
  if not latents_see_patches:
    mask[n:, :n] = False
  if latent_causal:
    mask[n:, n:] = group_causal_mask(m, group_size, causal_num)
  return mask
