"""Frozen / pretrained networks: LPIPS, the DINO and PatchGAN discriminators, SigLIP2 towers.

Each network is checked against a small PyTorch module written here with the published key
layout and the reference's math (torchvision / timm / transformers are not used), random weights
saved to a temporary file and converted.
"""
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from safetensors.torch import save_file
from torch import nn

from detailflow_jax.convert.common import ConversionError
from detailflow_jax.convert.frozen import (
  MissingWeightsError,
  dino_discriminator_from_torch,
  dino_values,
  init_encoder_from_siglip2,
  load_dino_heads,
  load_patchgan,
  load_teacher_from_siglip2,
  lpips_from_torch,
  siglip2_tower_from_file,
  siglip2_weights,
)
from detailflow_jax.models.dino import DinoDiscriminator
from detailflow_jax.models.frozen import TRAINABLE, Frozen
from detailflow_jax.models.patchgan import PatchGANDiscriminator
from detailflow_jax.models.tokenizer import Tokenizer, TokenizerConfig
from detailflow_jax.models.vit import ViTConfig

TOL = 1e-4
# The trainer's split: the DINO backbone is frozen by Variable type, heads are trainable Params.
FROZEN = Frozen


def _nchw(x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def _images(seed, b, s):
  return np.random.RandomState(seed).uniform(-1, 1, (b, s, s, 3)).astype(np.float32)


def _randomize(module, seed):
  """Random weights everywhere, including norms (their defaults would hide layout mistakes)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim > 1 else 0.2)
              + (1.0 if name.endswith(("norm1.weight", "norm2.weight", "layer_norm1.weight",
                                       "layer_norm2.weight", "post_layernorm.weight")) else 0.0))


# --- LPIPS --------------------------------------------------------------------------------------

WIDTHS = (4, 8, 8, 16, 16)


def torch_vgg_features(widths):
  layers, cin = [], 3
  for stage, (w, n) in enumerate(zip(widths, (2, 2, 3, 3, 3))):
    if stage:
      layers.append(nn.MaxPool2d(2, 2))
    for _ in range(n):
      layers += [nn.Conv2d(cin, w, 3, padding=1), nn.ReLU()]
      cin = w
  return nn.Sequential(*layers)


class TorchLPIPS(nn.Module):
  """The reference's LPIPS module tree (net.slice*, lin*.model.1, scaling_layer) and math."""

  def __init__(self, widths):
    super().__init__()
    self.features = torch_vgg_features(widths)
    self.scaling_layer = nn.Module()
    self.scaling_layer.register_buffer("shift", torch.tensor([-.030, -.088, -.188])[None, :, None, None])
    self.scaling_layer.register_buffer("scale", torch.tensor([.458, .448, .450])[None, :, None, None])
    self.net = nn.Module()
    for k, (a, b) in enumerate(((0, 4), (4, 9), (9, 16), (16, 23), (23, 30)), start=1):
      setattr(self.net, f"slice{k}", nn.Sequential(*[self.features[i] for i in range(a, b)]))
    for k, w in enumerate(widths):
      lin = nn.Module()
      lin.model = nn.Sequential(nn.Dropout(), nn.Conv2d(w, 1, 1, bias=False))
      setattr(self, f"lin{k}", lin)

  def forward(self, x, y):
    sl = self.scaling_layer
    fx, fy = (x - sl.shift) / sl.scale, (y - sl.shift) / sl.scale
    total = 0.0
    for k in range(5):
      sl = getattr(self.net, f"slice{k + 1}")
      fx, fy = sl(fx), sl(fy)
      nx = fx / (torch.sqrt(torch.sum(fx ** 2, 1, keepdim=True)) + 1e-10)
      ny = fy / (torch.sqrt(torch.sum(fy ** 2, 1, keepdim=True)) + 1e-10)
      total = total + getattr(self, f"lin{k}").model((nx - ny) ** 2).mean([2, 3], keepdim=True)
    return total


@pytest.fixture(scope="module")
def torch_lpips():
  torch.manual_seed(0)
  return TorchLPIPS(WIDTHS).eval()


@pytest.mark.parametrize("layout", ["torchvision+lin", "lpips_module"])
def test_lpips_matches_torch(tmp_path, torch_lpips, layout):
  sd = torch_lpips.state_dict()
  if layout == "torchvision+lin":
    vgg = {k: v for k, v in sd.items() if k.startswith("features.")}
    vgg["classifier.0.weight"] = torch.zeros(3, 3)  # torchvision's head: skipped
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save({k: v for k, v in sd.items() if k.startswith("lin")}, tmp_path / "vgg.pth")
    model = lpips_from_torch(tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
  else:  # one LPIPS module state dict (slices re-indexed from 0, as DetailFlow builds them)
    one = {k: v for k, v in sd.items() if not k.startswith("features.")}
    assert "net.slice2.1.weight" in one and "scaling_layer.shift" in one
    torch.save(one, tmp_path / "lpips.pth")
    model = lpips_from_torch(tmp_path / "lpips.pth")
  x, y = _images(1, 2, 32), _images(2, 2, 32)
  with torch.no_grad():
    want = torch_lpips(_nchw(x), _nchw(y)).numpy().reshape(-1)
  got = np.asarray(nnx.jit(lambda m, a, b: m(a, b))(model, jnp.asarray(x), jnp.asarray(y)))
  assert got.shape == (2,)
  err = np.max(np.abs(got - want))
  print(f"LPIPS[{layout}] max abs err {err:.2e} (values {want})")
  assert err <= TOL * max(1.0, np.max(np.abs(want)))


def test_lpips_gradients_finite(tmp_path, torch_lpips):
  sd = {k: v for k, v in torch_lpips.state_dict().items() if not k.startswith("features.")}
  torch.save(sd, tmp_path / "lpips.pth")
  model = lpips_from_torch(tmp_path / "lpips.pth")
  x = jnp.asarray(_images(3, 2, 32))
  y = jnp.concatenate([x[:1], jnp.zeros_like(x[1:])])  # identical pair -> distance 0
  grad = nnx.jit(lambda m, a: jax.grad(lambda a: jnp.sum(m(a, y)))(a))(model, x)
  assert np.all(np.isfinite(np.asarray(grad)))
  assert float(jnp.abs(grad[1]).sum()) > 0


# --- DINO discriminator -------------------------------------------------------------------------

D, HEADS, DEPTH, PATCH, IMG, KEYS = 32, 2, 3, 8, 32, (0, 2)


class TorchBlock(nn.Module):
  def __init__(self):
    super().__init__()
    self.norm1, self.norm2 = nn.LayerNorm(D, eps=1e-6), nn.LayerNorm(D, eps=1e-6)
    self.attn = nn.Module()
    self.attn.qkv, self.attn.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
    self.mlp = nn.Module()
    self.mlp.fc1, self.mlp.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

  def forward(self, x):
    b, n, _ = x.shape
    q, k, v = self.attn.qkv(self.norm1(x)).view(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, D)
    x = x + self.attn.proj(a)
    return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x)), approximate="tanh"))


