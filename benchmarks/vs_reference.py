"""Side by side with the PyTorch reference on this machine: sampler and tokenizer decode.

python -m benchmarks.vs_reference [--quick] --reference-dir DIR --reference-python PY
  ->  one JSON object: per-round seconds of both sides, per-round ratios (reference / ours),
      the ratio of medians, targets, load averages, and each side's matmul rate.

Workloads (float32, random weights, one process per side, rounds alternate which side runs
first so drifting machine load hits both):
  sampler: GPT-B, 128 tokens, group 8, CFG 1.5, batch 8 -- the reference's generate_group_par
           (it re-runs the whole prefix per step) vs our KV-cache Sampler;
  decode:  DetailFlow-16 decoder (VQ-16, siglip2_base), 128 codes -> 256 px, batch 8 -- the
           reference's VQModel.decode_code vs our decode_indices.
The reference side (benchmarks/reference_worker.py) imports the reference from DIR under PY,
builds both models with seeded random weights and writes them as run directories; our side
converts those very files with detailflow_jax.convert, so both run the same weights.
Without --reference-dir / --reference-python (or with a missing one) it prints
{"skipped": true, "reason": ...} and exits 0.
--quick: a 2-layer 128-wide GPT at 32 tokens batch 2, decode of 32 codes to 64 px batch 1,
two rounds.
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

import jax  # noqa: E402  (after the path insert)
import numpy as np  # noqa: E402

from benchmarks.common import add_side_by_side_flags, matmul_flops_per_s  # noqa: E402
from detailflow_jax.convert import gpt as gpt_convert  # noqa: E402
from detailflow_jax.convert import tokenizer as tok_convert  # noqa: E402
from detailflow_jax.convert.common import load_state_dict  # noqa: E402
from detailflow_jax.inference.sampler import Sampler, SamplingOptions, sampling_flops  # noqa: E402
from detailflow_jax.inference.tokenizer import TokenizerFns  # noqa: E402
from detailflow_jax.models.gpt import GPTConfig  # noqa: E402

TARGETS = {"sampler": 7.8, "decode": 1.0}


def workload(quick: bool) -> dict:
  if quick:
    sampler = dict(gpt_model="GPT-quick", gpt_dims=dict(dim=128, n_layer=2, n_head=4),
                   tokens=32, batch=2)
    decode = dict(codes=32, image_size=64, batch=1)
  else:
    sampler = dict(gpt_model="GPT-B", tokens=128, batch=8)
    decode = dict(codes=128, image_size=256, batch=8)
  sampler.update(vocab_size=8192, group_size=8, num_classes=1000, cfg_scale=1.5, seed=0)
  decode.update(codebook_size=8192, seed=0)
  return {"sampler": sampler, "decode": decode}


def checkpoint_in(run_dir: pathlib.Path) -> pathlib.Path:
  files = sorted(p for p in (run_dir / "checkpoints").iterdir()
                 if p.suffix in (".safetensors", ".pt"))
  if not files:
    raise FileNotFoundError(f"no .safetensors/.pt checkpoint under {run_dir / 'checkpoints'}")
  return files[0]


class OurSide:
  """Our models converted from the reference's run directories, jitted and warmed up."""

  def __init__(self, runs: pathlib.Path, spec: dict):

    s, d = spec["sampler"], spec["decode"]
    gpt_cfg = gpt_convert.load_reference_config(runs / "gpt")
    gpt_ckpt = checkpoint_in(runs / "gpt")
    gpt = gpt_convert.convert_state_dict(gpt_cfg, load_state_dict(gpt_ckpt), str(gpt_ckpt))
    tok_cfg = tok_convert.load_reference_config(runs / "tokenizer")
    tok_ckpt = checkpoint_in(runs / "tokenizer")
    tok = tok_convert.convert_state_dict(tok_cfg, load_state_dict(tok_ckpt), str(tok_ckpt))

    self.sampler = Sampler(gpt)
    self.params = self.sampler.prepare_weights(gpt)  # what sample / generate run: cast and laid out once
    self.labels = jax.numpy.arange(s["batch"]) % gpt_cfg.num_classes
    self.options = SamplingOptions(cfg_scale=s["cfg_scale"], temperature=1.0, top_k=0, top_p=1.0)
    self.tokens = min(s["tokens"], gpt_cfg.block_size)
    self.fns = TokenizerFns(tok)
    rng = np.random.default_rng(0)
    self.codes = rng.integers(0, tok_cfg.codebook_size, (d["batch"], min(d["codes"], tok_cfg.num_latent_tokens)))
    self.image_size = d["image_size"]
    self.round = 0
    start = time.perf_counter()
    self.sampler.precompile(self.params, self.labels, self.options)
    jax.block_until_ready(self.fns.decode(self.codes, image_size=self.image_size))
    self.compile_s = time.perf_counter() - start
    self.decode_flops = decode_flops(tok_cfg, d["batch"], self.codes.shape[1], self.image_size)

  def sampler_call(self):
    self.round += 1
    return self.sampler.sample(self.params, self.labels, jax.random.key(self.round), self.options,
                               num_tokens=self.tokens)

  def decode_call(self):
    return self.fns.decode(self.codes, image_size=self.image_size)

  def run(self, name: str) -> dict:
    call = {"sampler": self.sampler_call, "decode": self.decode_call}[name]
    start, cpu = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(call())
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
            "shape": list(out.shape)}


