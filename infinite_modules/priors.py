"""Exact priors (mean and variance of each entry) read from initializers.

The kernel of an infinitely wide network depends on each parameter only
through the mean and variance of the i.i.d. distribution its initializer
draws from. We read those two numbers exactly from the initializer object:
`jax.nn.initializers` / `flax.linen.initializers` closures (inspected through
their closure cells) and Haiku's initializer classes (through their
attributes). Anything else raises `PriorError`: a guessed prior would change
the kernel silently.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from infinite_modules.errors import PriorError


@dataclasses.dataclass(frozen=True)
class Law:
  """The distribution family of a parameter's entries, standardized.

  An entry is `mean + sqrt(variance) * xi` (the `Prior`'s mean and variance) with xi
  of mean 0 and variance 1 and density

      p(xi) = scale * exp(-(alpha * xi + beta)^2 / 2)   on [lower, upper]

  (a normal: alpha 1, beta 0, unbounded; a normal truncated to [lo, hi] in units of its
  own stddev, standardized by the truncated law's mean m and stddev s: alpha s, beta m,
  bounds (lo - m) / s, (hi - m) / s; a uniform: alpha = beta = 0, bounds +-sqrt(3)).
  Only the exact first-layer kernel (`first_layer`) needs more than mean and variance.
  """
  family: str
  lower: float
  upper: float
  alpha: float
  beta: float
  scale: float

  def density(self, xi):
    """p(xi) (zero outside [lower, upper]); works on numpy and jax arrays."""
    inside = (xi >= self.lower) & (xi <= self.upper)
    return inside * (self.scale * np.exp(-0.5 * (self.alpha * xi + self.beta) ** 2))


def normal_law() -> Law:
  return Law("normal", -math.inf, math.inf, 1.0, 0.0, 1.0 / math.sqrt(2 * math.pi))


def uniform_law() -> Law:
  r = math.sqrt(3.0)
  return Law("uniform", -r, r, 0.0, 0.0, 1.0 / (2 * r))


def truncated_normal_law(lower: float, upper: float) -> Law:
  """A standard normal truncated to [lower, upper], standardized."""
  mean, variance = truncated_normal_moments(lower, upper)
  s = math.sqrt(variance)
  mass = 0.5 * (math.erf(upper / math.sqrt(2)) - math.erf(lower / math.sqrt(2)))
  return Law("truncated_normal", (lower - mean) / s, (upper - mean) / s, s, mean,
             s / (math.sqrt(2 * math.pi) * mass))


@dataclasses.dataclass(frozen=True)
class Prior:
  """Distribution of each entry of a parameter: i.i.d. with this mean/variance.

  Attributes:
    variance: variance of one entry.
    mean: mean of one entry.
    gaussian: whether the entries are Gaussian. Only matters for parameters
      added to a field (biases): a non-Gaussian bias makes the sum
      non-Gaussian, so no nonlinearity may follow it. Weights contracted over
      an infinite axis give Gaussian outputs whatever their distribution.
    law: the standardized distribution family (`Law`) when read from an
      initializer; None for a user's `Prior` (then normal if `gaussian`, else
      unknown). Only `kernel_fn(..., input_layer="exact")` reads it.
  """
  variance: float
  mean: float = 0.0
  gaussian: bool = True
  law: Law | None = dataclasses.field(default=None, compare=False)

  def __post_init__(self):
    # Python floats: numpy scalars (fan-ins from np.prod) are not weakly typed in
    # JAX and would promote a float32 kernel to float64 under jax_enable_x64.
    for field in ("variance", "mean"):
      value = getattr(self, field)
      if isinstance(value, (bool, complex, str)) or not _is_real_scalar(value):
        raise PriorError(
            f"Prior {field} must be one real number (the {field} of every entry: the "
            f"entries are i.i.d.), got {value!r}. For per-entry distributions use "
            "`interop.monte_carlo_kernel_fn`.")
      object.__setattr__(self, field, float(value))
    if not (math.isfinite(self.variance) and self.variance >= 0):
      raise PriorError(f"Prior variance must be finite and >= 0, got {self.variance}.")
    if not math.isfinite(self.mean):
      raise PriorError(f"Prior mean must be finite, got {self.mean}.")


def _is_real_scalar(value) -> bool:
  """A number or 0-d array, real (finiteness is checked by the caller)."""
  try:
    float(value)
  except (TypeError, ValueError):
    return False
  return np.ndim(value) == 0 and np.isrealobj(value)


def truncated_normal_moments(lower: float, upper: float) -> tuple[float, float]:
  """Mean and variance of a standard normal truncated to [lower, upper]."""
  pdf = lambda t: math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
  cdf = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))
  z = cdf(upper) - cdf(lower)
  if z <= 0:
    raise PriorError(f"Empty truncation interval [{lower}, {upper}].")
  mean = (pdf(lower) - pdf(upper)) / z
  variance = 1 + (lower * pdf(lower) - upper * pdf(upper)) / z - mean ** 2
  return mean, variance


def _jax_fans(shape: Sequence[int], in_axis, out_axis, batch_axis) -> tuple[float, float]:
  """Fan-in/out exactly as `jax.nn.initializers.variance_scaling` computes them."""
  shape = tuple(shape)
  ndim = len(shape)
  if ndim < 2:
    raise PriorError(f"variance_scaling needs at least 2 dimensions, got shape {shape}.")
  norm = lambda axes: {a % ndim for a in (axes if isinstance(axes, (tuple, list)) else (axes,))}
  in_axes, out_axes, batch_axes = norm(in_axis), norm(out_axis), norm(batch_axis)
  receptive = np.prod([s for i, s in enumerate(shape) if i not in in_axes | out_axes | batch_axes])
  fan_in = np.prod([shape[i] for i in in_axes]) * receptive
  fan_out = np.prod([shape[i] for i in out_axes]) * receptive
  return float(fan_in), float(fan_out)


def _haiku_fans(shape: Sequence[int], fan_in_axes) -> tuple[float, float]:
  """Fan-in/out exactly as Haiku's `VarianceScaling` computes them."""
  shape = tuple(shape)
  if len(shape) < 1:
    return 1.0, 1.0
  if len(shape) == 1:
    return float(shape[0]), float(shape[0])
  if len(shape) == 2:
    return float(shape[0]), float(shape[1])
  if fan_in_axes is not None:
    fan_in = np.prod([shape[i] for i in fan_in_axes])
    fan_out = np.prod([s for i, s in enumerate(shape) if i not in fan_in_axes])
    return float(fan_in), float(fan_out)
  receptive = np.prod(shape[:-2])
  return float(shape[-2] * receptive), float(shape[-1] * receptive)


