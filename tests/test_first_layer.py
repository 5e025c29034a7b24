"""`kernel_fn(..., input_layer="exact")`: the first Dense layer's exact weight law.

Witnesses: (1) the pair expectations against closed forms (one-hot inputs, equal
inputs) and scipy's adaptive quadrature (float64, 1e-9); (2) Monte Carlo of the real
Flax model with its default (truncated normal) and uniform initializers on one-hot
and sparse inputs, where the Gaussian kernel is several percent off: with enough
draws the Gaussian kernel fails the bound that the exact kernel passes (NNGP and NTK).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

import infinite_modules as im
from infinite_modules import first_layer as fl
from infinite_modules import priors

LAWS = {"truncated_normal": priors.truncated_normal_law(-2.0, 2.0),
        "uniform": priors.uniform_law(), "normal": priors.normal_law()}
relu = lambda t: jnp.maximum(t, 0.0)


def _expect(f, laws, ca, cb, mu_a=0.0, mu_b=0.0, kinks=(0.0,), dtype=jnp.float64, **kw):
  with jax.enable_x64(dtype == jnp.float64):
    ca, cb = (jnp.asarray(np.atleast_2d(c), dtype) for c in (ca, cb))
    mu = lambda m: jnp.full((ca.shape[0],), m, dtype)
    k = jnp.asarray([list(kinks)] * ca.shape[0], dtype).reshape(ca.shape[0], len(kinks))
    return [np.asarray(o) for o in fl.pair_expectations(f, laws, ca, mu(mu_a), cb, mu(mu_b),
                                                        k, k, dtype, **kw)]


def _scipy_pair(f, kinks, laws, ca, cb, mu_a=0.0, mu_b=0.0):
  """E[f(u) f(v)], u = mu_a + ca . (w1, w2), v = mu_b + cb . (w1, w2), by scipy's adaptive
  quadrature (nested `quad`, told where the integrand is not smooth: the kinks in w2,
  and in w1 where they leave w2's support or cross)."""
  (p1, p2) = (law.density for law in laws)
  (lo1, hi1), (lo2, hi2) = ((max(law.lower, -9), min(law.upper, 9)) for law in laws)
  (a, b), (c, e) = ca, cb

  def inner(w1):
    cuts = [(k - mu_a - a * w1) / b for k in kinks] + [(k - mu_b - c * w1) / e for k in kinks]
    cuts = sorted(t for t in cuts if lo2 < t < hi2)
    g = lambda w2: f(mu_a + a * w1 + b * w2) * f(mu_b + c * w1 + e * w2) * p2(w2)
    return integrate.quad(g, lo2, hi2, points=cuts or None, limit=200, epsabs=1e-14,
                          epsrel=1e-13)[0] * p1(w1)

  outer = [(k - mu_a - b * t) / a for k in kinks for t in (lo2, hi2)]
  outer += [(k - mu_b - e * t) / c for k in kinks for t in (lo2, hi2)]
  outer += [(e * (k - mu_a) - b * (q - mu_b)) / (a * e - b * c) for k in kinks for q in kinks]
  outer = sorted(t for t in outer if lo1 < t < hi1)
  return integrate.quad(inner, lo1, hi1, points=outer or None, limit=200, epsabs=1e-14,
                        epsrel=1e-13)[0]


@pytest.mark.parametrize("name", ["truncated_normal", "uniform"])
def test_one_hot_and_equal_inputs_closed_forms(name):
  """One-hot x, x': u, v are two independent weights, E[relu(u) relu(v)] = E[relu(w)]^2
  (Gaussian: 1 / (2 pi)); equal inputs: E[relu(u)^2] = Var(u) / 2 for a symmetric law."""
  law = LAWS[name]
  half_mean = integrate.quad(lambda t: t * law.density(t), 0, law.upper)[0]
  eye = np.eye(4)
  kappa, dkappa, mean_a, _ = _expect(relu, (law,) * 4, eye[[0, 1]], eye[[1, 1]])
  np.testing.assert_allclose(kappa, [half_mean ** 2, 0.5], rtol=1e-12)
  np.testing.assert_allclose(dkappa, [0.25, 0.5], rtol=1e-12)
  np.testing.assert_allclose(mean_a, [half_mean] * 2, rtol=1e-12)
  assert abs(half_mean ** 2 * 2 * math.pi - 1) > 0.05  # the gap the option exists for
  x = np.array([[0.3, -1.2, 0.0, 0.0], [0.3, -1.2, 0.7, 2.0]])
  kappa, *_ = _expect(relu, (law,) * 4, x, x)
  # Two non-zero features: exact; four: the remaining coordinates' rule (stated 1e-4).
  np.testing.assert_allclose(kappa[0], np.sum(x[0] ** 2) / 2, rtol=1e-12)
  np.testing.assert_allclose(kappa[1], np.sum(x[1] ** 2) / 2, rtol=1e-4)


@pytest.mark.parametrize("name", ["truncated_normal", "uniform", "normal"])
@pytest.mark.parametrize("phi", ["relu", "shifted_abs", "tanh"])
def test_two_features_against_scipy(name, phi):
  """Generic two-feature inputs (and offsets): the iterated rule is exact up to rounding."""
  law = LAWS[name]
  fj, fn, kinks = {"relu": (relu, lambda t: max(t, 0.0), (0.0,)),
                   "shifted_abs": (lambda t: jnp.abs(t - 0.3), lambda t: abs(t - 0.3), (0.3,)),
                   "tanh": (jnp.tanh, math.tanh, ())}[phi]
  ca, cb, ma, mb = np.array([0.8, -0.5]), np.array([0.3, 1.1]), 0.1, -0.2
  kappa, *_ = _expect(fj, (law,) * 2, ca, cb, ma, mb, kinks=kinks or (np.inf,))
  ref = _scipy_pair(fn, kinks, (law, law), ca, cb, ma, mb)
  np.testing.assert_allclose(kappa, [ref], rtol=1e-9)


def test_random_bias_coordinate_against_scipy():
  """One input feature with a truncated normal weight and a uniform bias."""
  w, b = LAWS["truncated_normal"], LAWS["uniform"]
  ca, cb = np.array([1.3, 0.4]), np.array([-0.6, 0.4])
  kappa, *_ = _expect(relu, (w, b), ca, cb, 0.05, 0.05)
  ref = _scipy_pair(lambda t: max(t, 0.0), (0.0,), (w, b), ca, cb, 0.05, 0.05)
  np.testing.assert_allclose(kappa, [ref], rtol=1e-9)


def test_dense_inputs_rest_rule_converges():
  """Four dense features: the remaining coordinates' rule at its default size (8 nodes)
  agrees with a 2.5x finer one to the stated 1e-4 relative (measured ~1e-5), float32 too."""
  rng = np.random.default_rng(0)
  ca, cb = rng.normal(size=(2, 4)), rng.normal(size=(2, 4))
  laws = (LAWS["truncated_normal"],) * 4
  default = _expect(relu, laws, ca, cb)
  fine = _expect(relu, laws, ca, cb, rest_points=20)
  single = _expect(relu, laws, ca, cb, dtype=jnp.float32)
  for d, f, s in zip(default, fine, single):
    np.testing.assert_allclose(d, f, rtol=1e-4)
    np.testing.assert_allclose(s, f, rtol=1e-4)


# ------------------------------------------------------------------ Monte Carlo of the model

class TwoLayer(nn.Module):
  """Dense(width) -> relu -> Dense(outputs): the first layer with the initializer under
  test; many i.i.d. outputs make the NNGP estimate f f^T / outputs precise."""
  width: int
  kernel_init: object = nn.linear.default_kernel_init
  outputs: int = 2048

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(self.width, kernel_init=self.kernel_init)(x))
    # The readout's law does not matter (second moments only); a normal draws fastest.
    return nn.Dense(self.outputs, kernel_init=nn.initializers.normal(self.width ** -0.5))(h)


