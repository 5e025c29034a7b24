"""The exact kernel of a first layer with non-Gaussian weights (`input_layer="exact"`).

By default every weight is treated as Gaussian with its initializer's variance (Neural
Tangents' convention). After a first Dense layer of fan-in d the pre-activation of one
hidden unit at the inputs x, x' is

    (u, v) = (b + sum_k w_k x_k, b + sum_k w_k x'_k),

a sum of d independent terms: for a small d and a non-Gaussian initializer (Flax's
default truncated normal, a uniform) it is not Gaussian, and E[phi(u) phi(v)] differs
from its Gaussian value (most for sparse or one-hot inputs, where u is one weight).
Everything after the first nonlinearity is Gaussian again at infinite width (the next
matmul sums infinitely many i.i.d. channels), so the exact NNGP / NTK of the network as
initialized needs only, per pair of inputs,

    E[phi(u) phi(v)],   E[phi'(u) phi'(v)],   E[phi(u)]

under the exact law of (u, v); the first layer's tangent kernel is deterministic
(x . x' times the weight's gradient coefficient, plus the bias's) and multiplies
E[phi'(u) phi'(v)] as in the Gaussian case.

Method: write every random coordinate (weights, a random bias) as mean + std * xi_k
with xi_k of a standardized law (`priors.Law`), so u = mu_u + sum_k A_k xi_k. For each
pair, two coordinates j (largest |A_j| for u) and l (the most independent of j for v)
are integrated by an iterated piecewise Gauss-Legendre rule on their supports, cut
at every point where the integrand is not smooth: in xi_l at phi's kinks seen through
u and v; in xi_j where those kinks leave the support of xi_l, cross each other, or are
independent of xi_l. On each piece the integrand is analytic, so this 2-D integral
converges exponentially. The remaining d - 2 coordinates get a tensor-product rule of
each law's own nodes (Gauss-Legendre on the bounded support times the density; Gauss-
Hermite for a normal): exact when the inputs have at most two non-zero features (one-hot
and sparse inputs, where the gap from the Gaussian kernel is largest; 1e-9 relative
against scipy's adaptive quadrature in `tests/test_first_layer.py`); otherwise the 2-D
integral is a once-smoothed function of them (E[phi'(u) phi'(v)] of a relu only
continuous) and the rule converges algebraically: ~1e-5 relative for dense inputs of
fan-in 4-5 at the default 8 nodes per coordinate (up to 3e-5 for E[phi'(u) phi'(v)];
2e-4 at 6 nodes, 1e-6 at 16; stated 1e-4), 30x below the Gaussian kernel's gap on such
inputs (0.1-0.5%). With normal weights it reproduces the arc-cosine kernels (tested). The cost is
(rest points)^(d - 2) x ~2000 evaluations of phi per pair of inputs, so the fan-in is
limited to `MAX_COORDINATES` random coordinates.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from infinite_modules import elementwise as ew
from infinite_modules import expectations as ex
from infinite_modules.priors import Law, Prior, normal_law, uniform_law
from infinite_modules.values import Concrete, Field, ParamRef

# Random coordinates (fan-in plus a random bias) the tensor-product rule accepts.
MAX_COORDINATES = 6
# Gauss-Legendre points per piece of the iterated 2-D rule; nodes per remaining
# coordinate (per dtype bits).
PIECE_POINTS = {64: 12, 32: 8}
REST_POINTS = {64: 8, 32: 8}
# A normal coordinate is integrated over +- _NORMAL_CUT (tail mass 2e-19) in pieces.
_NORMAL_CUT = 9.0
_NORMAL_PANELS = (-6.0, -3.0, -1.5, 0.0, 1.5, 3.0, 6.0)
_BOUNDED_PIECES = 4
# Evaluations of phi per chunk of pairs (bounds the memory of one step).
_CHUNK_EVALUATIONS = 1 << 21

_WAY_OUT = ("Drop `input_layer='exact'` for the default kernel (Gaussian weights of the "
            "initializers' variances, Neural Tangents' convention), or use "
            "`interop.monte_carlo_kernel_fn` for a Monte Carlo estimate of the model as "
            "initialized.")


def _bits(dtype) -> int:
  return 64 if jnp.finfo(dtype).bits > 32 else 32


# --------------------------------------------------------------------------
# The law of the pre-activation
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class InputLaw:
  """u(x) = mu(x) + sum_k A(x)_k xi_k for each input x of the two batches.

  Attributes:
    laws: the standardized law of each coordinate xi_k (K of them, independent).
    coef1, coef2: A for the inputs of each batch, (n1, K) and (n2, K).
    mu1, mu2: mu for each batch, (n1,) and (n2,).
  """
  laws: tuple[Law, ...]
  coef1: jax.Array
  coef2: jax.Array
  mu1: jax.Array
  mu2: jax.Array

  def with_coordinate(self, law: Law, std: float, mean: float) -> InputLaw:
    """The law of u + (mean + std * xi) for a new independent coordinate xi (a bias)."""
    add = lambda coef: jnp.concatenate(
        [coef, jnp.full(coef.shape[:1] + (1,), std, coef.dtype)], axis=1)
    return InputLaw(self.laws + (law,), add(self.coef1), add(self.coef2),
                    self.mu1 + mean, self.mu2 + mean)

  def shifted(self, mean: float) -> InputLaw:
    return dataclasses.replace(self, mu1=self.mu1 + mean, mu2=self.mu2 + mean)


def law_of_prior(prior: Prior, path: str) -> Law:
  """The standardized law of a parameter's entries, or an error naming it."""
  if prior.law is not None:
    return prior.law
  if prior.gaussian:
    return normal_law()
  raise ValueError(
      f"the distribution of `{path}` is not known (an explicit `Prior` without a law); "
      "input_layer='exact' needs it. Pass the initializer itself in `priors=` (e.g. "
      "`jax.nn.initializers.truncated_normal(0.1)`) instead of an `im.Prior`.")


