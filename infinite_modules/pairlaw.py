"""Pair laws of non-Gaussian fields (post-activation residual streams).

A matmul by a fresh weight Gaussianizes, so non-Gaussian fields arise only where
a field skips one: `s' = phi(s + y)` with `y` the output of a residual branch
(a G-var independent of `s`, Tensor Programs; Yang 2019-2021). The kernel of
`phi(s + y)` needs more than the covariance of `s`, but only its *pair laws*:
for every entry of a moment array (input a, input b, position p, position q)
the joint law of `(s(a, p), s(b, q))`, because E[phi(u_A) phi(u_B)] involves
the field at those two points only. The chain s -> phi(s + y) is Markov in
that pair, so pair laws can be propagated entry by entry.

Representation (`Mixture`): at each entry, a mixture of bivariate Gaussians
that share one covariance,

    law(u_A, u_B) = sum_i w_i N((a_i, b_i), [[va, c], [c, vb]]),

i.e. a discrete law (weighted particles) convolved with one Gaussian. A
Gaussian field is one particle at its mean; adding an independent Gaussian
field adds its covariance to the shared part (exact, no growth); adding an
independent non-Gaussian field takes all pairs of particles. A nonlinearity
replaces the mixture by its image under phi: each component is expanded on
a product Gauss-Legendre rule split at phi's kinks, mapped by phi, and the
resulting particles are merged into at most GRID x GRID cells (`compress`).

NTK. At infinite width the per-channel tangent product of a field,
T(A, B) = <d s(A)/d theta, d s(B)/d theta>, is a function of the channel's
G-vars; rules need only its conditional mean given (u_A, u_B). It is carried
on the particles (`t_i`, plus `theta` for the Gaussian part): an independent
branch adds its (deterministic) NTK, phi multiplies by phi'(u_A) phi'(u_B).
Cross terms between independent summands vanish at infinite width, as in
`add_independent`.

Accuracy and cost. Second moments and the NTK of phi(s + y) are expectations
over the mixture by a piecewise Gauss-Legendre rule per component (~30 x 25
nodes, split at phi's kinks: ~1e-5 relative on relu). For phi with two linear
pieces and a kink at 0 (relu, leaky_relu, abs: `gaussian_pieces.TwoSlopes`) the
inner integral (u_B given the outer node) is exact in closed form and only the
~30 outer nodes are summed. The compression keeps
weight, means, second moments and the expected tangent of the law exactly;
what it approximates is the shape of the law inside each cell. Against a
simulation of the infinite-width limit of a dense relu post-activation ResNet
(2e6 channels, noise ~1.5e-3) the NNGP agrees to ~2e-3 after one block and
~3e-3 after three, on the correlation scale (`tests/test_nongaussian.py`).
Cost per stream nonlinearity: (entries of the moment arrays) x GRID^2 x ~30
closed-form inner expectations for the moments (x ~750 evaluations of phi for
other phi), plus, where the pushed law is carried on (`push_compress`), binning
~750 quadrature particles per component (the cells need the law's shape, which
the closed-form moments do not give); memory bounded by `_CHUNK_PARTICLES`; the
XLA compile time of the kernel grows by seconds per block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from infinite_modules import expectations as ex
from infinite_modules.gaussian_pieces import TwoSlopes

# Cells per marginal of a compressed law; piece edges (in standard deviations)
# and Gauss-Legendre points per piece of the rule that expands a Gaussian
# component under a nonlinearity (worst relative error ~2e-5 on
# E[relu(u) relu(v)] of shifted correlated pairs, against a 40-point-per-piece rule).
GRID = 16
PIECE_EDGES = (-6.0, -2.5, 0.0, 2.5, 6.0)
PIECE_POINTS = 5
# Relative residual variance below which a law counts as lying on a line.
_LINE = 1e-4
# Cells have equal widths over +- _SPAN standard deviations of each coordinate (the
# ends take the tails), so the spread lost in each cell is about the same and the
# shared Gaussian part that receives it fits all components.
_SPAN = 3.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class Mixture:
  """Law of (u_A, u_B) at each entry of one moment array (entry shape E).

  Attributes:
    a, b, w: particle locations and weights, shape E + (K,); weights sum to 1.
    va, vb, c: the shared Gaussian part (variances, covariance), shape E.
    t, theta: conditional tangent product on the particles (E + (K,)) and the
      Gaussian part's NTK (E); None for arrays that carry no NTK (var1, var2).
  """
  a: jax.Array
  b: jax.Array
  w: jax.Array
  va: jax.Array
  vb: jax.Array
  c: jax.Array
  t: jax.Array | None = None
  theta: jax.Array | None = None

  @property
  def size(self) -> int:
    return self.a.shape[-1]

  def second_moment(self):
    """E[u_A u_B] = sum_i w_i a_i b_i + c."""
    return jnp.sum(self.w * self.a * self.b, axis=-1) + self.c

  def tangent(self):
    """E[T(A, B)] = sum_i w_i t_i + theta."""
    return jnp.sum(self.w * self.t, axis=-1) + self.theta

  def mean_a(self):
    return jnp.sum(self.w * self.a, axis=-1)


def gaussian(c, va, vb, ma, mb, theta=None) -> Mixture:
  """A Gaussian pair law: one particle at the means (ma, mb), covariance from c, va, vb."""
  shape = jnp.broadcast_shapes(*(jnp.shape(x) for x in (c, va, vb, ma, mb)))
  full = lambda x: jnp.broadcast_to(x, shape)
  one = lambda x: full(x)[..., None]
  dtype = jnp.result_type(c)
  return Mixture(
      a=one(ma), b=one(mb), w=jnp.ones(shape + (1,), dtype), va=full(va), vb=full(vb), c=full(c),
      t=None if theta is None else jnp.zeros(shape + (1,), dtype),
      theta=None if theta is None else full(theta))


def add(x: Mixture, y: Mixture, sign: float = 1.0) -> Mixture:
  """Law of u + sign * v for independent u ~ x, v ~ y (the NTKs add)."""
  k = x.size * y.size
  pairs = lambda p, q: (p[..., :, None] + q[..., None, :]).reshape(p.shape[:-1] + (k,))
  tangent = None if x.t is None else pairs(x.t, y.t)
  return compress(Mixture(
      a=pairs(x.a, sign * y.a), b=pairs(x.b, sign * y.b),
      w=(x.w[..., :, None] * y.w[..., None, :]).reshape(x.w.shape[:-1] + (k,)),
      va=x.va + y.va, vb=x.vb + y.vb, c=x.c + y.c,
      t=tangent, theta=None if x.theta is None else x.theta + y.theta))


def affine(x: Mixture, alpha_a, beta_a, alpha_b, beta_b) -> Mixture:
  """Law of (alpha_a u_A + beta_a, alpha_b u_B + beta_b): exact (coefficients per entry)."""
  ea = lambda v: jnp.asarray(v)[..., None]
  ab = alpha_a * alpha_b
  return Mixture(
      a=ea(alpha_a) * x.a + ea(beta_a), b=ea(alpha_b) * x.b + ea(beta_b), w=x.w,
      va=alpha_a * alpha_a * x.va, vb=alpha_b * alpha_b * x.vb, c=ab * x.c,
      t=None if x.t is None else ea(ab) * x.t, theta=None if x.theta is None else ab * x.theta)


def _rule(breaks, dtype):
  """Nodes and weights (shape breaks.shape[:-1] + (N,)) for E[g(xi)], xi ~ N(0, 1), with
  g smooth between consecutive `breaks` (standardized, +inf for none): Gauss-Legendre
  on the pieces between PIECE_EDGES and the breaks, within +- PIECE_EDGES[-1]."""
  return ex.standard_normal_rule(breaks, dtype, PIECE_EDGES, PIECE_POINTS)


def _roots(switches, centre, scale, dtype):
  """Standardized roots ((root - centre) / scale) of the switching functions near centre.

  `switches` holds (g, monotone, affine): the root of an affine g (relu, leaky relu,
  clamp, abs) is -g(0) / (g(1) - g(0)) everywhere, found without a search.
  """
  centre = jnp.asarray(centre)
  found = []
  searched = [(g, mono) for g, mono, affine in switches if not affine]
  for g, _, affine in switches:
    if affine:
      with jax.ensure_compile_time_eval():
        at0 = jnp.asarray(g(jnp.zeros((1,), dtype)), dtype)[0]
        slope = jnp.asarray(g(jnp.ones((1,), dtype)), dtype)[0] - at0
      root = jnp.where(slope != 0, -at0 / jnp.where(slope != 0, slope, 1.0), jnp.inf)
      found.append(jnp.broadcast_to(root, centre.shape)[..., None])
  if searched:
    found.append(ex.switch_points(searched, centre, scale, dtype))
  if not found:
    return jnp.zeros(centre.shape + (0,), dtype)
  roots = jnp.concatenate(found, axis=-1)
  return ex._standardize(roots, centre, scale)


def _outer(x: Mixture, switches_a, switches_b):
  """The outer half of `push`: each component written u_A = a + sa X,
  u_B = centre(X) + resid Y with centre(X) = b + slope X, and X on its rule.

  Returns (u, centre, resid, weight), each of shape E + (K, Nx): u_A at the X nodes,
  the conditional law of u_B given X (mean, standard deviation), and w_i times the X
  rule's weights."""
  dtype = jnp.result_type(x.a)
  sa, slope, resid = ex._conditional(x.c, x.va, x.vb)
  ek = lambda v: jnp.broadcast_to(jnp.asarray(v)[..., None], x.a.shape)
  sa, slope, resid = ek(sa), ek(slope), ek(resid)
  # X: fa's kinks, and fb's kinks as seen through X (the inner integral inherits
  # them when resid is small).
  outer = jnp.concatenate([_roots(switches_a, x.a, sa, dtype),
                           _roots(switches_b, x.b, jnp.abs(slope), dtype)
                           * jnp.sign(slope)[..., None]], axis=-1)
  xs, wx = _rule(outer, dtype)                                  # E + (K, Nx)
  u = x.a[..., None] + sa[..., None] * xs
  centre = x.b[..., None] + slope[..., None] * xs
  scale = jnp.broadcast_to(resid[..., None], centre.shape)
  return u, centre, scale, x.w[..., None] * wx


