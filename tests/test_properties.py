"""Property suite: random Flax and Haiku models from the supported vocabulary.

Every generated model (depth, widths, Dense or Conv, activations incl. lambdas and kinked
ones, pooling or flatten, LayerNorm, residual sums of independent branches, both
parameterizations, input shapes and dtypes) either gets a kernel that is finite, symmetric,
positive semi-definite, equal under jit and not, float32 ~ float64 and with finite input
gradients — or raises one of the documented errors (`im.InfiniteWidthError`). Never a NaN,
never an internal traceback. The slow profile also compares each NNGP with a Monte Carlo
estimate over random Gaussian inits of the real model (within its stated error).

Bounded for CI: `max_examples` small, `deadline=None`, derandomized.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.nn import initializers as jinit
from reference_models import assert_mc_close, haiku_init_apply, linen_init_apply, mc_nngp

import infinite_modules as im

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "erf": jax.lax.erf,
    "gelu": lambda z: jax.nn.gelu(z, approximate=False),
    "leaky_lambda": lambda z: jnp.where(z > 0, z, 0.1 * z),
    "shifted_relu": lambda z: jnp.maximum(z - 0.3, 0.0),
    "sin": jnp.sin,
    "identity": lambda z: z,
}


@dataclasses.dataclass(frozen=True)
class Spec:
  library: str          # "flax" or "haiku"
  conv: bool
  depth: int
  width: int
  activation: str
  layer_norm: bool
  residual: bool
  pool: bool            # conv only: global average pool instead of flatten
  parameterization: str
  n: int
  features: int


specs = st.builds(
    Spec,
    library=st.sampled_from(["flax", "haiku"]),
    conv=st.booleans(),
    depth=st.integers(1, 3),
    width=st.sampled_from([4, 16]),
    activation=st.sampled_from(sorted(ACTIVATIONS)),
    layer_norm=st.booleans(),
    residual=st.booleans(),
    pool=st.booleans(),
    parameterization=st.sampled_from(["ntk", "standard"]),
    n=st.integers(1, 3),
    features=st.integers(1, 3),
)

_W = jinit.variance_scaling(1.5, "fan_in", "normal")
_B = jinit.normal(0.3)


def _flax_model(spec: Spec, width: int) -> nn.Module:
  act = ACTIVATIONS[spec.activation]

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      layer = (lambda: nn.Conv(width, (3, 3), kernel_init=_W, bias_init=_B)) if spec.conv \
          else (lambda: nn.Dense(width, kernel_init=_W, bias_init=_B))
      h = layer()(x)
      for _ in range(spec.depth):
        branch = act(h)
        if spec.layer_norm:
          branch = nn.LayerNorm()(branch)
        branch = layer()(branch)
        # A residual sum of two independent Gaussian branches (a fresh projection of h).
        h = branch + layer()(h) if spec.residual else branch
      h = act(h)
      if spec.conv:
        h = h.mean(axis=(1, 2)) if spec.pool else h.reshape(h.shape[0], -1)
      return nn.Dense(1 if width < 64 else width, kernel_init=_W, bias_init=_B)(h)

  return Model()


def _haiku_model(spec: Spec, width: int):
  act = ACTIVATIONS[spec.activation]
  w_init = hk.initializers.VarianceScaling(1.5, "fan_in", "normal")
  b_init = hk.initializers.RandomNormal(0.3)

  def f(x):
    layer = (lambda: hk.Conv2D(width, 3, w_init=w_init, b_init=b_init)) if spec.conv \
        else (lambda: hk.Linear(width, w_init=w_init, b_init=b_init))
    h = layer()(x)
    for _ in range(spec.depth):
      branch = act(h)
      if spec.layer_norm:
        branch = hk.LayerNorm(-1, create_scale=True, create_offset=True)(branch)
      branch = layer()(branch)
      h = branch + layer()(h) if spec.residual else branch
    h = act(h)
    if spec.conv:
      h = h.mean(axis=(1, 2)) if spec.pool else h.reshape(h.shape[0], -1)
    return hk.Linear(1 if width < 64 else width, w_init=w_init, b_init=b_init)(h)

  return hk.without_apply_rng(hk.transform(f))


def _model(spec: Spec, width: int | None = None):
  width = spec.width if width is None else width
  return _flax_model(spec, width) if spec.library == "flax" else _haiku_model(spec, width)


def _inputs(spec: Spec, dtype, seed=0):
  shape = (spec.n, 4, 4, spec.features) if spec.conv else (spec.n, 2 + spec.features)
  x = np.random.default_rng(seed).normal(size=shape)
  if spec.n > 1:
    x[-1] = x[0]  # a duplicated input: correlation exactly 1
  return x.astype(dtype)


def _kernel_fn_or_documented_error(spec: Spec, x):
  try:
    kf = im.kernel_fn(_model(spec), x[:1], parameterization=spec.parameterization)
    return kf, kf(x, None)
  except im.InfiniteWidthError as e:
    message = str(e)
    assert "`" in message or "kernel_fn" in message, message  # names what, and the way out
    return None, None


def _check_properties(spec: Spec):
  with jax.enable_x64(True):
    x64 = _inputs(spec, np.float64)
    kf, k = _kernel_fn_or_documented_error(spec, x64)
    if kf is None:
      return None
    for name in ("nngp", "ntk"):
      a = np.asarray(getattr(k, name))
      scale = float(np.max(np.abs(a)))
      assert np.all(np.isfinite(a)), (name, a)
      # Gauss-Hermite quadrature is one-sided (1e-6 asymmetry seen after LayerNorm of erf):
      # exact symmetry for x2=None is issue 11's; this bound is what holds today.
      np.testing.assert_allclose(a, a.T, rtol=1e-5, atol=1e-9 * scale, err_msg=name)
      assert np.min(np.linalg.eigvalsh((a + a.T) / 2)) >= -1e-9 * scale, (name, a)
    jitted = jax.jit(lambda z: kf(z, None, get="ntk"))(x64)
    np.testing.assert_allclose(jitted, k.ntk, rtol=1e-10, atol=1e-14)
    k32 = kf(x64.astype(np.float32), None)
    assert k32.ntk.dtype == jnp.float32
    for name in ("nngp", "ntk"):
      a64, a32 = np.asarray(getattr(k, name)), np.asarray(getattr(k32, name), np.float64)
      np.testing.assert_allclose(a32, a64, rtol=1e-3, atol=1e-4 * np.max(np.abs(a64)),
                                 err_msg=name)
    grad = jax.grad(lambda z: kf(z, None, get="ntk").sum() + kf(z, None, get="nngp").sum())(x64)
    assert np.all(np.isfinite(grad)), grad
    return k


@settings(max_examples=3, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(specs)
def test_random_models_have_valid_kernels_or_documented_errors(spec):
  _check_properties(spec)


@pytest.mark.slow
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(specs)
def test_random_models_large_profile_with_monte_carlo(spec):
  k = _check_properties(spec)
  if k is None:
    return
  x = _inputs(spec, np.float32)
  if spec.n > 1:
    x = x[:-1]  # the Monte Carlo scale needs distinct inputs
  kf = im.kernel_fn(_model(spec), x[:1])
  analytic = kf(x, None)
  wide = _model(spec, width=256)
  init, apply = (linen_init_apply(wide, x[:1]) if spec.library == "flax"
                 else haiku_init_apply(wide, x[:1]))
  estimate = mc_nngp(init, apply, x, samples=200, seed=1)
  assert_mc_close(estimate, len(x), analytic.nngp, np.diag(analytic.nngp), bound=0.1,
                  what=str(spec))
