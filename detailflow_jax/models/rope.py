"""2D rotary position embedding over a non-square (rows x group_size) grid, as DetailFlow's GPT.

The GPT lays its sequence positions over a (block_size / group_size) x group_size grid: the
first half of each head's rotation pairs turns with the grid row, the second half with the
column. Rotation pairs are interleaved channels (0, 1), (2, 3), ... The class-token positions get
an all-zero (cos, sin) row, which zeroes their queries and keys (the reference does this; they
are not left unrotated).
"""
import jax
import jax.numpy as jnp
import numpy as np


def rope_table_2d(grid_height: int, grid_width: int, head_dim: int, base: float = 10000.0,
                  cls_token_num: int = 1) -> np.ndarray:
  """[cls_token_num + grid_height * grid_width, head_dim // 2, 2] float32 (cos, sin).

  Frequencies and angles are float32 step by step like the reference (bit-identical); cos/sin
  are then correctly rounded to float32, which is within one ulp of torch's vectorised ones.
  """
  if head_dim % 4:
    raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
  half = head_dim // 2
  exponents = np.arange(0, half, 2, dtype=np.float32)[: half // 2] / np.float32(half)
  inv_freq = (np.float32(1.0) / np.power(np.float32(base), exponents, dtype=np.float32)).astype(np.float32)
  rows = np.outer(np.arange(grid_height, dtype=np.float32), inv_freq).astype(np.float32)
  cols = np.outer(np.arange(grid_width, dtype=np.float32), inv_freq).astype(np.float32)
  angles = np.concatenate([
      np.broadcast_to(rows[:, None, :], (grid_height, grid_width, half // 2)),
      np.broadcast_to(cols[None, :, :], (grid_height, grid_width, half // 2)),
  ], axis=-1)
  angles = angles.astype(np.float64)
  table = np.stack([np.cos(angles), np.sin(angles)], axis=-1).astype(np.float32)
  table = table.reshape(grid_height * grid_width, half, 2)
  return np.concatenate([np.zeros((cls_token_num, half, 2), np.float32), table], axis=0)


def apply_rope(x: jax.Array, table: jax.Array) -> jax.Array:
  """Rotates interleaved channel pairs of x [B, L, H, D] by table [L, D // 2, 2] (cos, sin).

  Done in float32 and cast back, so bf16 activations rotate without extra rounding.
  """
  b, length, heads, dim = x.shape
  pairs = x.astype(jnp.float32).reshape(b, length, heads, dim // 2, 2)
  cos = table[None, :, None, :, 0]
  sin = table[None, :, None, :, 1]
  even, odd = pairs[..., 0], pairs[..., 1]
  rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
  return rotated.reshape(b, length, heads, dim).astype(x.dtype)
