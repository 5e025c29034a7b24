"""Grouped convolutions, transposed convolutions, GroupNorm and training-mode layers.

Exact rules are checked by Monte Carlo on the real Flax models (the helpers and bound of
`test_kernel_montecarlo.py`: a kernel off by more than 5% on the correlation scale fails,
and each test shows that a plausible wrong formula does fail); the cases without an exact
infinite-width limit raise errors whose messages are checked.

* Grouped convolution (feature_group_count = G > 1): exact in the limit with G fixed and
  infinitely many channels per group: a dense convolution over the C_in / G channels of
  each group. Depthwise convolutions (one input channel per group), a grouped convolution
  of the network's input, and one of a channel concatenation raise.
* nn.ConvTranspose (input dilation): exact for SAME / VALID / explicit padding and
  transpose_kernel; CIRCULAR padding raises.
* nn.GroupNorm: exact (G fixed): the statistics of every group concentrate on those of the
  whole field, so it normalizes by statistics over all positions and channels.
"""

from __future__ import annotations

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
    linen_init_apply,
    mc_nngp,
    mc_ntk,
)

import infinite_modules as im
from infinite_modules.interpreter import Interpreter, run_jaxpr
from infinite_modules.values import Concrete, ParamRef

IMG = np.random.default_rng(2).normal(size=(2, 4, 4, 4)).astype(np.float32)


class Net(nn.Module):
  body: Callable

  @nn.compact
  def __call__(self, x):
    return self.body(x)


def _inputs(shape, n1=4, n2=3, seed=0, ramp=False):
  rng = np.random.default_rng(seed)
  x1 = rng.normal(size=(n1, *shape)).astype(np.float32)
  x2 = rng.normal(size=(n2, *shape)).astype(np.float32)
  x2[0] = 0.8 * x1[0] + 0.6 * x2[0]
  if ramp:  # positions of very different scales (so per-position statistics differ)
    scale = np.geomspace(0.1, 3.0, shape[0] * shape[1]).reshape(shape[0], shape[1], 1)
    x1, x2 = (x * scale.astype(np.float32) for x in (x1, x2))
  return x1, x2


def _estimate(model, x1, x2, samples, seed=1):
  init, apply = linen_init_apply(model, x1[:1])
  return mc_nngp(init, apply, np.concatenate([x1, x2]), samples=samples, seed=seed)


def _check(model, x1, x2, est):
  k = im.kernel_fn(model, x1[:1])(x1, x2)
  assert_mc_close(est, len(x1), k.nngp, k.cov1, k.cov2, what="nngp")
  return k


def _rejected(model, x1, x2, est):
  k = im.kernel_fn(model, x1[:1])(x1, x2)
  with pytest.raises(AssertionError, match="differs from the analytic kernel"):
    assert_mc_close(est, len(x1), k.nngp, k.cov1, k.cov2)


def _conv(width, kernel, **kw):
  kw.setdefault("kernel_init", jinit.variance_scaling(2.0, "fan_in", "normal"))
  kw.setdefault("bias_init", jinit.normal(0.1))
  return nn.Conv(width, kernel, **kw)


def _readout(x, n_out=64):
  return nn.Dense(n_out, kernel_init=jinit.variance_scaling(1.0, "fan_in", "normal"),
                  bias_init=jinit.normal(0.1))(x.reshape(x.shape[0], -1))


def _unsupported(model, x=IMG, **kw) -> str:
  with pytest.raises(im.InfiniteWidthError) as info:
    im.kernel_fn(model, x[:1], **kw)(x)
  return str(info.value)


# ------------------------------------------------------------------ grouped convolutions

def grouped_net(groups, std=None, width=128):
  """conv -> relu -> grouped conv (fixed init std, or fan-in scaling) -> relu -> readout."""
  def body(x):
    h = nn.relu(_conv(width, (3, 3))(x))
    init = jinit.normal(std) if std else jinit.variance_scaling(2.0, "fan_in", "normal")
    h = nn.relu(_conv(width, (3, 3), feature_group_count=groups, kernel_init=init)(h))
    return _readout(h)
  return Net(body)


def test_grouped_conv_nngp_and_bound_rejects_ungrouped_formula():
  """G = 4 groups of 32 channels: the MC kernel of the real model matches; the kernel that
  sums over all C_in channels (ignoring the groups) is rejected. The grouped kernel is the
  dense convolution's with the weight variance scaled by C_in / (C_in / G) (so with fan-in
  scaling, whose fan-in is C_in / G, groups do not change the kernel)."""
  std = float(np.sqrt(2.0 / (9 * 32)))
  x1, x2 = _inputs((4, 4, 2))
  est = _estimate(grouped_net(4, std), x1, x2, samples=300)
  k = _check(grouped_net(4, std), x1, x2, est)
  dense = im.kernel_fn(grouped_net(1, std / 2), x1[:1])(x1, x2)
  np.testing.assert_allclose(k.nngp, dense.nngp, rtol=1e-5)
  np.testing.assert_allclose(k.ntk, dense.ntk, rtol=1e-5)
  _rejected(grouped_net(1, std), x1, x2, est)  # the same weights' variance over 128 inputs


