"""The PyTorch side of benchmarks/vs_reference.py: runs under the reference's Python.

python benchmarks/reference_worker.py --reference-dir DIR --out RUNS --spec JSON
python benchmarks/reference_worker.py --reference-dir DIR --spec JSON --time-generation

Imports the reference (ByteFlow-AI/DetailFlow) from DIR at run time, builds its GPT and
tokenizer with seeded random weights, writes each as a run directory the reference's loaders
and our converters read (RUNS/gpt, RUNS/tokenizer: config.json, config.yaml,
checkpoints/*.safetensors; the tokenizer only when the spec has a "decode" entry), prints
{"ready": ...} and then answers one JSON line per command
read from stdin ("sampler" / "decode" -> seconds of one call; "quit"). Everything the
reference prints goes to stderr so stdout carries only the protocol.

This file never imports detailflow_jax (the reference's Python does not have JAX).
"""
import argparse
import importlib.machinery
import importlib.util
import json
import os
import pathlib
import sys
import time
import types


def expose_reference(reference_dir: str) -> None:
  """Puts the reference tree on sys.path and exposes timm's weight_init alone (the reference
  uses only timm.layers.trunc_normal_; timm's package import needs torchvision)."""
  sys.path.insert(0, str(pathlib.Path(reference_dir).resolve()))
  spec = importlib.util.find_spec("timm")
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit("reference python has no timm installed (pip install timm)")
  root = pathlib.Path(list(spec.submodule_search_locations)[0])
  timm = types.ModuleType("timm")
  timm.__path__ = [str(root)]
  timm.__spec__ = importlib.machinery.ModuleSpec("timm", None, is_package=True)
  layers = types.ModuleType("timm.layers")
  layers.__path__ = [str(root / "layers")]
  layers.__spec__ = importlib.machinery.ModuleSpec("timm.layers", None, is_package=True)
  sys.modules["timm"], sys.modules["timm.layers"] = timm, layers
  weight_init = importlib.import_module("timm.layers.weight_init")
  layers.trunc_normal_ = weight_init.trunc_normal_
  timm.layers = layers


# SigLIP2-so400m-patch16-naflex vision fields the reference reads from $CACHE_DATA_PATH (the
# decoder's non-pretrained path takes num_patches / patch size / eps / activation from it).
SO400M_VISION = {"model_type": "siglip2_vision_model", "hidden_size": 1152,
                 "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                 "num_channels": 3, "num_patches": 256, "patch_size": 16,
                 "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
                 "attention_dropout": 0.0}


