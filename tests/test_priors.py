"""`im.prior_from_initializer` against the initializers themselves.

For every supported initializer (jax.nn / flax.linen initializers and Haiku initializer
objects), ~10^6 entries are drawn by actually calling it on a realistic shape; the sample
mean and variance must agree with the returned `Prior` within 5 standard errors (computed
from the sample's own fourth moment), and `Prior.gaussian` must agree with the sample's
kurtosis. Unknown initializers must raise `PriorError`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.nn import initializers as jinit

import infinite_modules as im

DENSE = (500, 2000)           # fan_in 500, fan_out 2000
CONV2D = (3, 3, 111, 1000)    # receptive field 9
CONV1D = (5, 200, 1000)
Z = 5.0                       # standard errors allowed


def draw_jax(init, shape, seed=0):
  return np.asarray(init(jax.random.PRNGKey(seed), shape, jnp.float32), np.float64).ravel()


def draw_haiku(init, shape, seed=0):
  f = hk.transform(lambda: init(shape, jnp.float32))
  return np.asarray(f.apply({}, jax.random.PRNGKey(seed)), np.float64).ravel()


def check_moments(samples, prior: im.Prior):
  n = samples.size
  mean, var = samples.mean(), samples.var()
  scale = math.sqrt(prior.variance) + abs(prior.mean)
  if prior.variance == 0:
    np.testing.assert_allclose(samples, prior.mean, rtol=1e-6, atol=0)
    return
  assert n >= 10 ** 5
  # float32 draws: allow rounding at ~1e-6 of the scale on top of the statistical error.
  se_mean = math.sqrt(var / n)
  assert abs(mean - prior.mean) <= Z * se_mean + 1e-6 * scale, (mean, prior)
  mu4 = np.mean((samples - mean) ** 4)
  se_var = math.sqrt(max(mu4 - var * var, 0.0) / n)
  assert abs(var - prior.variance) <= Z * se_var + 1e-6 * scale ** 2, (var, prior, se_var)
  kurtosis = mu4 / var ** 2
  se_kurt = math.sqrt(24.0 / n)
  if prior.gaussian:
    assert abs(kurtosis - 3.0) <= Z * se_kurt, (kurtosis, "marked gaussian")
  else:
    assert abs(kurtosis - 3.0) > 10 * se_kurt, (kurtosis, "marked non-gaussian")


# ---------------------------------------------------------------------- jax / flax

VS_MODES = ["fan_in", "fan_out", "fan_avg"]
VS_DISTS = ["normal", "truncated_normal", "uniform"]


@pytest.mark.parametrize("distribution", VS_DISTS)
@pytest.mark.parametrize("mode", VS_MODES)
@pytest.mark.parametrize("shape", [DENSE, CONV2D], ids=["dense", "conv2d"])
def test_jax_variance_scaling(shape, mode, distribution):
  init = jinit.variance_scaling(2.0, mode, distribution)
  check_moments(draw_jax(init, shape), im.prior_from_initializer(init, shape))


@pytest.mark.parametrize("distribution", VS_DISTS)
def test_jax_variance_scaling_fan_geo_avg(distribution):
  init = jinit.variance_scaling(1.0, "fan_geo_avg", distribution)
  check_moments(draw_jax(init, CONV1D), im.prior_from_initializer(init, CONV1D))


@pytest.mark.parametrize("kwargs,shape", [
    ({"in_axis": (0, 1), "out_axis": -1}, (4, 250, 1000)),       # DenseGeneral-style
    ({"in_axis": -1, "out_axis": 0}, (1000, 1000)),              # transposed layout
    ({"batch_axis": 0}, (10, 250, 400)),                         # batched kernels
    ({"in_axis": 1, "out_axis": 2, "batch_axis": 0}, (10, 250, 400)),
], ids=["in_axes", "transposed", "batch_axis", "all_axes"])
@pytest.mark.parametrize("mode", ["fan_in", "fan_avg"])
def test_jax_variance_scaling_axes(kwargs, shape, mode):
  init = jinit.variance_scaling(1.5, mode, "truncated_normal", **kwargs)
  check_moments(draw_jax(init, shape), im.prior_from_initializer(init, shape))


NAMED = {
    "lecun_normal": jinit.lecun_normal(),
    "lecun_uniform": jinit.lecun_uniform(),
    "he_normal": jinit.he_normal(),
    "he_uniform": jinit.he_uniform(),
    "kaiming_normal": jinit.kaiming_normal(),
    "glorot_normal": jinit.glorot_normal(),
    "glorot_uniform": jinit.glorot_uniform(),
    "xavier_uniform": jinit.xavier_uniform(),
    "flax_lecun_normal": nn.initializers.lecun_normal(),
    "flax_default_kernel_init": nn.linear.default_kernel_init,
    "flax_he_uniform_conv_axes": nn.initializers.he_uniform(in_axis=-2, out_axis=-1),
}


@pytest.mark.parametrize("name", list(NAMED))
def test_jax_named_variance_scaling(name):
  init = NAMED[name]
  check_moments(draw_jax(init, CONV2D), im.prior_from_initializer(init, CONV2D))


SIMPLE = {
    "normal": jinit.normal(0.3),
    "flax_normal": nn.initializers.normal(stddev=0.02),
    "truncated_normal": jinit.truncated_normal(0.5),
    "truncated_normal_asym": jinit.truncated_normal(0.5, lower=-1.0, upper=3.0),
    "uniform": jinit.uniform(0.7),
    "zeros": jinit.zeros,
    "ones": jinit.ones,
    "flax_zeros_init": nn.initializers.zeros_init(),
    "flax_ones_init": nn.initializers.ones_init(),
    "constant": jinit.constant(0.25),
    "constant_array": jinit.constant(np.full((2000,), -1.5, np.float32)),
}


@pytest.mark.parametrize("name", list(SIMPLE))
def test_jax_simple(name):
  init = SIMPLE[name]
  shape = (2000,) if name == "constant_array" else DENSE
  check_moments(draw_jax(init, shape), im.prior_from_initializer(init, shape))


def test_constant_values_exact():
  assert im.prior_from_initializer(jinit.zeros, DENSE) == im.Prior(0.0, 0.0)
  assert im.prior_from_initializer(jinit.ones, DENSE) == im.Prior(0.0, 1.0)
  assert im.prior_from_initializer(jinit.constant(0.25), DENSE) == im.Prior(0.0, 0.25)
  assert im.prior_from_initializer(hk.initializers.Constant(-2.0), DENSE) == im.Prior(0.0, -2.0)
  p = im.prior_from_initializer(jinit.normal(0.3), DENSE)
  assert p.mean == 0.0 and math.isclose(p.variance, 0.09, rel_tol=1e-12) and p.gaussian


def test_truncated_normal_exact_moments():
  """Closed-form check of the truncated-normal variance (scipy-free: numeric integration)."""
  lower, upper = -1.0, 3.0
  t = np.linspace(lower, upper, 400001)
  w = np.exp(-0.5 * t * t)
  w /= np.trapezoid(w, t)
  mean = np.trapezoid(t * w, t)
  var = np.trapezoid((t - mean) ** 2 * w, t)
  p = im.prior_from_initializer(jinit.truncated_normal(0.5, lower=lower, upper=upper), DENSE)
  assert math.isclose(p.mean, 0.5 * mean, rel_tol=1e-8)
  assert math.isclose(p.variance, 0.25 * var, rel_tol=1e-8)


# ---------------------------------------------------------------------- haiku

@pytest.mark.parametrize("distribution", VS_DISTS)
@pytest.mark.parametrize("mode", VS_MODES)
@pytest.mark.parametrize("shape,fan_in_axes", [(DENSE, None), (CONV2D, None),
                                               ((4, 250, 1000), (0, 1))],
                         ids=["dense", "conv2d", "fan_in_axes"])
def test_haiku_variance_scaling(shape, fan_in_axes, mode, distribution):
  init = hk.initializers.VarianceScaling(2.0, mode, distribution, fan_in_axes=fan_in_axes)
  check_moments(draw_haiku(init, shape), im.prior_from_initializer(init, shape))


def test_haiku_variance_scaling_small_fan_is_clamped():
  """Haiku divides by max(1, fan): a 1-row kernel gets the full scale."""
  init = hk.initializers.VarianceScaling(0.5, "fan_in", "normal")
  shape = (1, 10 ** 6)
  p = im.prior_from_initializer(init, shape)
  check_moments(draw_haiku(init, shape), p)
  assert math.isclose(p.variance, 0.5, rel_tol=1e-12)


HAIKU = {
    "truncated_normal": hk.initializers.TruncatedNormal(0.3),
    "truncated_normal_mean": hk.initializers.TruncatedNormal(0.3, mean=0.1),
    "truncated_normal_bounds": hk.initializers.TruncatedNormal(1.0, lower=-1.0, upper=3.0),
    "random_normal": hk.initializers.RandomNormal(0.2, mean=0.5),
    "random_uniform": hk.initializers.RandomUniform(-0.3, 0.5),
    "constant": hk.initializers.Constant(0.7),
    "constant_array": hk.initializers.Constant(np.full((2000,), 2.0)),
}


@pytest.mark.parametrize("name", list(HAIKU))
def test_haiku_simple(name):
  init = HAIKU[name]
  shape = (2000,) if name == "constant_array" else DENSE
  check_moments(draw_haiku(init, shape), im.prior_from_initializer(init, shape))


def test_haiku_linear_default_init():
  """hk.Linear's default w_init is TruncatedNormal(1/sqrt(fan_in)) created at call time."""
  shape = (400, 2500)
  init = hk.initializers.TruncatedNormal(stddev=1.0 / np.sqrt(shape[0]))
  check_moments(draw_haiku(init, shape), im.prior_from_initializer(init, shape))


