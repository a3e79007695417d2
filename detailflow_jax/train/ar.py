"""DetailFlow's AR recipe: next-detail teacher forcing with self-correction.

Batches are {"tokens": [B, T] clean codes or [B, T, 3] (clean, noisy input, target) code
triples, "labels": [B] class ids}; "label" always means the class id, the codes the GPT learns
to predict are the targets.
"""
import logging
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from .. import paths
from ..inference import images
from ..data.pipeline import Progress, global_batch, to_iterator, token_dataset
from ..data.sources import TokenRecordSource
from ..inference.tokenizer import TokenizerFns
from ..models import remat
from ..models.config_mapping import gpt_config_from
from ..models.gpt import GPT, GPTConfig
from ..models.precision import Precision, set_precision
from ..weights.load import load_tokenizer
from ..inference.sampler import Sampler, SamplingOptions
from . import driver
from .driver import total_steps, validate_run
from .optim import make_optimizer
from .state import create_train_state, make_train_step

log = logging.getLogger("detailflow_jax")


def warmup_steps(c: ml_collections.ConfigDict) -> int:
  o = c.optimizer
  return o.warmup_steps if o.warmup_steps >= 0 else int(o.warmup_ratio * total_steps(c))


def validate(c: ml_collections.ConfigDict, num_devices: int) -> GPTConfig:
  """Catches config mistakes before anything compiles; each message names the field."""
  m = c.model
  if m.block_size % m.group_size:
    raise ValueError(f"model.group_size={m.group_size} does not divide model.block_size={m.block_size}")
  causal = m.group_size if m.causal_num is None else m.causal_num
  if causal % m.group_size or causal >= m.block_size:
    raise ValueError(f"model.causal_num={m.causal_num} must be a multiple of group_size below block_size")
  cfg = gpt_config_from(c)  # GPTConfig checks the rest (heads, dims, unsupported knobs)
  if not 0.0 <= c.correction_prob <= 1.0:
    raise ValueError(f"correction_prob={c.correction_prob} is not a probability")
  validate_run(c, num_devices)
  remat.check_policy(c.remat, "remat")
  if c.sample_every and not c.tokenizer_dir:
    raise ValueError("sample_every > 0 needs tokenizer_dir (a converted or exported tokenizer)")
  return cfg


def select_inputs_targets(tokens: jax.Array, group_size: int, key: jax.Array,
                          correction_prob: float) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """The reference's generate_z_input_target.

  tokens: [B, T] clean codes, or [B, T, 3] = (clean, noisy input, target) triples from the
  self-correction extraction. Per example, with probability correction_prob, the GPT reads the
  perturbed sequence and learns to predict the corrected targets. Inputs drop the last group.
  Returns (inputs [B, T - group_size], targets [B, T], corrected [B] bool).
  """
  if tokens.ndim == 2:
    corrected = jnp.zeros(tokens.shape[:1], bool)
    return tokens[:, :-group_size], tokens, corrected
  corrected = jax.random.uniform(key, tokens.shape[:1]) < correction_prob
  inputs = jnp.where(corrected[:, None], tokens[:, :-group_size, 1], tokens[:, :-group_size, 0])
  targets = jnp.where(corrected[:, None], tokens[:, :, 2], tokens[:, :, 0])
  return inputs, targets, corrected


def make_loss(cfg: GPTConfig, correction_prob: float, compute_dtype=jnp.float32,
              remat_policy: str = "none") -> Callable:
  """loss_fn(model, batch, rng) for the shared train step; batch = {'tokens', 'labels'}.

  compute_dtype: 'float32' (native) or 'bfloat16' autocast (models/precision.py: float32
  master weights, embeddings, residual, norms and loss; bf16 matmul inputs). remat_policy:
  per-block gradient checkpointing (models/remat.py).
  """
  policy = Precision.named(compute_dtype)
  remat.check_policy(remat_policy, "remat")

  def loss_fn(model: GPT, batch: Dict[str, jax.Array], rng: jax.Array):
    corr_key, drop_key = jax.random.split(rng)
    inputs, targets, corrected = select_inputs_targets(batch["tokens"], cfg.group_size, corr_key,
                                                       correction_prob)
    # The model was merged inside this trace, so setting its static policies is local to
    # this loss (autocast's `with` block).
    set_precision(model, policy)
    remat.set_remat(model, remat_policy, "remat")
    loss, _ = model.loss(inputs, batch["labels"], targets, key=drop_key)
    return loss, {"corrected_fraction": corrected.mean()}
  return loss_fn


