"""The train state as a pytree, created sharded from abstract shapes, and the jitted step.

Nothing is ever materialised whole on one device: the state's shapes come from
`jax.eval_shape`, its shardings from the parameters' logical axis names and the rules table,
and `jax.jit(init, out_shardings=...)` creates every shard where it lives.
"""
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from .. import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any          # nnx.State of the trainable nnx.Param variables
  extras: Any          # nnx.State of everything else (buffers such as codebook usage)
  opt_state: Any
  ema_params: Any      # EMA of params (same structure) or None
  rng: jax.Array


def split_model(model: nnx.Module):
  graphdef, params, extras = nnx.split(model, nnx.Param, ...)
  return graphdef, params, extras


def create_train_state(build_model: Callable[[], nnx.Module], tx: optax.GradientTransformation,
                       mesh: Mesh, *, seed: int = 0, use_ema: bool = True,
                       rules=sharding.DEFAULT_RULES, abstract: bool = False) -> tuple[Any, TrainState, Any]:
  """Returns (graphdef, sharded TrainState, its shardings). `build_model` creates the model
  with freshly initialised parameters; it runs only inside jit/eval_shape. abstract=True:
  the state is ShapeDtypeStructs carrying the shardings (nothing allocated), for AOT
  lowering (`make_train_step(...).lower`)."""
  def init():
    graphdef, params, extras = split_model(build_model())
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, extras=extras,
                      opt_state=tx.init(params),
                      ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
                      rng=jax.random.key_data(jax.random.key(seed)))

  graphdef = split_model(nnx.eval_shape(build_model))[0]
  shapes = jax.eval_shape(init)
  shardings = sharding.shardings_for(shapes, mesh, rules)
  sharding.log_replicated_report(shapes.params, shardings.params, mesh)
  if abstract:
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         shapes, shardings)
    return graphdef, state, shardings
  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)()
  return graphdef, state, shardings


def ema_update(ema: Any, params: Any, decay: float) -> Any:
  """Exponential moving average of parameters: ema * decay + params * (1 - decay)."""
  return jax.tree.map(lambda e, p: e * decay + p * (1.0 - decay), ema, params)


def apply_gradients(params: Any, grads: Any, opt_state: Any,
                    tx: optax.GradientTransformation) -> tuple[Any, Any]:
  """One optimizer update: (params, grads, opt_state, tx) -> (new params, new opt_state).
  Every trainer's update goes through here (the GPT step, the tokenizer's generator and
  discriminator)."""
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def loss_and_grads(graphdef, loss_fn: Callable, params: Any, extras: Any, batch, draws):
  """((loss, metrics, new extras), grads) of loss_fn(model, batch, draws) at `params`."""
  def loss_of(params):
    # Fresh Variable objects for the buffers, owned by this trace, so the loss may update
    # them (nnx refuses to mutate Variables created at the outer jit level).
    model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, extras))
    loss, metrics = loss_fn(model, batch, draws)
    return loss, (metrics, nnx.state(model, nnx.Not(nnx.Param)))

  (loss, (metrics, extras)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
  return (loss, metrics, extras), grads


def train_step(graphdef, loss_fn: Callable, tx: optax.GradientTransformation, ema_decay: float,
               state: TrainState, batch, draws) -> tuple[TrainState, Any]:
  """One step as a pure function of (state, batch, draws): gradients, the optimizer update
  (`apply_gradients`), the EMA of the updated parameters, the step count."""
  (loss, metrics, extras), grads = loss_and_grads(graphdef, loss_fn, state.params, state.extras,
                                                  batch, draws)
  params, opt_state = apply_gradients(state.params, grads, state.opt_state, tx)
  ema = state.ema_params
  if ema is not None:
    ema = ema_update(ema, params, ema_decay)
  metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
  new_state = state.replace(step=state.step + 1, params=params, extras=extras,
                            opt_state=opt_state, ema_params=ema)
  return new_state, metrics


def make_train_step(graphdef, loss_fn: Callable, tx: optax.GradientTransformation,
                    state_shardings, mesh: Mesh, *, ema_decay: float = 0.9999,
                    rules=sharding.DEFAULT_RULES, draw: Callable | None = None):
  """A jitted `step(state, batch, draws=None) -> (state, metrics)` with a donated state.

  loss_fn(model, batch, draws) -> (scalar loss, dict of scalar metrics). Buffers the model
  updates during the loss (e.g. codebook usage) are carried into the new state.

  Randomness is an input: without `draws`, the step draws them in one place, `draw(key,
  batch)` with the key fold_in(state.rng, state.step) (without `draw`, that key itself is the
  draw); given `draws` (e.g. a reference golden's), the step uses them and draws nothing.
  """
  def step(state: TrainState, batch, draws=None):
    if draws is None:
      key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
      draws = draw(key, batch) if draw is not None else key
    return train_step(graphdef, loss_fn, tx, ema_decay, state, batch, draws)

  def batch_shardings(batch):
    return jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim, rules), batch)

  jitted = {}

  def jitted_for(batch, draws):
    key = (jax.tree.structure(batch), jax.tree.structure(draws))
    if key not in jitted:
      in_shardings = (state_shardings, batch_shardings(batch))
      if draws is not None:  # handed-in draws: replicated (a test's, small)
        in_shardings += (sharding.replicated(mesh),)
      jitted[key] = jax.jit(step, in_shardings=in_shardings,
                            out_shardings=(state_shardings, sharding.replicated(mesh)),
                            donate_argnums=(0,))
    return jitted[key]

  def args(state, batch, draws):
    return (state, batch) if draws is None else (state, batch, draws)

  def run(state, batch, draws=None):
    with jax.set_mesh(mesh):
      return jitted_for(batch, draws)(*args(state, batch, draws))

  def lower(state, batch, draws=None):
    """The step lowered ahead of time (state/batch may be ShapeDtypeStructs): `.compile()`
    gives memory_analysis / cost_analysis of exactly the program `run` executes."""
    with jax.set_mesh(mesh):
      return jitted_for(batch, draws).lower(*args(state, batch, draws))

  run.lower = lower
  return run
