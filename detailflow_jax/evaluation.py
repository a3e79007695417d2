"""Measurements of what a trained tokenizer / GPT learned, small enough to run on CPU.

- `coarse_to_fine_errors`: DetailFlow's claim, checked. Decoding the first t tokens should
  reproduce the image as degraded to the resolution t stands for (token2res[t]); it should not
  reproduce the full-resolution image.
- `ShapeClassifier`: a small CNN for the procedural shapes. The demo uses it to test whether
  class-conditional samples show the class they were asked for.
"""
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from .ops.resize import resize_images


def coarse_to_fine_errors(tokenizer, images, counts: Optional[Sequence[int]] = None,
                          batch_size: int = 64) -> List[Dict[str, float]]:
  """For each token count t: the MSE of decode(first t tokens) against
  resize(resize(image, token2res[t]), decode_res) (`mse_degraded`) and against the
  full-resolution image brought to decode_res (`mse_full`).

  tokenizer: a Tokenizer or its TokenizerFns. images: [N, S, S, 3] in [-1, 1] at the
  tokenizer's image size. `counts` defaults to every
  entry of the token list whose resolution is below S (at S the two targets coincide).
  """
  from .inference import TokenizerFns
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


class ShapeClassifier(nnx.Module):
  """Two conv stages, then mean- and max-pooled features -> class logits. Pooling makes it
  indifferent to where the shape sits; the max pool keeps a small shape's colour."""

  def __init__(self, num_classes: int, width: int = 32, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, width, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(width, 2 * width, (3, 3), rngs=rngs)
    self.head = nnx.Linear(4 * width, num_classes, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = jax.nn.gelu(self.conv1(images))
    x = nnx.avg_pool(x, (2, 2), (2, 2))
    x = jax.nn.gelu(self.conv2(x))
    return self.head(jnp.concatenate([jnp.mean(x, (1, 2)), jnp.max(x, (1, 2))], -1))


def train_shape_classifier(images, labels, num_classes: int, *, steps: int = 400,
                           batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> ShapeClassifier:
  """Adam on cross-entropy over (images [N, S, S, 3] in [-1, 1], labels [N]); one jitted step."""
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  if len(images) != len(labels):
    raise ValueError(f"{len(images)} images but {len(labels)} labels")
  model = ShapeClassifier(num_classes, rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    pick = rng.integers(0, len(images), batch_size)
    x = images[pick]
    # Random flips: the shapes are symmetric enough, and it doubles what the classifier sees.
    x = np.where(rng.random((batch_size, 1, 1, 1)) < 0.5, x[:, :, ::-1], x)
    step(model, optimizer, jnp.asarray(x), jnp.asarray(labels[pick]))
  return model


def classify(model: ShapeClassifier, images, batch_size: int = 256) -> np.ndarray:
  """Predicted labels [N]."""
  images = np.asarray(images, np.float32)
  fn = nnx.jit(lambda m, x: jnp.argmax(m(x), -1))
  return np.concatenate([np.asarray(fn(model, jnp.asarray(images[i:i + batch_size])))
                         for i in range(0, len(images), batch_size)])