def _one_hot_inputs():
  """Five one-hot inputs and a two-hot one: u, v are one or two weights (the largest gap)."""
  x = np.eye(5, dtype=np.float32)
  return np.concatenate([x, (x[:1] + x[1:2]) * 0.8], axis=0)


def _mc_kernels(model, x, draws, seed=0):
  """Per-draw empirical NNGP f f^T / outputs and NTK J J^T of the first output (Jacobian in
  all parameters, standard parameterization) of the real model: (draws, n, n) each."""
  keys = jax.random.split(jax.random.PRNGKey(seed), draws)

  def one(key):
    params = model.init(key, x[:1])
    jac = jax.jacrev(lambda p: model.apply(p, x)[:, 0])(params)
    flat = jnp.concatenate([j.reshape(x.shape[0], -1) for j in jax.tree_util.tree_leaves(jac)],
                           axis=1)
    out = model.apply(params, x)
    return out @ out.T / out.shape[1], flat @ flat.T

  return jax.lax.map(one, keys, batch_size=8)


def _pooled(per_draw, mask):
  """Per draw, the mean over the masked entries; returns (mean, standard error)."""
  values = np.asarray(per_draw)[:, mask].mean(axis=1)
  return values.mean(), values.std(ddof=1) / math.sqrt(len(values))


