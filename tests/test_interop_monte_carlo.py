"""Monte Carlo kernels: closed forms, the analytic ``im.kernel_fn``, batching, adapters."""

from __future__ import annotations

import functools

import flax.linen as nn
import haiku as hk
import jax
import numpy as np
import pytest
from flax import nnx

import interop

FAST_COMPILE = {"xla_backend_optimization_level": 0}


@pytest.fixture(autouse=True)
def _x64(monkeypatch):
  monkeypatch.setattr(interop._layout, "JIT_COMPILER_OPTIONS", FAST_COMPILE)
  with jax.enable_x64(True):
    yield


SIGMA_B = 0.5


class OneHidden(nn.Module):
  """``f(x) = W2 relu(W1 x + b1) + b2`` with Gaussian initializers (exact expectations)."""

  width: int
  out: int = 8

  @nn.compact
  def __call__(self, x):
    normal = nn.initializers.normal
    h = nn.Dense(self.width, kernel_init=normal(1 / np.sqrt(x.shape[-1])),
                 bias_init=normal(SIGMA_B))(x)
    return nn.Dense(self.out, kernel_init=normal(1 / np.sqrt(self.width)),
                    bias_init=normal(SIGMA_B))(nn.relu(h))


def one_hidden_kernels(x, width):
  """Closed forms (arc-cosine kernels, Cho & Saul 2009) for :class:`OneHidden`.

  With ``S = x x^T / d + sigma_b^2`` (covariance of the hidden pre-activations),
  ``k1 = E[relu(u) relu(v)]``, ``k0 = E[step(u) step(v)]``:
  NNGP ``= k1 + sigma_b^2``; NTK (NTK parameterization) ``= k1 + sigma_b^2 + k0 S``;
  NTK (standard, width ``n``) ``= n k1 + 1 + k0 (x x^T + 1)``. All are exact
  expectations at any width, since ``u`` is exactly Gaussian.
  """
  x = np.asarray(x)
  s = x @ x.T / x.shape[1] + SIGMA_B ** 2
  norm = np.sqrt(np.outer(np.diag(s), np.diag(s)))
  theta = np.arccos(np.clip(s / norm, -1, 1))
  k1 = norm * (np.sin(theta) + (np.pi - theta) * np.cos(theta)) / (2 * np.pi)
  k0 = (np.pi - theta) / (2 * np.pi)
  nngp = k1 + SIGMA_B ** 2
  return {"nngp": nngp, "ntk": nngp + k0 * s,
          "ntk_standard": width * k1 + 1 + k0 * (x @ x.T + 1)}


X = np.random.default_rng(0).standard_normal((4, 3))


@functools.cache
def _one_hidden_mc(parameterization):
  model = OneHidden(width=128)
  mc = interop.monte_carlo_kernel_fn(
      model, X, n_samples=256, key=jax.random.PRNGKey(1), implementation=3,
      parameterization=parameterization, sample_batch_size=64, progress=False)
  return mc(X)


def _nngp_standard_error(nngp, n_samples, n_out):
  """SE of the MC NNGP: for a Gaussian sample, Var[f(x) f(x')] = K K' + K(x, x')^2."""
  diag = np.diag(nngp)
  return np.sqrt((np.outer(diag, diag) + nngp ** 2) / (n_samples * n_out))


def test_one_hidden_layer_closed_form_ntk_parameterization():
  got = _one_hidden_mc("ntk")
  exact = one_hidden_kernels(X, 128)
  z = (np.asarray(got.nngp) - exact["nngp"]) / _nngp_standard_error(exact["nngp"], 256, 8)
  assert np.abs(z).max() < 5, z
  # the NTK-parameterized NTK concentrates: O(1/sqrt(width * samples)) relative noise
  np.testing.assert_allclose(got.ntk, exact["ntk"], rtol=0.03, atol=0.01)
  # a kernel missing the first layer's term k0 * S would be far off
  assert np.abs(np.asarray(got.ntk) - exact["nngp"]).max() > 0.1


def test_one_hidden_layer_closed_form_standard_parameterization():
  got = _one_hidden_mc("standard")
  exact = one_hidden_kernels(X, 128)
  scale = np.abs(exact["ntk_standard"]).max()
  np.testing.assert_allclose(got.ntk, exact["ntk_standard"], rtol=0.03, atol=0.01 * scale)
  # the NNGP does not depend on the parameterization (same keys, same draws)
  np.testing.assert_allclose(got.nngp, _one_hidden_mc("ntk").nngp, rtol=1e-12)


