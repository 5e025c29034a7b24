"""Finite networks trained with optax vs infinite-width predictions (`interop.compare`).

Witnesses:
- the analytic NTK (`im.kernel_fn`) + `im.predict.gradient_descent_mse`: SGD-trained
  MLPs approach it as the width grows (RMSE ~ 1/sqrt(width));
- the empirical NTK (`interop.empirical_ntk_fn`): the linearized network trained with
  the same optimizer follows its gradient flow up to the Euler discretization error;
- the plain Flax model in NTK parameterization: `interop.ntk_layers` models have
  exactly its kernel, and their forward pass is the plain layer with scaled params.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import infinite_modules as im
import interop
from interop import compare as compare_lib
from interop import data, training
from interop.ntk_layers import CNN, MLP, NTKConv, NTKDense

W_STD, B_STD = 1.0, 0.05


def _mlp(width: int, parameterization: str = "ntk") -> nn.Module:
  return MLP(width, out=10, depth=2, W_std=W_STD, b_std=B_STD, parameterization=parameterization)


@pytest.fixture(scope="module")
def digits():
  return data.load_digits(32, 64, seed=1)


@pytest.fixture(scope="module")
def ntk(digits):
  """Analytic NTK of the NTK-parameterized MLP (any width: it does not depend on it)."""
  kernel_fn = im.kernel_fn(_mlp(8), digits.x_train, parameterization="standard")
  return (np.asarray(kernel_fn(digits.x_train, None, get="ntk")),
          np.asarray(kernel_fn(digits.x_test, digits.x_train, get="ntk")))


# ---------------------------------------------------------------------------- ntk_layers


def test_ntk_dense_is_scaled_dense():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 7))
  layer = NTKDense(5, W_std=1.3, b_std=0.2)
  v = layer.init(jax.random.PRNGKey(1), x)
  w, b = v["params"]["kernel"], v["params"]["bias"]
  np.testing.assert_allclose(layer.apply(v, x), x @ (1.3 / math.sqrt(7) * w) + 0.2 * b,
                             rtol=1e-5, atol=1e-6)
  assert "bias" not in NTKDense(5).init(jax.random.PRNGKey(1), x)["params"]
  with pytest.raises(ValueError, match="W_std"):
    NTKDense(5, W_std=-1.0).init(jax.random.PRNGKey(1), x)


@pytest.mark.parametrize("padding,strides", [("SAME", 1), ("VALID", 2), ("CIRCULAR", 1),
                                             ([(1, 0), (2, 1)], 1)])
def test_ntk_conv_is_scaled_conv(padding, strides):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 5, 3))
  layer = NTKConv(4, (3, 2), strides=strides, padding=padding, W_std=1.5, b_std=0.1)
  v = layer.init(jax.random.PRNGKey(1), x)
  scale = 1.5 / math.sqrt(3 * 2 * 3)
  plain = nn.Conv(4, (3, 2), strides=strides, padding=padding)
  pv = {"params": {"kernel": scale * v["params"]["kernel"], "bias": 0.1 * v["params"]["bias"]}}
  np.testing.assert_allclose(layer.apply(v, x), plain.apply(pv, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model,shape", [(MLP, (6,)), (CNN, (4, 4, 2))])
def test_ntk_layers_kernel_is_ntk_parameterization_kernel(model, shape):
  """im.kernel_fn(ntk_layers model, "standard") == im.kernel_fn(plain model, "ntk")."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x1, x2 = rng.standard_normal((5, *shape)), rng.standard_normal((3, *shape))
    kw = {"out": 2, "depth": 2 if model is MLP else 1, "b_std": 0.1, "W_std_out": 0.7}
    ntk_model = model(16, parameterization="ntk", **kw)
    plain = model(16, parameterization="standard", **kw)
    a = im.kernel_fn(ntk_model, x1, parameterization="standard")(x1, x2, get=("nngp", "ntk"))
    b = im.kernel_fn(plain, x1, parameterization="ntk")(x1, x2, get=("nngp", "ntk"))
    np.testing.assert_allclose(a.nngp, b.nngp, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a.ntk, b.ntk, rtol=1e-10, atol=1e-12)
    assert isinstance(plain.init(jax.random.PRNGKey(0), x1[:1]), dict)


# ---------------------------------------------------------------------------- finite -> infinite