def _check_against_model(kernel_init, width, draws, gap, outputs=256, seed=0):
  """The exact kernel agrees with the model's Monte Carlo average within 5 standard errors
  on every entry and 4 on the mean over the one-hot pairs (NNGP and NTK); the
  Gaussian-weight kernel is more than 6 standard errors off that mean (the pooled
  standard error is below gap / 6 of it) for the kernels named in `gap`.

  The NTK's readout term is the hidden layer's own second moment (no readout noise), so
  it separates the two kernels with fewer draws than the NNGP f f^T.
  """
  x = _one_hot_inputs()
  model = TwoLayer(width, kernel_init, outputs)
  exact = im.kernel_fn(model, x, parameterization="standard", input_layer="exact")(x)
  gauss = im.kernel_fn(model, x, parameterization="standard")(x)
  nngp_draws, ntk_draws = _mc_kernels(model, x, draws, seed)
  one_hot_pairs = ~np.eye(len(x), dtype=bool)
  one_hot_pairs[5:, :] = one_hot_pairs[:, 5:] = False
  for name, per_draw in (("nngp", nngp_draws), ("ntk", ntk_draws)):
    per_draw = np.asarray(per_draw, np.float64)
    mean = per_draw.mean(axis=0)
    se = per_draw.std(axis=0, ddof=1) / math.sqrt(draws)
    k_exact, k_gauss = (np.asarray(getattr(k, name), np.float64) for k in (exact, gauss))
    # 21 distinct entries whose errors share the draw of the first layer (correlated).
    z = np.abs(mean - k_exact) / se
    assert z.max() < 5.0, (name, z.max(), mean, k_exact)
    pooled, pooled_se = _pooled(per_draw, one_hot_pairs)
    if name not in gap:
      continue
    exact_pooled, gauss_pooled = k_exact[one_hot_pairs].mean(), k_gauss[one_hot_pairs].mean()
    assert pooled_se < gap[name] / 6 * abs(pooled), (name, pooled_se / pooled)
    assert abs(pooled - exact_pooled) < 4 * pooled_se, (name, pooled, exact_pooled, pooled_se)
    assert abs(pooled - gauss_pooled) > 6 * pooled_se, (name, pooled, gauss_pooled, pooled_se)


def test_monte_carlo_flax_default_init():
  """`nn.Dense`'s default init (lecun_normal: a truncated normal): one-hot pairs of the
  Gaussian-weight kernel are ~6% off in the NNGP, ~3% in the NTK (which tells them apart
  here; the NNGP is checked for agreement, and for the gap in the slow test)."""
  _check_against_model(nn.linear.default_kernel_init, width=2048, draws=64,
                       gap={"ntk": 0.03})


@pytest.mark.slow
def test_monte_carlo_flax_default_init_nngp_gap():
  """As above with 2048 outputs: the NNGP alone tells the kernels apart."""
  _check_against_model(nn.linear.default_kernel_init, width=2048, draws=96,
                       gap={"nngp": 0.06, "ntk": 0.03}, outputs=2048)


@pytest.mark.slow
def test_monte_carlo_uniform_init():
  """variance_scaling(1, "fan_in", "uniform"): one-hot pairs ~18% off in the NNGP."""
  init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
  _check_against_model(init, width=2048, draws=64, gap={"nngp": 0.17, "ntk": 0.08},
                       outputs=1024)


# ------------------------------------------------------------------ API, dtypes, refusals

class DenseNet(nn.Module):
  act: object = nn.relu
  bias_init: object = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    h = self.act(nn.Dense(16, bias_init=self.bias_init)(x.reshape(x.shape[0], -1)))
    return nn.Dense(1)(nn.relu(nn.Dense(16)(h)))


