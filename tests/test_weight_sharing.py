"""Weight sharing (`infinite_modules/sharing.py`): one nn.Dense applied several times.

Exact witnesses: W xa + W xb = W (xa + xb), and W relu(h) + W erf(h) = W (relu(h) + erf(h)),
so the kernels of the shared models equal those of one use of the summed input (NNGP and
NTK, both parameterizations, float64), and a shared bias added twice is 2 b. Monte Carlo
witness: `g1 + d(relu(g1))` with g1 = d(relu(V x)) reuses d on an input that depends on
d; the two uses are correlated (E[relu(V x)] != 0), and the kernel that treats them as
independent fails the same bound.
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


def normal(var):
  return jinit.variance_scaling(var, "fan_in", "normal")


def dense(width, var=1.0, b_std=0.1, **kw):
  return nn.Dense(width, kernel_init=normal(var),
                  bias_init=jinit.normal(b_std) if b_std else jinit.zeros, **kw)


class InputUses(nn.Module):
  """d(xa) + d(xb) for the two halves of the input, or the same kernel written once."""
  tied: bool = True

  @nn.compact
  def __call__(self, x):
    k = x.shape[-1] // 2
    xa, xb = x[:, :k], x[:, k:]
    if self.tied:
      d = dense(64, 1.5)
      h = d(xa) + d(xb)
    else:  # W (xa + xb) + 2 b: the bias is added twice as well
      h = dense(64, 1.5, use_bias=False)(xa + xb) + 2 * self.param("b", jinit.normal(0.1), (64,))
    return dense(8, 2.0)(nn.relu(h))


class FieldUses(nn.Module):
  """d(relu(h)) + d(erf(h)): two uses on different functions of one field."""
  tied: bool = True

  @nn.compact
  def __call__(self, x):
    h = dense(64, 1.0)(x)
    if self.tied:
      d = dense(64, 1.5, b_std=None)
      h = d(nn.relu(h)) - d(jax.lax.erf(h))
    else:  # the shared (zero-initialized) bias cancels in the difference: none here
      h = dense(64, 1.5, use_bias=False)(nn.relu(h) - jax.lax.erf(h))
    return dense(8, 2.0)(jnp.tanh(h))


def _x(n=4, m=3, dim=6, seed=0):
  rng = np.random.default_rng(seed)
  x1, x2 = rng.normal(size=(n, dim)), rng.normal(size=(m, dim))
  x2[0] = 0.8 * x1[0] + 0.6 * x2[0]
  return x1, x2


@pytest.mark.parametrize("model, parameterization", [
    (InputUses, "ntk"), (InputUses, "standard"), (FieldUses, "standard"),
    pytest.param(FieldUses, "ntk", marks=pytest.mark.slow)])
def test_parallel_uses_equal_one_use_of_the_sum(model, parameterization):
  """Exact: the uses' cross moments (inputs' inner products, and E[relu(u) erf(v)] by
  piecewise quadrature for fields: ~1e-9 relative at correlation 1) make the shared
  kernel equal the single-use one."""
  with jax.enable_x64(True):
    x1, x2 = _x()
    for b in (x2, None) if model is InputUses else (x2,):  # (x2=None: ~1e-9 at correlation 1)
      tied = im.kernel_fn(model(True), x1[:1], parameterization=parameterization)(x1, b)
      once = im.kernel_fn(model(False), x1[:1], parameterization=parameterization)(x1, b)
      assert tied.nngp.dtype == jnp.float64
      np.testing.assert_allclose(tied.nngp, once.nngp, rtol=1e-8, atol=1e-12)
      np.testing.assert_allclose(tied.ntk, once.ntk, rtol=1e-8, atol=1e-12)
      # Treating the two uses as independent would miss the cross terms.
      assert np.max(np.abs(tied.nngp)) > 0


def test_parallel_uses_float32_and_jit():
  x1, x2 = (a.astype(np.float32) for a in _x())
  kf = im.kernel_fn(InputUses(True), x1[:1])
  k = kf(x1, x2)
  kj = jax.jit(lambda a, b: kf(a, b, get="ntk"))(x1, x2)
  assert k.nngp.dtype == jnp.float32
  np.testing.assert_allclose(kj, k.ntk, rtol=1e-5)
  once = im.kernel_fn(InputUses(False), x1[:1])(x1, x2)
  np.testing.assert_allclose(k.ntk, once.ntk, rtol=1e-5)


class Concatenated(nn.Module):
  tied: bool = True

  @nn.compact
  def __call__(self, x):
    k = x.shape[-1] // 2
    d = dense(64, 1.5)
    e = d if self.tied else dense(64, 1.5)
    return dense(8, 2.0)(jnp.concatenate([nn.relu(d(x[:, :k])), nn.relu(e(x[:, k:]))], -1))


def test_concatenated_uses_meet_through_independent_readout_weights():
  """concat(d(xa), d(xb)) -> Dense: the readout weights of the two halves are
  independent, so the cross moments cancel and the kernel is the untied one."""
  with jax.enable_x64(True):
    x1, x2 = _x()
    tied = im.kernel_fn(Concatenated(True), x1[:1])(x1, x2)
    untied = im.kernel_fn(Concatenated(False), x1[:1])(x1, x2)
    np.testing.assert_allclose(tied.nngp, untied.nngp, rtol=1e-12)
    np.testing.assert_allclose(tied.ntk, untied.ntk, rtol=1e-12)


class Reused(nn.Module):
  """g1 = d(relu(V x)); out = R relu(g1 + d(relu(g1))): d used twice, on dependent inputs."""
  width: int = 512
  tied: bool = True
  n_out: int = 512

  @nn.compact
  def __call__(self, x):
    h = nn.relu(dense(self.width, 2.0, name="V")(x))
    d = dense(self.width, 1.0, b_std=None, name="shared")
    second = d if self.tied else dense(self.width, 1.0, b_std=None, name="other")
    g1 = d(h)
    return dense(self.n_out, 2.0, b_std=None, name="R")(nn.relu(g1 + second(nn.relu(g1))))


def _mc_inputs():
  x1, x2 = _x(3, 2, 5, seed=1)
  return x1.astype(np.float32), x2.astype(np.float32)


@pytest.mark.slow
def test_reused_dense_nngp_monte_carlo():
  """NNGP of the real Flax model (width 512, 256 inits) vs the kernel; the kernel that
  takes the two uses as independent (a second weight) is off by ~23% (measured: shared
  1.1-1.3%, independent 23-24%, MC noise 1.1%)."""
  x1, x2 = _mc_inputs()
  model = Reused()
  k = im.kernel_fn(model, x1[:1])(x1, x2)
  init, apply = linen_init_apply(model, x1[:1])
  est = mc_nngp(init, apply, np.concatenate([x1, x2]), samples=256, seed=3)
  assert_mc_close(est, len(x1), k.nngp, k.cov1, k.cov2, what="shared nngp")
  wrong = im.kernel_fn(Reused(tied=False), x1[:1])(x1, x2)
  with pytest.raises(AssertionError):
    assert_mc_close(est, len(x1), wrong.nngp, wrong.cov1, wrong.cov2, what="independent")


@pytest.mark.slow
def test_reused_dense_ntk_monte_carlo():
  """Mean empirical NTK of the real model (standard parameterization, width 256, 16
  outputs, 256 inits; the shared kernel's Jacobian sums over both uses) vs the kernel
  (slow; the fast exact tests above cover the NTK cross terms)."""
  x1, x2 = _mc_inputs()
  model = Reused(width=256, n_out=16)
  k = im.kernel_fn(model, x1[:1], parameterization="standard")(x1, x2)
  init, apply = linen_init_apply(model, x1[:1])
  est = mc_ntk(init, apply, np.concatenate([x1, x2]), samples=256, seed=4)
  assert_mc_close(est, len(x1), k.ntk, what="shared ntk")
  wrong = im.kernel_fn(Reused(width=256, tied=False, n_out=16), x1[:1],
                       parameterization="standard")(x1, x2)
  with pytest.raises(AssertionError):
    assert_mc_close(est, len(x1), wrong.ntk, what="independent ntk")


def test_shared_convolution_names_the_parameter_and_its_uses():
  class SharedConv(nn.Module):
    @nn.compact
    def __call__(self, x):
      conv = nn.Conv(8, (3,), name="conv")
      h = conv(nn.relu(conv(x)))
      return nn.Dense(1)(h.reshape(h.shape[0], -1))

  x = np.ones((2, 5, 8), np.float32)
  with pytest.raises(im.UnsupportedPrimitiveError) as info:
    im.kernel_fn(SharedConv(), x)(x)
  message = str(info.value)
  assert "conv/kernel" in message and "used 2 times" in message, message
  assert "SharedConv/conv" in message and "weight sharing" in message, message