class TorchDino(nn.Module):
  """timm / FB DINO key names; forward as the reference's FrozenDINOSmallNoDrop (no crop)."""

  def __init__(self):
    super().__init__()
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(3, D, PATCH, stride=PATCH)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
    self.pos_embed = nn.Parameter(torch.zeros(1, (IMG // PATCH) ** 2 + 1, D))
    self.blocks = nn.Sequential(*[TorchBlock() for _ in range(DEPTH)])
    self.norm = nn.LayerNorm(D, eps=1e-6)

  def forward(self, x):
    m, s = torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))
    x = (0.5 / s).reshape(1, 3, 1, 1) * x + ((0.5 - m) / s).reshape(1, 3, 1, 1)
    if x.shape[-1] != IMG:
      x = F.interpolate(x, size=(IMG, IMG), mode="area" if x.shape[-2] > IMG else "bicubic")
    x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
    acts = [(x[:, 1:] + x[:, :1]).transpose(1, 2)]
    for i, blk in enumerate(self.blocks):
      x = blk(x)
      if i in KEYS:
        acts.append((x[:, 1:] + x[:, :1]).transpose(1, 2))
    return acts


class TorchBatchNormLocal(nn.Module):
  def __init__(self, c, virtual_bs, eps=1e-6):
    super().__init__()
    self.virtual_bs, self.eps = virtual_bs, eps
    self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

  def forward(self, x):
    shape = x.shape
    g = math.ceil(x.shape[0] / self.virtual_bs)
    x = x.view(g, -1, x.shape[-2], x.shape[-1])
    mean, var = x.mean([1, 3], keepdim=True), x.var([1, 3], keepdim=True, unbiased=False)
    x = (x - mean) / torch.sqrt(var + self.eps)
    return (x * self.weight[None, :, None] + self.bias[None, :, None]).view(shape)


class TorchResidual(nn.Module):
  def __init__(self, fn):
    super().__init__()
    self.fn = fn

  def forward(self, x):
    return (self.fn(x) + x) / np.sqrt(2)


def torch_heads(norm_type, virtual_bs):
  sn = torch.nn.utils.spectral_norm

  def block(k):
    norm = nn.BatchNorm1d(D, eps=1e-6) if norm_type == "sbn" else TorchBatchNormLocal(D, virtual_bs)
    return nn.Sequential(sn(nn.Conv1d(D, D, k, padding=k // 2, padding_mode="circular")), norm,
                         nn.LeakyReLU(0.2))
  return nn.ModuleList([nn.Sequential(block(1), TorchResidual(block(9)), sn(nn.Conv1d(D, 1, 1)))
                        for _ in range(len(KEYS) + 1)])


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory):
  torch.manual_seed(1)
  dino = TorchDino()
  _randomize(dino, 1)
  path = tmp_path_factory.mktemp("dino") / "dino_tiny.pth"
  torch.save(dino.state_dict(), path)
  return dino.eval(), path


@pytest.fixture(scope="module")
def dino_disc(dino_file):
  """A converted discriminator that tests only read (or split and merge)."""
  return dino_discriminator_from_torch(dino_file[1], key_depths=KEYS, num_heads=HEADS)


@pytest.mark.parametrize("size,norm_type", [(40, "sbn"), (24, "bn")])
def test_dino_discriminator_matches_torch(dino_file, size, norm_type):
  tdino, path = dino_file
  torch.manual_seed(2)
  heads = torch_heads(norm_type, virtual_bs=2).train()
  _randomize(heads, 2)
  disc = dino_discriminator_from_torch(path, key_depths=KEYS, num_heads=HEADS,
                                       norm_type=norm_type, virtual_bs=2)
  load_dino_heads(disc, {f"heads.{k}": v.numpy() for k, v in heads.state_dict().items()})
  x = _images(4, 4, size)
  with torch.no_grad():
    acts = tdino(_nchw(x))
    want = torch.cat([h(a).view(4, -1) for h, a in zip(heads, acts)], 1).numpy()
  got = nnx.jit(lambda d, x: d(x, key=None, train=True))(disc, jnp.asarray(x))
  assert got.shape == (4, (len(KEYS) + 1) * (IMG // PATCH) ** 2)
  err = float(np.max(np.abs(np.asarray(got) - want)))
  print(f"DINO disc [{size}px, {norm_type}] max abs err {err:.2e} (|logit| max {np.abs(want).max():.2f})")
  assert err <= TOL * max(1.0, np.abs(want).max())
  # The training call ran one power iteration per conv, like torch's forward pre-hook.
  ours_u = np.asarray(disc.heads[1].conv_res.u[...])
  theirs_u = heads[1][1].fn[0].weight_u.numpy()
  np.testing.assert_allclose(ours_u, theirs_u, atol=1e-5)
  if norm_type == "sbn":
    np.testing.assert_allclose(np.asarray(disc.heads[0].norm_in.var[...]),
                               heads[0][0][1].running_var.numpy(), atol=1e-4, rtol=1e-4)


def test_dino_hf_layout_and_backbone_frozen(dino_file):
  tdino, path = dino_file
  sd = {k: v.numpy() for k, v in tdino.state_dict().items()}
  hf = {"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"],
        "pooler.dense.weight": np.zeros((D, D), np.float32)}
  names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
           "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
  for i in range(DEPTH):
    for leaf in ("weight", "bias"):
      for theirs, hf_name in names.items():
        hf[f"encoder.layer.{i}.{hf_name}.{leaf}"] = sd[f"blocks.{i}.{theirs}.{leaf}"]
      for j, part in enumerate(("query", "key", "value")):
        hf[f"encoder.layer.{i}.attention.attention.{part}.{leaf}"] = np.split(
            sd[f"blocks.{i}.attn.qkv.{leaf}"], 3)[j]
  v_timm, cfg_timm = dino_values(sd, "timm", num_heads=HEADS)
  v_hf, cfg_hf = dino_values(hf, "hf", num_heads=HEADS)
  assert cfg_timm == cfg_hf and set(v_timm) == set(v_hf)
  for k in v_timm:
    np.testing.assert_array_equal(v_timm[k], v_hf[k])
  assert np.all(v_timm[("layers", 0, "self_attn", "k_proj", "bias")] == 0)

  disc = nnx.eval_shape(lambda: DinoDiscriminator(cfg_timm, rngs=nnx.Rngs(0)))
  _, trainable, frozen, extras = nnx.split(disc, TRAINABLE, FROZEN, ...)
  assert all(p[0] == "heads" for p, _ in nnx.to_flat_state(trainable))
  assert all(p[0] == "backbone" for p, _ in nnx.to_flat_state(frozen))
  kinds = {p[-1] for p, _ in nnx.to_flat_state(extras)}
  assert kinds == {"u", "v", "mean", "var"}


def test_dino_crop_or_resize(dino_disc):
  disc = dino_disc
  x = jnp.asarray(_images(5, 2, 40))
  prepare = jax.jit(lambda x, k: disc.backbone.prepare(x, k))
  resized = np.asarray(disc.backbone.prepare(x, None))
  mean, std = np.array((0.485, 0.456, 0.406)), np.array((0.229, 0.224, 0.225))
  full = (0.5 / std) * np.asarray(x) + (0.5 - mean) / std
  kinds = set()
  for seed in range(8):
    out = np.asarray(prepare(x, jax.random.key(seed)))
    assert out.shape == resized.shape == (2, IMG, IMG, 3)
    if np.allclose(out, resized, atol=1e-5):
      kinds.add("resize")
      continue
    crops = [(t, l) for t in range(9) for l in range(9)
             if np.allclose(out, full[:, t:t + IMG, l:l + IMG], atol=1e-5)]
    assert crops, f"key {seed}: neither the resize nor a {IMG}px crop"
    kinds.add("crop")
  assert kinds == {"resize", "crop"}


def test_discriminator_train_updates_side_state(dino_disc):
  graphdef, params, frozen, extras = nnx.split(dino_disc, TRAINABLE, FROZEN, ...)

  @functools.partial(jax.jit, static_argnames="train")
  def apply(params, frozen, extras, x, key, train):
    d = nnx.merge(graphdef, params, frozen, extras)
    return d(x, key=key, train=train), nnx.state(d, nnx.Not(nnx.Param))

  x = jnp.asarray(_images(6, 2, 40))
  _, after = apply(params, frozen, extras, x, jax.random.key(0), True)
  before_u = extras["heads"][0]["conv_in"]["u"][...]
  after_u = after["heads"][0]["conv_in"]["u"][...]
  assert not np.allclose(before_u, after_u)
  np.testing.assert_allclose(np.linalg.norm(after_u), 1.0, rtol=1e-5)
  _, same = apply(params, frozen, extras, x, None, False)
  np.testing.assert_array_equal(same["heads"][0]["conv_in"]["u"][...], before_u)
  # Gradients reach the heads and the input, never the frozen backbone (it is not differentiated).
  def loss(params, x):
    logits, _ = apply(params, frozen, extras, x, None, True)
    return jnp.mean(logits)
  g_params, g_x = jax.grad(loss, argnums=(0, 1))(params, x)
  assert np.all(np.isfinite(np.asarray(g_x))) and float(jnp.abs(g_x).sum()) > 0
  assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(g_params))


# --- PatchGAN -----------------------------------------------------------------------------------

def torch_patchgan(ndf, n_layers):
  seq = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
  mult = 1
  for n in range(1, n_layers + 1):
    prev, mult = mult, min(2 ** n, 8)
    seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2 if n < n_layers else 1, 1, bias=False),
            nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2)]
  seq.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
  m = nn.Module()
  m.main = nn.Sequential(*seq)
  return m


