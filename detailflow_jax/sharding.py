"""Device mesh, the one logical-axis rules table, and the specs data, train and sampling share.

Model code only names its axes ('embed', 'mlp', 'heads', 'kv_heads', 'vocab', ...). Which mesh
axis shards which logical axis is decided here, once: FSDP over the embedding dim, tensor
parallelism over heads/MLP/vocab, the batch over data x fsdp. A dimension that a mesh axis does
not divide stays replicated rather than failing, so tiny configs run on any mesh;
`replicated_report` says which parameters that leaves whole on every device, and how many bytes.
"""
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("classes", None),
    ("length", None),
)


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
  """Mesh sizes with at most one -1 ("the rest of the devices")."""
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes must be positive or -1, got {sizes}")
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices cannot be split as {sizes}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"{num_devices} are available")
  return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all devices (all processes' devices on multi-host)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # Irregular device sets (e.g. forced CPU devices): plain row-major order.
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def _mesh_axes(target) -> tuple[str, ...]:
  return (target,) if isinstance(target, str) else tuple(target or ())


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=DEFAULT_RULES) -> PartitionSpec:
  """Maps logical axis names of an array of `shape` to a PartitionSpec on `mesh`.

  Two different logical axes of one array that the rules send to the same mesh axis are a
  rules-table error (ValueError naming both). The same logical axis repeated (a square
  mlp x mlp kernel) shards its first occurrence. A mesh axis shards a dimension only where it
  divides it; otherwise the dimension stays replicated (see `replicated_report`).
  """
  table: dict[str, object] = dict(rules)
  claimed: dict[str, str] = {}
  for name in logical:
    for axis in _mesh_axes(table.get(name)) if name is not None else ():
      if claimed.setdefault(axis, name) != name:
        raise ValueError(f"logical axes {claimed[axis]!r} and {name!r} of an array with axes "
                         f"{tuple(logical)} both map to mesh axis {axis!r}")
  used = set()
  out = []
  for name, size in zip(logical, shape):
    axes = _mesh_axes(table.get(name)) if name is not None else ()
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
      used.update(axes)
      out.append(axes[0] if len(axes) == 1 else axes)
    else:
      out.append(None)
  return PartitionSpec(*out)


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
  """Leading (batch) axis over the batch mesh axes, the rest replicated."""
  axes = _mesh_axes(dict(rules)["batch"])
  return NamedSharding(mesh, PartitionSpec(axes, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def shardings_for(tree: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """NamedShardings for every array of `tree`: nnx Variables by their logical axis names,
  everything else (step, rng, optimizer counters) replicated."""
  def one(leaf):
    if isinstance(leaf, nnx.Variable):
      shape = leaf.shape
      logical = leaf.get_metadata().get("out_sharding") or (None,) * len(shape)
      return leaf.replace(NamedSharding(mesh, logical_to_spec(logical, shape, mesh, rules)))
    return replicated(mesh)
  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated_report(tree: Any, specs: Any) -> tuple[list[tuple[str, tuple[int, ...], int]], int]:
  """Which arrays of `tree` every device holds whole under `specs` (its shardings, e.g. from
  `shardings_for`): [(path, shape, bytes)] of the non-scalar arrays whose spec shards no
  dimension, and their total bytes (per device, i.e. what sharding them would save x devices).
  `tree` may be abstract (ShapeDtypeStructs / abstract Variables)."""
  unwrap = lambda x: x.get_value() if isinstance(x, nnx.Variable) else x
  is_var = lambda x: isinstance(x, nnx.Variable)
  arrays = jax.tree_util.tree_flatten_with_path(jax.tree.map(unwrap, tree, is_leaf=is_var))[0]
  shardings = jax.tree.leaves(jax.tree.map(unwrap, specs, is_leaf=is_var))
  if len(arrays) != len(shardings):
    raise ValueError(f"tree has {len(arrays)} arrays but specs has {len(shardings)} shardings")
  rows = []
  for (path, array), sharding in zip(arrays, shardings):
    spec = sharding.spec if isinstance(sharding, NamedSharding) else sharding
    if not array.shape or any(axis is not None for axis in spec):
      continue
    nbytes = math.prod(array.shape) * np.dtype(array.dtype).itemsize
    rows.append(("/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                          for k in path), tuple(array.shape), nbytes))
  return rows, sum(r[2] for r in rows)


def log_replicated_report(tree: Any, specs: Any, mesh: Mesh, limit: int = 8) -> None:
  """Logs one line (on a mesh of more than one device): how many arrays of `tree` stay
  replicated, their bytes, the largest few."""
  if mesh.size == 1:
    return
  rows, total = replicated_report(tree, specs)
  if not rows:
    return
  largest = sorted(rows, key=lambda r: -r[2])[:limit]
  shown = ", ".join(f"{path} {shape} {nbytes / 2**10:.1f} KiB" for path, shape, nbytes in largest)
  more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
  logging.getLogger("detailflow_jax").info(
      "mesh %s: %d parameter arrays stay replicated on every device (%.2f MiB per device): %s%s",
      dict(mesh.shape), len(rows), total / 2**20, shown, more)


def maybe_initialize_distributed(c) -> None:
  """jax.distributed: explicit coordinator flags (GPU clusters, localhost tests) or, on TPU
  pods and SLURM, JAX's own auto-detection. Single-process runs skip it."""
  d = c.distributed
  if d.coordinator:
    jax.distributed.initialize(coordinator_address=d.coordinator, num_processes=d.num_processes,
                               process_id=d.process_id)
  elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("SLURM_NTASKS", "1") != "1":
    jax.distributed.initialize()


def barrier(name: str) -> None:
  """All processes wait here (no-op on one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def logical_axes(initializer, axes: Sequence[str | None]):
  """`initializer` whose Variable carries the logical axis names `axes` (see DEFAULT_RULES) as metadata
  only. Flax 0.12 would otherwise shard a variable eagerly at creation and demand a mesh; the
  names are mapped to mesh axes with the one rules table when a train state is created (init
  by abstract shapes, then jit with out_shardings), so models build anywhere without a mesh."""
  return nnx.with_partitioning(initializer, tuple(axes), eager_sharding=False)
