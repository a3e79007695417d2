"""One resolver for every place a model is taken: a converted directory, a released run, or a
Hub id.

`resolve_model_dir(spec, kind)` accepts
- a converted model directory (ours: `config.json` with a "kind" + `params/`), local or remote
  (gs://..., read where it is): used as is;
- a released run directory (`RUN/checkpoints/X.pt` beside `RUN/config.json` + `RUN/config.yaml`)
  or a checkpoint file inside one;
- a Hugging Face Hub id `org/name[@revision][:path/in/repo.pt]`, e.g. `ByteFlow-AI/DetailFlow-16`,
  `ByteFlow-AI/DetailFlow-16-GPT-L@<commit>`, `ByteFlow-AI/DetailFlow-16:checkpoints/128.pt`.
  Files come through `huggingface_hub` (`snapshot_download` for the small config files,
  `hf_hub_download` for the one checkpoint), so HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE and
  tokens (HF_TOKEN, `hf auth login`) work as everywhere else.

Released checkpoints are converted once and cached under `cache_root()`: `$DETAILFLOW_JAX_CACHE`
if set, else `$HF_HOME/detailflow_jax` (default `~/.cache/huggingface/detailflow_jax`), beside
the downloads they came from. A conversion is keyed by repo, commit and the checkpoint's
SHA-256 (plus the weights asked for); `source.json` in it records the SHA-256 of the checkpoint
and both config files. A later call re-hashes the sources and every converted file: a changed
config or a damaged conversion is converted again, never half-used. Conversions are written to
a temporary directory and renamed into place, so an interrupted one leaves nothing behind.

Weights: as the reference's evaluation (scripts/eval_c2i.sh: VQ_EMA=False, GPT_EMA=True), the
GPT uses its `ema` weights and the tokenizer its `model` weights when the file holds both;
`weights=` overrides. Which set was used is printed.
"""
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable

from .. import __version__, paths
from ..convert.common import find_run_dir, weight_sets
from ..convert.gpt import convert_gpt
from ..convert.tokenizer import convert_tokenizer
from .model_dir import DamagedModelError, is_model_dir, verify_model_dir

CACHE_ENV = "DETAILFLOW_JAX_CACHE"
SOURCE_FILE = "source.json"
DEFAULT_WEIGHTS = {"tokenizer": "model", "gpt": "ema"}
WEIGHT_HELP = ("released checkpoints only: 'model' or 'ema' weights (default: the reference's "
               "evaluation choice, tokenizer 'model', GPT 'ema', when the file holds both)")
SOURCE_HELP = ("converted directory, released run directory or Hub id "
               "(org/name[@revision][:path/in/repo.pt])")


def add_model_flags(parser, kind: str, flag: str, weights_flag: str, *, weights_default=None,
                    weights_help: str = WEIGHT_HELP) -> None:
  """A command's flags for one model: where it is (`flag`, anything resolve_model_dir takes) and
  which weights set of a released checkpoint (`weights_flag`)."""
  parser.add_argument(flag, required=True, help=f"{kind}: {SOURCE_HELP}")
  parser.add_argument(weights_flag, choices=["model", "ema"], default=weights_default,
                      help=f"{kind} weights, {weights_help}")


# What snapshot_download fetches before the checkpoint is chosen: configs only, never weights.
_CONFIG_PATTERNS = ["*.json", "*.yaml", "*.yml"]
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)"
                     r"(?:@(?P<revision>[^:@\s]+))?(?::(?P<filename>[^\s]+))?")


class HubError(ValueError):
  """A Hub id that cannot be resolved; the message names the repo and what to do."""


@dataclasses.dataclass(frozen=True)
class HubId:
  repo: str
  revision: str | None = None   # branch, tag or commit; None: the default branch
  filename: str | None = None   # path of the checkpoint inside the repo; None: pick by layout

  def __str__(self) -> str:
    return (self.repo + (f"@{self.revision}" if self.revision else "")
            + (f":{self.filename}" if self.filename else ""))


def parse_hub_id(text: str) -> HubId | None:
  """`org/name[@revision][:path/in/repo]` -> HubId; None when `text` is not of that form."""
  m = _HUB_ID.fullmatch(str(text).strip())
  if m is None or ".." in m["repo"]:
    return None
  return HubId(m["repo"], m["revision"], m["filename"])


def cache_root() -> pathlib.Path:
  if os.environ.get(CACHE_ENV):
    return pathlib.Path(os.environ[CACHE_ENV]).expanduser()
  from huggingface_hub import constants
  return pathlib.Path(constants.HF_HOME).expanduser() / "detailflow_jax"


