"""Monte Carlo witness: kernels of the *real* Flax/Haiku models averaged over random inits.

For each model, `model.init` is mapped over many PRNG keys (200-400) at a large traced width
(128-256); the mean of the empirical NNGP f(x) f(x')^T / n_out (many output units) over
x = concat(x1, x2) must match `kernel_fn(...)(x1, x2)` (cross block and both variances), and
the mean of the empirical NTK (Jacobians of the real model in its own parameters) must match
`kernel_fn(..., parameterization="standard")` at the traced widths. Errors are measured on
the correlation scale |MC - K| / sqrt(MC(x, x) MC(x', x')) against a bound (5%) that
`assert_mc_close` first checks the Monte Carlo noise is at most a third of; the
`*_bound_rejects_*` tests demonstrate that a kernel whose W_std^2 is off by 10% in a
single layer fails the same bound.

Float32 throughout (the default); the reference tests cover float64.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.nn import initializers as jinit
from reference_models import (
    assert_mc_close,
    haiku_init_apply,
    is_symmetric_psd,
    linen_init_apply,
    mc_nngp,
    mc_ntk,
)

import infinite_modules as im

BOUND = 0.05


class Net(nn.Module):
  """Wraps a function that creates and applies submodules inline (inside `nn.compact`)."""
  body: Callable

  @nn.compact
  def __call__(self, x):
    return self.body(x)


def _inputs(shape, n1=4, n2=3, seed=0):
  rng = np.random.default_rng(seed)
  x1 = rng.normal(size=(n1, *shape)).astype(np.float32)
  x2 = rng.normal(size=(n2, *shape)).astype(np.float32)
  # Make some pairs strongly correlated (the interesting regime of the kernel).
  x2[0] = 0.8 * x1[0] + 0.6 * x2[0]
  return x1, x2


def check_nngp(model, shape, *, samples, bound=BOUND, apply_kwargs=None, init_kwargs=None,
               seed=1):
  """MC NNGP of `model` on concat(x1, x2) vs kernel_fn(model)(x1, x2) and its variances."""
  x1, x2 = _inputs(shape)
  kf = im.kernel_fn(model, x1[:1], apply_kwargs=apply_kwargs)
  k = kf(x1, x2)
  init, apply = linen_init_apply(model, x1[:1], apply_kwargs, init_kwargs)
  est = mc_nngp(init, apply, np.concatenate([x1, x2]), samples=samples, seed=seed)
  assert_mc_close(est, len(x1), k.nngp, k.cov1, k.cov2, bound=bound, what="nngp")
  return kf, k, est


def check_ntk_standard(model, shape, *, samples, bound=BOUND, seed=2):
  """MC of the empirical NTK of `model` vs kernel_fn(parameterization='standard')."""
  x1, x2 = _inputs(shape, 3, 2)
  kf = im.kernel_fn(model, x1[:1], parameterization="standard")
  k = kf(x1, x2)
  init, apply = linen_init_apply(model, x1[:1])
  est = mc_ntk(init, apply, np.concatenate([x1, x2]), samples=samples, seed=seed)
  assert_mc_close(est, len(x1), k.ntk, bound=bound, what="ntk")
  return kf, k, est


def dense(width, w_var=1.0, b_std=None, **kw):
  return nn.Dense(width, kernel_init=jinit.variance_scaling(w_var, "fan_in", "normal"),
                  use_bias=b_std is not None,
                  bias_init=jinit.normal(b_std) if b_std else jinit.zeros, **kw)


def mlp(act, width=256, n_out=256, depth=2, w_var=2.0, b_std=0.2, out_var=1.0):
  acts = act if isinstance(act, tuple) else (act,) * depth
  w_vars = w_var if isinstance(w_var, tuple) else (w_var,) * len(acts)

  def body(x):
    for a, v in zip(acts, w_vars):
      x = a(dense(width, v, b_std)(x))
    return dense(n_out, out_var, b_std)(x)

  return Net(body)


# ------------------------------------------------------------------------ dense MLPs

_gelu = functools.partial(nn.gelu, approximate=False)
_leaky = functools.partial(nn.leaky_relu, negative_slope=0.2)

ACTIVATIONS = {
    # Each family at least once in the default run: relu-pair (relu, leaky_relu, abs), erf,
    # gelu, sin, and quadrature (tanh, silu).
    "relu_gelu_tanh_leaky": ((nn.relu, _gelu, jnp.tanh, _leaky), ()),
    "erf_sin_silu_abs": ((jax.lax.erf, jnp.sin, nn.silu, jnp.abs), ()),
    "relu": (nn.relu, (pytest.mark.slow,)),
    "erf": (jax.lax.erf, (pytest.mark.slow,)),
    "gelu_exact": (_gelu, (pytest.mark.slow,)),
    "sin": (jnp.sin, (pytest.mark.slow,)),
    "tanh": (jnp.tanh, (pytest.mark.slow,)),
    "silu": (nn.silu, (pytest.mark.slow,)),
    "leaky_relu": (_leaky, (pytest.mark.slow,)),
    "abs": (jnp.abs, (pytest.mark.slow,)),
}


@pytest.mark.parametrize("name", [pytest.param(k, marks=v[1]) for k, v in ACTIVATIONS.items()])
def test_mlp_nngp(name):
  act = ACTIVATIONS[name][0]
  w_var = 1.0 if "sin" in name else 2.0  # keep sin in its non-degenerate regime
  check_nngp(mlp(act, w_var=w_var), (6,), samples=400)


def test_mlp_relu_nngp_and_bound_rejects_wrong_weight_variance():
  """The MC bound has power: the same MLP's kernel with one layer's W_std^2 10% off fails."""
  _, _, est = check_nngp(mlp(nn.relu, depth=3), (6,), samples=400)
  x1, x2 = _inputs((6,))
  wrong_models = [mlp(nn.relu, depth=3, out_var=1.1), mlp(nn.relu, depth=3, out_var=1 / 1.1),
                  mlp(nn.relu, depth=3, w_var=(2.2, 2.0, 2.0))]
  for wrong in wrong_models:
    kw = im.kernel_fn(wrong, x1[:1])(x1, x2)
    with pytest.raises(AssertionError, match="differs from the analytic kernel"):
      assert_mc_close(est, len(x1), kw.nngp, kw.cov1, kw.cov2)
    # even without the diagonal
    with pytest.raises(AssertionError, match="differs from the analytic kernel"):
      assert_mc_close(est, len(x1), kw.nngp)


def test_haiku_mlp_default_init():
  """hk.nets.MLP with its default init (TruncatedNormal(1/sqrt(fan_in)), zero bias)."""
  x1, x2 = _inputs((6,))
  x = np.concatenate([x1, x2])
  f = hk.transform(lambda x: hk.nets.MLP([256, 256, 256])(x))
  k = im.kernel_fn(f, x1[:1])(x1, x2)
  init, apply = haiku_init_apply(f, x1[:1])
  est = mc_nngp(init, apply, x, samples=400, seed=3)
  assert_mc_close(est, len(x1), k.nngp, k.cov1, k.cov2)
  # The truncation matters: a plain N(0, 1/fan_in) prior gives a kernel the bound rejects.
  f_normal = hk.transform(lambda x: hk.nets.MLP(
      [256, 256, 256], w_init=hk.initializers.VarianceScaling(1.0, "fan_in", "normal"))(x))
  k_normal = im.kernel_fn(f_normal, x1[:1])(x1, x2)
  with pytest.raises(AssertionError, match="differs from the analytic kernel"):
    assert_mc_close(est, len(x1), k_normal.nngp, k_normal.cov1, k_normal.cov2)


# ------------------------------------------------------------------------ NTK, standard

def test_mlp_ntk_standard_and_bound_rejects_wrong_ntk():
  """Standard-parameterization NTK; the NTK bound has power too: W_std^2 10% off fails."""
  model = mlp(nn.relu, n_out=4, b_std=0.3)
  _, _, est = check_ntk_standard(model, (5,), samples=200)
  x1, x2 = _inputs((5,), 3, 2)
  for wrong in (mlp(nn.relu, n_out=4, b_std=0.3, w_var=2.2),
                mlp(nn.relu, n_out=4, b_std=0.3, w_var=2 / 1.1)):
    k = im.kernel_fn(wrong, x1[:1], parameterization="standard")(x1, x2)
    with pytest.raises(AssertionError, match="differs from the analytic kernel"):
      assert_mc_close(est, len(x1), k.ntk)


@pytest.mark.slow
@pytest.mark.parametrize("act", ["erf", "tanh"])
def test_mlp_ntk_standard_smooth(act):
  fn = {"erf": jax.lax.erf, "tanh": jnp.tanh}[act]
  check_ntk_standard(mlp(fn, n_out=4, b_std=0.3), (5,), samples=200)


def conv_flatten_net(width=64, n_out=4):
  def body(x):
    x = nn.relu(nn.Conv(width, (3, 3), padding="SAME",
                        kernel_init=jinit.variance_scaling(2.0, "fan_in", "normal"),
                        bias_init=jinit.normal(0.1))(x))
    x = x.reshape(x.shape[0], -1)
    return dense(n_out, 1.0, 0.1)(x)
  return Net(body)


def test_conv_ntk_standard():
  check_ntk_standard(conv_flatten_net(), (4, 4, 2), samples=200)


# ------------------------------------------------------------------------ convolutions

def _conv(width, kernel, **kw):
  kw.setdefault("kernel_init", jinit.variance_scaling(2.0, "fan_in", "normal"))
  kw.setdefault("bias_init", jinit.normal(0.1))
  return nn.Conv(width, kernel, **kw)


def _flatten_readout(x, n_out=64):
  return dense(n_out, 1.0, 0.1)(x.reshape(x.shape[0], -1))


CONVS = {
    # name: (input shape, conv kwargs); run twice (conv -> relu -> conv -> relu -> flatten)
    "1d_valid_stride2": ((11, 2), {"kernel": (3,), "strides": (2,), "padding": "VALID"}),
    "2d_explicit_dilated": ((4, 3, 2), {"kernel": (2, 3), "padding": ((1, 2), (0, 1)),
                                        "kernel_dilation": (2, 1)}),
    "2d_circular": ((5, 5, 2), {"kernel": (3, 3), "padding": "CIRCULAR"}),
    "2d_same": ((5, 5, 2), {"kernel": (3, 3), "padding": "SAME"}),
    "3d_same_stride": ((4, 4, 3, 1), {"kernel": (2, 2, 2), "strides": (2, 1, 1),
                                      "padding": "SAME"}),
    "2d_valid_stride": ((8, 8, 2), {"kernel": (2, 2), "strides": (2, 2), "padding": "VALID"}),
}


def test_conv1d_padding_stride_dilation_nngp():
  """One 1D stack covering VALID + stride, CIRCULAR (of the input and after relu), explicit
  padding + kernel dilation, read out by flatten + Dense."""
  def body(x):
    x = nn.relu(_conv(128, (3,), strides=(2,), padding="VALID")(x))
    x = nn.relu(_conv(128, (3,), padding="CIRCULAR")(x))
    x = nn.relu(_conv(128, (2,), padding=((1, 2),), kernel_dilation=(2,))(x))
    return _flatten_readout(x)

  kf, _, _ = check_nngp(Net(body), (10, 2), samples=600)
  assert kf.layout == "diagonal"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONVS))
def test_conv_flatten_nngp(name):
  shape, kw = CONVS[name]
  kw = dict(kw)
  kernel = kw.pop("kernel")

  def body(x):
    x = nn.relu(_conv(128, kernel, **kw)(x))
    x = nn.relu(_conv(128, kernel, **kw)(x))
    return _flatten_readout(x)

  kf, _, _ = check_nngp(Net(body), shape, samples=400)
  assert kf.layout == "diagonal"


@pytest.mark.slow
def test_conv1d_circular_nngp():
  """CIRCULAR padding of the input, of a conv output, and of a nonlinearity's output."""
  def body(x):
    x = _conv(128, (3,), padding="CIRCULAR")(x)
    x = nn.relu(_conv(128, (3,), padding="CIRCULAR")(x))
    x = nn.relu(_conv(128, (3,), padding="CIRCULAR")(x))
    return _flatten_readout(x)

  check_nngp(Net(body), (5, 2), samples=400)


