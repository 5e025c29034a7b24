"""Gaussian expectations of elementwise functions: closed forms and quadrature.

For a pair (u, v) of jointly Gaussian pre-activations with variances `va`,
`vb`, covariance `c` (and means `ma`, `mb`), an elementwise layer phi maps
the second moment c to E[phi(u) phi(v)] (the NNGP) and multiplies the NTK by
E[phi'(u) phi'(v)] (Jacot et al. 2018; Lee et al. 2018).

Known phi have closed forms (`CORES`); a fused chain of elementwise
primitives is matched against them as `a * f(s * z) + b` by `recognize`,
which fits (a, s, b) from a few values and derivatives of phi and then
verifies the fit on many probe points, so a misidentification cannot pass.
Every other phi uses quadrature, with phi' from automatic differentiation:
smooth phi a piecewise Gauss-Legendre rule cut where phi changes fastest
(`smooth_rule`; 1e-10 relative in float64, ~1e-6 in float32, for variances
1e-4..1e2), or Gauss-Hermite with a fixed number of points when asked for;
phi with kinks or jumps piecewise Gauss-Legendre split at their breakpoints.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from infinite_modules import inverse_trig

# None: the piecewise rule of stated accuracy (`smooth_rule`); an int n: n-point Gauss-Hermite.
QUADRATURE_POINTS = None
_TINY = 1e-30


# Derivatives at the edge of a domain. sqrt(g) and arccos(rho) have infinite
# derivatives where g = 0 and rho = +-1, which are minima of g >= 0 and
# extrema of rho in [-1, 1]: there the inner derivative (g', rho') vanishes
# whenever it exists, so the chain rule's product is 0 (at a kink, such as
# |x1 - x2| between coincident inputs, 0 is the symmetric subgradient).
# Naive autodiff forms inf * 0 = NaN instead (Neural Tangents issue #88).

@jax.custom_jvp
def safe_sqrt(x):
  """sqrt(max(x, 0)) with derivative 0 (not inf or NaN) where x <= 0."""
  return jnp.sqrt(jnp.maximum(x, 0.0))


@safe_sqrt.defjvp
def _safe_sqrt_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  y = safe_sqrt(x)
  positive = y > 0
  return y, jnp.where(positive, dx / (2 * jnp.where(positive, y, 1.0)), 0.0)


def _sqrt_value(x):
  """`safe_sqrt` without its derivative rule, for bodies of custom_jvp functions (which
  are never differentiated; a nested custom_jvp is traced into a jaxpr of its own)."""
  return jnp.sqrt(jnp.maximum(x, 0.0))


def _correlation(c, va, vb, same=None):
  """(rho, sqrt(va vb)); rho is exactly 1 where `same` (a pair of one point with itself).

  Rounding makes c / sqrt(va vb) = 1 - O(eps) at such pairs, and the arccos
  kernels turn that into an O(sqrt(eps)) error (3e-4 in float32).
  """
  # sqrt of each side, not of their product: va and vb are per-input arrays
  # broadcast against c, so this costs O(n) square roots instead of O(n^2).
  norm = safe_sqrt(va) * safe_sqrt(vb)
  if isinstance(same, np.ndarray) and same.all():
    # Every entry pairs a point with itself (a variance): rho is the constant 1, and the
    # arc cosines of it are a few scalar operations, not a polynomial per entry.
    return np.ones(np.shape(same), jnp.result_type(c)), norm
  # A division, not c times per-side reciprocal square roots: XLA does not duplicate a
  # division into its consumers, so rho is one materialized array per layer. With a
  # product, XLA fused each layer's correlation into the next layer's kernels, every
  # layer's program recomputing the chain of all layers before it: compile time grew
  # quadratically with depth (2.2 s against 0.47 s for 10 x [Dense 512, relu]).
  rho = jnp.where(norm > 0, c / jnp.where(norm > 0, norm, 1.0), 0.0)
  rho = jnp.clip(rho, -1.0, 1.0)
  if same is not None:
    rho = jnp.where(same, jnp.ones_like(rho), rho)
  return rho, norm


@jax.custom_jvp
def arccos_j0(rho):
  """J_0(rho) = (pi - arccos rho) / (2 pi) = E[1{u>0} 1{v>0}] for correlation rho.

  Its derivative 1 / (2 pi sqrt(1 - rho^2)) is taken as 0 at rho = +-1 (see above).
  """
  # pi - arccos(rho) = arccos(-rho), which keeps its relative accuracy near rho = -1.
  return inverse_trig.arccos_value(-jnp.clip(rho, -1.0, 1.0)) / (2 * math.pi)


@arccos_j0.defjvp
def _arccos_j0_jvp(primals, tangents):
  (rho,), (drho,) = primals, tangents
  gap = 1 - rho * rho
  inside = gap > 0
  slope = jnp.where(inside, 1 / (2 * math.pi * jnp.sqrt(jnp.where(inside, gap, 1.0))), 0.0)
  return arccos_j0(rho), slope * drho


@jax.custom_jvp
def arccos_j1(rho):
  """J_1(rho) = (sqrt(1 - rho^2) + (pi - arccos rho) rho) / (2 pi)
  = E[relu(u) relu(v)] for unit variances and correlation rho (Cho & Saul 2009).

  Its derivative is exactly J_0(rho) (Price's theorem), finite at rho = +-1,
  where the two infinite terms of the naive derivative cancel.
  """
  rho = jnp.clip(rho, -1.0, 1.0)
  return (_sqrt_value(1 - rho * rho) + inverse_trig.arccos_value(-rho) * rho) / (2 * math.pi)


@arccos_j1.defjvp
def _arccos_j1_jvp(primals, tangents):
  (rho,), (drho,) = primals, tangents
  return arccos_j1(rho), arccos_j0(rho) * drho


@jax.custom_jvp
def arccos_j01(rho):
  """(J_0(rho), J_1(rho)) from one square root and one arc tangent.

  With s = sqrt((1 - rho)(1 + rho)) and theta = arccos(rho), J_0 = (pi -
  theta) / (2 pi) and J_1 = (s + (pi - theta) rho) / (2 pi): the NNGP and the
  NTK of a ReLU layer share both (`inverse_trig.arccos` is a polynomial: XLA's
  CPU `atan2`, behind `jnp.arccos`, runs one element at a time). The reflected
  values follow without more: J_0(-rho) = 1/2 - J_0(rho) and
  J_1(-rho) = J_1(rho) - rho / 2. Derivatives as for `arccos_j0`/`arccos_j1`.
  """
  rho = jnp.clip(rho, -1.0, 1.0)
  s = _sqrt_value((1 - rho) * (1 + rho))
  rest = inverse_trig.arccos_value(-rho)  # = pi - arccos(rho)
  return rest / (2 * math.pi), (s + rest * rho) / (2 * math.pi)


@arccos_j01.defjvp
def _arccos_j01_jvp(primals, tangents):
  (rho,), (drho,) = primals, tangents
  j0, j1 = arccos_j01(rho)
  gap = (1 - rho) * (1 + rho)
  inside = gap > 0
  slope = jnp.where(inside, 1 / (2 * math.pi * jnp.sqrt(jnp.where(inside, gap, 1.0))), 0.0)
  return (j0, j1), (slope * drho, j0 * drho)


# --------------------------------------------------------------------------
# Closed forms. Each core f has kappa = E[f(u) f(v)], dkappa = E[f'(u) f'(v)]
# and mean = E[f(u)] for zero-mean (u, v) with covariance [[va, c], [c, vb]].
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ReluPair:
  """f(z) = p * z for z > 0 and n * z for z < 0: relu, leaky_relu, abs.

  With f = p relu(z) - n relu(-z) and E[relu(u) relu(-v)] = |u||v| J_1(-rho):
  kappa = sqrt(va vb) ((p^2 + n^2) J_1(rho) - 2 p n J_1(-rho)) and
  dkappa = (p^2 + n^2) J_0(rho) + 2 p n J_0(-rho).
  """
  p: float
  n: float
  # kappa / dkappa take `same`: where rho is exactly 1 (see `_correlation`).
  correlation_based = True

  def kappa(self, c, va, vb, same=None):
    rho, norm = _correlation(c, va, vb, same)
    p, n = self.p, self.n
    return norm * ((p * p + n * n) * arccos_j1(rho) - 2 * p * n * arccos_j1(-rho))

  def dkappa(self, c, va, vb, same=None):
    rho, _ = _correlation(c, va, vb, same)
    p, n = self.p, self.n
    return (p * p + n * n) * arccos_j0(rho) + 2 * p * n * arccos_j0(-rho)

  def kappa_dkappa(self, c, va, vb, same=None):
    """(kappa, dkappa) sharing the correlation and its two transcendentals
    (`arccos_j01`); the reflected terms vanish for relu (n = 0) and are skipped."""
    rho, norm = _correlation(c, va, vb, same)
    j0, j1 = arccos_j01(rho)
    p, n = self.p, self.n
    kappa, dkappa = _times(p * p + n * n, j1), _times(p * p + n * n, j0)
    if p * n != 0:
      kappa = kappa - 2 * p * n * (j1 - rho / 2)
      dkappa = dkappa + 2 * p * n * (0.5 - j0)
    return norm * kappa, dkappa

  def mean(self, v):
    return (self.p - self.n) * safe_sqrt(v) / math.sqrt(2 * math.pi)

  def __call__(self, z):
    return jnp.where(z > 0, self.p * z, self.n * z)


@dataclasses.dataclass(frozen=True)
class Erf:
  """f = erf: E[f f] = 2/pi arcsin(2c / sqrt((1 + 2va)(1 + 2vb))) (Williams 1997)."""

  def kappa(self, c, va, vb):
    rho = jnp.clip(2 * c / jnp.sqrt((1 + 2 * va) * (1 + 2 * vb)), -1, 1)
    return 2 / np.pi * inverse_trig.arcsin(rho)

  def dkappa(self, c, va, vb):
    return 4 / np.pi / jnp.sqrt(jnp.maximum((1 + 2 * va) * (1 + 2 * vb) - 4 * c * c, _TINY))

  def mean(self, v):
    return jnp.zeros_like(v)

  def __call__(self, z):
    return jax.lax.erf(z)


@dataclasses.dataclass(frozen=True)
class Sign:
  """f = sign: E[f f] = 2/pi arcsin(rho) = 4 J_0(rho) - 1; f' = 0 almost everywhere."""
  correlation_based = True

  def kappa(self, c, va, vb, same=None):
    rho, _ = _correlation(c, va, vb, same)
    return 4 * arccos_j0(rho) - 1

  def dkappa(self, c, va, vb, same=None):
    return jnp.zeros_like(c)

  def mean(self, v):
    return jnp.zeros_like(v)

  def __call__(self, z):
    return jnp.sign(z)


@dataclasses.dataclass(frozen=True)
class Sin:
  """f = sin: E[sin u sin v] = exp(-(va + vb)/2) sinh(c); f' = cos."""

  def kappa(self, c, va, vb):
    return jnp.exp(-(va + vb) / 2) * jnp.sinh(c)

  def dkappa(self, c, va, vb):
    return jnp.exp(-(va + vb) / 2) * jnp.cosh(c)

  def mean(self, v):
    return jnp.zeros_like(v)

  def __call__(self, z):
    return jnp.sin(z)


@dataclasses.dataclass(frozen=True)
class Cos:
  """f = cos: E[cos u cos v] = exp(-(va + vb)/2) cosh(c); f' = -sin."""

  def kappa(self, c, va, vb):
    return jnp.exp(-(va + vb) / 2) * jnp.cosh(c)

  def dkappa(self, c, va, vb):
    return jnp.exp(-(va + vb) / 2) * jnp.sinh(c)

  def mean(self, v):
    return jnp.exp(-v / 2)

  def __call__(self, z):
    return jnp.cos(z)


@dataclasses.dataclass(frozen=True)
class Exp:
  """f = exp: E[e^u e^v] = exp((va + vb)/2 + c); f' = f."""

  def kappa(self, c, va, vb):
    return jnp.exp((va + vb) / 2 + c)

  def dkappa(self, c, va, vb):
    return self.kappa(c, va, vb)

  def mean(self, v):
    return jnp.exp(v / 2)

  def __call__(self, z):
    return jnp.exp(z)


@dataclasses.dataclass(frozen=True)
class Gelu:
  """f(z) = z Phi(z) (exact GELU).

  E[f(u) f(v)] follows from writing Phi(u) = P(g <= u) for an independent
  standard normal g and applying Stein's lemma to E[u v 1{u-g>0} 1{v-h>0}].

  E[f'(u) f'(v)] with f' = Phi + z phi, a = va + 1, b = vb + 1 and
  D = a b - c^2 (> 0 always):
    E[Phi(u) Phi(v)]        = 1/4 + arcsin(c / sqrt(a b)) / (2 pi)   (orthant)
    E[Phi(u) v phi(v)]      = c / (2 pi b sqrt(D))     (tilt by phi(v), then Stein)
    E[u phi(u) Phi(v)]      = c / (2 pi a sqrt(D))
    E[u phi(u) v phi(v)]    = c / (2 pi D^(3/2))       (Gaussian integral)
  Every denominator is >= 1, so all of it is smooth at correlation +-1.
  """

  def kappa(self, c, va, vb):
    a1, b1 = va + 1, vb + 1
    orthant = 0.25 + inverse_trig.arcsin(jnp.clip(c / jnp.sqrt(a1 * b1), -1, 1)) / (2 * np.pi)
    cond_t = jnp.maximum(b1 - c * c / a1, _TINY)
    cond_s = jnp.maximum(a1 - c * c / b1, _TINY)
    term_s = va / jnp.sqrt(2 * np.pi * a1) * (vb - c * c / a1) / jnp.sqrt(2 * np.pi * cond_t)
    term_t = c / jnp.sqrt(2 * np.pi * b1) * (c / b1) / jnp.sqrt(2 * np.pi * cond_s)
    return c * orthant + term_s + term_t

  def dkappa(self, c, va, vb):
    a1, b1 = va + 1, vb + 1
    det = a1 * b1 - c * c
    orthant = 0.25 + inverse_trig.arcsin(c / jnp.sqrt(a1 * b1)) / (2 * math.pi)
    root = jnp.sqrt(det)
    cross = c / (2 * math.pi * root) * (1 / a1 + 1 / b1)
    return orthant + cross + c / (2 * math.pi * det * root)

  def mean(self, v):
    return v / jnp.sqrt(2 * np.pi * (1 + v))

  def __call__(self, z):
    return z * 0.5 * jax.lax.erfc(-z / math.sqrt(2))


# --------------------------------------------------------------------------
# Quadrature
# --------------------------------------------------------------------------

@__import__("functools").lru_cache(maxsize=None)
def _hermite(points: int):
  """Nodes and weights for E[g(xi)], xi ~ N(0, 1) (probabilists' Hermite)."""
  nodes, weights = np.polynomial.hermite_e.hermegauss(points)
  return nodes, weights / np.sqrt(2 * np.pi)


def _conditional(c, va, vb):
  """(sqrt(va), slope, resid) with u - ma = sqrt(va) x and
  v - mb = slope x + resid y for independent standard normal x, y."""
  sa = safe_sqrt(va)
  slope = jnp.where(sa > 0, c / jnp.where(sa > 0, sa, 1.0), 0.0)
  return sa, slope, safe_sqrt(vb - slope * slope)


def pair_expectation(fa: Callable, fb: Callable, c, va, vb, ma, mb,
                     points: int | None = QUADRATURE_POINTS):
  """E[fa(u) fb(v)] for (u, v) Gaussian with means ma, mb, fa and fb smooth.

  `fa`, `fb` map arrays of shape `batch + (q,)` elementwise (their
  location-dependent constants broadcast against the trailing axis).
  u = ma + sqrt(va) x, v = mb + (c / sqrt(va)) x + sqrt(vb - c^2/va) y.
  `points=None` integrates x and y with `smooth_rule` (stated accuracy, see
  there); an int uses that many Gauss-Hermite points per dimension.
  """
  (total,) = pair_expectations(((fa, fb),), c, va, vb, ma, mb, points)
  return total


def pair_expectations(pairs, c, va, vb, ma, mb, points: int | None = QUADRATURE_POINTS):
  """(E[fa(u) fb(v)] for (fa, fb) in pairs) as `pair_expectation`, from one rule.

  The nodes and weights depend only on the moments (and the rule), so the
  NNGP's E[phi phi] and the NTK's E[phi' phi'] share them: building the rule,
  not evaluating phi, is most of the smooth rule's cost.
  """
  if points is None:
    return pair_expectations_smooth(pairs, c, va, vb, ma, mb)
  nodes, weights = _hermite(points)
  dtype = jnp.result_type(c, va, vb)
  nodes, weights = jnp.asarray(nodes, dtype), jnp.asarray(weights, dtype)
  sa, slope, resid = _conditional(c, va, vb)
  expand = lambda t: jnp.asarray(t)[..., None]

  def one_outer(totals, node):
    x, w = node
    u = expand(ma + sa * x)
    v = expand(mb + slope * x) + expand(resid) * nodes
    return tuple(total + w * fa(u)[..., 0] * jnp.sum(fb(v) * weights, axis=-1)
                 for total, (fa, fb) in zip(totals, pairs)), None

  shape = jnp.broadcast_shapes(*(jnp.shape(t) for t in (c, va, vb, ma, mb)))
  # A scan over the outer nodes keeps memory at O(batch * q) and the compiled
  # program small (an unrolled loop over q nodes compiles very slowly).
  zeros = tuple(jnp.zeros(shape, dtype) for _ in pairs)
  totals, _ = jax.lax.scan(one_outer, zeros, (nodes, weights))
  return totals


# --------------------------------------------------------------------------
# Piecewise quadrature for phi with kinks or jumps
# --------------------------------------------------------------------------
# Gauss-Hermite converges slowly on functions that are not smooth (relu of a
# shifted input: ~1e-3; a step derivative: worse). Such phi are built from
# primitives that switch (max, min, abs, sign, comparisons, clamp), so their
# breakpoints are the roots of the switching arguments, found numerically per
# location. The standard normal line is then cut at fixed panel edges and at
# the breakpoints, and each piece integrated with Gauss-Legendre: every piece
# is smooth, so the rule converges spectrally (~1e-10 on kinked functions,
# measured against adaptive quadrature).

# Per precision (float32 / float64): fixed piece edges in standard deviations,
# Gauss-Legendre points per piece, and the extra outer edges around a smoothed
# kink (in units of its width). Measured worst relative errors over shifted /
# capped relu, elu and hard_swish at correlations up to 0.9999: ~1e-7 / ~1e-10.
# The pair and single rules for kinked phi now use the smooth rule's edges and points
# with the kinks added (`pair_expectations_piecewise`); these remain the defaults of
# `standard_normal_rule` (and the pair-law grid's, `pairlaw.py`).
PIECE_EDGES = {32: (-9.0, -3.0, 0.0, 3.0, 9.0), 64: (-9.0, -3.0, -1.0, 0.0, 1.0, 3.0, 9.0)}
PIECE_POINTS = {32: 8, 64: 12}
_SMOOTHED_KINK_EDGES = {32: (-2.0, 2.0), 64: (-4.0, -1.0, 1.0, 4.0)}
_LIMIT = 9.0                                            # integrate over +- 9 std
_BISECTIONS = {32: 25, 64: 50}                          # grid cell / 2^n: below the dtype's eps
_ROOT_GRID = 129                                        # grid that brackets the roots
_ROOTS_OF_NON_MONOTONE_SWITCH = 2


@__import__("functools").lru_cache(maxsize=None)
def _legendre(points: int):
  return np.polynomial.legendre.leggauss(points)


def _bits(dtype) -> int:
  return 64 if jnp.finfo(dtype).bits > 32 else 32


def standard_normal_rule(breaks, dtype, edges=None, points=None):
  """Nodes and weights (shape `breaks.shape[:-1] + (N,)`) for E[g(xi)], xi ~ N(0, 1),
  exact for g smooth between consecutive `breaks` (standardized; non-finite = none):
  Gauss-Legendre with `points` per piece between the fixed `edges` (default: per
  dtype) and the breaks, within +- edges[-1]."""
  edges = PIECE_EDGES[_bits(dtype)] if edges is None else edges
  points = PIECE_POINTS[_bits(dtype)] if points is None else points
  lim = edges[-1]
  breaks = jnp.where(jnp.isfinite(breaks), jnp.clip(breaks, -lim, lim), lim)
  edges = jnp.broadcast_to(jnp.asarray(edges, dtype), breaks.shape[:-1] + (len(edges),))
  for k in range(breaks.shape[-1]):
    edges = _insert(edges, breaks[..., k:k + 1].astype(dtype))
  return _gaussian_legendre(edges, points, dtype)


def _gaussian_legendre(edges, points: int, dtype):
  """Gauss-Legendre nodes (`points` per piece) between consecutive sorted `edges` (last
  axis), with the standard normal density folded into the weights, flattened."""
  g, w = (jnp.asarray(t, dtype) for t in _legendre(points))
  lo, hi = edges[..., :-1, None], edges[..., 1:, None]
  half = (hi - lo) / 2
  x = lo + half * (g + 1)
  weights = half * w * jnp.exp(-x * x / 2) / math.sqrt(2 * math.pi)
  flat = x.shape[:-2] + (x.shape[-2] * x.shape[-1],)
  return x.reshape(flat), weights.reshape(flat)


def _insert(edges, value):
  """Inserts `value` (..., 1) into the sorted last axis of `edges`: with min/max
  only (XLA's sort of millions of short rows is far slower on CPU)."""
  big = jnp.full_like(value, jnp.inf)
  before = jnp.concatenate([-big, edges], axis=-1)
  after = jnp.concatenate([edges, big], axis=-1)
  return jnp.maximum(before, jnp.minimum(after, value))


def _first_changes(change, centre, roots: int):
  """Indices of the `roots` sign changes nearest the centre (argmin, not argsort)."""
  key = jnp.where(change, centre, jnp.inf)
  picks = []
  for _ in range(roots):
    k = jnp.argmin(key, axis=-1)
    picks.append(k)
    key = jnp.where(jnp.arange(key.shape[-1]) == k[..., None], jnp.inf, key)
  return jnp.stack(picks, axis=-1)


def switch_points(switches, m, s, dtype):
  """Roots t of each switching function g(t) within m +- 9 s, shape `m.shape + (K,)`.

  `switches` are pairs (g, monotone): a monotone g has at most one root, others
  get up to `_ROOTS_OF_NON_MONOTONE_SWITCH` (those nearest the mean). Sign
  changes on a grid are refined by bisection; missing roots are +inf. `g` maps
  arrays of shape `m.shape + (q,)` elementwise, like the functions integrated.
  """
  m, s = jnp.asarray(m, dtype), jnp.asarray(s, dtype)
  lim = _LIMIT
  grid = jnp.linspace(-lim, lim, _ROOT_GRID, dtype=dtype)
  centre = jnp.abs(grid[1:] + grid[:-1]) / 2
  iters = _BISECTIONS[_bits(dtype)]
  at = lambda x: m[..., None] + s[..., None] * x
  out = []
  for g, monotone in switches:
    roots = 1 if monotone else _ROOTS_OF_NON_MONOTONE_SWITCH
    positive = g(at(grid)) > 0
    change = positive[..., 1:] != positive[..., :-1]
    order = _first_changes(change, centre, roots)
    found = jnp.take_along_axis(change, order, axis=-1)
    lo, hi = grid[order], grid[order + 1]
    lo_positive = jnp.take_along_axis(positive[..., :-1], order, axis=-1)

    def bisect(_, bracket, g=g, lo_positive=lo_positive):
      lo, hi = bracket
      mid = (lo + hi) / 2
      same = (g(at(mid)) > 0) == lo_positive
      return jnp.where(same, mid, lo), jnp.where(same, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, bisect, (lo, hi))
    out.append(jnp.where(found, at((lo + hi) / 2), jnp.inf))
  return jnp.concatenate(out, axis=-1)


def _standardize(points, centre, scale):
  """(points - centre) / scale, +inf where scale is zero or the point is missing (+inf).

  Missing points are replaced before the arithmetic: inf / scale would give the
  gradient w.r.t. scale inf * 0 = NaN even where the result is masked.
  """
  centre, scale = jnp.asarray(centre)[..., None], jnp.asarray(scale)[..., None]
  keep = (scale != 0) & jnp.isfinite(points)
  safe = jnp.where(scale != 0, scale, 1.0)
  return jnp.where(keep, (jnp.where(keep, points, 0.0) - centre) / safe, jnp.inf)


def pair_expectation_piecewise(fa: Callable, fb: Callable, c, va, vb, ma, mb, breaks_a, breaks_b):
  """E[fa(u) fb(v)] as `pair_expectation`, for fa / fb smooth except at the points
  `breaks_a` / `breaks_b` (shape batch + (K,), in the units of u / v)."""
  (total,) = pair_expectations_piecewise(((fa, fb),), c, va, vb, ma, mb, breaks_a, breaks_b)
  return total


def pair_expectations_piecewise(pairs, c, va, vb, ma, mb, breaks_a, breaks_b):
  """(E[fa(u) fb(v)] for (fa, fb) in pairs) as `pair_expectation_piecewise`, from one rule:
  every fa must be smooth except at `breaks_a`, every fb except at `breaks_b` (the NNGP's
  (phi, phi) and the NTK's (phi', phi') share the breaks of phi).

  Outer variable x (u = ma + sa x): Gauss-Legendre between the fixed `PIECE_EDGES`, fa's
  breaks and the breaks the inner integral inherits; inner variable y (v = mb + slope x
  + resid y): the same rule between the edges and fb's breaks, rebuilt at every outer
  node (where the breaks sit in y depends on x) by a sort-free merge: fb's breaks are
  sorted once per entry, and (b - centre) / resid keeps their order.
  """
  dtype = jnp.result_type(c, va, vb)
  sa, slope, resid = _conditional(c, va, vb)
  shape = jnp.broadcast_shapes(*(jnp.shape(t) for t in (c, va, vb, ma, mb)))
  bcast = lambda t: jnp.broadcast_to(t, shape)
  ma, mb, sa, slope, resid = (bcast(jnp.asarray(t, dtype)) for t in (ma, mb, sa, slope, resid))
  breaks_a = jnp.broadcast_to(breaks_a, shape + breaks_a.shape[-1:]).astype(dtype)
  breaks_b = jnp.broadcast_to(breaks_b, shape + breaks_b.shape[-1:]).astype(dtype)
  # Between its kinks phi is smooth, and its smooth parts vary fastest near phi's origin
  # like the smooth phi's (elu's e^u): the rule is `pair_expectations_smooth`'s (edges,
  # points, phi's smooth breaks on both variables) with the kinks added. With only the
  # kinks and `PIECE_EDGES`, float32 missed elu's E[phi' phi'] by 4e-4 at variance 100.
  smooth = jnp.broadcast_to(jnp.asarray(SMOOTH_BREAKS, dtype), shape + (len(SMOOTH_BREAKS),))
  # Outer variable x: fa kinks at (a - ma) / sa; as the inner variance vanishes,
  # the inner integral inherits fb's kinks at (b - mb) / slope.
  inherited = _standardize(breaks_b, mb, slope)
  # ...smoothed over a width w = resid / |slope| (nearly a kink when u and v are
  # strongly correlated): extra edges at x* +- w, +- 4 w resolve that transition.
  width = (resid / jnp.where(slope != 0, jnp.abs(slope), 1.0))[..., None]
  outer_breaks = jnp.concatenate(
      [_standardize(breaks_a, ma, sa), inherited, _standardize(smooth, ma, sa),
       _standardize(smooth, mb, slope)]
      + [inherited + k * width for k in _SMOOTHED_KINK_EDGES[_bits(dtype)]], axis=-1)
  edges, points = SMOOTH_EDGES[_bits(dtype)], SMOOTH_POINTS[_bits(dtype)]
  xs, wxs = standard_normal_rule(outer_breaks, dtype, edges, points)
  ascending = _sorted_columns(jnp.concatenate([breaks_b, smooth], axis=-1))

  inner_rule = lambda centre: _rule_between(
      edges, [_standardize_one(b, centre, resid, edges[-1]) for b in ascending], points,
      dtype, shape)
  return _outer_scan(pairs, xs, wxs, ma, sa, mb, slope, resid, inner_rule, shape, dtype)


def _sorted_columns(values):
  """The last axis of `values` sorted ascending, as a list of arrays: an odd-even
  transposition network of min / max (K rounds for K columns; K is a handful of
  breaks, and XLA's sort of many short rows is slow on CPU)."""
  cols = [values[..., k] for k in range(values.shape[-1])]
  for round_ in range(len(cols)):
    for k in range(round_ % 2, len(cols) - 1, 2):
      cols[k], cols[k + 1] = jnp.minimum(cols[k], cols[k + 1]), jnp.maximum(cols[k], cols[k + 1])
  return cols


def _standardize_one(point, centre, scale, lim):
  """(point - centre) / scale clipped to +-lim; +lim where the point is missing (+inf)
  or the scale is zero (no break: the variable is constant). Increasing in `point`."""
  keep = (scale > 0) & jnp.isfinite(point)
  safe = jnp.where(scale > 0, scale, 1.0)
  return jnp.where(keep, jnp.clip((jnp.where(keep, point, 0.0) - centre) / safe, -lim, lim), lim)


def _rule_between(edges, breaks, points: int, dtype, shape):
  """`standard_normal_rule` for breaks given as a list of ascending arrays (of `shape`)
  already standardized and clipped to +-edges[-1]: Gauss-Legendre with `points` per
  piece between the sorted union of `edges` and `breaks` (shape `shape + (N,)`)."""
  merged = [jnp.broadcast_to(jnp.asarray(e, dtype), shape) for e in _merge_sorted(edges, breaks)]
  pieces = [_gaussian_legendre_piece(lo, hi, points, dtype)
            for lo, hi in itertools.pairwise(merged)]
  return tuple(jnp.concatenate(t, axis=-1) for t in zip(*pieces))


def expectation_piecewise(f: Callable, v, m, breaks):
  """E[f(u)] for u ~ N(m, v), f smooth except at `breaks` (batch + (K,)): `smooth_rule`'s
  pieces (f's smooth parts, e.g. elu's e^u) cut at the breaks too."""
  dtype = jnp.result_type(v)
  s = safe_sqrt(v)
  shape = jnp.broadcast_shapes(jnp.shape(v), jnp.shape(m), breaks.shape[:-1])
  smooth = jnp.broadcast_to(jnp.asarray(SMOOTH_BREAKS, dtype), shape + (len(SMOOTH_BREAKS),))
  breaks = jnp.concatenate([jnp.broadcast_to(breaks, shape + breaks.shape[-1:]).astype(dtype),
                            smooth], axis=-1)
  xs, ws = standard_normal_rule(_standardize(breaks, m, s), dtype, SMOOTH_EDGES[_bits(dtype)],
                                SMOOTH_POINTS[_bits(dtype)])
  return jnp.sum(f(jnp.asarray(m)[..., None] + s[..., None] * xs) * ws, axis=-1)


def expectation(f: Callable, v, m, points: int | None = QUADRATURE_POINTS):
  """E[f(u)] for u ~ N(m, v), f smooth: by `smooth_rule` (points=None) or
  `points`-point Gauss-Hermite; `f` as in `pair_expectation`."""
  if points is None:
    dtype = jnp.result_type(v)
    m = jnp.broadcast_to(jnp.asarray(m, dtype), jnp.shape(v))
    s = safe_sqrt(v)
    xs, ws = smooth_rule(m, s, dtype)
    return jnp.sum(f(m[..., None] + s[..., None] * xs) * ws, axis=-1)
  nodes, weights = _hermite(points)
  dtype = jnp.result_type(v)
  nodes, weights = jnp.asarray(nodes, dtype), jnp.asarray(weights, dtype)
  u = jnp.asarray(m)[..., None] + safe_sqrt(v)[..., None] * nodes
  return jnp.sum(f(u) * weights, axis=-1)


# --------------------------------------------------------------------------
# Smooth phi to a stated accuracy
# --------------------------------------------------------------------------
# Gauss-Hermite converges like exp(-d sqrt(2n)) for an integrand analytic in
# the strip |Im x| < d of the standardized variable x. tanh, sigmoid, silu and
# softplus have poles at Im u = pi/2 or pi in their own units u = sd * x, so
# d shrinks like 1 / sd: 48 points are 4e-6 off for tanh at variance 1 and
# 1e-2 at variance 4 (tests/test_quadrature_accuracy.py). These functions
# vary fastest within a few units of u = 0 and tend to polynomials (constants,
# lines) far from it; so the line is cut at fixed Gaussian panel edges (in
# standard deviations, `SMOOTH_EDGES`) and at u = 0, +-1, +-3, +-9 (in phi's own
# units, growing like the distance over which phi approaches a polynomial;
# a break at +-27 changed no error by more than rounding), and each piece is
# integrated with Gauss-Legendre. Where phi is nearly polynomial over +-9 std
# (small variances) the Gaussian panels alone limit the accuracy, so their
# width, not the number of phi breaks, sets the points per piece. Measured
# against float64 references over variances 1e-4..1e2, means 0..2 and
# correlations -1..1: <= 1e-10 relative (of sqrt(E phi(u)^2 E phi(v)^2)) in
# float64 with 12 points per piece (worst 6e-11), and ~1e-6 in float32 with 7
# (worst 1.7e-6; float32 rounding of the sums is of the same order; the
# Gaussian mass beyond 6 std, 2e-9, is below float32's resolution). Points per
# piece are at the edge: 11 (float64) / 6 (float32) miss the target by 4x / 3x.
# A phi whose fast variation lies far from 0 (|u| >> 10, e.g. tanh(u - 50))
# gets wider pieces there and less accuracy.
SMOOTH_BREAKS = (-9.0, -3.0, -1.0, 0.0, 1.0, 3.0, 9.0)
SMOOTH_EDGES = {32: (-6.0, -2.0, 0.0, 2.0, 6.0), 64: (-8.0, -2.5, 0.0, 2.5, 8.0)}
SMOOTH_POINTS = {32: 7, 64: 12}


def smooth_rule(m, s, dtype):
  """Nodes and weights (shape `m.shape + (N,)`) for E[g(xi)], xi ~ N(0, 1), where
  g(xi) = f(m + s xi) and f is smooth with its fast variation near f's origin:
  Gauss-Legendre with `SMOOTH_POINTS` per piece between the `SMOOTH_EDGES` and f's
  `SMOOTH_BREAKS` (standardized)."""
  m, s = jnp.asarray(m, dtype), jnp.asarray(s, dtype)
  shape = jnp.broadcast_shapes(m.shape, s.shape)
  pieces = _smooth_pieces(jnp.broadcast_to(m, shape), jnp.broadcast_to(s, shape), dtype)
  return tuple(jnp.concatenate(t, axis=-1) for t in zip(*pieces))


def _smooth_pieces(m, s, dtype):
  """`smooth_rule` as a list of (nodes, weights), one pair (shape `m.shape + (q,)`) per
  piece: elementwise arithmetic only (the edges by `_merge_sorted`). The inner rule
  is rebuilt at every outer node, where a `jnp.sort` of each short row, or inserting
  the edges one by one with concatenations, took most of the time on CPU."""
  edges = SMOOTH_EDGES[_bits(dtype)]
  lim = edges[-1]
  safe = jnp.where(s > 0, s, 1.0)
  # phi's breaks in standard deviations, ascending (s > 0); all at +lim where s = 0.
  breaks = [jnp.where(s > 0, jnp.clip((b - m) / safe, -lim, lim), lim) for b in SMOOTH_BREAKS]
  merged = _merge_sorted(edges, breaks)
  return [_gaussian_legendre_piece(lo, hi, SMOOTH_POINTS[_bits(dtype)], dtype)
          for lo, hi in itertools.pairwise(merged)]


def _merge_sorted(constants, arrays):
  """The sorted union of ascending `constants` (floats) and ascending `arrays` (a list
  of equally shaped arrays), as a list of arrays: the k-th smallest of two sorted lists
  a, b is min over i of max(a[i-1], b[k-i]) (i elements taken from a)."""
  n, m = len(constants), len(arrays)
  merged = []
  for k in range(n + m):
    best = None
    for i in range(max(0, k + 1 - m), min(k + 1, n) + 1):
      j = k - i                                  # take i constants and k + 1 - i arrays
      a = constants[i - 1] if i > 0 else None
      b = arrays[j] if j >= 0 else None
      both = b if a is None else (jnp.maximum(b, a) if b is not None else a)
      best = both if best is None else jnp.minimum(best, both)
    merged.append(best)
  return merged


def _gaussian_legendre_piece(lo, hi, points: int, dtype):
  """Gauss-Legendre nodes and weights (shape `lo.shape + (points,)`) on [lo, hi] with
  the standard normal density folded into the weights."""
  g, w = (jnp.asarray(t, dtype) for t in _legendre(points))
  lo, hi = jnp.asarray(lo, dtype)[..., None], jnp.asarray(hi, dtype)[..., None]
  half = (hi - lo) / 2
  x = lo + half * (g + 1)
  return x, half * w * jnp.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def pair_expectations_smooth(pairs, c, va, vb, ma, mb):
  """(E[fa(u) fb(v)] for (fa, fb) in pairs) as `pair_expectations`, with `smooth_rule`
  for both variables.

  Outer variable x (u = ma + sa x): cut where u or the inner mean
  mb + slope x crosses a smooth break, since E[fb(v) | x] inherits fb's fast
  variation there when v is nearly determined by x.
  """
  dtype = jnp.result_type(c, va, vb)
  sa, slope, resid = _conditional(c, va, vb)
  shape = jnp.broadcast_shapes(*(jnp.shape(t) for t in (c, va, vb, ma, mb)))
  bcast = lambda t: jnp.broadcast_to(jnp.asarray(t, dtype), shape)
  ma, mb, sa, slope, resid = (bcast(t) for t in (ma, mb, sa, slope, resid))
  at = jnp.broadcast_to(jnp.asarray(SMOOTH_BREAKS, dtype), shape + (len(SMOOTH_BREAKS),))
  breaks = jnp.concatenate([_standardize(at, ma, sa), _standardize(at, mb, slope)], axis=-1)
  xs, wxs = standard_normal_rule(breaks, dtype, SMOOTH_EDGES[_bits(dtype)],
                                 SMOOTH_POINTS[_bits(dtype)])

  inner_rule = lambda centre: smooth_rule(centre, resid, dtype)
  return _outer_scan(pairs, xs, wxs, ma, sa, mb, slope, resid, inner_rule, shape, dtype)


def _outer_scan(pairs, xs, wxs, ma, sa, mb, slope, resid, inner_rule, shape, dtype):
  """(E[fa(u) fb(v)] for (fa, fb) in pairs) by a scan over the outer nodes x (u = ma + sa x,
  weights wxs): at each, the inner rule `inner_rule(centre)` -> (ys, wys) for v = centre +
  resid y, centre = mb + slope x (v given u), so the inner pieces follow the outer node."""

  def one_outer(totals, node):
    x, wx = node
    u = (ma + sa * x)[..., None]
    centre = mb + slope * x
    ys, wys = inner_rule(centre)
    v = centre[..., None] + resid[..., None] * ys
    return tuple(total + wx * fa(u)[..., 0] * jnp.sum(fb(v) * wys, axis=-1)
                 for total, (fa, fb) in zip(totals, pairs)), None

  zeros = tuple(jnp.zeros(shape, dtype) for _ in pairs)
  totals, _ = jax.lax.scan(one_outer, zeros,
                           (jnp.moveaxis(xs, -1, 0), jnp.moveaxis(wxs, -1, 0)))
  return totals


def derivative(f: Callable) -> Callable:
  """The elementwise derivative of an elementwise function."""
  return lambda z: jax.jvp(f, (z,), (jnp.ones_like(z),))[1]


# --------------------------------------------------------------------------
# Recognition of phi = a * f(s * z) + b
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Affine:
  """phi = a * core(s * z) + b with a known closed-form core."""
  core: object
  a: float
  s: float
  b: float


def _probe_points():
  t = np.concatenate([np.geomspace(1e-3, 6.0, 24), [0.37, 1.0, 2.5]])
  return np.concatenate([-t[::-1], [0.0], t])


def recognize(phi: Callable[[jax.Array], jax.Array], dtype) -> Affine | None:
  """Matches a location-independent scalar function against the closed forms.

  Fits `a * core(s * z) + b` for each known core from phi's value and
  derivatives at a few points, then checks the fit at ~55 probe points with a
  tolerance at the dtype's precision. Returns None if nothing matches.
  """
  with jax.ensure_compile_time_eval():  # probes are concrete even inside a jit trace
    return _recognize(phi, dtype)


def _recognize(phi, dtype) -> Affine | None:
  f64 = jnp.dtype(dtype) == jnp.float64
  # Pointwise relative tolerance of the fit: far above rounding and the fitted
  # parameters' error (~1e-7 in float32), far below the distance to a lookalike
  # (tanh-approximated GELU differs from exact GELU by 2e-4 relative and more).
  rtol = 1e-9 if f64 else 1e-5
  z = _probe_points().astype(dtype)
  d1 = lambda g: (lambda x: jax.jvp(g, (x,), (jnp.ones_like(x),))[1])

  def probes():
    """phi on the probe points, phi and its first 4 derivatives at 0, phi(+-1)."""
    at0 = jnp.zeros((1,), dtype)
    derivs, g = [phi(at0)], phi
    for _ in range(4):
      g = d1(g)
      derivs.append(g(at0))
    return phi(z), jnp.concatenate(derivs), phi(jnp.asarray([1.0, -1.0], dtype))

  try:
    # One compiled program: evaluated op by op, the probes cost a dispatch (and a
    # first-time compilation) per primitive, most of a small model's first call.
    values, derivs, at_ones = (np.asarray(a, np.float64) for a in _run_compiled(probes))
  except Exception:  # noqa: BLE001  (phi not evaluable on probes: not a closed form)
    return None
  if not np.all(np.isfinite(values)):
    return None
  derivs = [float(t) for t in derivs]
  zz = np.asarray(z, np.float64)
  val = lambda x: float(at_ones[0] if x == 1.0 else at_ones[1])

  def check(candidate: Affine) -> Affine | None:
    core = np.asarray(candidate.core(jnp.asarray(candidate.s * zz, dtype)), np.float64)
    fitted = candidate.a * core + candidate.b
    # Relative to the terms summed (a * core + b may cancel to ~0).
    size = np.abs(candidate.a * core) + abs(candidate.b) + np.abs(values)
    return candidate if np.all(np.abs(fitted - values) <= rtol * size + _TINY) else None

  v0, v1, v2, v3, v4 = derivs
  candidates = []
  p, n = val(1.0) - v0, -(val(-1.0) - v0)
  candidates.append(Affine(ReluPair(p, n), 1.0, 1.0, v0))
  candidates.append(Affine(Sign(), val(1.0) - v0, 1.0, v0))
  if v1 != 0 and -v3 / v1 > 0:
    s = math.sqrt(-v3 / (2 * v1))  # a erf(s z): f'(0) = 2as/sqrt(pi), f'''(0) = -4as^3/sqrt(pi)
    candidates.append(Affine(Erf(), v1 * math.sqrt(math.pi) / (2 * s), s, v0))
    s = math.sqrt(-v3 / v1)  # a sin(s z): f' = as, f''' = -as^3
    candidates.append(Affine(Sin(), v1 / s, s, v0))
  if v2 != 0 and -v4 / v2 > 0:
    s = math.sqrt(-v4 / v2)  # a cos(s z): f'' = -as^2, f'''' = as^4
    a = -v2 / s ** 2
    candidates.append(Affine(Cos(), a, s, v0 - a))
  if v1 != 0 and v2 != 0:
    s = v2 / v1  # a exp(s z): f' = as, f'' = as^2
    a = v1 / s
    candidates.append(Affine(Exp(), a, s, v0 - a))
    s = v2 / v1 * math.sqrt(2 * math.pi) / 4  # a gelu(s z): f' = as/2, f'' = 2as^2/sqrt(2pi)
    if s > 0:
      candidates.append(Affine(Gelu(), 2 * v1 / s, s, v0))
  for candidate in candidates:
    if not all(math.isfinite(t) for t in (candidate.a, candidate.s, candidate.b)):
      continue
    found = check(candidate)
    if found is not None:
      return found
  return None


def _run_compiled(fn, *args):
  """fn(*args) as one compiled program run now, with concrete results even inside
  a trace (a `jax.jit` call there would be staged into the surrounding trace)."""
  return jax.jit(fn).lower(*args).compile()(*args)


def first_undefined_point(phi, dtype) -> float | None:
  """A point z (0 < |z| <= 30) where phi(z) is NaN, or None.

  A Gaussian field takes every real value, so phi must be defined on the whole
  line (`sqrt` or `log` of a field are not): quadrature would otherwise return a
  NaN kernel, or a wrong one where no node happens to land on the bad region.
  Overflow to +-inf (exp of a large z) is not flagged: far tails carry no weight.
  """
  magnitudes = np.geomspace(1e-6, 30.0, 600)
  grid = np.concatenate([-magnitudes[::-1], magnitudes]).astype(dtype)
  with jax.ensure_compile_time_eval():
    try:
      values = np.asarray(_run_compiled(phi, grid), np.float64)
    except Exception:  # noqa: BLE001  (not evaluable on its own: checked where it is used)
      return None
  values = np.broadcast_to(values, grid.shape)
  bad = np.isnan(values)
  return float(grid[np.argmax(bad)]) if np.any(bad) else None


def kinks_only_at_zero(switches, dtype) -> bool:
  """Whether every switching function changes sign at most at z = 0, on a grid
  reaching |z| = 1e12.

  The probes of `recognize` span |z| <= 6; a kink beyond them (relu6 =
  min(relu(z), 6)) would otherwise pass for relu. The known cores have kinks
  only at 0.
  """
  magnitudes = np.geomspace(1e-6, 1e12, 400)
  grid = np.stack([magnitudes, -magnitudes]).astype(dtype)  # numpy: concrete inside a trace
  with jax.ensure_compile_time_eval():
    for g in switches:
      try:
        values = np.asarray(_run_compiled(g, grid), np.float64)  # one program, not op by op
        values = np.broadcast_to(values, grid.shape)
      except Exception:  # noqa: BLE001  (not evaluable on its own: no closed form)
        return False
      positive = values > 0
      if np.any(positive[:, 1:] != positive[:, :-1]):
        return False
  return True


def _same_point(core, same) -> dict:
  """`same=` for cores that compute a correlation (only they lose accuracy at rho = 1)."""
  return {"same": same} if same is not None and getattr(core, "correlation_based", False) else {}


def _like(x, c):
  """x broadcast to c's shape (a function of a constant correlation is smaller)."""
  shape = jnp.broadcast_shapes(jnp.shape(x), jnp.shape(c))
  return x if jnp.shape(x) == shape else jnp.broadcast_to(x, shape)


def _times(factor, x):
  """factor * x, or x itself for the literal 1 (relu's Affine(core, 1, 1, 0)): nothing
  to trace, lower and compile; 1 * x == x exactly."""
  return x if isinstance(factor, (int, float)) and factor == 1 else factor * x


def affine_kappa(form: Affine, c, va, vb, ma, mb, same=None):
  """E[phi(u) phi(v)] for phi = a core(s z) + b and zero-mean (u, v).

  `same` (boolean, broadcasting against c) marks pairs of one point with
  itself, whose correlation is exactly 1.
  """
  del ma, mb
  s2 = form.s ** 2
  core = form.core
  k = core.kappa(s2 * c, s2 * va, s2 * vb, **_same_point(core, same))
  return _like(
      form.a ** 2 * k + form.a * form.b * (core.mean(s2 * va) + core.mean(s2 * vb)) + form.b ** 2,
      c)


def affine_dkappa(form: Affine, c, va, vb, same=None):
  """E[phi'(u) phi'(v)] = a^2 s^2 E[core'(s u) core'(s v)]."""
  s2 = form.s ** 2
  return _like(form.a ** 2 * s2 * form.core.dkappa(s2 * c, s2 * va, s2 * vb,
                                                   **_same_point(form.core, same)), c)


def affine_kappa_dkappa(form: Affine, c, va, vb, same=None):
  """(`affine_kappa`, `affine_dkappa`) for zero-mean (u, v) in one pass: cores with
  a `kappa_dkappa` method share their transcendentals between the two."""
  both = getattr(form.core, "kappa_dkappa", None)
  if both is None:
    return affine_kappa(form, c, va, vb, 0, 0, same), affine_dkappa(form, c, va, vb, same)
  s2 = form.s ** 2
  core = form.core
  k, dk = both(_times(s2, c), _times(s2, va), _times(s2, vb), **_same_point(core, same))
  kappa = _times(form.a ** 2, k)
  if form.b != 0:
    kappa = kappa + form.a * form.b * (core.mean(s2 * va) + core.mean(s2 * vb)) + form.b ** 2
  return _like(kappa, c), _like(_times(form.a ** 2 * s2, dk), c)


def affine_mean(form: Affine, v):
  mean = _times(form.a, form.core.mean(_times(form.s ** 2, v)))
  return mean if form.b == 0 else mean + form.b
