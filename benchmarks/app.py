"""The streaming app's latency and throughput against one-shot sampling.

python -m benchmarks.app [--quick | --random-models | --tokenizer X --gpt Y] [--previews N|all] [--rounds N]
  ->  one JSON object:
  stream_throughput_ratio: what streaming costs, in process (no HTTP): one-shot time / streamed
    time for the same 8 images, the median over --rounds of rounds that run both back to back
    (the order alternating), so load on a shared machine hits both alike. One-shot is what
    `python -m detailflow_jax.sample` does once compiled (Sampler.sample + one decode); streamed
    is the app's batcher (StreamingBatcher.run_batch: sample_stream in segments + every preview
    decode + the final decode, pulled to the host). The target: >= 0.9.
  in_process_s: medians of oneshot, segments (sample_stream at the preview steps + the final
    decode, no previews: what segmenting alone costs) and stream (run_batch), seconds for 8 images;
    previews: the token counts previewed for the full budget.
  first_preview_s {"1": s, "8": s}: submit -> first preview received by a gradio_client, for a
    request of 1 and of 8 images (alone on the server), best of --rounds;
  final_s {"1": s, "8": s}: submit -> final result received;
  images_per_s: 8 concurrent clients of 1 image each (batched by the server), images / wall
    second from the first submit to the last result, best of --rounds;
  cli_images_per_s: one-shot's images per second (the best round), and throughput_ratio =
    images_per_s / cli_images_per_s (the whole server: HTTP, Gradio, PNGs included);
  sampler_calls_per_8_clients, loadavg (1/5/15 min at the start and after each part), device.
The app serves on 127.0.0.1 in this process (max batch 8, start-up compile excluded, reported as
warm_up_s). Models: X / Y as `sample` takes them (default: the demo's ./detailflow_demo);
--quick: the test fixture's tiny tokenizer and GPT (32 tokens), converted into a temporary
directory; --random-models: DetailFlow-16-sized models with random weights (GPT-B: 12 x 768,
128 tokens in groups of 8, vocabulary 8192, 1000 classes; the tokenizer's decoder 12 x 768 at
256 px, its encoder cut to one layer as the app never encodes), built in memory.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import socket
import statistics
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


def random_models():
  """(GPT, tokenizer): GPT-B and a DetailFlow-16 decoder with random weights (see the docstring)."""
  from benchmarks.latency import random_reference_like_gpt
  from benchmarks.tokenizer import detailflow16_config
  from detailflow_jax.convert.tokenizer import SIGLIP2_SO400M, _vit
  from detailflow_jax.models.gpt import GPTConfig
  from detailflow_jax.models.tokenizer import Tokenizer
  config = dataclasses.replace(detailflow16_config(), encoder=_vit(SIGLIP2_SO400M, layers=1, patch=16))
  tokenizer = Tokenizer(config, rngs=0)
  gpt_config = GPTConfig.preset("GPT-B", vocab_size=config.codebook_size, block_size=config.num_latent_tokens,
                                group_size=config.group_size, num_classes=1000)
  return random_reference_like_gpt(gpt_config, seed=0), tokenizer


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def controls(num_images: int, seed: int, cfg_scale: float, budget: int):
  return ("0", num_images, cfg_scale, False, 1.0, 0, 1.0, budget, seed)


def timed_request(client, num_images, seed, cfg_scale, budget):
  """(seconds to the first preview, seconds to the final result) of one request."""
  start = time.perf_counter()
  job = client.submit(*controls(num_images, seed, cfg_scale, budget), api_name="/generate")
  first = None
  while not job.done():
    if first is None and job.outputs():
      first = time.perf_counter() - start
    time.sleep(0.002)
  job.result()
  final = time.perf_counter() - start
  return (final if first is None else first), final


def load() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def in_process(batcher, cfg_scale: float, rounds: int) -> dict:
  """One-shot vs streamed sampling of 8 images, interleaved (see the module docstring)."""
  labels = np.arange(batcher.max_batch, dtype=np.int32) % batcher.config.num_classes
  options = SamplingOptions(cfg_scale=cfg_scale)
  budget = batcher.config.block_size
  steps = batcher.preview_steps(budget)

  def oneshot(r):
    tokens = batcher.sampler.sample(batcher.params, labels, jax.random.key(r), options)
    np.asarray(batcher.fns.decode(tokens, budget))

  def segments(r):
    tokens = None
    for tokens in batcher.sampler.sample_stream(batcher.params, labels, jax.random.key(r), options,
                                                at_steps=steps):
      pass
    np.asarray(batcher.fns.decode_prefix(np.asarray(tokens)))

  def stream(r):
    batcher.run_batch([app_cli.Request(labels, r, options, budget)])

  parts = {"oneshot": oneshot, "segments": segments, "stream": stream}
  for fn in parts.values():  # the first call of each compiles or allocates
    fn(0)
  times = {name: [] for name in parts}
  for r in range(rounds):
    for name in (list(parts) if r % 2 == 0 else list(parts)[::-1]):
      start = time.perf_counter()
      parts[name](r + 1)
      times[name].append(time.perf_counter() - start)
  ratios = [o / s for o, s in zip(times["oneshot"], times["stream"])]
  counts = batcher.sampler.step_token_counts(budget)
  return {"stream_throughput_ratio": round(statistics.median(ratios), 3),
          "stream_throughput_ratio_per_round": [round(x, 3) for x in ratios],
          "in_process_s": {name: round(statistics.median(v), 4) for name, v in times.items()},
          "in_process_rounds_s": {name: [round(x, 4) for x in v] for name, v in times.items()},
          "cli_images_per_s": round(batcher.max_batch / min(times["oneshot"]), 3),
          "previews": [counts[s - 1] for s in steps]}


def over_http(app, cfg_scale: float, rounds: int) -> dict:
  """Latency and 8-client throughput through the page's API with gradio_client."""
  from gradio_client import Client
  batcher = app.batcher
  budget = batcher.config.block_size
  port = free_port()
  page = app.launch(port=port, server_name="127.0.0.1", prevent_thread_lock=True)
  client = Client(f"http://127.0.0.1:{port}/", verbose=False)
  first_preview, final = {}, {}
  for n in (1, 8):
    times = [timed_request(client, n, 10 + r, cfg_scale, budget) for r in range(rounds)]
    first_preview[str(n)] = round(min(t[0] for t in times), 4)
    final[str(n)] = round(min(t[1] for t in times), 4)
  rates, calls = [], []
  for r in range(rounds):
    before = batcher.sampler_calls
    jobs = [None] * 8
    start = time.perf_counter()

    def submit(i, r=r):
      jobs[i] = client.submit(*controls(1, 100 * r + i, cfg_scale, budget), api_name="/generate")

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    for job in jobs:
      job.result()
    rates.append(8 / (time.perf_counter() - start))
    calls.append(batcher.sampler_calls - before)
  client.close()
  with contextlib.redirect_stdout(sys.stderr):  # Gradio says it closes: stdout is the JSON alone
    page.close()
  return {"first_preview_s": first_preview, "final_s": final, "images_per_s": round(max(rates), 3),
          "sampler_calls_per_8_clients": calls}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  models = parser.add_mutually_exclusive_group()
  models.add_argument("--quick", action="store_true", help="the test fixture's tiny models")
  models.add_argument("--random-models", action="store_true",
                      help="GPT-B + a DetailFlow-16 decoder, random weights")
  parser.add_argument("--tokenizer", default=None)
  parser.add_argument("--gpt", default=None)
  parser.add_argument("--previews", type=app_cli.preview_count, default=app_cli.DEFAULT_PREVIEWS,
                      help="as the app's --previews")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--cfg-scale", type=float, default=1.5)
  args = parser.parse_args(argv)
  if (args.tokenizer is None) != (args.gpt is None) or (args.tokenizer and (args.quick or args.random_models)):
    parser.error("pass --tokenizer and --gpt together, and not with --quick / --random-models")

  loads = [load()]
  tmp = tempfile.TemporaryDirectory(prefix="bench-app-")
  start = time.perf_counter()
  if args.random_models:
    gpt, tokenizer = random_models()
    names = {"tokenizer": "random DetailFlow-16 decoder", "gpt": "random GPT-B"}
    app = app_cli.build_from_models(gpt, tokenizer, names["tokenizer"], names["gpt"], max_batch=8,
                                    previews=args.previews)
  else:
    if args.quick:
      tokenizer_src, gpt_src = fixture_models(pathlib.Path(tmp.name))
    elif args.tokenizer:
      tokenizer_src, gpt_src = args.tokenizer, args.gpt
    else:
      tokenizer_src, gpt_src = app_cli.DEMO_MODELS["tokenizer"], app_cli.DEMO_MODELS["gpt"]
      if not all(pathlib.Path(p).is_dir() for p in (tokenizer_src, gpt_src)):
        print(app_cli.NO_MODELS_HINT, file=sys.stderr)
        return 2
    names = {"tokenizer": str(tokenizer_src), "gpt": str(gpt_src)}
    app = app_cli.build(tokenizer_src, gpt_src, max_batch=8, previews=args.previews)
  warm_up_s = time.perf_counter() - start
  loads.append(load())
  local = in_process(app.batcher, args.cfg_scale, args.rounds)
  loads.append(load())
  http = over_http(app, args.cfg_scale, args.rounds)
  loads.append(load())
  print(json.dumps({
      **{k: http[k] for k in ("first_preview_s", "final_s", "images_per_s")},
      "cli_images_per_s": local["cli_images_per_s"],
      "throughput_ratio": round(http["images_per_s"] / local["cli_images_per_s"], 3),
      **{k: v for k, v in local.items() if k != "cli_images_per_s"},
      "sampler_calls_per_8_clients": http["sampler_calls_per_8_clients"],
      "previews_flag": "all" if args.previews is None else args.previews, "rounds": args.rounds,
      "tokens": app.batcher.config.block_size, "cfg_scale": args.cfg_scale, "warm_up_s": round(warm_up_s, 1),
      "loadavg": loads, "device": str(jax.devices()[0]), "models": names}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
