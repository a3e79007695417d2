"""The tokenizer evaluation job (the reference's inference/reconstruct_vq.py), sharded and
resumable: reconstructions of validation centre crops from the full token sequence, PSNR, SSIM,
rFID, the noisy-eval passes, and (beyond the reference) PSNR / rFID for every token budget t on
its own resolution (the coarse-to-fine curve).

Per image, as the reference: the crop x (ADM centre crop, ToTensor + Normalize to [-1, 1] in
float32) is reconstructed, the reconstruction turned into uint8 (clamp(127.5 r + 128)), and
PSNR / SSIM taken between that uint8 / 255 and (x + 1) / 2 (scikit-image's functions, here
`pixel_metrics`); SSIM is reported with the standard data_range=1 and, named `ssim_dr2`, with the
reference's data_range=2.0. rFID: ADM-Inception pool features of the uint8 reconstructions
against those of the uint8 crops (the reference used torchmetrics' FID network; the statistics
here are ADM's, the same as the generation job's scores). The crops' statistics are written
once as `reference_R.npz` (mu, sigma, inception_sha256, num_images) and reused by later runs.

Sides (reconstruct_vq.py's --image-size / --image-size-eval): the crops are taken at
`image_size` (default the tokenizer's; one of its best decode resolutions), encoded with
decres2besttoken[image_size] tokens and decoded from all of them at that side. With another
`image_size_eval`, both the reconstructions and the float crops the PSNR / SSIM compare them with
are resized to it with torch's bicubic (a = -0.75, align_corners=False) before uint8 / the
metrics, as the reference does; rFID compares the resized reconstructions with the crops at
`image_size` (the reference's real images are the unresized crops).

Noisy eval (correction-trained tokenizers): noise indices from `protocol.noise_indices`; image
i's random top-k codes draw from protocol key (seed, i) of the noise stream, so passes are the
same on any device count. Curve: decode the first t clean tokens at decode_resolution(t); the
target is the crop resized to that side (the reference's resize_imgs: area down, bicubic up).

Shapes: crops uint8 [n, S, S, 3]; per chunk and pass: psnr / ssim / ssim_dr2 float64 [n], pool
float32 [n, 2048].
"""
import dataclasses
import io
import json
import logging
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from .. import paths, sharding
from ..data import protocol
from ..data.transforms import center_crop_arr
from ..inference.images import to_uint8
from ..models.precision import Precision, set_precision
from ..ops.resize import resize_bicubic, resize_images
from . import scores
from .chunks import ChunkStore, write_json_atomically
from .device import GlobalBatch, cast_floating, check_precision, decode_tokens, to_host
from .features import extract_features
from .inception import POOL_DIM
from .pixel_metrics import psnr, ssim
from .reference import HASH_KEY, save_npz_atomically
from .scores import RunningStatistics

log = logging.getLogger("detailflow_jax")
SOURCES = ("imagefolder", "tfds")


