"""One of two localhost processes running the real launch/extract_codes.py (4 CPU devices
each) on the tiny GPT config, for tests/test_extract_codes.py.

argv: PROCESS_ID PORT TOKENIZER_DIR WORKDIR [--config.key=value ...]. Prints the launcher's
log, then a RESULT line with its exit status."""
import json
import os
import pathlib
import subprocess
import sys

process_id, port, tokenizer_dir, workdir, *overrides = sys.argv[1:]
root = pathlib.Path(__file__).resolve().parents[2]
cmd = [sys.executable, str(root / "launch" / "extract_codes.py"),
       f"--config={root / 'configs' / 'detailflow16_gpt_l.py'}:tiny", f"--tokenizer={tokenizer_dir}",
       f"--workdir={workdir}", f"--config.distributed.coordinator=127.0.0.1:{port}",
       "--config.distributed.num_processes=2", f"--config.distributed.process_id={process_id}",
       *overrides]
env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
           PYTHONPATH=str(root))
run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
print(run.stderr[-6000:])
print("RESULT " + json.dumps({"process": int(process_id), "returncode": run.returncode}), flush=True)
sys.exit(run.returncode)
