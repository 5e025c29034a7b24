"""Tests of `interop.training`: optax training of linen / nnx / haiku models and ensembles.

Witnesses: the closed-form gradient flow of a linear model (whose NTK is exactly
X X^T) from `im.predict.gradient_descent_mse`, hand-written optax loops, and
training the members of an ensemble one at a time.
"""

from __future__ import annotations

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import interop
from infinite_modules import predict
from interop import training
from interop.ntk_layers import MLP


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
  with jax.enable_x64(request.param == "float64"):
    yield np.dtype(request.param)


def _data(n=24, d=5, k=3, n_test=10, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n + n_test, d)).astype(dtype)
  y = np.tanh(x[:, :k] + 0.3 * x[:, 1:k + 1] ** 2).astype(dtype)
  return x[:n], y[:n], x[n:], y[n:]


def _mlp(width=32, out=3):
  return MLP(width, out=out, depth=1, W_std=1.0, b_std=0.1)


@pytest.fixture(scope="module")
def mlp():
  """A small MLP, its variables and data (initialized once: init compiles are slow)."""
  x, y, x_test, y_test = _data(n=32)
  model = _mlp()
  return model, model.init(jax.random.PRNGKey(0), x), (x, y, x_test, y_test)


# ---------------------------------------------------------------------------- losses, metrics


def test_mse_loss_is_nt_normalization():
  fx = jnp.arange(12.0).reshape(4, 3)
  y = jnp.ones((4, 3))
  np.testing.assert_allclose(training.mse_loss(fx, y), 0.5 * np.sum((fx - y) ** 2) / 12)


