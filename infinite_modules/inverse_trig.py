"""arcsin and arccos as vectorisable polynomials (the kernels' hottest transcendentals).

XLA's CPU backend evaluates `atan2` (and so `jnp.arccos` / `jnp.arcsin`,
which it lowers to `atan2`) one element at a time, ~13 ns per entry on our
2-core benchmark machine, while `exp`, `erf` and `sqrt` run vectorised at
~0.3-0.5 ns. Every ReLU-family kernel needs one arccos per moment entry and
layer, so that scalar call dominated the run time of whole networks. Here
both are polynomials plus one square root, which XLA fuses and vectorises.

Argument reduction, for |x| <= 1:
  |x| <= 1/2:  arcsin x = sign(x) A(|x|),          arccos x = pi/2 - arcsin x,
  |x| >  1/2:  s = sqrt((1 - |x|) / 2) <= 1/2,
               arcsin x = sign(x) (pi/2 - 2 A(s)),  arccos x = 2 A(s) (x > 0)
                                                              pi - 2 A(s) (x < 0),
where A(s) = s + s z P(z), z = s^2 in [0, 1/4], approximates arcsin on
[0, 1/2]. 1 - |x| is exact in floating point for |x| >= 1/2, so arccos keeps
full relative accuracy as x -> 1 (where it goes to 0). P is the Chebyshev
interpolant of (arcsin(sqrt z) / sqrt z - 1) / z, fitted in 50-digit
arithmetic by `scripts/fit_arcsin.py`: relative error of A below 5e-18 with
degree 12 (float64) and below 1e-9 with degree 5 (float32 and narrower), so
the results are within rounding of the exact values. |x| > 1 gives NaN, as
`jnp.arcsin` does.

Derivatives are the exact ones, +-1 / sqrt(1 - x^2) (infinite at +-1, as for
`jnp.arccos`; the kernels' own custom derivatives handle those points).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Monomial coefficients of P, lowest degree first (scripts/fit_arcsin.py).
_P_DOUBLE = (0.16666666666666669, 0.07499999999998433, 0.04464285714635543,
             0.030381944138531247, 0.02237217294214989, 0.017352392720869973,
             0.013971212973552933, 0.011479177415184906, 0.01032281435018578,
             0.005457506718640358, 0.01740087944269402, -0.014851887071247204,
             0.028757851367421566)
_P_SINGLE = (0.16666666337430908, 0.07500094543497424, 0.04459940152851218,
             0.03110066273549457, 0.017149238357677253, 0.03369084720283012)


def _reduced(x):
  """(A, small): A = arcsin |x| where small (|x| <= 1/2), else arcsin sqrt((1 - |x|) / 2)."""
  magnitude = jnp.abs(x)
  small = magnitude <= 0.5
  z = jnp.where(small, x * x, (1 - magnitude) / 2)
  s = jnp.where(small, magnitude, jnp.sqrt(z))
  coefficients = _P_DOUBLE if jnp.finfo(x.dtype).bits > 32 else _P_SINGLE
  p = jnp.full_like(z, coefficients[-1])
  for c in reversed(coefficients[:-1]):
    p = p * z + c
  return s + s * (z * p), small


def _checked(x):
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.result_type(float))
  return x


def arcsin_value(x):
  """`arcsin` without its derivative rule: for the body of a function that has its own
  (`jax.custom_jvp` never differentiates a body, and each nested custom_jvp is traced
  into a jaxpr of its own, which the first call of a kernel pays for once per layer)."""
  x = _checked(x)
  a, small = _reduced(x)
  return jnp.sign(x) * jnp.where(small, a, math.pi / 2 - 2 * a)


def arccos_value(x):
  """`arccos` without its derivative rule (see `arcsin_value`)."""
  x = _checked(x)
  a, small = _reduced(x)
  large = jnp.where(x > 0, 2 * a, math.pi - 2 * a)
  return jnp.where(small, math.pi / 2 - jnp.where(x < 0, -a, a), large)


@jax.custom_jvp
def arcsin(x):
  """arcsin(x) for x in [-1, 1], elementwise, within rounding of the exact value."""
  return arcsin_value(x)


@jax.custom_jvp
def arccos(x):
  """arccos(x) for x in [-1, 1], elementwise, within rounding of the exact value."""
  return arccos_value(x)


def _slope(x):
  return 1 / jnp.sqrt((1 - x) * (1 + x))


@arcsin.defjvp
def _arcsin_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  return arcsin(x), _slope(x) * dx


@arccos.defjvp
def _arccos_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  return arccos(x), -_slope(x) * dx