def test_patchgan_matches_torch():
  torch.manual_seed(3)
  tdisc = torch_patchgan(8, 3).train()
  _randomize(tdisc, 3)
  disc = nnx.eval_shape(lambda: PatchGANDiscriminator(3, 8, 3, rngs=nnx.Rngs(0)))  # all loaded
  load_patchgan(disc, {k: v.numpy() for k, v in tdisc.state_dict().items()})
  x = _images(7, 2, 32)
  with torch.no_grad():
    want = tdisc.main(_nchw(x)).numpy().transpose(0, 2, 3, 1)
  run = nnx.jit(lambda d, x, train: d(x, train=train), static_argnames="train")
  got = np.asarray(run(disc, jnp.asarray(x), True))
  assert got.shape == want.shape
  err = np.max(np.abs(got - want))
  print(f"PatchGAN max abs err {err:.2e}")
  assert err <= TOL * max(1.0, np.abs(want).max())
  np.testing.assert_allclose(np.asarray(disc.norms[1].var[...]), tdisc.main[6].running_var.numpy(),
                             rtol=1e-4, atol=1e-5)
  with torch.no_grad():
    want_eval = tdisc.eval().main(_nchw(x)).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(run(disc, jnp.asarray(x), False)), want_eval, atol=TOL)


def test_patchgan_minimum_input_size_matches_torch_and_smaller_is_an_error():
  for n_layers in (2, 3):
    disc = PatchGANDiscriminator(3, 4, n_layers, rngs=nnx.Rngs(0))
    side = disc.min_input_size
    tdisc = torch_patchgan(4, n_layers).eval()
    with torch.no_grad():  # torch's output is 1x1 at the minimum; one pixel below, it fails
      assert tuple(tdisc.main(torch.zeros(1, 3, side, side)).shape[2:]) == (1, 1)
      with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
        tdisc.main(torch.zeros(1, 3, side - 1, side - 1))
    assert disc(jnp.zeros((1, side, side, 3)), train=False).shape == (1, 1, 1, 1)
    with pytest.raises(ValueError, match=f"at least {side} px"):
      disc(jnp.zeros((1, side - 1, side - 1, 3)), train=False)