@dataclasses.dataclass(frozen=True)
class ReconstructionSettings:
  source: str = "imagefolder"   # imagefolder: PATH/SPLIT/<wnid>/*.JPEG; tfds: data_dir PATH
  path: str = ""
  split: str = "val"
  tfds_name: str = "imagenet2012"
  num_images: int = 0           # 0: the whole split (ImageNet val: 50,000)
  seed: int = 0                 # noisy-eval draws
  noisy_eval: bool = True
  noise_top_k: int = 50         # the reference's quantize(h, top_k=50)
  curve_tokens: tuple[int, ...] = ()  # token budgets of the curve; () = every schedule entry
  curve: bool = True
  precision: str = "float32"
  image_size: int = 0           # crop / decode side; 0: the tokenizer's image_size
  image_size_eval: int = 0      # side the metrics see (torch bicubic); 0: image_size
  per_device_batch: int = 4
  chunk_size: int = 1000
  inception_batch: int = 64

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
    check_precision(self.precision)
    for name in ("per_device_batch", "chunk_size", "inception_batch", "noise_top_k"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.num_images < 0:
      raise ValueError(f"num_images must be >= 0, got {self.num_images}")
    for name in ("image_size", "image_size_eval"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be positive (0: the default), got {getattr(self, name)}")

  def protocol(self) -> dict:
    d = dataclasses.asdict(self)
    for k in ("per_device_batch", "inception_batch"):
      d.pop(k)
    d["curve_tokens"] = list(self.curve_tokens)
    return d


def open_source(s: ReconstructionSettings):
  from ..data.sources import ImageFolderSource, TFDSSource
  if not s.path:
    raise ValueError("the tokenizer evaluation needs eval.data.path (an ImageNet root or TFDS data_dir)")
  if s.source == "tfds":
    return TFDSSource(s.tfds_name, "validation" if s.split == "val" else s.split, data_dir=s.path)
  return ImageFolderSource(s.path, s.split)


def crop_record(record: dict, size: int) -> np.ndarray:
  """uint8 [size, size, 3]: ADM's centre crop of a source record (bytes or an HWC array)."""
  image = record["image"]
  img = Image.fromarray(np.asarray(image)) if isinstance(image, np.ndarray) else Image.open(io.BytesIO(image))
  return np.asarray(center_crop_arr(img.convert("RGB"), size), np.uint8)


def normalize(crops: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1] as torchvision's ToTensor + Normalize(0.5, 0.5) compute it."""
  x = crops.astype(np.float32) / np.float32(255)
  return (x - np.float32(0.5)) / np.float32(0.5)


def streamed_statistics(blocks: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  stats = RunningStatistics(POOL_DIM)
  for b in blocks:
    stats.add(b)
  return stats.result()


@jax.jit
def _noise_keys(seed, indices):
  return protocol.row_keys(seed, indices, protocol.NOISE_STREAM)


def _pass_name(noise_idx: int) -> str:
  return "clean" if noise_idx < 0 else f"noise{noise_idx}"


class ReconstructionJob:
  """Evaluates one tokenizer (a loaded module) on a validation set with one Inception."""

  def __init__(self, tokenizer, inception, inception_sha256: str, settings: ReconstructionSettings,
               mesh=None, source=None):
    self.settings = s = settings
    self.mesh = mesh if mesh is not None else sharding.make_mesh()
    self.config, self.schedule = tokenizer.config, tokenizer.schedule
    from .generation import decode_plan
    plan = decode_plan(tokenizer.config, tokenizer.schedule, tokenizer.config.num_latent_tokens, s.image_size)
    self.size, self.tokens = plan["image_size"], plan["num_tokens"]  # the reference's cur_max_token_num
    self.eval_size = s.image_size_eval or self.size
    self.inception, self.inception_sha256 = inception, inception_sha256
    self.source = source if source is not None else open_source(s)
    self.num_images = s.num_images or len(self.source)
    if self.num_images > len(self.source):
      raise ValueError(f"num_images={self.num_images} but {self.source!r} has {len(self.source)}")
    graphdef, state = nnx.split(tokenizer)
    self.graphdef = graphdef
    # Precision as reconstruct_vq.py runs it: float32 weights under the autocast policy
    # (bfloat16: bf16 matmul inputs, float32 accumulation; the pixels come out bf16).
    self.policy = Precision.named(s.precision, "precision")
    self.state = jax.device_put(cast_floating(state, jnp.float32),
                                sharding.replicated(self.mesh))
    t = self.tokens
    noisy = s.noisy_eval and tokenizer.config.correction_training  # as the reference
    self.noise_indices = protocol.noise_indices(t, tokenizer.config.group_size, noisy)
    self.passes = list(dict.fromkeys(self.noise_indices))  # a repeated index is one pass
    listed = [c for c in self.schedule.token_list if c <= self.tokens]
    counts = list(s.curve_tokens) or listed
    bad = [c for c in counts if c not in listed]
    if bad:
      raise ValueError(f"curve_tokens {bad} are not in the schedule's token list up to the "
                       f"{self.tokens} tokens of image_size {self.size}: {listed}")
    self.curve = counts if s.curve else []
    self.curve_res = {c: self.schedule.decode_resolution(c) for c in self.curve}
    self.batch = s.per_device_batch * self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    self._global = GlobalBatch(self.mesh, self.batch)
    self.trace_count = 0  # traces of _reconstruct_batch: one per batch shape and `noisy`
    self._reconstruct = jax.jit(self._reconstruct_batch, static_argnames=("noisy",))

  def _reconstruct_batch(self, state, images, keys, noise_idx, *, noisy: bool):
    """images [B, S, S, 3] -> (pixels [B, E, E, 3] (bf16 under autocast) from all T = self.tokens tokens, resized
    to E = eval_size when it differs from S, clean indices [B, T]).
    noisy: tokens from noise_idx (int32, traced: one program serves every noise pass) on are
    perturbed, row b drawing from keys[b] only (the same codes on any device count)."""
    self.trace_count += 1  # runs at trace time only
    model = set_precision(nnx.merge(self.graphdef, state), self.policy)
    enc = model.encode(images, self.tokens)
    if not noisy:
      quant = enc.quant
    else:
      def one(image, key):
        return model.self_correct(image[None], noise_idx, key, self.tokens,
                                  top_k=self.settings.noise_top_k).quant[0]
      quant = jax.vmap(one)(images, keys)
    pixels = model.decode(quant, None, images.shape[1])
    if self.eval_size != images.shape[1]:
      pixels = resize_bicubic(pixels, self.eval_size)
    return pixels, enc.indices

  # -- one chunk -------------------------------------------------------------------------------

  def _arrays(self) -> dict:
    out = {"real_pool": ((POOL_DIM,), "float32")}
    for p in self.passes:
      n = _pass_name(p)
      out.update({f"{n}_psnr": ((), "float64"), f"{n}_ssim": ((), "float64"),
                  f"{n}_ssim_dr2": ((), "float64"), f"{n}_pool": ((POOL_DIM,), "float32")})
    for c in self.curve:
      out.update({f"t{c}_psnr": ((), "float64"), f"t{c}_pool": ((POOL_DIM,), "float32")})
    for r in sorted(set(self.curve_res.values())):
      if r != self.size:
        out[f"real{r}_pool"] = ((POOL_DIM,), "float32")
    return out

  def _features(self, images: np.ndarray) -> np.ndarray:
    b = self.settings.inception_batch
    level = log.level
    log.setLevel(max(level, logging.WARNING))  # one progress line per chunk is enough (run())
    try:
      return extract_features(self.inception, (images[i:i + b] for i in range(0, len(images), b)),
                              len(images), b, name="reconstruction")["pool"]
    finally:
      log.setLevel(level)

  def chunk(self, start: int, stop: int) -> dict[str, np.ndarray]:
    crops = np.stack([crop_record(self.source[i], self.size) for i in range(start, stop)])
    x = normalize(crops)
    # reconstruct_vq.py: rgb_gts = bicubic(x) to the eval side when it differs, then (x + 1) / 2
    x_eval = x if self.eval_size == self.size else resize_bicubic(x, self.eval_size)
    gt = (x_eval + np.float32(1.0)) / np.float32(2.0)
    out = {"real_pool": self._features(crops)}
    recon = {p: [] for p in self.passes}
    indices = []
    for first in range(0, len(x), self.batch):
      rows = np.zeros((self.batch,) + x.shape[1:], np.float32)
      rows[:len(x[first:first + self.batch])] = x[first:first + self.batch]
      idx = np.arange(start + first, start + first + self.batch, dtype=np.int32)
      keys = _noise_keys(jnp.uint32(self.settings.seed), self._global.put(idx))
      images = self._global.put(rows)
      n = min(self.batch, len(x) - first)
      for p in self.passes:
        pixels, ind = self._reconstruct(self.state, images, keys, np.int32(p), noisy=p >= 0)
        recon[p].append(to_uint8(to_host(pixels))[:n])
        if p == self.passes[0]:
          indices.append((ind, n))
    for p in self.passes:
      u8 = np.concatenate(recon[p])
      restored = u8.astype(np.float32) / np.float32(255.0)
      name = _pass_name(p)
      out[f"{name}_psnr"] = np.array([psnr(a, b) for a, b in zip(restored, gt)], np.float64)
      out[f"{name}_ssim"] = np.array([ssim(a, b, 1.0) for a, b in zip(restored, gt)], np.float64)
      out[f"{name}_ssim_dr2"] = np.array([ssim(a, b, 2.0) for a, b in zip(restored, gt)], np.float64)
      out[f"{name}_pool"] = self._features(u8)
    targets = {}
    for c in self.curve:
      r = self.curve_res[c]
      if r not in targets:
        targets[r] = to_uint8(np.asarray(resize_images(jnp.asarray(x), r))) if r != self.size else crops
        if r != self.size:
          out[f"real{r}_pool"] = self._features(targets[r])
      decoded = np.concatenate([
          to_uint8(to_host(decode_tokens(self.graphdef, self.state, ind, num_tokens=c, image_size=r,
                                           policy=self.policy)))[:n]
          for ind, n in indices])
      dec01 = decoded.astype(np.float32) / np.float32(255.0)
      tgt01 = targets[r].astype(np.float32) / np.float32(255.0)
      out[f"t{c}_psnr"] = np.array([psnr(a, b) for a, b in zip(dec01, tgt01)], np.float64)
      out[f"t{c}_pool"] = self._features(decoded)
    return out

  # -- the run ---------------------------------------------------------------------------------

  def run(self, workdir, log_every_s: float = 10.0) -> dict:
    """Chunks under `workdir` (finished ones kept), then results.json and curve.json / .png."""
    s = self.settings
    workdir = paths.run_path(workdir)  # local or gs://
    writer = jax.process_index() == 0
    proto = dict(s.protocol(), num_images=self.num_images, source_repr=repr(self.source),
                 inception_sha256=self.inception_sha256, image_size=self.size)
    store = ChunkStore(workdir / "chunks", proto, self.num_images, s.chunk_size, self._arrays(), writer=writer)
    sharding.barrier("reconstruction: manifest read")
    pending = store.pending()
    log.info("tokenizer eval: %d images, passes %s, curve %s, %d chunks (%d to make), global batch %d",
             self.num_images, self.noise_indices, self.curve, store.num_chunks, len(pending), self.batch)
    made, seconds = store.fill(self.chunk, "tokenizer eval", log_every_s)
    sharding.barrier("reconstruction: chunks written")
    results = self.summarize(store, workdir, writer)
    results["run"] = {"images_made": made, "seconds": seconds, "devices": self.mesh.size,
                      "processes": jax.process_count()}
    if writer:
      write_json_atomically(workdir / "results.json", results)
    sharding.barrier("reconstruction: results written")
    return results

  def _reference(self, store: ChunkStore, workdir: paths.AnyPath, key: str, res: int, writer: bool):
    """(mu, sigma) of the crops at side `res`, cached as reference_RES.npz with the hash."""
    path = workdir / f"reference_{res}.npz"
    if path.is_file():
      with path.open("rb") as raw, np.load(raw, allow_pickle=False) as f:
        if str(f[HASH_KEY]) == self.inception_sha256 and int(f["num_images"]) == self.num_images:
          return f["mu"], f["sigma"]
    mu, sigma = streamed_statistics(store.blocks(key))
    if writer:
      save_npz_atomically(path, mu=mu, sigma=sigma, num_images=np.int64(self.num_images),
                          **{HASH_KEY: np.array(self.inception_sha256)})
    return mu, sigma

  def summarize(self, store: ChunkStore, workdir: paths.AnyPath, writer: bool) -> dict:
    def mean(key):
      return float(np.mean(np.concatenate(list(store.blocks(key)))))

    def rfid(key, ref):
      mu, sigma = streamed_statistics(store.blocks(key))
      return scores.frechet_distance(mu, sigma, *ref)

    ref = self._reference(store, workdir, "real_pool", self.size, writer)
    passes = []
    for p in self.noise_indices:
      n = _pass_name(p)
      passes.append({"noise_idx": p, "psnr": mean(f"{n}_psnr"), "ssim": mean(f"{n}_ssim"),
                     "ssim_dr2": mean(f"{n}_ssim_dr2"), "rfid": rfid(f"{n}_pool", ref)})
    curve = []
    for c in self.curve:
      r = self.curve_res[c]
      ref_r = ref if r == self.size else self._reference(store, workdir, f"real{r}_pool", r, writer)
      curve.append({"tokens": c, "resolution": r, "psnr": mean(f"t{c}_psnr"), "rfid": rfid(f"t{c}_pool", ref_r)})
    clean = passes[0]
    results = {
        "psnr": clean["psnr"], "ssim": clean["ssim"], "ssim_dr2": clean["ssim_dr2"], "rfid": clean["rfid"],
        "notes": {"ssim": "scikit-image SSIM, data_range=1 (standard) on [0, 1] images",
                  "ssim_dr2": "the reference's value: data_range=2.0 on [0, 1] images (inflated)",
                  "psnr": "scikit-image PSNR, data_range=1",
                  "rfid": "ADM Inception pool_3 statistics of uint8 reconstructions vs the crops"},
        "noisy_eval": passes, "curve": curve, "num_images": self.num_images,
        "image_size": self.size, "image_size_eval": self.eval_size, "num_tokens": self.tokens,
        "tokenizer_latent_tokens": self.config.num_latent_tokens,
        "settings": self.settings.protocol(), "inception_sha256": self.inception_sha256,
    }
    if writer and curve:
      from ..inference.plots import save_curves
      (workdir / "curve.json").write_text(json.dumps(curve, indent=1))
      ts = [c["tokens"] for c in curve]
      save_curves(workdir / "curve.png", {"PSNR (dB) vs tokens": (ts, [c["psnr"] for c in curve]),
                                          "rFID vs tokens": (ts, [c["rfid"] for c in curve])},
                  columns=2, x_label="tokens")
    return results


def run_tokenizer_eval(e, workdir, mesh=None) -> dict:
  """The tokenizer job from a config's `eval` section (detailflow_jax/configs/eval_common.py)."""
  from ..weights.hub import resolve_model_dir
  from ..weights.load import load_model_dir
  from ..weights.model_dir import is_model_dir
  from .inception import load_inception
  if not e.tokenizer:
    raise ValueError("eval.tokenizer is empty: give --config.eval.tokenizer=DIR (converted dir, run dir or Hub id)")
  if not e.inception:
    raise ValueError("eval.inception is empty: give --config.eval.inception=DIR "
                     "(`python -m detailflow_jax.convert inception`)")
  weights = None if is_model_dir(e.tokenizer) else (e.tokenizer_weights or None)
  tokenizer = load_model_dir(resolve_model_dir(e.tokenizer, "tokenizer", weights), "tokenizer")
  inception, info = load_inception(e.inception)
  settings = ReconstructionSettings(
      source=e.data.source, path=e.data.path, split=e.data.split, tfds_name=e.data.tfds_name,
      num_images=e.data.num_images, seed=e.seed, noisy_eval=e.noisy_eval, noise_top_k=e.noise_top_k,
      curve=e.curve, curve_tokens=tuple(e.curve_tokens), precision=e.precision,
      image_size=e.image_size, image_size_eval=e.image_size_eval, per_device_batch=e.per_device_batch,
      chunk_size=e.chunk_size, inception_batch=e.inception_batch)
  return ReconstructionJob(tokenizer, inception, info["weights_sha256"], settings, mesh=mesh).run(workdir)
