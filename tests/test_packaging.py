"""`pip install .` gives a package that works outside the checkout: it imports from the install
target with the working directory elsewhere, its CLIs start, and run configs (files loaded by
path, as `--config=configs/x.py` does) build on the installed package alone."""
import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHECK = """
import importlib.util, sys
import detailflow_jax, detailflow_jax.sharding, detailflow_jax.train.ar, detailflow_jax.data.pipeline
assert detailflow_jax.__file__.startswith(sys.argv[1]), detailflow_jax.__file__
spec = importlib.util.spec_from_file_location("run_config", sys.argv[2])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print("config", len(module.get_config("tiny").to_dict()))
from detailflow_jax.demo.run import load_demo_config
print("demo", len(load_demo_config("quick").to_dict()))
"""


def test_installed_package_works_outside_the_checkout(tmp_path):
  # Build from a copy of what the distribution holds, so the checkout gets no build/ folder.
  source = tmp_path / "source"
  shutil.copytree(ROOT / "detailflow_jax", source / "detailflow_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, source / name)
  target = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                  "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
  assert not (target / "tests").exists() and not (target / "configs").exists()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(PYTHONPATH=str(target), JAX_PLATFORMS="cpu", XLA_FLAGS="")
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  run = lambda *args: subprocess.run([sys.executable, *args], cwd=elsewhere, env=env,
                                     capture_output=True, text=True, timeout=300)
  out = run("-c", CHECK, str(target), str(ROOT / "configs" / "detailflow16_gpt_l.py"))
  assert out.returncode == 0, out.stderr[-3000:]
  assert "config " in out.stdout and "demo " in out.stdout
  out = run("-m", "detailflow_jax.convert", "--help")
  assert out.returncode == 0 and "--checkpoint" in out.stdout, out.stderr[-2000:]
  # The quick-start's default fixture lives in the checkout: outside it, a clear error.
  out = run("-m", "detailflow_jax", "--workdir", str(tmp_path / "qs"))
  assert out.returncode == 2 and "pass --fixture" in out.stderr
