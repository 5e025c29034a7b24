"""Reliability of the closed forms: dtypes, exact GELU's NTK factor, NaN-free input gradients.

* The kernel's dtype is the inputs' dtype whatever `jax_enable_x64` says: float32 inputs
  with x64 enabled neither crash nor compute in float64, and keep their closed forms.
* Every recognised core has closed-form kappa, dkappa and mean, checked against
  high-order Gauss-Hermite (and adaptive quadrature where Gauss-Hermite is slow).
* Input gradients of every closed form (and of the quadrature paths) are finite at
  correlation +-1 (duplicated, opposite and zero inputs), and equal finite differences
  elsewhere.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infinite_modules as im
from infinite_modules import elementwise as ew
from infinite_modules import expectations as ex


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


class MLP(nn.Module):
  act: object
  depth: int = 2
  width: int = 16
  dtype: object = None

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = self.act(nn.Dense(self.width, dtype=self.dtype)(x))
    return nn.Dense(1, dtype=self.dtype)(x)


def _inputs(dtype, n=4, d=3, seed=0):
  x = np.random.default_rng(seed).normal(size=(n, d)).astype(dtype)
  return x


def _strong_float64(jaxpr) -> list:
  """Equations (also in sub-jaxprs) with a float64 output that is not a weakly typed
  python scalar: what a float32 kernel must not compute."""
  found = []
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      if v.aval.dtype == jnp.float64 and not v.aval.weak_type:
        found.append(str(eqn)[:120])
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          found += _strong_float64(inner)
  return found


def _no_float64(fn, *args) -> bool:
  found = _strong_float64(jax.make_jaxpr(fn)(*args).jaxpr)
  assert not found, found[:3]
  return True


@pytest.mark.parametrize("act", [nn.relu, jnp.tanh], ids=["relu", "tanh"])
def test_float32_inputs_with_x64_stay_float32(x64, act):
  """Was: TypeError (lax.sub float64 vs float32) from a float64 prior promoting the moments."""
  x = _inputs(np.float32)
  kf = im.kernel_fn(MLP(act, depth=1), x[:1])
  k32 = kf(x, None)
  assert k32.ntk.dtype == jnp.float32 and k32.nngp.dtype == jnp.float32
  assert _no_float64(lambda a: kf._kernel(a, a, full=kf.full).ntk, x)
  k64 = kf(x.astype(np.float64), None)
  assert k64.ntk.dtype == jnp.float64
  np.testing.assert_allclose(k32.ntk, k64.ntk, rtol=2e-5)
  np.testing.assert_allclose(k32.nngp, k64.nngp, rtol=2e-5)


def test_float32_relu_keeps_closed_form_with_x64(x64, monkeypatch):
  x = _inputs(np.float32)
  seen = []
  original = ew._closed_form  # the form found, by structure (relu) or by the probe fit
  monkeypatch.setattr(ew, "_CLOSED_FORMS", {})  # recognition is memoized per phi and dtype
  monkeypatch.setattr(ew, "_closed_form", lambda expr, kinks, dtype: seen.append(
      original(expr, kinks, dtype)) or seen[-1])
  im.kernel_fn(MLP(nn.relu, depth=1), x[:1])(x, None, get="ntk")
  assert seen and all(isinstance(f, ex.Affine) and isinstance(f.core, ex.ReluPair) for f in seen)


def test_float32_layers_with_float64_inputs(x64):
  """A model whose layers compute in float32 (dtype=float32) with float64 inputs: phi's
  literals follow the kernel's dtype (float64) instead of failing in lax.max/lax.sub."""
  x = _inputs(np.float64)
  act = lambda z: jnp.maximum(z, 0.0)  # literal 0.0 is float32 in the float32 layer
  k = im.kernel_fn(MLP(act, depth=1, dtype=jnp.float32), x[:1])(x, None, get="ntk")
  assert k.dtype == jnp.float64
  # The float32 layer rounds its input to float32 (Flax's promote_dtype): so does the reference.
  x_rounded = x.astype(np.float32).astype(np.float64)
  ref = im.kernel_fn(MLP(act, depth=1), x[:1])(x_rounded, None, get="ntk")
  np.testing.assert_allclose(k, ref, rtol=1e-10, atol=1e-12 * float(np.max(ref)))


