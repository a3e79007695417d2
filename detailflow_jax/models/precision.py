"""One mixed-precision policy for the GPT, the tokenizer and its training-only nets (LPIPS, the
discriminators), with torch-autocast semantics.

Under the reference's `torch.autocast(dtype=bfloat16)` the parameters stay float32 and only the
ops on torch's lower-precision list (conv1d/2d, linear, matmul, mm, mv, bmm, ...) cast their
inputs to bf16 (accumulated in float32, the product rounded to bf16), while ops on its float32
list (layer_norm, group_norm, norm, normalize, softmax, exp, log, pow, sum, the losses) run in
float32 and everything else follows its inputs. Here the same split comes from one place: a
`PolicyLayer` (`Linear`, `Einsum`, `Conv`, and the discriminators' spectral-norm Conv1d in
disc_layers.py) casts its input and kernel to the policy's compute dtype, multiplies with
float32 accumulation (`preferred_element_type`), adds the bias in float32 and rounds the
product to the compute dtype; `Precision.matmul` is the same for a bare matrix product (torch's
mv in the spectral norm's power iteration). Everything else follows its inputs' dtypes: a
float32 residual plus a bf16 branch is float32, RMSNorm / LayerNorm of a float32 residual are
float32, attention scores and softmax are float32 (see attention.py); the few float32-list ops
that meet a bf16 input (LPIPS' unit normalisation, the spectral norm's normalize) cast it up
where they are written.

Backward, as torch's autocast runs it: the gradient products of a bf16 product are bf16 too
(torch's grad_output of a bf16 op is bf16 and meets the saved bf16 operands). JAX's own
derivative of a float32-accumulated product would take its float32 cotangent, so a matmul's
transposes would mix float32 with bf16 and a convolution's would run wholly in float32 (about
2/3 of a train step's FLOPs, on an accelerator at float32 speed). `float32_accumulated` keeps
the forward (float32 accumulation, one rounding) and gives the backward the transposed
products in the operands' dtype: the cotangent rounded to bf16, float32 accumulation inside the
product as the hardware does, results in bf16 (the casts around the product bring the
gradients back to float32 for the float32 master weights and the float32 residual stream).

`Precision()` (no compute dtype) is "native": every op runs in the parameters' own dtype,
exactly as before this policy existed (float32 training, or bf16-converted weights at
inference).

`Precision("bfloat16", output_dtype="float32")` is the sampler's weight-only mode
(`Sampler(weights_dtype="bfloat16")`): kernels stored in bf16 (half the bytes a batch-1 step
streams), inputs rounded to bf16 for the product, float32 accumulation, and the product kept
in float32, so the residual stream, attention, the KV cache and the logits stay float32.

The policy is applied to a built model with `set_precision` (the train steps do it to the model
they merge inside the loss, which is autocast's `with` block around the forward).
"""
import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.linear import _conv_dimension_numbers, canonicalize_padding

COMPUTE_DTYPES = ("float32", "bfloat16")


