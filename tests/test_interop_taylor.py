"""``linearize`` / ``taylor_expand``: exactness, signatures, and use as an optax apply."""

from __future__ import annotations

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from interop_helpers import (
  f64,
  fast_jit,
  perturb,
  x64_fast_compile,  # noqa: F401  (autouse fixture)
)

import interop


def _mlp(p, x):
  return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def _mlp_params(key):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"w1": jax.random.normal(k1, (3, 5), jnp.float64),
          "b1": jax.random.normal(k2, (5,), jnp.float64),
          "w2": jax.random.normal(k3, (5, 2), jnp.float64)}


X = np.random.default_rng(9).standard_normal((4, 3))  # float64


def test_linearize_at_params_0_and_first_order():
  p0 = _mlp_params(jax.random.PRNGKey(0))
  f_lin = fast_jit(interop.linearize(_mlp, p0))
  np.testing.assert_allclose(f_lin(p0, X), _mlp(p0, X), rtol=1e-12, atol=1e-15)
  dp = perturb(jax.tree_util.tree_map(jnp.zeros_like, p0), jax.random.PRNGKey(1), 1.0)
  for t in (1e-3, 0.5, 3.0):  # f_lin is exactly affine in the parameters
    p = jax.tree_util.tree_map(lambda a, d, t=t: a + t * d, p0, dp)
    _, tangent = jax.jvp(lambda q: _mlp(q, X), (p0,), (dp,))
    np.testing.assert_allclose(f_lin(p, X), _mlp(p0, X) + t * tangent, rtol=1e-12)
  # and it is the first-order expansion: error O(t^2)
  small = jax.tree_util.tree_map(lambda a, d: a + 1e-4 * d, p0, dp)
  assert np.abs(f_lin(small, X) - _mlp(small, X)).max() < 1e-6


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_taylor_of_polynomial_is_exact(degree):
  def poly(p, x):  # degree 3 in the parameters
    return (x @ p["a"]) ** 2 * p["c"] + (x @ p["a"]) * p["b"] ** 2 + p["c"]

  key = jax.random.PRNGKey(0)
  p0 = {"a": jax.random.normal(key, (3, 2), jnp.float64), "b": jnp.array(0.3),
        "c": jnp.array([1.0, -2.0])}
  p = perturb(p0, jax.random.PRNGKey(1), 0.7)
  f_tay = fast_jit(interop.taylor_expand(poly, p0, degree))
  if degree == 3:
    np.testing.assert_allclose(f_tay(p, X), poly(p, X), rtol=1e-12)
  # Independent check: the Taylor polynomial of t -> poly(p0 + t dp) at t = 1.
  dp = jax.tree_util.tree_map(jnp.subtract, p, p0)

  def along(t):
    return poly(jax.tree_util.tree_map(lambda a, d: a + t * d, p0, dp), X)

  coeffs, g = [], along
  for k in range(degree + 1):
    coeffs.append(g(0.0) / np.prod(np.arange(1, k + 1)))
    g = jax.jacfwd(g)
  np.testing.assert_allclose(f_tay(p, X), sum(coeffs), rtol=1e-10)


class _BNNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(4)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(2)(nn.relu(x))


def test_flax_apply_signature_collections_and_rngs():
  model = _BNNet()
  variables = f64(jax.jit(model.init)(jax.random.PRNGKey(0), X))
  f_lin = interop.linearize(model.apply, variables)
  f_mod = interop.linearize(model, variables)  # the module object works too
  rngs = {"dropout": jax.random.PRNGKey(3)}
  p1 = {**variables, "params": perturb(variables["params"], jax.random.PRNGKey(4), 0.1)}
  changed = {**variables, "batch_stats": jax.tree_util.tree_map(
      lambda a: a + 0.5, variables["batch_stats"])}

  @fast_jit
  def run(variables, p1, changed, rngs):
    train = {"train": True, "mutable": ["batch_stats"], "rngs": rngs}
    dp = jax.tree_util.tree_map(jnp.subtract, p1["params"], variables["params"])
    _, tangent = jax.jvp(lambda q: model.apply({**variables, "params": q}, X),
                         (variables["params"],), (dp,))
    return {
        "at_p0": (f_lin(variables, X), model.apply(variables, X)),
        # batch_stats pass through from the call, not from params_0
        "stats": (f_lin(changed, X), model.apply(changed, X)),
        # training mode: mutable collections and dropout rngs keep working
        "train": (f_lin(variables, X, **train), model.apply(variables, X, **train)),
        # only params are linearized: the output moves by the JVP
        "moved": (f_lin(p1, X), model.apply(variables, X) + tangent),
        "module": (f_mod(p1, X), f_lin(p1, X)),
    }

  for name, (got, expected) in run(variables, p1, changed, rngs).items():
    jax.tree_util.tree_map(
        lambda a, b, name=name: np.testing.assert_allclose(a, b, rtol=1e-12, err_msg=name),
        got, expected)


