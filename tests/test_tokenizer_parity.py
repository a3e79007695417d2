"""The converted fixture tokenizer reproduces the PyTorch reference number for number."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY

from detailflow_jax.convert.common import load_state_dict
from detailflow_jax.convert.tokenizer import convert_state_dict, load_reference_config
from detailflow_jax.inference.tokenizer import TokenizerFns

ENC_ATOL = 1e-4
QUANT_ATOL = 1e-5
PIX_ATOL = 1e-4


def _nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def fns(tokenizer):
  return TokenizerFns(tokenizer)


def test_position_tables_resized_like_torch(tokenizer, golden):
  enc = tokenizer.encoder.visual_model.embeddings
  dec = tokenizer.decoder.visual_model.embeddings
  np.testing.assert_allclose(enc.positions(8, 8)[None], golden["posemb_enc_8x8"], atol=1e-6)
  for g in (1, 2, 3, 5, 8):
    np.testing.assert_allclose(dec.positions(g, g)[None], golden[f"posemb_dec_{g}x{g}"], atol=1e-6)


def test_patch_embedding(tokenizer, golden, golden_images_nhwc):
  emb = tokenizer.encoder.visual_model.embeddings.embed_patches(jnp.asarray(golden_images_nhwc))
  np.testing.assert_allclose(emb, golden["tok_enc_patch_embed_full"], atol=1e-5)


def test_encoder_outputs(tokenizer, golden, golden_images_nhwc):
  latents, patches = tokenizer.encoder(jnp.asarray(golden_images_nhwc))
  np.testing.assert_allclose(latents, golden["tok_enc_latent_full"], atol=ENC_ATOL)
  np.testing.assert_allclose(patches, golden["tok_enc_patch_hidden_full"], atol=ENC_ATOL)


def test_quantization(tokenizer, golden, golden_images_nhwc):
  out = tokenizer.encode(jnp.asarray(golden_images_nhwc))
  np.testing.assert_allclose(out.latents, golden["tok_quant_conv_full"], atol=ENC_ATOL)
  np.testing.assert_array_equal(out.indices, golden["tok_indices_full"])
  np.testing.assert_allclose(out.quant, golden["tok_quant_full"], atol=QUANT_ATOL)
  np.testing.assert_allclose(tokenizer.quantize.lookup(out.indices),
                             golden["tok_codebook_entries_full"], atol=QUANT_ATOL)
  np.testing.assert_allclose(tokenizer.quantize.codebook(), golden["tok_codebook_normalized"],
                             atol=QUANT_ATOL)


def test_full_and_partial_decodes(fns, tokenizer, golden, golden_images_nhwc):
  indices, quant = fns.encode(golden_images_nhwc)
  full = tokenizer.decode(quant, image_size=64)
  np.testing.assert_allclose(full, _nhwc(golden["tok_decode_full"]), atol=PIX_ATOL)
  np.testing.assert_allclose(fns.decode(indices), _nhwc(golden["tok_decode_code_full"]), atol=PIX_ATOL)
  np.testing.assert_allclose(tokenizer(jnp.asarray(golden_images_nhwc)),
                             _nhwc(golden["tok_decode_full"]), atol=PIX_ATOL)
  for t in golden["tok_partial_ts"].tolist():
    want = _nhwc(golden[f"tok_partial_decode_t{t}"])
    got = fns.decode(indices, t)  # resolution chosen by the schedule
    assert got.shape == want.shape, t
    np.testing.assert_allclose(got, want, atol=PIX_ATOL, err_msg=f"t={t}")


def test_decode_in_score_tiles_matches_the_reference(monkeypatch, tokenizer, golden):
  """The tiled attention (models/attention.SCORE_TILE_BYTES) gives the reference's pixels: a
  budget of 16 queries' scores (4 heads x 96 keys x 4 bytes each) splits the fixture decoder's
  attention into blocks of 16 queries of one image."""
  import detailflow_jax.models.attention as attention
  monkeypatch.setitem(attention.SCORE_TILE_BYTES, jax.default_backend(), 16 * 4 * 96 * 4)
  quant = jnp.asarray(golden["tok_quant_full"])
  decode = lambda q: tokenizer.decode(q, image_size=64)
  assert "scan" in str(jax.make_jaxpr(decode)(quant))
  np.testing.assert_allclose(jax.jit(decode)(quant), _nhwc(golden["tok_decode_full"]),
                             atol=PIX_ATOL)


def test_prefix_decodes_one_program_per_resolution(tokenizer, golden, golden_images_nhwc):
  """decode_prefix (the prefix padded to its resolution's bucket, the padding masked) gives the
  reference's partial decodes, and one program serves every count at a resolution."""
  fns = TokenizerFns(tokenizer)  # its own trace counter
  indices, _ = fns.encode(golden_images_nhwc)
  ts = golden["tok_partial_ts"].tolist()
  for t in ts:
    got = fns.decode_prefix(indices, t)
    np.testing.assert_allclose(got, _nhwc(golden[f"tok_partial_decode_t{t}"]), atol=PIX_ATOL, err_msg=f"t={t}")
  sides = {tokenizer.schedule.decode_resolution(t) for t in ts}
  assert fns.decode_prefix_traces == len(sides) >= 3
  for t in (2, 5, 6):  # inside the buckets above: no new program, the direct decode's pixels
    assert tokenizer.schedule.decode_resolution(t) in sides
    np.testing.assert_allclose(fns.decode_prefix(indices[:, :t]), fns.decode(indices, t), atol=1e-5)
  assert fns.decode_prefix_traces == len(sides)


def test_shorter_encoding(fns, tokenizer, golden, golden_images_nhwc):
  m = int(golden["tok_enc_partial_max_tokens"])
  latents, _ = tokenizer.encoder(jnp.asarray(golden_images_nhwc), m)
  np.testing.assert_allclose(latents, golden["tok_enc_partial_latent"], atol=ENC_ATOL)
  indices, _ = fns.encode(golden_images_nhwc, m)
  np.testing.assert_array_equal(indices, golden["tok_enc_partial_indices"])


@pytest.mark.parametrize("case", ["refine0", "refine1"])
def test_refine_path(tokenizer, golden, golden_images_nhwc, case):
  cur_max, noise_idx, noise_num, noise_end = golden[f"{case}_params"].tolist()
  prefix = tokenizer.quantize.lookup(jnp.asarray(golden[f"{case}_prefix_indices"]))
  np.testing.assert_allclose(prefix, golden[f"{case}_prefix"], atol=QUANT_ATOL)
  np.testing.assert_allclose(tokenizer.refine_conv(prefix), golden[f"{case}_noise_token"], atol=ENC_ATOL)
  latents, _ = tokenizer.encoder(jnp.asarray(golden_images_nhwc), cur_max,
                                 tokenizer.refine_conv(prefix))
  np.testing.assert_allclose(latents, golden[f"{case}_latent"], atol=ENC_ATOL)
  out = tokenizer.refine(jnp.asarray(golden_images_nhwc), prefix, cur_max)
  np.testing.assert_allclose(out.latents, golden[f"{case}_quant_conv"], atol=ENC_ATOL)
  np.testing.assert_array_equal(out.indices, golden[f"{case}_indices"])
  assert noise_num == tokenizer.schedule.noise_span(noise_idx) and noise_end == noise_idx + noise_num


def test_self_correct_bookkeeping(tokenizer, golden_images_nhwc):
  """The self-correction triple follows the reference's index rules."""
  images = jnp.asarray(golden_images_nhwc)
  clean = tokenizer.encode(images).indices
  for noise_idx in (2, 8):  # inside the causal prefix (1 token), then a whole group
    out = tokenizer.self_correct(images, noise_idx, jax.random.key(noise_idx), top_k=5)
    end = int(out.noise_end)
    assert end == noise_idx + (1 if noise_idx < 4 else 4)
    np.testing.assert_array_equal(out.clean.indices, clean)
    np.testing.assert_array_equal(out.inputs[:, :noise_idx], clean[:, :noise_idx])
    np.testing.assert_array_equal(out.targets[:, :end], clean[:, :end])
    np.testing.assert_array_equal(out.inputs[:, end:], out.targets[:, end:])
    # The noisy span holds codes among the 5 nearest to the clean latents.
    d = tokenizer.quantize(tokenizer.encode(images).latents).distances
    top5 = np.argsort(np.asarray(d), axis=-1)[..., :5]
    span = np.asarray(out.inputs[:, noise_idx:end])
    assert all(span[b, j] in top5[b, noise_idx + j] for b in range(2) for j in range(span.shape[1]))
    refined = tokenizer.refine(images, tokenizer.quantize.lookup(out.inputs[:, :end]))
    np.testing.assert_array_equal(out.targets[:, end:], refined.indices[:, end:])


def test_ema_weights(tmp_path, golden, golden_images_nhwc):
  cfg = load_reference_config(TINY / "tokenizer")
  state = load_state_dict(TINY / "tokenizer" / "checkpoints" / "tokenizer.pt", weights="ema")
  model = convert_state_dict(cfg, state, "ema")
  np.testing.assert_allclose(model.encode(jnp.asarray(golden_images_nhwc)).latents,
                             golden["ema_tok_quant_conv_full"], atol=ENC_ATOL)


def test_bfloat16_conversion_runs_close(tmp_path, golden, golden_images_nhwc):
  from detailflow_jax.convert.tokenizer import convert_tokenizer
  from detailflow_jax.weights.load import load_tokenizer
  out = convert_tokenizer(TINY / "tokenizer" / "checkpoints" / "tokenizer.pt", tmp_path / "bf16",
                          dtype="bfloat16")
  model = load_tokenizer(out)
  assert model.quant_conv.kernel.dtype == jnp.bfloat16
  pixels = model(jnp.asarray(golden_images_nhwc))
  assert pixels.dtype == jnp.bfloat16
  err = np.abs(np.asarray(pixels, np.float32) - _nhwc(golden["tok_decode_full"])).mean()
  assert err < 0.1, err