# ---------------------------------------------------------------------- others

def test_prior_and_none_pass_through():
  p = im.Prior(0.3, 0.1, gaussian=False)
  assert im.prior_from_initializer(p, DENSE) is p
  assert im.prior_from_initializer(None, DENSE) == im.Prior(0.0, 0.0)
  assert im.prior_from_initializer(jnp.zeros, DENSE) == im.Prior(0.0, 0.0)
  assert im.prior_from_initializer(jnp.ones, DENSE) == im.Prior(0.0, 1.0)


UNKNOWN = {
    "orthogonal": jinit.orthogonal(),
    "delta_orthogonal": jinit.delta_orthogonal(),
    "haiku_orthogonal": hk.initializers.Orthogonal(),
    "haiku_identity": hk.initializers.Identity(),
    "lambda": lambda key, shape, dtype=jnp.float32: jax.random.normal(key, shape, dtype),
    "non_uniform_constant": jinit.constant(np.arange(4.0)),
    "haiku_non_uniform_constant": hk.initializers.Constant(np.arange(4.0)),
}


@pytest.mark.parametrize("name", list(UNKNOWN))
def test_unknown_initializer_raises(name):
  with pytest.raises(im.PriorError) as info:
    im.prior_from_initializer(UNKNOWN[name], (3, 3, 4, 4), name="Conv_0/kernel")
  if name not in ("non_uniform_constant", "haiku_non_uniform_constant"):
    assert "Conv_0/kernel" in str(info.value) and "priors=" in str(info.value)


@pytest.mark.parametrize("bad", [{"variance": -0.1}, {"variance": float("nan")},
                                 {"variance": 1.0, "mean": float("inf")}])
def test_invalid_prior_raises(bad):
  with pytest.raises(im.PriorError):
    im.Prior(**bad)
