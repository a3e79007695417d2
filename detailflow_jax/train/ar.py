"""DetailFlow's AR recipe: next-detail teacher forcing with self-correction."""
import math
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ..models.gpt import GPT, GPTConfig


def gpt_config_from(c: ml_collections.ConfigDict) -> GPTConfig:
  m = c.model
  fields = dict(vocab_size=m.vocab_size, block_size=m.block_size, group_size=m.group_size,
                causal_num=m.causal_num, num_classes=m.num_classes,
                class_dropout_prob=m.class_dropout_prob, cls_token_num=m.cls_token_num,
                token_dropout_p=m.token_dropout_p, resid_dropout_p=m.resid_dropout_p,
                ffn_dropout_p=m.ffn_dropout_p, drop_path_rate=m.drop_path_rate)
  if m.preset:
    return GPTConfig.preset(m.preset, **fields)
  return GPTConfig(**dict(m.dims), **fields)


def total_steps(c: ml_collections.ConfigDict) -> int:
  if c.total_steps > 0:
    return c.total_steps
  return c.num_epochs * (c.data.examples_per_epoch // c.data.batch_size)


def warmup_steps(c: ml_collections.ConfigDict) -> int:
  o = c.optimizer
  return o.warmup_steps if o.warmup_steps >= 0 else int(o.warmup_ratio * total_steps(c))


def validate(c: ml_collections.ConfigDict, num_devices: int) -> None:
  """Catches config mistakes before anything compiles; each message names the field."""
  from . import mesh as mesh_lib
  m = c.model
  if m.block_size % m.group_size:
    raise ValueError(f"model.group_size={m.group_size} does not divide model.block_size={m.block_size}")
  causal = m.group_size if m.causal_num is None else m.causal_num
  if causal % m.group_size or causal >= m.block_size:
    raise ValueError(f"model.causal_num={m.causal_num} must be a multiple of group_size below block_size")
  if not 0.0 <= c.correction_prob <= 1.0:
    raise ValueError(f"correction_prob={c.correction_prob} is not a probability")
  data, fsdp, tensor = mesh_lib.resolve_mesh_shape(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, num_devices)
  if c.data.batch_size % (data * fsdp):
    raise ValueError(f"data.batch_size={c.data.batch_size} is not divisible by the batch mesh axes "
                     f"data x fsdp = {data} x {fsdp}")
  if total_steps(c) <= 0:
    raise ValueError("the run has no steps: set total_steps or num_epochs/examples_per_epoch")
  if c.compute_dtype not in ("float32", "bfloat16"):
    raise ValueError(f"compute_dtype={c.compute_dtype!r} (float32 | bfloat16)")


def select_inputs_targets(tokens: jax.Array, group_size: int, key: jax.Array,
                          correction_prob: float) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """The reference's generate_z_input_target.

  tokens: [B, T] clean codes, or [B, T, 3] = (clean, noisy input, labels) triples from the
  self-correction extraction. Per example, with probability correction_prob, the GPT reads the
  perturbed sequence and learns to predict the corrected labels. Inputs drop the last group.
  Returns (inputs [B, T - group_size], targets [B, T], corrected [B] bool).
  """
  if tokens.ndim == 2:
    corrected = jnp.zeros(tokens.shape[:1], bool)
    return tokens[:, :-group_size], tokens, corrected
  corrected = jax.random.uniform(key, tokens.shape[:1]) < correction_prob
  inputs = jnp.where(corrected[:, None], tokens[:, :-group_size, 1], tokens[:, :-group_size, 0])
  targets = jnp.where(corrected[:, None], tokens[:, :, 2], tokens[:, :, 0])
  return inputs, targets, corrected


def make_loss(cfg: GPTConfig, correction_prob: float, compute_dtype=jnp.float32) -> Callable:
  """loss_fn(model, batch, rng) for the shared train step; batch = {'tokens', 'labels'}."""
  def loss_fn(model: GPT, batch: Dict[str, jax.Array], rng: jax.Array):
    corr_key, drop_key = jax.random.split(rng)
    inputs, targets, corrected = select_inputs_targets(batch["tokens"], cfg.group_size, corr_key,
                                                       correction_prob)
    if compute_dtype != jnp.float32:
      model = cast_params(model, compute_dtype)
    loss, _ = model.loss(inputs, batch["labels"], targets, key=drop_key)
    return loss, {"corrected_fraction": corrected.mean()}
  return loss_fn


def cast_params(model, dtype):
  """bf16 compute with float32 master weights: a model whose floating params are cast copies
  (gradients flow back through the cast to the float32 originals)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
  return nnx.merge(graphdef, params, rest)
