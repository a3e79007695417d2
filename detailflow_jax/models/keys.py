"""A parameter-initialisation key source that is cheap to trace."""
import jax


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