@pytest.mark.slow
def test_conv_global_mean_nngp():
  """A global mean over positions: full spatial covariance."""
  def body(x):
    x = nn.relu(_conv(128, (3, 3))(x))
    x = nn.relu(_conv(128, (2, 2), padding="VALID")(x))
    return dense(256, 1.0, 0.1)(x.mean(axis=(1, 2)))

  kf, _, _ = check_nngp(Net(body), (4, 4, 2), samples=400)
  assert kf.layout == "full"


def test_conv_avg_pool_and_global_mean_nngp():
  """nn.avg_pool and a global mean in one 2D network: full spatial covariance."""
  def body(x):
    x = nn.relu(_conv(128, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), strides=(1, 1), padding="VALID")
    x = nn.relu(_conv(128, (2, 2), padding="SAME")(x))
    return dense(256, 1.0, 0.1)(x.mean(axis=(1, 2)))

  kf, _, _ = check_nngp(Net(body), (4, 4, 2), samples=400)
  assert kf.layout == "full"


@pytest.mark.slow
def test_conv1d_avg_pool_nngp():
  def body(x):
    x = nn.relu(_conv(128, (3,))(x))
    x = nn.avg_pool(x, (2,), strides=(1,), padding="VALID")
    return _flatten_readout(nn.relu(_conv(128, (2,), padding="VALID")(x)))

  check_nngp(Net(body), (6, 2), samples=400)