def push(x: Mixture, fa: Callable, fb: Callable, switches_a=(), switches_b=()) -> Mixture:
  """Law of (fa(u_A), fb(u_B)), every Gaussian component expanded into quadrature
  particles (not compressed: the particles' moments are the quadrature's
  expectations of fa(u_A) fb(u_B); `compress` the result to carry it on).

  Each component is written u_A = a + sa X, u_B = b + slope X + resid Y with X, Y
  independent standard normals; X and then Y (given X) are integrated piecewise
  between the kinks of fa / fb (roots of their `switches_*`: triples (g, monotone,
  affine in z) from `elementwise.switches`), so kinked phi (relu) converge like smooth ones.
  The tangent becomes fa'(u_A) fb'(u_B) (t + theta). `fa`, `fb` act elementwise
  on arrays of shape E + (K, ...) (location-independent phi).
  """
  dtype = jnp.result_type(x.a)
  u, centre, scale, wo = _outer(x, switches_a, switches_b)
  ys, wy = _rule(_roots(switches_b, centre, scale, dtype), dtype)  # E + (K, Nx, Ny)
  v = centre[..., None] + scale[..., None] * ys
  u = jnp.broadcast_to(u[..., None], v.shape)
  w = wo[..., None] * wy
  k = int(np.prod(v.shape[-3:]))
  flat = lambda arr: jnp.broadcast_to(arr, v.shape).reshape(v.shape[:-3] + (k,))
  t = None
  if x.t is not None:
    base = flat((x.t + x.theta[..., None])[..., None, None])
  u, v, w = flat(u), flat(v), flat(w)
  if x.t is not None:
    t = ex.derivative(fa)(u) * ex.derivative(fb)(v) * base
  zero = jnp.zeros_like(x.va)
  return Mixture(a=fa(u), b=fb(v), w=w, va=zero, vb=zero, c=zero, t=t,
                 theta=None if t is None else zero)


