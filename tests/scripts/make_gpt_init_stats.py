"""Initialisation statistics of the reference's GPT (golden for tests/test_training_parity.py).

Builds the reference's `Transformer` from-scratch (its __init__: `initialize_weights`, then the
special-token embedding, which keeps nn.Embedding's own N(0, 1) init) for the configuration in
a GPT run directory's config.json, under `--seeds` torch seeds, and writes the mean / std / count
of every tensor family (state-dict names with the layer index replaced by `*`), pooled over
layers and seeds, as JSON. Needs the PyTorch reference tree (ByteFlow-AI/DetailFlow) and a
Python with torch; timm is not needed (the reference imports only `trunc_normal_`, not used by
the GPT: a stand-in is installed).

  /work/refvenv/bin/python tests/scripts/make_gpt_init_stats.py --ref /tmp/ref \
      --run tests/fixtures/detailflow_tiny_a/gpt --seeds 16 \
      --out tests/fixtures/detailflow_tiny_a/gpt_init_stats.json
"""
import argparse
import json
import pathlib
import re
import sys
import types


def family(name: str) -> str:
  return re.sub(r"^layers\.\d+\.", "layers.*.", name)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--ref", required=True, help="reference tree (ByteFlow-AI/DetailFlow)")
  p.add_argument("--run", required=True, help="GPT run directory with config.json")
  p.add_argument("--seeds", type=int, default=16)
  p.add_argument("--out", required=True)
  a = p.parse_args(argv)
  sys.path.insert(0, str(pathlib.Path(a.ref).resolve()))
  # timm's package import needs torchvision; the GPT module only imports trunc_normal_.
  timm = types.ModuleType("timm")
  timm.layers = types.ModuleType("timm.layers")
  timm.layers.trunc_normal_ = lambda *args, **kw: None
  sys.modules.update({"timm": timm, "timm.layers": timm.layers})
  import torch
  from autoregressive.models.gpt import ModelArgs, Transformer

  config = json.loads((pathlib.Path(a.run) / "config.json").read_text())
  sums = {}
  for seed in range(a.seeds):
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**config))
    for name, value in model.state_dict().items():
      x = value.detach().double().reshape(-1)
      s = sums.setdefault(family(name), [0, 0.0, 0.0])
      s[0] += x.numel()
      s[1] += float(x.sum())
      s[2] += float((x * x).sum())
  stats = {}
  for name, (n, total, squares) in sorted(sums.items()):
    mean = total / n
    stats[name] = {"count": n, "mean": mean, "std": max(squares / n - mean * mean, 0.0) ** 0.5}
  out = {"source": "reference autoregressive/models/gpt.py Transformer(ModelArgs(**config.json)), "
                   f"torch {torch.__version__}, seeds 0..{a.seeds - 1}, pooled over layers and seeds",
         "config": config, "seeds": a.seeds, "families": stats}
  pathlib.Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
  for name, s in stats.items():
    print(f"{name:50s} n={s['count']:7d} mean={s['mean']:+.5f} std={s['std']:.5f}")


if __name__ == "__main__":
  main()
