"""Per-task launcher for SLURM: SLURM's variables -> jax.distributed flags, then exec the command.

  srun python launch/gpu/slurm_launch.py [--dry-run] -- python launch/train.py --config=... --workdir=...

Run once per task by launch/gpu/slurm_train.sbatch. It appends the flags launch/train.py and
launch/extract_codes.py hand to `jax.distributed.initialize` (see maybe_initialize_distributed
in detailflow_jax/sharding.py):

  --config.distributed.coordinator   first host of SLURM_STEP_NODELIST (SLURM_JOB_NODELIST), on
                                     JAX_COORDINATOR_PORT or 20000 + SLURM_JOB_ID % 10000
  --config.distributed.num_processes SLURM_NTASKS
  --config.distributed.process_id    SLURM_PROCID

and sets JAX_LOCAL_DEVICE_IDS, the GPUs this process drives: all GPUs the task sees when there is
one task per node, or GPU SLURM_LOCALID when several tasks share a node that each see all of its
GPUs. (Without it, JAX's SLURM detection gives every process the single GPU SLURM_LOCALID.)
Standard library only.
"""
import os
import re
import shlex
import sys


def first_host(nodelist: str) -> str:
  """The first host of a SLURM hostlist: 'gpu[003-010,12],cpu1' -> 'gpu003',
  'rack[1-2]-n[07-08]' -> 'rack1-n07'."""
  depth, end = 0, len(nodelist)
  for i, ch in enumerate(nodelist):
    depth += ch == "["
    depth -= ch == "]"
    if ch == "," and depth == 0:
      end = i
      break
  item = nodelist[:end].strip()
  if not item:
    raise ValueError(f"empty SLURM nodelist {nodelist!r}")
  return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], item)


def coordinator_port(env) -> int:
  if env.get("JAX_COORDINATOR_PORT"):
    return int(env["JAX_COORDINATOR_PORT"])
  return 20000 + int(env.get("SLURM_JOB_ID", "0")) % 10000


def local_device_ids(env):
  """The GPU indices (within what the task sees) this process drives; None without GPUs."""
  visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  count = len(visible) or int(re.match(r"\d*", env.get("SLURM_GPUS_ON_NODE", "")).group() or 0)
  if count == 0:
    return None
  tasks_here = int(re.match(r"\d+", env.get("SLURM_TASKS_PER_NODE", "1")).group())
  if tasks_here > 1 and count > 1:
    return [int(env.get("SLURM_LOCALID", "0"))]
  return list(range(count))


def distributed_flags(env):
  """The --config.distributed.* flags of this task."""
  missing = [k for k in ("SLURM_NTASKS", "SLURM_PROCID") if k not in env]
  nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
  if missing or not nodelist:
    raise ValueError(f"not inside a SLURM task (missing {missing or ['SLURM_JOB_NODELIST']}): "
                     "run it with srun")
  return [f"--config.distributed.coordinator={first_host(nodelist)}:{coordinator_port(env)}",
          f"--config.distributed.num_processes={int(env['SLURM_NTASKS'])}",
          f"--config.distributed.process_id={int(env['SLURM_PROCID'])}"]


def task_command(env, command):
  """(environment additions, argv) for this task."""
  if not command:
    raise ValueError("no command given after --")
  extra_env = {}
  ids = local_device_ids(env)
  if ids is not None:
    extra_env["JAX_LOCAL_DEVICE_IDS"] = ",".join(map(str, ids))
  return extra_env, list(command) + distributed_flags(env)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  dry_run = False
  while argv and argv[0] != "--":
    if argv[0] in ("-h", "--help"):
      print(f"usage: slurm_launch.py [--dry-run] -- COMMAND ...\n\n{__doc__}")
      return 0
    if argv[0] != "--dry-run":
      print(f"usage: slurm_launch.py [--dry-run] -- COMMAND ...  (unknown {argv[0]!r})", file=sys.stderr)
      return 2
    dry_run = True
    argv = argv[1:]
  try:
    extra_env, command = task_command(os.environ, argv[1:])
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  line = " ".join([f"{k}={shlex.quote(v)}" for k, v in extra_env.items()] + [shlex.join(command)])
  print(f"[task {os.environ['SLURM_PROCID']} on {os.uname().nodename}] {line}", flush=True)
  if dry_run:
    return 0
  os.environ.update(extra_env)
  os.execvp(command[0], command)


if __name__ == "__main__":
  sys.exit(main())
