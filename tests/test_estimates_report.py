"""An estimated kernel never reaches the user looking exact.

`KernelFn.estimates` / `KernelFn.exact` are known from the construction pass; bare arrays
(`get=` a name or a tuple) of a kernel with estimated steps come with one
`EstimatedKernelWarning` per `KernelFn` (also through `im.batch` and
`im.predict.gradient_descent_mse_ensemble`), a `Kernel` (`get=None`) with none. Exact
models never warn, even with warnings turned into errors.
"""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infinite_modules as im

NORMAL = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(1, kernel_init=NORMAL)(nn.relu(nn.Dense(8, kernel_init=NORMAL)(x)))


class MaxPool(nn.Module):
  """conv -> relu -> max over positions (Monte Carlo over the windows)."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3, 3), use_bias=False, kernel_init=NORMAL)(x))
    return nn.Dense(1, use_bias=False, kernel_init=NORMAL)(jnp.max(h, axis=(1, 2)))


class Attention(nn.Module):
  """Flax's default 1/sqrt(head_dim) attention (Monte Carlo over the Gaussian logits)."""

  @nn.compact
  def __call__(self, x):
    h = nn.SelfAttention(num_heads=2, qkv_features=8, out_features=8, kernel_init=NORMAL,
                         deterministic=True)(x)
    return nn.Dense(1, kernel_init=NORMAL)(h[:, 0])


def _images(n=3):
  return np.random.default_rng(0).normal(size=(n, 3, 3, 2)).astype(np.float32)


def _sequences(n=3):
  return np.random.default_rng(1).normal(size=(n, 3, 3)).astype(np.float32)


ESTIMATED = {"max": (MaxPool, _images, "reduce_max"),
             "attention": (Attention, _sequences, "SelfAttention")}


def _estimated_warnings(record):
  return [w for w in record if issubclass(w.category, im.EstimatedKernelWarning)]


@pytest.fixture(scope="module")
def max_pool():
  """One max-pool `KernelFn` shared by the tests (its compiled programs too)."""
  x = _images(4)
  return im.kernel_fn(MaxPool(), x), x


def _unwarned(kf):
  """`kf` as if fresh: it has not warned yet (the warning is once per `KernelFn`)."""
  kf._warned_estimated = False
  return kf


def test_exact_model_reports_exact_and_never_warns():
  x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
  kf = im.kernel_fn(MLP(), x)
  assert kf.exact and kf.estimates == ()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    kf(x, get="nngp")
    kf(x, x[:2], get=("nngp", "ntk"))
    jax.jit(lambda a: kf(a, get="ntk"))(x)
    assert kf(x).exact
    im.batch(kf, 2, progress=False, jit=False)(x, None, "nngp")


@pytest.mark.parametrize("name", sorted(ESTIMATED))
def test_estimated_model_warns_once_for_bare_arrays(name, max_pool):
  model, inputs, where = ESTIMATED[name]
  if name == "max":
    kf, x = max_pool
    _unwarned(kf)
  else:
    x = inputs()
    kf = im.kernel_fn(model(), x)
  assert not kf.exact and len(kf.estimates) == 1 and where in kf.estimates[0].where
  assert issubclass(im.EstimatedKernelWarning, UserWarning)
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    k = kf(x)  # a Kernel carries its estimates and error bound: no warning
    assert not _estimated_warnings(record)
    assert k.estimates == kf.estimates and float(k.error) > 0
    nngp = kf(x, get="nngp")
    kf(x, get=("nngp", "ntk"))  # once per KernelFn
  (warning,) = _estimated_warnings(record)
  message = str(warning.message)
  assert where in message and kf.estimates[0].method in message
  assert "get=None" in message and ".error" in message and "KernelFn.estimates" in message
  assert warning.filename == __file__  # points at the user's call
  np.testing.assert_array_equal(nngp, k.nngp)


def test_warning_under_jit_and_filterable(max_pool):
  kf, x = max_pool
  with pytest.warns(im.EstimatedKernelWarning, match="reduce_max"):
    jax.jit(lambda a: _unwarned(kf)(a, get="nngp"))(x)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    warnings.filterwarnings("ignore", category=im.EstimatedKernelWarning)
    _unwarned(kf)(x, get="ntk")


# jit=True compiles the tile programs again (the warning is given before any tile either way).
@pytest.mark.parametrize("jit", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_batch_warns_once_at_the_users_call(jit, max_pool):
  kf, x = max_pool
  batched = im.batch(_unwarned(kf), 2, progress=False, jit=jit)
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    if not jit:  # (the tile programs of a Kernel and of an array are two compilations)
      k = batched(x, None)
      assert not _estimated_warnings(record) and not k.exact
    nngp = batched(x, None, get="nngp")
  (warning,) = _estimated_warnings(record)
  assert "reduce_max" in str(warning.message) and warning.filename == __file__
  # The tiles draw their own Monte Carlo samples: two estimates, each within its bound.
  whole = kf(x)
  np.testing.assert_allclose(nngp, whole.nngp, atol=2 * float(whole.error))


def test_predict_warns_once(max_pool):
  kf, x = max_pool
  # On the training set: kernel_fn(x, None) only, compiled already for the shared KernelFn.
  y = np.linspace(-1, 1, 4, dtype=np.float32)[:, None]
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    predict_fn = im.predict.gradient_descent_mse_ensemble(_unwarned(kf), x, y, diag_reg=1e-3)
    predict_fn(None, None, "nngp")
    predict_fn(1.0, None, ("nngp", "ntk"))
  (warning,) = _estimated_warnings(record)
  assert "reduce_max" in str(warning.message) and warning.filename == __file__