def test_cross_entropy_and_accuracy():
  fx = jnp.array([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
  y = jax.nn.one_hot(jnp.array([0, 1, 1]), 2)
  expected = -np.mean(np.sum(np.asarray(y) * np.asarray(jax.nn.log_softmax(fx)), -1))
  np.testing.assert_allclose(training.cross_entropy_loss(fx, y), expected, rtol=1e-6)
  assert training.accuracy(fx, y) == pytest.approx(2 / 3)
  assert training.accuracy(fx, np.array([0, 1, 1])) == pytest.approx(2 / 3)
  stacked = np.stack([fx, -fx])  # leading axes are kept
  np.testing.assert_allclose(training.accuracy(stacked, y), [2 / 3, 1 / 3])
  assert training.accuracy(np.array([[0.5], [-1.0]]), np.array([[1.0], [1.0]])) == 0.5


def test_get_loss():
  assert training.get_loss("mse") is training.mse_loss
  custom = lambda fx, y: jnp.sum(fx)
  assert training.get_loss(custom) is custom
  with pytest.raises(ValueError, match="Unknown loss"):
    training.get_loss("hinge")


def test_record_steps():
  np.testing.assert_array_equal(training.record_steps(4), [0, 1, 2, 3, 4])
  s = training.record_steps(1000)
  assert s[0] == 0 and s[-1] == 1000 and len(s) == 101


# ---------------------------------------------------------------------------- the time convention


@pytest.mark.parametrize("k", [1, 3])
def test_sgd_on_linear_model_is_gradient_flow(dtype, k):
  """optax.sgd(lr) for n steps on mse_loss == gradient_descent_mse at t = lr * n.

  For f(W, x) = x @ W the NTK is exactly X X^T (times I_k), so the only
  difference is the Euler discretization, O(lr * lambda_max / y.size).
  """
  x, y, x_test, _ = _data(k=k, dtype=dtype)
  f = lambda w, x_: x_ @ w
  w0 = jnp.asarray(np.random.default_rng(1).standard_normal((x.shape[1], k)), dtype)
  lr, steps = 0.05, [0, 200, 1000]
  result = training.train(f, w0, x, y, optax.sgd(lr), steps, x_test=x_test)
  ntk = x @ x.T
  predict_fn = predict.gradient_descent_mse(ntk, y)
  f_train, f_test = predict_fn(t=lr * np.asarray(steps, dtype), fx_train_0=f(w0, x),
                               fx_test_0=f(w0, x_test), k_test_train=x_test @ x.T)
  lam_max = np.linalg.eigvalsh(ntk).max()
  assert lr * lam_max / y.size < 0.1  # small Euler steps
  np.testing.assert_allclose(result.train_outputs, f_train, atol=5e-3)
  np.testing.assert_allclose(result.test_outputs, f_test, atol=5e-3)
  assert result.train_outputs.dtype == dtype
  if dtype == np.float64:
    # The remaining error is Euler's, O(lr): half the rate, twice the steps, half the error.
    result_half = training.train(f, w0, x, y, optax.sgd(lr / 2), [0, 400, 2000])
    err = np.abs(result.train_outputs[1] - f_train[1]).max()
    err_half = np.abs(result_half.train_outputs[1] - f_train[1]).max()
    assert 0.4 * err < err_half < 0.6 * err


def test_train_matches_hand_written_optax_loop(mlp):
  model, variables, (x, y, x_test, y_test) = mlp
  opt = optax.adam(1e-2)
  result = training.train(model, variables, x, y, opt, [0, 5, 20], x_test=x_test, y_test=y_test)

  @jax.jit
  def step(params, state):
    loss = lambda p: training.mse_loss(model.apply({"params": p}, x), y)
    updates, state = opt.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  params, state = variables["params"], opt.init(variables["params"])
  for i in range(20):
    if i == 5:
      np.testing.assert_allclose(result.train_outputs[1], model.apply({"params": params}, x),
                                 rtol=1e-5, atol=1e-6)
    params, state = step(params, state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               result.params["params"], params)
  np.testing.assert_allclose(result.test_loss[-1],
                             training.mse_loss(model.apply({"params": params}, x_test), y_test),
                             rtol=1e-5)
  assert result.steps.tolist() == [0, 5, 20]
  assert result.train_outputs.shape == (3, *y.shape)
  assert result.train_loss.shape == (3,)


# ---------------------------------------------------------------------------- model kinds


def test_linen_haiku_nnx_and_functions_train(mlp):
  linen, v, (x, y, _, _) = mlp
  opt, steps = optax.sgd(0.2), [0, 50]
  r_linen = training.train(linen, v, x, y, opt, steps)

  r_fn = training.train(lambda p, x_: linen.apply({"params": p}, x_), v["params"], x, y, opt,
                        steps)
  np.testing.assert_allclose(r_fn.train_outputs, r_linen.train_outputs, rtol=1e-5, atol=1e-6)

  hk_model = hk.transform(lambda x_: hk.nets.MLP([32, 3])(x_))
  r_hk = training.train(hk_model, hk_model.init(jax.random.PRNGKey(0), x), x, y, opt, steps)

  def with_state(x_):
    counter = hk.get_state("counter", [], init=jnp.zeros)
    hk.set_state("counter", counter + 1)
    return hk.nets.MLP([32, 3])(x_)
  hk_state_model = hk.transform_with_state(with_state)
  ps = hk_state_model.init(jax.random.PRNGKey(0), x)
  r_hks = training.train(hk_state_model, ps, x, y, opt, steps)
  assert isinstance(r_hks.params, tuple) and len(r_hks.params) == 2

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l1, self.l2 = nnx.Linear(5, 32, rngs=rngs), nnx.Linear(32, 3, rngs=rngs)

    def __call__(self, x_):
      return self.l2(nnx.relu(self.l1(x_)))

  net = Net(nnx.Rngs(0))
  r_nnx = training.train(net, None, x, y, opt, steps)
  assert r_nnx.train_loss[-1] < 0.5 * r_nnx.train_loss[0]
  nnx.update(net, r_nnx.params)
  np.testing.assert_allclose(net(x), r_nnx.train_outputs[-1], rtol=1e-5, atol=1e-6)

  for r in (r_linen, r_hk, r_hks, r_nnx):
    assert r.train_loss[-1] < 0.5 * r.train_loss[0]


def test_non_params_collections_are_frozen():
  class WithStats(nn.Module):
    @nn.compact
    def __call__(self, x):
      scale = self.variable("constants", "scale", lambda: jnp.full((x.shape[-1],), 2.0))
      return nn.Dense(2)(x * scale.value)

  x, y, _, _ = _data(k=2)
  model = WithStats()
  v = model.init(jax.random.PRNGKey(0), x)
  r = training.train(model, v, x, y, optax.sgd(0.1), [0, 10])
  np.testing.assert_array_equal(r.params["constants"]["scale"], v["constants"]["scale"])
  assert not np.allclose(r.params["params"]["Dense_0"]["kernel"], v["params"]["Dense_0"]["kernel"])


# ---------------------------------------------------------------------------- ensembles


def test_ensemble_equals_members_trained_one_by_one(mlp):
  model, _, (x, y, x_test, y_test) = mlp
  stacked = training.init_ensemble(model, jax.random.PRNGKey(3), 2, x)
  ens = training.train_ensemble(model, stacked, x, y, optax.sgd(0.5), [0, 10, 30],
                                x_test=x_test, y_test=y_test)
  assert ens.train_outputs.shape == (3, 2, *y.shape)
  assert ens.test_loss.shape == (3, 2)
  for e in range(2):
    member = jax.tree.map(lambda a, e=e: a[e], stacked)
    single = training.train(model, member, x, y, optax.sgd(0.5), [0, 10, 30], x_test=x_test,
                            y_test=y_test)
    np.testing.assert_allclose(ens.train_outputs[:, e], single.train_outputs, rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(ens.test_loss[:, e], single.test_loss, rtol=1e-4)
  # Members are independent draws.
  assert not np.allclose(ens.train_outputs[0, 0], ens.train_outputs[0, 1])


def test_init_ensemble_nnx_needs_init_fn():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x_):
      return self.l1(x_)

  net = Net(nnx.Rngs(0))
  with pytest.raises(ValueError, match="init_fn"):
    training.init_ensemble(net, jax.random.PRNGKey(0), 2, jnp.ones((1, 5)))
  stacked = training.init_ensemble(
      net, jax.random.PRNGKey(0), 2, init_fn=lambda k: nnx.state(Net(nnx.Rngs(k)), nnx.Param))
  x, y, _, _ = _data()
  r = training.train_ensemble(net, stacked, x, y, optax.sgd(0.1), [0, 20])
  assert r.train_loss.shape == (2, 2) and np.all(r.train_loss[1] < r.train_loss[0])


# ---------------------------------------------------------------------------- minibatches


def test_minibatches(mlp):
  model, v, (x, y, _, _) = mlp
  key = jax.random.PRNGKey(7)
  # One batch per epoch holding every example is full-batch gradient descent.
  full = training.train(model, v, x, y, optax.sgd(0.3), [0, 15])
  one_batch = training.train(model, v, x, y, optax.sgd(0.3), [0, 15], batch_size=32, key=key)
  np.testing.assert_allclose(one_batch.train_outputs, full.train_outputs, rtol=1e-4, atol=1e-5)
  mini = training.train(model, v, x, y, optax.sgd(0.3), [0, 40], batch_size=8, key=key)
  assert mini.train_loss[-1] < 0.5 * mini.train_loss[0]
  assert not np.allclose(mini.train_outputs[-1], full.train_outputs[-1])
  # Ensemble members draw their own shuffles: identical inits diverge.
  same = jax.tree.map(lambda a: jnp.stack([a, a]), v)
  ens = training.train_ensemble(model, same, x, y, optax.sgd(0.3), [0, 5], batch_size=8,
                                key=key)
  assert not np.allclose(ens.train_outputs[-1, 0], ens.train_outputs[-1, 1])


# ---------------------------------------------------------------------------- linearized training


def test_linearize_flag_is_interop_linearize(mlp):
  model, v, (x, y, x_test, _) = mlp
  lin_flag = training.train(model, v, x, y, optax.sgd(0.5), [0, 20], x_test=x_test,
                            linearize=True)
  f_lin = interop.linearize(model.apply, v)
  lin_fn = training.train(f_lin, v, x, y, optax.sgd(0.5), [0, 20], x_test=x_test)
  np.testing.assert_allclose(lin_flag.test_outputs, lin_fn.test_outputs, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(lin_flag.train_outputs[0], model.apply(v, x), rtol=1e-5, atol=1e-6)
  nonlinear = training.train(model, v, x, y, optax.sgd(0.5), [0, 20], x_test=x_test)
  assert not np.allclose(nonlinear.test_outputs[-1], lin_flag.test_outputs[-1], atol=1e-4)


# ---------------------------------------------------------------------------- errors


def test_clear_errors(mlp):
  model, v, (x, y, _, _) = mlp
  sgd = optax.sgd(0.1)
  with pytest.raises(ValueError, match="strictly increasing"):
    training.train(model, v, x, y, sgd, [0, 10, 5])
  with pytest.raises(ValueError, match="batch_size"):
    training.train(model, v, x, y, sgd, 10, batch_size=1000, key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="key"):
    training.train(model, v, x, y, sgd, 10, batch_size=4)
  with pytest.raises(ValueError, match="different numbers of examples"):
    training.train(model, v, x, y[:-1], sgd, 10)
  with pytest.raises(TypeError, match="optax"):
    training.train(model, v, x, y, 0.1, 10)
  with pytest.raises(ValueError, match="init_ensemble"):
    training.train_ensemble(model, None, x, y, sgd, 10)
  with pytest.raises(ValueError, match="n_members"):
    training.init_ensemble(model, jax.random.PRNGKey(0), 0, x)
