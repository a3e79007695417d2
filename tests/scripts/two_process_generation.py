"""One of two localhost processes (4 CPU devices each) running the generation job on the
fixture models; process 0 writes the chunks and the final file. Run by
tests/test_generation_job.py, which compares the file with the single-process one."""
import os
import sys

process_id, port, tokenizer_dir, gpt_dir, workdir, out = sys.argv[1:7]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(here, "..", ".."), os.path.join(here, "..")]

import jax

jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=int(process_id))

import json

from generation_settings import SETTINGS

from detailflow_jax.eval.generation import GenerationJob
from detailflow_jax.weights.load import load_gpt, load_tokenizer

job = GenerationJob(load_gpt(gpt_dir), load_tokenizer(tokenizer_dir), SETTINGS)
summary = job.run(workdir, out)
print("RESULT " + json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                              "processes": jax.process_count(), "summary": summary}), flush=True)