def test_depthwise_conv_raises():
  body = lambda x: _readout(nn.Conv(8, (3, 3), feature_group_count=8, name="dw")(
      nn.relu(nn.Conv(8, (3, 3))(x))))
  message = _unsupported(Net(body))
  assert "`conv_general_dilated`" in message and "Net/dw" in message, message
  assert "depthwise" in message and "monte_carlo_kernel_fn" in message, message


def test_depthwise_conv_with_channel_multiplier_raises():
  body = lambda x: _readout(nn.Conv(16, (3, 3), feature_group_count=8)(
      nn.relu(nn.Conv(8, (3, 3))(x))))
  assert "depthwise" in _unsupported(Net(body))


def test_grouped_conv_of_input_raises():
  body = lambda x: _readout(nn.relu(nn.Conv(8, (3, 3), feature_group_count=2)(x)))
  message = _unsupported(Net(body))
  assert "`conv_general_dilated`" in message and "input" in message, message
  assert "monte_carlo_kernel_fn" in message, message


def test_grouped_conv_of_channel_concatenation_raises():
  def body(x):
    h = nn.Conv(8, (3, 3))(x)
    h = jnp.concatenate([h, nn.Conv(8, (1, 1))(nn.relu(h))], -1)
    return _readout(nn.Conv(8, (3, 3), feature_group_count=2)(h))
  assert "concatenation" in _unsupported(Net(body))


def test_channel_slice_of_concatenation_raises():
  """Slicing the channels of concat([a, b]) used to return the mixture's kernel."""
  def body(x):
    h = nn.Conv(8, (3, 3))(x)
    h = jnp.concatenate([h, 3.0 * nn.Conv(8, (1, 1))(nn.relu(h))], -1)
    return _readout(h[..., :8])
  message = _unsupported(Net(body))
  assert "`slice`" in message and "concatenation" in message, message


def test_batch_group_count_raises():
  """batch_group_count > 1 cannot even be traced at kernel_fn's three batch sizes (their gcd
  is 1); the rule still refuses it."""
  conv = lambda w, x: jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), batch_group_count=2)
  w = jnp.zeros((3, 3, 4, 8))
  jaxpr = jax.make_jaxpr(conv)(w, jnp.asarray(IMG)).jaxpr
  interp = Interpreter(full=False, parameterization="ntk", n1=2, n2=2, dtype=jnp.float32,
                       points=8)
  ref = ParamRef(0, "w", im.Prior(1.0), w.shape, (0, 1, 2, 3))
  with pytest.raises(im.UnsupportedPrimitiveError, match="batch_group_count=2"):
    run_jaxpr(interp, jaxpr, jaxpr, jaxpr, (), (), [ref, Concrete(IMG, IMG, 0)])


# ------------------------------------------------------------------ transposed convolutions

def conv_transpose_net(width=128):
  """ConvTranspose of the input (SAME, stride 2) -> relu -> ConvTranspose of a field (VALID,
  strides (1, 2), transpose_kernel, kernel dilation) -> relu -> readout."""
  def body(x):
    h = nn.relu(nn.ConvTranspose(width, (3, 3), strides=(2, 2),
                                 kernel_init=jinit.variance_scaling(2.0, "fan_in", "normal"),
                                 bias_init=jinit.normal(0.1))(x))
    h = nn.relu(nn.ConvTranspose(width, (2, 3), strides=(1, 2), padding="VALID",
                                 kernel_dilation=(2, 1), transpose_kernel=True,
                                 kernel_init=jinit.variance_scaling(2.0, "fan_in", "normal"),
                                 bias_init=jinit.normal(0.1))(h))
    return _readout(h)
  return Net(body)


def test_conv_transpose_nngp():
  x1, x2 = _inputs((2, 2, 2))
  model = conv_transpose_net()
  est = _estimate(model, x1, x2, samples=300)
  kf = im.kernel_fn(model, x1[:1])
  assert kf.layout == "diagonal"
  k = kf(x1, x2)
  assert_mc_close(est, len(x1), k.nngp, k.cov1, k.cov2, what="nngp")
  # The full spatial layout gives the same kernel.
  full = kf._compute(jnp.asarray(x1), jnp.asarray(x2), full=True)
  np.testing.assert_allclose(full.nngp, k.nngp, rtol=1e-5)
  np.testing.assert_allclose(full.ntk, k.ntk, rtol=1e-5)
  # Zeros padded around the input instead of inserted between positions (the same output
  # size and fan-in) give a kernel that is rejected.
  def padded(x):
    h = nn.relu(_conv(128, (3, 3), padding=((2, 1), (2, 1)))(x))
    h = nn.relu(_conv(128, (2, 3), padding=((1, 1), (2, 3)), kernel_dilation=(2, 1))(h))
    return _readout(h)
  _rejected(Net(padded), x1, x2, est)


