"""Products and gates of fields, sums of dependent fields (`rules/products.py`).

Witnesses: Monte Carlo averages over random inits of the real Flax models (Gaussian
initializers, width 512), NNGP and NTK in standard parameterization, with the 5% bound on
the correlation scale of `reference_models.assert_mc_close`. Each case also shows the bound
has power against the wrong assumption: the kernel of the same network with dependent
factors treated as independent (or independent ones as the same field) fails it. Exact
identities (h + h = 2h, a relu(h) + b relu(h)) are checked to float rounding.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.nn import initializers as jinit
from reference_models import assert_mc_close, linen_init_apply, mc_nngp, mc_ntk

import infinite_modules as im

WIDTH = 512


class Net(nn.Module):
  """Wraps a function that creates and applies submodules inline."""
  body: object

  @nn.compact
  def __call__(self, x):
    return self.body(x)


def dense(width, w_var=1.0, b_std=None):
  return nn.Dense(width, kernel_init=jinit.variance_scaling(w_var, "fan_in", "normal"),
                  use_bias=b_std is not None,
                  bias_init=jinit.normal(b_std) if b_std else jinit.zeros)


def _inputs(n1=3, n2=2, dim=5, seed=0):
  rng = np.random.default_rng(seed)
  x1 = rng.normal(size=(n1, dim)).astype(np.float32)
  x2 = rng.normal(size=(n2, dim)).astype(np.float32)
  x2[0] = 0.8 * x1[0] + 0.6 * x2[0]  # a strongly correlated pair
  return x1, x2


def readout(body, n_out=256):
  """body(x) followed by a Gaussian readout (zero-mean outputs, as `mc_nngp` assumes)."""
  return Net(lambda x: dense(n_out)(body(x)))


def check_nngp(body, samples=300, seed=1):
  """MC NNGP of readout(body) vs its analytic kernel; returns the estimate."""
  x1, x2 = _inputs()
  model = readout(body)
  k = im.kernel_fn(model, x1[:1])(x1, x2)
  init, apply = linen_init_apply(model, x1[:1])
  est = mc_nngp(init, apply, np.concatenate([x1, x2]), samples=samples, seed=seed)
  assert_mc_close(est, len(x1), k.nngp, k.cov1, k.cov2, what="nngp")
  return est


def check_ntk_standard(body, samples=200, seed=2):
  x1, x2 = _inputs()
  model = readout(body, n_out=4)
  k = im.kernel_fn(model, x1[:1], parameterization="standard")(x1, x2)
  init, apply = linen_init_apply(model, x1[:1])
  est = mc_ntk(init, apply, np.concatenate([x1, x2]), samples=samples, seed=seed)
  assert_mc_close(est, len(x1), k.ntk, what="ntk")
  return est


def assert_rejected(est, body):
  """The kernel of `body` (a wrong model of the estimated network) fails the bound."""
  x1, x2 = _inputs()
  k = im.kernel_fn(readout(body), x1[:1])(x1, x2)
  with pytest.raises(AssertionError, match="differs from the analytic kernel"):
    assert_mc_close(est, len(x1), k.nngp, k.cov1, k.cov2)


# ------------------------------------------------------------ independent factors

def swiglu(x):
  return nn.silu(dense(WIDTH, 2.0, 0.3)(x)) * dense(WIDTH, 1.0, 0.3)(x)


def swiglu_as_one_field(x):
  """The wrong model: gate and value from the same Dense output (dependent factors)."""
  h = dense(WIDTH, 2.0, 0.3)(x)
  return nn.silu(h) * h


def test_swiglu_nngp_and_bound_rejects_dependent_factors():
  est = check_nngp(swiglu)
  assert_rejected(est, swiglu_as_one_field)


def test_swiglu_ntk_standard():
  """Theta = E[g g'] Theta_f + E[f f'] Theta_g with uncentered moments (biased factors)."""
  check_ntk_standard(swiglu)


@pytest.mark.slow
def test_geglu_nngp():
  gelu = lambda t: nn.gelu(t, approximate=False)
  check_nngp(lambda x: gelu(dense(WIDTH, 2.0, 0.2)(x)) * dense(WIDTH, 1.0)(x), samples=400)


@pytest.mark.slow
def test_sigmoid_gate_nngp():
  check_nngp(lambda x: nn.sigmoid(dense(WIDTH, 2.0, 0.5)(x)) * dense(WIDTH, 1.0, 0.3)(x),
             samples=400, seed=3)


def test_product_of_independent_fields_is_product_of_kernels():
  """NT's FanInProd: a * b of independent fields has nngp K_a K_b and ntk K_b T_a + K_a T_b
  (an exact identity on the kernels the same code gives each factor)."""
  x1, x2 = _inputs()

  def parts(x):
    h = nn.relu(dense(64, 2.0, 0.1)(x))
    return jnp.sin(dense(64, 1.0)(h)) + 0.5, jax.lax.erf(dense(64, 1.5)(h))

  def each(which):
    return im.kernel_fn(Net(lambda x: dense(1)(parts(x)[which])), x1[:1])(x1, x2)

  def product(x):
    a, b = parts(x)
    return dense(1)(a * b)

  ka, kb = each(0), each(1)
  k = im.kernel_fn(Net(product), x1[:1])(x1, x2)
  np.testing.assert_allclose(k.nngp, ka.nngp * kb.nngp, rtol=1e-5, atol=1e-7)
  # NTK parameterization, readout Dense(1) of variance 1: ntk = nngp + ntk of the field.
  ta, tb = ka.ntk - ka.nngp, kb.ntk - kb.nngp
  np.testing.assert_allclose(k.ntk, ka.nngp * kb.nngp + kb.nngp * ta + ka.nngp * tb,
                             rtol=1e-5, atol=1e-7)


def field_times_its_dense(x):
  """h * Dense(h) (the case tests/test_kernel_errors.py used to refuse): independent G-vars
  whose tangents share the parameters before h; their cross terms vanish at infinite width."""
  h = nn.relu(dense(WIDTH, 2.0, 0.2)(x))
  return h * dense(WIDTH, 1.0, 0.3)(h)


@pytest.mark.slow
def test_field_times_its_dense_nngp_and_ntk_standard():
  check_nngp(field_times_its_dense, samples=400)
  check_ntk_standard(field_times_its_dense, samples=300)


# ------------------------------------------------------------ dependent factors

def test_dependent_factors_nngp_and_bound_rejects_independence():
  """sin(h) cos(h) of one Dense output is one elementwise function of h (fused: a joint
  expectation, here the closed form of sin(2h) / 2), not a product of kernels."""
  def one(x):
    h = dense(WIDTH, 2.0)(x)
    return jnp.sin(h) * jnp.cos(h)

  est = check_nngp(one)
  assert_rejected(est, lambda x: jnp.sin(dense(WIDTH, 2.0)(x)) * jnp.cos(dense(WIDTH, 2.0)(x)))


@pytest.mark.slow
def test_dependent_factors_with_means_nngp():
  """h * relu(h) with a random bias (non-zero means; piecewise quadrature)."""
  def one(x):
    h = dense(WIDTH, 1.0, 0.5)(x)
    return h * nn.relu(h)

  est = check_nngp(one)
  assert_rejected(est, lambda x: dense(WIDTH, 1.0, 0.5)(x) * nn.relu(dense(WIDTH, 1.0, 0.5)(x)))


def test_square_of_field_is_a_joint_expectation():
  """h * h = h**2: E[h^2 h'^2] = E[h^2] E[h'^2] + 2 E[h h']^2 for a centered Gaussian h."""
  x1, x2 = _inputs()
  def body(x):
    h = dense(64)(x)
    return dense(1)(h * h)

  square = im.kernel_fn(Net(body), x1[:1])
  lin = im.kernel_fn(Net(dense(1)), x1[:1])(x1, x2)
  k = square(x1, x2)
  np.testing.assert_allclose(
      k.nngp, np.outer(lin.cov1, lin.cov2) + 2 * lin.nngp ** 2,
      rtol=1e-5)


def test_product_sharing_a_random_bias_raises():
  def body(x):
    h = dense(64)(x)
    b = nn.Dense(64, kernel_init=jinit.normal(1.0), name="other")(x)
    return h * nn.relu(h + b)  # h and h + b: two G-vars sharing h, not one function of h

  with pytest.raises(im.UnsupportedPrimitiveError, match="`mul`.*same random parameters"):
    im.kernel_fn(readout(body), _inputs()[0][:1])(_inputs()[0])


# ------------------------------------------------------------ gates of non-Gaussian fields

def gated_stream(x):
  """sigmoid(Dense(x)) * s with s = relu(h) + Dense(relu(h)), a non-Gaussian field."""
  h = nn.relu(dense(WIDTH, 2.0, 0.2)(x))
  s = h + dense(WIDTH, 1.0)(h)
  return nn.sigmoid(dense(WIDTH, 2.0, 0.5)(x)) * s


@pytest.mark.slow
def test_gate_times_non_gaussian_field_nngp():
  check_nngp(gated_stream, samples=300)


def test_gate_times_non_gaussian_field_is_product_of_kernels():
  """The product rule on a non-Gaussian factor (a post-activation residual sum) is the same
  exact identity (its Monte Carlo check is slow: `test_gate_times_non_gaussian_field_nngp`)."""
  x1, x2 = _inputs()

  def parts(x):
    h = nn.relu(dense(64, 2.0, 0.2)(x))
    gate = 0.5 * (1.0 + jax.lax.erf(dense(64, 2.0, 0.5)(x)))  # closed form (erf)
    return gate, h + dense(64, 1.0)(h)

  ka, kb = (im.kernel_fn(Net(lambda x, i=i: dense(1)(parts(x)[i])), x1[:1])(x1, x2)
            for i in (0, 1))
  k = im.kernel_fn(Net(lambda x: dense(1)(parts(x)[0] * parts(x)[1])), x1[:1])(x1, x2)
  np.testing.assert_allclose(k.nngp, ka.nngp * kb.nngp, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------ sums of dependent fields

def test_sums_of_one_field_are_one_elementwise_function():
  """h + h, 3 relu(h) - relu(h) and h + relu(h) are functions of the one variable h: exact
  identities with the single-function kernels (never a sum of independent kernels)."""
  x1, x2 = _inputs()

  def kernel(phi):
    return im.kernel_fn(Net(lambda x: dense(1)(phi(dense(64, 1.0, 0.3)(x)))), x1[:1])(x1, x2)

  h, relu = kernel(lambda h: h), kernel(nn.relu)
  twice = kernel(lambda h: h + h)
  np.testing.assert_allclose(twice.nngp, 4 * h.nngp, rtol=1e-6)
  np.testing.assert_allclose(twice.ntk, 4 * h.ntk, rtol=1e-6)
  combo = kernel(lambda h: 3 * nn.relu(h) - nn.relu(h))
  np.testing.assert_allclose(combo.nngp, 4 * relu.nngp, rtol=1e-6)
  both = kernel(lambda h: h + nn.relu(h))
  affine = kernel(lambda h: jnp.where(h > 0, 2 * h, h))  # the same function written once
  np.testing.assert_allclose(both.nngp, affine.nngp, rtol=1e-6)
  np.testing.assert_allclose(both.ntk, affine.ntk, rtol=1e-6)


def test_field_plus_its_nonlinearity_nngp():
  """g + relu(g) (one Dense output): MC, and the bound rejects summing them independently."""
  def one(x):
    g = dense(WIDTH, 1.0, 0.3)(x)
    return g + nn.relu(g)

  def two(x):
    return dense(WIDTH, 1.0, 0.3)(x) + nn.relu(dense(WIDTH, 1.0, 0.3)(x))

  est = check_nngp(one, samples=200)
  assert_rejected(est, two)


def test_dependent_sum_with_random_bias_still_raises():
  def body(x):
    h = dense(64)(x)
    return h + nn.relu(h + nn.Dense(64, name="other")(x))

  with pytest.raises(im.UnsupportedPrimitiveError, match="`add`.*same random parameters"):
    im.kernel_fn(readout(body), _inputs()[0][:1])(_inputs()[0])


def test_jit_and_float64():
  body = lambda x: nn.relu(dense(64, 2.0, 0.3)(x)) * dense(64, 1.0, 0.3)(x)
  x1, x2 = _inputs()
  kf = im.kernel_fn(readout(body), x1[:1])
  k32 = jax.jit(lambda a, b: kf(a, b, get="nngp"))(x1, x2)
  with jax.enable_x64(True):
    kf64 = im.kernel_fn(readout(body), x1[:1].astype(np.float64))
    k64 = kf64(x1.astype(np.float64), x2.astype(np.float64), get="nngp")
    assert k64.dtype == np.float64
  np.testing.assert_allclose(k32, k64, rtol=2e-4)


# ------------------------------------------------------------ normalization of non-Gaussian fields

def reglu(x):
  return nn.relu(dense(WIDTH, 2.0, 0.3)(x)) * dense(WIDTH, 1.0, 0.3)(x)


def layernorm_of_reglu(x):
  """LayerNorm of a product field: over the infinite channel axis its mean and mean square
  are the product's first and second moments at each point (exact from the moments)."""
  return nn.LayerNorm()(reglu(x))


def relu_of_layernorm_of_stream(x):
  """relu(LayerNorm(s)) of a post-activation residual stream s: the normalization is a
  deterministic affine map per point, applied to the stream's pair laws as well."""
  h = nn.relu(dense(WIDTH, 2.0, 0.2)(x))
  return nn.relu(nn.LayerNorm()(h + dense(WIDTH, 1.0)(h)))


def test_layernorm_and_rmsnorm_of_product_nngp():
  check_nngp(layernorm_of_reglu, samples=200)
  x1, x2 = _inputs()
  rms = im.kernel_fn(readout(lambda x: nn.RMSNorm()(reglu(x))), x1[:1])(x1, x2)
  # relu(a) * b with b centered: the product has zero mean, so RMSNorm = LayerNorm.
  ln = im.kernel_fn(readout(layernorm_of_reglu), x1[:1])(x1, x2)
  np.testing.assert_allclose(rms.nngp, ln.nngp, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(ln.cov1), 1.0, rtol=1e-4)  # normalized per point


def test_groupnorm_of_product_equals_layernorm():
  """GroupNorm's groups are i.i.d. copies: each group's statistics are the same moments."""
  x1, x2 = _inputs()
  gn = im.kernel_fn(readout(lambda x: nn.GroupNorm(num_groups=4)(reglu(x))), x1[:1])(x1, x2)
  ln = im.kernel_fn(readout(layernorm_of_reglu), x1[:1])(x1, x2)
  np.testing.assert_allclose(gn.nngp, ln.nngp, rtol=1e-5)
  np.testing.assert_allclose(gn.ntk, ln.ntk, rtol=1e-5)


def test_nonlinearity_after_layernorm_of_stream_nngp():
  check_nngp(relu_of_layernorm_of_stream, samples=200)


@pytest.mark.slow
def test_normalized_non_gaussian_fields_ntk_standard():
  check_ntk_standard(layernorm_of_reglu)
  check_ntk_standard(relu_of_layernorm_of_stream)


def test_nonlinearity_after_layernorm_of_product_raises():
  """A product field carries no pair laws: a nonlinearity of it (even normalized) raises."""
  with pytest.raises(im.UnsupportedPrimitiveError, match="not Gaussian"):
    im.kernel_fn(readout(lambda x: nn.relu(layernorm_of_reglu(x))), _inputs()[0][:1])(
        _inputs()[0])


class _WithBias(nn.Module):
  """relu(stream + b) with a random Gaussian bias b added after (`late`) or inside the branch."""
  late: bool

  @nn.compact
  def __call__(self, x):
    h = nn.relu(dense(64, 2.0, 0.2)(x))
    b = self.param("b", jinit.normal(0.7), (64,))
    s = h + dense(64)(h) + b if self.late else h + (dense(64)(h) + b)
    return dense(1)(nn.relu(s))


@pytest.mark.slow  # two pair-law compilations (~20 s)
def test_gaussian_bias_on_a_stream_maps_its_pair_laws():
  """A Gaussian bias added to a non-Gaussian stream is an independent Gaussian summand: the
  same kernel as with the bias inside the (Gaussian) branch."""
  x1, x2 = _inputs()
  late = im.kernel_fn(_WithBias(True), x1[:1])(x1, x2)
  early = im.kernel_fn(_WithBias(False), x1[:1])(x1, x2)
  np.testing.assert_allclose(late.nngp, early.nngp, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(late.ntk, early.ntk, rtol=1e-5, atol=1e-7)
