"""The one absl entry point of launch/*.py: `--config=FILE[:variant]` (an ml_collections config
file loaded by path, overridable with `--config.key=value`) and `--workdir=DIR`, INFO logging
for the package (absl's own quieted: Orbax logs every file it writes), then `run(config, workdir)`.
A ValueError raised before anything runs (a bad config) is shown as a usage error."""
import logging
from typing import Callable

from absl import app, flags
from ml_collections import config_flags


def main(run: Callable[..., None], *, config_help: str, workdir_help: str,
         usage_errors=(ValueError,)) -> None:
  """Defines the two flags, parses argv and calls run(config, workdir)."""
  config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
  flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["config", "workdir"])

  def _main(argv):
    del argv
    logging.getLogger("detailflow_jax").setLevel(logging.INFO)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
      run(flags.FLAGS.config, flags.FLAGS.workdir)
    except usage_errors as e:
      raise app.UsageError(str(e))

  app.run(_main)
