"""AdamW as the reference trains both models: betas (0.9, 0.95), decay on >= 2-D weights only,
global-norm clipping, linear warm-up then cosine or constant."""
from typing import Any

import jax
import optax


def learning_rate_schedule(lr: float, total_steps: int, warmup_steps: int = 0,
                           schedule: str = "cosine", end_lr_fraction: float = 0.0,
                           warmup_start_fraction: float = 0.0) -> optax.Schedule:
  """Linear warm-up from warmup_start_fraction*lr, then cosine to end_lr_fraction*lr or constant.

  The reference AR trainer: warm-up over 5% of the steps from 0.005*lr, cosine to 0.01*lr.
  """
  if schedule not in ("cosine", "constant"):
    raise ValueError(f"unknown lr schedule {schedule!r} (cosine | constant)")
  warmup = optax.linear_schedule(lr * warmup_start_fraction, lr, max(warmup_steps, 1))
  if schedule == "constant":
    main = optax.constant_schedule(lr)
  else:
    main = optax.cosine_decay_schedule(lr, max(total_steps - warmup_steps, 1), alpha=end_lr_fraction)
  if warmup_steps <= 0:
    return main
  return optax.join_schedules([warmup, main], [warmup_steps])


def decay_mask(params: Any) -> Any:
  """Weight decay only on matrices (and larger): no decay on biases, norms, 1-D tables."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(lr: float, total_steps: int, *, weight_decay: float = 0.05, b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8, max_grad_norm: float = 1.0,
                   warmup_steps: int = 0, schedule: str = "cosine",
                   end_lr_fraction: float = 0.0,
                   warmup_start_fraction: float = 0.0) -> optax.GradientTransformation:
  sched = learning_rate_schedule(lr, total_steps, warmup_steps, schedule, end_lr_fraction,
                                 warmup_start_fraction)
  parts = []
  if max_grad_norm and max_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(max_grad_norm))
  parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
  return optax.chain(*parts)

