"""DetailFlow's AR recipe: next-detail teacher forcing with self-correction.

Batches are {"tokens": [B, T] clean codes or [B, T, 3] (clean, noisy input, target) code
triples, "labels": [B] class ids}; "label" always means the class id, the codes the GPT learns
to predict are the targets.
"""
import dataclasses
import json
import logging
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from .. import paths
from ..data.pipeline import Progress, global_batch, to_iterator, token_dataset
from ..data.sources import TokenRecordSource
from ..inference import images
from ..inference.sampler import Sampler, SamplingOptions
from ..inference.tokenizer import TokenizerFns
from ..models import config_mapping, remat
from ..models.gpt import GPT, GPTConfig
from ..models.precision import Precision, set_precision
from ..schedule import causal_length
from ..weights.load import load_tokenizer
from . import driver
from .driver import total_steps, validate_run
from .optim import clipped_adamw, learning_rate_schedule
from .state import create_train_state, make_train_step

log = logging.getLogger("detailflow_jax")

# GPT fields the extracted codes decide, as train_c2i.py reads them from the codes' json:
# field -> (where in codes.json, its key there).
CODES_FIELDS = {"vocab_size": ("tokenizer", "codebook_size"), "block_size": ("", "ar_token_num"),
                "group_size": ("tokenizer", "group_size"), "causal_num": ("tokenizer", "causal_num")}


def codes_json_path(data_path) -> Any | None:
  """The codes.json the extraction wrote beside the token records of `data_path` (a directory
  of shards, or one shard file), or None when there is none."""
  if not data_path:
    return None
  root = paths.run_path(data_path)
  path = (root if root.is_dir() else root.parent) / "codes.json"
  return path if path.exists() else None


def codes_model_fields(meta: dict[str, Any], source) -> dict[str, Any]:
  """{vocab_size, block_size, group_size, causal_num} of the codes described by `meta`: ours
  (train/extract.py: the tokenizer config under 'tokenizer') or the reference's flat json (the
  VQ config with ar_token_num added)."""
  fields = {}
  for field, (section, key) in CODES_FIELDS.items():
    where = meta.get(section, meta) if section else meta
    if key not in where:
      raise ValueError(f"{source} has no {key!r}{f' under {section!r}' if section and section in meta else ''}: "
                       f"cannot check model.{field} against the codes")
    fields[field] = where[key]
  return fields


def resolve_model_fields(c: ml_collections.ConfigDict) -> dict[str, Any]:
  """c.model with vocab_size, block_size, group_size and causal_num taken from data.path's
  codes.json where unset (None), and checked against it where set: a GPT trained with another
  codebook size, token count or grouping than its codes is wrong in silence otherwise."""
  m = c.model.to_dict()
  path = codes_json_path(c.data.path) if "data" in c else None
  if path is None:
    unset = [k for k in ("vocab_size", "block_size", "group_size") if m.get(k) is None]
    if unset:
      raise ValueError(f"model.{unset[0]} is unset and there is no codes.json beside data.path="
                       f"{c.data.path!r} to read it from")
    return m
  meta = json.loads(path.read_text())
  codes = codes_model_fields(meta, path)
  for field, value in codes.items():
    set_value = m.get(field)
    if set_value is None:
      m[field] = value
      continue
    group = m["group_size"] if m.get("group_size") is not None else codes["group_size"]
    same = (causal_length(group, set_value) == causal_length(codes["group_size"], value)
            if field == "causal_num" else set_value == value)
    if not same:
      section, key = CODES_FIELDS[field]
      raise ValueError(f"model.{field}={set_value} but the codes in {path} have "
                       f"{section + '.' if section in meta else ''}{key}={value}: leave model.{field} "
                       f"unset to take it from the codes, or train on codes that match")
  return m


# codes.json fields that must agree between data.path and data.mix_path (the same tokenizer,
# token count, views and images; the crop may differ: that is the mix).
MIX_FIELDS = ("tokenizer", "ar_image_size", "ar_token_num", "views", "self_correction", "num_images")


