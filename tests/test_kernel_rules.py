"""Kernel transfer rules checked through `kernel_fn` only, against independent float64 math.

* Closed forms vs numerical integration: a one-hidden-layer network Dense -> phi -> Dense
  has NNGP sigma_o^2 E[phi(u) phi(v)] + beta_o and NTK from E[phi'(u) phi'(v)], with (u, v)
  the exactly known first-layer Gaussian; here E[.] is computed with adaptive scipy quadrature
  (`gauss2`), independently of the library, in both parameterizations.
* Recognition: relu written in many ways must hit the arccos closed form (1e-10);
  relu-like functions that are *not* relu must not be mistaken for it.
* Layout: conv+flatten is "diagonal", pooling "full", and the two agree where both apply.
* dtypes, batch size 1, x2=None, get= variants.
"""

from __future__ import annotations

import functools
import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate as si
from jax.nn import initializers as jinit
from reference_models import assert_mc_close, linen_init_apply, mc_nngp, rel_err

import infinite_modules as im

W_VAR, B_STD, OUT_VAR, OUT_B_STD = 2.0, 0.3, 1.5, 0.2
WIDTH = 16
D_IN = 4
X1 = np.random.default_rng(0).normal(size=(3, D_IN))
X2 = np.random.default_rng(1).normal(size=(2, D_IN))
X2[0] = 0.9 * X1[0] + 0.3 * X2[0]  # a strongly correlated pair
IMG1 = np.random.default_rng(3).normal(size=(3, 4, 4, 2))
IMG2 = np.random.default_rng(4).normal(size=(2, 4, 4, 2))


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


class OneHidden(nn.Module):
  """Dense(WIDTH) -> phi -> Dense(n_out), the priors of the module constants."""
  phi: object
  width: int = WIDTH
  n_out: int = 1

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.width, kernel_init=jinit.variance_scaling(W_VAR, "fan_in", "normal"),
                 bias_init=jinit.normal(B_STD))(x)
    return nn.Dense(self.n_out, kernel_init=jinit.variance_scaling(OUT_VAR, "fan_in", "normal"),
                    bias_init=jinit.normal(OUT_B_STD))(self.phi(h))


# ------------------------------------------------------------------ independent math

_PDF = lambda z: np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)
_QUAD = {"epsabs": 1e-14, "epsrel": 1e-12, "limit": 400}


def gauss2(f, g, a, b, c, kinks=(0.0,)):
  """E[f(u) g(v)] for (u, v) ~ N(0, [[a, c], [c, b]]) by nested adaptive quadrature.

  `kinks`: points where f and g are not smooth (given to the integrator as breakpoints).
  """
  with warnings.catch_warnings():
    # "roundoff error detected" when the integrand is exactly integrable (affine, sign, ...)
    warnings.simplefilter("ignore", si.IntegrationWarning)
    return _gauss2(f, g, a, b, c, kinks)


def _breaks(values):
  return sorted({float(v) for v in values if -12 < v < 12}) or None


def _gauss2(f, g, a, b, c, kinks):
  sa, sb = np.sqrt(a), np.sqrt(b)
  rho = float(np.clip(c / (sa * sb), -1, 1))
  r = np.sqrt(max(1 - rho * rho, 0.0))
  outer_breaks = _breaks(k / sa for k in kinks)
  if r < 1e-9:
    points = _breaks([*(k / sa for k in kinks), *(k / (sb * rho) for k in kinks if rho)])
    return si.quad(lambda z: f(sa * z) * g(sb * rho * z) * _PDF(z), -12, 12, points=points,
                   **_QUAD)[0]

  def inner(z1):
    # v = sb (rho z1 + r z2) crosses a kink k at z2 = (k / sb - rho z1) / r
    points = _breaks((k / sb - rho * z1) / r for k in kinks)
    return si.quad(lambda z2: g(sb * (rho * z1 + r * z2)) * _PDF(z2), -12, 12, points=points,
                   **_QUAD)[0]

  return si.quad(lambda z1: f(sa * z1) * inner(z1) * _PDF(z1), -12, 12, points=outer_breaks,
                 **_QUAD)[0]


