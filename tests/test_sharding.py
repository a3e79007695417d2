"""The sharding module: rules collisions raise, and what stays replicated is reported."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from detailflow_jax import sharding


def test_distinct_logical_axes_on_one_mesh_axis_raise():
  mesh = sharding.make_mesh(2, 2, 2)
  rules = sharding.DEFAULT_RULES + (("experts", "tensor"),)
  with pytest.raises(ValueError, match="'experts' and 'mlp'|'mlp' and 'experts'"):
    sharding.logical_to_spec(("experts", "mlp"), (4, 8), mesh, rules)
  # The batch axes include fsdp, which also shards embed: an activation spec would collide.
  with pytest.raises(ValueError, match="mesh axis 'fsdp'"):
    sharding.logical_to_spec(("batch", "embed"), (8, 8), mesh)


def test_replicated_report_lists_unsharded_parameters_and_bytes():
  mesh = sharding.make_mesh(1, 2, 4)

  class Tiny(nnx.Module):
    def __init__(self):
      self.kernel = nnx.Param(jnp.zeros((8, 16)), eager_sharding=False, out_sharding=("embed", "mlp"))   # sharded
      self.odd = nnx.Param(jnp.zeros((3, 5)), eager_sharding=False, out_sharding=("embed", "mlp"))       # 2 ∤ 3, 4 ∤ 5
      self.scale = nnx.Param(jnp.zeros((6,), jnp.bfloat16), eager_sharding=False, out_sharding=("mlp",))  # 4 ∤ 6

  state = nnx.state(nnx.eval_shape(Tiny))
  specs = sharding.shardings_for(state, mesh)
  assert specs["kernel"].get_value().spec == P("fsdp", "tensor")
  rows, total = sharding.replicated_report(state, specs)
  assert sorted(rows) == [("odd", (3, 5), 60), ("scale", (6,), 12)]
  assert total == 72
  one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  assert len(sharding.replicated_report(state, sharding.shardings_for(state, one))[0]) == 3


@pytest.mark.parametrize("n_kv_head", [None, 2], ids=["mha", "gqa"])
def test_tensor_parallel_gpt_logits_equal_one_device(n_kv_head):
  """q/k/v shard on whole kv-head groups over `tensor`: the logits are the 1-device logits."""
  from gpt_helpers import random_gpt
  gpt = random_gpt(seed=5, n_kv_head=n_kv_head)
  cfg = gpt.config
  graphdef, state = nnx.split(gpt)
  tokens = jax.random.randint(jax.random.key(1), (8, 15), 0, cfg.vocab_size)
  labels = jnp.arange(8) % cfg.num_classes
  forward = lambda s, t, l: nnx.merge(graphdef, s)(t, l)
  expected = np.asarray(jax.jit(forward)(state, tokens, labels))
  for shape in [(1, 1, 2), (4, 1, 2), (2, 2, 2)]:
    mesh = sharding.make_mesh(*shape, devices=jax.devices()[:np.prod(shape)])
    specs = sharding.shardings_for(state, mesh)
    qkv_spec = specs["layers"][0]["attention"]["wqkv"]["kernel"].get_value().spec
    assert qkv_spec[1] == "tensor"  # kv heads split over tensor, nothing else cut
    sharded = jax.device_put(state, specs)
    batch = sharding.batch_sharding(mesh, 2)
    with jax.set_mesh(mesh):
      got = jax.jit(forward)(sharded, jax.device_put(tokens, batch),
                             jax.device_put(labels, sharding.batch_sharding(mesh, 1)))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=5e-5, err_msg=str(shape))
