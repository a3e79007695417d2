"""Gradient checkpointing (rematerialisation) per transformer block, chosen by name in config.

  none       keep every activation of the block for the backward pass (no recompute)
  full       keep only the block's inputs; the backward pass recomputes the whole block
             (jax.checkpoint_policies.nothing_saveable)
  save_dots  keep the outputs of the weight matmuls (dot_generals without batch dimensions:
             the projections and MLPs) and recompute the rest (norms, attention, activations)
             (jax.checkpoint_policies.dots_with_no_batch_dims_saveable)

Blocks that support it (the GPT's TransformerBlock, the ViT's EncoderLayer) carry a
`remat_policy` name; `set_remat` sets it on every such block of a model or sub-module.
"""
import math
from collections.abc import Callable

import jax
from flax import nnx

# jax.ad_checkpoint.print_saved_residuals' structured form (it only prints).
from jax._src.ad_checkpoint import saved_residuals

POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_policy(name: str, key: str = "remat") -> str:
  if name not in POLICIES:
    raise ValueError(f"{key}={name!r} is not a remat policy ({' | '.join(POLICIES)})")
  return name


def checkpointed(forward: Callable, name: str) -> Callable:
  """`forward(module, x) -> y` wrapped by nnx.remat under policy `name` (unchanged for none)."""
  if check_policy(name) == "none":
    return forward
  return nnx.remat(forward, policy=POLICIES[name])


def set_remat(model: nnx.Module, name: str, key: str = "remat") -> nnx.Module:
  """Sets remat policy `name` on every block of `model` that has one (in place; returns it)."""
  check_policy(name, key)
  found = False
  for _, module in nnx.iter_modules(model):
    if hasattr(module, "remat_policy"):
      module.remat_policy = name
      found = True
  if not found:
    raise ValueError(f"{key}={name!r}: {type(model).__name__} has no blocks that can be rematerialised")
  return model


def saved_residual_bytes(fn: Callable, *args) -> int:
  """Bytes of the activations the backward pass of `fn(*args)` (scalar) keeps: what the remat
  policy controls, independent of how a backend schedules the program. The arguments
  themselves (parameters the backward reads) are not counted: they are held anyway."""
  residuals = saved_residuals(fn, *args)
  return int(sum(math.prod(aval.shape) * aval.dtype.itemsize for aval, where in residuals
                 if not where.startswith("from the argument")))