def one_hidden_kernels(phi, dphi, x1, x2, parameterization="ntk", width=WIDTH, kinks=(0.0,)):
  """(nngp, ntk) of OneHidden(phi) by numerical integration (numpy/scipy, float64).

  With `dphi=None` only the NNGP is computed (the NTK is returned as None).
  """
  d = x1.shape[1]
  k1 = lambda a, b: W_VAR * (a @ b) / d + B_STD ** 2
  theta1_std = lambda a, b: a @ b + 1.0  # gradients w.r.t. W1 and b1 themselves
  nngp = np.zeros((len(x1), len(x2)))
  ntk = np.zeros_like(nngp)
  for i, a in enumerate(x1):
    for j, b in enumerate(x2):
      kab, kaa, kbb = k1(a, b), k1(a, a), k1(b, b)
      e_phi = gauss2(phi, phi, kaa, kbb, kab, kinks)
      nngp[i, j] = OUT_VAR * e_phi + OUT_B_STD ** 2
      if dphi is None:
        continue
      e_dphi = gauss2(dphi, dphi, kaa, kbb, kab, kinks)
      if parameterization == "ntk":
        ntk[i, j] = nngp[i, j] + OUT_VAR * e_dphi * kab
      else:  # readout W2 (N E[phi phi]) and b2 (1), then the first layer through W2^2 phi'^2
        ntk[i, j] = width * e_phi + 1.0 + OUT_VAR * e_dphi * theta1_std(a, b)
  return nngp, (None if dphi is None else ntk)


def arccos_kernels(x1, x2):
  """Closed-form relu network (Cho & Saul 2009), written out here independently."""
  d = x1.shape[1]
  k12 = W_VAR * x1 @ x2.T / d + B_STD ** 2
  k11 = W_VAR * np.sum(x1 * x1, 1) / d + B_STD ** 2
  k22 = W_VAR * np.sum(x2 * x2, 1) / d + B_STD ** 2
  norm = np.sqrt(np.outer(k11, k22))
  theta = np.arccos(np.clip(k12 / norm, -1, 1))
  e_phi = norm * (np.sin(theta) + (np.pi - theta) * np.cos(theta)) / (2 * np.pi)
  e_dphi = (np.pi - theta) / (2 * np.pi)
  nngp = OUT_VAR * e_phi + OUT_B_STD ** 2
  return nngp, nngp + OUT_VAR * e_dphi * k12


def _kernels(phi, x1=X1, x2=X2, parameterization="ntk", **kw):
  kf = im.kernel_fn(OneHidden(phi, **kw), x1[:1], parameterization=parameterization)
  return kf(x1, x2)


# ------------------------------------------------------------------ relu recognition

RELU_FORMS = {
    "nn.relu": nn.relu,
    "jax.nn.relu": jax.nn.relu,
    "maximum": lambda h: jnp.maximum(h, 0.0),
    "maximum_flipped": lambda h: jnp.maximum(0.0, h),
    "where": lambda h: jnp.where(h > 0, h, 0.0),
    "where_ge": lambda h: jnp.where(h >= 0, h, 0.0),
    "where_lt": lambda h: jnp.where(h < 0, 0.0, h),
    "mask_mul": lambda h: h * (h > 0),
    "abs_mean": lambda h: (h + jnp.abs(h)) / 2,
    "lax_max": lambda h: jax.lax.max(h, jnp.zeros_like(h)),
    "clip": lambda h: jnp.clip(h, 0.0, None),
    "relu6_far": lambda h: jnp.minimum(jax.nn.relu(h), 1e6),
}


_SLOW_RELU_FORMS = {"jax.nn.relu", "maximum_flipped", "where_ge", "where_lt", "lax_max",
                    "relu6_far"}


def _form_marks(f):
  return [pytest.mark.slow] if f in _SLOW_RELU_FORMS else []


@pytest.mark.parametrize("form", [pytest.param(f, marks=_form_marks(f)) for f in RELU_FORMS])
def test_relu_forms_match_arccos(form, x64):
  k = _kernels(RELU_FORMS[form])
  nngp, ntk = arccos_kernels(X1, X2)
  assert rel_err(k.nngp, nngp) < 1e-10, rel_err(k.nngp, nngp)
  assert rel_err(k.ntk, ntk) < 1e-10, rel_err(k.ntk, ntk)


@pytest.mark.parametrize("form", ["where", pytest.param("lax_max", marks=pytest.mark.slow)])
def test_where_relu_same_batch_matches_arccos(form, x64):
  """With x2=None (no batch-size mismatch) the where-relu still must hit the closed form."""
  kf = im.kernel_fn(OneHidden(RELU_FORMS[form]), X1[:1])
  k = kf(X1)
  nngp, ntk = arccos_kernels(X1, X1)
  assert rel_err(k.nngp, nngp) < 1e-10 and rel_err(k.ntk, ntk) < 1e-10


