"""The work of a first call: what construction does once and a call does not repeat.

* `im.kernel_fn(model, x)` interprets the model once (choosing the layout and raising
  the errors of unsupported operations there); a call `kernel_fn(x, None)` at the
  example's shape, jitted or not, reuses that pass's program instead of interpreting
  the model again, and gives the kernel a fresh interpretation gives.
* A call at a new batch size traces the model once, not twice (the probe trace that
  tells the batch axes apart is the example's own trace).
* A model whose jaxpr changes with the batch size is refused with a clear error
  instead of matching the steps of unlike traces.
* Positively homogeneous activations get their closed form from their structure
  (`homogeneous`, no probe programs to compile): the same form the probe fit finds;
  activations that are not homogeneous are left to the fit.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.nn.initializers import variance_scaling

import infinite_modules as im
from infinite_modules import api, homogeneous
from infinite_modules import elementwise as ew
from infinite_modules import expectations as ex


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    init = variance_scaling(2.0, "fan_in", "normal")
    x = nn.relu(nn.Conv(4, (3, 3), kernel_init=init)(x))
    return nn.Dense(1, kernel_init=init)(x.reshape(x.shape[0], -1))


X = np.random.RandomState(0).randn(4, 5, 5, 2).astype(np.float32)


@pytest.fixture
def interpretations(monkeypatch):
  """Counts the interpreter's passes over the model's jaxpr."""
  count = []
  original = api.run_jaxpr

  def counting(*args, **kwargs):
    count.append(1)
    return original(*args, **kwargs)

  monkeypatch.setattr(api, "run_jaxpr", counting)
  return count


def test_call_at_example_shape_reuses_the_construction_pass(interpretations):
  kf = im.kernel_fn(Net(), X)
  assert len(interpretations) == 1  # the construction pass (diagonal layout suffices)
  direct = kf(X, None, get=("nngp", "ntk"))
  jitted = jax.jit(lambda a: tuple(kf(a, None, get=("nngp", "ntk"))))(X)
  assert len(interpretations) == 1, "a call at the example's shape interpreted the model again"
  kf(X[:3], None)  # another shape: interpreted at its own shapes
  assert len(interpretations) == 2
  # The reused program is the kernel: the same as a kernel_fn built from one example.
  fresh = im.kernel_fn(Net(), X[:1])(X, None, get=("nngp", "ntk"))
  for a, b, c in zip(direct, jitted, fresh):
    np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b, c, rtol=1e-6, atol=1e-7)


def test_new_batch_size_traces_the_model_once():
  kf = im.kernel_fn(Net(), X[:1])
  before = api.KernelFn._trace.cache_info().misses
  kf(X, None)
  assert api.KernelFn._trace.cache_info().misses - before == 1
  kf(X, X[:2])  # a second batch of a new size: one more trace
  assert api.KernelFn._trace.cache_info().misses - before == 2


def test_jaxpr_that_changes_with_batch_size_is_refused():
  class Branchy(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Dense(4)(x)
      if x.shape[0] > 1:  # a Python branch on the batch size: other steps per size
        h = h * 2.0
      return nn.Dense(1)(nn.relu(h))

  with pytest.raises(im.InfiniteWidthError, match="changes with the batch size"):
    im.kernel_fn(Branchy(), np.ones((1, 3), np.float32))


def test_float64_data_is_the_calls_program(interpretations):
  """numpy float64 data as the example: traced in the dtype the call converts it to."""
  x = X.astype(np.float64)
  kf = im.kernel_fn(Net(), x)
  kf(x, None)
  assert len(interpretations) == 1


HOMOGENEOUS = {
    "relu": jax.nn.relu, "leaky_relu": lambda h: jax.nn.leaky_relu(h, 0.1), "abs": jnp.abs,
    "-relu": lambda h: -jax.nn.relu(h), "max(h, 0.3 h)": lambda h: jnp.maximum(h, 0.3 * h),
    "h * (h > 0)": lambda h: h * (h > 0), "where": lambda h: jnp.where(h > 0, 2 * h, -0.5 * h),
}
NOT_HOMOGENEOUS = {
    "relu6": jax.nn.relu6, "relu + 0.1": lambda h: jax.nn.relu(h) + 0.1,
    "h * h": lambda h: h * h, "gelu": jax.nn.gelu, "relu(h - 1)": lambda h: jax.nn.relu(h - 1.0),
}


@pytest.mark.parametrize("name", [*HOMOGENEOUS, *NOT_HOMOGENEOUS])
def test_homogeneous_closed_form_is_the_fitted_one(name, monkeypatch):
  phi = {**HOMOGENEOUS, **NOT_HOMOGENEOUS}[name]
  pairs = []
  structural = homogeneous.relu_pair_form

  def both(expr, dtype):
    form = structural(expr, dtype)
    pairs.append((form, ex.recognize(lambda t: ew.evaluate(expr, t, ()), dtype)))
    return form

  monkeypatch.setattr(homogeneous, "relu_pair_form", both)
  monkeypatch.setattr(ew, "_CLOSED_FORMS", {})

  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(1)(phi(nn.Dense(8)(x)))

  im.kernel_fn(M(), np.ones((2, 3), np.float32))
  (form, fitted), = pairs
  if name in NOT_HOMOGENEOUS:
    assert form is None
    return
  assert isinstance(form.core, ex.ReluPair) and isinstance(fitted.core, ex.ReluPair)
  assert (form.core.p, form.core.n, form.a, form.s) == (
      fitted.core.p, fitted.core.n, fitted.a, fitted.s)
  assert form.b == fitted.b == 0