def check_mix_path(c: ml_collections.ConfigDict) -> None:
  """data.mix_path (the ten_crop_105 mix) must hold the same images' codes as data.path."""
  mix = c.data.get("mix_path", "")
  if not mix:
    return
  if not paths.run_path(mix).exists():
    raise ValueError(f"data.mix_path={mix!r} does not exist")
  ours, theirs = codes_json_path(c.data.path), codes_json_path(mix)
  if ours is None or theirs is None:
    raise ValueError(f"data.mix_path needs a codes.json beside both record sets (data.path "
                     f"{'has' if ours else 'has none'}, data.mix_path {'has' if theirs else 'has none'}) "
                     "to check they hold the same images' codes")
  a, b = json.loads(ours.read_text()), json.loads(theirs.read_text())
  differ = [k for k in MIX_FIELDS if a.get(k) != b.get(k)]
  if differ:
    raise ValueError(f"data.mix_path={mix!r}: its codes.json differs from data.path's in "
                     f"{', '.join(differ)} (the mix must be the same images' codes, cropped otherwise)")


def gpt_config_from(c: ml_collections.ConfigDict) -> GPTConfig:
  """c.model -> GPTConfig (models/config_mapping.py) after the codes' fields are taken from, or
  checked against, data.path's codes.json (`resolve_model_fields`)."""
  m = resolve_model_fields(c)
  return config_mapping.gpt_config_from(ml_collections.ConfigDict({"model": m}))


def warmup_steps(c: ml_collections.ConfigDict) -> int:
  o = c.optimizer
  return o.warmup_steps if o.warmup_steps >= 0 else int(o.warmup_ratio * total_steps(c))


def validate(c: ml_collections.ConfigDict, num_devices: int) -> GPTConfig:
  """Catches config mistakes before anything compiles; each message names the field. The
  codes' fields taken from data.path's codes.json are written into c.model, so the run's saved
  config (workdir/config.json, written after this) holds the GPT that was trained."""
  m = resolve_model_fields(c)
  c.model.update({k: m[k] for k in CODES_FIELDS})
  if m["block_size"] % m["group_size"]:
    raise ValueError(f"model.group_size={m['group_size']} does not divide model.block_size={m['block_size']}")
  causal = causal_length(m["group_size"], m["causal_num"])
  if causal % m["group_size"] or causal >= m["block_size"]:
    raise ValueError(f"model.causal_num={m['causal_num']} must be a multiple of group_size below block_size")
  cfg = gpt_config_from(c)  # GPTConfig checks the rest (heads, dims, unsupported knobs)
  check_mix_path(c)
  if cfg.drop_path_rate > 0 and (cfg.resid_dropout_p > 0 or cfg.ffn_dropout_p > 0):
    # train_c2i.py: `dropout_p = 0.0 if drop_path_rate > 0 else --dropout-p` for both.
    raise ValueError(f"model.drop_path_rate={cfg.drop_path_rate} with model.resid_dropout_p="
                     f"{cfg.resid_dropout_p}, model.ffn_dropout_p={cfg.ffn_dropout_p}: the reference's "
                     "recipe turns residual and FFN dropout off when drop path is on; set "
                     "--config.model.resid_dropout_p=0 --config.model.ffn_dropout_p=0")
  if not 0.0 <= c.correction_prob <= 1.0:
    raise ValueError(f"correction_prob={c.correction_prob} is not a probability")
  validate_run(c, num_devices)
  remat.check_policy(c.remat, "remat")
  if c.sample_every and not c.tokenizer_dir:
    raise ValueError("sample_every > 0 needs tokenizer_dir (a converted or exported tokenizer)")
  return cfg


