"""The generation job: N class-conditional samples as an ADM batch file, sharded and resumable.

Every device of the mesh (all hosts) samples its slice of each global batch; sample i's label
and key come from `protocol` (pure functions of (seed, i)) and each device always runs the same
per-device batch, so the images do not depend on the device count. The tokens are decoded right
after sampling on the same devices (the first `num_tokens` of them at `image_size`, then resized
to `eval_image_size` with torch's bicubic when that differs, as sample_c2i_ddp.py does); the
pixels are gathered, turned into uint8 on the host as the reference's samplers do
(`images.to_uint8`, in the pixels' dtype), and written chunk by chunk (`chunks.ChunkStore`,
process 0 writes, a restart skips the finished chunks). The final `arr_0` uint8 [N, H, W, 3] /
`arr_1` int32 [N] file is assembled from the chunks, one chunk in memory at a time.

Token budget and resolution (sample_c2i_ddp.py): `image_size` must be one of the tokenizer's
best decode resolutions (`schedule.best_res`, within [min_image_size, max_image_size]), and the
decode uses min(GPT block_size, decres2besttoken[image_size]) tokens. The reference computes
that table budget and then decodes every token its GPT made; the two agree whenever the GPT
makes no more tokens than the table gives the resolution (every released pair at its own size).
A GPT that makes fewer tokens than the tokenizer holds is decoded at the GPT's budget.

Shapes: indices / labels / keys [B], tokens [B, T], pixels [B, H, W, 3]; B = per_device_batch x
devices.
"""
import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import paths, sharding
from ..data import protocol
from ..inference.images import to_uint8
from ..inference.sampler import Sampler, SamplingOptions, check_weights_dtype
from ..models.precision import Precision
from .chunks import ChunkStore, write_json_atomically, write_npz_streaming
from .device import cast_floating, check_precision, decode_tokens, to_host
from .evaluator import evaluate

log = logging.getLogger("detailflow_jax")
PARAM_LAYOUTS = ("replicated", "fsdp")


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
  """What a generation run is; every field is part of the protocol its chunks are tied to,
  except the ones that cannot change a single pixel (per_device_batch, chunk_size is kept as
  the chunk layout)."""
  num_samples: int = 50_000
  seed: int = 0
  label_mode: str = "uniform"
  cfg_scale: float = 1.5
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  gradual_cfg: bool = False      # the reference's --gradual_cfg
  cfg_interval: int = -1         # LlamaGen's rule (see CFG_INTERVAL_NOTE); -1: off, the reference's
  precision: str = "float32"
  weights_dtype: str = "float32"  # GPT matmul kernels (inference.sampler.Sampler's weights_dtype)
  image_size: int = 0            # decode side; 0: the tokenizer's image_size
  eval_image_size: int = 0       # side of the stored images; 0: image_size
  per_device_batch: int = 4      # the reference's per-rank batch
  chunk_size: int = 1000
  param_layout: str = "replicated"

  def __post_init__(self):
    protocol.check_label_mode(self.label_mode)
    check_precision(self.precision)
    check_weights_dtype(self.weights_dtype)
    if self.weights_dtype != "float32" and self.precision != "float32":
      raise ValueError(f"weights_dtype={self.weights_dtype!r} (weight-only, float32 activations) "
                       f"needs precision='float32'; precision={self.precision!r} already runs "
                       "every GPT weight in that dtype")
    if self.param_layout not in PARAM_LAYOUTS:
      raise ValueError(f"param_layout must be one of {PARAM_LAYOUTS}, got {self.param_layout!r}")
    for name in ("num_samples", "per_device_batch", "chunk_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    for name in ("image_size", "eval_image_size"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be positive (0: the default), got {getattr(self, name)}")
    self.options.check()

  @property
  def options(self) -> SamplingOptions:
    return SamplingOptions(cfg_scale=self.cfg_scale, temperature=self.temperature,
                           top_k=self.top_k, top_p=self.top_p, gradual_cfg=bool(self.gradual_cfg),
                           cfg_interval=int(self.cfg_interval))

  def protocol(self) -> dict:
    d = dataclasses.asdict(self)
    d.pop("per_device_batch")  # the images do not depend on it
    if d["weights_dtype"] == "float32":
      d.pop("weights_dtype")  # the default: protocols written before the field existed still match
    return d


