"""Measurements of what a trained tokenizer / GPT learned, small enough to run on CPU.

- `coarse_to_fine_errors`: DetailFlow's claim, checked. Decoding the first t tokens should
  reproduce the image as degraded to the resolution t stands for (token2res[t]); it should not
  reproduce the full-resolution image.
- `train_judge`: a small CNN with a shape head and a colour head, trained on clean procedural
  images only. The demo asks it what shape and colour its reconstructions and class-conditional
  samples show, and compares with what each class is.
"""
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ..ops.resize import resize_images


def coarse_to_fine_errors(tokenizer, images, counts: Sequence[int] | None = None,
                          batch_size: int = 64) -> list[dict[str, float]]:
  """For each token count t: the MSE of decode(first t tokens) against
  resize(resize(image, token2res[t]), decode_res) (`mse_degraded`) and against the
  full-resolution image brought to decode_res (`mse_full`).

  tokenizer: a Tokenizer or its TokenizerFns. images: [N, S, S, 3] in [-1, 1] at the
  tokenizer's image size. `counts` defaults to every
  entry of the token list whose resolution is below S (at S the two targets coincide).
  """
  from ..inference.tokenizer import TokenizerFns
  images = np.asarray(images, np.float32)
  fns = tokenizer if isinstance(tokenizer, TokenizerFns) else TokenizerFns(tokenizer)
  sched = fns.schedule
  size = images.shape[1]
  if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[-1] != 3:
    raise ValueError(f"images must be [N, S, S, 3], got {images.shape}")
  if counts is None:
    counts = [t for t in sched.token_list if sched.token2res[t] < size]
  unknown = [t for t in counts if t not in sched.token2res]
  if unknown:
    raise ValueError(f"token counts {unknown} are not in the schedule's token list {sched.token_list}")
  sums = {t: np.zeros(2) for t in counts}
  for first in range(0, len(images), batch_size):
    chunk = images[first:first + batch_size]
    indices, _ = fns.encode(chunk)
    for t in counts:
      dec_res = sched.decode_resolution(t)
      decoded = np.asarray(fns.decode(indices, t), np.float32)
      degraded = resize_images(resize_images(chunk, sched.token2res[t]), dec_res)
      full = resize_images(chunk, dec_res)
      sums[t] += len(chunk) * np.array([np.mean((decoded - degraded) ** 2),
                                        np.mean((decoded - full) ** 2)])
  return [{"tokens": int(t), "target_res": int(sched.token2res[t]),
           "decode_res": int(sched.decode_resolution(t)),
           "mse_degraded": float(sums[t][0] / len(images)), "mse_full": float(sums[t][1] / len(images))}
          for t in counts]


class ShapeColourJudge(nnx.Module):
  """Three conv stages, then mean- and max-pooled features -> a shape head and a colour head.
  The pooling makes it indifferent to where the shape sits."""

  def __init__(self, num_shapes: int, num_colours: int, width: int = 32, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, width, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(width, 2 * width, (3, 3), rngs=rngs)
    self.conv3 = nnx.Conv(2 * width, 2 * width, (3, 3), rngs=rngs)
    self.shape_head = nnx.Linear(4 * width, num_shapes, rngs=rngs)
    self.colour_head = nnx.Linear(4 * width, num_colours, rngs=rngs)

  def __call__(self, images: jax.Array):
    x = jax.nn.gelu(self.conv1(images))
    x = nnx.avg_pool(x, (2, 2), (2, 2))
    x = jax.nn.gelu(self.conv2(x))
    x = nnx.avg_pool(x, (2, 2), (2, 2))
    x = jax.nn.gelu(self.conv3(x))
    features = jnp.concatenate([jnp.mean(x, (1, 2)), jnp.max(x, (1, 2))], -1)
    return self.shape_head(features), self.colour_head(features)


class Judge(NamedTuple):
  """A trained ShapeColourJudge and the SHAPES / COLOURS indices its heads stand for."""
  model: ShapeColourJudge
  shapes: tuple[int, ...]
  colours: tuple[int, ...]


def clean_shape_images(shapes: Sequence[int], colours: Sequence[int], size: int, count: int,
                       style: str, seed: int):
  """`count` procedural images whose shape (from `shapes`) and colour (from `colours`) are drawn
  independently: [count, size, size, 3] in [-1, 1], shape and colour indices [count]."""
  from ..data.sources import render_shape
  rng = np.random.default_rng([seed, 7])
  shape_idx = rng.choice(np.asarray(shapes), count)
  colour_idx = rng.choice(np.asarray(colours), count)
  images = np.stack([render_shape(rng, size, int(s), int(c), style)
                     for s, c in zip(shape_idx, colour_idx)])
  return images.astype(np.float32) / 127.5 - 1.0, shape_idx, colour_idx


def train_judge(shapes: Sequence[int], colours: Sequence[int], size: int, *, style: str,
                num_images: int = 4096, steps: int = 400, batch_size: int = 64, lr: float = 3e-3,
                seed: int = 0) -> Judge:
  """Trains a ShapeColourJudge on clean procedural images only (clean_shape_images, shape and
  colour independent, so neither head can answer from the other factor); Adam on the sum of
  both cross-entropies, with random horizontal flips (every shape is mirror-symmetric)."""
  shapes, colours = tuple(int(s) for s in shapes), tuple(int(c) for c in colours)
  if len(set(shapes)) != len(shapes) or len(set(colours)) != len(colours) or not shapes or not colours:
    raise ValueError(f"shapes {shapes} and colours {colours} must be non-empty and distinct")
  images, shape_idx, colour_idx = clean_shape_images(shapes, colours, size, num_images, style, seed)
  shape_y = np.searchsorted(shapes_sorted := np.sort(shapes), shape_idx)
  colour_y = np.searchsorted(colours_sorted := np.sort(colours), colour_idx)
  model = ShapeColourJudge(len(shapes), len(colours), rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, ys, yc):
    def loss_fn(model):
      shape_logits, colour_logits = model(x)
      return (optax.softmax_cross_entropy_with_integer_labels(shape_logits, ys).mean()
              + optax.softmax_cross_entropy_with_integer_labels(colour_logits, yc).mean())
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    pick = rng.integers(0, len(images), batch_size)
    x = images[pick]
    x = np.where(rng.random((batch_size, 1, 1, 1)) < 0.5, x[:, :, ::-1], x)
    step(model, optimizer, jnp.asarray(x), jnp.asarray(shape_y[pick]), jnp.asarray(colour_y[pick]))
  return Judge(model, tuple(int(s) for s in shapes_sorted), tuple(int(c) for c in colours_sorted))


def judge_images(judge: Judge, images, batch_size: int = 256):
  """(shape indices [N], colour indices [N]) into SHAPES / COLOURS, as the judge sees them."""
  images = np.asarray(images, np.float32)
  fn = nnx.jit(lambda m, x: tuple(jnp.argmax(logits, -1) for logits in m(x)))
  shape_pred, colour_pred = [], []
  for i in range(0, len(images), batch_size):
    s, c = fn(judge.model, jnp.asarray(images[i:i + batch_size]))
    shape_pred.append(np.asarray(s))
    colour_pred.append(np.asarray(c))
  return (np.asarray(judge.shapes)[np.concatenate(shape_pred)],
          np.asarray(judge.colours)[np.concatenate(colour_pred)])