def test_finite_network_approaches_infinite_width(digits, ntk):
  """SGD-trained MLPs match gradient_descent_mse with the analytic NTK better as width grows."""
  d = digits
  sweep = compare_lib.compare_widths(
      _mlp, [64, 256, 1024], d.x_train, d.y_train, d.x_test, d.y_test, learning_rate=4.0,
      steps=[0, 50, 200], n_members=2, key=jax.random.key(0, impl="rbg"), linearized=False,
      ntk_train_train=ntk[0], ntk_test_train=ntk[1])
  test_rmse = sweep.final("rmse_finite_infinite")
  train_rmse = sweep.final("rmse_finite_infinite_train")
  print("test RMSE", test_rmse, "train RMSE", train_rmse)
  assert np.all(np.diff(test_rmse) < 0) and np.all(np.diff(train_rmse) < 0)
  # Fluctuations shrink like 1/sqrt(width): a factor 4 of width roughly halves the RMSE.
  assert test_rmse[2] < 0.5 * test_rmse[0]
  assert test_rmse[2] < 0.07  # NT reports ~0.05 for a 512-wide MLP
  # The outputs move O(1) during training, so agreement is not trivial.
  c = sweep.comparisons[-1]
  assert np.std(c.infinite_test[-1] - c.infinite_test[0]) > 10 * test_rmse[2]
  assert c.metrics["loss_infinite"][-1] < 0.5 * c.metrics["loss_infinite"][0]


def test_linearized_network_follows_empirical_ntk(digits, ntk):
  """The linearized MLP trained with optax.sgd is gradient flow with its empirical NTK."""
  d = digits
  model = _mlp(256)
  variables = model.init(jax.random.key(0, impl="rbg"), d.x_train)
  lr, steps = 1.0, [0, 200, 800]
  lin = training.train(model, variables, d.x_train, d.y_train, optax.sgd(lr), steps,
                       x_test=d.x_test, linearize=True)
  ntk_fn = jax.jit(interop.empirical_ntk_fn(model, trace_axes=(), vmap_axes=0,
                                            implementation="jacobian_contraction"))
  k_tt = ntk_fn(d.x_train, None, variables)  # (n, n, 10, 10): outputs are coupled
  k_st = ntk_fn(d.x_test, d.x_train, variables)
  predict_fn = im.predict.gradient_descent_mse(k_tt, d.y_train, trace_axes=())
  times = lr * np.asarray(steps, np.float32)
  f_train, f_test = predict_fn(t=times, fx_train_0=lin.train_outputs[0],
                               fx_test_0=lin.test_outputs[0], k_test_train=k_st)
  err = compare_lib.rmse(lin.test_outputs, f_test)
  assert err < 5e-4, err
  assert compare_lib.rmse(lin.train_outputs, f_train) < 5e-4
  # The same prediction with the analytic NTK is far off at this width: the test is sharp.
  _, f_test_analytic = im.predict.gradient_descent_mse(ntk[0], d.y_train)(
      t=times, fx_train_0=lin.train_outputs[0], fx_test_0=lin.test_outputs[0],
      k_test_train=ntk[1])
  assert compare_lib.rmse(lin.test_outputs, f_test_analytic) > 20 * err


def test_standard_parameterization_of_plain_flax_model(digits, ntk):
  """A plain Flax MLP trained as written matches its "standard" kernel, not the "ntk" one."""
  d = digits
  model = _mlp(512, parameterization="standard")  # nn.Dense layers
  kernel_fn = im.kernel_fn(model, d.x_train, parameterization="standard")
  k_tt = np.asarray(kernel_fn(d.x_train, None, get="ntk"))
  k_st = np.asarray(kernel_fn(d.x_test, d.x_train, get="ntk"))
  lr = 0.4 * float(im.predict.max_learning_rate(k_tt, d.y_train.size))
  c = compare_lib.compare(model, d.x_train, d.y_train, d.x_test, d.y_test, learning_rate=lr,
                          steps=[0, 100, 200], key=jax.random.key(1, impl="rbg"),
                          linearized=False, ntk_train_train=k_tt, ntk_test_train=k_st)
  rmse_standard = c.metrics["rmse_finite_infinite"][-1]
  _, wrong = im.predict.gradient_descent_mse(ntk[0], d.y_train)(
      t=c.times, fx_train_0=c.finite.train_outputs[0, 0], fx_test_0=c.finite.test_outputs[0, 0],
      k_test_train=ntk[1])
  rmse_wrong = compare_lib.rmse(c.finite.test_outputs[-1, 0], wrong[-1])
  print("standard kernel", rmse_standard, "ntk kernel", rmse_wrong)
  assert rmse_standard < 0.1
  assert rmse_wrong > 3 * rmse_standard


# ---------------------------------------------------------------------------- API


@pytest.fixture(scope="module")
def small_comparison(digits, ntk):
  d = digits
  return compare_lib.compare(_mlp(16), d.x_train, d.y_train, d.x_test, d.y_test,
                             learning_rate=4.0, steps=[0, 5, 20, 60], n_members=2,
                             ntk_train_train=ntk[0], ntk_test_train=ntk[1])