def test_broadcast_constant_with_different_batch_sizes(x64):
  """Minimal: tanh(h) + zeros_like(h) with n1 != n2."""
  kf = im.kernel_fn(OneHidden(lambda h: jnp.tanh(h) + jnp.zeros_like(h)), X1[:1])
  k12 = kf(X1, X2)
  ref = im.kernel_fn(OneHidden(jnp.tanh), X1[:1])(X1, X2)
  np.testing.assert_allclose(k12.nngp, ref.nngp, rtol=1e-10)


def test_bool_mask_cast(x64):
  k = _kernels(lambda h: h * (h > 0).astype(h.dtype))
  assert rel_err(k.nngp, arccos_kernels(X1, X2)[0]) < 1e-10


def _relu(t):
  return max(t, 0.0)


def _step(t):
  return float(t > 0)


CLOSED_FORMS = {
    # name: (jax phi, numpy phi, numpy phi')
    "leaky_relu": (lambda h: nn.leaky_relu(h, 0.1), lambda t: t if t > 0 else 0.1 * t,
                   lambda t: 1.0 if t > 0 else 0.1),
    "leaky_where": (lambda h: jnp.where(h > 0, h, -0.3 * h), lambda t: t if t > 0 else -0.3 * t,
                    lambda t: 1.0 if t > 0 else -0.3),
    "abs": (jnp.abs, abs, lambda t: float(np.sign(t))),
    "scaled_relu": (lambda h: 3 * nn.relu(2 * h) - 1, lambda t: 3 * max(2 * t, 0) - 1,
                    lambda t: 6 * _step(t)),
    "erf": (jax.lax.erf, lambda t: _erf(t), lambda t: 2 / np.sqrt(np.pi) * np.exp(-t * t)),
    "erf_affine": (lambda h: 2 * jax.lax.erf(0.5 * h) + 0.3, lambda t: 2 * _erf(0.5 * t) + 0.3,
                   lambda t: 2 / np.sqrt(np.pi) * np.exp(-0.25 * t * t)),
    "gelu_exact": (lambda h: nn.gelu(h, approximate=False), lambda t: t * _ncdf(t),
                   lambda t: _ncdf(t) + t * _PDF(t)),
    "sin": (jnp.sin, np.sin, np.cos),
    "cos_affine": (lambda h: 0.5 * jnp.cos(2 * h) + 1, lambda t: 0.5 * np.cos(2 * t) + 1,
                   lambda t: -np.sin(2 * t)),
    "exp_scaled": (lambda h: jnp.exp(0.3 * h), lambda t: np.exp(0.3 * t),
                   lambda t: 0.3 * np.exp(0.3 * t)),
    "sign": (jnp.sign, lambda t: float(np.sign(t)), lambda t: 0.0),
    "identity": (lambda h: h, lambda t: t, lambda t: 1.0),
    "affine": (lambda h: 2.0 * h - 0.5, lambda t: 2 * t - 0.5, lambda t: 2.0),
    # Not recognized: bivariate Gauss-Hermite quadrature of smooth functions.
    "tanh": (jnp.tanh, np.tanh, lambda t: 1 - np.tanh(t) ** 2),
    "silu": (nn.silu, lambda t: t / (1 + np.exp(-t)),
             lambda t: 1 / (1 + np.exp(-t)) * (1 + t * (1 - 1 / (1 + np.exp(-t))))),
    "softplus": (nn.softplus, lambda t: np.logaddexp(0, t), lambda t: 1 / (1 + np.exp(-t))),
    "gelu_tanh": (lambda h: nn.gelu(h, approximate=True),
                  lambda t: 0.5 * t * (1 + np.tanh(np.sqrt(2 / np.pi) * (t + 0.044715 * t ** 3))),
                  None),
}

_QUADRATURE_FORMS = {"tanh", "silu", "softplus", "gelu_tanh"}
_SLOW_FORMS = {"leaky_where", "cos_affine", "softplus", "gelu_tanh", "identity"}


def _erf(t):
  return math.erf(t)


def _ncdf(t):
  return 0.5 * (1 + math.erf(t / np.sqrt(2)))


def _numeric_derivative(f):
  return lambda t: (f(t + 1e-5) - f(t - 1e-5)) / 2e-5


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_FORMS else n for n in CLOSED_FORMS])
@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_elementwise_vs_numerical_integration(name, parameterization, x64):
  if parameterization == "standard" and name != "scaled_relu":
    pytest.skip("standard parameterization checked on a few functions")
  phi_jax, phi_np, dphi_np = CLOSED_FORMS[name]
  dphi_np = dphi_np or _numeric_derivative(phi_np)
  k = _kernels(phi_jax, parameterization=parameterization)
  nngp, ntk = one_hidden_kernels(phi_np, dphi_np, X1, X2, parameterization)
  # closed forms are exact; smooth functions without one use 48-point Gauss-Hermite
  tol = 1e-5 if name in _QUADRATURE_FORMS else 1e-9
  assert rel_err(k.nngp, nngp) < tol, (rel_err(k.nngp, nngp), k.nngp, nngp)
  assert rel_err(k.ntk, ntk) < tol, (rel_err(k.ntk, ntk), k.ntk, ntk)