def test_monte_carlo_approaches_analytic_kernel():
  im = pytest.importorskip("infinite_modules")
  if not hasattr(im, "kernel_fn"):
    pytest.skip("infinite_modules.kernel_fn is not available yet")

  class WideMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      bias = nn.initializers.normal(0.3)
      x = nn.relu(nn.Dense(256, bias_init=bias)(x))
      x = nn.relu(nn.Dense(256, bias_init=bias)(x))
      return nn.Dense(8, bias_init=bias)(x)

  model = WideMLP()
  exact = im.kernel_fn(model, X, parameterization="standard")(X, None, get=("nngp", "ntk"))
  n_samples = 128
  mc = interop.monte_carlo_kernel_fn(model, X, n_samples, key=jax.random.PRNGKey(3),
                                     implementation=3, sample_batch_size=64,
                                     progress=False)(X)
  nngp = np.asarray(exact.nngp)
  z = (np.asarray(mc.nngp) - nngp) / _nngp_standard_error(nngp, n_samples, 8)
  assert np.abs(z).max() < 6, z
  # standard NTK at large width: finite-width fluctuations are O(1/sqrt(width))
  np.testing.assert_allclose(mc.ntk, exact.ntk, rtol=0.05)


def _small_mc(model, x, **kwargs):
  return interop.monte_carlo_kernel_fn(model, x, n_samples=4, key=jax.random.PRNGKey(0),
                                       implementation=3, sample_batch_size=2,
                                       progress=False, **kwargs)


def test_input_batching_matches_unbatched_and_progress_bar(capsys):
  model = OneHidden(width=6, out=2)
  x1 = np.random.default_rng(1).standard_normal((4, 3))
  x2 = np.random.default_rng(2).standard_normal((2, 3))
  blocked = _small_mc(model, x1, batch_size=2)
  full = _small_mc(model, x1)(x1, x2)
  for a, b in zip(full, blocked(x1, x2)):
    np.testing.assert_allclose(a, b, rtol=1e-12)
  sym = blocked(x1, None, "ntk")
  assert sym.shape == (4, 4)
  np.testing.assert_allclose(sym[:2, 2:], blocked(x1[:2], x1[2:], "ntk"), rtol=1e-12)
  np.testing.assert_allclose(sym, sym.T, rtol=1e-12)
  diag = _small_mc(model, x1, batch_size=2, trace_axes=(), diagonal_axes=(0,))(x1, None)
  assert diag.ntk.shape == (4, 2, 2)
  np.testing.assert_allclose(np.einsum("nkk->n", diag.ntk) / 2, np.diag(sym), rtol=1e-12)
  mc = interop.monte_carlo_kernel_fn(model, x1, 2, implementation=3, progress=True)
  assert mc(x1, x2, "nngp").shape == (4, 2)
  assert "MC kernel" in capsys.readouterr().err


def test_haiku_and_nnx_factory():
  x = np.random.default_rng(1).standard_normal((3, 4))
  t = hk.transform(lambda x: hk.nets.MLP([5, 2])(x))
  k = _small_mc(t, x)(x, None, "ntk")
  assert k.shape == (3, 3) and np.all(np.diag(k) > 0)
  factory = interop.nnx_factory(lambda rngs: nnx.Linear(4, 2, rngs=rngs))
  k = _small_mc(factory, x)(x, None, ("nngp", "ntk"))
  # linear model: NTK = x x^T + 1 exactly, for every draw
  np.testing.assert_allclose(k.ntk, x @ x.T + 1, rtol=1e-10)


def test_known_leaf_variances():
  """With the exact variances given, an NTK-parameterized linear model is exact."""
  model = nn.Dense(2, kernel_init=nn.initializers.normal(0.5),
                   bias_init=nn.initializers.normal(2.0))
  x = np.random.default_rng(1).standard_normal((3, 4))
  variances = {"kernel": 0.25, "bias": 4.0}
  k = _small_mc(model, x, parameterization="ntk", leaf_variances=variances)(x, None, "ntk")
  np.testing.assert_allclose(k, 0.25 * x @ x.T + 4.0, rtol=1e-10)
  est = _small_mc(model, x, parameterization="ntk")(x, None, "ntk")
  np.testing.assert_allclose(est, k, rtol=0.05)  # pilot estimate of 2 * 4096 draws


def test_errors():
  with pytest.raises(TypeError, match="init"):
    interop.monte_carlo_kernel_fn(lambda p, x: x @ p, X, 4)
  with pytest.raises(ValueError, match="parameterization"):
    interop.monte_carlo_kernel_fn(OneHidden(4), X, 4, parameterization="mup")
  with pytest.raises(ValueError, match="n_samples"):
    interop.monte_carlo_kernel_fn(OneHidden(4), X, 0)
  with pytest.raises(ValueError, match="implementation"):
    interop.monte_carlo_kernel_fn(OneHidden(4), X, 4, implementation="magic")