CFG_INTERVAL_NOTE = (
    "cfg_interval: LlamaGen's rule (decode steps after this one use the conditional logits "
    "only; -1 = off). The reference's sample_c2i_ddp.py accepts --cfg_interval but its "
    "generate_group_par ignores it, so only -1 (the default) reproduces the reference.")


def precision_record(precision: str, weights_dtype: str = "float32") -> dict:
  """What `precision` (and the GPT's `weights_dtype`) mean in this job, for the output metadata."""
  if precision == "float32" and weights_dtype == "bfloat16":
    return {"name": "float32", "weights_dtype": "bfloat16",
            "gpt": "matmul kernels cast to bfloat16 (weight-only: inputs rounded to bfloat16 for "
                   "each product, float32 accumulation and result); norms, embeddings, "
                   "activations, KV cache and logits float32",
            "tokenizer_decode": "float32 weights and activations", "uint8": "from float32 pixels"}
  if precision == "float32":
    return {"name": "float32", "gpt": "float32 weights and activations",
            "tokenizer_decode": "float32 weights and activations",
            "uint8": "from float32 pixels"}
  return {"name": "bfloat16",
          "gpt": "weights cast to bfloat16 at load (load_ar_model(dtype=bf16), as the reference's "
                 "bf16 eval); activations bfloat16, logits float32",
          "tokenizer_decode": "torch-autocast policy (models/precision.py), as the reference "
                              "decodes under bf16 autocast: float32 weights, bfloat16 matmul "
                              "inputs, float32 accumulation, norms and softmax in float32; "
                              "pixels come out bfloat16",
          "uint8": "bicubic resize (when eval_image_size differs) and 127.5 x + 128 computed in "
                   "bfloat16, op by op, as torch runs them on the bf16 decode"}


def decode_plan(tokenizer_config, schedule, block_size: int, image_size: int = 0) -> dict[str, int]:
  """{'image_size', 'num_tokens', 'table_tokens'} of a decode: the side (0: the tokenizer's
  image_size) checked as sample_c2i_ddp.py asserts it, and the tokens decoded,
  min(block_size, decres2besttoken[side])."""
  size = image_size or tokenizer_config.image_size
  lo, hi = tokenizer_config.min_image_size, tokenizer_config.max_image_size
  if not lo <= size <= hi or size not in schedule.best_res:
    raise ValueError(f"image_size={size}: the tokenizer decodes {sorted(schedule.best_res)} "
                     f"(its best decode resolutions, within min_image_size={lo} .. "
                     f"max_image_size={hi})")
  table = schedule.decres2besttoken[size]
  return {"image_size": size, "num_tokens": min(block_size, table), "table_tokens": table}


@jax.jit
def _row_keys(seed, indices):
  return protocol.row_keys(seed, indices)


