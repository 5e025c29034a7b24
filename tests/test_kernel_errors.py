"""Every documented failure of `kernel_fn` raises a clear error instead of a wrong kernel.

Unsupported operations raise `im.UnsupportedPrimitiveError` naming the primitive and the
Flax module path (the offending op sits in a distinctively named submodule so the path
can be asserted), unknown initializers raise `im.PriorError` naming the parameter and
`priors=`, and bad inputs raise `ValueError`.
"""

from __future__ import annotations

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.nn import initializers as jinit

import infinite_modules as im

X = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
X2 = np.random.default_rng(1).normal(size=(2, 5)).astype(np.float32)
IMG = np.random.default_rng(2).normal(size=(2, 4, 4, 2)).astype(np.float32)


class Block(nn.Module):
  """Applies `fn(self, h)` to its input: the offending op lives at path `.../block`."""
  fn: object

  @nn.compact
  def __call__(self, h):
    return self.fn(self, h)


class Net(nn.Module):
  """Dense(8) -> block -> flatten -> Dense(1) readout (named 'hidden', 'block', 'out')."""
  fn: object
  conv: bool = False

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(8, (3, 3), name="hidden")(x) if self.conv else nn.Dense(8, name="hidden")(x)
    h = Block(self.fn, name="block")(h)
    return nn.Dense(1, name="out")(h.reshape(h.shape[0], -1))


def _kernel(model, x=X, **kw):
  kf = im.kernel_fn(model, x[:1], **kw)
  return kf(x)


def _bias(self, h, init=None):
  return self.param("b", init or jinit.normal(0.5), (h.shape[-1],))


UNSUPPORTED = {
    # name: (fn(self, h), input, primitive named in the message, extra message fragment)
    "argmax": (lambda s, h: jnp.argmax(h, -1, keepdims=True).astype(h.dtype), X, "argmax", ""),
    "max_over_channels": (lambda s, h: h.max(-1, keepdims=True), X, "reduce_max", "maximum"),
    "softmax_over_features": (lambda s, h: nn.softmax(h), X, "reduce_max", "softmax"),
    # max pooling of Gaussian fields has an (estimated) kernel; of a residual stream not
    "max_pool_of_residual_stream": (lambda s, h: nn.max_pool(h + nn.relu(nn.Conv(8, (3, 3))(h)),
                                                             (2, 2)),
                                    IMG, "reduce_window_max", "max pool"),
    "dependent_sum": (lambda s, h: h + nn.relu(h + _bias(s, h)), X, "add", "same random"),
    "dependent_sum_dense": (lambda s, h: h + nn.relu(h + nn.Dense(8)(h)), X, "add",
                            "same random"),
    "batch_statistics": (lambda s, h: (h - h.mean(0)) / h.std(0), X, "reduce_sum", "example"),
    # Products of independent fields (h * Dense(h)) have a kernel now (Monte Carlo:
    # tests/test_products.py::test_field_times_its_dense_nngp_and_ntk_standard);
    # factors that share randomness other than as one function of one field still raise.
    "dependent_product": (lambda s, h: h * nn.relu(h + _bias(s, h)), X, "mul", "same random"),
    "overlapping_channel_slices": (lambda s, h: jnp.concatenate([h[:, :4] * h[:, 2:6]] * 2, -1),
                                   X, "mul", "overlapping channel slices"),
    "max_of_independent_fields": (lambda s, h: jnp.maximum(h, nn.Dense(8)(h)), X, "max",
                                  "sums and products"),
    "per_channel_constant": (lambda s, h: h * jnp.arange(1.0, 9.0), X, "mul", "channel"),
    "stop_gradient": (lambda s, h: jax.lax.stop_gradient(h), X, "stop_gradient", ""),
    "depthwise_conv": (lambda s, h: nn.Conv(8, (3, 3), feature_group_count=8)(h), IMG,
                       "conv_general_dilated", "depthwise"),
    "transposed_conv_circular": (lambda s, h: nn.ConvTranspose(8, (3, 3), strides=(2, 2),
                                                                padding="CIRCULAR")(h), IMG,
                                 "reshape", "splits"),
    "nonzero_mean_weight": (lambda s, h: nn.Dense(8, kernel_init=jinit.constant(0.1))(h), X,
                            "dot_general", "mean"),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_names_primitive_and_module(name):
  fn, x, primitive, fragment = UNSUPPORTED[name]
  with pytest.raises(im.UnsupportedPrimitiveError) as info:
    _kernel(Net(fn, conv=x.ndim == 4), x)
  message = str(info.value)
  assert f"`{primitive}`" in message, message
  assert "Net/block" in message, message
  assert fragment.lower() in message.lower(), message
  assert isinstance(info.value, im.InfiniteWidthError)


def test_sort_names_module():
  """jnp.sort is jitted: the module path of the call is kept inside the sub-jaxpr."""
  with pytest.raises(im.UnsupportedPrimitiveError) as info:
    _kernel(Net(lambda s, h: jnp.sort(h, -1)))
  assert "`sort`" in str(info.value)
  assert "Net/block" in str(info.value), str(info.value)


def test_weight_sharing_raises():
  class Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
      dense = nn.Dense(5, name="shared")
      h = dense(nn.relu(dense(x)))
      return nn.Dense(1)(h)

  with pytest.raises(im.UnsupportedPrimitiveError) as info:
    _kernel(Shared())
  message = str(info.value)
  assert "`dot_general`" in message and "Shared/shared" in message, message
  assert "shared/kernel" in message and "weight sharing" in message, message


def test_nonlinearity_of_post_activation_residual_sum_has_a_kernel():
  """relu(relu(a) + b) used to raise (the sum is not Gaussian); its pair laws are now
  tracked (`pairlaw`; evidence in tests/test_nongaussian.py)."""
  k = _kernel(Net(lambda s, h: nn.relu(nn.relu(h) + nn.Dense(8, name="other")(h))))
  assert np.all(np.isfinite(np.asarray(k.nngp))) and np.all(np.isfinite(np.asarray(k.ntk)))


def test_nonlinearity_of_field_plus_non_gaussian_bias_raises():
  """A uniform bias makes the field non-Gaussian; a following tanh must not be guessed."""
  fn = lambda s, h: jnp.tanh(h + _bias(s, h, jinit.uniform(1.0)))
  with pytest.raises(im.InfiniteWidthError, match="not Gaussian"):
    _kernel(Net(fn))


def test_nonlinearity_of_non_gaussian_field_names_its_module():
  with pytest.raises(im.InfiniteWidthError) as info:
    _kernel(Net(lambda s, h: jnp.tanh(h + _bias(s, h, jinit.uniform(1.0)))))
  assert "Net/block" in str(info.value), str(info.value)


def test_batchnorm_training_mode_raises():
  """BatchNorm with batch statistics fails (in Flax: batch_stats is not mutable, or here)."""
  class BN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
      h = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
      return nn.Dense(1)(nn.relu(h))

  with pytest.raises((im.InfiniteWidthError, flax.errors.ModifyScopeVariableError)) as info:
    _kernel(BN())
  assert "batch" in str(info.value).lower()
  # In inference mode the same module works.
  k = _kernel(BN(), apply_kwargs={"train": False})
  assert np.all(np.isfinite(k.nngp))


def test_dropout_training_mode_raises():
  class DO(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
      h = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(8)(x)))
      return nn.Dense(1)(h)

  with pytest.raises((im.InfiniteWidthError, flax.errors.InvalidRngError)) as info:
    _kernel(DO())
  assert "dropout" in str(info.value).lower()
  k = _kernel(DO(), apply_kwargs={"train": False})
  assert np.all(np.isfinite(k.nngp))