NEAR_RELU = {
    # relu-like functions that are not relu: must not be "recognized" as relu. (jax phi,
    # numpy phi, kinks)
    "relu_plus_tanh": (lambda h: jax.nn.relu(h) + 1e-3 * jnp.tanh(h),
                       lambda t: max(t, 0.0) + 1e-3 * np.tanh(t), (0.0,)),
    "shifted_relu": (lambda h: jnp.maximum(h - 0.05, 0.0), lambda t: max(t - 0.05, 0.0),
                     (0.05,)),
    "relu_capped": (lambda h: jnp.minimum(jax.nn.relu(h), 2.0), lambda t: min(max(t, 0.0), 2.0),
                    (0.0, 2.0)),
}


@functools.cache
def _near_relu(name):
  """(library nngp, exact nngp) for a NEAR_RELU function, float64 (cached per process)."""
  phi_jax, phi_np, kinks = NEAR_RELU[name]
  with jax.enable_x64(True):
    k = np.asarray(_kernels(phi_jax).nngp)
  exact, _ = one_hidden_kernels(phi_np, None, X1, X2, kinks=kinks)
  return k, exact


@pytest.mark.parametrize("name", list(NEAR_RELU))
def test_near_relu_is_not_mistaken_for_relu(name):
  """The kernel differs from relu's by about the true gap, and is within 2% of the exact one."""
  k, exact = _near_relu(name)
  relu_nngp, _ = arccos_kernels(X1, X2)
  true_gap = rel_err(relu_nngp, exact)
  assert true_gap > 5e-4
  assert rel_err(k, relu_nngp) > true_gap / 2, "recognized as relu"
  assert rel_err(k, exact) < 2e-2


@pytest.mark.parametrize("name", list(NEAR_RELU))
def test_near_relu_quadrature_is_accurate(name):
  """Kinked phi that are not recognized use quadrature split at their kinks: exact to 1e-8."""
  k, exact = _near_relu(name)
  assert rel_err(k, exact) < 1e-8, rel_err(k, exact)


def test_relu_plus_tanh_vs_monte_carlo():
  """The quadrature kernel of relu + 1e-3 tanh agrees with MC of the real (wide) model."""
  x1, x2 = X1.astype(np.float32), X2.astype(np.float32)
  model = OneHidden(lambda h: jax.nn.relu(h) + 1e-3 * jnp.tanh(h), width=256, n_out=256)
  k = im.kernel_fn(model, x1[:1])(x1, x2)
  init, apply = linen_init_apply(model, x1[:1])
  est = mc_nngp(init, apply, np.concatenate([x1, x2]), samples=400, seed=5)
  assert_mc_close(est, len(x1), k.nngp, k.cov1, k.cov2, bound=0.05)


# ------------------------------------------------------------------ standard vs ntk

def test_standard_parameterization_depends_on_width_ntk_does_not(x64):
  k16 = _kernels(nn.relu, parameterization="standard", width=16)
  k32 = _kernels(nn.relu, parameterization="standard", width=32)
  np.testing.assert_allclose(k16.nngp, k32.nngp, rtol=1e-12)
  assert np.all(k32.ntk > k16.ntk)
  n16 = _kernels(nn.relu, width=16)
  n32 = _kernels(nn.relu, width=32)
  np.testing.assert_allclose(n16.ntk, n32.ntk, rtol=1e-12)
  np.testing.assert_allclose(n16.nngp, k16.nngp, rtol=1e-12)


# ------------------------------------------------------------------ pooling, exact

SEQ1 = np.random.default_rng(5).normal(size=(3, 6, 2))
SEQ2 = np.random.default_rng(6).normal(size=(2, 6, 2))


class LinearPool(nn.Module):
  """Pointwise linear conv -> pooling -> readout: a kernel computable by hand."""
  pool: str
  window: int = 2
  stride: int = 1

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(8, (1,), use_bias=False,
                kernel_init=jinit.variance_scaling(W_VAR, "fan_in", "normal"))(x)
    if self.pool == "avg":
      h = nn.avg_pool(h, (self.window,), strides=(self.stride,), padding="VALID")
      h = h.reshape(h.shape[0], -1)
    else:
      h = h.mean(axis=1)
    return nn.Dense(1, use_bias=False,
                    kernel_init=jinit.variance_scaling(OUT_VAR, "fan_in", "normal"))(h)