class GenerationJob:
  """Samples, decodes and stores `settings.num_samples` images of one GPT + tokenizer pair.

  gpt / tokenizer: loaded modules (float32). With precision bfloat16 the GPT's weights are cast
  to bfloat16 (the reference loads it in bf16) and the tokenizer decodes under the autocast
  policy with its float32 weights (the reference's autocast around decode_code).
  mesh: a (data, fsdp, tensor) mesh over the devices to use (default: all devices).
  """

  def __init__(self, gpt, tokenizer, settings: GenerationSettings, mesh=None):
    self.settings = settings
    self.mesh = mesh if mesh is not None else sharding.make_mesh()
    if settings.param_layout == "fsdp" and self.mesh.shape["fsdp"] == 1:
      raise ValueError("param_layout 'fsdp' needs a mesh with fsdp > 1 (mesh.fsdp in the config)")
    dtype = check_precision(settings.precision)
    self.gpt_config, self.tok_config = gpt.config, tokenizer.config
    if settings.cfg_scale > 1.0 and not gpt.config.has_null_class:
      raise ValueError("cfg_scale > 1 needs a GPT with a null class (class_dropout_prob > 0)")
    if gpt.config.block_size > tokenizer.config.num_latent_tokens:
      raise ValueError(f"the GPT makes {gpt.config.block_size} tokens, more than the tokenizer's "
                       f"{tokenizer.config.num_latent_tokens} latent tokens")
    if gpt.config.vocab_size != tokenizer.config.codebook_size:
      raise ValueError(f"GPT vocabulary ({gpt.config.vocab_size}) does not match the tokenizer "
                       f"codebook ({tokenizer.config.codebook_size})")
    self.plan = decode_plan(tokenizer.config, tokenizer.schedule, gpt.config.block_size, settings.image_size)
    self.image_size = self.plan["image_size"]
    self.eval_image_size = settings.eval_image_size or self.image_size
    self.decode_policy = Precision.named(settings.precision, "precision")
    self.gpt_graphdef, gpt_state = nnx.split(gpt)
    self.tok_graphdef, tok_state = nnx.split(tokenizer)
    gpt_state = cast_floating(gpt_state, dtype)
    tok_state = cast_floating(tok_state, jnp.float32)  # autocast keeps float32 weights
    rep = sharding.replicated(self.mesh)
    if settings.param_layout == "fsdp":
      self.gpt_params = jax.device_put(gpt_state, sharding.shardings_for(gpt_state, self.mesh))
    else:
      self.gpt_params = jax.device_put(gpt_state, rep)
    self.tok_params = jax.device_put(tok_state, rep)
    self.batch = settings.per_device_batch * self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    # Labels, keys and tokens are batch-sharded over the mesh by the sampler; each device
    # always samples per_device_batch rows, whatever the device count.
    self.sampler = Sampler(self.gpt_graphdef, mesh=self.mesh, weights_dtype=settings.weights_dtype)
    self.gpt_params = self.sampler.prepare_weights(self.gpt_params)

  def images(self, start: int, stop: int) -> np.ndarray:
    """uint8 [stop - start, H, W, 3] of samples start .. stop-1 (every process gets them)."""
    out = []
    s = self.settings
    for first in range(start, stop, self.batch):
      # Every process holds the whole batch's labels and keys; rows past `stop` are dropped.
      labels = protocol.labels_for(s.seed, first, first + self.batch, self.gpt_config.num_classes,
                                   s.label_mode)
      keys = _row_keys(jnp.uint32(s.seed), np.arange(first, first + self.batch, dtype=np.int32))
      tokens = self.sampler.sample(self.gpt_params, labels, keys, s.options)
      pixels = decode_tokens(self.tok_graphdef, self.tok_params, tokens, policy=self.decode_policy,
                             num_tokens=self.plan["num_tokens"], image_size=self.image_size,
                             out_size=self.eval_image_size)
      out.append(to_uint8(to_host(pixels))[:stop - first])
    return np.concatenate(out)

  def labels(self, start: int, stop: int) -> np.ndarray:
    s = self.settings
    return protocol.labels_for(s.seed, start, stop, self.gpt_config.num_classes, s.label_mode)

  def run(self, workdir, out, protocol_extra: dict | None = None, png_dir=None,
          log_every_s: float = 10.0) -> dict:
    """Writes the chunks under `workdir` (skipping finished ones) and assembles `out`.
    Returns a summary (images/s, chunks made / reused, seconds)."""
    s = self.settings
    size = self.eval_image_size
    writer = jax.process_index() == 0
    store = ChunkStore(workdir, dict(s.protocol(), **(protocol_extra or {})), s.num_samples,
                       s.chunk_size, {"arr_0": ((size, size, 3), "uint8"), "arr_1": ((), "int32")},
                       writer=writer)
    sharding.barrier("generation: manifest read")
    pending = store.pending()
    log.info("generation: %d samples, %d chunks of %d (%d to make, %d done), global batch %d on %d devices",
             s.num_samples, store.num_chunks, s.chunk_size, len(pending),
             store.num_chunks - len(pending), self.batch, self.mesh.size)
    after = None
    if png_dir is not None and writer:
      after = lambda start, arrays: _write_pngs(png_dir, start, arrays["arr_0"])
    made, seconds = store.fill(
        lambda start, stop: {"arr_0": self.images(start, stop), "arr_1": self.labels(start, stop)},
        "generation", log_every_s, after)
    sharding.barrier("generation: chunks written")
    if writer:
      write_npz_streaming(out, {"arr_0": store.member("arr_0"), "arr_1": store.member("arr_1")})
    sharding.barrier("generation: assembled")
    summary = {"images_made": made, "chunks_made": len(pending),
               "chunks_reused": store.num_chunks - len(pending), "seconds": seconds,
               "images_per_second": made / seconds if made else None, "devices": self.mesh.size,
               "processes": jax.process_count(), "global_batch": self.batch}
    log.info("generation done: %d images in %s (%d new in %.1fs, %s img/s, %d chunks reused)",
             s.num_samples, out, made, seconds,
             f"{summary['images_per_second']:.2f}" if made else "-", summary["chunks_reused"])
    return summary


