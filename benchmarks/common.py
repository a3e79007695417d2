"""Helpers shared by the benchmarks: a matmul roofline, timing, peak RSS."""
import resource
import time

import jax
import jax.numpy as jnp


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_device_memory_mb():
  """Peak bytes the default device's allocator has held (GPU/TPU), or None where the backend
  keeps no such statistic (CPU: see peak_rss_mb)."""
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2 ** 20


def matmul_flops_per_s(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
  """Achievable FLOP/s of one jitted n x n matmul on the default device (best of `repeats`)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


def compiled_flops(compiled) -> float:
  """FLOPs XLA counts for one call of a compiled function."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", 0.0))


def time_call(fn, *args, repeats: int = 3) -> float:
  """Best wall time of `repeats` calls (after the caller has compiled and warmed up)."""
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def add_side_by_side_flags(parser) -> None:
  """The flags of a benchmark run side by side with the PyTorch reference (its own process,
  imported from a source tree at run time): --quick, --reference-dir, --reference-python, --rounds."""
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--reference-dir", default=None,
                      help="ByteFlow-AI/DetailFlow source tree (commit c5f06cd)")
  parser.add_argument("--reference-python", default=None,
                      help="python with torch, transformers, timm, einops, pyyaml, safetensors")
  parser.add_argument("--rounds", type=int, default=None)