def _closed_sums(x: Mixture, fa: Callable, fb: Callable, inner: TwoSlopes, switches_a=(),
                 switches_b=()):
  """The per-entry sums of `push_moments` (E + (len(_SUMS),)) with the inner integral
  over Y given X in closed form (`gaussian_pieces`, fb = inner exactly): per X node
  E[fb], E[fb^2], E[fb'] of u_B ~ N(centre, resid^2), so the X rule alone is summed.
  Equal to the quadrature path up to that path's inner-rule error (its Y rule is
  truncated at +- PIECE_EDGES[-1] standard deviations: ~1e-8 relative)."""
  u, centre, scale, w = _outer(x, switches_a, switches_b)
  mean, second, slope = inner.conditional(centre, scale)
  # resid = 0: u_B is deterministic given X, as in the quadrature path (all Y nodes at
  # the centre); phi' there is fb's own derivative (its convention at the kink).
  point = scale > 0
  fc = fb(centre)
  mean = jnp.where(point, mean, fc)
  second = jnp.where(point, second, fc * fc)
  fu = fa(u)
  total = lambda v: jnp.sum(w * v, axis=(-2, -1))
  if x.t is None:
    t = jnp.zeros_like(x.va)
  else:
    slope = jnp.where(point, slope, ex.derivative(fb)(centre))
    base = (x.t + x.theta[..., None])[..., None]
    t = total(ex.derivative(fa)(u) * slope * base)
  cols = [jnp.sum(w, axis=(-2, -1)), total(fu), total(mean), total(fu * fu), total(second),
          total(fu * mean), t]
  return jnp.stack(cols, axis=-1)


