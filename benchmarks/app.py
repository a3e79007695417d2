"""The streaming app's latency and throughput against one-shot sampling, end to end over HTTP.

python -m benchmarks.app [--quick] [--tokenizer X --gpt Y] [--every K] [--rounds N]
  ->  one JSON object:
  first_preview_s {"1": s, "8": s}: submit -> first preview received by a gradio_client, for a
    request of 1 and of 8 images (alone on the server);
  final_s {"1": s, "8": s}: submit -> final result received;
  images_per_s: 8 concurrent clients of 1 image each (batched by the server), images / wall
    second from the first submit to the last result, best of --rounds;
  cli_images_per_s: what `python -m detailflow_jax.sample` does for 8 images once compiled
    (Sampler.sample + one decode, same models, options and batch), best of --rounds;
  throughput_ratio = images_per_s / cli_images_per_s (the target: >= 0.9), sampler_calls of the
  concurrent rounds, device, models;
  stream_images_per_s: the batcher's own work for 8 images (sample_stream + every preview decode),
  in process, no HTTP; stream_ratio = that / cli_images_per_s (what streaming itself costs).
The app serves on 127.0.0.1 in this process (max batch 8, start-up compile excluded, reported as
warm_up_s). Models: X / Y as `sample` takes them (default: the demo's ./detailflow_demo);
--quick: the test fixture's tiny tokenizer and GPT, converted into a temporary directory.
"""
import argparse
import json
import pathlib
import socket
import sys
import tempfile
import threading
import time

import jax
import numpy as np

from detailflow_jax import app as app_cli
from detailflow_jax.inference.sampler import SamplingOptions

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "detailflow_tiny_a"


def fixture_models(out: pathlib.Path):
  from detailflow_jax.convert.gpt import convert_gpt
  from detailflow_jax.convert.tokenizer import convert_tokenizer
  convert_tokenizer(FIXTURE / "tokenizer" / "checkpoints" / "tokenizer.pt", out / "tokenizer")
  convert_gpt(FIXTURE / "gpt" / "checkpoints" / "gpt.pt", out / "gpt")
  return out / "tokenizer", out / "gpt"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def controls(num_images: int, seed: int, cfg_scale: float):
  return ("0", num_images, cfg_scale, False, 1.0, 0, 1.0, None, seed)


def timed_request(client, num_images, seed, cfg_scale, budget):
  """(seconds to the first preview, seconds to the final result) of one request."""
  args = list(controls(num_images, seed, cfg_scale))
  args[7] = budget
  start = time.perf_counter()
  job = client.submit(*args, api_name="/generate")
  first = None
  while not job.done():
    if first is None and job.outputs():
      first = time.perf_counter() - start
    time.sleep(0.002)
  job.result()
  final = time.perf_counter() - start
  return (final if first is None else first), final


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--tokenizer", default=None)
  parser.add_argument("--gpt", default=None)
  parser.add_argument("--every", type=int, default=1, help="decode steps between previews")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--cfg-scale", type=float, default=1.5)
  args = parser.parse_args(argv)
  from gradio_client import Client

  tmp = tempfile.TemporaryDirectory(prefix="bench-app-")
  if args.quick:
    tokenizer_src, gpt_src = fixture_models(pathlib.Path(tmp.name))
  elif args.tokenizer and args.gpt:
    tokenizer_src, gpt_src = args.tokenizer, args.gpt
  else:
    tokenizer_src, gpt_src = app_cli.DEMO_MODELS["tokenizer"], app_cli.DEMO_MODELS["gpt"]
    if not all(pathlib.Path(p).is_dir() for p in (tokenizer_src, gpt_src)):
      print(app_cli.NO_MODELS_HINT, file=sys.stderr)
      return 2

  start = time.perf_counter()
  app = app_cli.build(tokenizer_src, gpt_src, max_batch=8, every=args.every)
  warm_up_s = time.perf_counter() - start
  batcher = app.batcher
  budget = batcher.config.block_size
  port = free_port()
  page = app.launch(port=port, server_name="127.0.0.1", prevent_thread_lock=True)
  client = Client(f"http://127.0.0.1:{port}/", verbose=False)

  first_preview, final = {}, {}
  for n in (1, 8):
    times = [timed_request(client, n, 10 + r, args.cfg_scale, budget) for r in range(args.rounds)]
    first_preview[str(n)] = round(min(t[0] for t in times), 4)
    final[str(n)] = round(min(t[1] for t in times), 4)

  rounds, calls = [], []
  for r in range(args.rounds):
    before = batcher.sampler_calls
    jobs = [None] * 8
    start = time.perf_counter()

    def submit(i, r=r):
      a = list(controls(1, 100 * r + i, args.cfg_scale))
      a[7] = budget
      jobs[i] = client.submit(*a, api_name="/generate")

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    for job in jobs:
      job.result()
    rounds.append(8 / (time.perf_counter() - start))
    calls.append(batcher.sampler_calls - before)

  # the sample CLI's work once compiled: one call for 8 images, then one decode
  labels = np.zeros(8, np.int32)
  options = SamplingOptions(cfg_scale=args.cfg_scale)
  cli = []
  for r in range(args.rounds + 1):  # the first compiles
    start = time.perf_counter()
    tokens = batcher.sampler.sample(batcher.params, labels, jax.random.key(r), options)
    np.asarray(batcher.fns.decode(tokens, budget))
    cli.append(8 / (time.perf_counter() - start))
  cli_images_per_s = max(cli[1:])
  # the server's own work for the same 8 images (stream + every preview decode), without HTTP
  server = []
  for r in range(args.rounds):
    start = time.perf_counter()
    batcher.run_batch([app_cli.Request(labels, r, options, budget)])
    server.append(8 / (time.perf_counter() - start))
  client.close()
  page.close()
  images_per_s = max(rounds)
  print(json.dumps({
      "first_preview_s": first_preview, "final_s": final,
      "images_per_s": round(images_per_s, 3), "cli_images_per_s": round(cli_images_per_s, 3),
      "throughput_ratio": round(images_per_s / cli_images_per_s, 3),
      "stream_images_per_s": round(max(server), 3),
      "stream_ratio": round(max(server) / cli_images_per_s, 3),
      "sampler_calls_per_8_clients": calls, "every": args.every, "warm_up_s": round(warm_up_s, 1),
      "tokens": budget, "cfg_scale": args.cfg_scale, "device": str(jax.devices()[0]),
      "models": {"tokenizer": str(tokenizer_src), "gpt": str(gpt_src)}}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
