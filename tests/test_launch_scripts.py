"""launch/tpu (gcloud commands for a v5e-64 slice, dry run) and launch/gpu (SLURM -> jax.distributed)."""
import importlib.util
import os
import pathlib
import shlex
import socket
import stat
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load(name, path):
  spec = importlib.util.spec_from_file_location(name, REPO / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


tpu = _load("tpu_commands", "launch/tpu/commands.py")
slurm = _load("slurm_launch", "launch/gpu/slurm_launch.py")
JAX_VERSION = tpu.pinned_versions(REPO / "requirements.txt")["jax"]
ENV = dict(TPU_NAME="df16-v5e", TPU_ZONE="us-west4-a", TPU_PROJECT="my-project",
           ACCELERATOR_TYPE="v5litepod-64", CONFIG="configs/detailflow16_gpt_l.py",
           WORKDIR="gs://my-bucket/runs/df16_gpt_l", DRY_RUN="1")


def remote_script(cmd):
  [arg] = [a for a in cmd if a.startswith("--command=")]
  script = arg[len("--command="):]
  check = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
  assert check.returncode == 0, check.stderr
  return script


def dry_run(script, *args, env=None):
  out = subprocess.run(["bash", str(REPO / "launch" / "tpu" / script), *args],
                       env={**os.environ, **ENV, **(env or {})}, capture_output=True, text=True,
                       timeout=60)
  assert out.returncode == 0, out.stderr
  lines = [l for l in out.stdout.splitlines() if l and not l.startswith("#")]
  return out.stdout, [shlex.split(l) for l in lines]


def test_v5e_64_slice_has_16_hosts():
  assert tpu.slice_hosts("v5litepod-64") == (16, 4)
  assert tpu.slice_hosts("v5litepod-8") == (1, 8)
  assert tpu.slice_hosts("v4-32") == (4, 4)
  assert tpu.slice_hosts("v5p-8") == (1, 4)
  with pytest.raises(ValueError):
    tpu.slice_hosts("v9-64")


def test_create_slice_dry_run():
  out, [cmd] = dry_run("create_slice.sh", "--spot")
  assert "16 host(s) x 4 chips" in out
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "df16-v5e"]
  for flag in ("--accelerator-type=v5litepod-64", "--version=v2-alpha-tpuv5-lite",
               "--zone=us-west4-a", "--project=my-project", "--spot"):
    assert flag in cmd


def test_setup_dry_run_installs_jax_tpu_on_every_worker():
  _, (pack, copy, ssh) = dry_run("setup.sh")
  assert pack[:3] == ["tar", "-czf", tpu.TARBALL] and str(REPO) in pack
  assert copy[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in copy
  assert f"df16-v5e:{tpu.TARBALL}" in copy
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "df16-v5e"]
  assert "--worker=all" in ssh and "--zone=us-west4-a" in ssh
  script = remote_script(ssh)
  assert f"'jax[tpu]=={JAX_VERSION}'" in script
  assert 'pip install -q -r "$HOME/detailflow_jax"/requirements.txt' in script
  assert "--python 3.11" in script and "download.pytorch.org/whl/cpu" in script
  assert "gcsfuse" in script
  _, (_, _, ssh) = dry_run("setup.sh", "--no-gcsfuse")
  assert "gcsfuse" not in remote_script(ssh)


def test_run_dry_run_starts_the_train_command_on_all_hosts():
  _, [ssh] = dry_run("run.sh", "--", "--config.data.path=gs://my-bucket/codes/df16",
                     "--config.mesh.fsdp=4")
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "df16-v5e"]
  assert "--worker=all" in ssh and "--project=my-project" in ssh
  script = remote_script(ssh)
  train = ('"$HOME/detailflow_venv/bin/python" launch/train.py '
           "--config=configs/detailflow16_gpt_l.py --workdir=/gcs/my-bucket/runs/df16_gpt_l "
           "--config.data.path=/gcs/my-bucket/codes/df16 --config.mesh.fsdp=4 $DIST_FLAGS")
  assert f"nohup {train} > " in script
  # the gs:// workdir is mounted (gcsfuse) at the path the command uses, on every host
  assert "gcsfuse --implicit-dirs --rename-dir-limit=200000 my-bucket /gcs/my-bucket" in script
  assert script.index("gcsfuse") < script.index("nohup")
  assert 'DIST_FLAGS=$("$HOME/detailflow_venv/bin/python" launch/tpu/commands.py worker-flags)' in script
  _, [ssh] = dry_run("run.sh", "--foreground", env=dict(WORKDIR="/mnt/nfs/run", SCRIPT="launch/extract_codes.py"))
  script = remote_script(ssh)
  assert "nohup" not in script and "gcsfuse" not in script
  assert "launch/extract_codes.py --config=configs/detailflow16_gpt_l.py --workdir=/mnt/nfs/run" in script


