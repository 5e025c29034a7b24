"""More kinds of bad model and bad input, each refused with a clear error.

Completes `test_kernel_errors.py` / `test_setup_errors.py` (the README's error table
lists them all). Model errors sit in the submodule `Net/block` of
`test_kernel_errors.Net`; every message must name the primitive (or parameter, or
argument), the module path, and the way out.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.nn import initializers as jinit
from test_kernel_errors import IMG, Net, X, _kernel

import infinite_modules as im

WAY_OUT = ("register_rule", "monte_carlo_kernel_fn")


@jax.custom_vjp
def _custom_vjp_stop(x):
  return jnp.tanh(x)


_custom_vjp_stop.defvjp(lambda x: (jnp.tanh(x), x), lambda r, ct: (ct / jnp.cosh(r) ** 2,))


PRIMITIVES = {
    # name: (fn(self, h), input, primitive named in the message)
    "argsort": (lambda s, h: jnp.argsort(h, -1).astype(h.dtype), X, "sort"),
    "top_k": (lambda s, h: jax.lax.top_k(h, 2)[0], X, "top_k"),
    "cumsum_features": (lambda s, h: jnp.cumsum(h, -1), X, "cumsum"),
    "cumsum_positions": (lambda s, h: jnp.cumsum(h, 1), IMG, "cumsum"),
    "scatter_set": (lambda s, h: h.at[:, 0].set(0.0), X, "scatter"),
    "scatter_add": (lambda s, h: h.at[:, 0].add(h[:, 1]), X, "scatter-add"),
    "while_loop": (lambda s, h: jax.lax.while_loop(
        lambda c: c[1] < 2, lambda c: (jnp.tanh(c[0]), c[1] + 1), (h, 0))[0], X, "while"),
    "cond": (lambda s, h: jax.lax.cond(True, lambda a: a, lambda a: -a, h), X, "cond"),
    "fft": (lambda s, h: jnp.fft.fft(h).real, X, "fft"),
    "complex_field": (lambda s, h: (h * (1 + 1j)).real, X, "real"),
    "data_dependent_slice": (lambda s, h: jax.lax.dynamic_slice_in_dim(
        h, jnp.argmax(h[0, 0]), 2, -1), X, "squeeze"),
    "quotient_of_fields": (lambda s, h: h / nn.Dense(8)(h), X, "div"),
    "comparison_of_fields": (lambda s, h: jnp.where(h > nn.Dense(8)(h), h, 0.0), X, "gt"),
}


@pytest.mark.parametrize("name", list(PRIMITIVES))
def test_unsupported_operation_names_primitive_module_and_way_out(name):
  fn, x, primitive = PRIMITIVES[name]
  with pytest.raises(im.UnsupportedPrimitiveError) as info:
    _kernel(Net(fn, conv=x.ndim == 4), x)
  message = str(info.value)
  assert f"`{primitive}`" in message, message
  assert "Net/block" in message, message
  assert all(way in message for way in WAY_OUT), message


PARAMETERS = {
    # name: (fn(self, h), parameter path named in the message)
    "orthogonal_initializer": (lambda s, h: nn.Dense(8, kernel_init=jinit.orthogonal())(h),
                               "block/Dense_0/kernel"),
    "integer_parameter": (lambda s, h: h * s.param(
        "k", lambda key, shape: jnp.ones(shape, jnp.int32), (8,)), "block/k"),
    "complex_parameter": (lambda s, h: (h * s.param(
        "k", lambda key, shape: jnp.ones(shape, jnp.complex64), (8,))).real, "block/k"),
}


@pytest.mark.parametrize("name", list(PARAMETERS))
def test_unknown_parameter_distribution_names_parameter_and_priors(name):
  fn, path = PARAMETERS[name]
  with pytest.raises(im.PriorError) as info:
    _kernel(Net(fn))
  message = str(info.value)
  assert f"`{path}`" in message and "priors=" in message and "im.Prior" in message, message


def test_random_layer_names_module_and_deterministic_fix():
  with pytest.raises(im.InfiniteWidthError) as info:
    _kernel(Net(lambda s, h: h + jax.random.normal(s.make_rng("noise"), h.shape)))
  message = str(info.value)
  assert "block" in message and "PRNG" in message and "deterministic" in message, message
  assert "monte_carlo_kernel_fn" in message, message


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(nn.relu(nn.Dense(8)(x)))


@pytest.fixture(scope="module")
def kf():
  return im.kernel_fn(_Mlp(), X[:1])


@pytest.mark.parametrize("x1,x2,words", [
    (X + 1j, None, ["x1 is complex", "x.real, x.imag"]),
    (X, X[:, :4], ["x2 has shape (3, 4)", "(batch, 5)"]),
    (X, X[None], ["x2 has shape (1, 3, 5)", "x_example"]),
    (X, X.astype(np.float16), ["different dtypes"]),
    (X, X * np.nan, ["x2 contains NaN"]),
    (np.float32(1.0), None, ["x1 has shape ()", "(batch, 5)"]),
], ids=["complex", "x2_features", "x2_rank", "x1_x2_dtypes", "x2_nan", "scalar"])
def test_bad_inputs_say_what_and_how(kf, x1, x2, words):
  with pytest.raises(ValueError) as info:
    kf(x1, x2)
  assert all(w in str(info.value) for w in words), str(info.value)


def test_get_naming_a_kernel_twice_raises(kf):
  with pytest.raises(ValueError, match="more than once"):
    kf(X, get=("ntk", "ntk"))


@pytest.mark.parametrize("priors,words", [
    ({"Dense_0/kernel": "normal"}, ["`Dense_0/kernel`", "'normal'", "im.Prior"]),
    ([1, 2], ["dict", "pytree"]),
], ids=["string_prior", "list_of_priors"])
def test_malformed_priors_raise_prior_error(priors, words):
  with pytest.raises(im.PriorError) as info:
    im.kernel_fn(_Mlp(), X[:1], priors=priors)(X)
  assert all(w in str(info.value) for w in words), str(info.value)


@pytest.mark.parametrize("kwargs", [{"variance": np.ones(3)}, {"variance": 1.0, "mean": 1j},
                                    {"variance": "1"}])
def test_prior_of_wrong_type_raises(kwargs):
  with pytest.raises(im.PriorError, match="must be one real number"):
    im.Prior(**kwargs)


def test_apply_kwargs_the_model_does_not_take():
  with pytest.raises(ValueError) as info:
    im.kernel_fn(_Mlp(), X[:1], apply_kwargs={"train": False})
  message = str(info.value)
  assert "apply_kwargs={'train': False}" in message and "__call__" in message, message


@pytest.mark.parametrize("points", [0, 1, 2.5, True])
def test_bad_quadrature_points(points):
  with pytest.raises(ValueError, match="quadrature_points must be None"):
    im.kernel_fn(_Mlp(), X[:1], quadrature_points=points)


def test_custom_vjp_activation_is_integrated_as_its_primal():
  """A custom_vjp / custom_jvp activation is not refused: its primal function is what
  the network computes at init, and the NTK uses its own derivative (here exact)."""
  k_custom = _kernel(Net(lambda s, h: _custom_vjp_stop(h)))
  k_plain = _kernel(Net(lambda s, h: jnp.tanh(h)))
  np.testing.assert_allclose(k_custom.ntk, k_plain.ntk, rtol=1e-5)


@pytest.mark.parametrize("phi", [jnp.sqrt, jnp.log, lambda h: jnp.sqrt(h) + jnp.tanh(h)],
                         ids=["sqrt", "log", "sqrt_plus_tanh"])
def test_nonlinearity_undefined_on_part_of_the_line_raises(phi):
  # A Gaussian field takes every real value: sqrt / log of it has no expectation
  # (quadrature used to return a NaN kernel without a word).
  with pytest.raises(im.InfiniteWidthError) as info:
    _kernel(_Activation(phi))
  message = str(info.value)
  assert "undefined (NaN)" in message and "Gaussian" in message, message
  assert "monte_carlo_kernel_fn" in message, message


def test_nonlinearity_defined_everywhere_is_not_refused():
  k = _kernel(_Activation(lambda h: jnp.sqrt(h * h + 1e-3)))
  assert np.all(np.isfinite(np.asarray(k.nngp))) and np.all(np.isfinite(np.asarray(k.ntk)))


class _Activation(nn.Module):
  phi: object

  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(self.phi(nn.Dense(8)(x)))
