"""`python -m detailflow_jax.sample` end to end on the fixture: exact greedy tokens, PNGs."""
import jax
import numpy as np
from gpt_helpers import converted_gpt_dir, fixture_sampler, loaded_gpt
from PIL import Image

from detailflow_jax import sample as sample_cli
from detailflow_jax.inference.sampler import SamplingOptions
from detailflow_jax.inference.tokenizer import TokenizerFns


def test_greedy_samples_decode_like_the_reference(tmp_path_factory, tokenizer, golden):
  tokens = fixture_sampler(tmp_path_factory).sample(
      loaded_gpt(tmp_path_factory), golden["gen_labels"][:1], jax.random.key(0),
      SamplingOptions(cfg_scale=1.5, greedy=True))
  image = np.asarray(TokenizerFns(tokenizer).decode(tokens))
  np.testing.assert_allclose(image, golden["gen_decode_first"].transpose(0, 2, 3, 1), atol=1e-3)


def test_cli_writes_exact_tokens_grid_and_progressive_strip(tmp_path, tmp_path_factory,
                                                            tokenizer_dir, golden, capsys):
  labels = ",".join(str(v) for v in golden["gen_labels"])
  args = ["--tokenizer", str(tokenizer_dir), "--gpt", str(converted_gpt_dir(tmp_path_factory)),
          "--labels", labels, "--greedy", "--out", str(tmp_path / "grid.png")]
  for name, extra in [("cfg1p5", ["--cfg-scale", "1.5"]),
                      ("cfg1p5_gradual", ["--cfg-scale", "1.5", "--gradual-cfg"]),
                      ("cfg4", ["--cfg-scale", "4.0", "--progressive", str(tmp_path / "strip.png")])]:
    tokens_path = tmp_path / f"{name}.npy"
    assert sample_cli.main(args + extra + ["--save-tokens", str(tokens_path)]) == 0
    saved = np.load(tokens_path)
    assert saved.dtype == np.int32
    np.testing.assert_array_equal(saved, golden[f"gen_tokens_{name}"])
  out = capsys.readouterr().out
  assert "sampled 4 x 32 tokens" in out and "wrote" in out
  grid = np.asarray(Image.open(tmp_path / "grid.png"))
  assert grid.shape[0] >= 64 and grid.shape[1] >= 4 * 64
  strip = np.asarray(Image.open(tmp_path / "strip.png"))
  # one row per image; columns t = 1, 2, 3, 4, 8, ..., 32 (11 decodes)
  assert strip.shape[0] >= 4 * 64 and strip.shape[1] >= 11 * 64


def test_cli_token_budget_and_bad_labels(tmp_path, tmp_path_factory, tokenizer_dir, capsys):
  base = ["--tokenizer", str(tokenizer_dir), "--gpt", str(converted_gpt_dir(tmp_path_factory)),
          "--out", str(tmp_path / "g.png")]
  assert sample_cli.main(base + ["--labels", "1,2", "--num-tokens", "8", "--top-k", "5",
                                 "--seed", "3", "--save-tokens", str(tmp_path / "t.npy")]) == 0
  assert np.load(tmp_path / "t.npy").shape == (2, 8)
  assert sample_cli.main(base + ["--labels", "1,99"]) == 2
  assert "--labels values [99] are outside [0, 9]" in capsys.readouterr().err
