"""Max pooling (`reduce_window_max`: `nn.max_pool`, `hk.max_pool`) and maxima over
positions (`reduce_max`, `jnp.max(x, axis=spatial)`) of an infinite-width field.

The pooled field m(A, p) = max_{q in window(p)} phi(z(A, q)) of a Gaussian z has no
closed-form kernel: E[m(A, p) m(B, p')] is an expectation over the joint Gaussian
of the two windows. It is estimated by Monte Carlo with a fixed seed, for each pair
of inputs (A, B) on SAMPLES joint draws of z at all positions of A and B:

    z_A = mu_A + L_A g1,    z_B = mu_B + S_BA S_AA^+ L_A g1 + L_{B|A} g2,

with L_A L_A^T = S_AA and L_{B|A} the factor of the conditional covariance (both by
eigendecomposition, so singular covariances are fine: for B = A, z_B = z_A exactly).
Common random numbers: the same draws (g1, g2) for every pair, so the variances of
one input (`var1`/`var2`) use exactly the draws of its side of each pair.

NTK. The derivative of a max is the indicator of its argmax (ties have probability
0): the tangent product of m(A, p) and m(B, p') is
phi'(z(A, i)) phi'(z(B, j)) Theta_z(A, B, i, j) at the argmax taps i, j, averaged on
the same draws: Theta_out = sum_ij E[1{argmax = i} phi'_i 1{argmax' = j} phi'_j] Theta_z(i, j).

Error. Each entry's estimate comes with its standard error (the sample standard
deviation of the per-draw products over sqrt(SAMPLES)); the step is marked on the
`Kernel` as estimated with a bound of STANDARD_ERRORS times the largest standard error
of its outputs (NNGP, NTK and variances).

The pooled field is not Gaussian: a following Dense/Conv Gaussianizes it exactly
through the (estimated) second moments; a following nonlinearity of a sum with an
independent field (the ResNet stem: max pool, then relu(x + f(x))) uses its pair
law, built from the same draws (each draw one particle, then `pairlaw.compress`).
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from infinite_modules import elementwise as ew
from infinite_modules import expectations as ex
from infinite_modules import moments as mo
from infinite_modules import pairlaw
from infinite_modules.interpreter import RULES
from infinite_modules.values import Field, Root

# Joint draws per pair of inputs, and the fixed seed (the estimate is deterministic).
SAMPLES = 1 << 13
SEED = 0
# The stated bound, in standard errors of the largest-error entry.
STANDARD_ERRORS = 4.0
# Eigenvalues below this fraction of the largest count as zero (singular covariances).
_RANK_TOL = 1e-7

HINT = ("Use nn.avg_pool / a mean over positions (exact), or "
        "`interop.monte_carlo_kernel_fn` for a Monte Carlo estimate of the whole model.")


def _windows(spatial, window, stride, padding, dilation):
  """Output spatial sizes and, per output position (flattened), the flat input
  positions of its window taps (-1 for taps in the padding): shape (P_out, W)."""
  axes_out, axes_taps = [], []
  for n, w, s, (lo, hi), dil in zip(spatial, window, stride, padding, dilation):
    span = dil * (w - 1) + 1
    out = (n + lo + hi - span) // s + 1
    if out < 1:
      raise ValueError("window larger than the padded input")
    pos = np.arange(out)[:, None] * s - lo + np.arange(w)[None, :] * dil   # (out, w)
    axes_out.append(out)
    axes_taps.append(np.where((pos >= 0) & (pos < n), pos, -1))
  rows = []
  for out_index in itertools.product(*(range(o) for o in axes_out)):
    taps = []
    for tap in itertools.product(*(range(t.shape[1]) for t in axes_taps)):
      coords = [axes_taps[k][out_index[k], tap[k]] for k in range(len(spatial))]
      taps.append(-1 if min(coords) < 0 else int(np.ravel_multi_index(coords, spatial)))
    rows.append(taps)
  return tuple(axes_out), np.asarray(rows, np.int32)


def _factor(cov):
  """(L, L^+T) with L L^T = cov (PSD part, by eigendecomposition) and L^+T the
  pseudo-inverse transpose restricted to the non-negligible eigenvalues."""
  lam, vec = jnp.linalg.eigh((cov + cov.T) / 2)
  keep = lam > _RANK_TOL * jnp.maximum(jnp.max(lam), 0) + jnp.finfo(cov.dtype).tiny
  root = jnp.sqrt(jnp.where(keep, lam, 0))
  return vec * root, vec * jnp.where(keep, 1 / jnp.where(keep, root, 1), 0)


@dataclasses.dataclass(frozen=True)
class _Pool:
  """The window structure and phi of one max pooling."""
  taps: np.ndarray           # (P_out, W), -1 for padding
  phi: object
  dphi: object

  def pooled(self, z):
    """max over each window of phi(z) (draws, P) -> (draws, P_out), and the one-hot
    argmax times phi' at it, (draws, P_out, W)."""
    valid = self.taps >= 0
    safe = np.where(valid, self.taps, 0)
    y = jnp.where(valid, self.phi(z)[:, safe], -jnp.inf)
    k = jnp.argmax(y, axis=-1)
    d = jnp.take_along_axis(self.dphi(z)[:, safe], k[..., None], axis=-1)
    onehot = jax.nn.one_hot(k, self.taps.shape[1], dtype=z.dtype) * d
    return jnp.max(y, axis=-1), onehot