@pytest.mark.slow
def test_conv1d_avg_pool_strided_circular_nngp():
  def body(x):
    x = nn.relu(_conv(128, (3,), padding="SAME")(x))
    x = nn.avg_pool(x, (3,), strides=(2,), padding="SAME")
    x = nn.relu(_conv(128, (3,), padding="CIRCULAR")(x))
    return _flatten_readout(x)

  check_nngp(Net(body), (8, 2), samples=400)


# ------------------------------------------------------------------------ normalization etc.

def test_layernorm_nngp():
  """LayerNorm without params before relu, with its default params (ones/zeros) before erf,
  and with random scale and bias as the last hidden layer."""
  def body(x):
    h = nn.LayerNorm(use_bias=False, use_scale=False)(dense(256, 2.0, 0.5)(x))
    h = nn.LayerNorm()(dense(256, 2.0, 0.2)(nn.relu(h)))
    h = nn.LayerNorm(scale_init=jinit.normal(0.5), bias_init=jinit.normal(0.3))(
        dense(256, 2.0, 0.2)(jax.lax.erf(h)))
    return dense(256, 1.0, 0.1)(h)

  check_nngp(Net(body), (6,), samples=400)


def test_residual_nngp():
  def body(x):
    h = dense(256, 1.0, 0.1)(x)
    h = h + dense(256, 2.0, 0.1)(nn.relu(h))
    h = h + dense(256, 1.5)(jax.lax.erf(h))
    return dense(256, 1.0)(nn.relu(h))

  check_nngp(Net(body), (6,), samples=400)