def _scaled_variance(scale: float, mode: str, fan_in: float, fan_out: float, clamp: bool) -> float:
  denominators = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2,
                  "fan_geo_avg": (fan_in * fan_out) ** 0.5}
  if mode not in denominators:
    raise PriorError(f"Unknown variance_scaling mode {mode!r}.")
  denominator = denominators[mode]
  return float(scale) / (max(1.0, denominator) if clamp else denominator)


def _closure(fn: Callable) -> dict[str, Any]:
  cells = fn.__closure__ or ()
  return {name: cell.cell_contents for name, cell in zip(fn.__code__.co_freevars, cells)}


def _from_jax_initializer(init: Callable, shape: Sequence[int]) -> Prior | None:
  """Prior of a `jax.nn.initializers` function, or None if not one of them."""
  module = getattr(init, "__module__", "") or ""
  if not module.startswith(("jax._src.nn.initializers", "jax.nn.initializers", "flax.")):
    return None
  name = getattr(init, "__qualname__", "")
  if name in ("zeros", "zeros_init.<locals>.init"):
    return Prior(0.0, 0.0)
  if name in ("ones", "ones_init.<locals>.init"):
    return Prior(0.0, 1.0)
  cells = _closure(init) if init.__closure__ else {}
  if name == "constant.<locals>.init":
    value = np.asarray(cells["value"])
    if value.size != 1 and not np.all(value == value.reshape(-1)[0]):
      raise PriorError("constant initializer with a non-uniform value is not i.i.d.")
    return Prior(0.0, float(value.reshape(-1)[0]))
  if name == "normal.<locals>.init":
    return Prior(float(cells["stddev"]) ** 2, 0.0, law=normal_law())
  if name == "truncated_normal.<locals>.init":
    lower, upper = float(cells["lower"]), float(cells["upper"])
    mean, variance = truncated_normal_moments(lower, upper)
    stddev = float(cells["stddev"])
    return Prior(variance * stddev ** 2, mean * stddev, gaussian=False,
                 law=truncated_normal_law(lower, upper))
  if name == "uniform.<locals>.init":
    scale = float(cells["scale"])
    return Prior(scale ** 2 / 12.0, scale / 2.0, gaussian=False, law=uniform_law())
  if name == "variance_scaling.<locals>.init":
    fan_in, fan_out = _jax_fans(shape, cells["in_axis"], cells["out_axis"], cells["batch_axis"])
    variance = _scaled_variance(cells["scale"], cells["mode"], fan_in, fan_out, clamp=False)
    # jax scales all three distributions so that the variance is exactly
    # `variance` (the truncated normal is divided by its own stddev).
    if cells["distribution"] not in ("normal", "truncated_normal", "uniform"):
      raise PriorError(f"variance_scaling distribution {cells['distribution']!r} is not supported.")
    law = {"normal": normal_law, "uniform": uniform_law,
           "truncated_normal": lambda: truncated_normal_law(-2.0, 2.0)}[cells["distribution"]]()
    return Prior(variance, 0.0, gaussian=cells["distribution"] == "normal", law=law)
  return None