def test_same_field_twice_is_exact():
  """x + x of the same field is 2x (exact), not a sum of independent fields."""
  twice = Net(lambda s, h: nn.relu(h + h))
  doubled = Net(lambda s, h: nn.relu(2.0 * h))
  k_twice, k_doubled = _kernel(twice), _kernel(doubled)
  np.testing.assert_allclose(k_twice.nngp, k_doubled.nngp, rtol=1e-6)
  np.testing.assert_allclose(k_twice.ntk, k_doubled.ntk, rtol=1e-6)
  # and relu(2h) = 2 relu(h): 4 times the relu kernel of h (an independent sum would give 2x).
  k_single = _kernel(Net(lambda s, h: nn.relu(h)))
  np.testing.assert_allclose(k_twice.nngp, 4 * k_single.nngp, rtol=1e-5)


def test_unknown_initializer_raises_prior_error_and_override_fixes_it():
  def model(init):
    class M(nn.Module):
      @nn.compact
      def __call__(self, x):
        h = nn.Dense(16, kernel_init=init, name="hidden")(x)
        return nn.Dense(1, name="out")(nn.relu(h))
    return M()

  with pytest.raises(im.PriorError) as info:
    im.kernel_fn(model(jinit.orthogonal()), X[:1])
  message = str(info.value)
  assert "hidden/kernel" in message and "priors=" in message, message

  fan_in = X.shape[1]
  reference = im.kernel_fn(model(jinit.variance_scaling(1.0, "fan_in", "normal")), X[:1])(X, X2)
  for override in (im.Prior(variance=1.0 / fan_in), jinit.normal(fan_in ** -0.5)):
    kf = im.kernel_fn(model(jinit.orthogonal()), X[:1], priors={"hidden/kernel": override})
    k = kf(X, X2)
    np.testing.assert_allclose(k.nngp, reference.nngp, rtol=1e-5)
    np.testing.assert_allclose(k.ntk, reference.ntk, rtol=1e-5)


