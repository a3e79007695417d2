"""notebooks/sampling_demo.ipynb end to end on the bundled tiny checkpoints, offline: its
one-command Hub path, against a Hub cache holding the fixture runs under the released names.

Parameters are injected the way papermill does it (a cell after the one tagged "parameters"),
and the kernel is this interpreter's ipykernel, registered in a temporary kernelspec directory
so that the test needs no `jupyter kernelspec install` and works in any fresh virtualenv.
"""
import json
import os
import pathlib
import socket
import sys

import hub_helpers as hh
import numpy as np
import pytest
from PIL import Image

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "sampling_demo.ipynb"
KERNEL = "detailflow-jax-test"


def inject_parameters(nb, values: dict):
  """Inserts an "injected-parameters" cell right after the cell tagged "parameters"."""
  index = next(i for i, cell in enumerate(nb.cells)
               if "parameters" in cell.get("metadata", {}).get("tags", []))
  source = "# Parameters\n" + "".join(f"{k} = {v!r}\n" for k, v in values.items())
  cell = nbformat.v4.new_code_cell(source)
  cell.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(index + 1, cell)
  return nb


def register_kernel(root: pathlib.Path) -> None:
  """A kernelspec running `sys.executable -m ipykernel_launcher`, found through JUPYTER_PATH."""
  spec_dir = root / "kernels" / KERNEL
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "detailflow_jax test", "language": "python"}))


def stream_text(nb) -> str:
  return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                 for out in cell.get("outputs", []) if out.get("output_type") == "stream")


def test_notebook_runs_offline_on_the_fixture(tmp_path, monkeypatch):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
  for name in ("TOKENIZER_SRC", "GPT_SRC", "OFFLINE", "LABELS", "CFG_SCALE", "NUM_IMAGES", "OUT_DIR",
               "LAUNCH_APP", "APP_SHARE", "APP_PORT", "APP_MAX_BATCH"):
    assert f"\n{name} = " in "\n" + params.source, name
  out_dir = tmp_path / "out"
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  hf_home = tmp_path / "hf_home"
  hh.add_snapshot(hf_home / "hub", hh.TOKENIZER_REPO, hh.tokenizer_files())
  hh.add_snapshot(hf_home / "hub", hh.GPT_REPO, hh.gpt_files())
  inject_parameters(nb, dict(
      TOKENIZER_SRC=hh.TOKENIZER_REPO, GPT_SRC=hh.GPT_REPO,
      OFFLINE=True, LABELS="0, 3, 1", CFG_SCALE=1.5, NUM_IMAGES=2, OUT_DIR=str(out_dir),
      TIMING_REPEATS=2, REPO_URL="", LAUNCH_APP=True, APP_SHARE=False, APP_PORT=port,
      APP_MAX_BATCH=2))
  nb.cells.append(nbformat.v4.new_code_cell(
      'import sys\nprint("huggingface_hub imported:", "huggingface_hub" in sys.modules)'))
  # the app cell's server answers a request (then closes)
  nb.cells.append(nbformat.v4.new_code_cell(
      "from gradio_client import Client\n"
      f"client = Client('http://127.0.0.1:{port}/', verbose=False)\n"
      "result = client.predict('1', 2, 1.5, False, 1.0, 0, 1.0, 32, 3, api_name='/generate')\n"
      "print('app result:', result[0])\n"
      "client.close()\ndemo_page.close()"))

  register_kernel(tmp_path / "jupyter")
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  # the install cell finds the package: nothing is installed
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("HF_HOME", str(hf_home))
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the notebook's OFFLINE sets it
  monkeypatch.delenv("DETAILFLOW_JAX_CACHE", raising=False)
  work = tmp_path / "cwd"
  work.mkdir()
  client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=300,
                                   resources={"metadata": {"path": str(work)}})
  client.execute()

  text = stream_text(nb)
  assert "detailflow_jax is importable: nothing to install" in text
  assert "downloading" not in text
  assert f"gpt: converting {hh.GPT_REPO}@" in text
  assert "(ema weights: the reference's evaluation default)" in text  # the .pt has an EMA copy
  assert "(model weights: the reference's evaluation default)" in text  # the tokenizer
  assert len(list((hf_home / "detailflow_jax").rglob("source.json"))) == 2
  assert "sampled 6 x 32 tokens" in text
  assert "sampling: " in text and "images/s" in text
  for name in ("samples.png", "coarse_to_fine.png"):
    img = np.asarray(Image.open(out_dir / name))
    assert img.ndim == 3 and img.shape[2] == 3 and img.std() > 0, name
  grid = np.asarray(Image.open(out_dir / "samples.png"))
  assert grid.shape[0] >= 3 * 64 and grid.shape[1] >= 2 * 64  # 3 classes x 2 images
  strip = np.asarray(Image.open(out_dir / "coarse_to_fine.png"))
  assert strip.shape[0] >= 3 * 64 and strip.shape[1] >= 11 * 64  # t = 1, 2, 3, 4, 8, ..., 32
  timing = json.loads((out_dir / "timing.json").read_text())
  assert timing["batch"] == 6 and timing["sample_images_per_s"] > 0
  images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) == 2
  assert "huggingface_hub imported: True" in text
  assert f"app: serving on http://127.0.0.1:{port}/" in text
  assert "app result: done: 2 image(s), 32 tokens" in text  # Hub ids go through huggingface_hub
