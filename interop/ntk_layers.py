"""Flax linen layers in NTK parameterization, and small models built from them.

In the NTK parameterization [Jacot et al. 2018, https://arxiv.org/abs/1806.07572;
Neural Tangents' default] every parameter is drawn from N(0, 1) and the scale
lives in the forward pass::

    Dense:  y = (W_std / sqrt(fan_in)) * (x @ W) + b_std * b,    W, b ~ N(0, 1)
    Conv:   y = (W_std / sqrt(fan_in)) * conv(x, W) + b_std * b,
            fan_in = in_channels * prod(kernel_size)

The function at initialization has the same distribution as the plain
`nn.Dense(kernel_init=variance_scaling(W_std**2, "fan_in", "normal"),
bias_init=normal(b_std))` ("standard" parameterization), but gradient descent
differs: here every weight's gradient carries the factor `1 / sqrt(fan_in)`,
so a fixed learning rate trains networks of any width in the kernel regime and
the infinite-width limit is width independent.

Kernels: the analytic kernel of a model built from these layers *as written*,
`im.kernel_fn(ntk_model, x, parameterization="standard")`, equals the
NTK-parameterization kernel of the plain model,
`im.kernel_fn(plain_model, x, parameterization="ntk")` (tested to float64
round-off in `tests/test_compare.py`). The layers scale the N(0, 1) weight by
the constant `W_std / sqrt(fan_in)` before the matmul / convolution (cheaper
than scaling the output, the same function and gradients), so the kernel
interpreter sees a `dot_general` / `conv_general_dilated` whose weight is a
constant multiple of an N(0, 1) param, and a bias `b_std * b` with b ~ N(0, 1).

To compare finite training with its infinite-width prediction, train the model
in the parameterization its kernel describes: an `NTKDense` model with
`parameterization="standard"` kernels (see `interop.compare`), or a plain
Flax model with `parameterization="standard"` at its actual widths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["CNN", "MLP", "NTKConv", "NTKDense", "conv", "dense"]

Parameterization = Literal["ntk", "standard"]
PaddingLike = str | Sequence[tuple[int, int]]

_unit_normal = nn.initializers.normal(stddev=1.0)


def _check_std(name: str, value: float | None, allow_none: bool) -> None:
  if value is None:
    if not allow_none:
      raise ValueError(f"{name} must be a number, got None.")
    return
  if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
    raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")


def _check_prior(W_std: float, b_std: float | None) -> None:
  _check_std("W_std", W_std, allow_none=False)
  _check_std("b_std", b_std, allow_none=True)


def _ntk_params(layer: NTKDense | NTKConv, x: jax.Array, kernel_shape: tuple[int, ...],
                fan_in: int) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """`(x, kernel, bias)` of an NTK layer, promoted to its dtype: the N(0, 1) `kernel`
  scaled by `W_std / sqrt(fan_in)` (see the module docstring), and the N(0, 1) `bias`
  (`None` when `b_std` is `None`)."""
  kernel = layer.param("kernel", _unit_normal, kernel_shape, layer.param_dtype)
  bias = (layer.param("bias", _unit_normal, (layer.features,), layer.param_dtype)
          if layer.b_std is not None else None)
  x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=layer.dtype)
  return x, kernel * (layer.W_std / math.sqrt(fan_in)), bias


def _add_bias(y: jax.Array, bias: jax.Array | None, b_std: float | None) -> jax.Array:
  return y if bias is None else y + b_std * bias


def _standard_init(W_std: float, b_std: float | None) -> dict[str, Any]:
  """`nn.Dense` / `nn.Conv` arguments for the prior in the standard parameterization."""
  _check_prior(W_std, b_std)
  return {"use_bias": b_std is not None,
          "kernel_init": nn.initializers.variance_scaling(W_std ** 2, "fan_in", "normal"),
          "bias_init": nn.initializers.normal(b_std) if b_std else nn.initializers.zeros}


class NTKDense(nn.Module):
  """Dense layer in NTK parameterization: `(W_std/sqrt(fan_in)) x @ W + b_std b`.

  Params `kernel` (fan_in, features) and `bias` (features,) are drawn from
  N(0, 1), so the param tree looks like `nn.Dense`'s.

  Attributes:
    features: output width.
    W_std: weight standard deviation (NT's `W_std`).
    b_std: bias standard deviation (NT's `b_std`); `None` means no bias.
    dtype: computation dtype (`None`: from the inputs and params).
    param_dtype: dtype of the params.
    precision: `lax.dot_general` precision.
  """

  features: int
  W_std: float = 1.0
  b_std: float | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _check_prior(self.W_std, self.b_std)
    fan_in = x.shape[-1]
    x, kernel, bias = _ntk_params(self, x, (fan_in, self.features), fan_in)
    y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
    return _add_bias(y, bias, self.b_std)


class NTKConv(nn.Module):
  """Convolution in NTK parameterization: `(W_std/sqrt(fan_in)) conv(x, W) + b_std b`.

  Inputs are channels-last with a batch axis, `(batch, *spatial, channels)`,
  like `nn.Conv`; 1 to 3 spatial dimensions. `fan_in = in_channels *
  prod(kernel_size)`. Params `kernel` `(*kernel_size, in, features)` and `bias`
  (features,) are drawn from N(0, 1).

  Attributes:
    features: number of output channels.
    kernel_size: window shape, an int or one int per spatial dimension.
    strides: an int or one int per spatial dimension.
    padding: `"SAME"`, `"VALID"`, `"CIRCULAR"` (periodic, as `nn.Conv`) or
      explicit `(low, high)` pairs per spatial dimension.
    kernel_dilation: an int or one int per spatial dimension.
    W_std: weight standard deviation.
    b_std: bias standard deviation; `None` means no bias.
    dtype, param_dtype, precision: as in `NTKDense`.
  """

  features: int
  kernel_size: int | Sequence[int] = 3
  strides: int | Sequence[int] = 1
  padding: PaddingLike = "SAME"
  kernel_dilation: int | Sequence[int] = 1
  W_std: float = 1.0
  b_std: float | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _check_prior(self.W_std, self.b_std)
    n_spatial = (len(self.kernel_size) if isinstance(self.kernel_size, Sequence)
                 else x.ndim - 2)
    if n_spatial < 1 or x.ndim != n_spatial + 2:
      raise ValueError(
          f"NTKConv expects inputs (batch, *spatial, channels) with {n_spatial} spatial "
          f"dimensions, got shape {x.shape}. Add a batch axis: x[None].")

    def per_dim(value, name):
      value = tuple(value) if isinstance(value, Sequence) else (value,) * n_spatial
      if len(value) != n_spatial:
        raise ValueError(f"{name} has {len(value)} entries for {n_spatial} spatial dims.")
      return value

    kernel_size = per_dim(self.kernel_size, "kernel_size")
    strides = per_dim(self.strides, "strides")
    dilation = per_dim(self.kernel_dilation, "kernel_dilation")
    in_channels = x.shape[-1]
    fan_in = in_channels * math.prod(kernel_size)
    x, kernel, bias = _ntk_params(self, x, kernel_size + (in_channels, self.features), fan_in)

    padding = self.padding
    if isinstance(padding, str):
      padding = padding.upper()
      if padding == "CIRCULAR":
        # As nn.Conv: wrap-pad, then a VALID convolution.
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
        x = jnp.pad(x, pads, mode="wrap")
        padding = "VALID"
      elif padding not in ("SAME", "VALID"):
        raise ValueError(f"padding must be 'SAME', 'VALID', 'CIRCULAR' or (low, high) pairs, "
                         f"got {self.padding!r}.")
    else:
      padding = [tuple(p) for p in padding]
      if len(padding) != n_spatial:
        raise ValueError(f"padding has {len(padding)} pairs for {n_spatial} spatial dims.")

    nd = x.ndim
    lhs_spec = (0, nd - 1) + tuple(range(1, nd - 1))
    rhs_spec = (nd - 1, nd - 2) + tuple(range(nd - 2))
    y = lax.conv_general_dilated(
        x, kernel, window_strides=strides, padding=padding, rhs_dilation=dilation,
        dimension_numbers=lax.ConvDimensionNumbers(lhs_spec, rhs_spec, lhs_spec),
        precision=self.precision)
    return _add_bias(y, bias, self.b_std)


def _check_parameterization(parameterization: str) -> None:
  if parameterization not in ("ntk", "standard"):
    raise ValueError(f"parameterization must be 'ntk' or 'standard', got {parameterization!r}.")


def dense(features: int, W_std: float = 1.0, b_std: float | None = None,
          parameterization: Parameterization = "ntk", **kwargs: Any) -> nn.Module:
  """A dense layer with prior (`W_std`, `b_std`) in either parameterization.

  `"ntk"` gives an `NTKDense`; `"standard"` gives the plain
  `nn.Dense(kernel_init=variance_scaling(W_std**2, "fan_in", "normal"),
  bias_init=normal(b_std))`, the layer as NT's `stax.Dense(W_std, b_std)`
  describes it in `parameterization="standard"`. Both have the same function
  distribution at initialization; they differ in how gradient descent moves them.
  """
  _check_parameterization(parameterization)
  if parameterization == "ntk":
    return NTKDense(features, W_std=W_std, b_std=b_std, **kwargs)
  return nn.Dense(features, **_standard_init(W_std, b_std), **kwargs)


def conv(features: int, kernel_size: int | Sequence[int] = 3, strides: int | Sequence[int] = 1,
         padding: PaddingLike = "SAME", W_std: float = 1.0,
         b_std: float | None = None, parameterization: Parameterization = "ntk",
         n_spatial: int = 2, **kwargs: Any) -> nn.Module:
  """A convolution with prior (`W_std`, `b_std`) in either parameterization (see `dense`).

  `n_spatial` is the number of spatial dimensions when `kernel_size` or
  `strides` is given as an int.
  """
  _check_parameterization(parameterization)
  as_tuple = lambda v: tuple(v) if isinstance(v, Sequence) else (v,) * n_spatial
  kernel_size, strides = as_tuple(kernel_size), as_tuple(strides)
  if parameterization == "ntk":
    return NTKConv(features, kernel_size, strides, padding, W_std=W_std, b_std=b_std, **kwargs)
  return nn.Conv(features, kernel_size, strides, padding, **_standard_init(W_std, b_std),
                 **kwargs)


class MLP(nn.Module):
  """Fully connected ReLU network `[Dense(width) -> relu] * depth -> Dense(out)`.

  Attributes:
    width: hidden width.
    out: output dimension.
    depth: number of hidden layers.
    W_std, b_std: prior of every layer (see `dense`).
    W_std_out: weight prior of the readout layer (default `W_std`); a small
      value makes the outputs at initialization small.
    parameterization: `"ntk"` (NTKDense layers) or `"standard"` (nn.Dense).
  """

  width: int
  out: int = 1
  depth: int = 2
  W_std: float = 2.0 ** 0.5
  b_std: float | None = 0.1
  W_std_out: float | None = None
  parameterization: Parameterization = "ntk"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    for _ in range(self.depth):
      x = nn.relu(dense(self.width, self.W_std, self.b_std, self.parameterization)(x))
    w_out = self.W_std if self.W_std_out is None else self.W_std_out
    return dense(self.out, w_out, self.b_std, self.parameterization)(x)


class CNN(nn.Module):
  """Convolutional ReLU network `[Conv(width, 3x3) -> relu] * depth -> flatten -> Dense(out)`.

  Inputs are channels-last images `(batch, height, width, channels)`. The
  flatten readout (no pooling) keeps the analytic kernel cheap: only the
  spatial diagonal of the covariance is needed.

  Attributes:
    width: number of channels of every convolution.
    out: output dimension.
    depth: number of convolutions.
    kernel_size: convolution window.
    W_std, b_std: prior of every layer.
    W_std_out: weight prior of the readout layer (default `W_std`).
    parameterization: `"ntk"` (NTKConv / NTKDense) or `"standard"` (nn.Conv / nn.Dense).
  """

  width: int
  out: int = 1
  depth: int = 1
  kernel_size: tuple[int, int] = (3, 3)
  W_std: float = 2.0 ** 0.5
  b_std: float | None = 0.1
  W_std_out: float | None = None
  parameterization: Parameterization = "ntk"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for _ in range(self.depth):
      x = nn.relu(conv(self.width, self.kernel_size, 1, "SAME", self.W_std, self.b_std,
                       self.parameterization)(x))
    x = x.reshape(x.shape[0], -1)
    w_out = self.W_std if self.W_std_out is None else self.W_std_out
    return dense(self.out, w_out, self.b_std, self.parameterization)(x)