def _draws(dtype, positions):
  g = jax.random.normal(jax.random.key(SEED), (SAMPLES, 2 * positions), dtype)
  return g[:, :positions], g[:, positions:]


def _pair(pool: _Pool, g1, g2, mu_a, cov_aa, mu_b, cov_bb, cov_ab, theta_ab):
  """Samples of the pooled field of one pair of inputs: (m_A, e_A, m_B, e_B, t) with
  t the per-draw tangent product (draws, P_out, P_out) (None without theta)."""
  la, inv_t = _factor(cov_aa)
  za = mu_a + g1 @ la.T
  coupling = cov_ab.T @ inv_t                      # S_BA S_AA^+ L_A
  lc, _ = _factor(cov_bb - coupling @ coupling.T)
  zb = mu_b + g1 @ coupling.T + g2 @ lc.T
  ma, ea = pool.pooled(za)
  mb, eb = pool.pooled(zb)
  t = None
  if theta_ab is not None:
    safe = np.where(pool.taps >= 0, pool.taps, 0)
    theta = theta_ab[safe][:, :, safe]               # (P_out, W, P_out, W)
    t = jnp.einsum("npqj,nqj->npq", jnp.einsum("npk,pkqj->npqj", ea, theta), eb)
  return ma, mb, t


def _mean_and_error(x):
  """Sample mean over axis 0 and its standard error."""
  n = x.shape[0]
  mean = jnp.mean(x, axis=0)
  var = jnp.maximum(jnp.mean(x * x, axis=0) - mean * mean, 0)
  return mean, jnp.sqrt(var * n / (n - 1) / n)


