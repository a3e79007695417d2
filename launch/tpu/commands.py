"""The gcloud commands that create a Cloud TPU slice, set up every host and start training.

  python launch/tpu/commands.py create [--dry-run]    # gcloud compute tpus tpu-vm create
  python launch/tpu/commands.py setup  [--dry-run]    # code + venv with jax[tpu] on every worker
  python launch/tpu/commands.py run    [--dry-run] [-- --config.key=value ...]
  python launch/tpu/commands.py delete [--dry-run]
  python launch/tpu/commands.py worker-flags          # on a TPU VM: its jax.distributed flags

Settings come from environment variables, or the flags of the same meaning: TPU_NAME, TPU_ZONE,
TPU_PROJECT, ACCELERATOR_TYPE (default v5litepod-64), TPU_VERSION (default: by TPU family),
TPU_SPOT=1, CONFIG, WORKDIR, SCRIPT (default launch/train.py), DRY_RUN=1. `--dry-run` prints
the exact commands (shell-quoted) instead of running them. launch/tpu/*.sh are thin wrappers.

`run` starts the same command on every host (`--worker=all`), detached with a log in each
host's home directory. Every host gets explicit jax.distributed flags
(--config.distributed.coordinator/num_processes/process_id, which launch/train.py passes to
`jax.distributed.initialize`), computed on the host from the TPU VM metadata by `worker-flags`:
the training code's own auto-detection (`maybe_initialize_distributed`) only recognises slices
that export TPU_WORKER_HOSTNAMES (GKE), which `gcloud compute tpus tpu-vm` hosts do not.

A gs://BUCKET/PATH workdir (or any gs:// value of a --config.* flag, e.g. the token records) is
mounted with gcsfuse on every host at GCS_MOUNT_ROOT/BUCKET (default /gcs) and passed as that
path: all hosts see the same directory, as multi-host Orbax checkpointing requires, and jobs
whose files are read with local file APIs (evaluation) work on it too.

Standard library only: this runs on the machine that has gcloud, not on the TPU hosts.
"""
import argparse
import os
import pathlib
import re
import shlex
import subprocess
import sys
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[2]
TARBALL = "/tmp/detailflow_jax.tgz"
COORDINATOR_PORT = 8476  # JAX's default coordinator port on Cloud TPU

# Default runtime image per TPU family (gcloud --version); override with TPU_VERSION.
RUNTIME_VERSIONS = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base",
                    "v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
                    "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}


