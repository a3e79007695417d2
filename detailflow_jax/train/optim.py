"""AdamW as the reference trains both models: betas (0.9, 0.95), decay on >= 2-D weights only,
global-norm clipping; the GPT's LambdaLR warm-up + cosine and the tokenizer's timm cosine."""
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(lr: float, total_steps: int, warmup_steps: int = 0,
                           schedule: str = "cosine", end_lr_fraction: float = 0.0,
                           warmup_start_fraction: float = 0.0) -> optax.Schedule:
  """train_c2i.py's LambdaLR: lr x lr_lambda(t), t = the number of updates already made.

    t < warmup_steps: warmup_start_fraction + t / warmup_steps * (1 - warmup_start_fraction)
    otherwise:        end_lr_fraction + (1 - end_lr_fraction) * (1 + cos(pi * p)) / 2,
                      p = (t - warmup_steps) / (total_steps - warmup_steps)
  ('constant': 1 after the warm-up). The reference trains with warm-up over 5% of the steps
  from 0.005 lr and a cosine to 0.01 lr. Like lr_lambda, p is not clamped: past total_steps
  the cosine rises again (a run ends at total_steps, so no update uses those values).
  """
  if schedule not in ("cosine", "constant"):
    raise ValueError(f"unknown lr schedule {schedule!r} (cosine | constant)")
  # A run shorter than its warm-up never reaches the cosine (the reference would divide by 0).
  decay_steps = max(total_steps - warmup_steps, 1)

  def factor(count):
    t = jnp.asarray(count, jnp.float32)
    if schedule == "constant":
      after = jnp.ones_like(t)
    else:
      progress = (t - warmup_steps) / decay_steps
      after = end_lr_fraction + (1.0 - end_lr_fraction) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    if warmup_steps <= 0:
      return after
    warm = warmup_start_fraction + (t / warmup_steps) * (1.0 - warmup_start_fraction)
    return jnp.where(t < warmup_steps, warm, after)

  return lambda count: lr * factor(count)


def timm_cosine_schedule(lr: float, total_steps: int, warmup_steps: int, warmup_lr: float,
                         min_lr: float) -> optax.Schedule:
  """timm's CosineLRScheduler as the reference's tokenizer trainer builds it (create_scheduler_v2
  with step_on_epochs=False: t_initial = all steps, warmup_prefix=False, one cycle, no noise).

  Unlike `learning_rate_schedule`, the warm-up starts from an absolute `warmup_lr` and is laid
  over the cosine, which runs over ALL steps from step 0 (so it has already left the peak when
  the warm-up ends):
    t <  warmup_steps: warmup_lr + t * (lr - warmup_lr) / warmup_steps
    t <  total_steps:  min_lr + (lr - min_lr) * (1 + cos(pi * t / total_steps)) / 2
    otherwise:         min_lr
  `t` is the number of updates already made, as both timm's step_update and optax count.
  """
  if total_steps <= 0:
    raise ValueError(f"total_steps={total_steps} must be positive")

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    cosine = min_lr + 0.5 * (lr - min_lr) * (1.0 + jnp.cos(math.pi * t / total_steps))
    lr_t = jnp.where(t < total_steps, cosine, min_lr)
    if warmup_steps > 0:
      lr_t = jnp.where(t < warmup_steps, warmup_lr + t * ((lr - warmup_lr) / warmup_steps), lr_t)
    return lr_t

  return schedule


def decay_mask(params: Any) -> Any:
  """Weight decay only on matrices (and larger): no decay on biases, norms, 1-D tables."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def reference_decay_mask(mapping) -> Callable[[Any], Any]:
  """The reference's param_groups_weight_decay on our parameters: decay iff the parameter's
  torch shape (mapping: a convert KeyMapping, our path -> torch name / shape) has ndim >= 2 and
  its name does not end in '.bias'. Our layouts may drop unit axes torch keeps (the decoder's
  mask_token is [D] here, [1, 1, D] there), so our own ndim is not the rule."""
  def mask(params):
    def one(path, x):
      ours = tuple(param_path(path).split("/"))
      return len(mapping.shape(ours, x.shape)) >= 2 and not mapping.name(ours).endswith(".bias")
    return jax.tree_util.tree_map_with_path(one, params)
  return mask


def make_optimizer(lr: float, total_steps: int, *, weight_decay: float = 0.05, b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8, max_grad_norm: float = 1.0,
                   warmup_steps: int = 0, schedule: str = "cosine",
                   end_lr_fraction: float = 0.0,
                   warmup_start_fraction: float = 0.0) -> optax.GradientTransformation:
  sched = learning_rate_schedule(lr, total_steps, warmup_steps, schedule, end_lr_fraction,
                                 warmup_start_fraction)
  return clipped_adamw(sched, weight_decay=weight_decay, b1=b1, b2=b2, eps=eps,
                       max_grad_norm=max_grad_norm)


def clipped_adamw(sched: optax.ScalarOrSchedule, *, weight_decay: float, b1: float, b2: float,
                  eps: float, max_grad_norm: float, mask=None) -> optax.GradientTransformation:
  """Global-norm clipping (when max_grad_norm > 0), then AdamW with the decay mask (default
  `decay_mask`: our own ndim >= 2)."""
  parts = []
  if max_grad_norm and max_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(max_grad_norm))
  parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=decay_mask if mask is None else mask))
  return optax.chain(*parts)



def param_path(path) -> str:
  """'decoder/layers/0/kernel' for a jax key path into an nnx.State (the trailing Variable
  `.value` attribute left out)."""
  parts = []
  for p in path:
    if isinstance(p, jax.tree_util.GetAttrKey):
      continue
    parts.append(str(getattr(p, "key", getattr(p, "idx", p))))
  return "/".join(parts)


def train_only(tx: optax.GradientTransformation,
               trainable: Callable[[str], bool]) -> optax.GradientTransformation:
  """`tx` on the parameters whose path (param_path) `trainable` accepts; the others get exactly
  zero updates (the reference's requires_grad=False). Their gradients are zeroed before `tx`,
  so grad clipping measures only the trained ones, and their updates after it, so no weight
  decay or Adam step moves them: they stay bit-identical. (optax.multi_transform would also
  drop their Adam moments, but its MaskedNode placeholders inside nnx Variables break the
  shardings and the checkpoints of the state.)"""
  def zero_frozen(updates):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x if trainable(param_path(path)) else jnp.zeros_like(x), updates)

  mask = optax.GradientTransformation(lambda params: optax.EmptyState(),
                                      lambda updates, state, params=None: (zero_frozen(updates), state))
  return optax.chain(mask, tx, mask)
