"""What the command-line tools share: integer-list flags (`--labels 207,360`, `--num-tokens
1,4,16`, `--seeds 0,1`), parsed with errors that name the flag, and the persistent XLA
compilation cache the inference commands (sample, reconstruct, generate, evaluate) turn on."""
import os
import pathlib
from typing import List, Optional


def int_list(text: str, flag: str, *, low: Optional[int] = None, high: Optional[int] = None,
             distinct: bool = False) -> List[int]:
  """Comma-separated integers, each in [low, high] (an open end where None), all different
  with distinct=True. Raises ValueError naming `flag` and the offending values."""
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None
  if not values:
    raise ValueError(f"{flag} is empty")
  bad = [v for v in values if (low is not None and v < low) or (high is not None and v > high)]
  if bad:
    bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
    raise ValueError(f"{flag} values {bad} are outside {bounds}")
  if distinct and len(set(values)) != len(values):
    raise ValueError(f"{flag} values must be distinct, got {text!r}")
  return values


# --- persistent XLA compilation cache ------------------------------------------------------

COMPILE_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"  # JAX's own variable; the tests set it
COMPILE_CACHE_SUBDIR = "xla_compilation_cache"


def add_compile_cache_flags(parser) -> None:
  """--compile-cache DIR / --no-compile-cache on a command's parser (see use_compile_cache)."""
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--compile-cache", default=None, metavar="DIR",
                     help="persistent XLA compilation cache: a rerun loads its compiled programs "
                          f"instead of compiling them (default: ${COMPILE_CACHE_ENV} if set, else "
                          f"{COMPILE_CACHE_SUBDIR}/ under the package cache directory, "
                          "$DETAILFLOW_JAX_CACHE or $HF_HOME/detailflow_jax)")
  group.add_argument("--no-compile-cache", action="store_true",
                     help="compile every program afresh (no persistent compilation cache)")


def use_compile_cache(args, package_cache_dir) -> Optional[str]:
  """Turns JAX's persistent compilation cache on for this process, as `args` (from
  add_compile_cache_flags) say: --compile-cache DIR, else $JAX_COMPILATION_CACHE_DIR, else
  `package_cache_dir`/xla_compilation_cache; off with --no-compile-cache. Returns the directory
  in use (None: off). Call before the first jit compiles: a cached executable is the one the
  compile would give (results do not change), only compile time is saved. Programs that compile
  in under a second are not stored (JAX's threshold: reading them back would not pay)."""
  import jax
  if args.no_compile_cache:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  directory = args.compile_cache or os.environ.get(COMPILE_CACHE_ENV) or str(
      pathlib.Path(package_cache_dir) / COMPILE_CACHE_SUBDIR)
  directory = str(pathlib.Path(directory).expanduser())
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--compile-cache {directory}: cannot create it ({e})") from None
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", directory)
  return directory
