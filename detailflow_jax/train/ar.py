"""DetailFlow's AR recipe: next-detail teacher forcing with self-correction."""
import logging
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ..models import remat
from ..models.gpt import GPT, GPTConfig
from ..models.precision import Precision, set_precision


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
  remat.check_policy(m.remat, "model.remat")


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


def make_loss(cfg: GPTConfig, correction_prob: float, compute_dtype=jnp.float32,
              remat_policy: str = "none") -> Callable:
  """loss_fn(model, batch, rng) for the shared train step; batch = {'tokens', 'labels'}.

  compute_dtype: 'float32' (native) or 'bfloat16' autocast (models/precision.py: float32
  master weights, embeddings, residual, norms and loss; bf16 matmul inputs). remat_policy:
  per-block gradient checkpointing (models/remat.py).
  """
  policy = Precision.named(compute_dtype)
  remat.check_policy(remat_policy, "model.remat")

  def loss_fn(model: GPT, batch: Dict[str, jax.Array], rng: jax.Array):
    corr_key, drop_key = jax.random.split(rng)
    inputs, targets, corrected = select_inputs_targets(batch["tokens"], cfg.group_size, corr_key,
                                                       correction_prob)
    # The model was merged inside this trace, so setting its static policies is local to
    # this loss (autocast's `with` block).
    set_precision(model, policy)
    remat.set_remat(model, remat_policy, "model.remat")
    loss, _ = model.loss(inputs, batch["labels"], targets, key=drop_key)
    return loss, {"corrected_fraction": corrected.mean()}
  return loss_fn


def train(c: ml_collections.ConfigDict, workdir) -> Any:
  """Trains the GPT on token records; resumes from the newest checkpoint in workdir."""
  import logging
  import os
  import pathlib
  import signal

  from ..data.pipeline import Progress, global_batch, to_iterator, token_dataset
  from ..data.sources import TokenRecordSource
  from ..model_dir import save_model_dir
  from . import mesh as mesh_lib
  from .checkpoint import Checkpointer, abstract_with_shardings
  from .loop import run_training
  from .metrics import create_writer
  from .optim import make_optimizer
  from .state import create_train_state, make_train_step

  log = logging.getLogger("detailflow_jax")
  workdir = pathlib.Path(workdir)
  mesh_lib.maybe_initialize_distributed(c)
  validate(c, jax.device_count())
  cfg = gpt_config_from(c)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
  mesh = mesh_lib.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
  steps = total_steps(c)
  o = c.optimizer
  tx = make_optimizer(o.lr, steps, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                      max_grad_norm=o.max_grad_norm, warmup_steps=warmup_steps(c),
                      schedule=o.schedule, end_lr_fraction=o.end_lr_fraction,
                      warmup_start_fraction=o.warmup_start_fraction)
  graphdef, state, shardings = create_train_state(lambda: GPT(cfg, rngs=c.seed), tx, mesh, seed=c.seed)
  log.info("GPT %s: %.1fM parameters, mesh %s, %d steps", c.model.preset or "custom",
           sum(x.size for x in jax.tree.leaves(state.params)) / 1e6, dict(mesh.shape), steps)

  source = TokenRecordSource(c.data.path)
  per_process = c.data.batch_size // jax.process_count()
  ds = token_dataset(source, batch_size=per_process, seed=c.seed, shard_index=jax.process_index(),
                     shard_count=jax.process_count())
  data_iter = to_iterator(ds, c.data.num_workers)
  ckpt = Checkpointer(workdir / "checkpoints", save_every=c.checkpoint.save_every,
                      keep=c.checkpoint.keep, async_save=c.checkpoint.async_save)
  if ckpt.latest_step is not None:
    at, state = ckpt.restore(abstract_with_shardings(state, shardings), data_iter)
    log.info("resumed from step %d", at)
  dtype = jnp.dtype(c.compute_dtype)
  step_fn = make_train_step(graphdef, make_loss(cfg, c.correction_prob, dtype, c.model.remat), tx,
                            shardings, mesh, ema_decay=c.ema_decay)
  progress = Progress(data_iter, log_every=0, name="tokens")
  batches = (global_batch(b, mesh) for b in progress)
  writer = create_writer(workdir, process_index=jax.process_index())

  kill_after = int(os.environ.get("DETAILFLOW_TEST_KILL_AFTER_STEP", "0"))
  write_samples = make_sample_writer(c, graphdef, workdir, writer) if c.sample_every else None

  def after_step(step, state):
    if write_samples is not None and step % c.sample_every == 0:
      write_samples(step, state)
    # Test hook: a hard crash (SIGKILL, no cleanup) right after a durable checkpoint.
    if kill_after and step == kill_after:
      ckpt.wait()
      os.kill(os.getpid(), signal.SIGKILL)

  hooks = bool(kill_after or write_samples)
  state = run_training(state, step_fn, batches, num_steps=steps, checkpointer=ckpt,
                       data_iterator=data_iter, writer=writer, log_every=c.log_every,
                       every_n_steps=after_step if hooks else None, callback_every=1 if hooks else 0)
  ckpt.close()
  export_dir = workdir / "export"
  if int(state.step) >= steps:
    # The EMA weights as a converted-model directory: `load_gpt(workdir/export)` and the
    # sample CLI read it like a converted release.
    model = nnx.merge(graphdef, state.ema_params if state.ema_params is not None else state.params,
                      state.extras)
    import shutil
    if export_dir.exists() and jax.process_index() == 0:
      shutil.rmtree(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    save_model_dir(export_dir, "gpt", cfg.to_dict(), model)
    log.info("exported EMA weights to %s", export_dir)
  writer.close()
  return state


def make_sample_writer(c: ml_collections.ConfigDict, graphdef, workdir, writer):
  """Periodic class-conditional samples from the EMA weights, decoded with the tokenizer in
  c.tokenizer_dir: a PNG grid (one row per class, decoded after every group) per call."""
  import pathlib
  from ..images import save_grid
  from ..inference import TokenizerFns
  from ..pretrained import load_tokenizer
  from ..reconstruct import enlarge_nearest
  from ..sampling import Sampler, SamplingOptions
  if not c.tokenizer_dir:
    raise ValueError("sample_every > 0 needs tokenizer_dir (a converted or exported tokenizer)")
  fns = TokenizerFns(load_tokenizer(c.tokenizer_dir))
  labels = np.arange(min(c.model.num_classes, 8), dtype=np.int32)
  out_dir = pathlib.Path(workdir) / "samples"

  def write(step, state):
    if jax.process_index() != 0:
      return
    params = state.ema_params if state.ema_params is not None else state.params
    model = nnx.merge(graphdef, jax.device_get(params), jax.device_get(state.extras))
    tokens = np.asarray(Sampler(model).sample(labels, jax.random.key(step), SamplingOptions(cfg_scale=1.5)))
    counts = [t for t in fns.schedule.token_list if t <= tokens.shape[1]]
    size = fns.config.image_size
    # Each prefix decoded at the resolution it stands for, enlarged (nearest) to one cell size.
    rows = [[enlarge_nearest(np.asarray(fns.decode(tokens[i:i + 1], t))[0], size) for t in counts]
            for i in range(len(labels))]
    path = save_grid(out_dir / f"step_{step:07d}.png", rows)
    writer.write_images(step, {"samples": np.clip((np.asarray(rows[0][-1])[None] + 1) / 2, 0, 1)})
    logging.getLogger("detailflow_jax").info("wrote %s", path)

  return write