def randomize(module, seed: int, std: float = 0.02) -> None:
  """Every parameter drawn from a seeded generator: norm weights 1, the rest N(0, std)
  (the output layer too: the reference zero-initialises it and its logits would be flat)."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.fill_(1.0)
      else:
        p.copy_(torch.randn(p.shape, generator=gen) * std)


def write_run(run_dir: pathlib.Path, module, config_json: dict, config_yaml: dict, name: str):
  import yaml
  from safetensors.torch import save_file
  (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
  (run_dir / "config.json").write_text(json.dumps(config_json, indent=1))
  (run_dir / "config.yaml").write_text(yaml.safe_dump(config_yaml))
  state = {k: v.contiguous() for k, v in module.state_dict().items()}
  save_file(state, str(run_dir / "checkpoints" / f"{name}.safetensors"))


def random_gpt(spec: dict):
  """The reference's c2i Transformer (a GPT_models preset, or spec["gpt_dims"]) with seeded
  random weights, in eval mode."""
  from autoregressive.models.gpt import GPT_models, ModelArgs, Transformer
  kw = dict(vocab_size=spec["vocab_size"], block_size=spec["tokens"],
            group_size=spec["group_size"], num_classes=spec["num_classes"], cls_token_num=1,
            model_type="c2i", class_dropout_prob=0.1)
  name = spec["gpt_model"]
  if name in GPT_models:
    model = GPT_models[name](**kw)
  else:
    model = Transformer(ModelArgs(**spec["gpt_dims"], **kw))
  randomize(model, seed=spec["seed"])
  return model.eval()


def build_gpt(spec: dict, run_dir: pathlib.Path):
  model = random_gpt(spec)
  config_yaml = {"gpt_model": spec["gpt_model"], "gpt_type": "c2i"}
  if spec.get("gpt_dims"):  # not a GPT_models preset
    config_yaml["gpt_model_dims"] = spec["gpt_dims"]
  write_run(run_dir, model, dict(model.config.__dict__), config_yaml, "gpt")
  return model


def time_generation(spec: dict) -> dict:
  """generate_group_par on spec["device"] under bf16 autocast (or float32), optionally through
  torch.compile: seconds of the first call (compiles) and the best of spec["repeats"] after,
  per batch size."""
  import torch
  from autoregressive.models.generate import generate_group_par
  device = spec.get("device", "cuda" if torch.cuda.is_available() else "cpu")
  model = random_gpt(spec).to(device)
  if spec.get("compile"):
    model = torch.compile(model)  # attribute reads (group_size, ...) pass through
  dtype = {"bfloat16": torch.bfloat16, "float32": None}[spec.get("dtype", "bfloat16")]
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  runs = []
  for batch in spec["batches"]:
    labels = torch.arange(batch, device=device) % spec["num_classes"]

    def call():
      with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
        out = generate_group_par(model, labels, spec["tokens"], cfg_scale=spec["cfg_scale"],
                                 temperature=1.0, top_k=0, top_p=1.0, sample_logits=True)
      sync()
      return out

    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(spec.get("repeats", 2)):
      start = time.perf_counter()
      call()
      best = min(best, time.perf_counter() - start)
    runs.append({"batch": batch, "first_call_s": first, "seconds_per_call": best,
                 "images_per_s": batch / best})
  return {"device": device, "compile": bool(spec.get("compile")), "tokens": spec["tokens"],
          "dtype": spec.get("dtype", "bfloat16"), "gpt_model": spec["gpt_model"], "runs": runs,
          "torch": torch.__version__}


def build_tokenizer(spec: dict, run_dir: pathlib.Path, cache_dir: pathlib.Path):
  """A VQ-16 VQModel with the DetailFlow-16 decoder (siglip2_base, not pretrained: 768 wide,
  12 layers, 12 heads). The encoder is the same builder's non-pretrained 768-wide tower (the
  released so400m-wide encoder needs SigLIP2 weights and plays no part in decoding)."""
  siglip_dir = cache_dir / "siglip2-so400m-patch16-naflex"
  siglip_dir.mkdir(parents=True, exist_ok=True)
  (siglip_dir / "config.json").write_text(json.dumps(SO400M_VISION))
  os.environ["CACHE_DATA_PATH"] = str(cache_dir)
  from modelling.tokenizer import VQ_models
  args = dict(image_size=256, max_image_size=256, codebook_size=spec["codebook_size"],
              codebook_embed_dim=8, codebook_l2_norm=True, codebook_show_usage=True,
              enc_type="siglip2", dec_type="siglip2", encoder_model="siglip2_base",
              decoder_model="siglip2_base", num_latent_tokens=spec["codes"],
              enc_pretrained=False, dec_pretrained=False, enc_patch_size=16, dec_patch_size=16,
              causal_encoder=True, causal_decoder=False, group_size=8, causal_num=None,
              global_token_loss_weight=0.0, correction_training=True, repa=False)
  model = VQ_models["VQ-16"](**args)
  randomize(model, seed=spec["seed"] + 1)
  model.eval()
  config_json = dict(model.config.__dict__)
  config_yaml = {"vq_model": "VQ-16", "image_size": 256, "max_image_size": 256,
                 "min_image_size": 256, "degradation_power": 1.5}
  write_run(run_dir, model, config_json, config_yaml, "tokenizer")
  return model


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--reference-dir", required=True)
  parser.add_argument("--out", default=None, help="where the run directories go")
  parser.add_argument("--spec", required=True, help="workload JSON (from vs_reference.py)")
  parser.add_argument("--time-generation", action="store_true",
                      help="print time_generation(spec) as one JSON line and exit "
                           "(benchmarks/accelerator.py)")
  args = parser.parse_args(argv)
  spec = json.loads(args.spec)
  if args.time_generation:
    protocol = sys.stdout
    sys.stdout = sys.stderr
    expose_reference(args.reference_dir)
    import torch
    torch.set_grad_enabled(False)
    protocol.write(json.dumps(time_generation(spec)) + "\n")
    return

  protocol = sys.stdout
  sys.stdout = sys.stderr  # generate_group_par prints progress lines

  def reply(obj):
    protocol.write(json.dumps(obj) + "\n")
    protocol.flush()

  if args.out is None:
    parser.error("--out is required (unless --time-generation)")
  expose_reference(args.reference_dir)
  import torch
  from autoregressive.models.generate import generate_group_par
  torch.set_grad_enabled(False)
  out = pathlib.Path(args.out)
  gpt = build_gpt(spec["sampler"], out / "gpt")
  s = spec["sampler"]
  labels = torch.arange(s["batch"]) % s["num_classes"]

  def sampler():
    return generate_group_par(gpt, labels, s["tokens"], cfg_scale=s["cfg_scale"],
                              temperature=1.0, top_k=0, top_p=1.0, sample_logits=True)

  calls = {"sampler": sampler}
  if "decode" in spec:  # benchmarks/latency.py times the GPT alone and sends no decode spec
    d = spec["decode"]
    tok = build_tokenizer(d, out / "tokenizer", out / "cache_data")
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, d["codebook_size"], (d["batch"], d["codes"]), generator=gen)
    calls["decode"] = lambda: tok.decode_code(codes, t=None, img_size=d["image_size"])
  reply({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads()})
  for line in sys.stdin:
    cmd = line.strip()
    if cmd == "quit":
      break
    start, cpu = time.perf_counter(), time.process_time()
    result = calls[cmd]()
    reply({"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
           "shape": list(result.shape)})


if __name__ == "__main__":
  main()