# --- SigLIP2 ------------------------------------------------------------------------------------

SD, SHEADS, SLAYERS, SPATCH, SGRID = 32, 2, 2, 8, 4


class TorchSiglipLayer(nn.Module):
  def __init__(self):
    super().__init__()
    self.layer_norm1, self.layer_norm2 = nn.LayerNorm(SD, eps=1e-6), nn.LayerNorm(SD, eps=1e-6)
    self.self_attn = nn.Module()
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
      setattr(self.self_attn, name, nn.Linear(SD, SD))
    self.mlp = nn.Module()
    self.mlp.fc1, self.mlp.fc2 = nn.Linear(SD, 4 * SD), nn.Linear(4 * SD, SD)

  def forward(self, x):
    b, n, _ = x.shape
    h = self.layer_norm1(x)
    split = lambda t: t.view(b, n, SHEADS, SD // SHEADS).transpose(1, 2)
    a = self.self_attn
    o = F.scaled_dot_product_attention(split(a.q_proj(h)), split(a.k_proj(h)), split(a.v_proj(h)))
    x = x + a.out_proj(o.transpose(1, 2).reshape(b, n, SD))
    return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.layer_norm2(x)), approximate="tanh"))


class TorchSiglip2(nn.Module):
  """HF Siglip2Model key names (vision_model.*, plus text/head entries a converter must skip);
  forward = the reference's CustomSiglip2VisionModel.forward_features (post_layernorm twice)."""

  def __init__(self):
    super().__init__()
    v = self.vision_model = nn.Module()
    v.embeddings = nn.Module()
    v.embeddings.patch_embedding = nn.Linear(3 * SPATCH * SPATCH, SD)
    v.embeddings.position_embedding = nn.Embedding(SGRID * SGRID, SD)
    v.encoder = nn.Module()
    v.encoder.layers = nn.ModuleList([TorchSiglipLayer() for _ in range(SLAYERS)])
    v.post_layernorm = nn.LayerNorm(SD, eps=1e-6)
    v.head = nn.Module()
    v.head.probe = nn.Parameter(torch.zeros(1, 1, SD))
    self.text_model = nn.Linear(2, 2)
    self.logit_scale = nn.Parameter(torch.zeros(1))

  def forward(self, images):
    b, c, h, w = images.shape
    gh, gw = h // SPATCH, w // SPATCH
    p = images.reshape(b, c, gh, SPATCH, gw, SPATCH).permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, -1)
    v = self.vision_model
    pos = v.embeddings.position_embedding.weight.reshape(SGRID, SGRID, -1).permute(2, 0, 1)[None]
    pos = F.interpolate(pos, size=(gh, gw), mode="bilinear", align_corners=False, antialias=True)
    x = v.embeddings.patch_embedding(p) + pos.reshape(1, SD, gh * gw).transpose(1, 2)
    for layer in v.encoder.layers:
      x = layer(x)
    return v.post_layernorm(v.post_layernorm(x))


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
  torch.manual_seed(4)
  model = TorchSiglip2().eval()
  _randomize(model, 4)
  d = tmp_path_factory.mktemp("siglip2")
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
  (d / "config.json").write_text(json.dumps({"vision_config": {"num_attention_heads": SHEADS}}))
  return model, d


