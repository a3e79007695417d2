"""The README's first command: `python -m detailflow_jax` writes its PNGs."""
import numpy as np
from PIL import Image

from detailflow_jax.__main__ import main


def test_embedded_default_run(tmp_path, capsys):
  assert main(["--workdir", str(tmp_path / "qs")]) == 0
  for name in ("reconstruction_strip.png", "samples.png", "samples_coarse_to_fine.png"):
    img = np.asarray(Image.open(tmp_path / "qs" / name))
    assert img.ndim == 3 and img.shape[2] == 3 and img.std() > 0, name
  assert "PNGs are in" in capsys.readouterr().out
  assert main(["--workdir", str(tmp_path / "x"), "--fixture", str(tmp_path / "nothing")]) == 2