def _converter(kind: str) -> Callable:
  if kind == "tokenizer":
    return convert_tokenizer
  if kind == "gpt":
    return convert_gpt
  raise ValueError(f"unknown model kind {kind!r} (tokenizer | gpt)")


def pick_checkpoint(files: Iterable[str], label: str) -> str:
  """The checkpoint of a released run from its file list (paths relative to the run):
  `checkpoints/*.pt`, else `*.pt` at the top, else the same for `.safetensors`."""
  files = sorted(set(files))
  groups = [[f for f in files if re.fullmatch(pattern, f)]
            for pattern in (r"checkpoints/[^/]+\.pt", r"[^/]+\.pt",
                            r"checkpoints/[^/]+\.safetensors", r"[^/]+\.safetensors")]
  found = next((g for g in groups if g), None)
  if found is None:
    raise HubError(f"{label} has no checkpoint in the released layout (checkpoints/*.pt beside "
                   f"config.json and config.yaml); it holds: {', '.join(files[:12]) or 'nothing'}")
  if len(found) > 1:
    raise HubError(f"{label} holds {len(found)} checkpoints: {', '.join(found)}; pick one as "
                   f"{label}:{found[-1]}")
  return found[0]


def _offline_hint(hub: HubId) -> str:
  from huggingface_hub import constants
  where = constants.HF_HUB_CACHE
  if constants.HF_HUB_OFFLINE:
    return (f"{hub} is not in the Hugging Face cache ({where}) and HF_HUB_OFFLINE=1 forbids "
            f"downloading it: run once with network access (unset HF_HUB_OFFLINE), or "
            f"`hf download {hub.repo}` elsewhere and copy the cache, or pass a local directory")
  return (f"{hub} could not be downloaded and is not in the Hugging Face cache ({where}): "
          f"check the network (or set HF_ENDPOINT), or pass a local directory")


def download(hub: HubId) -> tuple[pathlib.Path, str, str]:
  """Fetches the run's config files and its one checkpoint; returns (checkpoint path in the
  snapshot, commit hash, checkpoint path in the repo)."""
  from huggingface_hub import errors, get_cached_repo_tree, hf_hub_download, snapshot_download
  try:
    snapshot = pathlib.Path(snapshot_download(hub.repo, revision=hub.revision,
                                              allow_patterns=_CONFIG_PATTERNS))
    commit = snapshot.name
    filename = hub.filename
    if filename is None:
      try:
        files = [f.path for f in get_cached_repo_tree(hub.repo, revision=commit)]
      except errors.CachedRepoTreeNotFoundError:  # a cache written by an older client
        files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
      filename = pick_checkpoint(files, str(HubId(hub.repo, hub.revision)))
    checkpoint = pathlib.Path(hf_hub_download(hub.repo, filename, revision=commit))
  except errors.RevisionNotFoundError:
    raise HubError(f"{hub.repo} has no revision {hub.revision!r}") from None
  except (errors.RepositoryNotFoundError, errors.GatedRepoError):
    raise HubError(f"{hub.repo} was not found on the Hub, or it is private/gated and needs a token "
                   "(set HF_TOKEN or run `hf auth login`)") from None
  except errors.LocalEntryNotFoundError:  # offline / unreachable and not cached
    raise HubError(_offline_hint(hub)) from None
  except errors.EntryNotFoundError:
    raise HubError(f"{hub.repo}@{hub.revision or 'main'} has no file {hub.filename!r}") from None
  except (errors.OfflineModeIsEnabled, ConnectionError):
    raise HubError(_offline_hint(hub)) from None
  return checkpoint, commit, filename


def _source_hashes(checkpoint: pathlib.Path, run_dir: pathlib.Path, checkpoint_sha: str) -> dict[str, str]:
  hashes = {"checkpoint": checkpoint_sha}
  for name in ("config.json", "config.yaml"):
    if (run_dir / name).is_file():
      hashes[name] = paths.file_sha256(run_dir / name)
  return hashes


def _cache_problem(directory: pathlib.Path, kind: str, sources: dict[str, str]) -> str | None:
  """None when `directory` is a complete conversion of exactly `sources`, else why not."""
  try:
    record = json.loads((directory / SOURCE_FILE).read_text())
  except (OSError, json.JSONDecodeError, UnicodeDecodeError):
    return f"has no readable {SOURCE_FILE}"
  if record.get("sources") != sources:
    changed = sorted(k for k in set(sources) | set(record.get("sources", {}))
                     if sources.get(k) != record.get("sources", {}).get(k))
    return f"was made from other files ({', '.join(changed)} changed)"
  try:
    verify_model_dir(directory, kind, checksums=True)
  except (DamagedModelError, FileNotFoundError, ValueError) as e:
    return str(e).split(";")[0].replace(f"{directory} ", "")
  return None