def _tiny_tokenizer_config():
  tower = dict(hidden_size=SD, num_heads=SHEADS, mlp_dim=4 * SD, position_grid=SGRID, patch_size=SPATCH)
  return TokenizerConfig(
      encoder=ViTConfig(num_layers=1, **tower), decoder=ViTConfig(num_layers=1, patch_embedding=False, **tower),
      teacher=ViTConfig(num_layers=SLAYERS, **tower), image_size=32, max_image_size=32,
      min_image_size=32, num_latent_tokens=4, group_size=2, codebook_size=16, codebook_embed_dim=4,
      global_token_loss_weight=1.0, global_token_hidden=16, correction_training=False)


def test_siglip2_teacher_matches_torch(siglip_dir):
  model, d = siglip_dir
  # Abstract: the teacher and the encoder tower are filled entirely from the file.
  tok = nnx.eval_shape(lambda: Tokenizer(_tiny_tokenizer_config(), rngs=0))
  load_teacher_from_siglip2(tok, d)
  x = _images(8, 2, 48)  # 6x6 patches: the 4x4 position table is resized
  with torch.no_grad():
    want = model(_nchw(x)).numpy()
  got = np.asarray(nnx.jit(lambda t, x: t(x))(tok.repa_model, jnp.asarray(x)))
  assert got.shape == (2, 36, SD)
  err = np.max(np.abs(got - want))
  print(f"SigLIP2 teacher max abs err {err:.2e}")
  assert err <= TOL * max(1.0, np.abs(want).max())

  # The encoder takes embeddings, the first layer and post_layernorm.
  init_encoder_from_siglip2(tok, d)
  enc = tok.encoder.visual_model
  sd = model.state_dict()
  np.testing.assert_array_equal(np.asarray(enc.layers[0].mlp.fc1.kernel[...]),
                                sd["vision_model.encoder.layers.0.mlp.fc1.weight"].numpy().T)
  np.testing.assert_array_equal(np.asarray(enc.embeddings.patch_embedding.kernel[...]),
                                sd["vision_model.embeddings.patch_embedding.weight"].numpy().T)
  np.testing.assert_array_equal(np.asarray(enc.post_layernorm.scale[...]),
                                sd["vision_model.post_layernorm.weight"].numpy())

  tower = siglip2_tower_from_file(d)
  assert tower.cfg.num_layers == SLAYERS and tower.cfg.num_heads == SHEADS