def slice_hosts(accelerator_type: str):
  """(hosts, chips per host) of an accelerator type such as v5litepod-64 or v4-32."""
  m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator_type)
  if not m or m.group(1) not in RUNTIME_VERSIONS:
    raise ValueError(f"unknown accelerator type {accelerator_type!r} (e.g. v5litepod-64, v4-32, "
                     f"v5p-128, v6e-64)")
  family, n = m.group(1), int(m.group(2))
  if family in ("v5litepod", "v6e"):  # the number counts chips; up to 8 chips on one host
    return (1, n) if n <= 8 else (n // 4, 4)
  chips = n // 2  # v2/v3/v4/v5p count TensorCores, two per chip, four chips per host
  return (max(1, chips // 4), min(chips, 4))


def pinned_versions(requirements: pathlib.Path) -> dict:
  """name -> version of the `name==version` lines of requirements.txt."""
  pins = {}
  for line in requirements.read_text().splitlines():
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s#;]+)", line)
    if m:
      pins[m.group(1).lower()] = m.group(2)
  return pins


def gcs_path(value: str, mount_root: str):
  """gs://BUCKET/PATH -> (MOUNT_ROOT/BUCKET/PATH, BUCKET); other values -> (value, None)."""
  m = re.fullmatch(r"gs://([a-z0-9][a-z0-9._-]*)(/.*)?", value)
  if not m:
    return value, None
  return f"{mount_root.rstrip('/')}/{m.group(1)}{m.group(2) or ''}", m.group(1)


def localise_args(args, mount_root: str):
  """Maps gs:// values (bare or after `--flag=`) to their gcsfuse paths; returns (args, buckets)."""
  out, buckets = [], []
  for arg in args:
    cut = arg.find("=gs://")
    prefix, value = (arg[:cut], arg[cut + 1:]) if cut >= 0 else ("", arg)
    local, bucket = gcs_path(value, mount_root)
    out.append(f"{prefix}={local}" if prefix else local)
    if bucket and bucket not in buckets:
      buckets.append(bucket)
  return out, buckets


class Slice:
  """One TPU slice and what runs on it; renders commands as argv lists."""

  def __init__(self, name, zone, accelerator_type="v5litepod-64", project=None, version=None,
               spot=False, remote_dir="detailflow_jax", venv="detailflow_venv",
               mount_root="/gcs", repo=REPO):
    if not name or not zone:
      raise ValueError("set TPU_NAME and TPU_ZONE (or --name and --zone)")
    self.hosts, self.chips_per_host = slice_hosts(accelerator_type)
    self.name, self.zone, self.accelerator_type = name, zone, accelerator_type
    self.project, self.spot = project, spot
    self.version = version or RUNTIME_VERSIONS[accelerator_type.split("-")[0]]
    self.remote_dir, self.venv, self.mount_root = remote_dir, venv, mount_root
    self.repo = pathlib.Path(repo)
    self.pins = pinned_versions(self.repo / "requirements.txt")

  @property
  def python(self) -> str:
    return f'"$HOME/{self.venv}/bin/python"'

  def _gcloud(self, verb, *args):
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, f"--zone={self.zone}"]
    return cmd + ([f"--project={self.project}"] if self.project else [])

  def _on_all_workers(self, script: str):
    return self._gcloud("ssh", self.name, "--worker=all", f"--command={script}")

  def create(self):
    cmd = self._gcloud("create", self.name, f"--accelerator-type={self.accelerator_type}",
                       f"--version={self.version}")
    return [cmd + (["--spot"] if self.spot else [])]

  def delete(self):
    return [self._gcloud("delete", self.name, "--quiet")]

  def setup(self, gcsfuse: bool = True):
    """Copy this working tree to every worker, then a Python 3.11 venv with the pinned
    requirements, the CPU build of torch (checkpoint reading only) and jax[tpu]."""
    jax_version, torch_version = self.pins["jax"], self.pins.get("torch")
    home_dir = f'"$HOME/{self.remote_dir}"'
    steps = ["set -e", f"mkdir -p {home_dir}", f"tar -xzf {TARBALL} -C {home_dir}"]
    if gcsfuse:
      steps.append(
          "command -v gcsfuse >/dev/null || { curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg"
          " | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && echo \"deb [signed-by=/usr/share/"
          "keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main\""
          " | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && sudo apt-get update -q"
          " && sudo apt-get install -y -q gcsfuse; }")
    steps += [
        '[ -x "$HOME/.local/bin/uv" ] || curl -LsSf https://astral.sh/uv/install.sh | sh',
        f'[ -x "$HOME/{self.venv}/bin/python" ] || "$HOME/.local/bin/uv" venv --seed --python 3.11 "$HOME/{self.venv}"']
    if torch_version:
      steps.append(f"{self.python} -m pip install -q torch=={torch_version} "
                   "--index-url https://download.pytorch.org/whl/cpu")
    steps += [f"{self.python} -m pip install -q -r {home_dir}/requirements.txt "
              + shlex.quote(f"jax[tpu]=={jax_version}"),
              f"{self.python} -m pip install -q --no-deps -e {home_dir}",
              f"{self.python} -c 'import jax; print(\"jax\", jax.__version__, \"ready on\", "
              f"__import__(\"socket\").gethostname())'"]
    pack = ["tar", "-czf", TARBALL, "--exclude=.git", "--exclude=.venv", "--exclude=__pycache__",
            "--exclude=.pytest_cache", "--exclude=detailflow_quickstart", "-C", str(self.repo), "."]
    copy = self._gcloud("scp", TARBALL, f"{self.name}:{TARBALL}", "--worker=all")
    return [pack, copy, self._on_all_workers("; ".join(steps))]

  def train_command(self, config: str, workdir: str, extra=(), script: str = "launch/train.py"):
    """(the command line every host runs, the buckets it needs mounted)."""
    if not config or not workdir:
      raise ValueError("set CONFIG and WORKDIR (or --config and --workdir)")
    args, buckets = localise_args([f"--workdir={workdir}", *extra], self.mount_root)
    line = " ".join([self.python, shlex.quote(script), shlex.quote(f"--config={config}"),
                     *map(shlex.quote, args), "$DIST_FLAGS"])
    return line, buckets

  def run(self, config: str, workdir: str, extra=(), script: str = "launch/train.py",
          log: str = "detailflow_train.log", detach: bool = True):
    line, buckets = self.train_command(config, workdir, extra, script)
    steps = ["set -e", f'cd "$HOME/{self.remote_dir}"']
    for bucket in buckets:
      mount = f"{self.mount_root.rstrip('/')}/{bucket}"
      steps.append(f'mountpoint -q {mount} || {{ sudo mkdir -p {mount} && sudo chown "$USER" {mount} && '
                   f'gcsfuse --implicit-dirs --rename-dir-limit=200000 {bucket} {mount}; }}')
    steps.append(f"DIST_FLAGS=$({self.python} launch/tpu/commands.py worker-flags)")
    if detach:
      steps.append(f'nohup {line} > "$HOME/{log}" 2>&1 < /dev/null & '
                   f'echo "started on $(hostname) (pid $!): log ~/{log}"')
    else:
      steps.append(line)
    return [self._on_all_workers("; ".join(steps))]


# --- on a TPU VM host ---------------------------------------------------------------------------

def metadata(key: str) -> str:
  """An instance attribute from the GCE metadata server (what JAX's GceTpuCluster reads)."""
  req = urllib.request.Request(
      f"http://metadata.google.internal/computeMetadata/v1/instance/attributes/{key}",
      headers={"Metadata-Flavor": "Google"})
  with urllib.request.urlopen(req, timeout=10) as r:
    return r.read().decode()


def worker_flags(get=metadata, port: int = COORDINATOR_PORT):
  """jax.distributed flags of this host: process id = agent-worker-number, coordinator = the
  first of worker-network-endpoints (workers are listed in process order), one process per host.
  A single-host slice needs none."""
  endpoints = []
  for worker in get("worker-network-endpoints").strip().split(","):
    parts = worker.split(":")  # "host" or the older "name:id:ip"
    endpoints.append(parts[2] if len(parts) == 3 else parts[0])
  if len(endpoints) <= 1:
    return []
  return [f"--config.distributed.coordinator={endpoints[0]}:{port}",
          f"--config.distributed.num_processes={len(endpoints)}",
          f"--config.distributed.process_id={int(get('agent-worker-number'))}"]


# --- CLI ----------------------------------------------------------------------------------------

def _env_flag(name: str) -> bool:
  return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def parse_args(argv):
  env = os.environ.get
  p = argparse.ArgumentParser(prog="launch/tpu/commands.py", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("action", choices=["create", "setup", "run", "delete", "worker-flags"])
  p.add_argument("--name", default=env("TPU_NAME"))
  p.add_argument("--zone", default=env("TPU_ZONE"))
  p.add_argument("--project", default=env("TPU_PROJECT"))
  p.add_argument("--accelerator-type", default=env("ACCELERATOR_TYPE", "v5litepod-64"))
  p.add_argument("--version", default=env("TPU_VERSION"), help="TPU VM runtime image")
  p.add_argument("--spot", action="store_true", default=_env_flag("TPU_SPOT"))
  p.add_argument("--config", default=env("CONFIG"), help="e.g. configs/detailflow16_gpt_l.py")
  p.add_argument("--workdir", default=env("WORKDIR"), help="gs://BUCKET/PATH or a shared path")
  p.add_argument("--script", default=env("SCRIPT", "launch/train.py"))
  p.add_argument("--log", default=env("LOG", "detailflow_train.log"))
  p.add_argument("--foreground", action="store_true", help="stream the output instead of detaching")
  p.add_argument("--no-gcsfuse", action="store_true", help="setup: do not install gcsfuse")
  p.add_argument("--mount-root", default=env("GCS_MOUNT_ROOT", "/gcs"))
  p.add_argument("--dry-run", action="store_true", default=_env_flag("DRY_RUN"))
  p.add_argument("extra", nargs="*", help="after --: more flags for the script (--config.key=value)")
  return p.parse_args(argv)


def render(args):
  s = Slice(args.name, args.zone, args.accelerator_type, args.project, args.version, args.spot,
            mount_root=args.mount_root)
  if args.action == "create":
    return s, s.create()
  if args.action == "delete":
    return s, s.delete()
  if args.action == "setup":
    return s, s.setup(gcsfuse=not args.no_gcsfuse)
  return s, s.run(args.config, args.workdir, args.extra, args.script, args.log,
                  detach=not args.foreground)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.action == "worker-flags":
    try:
      print(" ".join(worker_flags()))
    except OSError as e:
      print(f"error: no TPU VM metadata ({e}): worker-flags runs on a TPU VM host", file=sys.stderr)
      return 1
    return 0
  try:
    s, commands = render(args)
  except (ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"# {s.name}: {s.accelerator_type}, {s.hosts} host(s) x {s.chips_per_host} chips, "
        f"runtime {s.version}, zone {s.zone}", flush=True)
  for cmd in commands:
    print(shlex.join(cmd), flush=True)
    if not args.dry_run:
      subprocess.run(cmd, check=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