def decode_flops(cfg, batch: int, codes: int, image_size: int) -> float:
  """Matmul FLOPs of one decode: post_quant_conv, the decoder layers over patches + codes
  (projections, MLP, full attention), to_pixel."""
  vit = cfg.decoder
  h, grid = vit.hidden_size, image_size // vit.patch_size
  n = grid * grid + codes
  per_layer = 2 * n * (4 * h * h + 2 * h * vit.mlp_dim) + 4 * n * n * h
  head = 2 * grid * grid * h * vit.num_channels * vit.patch_size ** 2
  return float(batch * (vit.num_layers * per_layer + head + 2 * codes * cfg.codebook_embed_dim * h))


def serve_ours(runs: str, spec: dict) -> None:
  """Our worker process: builds OurSide, then answers one JSON line per stdin command."""
  protocol = sys.stdout
  sys.stdout = sys.stderr
  side = OurSide(pathlib.Path(runs), spec)
  assert side.sampler.trace_count == 1
  protocol.write(json.dumps({"ready": True, "compile_s": side.compile_s,
                             "decode_flops": side.decode_flops,
                             "jax": jax.__version__}) + "\n")
  protocol.flush()
  for line in sys.stdin:
    cmd = line.strip()
    if cmd == "quit":
      break
    if cmd == "matmul":
      result = {"gflop_per_s": matmul_flops_per_s(n=2048) / 1e9}
    else:
      result = side.run(cmd)
    protocol.write(json.dumps(result) + "\n")
    protocol.flush()
  if side.sampler.trace_count != 1:
    raise SystemExit("our sampler recompiled during the rounds")


class Worker:
  """A child process speaking the one-JSON-line-per-command protocol."""

  def __init__(self, name: str, cmd, env=None):
    self.name = name
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE if os.environ.get("VS_REF_QUIET") else None,
                                 text=True, env=env)
    self.ready = self._read()

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      rc = self.proc.wait()
      err = self.proc.stderr.read()[-2000:] if self.proc.stderr else ""
      raise RuntimeError(f"{self.name} worker exited (rc={rc}) {err}")
    return json.loads(line)

  def ask(self, cmd: str) -> dict:
    self.proc.stdin.write(cmd + "\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self):
    if self.proc.poll() is None:
      self.proc.stdin.write("quit\n")
      self.proc.stdin.flush()
      self.proc.wait(timeout=60)


def torch_matmul_gflops(python: str) -> float:
  """Best-of-5 float32 2048^3 matmul in the reference's torch (the same size as ours)."""
  code = ("import time,torch\na=torch.randn(2048,2048);b=torch.randn(2048,2048);a@b\nbest=1e9\n"
          "for _ in range(5):\n t=time.perf_counter();a@b;best=min(best,time.perf_counter()-t)\n"
          "print(2*2048**3/best/1e9)")
  out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True)
  return float(out.stdout.strip().splitlines()[-1])