@flax.struct.dataclass
class GPTDraws:
  """Every random choice of one GPT training step, drawn by `ARLoss.draw` from the step's key
  (or handed in, e.g. a reference golden's draws): raw draws, so the rates that turn them into
  decisions are applied inside the step.

  correction_u: [B] float32 uniform; example b reads its perturbed triple iff
                u < correction_prob (the reference's generate_z_input_target).
  class_u:      [B] float32 uniform; label b becomes the null class iff u < class_dropout_prob
                (the reference's LabelEmbedder.token_drop).
  token_keep:   [B, L, dim] bool kept-mask of token dropout on the embedded sequence (L = 1 +
                T - group_size + group_size - 1: class, input tokens, special tokens), or None
                when token_dropout_p = 0; kept values are scaled by 1 / (1 - token_dropout_p).
  block_key:    the key of the residual / FFN dropout and drop-path masks, or None when those
                rates are all 0. These are drawn inside the blocks from this key (per layer,
                `models.gpt._DropKeys`): under rematerialisation they are recomputed from it
                instead of holding [n_layer, B, L, dim] masks through the backward pass.
  """
  correction_u: jax.Array
  class_u: jax.Array
  token_keep: jax.Array | None = None
  block_key: jax.Array | None = None


def select_inputs_targets(tokens: jax.Array, group_size: int, correction_u: jax.Array,
                          correction_prob: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The reference's generate_z_input_target.

  tokens: [B, T] clean codes, or [B, T, 3] = (clean, noisy input, target) triples from the
  self-correction extraction. Example b reads the perturbed sequence and learns to predict the
  corrected targets iff correction_u[b] < correction_prob. Inputs drop the last group.
  Returns (inputs [B, T - group_size], targets [B, T], corrected [B] bool).
  """
  if tokens.ndim == 2:
    corrected = jnp.zeros(tokens.shape[:1], bool)
    return tokens[:, :-group_size], tokens, corrected
  corrected = correction_u < correction_prob
  inputs = jnp.where(corrected[:, None], tokens[:, :-group_size, 1], tokens[:, :-group_size, 0])
  targets = jnp.where(corrected[:, None], tokens[:, :, 2], tokens[:, :, 0])
  return inputs, targets, corrected


@dataclasses.dataclass(frozen=True)
class ARLoss:
  """The AR recipe's loss for the shared train step (train/state.py), batch = {'tokens',
  'labels'}: `draw(key, batch)` makes every random choice of a step (GPTDraws), `loss(model,
  batch, draws)` is a pure function of them. Called with a key in place of draws, it draws
  them itself (with `draw`).

  compute_dtype: 'float32' (native) or 'bfloat16' autocast (models/precision.py: float32
  master weights, embeddings, residual, norms and loss; bf16 matmul inputs). remat_policy:
  per-block gradient checkpointing (models/remat.py).
  """
  cfg: GPTConfig
  correction_prob: float
  compute_dtype: Any = jnp.float32
  remat_policy: str = "none"

  def __post_init__(self):
    Precision.named(self.compute_dtype)  # an unknown dtype fails here, not at the first step
    remat.check_policy(self.remat_policy, "remat")

  def draw(self, key: jax.Array, batch: dict[str, jax.Array]) -> GPTDraws:
    cfg = self.cfg
    b, t = batch["tokens"].shape[:2]
    k_corr, k_class, k_tok, k_block = jax.random.split(key, 4)
    token_keep = None
    if cfg.token_dropout_p > 0:
      shape = (b, cfg.sequence_length(t - cfg.group_size), cfg.dim)
      token_keep = jax.random.bernoulli(k_tok, 1.0 - cfg.token_dropout_p, shape)
    in_blocks = cfg.resid_dropout_p > 0 or cfg.ffn_dropout_p > 0 or cfg.drop_path_rate > 0
    return GPTDraws(correction_u=jax.random.uniform(k_corr, (b,)),
                    class_u=jax.random.uniform(k_class, (b,)), token_keep=token_keep,
                    block_key=k_block if in_blocks else None)

  def decisions(self, batch: dict[str, jax.Array], draws: GPTDraws):
    """The draws turned into the step's choices by the recipe's rates: (inputs [B, T - g],
    targets [B, T], corrected [B] bool, dropped labels [B] bool or None)."""
    cfg = self.cfg
    inputs, targets, corrected = select_inputs_targets(batch["tokens"], cfg.group_size,
                                                       draws.correction_u, self.correction_prob)
    # The reference drops labels only when class_dropout_prob > 0 (else no null row exists).
    drop_labels = draws.class_u < cfg.class_dropout_prob if cfg.has_null_class else None
    return inputs, targets, corrected, drop_labels

  def forward(self, model: GPT, batch: dict[str, jax.Array], draws: GPTDraws):
    """(loss, logits [B, block_size, V], corrected [B]) of one teacher-forced step."""
    inputs, targets, corrected, drop_labels = self.decisions(batch, draws)
    # The model was merged inside this trace, so setting its static policies is local to
    # this loss (autocast's `with` block).
    set_precision(model, Precision.named(self.compute_dtype))
    remat.set_remat(model, self.remat_policy, "remat")
    loss, logits = model.loss(inputs, batch["labels"], targets, key=draws.block_key,
                              drop_labels=drop_labels, token_keep=draws.token_keep)
    return loss, logits, corrected

  def __call__(self, model: GPT, batch: dict[str, jax.Array], draws):
    if not isinstance(draws, GPTDraws):
      draws = self.draw(draws, batch)
    loss, _, corrected = self.forward(model, batch, draws)
    return loss, {"corrected_fraction": corrected.mean()}


def make_loss(cfg: GPTConfig, correction_prob: float, compute_dtype=jnp.float32,
              remat_policy: str = "none") -> ARLoss:
  return ARLoss(cfg, correction_prob, compute_dtype, remat_policy)


def lr_schedule(c: ml_collections.ConfigDict):
  """The run's learning rate per update: train_c2i's LambdaLR (optim.learning_rate_schedule)."""
  o = c.optimizer
  return learning_rate_schedule(o.lr, total_steps(c), warmup_steps(c), o.schedule,
                                o.end_lr_fraction, o.warmup_start_fraction)


def make_tx(c: ml_collections.ConfigDict):
  """The run's optimizer: train_c2i's clipping, then AdamW (decay on >= 2-D weights) at
  `lr_schedule(c)`."""
  o = c.optimizer
  return clipped_adamw(lr_schedule(c), weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                       max_grad_norm=o.max_grad_norm)


def train(c: ml_collections.ConfigDict, workdir) -> Any:
  """Trains the GPT on token records; resumes from the newest checkpoint in workdir; exports
  the EMA weights to workdir/export (a directory `load_gpt` and the sample CLI read)."""
  run = driver.Driver(c, workdir, validate)
  cfg, mesh, steps = gpt_config_from(c), run.mesh, total_steps(c)
  tx = make_tx(c)
  graphdef, state, shardings = create_train_state(lambda: GPT(cfg, rngs=c.seed), tx, mesh, seed=c.seed)
  log.info("GPT %s: %.1fM parameters, mesh %s, %d steps", c.model.preset or "custom",
           sum(x.size for x in jax.tree.leaves(state.params)) / 1e6, dict(mesh.shape), steps)
  driver.log_parameter_overview("GPT", state.params)

  per_process = c.data.batch_size // jax.process_count()
  mix = TokenRecordSource(c.data.mix_path) if c.data.get("mix_path", "") else None
  ds = token_dataset(TokenRecordSource(c.data.path), batch_size=per_process, seed=c.seed,
                     shard_index=jax.process_index(), shard_count=jax.process_count(), mix=mix)
  data_iter = to_iterator(ds, c.data.num_workers)
  batches = (global_batch(b, mesh) for b in Progress(data_iter, log_every=0, name="tokens"))
  loss_fn = make_loss(cfg, c.correction_prob, jnp.dtype(c.compute_dtype), c.remat)
  step_fn = make_train_step(graphdef, loss_fn, tx, shardings, mesh, ema_decay=c.ema_decay,
                            draw=loss_fn.draw)
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
