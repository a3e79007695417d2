"""The pinned sampling protocol: sample i's class label and PRNG key are pure functions of
(seed, i), so a seed names the same N images on 1 chip, 8 chips or a pod, in any batch size.

The reference (sample_c2i_ddp.py) seeds each rank with global_seed * world_size + rank and draws
labels and noise from that rank's stream, so its images depend on the world size and the
per-rank batch; it cannot be reproduced across device counts. Here:

  key_i   = fold_in(fold_in(key(seed), SAMPLE_STREAM), i)        (the sampler's per-row key)
  label_i = uniform:  randint(fold_in(fold_in(key(seed), LABEL_STREAM), i), 0, C)  (i.i.d., as the reference)
            balanced: i mod C                                     (N / C per class when C | N)

Both run inside jit on index arrays, so each device computes its own rows' labels and keys.
"""
import jax
import jax.numpy as jnp
import numpy as np

LABEL_MODES = ("uniform", "balanced")
SAMPLE_STREAM = 0
LABEL_STREAM = 1
NOISE_STREAM = 2  # the tokenizer job's noisy-eval perturbations
EXTRACT_STREAM = 3  # code extraction's self-correction draws (train/extract.py)


def check_label_mode(mode: str) -> str:
  if mode not in LABEL_MODES:
    raise ValueError(f"label mode must be one of {LABEL_MODES}, got {mode!r}")
  return mode


def _stream(seed, stream: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(jnp.uint32(seed)), stream)


def row_keys(seed, indices, stream: int = SAMPLE_STREAM) -> jax.Array:
  """Typed PRNG keys [B] for sample indices [B] (int32)."""
  base = _stream(seed, stream)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))


def row_labels(seed, indices, num_classes: int, mode: str) -> jax.Array:
  """int32 class labels [B] for sample indices [B]."""
  check_label_mode(mode)
  indices = jnp.asarray(indices, jnp.int32)
  if mode == "balanced":
    return indices % num_classes
  keys = row_keys(seed, indices, LABEL_STREAM)
  return jax.vmap(lambda k: jax.random.randint(k, (), 0, num_classes, jnp.int32))(keys)


def labels_for(seed: int, start: int, stop: int, num_classes: int, mode: str) -> np.ndarray:
  """Host copy of the labels of samples start .. stop-1."""
  return np.asarray(row_labels(seed, np.arange(start, stop, dtype=np.int32), num_classes, mode))


def noise_indices(num_tokens: int, group_size: int, noisy_eval: bool = True):
  """The reference's noisy-eval passes (reconstruct_vq.py): -1 (clean), then the first token of
  groups 0, G//4, G//4*2, G//4*3 and G-1, G = num_tokens // group_size (in that order, with
  repeats kept as the reference runs them)."""
  if not noisy_eval:
    return [-1]
  groups = num_tokens // group_size
  return [-1] + [g * group_size for g in (0, groups // 4, groups // 4 * 2, groups // 4 * 3, groups - 1)]