def _write_pngs(directory, start: int, images: np.ndarray) -> None:
  """One PNG per sample, local or remote (`paths`), named as the reference names them."""
  from PIL import Image
  directory = paths.run_path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  for j, img in enumerate(images):  # the reference's names: {index:06d}.png
    paths.save_image(Image.fromarray(img), directory / f"{start + j:06d}.png")


# ------------------------------------------------------------------------- run + results.json --

def package_versions() -> dict[str, str]:
  import importlib.metadata
  import platform
  out = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "flax", "numpy", "scipy", "orbax-checkpoint", "ml_collections"):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def model_record(directory, kind: str) -> dict:
  """A converted model directory and the hash of its weights (over its files' SHA-256s)."""
  import hashlib
  import json

  from ..weights.model_dir import verify_model_dir
  meta = verify_model_dir(directory, kind)
  files = meta.get("files") or {}
  digest = hashlib.sha256(json.dumps({k: v.get("sha256") for k, v in sorted(files.items())}).encode())
  return {"path": str(directory), "weights_sha256": digest.hexdigest(),
          "param_dtype": meta.get("param_dtype", "float32"), "source": meta.get("source")}


def resolve_models(tokenizer_src, gpt_src, gpt_weights: str | None, tokenizer_weights: str | None = None):
  """(tokenizer dir, gpt dir): converted directories, released runs or Hub ids resolved; the
  weight choice ('ema' / 'model') applies to released checkpoints only (a converted directory
  holds one set, recorded at conversion)."""
  from ..weights.hub import resolve_model_dir
  from ..weights.model_dir import is_model_dir

  def one(src, kind, weights):
    if is_model_dir(src):
      weights = None
    return resolve_model_dir(src, kind, weights or None)

  return one(tokenizer_src, "tokenizer", tokenizer_weights), one(gpt_src, "gpt", gpt_weights)


def _mean_std(values):
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
          "values": v.tolist()}