def reference_sampler_flops(cfg, batch: int, tokens: int) -> float:
  """Matmul FLOPs of generate_group_par: every step re-runs the whole prefix (logits for
  every position, full L x L attention scores under the mask)."""
  rows = 2 * batch
  g, c = cfg.group_size, cfg.causal_len
  hd = cfg.head_dim
  per_position = 2 * (cfg.dim * (cfg.n_head + 2 * cfg.num_kv_heads) * hd + cfg.dim * cfg.dim
                      + 3 * cfg.dim * cfg.ffn_hidden) * cfg.n_layer + 2 * cfg.dim * cfg.vocab_size
  per_query_key = 4 * cfg.n_head * hd * cfg.n_layer
  lengths = [1 + k for k in range(c)] + [1 + i * g + g - 1 for i in range(c // g, tokens // g)]
  return float(rows * sum(n * per_position + n * n * per_query_key for n in lengths))


def skip(reason: str) -> int:
  print(json.dumps({"skipped": True, "reason": reason}))
  print(f"vs_reference: skipped: {reason}", file=sys.stderr)
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_side_by_side_flags(parser)
  parser.add_argument("--only", choices=["sampler", "decode"], default=None,
                      help="time one workload (both are built either way)")
  parser.add_argument("--serve-ours", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--spec", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.serve_ours:
    serve_ours(args.serve_ours, json.loads(args.spec))
    return 0
  if not args.reference_dir or not args.reference_python:
    return skip("needs --reference-dir (the DetailFlow tree) and --reference-python (a torch env)")
  ref_dir = pathlib.Path(args.reference_dir)
  if not (ref_dir / "autoregressive" / "models" / "generate.py").is_file():
    return skip(f"{ref_dir} is not a DetailFlow tree (no autoregressive/models/generate.py)")
  if not os.access(args.reference_python, os.X_OK):
    return skip(f"reference python {args.reference_python} is not an executable")

  spec = workload(args.quick)
  rounds = args.rounds or (2 if args.quick else 4)
  with tempfile.TemporaryDirectory(prefix="vs_reference_") as tmp:
    start = time.perf_counter()
    ref = Worker("reference", [args.reference_python, str(ROOT / "benchmarks" / "reference_worker.py"),
                               "--reference-dir", str(ref_dir), "--out", tmp,
                               "--spec", json.dumps(spec)])
    ref_build_s = time.perf_counter() - start
    ours = Worker("ours", [sys.executable, "-m", "benchmarks.vs_reference", "--serve-ours", tmp,
                           "--spec", json.dumps(spec)])
    try:
      # One untimed call per side and workload: first-call allocations are not the rate.
      names = [args.only] if args.only else ["sampler", "decode"]
      for w in (ref, ours):
        for name in names:
          w.ask(name)
      per_round = {name: {"reference": [], "ours": [], "reference_cpu": [], "ours_cpu": []}
                   for name in names}
      loads = [os.getloadavg()]
      for r in range(rounds):
        order = (ref, ours) if r % 2 == 0 else (ours, ref)
        for name in names:
          for w in order:
            res = w.ask(name)
            per_round[name][w.name].append(res["seconds"])
            per_round[name][w.name + "_cpu"].append(res["cpu_seconds"])
        loads.append(os.getloadavg())
      our_matmul = ours.ask("matmul")["gflop_per_s"]
    finally:
      for w in (ref, ours):
        w.close()
  torch_matmul = torch_matmul_gflops(args.reference_python)

  s = spec["sampler"]
  dims = s.get("gpt_dims") or {}
  gpt_cfg = (GPTConfig.preset(s["gpt_model"], vocab_size=s["vocab_size"], block_size=s["tokens"],
                              group_size=s["group_size"], num_classes=s["num_classes"])
             if not dims else
             GPTConfig(**dims, vocab_size=s["vocab_size"], block_size=s["tokens"],
                       group_size=s["group_size"], num_classes=s["num_classes"]))
  flops = {"sampler_ours": sampling_flops(gpt_cfg, s["batch"], s["tokens"], guidance=True),
           "sampler_reference": reference_sampler_flops(gpt_cfg, s["batch"], s["tokens"])}

  result = {"workload": spec, "rounds": rounds, "quick": args.quick}
  for name, times in per_round.items():
    ratios = [a / b for a, b in zip(times["reference"], times["ours"])]
    med_ref, med_ours = statistics.median(times["reference"]), statistics.median(times["ours"])
    result[name] = dict(
        reference_s=times["reference"], ours_s=times["ours"],
        reference_cpu_s=times["reference_cpu"], ours_cpu_s=times["ours_cpu"],
        ratio_per_round=ratios, ratio_of_medians=med_ref / med_ours,
        ratio_of_best=min(times["reference"]) / min(times["ours"]),
        # CPU seconds: less sensitive to other jobs on a shared machine than wall time.
        cpu_ratio_of_medians=(statistics.median(times["reference_cpu"])
                              / statistics.median(times["ours_cpu"])),
        target=TARGETS[name], meets_target=med_ref / med_ours >= TARGETS[name])
  call_flops = {"sampler": (flops["sampler_ours"], flops["sampler_reference"]),
                "decode": (ours.ready["decode_flops"],) * 2}
  for name in names:
    ours_flops, ref_flops = call_flops[name]
    result[name].update(
        ours_gflops_per_call=ours_flops / 1e9, reference_gflops_per_call=ref_flops / 1e9,
        ours_fraction_of_matmul_rate=ours_flops / min(per_round[name]["ours"]) / (our_matmul * 1e9),
        reference_fraction_of_matmul_rate=(ref_flops / min(per_round[name]["reference"])
                                           / (torch_matmul * 1e9)))
  if "sampler" in result:
    result["sampler"]["flop_ratio_reference_over_ours"] = (flops["sampler_reference"]
                                                           / flops["sampler_ours"])
  result.update(matmul_gflop_per_s={"jax": our_matmul, "torch": torch_matmul},
                loadavg=loads, ours_compile_s=ours.ready["compile_s"],
                reference_build_s=ref_build_s, torch=ref.ready["torch"],
                torch_threads=ref.ready["threads"], jax=ours.ready["jax"],
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                note="CPU, float32; ratios are reference seconds / ours within this run")
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