def _from_haiku_initializer(init: Any, shape: Sequence[int]) -> Prior | None:
  """Prior of a Haiku initializer object, or None if not one of them."""
  cls = type(init)
  if not cls.__module__.startswith("haiku"):
    return None
  name = cls.__name__
  if name == "Constant":
    value = np.asarray(init.constant)
    if value.size != 1 and not np.all(value == value.reshape(-1)[0]):
      raise PriorError("hk.initializers.Constant with a non-uniform value is not i.i.d.")
    return Prior(0.0, float(value.reshape(-1)[0]))
  if name == "RandomNormal":
    return Prior(float(init.stddev) ** 2, float(init.mean), law=normal_law())
  if name == "TruncatedNormal":
    lower, upper = float(init.lower), float(init.upper)
    mean, variance = truncated_normal_moments(lower, upper)
    stddev = float(init.stddev)
    return Prior(variance * stddev ** 2, float(init.mean) + mean * stddev, gaussian=False,
                 law=truncated_normal_law(lower, upper))
  if name == "RandomUniform":
    low, high = float(init.minval), float(init.maxval)
    return Prior((high - low) ** 2 / 12.0, (high + low) / 2.0, gaussian=False,
                 law=uniform_law())
  if name == "VarianceScaling":
    fan_in, fan_out = _haiku_fans(shape, init.fan_in_axes)
    variance = _scaled_variance(init.scale, init.mode, fan_in, fan_out, clamp=True)
    if init.distribution == "truncated_normal":
      # Haiku divides the stddev by the constant .87962566103423978 (the
      # stddev of N(0,1) truncated to [-2, 2]), then draws TruncatedNormal.
      _, tvar = truncated_normal_moments(-2.0, 2.0)
      return Prior(variance / 0.87962566103423978 ** 2 * tvar, 0.0, gaussian=False,
                   law=truncated_normal_law(-2.0, 2.0))
    law = normal_law() if init.distribution == "normal" else uniform_law()
    return Prior(variance, 0.0, gaussian=init.distribution == "normal", law=law)
  return None


def _flax_dense_general_kernel(init: Callable, shape: tuple) -> tuple[Callable, tuple]:
  """`DenseGeneral`'s `kernel_init_wrap`: the inner initializer draws a 2-D matrix.

  Flax calls `self.kernel_init(rng, (prod(batch) * prod(contracted), prod(features)))`
  and reshapes it to `shape = (*batch, *contracted, *features)`: the fans are those of the
  flattened matrix (for `features=(heads, head_dim)`, fan_out = heads * head_dim).
  """
  cells = _closure(init)
  n_batch, n_axis, n_features = cells["n_batch_dims"], cells["n_axis"], cells["n_features"]
  flat = (int(np.prod(shape[:n_batch]) * np.prod(shape[n_batch:n_batch + n_axis])),
          int(np.prod(shape[len(shape) - n_features:])))
  return cells["self"].kernel_init, flat


def _flax_dense_general_bias(init: Callable, shape: tuple) -> tuple[Callable, tuple]:
  """`DenseGeneral`'s `bias_init_wrap`: the inner initializer draws a 1-D vector of
  prod(batch) * prod(features) entries, reshaped to `shape`."""
  cells = _closure(init)
  n_batch, n_features = cells["n_batch_dims"], cells["n_features"]
  flat = (int(np.prod(shape[:n_batch]) * np.prod(shape[len(shape) - n_features:])),)
  return cells["self"].bias_init, flat