def test_tanh_gelu_is_not_taken_for_exact_gelu(x64):
  """In float32 the recognition tolerance let tanh-GELU (2e-4 from exact GELU) pass."""
  for dtype in (jnp.float32, jnp.float64):
    assert ex.recognize(lambda z: nn.gelu(z, approximate=True), dtype) is None
    form = ex.recognize(lambda z: nn.gelu(z, approximate=False), dtype)
    assert isinstance(form.core, ex.Gelu)


CORES = [ex.ReluPair(1.0, 0.0), ex.ReluPair(1.0, 0.1), ex.ReluPair(1.0, -1.0), ex.Erf(),
         ex.Sign(), ex.Sin(), ex.Cos(), ex.Exp(), ex.Gelu()]
SMOOTH = (ex.Erf, ex.Sin, ex.Cos, ex.Exp, ex.Gelu)


@pytest.mark.parametrize("core", CORES, ids=lambda c: repr(c))
def test_every_core_has_closed_forms_matching_quadrature(x64, core):
  """kappa, dkappa and mean of every core against 150-point Gauss-Hermite (float64)."""
  cases = [(1.0, 1.0, 0.3), (0.1, 2.0, -0.9), (0.7, 0.7, 1.0), (2.0, 0.5, 0.99), (1.5, 1.5, -1.0)]
  df = ex.derivative(core)
  smooth = isinstance(core, SMOOTH)
  at_zero = jnp.zeros((1,))  # the kink / jump of the others: piecewise Gauss-Legendre
  rtol = 1e-12 if smooth else 1e-7  # the piecewise reference: ~1e-8 at correlation +-1
  for va, vb, rho in cases:
    c = jnp.float64(rho * np.sqrt(va * vb))
    args = (c, jnp.float64(va), jnp.float64(vb), 0.0, 0.0)
    if smooth:
      mean = ex.expectation(core, jnp.float64(va), 0.0, 150)
      kappa = ex.pair_expectation(core, core, *args, 150)
      dkappa = ex.pair_expectation(df, df, *args, 150)
    else:
      mean = ex.expectation_piecewise(core, jnp.float64(va), 0.0, at_zero)
      kappa = ex.pair_expectation_piecewise(core, core, *args, at_zero, at_zero)
      dkappa = ex.pair_expectation_piecewise(df, df, *args, at_zero, at_zero)
    np.testing.assert_allclose(core.mean(jnp.float64(va)), mean, rtol=rtol, atol=1e-14)
    np.testing.assert_allclose(core.kappa(c, va, vb), kappa, rtol=rtol, atol=1e-14)
    if isinstance(core, ex.Sign):
      continue  # sign' is a delta: dkappa = 0 is the almost-everywhere derivative
    np.testing.assert_allclose(core.dkappa(c, va, vb), dkappa, rtol=rtol, atol=1e-14)


def test_gelu_dkappa_against_adaptive_quadrature(x64):
  """Large variances, where Gauss-Hermite converges slowly: scipy's adaptive quadrature."""
  integrate = pytest.importorskip("scipy.integrate")
  stats = pytest.importorskip("scipy.stats")
  va, vb, rho = 50.0, 80.0, -0.999
  c = rho * np.sqrt(va * vb)
  d = lambda z: stats.norm.cdf(z) + z * stats.norm.pdf(z)
  sa, slope = np.sqrt(va), c / np.sqrt(va)
  resid = np.sqrt(vb - slope ** 2)
  inner = lambda x: integrate.quad(lambda y: d(slope * x + resid * y) * stats.norm.pdf(y),
                                   -12, 12, points=[-slope * x / resid], limit=200)[0]
  expected = integrate.quad(lambda x: d(sa * x) * inner(x) * stats.norm.pdf(x), -12, 12,
                            points=[0], limit=200)[0]
  np.testing.assert_allclose(ex.Gelu().dkappa(c, va, vb), expected, rtol=1e-9)


ACTIVATIONS = {
    "relu": nn.relu, "leaky_relu": nn.leaky_relu, "abs": jnp.abs, "erf": jax.lax.erf,
    "gelu": lambda z: nn.gelu(z, approximate=False), "sign": jnp.sign, "sin": jnp.sin,
    "exp": lambda z: jnp.exp(0.3 * z), "tanh": jnp.tanh, "relu6": nn.relu6,
}