def compress(x: Mixture, grid: int = GRID) -> Mixture:
  """Merges the particles into at most grid x grid cells per entry.

  Cells are a grid over the particles' coordinate a and residual
  r = b - slope a (equal widths over +- _SPAN standard deviations); a law on
  a line gets all grid^2 cells along a. Each nonempty cell keeps its total
  weight and the weighted means of (a, b, t); the spread lost inside the
  cells (sum_c w_c Cov_c, PSD) is added to the shared Gaussian part. Weight,
  means, second moments and the expected tangent are preserved exactly.
  """
  k = x.size
  cells = grid * grid
  if k <= cells:
    return x
  shape = x.a.shape[:-1]
  entries = int(np.prod(shape))
  a, b, w = (v.reshape(entries, k) for v in (x.a, x.b, x.w))
  w = jnp.broadcast_to(w, a.shape)

  moment = lambda u, v: jnp.sum(w * u * v, axis=-1, keepdims=True)
  mean_a, mean_b = moment(a, 1.0), moment(b, 1.0)
  var_a = jnp.maximum(moment(a, a) - mean_a * mean_a, 0)
  var_b = jnp.maximum(moment(b, b) - mean_b * mean_b, 0)
  slope = (moment(a, b) - mean_a * mean_b) / jnp.where(var_a > 0, var_a, 1.0)
  # Cells along a and along the residual r = b - slope a (aligned with the law); a
  # law concentrated on a line (two points of one input, or equal inputs) gets all
  # grid^2 cells along a.
  r = b - slope * a
  mean_r = moment(r, 1.0)
  var_r = jnp.maximum(moment(r, r) - mean_r * mean_r, 0)
  line = var_r <= _LINE * var_b
  along_a = jnp.where(line, cells, grid)
  along_r = cells // along_a

  def bins(u, mean, var, count):
    z = (u - mean) / jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 1.0)
    cell = jnp.floor((z + _SPAN) / (2 * _SPAN) * count)
    return jnp.clip(cell, 0, count - 1).astype(jnp.int32)

  ids = (jnp.arange(entries, dtype=jnp.int32)[:, None] * cells
         + bins(a, mean_a, var_a, along_a) * along_r + bins(r, mean_r, var_r, along_r)).ravel()
  columns = [w, w * a, w * b] + ([] if x.t is None else [w * x.t.reshape(entries, k)])
  # One scatter for all columns (separate ones compile several times slower on CPU).
  totals = jax.ops.segment_sum(jnp.stack([v.ravel() for v in columns], axis=-1), ids,
                               entries * cells)
  totals = totals.reshape(shape + (cells, len(columns)))
  weight = totals[..., 0]
  safe = jnp.where(weight > 0, weight, 1.0)
  centre_a, centre_b = totals[..., 1] / safe, totals[..., 2] / safe
  # The spread within the cells, sum_c w_c Cov_c (a PSD 2x2 matrix per entry), goes
  # into the shared Gaussian part: second moments are kept exactly as well.
  second = lambda u, v: jnp.sum(w * u * v, axis=-1).reshape(shape)
  kept = lambda u, v: jnp.sum(weight * u * v, axis=-1)
  return Mixture(
      a=centre_a, b=centre_b, w=weight,
      va=x.va + jnp.maximum(second(a, a) - kept(centre_a, centre_a), 0),
      vb=x.vb + jnp.maximum(second(b, b) - kept(centre_b, centre_b), 0),
      c=x.c + second(a, b) - kept(centre_a, centre_b),
      t=None if x.t is None else totals[..., 3] / safe, theta=x.theta)