def linear_pool_kernels(x1, x2, pool, window=2, stride=1):
  """nngp, ntk (NTK param) of LinearPool by direct linear algebra."""
  kh = W_VAR * np.einsum("atc,bsc->abts", x1, x2) / x1.shape[-1]  # K_h(t, t')
  t = x1.shape[1]
  if pool == "avg":
    starts = range(0, t - window + 1, stride)
    m = np.zeros((len(starts), t))
    for i, s0 in enumerate(starts):
      m[i, s0:s0 + window] = 1.0 / window
    kp = np.einsum("it,abts,js->abij", m, kh, m)
    nngp = OUT_VAR * np.einsum("abii->ab", kp) / len(starts)
  else:
    nngp = OUT_VAR * kh.mean(axis=(2, 3))
  return nngp, 2 * nngp  # the conv's NTK equals its NNGP; the readout adds the NNGP again


@pytest.mark.parametrize("pool,window,stride", [
    ("mean", 0, 0), ("avg", 2, 1), ("avg", 2, 2), ("avg", 3, 1)])
def test_pooling_matches_linear_algebra(pool, window, stride, x64):
  kw = {"window": window, "stride": stride} if pool == "avg" else {}
  kf = im.kernel_fn(LinearPool(pool, **kw), SEQ1[:1])
  k = kf(SEQ1, SEQ2)
  nngp, ntk = linear_pool_kernels(SEQ1, SEQ2, pool, window, stride)
  assert rel_err(k.nngp, nngp) < 1e-10, (k.nngp, nngp)
  assert rel_err(k.ntk, ntk) < 1e-10


# ------------------------------------------------------------------ structural identities

class Readout(nn.Module):
  """relu(Dense(x)) read out by a Dense whose bias starts at `bias`."""
  bias: float

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(WIDTH, kernel_init=jinit.variance_scaling(W_VAR, "fan_in", "normal"),
                         bias_init=jinit.normal(B_STD))(x))
    return nn.Dense(1, kernel_init=jinit.variance_scaling(OUT_VAR, "fan_in", "normal"),
                    bias_init=jinit.constant(self.bias))(h)


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_constant_output_bias_does_not_change_kernels(parameterization, x64):
  """A deterministic output shift: the NNGP is a covariance, the NTK gradient is the same."""
  k0 = im.kernel_fn(Readout(0.0), X1[:1], parameterization=parameterization)(X1, X2)
  k1 = im.kernel_fn(Readout(1.0), X1[:1], parameterization=parameterization)(X1, X2)
  for name in ("nngp", "ntk", "cov1", "cov2"):
    np.testing.assert_allclose(getattr(k1, name), getattr(k0, name), rtol=1e-12)
  nngp, ntk = arccos_kernels(X1, X2)
  np.testing.assert_allclose(k0.nngp, nngp - OUT_B_STD ** 2, rtol=1e-10)
  if parameterization == "ntk":  # a zero-variance bias gets no gradient weight
    np.testing.assert_allclose(k0.ntk, ntk - OUT_B_STD ** 2, rtol=1e-10)


class Concat(nn.Module):
  """Two independent Dense branches concatenated on channels, or one Dense of the sum width."""
  split: bool

  @nn.compact
  def __call__(self, x):
    init = jinit.variance_scaling(W_VAR, "fan_in", "normal")
    if self.split:
      h = jnp.concatenate([nn.Dense(6, kernel_init=init)(x), nn.Dense(10, kernel_init=init)(x)],
                          axis=-1)
    else:
      h = nn.Dense(16, kernel_init=init)(x)
    return nn.Dense(1, kernel_init=jinit.variance_scaling(OUT_VAR, "fan_in", "normal"))(h)


def test_channel_concatenation_of_branches(x64):
  a = im.kernel_fn(Concat(True), X1[:1])(X1, X2)
  b = im.kernel_fn(Concat(False), X1[:1], parameterization="ntk")(X1, X2)
  np.testing.assert_allclose(a.nngp, b.nngp, rtol=1e-12)
  np.testing.assert_allclose(a.ntk, b.ntk, rtol=1e-12)


class FlattenOrder(nn.Module):
  channels_first: bool

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(8, (3, 3), kernel_init=jinit.variance_scaling(W_VAR, "fan_in",
                                                                       "normal"))(x))
    if self.channels_first:
      h = h.transpose(0, 3, 1, 2)
    return nn.Dense(1)(h.reshape(h.shape[0], -1))


