"""Images/s of the whole generation job (sample, decode, uint8, chunk write, final assembly).

python -m benchmarks.generation_job --model fixture|gpt_l [--num-samples N] [--per-device-batch B]
  -> one JSON object: model, devices, num_samples, images_per_s, seconds, compile_s.

fixture: the tiny reference-converted test models (tests/fixtures/detailflow_tiny_a, 64 px,
32 tokens). gpt_l: GPT-L-sized random weights (24 layers, 1024 wide, 128 tokens, vocab 8192,
1000 classes, CFG 1.45) with a DetailFlow-16-sized random tokenizer decoding at 256 px. The
first global batch is run once to compile (compile_s); the timed run then makes every sample
of a fresh workdir with the compiled programs, so images_per_s is the steady-state rate.
"""
import argparse
import json
import pathlib
import tempfile
import time

import jax


def fixture_models(tmp: pathlib.Path):
  from detailflow_jax.convert.gpt import convert_gpt
  from detailflow_jax.convert.tokenizer import convert_tokenizer
  from detailflow_jax.weights.load import load_gpt, load_tokenizer
  tiny = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "detailflow_tiny_a"
  convert_tokenizer(tiny / "tokenizer" / "checkpoints" / "tokenizer.pt", tmp / "tok")
  convert_gpt(tiny / "gpt" / "checkpoints" / "gpt.pt", tmp / "gpt")
  return load_gpt(tmp / "gpt"), load_tokenizer(tmp / "tok")


def gpt_l_models():
  import jax.numpy as jnp

  from benchmarks.sampling import model_config, random_model
  from benchmarks.tokenizer import detailflow16_config
  from detailflow_jax.models.tokenizer import Tokenizer
  _, cfg = model_config(False, 128)
  return random_model(cfg, jnp.float32), Tokenizer(detailflow16_config(12), rngs=0)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--model", choices=["fixture", "gpt_l"], default="fixture")
  parser.add_argument("--num-samples", type=int, default=None)
  parser.add_argument("--per-device-batch", type=int, default=None)
  parser.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
  args = parser.parse_args(argv)
  from detailflow_jax.eval.generation import GenerationJob, GenerationSettings
  tmp = pathlib.Path(tempfile.mkdtemp())
  if args.model == "fixture":
    gpt, tokenizer = fixture_models(tmp)
    n, b, cfg = args.num_samples or 16, args.per_device_batch or 4, 1.5
  else:
    gpt, tokenizer = gpt_l_models()
    n, b, cfg = args.num_samples or 2, args.per_device_batch or 1, 1.45
  settings = GenerationSettings(num_samples=n, chunk_size=max(b * jax.device_count(), 4),
                                per_device_batch=b, cfg_scale=cfg, precision=args.precision)
  job = GenerationJob(gpt, tokenizer, settings)
  start = time.perf_counter()
  job.images(0, job.batch)  # compile sample + decode for this global batch
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  summary = job.run(tmp / "work", tmp / "samples.npz")
  seconds = time.perf_counter() - start
  print(json.dumps({"model": args.model, "devices": jax.device_count(), "backend": jax.default_backend(),
                    "num_samples": n, "per_device_batch": b, "precision": args.precision,
                    "images_per_s": n / seconds, "seconds": seconds, "compile_s": compile_s,
                    "job_images_per_s": summary["images_per_second"]}))


if __name__ == "__main__":
  main()
