"""Device mesh and the one logical-axis rules table that maps parameter names to mesh axes.

Model code only names its axes ('embed', 'mlp', 'heads', 'vocab', ...). Which mesh axis shards
which logical axis is decided here, once: FSDP over the embedding dim, tensor parallelism over
heads/MLP/vocab, the batch over data x fsdp. A dimension that a mesh axis does not divide stays
replicated rather than failing, so tiny configs run on any mesh.
"""
import math
from typing import Dict, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
DEFAULT_RULES: Tuple[Tuple[str, object], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("vocab", "tensor"),
    ("classes", None),
    ("length", None),
)


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> Tuple[int, int, int]:
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
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all devices (all processes' devices on multi-host)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # Irregular device sets (e.g. forced CPU devices): plain row-major order.
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def logical_to_spec(logical: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                    rules=DEFAULT_RULES) -> PartitionSpec:
  """Maps logical axis names of an array of `shape` to a PartitionSpec on `mesh`.

  A mesh axis is used at most once per array, and only where it divides the dimension.
  """
  table: Dict[str, object] = dict(rules)
  used = set()
  out = []
  for name, size in zip(logical, shape):
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
      used.update(axes)
      out.append(axes[0] if len(axes) == 1 else axes)
    else:
      out.append(None)
  return PartitionSpec(*out)


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
  """Leading (batch) axis over the batch mesh axes, the rest replicated."""
  target = dict(rules)["batch"]
  axes = (target,) if isinstance(target, str) else tuple(target)
  return NamedSharding(mesh, PartitionSpec(axes, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def maybe_initialize_distributed(c) -> None:
  """jax.distributed: explicit coordinator flags (GPU clusters, localhost tests) or, on TPU
  pods and SLURM, JAX's own auto-detection. Single-process runs skip it."""
  import os
  d = c.distributed
  if d.coordinator:
    jax.distributed.initialize(coordinator_address=d.coordinator, num_processes=d.num_processes,
                               process_id=d.process_id)
  elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("SLURM_NTASKS", "1") != "1":
    jax.distributed.initialize()