def test_flatten_order_does_not_matter(x64):
  """Flattening NCHW instead of NHWC permutes the readout's inputs: same kernel."""
  a = im.kernel_fn(FlattenOrder(False), IMG1[:1])(IMG1, IMG2)
  b = im.kernel_fn(FlattenOrder(True), IMG1[:1])(IMG1, IMG2)
  np.testing.assert_allclose(a.nngp, b.nngp, rtol=1e-12)
  np.testing.assert_allclose(a.ntk, b.ntk, rtol=1e-12)


# ------------------------------------------------------------------ layout

def _conv(width=8, **kw):
  return nn.Conv(width, (3, 3), kernel_init=jinit.variance_scaling(2.0, "fan_in", "normal"),
                 bias_init=jinit.normal(0.1), **kw)


def _readout(n=1, name=None):
  return nn.Dense(n, kernel_init=jinit.variance_scaling(1.0, "fan_in", "normal"),
                  bias_init=jinit.normal(0.1), name=name)


class Branches(nn.Module):
  """relu(conv(x)) read out by flatten+Dense, by global mean+Dense, or by both summed."""
  flatten: bool
  gap: bool

  @nn.compact
  def __call__(self, x):
    h = nn.relu(_conv(name="conv")(x))
    h = nn.relu(_conv(name="conv2")(h))
    out = 0.0
    if self.flatten:
      out = out + _readout(name="flat_out")(h.reshape(h.shape[0], -1))
    if self.gap:
      out = out + _readout(name="gap_out")(h.mean(axis=(1, 2)))
    return out


def test_layout_choice_and_agreement(x64):
  """Flatten -> "diagonal"; global mean -> "full". The sum of both branches (one shared
  trunk, independent readouts) is computed in the full layout and must equal the sum of
  the diagonal-layout flatten kernel and the full-layout mean kernel. Also batch size 1
  against batch size 1 in the full layout."""
  kf_flat = im.kernel_fn(Branches(True, False), IMG1[:1])
  kf_gap = im.kernel_fn(Branches(False, True), IMG1[:1])
  kf_both = im.kernel_fn(Branches(True, True), IMG1[:1])
  assert (kf_flat.layout, kf_gap.layout, kf_both.layout) == ("diagonal", "full", "full")
  flat, gap, both = (kf(IMG1, IMG2) for kf in (kf_flat, kf_gap, kf_both))
  # the readout biases are counted once per branch
  np.testing.assert_allclose(both.nngp, flat.nngp + gap.nngp, rtol=1e-10)
  np.testing.assert_allclose(both.ntk, flat.ntk + gap.ntk, rtol=1e-10)
  np.testing.assert_allclose(both.cov1, flat.cov1 + gap.cov1, rtol=1e-10)
  # batch size 1 on either side, full and diagonal layouts
  one = kf_both(IMG1[1:2], IMG2[:1])
  np.testing.assert_allclose(one.nngp, both.nngp[1:2, :1], rtol=1e-12)
  np.testing.assert_allclose(one.ntk, both.ntk[1:2, :1], rtol=1e-12)


def test_pooling_window_one_keeps_diagonal_layout(x64):
  """avg_pool with a 1x1 window is the identity and needs no cross-position covariance."""
  class M(nn.Module):
    pool: bool

    @nn.compact
    def __call__(self, x):
      h = nn.relu(_conv()(x))
      if self.pool:
        h = nn.avg_pool(h, (1, 1))
      return _readout()(h.reshape(h.shape[0], -1))

  kf_pool, kf_plain = im.kernel_fn(M(True), IMG1[:1]), im.kernel_fn(M(False), IMG1[:1])
  assert kf_pool.layout == kf_plain.layout == "diagonal"
  np.testing.assert_allclose(kf_pool(IMG1, IMG2, "ntk"), kf_plain(IMG1, IMG2, "ntk"), rtol=1e-12)


# ------------------------------------------------------------------ dtypes, shapes, get=

@pytest.fixture(scope="module")
def relu_model():
  return OneHidden(nn.relu)


def test_float32_in_float32_out(relu_model):
  kf = im.kernel_fn(relu_model, X1[:1].astype(np.float32))
  k = kf(X1.astype(np.float32), X2.astype(np.float32))
  for a in (k.nngp, k.ntk, k.cov1, k.cov2):
    assert a.dtype == jnp.float32
  nngp, ntk = arccos_kernels(X1, X2)
  assert rel_err(k.nngp, nngp) < 1e-5 and rel_err(k.ntk, ntk) < 1e-5


