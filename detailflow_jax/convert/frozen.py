"""Published weights of the pretrained networks tokenizer training uses, into our modules.

  * LPIPS: torchvision's VGG16 (`features.N.weight/bias`, e.g. vgg16-397923af.pth) plus the
    LPIPS heads (`lin{k}.model.1.weight`, the taming / LPIPS v0.1 `vgg.pth`), given as two files
    or one; an LPIPS module state dict (`net.slice{k}.{j}.*`, `scaling_layer.*`) is read too.
  * DINO ViT-S/16 for the discriminator: FB's `dino_deitsmall16_pretrain.pth` (timm names:
    patch_embed.proj, cls_token, pos_embed, blocks.i.*, norm) or HF `facebook/dino-vits16`
    (ViTModel names: embeddings.*, encoder.layer.i.*).
  * SigLIP2 vision towers (encoder init, teacher): HF safetensors (file or model directory;
    naflex `patch_embedding` is a Linear over (row, col, channel) patches, fixed-resolution ones a
    Conv2d) or big_vision's `.npz` (`params/img/embedding/kernel`, `.../Transformer/
    encoderblock_i/...`, scanned `encoderblock` too).

Every file is untrusted: `.pt/.pth/.bin` go through torch.load(weights_only=True), `.npz`
through np.load(allow_pickle=False). Every key is either used or deliberately skipped (a named
list per format), every target parameter is filled, and shapes are checked; errors name the key,
the shape and the file. A missing file is a MissingWeightsError saying which file to supply.
"""
import json
import logging
import pathlib
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..models.dino import DinoBackbone, DinoConfig, DinoDiscriminator
from ..models.lpips import LPIPS, SCALE, SHIFT, VGG16_CONVS_PER_STAGE
from ..models.patchgan import PatchGANDiscriminator
from ..models.vit import VisionTower, ViTConfig
from .common import ConversionError, StateDictReader, load_state_dict

log = logging.getLogger("detailflow_jax")

Path = tuple  # a flat nnx path, e.g. ("layers", 0, "mlp", "fc1", "kernel")
Values = dict[Path, np.ndarray]


class MissingWeightsError(ConversionError, FileNotFoundError):
  """A weights file that is not there (nothing is downloaded: the message says what to get)."""


def _require(path, what: str, hint: str) -> pathlib.Path:
  if path is None or str(path) == "":
    raise MissingWeightsError(f"{what}: no weights file given; supply {hint}")
  p = pathlib.Path(path)
  if not p.exists():
    raise MissingWeightsError(f"{what}: weights file not found at {str(p)!r}; supply {hint}")
  return p


