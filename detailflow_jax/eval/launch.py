"""launch/evaluate.py's job selection: a `:eval` config (detailflow_jax/configs/eval_common.py) -> the
generation job or the tokenizer job, on the config's mesh (jax.distributed when configured)."""
from .. import paths, sharding
from ..cli import int_list
from .generation import GenerationSettings, run_generation
from .reconstruction import run_tokenizer_eval


class ConfigError(ValueError):
  """A config that cannot run an evaluation; the message names the key."""


def run_from_config(c, workdir):
  """Runs the job a `:eval` config names (task eval_generation / eval_tokenizer) in `workdir`."""
  if c.get("task") not in ("eval_generation", "eval_tokenizer"):
    raise ConfigError(f"config task {c.get('task')!r} is not an evaluation; use a :eval variant "
                      "(e.g. configs/detailflow16_gpt_l.py:eval)")
  sharding.maybe_initialize_distributed(c)
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
  workdir = paths.run_path(workdir)  # local or gs://
  e = c.eval
  if c.task == "eval_tokenizer":
    return run_tokenizer_eval(e, workdir, mesh=mesh)
  for key in ("tokenizer", "gpt"):
    if not e[key]:
      raise ConfigError(f"eval.{key} is empty: give --config.eval.{key}=DIR")
  if bool(e.reference) != bool(e.inception):
    raise ConfigError("scoring needs both eval.reference and eval.inception (or neither)")
  seeds = int_list(e.seeds, "eval.seeds", low=0, distinct=True)
  settings = GenerationSettings(
      num_samples=e.num_samples, seed=seeds[0], label_mode=e.label_mode, cfg_scale=e.cfg_scale,
      gradual_cfg=e.gradual_cfg, cfg_interval=e.cfg_interval, temperature=e.temperature,
      top_k=e.top_k, top_p=e.top_p, precision=e.precision, image_size=e.image_size,
      eval_image_size=e.eval_image_size, per_device_batch=e.per_device_batch,
      chunk_size=e.chunk_size, param_layout=e.param_layout)
  return run_generation(e.tokenizer, e.gpt, settings, seeds=seeds, workdir=workdir,
                        out=e.out or workdir / "samples.npz", reference=e.reference or None,
                        inception=e.inception or None, gpt_weights=e.gpt_weights or None,
                        vq_weights=e.vq_weights or None, png_dir=e.png_dir or None, mesh=mesh,
                        inception_batch=e.inception_batch)
