"""The token <-> resolution schedule that makes DetailFlow's token order coarse to fine.

The first t tokens of a sequence stand for an image of side `token2res[t]`: the tokenizer is
trained to reconstruct the image degraded to that size, so decoding a prefix renders a
lower-resolution image. Everything here is plain Python over small static tables, usable at
trace time in jitted code and in data workers alike.
"""
import dataclasses
import math

import numpy as np


def token_to_resolution(max_size: int, max_tokens: int, t: int, power: float) -> int:
  """s(t) = max_size - b * (max_tokens - t)^power with s(1) = 1, truncated like int()."""
  b = (max_size - 1) / math.pow(max_tokens - 1, power)
  s = int(max_size - b * math.pow(max_tokens - t, power))
  return max(1, min(s, max_size))


def round_to_patches(size: int, patch: int, max_side_patches: int) -> int:
  """Square side rounded UP to a multiple of `patch`, clamped to [patch, max_side*patch].

  Mirrors the reference's custom_smart_resize for square images (ceil, unlike Qwen's round;
  pixel-count limits shrink with floor).
  """
  if size < patch:
    return patch
  side = math.ceil(size / patch) * patch
  max_pixels = max_side_patches * max_side_patches * patch * patch
  if side * side > max_pixels:
    beta = math.sqrt(size * size / max_pixels)
    side = math.floor(size / beta / patch) * patch
  elif side * side < patch * patch:
    beta = math.sqrt(patch * patch / (size * size))
    side = math.ceil(size * beta / patch) * patch
  return side


def closest_resolution(size: int, resolutions: list[int]) -> int:
  """The first of the equally-closest entries wins (order matters)."""
  best = resolutions[0]
  for r in resolutions:
    if abs(r - size) < abs(best - size):
      best = r
  return best


def causal_length(group_size: int, causal_num: int | None) -> int:
  """Tokens predicted (and perturbed) one at a time before group-parallel ones start; the
  reference's causal_num, which defaults to one group."""
  return group_size if causal_num is None else causal_num