def _conv2d_to_hwio(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [out, in, kh, kw] -> flax [kh, kw, in, out]."""
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _assign(module: nnx.Module, values: Values, source: str, *, complete: bool = True,
            dtype=None) -> None:
  """Writes `values` into `module`'s variables in place, checking paths and shapes; with
  `complete`, every Param of `module` must be given a value."""
  flat = dict(nnx.to_flat_state(nnx.state(module)))
  if complete:
    missing = [p for p, v in flat.items() if isinstance(v, nnx.Param) and p not in values]
    if missing:
      raise ConversionError(f"{source}: no value for parameter(s) "
                            + ", ".join("/".join(map(str, p)) for p in missing[:8]))
  updates = []
  for path, value in values.items():
    var = flat.get(path)
    if var is None:
      raise ConversionError(f"{source}: the model has no parameter {'/'.join(map(str, path))}")
    if tuple(var.shape) != tuple(value.shape):
      raise ConversionError(f"{source}: {'/'.join(map(str, path))} needs shape {tuple(var.shape)}, "
                            f"the file gives {tuple(value.shape)}")
    target = var.dtype if dtype is None or not jnp.issubdtype(var.dtype, jnp.floating) else dtype
    # A copy: on CPU jnp.asarray may alias the numpy buffer, which a torch tensor the caller
    # still holds (e.g. a spectral-norm vector updated in place) could change under us.
    updates.append((path, var.replace(jnp.array(value, dtype=target, copy=True))))
  nnx.update(module, nnx.from_flat_state(updates))


def _from_values(build, values: Values, source: str, dtype) -> nnx.Module:
  """A module every parameter of which comes from `values`: built abstractly (no random init,
  which run eagerly compiles every initialiser shape: tens of seconds for VGG16 on a CPU), then
  filled."""
  model = nnx.eval_shape(build)
  _assign(model, values, source, dtype=dtype)
  unfilled = [p for p, v in nnx.to_flat_state(nnx.state(model))
              if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
  if unfilled:
    raise ConversionError(f"{source}: no value for " + ", ".join("/".join(map(str, p)) for p in unfilled[:8]))
  return model


# --- LPIPS --------------------------------------------------------------------------------------

# torchvision vgg16.features indices of the 13 convs, and where LPIPS' five slices start.
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_SLICE_BOUNDS = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
LPIPS_HINT = ("torchvision's vgg16 weights (vgg16-397923af.pth, keys features.N.*) and the LPIPS "
              "heads (taming-transformers / LPIPS v0.1 vgg.pth, keys lin0..lin4), as one file or two")


def _vgg_conv_from_slice(k: int, j: int) -> int | None:
  """LPIPS net.slice{k}.{j}: j is either the torchvision index (LPIPS package) or the index
  inside the slice (nn.Sequential(*layers), as DetailFlow builds it). The two never collide."""
  lo, hi = _SLICE_BOUNDS[k - 1]
  for g in (j, lo + j):
    if lo <= g < hi and g in VGG16_CONV_INDICES:
      return g
  return None


def lpips_values(state: Mapping[str, np.ndarray], source: str) -> tuple[Values, tuple[int, ...]]:
  """Maps an LPIPS/VGG16 state dict to LPIPS parameter paths; returns (values, stage widths)."""
  values: Values = {}
  origin: dict[Path, str] = {}

  def put(path, value, key):
    if path in values:
      raise ConversionError(f"{source}: {key!r} and {origin[path]!r} both give {'/'.join(map(str, path))}")
    values[path], origin[path] = value, key

  for key, value in state.items():
    if m := re.fullmatch(r"features\.(\d+)\.(weight|bias)", key):
      g = int(m[1])
      if g not in VGG16_CONV_INDICES:
        raise ConversionError(f"{source}: {key!r} {value.shape} is not a VGG16 conv (indices "
                              f"{VGG16_CONV_INDICES})")
      conv, leaf = VGG16_CONV_INDICES.index(g), m[2]
    elif m := re.fullmatch(r"net\.slice([1-5])\.(\d+)\.(weight|bias)", key):
      g = _vgg_conv_from_slice(int(m[1]), int(m[2]))
      if g is None:
        raise ConversionError(f"{source}: {key!r} is not a conv of LPIPS slice {m[1]}")
      conv, leaf = VGG16_CONV_INDICES.index(g), m[3]
    elif m := re.fullmatch(r"lin([0-4])\.model\.[01]\.weight", key):
      if value.ndim != 4 or value.shape[0] != 1 or value.shape[2:] != (1, 1):
        raise ConversionError(f"{source}: {key!r} has shape {value.shape}, expected [1, C, 1, 1]")
      put(("lins", int(m[1]), "kernel"), value[0, :, 0, 0][:, None], key)
      continue
    elif key in ("scaling_layer.shift", "scaling_layer.scale"):
      expected = SHIFT if key.endswith("shift") else SCALE
      if not np.allclose(value.reshape(-1), expected, atol=1e-6):
        raise ConversionError(f"{source}: {key!r} = {value.reshape(-1)} differs from LPIPS' "
                              f"constants {expected}")
      continue
    elif key.startswith("classifier."):
      continue  # torchvision's VGG16 classifier: not part of the feature stack.
    else:
      raise ConversionError(f"{source}: unexpected key {key!r} {tuple(value.shape)} for LPIPS/VGG16")
    if leaf == "weight":
      if value.ndim != 4 or value.shape[2:] != (3, 3):
        raise ConversionError(f"{source}: {key!r} has shape {value.shape}, expected [out, in, 3, 3]")
      put(("net", "convs", conv, "kernel"), _conv2d_to_hwio(value), key)
    else:
      put(("net", "convs", conv, "bias"), value, key)

  missing_convs = [f"features.{VGG16_CONV_INDICES[i]}.weight" for i in range(13)
                   if ("net", "convs", i, "kernel") not in values]
  if missing_convs:
    raise ConversionError(f"{source}: VGG16 weights missing ({', '.join(missing_convs[:4])}...); "
                          f"supply {LPIPS_HINT}")
  missing_lins = [f"lin{k}.model.1.weight" for k in range(5) if ("lins", k, "kernel") not in values]
  if missing_lins:
    raise ConversionError(f"{source}: LPIPS heads missing ({', '.join(missing_lins)}); supply "
                          f"{LPIPS_HINT}")
  firsts = np.cumsum((0,) + VGG16_CONVS_PER_STAGE[:-1])
  widths = tuple(int(values[("net", "convs", int(i), "kernel")].shape[-1]) for i in firsts)
  return values, widths


def lpips_from_torch(vgg_path, lin_path=None, *, dtype="float32") -> LPIPS:
  """LPIPS with published weights: `vgg_path` holds VGG16 (and possibly the heads), `lin_path`
  the heads if they are in a second file. Widths come from the file."""
  paths = [_require(vgg_path, "LPIPS", LPIPS_HINT)]
  if lin_path:
    paths.append(_require(lin_path, "LPIPS heads", LPIPS_HINT))
  state: dict[str, np.ndarray] = {}
  for p in paths:
    for key, value in load_state_dict(p).items():
      if key in state:
        raise ConversionError(f"{p}: key {key!r} is also in {paths[0]}")
      state[key] = value
  source = " + ".join(str(p) for p in paths)
  values, widths = lpips_values(state, source)
  return _from_values(lambda: LPIPS(widths, rngs=nnx.Rngs(0)), values, source, jnp.dtype(dtype))


# --- DINO ---------------------------------------------------------------------------------------

DINO_HINT = ("the DINO ViT-S/16 backbone: dino_deitsmall16_pretrain.pth "
             "(https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/"
             "dino_deitsmall16_pretrain.pth) or HF facebook/dino-vits16 weights")

_HF_VIT_BLOCK = {
    "layernorm_before": "norm1", "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj", "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}


def _hf_vit_to_timm(state: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
  """HF ViTModel names -> timm names (query/key/value fused into qkv, as timm stores them)."""
  out: dict[str, np.ndarray] = {}
  qkv: dict[tuple[int, str], dict[str, np.ndarray]] = {}
  for key, value in state.items():
    k = key[len("vit."):] if key.startswith("vit.") else key
    if k == "embeddings.cls_token":
      out["cls_token"] = value
    elif k == "embeddings.position_embeddings":
      out["pos_embed"] = value
    elif m := re.fullmatch(r"embeddings\.patch_embeddings\.projection\.(weight|bias)", k):
      out[f"patch_embed.proj.{m[1]}"] = value
    elif m := re.fullmatch(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)", k):
      qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = value
    elif m := re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", k):
      if m[2] not in _HF_VIT_BLOCK:
        raise ConversionError(f"{source}: unexpected key {key!r} {tuple(value.shape)} for a DINO ViT")
      out[f"blocks.{m[1]}.{_HF_VIT_BLOCK[m[2]]}.{m[3]}"] = value
    elif m := re.fullmatch(r"layernorm\.(weight|bias)", k):
      out[f"norm.{m[1]}"] = value
    elif k.startswith("pooler."):
      continue  # HF's pooler (a tanh dense on the cls token) is not part of DINO's features.
    else:
      raise ConversionError(f"{source}: unexpected key {key!r} {tuple(value.shape)} for a DINO ViT")
  for (i, leaf), parts in qkv.items():
    if set(parts) != {"query", "key", "value"}:
      raise ConversionError(f"{source}: block {i} attention {leaf} has only {sorted(parts)}")
    out[f"blocks.{i}.attn.qkv.{leaf}"] = np.concatenate([parts["query"], parts["key"], parts["value"]])
  return out


def dino_values(state: Mapping[str, np.ndarray], source: str, *, num_heads: int | None = None,
                depth: int | None = None, key_depths=(2, 5, 8, 11)) -> tuple[Values, DinoConfig]:
  """Maps a DINO ViT state dict (timm or HF names) to DinoBackbone paths and infers its
  DinoConfig (heads default to hidden / 64, as in every DINO ViT). Blocks past `depth` are
  skipped; the final norm (unused by the discriminator) is skipped."""
  if any(k.startswith(("embeddings.", "vit.embeddings.", "encoder.layer.", "vit.encoder.")) for k in state):
    state = _hf_vit_to_timm(state, source)
  r = StateDictReader(state, source)
  if "cls_token" not in r:
    raise ConversionError(f"{source}: no 'cls_token': not a DINO ViT checkpoint; supply {DINO_HINT}")
  cls = r.take("cls_token").reshape(-1)
  d = cls.shape[0]
  patch_w = r.take("patch_embed.proj.weight")
  if patch_w.ndim != 4 or patch_w.shape[:2] != (d, 3) or patch_w.shape[2] != patch_w.shape[3]:
    raise ConversionError(f"{source}: 'patch_embed.proj.weight' has shape {patch_w.shape}, "
                          f"expected [{d}, 3, p, p]")
  p = patch_w.shape[-1]
  pos = r.take("pos_embed")
  pos = pos.reshape(-1, d)
  grid = int(round((pos.shape[0] - 1) ** 0.5))
  if grid * grid + 1 != pos.shape[0]:
    raise ConversionError(f"{source}: 'pos_embed' has {pos.shape[0]} positions, not 1 + a square grid")
  blocks = sorted({int(m[1]) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
  if blocks != list(range(len(blocks))) or not blocks:
    raise ConversionError(f"{source}: blocks {blocks} are not 0..n-1")
  depth = len(blocks) if depth is None else depth
  if depth > len(blocks):
    raise ConversionError(f"{source}: depth {depth} asked, the file has {len(blocks)} blocks")
  mlp = r.take("blocks.0.mlp.fc1.weight").shape[0]
  heads = num_heads or (d // 64 if d % 64 == 0 else None)
  if not heads:
    raise ConversionError(f"{source}: hidden size {d} is not a multiple of DINO's head size 64; "
                          "pass num_heads")
  cfg = DinoConfig(hidden_size=d, num_heads=heads, mlp_dim=mlp, depth=depth, patch_size=p,
                   image_size=grid * p, key_depths=tuple(key_depths))
  v: Values = {
      ("cls_token",): cls, ("pos_embed",): pos,
      ("patch_embed", "kernel"): _conv2d_to_hwio(patch_w).reshape(p * p * 3, d),
      ("patch_embed", "bias"): r.take("patch_embed.proj.bias", (d,)),
  }
  for i in blocks:
    b = f"blocks.{i}."
    if i >= depth:
      for k in [k for k in state if k.startswith(b)]:
        r.skip(k)
      continue
    o = ("layers", i)
    for ours, theirs in (("layer_norm1", "norm1"), ("layer_norm2", "norm2")):
      v[o + (ours, "scale")] = r.take(b + theirs + ".weight", (d,))
      v[o + (ours, "bias")] = r.take(b + theirs + ".bias", (d,))
    w = r.take(b + "attn.qkv.weight", (3 * d, d))
    bias = r.take(b + "attn.qkv.bias", (3 * d,)).copy()
    bias[d:2 * d] = 0.0  # The reference zeroes the key bias at load.
    for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
      v[o + ("self_attn", name, "kernel")] = w[j * d:(j + 1) * d].T
      v[o + ("self_attn", name, "bias")] = bias[j * d:(j + 1) * d]
    v[o + ("self_attn", "out_proj", "kernel")] = r.take(b + "attn.proj.weight", (d, d)).T
    v[o + ("self_attn", "out_proj", "bias")] = r.take(b + "attn.proj.bias", (d,))
    v[o + ("mlp", "fc1", "kernel")] = r.take(b + "mlp.fc1.weight", (mlp, d)).T
    v[o + ("mlp", "fc1", "bias")] = r.take(b + "mlp.fc1.bias", (mlp,))
    v[o + ("mlp", "fc2", "kernel")] = r.take(b + "mlp.fc2.weight", (d, mlp)).T
    v[o + ("mlp", "fc2", "bias")] = r.take(b + "mlp.fc2.bias", (d,))
  for k in [k for k in state if k.startswith(("norm.", "head.", "fc_norm."))]:
    r.skip(k)  # Final norm / classifier: the discriminator reads block outputs only.
  r.finish()
  return {k: np.ascontiguousarray(a) for k, a in v.items()}, cfg


def dino_discriminator_from_torch(path, *, key_depths=(2, 5, 8, 11), depth: int | None = None,
                                  num_heads: int | None = None, kernel_size: int = 9,
                                  norm_type: str = "sbn", norm_eps: float = 1e-6,
                                  virtual_bs: int = 8, spectral_norm: bool = True, seed: int = 0,
                                  dtype="float32") -> DinoDiscriminator:
  """A DinoDiscriminator whose frozen backbone holds the DINO weights of `path` and whose heads
  are freshly initialised (seed), as the reference builds it."""
  p = _require(path, "DINO discriminator backbone", DINO_HINT)
  state = load_state_dict(p)
  values, cfg = dino_values(state, str(p), num_heads=num_heads, depth=depth, key_depths=key_depths)
  backbone = _from_values(lambda: DinoBackbone(cfg, rngs=nnx.Rngs(0)), values, str(p), jnp.dtype(dtype))
  return DinoDiscriminator(cfg, kernel_size=kernel_size, norm_type=norm_type, norm_eps=norm_eps,
                           virtual_bs=virtual_bs, spectral_norm=spectral_norm, backbone=backbone,
                           rngs=nnx.Rngs(seed))


def _conv1d_values(r: StateDictReader, prefix: str, conv, ours: Path) -> Values:
  """A reference (Spectral)Conv1d: weight_orig/weight_u/weight_v (or weight) + bias."""
  v: Values = {}
  k, cin, cout = conv.kernel.shape
  name = prefix + ("weight_orig" if conv.spectral_norm else "weight")
  v[ours + ("kernel",)] = r.take(name, (cout, cin, k)).transpose(2, 1, 0)
  v[ours + ("bias",)] = r.take(prefix + "bias", (cout,))
  if conv.spectral_norm:
    v[ours + ("u",)] = r.take(prefix + "weight_u", (cout,))
    v[ours + ("v",)] = r.take(prefix + "weight_v", (cin * k,))
  return v


def _norm_values(r: StateDictReader, prefix: str, norm, ours: Path) -> Values:
  c = norm.scale.shape[0]
  v = {ours + ("scale",): r.take(prefix + "weight", (c,)), ours + ("bias",): r.take(prefix + "bias", (c,))}
  if hasattr(norm, "mean"):
    v[ours + ("mean",)] = r.take(prefix + "running_mean", (c,))
    v[ours + ("var",)] = r.take(prefix + "running_var", (c,))
    if prefix + "num_batches_tracked" in r:
      r.skip(prefix + "num_batches_tracked")
  return v


def load_dino_heads(disc: DinoDiscriminator, state: Mapping[str, np.ndarray],
                    source: str = "discriminator state") -> None:
  """Fills the trainable heads (and their side state) from the reference's DinoDisc state dict
  (`heads.{i}.0.0.weight_orig`, ...: e.g. a checkpoint's "discriminator" entry)."""
  r = StateDictReader({k: np.asarray(v) for k, v in state.items()}, source)
  values: Values = {}
  for i, head in enumerate(disc.heads):
    h, o = f"heads.{i}.", ("heads", i)
    values.update(_conv1d_values(r, h + "0.0.", head.conv_in, o + ("conv_in",)))
    values.update(_norm_values(r, h + "0.1.", head.norm_in, o + ("norm_in",)))
    values.update(_conv1d_values(r, h + "1.fn.0.", head.conv_res, o + ("conv_res",)))
    values.update(_norm_values(r, h + "1.fn.1.", head.norm_res, o + ("norm_res",)))
    values.update(_conv1d_values(r, h + "2.", head.conv_out, o + ("conv_out",)))
  r.finish()
  _assign(disc, values, source, complete=False)


def load_patchgan(disc: PatchGANDiscriminator, state: Mapping[str, np.ndarray],
                  source: str = "discriminator state") -> None:
  """Fills a PatchGANDiscriminator from the reference's NLayerDiscriminator state dict
  (`main.{idx}.*`: convs at 0, 2 + 3j, the last at 2 + 3n; batch norms right after convs)."""
  r = StateDictReader({k: np.asarray(v) for k, v in state.items()}, source)
  values: Values = {}

  def conv(idx: int, module, ours: Path):
    kh, kw, cin, cout = module.kernel.shape
    values[ours + ("kernel",)] = _conv2d_to_hwio(r.take(f"main.{idx}.weight", (cout, cin, kh, kw)))
    if module.bias is not None:
      values[ours + ("bias",)] = r.take(f"main.{idx}.bias", (cout,))

  conv(0, disc.conv_in, ("conv_in",))
  for j, (c, n) in enumerate(zip(disc.convs, disc.norms)):
    conv(2 + 3 * j, c, ("convs", j))
    values.update(_norm_values(r, f"main.{3 + 3 * j}.", n, ("norms", j)))
  conv(2 + 3 * len(disc.convs), disc.conv_out, ("conv_out",))
  r.finish()
  _assign(disc, values, source, complete=False)


# --- SigLIP2 ------------------------------------------------------------------------------------

SIGLIP2_HINT = ("SigLIP2 vision weights: an HF model directory or model.safetensors (e.g. "
                "google/siglip2-so400m-patch16-naflex) or a big_vision .npz (e.g. "
                "siglip2_so400m16_naflex.npz)")

SIGLIP2_VARIANTS: dict[str, ViTConfig] = {
    "siglip2-so400m-patch16-naflex": ViTConfig(hidden_size=1152, num_layers=27, num_heads=16,
                                               mlp_dim=4304, position_grid=16, patch_size=16),
    "siglip2-base-patch16-naflex": ViTConfig(hidden_size=768, num_layers=12, num_heads=12,
                                             mlp_dim=3072, position_grid=16, patch_size=16),
    "siglip2-base-patch16-256": ViTConfig(hidden_size=768, num_layers=12, num_heads=12,
                                          mlp_dim=3072, position_grid=16, patch_size=16),
}

# Entries of full image-text checkpoints that are not the vision tower body.
_HF_SKIP = re.compile(r"^(text_model\.|logit_scale$|logit_bias$|head\.|embeddings\.position_ids$)")
_BV_SKIP = re.compile(r"^(MAPHead_0/|head/|pre_logits/)")
_BV_BLOCK = {
    "LayerNorm_0": "layer_norm1", "LayerNorm_1": "layer_norm2",
    "MultiHeadDotProductAttention_0/query": "self_attn/q_proj",
    "MultiHeadDotProductAttention_0/key": "self_attn/k_proj",
    "MultiHeadDotProductAttention_0/value": "self_attn/v_proj",
    "MultiHeadDotProductAttention_0/out": "self_attn/out_proj",
    "MlpBlock_0/Dense_0": "mlp/fc1", "MlpBlock_0/Dense_1": "mlp/fc2",
}


class SigLIP2Weights:
  """A SigLIP2 vision tower's arrays keyed by our VisionTower paths (all layers of the file),
  with what the file says about its shape (`num_heads` is None when the file cannot tell)."""

  def __init__(self, values: Values, source: str, num_heads: int | None):
    self.values, self.source, self.num_heads = values, source, num_heads
    self.num_layers = len({p[1] for p in values if p[0] == "layers"})
    kernel = values[("embeddings", "patch_embedding", "kernel")]
    self.hidden_size = kernel.shape[1]
    self.patch_size = int(round((kernel.shape[0] / 3) ** 0.5))
    n = values[("embeddings", "position_embedding")].shape[0]
    self.position_grid = int(round(n ** 0.5))
    self.mlp_dim = values[("layers", 0, "mlp", "fc1", "kernel")].shape[1]

  def config(self, num_layers: int | None = None, num_heads: int | None = None) -> ViTConfig:
    heads = num_heads or self.num_heads
    if heads is None:
      raise ConversionError(f"{self.source}: the number of attention heads is not in the file; "
                            "pass num_heads (or keep the HF config.json beside the weights)")
    return ViTConfig(hidden_size=self.hidden_size, num_layers=num_layers or self.num_layers,
                     num_heads=heads, mlp_dim=self.mlp_dim, position_grid=self.position_grid,
                     patch_size=self.patch_size)


def _patch_kernel(w: np.ndarray, key: str, source: str) -> np.ndarray:
  """Patch embedding as a Linear over (row, col, channel) patches: [p*p*C, D]."""
  if w.ndim == 2:   # HF naflex Linear [D, p*p*C]
    return w.T
  if w.ndim == 4:   # Conv2d [D, C, p, p]
    return _conv2d_to_hwio(w).reshape(-1, w.shape[0])
  raise ConversionError(f"{source}: {key!r} has shape {w.shape}, expected a Linear or Conv2d weight")


def _siglip2_from_hf(state: Mapping[str, np.ndarray], source: str) -> Values:
  values: Values = {}
  for key, value in state.items():
    k = key[len("vision_model."):] if key.startswith("vision_model.") else key
    if _HF_SKIP.match(k):
      continue
    if k == "embeddings.patch_embedding.weight":
      values[("embeddings", "patch_embedding", "kernel")] = _patch_kernel(value, key, source)
    elif k == "embeddings.patch_embedding.bias":
      values[("embeddings", "patch_embedding", "bias")] = value
    elif k == "embeddings.position_embedding.weight":
      values[("embeddings", "position_embedding")] = value
    elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(layer_norm[12]|self_attn\.(?:q|k|v|out)_proj|"
                           r"mlp\.fc[12])\.(weight|bias)", k):
      module = tuple(m[2].split("."))
      leaf = ("scale" if m[2].startswith("layer_norm") else "kernel") if m[3] == "weight" else "bias"
      values[("layers", int(m[1])) + module + (leaf,)] = value.T if leaf == "kernel" else value
    elif m := re.fullmatch(r"post_layernorm\.(weight|bias)", k):
      values[("post_layernorm", "scale" if m[1] == "weight" else "bias")] = value
    else:
      raise ConversionError(f"{source}: unexpected key {key!r} {tuple(value.shape)} for a SigLIP2 "
                            "vision tower")
  return values


def _siglip2_from_big_vision(arrays: Mapping[str, np.ndarray], source: str) -> tuple[Values, int]:
  values: Values = {}
  heads = None
  flat = {}
  for key, value in arrays.items():
    k = key[len("params/"):] if key.startswith("params/") else key
    if k.startswith("txt/") or k in ("t", "b"):
      continue  # The text tower and the sigmoid loss' temperature / bias.
    flat[k[len("img/"):] if k.startswith("img/") else k] = value
  for k, value in flat.items():
    if _BV_SKIP.match(k):
      continue
    if k in ("embedding/kernel", "embedding/bias"):
      leaf = k.split("/")[1]
      values[("embeddings", "patch_embedding", leaf)] = (
          value.reshape(-1, value.shape[-1]) if leaf == "kernel" else value)
    elif k == "pos_embedding":
      values[("embeddings", "position_embedding")] = value.reshape(-1, value.shape[-1])
    elif m := re.fullmatch(r"Transformer/encoder_norm/(scale|bias)", k):
      values[("post_layernorm", m[1])] = value
    elif m := re.fullmatch(r"Transformer/encoderblock(?:_(\d+))?/(.+)/(kernel|bias|scale)", k):
      if m[2] not in _BV_BLOCK:
        raise ConversionError(f"{source}: unexpected key {_key_of(arrays, k)!r} {value.shape}")
      module = tuple(_BV_BLOCK[m[2]].split("/"))
      scanned = m[1] is None
      per_layer = list(value) if scanned else [value]
      for j, a in enumerate(per_layer):
        i = j if scanned else int(m[1])
        if m[2].startswith("MultiHeadDotProductAttention"):
          if m[3] == "kernel" and module[-1] != "out_proj":
            heads = a.shape[1]
            a = a.reshape(a.shape[0], -1)     # [D, H, hd] -> [D, H*hd]
          elif m[3] == "kernel":
            a = a.reshape(-1, a.shape[-1])    # [H, hd, D] -> [H*hd, D]
          else:
            a = a.reshape(-1)                 # [H, hd] -> [H*hd]
        values[("layers", i) + module + (m[3],)] = a
    else:
      raise ConversionError(f"{source}: unexpected key {_key_of(arrays, k)!r} {value.shape} for a "
                            "SigLIP2 vision tower")
  return values, heads


def _key_of(arrays: Mapping[str, np.ndarray], stripped: str) -> str:
  """The file's own spelling of a key we stripped prefixes from (for error messages)."""
  for key in arrays:
    if key.endswith(stripped):
      return key
  return stripped


def _hf_num_heads(directory: pathlib.Path) -> int | None:
  config = directory / "config.json"
  if not config.is_file():
    return None
  try:
    data = json.loads(config.read_text())
  except json.JSONDecodeError as e:
    raise ConversionError(f"{config} is not valid JSON: {e}") from e
  vision = data.get("vision_config", data)
  return vision.get("num_attention_heads")


def siglip2_weights(path, num_heads: int | None = None) -> SigLIP2Weights:
  """Reads a SigLIP2 vision tower from an HF directory / safetensors / .bin, or a big_vision
  .npz, into our VisionTower paths."""
  p = _require(path, "SigLIP2", SIGLIP2_HINT)
  source = str(p)
  if p.suffix == ".npz":
    try:
      with np.load(p, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    except ValueError as e:  # object arrays need pickle: refused.
      raise ConversionError(f"refusing to load {p}: {e}") from e
    except Exception as e:
      raise ConversionError(f"cannot read {p}: {type(e).__name__}: {e}") from e
    values, file_heads = _siglip2_from_big_vision(arrays, source)
  else:
    if p.is_dir():
      files = sorted(p.glob("*.safetensors"))
      if not files:
        raise MissingWeightsError(f"SigLIP2: no *.safetensors in {p}; supply {SIGLIP2_HINT}")
      file_heads = _hf_num_heads(p)
    else:
      files = [p]
      file_heads = _hf_num_heads(p.parent)
    state: dict[str, np.ndarray] = {}
    for f in files:
      state.update(load_state_dict(f))
    values = _siglip2_from_hf(state, source)
  for needed in (("embeddings", "patch_embedding", "kernel"), ("embeddings", "position_embedding"),
                 ("layers", 0, "mlp", "fc1", "kernel"), ("post_layernorm", "scale")):
    if needed not in values:
      raise ConversionError(f"{source}: no {'/'.join(map(str, needed))}: not a SigLIP2 vision "
                            f"tower; supply {SIGLIP2_HINT}")
  values = {k: np.ascontiguousarray(v) for k, v in values.items()}
  if file_heads is not None and num_heads is not None and file_heads != num_heads:
    raise ConversionError(f"{source}: the file has {file_heads} attention heads, {num_heads} asked")
  return SigLIP2Weights(values, source, file_heads if file_heads is not None else num_heads)


def load_siglip2_tower(tower: VisionTower, weights: SigLIP2Weights | str | pathlib.Path, *,
                       exact_depth: bool = False, require_patch_embedding: bool = False,
                       dtype=None) -> None:
  """Fills `tower` from SigLIP2: embeddings, its first `tower.cfg.num_layers` layers and
  post_layernorm (as the reference truncates `encoder.layers[:layer_num]`).

  A tower whose patch embedding has another shape (a different patch size) or none at all (the
  decoder) keeps its own, as the reference re-creates it; `exact_depth` demands that the file
  has exactly as many layers as the tower (the full-depth teacher).
  """
  w = weights if isinstance(weights, SigLIP2Weights) else siglip2_weights(weights)
  cfg = tower.cfg
  if cfg.hidden_size != w.hidden_size or cfg.mlp_dim != w.mlp_dim:
    raise ConversionError(f"{w.source}: SigLIP2 width {w.hidden_size} / mlp {w.mlp_dim} does not fit "
                          f"the tower's {cfg.hidden_size} / {cfg.mlp_dim}")
  if cfg.num_layers > w.num_layers or (exact_depth and cfg.num_layers != w.num_layers):
    raise ConversionError(f"{w.source}: the tower needs {cfg.num_layers} layers, the file has "
                          f"{w.num_layers}")
  if w.num_heads is not None and w.num_heads != cfg.num_heads:
    raise ConversionError(f"{w.source}: {w.num_heads} attention heads, the tower has {cfg.num_heads}")
  values: Values = {}
  for path, value in w.values.items():
    if path[0] == "layers" and path[1] >= cfg.num_layers:
      continue
    if path[:2] == ("embeddings", "patch_embedding"):
      ours = getattr(tower.embeddings, "patch_embedding", None)
      if ours is None or tuple(getattr(ours, path[2]).shape) != value.shape:
        if require_patch_embedding:
          raise ConversionError(f"{w.source}: patch embedding {path[2]} {value.shape} does not fit the "
                                f"tower's {None if ours is None else getattr(ours, path[2]).shape}")
        log.info("SigLIP2 %s: patch embedding %s not loaded (the tower's is %s)", w.source,
                 value.shape, None if ours is None else getattr(ours, path[2]).shape)
        continue
    values[path] = value
  _assign(tower, values, w.source, complete=False, dtype=dtype)
  filled = set(values)
  missing = [p for p, v in nnx.to_flat_state(nnx.state(tower, nnx.Param))
             if p not in filled and p[:2] != ("embeddings", "patch_embedding")]
  if missing:
    raise ConversionError(f"{w.source}: no value for tower parameter(s) "
                          + ", ".join("/".join(map(str, p)) for p in missing[:8]))


def siglip2_tower_from_file(path, cfg: ViTConfig | None = None, *,
                            num_layers: int | None = None, num_heads: int | None = None,
                            dtype="float32") -> VisionTower:
  """A standalone VisionTower with SigLIP2 weights (config from the file unless given)."""
  w = siglip2_weights(path, num_heads=num_heads or (cfg.num_heads if cfg else None))
  cfg = cfg or w.config(num_layers=num_layers)
  tower = nnx.eval_shape(lambda: VisionTower(cfg, rngs=nnx.Rngs(0)))  # every weight comes from w
  load_siglip2_tower(tower, w, require_patch_embedding=True, dtype=jnp.dtype(dtype))
  return tower


def init_encoder_from_siglip2(tokenizer, path, *, decoder: bool = False) -> None:
  """The reference's `enc_pretrained` (and `dec_pretrained` with decoder=True): the tokenizer's
  encoder tower takes SigLIP2's embeddings, first N layers and post_layernorm."""
  w = path if isinstance(path, SigLIP2Weights) else siglip2_weights(
      path, num_heads=tokenizer.config.encoder.num_heads)
  load_siglip2_tower(tokenizer.encoder.visual_model, w)
  if decoder:
    load_siglip2_tower(tokenizer.decoder.visual_model, w)


def load_teacher_from_siglip2(tokenizer, path) -> None:
  """Fills the frozen teacher (`tokenizer.repa_model`, full depth) from SigLIP2 weights."""
  teacher = getattr(tokenizer, "repa_model", None)
  if teacher is None:
    raise ConversionError("this tokenizer has no teacher (repa / global_token_loss_weight off)")
  w = path if isinstance(path, SigLIP2Weights) else siglip2_weights(
      path, num_heads=tokenizer.config.teacher.num_heads)
  load_siglip2_tower(teacher.visual_model, w, exact_depth=True)
