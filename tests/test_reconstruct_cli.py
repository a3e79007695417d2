"""The reconstruct CLI reproduces the golden indices and partial decodes from the fixture PNGs."""
import numpy as np
from conftest import TINY
from PIL import Image

from detailflow_jax.reconstruct import main


def test_cli_matches_goldens(tokenizer_dir, golden, tmp_path, capsys):
  out = tmp_path / "strip.png"
  args = ["--tokenizer", str(tokenizer_dir), "--images",
          str(TINY / "images" / "input_0.png"), str(TINY / "images" / "input_1.png"),
          "--num-tokens", "1,3,4,8,16,32", "--out", str(out),
          "--save-indices", str(tmp_path / "idx.npy"), "--save-pixels", str(tmp_path / "pix.npz")]
  assert main(args) == 0
  indices = np.load(tmp_path / "idx.npy")
  assert indices.dtype == np.int32
  np.testing.assert_array_equal(indices, golden["tok_indices_full"])
  pixels = np.load(tmp_path / "pix.npz")
  assert sorted(pixels.files) == sorted(f"t{t}" for t in (1, 3, 4, 8, 16, 32))
  for t in (1, 3, 4, 8, 16):
    np.testing.assert_allclose(pixels[f"t{t}"], golden[f"tok_partial_decode_t{t}"].transpose(0, 2, 3, 1),
                               atol=1e-4)
  np.testing.assert_allclose(pixels["t32"], golden["tok_decode_code_full"].transpose(0, 2, 3, 1), atol=1e-4)
  strip = np.asarray(Image.open(out))
  # 2 rows x (input + 6 decodes) of 64 px cells with 2 px padding.
  assert strip.shape == (2 * 64 + 3 * 2, 7 * 64 + 8 * 2, 3)
  assert "wrote" in capsys.readouterr().out


def test_cli_bad_arguments(tokenizer_dir, tmp_path, capsys):
  img = str(TINY / "images" / "input_0.png")
  assert main(["--tokenizer", str(tokenizer_dir), "--images", img, "--num-tokens", "0,99",
               "--out", str(tmp_path / "x.png")]) == 2
  assert "outside [1, 32]" in capsys.readouterr().err
  assert main(["--tokenizer", str(tokenizer_dir), "--images", str(tmp_path / "missing.png"),
               "--out", str(tmp_path / "x.png")]) == 2
  assert "image not found" in capsys.readouterr().err
  assert main(["--tokenizer", str(tmp_path), "--images", img]) == 2
  assert "not a converted model directory" in capsys.readouterr().err
  assert not (tmp_path / "x.png").exists()