def test_float64_in_float64_out_and_float32_under_x64(relu_model, x64):
  kf = im.kernel_fn(relu_model, X1[:1])
  k64 = kf(X1, X2)
  for a in (k64.nngp, k64.ntk, k64.cov1, k64.cov2):
    assert a.dtype == jnp.float64
  k32 = kf(X1.astype(np.float32), X2.astype(np.float32))
  assert k32.nngp.dtype == jnp.float32 and k32.ntk.dtype == jnp.float32
  assert rel_err(k32.nngp, k64.nngp) < 1e-5
  with pytest.raises(ValueError, match="dtype"):
    kf(X1, X2.astype(np.float32))


def test_integer_inputs_are_cast(relu_model):
  xi = np.arange(12).reshape(3, 4) % 3 - 1
  kf = im.kernel_fn(relu_model, xi[:1])
  np.testing.assert_allclose(kf(xi, get="nngp"), kf(xi.astype(np.float32), get="nngp"),
                             rtol=1e-6)


def test_batch_size_one(relu_model, x64):
  kf = im.kernel_fn(relu_model, X1[:1])
  full = kf(X1, X2)
  for i in range(len(X1)):
    one = kf(X1[i:i + 1], X2)
    assert one.nngp.shape == (1, len(X2))
    np.testing.assert_allclose(one.nngp, full.nngp[i:i + 1], rtol=1e-12)
    np.testing.assert_allclose(one.ntk, full.ntk[i:i + 1], rtol=1e-12)
  single = kf(X1[:1])
  assert single.nngp.shape == (1, 1)
  np.testing.assert_allclose(single.nngp[0, 0], full.cov1[0], rtol=1e-12)
  both_one = kf(X1[:1], X2[:1])
  np.testing.assert_allclose(both_one.ntk, full.ntk[:1, :1], rtol=1e-12)
  # x_example with a larger batch gives the same kernel function.
  kf3 = im.kernel_fn(relu_model, X1)
  np.testing.assert_allclose(kf3(X1, X2, get="ntk"), full.ntk, rtol=1e-12)


def test_x2_none_equals_x1_x1(relu_model, x64):
  kf = im.kernel_fn(relu_model, X1[:1])
  a, b = kf(X1), kf(X1, X1)
  for name in ("nngp", "ntk", "cov1", "cov2"):
    np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-14)
  np.testing.assert_allclose(a.nngp, a.nngp.T, rtol=1e-14)
  np.testing.assert_allclose(np.diag(a.nngp), a.cov1, rtol=1e-12)
  assert a.shape1 == a.shape2 == X1.shape


def test_get_variants(relu_model, x64):
  kf = im.kernel_fn(relu_model, X1[:1])
  k = kf(X1, X2)
  assert isinstance(k, im.Kernel)
  assert k.nngp.shape == k.ntk.shape == (3, 2) and k.cov1.shape == (3,) and k.cov2.shape == (2,)
  assert k.shape1 == X1.shape and k.shape2 == X2.shape
  for name in ("nngp", "ntk", "cov1", "cov2"):
    np.testing.assert_array_equal(kf(X1, X2, get=name), getattr(k, name))
  both = kf(X1, X2, get=("nngp", "ntk"))
  assert isinstance(both, tuple) and both._fields == ("nngp", "ntk")
  np.testing.assert_array_equal(both.nngp, k.nngp)
  np.testing.assert_array_equal(both.ntk, k.ntk)
  rev = kf(X1, X2, get=("ntk", "nngp"))
  np.testing.assert_array_equal(rev[0], k.ntk)
  (only,) = kf(X1, X2, get=("ntk",))
  np.testing.assert_array_equal(only, k.ntk)
  np.testing.assert_array_equal(kf(X1, X2, get=["cov2", "cov1"]).cov1, k.cov1)
  np.testing.assert_array_equal(kf(X1, X2, "ntk"), k.ntk)  # positional get


def test_kernel_is_a_pytree(relu_model, x64):
  k = im.kernel_fn(relu_model, X1[:1])(X1, X2)
  leaves = jax.tree_util.tree_leaves(k)
  assert len(leaves) == 5  # nngp, ntk, cov1, cov2 and the error bound of estimated steps
  doubled = jax.tree_util.tree_map(lambda a: 2 * a, k)
  np.testing.assert_allclose(doubled.nngp, 2 * k.nngp)
  assert doubled.shape1 == k.shape1


def test_namedtuple_type_is_stable(relu_model):
  kf = im.kernel_fn(relu_model, X1[:1].astype(np.float32))
  a = kf(X1[:2].astype(np.float32), get=("nngp", "ntk"))
  b = kf(X1[:2].astype(np.float32), get=("nngp", "ntk"))
  assert type(a) is type(b) and a._fields == ("nngp", "ntk")


