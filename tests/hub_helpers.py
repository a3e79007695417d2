"""A Hugging Face Hub cache built on disk exactly as `huggingface_hub` lays one out, holding the
fixture runs under the released repo names, so Hub ids resolve with HF_HUB_OFFLINE=1."""
import hashlib
import io
import os
import pathlib

from conftest import TINY

TOKENIZER_REPO = "ByteFlow-AI/DetailFlow-16"
GPT_REPO = "ByteFlow-AI/DetailFlow-16-GPT-L"
_SIGLIP = "cache_data/siglip2-so400m-patch16-naflex/config.json"


def add_snapshot(hub_cache: pathlib.Path, repo: str, files: dict[str, bytes | pathlib.Path],
                 ref: str | None = "main", commit: str | None = None) -> str:
  """models--org--name/{blobs/<sha256>, snapshots/<commit>/<path> -> ../../blobs/..., refs/<ref>};
  returns the commit hash (40 hex digits, derived from the contents unless given)."""
  contents = {name: (data.read_bytes() if isinstance(data, pathlib.Path) else data)
              for name, data in files.items()}
  if commit is None:
    digest = hashlib.sha1()
    for name in sorted(contents):
      digest.update(name.encode() + hashlib.sha256(contents[name]).digest())
    commit = digest.hexdigest()
  storage = hub_cache / ("models--" + repo.replace("/", "--"))
  (storage / "blobs").mkdir(parents=True, exist_ok=True)
  for name, data in contents.items():
    blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
    if not blob.exists():
      blob.write_bytes(data)
    link = storage / "snapshots" / commit / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
  if ref:
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / ref).write_text(commit)
  return commit


def tokenizer_files() -> dict[str, bytes | pathlib.Path]:
  """The fixture tokenizer run; its fixture-only SigLIP2 config moves inside the repo."""
  yaml_text = (TINY / "tokenizer" / "config.yaml").read_text()
  yaml_text = yaml_text.replace("../" + _SIGLIP, _SIGLIP)
  return {"config.json": TINY / "tokenizer" / "config.json", "config.yaml": yaml_text.encode(),
          _SIGLIP: TINY / _SIGLIP, "checkpoints/tokenizer.pt": TINY / "tokenizer" / "checkpoints" / "tokenizer.pt"}


def gpt_files(checkpoint: bytes | None = None, name: str = "gpt.pt") -> dict[str, bytes | pathlib.Path]:
  return {"config.json": TINY / "gpt" / "config.json", "config.yaml": TINY / "gpt" / "config.yaml",
          f"checkpoints/{name}": checkpoint if checkpoint is not None else TINY / "gpt" / "checkpoints" / "gpt.pt"}


def swapped_gpt_checkpoint() -> bytes:
  """The fixture GPT .pt with its model and EMA weights exchanged (a changed file)."""
  import torch
  obj = torch.load(TINY / "gpt" / "checkpoints" / "gpt.pt", weights_only=True)
  buf = io.BytesIO()
  torch.save({"model": obj["ema"], "ema": obj["model"]}, buf)
  return buf.getvalue()


def imagenet_gpt_files() -> dict[str, bytes]:
  """The fixture GPT widened to 1000 classes (rows 0-9 and the null row are the fixture's), so
  ImageNet labels such as 207,360 are valid."""
  import json

  import torch
  obj = torch.load(TINY / "gpt" / "checkpoints" / "gpt.pt", weights_only=True)
  gen = torch.Generator().manual_seed(0)
  out = {}
  for which, state in obj.items():
    state = dict(state)
    table = state["cls_embedding.embedding_table.weight"]  # [10 + 1, dim]
    extra = 0.5 * torch.randn(990, table.shape[1], generator=gen)
    state["cls_embedding.embedding_table.weight"] = torch.cat([table[:10], extra, table[10:]])
    out[which] = state
  buf = io.BytesIO()
  torch.save(out, buf)
  config = json.loads((TINY / "gpt" / "config.json").read_text())
  config["num_classes"] = 1000
  yaml_text = (TINY / "gpt" / "config.yaml").read_text().replace("num_classes: 10", "num_classes: 1000")
  return {"config.json": json.dumps(config).encode(), "config.yaml": yaml_text.encode(),
          "checkpoints/gpt.pt": buf.getvalue()}