@dataclasses.dataclass(frozen=True)
class ResolutionSchedule:
  """All token/resolution tables of one tokenizer configuration (the reference's
  ResolutionDegradation)."""
  max_image_size: int
  max_tokens: int
  group_size: int
  causal_num: int | None
  power: float
  enc_patch_size: int
  dec_patch_size: int
  min_dec_res: int

  def __post_init__(self):
    if self.max_tokens % self.group_size:
      raise ValueError(f"max_tokens={self.max_tokens} must be a multiple of group_size={self.group_size}")
    if self.causal_len % self.group_size:
      raise ValueError(f"causal_num={self.causal_len} must be a multiple of group_size={self.group_size}")
    if self.min_dec_res % self.enc_patch_size or self.min_dec_res % self.dec_patch_size:
      raise ValueError(f"min_dec_res={self.min_dec_res} must be a multiple of both patch sizes "
                       f"({self.enc_patch_size}, {self.dec_patch_size})")
    if self.enc_patch_size > self.dec_patch_size:
      raise ValueError("enc_patch_size must not exceed dec_patch_size")
    object.__setattr__(self, "_tables", self._build())

  @property
  def causal_len(self) -> int:
    return causal_length(self.group_size, self.causal_num)

  def _build(self) -> dict[str, object]:
    g = self.group_size
    token_list = list(range(1, self.causal_len + 1)) + [
        k * g for k in range(self.causal_len // g + 1, self.max_tokens // g + 1)]
    max_enc_side = math.ceil(self.max_image_size / self.enc_patch_size)
    max_dec_side = math.ceil(self.max_image_size / self.dec_patch_size)
    t2res, t2enc, t2dec = {}, {}, {}
    enc_best, dec_best, enc_diff, dec_diff = {}, {}, {}, {}
    dec_min, dec_max = {}, {}
    for t in token_list:
      res = token_to_resolution(self.max_image_size, self.max_tokens, t, self.power)
      dec = round_to_patches(res, self.dec_patch_size, max_dec_side)
      enc = round_to_patches(res, self.enc_patch_size, max_enc_side)
      t2res[t], t2dec[t], t2enc[t] = res, dec, enc
      # `<=`: on equal distance the later (larger) token count wins, as in the reference.
      if abs(res - enc) <= enc_diff.get(enc, self.max_image_size):
        enc_best[enc], enc_diff[enc] = t, abs(res - enc)
      if abs(res - dec) <= dec_diff.get(dec, self.max_image_size):
        dec_best[dec], dec_diff[dec] = t, abs(res - dec)
      dec_min[dec] = min(dec_min.get(dec, self.max_tokens), t)
      dec_max[dec] = max(dec_max.get(dec, 1), t)
    return dict(
        token_list=token_list, token2res=t2res, token2enc_res=t2enc, token2dec_res=t2dec,
        token2dec_out_res={t: max(v, self.min_dec_res) for t, v in t2dec.items()},
        encres2besttoken=enc_best, decres2besttoken=dec_best,
        decres2mintoken=dec_min, decres2maxtoken=dec_max,
        best_res=list(dec_best.keys()), best_token=sorted(dec_best.values()))

  def __getattr__(self, name):
    tables = self.__dict__.get("_tables")
    if tables is not None and name in tables:
      return tables[name]
    raise AttributeError(name)

  def tables(self) -> dict[str, object]:
    return dict(self._tables)

  def decode_resolution(self, num_tokens: int) -> int:
    """The output side a decode of the first `num_tokens` tokens should use.

    Token counts inside the table use token2dec_out_res; any other count (a budget that stops
    mid-group) uses the entry of the largest listed count not above it.
    """
    if not 1 <= num_tokens <= self.max_tokens:
      raise ValueError(f"num_tokens={num_tokens} outside [1, {self.max_tokens}]")
    listed = [t for t in self.token_list if t <= num_tokens]
    return self.token2dec_out_res[listed[-1]]

  def decode_token_bucket(self, num_tokens: int) -> int:
    """The largest token count that decodes at the same resolution as `num_tokens` (counts
    decoding at one resolution are contiguous, the resolution never falling as t grows): a
    prefix padded to it decodes with one program per resolution (Tokenizer.decode_prefix)."""
    side = self.decode_resolution(num_tokens)
    larger = [t for t in self.token_list if t > num_tokens and self.token2dec_out_res[t] != side]
    return larger[0] - 1 if larger else self.max_tokens

  def sample_degradation(self, rng: np.random.Generator, max_tokens: int | None = None) -> int:
    """Draws t as the reference's get_input_output_img does when it degrades a batch:
    uniform in [1, max_tokens - group_size], rounded up to a group multiple above causal_len."""
    cur = self.max_tokens if max_tokens is None else max_tokens
    if cur < self.group_size + self.causal_len:
      raise ValueError(f"cannot degrade with max_tokens={cur} < group_size + causal_len")
    return self.degradation_tokens(int(rng.integers(1, cur - self.group_size + 1)))

  def degradation_tokens(self, raw: int) -> int:
    """t from the raw draw in [1, max_tokens - group_size]: kept inside the causal prefix,
    rounded up to a group multiple after it."""
    return math.ceil(raw / self.group_size) * self.group_size if raw > self.causal_len else raw

  def sample_noise_index(self, t: int, rng: np.random.Generator, prob: float,
                         correction_training: bool = True) -> int | None:
    """Self-correction: the first token position to perturb for a batch encoded with t tokens,
    or None (no perturbation). Inside the causal prefix any position; after it, a group start,
    never the last group."""
    if not correction_training or t == 1:
      return None
    if rng.random() >= prob:
      return None
    return self.noise_index(int(rng.integers(0, self.noise_index_bound(t))))

  def noise_index_bound(self, t: int) -> int:
    """The exclusive upper end of the raw noise-index draw for t tokens (t inside the causal
    prefix; else t - group_size: never the last group)."""
    if t <= self.causal_len:
      return t
    if t < self.group_size + self.causal_len or t % self.group_size:
      raise ValueError(f"t={t} is not a valid group-aligned token count")
    return t - self.group_size

  def noise_index(self, raw: int) -> int:
    """The noise index from its raw draw: kept inside the causal prefix, else its group's start."""
    return raw if raw < self.causal_len else raw // self.group_size * self.group_size

  def noise_span(self, noise_idx: int) -> int:
    """How many tokens a perturbation at noise_idx replaces: 1 in the causal prefix, else a group."""
    return 1 if noise_idx < self.causal_len else self.group_size