def run_generation(tokenizer_src, gpt_src, settings: GenerationSettings, *, seeds=None,
                   workdir, out, reference=None, inception=None, gpt_weights: str | None = "ema",
                   vq_weights: str | None = "model", png_dir=None, mesh=None,
                   inception_batch: int = 256, results_path=None) -> dict:
  """The whole generation job for one or more seeds: samples (resumable, per seed
  `out` with `{seed}` filled in, or OUT-seedS.npz for several seeds), scores with
  `reference` + `inception`, and results.json (protocol, hashes, scores, mean +- std).
  workdir, out and png_dir may be local or remote (gs://...: `paths`). gpt_weights /
  vq_weights: 'model' or 'ema' of a released checkpoint (the reference's use_gpt_ema /
  use_vq_ema); a converted directory holds one set and takes None."""
  from ..weights.load import load_model_dir
  seeds = list(seeds) if seeds else [settings.seed]
  if (reference is None) != (inception is None):
    raise ValueError("scoring needs both --reference and --inception (or neither)")
  tok_dir, gpt_dir = resolve_models(tokenizer_src, gpt_src, gpt_weights, vq_weights)
  tokenizer, gpt = load_model_dir(tok_dir, "tokenizer"), load_model_dir(gpt_dir, "gpt")
  models = {"tokenizer": model_record(tok_dir, "tokenizer"), "gpt": model_record(gpt_dir, "gpt")}
  models["gpt"]["weights_requested"] = gpt_weights
  models["tokenizer"]["weights_requested"] = vq_weights
  workdir = paths.run_path(workdir)
  out = str(out)
  runs = []
  job = None
  for seed in seeds:
    s = dataclasses.replace(settings, seed=int(seed))
    job = GenerationJob(gpt, tokenizer, s, mesh=mesh)
    if "{seed}" in out:
      path = paths.run_path(out.format(seed=seed))
    elif len(seeds) > 1:
      base = paths.run_path(out)
      path = base.with_name(f"{base.stem}-seed{seed}{base.suffix or '.npz'}")
    else:
      path = paths.run_path(out)
    extra = {"tokenizer_sha256": models["tokenizer"]["weights_sha256"],
             "gpt_sha256": models["gpt"]["weights_sha256"]}
    summary = job.run(workdir / f"chunks-seed{seed}", path, protocol_extra=extra,
                      png_dir=(paths.run_path(png_dir) / f"seed{seed}") if png_dir else None)
    run = {"seed": int(seed), "samples": str(path), "summary": summary}
    if reference is not None and jax.process_index() == 0:
      run["scores"] = evaluate(reference, path, inception, inception_batch)
    elif reference is not None:
      evaluate(  # every process takes part in the Inception features
          reference, path, inception, inception_batch)
    else:
      run["samples_sha256"] = paths.file_sha256(path) if jax.process_index() == 0 else None
    runs.append(run)
  results = {
      "protocol": {
          "num_samples": settings.num_samples, "seeds": [int(s) for s in seeds],
          "label_mode": settings.label_mode, "cfg_scale": settings.cfg_scale,
          "gradual_cfg": settings.gradual_cfg, "cfg_interval": settings.cfg_interval,
          "cfg_interval_note": CFG_INTERVAL_NOTE,
          "temperature": settings.temperature, "top_k": settings.top_k, "top_p": settings.top_p,
          "image_size": job.image_size, "eval_image_size": job.eval_image_size,
          "decoded_tokens": job.plan["num_tokens"], "gpt_block_size": gpt.config.block_size,
          "tokenizer_latent_tokens": tokenizer.config.num_latent_tokens,
          "table_tokens": job.plan["table_tokens"],
          "decode": "the first decoded_tokens = min(gpt_block_size, table_tokens = "
                    "decres2besttoken[image_size]) tokens at image_size, then torch bicubic "
                    "(a = -0.75, align_corners=False) to eval_image_size when it differs",
          "chunk_size": settings.chunk_size, "param_layout": settings.param_layout,
          "keys": "key_i = fold_in(fold_in(key(seed), 0), i); labels: see data/protocol.py",
          "uint8": "clip(127.5 x + 128, 0, 255) truncated, as the reference's samplers",
      },
      "precision": precision_record(settings.precision, settings.weights_dtype),
      "models": models, "packages": package_versions(),
      "devices": {"count": jax.device_count(), "processes": jax.process_count(),
                  "platform": jax.default_backend(),
                  "kind": jax.devices()[0].device_kind},
      "runs": runs,
  }
  if reference is not None and jax.process_index() == 0:
    results["inputs"] = {"reference": runs[0]["scores"]["inputs"]["reference"],
                         "inception": runs[0]["scores"]["inputs"]["inception"]}
    results["scores"] = {k: _mean_std([r["scores"][k] for r in runs])
                         for k in ("inception_score", "fid", "sfid", "precision", "recall")}
  if jax.process_index() == 0:
    path = paths.run_path(results_path) if results_path else workdir / "results.json"
    write_json_atomically(path, results)
    if "scores" in results:
      line = ", ".join(f"{k} {v['mean']:.4g} ± {v['std']:.2g}" for k, v in results["scores"].items())
      log.info("scores over seeds %s: %s", seeds, line)
  return results
