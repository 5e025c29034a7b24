"""Max pooling (`reduce_window_max`) and maxima over positions (`reduce_max`).

Witnesses:
* the window structure against `lax.reduce_window` itself (exact);
* a simulation of the infinite-width limit of conv -> relu -> max_pool -> Dense, from the
  exact Gaussian law of the conv outputs (2e5 channels): NNGP and NTK agree within the
  kernel's stated error bound, and the same bound rejects the kernel of independent taps;
* Monte Carlo over random inits of the real Flax model (width 512, Gaussian initializers):
  NNGP and the standard-parameterization NTK, the ResNet stem (max pool 3x3 stride 2 SAME,
  then a post-activation residual block) (slow).
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
from infinite_modules.rules import pooling_max

W2 = jinit.variance_scaling(2.0, "fan_in", "normal")
W1 = jinit.variance_scaling(1.0, "fan_in", "normal")


@pytest.mark.parametrize("window,stride,padding,dilation", [
    ((3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1)),
    ((2, 2), (2, 2), ((0, 0), (0, 0)), (1, 1)),
    ((2, 3), (1, 2), ((0, 1), (2, 0)), (2, 1)),
])
def test_windows_match_reduce_window(window, stride, padding, dilation):
  shape = (5, 6)
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  want = jax.lax.reduce_window(x, -np.inf, jax.lax.max, window, stride, padding,
                               window_dilation=dilation)
  out_shape, taps = pooling_max._windows(shape, window, stride, padding, dilation)
  flat = np.where(taps >= 0, x.ravel()[np.maximum(taps, 0)], -np.inf)
  np.testing.assert_array_equal(flat.max(-1).reshape(out_shape), want)


class ConvMaxPool(nn.Module):
  width: int = 8
  n_out: int = 1
  over_positions: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(self.width, (3, 3), use_bias=False, kernel_init=W2)(x))
    if self.over_positions:
      x = jnp.max(x, axis=(1, 2))
    else:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME").reshape(x.shape[0], -1)
    return nn.Dense(self.n_out, use_bias=False, kernel_init=W1)(x)


def _images(n=3, size=4, channels=2, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, size, size, channels))
  x[1] = 0.8 * x[0] + 0.6 * x[1]  # a strongly correlated pair
  return x


def _patches(x):
  """(n, P, 9 C) SAME 3x3 patches, so that conv outputs are patches @ W."""
  n, h, w, c = x.shape
  pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.stack([pad[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=3)
  return out.reshape(n, h * w, 9 * c)


def _simulate(x, over_positions, independent_taps=False, channels=200_000, seed=0):
  """NNGP and NTK (NTK parameterization) of ConvMaxPool at infinite width: channels of the
  conv output drawn from their exact joint Gaussian law (covariance 2 / fan_in of the patch
  products), pooled, averaged. `independent_taps`: every input position drawn
  independently (with the right variances): the assumption a wrong rule could make."""
  rng = np.random.default_rng(seed)
  pt = _patches(x)
  n, p, fan = pt.shape
  flat = pt.reshape(n * p, fan)
  cov = 2.0 * flat @ flat.T / fan
  if independent_taps:
    cov = np.diag(np.diag(cov))
  vals, vecs = np.linalg.eigh(cov)
  factor = vecs * np.sqrt(np.maximum(vals, 0))
  z = (rng.standard_normal((channels, n * p)) @ factor.T).reshape(channels, n, p)
  y = np.maximum(z, 0)
  side = int(np.sqrt(p))
  if over_positions:
    taps = np.arange(p)[None, :]
  else:
    pads = jax.lax.padtype_to_pads((side, side), (3, 3), (2, 2), "SAME")  # (0, 1) here
    _, taps = pooling_max._windows((side, side), (3, 3), (2, 2), pads, (1, 1))
  valid = taps >= 0
  pooled = np.where(valid, y[:, :, np.maximum(taps, 0)], -np.inf)         # (N, n, P', W)
  m = pooled.max(-1)
  k = pooled.argmax(-1)
  arg = np.take_along_axis(np.broadcast_to(np.maximum(taps, 0), pooled.shape), k[..., None],
                           -1)[..., 0]                                    # (N, n, P')
  grad = np.take_along_axis(z, arg.reshape(channels, n, -1), -1) > 0     # relu'
  theta_z = (2.0 * flat @ flat.T / fan).reshape(n, p, n, p)  # first layer: Theta_z = cov_z
  nngp = np.einsum("kap,kbp->ab", m, m) / channels / m.shape[-1]
  # tangent of the readout's input: phi'(z_i*) phi'(z_j*) Theta_z(i*, j*)
  ntk_pool = np.zeros((n, n))
  for a in range(n):
    for b in range(n):
      th = theta_z[a, :, b, :][arg[:, a, :], arg[:, b, :]]               # (N, P')
      ntk_pool[a, b] = np.mean(grad[:, a] * grad[:, b] * th)
  return nngp, nngp + ntk_pool


@pytest.mark.parametrize("over_positions", [False, True])
def test_max_pool_matches_infinite_width_simulation(x64, over_positions):
  x = _images()
  k = im.kernel_fn(ConvMaxPool(over_positions=over_positions), x[:1])(x)
  assert not k.exact and "Monte Carlo" in k.estimates[0].method
  nngp, ntk = _simulate(x, over_positions)
  # The stated bound (4 standard errors of the worst pooled moment, ~5% here) holds, and
  # so does the measured accuracy (~1% of the largest entry with 8192 draws; the
  # simulation's own noise is ~0.3%).
  tol = 0.02 * np.max(nngp)
  for got, want in ((k.nngp, nngp), (k.ntk, ntk)):
    err = np.max(np.abs(np.asarray(got) - want))
    assert err < float(k.error) and err < tol, (got, want, err, float(k.error))
  for arr in (k.nngp, k.ntk):
    arr = np.asarray(arr)
    np.testing.assert_allclose(arr, arr.T, rtol=1e-12)
    assert np.min(np.linalg.eigvalsh(arr)) > -float(k.error)
  # the same tolerance rejects independent taps (the joint law of the window matters)
  wrong, _ = _simulate(x, over_positions, independent_taps=True)
  assert np.max(np.abs(wrong - nngp)) > 2 * tol


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def test_max_pool_float32_and_jit():
  x = _images().astype(np.float32)
  kf = im.kernel_fn(ConvMaxPool(), x[:1])
  k = jax.jit(lambda a, b: kf(a, b, get="nngp"))(x[:2], x[1:])
  assert k.dtype == np.float32 and np.all(np.isfinite(k))
  np.testing.assert_allclose(k[1, 0], kf(x[1:2], x[1:2], get="nngp")[0, 0], rtol=1e-5)


def _assert_nngp_matches_mc(model_cls, x):
  """The NNGP between x[:2] and x[2:] against Monte Carlo of the real model, width 512."""
  x1, x2 = x[:2], x[2:]
  model = model_cls(width=512, n_out=128)
  init, apply = linen_init_apply(model, x1[:1])
  k = im.kernel_fn(model, x1[:1])(x1, x2)
  est = mc_nngp(init, apply, x, samples=150, seed=1)
  assert_mc_close(est, len(x1), k.nngp, k.cov1, k.cov2, what="nngp")


@pytest.mark.slow
def test_max_pool_mc_real_flax_model():
  x = _images().astype(np.float32)
  x1, x2 = x[:2], x[2:]
  _assert_nngp_matches_mc(ConvMaxPool, x)
  model = ConvMaxPool(width=512, n_out=4)
  init, apply = linen_init_apply(model, x1[:1])
  ks = im.kernel_fn(model, x1[:1], parameterization="standard")(x1, x2)
  est = mc_ntk(init, apply, x, samples=100, seed=2)
  assert_mc_close(est, len(x1), ks.ntk, what="ntk")


class Stem(nn.Module):
  """The stem of Flax's ImageNet ResNet (conv, relu, max_pool 3x3 stride 2 SAME) and one
  post-activation residual block on the pooled (non-Gaussian) field."""
  width: int = 8
  n_out: int = 1

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(self.width, (3, 3), use_bias=False, kernel_init=W2)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    y = nn.relu(nn.Conv(self.width, (3, 3), use_bias=False, kernel_init=W2)(x))
    y = nn.Conv(self.width, (3, 3), use_bias=False, kernel_init=W1)(y)
    x = nn.relu(x + y)
    return nn.Dense(self.n_out, kernel_init=W1)(x.mean(axis=(1, 2)))


@pytest.mark.slow  # test_resnet_examples' ResNet1 covers max pool -> residual stream fast
def test_resnet_stem_with_residual_block_runs():
  x = _images().astype(np.float32)
  k = im.kernel_fn(Stem(), x[:1])(x)
  assert len(k.estimates) == 2  # the max pool and the pair law of the block
  for arr in (k.nngp, k.ntk):
    arr = np.asarray(arr, np.float64)
    assert np.all(np.isfinite(arr))
    assert np.min(np.linalg.eigvalsh(arr)) > -float(k.error)


@pytest.mark.slow
def test_resnet_stem_mc_real_flax_model():
  _assert_nngp_matches_mc(Stem, _images().astype(np.float32))