def max_pool_root(root: Root, pool: _Pool, out_spatial) -> tuple[Root, jax.Array]:
  """The moments of the pooled field (full layout) and the standard-error bound."""
  dtype = root.nngp.dtype
  p_in = int(np.prod(root.spatial))
  p_out = int(np.prod(out_spatial))
  n1, n2 = root.var1.shape[0], root.var2.shape[0]
  flat = lambda arr, lead: arr.reshape(arr.shape[:lead] + (p_in, p_in))
  nngp, ntk = flat(root.nngp, 2), flat(root.ntk, 2)
  var1, var2 = flat(root.var1, 1), flat(root.var2, 1)
  mean = lambda m, n: (jnp.zeros((n, p_in), dtype) if m is None else m.reshape(n, p_in))
  mu1, mu2 = mean(root.mean1, n1), mean(root.mean2, n2)
  cov1 = var1 - mu1[:, :, None] * mu1[:, None, :]
  cov2 = var2 - mu2[:, :, None] * mu2[:, None, :]
  g1, g2 = _draws(dtype, p_in)

  def cross(ab):
    a, b = ab // n2, ab % n2
    cov_ab = nngp[a, b] - mu1[a][:, None] * mu2[b][None, :]
    ma, mb, t = _pair(pool, g1, g2, mu1[a], cov1[a], mu2[b], cov2[b], cov_ab, ntk[a, b])
    second, se = _mean_and_error(ma[:, :, None] * mb[:, None, :])
    tangent, se_t = _mean_and_error(t)
    return second, tangent, jnp.maximum(jnp.max(se), jnp.max(se_t))

  def own(mu, cov):
    def one(i):
      ma, _, _ = _pair(pool, g1, g2, mu[i], cov[i], mu[i], cov[i], cov[i], None)
      second, se = _mean_and_error(ma[:, :, None] * ma[:, None, :])
      return second, jnp.mean(ma, axis=0), jnp.max(se)
    return one

  out_nngp, out_ntk, se = jax.lax.map(cross, jnp.arange(n1 * n2))
  v1, m1, se1 = jax.lax.map(own(mu1, cov1), jnp.arange(n1))
  v2, m2, se2 = jax.lax.map(own(mu2, cov2), jnp.arange(n2))
  shape = lambda arr, lead: arr.reshape(lead + out_spatial + out_spatial)
  out = dataclasses.replace(
      root, nngp=shape(out_nngp, (n1, n2)), ntk=shape(out_ntk, (n1, n2)),
      var1=shape(v1, (n1,)), var2=shape(v2, (n2,)),
      mean1=m1.reshape((n1,) + out_spatial), mean2=m2.reshape((n2,) + out_spatial),
      spatial=tuple(out_spatial), gaussian=False, gathered_from=None, law=None)
  error = STANDARD_ERRORS * jnp.maximum(jnp.max(se), jnp.maximum(jnp.max(se1), jnp.max(se2)))

  def law():
    """Pair laws of the pooled field from the same draws (one particle per draw)."""
    def pair_particles(mu_a, cov_a, mu_b, cov_b, cov_ab, theta):
      ma, mb, t = _pair(pool, g1, g2, mu_a, cov_a, mu_b, cov_b, cov_ab, theta)
      a = jnp.broadcast_to(jnp.moveaxis(ma, 0, -1)[:, None, :], (p_out, p_out, SAMPLES))
      b = jnp.broadcast_to(jnp.moveaxis(mb, 0, -1)[None, :, :], (p_out, p_out, SAMPLES))
      return a, b, None if t is None else jnp.moveaxis(t, 0, -1)

    def cross_particles(ab):
      a, b = ab // n2, ab % n2
      cov_ab = nngp[a, b] - mu1[a][:, None] * mu2[b][None, :]
      return pair_particles(mu1[a], cov1[a], mu2[b], cov2[b], cov_ab, ntk[a, b])

    def own_particles(mu, cov):
      return lambda i: pair_particles(mu[i], cov[i], mu[i], cov[i], cov[i], None)[:2]

    def mixture(a, b, t, lead):
      ent = lead + out_spatial + out_spatial
      w = jnp.full(a.shape, 1 / SAMPLES, dtype)
      zero = jnp.zeros(ent, dtype)
      m = pairlaw.Mixture(a.reshape(ent + (SAMPLES,)), b.reshape(ent + (SAMPLES,)),
                          w.reshape(ent + (SAMPLES,)), zero, zero, zero,
                          None if t is None else t.reshape(ent + (SAMPLES,)),
                          None if t is None else zero)
      return pairlaw.compress(m)

    a, b, t = jax.lax.map(cross_particles, jnp.arange(n1 * n2))
    a1, b1 = jax.lax.map(own_particles(mu1, cov1), jnp.arange(n1))
    a2, b2 = jax.lax.map(own_particles(mu2, cov2), jnp.arange(n2))
    return pairlaw.PairLaw(mixture(a, b, t, (n1, n2)), mixture(a1, b1, None, (n1,)),
                           mixture(a2, b2, None, (n2,)))

  return pairlaw.attach(out, law), error


def _method(taps) -> str:
  return (f"Monte Carlo over the joint Gaussian of the windows ({SAMPLES} draws per pair of "
          f"inputs, seed {SEED}, windows of {taps.shape[1]} taps); bound {STANDARD_ERRORS:g} "
          "standard errors of the largest-error entry")