def test_haiku_rng_and_state():
  def net(x, is_training=False):
    h = hk.Linear(4)(x)
    h = hk.BatchNorm(True, True, 0.9)(h, is_training=is_training)
    return hk.Linear(2)(hk.dropout(hk.next_rng_key(), 0.3, jnp.tanh(h)))

  t = hk.transform_with_state(net)
  params, state = jax.jit(lambda k: t.init(k, X, is_training=True))(jax.random.PRNGKey(0))
  params = f64(params)
  rng = jax.random.PRNGKey(1)
  f_lin = interop.linearize(t, params)
  p1 = perturb(params, jax.random.PRNGKey(2), 0.1)
  t2 = hk.transform(lambda x: hk.Linear(2)(jnp.sin(hk.Linear(3)(x))))
  p2 = f64(jax.jit(t2.init)(jax.random.PRNGKey(0), X))
  f_tay = interop.taylor_expand(t2.apply, p2, 2)

  @fast_jit
  def run(params, p1, state, rng, p2):
    dp = jax.tree_util.tree_map(jnp.subtract, p1, params)
    ref_out, ref_state = t.apply(params, state, rng, X)
    _, tangent = jax.jvp(lambda q: t.apply(q, state, rng, X)[0], (params,), (dp,))
    return (f_lin(params, state, rng, X), (ref_out, ref_state),
            f_lin(p1, state, rng, X)[0], ref_out + tangent,
            f_tay(p2, None, X), t2.apply(p2, None, X))

  (out, new_state), (ref_out, ref_state), moved, expected, tay, tay_ref = run(
      params, p1, state, rng, p2)
  np.testing.assert_allclose(out, ref_out, rtol=1e-13)
  assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(ref_state)
  np.testing.assert_allclose(moved, expected, rtol=1e-12)
  np.testing.assert_allclose(tay, tay_ref, rtol=1e-13)


def test_nnx_linearize():
  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), jnp.tanh,
                         nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
  state = f64(nnx.state(model))
  f_lin = interop.linearize(model, state)
  f = interop.adapt(model).call
  s1 = perturb(state, jax.random.PRNGKey(2), 0.01)
  at_p0, ref, moved, ref_moved = fast_jit(
      lambda s, s1: (f_lin(s, X), f(s, X), f_lin(s1, X), f(s1, X)))(state, s1)
  np.testing.assert_allclose(at_p0, ref, rtol=1e-13)
  err_lin = np.abs(moved - ref_moved).max()
  assert 0 < err_lin < 1e-3


def test_linearized_training_with_optax():
  """f_lin drops into an optax loop; training the linear model matches its closed form
  (gradient flow on MSE of a linear model converges to the min-norm-change solution)."""
  p0 = _mlp_params(jax.random.PRNGKey(0))
  f_lin = interop.linearize(_mlp, p0)
  y = jax.random.normal(jax.random.PRNGKey(5), (4, 2), jnp.float64)
  opt = optax.sgd(0.05)

  @fast_jit
  def step(p, s):
    loss, g = jax.value_and_grad(lambda q: 0.5 * jnp.sum((f_lin(q, X) - y) ** 2))(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  p, s = p0, opt.init(p0)
  for _ in range(3000):
    p, s, loss = step(p, s)
  assert loss < 1e-10
  # prediction of the trained linear model = kernel regression with the empirical NTK
  x_test = jax.random.normal(jax.random.PRNGKey(6), (3, 3), jnp.float64)
  ntk = interop.empirical_ntk_fn(_mlp, trace_axes=(), implementation=1)
  k_tt = ntk(X, None, p0).transpose(0, 2, 1, 3).reshape(8, 8)
  k_st = ntk(x_test, X, p0).transpose(0, 2, 1, 3).reshape(6, 8)
  resid = (y - _mlp(p0, X)).reshape(-1)
  expected = _mlp(p0, x_test).reshape(-1) + k_st @ np.linalg.solve(k_tt, resid)
  np.testing.assert_allclose(f_lin(p, x_test).reshape(-1), expected, rtol=1e-4)


def test_bad_degree_and_structure():
  p0 = _mlp_params(jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="degree"):
    interop.taylor_expand(_mlp, p0, -1)
  with pytest.raises(ValueError, match="degree"):
    interop.taylor_expand(_mlp, p0, 1.5)
  with pytest.raises(ValueError, match="structure"):
    interop.linearize(_mlp, p0)({"w1": p0["w1"]}, X)
