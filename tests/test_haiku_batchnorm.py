"""Haiku models with hk.BatchNorm in evaluation mode: `im.haiku_eval_state` + `im.HaikuWithState`.

With running mean 0 and variance 1 an evaluation BatchNorm is `x * scale /
sqrt(1 + eps) + offset`: the kernel equals that of the model with this affine
map written out (float64, 1e-12), and Monte Carlo over inits of the REAL Haiku
model applied with that state agrees with it.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_models import assert_mc_close, is_symmetric_psd, mc_nngp

import infinite_modules as im

EPS = 1e-3
W_INIT = hk.initializers.VarianceScaling(2.0, "fan_in", "normal")


def _conv_net(x, is_training, with_batchnorm=True):
  h = hk.Conv2D(64, 3, w_init=W_INIT, b_init=hk.initializers.RandomNormal(0.1))(x)
  if with_batchnorm:
    h = hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9, eps=EPS)(
        h, is_training=is_training)
  else:
    h = h * jax.lax.rsqrt(jnp.asarray(1.0 + EPS, h.dtype))  # the eval BatchNorm, written out
  h = jax.nn.relu(h)
  h = hk.avg_pool(h, window_shape=(1, 2, 2, 1), strides=(1, 2, 2, 1), padding="VALID")
  h = jnp.mean(h, axis=(1, 2))
  return hk.Linear(64, w_init=hk.initializers.VarianceScaling(1.0, "fan_in", "normal"))(h)


def _inputs(n, seed=0, dtype=np.float32):
  return np.random.default_rng(seed).normal(size=(n, 6, 6, 3)).astype(dtype)


EVAL = {"is_training": False}


def test_eval_state_values_and_consistent_ema():
  model = hk.transform_with_state(_conv_net)
  state = im.haiku_eval_state(model, _inputs(2), apply_kwargs=EVAL)
  mean, var = state["batch_norm/~/mean_ema"], state["batch_norm/~/var_ema"]
  assert mean["average"].shape == (1, 1, 1, 64)
  np.testing.assert_array_equal(mean["average"], 0.0)
  np.testing.assert_array_equal(var["average"], 1.0)
  # One EMA step from hidden=0: Haiku's debiased average is exactly the stored one, and a
  # training step continues from it as from an average that has seen the value once.
  assert int(var["counter"]) == 1
  np.testing.assert_allclose(var["hidden"] / (1 - 0.9 ** var["counter"]), var["average"],
                             rtol=1e-6)
  params, _ = model.init(jax.random.PRNGKey(0), _inputs(2), is_training=True)
  _, new_state = model.apply(params, state, None, _inputs(4), is_training=True)
  batch_var = new_state["batch_norm/~/var_ema"]
  assert int(batch_var["counter"]) == 2 and np.all(np.isfinite(batch_var["average"]))


def test_kernel_equals_model_without_batchnorm_float64():
  with jax.enable_x64(True):
    x1, x2 = _inputs(3, 0, np.float64), _inputs(2, 1, np.float64)
    model = hk.transform_with_state(_conv_net)
    state = im.haiku_eval_state(model, x1, apply_kwargs=EVAL)
    k = im.kernel_fn(im.HaikuWithState(model, state), x1, apply_kwargs=EVAL)(x1, x2)
    plain = hk.transform_with_state(lambda x: _conv_net(x, False, with_batchnorm=False))
    k_ref = im.kernel_fn(plain, x1)(x1, x2)
    assert k.nngp.dtype == jnp.float64
    for name in ("nngp", "ntk"):
      a, b = getattr(k, name), getattr(k_ref, name)
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * float(np.max(np.abs(b))))
    # (NTK parameterization: scale and offset start at exactly 1 and 0, prior std 0, so
    # they have no tangent term, as the plain model has none.)


def test_monte_carlo_of_real_haiku_model_with_eval_state():
  x = _inputs(5, 2)
  x[1] = 0.8 * x[0] + 0.6 * x[1]
  model = hk.transform_with_state(_conv_net)
  state = im.haiku_eval_state(model, x[:1], apply_kwargs=EVAL)
  k = im.kernel_fn(im.HaikuWithState(model, state), x[:1], apply_kwargs=EVAL)(x[:3], x[3:])
  init = lambda key: model.init(key, x[:1], is_training=True)[0]
  apply = lambda params, xs: model.apply(params, state, None, xs, is_training=False)[0]
  est = mc_nngp(init, apply, x, samples=200, seed=4)
  assert_mc_close(est, 3, k.nngp, k.cov1, k.cov2, bound=0.05, what="nngp")
  # The bound can fail: a 10% error in the kernel's scale is rejected.
  with pytest.raises(AssertionError, match="differs from the analytic kernel"):
    assert_mc_close(est, 3, 0.9 * k.nngp, 0.9 * k.cov1, 0.9 * k.cov2, bound=0.05, what="nngp")


def test_missing_state_points_to_the_route():
  model = hk.transform_with_state(_conv_net)
  with pytest.raises(im.InfiniteWidthError, match="im.haiku_eval_state"):
    im.kernel_fn(model, _inputs(1), apply_kwargs=EVAL)


def test_mismatched_state_is_refused():
  model = hk.transform_with_state(_conv_net)
  state = im.haiku_eval_state(model, _inputs(1), apply_kwargs=EVAL)
  state["batch_norm/~/var_ema"] = dict(state["batch_norm/~/var_ema"],
                                       average=jnp.ones((1, 1, 1, 32)))
  with pytest.raises(im.InfiniteWidthError, match="does not match"):
    im.kernel_fn(im.HaikuWithState(model, state), _inputs(1), apply_kwargs=EVAL)


def _kernel_or_precise_error(net, x, missing: tuple[str, ...]):
  """The eval-mode BatchNorms pass; the kernel is finite, symmetric PSD, or the one error
  names the operation that has no rule (`missing`) and the module path."""
  model = hk.transform_with_state(net)
  state = im.haiku_eval_state(model, x[:1], apply_kwargs=EVAL)
  try:
    kf = im.kernel_fn(im.HaikuWithState(model, state), x[:1], apply_kwargs=EVAL)
  except im.UnsupportedPrimitiveError as e:
    message = str(e)
    assert "batch_norm" not in message and all(m in message for m in missing), message
    assert "monte_carlo_kernel_fn" in message, message
    return None
  k = kf(x, get="nngp")
  assert np.all(np.isfinite(k)) and is_symmetric_psd(k)
  return k


def test_mobilenet_v1_eval_kernel_or_precise_error():
  # Depthwise convolutions have no Gaussian infinite-width limit (one input channel each).
  _kernel_or_precise_error(
      lambda x, is_training: hk.nets.MobileNetV1(num_classes=4)(x, is_training=is_training),
      _inputs(3, 3), ("conv_general_dilated", "depthwise_conv", "feature_group_count"))


_READOUT = {"w_init": hk.initializers.VarianceScaling(1.0, "fan_in", "normal")}


def _haiku_resnet_kernel(net, x):
  """The kernel of a `hk.nets.ResNet` in eval mode: estimated (max pooling, post-activation
  blocks), finite, symmetric PSD, with a stated error small against its entries."""
  model = hk.transform_with_state(net)
  state = im.haiku_eval_state(model, x[:1], apply_kwargs=EVAL)
  k = im.kernel_fn(im.HaikuWithState(model, state), x[:1], apply_kwargs=EVAL)(x, None)
  for a in (k.nngp, k.ntk):
    assert np.all(np.isfinite(a)) and is_symmetric_psd(a)
  assert not k.exact and any("reduce_window_max" in e.where for e in k.estimates), k.estimates
  # The stated bound covers the NNGP and NTK entries alike (conservative: 4 standard
  # errors of the worst entry, plus 1e-2 of each pair-law step's largest moment).
  assert float(k.error) < 0.5 * max(float(np.max(np.diag(k.nngp))), float(np.max(np.diag(k.ntk))))
  return k


def test_small_haiku_resnet_v1_eval_kernel():
  # hk.nets.ResNet as written (v1 blocks, BatchNorm in eval mode, 7x7 stem, max pool),
  # one block per stage; the zero-initialized default readout is replaced (it would
  # give an all-zero kernel, see the degenerate-prior warning).
  _haiku_resnet_kernel(
      lambda x, is_training: hk.nets.ResNet(
          blocks_per_group=(1, 1, 1, 1), num_classes=4, channels_per_group=(8, 8, 8, 8),
          logits_config=_READOUT)(x, is_training=is_training), _inputs(2, 4))


@pytest.mark.slow
def test_resnet18_eval_kernel():
  _haiku_resnet_kernel(
      lambda x, is_training: hk.nets.ResNet18(4, logits_config=_READOUT)(
          x, is_training=is_training), np.random.default_rng(0).normal(
              size=(3, 16, 16, 3)).astype(np.float32))