# --------------------------------------------------------------------------
# Quadrature
# --------------------------------------------------------------------------

def _support(law: Law) -> tuple[float, float]:
  lo, hi = law.lower, law.upper
  return (max(lo, -_NORMAL_CUT), min(hi, _NORMAL_CUT))


def _rest_rule(law: Law, points: int) -> tuple[np.ndarray, np.ndarray]:
  """Nodes and weights (summing to 1) of `law` for the coordinates integrated last:
  Gauss-Hermite for a normal, Gauss-Legendre times the density on a bounded support."""
  if law.family == "normal":
    x, w = np.polynomial.hermite_e.hermegauss(points)
    return x, w / w.sum()
  lo, hi = _support(law)
  g, w = np.polynomial.legendre.leggauss(points)
  x = (lo + hi) / 2 + (hi - lo) / 2 * g
  w = w * (hi - lo) / 2 * law.density(x)
  return x, w / w.sum()


def _panels(law: Law, count: int) -> np.ndarray:
  """Fixed interior cuts of a coordinate's support (a normal's pieces), padded with the
  lower end (empty pieces) to `count`."""
  lo, hi = _support(law)
  if law.family == "normal":
    inner = list(_NORMAL_PANELS)
  else:  # quarters of a bounded support (smooth phi converge as on 4x shorter pieces)
    inner = [lo + (hi - lo) * q / _BOUNDED_PIECES for q in range(1, _BOUNDED_PIECES)]
  return np.asarray(inner + [lo] * (count - len(inner)), float)


def _pieces(edges, points: int, dtype):
  """Gauss-Legendre nodes and weights (points per piece) between the sorted `edges` (last
  axis), flattened over the pieces; empty pieces get zero weight."""
  g, w = (jnp.asarray(t, dtype) for t in np.polynomial.legendre.leggauss(points))
  lo, hi = edges[..., :-1, None], edges[..., 1:, None]
  half = (hi - lo) / 2
  x = lo + half * (g + 1)
  flat = x.shape[:-2] + (x.shape[-2] * x.shape[-1],)
  return x.reshape(flat), (half * w).reshape(flat)


def _ratio(num, den, ok, fallback):
  """num / den where `ok` (and num finite), else `fallback`; NaN-free gradients."""
  ok = ok & jnp.isfinite(num)
  return jnp.where(ok, jnp.where(ok, num, 0.0) / jnp.where(ok, den, 1.0), fallback)