def float32_accumulated(product: Callable, a: jax.Array, b: jax.Array) -> jax.Array:
  """product(a, b, jnp.float32): `product(a, b, out_dtype)` is a matmul / einsum / convolution
  whose third argument is its preferred_element_type. Float32 operands: plain JAX. Lower
  precision operands (autocast): the same forward, and a backward whose transposed products
  run in the operands' dtype with the cotangent rounded to it (torch autocast's backward; see
  'Backward' above). `product` may read static layer settings only, never traced values."""
  if a.dtype == jnp.float32 and b.dtype == jnp.float32:
    return product(a, b, jnp.float32)
  return _float32_accumulated(product, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _float32_accumulated(product, a, b):
  return product(a, b, jnp.float32)


def _float32_accumulated_forward(product, a, b):
  return product(a, b, jnp.float32), (a, b)


def _float32_accumulated_backward(product, operands, cotangent):
  a, b = operands
  dtype = jnp.result_type(a.dtype, b.dtype)
  # The product in the operands' dtype: its transposes are the bf16 products torch runs. Its own
  # forward value is unused, and XLA removes it.
  _, transposes = jax.vjp(lambda a, b: product(a, b, dtype), a, b)
  return transposes(cotangent.astype(dtype))


_float32_accumulated.defvjp(_float32_accumulated_forward, _float32_accumulated_backward)


@dataclasses.dataclass(frozen=True)
class Precision:
  """compute_dtype: dtype of matmul inputs (None: native, no casts). Accumulation, norms,
  softmax, losses and the residual stream are float32 whenever the parameters are."""
  compute_dtype: str | None = None
  # dtype of a product's result; None: the compute dtype (autocast). "float32": only the
  # product's inputs are rounded (weight-only low precision at inference).
  output_dtype: str | None = None
  # Kernels arrive with their contracted axes moved last (torch's Linear layout [out, in]; see
  # `contracted_last_permutation`). The sampler's CPU layout: XLA:CPU's dot streams a
  # [out, in] kernel 1.3x faster than [in, out] at the 16 rows of a batch-1 group step.
  kernels_contracted_last: bool = False

  def __post_init__(self):
    if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
      raise ValueError(f"compute_dtype={self.compute_dtype!r} ({' | '.join(COMPUTE_DTYPES)})")
    if self.output_dtype is not None and (self.output_dtype not in COMPUTE_DTYPES
                                          or self.compute_dtype is None):
      raise ValueError(f"output_dtype={self.output_dtype!r} needs a compute_dtype and one of "
                       f"{' | '.join(COMPUTE_DTYPES)}")

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

  def matmul(self, a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b as autocast runs torch's mm / mv: native, the plain product; under autocast, inputs
    in the compute dtype, float32 accumulation, the product rounded to the compute dtype."""
    if not self.autocast:
      return a @ b
    dtype = jnp.dtype(self.compute_dtype)
    product = lambda a, b, out_dtype: jnp.matmul(a, b, preferred_element_type=out_dtype)
    return float32_accumulated(product, a.astype(dtype), b.astype(dtype)).astype(self.result_dtype)

  @property
  def result_dtype(self):
    """dtype of a product's result under this policy (autocast only)."""
    return jnp.dtype(self.output_dtype or self.compute_dtype)


class PolicyLayer:
  """A layer whose product (matmul or convolution) follows a `Precision` policy (native by
  default: the layer's own math). Under autocast (`autocast_product`): input and kernel in the
  compute dtype, float32 accumulation, float32 bias add, output in the compute dtype.
  Parameters and their names stay the layer's, so checkpoints and conversion are unchanged.
  Subclasses supply `_product(x, kernel, preferred_element_type)` (reading only static
  settings: it also builds the backward's products) and, where the bias is not a
  vector on the last axis, `_float32_bias(x)`."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.mixed_precision = Precision()

  def __call__(self, x: jax.Array) -> jax.Array:
    policy = self.mixed_precision
    if policy.kernels_contracted_last and not policy.autocast:
      y = self._product(x, self.kernel[...], None)
      return y if self.bias is None else y + self._float32_bias(x).astype(y.dtype)
    if not policy.autocast:
      return super().__call__(x)
    return self.autocast_product(x, self.kernel[...])

  def autocast_product(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    dtype = jnp.dtype(self.mixed_precision.compute_dtype)
    y = float32_accumulated(self._product, x.astype(dtype), kernel.astype(dtype))
    if self.bias is not None:
      y = y + self._float32_bias(x)
    return y.astype(self.mixed_precision.result_dtype)

  def _float32_bias(self, x):
    return self.bias[...].astype(jnp.float32)


def contracted_last_product(x: jax.Array, kernel: jax.Array, contracted: int,
                            preferred_element_type) -> jax.Array:
  """x [*free, *c] times a contracted-last kernel [*out, *c] (c: the last `contracted` axes of
  both) -> [*free, *out], as one 2-D product [rows, in] x [out, in]. With more axes on either
  side XLA:CPU copied the kernel back to [in, out] in every call: a q/k/v einsum with several
  free kernel axes in float32, and any bf16 Linear fed [B, n, in] (GPT-B's matmuls in a 23-step
  loop, 16 rows: 26.3 ms per step with [2, 8, in] inputs, 14.9 ms with [16, in])."""
  free, out = x.shape[:x.ndim - contracted], kernel.shape[:kernel.ndim - contracted]
  rows = x.reshape(-1, math.prod(x.shape[x.ndim - contracted:]))
  y = jax.lax.dot_general(rows, kernel.reshape(-1, rows.shape[-1]), (((1,), (1,)), ((), ())),
                          preferred_element_type=preferred_element_type)
  return y.reshape(free + out)


class Linear(PolicyLayer, nnx.Linear):
  """nnx.Linear under a `Precision` policy: [..., din] x [din, dout] -> [..., dout]."""

  def _product(self, x, kernel, preferred_element_type):
    if not self.mixed_precision.kernels_contracted_last:
      return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                                 preferred_element_type=preferred_element_type)
    return contracted_last_product(x, kernel, 1, preferred_element_type)

  def contracted_last_permutation(self) -> tuple[int, ...]:
    """Axis order that stores the kernel [din, dout] as [dout, din]."""
    return (1, 0)


class Conv(PolicyLayer, nnx.Conv):
  """nnx.Conv under a `Precision` policy (LPIPS' VGG16, the PatchGAN): channels-last input with
  one batch axis, explicit or 'SAME' / 'VALID' padding, no mask."""

  def _product(self, x, kernel, preferred_element_type):
    if self.mixed_precision.kernels_contracted_last:
      raise ValueError("kernels_contracted_last: a Conv kernel has no contracted-last layout (only "
                       "Linear and Einsum kernels do: CONTRACTED_LAST_LAYERS)")
    n = len(self.kernel_size)
    padding = canonicalize_padding(self.padding, n)
    if x.ndim != n + 2 or self.mask is not None or padding in ("CIRCULAR", "REFLECT", "CAUSAL"):
      raise ValueError(f"Conv under autocast: input {x.shape} needs one batch axis, "
                       f"padding={self.padding!r} explicit / SAME / VALID, no mask")
    per_axis = lambda v: (1,) * n if v is None else (v,) * n if isinstance(v, int) else tuple(v)
    return jax.lax.conv_general_dilated(
        x, kernel, per_axis(self.strides), padding, lhs_dilation=per_axis(self.input_dilation),
        rhs_dilation=per_axis(self.kernel_dilation),
        dimension_numbers=_conv_dimension_numbers(x.shape),
        feature_group_count=self.feature_group_count, preferred_element_type=preferred_element_type)


class Einsum(PolicyLayer, nnx.Einsum):
  """nnx.Einsum under a `Precision` policy (the GPT's grouped q/k/v projection)."""

  def _product(self, x, kernel, preferred_element_type):
    if not self.mixed_precision.kernels_contracted_last:
      return jnp.einsum(self.einsum_str, x, kernel, preferred_element_type=preferred_element_type)
    inputs, output = self.einsum_str.replace(" ", "").split("->")
    x_spec, kernel_spec = inputs.split(",")
    stored = "".join(kernel_spec[i] for i in self.contracted_last_permutation())
    kept = "".join(c for c in stored if c in output)
    contracted = stored[len(kept):]
    x_free = x_spec[:len(x_spec) - len(contracted)]
    if x_spec.endswith(contracted) and output == x_free + kept:
      return contracted_last_product(x, kernel, len(contracted), preferred_element_type)
    return jnp.einsum(f"{x_spec},{stored}->{output}", x, kernel, preferred_element_type=preferred_element_type)

  def contracted_last_permutation(self) -> tuple[int, ...]:
    """Axis order that moves the kernel's contracted axes (absent from the output) last."""
    inputs, output = self.einsum_str.replace(" ", "").split("->")
    kernel_spec = inputs.split(",")[1]
    kept = [i for i, c in enumerate(kernel_spec) if c in output]
    return tuple(kept + [i for i, c in enumerate(kernel_spec) if c not in output])

  def _float32_bias(self, x):
    kernel = self.kernel[...]
    if self.mixed_precision.kernels_contracted_last:  # the bias follows the einsum's own layout
      stored = self.contracted_last_permutation()
      kernel = jax.ShapeDtypeStruct(tuple(kernel.shape[stored.index(i)] for i in range(kernel.ndim)),
                                    kernel.dtype)
    shape = self._infer_broadcasted_bias_shape(self.einsum_str, x, kernel)
    return jnp.reshape(self.bias[...].astype(jnp.float32), shape)


# The layers whose kernels can be stored with their contracted axes last (`Precision.
# kernels_contracted_last`, laid out by `contracted_last_permutation()`).
CONTRACTED_LAST_LAYERS = (Linear, Einsum)


def set_precision(model: nnx.Module, policy: Precision) -> nnx.Module:
  """Puts `policy` on every `PolicyLayer` of `model` (in place; returns model). A plain
  nnx.Linear / nnx.Einsum / nnx.Conv in the tree would silently stay native: an error under
  autocast."""
  for path, module in nnx.iter_modules(model):
    if isinstance(module, PolicyLayer):
      module.mixed_precision = policy
    elif isinstance(module, (nnx.Linear, nnx.Einsum, nnx.Conv)) and policy.autocast:
      raise TypeError(f"{'/'.join(map(str, path))} is a plain nnx.{type(module).__name__}: build it "
                      f"with models.precision so the precision policy reaches it")
  return model
