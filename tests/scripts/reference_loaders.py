"""The reference's side of tests/test_export_reference_loader.py: runs under the reference's own
Python (torch + transformers, no JAX) and never imports detailflow_jax.

python tests/scripts/reference_loaders.py --reference-dir DIR --jobs JOBS.json

JOBS.json is a list; each job writes its arrays to job["out"] (.npz):
  {"job": "build_tokenizer", "run": RUN, "siglip2": {...}, "args": {...}, "seed": N}
      a VQ-16 VQModel from the reference's own builders with VQ ModelArgs `args`, the SigLIP2
      vision config `siglip2` in RUN/siglip2-so400m-patch16-naflex (read with
      CACHE_DATA_PATH=RUN), seeded random weights, saved as a released run (config.json,
      config.yaml, checkpoints/tokenizer.pt); "out" gets the outputs of "inputs" as below.
  {"job": "tokenizer", "checkpoint": PT, "ema": bool, "cache": DIR, "inputs": NPZ}
      inference/load_vq.load_vq_model(PT, ema) with CACHE_DATA_PATH=DIR; for inputs `images`
      (NCHW) the encoder's indices and quantized latents, for `codes` with `decodes` ([t, size]
      rows) decode_code(codes, t, size) as `decode_{t}_{size}`.
  {"job": "gpt", "checkpoint": PT, "ema": bool, "inputs": NPZ}
      autoregressive/sample/load_ar_model(PT, ema) (a gpt_model name that is not a GPT_models
      preset is registered from config.yaml's gpt_model_dims, as docs/export_reference.md
      says); teacher-forced logits of `tokens` / `labels`, and greedy generate_group_par tokens
      for each `cfg_scales` (and gradual_cfg) as `greedy_{cfg}` / `greedy_{cfg}_gradual`.
"""
import argparse
import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from reference_worker import expose_reference, randomize  # noqa: E402

SIGLIP2_DIR = "siglip2-so400m-patch16-naflex"


def _write_siglip2(cache: pathlib.Path, config: dict) -> None:
  """A SigLIP2 vision config and a weights file with no tensors (the pretrained path's
  from_pretrained needs one; the tokenizer checkpoint replaces every tower tensor)."""
  from safetensors.torch import save_file
  directory = cache / SIGLIP2_DIR
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config))
  save_file({}, str(directory / "model.safetensors"), metadata={"format": "pt"})


def _tokenizer_outputs(model, inputs) -> dict:
  import torch
  out = {}
  if "images" in inputs:
    quant, _, info = model.encode(torch.from_numpy(inputs["images"]))
    out["indices"] = info[-1].reshape(quant.shape[0], quant.shape[1]).numpy()
    out["quant"] = quant.numpy()
  for t, size in inputs["decodes"].tolist():
    out[f"decode_{t}_{size}"] = model.decode_code(torch.from_numpy(inputs["codes"]), t=t, img_size=size).numpy()
  return out


def build_tokenizer(job: dict, inputs) -> dict:
  import torch
  import yaml
  run = pathlib.Path(job["run"])
  _write_siglip2(run, job["siglip2"])
  os.environ["CACHE_DATA_PATH"] = str(run)
  from modelling.tokenizer import VQ_models
  model = VQ_models["VQ-16"](**job["args"])
  randomize(model, seed=job["seed"], std=job.get("std", 0.05))
  model.eval()
  (run / "checkpoints").mkdir(parents=True, exist_ok=True)
  (run / "config.json").write_text(json.dumps(dict(model.config.__dict__), indent=1))
  a = job["args"]
  (run / "config.yaml").write_text(yaml.safe_dump({
      "vq_model": "VQ-16", "image_size": a["image_size"], "max_image_size": a["max_image_size"],
      "min_image_size": a["image_size"], "content_degradation": "resolution_power",
      "degradation_power": 1.5, "enc_type": "siglip2", "dec_type": "siglip2",
      "num_latent_tokens": a["num_latent_tokens"], "group_size": a["group_size"]}))
  torch.save({"model": model.state_dict()}, run / "checkpoints" / "tokenizer.pt")
  return _tokenizer_outputs(model, inputs)


def tokenizer(job: dict, inputs) -> dict:
  os.environ["CACHE_DATA_PATH"] = job["cache"]
  from inference.load_vq import load_vq_model
  model, _, _, _ = load_vq_model(job["checkpoint"], ema=job["ema"])
  return _tokenizer_outputs(model, inputs)


def gpt(job: dict, inputs) -> dict:
  import torch
  import yaml
  from autoregressive.models import gpt as ref_gpt
  from autoregressive.models.generate import generate_group_par
  from autoregressive.sample.load_ar_model import load_ar_model
  config_yaml = yaml.safe_load((pathlib.Path(job["checkpoint"]).parent.parent / "config.yaml").read_text())
  name = config_yaml["gpt_model"]
  if name not in ref_gpt.GPT_models:  # a size without a preset: the registration the docs give
    dims = config_yaml["gpt_model_dims"]
    ref_gpt.GPT_models[name] = lambda **kw: ref_gpt.Transformer(ref_gpt.ModelArgs(**dims, **kw))
  model, _, _ = load_ar_model(job["checkpoint"], ema=job["ema"])
  labels = torch.from_numpy(inputs["labels"])
  logits = model(idx=torch.from_numpy(inputs["tokens"]), cond_idx=labels, basic_group_inference=True)
  out = {"logits": (logits[0] if isinstance(logits, tuple) else logits).numpy()}
  for cfg in inputs["cfg_scales"].tolist():
    for gradual in (False, True):
      tokens = generate_group_par(model, labels, model.block_size, cfg_scale=cfg, gradual_cfg=gradual,
                                  sample_logits=False, temperature=1.0, top_k=0, top_p=1.0)
      out[f"greedy_{cfg:g}" + ("_gradual" if gradual else "")] = tokens.numpy()
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--reference-dir", required=True)
  parser.add_argument("--jobs", required=True)
  args = parser.parse_args(argv)
  expose_reference(args.reference_dir)
  import numpy as np
  import torch
  torch.set_grad_enabled(False)
  torch.manual_seed(0)
  stdout = sys.stdout
  sys.stdout = sys.stderr  # the loaders and the sampler print progress lines
  for job in json.loads(pathlib.Path(args.jobs).read_text()):
    with np.load(job["inputs"], allow_pickle=False) as data:
      inputs = {k: data[k] for k in data.files}
    result = {"build_tokenizer": build_tokenizer, "tokenizer": tokenizer, "gpt": gpt}[job["job"]](job, inputs)
    np.savez(job["out"], **result)
    stdout.write(f"done {job['job']} -> {job['out']}\n")
  stdout.flush()


if __name__ == "__main__":
  main()