# Particles (entries x components x quadrature nodes) one step of `push_moments` /
# `push_compress` expands at a time (~8 arrays of this size live at once). Laws with
# more are pushed in chunks of components by a `lax.scan`, so memory stays bounded
# (a conv ResNet's full-layout moments easily reach 1e9 particles); smaller ones in
# one piece, which is faster (one pass instead of two).
_CHUNK_PARTICLES = 1 << 23
# Columns of the per-entry particle sums of a pushed law (see `push_moments`).
_SUMS = ("w", "a", "b", "aa", "bb", "ab", "t")


def _per_component(x: Mixture, expand: Callable) -> int:
  """Nodes `expand` (a Mixture -> array of its expansion) makes of one component."""
  dtype = jnp.result_type(x.a)
  one = Mixture(*(jnp.zeros((1,) * n, dtype) for n in (2, 2, 2, 1, 1, 1)),
                t=None if x.t is None else jnp.zeros((1, 1), dtype),
                theta=None if x.t is None else jnp.zeros((1,), dtype))
  return int(np.prod(jax.eval_shape(expand, one).shape))


def _components_in_chunks(x: Mixture, per: int):
  """The flattened (entries, K) mixture split into chunks of components (each expanded
  into `per` nodes), for a scan: returns (scanned arrays of shape (chunks, entries,
  chunk), shared per-entry arrays, the chunk count)."""
  shape = x.a.shape[:-1]
  entries, k = int(np.prod(shape)), x.size
  chunk = int(max(1, min(k, _CHUNK_PARTICLES // max(1, entries * per))))
  count = -(-k // chunk)
  pad = count * chunk - k

  def split(v):  # E + (K,) -> (chunks, entries, chunk); padded components weigh 0
    v = jnp.broadcast_to(v, x.a.shape).reshape(entries, k)
    v = jnp.pad(v, ((0, 0), (0, pad)))
    return jnp.moveaxis(v.reshape(entries, count, chunk), 1, 0)

  scanned = [split(x.a), split(x.b), split(x.w)] + ([] if x.t is None else [split(x.t)])
  shared = [v.reshape(entries) for v in (x.va, x.vb, x.c)] + (
      [] if x.t is None else [x.theta.reshape(entries)])
  return scanned, shared, count


def _chunk(scanned, shared) -> Mixture:
  """The mixture of one chunk of components (see `_components_in_chunks`)."""
  tangent = len(scanned) == 4
  a, b, w = scanned[:3]
  va, vb, c = shared[:3]
  return Mixture(a, b, w, va, vb, c, scanned[3] if tangent else None,
                 shared[3] if tangent else None)


def _particle_sums(m: Mixture):
  """The `_SUMS` columns of a law's particles, E + (len(_SUMS),)."""
  t = jnp.zeros_like(m.a) if m.t is None else m.t
  cols = [m.w, m.w * m.a, m.w * m.b, m.w * m.a * m.a, m.w * m.b * m.b, m.w * m.a * m.b,
          m.w * t]
  return jnp.stack([jnp.sum(v, axis=-1) for v in cols], axis=-1)


def push_moments(x: Mixture, fa: Callable, fb: Callable, switches_a=(), switches_b=(),
                 inner: TwoSlopes | None = None):
  """Per-entry sums over the particles of `push(x, ...)`: a dict with
  w = sum w_i, a = sum w_i a_i, b, aa, bb, ab = sum w_i a_i b_i, t = sum w_i t_i
  (E[fa(u_A)], E[fa(u_A) fb(u_B)], the expected tangent, ...), computed without
  materializing the pushed particles (a scan over chunks of components).

  `inner`: fb's closed form if it has two linear pieces with a kink at 0 (relu,
  leaky_relu, abs; `homogeneous.two_slopes`): the integral over u_B given the
  outer node is then exact (`_closed_sums`) instead of a ~25-node rule."""
  shape = x.a.shape[:-1]
  if inner is None:
    per = _per_component(x, lambda m: push(m, fa, fb, switches_a, switches_b).a)
    sums = lambda m: _particle_sums(push(m, fa, fb, switches_a, switches_b))
  else:
    per = _per_component(x, lambda m: _outer(m, switches_a, switches_b)[0])
    sums = lambda m: _closed_sums(m, fa, fb, inner, switches_a, switches_b)
  scanned, shared, count = _components_in_chunks(x, per)

  if count == 1:
    total = sums(x)
    return {name: total[..., i] for i, name in enumerate(_SUMS)}

  def body(total, chunk):
    return total + sums(_chunk(chunk, shared)), None

  entries = int(np.prod(shape))
  total, _ = jax.lax.scan(body, jnp.zeros((entries, len(_SUMS)), jnp.result_type(x.a)),
                          scanned)
  return {name: total[:, i].reshape(shape) for i, name in enumerate(_SUMS)}


def push_compress(x: Mixture, fa: Callable, fb: Callable, switches_a=(), switches_b=(),
                  grid: int = GRID, inner: TwoSlopes | None = None) -> Mixture:
  """`compress(push(x, fa, fb, ...), grid)`. Beyond `_CHUNK_PARTICLES` particles, in
  two scans over chunks of components (the first for the pushed law's moments, which
  place the cells and give the second moments: with `inner`, fb's closed form, exact
  in the inner variable, see `push_moments`; the second bins the quadrature
  particles), so the particles are never all in memory. Same result up to the order
  of floating-point sums (and, with `inner`, the inner rule's error)."""
  shape = x.a.shape[:-1]
  entries = int(np.prod(shape))
  cells = grid * grid
  per = _per_component(x, lambda m: push(m, fa, fb, switches_a, switches_b).a)
  scanned, shared, count = _components_in_chunks(x, per)
  if x.size * per <= cells:
    return push(x, fa, fb, switches_a, switches_b)
  if count == 1:
    return compress(push(x, fa, fb, switches_a, switches_b), grid)
  sums = {k: v.reshape(entries, 1) for k, v in
          push_moments(x, fa, fb, switches_a, switches_b, inner).items()}
  mean_a, mean_b = sums["a"], sums["b"]
  var_a = jnp.maximum(sums["aa"] - mean_a * mean_a, 0)
  var_b = jnp.maximum(sums["bb"] - mean_b * mean_b, 0)
  slope = (sums["ab"] - mean_a * mean_b) / jnp.where(var_a > 0, var_a, 1.0)
  # r = b - slope a: its mean and variance follow from the sums.
  mean_r = mean_b - slope * mean_a
  var_r = jnp.maximum(sums["bb"] - 2 * slope * sums["ab"] + slope * slope * sums["aa"]
                      - mean_r * mean_r, 0)
  line = var_r <= _LINE * var_b
  along_a = jnp.where(line, cells, grid)
  along_r = cells // along_a
  tangent = x.t is not None
  ncols = 4 if tangent else 3
  base = jnp.arange(entries, dtype=jnp.int32)[:, None] * cells

  def bins(u, mean, var, count):
    z = (u - mean) / jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 1.0)
    cell = jnp.floor((z + _SPAN) / (2 * _SPAN) * count)
    return jnp.clip(cell, 0, count - 1).astype(jnp.int32)

  def body(total, chunk):
    m = push(_chunk(chunk, shared), fa, fb, switches_a, switches_b)
    a, b, w = m.a, m.b, m.w
    r = b - slope * a
    ids = base + bins(a, mean_a, var_a, along_a) * along_r + bins(r, mean_r, var_r, along_r)
    cols = [w, w * a, w * b] + ([w * m.t] if tangent else [])
    return total.at[ids.ravel()].add(jnp.stack([v.ravel() for v in cols], axis=-1)), None

  dtype = jnp.result_type(x.a)
  totals, _ = jax.lax.scan(body, jnp.zeros((entries * cells, ncols), dtype), scanned)
  totals = totals.reshape(shape + (cells, ncols))
  weight = totals[..., 0]
  safe = jnp.where(weight > 0, weight, 1.0)
  centre_a, centre_b = totals[..., 1] / safe, totals[..., 2] / safe
  second = lambda name: sums[name].reshape(shape)
  kept = lambda u, v: jnp.sum(weight * u * v, axis=-1)
  t = totals[..., 3] / safe if tangent else None
  return Mixture(
      a=centre_a, b=centre_b, w=weight,
      va=jnp.maximum(second("aa") - kept(centre_a, centre_a), 0),
      vb=jnp.maximum(second("bb") - kept(centre_b, centre_b), 0),
      c=second("ab") - kept(centre_a, centre_b), t=t,
      # The expected tangent is the moment scan's too (with `inner` it is exact in the
      # inner variable, the binned particles are not): the difference is a constant part.
      theta=second("t") - kept(t, 1.0) if tangent else None)


@dataclasses.dataclass(frozen=True, eq=False)
class PairLaw:
  """Pair laws of a root's variable z at every entry of its moment arrays
  (`nngp` with the NTK, `var1`, `var2`; same layout as the moments)."""
  nngp: Mixture
  var1: Mixture
  var2: Mixture

  def map(self, fn: Callable[[Mixture, str], Mixture]) -> PairLaw:
    return PairLaw(fn(self.nngp, "nngp"), fn(self.var1, "var1"), fn(self.var2, "var2"))

  def compress(self) -> PairLaw:
    """All three laws compressed (in one pass, see `stacked`)."""
    return self.stacked(compress)

  def push(self, f: Callable, switches=()) -> PairLaw:
    """The laws of phi(z), phi = f (location-independent) with its switches, uncompressed."""
    return self.stacked(lambda m: push(m, f, f, switches, switches))

  def push_compress(self, f: Callable, switches=(), inner: TwoSlopes | None = None) -> PairLaw:
    """The laws of phi(z), compressed (`push_compress`: never all particles in memory;
    `inner`: phi's closed form if it has one, see `push_moments`)."""
    return self.stacked(
        lambda m: push_compress(m, f, f, switches, switches, inner=inner))

  def push_moments(self, f: Callable, switches=(),
                   inner: TwoSlopes | None = None) -> tuple[dict, dict, dict]:
    """`push_moments` of the three laws (nngp, var1, var2) under phi = f, in one scan
    (`inner`: phi's closed form if it has one, see the function)."""
    merged = self._merged()
    if merged is None:
      return tuple(push_moments(m, f, f, switches, switches, inner) for m in self._parts())
    sums = push_moments(merged, f, f, switches, switches, inner)
    return tuple({k: take(v) for k, v in sums.items()} for take, _ in self._pieces())

  def stacked(self, fn: Callable[[Mixture], Mixture]) -> PairLaw:
    """Applies `fn` to the three laws at once: their entries are stacked into one
    mixture (with zero tangents for var1 / var2), so the program is traced and
    compiled once instead of three times."""
    merged = self._merged()
    if merged is None:
      return self.map(lambda m, _: fn(m))
    merged = fn(merged)
    out = []
    for take, tangent in self._pieces():
      out.append(Mixture(take(merged.a), take(merged.b), take(merged.w), take(merged.va),
                         take(merged.vb), take(merged.c), take(merged.t) if tangent else None,
                         take(merged.theta) if tangent else None))
    return PairLaw(*out)

  def _parts(self):
    return (self.nngp, self.var1, self.var2)

  def _merged(self) -> Mixture | None:
    """The three laws' entries stacked into one flat mixture (None if their sizes differ)."""
    parts = self._parts()
    k = self.nngp.size
    if any(m.size != k for m in parts):
      return None
    flat = lambda v, m: v.reshape((-1,) + v.shape[m.a.ndim - 1:])
    cat = lambda get: jnp.concatenate([flat(get(m), m) for m in parts])
    return Mixture(
        cat(lambda m: m.a), cat(lambda m: m.b), cat(lambda m: jnp.broadcast_to(m.w, m.a.shape)),
        cat(lambda m: m.va), cat(lambda m: m.vb), cat(lambda m: m.c),
        cat(lambda m: m.t if m.t is not None else jnp.zeros_like(m.a)),
        cat(lambda m: m.theta if m.theta is not None else jnp.zeros_like(m.va)))

  def _pieces(self):
    """Per law: a function taking its entries back out of a merged array, and whether
    the law carries a tangent."""
    out, start = [], 0
    for m in self._parts():
      shape = m.a.shape[:-1]
      stop = start + int(np.prod(shape))
      take = lambda v, start=start, stop=stop, shape=shape: v[start:stop].reshape(
          shape + v.shape[1:])
      out.append((take, m.t is not None))
      start = stop
    return out


class LazyLaw:
  """The pair law of one `Root`, computed when first asked for.

  It describes exactly the moment arrays it was attached with: a rule that
  changes a root's moments by `dataclasses.replace` without building a new
  law leaves a stale one behind, which `law_of` then ignores (the field is
  treated as of unknown law, and a nonlinearity of it raises).
  """

  def __init__(self, owner: tuple, build: Callable[[], PairLaw]):
    self._owner = owner
    self._build = build
    self._law = None

  def describes(self, root) -> bool:
    return all(x is y for x, y in zip(self._owner, (root.nngp, root.var1, root.var2)))

  def get(self) -> PairLaw:
    if self._law is None:
      self._law = self._build()
      self._build = None
    return self._law


def attach(root, build: Callable[[], PairLaw]):
  """`root` with the (lazily built) pair law of its variable."""
  return dataclasses.replace(root, law=LazyLaw((root.nngp, root.var1, root.var2), build))


def known(root) -> bool:
  """Whether the pair law of the root's variable is known (Gaussian, or attached and current)."""
  return root.gaussian or (root.law is not None and root.law.describes(root))


def law_of(root, full: bool) -> PairLaw | None:
  """The pair law of a root's variable z, or None if it is not tracked."""
  if root.law is not None and root.law.describes(root):
    return root.law.get()
  if not root.gaussian:
    return None
  from infinite_modules.moments import diag_of, pair_broadcast
  d = len(root.spatial)
  dtype = root.nngp.dtype
  means = []
  for var, mean in ((root.var1, root.mean1), (root.var2, root.mean2)):
    m = jnp.zeros((var.shape[0], *root.spatial), dtype) if mean is None else mean
    means.append((m, diag_of(var, d, full) - m * m))
  (m1, v1), (m2, v2) = means

  def one(arr, pa, pb, pair, theta=None):
    (ma, mb), (va, vb) = (pair_broadcast(pa[0], pb[0], d, full, pair),
                          pair_broadcast(pa[1], pb[1], d, full, pair))
    return gaussian(arr - ma * mb, va, vb, ma, mb, theta)

  return PairLaw(one(root.nngp, (m1, v1), (m2, v2), True, root.ntk),
                 one(root.var1, (m1, v1), (m1, v1), False),
                 one(root.var2, (m2, v2), (m2, v2), False))