def _cuts(points, lo, hi):
  """Candidate cut points clipped to [lo, hi] (non-finite ones to lo), sorted with the
  ends."""
  points = jnp.where(jnp.isfinite(points), jnp.clip(points, lo, hi), lo)
  ends = jnp.stack([jnp.broadcast_to(lo, points.shape[:-1]),
                    jnp.broadcast_to(hi, points.shape[:-1])], axis=-1)
  return jnp.sort(jnp.concatenate([ends, points], axis=-1), axis=-1)


@dataclasses.dataclass(frozen=True)
class _Tables:
  """Per-coordinate constants of the quadrature, indexed by coordinate k."""
  lo: np.ndarray
  hi: np.ndarray
  alpha: np.ndarray
  beta: np.ndarray
  scale: np.ndarray
  panels: np.ndarray     # (K, Q)
  rest_x: np.ndarray     # (K, N)
  rest_w: np.ndarray     # (K, N)
  combos: np.ndarray     # (M, K - 2): node indices of the remaining coordinates


def _tables(laws: tuple[Law, ...], rest_points: int) -> _Tables:
  q = max(len(_NORMAL_PANELS) if law.family == "normal" else _BOUNDED_PIECES - 1
          for law in laws)
  rules = [_rest_rule(law, rest_points) for law in laws]
  k = len(laws)
  combos = np.indices((rest_points,) * (k - 2)).reshape(k - 2, -1).T if k > 2 else \
      np.zeros((1, 0), int)
  return _Tables(
      lo=np.array([_support(law)[0] for law in laws]),
      hi=np.array([_support(law)[1] for law in laws]),
      alpha=np.array([law.alpha for law in laws]), beta=np.array([law.beta for law in laws]),
      scale=np.array([law.scale for law in laws]),
      panels=np.stack([_panels(law, q) for law in laws]) if q else np.zeros((k, 0)),
      rest_x=np.stack([r[0] for r in rules]), rest_w=np.stack([r[1] for r in rules]),
      combos=combos)


