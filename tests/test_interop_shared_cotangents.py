"""Output-shared cotangents (``interop.shared_cotangents``) and the structured NTK's
factored route.

The analysis must prove ``df/dy = D (.) B`` only where it holds: positive cases (global
average pooling, flatten, residual additions, GELU, a Flax model) and negative ones (a
coefficient that depends on the input, two nonlinear paths, a custom JVP rule that is
not diagonal although its primal is elementwise). The factored route is then forced for
every use that has it and checked against ``jax.jacobian`` in float64 to 1e-6, with and
without ``vmap_axes``, ``x2`` given and not, full and output-traced kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from interop_helpers import (
  fast_jit,
  x64_fast_compile,  # noqa: F401  (autouse fixture)
)
from test_interop_conv import make_conv_case
from test_interop_empirical import full_ntk, trace_diag

import interop
from interop import structured as sd

DN = ("NHWC", "HWIO", "NHWC")


def conv(p, x):
  return jax.lax.conv_general_dilated(x, p["w"], (1, 1), "SAME", dimension_numbers=DN) + p["b"]


def cnn_gap(p, x):
  h = jax.nn.relu(conv(p["c1"], x))
  h = jax.nn.relu(conv(p["c2"], h))
  return h.mean(axis=(1, 2)) @ p["d"]["w"] + p["d"]["b"]


def cnn_flatten(p, x):
  h = jax.nn.relu(conv(p["c1"], x))
  h = jnp.tanh(conv(p["c2"], h))
  return h.reshape(h.shape[0], -1)[:, 2:5] @ p["d"]["w"] + p["d"]["b"]


def residual_gelu(p, x):
  h = jax.nn.relu(conv(p["c1"], x))
  h = jax.nn.gelu(h + 0.5 * conv(p["c2"], h) * p["s"])  # residual, scale, GELU
  return jnp.sum(h, axis=(1, 2)) @ p["d"]["w"] / 9.0


def input_scaled(p, x):
  """The pooled features are multiplied by a statistic of the input: ``B`` would
  depend on the example."""
  h = jax.nn.relu(conv(p["c1"], x))
  h = jax.nn.relu(conv(p["c2"], h))
  return (h.mean(axis=(1, 2)) * jnp.mean(x ** 2, axis=(1, 2, 3))[:, None]) @ p["d"]["w"]


def two_paths(p, x):
  """``relu(y)`` and ``tanh(y)`` both reach the output: a sum of two factors."""
  h = jax.nn.relu(conv(p["c1"], x))
  y = conv(p["c2"], h)
  return (jax.nn.relu(y).mean(axis=(1, 2)) + jnp.tanh(y).mean(axis=(1, 2))) @ p["d"]["w"]


@jax.custom_jvp
def mixing_square(y):
  """Elementwise ``y^2``, but a custom JVP that mixes channels (deliberately not the
  derivative): AD of the model uses this rule, whose Jacobian is not diagonal. (A
  factored route that trusted the primal would be wrong here: the check below fails
  when the analysis accepts this rule.)"""
  return y * y


@mixing_square.defjvp
def _mixing_square_jvp(primals, tangents):
  (y,), (t,) = primals, tangents
  return y * y, 2 * y * t + jnp.roll(t, 1, axis=-1)


def custom_mixing(p, x):
  h = jax.nn.relu(conv(p["c1"], x))
  return mixing_square(conv(p["c2"], h)).mean(axis=(1, 2)) @ p["d"]["w"]


MODELS = {"cnn_gap": cnn_gap, "cnn_flatten": cnn_flatten, "residual_gelu": residual_gelu,
          "input_scaled": input_scaled, "two_paths": two_paths,
          "custom_mixing": custom_mixing}

#: Per model: whether the last conv's kernel has a shared cotangent, and along which axes
#: of its output (batch, height, width, channels) ``B`` is constant.
EXPECTED = {"cnn_gap": (1, 2), "cnn_flatten": (), "residual_gelu": (1, 2),
            "input_scaled": None, "two_paths": None, "custom_mixing": None}


def make_params(key, dtype=jnp.float64):
  ks = jax.random.split(key, 8)

  def normal(k, shape, scale):
    return scale * jax.random.normal(k, shape, dtype)

  return {
      "c1": {"w": normal(ks[0], (3, 3, 2, 3), 0.5), "b": normal(ks[1], (3,), 0.3)},
      "c2": {"w": normal(ks[2], (3, 3, 3, 3), 0.4), "b": normal(ks[3], (3,), 0.3)},
      "d": {"w": normal(ks[4], (3, 4), 0.6), "b": normal(ks[5], (4,), 0.3)},
      "s": 1.0 + normal(ks[6], (3,), 0.2),
  }


def _plan(f, params):
  prog = sd.trace_program(f, params, jax.ShapeDtypeStruct((1, 4, 3, 2), jnp.float64))
  return prog, sd.plan_structure(prog)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shared_cotangent_found_exactly_where_it_holds(name):
  params = make_params(jax.random.PRNGKey(0))
  prog, plan = _plan(MODELS[name], params)
  convs = [k for k, u in enumerate(plan.structured)
           if prog.nodes[u.node].eqn.primitive.name == "conv_general_dilated"]
  first, last = convs
  assert plan.shared[first] is None  # a ReLU of its output feeds the next conv
  found = plan.shared[last]
  if EXPECTED[name] is None:
    assert found is None, found
  else:
    assert found is not None and found.summed_axes == EXPECTED[name], found


def test_structure_report_names_shared_cotangents():
  report = interop.structure_report(cnn_gap, jnp.ones((2, 4, 3, 2)),
                                    make_params(jax.random.PRNGKey(0)))
  shared = report["shared_cotangent"]
  assert any("['c2']['w']" in s and "[1, 2]" in s for s in shared), shared
  assert not any("['c1']" in s for s in shared), shared


def _force_factored(monkeypatch):
  """Makes every use with a shared cotangent take the factored route; returns a list
  that records the routes taken."""
  taken = []
  choose = sd.choose_route

  def forced(term):
    route = "factored" if term.factored else choose(term)
    taken.append(route)
    return route

  monkeypatch.setattr(sd, "choose_route", forced)
  return taken


#: (vmap_axes, trace_axes, x2 given): the fast run covers vmapped and not, full and
#: traced, x2 given and not; the slow run all combinations.
FAST = [(0, (), True), (None, (-1,), False)]
SLOW = FAST + [(0, (-1,), False), (None, (), True)]


def _check(f_model, variables, f_ref, params, x1, x2, settings=FAST):
  fns = [interop.empirical_ntk_fn(f_model, trace, (), vmap, "structured_derivatives")
         for vmap, trace, _ in settings]

  @fast_jit
  def run(x1, x2, variables):
    return [fn(x1, x2 if given else None, variables)
            for fn, (*_, given) in zip(fns, settings)]

  full_12, full_11 = full_ntk(f_ref, params, x1, x2, x1)
  for got, (vmap, trace, given) in zip(run(x1, x2, variables), settings):
    expected = trace_diag(full_12 if given else full_11, 2, trace, ())
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max(),
                               err_msg=f"vmap_axes={vmap} trace={trace} x2={given}")


def _check_function(name, monkeypatch, settings):
  taken = _force_factored(monkeypatch)
  params = make_params(jax.random.PRNGKey(1))
  x1 = jax.random.normal(jax.random.PRNGKey(2), (3, 4, 3, 2), jnp.float64)
  x2 = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 3, 2), jnp.float64)
  _check(MODELS[name], params, MODELS[name], params, x1, x2, settings)
  assert "factored" in taken  # at least the output layer's


@pytest.mark.parametrize("name", ["residual_gelu", "cnn_flatten", "custom_mixing"])
def test_factored_route_matches_jacobian(name, monkeypatch):
  _check_function(name, monkeypatch, FAST)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cnn_gap", "cnn_flatten", "residual_gelu", "custom_mixing"])
def test_factored_route_matches_jacobian_all_settings(name, monkeypatch):
  _check_function(name, monkeypatch, SLOW)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["linen", "haiku"])
def test_factored_route_on_modules(name, monkeypatch):
  """Flax linen (last conv -> mean -> Dense) and Haiku (last conv -> flatten -> Linear)."""
  taken = _force_factored(monkeypatch)
  model, variables, f_ref, params = make_conv_case(name)
  x1 = jax.random.normal(jax.random.PRNGKey(10), (3, 7, 6, 2), jnp.float64)
  x2 = jax.random.normal(jax.random.PRNGKey(11), (2, 7, 6, 2), jnp.float64)
  _check(model, variables, f_ref, params, x1, x2, SLOW)
  assert "factored" in taken