def _discard(directory: pathlib.Path) -> None:
  """Moves a stale conversion out of the way first, so no reader sees it half deleted."""
  stale = directory.parent / f".{directory.name}.stale-{uuid.uuid4().hex[:8]}"
  os.rename(directory, stale)
  shutil.rmtree(stale, ignore_errors=True)


def _say(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _safe(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "_"


def convert_cached(kind: str, checkpoint, label: str, cache_key: tuple[str, ...],
                   weights: str | None = None) -> pathlib.Path:
  """The converted model directory of a released checkpoint, converting it on first use."""
  checkpoint = pathlib.Path(checkpoint)
  if weights not in (None, "model", "ema"):
    raise ValueError(f"weights must be 'model' or 'ema', got {weights!r}")
  run_dir = find_run_dir(checkpoint)
  sha = paths.file_sha256(checkpoint)
  sources = _source_hashes(checkpoint, run_dir, sha)
  requested = weights or "default"
  target = cache_root().joinpath(kind, *map(_safe, cache_key),
                                 f"{_safe(checkpoint.stem)}-{sha[:16]}-{requested}")
  if target.is_dir():
    problem = _cache_problem(target, kind, sources)
    if problem is None:
      used = json.loads((target / SOURCE_FILE).read_text())["weights"]
      _say(f"{kind}: {label} ({used} weights), cached conversion {target}")
      return target
    _say(f"{kind}: the cached conversion {target} {problem}; converting again")
    _discard(target)

  if weights is None:
    available = weight_sets(checkpoint)
    used = DEFAULT_WEIGHTS[kind] if DEFAULT_WEIGHTS[kind] in available else "model"
    why = ("the reference's evaluation default" if used == DEFAULT_WEIGHTS[kind]
           else f"the file has no {DEFAULT_WEIGHTS[kind]} weights")
  else:
    used, why = weights, "asked for"
  _say(f"{kind}: converting {label} ({used} weights: {why}) -> {target}")
  target.parent.mkdir(parents=True, exist_ok=True)
  # The converter writes `stage` atomically itself; the rename below is not
  # paths.write_dir_atomically because here another process winning it is success, not an error.
  stage = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    _converter(kind)(checkpoint, stage, weights=used)
    (stage / SOURCE_FILE).write_text(json.dumps(
        {"source": label, "checkpoint": str(checkpoint), "weights": used, "sources": sources,
         "detailflow_jax": __version__}, indent=2))
    try:
      os.rename(stage, target)
    except OSError:  # another process finished the same conversion first
      if _cache_problem(target, kind, sources) is not None:
        raise
  finally:
    shutil.rmtree(stage, ignore_errors=True)
  return target


def _local_checkpoint(path: pathlib.Path) -> pathlib.Path:
  if path.is_file():
    return path
  files = [p.relative_to(path).as_posix() for p in path.rglob("*")
           if p.is_file() and p.suffix in (".pt", ".safetensors")]
  return path / pick_checkpoint(files, str(path))


def resolve_model_dir(spec, kind: str, weights: str | None = None) -> paths.AnyPath:
  """A converted model directory for `spec` (see the module docstring for what it may be)."""
  if paths.is_remote(spec) and not is_model_dir(spec):  # gs://...: read where it is, not converted
    raise FileNotFoundError(f"{spec} is not a converted model directory (config.json with a model "
                            "kind + params/); released checkpoints are read from local paths or "
                            "the Hub")
  path = paths.run_path(spec)  # a local one absolute (epath's absolute() mangles gs:// paths)
  if path.exists():
    if path.is_dir() and is_model_dir(path):
      if weights is not None:
        raise ValueError(f"{path} is already converted (one set of weights); --weights applies "
                         "to released checkpoints (Hub ids, run directories, .pt files)")
      return path
    if path.is_dir() and not (path / "checkpoints").is_dir() and not any(path.glob("*.pt")):
      raise FileNotFoundError(f"{path} is not a converted model directory: no config.json "
                              "with a model kind, and no checkpoints/*.pt of a released run")
    checkpoint = _local_checkpoint(path)
    where = hashlib.sha256(str(checkpoint.parent).encode()).hexdigest()[:12]
    return convert_cached(kind, checkpoint, str(checkpoint), ("local", where), weights)
  hub = parse_hub_id(str(spec))
  if hub is None:
    raise FileNotFoundError(f"{spec!r} is neither an existing path nor a Hub id "
                            "(org/name[@revision][:path/in/repo.pt])")
  checkpoint, commit, filename = download(hub)
  return convert_cached(kind, checkpoint, f"{hub.repo}@{commit[:12]}:{filename}",
                        (hub.repo.replace("/", "--"), commit), weights)
