"""Initialisation statistics of the reference's tokenizer (golden for tests/test_training_parity.py).

Builds the reference's `VQModel` from scratch for the configuration of a tokenizer training run
directory (config.json = VQ ModelArgs, config.yaml's `fixture_builder` block for the tiny tower
sizes the reference's builders hard-code, SigLIP2 config and weights in the run's cache_data as
$CACHE_DATA_PATH), under `--seeds` torch seeds, and writes per tensor family (state-dict names
with the layer index replaced by `*`), pooled over layers and seeds: count, mean, std and
kurtosis (the 4th standardised moment, which tells uniform from normal draws of equal std).
Families whose values come from the SigLIP2 file (the pretrained encoder tower, the frozen
teacher) are marked `from_file`: they are loaded, not initialised. Needs the PyTorch reference
tree (ByteFlow-AI/DetailFlow) and a Python with torch, transformers and timm (only timm's
weight_init is imported).

  /work/refvenv/bin/python tests/scripts/make_tokenizer_init_stats.py --ref /work/ref \
      --run tests/fixtures/detailflow_tiny_a/training/tokenizer --seeds 4 \
      --out tests/fixtures/detailflow_tiny_a/tokenizer_init_stats.json
"""
import argparse
import json
import os
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from reference_worker import expose_reference  # noqa: E402


def family(name: str) -> str:
  return re.sub(r"\.layers\.\d+\.", ".layers.*.", name)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--ref", required=True, help="reference tree (ByteFlow-AI/DetailFlow)")
  p.add_argument("--run", required=True, help="tokenizer run directory with config.json / config.yaml")
  p.add_argument("--seeds", type=int, default=4)
  p.add_argument("--out", required=True)
  a = p.parse_args(argv)
  run = pathlib.Path(a.run).resolve()
  expose_reference(a.ref)
  import torch
  import yaml
  from modelling import tokenizer as ref_tokenizer
  from modelling.modules.siglip2_vit import SiglipDecoder, SiglipEncoder

  config = json.loads((run / "config.json").read_text())
  fixture = yaml.safe_load((run / "config.yaml").read_text()).get("fixture_builder") or {}
  siglip_config = run / fixture.get("siglip2_config", "../cache_data/siglip2-so400m-patch16-naflex/config.json")
  os.environ["CACHE_DATA_PATH"] = str(siglip_config.resolve().parent.parent)

  # The builders' hard-coded sizes, replaced by the fixture's (as the goldens were made).
  def tower_kwargs(side):
    kw = dict(fixture.get(side, {}))
    kw.pop("intermediate_size", None)  # CustomSiglip2VisionModel uses 4 * embed_dim regardless
    return kw

  if fixture.get("encoder"):
    def build_encoder(config, num_latent_tokens, group_size):
      kw = tower_kwargs("encoder")
      return SiglipEncoder(pretrained=kw.pop("pretrained", config.enc_pretrained), num_latent_tokens=num_latent_tokens,
                           patch_size=config.enc_patch_size, causal_mode=config.causal_encoder,
                           group_size=group_size, causal_num=config.causal_num, **kw)
    ref_tokenizer.build_encoder = build_encoder
  if fixture.get("decoder"):
    def build_decoder(config, num_latent_tokens, group_size, repa_layer_indices):
      kw = tower_kwargs("decoder")
      return SiglipDecoder(pretrained=kw.pop("pretrained", config.dec_pretrained), num_latent_tokens=num_latent_tokens,
                           patch_size=config.dec_patch_size, causal_mode=config.causal_decoder,
                           max_image_size=config.max_image_size, group_size=group_size,
                           repa_layer=repa_layer_indices, causal_num=config.causal_num, **kw)
    ref_tokenizer.build_decoder = build_decoder
  if fixture.get("global_token_hidden"):
    build_mlp = ref_tokenizer.build_mlp
    ref_tokenizer.build_mlp = lambda din, hidden, dout: build_mlp(
        din, fixture["global_token_hidden"] if hidden == 1024 else hidden, dout)

  sums, first, from_file = {}, {}, {}
  for seed in range(a.seeds):
    torch.manual_seed(seed)
    model = ref_tokenizer.VQModel(ref_tokenizer.ModelArgs(**config))
    for name, value in model.state_dict().items():
      x = value.detach().double().reshape(-1)
      fam = family(name)
      s = sums.setdefault(fam, [0, 0.0, 0.0, 0.0, 0.0])
      s[0] += x.numel()
      for k in range(1, 5):
        s[k] += float((x ** k).sum())
      # From the file: the same (non-constant) values whatever the seed.
      if seed == 0:
        first[name] = x.clone()
      else:
        same = bool(torch.equal(first[name], x)) and bool(x.numel() > 1 and x.std() > 0)
        from_file[fam] = from_file.get(fam, True) and same
  stats = {}
  for name, (n, s1, s2, s3, s4) in sorted(sums.items()):
    mean = s1 / n
    var = max(s2 / n - mean * mean, 0.0)
    central4 = s4 / n - 4 * mean * s3 / n + 6 * mean ** 2 * s2 / n - 3 * mean ** 4
    stats[name] = {"count": n, "mean": mean, "std": var ** 0.5,
                   "kurtosis": central4 / var ** 2 if var > 0 else 0.0,
                   "from_file": bool(from_file.get(name, False))}
  out = {"source": "reference modelling/tokenizer.py VQModel(ModelArgs(**config.json)) with the fixture_builder "
                   f"tower sizes, torch {torch.__version__}, seeds 0..{a.seeds - 1}, pooled over layers and seeds",
         "run": os.path.relpath(run, ROOT), "seeds": a.seeds, "families": stats}
  pathlib.Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
  for name, s in stats.items():
    print(f"{name:70s} n={s['count']:7d} mean={s['mean']:+.5f} std={s['std']:.5f} kurt={s['kurtosis']:.3f}"
          f"{' (file)' if s['from_file'] else ''}")


if __name__ == "__main__":
  main()