def test_priors_naming_unknown_parameter_raises():
  m = Net(lambda s, h: nn.relu(h))
  with pytest.raises(im.PriorError, match="unknown"):
    im.kernel_fn(m, X[:1], priors={"nope/kernel": im.Prior(1.0)})


def test_negative_prior_variance_raises():
  with pytest.raises(im.PriorError):
    im.Prior(variance=-1.0)


def _apply_fn(p, x):
  return nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]


_PARAMS = {"w1": jnp.zeros((5, 16)), "b1": jnp.zeros(16), "w2": jnp.zeros((16, 1))}


def test_apply_fn_params_without_priors_raises():
  with pytest.raises(im.PriorError, match="priors"):
    im.kernel_fn((_apply_fn, _PARAMS), X[:1])


def test_apply_fn_params_with_priors_matches_flax():
  priors = {"w1": im.Prior(2.0 / 5), "b1": im.Prior(0.1), "w2": im.Prior(1.0 / 16)}
  kf = im.kernel_fn((_apply_fn, _PARAMS), X[:1], priors=priors)

  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Dense(16, kernel_init=jinit.variance_scaling(2.0, "fan_in", "normal"),
                   bias_init=jinit.normal(0.1 ** 0.5))(x)
      return nn.Dense(1, use_bias=False,
                      kernel_init=jinit.variance_scaling(1.0, "fan_in", "normal"))(nn.relu(h))

  ref = im.kernel_fn(M(), X[:1])(X, X2)
  k = kf(X, X2)
  np.testing.assert_allclose(k.nngp, ref.nngp, rtol=1e-5)
  np.testing.assert_allclose(k.ntk, ref.ntk, rtol=1e-5)
  # A pytree of Priors matching params works too.
  kf_tree = im.kernel_fn((_apply_fn, _PARAMS), X[:1], priors={k: priors[k] for k in _PARAMS})
  np.testing.assert_allclose(kf_tree(X, X2, get="nngp"), ref.nngp, rtol=1e-5)


def test_unsupported_model_type_raises():
  with pytest.raises(TypeError):
    im.kernel_fn(object(), X[:1])


def test_output_without_parameters_raises():
  with pytest.raises(im.InfiniteWidthError, match="parameter"):
    im.kernel_fn((lambda p, x: x * 2.0, {}), X[:1], priors={})(X)


def test_output_with_spatial_axes_raises():
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(1, (3, 3))(nn.relu(nn.Conv(8, (3, 3))(x)))

  with pytest.raises(im.InfiniteWidthError, match="spatial"):
    _kernel(M(), IMG)


def test_tuple_output_raises():
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Dense(8)(x))
      return nn.Dense(1)(h), nn.Dense(1)(h)

  with pytest.raises(im.InfiniteWidthError, match="output"):
    _kernel(M())


# ------------------------------------------------------------------------ bad inputs

@pytest.fixture(scope="module")
def kf():
  return im.kernel_fn(Net(lambda s, h: nn.relu(h)), X[:1])


@pytest.mark.parametrize("shape", [(3, 4), (3, 6), (3, 5, 1), (5,)])
def test_feature_shape_mismatch_raises(kf, shape):
  bad = np.ones(shape, np.float32)
  with pytest.raises(ValueError, match="shape"):
    kf(bad)
  with pytest.raises(ValueError, match="shape"):
    kf(X, bad)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises(kf, value):
  bad = X.copy()
  bad[1, 2] = value
  with pytest.raises(ValueError, match="NaN|infinite"):
    kf(bad)
  with pytest.raises(ValueError, match="NaN|infinite"):
    kf(X, bad)


def test_empty_batch_raises(kf):
  with pytest.raises(ValueError):
    kf(X[:0])


@pytest.mark.parametrize("get", ["foo", ("nngp", "foo"), (), "NNGP"])
def test_bad_get_raises(kf, get):
  with pytest.raises(ValueError, match="get"):
    kf(X, get=get)


@pytest.mark.parametrize("parameterization", ["NTK", "mup", "", None])
def test_bad_parameterization_raises(parameterization):
  with pytest.raises(ValueError, match="parameterization"):
    im.kernel_fn(Net(lambda s, h: nn.relu(h)), X[:1], parameterization=parameterization)


def test_bad_x_example_raises():
  with pytest.raises(ValueError):
    im.kernel_fn(Net(lambda s, h: nn.relu(h)), np.ones((0, 5), np.float32))
