"""Parameter initialisation: a key source that is cheap to trace, and torch's default init."""
import math

import jax
import jax.numpy as jnp


class InitKeys:
  """Hands out init keys fold_in(key(seed), i), i = 1, 2, ...; usable wherever a module
  takes `rngs` only to initialise parameters (it has `.params()` like nnx.Rngs).

  nnx.Rngs keeps its counter in a Variable; under jax.eval_shape every draw then inspects the
  whole trace, so building a full-size model abstractly is quadratic in the parameter count
  (~30 s for the 850-tensor DetailFlow tokenizer). A Python counter keeps it ~1 s.
  """

  def __init__(self, seed: int = 0):
    self._key = jax.random.key(seed)
    self._count = 0

  def params(self) -> jax.Array:
    self._count += 1
    return jax.random.fold_in(self._key, self._count)

  __call__ = params


def torch_default_uniform(fan_in: int):
  """torch's default Conv/Linear init, kaiming_uniform(a=sqrt(5)) for the weight and its bias
  rule, both U(-1/sqrt(fan_in), 1/sqrt(fan_in)): for layers the reference builds as plain
  nn.Linear / nn.Conv (so that freshly built ones start like the reference's)."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init
