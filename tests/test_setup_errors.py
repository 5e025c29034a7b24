"""Common setup mistakes are caught before the model library's own error, with our message
and the fix (and the routes that work are exact).

Each case asserts the error type and the words that name the cause, where it is and the way
out: Flax models left in training mode (BatchNorm over a named batch axis), NNX models not in
`.eval()`, NNX priors (recorded at construction, or one error listing every missing one),
Haiku BatchNorm in evaluation mode without a state, a zero-variance readout, per-channel
normalization.
"""

from __future__ import annotations

import warnings

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import infinite_modules as im

X = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
IMG = np.random.default_rng(1).normal(size=(2, 4, 4, 2)).astype(np.float32)


class ResNetLikeBN(nn.Module):
  """As Flax's ImageNet ResNet: BatchNorm(use_running_average=not train, axis_name='batch')."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    h = nn.Dense(8, name="stem")(x)
    h = nn.BatchNorm(use_running_average=not train, axis_name="batch", name="bn_init")(h)
    return nn.Dense(1, name="head")(nn.relu(h))


def test_flax_named_batch_axis_in_training_mode():
  """Was: NameError: Found an unbound axis name: batch ... call psum under jax.shard_map."""
  with pytest.raises(im.InfiniteWidthError) as info:
    im.kernel_fn(ResNetLikeBN(), X)
  message = str(info.value)
  assert "axis_name" in message and "batch" in message, message
  assert "apply_kwargs={'train': False}" in message, message
  k = im.kernel_fn(ResNetLikeBN(), X, apply_kwargs={"train": False})(X, get="ntk")
  assert np.all(np.isfinite(k))


class NNXNet(nnx.Module):
  def __init__(self, rngs, norm="layer"):
    self.hidden = nnx.Linear(4, 16, rngs=rngs)
    self.norm = (nnx.LayerNorm(16, rngs=rngs) if norm == "layer"
                 else nnx.BatchNorm(16, rngs=rngs))
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.out = nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(self.drop(nnx.relu(self.norm(self.hidden(x)))))


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_nnx_model_not_in_eval_mode(norm):
  """Was: flax.errors.TraceContextError: Cannot mutate RngCount from a different trace level."""
  with im.record_nnx_initializers():
    model = NNXNet(nnx.Rngs(0), norm)
  with pytest.raises(im.InfiniteWidthError) as info:
    im.kernel_fn(model, X)
  message = str(info.value)
  assert "TraceContextError" in message and "model.eval()" in message, message


def test_nnx_recorded_initializers_give_the_linen_kernel():
  """Initializers recorded at construction are the priors: the NNX model's kernel equals the
  kernel of the same Flax linen model (same default initializers)."""
  with im.record_nnx_initializers():
    model = NNXNet(nnx.Rngs(0))
  model.eval()
  k_nnx = im.kernel_fn(model, X)(X)

  class Linen(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(1)(nn.relu(nn.LayerNorm()(nn.Dense(16)(x))))

  k_linen = im.kernel_fn(Linen(), X)(X)
  np.testing.assert_allclose(k_nnx.ntk, k_linen.ntk, rtol=1e-5)  # float32
  np.testing.assert_allclose(k_nnx.nngp, k_linen.nngp, rtol=1e-5)


def test_nnx_custom_initializer_is_recorded():
  with im.record_nnx_initializers():
    wide = nnx.Linear(4, 8, kernel_init=nnx.initializers.normal(2.0), rngs=nnx.Rngs(0))
    plain = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
  from infinite_modules.models import nnx_initializers
  assert nnx_initializers(wide)["kernel"] is not nnx_initializers(plain)["kernel"]
  prior = im.prior_from_initializer(nnx_initializers(wide)["kernel"], (4, 8), "kernel")
  assert prior.variance == pytest.approx(4.0)


def test_nnx_missing_priors_are_listed_in_one_error():
  """Was: one PriorError per missing parameter (12 rounds for the NNX MNIST example)."""
  class Raw(nnx.Module):
    def __init__(self, rngs):
      self.w = nnx.Param(jax.random.normal(rngs.params(), (4, 8)))
      self.v = nnx.Param(jnp.zeros((8, 1)))

    def __call__(self, x):
      return nnx.relu(x @ self.w) @ self.v

  with pytest.raises(im.PriorError) as info:
    im.kernel_fn(Raw(nnx.Rngs(0)), X)
  message = str(info.value)
  assert "2 parameter(s)" in message and "`w`" in message and "`v`" in message, message
  assert "priors=" in message and "record_nnx_initializers" in message, message


def test_apply_fn_missing_priors_are_listed_in_one_error():
  params = {"a": jnp.ones((4, 8)), "b": jnp.ones((8, 1))}
  apply = lambda p, x: jax.nn.relu(x @ p["a"]) @ p["b"]
  with pytest.raises(im.PriorError) as info:
    im.kernel_fn((apply, params), X, priors={"a": im.Prior(0.25)})
  message = str(info.value)
  assert "1 parameter(s)" in message and "`b`" in message and "'b': im.Prior" in message


def test_haiku_batchnorm_eval_without_state():
  """Was: Haiku's ValueError: No value for 'average' ... perhaps set an init function?"""
  def f(x, is_training):
    h = hk.Linear(8)(x)
    h = hk.BatchNorm(True, True, 0.9)(h, is_training=is_training)
    return hk.Linear(1)(jax.nn.relu(h))

  with pytest.raises(im.InfiniteWidthError) as info:
    im.kernel_fn(hk.transform_with_state(f), X, apply_kwargs={"is_training": False})
  message = str(info.value)
  assert "hk.BatchNorm" in message and "is_training=False" in message, message
  assert "im.haiku_eval_state" in message and "HaikuWithState" in message, message
  assert "monte_carlo_kernel_fn" in message, message


def test_zero_variance_readout_warns():
  """hk.nets.ResNet's logits are zero-initialized: the NNGP and NTK are zero. Warn."""
  def f(x):
    h = jax.nn.relu(hk.Linear(8)(x))
    return hk.Linear(1, w_init=hk.initializers.Constant(0.0), name="logits")(h)

  # Warned where the model is interpreted: at construction (whose pass is also the
  # program of the call below, at the example's shape).
  with pytest.warns(UserWarning, match="logits/w.*zero-variance") as record:
    kf = im.kernel_fn(hk.without_apply_rng(hk.transform(f)), X)
  k = kf(X)
  assert "priors=" in str(record[0].message)
  assert np.all(np.asarray(k.nngp) == 0)


def test_no_warning_for_zero_biases():
  """Zero-initialized biases (Flax's default) are not degenerate: no warning."""
  kf = im.kernel_fn(nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(1)]), X)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    kf(X)


def test_instance_norm_names_per_channel_statistics():
  """Was refused for 'adding two fields that depend on the same random parameters' only."""
  class G(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Conv(8, (3, 3))(x)
      h = nn.relu(nn.GroupNorm(num_groups=None, group_size=1, name="inorm")(h))
      return nn.Dense(1)(h.reshape(h.shape[0], -1))

  with pytest.raises(im.UnsupportedPrimitiveError) as info:
    im.kernel_fn(G(), IMG)(IMG)
  message = str(info.value)
  assert "G/inorm" in message and "`sub`" in message, message
  assert "GroupNorm(group_size=1)" in message and "nn.LayerNorm" in message, message