def pair_expectations(f, laws, coef_a, mu_a, coef_b, mu_b, kinks_a, kinks_b, dtype,
                      piece_points: int | None = None, rest_points: int | None = None):
  """E[f(u) f(v)], E[f'(u) f'(v)], E[f(u)], E[f(v)] for pairs of linear forms.

  u = mu_a + coef_a . xi, v = mu_b + coef_b . xi with xi_k independent of the
  standardized laws `laws` (see the module docstring for the rule and its accuracy).

  Args:
    f: an elementwise function, smooth between its `kinks`.
    coef_a, coef_b: (P, K) coefficients; mu_a, mu_b: (P,) offsets.
    kinks_a, kinks_b: (P, R) values of u (v) at which f is not smooth (+inf: none).

  Returns:
    Four arrays of shape (P,).
  """
  bits = _bits(dtype)
  piece_points = piece_points or PIECE_POINTS[bits]
  rest_points = rest_points or REST_POINTS[bits]
  laws = tuple(laws)
  pad = max(0, 2 - len(laws))  # a dummy coordinate (zero coefficients) for d = 1
  if pad:
    laws = laws + (uniform_law(),) * pad
    zeros = lambda c: jnp.zeros(c.shape[:1] + (pad,), c.dtype)
    coef_a = jnp.concatenate([coef_a, zeros(coef_a)], axis=1)
    coef_b = jnp.concatenate([coef_b, zeros(coef_b)], axis=1)
  t = _tables(laws, rest_points)
  k = len(laws)
  df = ex.derivative(f)
  table = lambda a: jnp.asarray(a, dtype)
  lo_t, hi_t, al_t, be_t, sc_t = map(table, (t.lo, t.hi, t.alpha, t.beta, t.scale))
  panels_t, rx_t, rw_t = table(t.panels), table(t.rest_x), table(t.rest_w)
  combos = jnp.asarray(t.combos)
  index = jnp.arange(k)

  def density(xi, c):
    return sc_t[c] * jnp.exp(-0.5 * (al_t[c] * xi + be_t[c]) ** 2)

  def one(args):
    ca, ma, cb, mb, ka, kb = args
    j = jnp.argmax(jnp.abs(ca))
    det = jnp.abs(ca[j] * cb - ca * cb[j])
    det = jnp.where(index == j, -1.0, det)
    spread = jnp.where(index == j, -1.0, jnp.abs(ca) + jnp.abs(cb))
    l = jnp.where(jnp.max(det) > 0, jnp.argmax(det), jnp.argmax(spread))
    order = jnp.argsort(jnp.where(index == j, -2, jnp.where(index == l, -1, index)))
    rest = order[2:]
    # The remaining coordinates: tensor product of their own rules.
    xs = rx_t[rest[None, :], combos]                                  # (M, k - 2)
    ws = jnp.prod(rw_t[rest[None, :], combos], axis=-1)
    ra, rb = ma + xs @ ca[rest], mb + xs @ cb[rest]
    a, b, c, e = ca[j], ca[l], cb[j], cb[l]
    loj, hij, lol, hil = lo_t[j], hi_t[j], lo_t[l], hi_t[l]
    da = (ka[None, :] - ra[:, None])  # (M, R): kink minus offset, side a
    db = (kb[None, :] - rb[:, None])
    det_abce = a * e - b * c
    # Outer cuts in xi_j: kinks independent of xi_l, kinks leaving xi_l's support,
    # crossings of the two sides' kinks.
    outer = [
        _ratio(da, a, (b == 0) & (a != 0), loj),
        _ratio(db, c, (e == 0) & (c != 0), loj),
        _ratio(da - b * lol, a, (b != 0) & (a != 0), loj),
        _ratio(da - b * hil, a, (b != 0) & (a != 0), loj),
        _ratio(db - e * lol, c, (e != 0) & (c != 0), loj),
        _ratio(db - e * hil, c, (e != 0) & (c != 0), loj),
        _ratio((e * da[:, :, None] - b * db[:, None, :]).reshape(da.shape[0], -1), det_abce,
               (b != 0) & (e != 0) & (det_abce != 0), loj),
        jnp.broadcast_to(panels_t[j], (da.shape[0], panels_t.shape[1])),
    ]
    xj, wj = _pieces(_cuts(jnp.concatenate(outer, axis=-1), loj, hij), piece_points, dtype)
    wj = wj * density(xj, j)                                          # (M, No)
    # Inner cuts in xi_l given xi_j: the kinks of each side.
    ia = da[:, None, :] - a * xj[:, :, None]
    ib = db[:, None, :] - c * xj[:, :, None]
    inner = [_ratio(ia, b, b != 0, lol), _ratio(ib, e, e != 0, lol),
             jnp.broadcast_to(panels_t[l], ia.shape[:2] + (panels_t.shape[1],))]
    xl, wl = _pieces(_cuts(jnp.concatenate(inner, axis=-1), lol, hil), piece_points, dtype)
    wl = wl * density(xl, l)                                          # (M, No, Ni)
    u = ra[:, None, None] + a * xj[:, :, None] + b * xl
    v = rb[:, None, None] + c * xj[:, :, None] + e * xl
    w = ws[:, None, None] * wj[:, :, None] * wl
    fu, fv = f(u), f(v)
    return (jnp.sum(w * fu * fv), jnp.sum(w * df(u) * df(v)), jnp.sum(w * fu),
            jnp.sum(w * fv))

  p = coef_a.shape[0]
  cuts = t.panels.shape[1] + 2
  per_pair = (t.combos.shape[0] * (cuts + 8 * kinks_a.shape[1] + kinks_a.shape[1] ** 2)
              * (cuts + 2 * kinks_a.shape[1]) * piece_points ** 2)
  batch = int(max(1, min(p, _CHUNK_EVALUATIONS // max(1, per_pair))))
  args = (coef_a.astype(dtype), mu_a.astype(dtype), coef_b.astype(dtype), mu_b.astype(dtype),
          kinks_a.astype(dtype), kinks_b.astype(dtype))
  return jax.lax.map(one, args, batch_size=batch)


# --------------------------------------------------------------------------
# The interpreter's values
# --------------------------------------------------------------------------

def _refuse(eqn, why: str):
  return eqn.error(f"input_layer='exact': {why}", _WAY_OUT)


def _is_call(eqn) -> bool:
  from infinite_modules.interpreter import RULES, enter_call
  return RULES.get(eqn.name) is enter_call


@dataclasses.dataclass(frozen=True, eq=False)
class ExactInput:
  """The model's input under `input_layer="exact"`: a `Concrete` value that stays
  pending until a Dense layer's weight contracts it (then a `FirstLayerField`).

  Functions of the input alone (reshapes, scalings) keep it pending; any other use
  of it is refused: the exact law is defined for one Dense layer of the input.
  """
  value: Concrete

  def consumed_by(self, interp, eqn, invals):
    from infinite_modules.interpreter import RULES, apply_rule, enter_call
    if _is_call(eqn):
      return enter_call(interp, eqn, invals)
    plain = [_plain(v) for v in invals]
    if all(isinstance(v, Concrete) for v in plain):
      outs = apply_rule(interp, eqn, plain)
      return [ExactInput(o) if isinstance(o, Concrete) and o.batch_axis is not None else o
              for o in outs]
    refs = [v for v in plain if isinstance(v, ParamRef)]
    if eqn.name == "dot_general" and len(invals) == 2 and len(refs) == 1:
      (field,) = RULES["dot_general"](interp, eqn, plain)
      return [FirstLayerField(_gaussian_shadow(field), _dense_law(eqn, self, refs[0], invals),
                              eqn.where)]
    if eqn.name == "conv_general_dilated":
      raise _refuse(eqn, "the exact law of a convolution's pre-activations (patches of the "
                    "input) is not implemented; it is for a Dense first layer.")
    raise _refuse(eqn, "the input must enter the model through one Dense layer (a weight "
                  "contracting its features); here it is combined with parameters or fields "
                  "otherwise.")

  def resolve(self, eqn):
    raise _refuse(eqn, "the input must enter the model through one Dense layer.")


def _plain(v):
  """A pending value as the ordinary rules see it (for the bookkeeping they do)."""
  if isinstance(v, ExactInput):
    return v.value
  if isinstance(v, FirstLayerField):
    return v.field
  return v


def _gaussian_shadow(field: Field) -> Field:
  """The field the ordinary rules keep updating next to the exact law: its moments are
  the exact second moments and NTK of the pre-activation (they do not depend on the
  law); marked Gaussian only so that the elementwise rules build phi on it (its
  Gaussian kernel is never used: `FirstLayerField.resolve` computes phi's)."""
  if field.root.gaussian:
    return field
  return Field(dataclasses.replace(field.root, gaussian=True, law=None), field.axes,
               field.expr, field.ctx)


def _dense_law(eqn, x: ExactInput, ref: ParamRef, invals) -> InputLaw:
  """The law of x W for an input (n, features...) and a weight contracting all features."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  xc = tuple(lc) if invals[0] is x else tuple(rc)
  v = x.value
  free = [i for i in range(v.ndim) if i not in xc and i != v.batch_axis]
  if free or lb or rb:
    raise _refuse(eqn, f"the Dense layer's input keeps axes besides the batch and the "
                  f"contracted features (input shape {tuple(np.shape(v.v1))}); the exact "
                  "law is implemented for inputs (batch, features).")
  if isinstance(ref.factor, Concrete):
    raise _refuse(eqn, f"the weight `{ref.path}` is scaled by an input-dependent value.")
  try:
    law = law_of_prior(ref.prior, ref.path)
  except ValueError as err:
    raise _refuse(eqn, str(err)) from None
  std = float(ref.factor) * math.sqrt(ref.prior.variance)
  mean = float(ref.factor) * ref.prior.mean  # zero: the dense rule refuses other means

  def coefficients(arr):
    arr = jnp.moveaxis(jnp.asarray(arr), v.batch_axis, 0)
    return arr.reshape(arr.shape[0], -1)

  c1, c2 = coefficients(v.v1), coefficients(v.v2)
  dtype = jnp.result_type(float(0), c1)
  c1, c2 = c1.astype(dtype), c2.astype(dtype)
  count = c1.shape[1]
  if count > MAX_COORDINATES:
    raise _refuse(eqn, f"the first layer's fan-in {count} exceeds {MAX_COORDINATES}: the "
                  "exact law is integrated by a tensor-product rule over every input "
                  "feature. At larger fan-ins the pre-activations of dense inputs are close "
                  "to Gaussian (central limit theorem).")
  return InputLaw((law,) * count, std * c1, std * c2, mean * jnp.sum(c1, axis=1),
                  mean * jnp.sum(c2, axis=1))


@dataclasses.dataclass(frozen=True, eq=False)
class FirstLayerField:
  """phi(u) for the pre-activation u of a Dense first layer with its exact law.

  `field` is the same field as the ordinary rules compute it (its moments and NTK are
  those of u, exact; its expression phi is built by the elementwise rules); `law` is
  the exact law of u. Elementwise steps and a bias keep it pending; any other
  consumer gets the field with the exact moments of phi(u) (`resolve`).
  """
  field: Field
  law: InputLaw
  where: str
  # The resolved field, computed once however many consumers read it (they must see
  # one root: consumers tell dependent fields apart by their roots).
  _resolved: dict = dataclasses.field(default_factory=dict, repr=False)

  def consumed_by(self, interp, eqn, invals):
    from infinite_modules.interpreter import apply_rule, enter_call
    if _is_call(eqn):
      return enter_call(interp, eqn, invals)
    if eqn.name not in ew.ELEMENTWISE:
      return None
    others = [v for v in invals if v is not self]
    if any(isinstance(v, (ExactInput,)) or (isinstance(v, FirstLayerField) and v.law is not
                                             self.law) for v in others):
      raise _refuse(eqn, "it combines the first layer's output with another use of the "
                    "input; the exact law is for one Dense layer of the input.")
    law = self.law
    refs = [v for v in others if isinstance(v, ParamRef)]
    if refs:
      law = self._with_bias(eqn, invals, refs)
    plain = [_plain(v) for v in invals]
    (out,) = apply_rule(interp, eqn, plain)
    if not isinstance(out, Field):
      return [out]
    return [FirstLayerField(_gaussian_shadow(out), law, self.where)]

  def _with_bias(self, eqn, invals, refs) -> InputLaw:
    (ref,) = refs
    if eqn.name not in ("add", "sub") or self.field.expr is not None or len(invals) != 2 \
        or (eqn.name == "sub" and invals[0] is ref):
      raise _refuse(eqn, f"the parameter `{ref.path}` enters the first layer other than "
                    "as a bias added to its pre-activation.")
    if isinstance(ref.factor, Concrete):
      raise _refuse(eqn, f"the bias `{ref.path}` is scaled by an input-dependent value.")
    s = (-1.0 if eqn.name == "sub" else 1.0) * float(ref.factor)
    mean, std = s * ref.prior.mean, s * math.sqrt(ref.prior.variance)
    if std == 0:
      return self.law.shifted(mean)
    try:
      law = law_of_prior(ref.prior, ref.path)
    except ValueError as err:
      raise _refuse(eqn, str(err)) from None
    if len(self.law.laws) + 1 > MAX_COORDINATES:
      raise _refuse(eqn, f"the first layer's fan-in plus its random bias exceeds "
                    f"{MAX_COORDINATES} coordinates of the tensor-product rule.")
    return self.law.with_coordinate(law, std, mean)

  def resolve(self, eqn=None) -> Field:
    """The field with the exact moments of phi(u) (phi = the field's expression)."""
    if "field" not in self._resolved:
      self._resolved["field"] = self._resolve(eqn.where if eqn is not None else "")
    return self._resolved["field"]

  def _resolve(self, where: str) -> Field:
    field = self.field
    root, expr = field.root, field.expr
    if expr is None or ew.is_affine(expr):
      # Second moments of an affine map of u do not depend on u's law; a nonlinearity
      # of it later would (and raises: not Gaussian).
      out = ew.materialize(root, expr, False, 0)
      return Field(dataclasses.replace(out, gaussian=False, law=None), field.axes)
    if ew.ctx_nodes(expr) or root.spatial:
      raise unsupported_here(where or self.where,
                             "the nonlinearity after the first layer depends on the "
                             "position or example (location constants).")
    jump = _jump(expr, root.nngp.dtype)
    if jump is not None:
      raise unsupported_here(where or self.where, jump)
    return Field(exact_moments(root, expr, self.law), field.axes)


def _jump(expr, dtype) -> str | None:
  """Why phi cannot be integrated here, if it jumps (then E[phi'(u) phi'(v)] has a delta
  term the rule does not carry): phi is checked on both sides of every root of its
  switching functions within +-9e4 of 0; None if continuous there."""
  switches = [(lambda t, g=g: ew.evaluate(g, t, ()), mono) for g, mono in ew.switches(expr)]
  if not switches:
    return None
  f = lambda t: ew.evaluate(expr, t, ())
  try:
    with jax.ensure_compile_time_eval():
      for scale in (1.0, 1e2, 1e4):
        roots = np.asarray(ex.switch_points(switches, jnp.zeros((), dtype), scale, dtype))
        for r in roots[np.isfinite(roots)]:
          h = (1e-9 if _bits(dtype) == 64 else 1e-4) * (1 + abs(float(r)))
          left, right = (float(f(jnp.asarray(r + s, dtype))) for s in (-h, h))
          if abs(right - left) > 1e-3 * max(1.0, abs(left), abs(right)):
            return (f"the nonlinearity jumps at {float(r):.6g} (from {left:.6g} to "
                    f"{right:.6g}); its derivative has a delta there, which the exact "
                    "first-layer rule does not integrate.")
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
          TypeError):
    return "the nonlinearity has traced constants, so its kinks cannot be checked."
  return None


def unsupported_here(where: str, why: str):
  from infinite_modules.errors import unsupported
  return unsupported("input_layer='exact'", where, why, _WAY_OUT)


def exact_moments(root, expr, law: InputLaw):
  """The root of phi(u) with u of the exact law: moments E[phi(u) phi(v)],
  E[phi'(u) phi'(v)] T (T the first layer's deterministic tangent kernel, `root.ntk`),
  E[phi(u)^2] and E[phi(u)] by `pair_expectations`."""
  dtype = root.nngp.dtype
  f = lambda t: ew.evaluate(expr, t, ())
  switches = [(lambda t, g=g: ew.evaluate(g, t, ()), mono) for g, mono in ew.switches(expr)]

  def kinks(coef, mu):
    if not switches:
      return jnp.full(mu.shape + (0,), jnp.inf, dtype)
    scale = jnp.sqrt(jnp.sum(coef * coef, axis=1))
    scale = jnp.where(scale > 0, scale, 1.0)
    return ex.switch_points(switches, mu, scale, dtype)

  c1, c2 = law.coef1.astype(dtype), law.coef2.astype(dtype)
  m1, m2 = law.mu1.astype(dtype), law.mu2.astype(dtype)
  k1, k2 = kinks(c1, m1), kinks(c2, m2)
  n1, n2 = c1.shape[0], c2.shape[0]
  a = lambda arr: jnp.repeat(arr, n2, axis=0)
  b = lambda arr: jnp.tile(arr, (n1,) + (1,) * (arr.ndim - 1))
  kappa, dkappa, _, _ = pair_expectations(f, law.laws, a(c1), a(m1), b(c2), b(m2), a(k1), b(k2),
                                          dtype)
  var1, _, mean1, _ = pair_expectations(f, law.laws, c1, m1, c1, m1, k1, k1, dtype)
  var2, _, mean2, _ = pair_expectations(f, law.laws, c2, m2, c2, m2, k2, k2, dtype)
  return dataclasses.replace(
      root, nngp=kappa.reshape(n1, n2), ntk=dkappa.reshape(n1, n2) * root.ntk, var1=var1,
      var2=var2, mean1=mean1, mean2=mean2, gaussian=False, gathered_from=None, law=None)


def at_output(out):
  """The model's output value with any pending first-layer law resolved."""
  if isinstance(out, FirstLayerField):
    return out.resolve()
  if isinstance(out, ExactInput):
    return out.value
  return out
