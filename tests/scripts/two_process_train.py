"""One of two localhost processes (4 CPU devices each) training the tiny GPT for a few steps,
saving and restoring an Orbax checkpoint. Run by tests/test_distributed.py."""
import os
import sys

process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax

jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=process_id)

import json

import jax.numpy as jnp
import numpy as np

from configs.detailflow16_gpt_l import get_config
from detailflow_jax import sharding as mesh_lib
from detailflow_jax.models.gpt import GPT
from detailflow_jax.train import ar
from detailflow_jax.train.checkpoint import Checkpointer, abstract_with_shardings
from detailflow_jax.train.optim import make_optimizer
from detailflow_jax.train.state import create_train_state, make_train_step

c = get_config("tiny")
ar.validate(c, jax.device_count())
cfg = ar.gpt_config_from(c)
mesh = mesh_lib.make_mesh(2, 2, 2)
tx = make_optimizer(1e-3, 10, warmup_steps=0)
graphdef, state, shardings = create_train_state(lambda: GPT(cfg, rngs=0), tx, mesh)
step = make_train_step(graphdef, ar.make_loss(cfg, 0.3), tx, shardings, mesh)

# Each process holds half of the global batch and hands only its own rows to JAX.
global_tokens = np.asarray(jax.random.randint(jax.random.key(0), (16, 32, 3), 0, 64), np.int32)
global_labels = np.arange(16, dtype=np.int32) % 10
rows = slice(process_id * 8, process_id * 8 + 8)
batch = {
    "tokens": jax.make_array_from_process_local_data(mesh_lib.batch_sharding(mesh, 3), global_tokens[rows]),
    "labels": jax.make_array_from_process_local_data(mesh_lib.batch_sharding(mesh, 1), global_labels[rows]),
}
losses = []
for _ in range(3):
  state, metrics = step(state, batch)
  losses.append(float(metrics["loss"]))
ckpt = Checkpointer(workdir, save_every=1)
ckpt.save(3, state, force=True)
ckpt.wait()
_, restored = ckpt.restore(abstract_with_shardings(state, shardings))
same = all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(restored.params)))
state, metrics = step(restored, batch)
losses.append(float(metrics["loss"]))
ckpt.close()
print("RESULT " + json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                              "processes": jax.process_count(), "losses": losses, "restored_equal": same}),
      flush=True)
jax.distributed.shutdown()