KINKED = {
    # phi with kinks or jumps, none of them a closed form: piecewise quadrature. (jax phi,
    # numpy phi, numpy phi', kinks)
    "hard_tanh": (nn.hard_tanh, lambda t: min(max(t, -1.0), 1.0),
                  lambda t: float(-1 < t < 1), (-1.0, 1.0)),
    "relu6": (nn.relu6, lambda t: min(max(t, 0.0), 6.0), lambda t: float(0 < t < 6), (0.0, 6.0)),
    "elu": (nn.elu, lambda t: t if t > 0 else np.expm1(t), lambda t: 1.0 if t > 0 else np.exp(t),
            (0.0,)),
    "hard_swish": (nn.hard_swish, lambda t: t * min(max(t + 3, 0.0), 6.0) / 6,
                   lambda t: 0.0 if t < -3 else (1.0 if t > 3 else (2 * t + 3) / 6), (-3.0, 3.0)),
    "clip_shifted": (lambda h: jnp.clip(h + 0.4, -0.5, 2.0), lambda t: min(max(t + 0.4, -0.5), 2.0),
                     lambda t: float(-0.9 < t < 1.6), (-0.9, 1.6)),
    # switch |z| - 0.5 is not monotone: both of its roots must be split
    "relu_of_abs": (lambda h: nn.relu(jnp.abs(h) - 0.5), lambda t: max(abs(t) - 0.5, 0.0),
                    lambda t: float(np.sign(t)) * float(abs(t) > 0.5), (-0.5, 0.0, 0.5)),
}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in ("relu6", "clip_shifted") else n
    for n in KINKED])
def test_kinked_phi_vs_numerical_integration(name, x64):
  """NNGP and NTK (whose phi' jumps) of kinked phi, to 1e-8 against adaptive quadrature."""
  phi_jax, phi_np, dphi_np, kinks = KINKED[name]
  k = _kernels(phi_jax)
  nngp, ntk = one_hidden_kernels(phi_np, dphi_np, X1, X2, kinks=kinks)
  assert rel_err(k.nngp, nngp) < 1e-8, rel_err(k.nngp, nngp)
  assert rel_err(k.ntk, ntk) < 1e-8, rel_err(k.ntk, ntk)


class NormRelu(nn.Module):
  """Dense -> LayerNorm (no params) -> phi -> Dense: phi sees per-example constants."""
  phi: object = nn.relu

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(WIDTH, kernel_init=jinit.variance_scaling(W_VAR, "fan_in", "normal"))(x)
    h = nn.LayerNorm(use_scale=False, use_bias=False, epsilon=1e-6)(h)
    return nn.Dense(1, kernel_init=jinit.variance_scaling(OUT_VAR, "fan_in", "normal"),
                    bias_init=jinit.normal(OUT_B_STD))(self.phi(h))


def test_layernorm_then_relu_is_arccos_of_normalized_kernel(x64):
  """relu after LayerNorm: phi = relu((z - 0) / sigma(x)) splits into an exact per-example
  scaling and relu, whose arc-cosine closed form applies (channel means are exactly 0)."""
  d = X1.shape[1]
  k = lambda a, b: W_VAR * a @ b.T / d
  k11, k22, k12 = np.diag(k(X1, X1)), np.diag(k(X2, X2)), k(X1, X2)
  v1, v2 = k11 / (k11 + 1e-6), k22 / (k22 + 1e-6)       # variances after normalizing
  norm = np.sqrt(np.outer(v1, v2))
  theta = np.arccos(np.clip(k12 / np.sqrt(np.outer(k11, k22)), -1, 1))
  e_relu = norm * (np.sin(theta) + (np.pi - theta) * np.cos(theta)) / (2 * np.pi)
  got = im.kernel_fn(NormRelu(), X1[:1])(X1, X2)
  np.testing.assert_allclose(got.nngp, OUT_VAR * e_relu + OUT_B_STD ** 2, rtol=1e-10)


@pytest.mark.parametrize("phi", [nn.relu, jnp.tanh, lambda h: jnp.where(h > 0, h, 0.0)],
                         ids=["relu", "tanh", "where_relu"])
def test_batch_of_one_gives_the_same_rows(phi, x64):
  """A per-example constant of a single-example batch is not mistaken for a uniform one."""
  x = np.random.default_rng(3).normal(size=(4, X1.shape[1])) * np.arange(1, 5)[:, None]
  kf = im.kernel_fn(NormRelu(phi), x[:1])
  one, full = kf(x[:1], x[1:]), kf(x, x[1:])
  np.testing.assert_allclose(one.nngp, full.nngp[:1], rtol=1e-12)
  np.testing.assert_allclose(one.ntk, full.ntk[:1], rtol=1e-12)