def _pool_field(interp, eqn, x: Field, window, stride, padding, dilation) -> Field:
  """Max over windows (per array axis) of the field x."""
  if not isinstance(x, Field):
    raise eqn.error("max pooling of parameters or constants is not supported.")
  spatial_of_axis = {}
  for i, atoms in enumerate(x.axes):
    trivial = window[i] == 1 and stride[i] == 1 and tuple(padding[i]) == (0, 0)
    if trivial:
      continue
    if len(atoms) != 1 or not isinstance(atoms[0], int):
      raise eqn.error(f"a maximum over the non-spatial axis {atoms} (batch, channel or a "
                      "merged axis) has no infinite-width kernel.", HINT)
    spatial_of_axis[atoms[0]] = i
  if not spatial_of_axis:
    return x
  root_in = x.root
  if x.expr is not None and (x.ctx or not root_in.gaussian):
    raise eqn.error("max pooling is supported for phi(z) of a Gaussian field z with "
                    "location-independent phi.", HINT)
  if not root_in.gaussian:
    raise eqn.error("max pooling of a non-Gaussian field (a residual stream, a product, an "
                    "earlier max pool) is not supported: it needs the joint law of the whole "
                    "window, not just pair laws.", HINT)
  if not interp.full:
    raise mo.NeedFullLayout()
  d = len(root_in.spatial)
  present = {k for atoms in x.axes for k in atoms if isinstance(k, int)}
  if present != set(range(d)):
    raise eqn.error("max pooling of a field whose spatial dims are not all separate axes.",
                    HINT)
  axis_of = {k: next(i for i, atoms in enumerate(x.axes) if atoms == (k,)) for k in range(d)}
  per_dim = [(window[axis_of[k]], stride[axis_of[k]], tuple(padding[axis_of[k]]),
              dilation[axis_of[k]]) for k in range(d)]
  out_spatial, taps = _windows(root_in.spatial, *zip(*per_dim))
  if np.any(np.all(taps < 0, axis=1)):
    raise eqn.error("a pooling window lies entirely in the padding.", HINT)
  phi, _ = ew._law_side(x.expr) if x.expr is not None else (lambda t: t, None)
  pool = _Pool(taps, phi, ex.derivative(phi))
  root, error = max_pool_root(root_in, pool, out_spatial)
  interp.record_estimate(eqn, _method(taps), error)
  return Field(root, x.axes)


def reduce_window_max_rule(interp, eqn, invals):
  (x,) = invals
  p = eqn.params
  if any(v != 1 for v in p["base_dilation"]):
    raise eqn.error("max pooling with base dilation is not supported.", HINT)
  return [_pool_field(interp, eqn, x, p["window_dimensions"], p["window_strides"],
                      p["padding"], p["window_dilation"])]


def reduce_max_rule(interp, eqn, invals):
  """jnp.max over spatial axes: one window covering them (the axes are then dropped)."""
  (x,) = invals
  if not isinstance(x, Field):
    raise eqn.error("a maximum of parameters is not supported.")
  axes = set(eqn.params["axes"])
  if any(len(x.axes[i]) != 1 or not isinstance(x.axes[i][0], int) for i in axes):
    raise eqn.error("a maximum over the channel, batch or a merged axis of a field has no "
                    "infinite-width kernel (this includes softmax over the infinite channel "
                    "axis).", HINT)
  shape = eqn.e1.invars[0].aval.shape
  window = [shape[i] if i in axes else 1 for i in range(len(x.axes))]
  ones = [1] * len(x.axes)
  pooled = _pool_field(interp, eqn, x, window, ones, [(0, 0)] * len(x.axes), ones)
  # The reduced axes are now of size 1: squeeze them out of the root and the layout.
  dims = tuple(x.axes[i][0] for i in sorted(axes))
  root = mo.squeeze_spatial(pooled.root, interp.full, dims)
  keep = [k for k in range(len(pooled.root.spatial)) if k not in dims]
  renumber = {k: j for j, k in enumerate(keep)}
  new_axes = tuple(tuple(renumber.get(a, a) for a in ax)
                   for i, ax in enumerate(pooled.axes) if i not in axes)
  return [Field(root, new_axes)]


RULES.update({
    "reduce_window_max": reduce_window_max_rule,
    "reduce_max": reduce_max_rule,
})