def test_comparison_contents(small_comparison, digits):
  c = small_comparison
  n_train, n_test = digits.x_train.shape[0], digits.x_test.shape[0]
  np.testing.assert_allclose(c.times, [0, 20, 80, 240])
  assert c.finite.train_outputs.shape == (4, 2, n_train, 10)
  assert c.linearized.test_outputs.shape == (4, 2, n_test, 10)
  assert c.infinite_test.shape == (4, 2, n_test, 10)
  assert c.infinite_mean_test.shape == (4, n_test, 10)
  # Every trajectory starts at the networks' initial outputs (the mean one at 0).
  np.testing.assert_allclose(c.infinite_test[0], c.finite.test_outputs[0], atol=1e-5)
  np.testing.assert_allclose(c.linearized.test_outputs[0], c.finite.test_outputs[0], atol=1e-5)
  np.testing.assert_allclose(c.infinite_mean_test[0], 0.0)
  for name, values in c.metrics.items():
    assert values.shape == (4,), name
  assert c.metrics["rmse_finite_infinite"][0] < 1e-5
  np.testing.assert_allclose(
      c.metrics["loss_infinite"],
      [np.mean([training.mse_loss(f, digits.y_test) for f in fs]) for fs in c.infinite_test],
      rtol=1e-5)
  summary = c.summary()
  assert set(summary) == set(c.metrics) and isinstance(summary["accuracy_finite"], float)
  sweep = compare_lib.WidthSweep((32, 64), (c, c))
  table = sweep.table()
  assert "width" in table and "rmse(fin,inf)" in table and len(table.splitlines()) == 4


def test_compare_errors(digits, ntk):
  d = digits
  kw = {"ntk_train_train": ntk[0], "ntk_test_train": ntk[1], "learning_rate": 1.0}
  with pytest.raises(ValueError, match="start at 0"):
    compare_lib.compare(_mlp(8), d.x_train, d.y_train, d.x_test, d.y_test, steps=[5, 10], **kw)
  with pytest.raises(ValueError, match=r"\(n, out\)"):
    compare_lib.compare(_mlp(8), d.x_train, d.y_train[:, 0], d.x_test, d.y_test, steps=10, **kw)
  with pytest.raises(ValueError, match="learning_rate"):
    compare_lib.compare(_mlp(8), d.x_train, d.y_train, d.x_test, d.y_test, steps=10,
                        **{**kw, "learning_rate": -1.0})


def test_kernel_matrix_blocks(ntk, digits):
  kernel_fn = lambda x1, x2, get: jnp.asarray(x1) @ jnp.asarray(x2).T
  x = digits.x_train
  np.testing.assert_allclose(compare_lib.kernel_matrix(kernel_fn, x, None, "ntk", 7),
                             x @ x.T, rtol=1e-6)


def test_plots(small_comparison, tmp_path):
  matplotlib = pytest.importorskip("matplotlib")
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from interop import plotting

  c = small_comparison
  fig = plotting.plot_comparison(c, title="test")
  fig.savefig(tmp_path / "comparison.png")
  ax = plotting.plot_loss_curves({"finite": c.finite, "linearized": c.linearized},
                                 learning_rate=c.learning_rate)
  assert ax.get_yscale() == "log"
  ax = plotting.plot_agreement_over_width(compare_lib.WidthSweep((32, 128), (c, c)))
  assert len(ax.get_lines()) == 4  # three RMSEs and the 1/sqrt(width) guide
  plotting.plot_agreement_over_time(c)
  ax = plotting.plot_accuracy_over_width(compare_lib.WidthSweep((32, 128), (c, c)),
                                         infinite_time_accuracy=0.9)
  assert [t.get_text() for t in ax.get_xticklabels()] == ["32", "128"]
  plt.close("all")
  assert (tmp_path / "comparison.png").stat().st_size > 1000


# ---------------------------------------------------------------------------- long sweeps


@pytest.mark.slow
def test_width_sweep_rate_with_linearized_networks():
  """Widths 64..1024: finite, linearized and infinite converge at rate ~ width^-1/2."""
  d = data.load_digits(48, 128, seed=2)
  sweep = compare_lib.compare_widths(
      _mlp, [64, 128, 256, 512, 1024], d.x_train, d.y_train, d.x_test, d.y_test,
      learning_rate=4.0, steps=[0, 100, 400], n_members=2, share_kernel=True,
      key=jax.random.key(0, impl="rbg"))
  print(sweep.table())
  widths = np.asarray(sweep.widths, float)
  for metric in ("rmse_finite_infinite", "rmse_linearized_infinite", "rmse_finite_linearized"):
    values = sweep.final(metric)
    assert np.all(np.diff(values) < 0), metric
    slope = np.polyfit(np.log(widths), np.log(values), 1)[0]
    assert -0.8 < slope < -0.3, (metric, slope)  # -1/2 asymptotically


@pytest.mark.slow
def test_cnn_approaches_infinite_width():
  d = data.load_digits(48, 64, image=True, seed=3)
  make = lambda w: CNN(w, out=10, depth=1, W_std=2 ** 0.5, b_std=0.05, W_std_out=0.5)
  sweep = compare_lib.compare_widths(
      make, [8, 32, 128], d.x_train, d.y_train, d.x_test, d.y_test, learning_rate=2.0,
      steps=[0, 50, 150], n_members=2, share_kernel=True, linearized=False,
      key=jax.random.key(0, impl="rbg"))
  print(sweep.table())
  assert np.all(np.diff(sweep.final("rmse_finite_infinite")) < 0)