def test_conv_transpose_circular_raises():
  body = lambda x: _readout(nn.ConvTranspose(8, (3, 3), strides=(2, 2), padding="CIRCULAR",
                                             name="up")(x))
  message = _unsupported(Net(body))
  assert "Net/up" in message, message


# ------------------------------------------------------------------ GroupNorm

def groupnorm_net(norm=None, width=128):
  """conv -> GroupNorm(4) -> relu -> conv -> GroupNorm(2, two-pass variance, random
  scale/bias) -> readout; `norm(i)` replaces the i-th GroupNorm. (A random scale makes the
  field non-Gaussian, so it is followed by a linear layer.)"""
  norms = norm or (
      lambda i: nn.GroupNorm(4) if i == 0 else nn.GroupNorm(
          2, use_fast_variance=False, scale_init=jinit.normal(0.5), bias_init=jinit.normal(0.3)))

  def body(x):
    h = nn.relu(norms(0)(_conv(width, (3, 3))(x)))
    h = norms(1)(_conv(width, (3, 3))(h))
    return _readout(h)
  return Net(body)


def test_groupnorm_nngp_and_bound_rejects_per_position_layernorm():
  x1, x2 = _inputs((4, 4, 2), ramp=True)
  est = _estimate(groupnorm_net(), x1, x2, samples=300)
  _check(groupnorm_net(), x1, x2, est)
  # LayerNorm over channels only (per-position statistics) gives a kernel that is rejected.
  layernorm = groupnorm_net(lambda i: nn.LayerNorm() if i == 0 else nn.LayerNorm(
      scale_init=jinit.normal(0.5), bias_init=jinit.normal(0.3)))
  _rejected(layernorm, x1, x2, est)


def test_groupnorm_equals_layernorm_over_positions_and_channels():
  """At infinite width every group's statistics are the whole field's: GroupNorm (Flax, and
  Haiku's, which normalizes in the (groups, channels) layout and merges back) is
  LayerNorm(reduction_axes=(1, 2, 3)), scale/bias params included."""
  x1, x2 = _inputs((4, 4, 2))

  def flax_net(ln):
    def body(x):
      h = _conv(16, (3, 3))(x)
      h = (nn.LayerNorm(reduction_axes=(1, 2, 3), scale_init=jinit.normal(0.5),
                        bias_init=jinit.normal(0.3)) if ln else
           nn.GroupNorm(4, scale_init=jinit.normal(0.5), bias_init=jinit.normal(0.3)))(h)
      return _readout(h, 8)
    return Net(body)

  def hk_body(x):
    hvs = lambda v: hk.initializers.VarianceScaling(v, "fan_in", "normal")
    normal = hk.initializers.RandomNormal
    h = hk.Conv2D(16, 3, w_init=hvs(2.0), b_init=normal(0.1))(x)
    h = hk.GroupNorm(4, eps=1e-6, scale_init=normal(0.5), offset_init=normal(0.3))(h)
    return hk.Linear(8, w_init=hvs(1.0), b_init=normal(0.1))(h.reshape(h.shape[0], -1))

  ref = im.kernel_fn(flax_net(True), x1[:1])(x1, x2)
  for model in (flax_net(False), hk.transform(hk_body)):
    k = im.kernel_fn(model, x1[:1])(x1, x2)
    np.testing.assert_allclose(k.nngp, ref.nngp, rtol=1e-4)
    np.testing.assert_allclose(k.ntk, ref.ntk, rtol=1e-4)


@pytest.mark.parametrize("norm", ["group_size_1", "instance_norm"])
def test_per_channel_normalization_raises(norm):
  """One channel per group: statistics over one channel's positions do not concentrate."""
  def body(x):
    layer = (nn.GroupNorm(num_groups=None, group_size=1, name="norm")
             if norm == "group_size_1" else nn.InstanceNorm(name="norm"))
    return _readout(nn.relu(layer(nn.Conv(8, (3, 3))(x))))
  message = _unsupported(Net(body))
  assert "Net/norm" in message, message


def test_channel_split_outside_groupnorm_raises():
  """Outside GroupNorm a split of the channel axis does not say which part is fixed: summing
  pairs of channels (a fixed size 2) must not be read as a sum over infinitely many."""
  def body(x):
    h = nn.Conv(8, (3, 3))(x)
    pairs = (h.reshape(*h.shape[:-1], 4, 2) ** 2).sum(-1)
    return _readout(nn.Conv(8, (1, 1))(pairs))
  message = _unsupported(Net(body))
  assert "`reshape`" in message and "GroupNorm" in message, message