# Initializers that call a known initializer on a shape of their own, keyed by the
# qualified name of their code; each maps (wrapper, shape) to (inner initializer, the
# shape it is called with), read from the wrapper's closure exactly as the wrapper uses it.
_FLAX_WRAPPERS: dict[str, Callable[[Callable, tuple], tuple[Callable, tuple]]] = {
    "DenseGeneral.__call__.<locals>.kernel_init_wrap": _flax_dense_general_kernel,
    "DenseGeneral.__call__.<locals>.bias_init_wrap": _flax_dense_general_bias,
}
# Modules whose `functools.wraps` wrappers only box the inner initializer's value
# (`nn.with_partitioning`, `nn.with_logical_partitioning`): same draw, same shape.
_BOXING_WRAPPER_MODULES = ("flax.core.meta", "flax.linen.spmd")


@dataclasses.dataclass(frozen=True)
class InitializerCall:
  """An initializer and the shape it was called with when the parameter was created.

  Lifted transforms stack parameters: `nn.scan(..., variable_axes={"params": 0})`
  calls each layer's initializer with the layer's own shape and stacks the draws into
  a leaf of shape (layers, *shape). The fans are those of the call, not of the leaf.
  """
  init: Any
  shape: tuple[int, ...]


def unwrap_initializer(init: Any, shape: Sequence[int]) -> tuple[Any, tuple]:
  """Follows known wrappers down to the initializer that draws the values.

  Returns the innermost initializer and the shape it draws (the fans of a
  variance_scaling initializer are those of that shape, not of the parameter's).
  """
  shape = tuple(int(s) for s in shape)
  for _ in range(16):  # wrappers of wrappers; bounded against cycles
    code = getattr(init, "__code__", None)
    if code is None:
      break
    from_flax_linear = getattr(init, "__module__", None) == "flax.linen.linear"
    wrapper = _FLAX_WRAPPERS.get(code.co_qualname) if from_flax_linear else None
    if wrapper is not None:
      init, shape = wrapper(init, shape)
      continue
    inner = getattr(init, "__wrapped__", None)
    file_module = code.co_filename.replace("/", ".").removesuffix(".py")
    if inner is not None and file_module.endswith(_BOXING_WRAPPER_MODULES):
      init = inner
      continue
    break
  return init, shape


def prior_from_initializer(init: Any, shape: Sequence[int], name: str = "?") -> Prior:
  """Returns the exact `Prior` of the distribution `init` draws for `shape`.

  Args:
    init: a `jax.nn.initializers` / `flax.linen.initializers` function (also
      wrapped by Flax: `DenseGeneral`'s reshaping wrappers, `nn.with_partitioning`),
      a Haiku initializer, `None` (Haiku's default for a bias: zeros) or a `Prior`.
    shape: the shape of the parameter (fans are computed from it).
    name: the parameter's path, for the error message.

  Raises:
    PriorError: for an initializer whose distribution is not known exactly.
  """
  if isinstance(init, InitializerCall):
    # The leaf is (*stacked axes, *call shape): every layer draws with the call's fans.
    called = tuple(init.shape)
    leaf = tuple(shape)
    if len(called) <= len(leaf) and leaf[len(leaf) - len(called):] == called:
      shape = called
    init = init.init
  if isinstance(init, Prior):
    return init
  if init is None:
    return Prior(0.0, 0.0)
  import jax.numpy as jnp
  if init is jnp.zeros:  # Haiku's default bias initializer
    return Prior(0.0, 0.0)
  if init is jnp.ones:
    return Prior(0.0, 1.0)
  if not callable(init):
    raise PriorError(
        f"The prior for `{name}` is {init!r}: expected an `im.Prior(variance=..., mean=...)` "
        "or an initializer function (e.g. `jax.nn.initializers.normal(0.1)`). Pass "
        f"`kernel_fn(..., priors={{'{name}': im.Prior(variance=..., mean=0.)}})`.")
  init, shape = unwrap_initializer(init, shape)
  if init is None:
    return Prior(0.0, 0.0)
  for reader in (_from_jax_initializer, _from_haiku_initializer):
    prior = reader(init, shape)
    if prior is not None:
      return prior
  raise PriorError(
      f"Parameter `{name}` uses initializer {init!r}, whose distribution is not "
      "known exactly (supported: jax/flax variance_scaling family, normal, "
      "truncated_normal, uniform, zeros, ones, constant; Haiku VarianceScaling, "
      "TruncatedNormal, RandomNormal, RandomUniform, Constant). Pass an explicit "
      f"prior: `kernel_fn(..., priors={{'{name}': im.Prior(variance=..., mean=0.)}}).`")
