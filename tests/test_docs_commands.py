"""Every command the README and docs/ show still runs: each `python -m detailflow_jax.X`,
`python -m benchmarks.X` and `launch/*.py` answers `--help` (absl's `--help` prints the usage
and exits 1 by design: its usage text is checked instead), and each
`--config=configs/FILE.py[:variant]` builds its config."""
import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "notebooks").glob("*.ipynb"))]


def _found(pattern: str):
  return sorted({m.group(1) for page in PAGES for m in re.finditer(pattern, page.read_text())})


MODULES = _found(r"python -m (detailflow_jax(?:\.[a-z_]+)*|benchmarks(?:\.[a-z_]+)+)")
SCRIPTS = _found(r"\b(launch/[a-z_/]+\.py)\b")
CONFIGS = _found(r"--config=(configs/[a-z0-9_]+\.py(?::[a-z0-9_]+(?![\w./]))?)")


def test_the_pages_name_commands():
  assert "detailflow_jax.demo" in MODULES and "detailflow_jax.generate" in MODULES
  assert "launch/train.py" in SCRIPTS and "configs/detailflow16_gpt_l.py:eval" in CONFIGS


@pytest.mark.parametrize("module", MODULES)
def test_module_answers_help(module):
  run = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, f"python -m {module} --help:\n{run.stdout}\n{run.stderr}"
  assert "usage" in run.stdout.lower(), run.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_answers_help(script):
  assert (ROOT / script).is_file(), f"{script} is named in the docs but does not exist"
  run = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  absl_usage = run.returncode == 1 and "Try --helpfull" in run.stdout
  assert run.returncode == 0 or absl_usage, f"{script} --help:\n{run.stdout}\n{run.stderr}"
  assert "Traceback" not in run.stderr and script.split("/")[-1] in run.stdout, run.stdout


@pytest.mark.parametrize("config", CONFIGS)
def test_config_builds(config):
  path, _, variant = config.partition(":")
  spec = importlib.util.spec_from_file_location(f"_docs_config_{pathlib.Path(path).stem}", ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not variant and "PATH" in module.__doc__:  # a file argument (from_reference.py:PATH.yaml)
    with pytest.raises(ValueError, match="--config="):
      module.get_config(variant)
    return
  c = module.get_config(variant)
  assert c.get("task"), f"{config}: no task"