def test_groupnorm_of_channel_concatenation_raises():
  def body(x):
    h = nn.Conv(8, (3, 3))(x)
    h = jnp.concatenate([h, nn.Conv(8, (1, 1))(nn.relu(h))], -1)
    return _readout(nn.relu(nn.GroupNorm(2)(h)))
  message = _unsupported(Net(body))
  assert "`reshape`" in message and "concatenation" in message, message


# ------------------------------------------------------------------ training-mode layers

VEC = np.random.default_rng(3).normal(size=(3, 5)).astype(np.float32)


def test_batchnorm_training_mode_raises_infinite_width_error():
  body = lambda x: nn.Dense(1)(nn.relu(nn.BatchNorm(use_running_average=False)(
      nn.Dense(8)(x))))
  message = _unsupported(Net(body), VEC)
  assert "BatchNorm" in message and "batch statistics" in message, message
  assert "use_running_average=True" in message, message


def test_dropout_training_mode_raises_infinite_width_error():
  body = lambda x: nn.Dense(1)(nn.Dropout(0.5, deterministic=False)(nn.relu(nn.Dense(8)(x))))
  message = _unsupported(Net(body), VEC)
  assert "Dropout" in message and "deterministic=True" in message, message


def test_haiku_batchnorm_training_and_dropout_raise():
  def bn(x):
    h = hk.BatchNorm(True, True, 0.9)(hk.Linear(8)(x), is_training=True)
    return hk.Linear(1)(jax.nn.relu(h))

  def dropout(x):
    return hk.Linear(1)(hk.dropout(hk.next_rng_key(), 0.5, jax.nn.relu(hk.Linear(8)(x))))

  message = _unsupported(hk.transform_with_state(bn), VEC)
  assert "`reduce_sum`" in message and "batch" in message, message
  message = _unsupported(hk.transform(dropout), VEC)
  assert "dropout" in message and "random" in message, message


# ------------------------------------------------------------------ slow: NTK and more

@pytest.mark.slow
def test_grouped_conv_transpose_groupnorm_ntk_standard():
  """Standard-parameterization NTK (params of the grouped conv, the ConvTranspose and the
  GroupNorm scale/bias included) of one network with all three layers."""
  def body(x):
    h = nn.relu(nn.GroupNorm(2)(_conv(128, (3, 3))(x)))  # (trained ones/zeros scale/bias)
    h = nn.relu(_conv(128, (3, 3), feature_group_count=4)(h))
    h = nn.relu(nn.ConvTranspose(128, (2, 2), strides=(2, 2), bias_init=jinit.normal(0.1),
                                 kernel_init=jinit.variance_scaling(2.0, "fan_in", "normal"))(h))
    return _readout(h, 4)

  model = Net(body)
  x1, x2 = _inputs((3, 3, 2), 3, 2)
  k = im.kernel_fn(model, x1[:1], parameterization="standard")(x1, x2)
  init, apply = linen_init_apply(model, x1[:1])
  est = mc_ntk(init, apply, np.concatenate([x1, x2]), samples=200, seed=2)
  assert_mc_close(est, len(x1), k.ntk, what="ntk")


@pytest.mark.slow
def test_conv_transpose_1d_and_haiku_groupnorm_nngp():
  def body(x):
    h = nn.relu(_conv(128, (3,))(x))
    h = nn.relu(nn.ConvTranspose(128, (4,), strides=(3,), padding="VALID",
                                 kernel_init=jinit.variance_scaling(2.0, "fan_in", "normal"),
                                 bias_init=jinit.normal(0.1))(h))
    return _readout(h)

  x1, x2 = _inputs((4, 2))
  model = Net(body)
  _check(model, x1, x2, _estimate(model, x1, x2, samples=400))

  def hk_body(x):
    init = hk.initializers.VarianceScaling(2.0, "fan_in", "normal")
    h = hk.Conv2D(128, 3, w_init=init, b_init=hk.initializers.RandomNormal(0.1))(x)
    h = jax.nn.relu(hk.GroupNorm(4, eps=1e-6)(h))
    return hk.Linear(64, w_init=hk.initializers.VarianceScaling(1.0, "fan_in", "normal"))(
        h.reshape(h.shape[0], -1))

  f = hk.transform(hk_body)
  x1, x2 = _inputs((4, 4, 2), ramp=True)
  k = im.kernel_fn(f, x1[:1])(x1, x2)
  init, apply = haiku_init_apply(f, x1[:1])
  est = mc_nngp(init, apply, np.concatenate([x1, x2]), samples=300, seed=3)
  assert_mc_close(est, len(x1), k.nngp, k.cov1, k.cov2)
