"""User extensions: primitive rules and module counterparts."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infinite_modules as im
from infinite_modules import interpreter, modules
from infinite_modules.expectations import ReluPair


@pytest.fixture
def clean_registries():
  rules, module_rules = dict(interpreter.RULES), dict(modules.MODULE_RULES)
  yield
  interpreter.RULES.clear()
  interpreter.RULES.update(rules)
  modules.MODULE_RULES.clear()
  modules.MODULE_RULES.update(module_rules)


class ScaledRelu(nn.Module):
  """sqrt(2) relu(x), written with an op that has no exact rule (a max over channels)."""

  @nn.compact
  def __call__(self, x):
    return nn.relu(x) * jnp.sqrt(2.0) + 0.0 * jnp.max(x, axis=-1, keepdims=True)


class WithBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(ScaledRelu()(nn.Dense(16)(x)))


class Plain(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(nn.relu(nn.Dense(16)(x)) * jnp.sqrt(2.0))


def scaled_relu_rule(k: im.LayerKernel, module) -> im.LayerKernel:
  del module
  relu = ReluPair(1.0, 0.0)
  v1, v2 = k.var1, k.var2
  return im.LayerKernel(
      nngp=2 * relu.kappa(k.nngp, v1[:, None], v2[None, :]),
      ntk=2 * relu.dkappa(k.nngp, v1[:, None], v2[None, :]) * k.ntk,
      var1=2 * relu.kappa(v1, v1, v1), var2=2 * relu.kappa(v2, v2, v2),
      mean1=np.sqrt(2) * relu.mean(v1), mean2=np.sqrt(2) * relu.mean(v2))


def test_module_counterpart_replaces_the_body(clean_registries):
  x = np.random.RandomState(0).randn(4, 3)
  with pytest.raises(im.InfiniteWidthError, match="reduce_max.*ScaledRelu"):
    im.kernel_fn(WithBlock(), x[:1])
  im.register_module(ScaledRelu, scaled_relu_rule)
  # float64: with x2=None the built-in relu has correlation exactly 1 on the
  # diagonal, the rule above 1 - eps (an O(sqrt(eps)) difference in float32).
  with jax.enable_x64(True):
    got = im.kernel_fn(WithBlock(), x[:1])(x)
    want = im.kernel_fn(Plain(), x[:1])(x)
  np.testing.assert_allclose(got.nngp, want.nngp, rtol=1e-6)
  np.testing.assert_allclose(got.ntk, want.ntk, rtol=1e-6)


def test_primitive_rule_registration(clean_registries):
  class Stopped(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(1)(jax.lax.stop_gradient(nn.relu(nn.Dense(8)(x))))

  x = np.random.RandomState(1).randn(3, 2)
  with pytest.raises(im.UnsupportedPrimitiveError, match="stop_gradient"):
    im.kernel_fn(Stopped(), x[:1])

  @im.register_rule("stop_gradient")
  def _stop_gradient(interp, eqn, invals):
    (field,) = invals
    root = dataclasses.replace(field.root, ntk=jnp.zeros_like(field.root.ntk),
                               gathered_from=None)
    return [dataclasses.replace(field, root=root)]

  k = im.kernel_fn(Stopped(), x[:1])(x)
  assert k.nngp.shape == (3, 3)
  # Only the readout is trained through: its NTK is its NNGP (weight and bias terms).
  np.testing.assert_allclose(k.ntk, k.nngp, rtol=1e-6)