def test_siglip2_big_vision_npz_and_conv_patch(siglip_dir, tmp_path):
  model, d = siglip_dir
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  hd = SD // SHEADS
  per_layer = []
  for i in range(SLAYERS):
    p = f"vision_model.encoder.layers.{i}."
    blk = {"LayerNorm_0/scale": sd[p + "layer_norm1.weight"], "LayerNorm_0/bias": sd[p + "layer_norm1.bias"],
           "LayerNorm_1/scale": sd[p + "layer_norm2.weight"], "LayerNorm_1/bias": sd[p + "layer_norm2.bias"],
           "MlpBlock_0/Dense_0/kernel": sd[p + "mlp.fc1.weight"].T, "MlpBlock_0/Dense_0/bias": sd[p + "mlp.fc1.bias"],
           "MlpBlock_0/Dense_1/kernel": sd[p + "mlp.fc2.weight"].T, "MlpBlock_0/Dense_1/bias": sd[p + "mlp.fc2.bias"],
           "MultiHeadDotProductAttention_0/out/kernel": sd[p + "self_attn.out_proj.weight"].T.reshape(SHEADS, hd, SD),
           "MultiHeadDotProductAttention_0/out/bias": sd[p + "self_attn.out_proj.bias"]}
    for ours, bv in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
      blk[f"MultiHeadDotProductAttention_0/{bv}/kernel"] = sd[p + f"self_attn.{ours}.weight"].T.reshape(SD, SHEADS, hd)
      blk[f"MultiHeadDotProductAttention_0/{bv}/bias"] = sd[p + f"self_attn.{ours}.bias"].reshape(SHEADS, hd)
    per_layer.append(blk)
  common = {"params/img/embedding/kernel": sd["vision_model.embeddings.patch_embedding.weight"].T,
            "params/img/embedding/bias": sd["vision_model.embeddings.patch_embedding.bias"],
            "params/img/pos_embedding": sd["vision_model.embeddings.position_embedding.weight"].reshape(SGRID, SGRID, SD),
            "params/img/Transformer/encoder_norm/scale": sd["vision_model.post_layernorm.weight"],
            "params/img/Transformer/encoder_norm/bias": sd["vision_model.post_layernorm.bias"],
            "params/img/MAPHead_0/probe": np.zeros((1, 1, SD), np.float32),
            "params/txt/Embed_0/embedding": np.zeros((4, 2), np.float32),
            "params/t": np.zeros((1,), np.float32), "params/b": np.zeros((1,), np.float32)}
  loop = dict(common)
  for i, blk in enumerate(per_layer):
    loop.update({f"params/img/Transformer/encoderblock_{i}/{k}": v for k, v in blk.items()})
  scan = dict(common)
  scan.update({f"params/img/Transformer/encoderblock/{k}": np.stack([b[k] for b in per_layer])
               for k in per_layer[0]})
  np.savez(tmp_path / "loop.npz", **loop)
  np.savez(tmp_path / "scan.npz", **scan)
  ref = siglip2_weights(d)
  # A fixed-resolution checkpoint's Conv2d patch embedding [D, C, p, p].
  conv_sd = dict(sd)
  conv_sd["vision_model.embeddings.patch_embedding.weight"] = (
      sd["vision_model.embeddings.patch_embedding.weight"].reshape(SD, SPATCH, SPATCH, 3).transpose(0, 3, 1, 2))
  (tmp_path / "conv").mkdir()
  save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in conv_sd.items()},
            str(tmp_path / "conv" / "model.safetensors"))
  for path in (tmp_path / "loop.npz", tmp_path / "scan.npz", tmp_path / "conv" / "model.safetensors"):
    w = siglip2_weights(path, num_heads=SHEADS)
    assert set(w.values) == set(ref.values), path
    for k in ref.values:
      np.testing.assert_array_equal(w.values[k], ref.values[k], err_msg=f"{path}: {k}")
  assert siglip2_weights(tmp_path / "loop.npz").num_heads == SHEADS


