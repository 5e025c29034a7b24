"""`inverse_trig`: the polynomial arcsin / arccos match libm to within rounding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infinite_modules import inverse_trig


def _points(dtype):
  edge = np.logspace(-15 if dtype == np.float64 else -7, -1, 200)
  tiny = np.logspace(-300 if dtype == np.float64 else -37, -2, 100)
  x = np.concatenate([np.linspace(-1, 1, 40001), 1 - edge, -1 + edge, tiny, -tiny,
                      [0.0, 0.5, -0.5, np.nextafter(0.5, 1), np.nextafter(0.5, 0)]])
  return x.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["arcsin", "arccos"])
def test_within_two_ulp_of_libm(name, dtype):
  with jax.enable_x64(dtype == np.float64):
    x = _points(dtype)
    ours = np.asarray(jax.jit(getattr(inverse_trig, name))(jnp.asarray(x)))
    assert ours.dtype == dtype
    exact = getattr(np, name)(x.astype(np.float64))  # float64 libm: < 1 ulp of float64
    ulp = np.spacing(np.abs(exact).astype(dtype)).astype(np.float64)
    ulps = np.abs(ours.astype(np.float64) - exact) / ulp
    assert ulps.max() <= 2.5, (x[np.argmax(ulps)], ulps.max())


def test_range_edges_and_nan():
  x = jnp.asarray([-1.0, 1.0, 0.0, 1.5, -1.5])
  np.testing.assert_array_equal(np.asarray(inverse_trig.arccos(x))[:3],
                                np.float32([np.pi, 0.0, np.pi / 2]))
  np.testing.assert_array_equal(np.asarray(inverse_trig.arcsin(x))[:3],
                                np.float32([-np.pi / 2, np.pi / 2, 0.0]))
  assert np.isnan(np.asarray(inverse_trig.arccos(x))[3:]).all()
  assert np.isnan(np.asarray(inverse_trig.arcsin(x))[3:]).all()


def test_derivatives_are_the_exact_ones():
  with jax.enable_x64(True):
    x = jnp.linspace(-0.999, 0.999, 101)
    slope = 1 / np.sqrt(1 - np.asarray(x) ** 2)
    np.testing.assert_allclose(jax.vmap(jax.grad(inverse_trig.arcsin))(x), slope, rtol=1e-14)
    np.testing.assert_allclose(jax.vmap(jax.grad(inverse_trig.arccos))(x), -slope, rtol=1e-14)


def test_no_scalar_atan2_in_the_compiled_program():
  """The point of the module: XLA's CPU atan2 runs one element at a time."""
  text = jax.jit(inverse_trig.arccos).lower(jnp.zeros((8,), jnp.float32)).as_text()
  assert "atan2" not in text
