"""What the commands share: the one command runner (`command`: logging set-up, and a user's
mistake -> `error: ...` on stderr and exit status 2), integer-list flags (`--labels 207,360`,
`--num-tokens 1,4,16`, `--seeds 0,1`) parsed with errors that name the flag, progress lines
(a text bar and an ETA that read the same in a log file), the absl entry point of
launch/*.py (`launch_main`), and the persistent XLA compilation cache the inference commands
(sample, reconstruct, generate, evaluate) turn on (`add_compile_cache_flags`,
`use_compile_cache`)."""
import functools
import logging
import os
import pathlib
import sys
from collections.abc import Callable

# What a command reports as a one-line error rather than a traceback: every error class of the
# package that describes bad input (a config key, a file, a shape) derives from ValueError.
USER_ERRORS = (FileNotFoundError, ValueError)


def setup_logging(fmt: str = "%(asctime)s %(message)s") -> None:
  """INFO for the package, WARNING for absl (Orbax logs every file it writes). `force`: an
  imported library may already have put a handler on the root logger."""
  logging.basicConfig(level=logging.INFO, format=fmt, datefmt="%H:%M:%S", force=True)
  logging.getLogger("detailflow_jax").setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)


def command(body: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
  """Wraps a command's `main(argv)`: logging set up, USER_ERRORS printed as `error: MESSAGE`
  with exit status 2 (argparse's own usage errors keep theirs), 0 when the body returns None."""
  @functools.wraps(body)
  def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
      status = body(argv)
    except USER_ERRORS as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    return 0 if status is None else status
  return main


def int_list(text: str, flag: str, *, low: int | None = None, high: int | None = None,
             distinct: bool = False) -> list[int]:
  """Comma-separated integers (or an int, or a sequence of them: config values), each in
  [low, high] (an open end where None), all different with distinct=True. Raises ValueError
  naming `flag` and the offending values."""
  if isinstance(text, int):
    text = str(text)
  elif not isinstance(text, str):
    text = ",".join(str(v) for v in text)
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


def format_duration(seconds: float) -> str:
  """H:MM:SS (an ETA or an elapsed time)."""
  s = int(max(seconds, 0))
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_bar(done: int, total: int, width: int = 20) -> str:
  """'[#####...............]  25%' (a text bar that reads the same in a log file)."""
  frac = min(max(done / max(total, 1), 0.0), 1.0)
  filled = int(frac * width)
  return f"[{'#' * filled}{'.' * (width - filled)}] {frac:4.0%}"


def launch_main(run: Callable[..., None], *, config_help: str, workdir_help: str,
                usage_errors=(ValueError,)) -> None:
  """The one absl entry point of launch/*.py: `--config=FILE[:variant]` (an ml_collections
  config file loaded by path, overridable with `--config.key=value`) and `--workdir=DIR`, then
  `run(config, workdir)`. An error of `usage_errors` raised before anything runs (a bad
  config) is shown as a usage error."""
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
  flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["config", "workdir"])

  def _main(argv):
    del argv
    setup_logging("%(asctime)s %(levelname)s %(message)s")
    try:
      run(flags.FLAGS.config, flags.FLAGS.workdir)
    except usage_errors as e:
      raise app.UsageError(str(e))

  app.run(_main)


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


def use_compile_cache(args, package_cache_dir) -> str | None:
  """Turns JAX's persistent compilation cache on for this process, as `args` (from
  add_compile_cache_flags) say: --compile-cache DIR, else $JAX_COMPILATION_CACHE_DIR, else
  `package_cache_dir`/xla_compilation_cache; off with --no-compile-cache. Returns the directory
  in use (None: off). Call before the first jit compiles: a cached executable is the one the
  compile would give (results do not change), only compile time is saved. Every program is
  stored, however fast it compiled: JAX's default threshold (1 s) leaves out the dozens of small
  programs (weight conversion, decode, eager ops) whose compiles add up to seconds of a start."""
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
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return directory