def test_batchnorm_inference_and_dropout_deterministic_nngp():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      h = dense(256, 2.0, 0.1)(x)
      h = nn.BatchNorm(use_running_average=not train)(h)
      h = nn.Dropout(0.5, deterministic=not train)(nn.relu(h))
      return dense(256, 1.0, 0.1)(h)

  check_nngp(Model(), (6,), samples=400, apply_kwargs={"train": False})


# ------------------------------------------------------------------------ CNNs

class MnistCNN(nn.Module):
  """The CNN of Flax's MNIST example."""
  widths: tuple = (32, 64, 256)
  n_out: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(features=self.widths[0], kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(features=self.widths[1], kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(features=self.widths[2])(x)
    x = nn.relu(x)
    x = nn.Dense(features=self.n_out)(x)
    return x


def test_mnist_cnn_runs_symmetric_psd():
  x1, _ = _inputs((8, 8, 1), n1=5)
  kf = im.kernel_fn(MnistCNN(), x1[:1])
  assert kf.layout == "full"
  k = kf(x1)
  for name in ("nngp", "ntk"):
    a = np.asarray(getattr(k, name))
    assert a.shape == (5, 5) and np.all(np.isfinite(a))
    assert is_symmetric_psd(a), (name, a)
  np.testing.assert_allclose(np.diag(k.nngp), k.cov1, rtol=1e-5)


def test_mnist_cnn_reduced_nngp():
  """Same architecture on 4x4 inputs, MC at moderate width."""
  check_nngp(MnistCNN(widths=(128, 128, 256), n_out=256), (4, 4, 1), samples=400)


@pytest.mark.slow
def test_mnist_cnn_nngp():
  check_nngp(MnistCNN(widths=(128, 128, 512), n_out=256), (8, 8, 1), samples=400)


class PreActResBlock(nn.Module):
  """Pre-activation ResNet block (He et al. 2016) in plain Flax: LN -> relu -> conv, twice."""
  width: int

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.LayerNorm()(x))
    h = nn.Conv(self.width, (3, 3))(h)
    h = nn.relu(nn.LayerNorm()(h))
    h = nn.Conv(self.width, (3, 3))(h)
    return x + h


class PreActResNet(nn.Module):
  width: int = 64
  blocks: int = 1
  n_out: int = 256

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (3, 3))(x)
    for _ in range(self.blocks):
      x = PreActResBlock(self.width)(x)
    x = nn.relu(nn.LayerNorm()(x))
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.n_out)(x)


def test_preact_resnet_block_nngp():
  check_nngp(PreActResNet(), (4, 4, 2), samples=200)


@pytest.mark.slow
def test_preact_resnet_two_blocks_nngp():
  check_nngp(PreActResNet(width=128, blocks=2), (5, 5, 2), samples=300)


@pytest.mark.slow
def test_layernorm_ntk_standard():
  def body(x):
    h = nn.relu(nn.LayerNorm()(dense(256, 2.0, 0.2)(x)))
    return dense(4, 1.0, 0.1)(h)
  check_ntk_standard(Net(body), (5,), samples=200)


@pytest.mark.slow
def test_residual_ntk_standard():
  def body(x):
    h = dense(256, 1.0, 0.1)(x)
    h = h + dense(256, 2.0, 0.1)(nn.relu(h))
    return dense(4, 1.0)(nn.relu(h))
  check_ntk_standard(Net(body), (5,), samples=200)


@pytest.mark.slow
def test_gap_ntk_standard():
  def body(x):
    x = nn.relu(_conv(128, (3, 3))(x))
    return dense(4, 1.0, 0.1)(x.mean(axis=(1, 2)))
  check_ntk_standard(Net(body), (4, 4, 2), samples=200)