def test_kernel_fn_float32_float64_jit_and_symmetry():
  """A deeper model (the exact law only at the first layer), a uniform random bias, a GELU:
  float32 agrees with float64, jit with eager, x2=None is symmetric and equals (x, x)."""
  x = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, -2.0]], np.float32).reshape(3, 2, 1)
  model = DenseNet(nn.gelu, nn.initializers.uniform(0.5))
  kf = im.kernel_fn(model, x, input_layer="exact")
  k32 = kf(x, get=("nngp", "ntk"))
  with jax.enable_x64():
    k64 = im.kernel_fn(model, x, input_layer="exact")(x.astype(np.float64), get=("nngp", "ntk"))
  assert k32.nngp.dtype == jnp.float32 and k64.nngp.dtype == jnp.float64
  np.testing.assert_allclose(k32.nngp, k64.nngp, rtol=2e-5)
  np.testing.assert_allclose(k32.ntk, k64.ntk, rtol=2e-5)
  np.testing.assert_array_equal(k32.nngp, k32.nngp.T)
  np.testing.assert_allclose(kf(x, x, get="nngp"), k32.nngp, rtol=1e-6)
  jitted = jax.jit(lambda a: kf(a, get="ntk"))(x)
  np.testing.assert_allclose(jitted, k32.ntk, rtol=1e-6)
  # The non-Gaussian bias is a coordinate of the exact law; the default path refuses a
  # nonlinearity after it.
  with pytest.raises(im.InfiniteWidthError, match="not Gaussian"):
    im.kernel_fn(model, x)(x)


def test_refusals_name_the_way_out():
  x = np.eye(4, dtype=np.float32)
  with pytest.raises(ValueError, match="input_layer must be one of"):
    im.kernel_fn(DenseNet(), x, input_layer="exactly")

  class Conv(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(1)(nn.relu(nn.Conv(8, (2,))(x)).reshape(x.shape[0], -1))

  with pytest.raises(im.InfiniteWidthError, match="convolution.*Drop `input_layer='exact'`"):
    im.kernel_fn(Conv(), x[:, :, None], input_layer="exact")
  wide = np.eye(7, dtype=np.float32)
  with pytest.raises(im.InfiniteWidthError, match="Dense_0.*fan-in 7 exceeds 6"):
    im.kernel_fn(DenseNet(), wide, input_layer="exact")

  class Skip(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(1)(nn.relu(nn.Dense(8)(x)) * x.sum(-1, keepdims=True))

  with pytest.raises(im.InfiniteWidthError, match="input_layer='exact'"):
    im.kernel_fn(Skip(), x, input_layer="exact")
  step = lambda t: jnp.where(t > 0.5, 1.0, 0.0) + nn.relu(t)
  with pytest.raises(im.InfiniteWidthError, match="jumps at 0.5"):
    im.kernel_fn(DenseNet(step), x, input_layer="exact")


def test_haiku_default_init_one_hot_ratio():
  """hk.Linear's default init (a truncated normal): on one-hot inputs the off-diagonal
  NNGP of Linear -> relu -> Linear is the Gaussian one times 2 pi E[relu(xi)]^2 (xi the
  standardized truncated normal), the diagonal is the same."""
  import haiku as hk
  f = hk.transform(lambda x: hk.Linear(1)(jax.nn.relu(hk.Linear(32)(x))))
  x = np.eye(4, dtype=np.float32)
  exact = np.asarray(im.kernel_fn(f, x, input_layer="exact")(x, get="nngp"))
  gauss = np.asarray(im.kernel_fn(f, x)(x, get="nngp"))
  law = LAWS["truncated_normal"]
  half_mean = integrate.quad(lambda t: t * law.density(t), 0, law.upper)[0]
  off = ~np.eye(4, dtype=bool)
  np.testing.assert_allclose(exact[off] / gauss[off], 2 * math.pi * half_mean ** 2, rtol=1e-5)
  np.testing.assert_allclose(np.diag(exact), np.diag(gauss), rtol=1e-5)


def test_gaussian_initializer_reproduces_the_default_kernel():
  """With a normal initializer the exact law is the Gaussian one: on dense inputs (fan-in 4,
  every coordinate integrated, two by the remaining coordinates' rule) the exact path gives
  the default (arc-cosine) kernel to the stated 1e-4 relative."""
  init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
  model = TwoLayer(64, init, outputs=1)
  x = np.random.default_rng(3).normal(size=(4, 4))
  with jax.enable_x64():
    exact = im.kernel_fn(model, x, input_layer="exact")(x)
    default = im.kernel_fn(model, x)(x)
  np.testing.assert_allclose(exact.nngp, default.nngp, rtol=1e-4)
  np.testing.assert_allclose(exact.ntk, default.ntk, rtol=1e-4)