def test_run_needs_config_and_workdir():
  out = subprocess.run([sys.executable, str(REPO / "launch" / "tpu" / "commands.py"), "run",
                        "--dry-run", "--name", "x", "--zone", "z"],
                       env={k: v for k, v in os.environ.items() if k not in ("CONFIG", "WORKDIR")},
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 2 and "CONFIG and WORKDIR" in out.stderr


def test_tpu_worker_flags_from_metadata():
  endpoints = ",".join(f"w{i}:{i}:10.0.0.{i + 2}" for i in range(16))  # name:id:ip
  meta = {"worker-network-endpoints": endpoints, "agent-worker-number": "5"}
  assert tpu.worker_flags(meta.__getitem__) == [
      "--config.distributed.coordinator=10.0.0.2:8476", "--config.distributed.num_processes=16",
      "--config.distributed.process_id=5"]
  meta = {"worker-network-endpoints": "t1v-n-0,t1v-n-1", "agent-worker-number": "0"}
  assert tpu.worker_flags(meta.__getitem__)[0] == "--config.distributed.coordinator=t1v-n-0:8476"
  assert tpu.worker_flags({"worker-network-endpoints": "10.0.0.2"}.__getitem__) == []


def test_slurm_env_to_jax_distributed_arguments():
  assert slurm.first_host("gpu[003-010,012],cpu1") == "gpu003"
  assert slurm.first_host("node7,node8") == "node7"
  assert slurm.first_host("rack[1-2]-n[07-08]") == "rack1-n07"
  env = dict(SLURM_JOB_ID="123456", SLURM_JOB_NODELIST="gpu[003-006]", SLURM_NTASKS="4",
             SLURM_PROCID="2", SLURM_LOCALID="0", SLURM_TASKS_PER_NODE="1(x4)",
             CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
  extra_env, cmd = slurm.task_command(env, ["python3", "launch/train.py", "--config=c.py", "--workdir=/w"])
  assert cmd == ["python3", "launch/train.py", "--config=c.py", "--workdir=/w",
                 "--config.distributed.coordinator=gpu003:23456",
                 "--config.distributed.num_processes=4", "--config.distributed.process_id=2"]
  assert extra_env == {"JAX_LOCAL_DEVICE_IDS": "0,1,2,3,4,5,6,7"}  # one task drives the node
  # one task per GPU, every task seeing all 8: GPU SLURM_LOCALID, as JAX's own SLURM detection
  many = dict(env, SLURM_TASKS_PER_NODE="8(x4)", SLURM_LOCALID="3", SLURM_NTASKS="32",
              JAX_COORDINATOR_PORT="1234", SLURM_STEP_NODELIST="gpu[004-007]")
  extra_env, cmd = slurm.task_command(many, ["x"])
  assert extra_env == {"JAX_LOCAL_DEVICE_IDS": "3"}
  assert cmd[1:3] == ["--config.distributed.coordinator=gpu004:1234",
                      "--config.distributed.num_processes=32"]
  assert slurm.local_device_ids(dict(many, CUDA_VISIBLE_DEVICES="5")) == [0]  # --gpus-per-task=1
  assert slurm.local_device_ids({}) is None
  with pytest.raises(ValueError, match="srun"):
    slurm.task_command({}, ["x"])


def test_sbatch_script_runs_every_task_through_the_launcher(tmp_path):
  """The batch script under a fake srun (two tasks, DRY_RUN=1)."""
  fake = tmp_path / "bin" / "srun"
  fake.parent.mkdir()
  fake.write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                  'for i in 0 1; do SLURM_PROCID=$i SLURM_LOCALID=0 "$@" || exit 1; done\n')
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}", DRY_RUN="1", PYTHON=sys.executable,
             CONFIG="configs/detailflow32_gpt_l.py", WORKDIR="/shared/runs/df32", SLURM_JOB_ID="77",
             SLURM_JOB_NODELIST="a100-[01-02]", SLURM_NTASKS="2", SLURM_TASKS_PER_NODE="1(x2)",
             CUDA_VISIBLE_DEVICES="0,1,2,3", SLURM_SUBMIT_DIR=str(REPO))
  out = subprocess.run(["bash", str(REPO / "launch" / "gpu" / "slurm_train.sbatch"),
                        "--config.data.path=/shared/codes/df32"], env=env, capture_output=True,
                       text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert len(lines) == 2
  for i, line in enumerate(lines):
    assert (f"JAX_LOCAL_DEVICE_IDS=0,1,2,3 {sys.executable} launch/train.py "
            "--config=configs/detailflow32_gpt_l.py --workdir=/shared/runs/df32 "
            "--config.data.path=/shared/codes/df32 --config.distributed.coordinator=a100-01:20077 "
            f"--config.distributed.num_processes=2 --config.distributed.process_id={i}") in line


PROBE = '''
import sys
sys.path.insert(0, {repo!r})
from absl import app, flags
from ml_collections import config_flags
config_flags.DEFINE_config_file("config", None, "", lock_config=True)

def main(_):
  import jax
  from detailflow_jax import sharding as mesh
  mesh.maybe_initialize_distributed(flags.FLAGS.config)
  print("PROBE", jax.process_index(), jax.process_count(), jax.device_count(), flush=True)
  jax.distributed.shutdown()

app.run(main)
'''


def test_slurm_flags_initialise_jax_distributed_through_the_config(tmp_path):
  """Two fake SLURM tasks on localhost: the launcher's flags, parsed by the configs' flag
  machinery, bring up a 2-process jax.distributed through maybe_initialize_distributed."""
  probe = tmp_path / "probe.py"
  probe.write_text(PROBE.format(repo=str(REPO)))
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_"))}
  base.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
              SLURM_JOB_ID="1", SLURM_JOB_NODELIST="localhost", SLURM_NTASKS="2",
              SLURM_LOCALID="0", SLURM_TASKS_PER_NODE="2", SLURM_STEP_NODELIST="localhost",
              JAX_COORDINATOR_PORT=port)
  procs = [subprocess.Popen(
      [sys.executable, str(REPO / "launch" / "gpu" / "slurm_launch.py"), "--", sys.executable,
       str(probe), f"--config={REPO / 'configs' / 'detailflow16_gpt_l.py'}:tiny"],
      env=dict(base, SLURM_PROCID=str(i)), cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=120)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, outs[-1][-2000:]
  probes = sorted(line for out in outs for line in out.splitlines() if line.startswith("PROBE"))
  assert probes == ["PROBE 0 2 4", "PROBE 1 2 4"]
