"""One of two localhost processes running the real launch/train.py (4 CPU devices each, the
mesh data=1 x fsdp=8 spanning both), for tests/test_two_process_launch.py.

argv: PROCESS_ID PORT WORKDIR CONFIG[:variant] [--config.key=value ...]. Prints the launcher's
log, then a RESULT line: its exit status and how many PNGs this process said it wrote. With
the driver's kill hook set (DETAILFLOW_TEST_KILL_AFTER_STEP), a launcher killed by SIGKILL is the
expected outcome and this script exits 0 (the RESULT line says -9).
"""
import json
import os
import pathlib
import signal
import subprocess
import sys

process_id, port, workdir, config, *overrides = sys.argv[1:]
root = pathlib.Path(__file__).resolve().parents[2]
cmd = [sys.executable, str(root / "launch" / "train.py"), f"--config={root / config}",
       f"--workdir={workdir}", "--config.mesh.data=1", "--config.mesh.fsdp=8",
       f"--config.distributed.coordinator=127.0.0.1:{port}",
       "--config.distributed.num_processes=2", f"--config.distributed.process_id={process_id}",
       *overrides]
env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
           PYTHONPATH=str(root))
run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
print(run.stderr[-6000:])
pngs = sum(1 for line in run.stderr.splitlines() if " wrote " in line and line.endswith(".png"))
print("RESULT " + json.dumps({"process": int(process_id), "returncode": run.returncode,
                              "pngs_written": pngs}), flush=True)
killed = os.environ.get("DETAILFLOW_TEST_KILL_AFTER_STEP") and run.returncode == -signal.SIGKILL
sys.exit(0 if killed else run.returncode)