def _kernel_sum(kf, a, b):
  k = kf(a, b, get=("nngp", "ntk"))
  return k.nngp.sum() + k.ntk.sum()


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_input_gradients_are_finite_at_correlation_one(x64, name):
  """Duplicated, opposite and zero inputs (correlation +-1; zero variance, as there is no
  bias): arccos' and sqrt' are infinite there; the kernels' gradients must not be NaN."""
  x = _inputs(np.float64, 4, 3)
  x[1], x[2], x[3] = x[0], -x[0], 0.0
  model = nn.Sequential([nn.Dense(8, use_bias=False), ACTIVATIONS[name],
                         nn.Dense(1, use_bias=False)])
  kf = im.kernel_fn(model, x[:1])
  dtypes = (np.float64, np.float32) if name == "relu" else (np.float64,)
  for dtype in dtypes:
    xs = x.astype(dtype)
    g_sym = jax.grad(lambda a: _kernel_sum(kf, a, None))(xs)
    g_cross = jax.grad(lambda a: _kernel_sum(kf, a, a[:2]))(xs)
    assert np.all(np.isfinite(g_sym)) and np.all(np.isfinite(g_cross)), (name, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_input_gradients_are_finite_deep_with_bias(x64, name):
  x = _inputs(np.float64, 4, 3)
  x[1], x[2], x[3] = x[0], -x[0], 0.0
  kf = im.kernel_fn(MLP(ACTIVATIONS[name], depth=3, width=8), x[:1])
  for dtype in (np.float64, np.float32):
    xs = x.astype(dtype)
    g_sym = jax.grad(lambda a: _kernel_sum(kf, a, None))(xs)
    g_cross = jax.grad(lambda a: _kernel_sum(kf, a, a[:2]))(xs)
    assert np.all(np.isfinite(g_sym)) and np.all(np.isfinite(g_cross)), (name, dtype)


@pytest.mark.parametrize("name", ["relu", "sign", "gelu"])
def test_input_gradients_match_finite_differences(x64, name):
  """Away from correlation +-1 the custom derivatives are the true ones."""
  x1, x2 = _inputs(np.float64, 2, 3, seed=1), _inputs(np.float64, 3, 3, seed=2)
  kf = im.kernel_fn(MLP(ACTIVATIONS[name], depth=1), x1[:1])
  direction = np.random.default_rng(3).normal(size=x1.shape)
  f = lambda a: _kernel_sum(kf, a, x2)
  grad = np.sum(np.asarray(jax.grad(f)(x1)) * direction)
  h = 1e-6
  fd = (f(x1 + h * direction) - f(x1 - h * direction)) / (2 * h)
  np.testing.assert_allclose(grad, fd, rtol=1e-6)


def _finite_psd(k):
  for name in ("nngp", "ntk"):
    a = np.asarray(getattr(k, name), np.float64)
    scale = float(np.max(np.abs(a)))
    assert np.all(np.isfinite(a)), (name, a)
    assert np.min(np.linalg.eigvalsh((a + a.T) / 2)) >= -1e-6 * scale, (name, a)


@pytest.mark.parametrize("depth,dtype", [
    (6, np.float64),
    pytest.param(64, np.float64, marks=pytest.mark.slow),
    pytest.param(64, np.float32, marks=pytest.mark.slow)])
def test_deep_net_awkward_inputs_are_finite_and_psd(x64, depth, dtype):
  """A deep ReLU MLP (64 layers under -m slow) on zero, duplicated, opposite inputs and
  scales 1e-6 .. 1e6, and a batch of one."""
  rng = np.random.default_rng(0)
  base = rng.normal(size=(1, 3))
  scales = np.array([0.0, 1e-6, 1e-3, 1.0, 1.0, -1.0, 1e3, 1e6])[:, None]
  x = (scales * base).astype(dtype)
  model = MLP(nn.relu, depth=depth, width=8)
  kf = im.kernel_fn(model, x[:1])
  _finite_psd(kf(x, None))
  _finite_psd(kf(x[3:4], None))
