"""One mixed-precision policy for the GPT and the tokenizer, with torch-autocast semantics.

Under the reference's `torch.autocast(dtype=bfloat16)` the parameters stay float32 and only
matmul inputs are cast to bf16 (accumulated in float32, the product rounded to bf16), while
embeddings, the residual stream, norms, softmax and losses stay float32. Here the same split
comes from one place: `Linear` (every projection of both models) casts its input and kernel to
the policy's compute dtype, multiplies with float32 accumulation (`preferred_element_type`),
adds the bias in float32 and rounds the product to the compute dtype. Everything else follows
its inputs' dtypes: a float32 residual plus a bf16 branch is float32, RMSNorm / LayerNorm of a
float32 residual are float32, attention scores and softmax are float32 (see attention.py).

`Precision()` (no compute dtype) is "native": every op runs in the parameters' own dtype,
exactly as before this policy existed (float32 training, or bf16-converted weights at
inference).

The policy is applied to a built model with `set_precision` (the train steps do it to the model
they merge inside the loss, which is autocast's `with` block around the forward).
"""
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Precision:
  """compute_dtype: dtype of matmul inputs (None: native, no casts). Accumulation, norms,
  softmax, losses and the residual stream are float32 whenever the parameters are."""
  compute_dtype: Optional[str] = None

  def __post_init__(self):
    if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
      raise ValueError(f"compute_dtype={self.compute_dtype!r} ({' | '.join(COMPUTE_DTYPES)})")

  @classmethod
  def named(cls, compute_dtype, key: str = "compute_dtype") -> "Precision":
    """The policy a config's `compute_dtype` names: 'float32' is native (float32 parameters
    compute in float32), 'bfloat16' is bf16 autocast. `key` names the config field in errors."""
    name = jnp.dtype(compute_dtype).name if not isinstance(compute_dtype, str) else compute_dtype
    if name not in COMPUTE_DTYPES:
      raise ValueError(f"{key}={compute_dtype!r} ({' | '.join(COMPUTE_DTYPES)})")
    return cls(None if name == "float32" else name)

  @property
  def autocast(self) -> bool:
    return self.compute_dtype is not None


class _PolicyLayer:
  """A layer whose matmul follows a `Precision` policy (native by default: the nnx layer's own
  math). Under autocast: inputs and kernel in the compute dtype, float32 accumulation, float32
  bias add, output in the compute dtype. Parameters and their names stay the nnx layer's, so
  checkpoints and conversion are unchanged."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.mixed_precision = Precision()

  def __call__(self, x: jax.Array) -> jax.Array:
    policy = self.mixed_precision
    if not policy.autocast:
      return super().__call__(x)
    dtype = jnp.dtype(policy.compute_dtype)
    y = self._product(x.astype(dtype), self.kernel[...].astype(dtype))
    if self.bias is not None:
      y = y + self._float32_bias(x)
    return y.astype(dtype)


class Linear(_PolicyLayer, nnx.Linear):
  """nnx.Linear under a `Precision` policy: [..., din] x [din, dout] -> [..., dout]."""

  def _product(self, x, kernel):
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)

  def _float32_bias(self, x):
    return self.bias[...].astype(jnp.float32)


class Einsum(_PolicyLayer, nnx.Einsum):
  """nnx.Einsum under a `Precision` policy (the GPT's grouped q/k/v projection)."""

  def _product(self, x, kernel):
    return jnp.einsum(self.einsum_str, x, kernel, preferred_element_type=jnp.float32)

  def _float32_bias(self, x):
    shape = self._infer_broadcasted_bias_shape(self.einsum_str, x, self.kernel[...])
    return jnp.reshape(self.bias[...].astype(jnp.float32), shape)


def set_precision(model: nnx.Module, policy: Precision) -> nnx.Module:
  """Puts `policy` on every `Linear` / `Einsum` of `model` (in place; returns model). A plain
  nnx.Linear / nnx.Einsum in the tree would silently stay native: an error under autocast."""
  for path, module in nnx.iter_modules(model):
    if isinstance(module, (Linear, Einsum)):
      module.mixed_precision = policy
    elif isinstance(module, (nnx.Linear, nnx.Einsum)) and policy.autocast:
      raise TypeError(f"{'/'.join(map(str, path))} is a plain nnx.{type(module).__name__}: build it "
                      f"with models.precision so the precision policy reaches it")
  return model