# --- bad inputs ---------------------------------------------------------------------------------

def test_missing_files_name_what_to_supply(tmp_path):
  with pytest.raises(MissingWeightsError, match="vgg16"):
    lpips_from_torch(tmp_path / "nope.pth")
  with pytest.raises(FileNotFoundError, match="dino_deitsmall16_pretrain.pth"):
    dino_discriminator_from_torch(tmp_path / "nope.pth")
  with pytest.raises(MissingWeightsError, match="SigLIP2"):
    siglip2_weights("")
  torch.save({"features.0.weight": torch.zeros(4, 3, 3, 3), "features.0.bias": torch.zeros(4)},
             tmp_path / "partial.pth")
  with pytest.raises(ConversionError, match="features.2.weight"):
    lpips_from_torch(tmp_path / "partial.pth")


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_untrusted_pickles_are_refused(tmp_path):
  marker = tmp_path / "pwned"
  torch.save({"cls_token": _Evil(marker)}, tmp_path / "evil.pth")
  with pytest.raises(ConversionError, match="refusing"):
    dino_discriminator_from_torch(tmp_path / "evil.pth")
  with pytest.raises(ConversionError, match="refusing"):
    lpips_from_torch(tmp_path / "evil.pth")
  assert not marker.exists()
  np.savez(tmp_path / "evil.npz", x=np.array([_Evil(marker)], dtype=object))
  with pytest.raises(ConversionError, match="refusing|pickle"):
    siglip2_weights(tmp_path / "evil.npz")
  assert not marker.exists()
