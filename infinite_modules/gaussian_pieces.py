"""One-dimensional Gaussian expectations of phi with two linear pieces and a kink at 0.

phi(z) = p z for z > 0 and n z for z < 0 (relu: p=1, n=0; leaky_relu: n = slope;
abs: n = -1; identity: p = n = 1) is what `homogeneous.relu_pair_form` reads off
the structure of a positively homogeneous phi. For V ~ N(c, s^2), s > 0, with
z = c / s, P = Phi(z), Q = Phi(-z), D = phi_N(z) (the standard normal cdf and density),

    E[V+]     = c P + s D              E[V-]     = -c Q + s D
    E[(V+)^2] = (c^2 + s^2) P + c s D  E[(V-)^2] = (c^2 + s^2) Q - c s D

(V+ = max(V, 0), V- = max(-V, 0), V+ V- = 0), so

    E[phi(V)]   = p E[V+] - n E[V-],
    E[phi(V)^2] = p^2 E[(V+)^2] + n^2 E[(V-)^2],
    E[phi'(V)]  = p P + n Q.

The pair-law path (`pairlaw.push_moments`) uses them for the inner integral over Y
given X of a Gaussian component (V = centre + resid Y), instead of a Gauss-Legendre
rule on ~25 nodes: exact, and ~25x fewer evaluations.

s -> 0: z = c / s is formed only where s > 0; at s = 0 it is +-inf by the sign of c
(P = 1 or 0, D = 0, so every product with s vanishes) and the forms reduce to
phi(c), phi(c)^2 and phi'(c) -- V is deterministic. At c = s = 0 they give 0, 0 and
the mean slope (p + n) / 2 (phi' is not defined at the kink; callers that must
match another convention there replace it).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

_SQRT_HALF = math.sqrt(0.5)


@dataclasses.dataclass(frozen=True)
class TwoSlopes:
  """phi(z) = p z for z > 0 and n z for z < 0 (exactly; p, n finite)."""
  p: float
  n: float

  def __call__(self, z):
    return self.p * jnp.maximum(z, 0) - self.n * jnp.maximum(-z, 0)

  def conditional(self, centre, scale):
    """(E[phi(V)], E[phi(V)^2], E[phi'(V)]) for V ~ N(centre, scale^2), scale >= 0,
    elementwise (see the module docstring for the forms and the scale -> 0 limit)."""
    c = jnp.asarray(centre)
    s = jnp.asarray(scale)
    positive = s > 0
    z = jnp.where(positive, c / jnp.where(positive, s, 1.0),
                  jnp.where(c > 0, jnp.inf, jnp.where(c < 0, -jnp.inf, 0.0)))
    # Phi(+-z) = erfc(-+z / sqrt 2) / 2: one erfc each, accurate to relative rounding in
    # both tails (ndtr evaluates erf and erfc and selects).
    big_p = 0.5 * jax.lax.erfc(-z * _SQRT_HALF)
    big_q = 0.5 * jax.lax.erfc(z * _SQRT_HALF)
    d = jnp.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    sd = s * d
    r2 = c * c + s * s
    # The true values are >= 0; the clips only remove rounding in the far tails.
    plus = jnp.maximum(c * big_p + sd, 0)
    minus = jnp.maximum(-c * big_q + sd, 0)
    plus2 = jnp.maximum(r2 * big_p + c * sd, 0)
    minus2 = jnp.maximum(r2 * big_q - c * sd, 0)
    p, n = self.p, self.n
    return p * plus - n * minus, p * p * plus2 + n * n * minus2, p * big_p + n * big_q
