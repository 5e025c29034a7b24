"""Empirical NTK of convolutional networks: every implementation against ``jax.jacobian``.

Convolutions are where the structured interpreter does the most work of its own (patch
extraction, per-layer choice between the Gram and the materialized weight-Jacobian
route, single-matrix-product contractions), so each conv variant is checked here in
float64 to 1e-6 relative: strided, dilated (input and kernel), SAME / VALID / explicit
padding, grouped and depthwise, with and without biases, BatchNorm in eval mode, for
Flax linen, Flax NNX and Haiku modules, with ``vmap_axes`` ``None``, ``0`` and ``"auto"``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from interop_helpers import (
  f64,
  fast_jit,
  perturb,
  x64_fast_compile,  # noqa: F401  (autouse fixture)
)
from test_interop_empirical import full_ntk, trace_diag

import interop
from interop import adapters


class LinenConvs(nn.Module):
  """Strided SAME, kernel-dilated VALID, grouped with explicit padding, depthwise
  without bias, input-dilated; BatchNorm (running averages) in between."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 1), padding="SAME")(x))
    x = nn.BatchNorm(use_running_average=True)(x)
    x = jnp.tanh(nn.Conv(4, (2, 2), padding="VALID", kernel_dilation=(1, 2))(x))
    x = nn.gelu(nn.Conv(6, (3, 2), padding=((1, 0), (0, 1)), feature_group_count=2)(x))
    x = jnp.sin(nn.Conv(6, (2, 2), feature_group_count=6, use_bias=False)(x))
    x = nn.Conv(3, (2, 2), input_dilation=(2, 1), padding=((0, 0), (1, 0)))(x)
    return nn.Dense(3)(x.mean(axis=(1, 2)))


class NNXConvs(nnx.Module):
  def __init__(self, rngs):
    self.c1 = nnx.Conv(2, 4, (3, 3), strides=2, padding="SAME", rngs=rngs)
    self.bn = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)
    self.c2 = nnx.Conv(4, 4, (2, 2), feature_group_count=2, kernel_dilation=2,
                       padding="VALID", rngs=rngs)
    self.out = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    h = jnp.tanh(self.c2(nnx.relu(self.bn(self.c1(x)))))
    return self.out(h.mean(axis=(1, 2)))


def _haiku_convs(x):
  x = jax.nn.relu(hk.Conv2D(4, 3, stride=(1, 2), padding="SAME")(x))
  x = jnp.tanh(hk.Conv2D(4, 2, rate=2, padding="VALID", feature_group_count=4)(x))
  x = hk.Conv2D(3, 2, with_bias=False, padding="SAME")(x)
  return hk.Linear(3)(x.reshape(x.shape[0], -1))


@functools.cache
def make_conv_case(name):
  """``(model, variables, f_ref(params, x), params)``, float64, perturbed statistics."""
  key = jax.random.PRNGKey(0)
  x = jnp.ones((2, 7, 6, 2))
  if name == "linen":
    module = LinenConvs()
    variables = fast_jit(lambda k: f64(perturb(module.init(k, x), jax.random.PRNGKey(2))))(
        key)
    variables = {**variables, "batch_stats": jax.tree_util.tree_map(
        jnp.abs, variables["batch_stats"])}  # valid variances
    f, params = adapters.adapt(module).bind(variables)
    return module, variables, f, params
  if name == "nnx":
    model = NNXConvs(nnx.Rngs(0))
    state = f64(perturb(nnx.state(model), jax.random.PRNGKey(2)))
    state = jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.abs(a) if "var" in jax.tree_util.keystr(p) else a, state)
    f, params = adapters.adapt(model).bind(state)
    return model, state, f, params
  if name == "haiku":
    t = hk.transform(_haiku_convs)
    params = fast_jit(lambda k: f64(perturb(t.init(k, x), jax.random.PRNGKey(2))))(key)
    return t, params, lambda p, x: t.apply(p, None, x), params
  raise ValueError(name)


def _inputs():
  x1 = jax.random.normal(jax.random.PRNGKey(10), (3, 7, 6, 2), jnp.float64)
  x2 = jax.random.normal(jax.random.PRNGKey(11), (2, 7, 6, 2), jnp.float64)
  return x1, x2


@functools.cache
def _reference(name):
  _, _, f_ref, params = make_conv_case(name)
  x1, x2 = _inputs()
  return full_ntk(f_ref, params, x1, x2, x1)


#: (implementation, vmap_axes, trace_axes, x2 given). The fast run checks the structured
#: interpreter (the conv rules are its own code) with and without vmap, full and traced
#: kernels, x2=None and given; the slow run adds Jacobian contraction and auto.
FAST = [("structured_derivatives", 0, (), True), ("structured_derivatives", None, (-1,), False)]
SLOW = [("jacobian_contraction", None, (), True), ("jacobian_contraction", 0, (-1,), False),
        ("structured_derivatives", 0, (), False), ("structured_derivatives", "auto", (), True),
        ("auto", "auto", (), False)]


def _check(name, settings):
  model, variables, _, _ = make_conv_case(name)
  x1, x2 = _inputs()
  full_12, full_11 = _reference(name)
  jitted = [s for s in settings if s[0] != "auto"]
  fns = [interop.empirical_ntk_fn(model, trace, (), vmap, impl)
         for impl, vmap, trace, _ in jitted]

  @fast_jit
  def run(x1, x2, variables):
    return [fn(x1, x2 if given else None, variables)
            for fn, (*_, given) in zip(fns, jitted)]

  outs = run(x1, x2, variables)
  for impl, vmap, trace, given in settings:
    if impl == "auto":  # auto selects eagerly (it may time candidates): outside jit
      fn = interop.empirical_ntk_fn(model, trace, (), vmap, impl)
      outs.append(fn(x1, x2 if given else None, variables))
  for got, (impl, vmap, trace, given) in zip(outs, jitted + [s for s in settings
                                                            if s[0] == "auto"]):
    expected = trace_diag(full_12 if given else full_11, 2, trace, ())
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max(),
                               err_msg=f"{name} {impl} vmap_axes={vmap} trace={trace}")


@pytest.mark.parametrize("name", ["linen", "nnx", "haiku"])
def test_conv_ntk_matches_jacobian(name):
  _check(name, FAST)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["linen", "nnx", "haiku"])
def test_conv_ntk_matches_jacobian_all_implementations(name):
  _check(name, SLOW)


def test_conv_parameters_take_the_structured_path():
  """Every conv kernel and bias (grouped and depthwise included) is structured, so the
  checks above exercise the conv rules rather than the generic fallback."""
  model, variables, _, _ = make_conv_case("linen")
  report = interop.structure_report(model, jnp.ones((2, 7, 6, 2)), variables)
  assert not report["generic"], report["generic"]
  convs = [s for s in report["structured"] if "conv_general_dilated" in s]
  assert len(convs) == 5, report["structured"]