def train(c: ml_collections.ConfigDict, workdir) -> Any:
  """Trains the GPT on token records; resumes from the newest checkpoint in workdir; exports
  the EMA weights to workdir/export (a directory `load_gpt` and the sample CLI read)."""
  run = driver.Driver(c, workdir, validate)
  cfg, mesh, steps = gpt_config_from(c), run.mesh, total_steps(c)
  o = c.optimizer
  tx = make_optimizer(o.lr, steps, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                      max_grad_norm=o.max_grad_norm, warmup_steps=warmup_steps(c),
                      schedule=o.schedule, end_lr_fraction=o.end_lr_fraction,
                      warmup_start_fraction=o.warmup_start_fraction)
  graphdef, state, shardings = create_train_state(lambda: GPT(cfg, rngs=c.seed), tx, mesh, seed=c.seed)
  log.info("GPT %s: %.1fM parameters, mesh %s, %d steps", c.model.preset or "custom",
           sum(x.size for x in jax.tree.leaves(state.params)) / 1e6, dict(mesh.shape), steps)
  driver.log_parameter_overview("GPT", state.params)

  per_process = c.data.batch_size // jax.process_count()
  ds = token_dataset(TokenRecordSource(c.data.path), batch_size=per_process, seed=c.seed,
                     shard_index=jax.process_index(), shard_count=jax.process_count())
  data_iter = to_iterator(ds, c.data.num_workers)
  batches = (global_batch(b, mesh) for b in Progress(data_iter, log_every=0, name="tokens"))
  step_fn = make_train_step(graphdef, make_loss(cfg, c.correction_prob, jnp.dtype(c.compute_dtype),
                                                  c.remat), tx, shardings, mesh, ema_decay=c.ema_decay)
  hooks = []
  if c.sample_every:
    hooks.append(driver.Hook(c.sample_every, SampleWriter(c, graphdef, mesh, run.workdir, run.writer)))

  def export(state):
    return "gpt", cfg.to_dict(), nnx.merge(graphdef, inference_params(state), state.extras)

  return run.run(state=state, state_shardings=shardings, step_fn=step_fn, data_iterator=data_iter,
                 batches=batches, num_steps=steps, export=export, hooks=hooks)


def inference_params(state) -> Any:
  """The weights samples and exports use: the EMA when the run keeps one."""
  return state.ema_params if state.ema_params is not None else state.params


class SampleWriter:
  """Periodic class-conditional samples (a driver hook): one coarse-to-fine strip per class
  (up to 8), decoded with the tokenizer in c.tokenizer_dir, as workdir/samples/step_N.png.

  The sampler is built once and gets the weights per call, so it compiles once for the run.
  Sampling runs on every process (the weights may be FSDP-sharded across hosts); process 0
  alone decodes and writes."""

  def __init__(self, c: ml_collections.ConfigDict, graphdef, mesh, workdir, writer):
    self.fns = TokenizerFns(load_tokenizer(c.tokenizer_dir))
    self.graphdef, self.mesh, self.writer = graphdef, mesh, writer
    self.out_dir = paths.run_path(workdir) / "samples"
    self.sampler = Sampler(graphdef, mesh=mesh)
    classes = min(c.model.num_classes, 8)
    # A batch the mesh's batch axes divide: classes repeated up to a multiple of them.
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    self.labels = np.arange(-(-classes // shards) * shards, dtype=np.int32) % classes
    self.num_shown = classes
    guidance = c.model.class_dropout_prob > 0
    self.options = SamplingOptions(cfg_scale=1.5 if guidance else 1.0)

  def __call__(self, step: int, state) -> None:
    params = nnx.merge_state(inference_params(state), state.extras)
    tokens = self.sampler.sample(params, self.labels, jax.random.key(step), self.options)
    tokens = driver.gather_to_host(tokens, self.mesh)[:self.num_shown]
    if jax.process_index() != 0:
      return
    counts = images.coarse_to_fine_counts(self.fns.schedule.token_list, tokens.shape[1])
    rows = images.coarse_to_fine_strips(lambda t: self.fns.decode(tokens, t), counts,
                                        self.fns.config.image_size)
    path = images.save_grid(self.out_dir / f"step_{step:07d}.png", rows)
    self.writer.write_images(step, {"samples": (np.stack([r[-1] for r in rows]) + 1) / 2})
    log.info("wrote %s", path)
