"""Fused elementwise functions of a field and the moments they produce.

Consecutive elementwise primitives applied to one field are not evaluated one
by one: they are recorded as an expression `phi(z)` of the field's root
variable (with location-dependent constants, e.g. a LayerNorm's per-example
mean and scale). When a non-elementwise op consumes the field, `materialize`
turns `phi` into new moments:

* affine phi(z) = alpha z + beta (alpha, beta per input and position): exact
  moment map, Gaussianity kept;
* phi recognized as `a core(s z) + b` with a known core: closed forms;
* any other phi: Gauss-Hermite quadrature, phi' by forward-mode autodiff.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from infinite_modules import expectations as ex
from infinite_modules import homogeneous, pairlaw
from infinite_modules.errors import InfiniteWidthError
from infinite_modules.moments import (
  diag_of,
  mirror,
  one_buffer,
  pair_broadcast,
  pair_diagonal,
  same_point,
  whole_batch,
)
from infinite_modules.values import Root

Z = ("z",)

# Elementwise primitives that may appear in phi. Names, so that new jax
# versions that rename a primitive fail loudly (unsupported) rather than wrongly.
ELEMENTWISE = frozenset(["abs", "acos", "acosh", "add", "asin", "asinh", "atan", "atan2", "atanh", "cbrt", "ceil", "clamp", "convert_element_type", "copy", "copy_p", "cos", "cosh", "div", "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "floor", "integer_pow", "is_finite", "log", "log1p", "logistic", "max", "min", "mul", "neg", "nextafter", "pow", "reduce_precision", "round", "rsqrt", "select_n", "sign", "sin", "sinh", "sqrt", "square", "sub", "tan", "tanh", "eq", "ne", "ge", "gt", "le", "lt", "and", "or", "not", "xor"])

_AFFINE_PASS = frozenset({"neg", "convert_element_type", "copy", "copy_p", "reduce_precision"})


def node(prim, params, args):
  return ("op", prim, tuple(sorted(params.items())), tuple(args))


def depends_on_z(expr, memo=None) -> bool:
  memo = {} if memo is None else memo
  key = id(expr)
  if key not in memo:
    if expr[0] == "z":
      memo[key] = True
    elif expr[0] == "op":
      memo[key] = any(depends_on_z(a, memo) for a in expr[3])
    else:
      memo[key] = False
  return memo[key]


def is_affine(expr) -> bool:
  """Whether expr is alpha z + beta structurally (alpha, beta free of z)."""
  return _affine_in_z(expr, constant_terms=True)


def is_linear(expr) -> bool:
  """Whether expr is alpha z structurally (affine with no additive constant)."""
  return _affine_in_z(expr, constant_terms=False)


def is_quadratic(expr) -> bool:
  """Whether expr is structurally a polynomial of degree <= 2 in z (coefficients free of
  z, e.g. LayerNorm's (z - mean)**2 or RMSNorm's z * z).

  Its mean needs only the first two moments of z, whatever z's law: the channel
  statistics of a normalization of a non-Gaussian field are exact (`means`).
  """
  memo: dict = {}

  def degree(e) -> float:
    if not depends_on_z(e, memo):
      return 0
    if e[0] == "z":
      return 1
    name, params, args = e[1].name, dict(e[2]), e[3]
    if name in ("add", "sub"):
      return max(degree(a) for a in args)
    if name in _AFFINE_PASS:
      return degree(args[0])
    if name == "mul":
      return sum(degree(a) for a in args)
    if name == "div":
      return degree(args[0]) if not depends_on_z(args[1], memo) else np.inf
    if name == "square":
      return 2 * degree(args[0])
    if name == "integer_pow" and params.get("y", -1) >= 0:
      return params["y"] * degree(args[0])
    return np.inf

  return degree(expr) <= 2


def _quadratic_mean(expr, second, mean, ctx_values):
  """E[expr(z)] for a polynomial expr = a z^2 + b z + c (`is_quadratic`): a E[z^2] + b E[z]
  + c, the coefficients read off expr at z = 0, 1, -1 (per location)."""
  dtype = jnp.result_type(second)
  ones = jnp.ones(jnp.shape(second), dtype)
  at = lambda t: evaluate(expr, t * ones, ctx_values)
  c, up, down = at(0.0), at(1.0), at(-1.0)
  return (0.5 * (up + down) - c) * second + 0.5 * (up - down) * mean + c


def _affine_in_z(expr, constant_terms: bool) -> bool:
  memo: dict = {}

  def visit(e) -> bool:
    if not depends_on_z(e, memo):
      return constant_terms or _zero_literal(e)
    if e[0] == "z":
      return True
    name, args = e[1].name, e[3]
    if name in ("add", "sub"):
      return all(visit(a) for a in args)
    if name in _AFFINE_PASS:
      return visit(args[0])
    if name == "mul":
      dependent = [a for a in args if depends_on_z(a, memo)]
      return len(dependent) == 1 and visit(dependent[0])
    if name == "div":
      return not depends_on_z(args[1], memo) and visit(args[0])
    return False

  return visit(expr)


def _zero_literal(e) -> bool:
  return (e[0] == "lit" and not isinstance(e[1], jax.core.Tracer)
          and bool(np.all(np.asarray(e[1]) == 0)))


def split_affine(expr):
  """(F, A) with expr = F(A(z)): A an affine-in-z part holding all location
  constants, F free of them; None if there is no such split.

  LayerNorm's output (z - mean) * inv_std is A; a relu after it is F, which
  then gets its closed form even though A varies per example.
  """
  memo: dict = {}
  order, seen = [], set()

  def collect(e):  # affine z-dependent nodes, outermost first
    if id(e) in seen or e[0] != "op" or not depends_on_z(e, memo):
      return
    seen.add(id(e))
    if is_affine(e):
      order.append(e)
      return
    for a in e[3]:
      collect(a)

  collect(expr)
  for a_node in order:
    rebuilt: dict = {}

    def substitute(e, a_node=a_node, rebuilt=rebuilt):
      if e is a_node:
        return Z
      if e[0] == "z":
        raise _NoSplit  # z reached other than through A
      if e[0] != "op" or not depends_on_z(e, memo):
        return e
      if id(e) not in rebuilt:
        rebuilt[id(e)] = ("op", e[1], e[2], tuple(substitute(x) for x in e[3]))
      return rebuilt[id(e)]

    try:
      f_node = substitute(expr)
    except _NoSplit:
      continue
    if not ctx_nodes(f_node):
      return f_node, a_node
  return None


class _NoSplit(Exception):
  pass


def ctx_nodes(expr) -> list:
  """The location-constant nodes ("ctx", (side1, side2)) of expr, in a fixed order."""
  seen, out = set(), []

  def visit(e):
    if id(e) in seen:
      return
    seen.add(id(e))
    if e[0] == "ctx":
      out.append(e)
    elif e[0] == "op":
      for a in e[3]:
        visit(a)

  visit(expr)
  return out


_BOOLEAN = frozenset({"eq", "ne", "ge", "gt", "le", "lt", "and", "or", "not", "xor", "is_finite"})
_COMPARE_DIFFERENCE = frozenset({"max", "min", "eq", "ne", "ge", "gt", "le", "lt"})


def switches(expr) -> list:
  """Switching functions g of expr: phi is smooth wherever no g(z) changes sign.

  max/min/comparisons switch on the difference of their operands, abs/sign on
  their operand, clamp on the operand minus each bound. Each g is an
  expression of z (evaluated like expr); duplicates are dropped.
  """
  memo: dict = {}
  found: dict = {}

  def boolean(e) -> bool:
    return e[0] == "op" and e[1].name in _BOOLEAN

  def add(key, g):
    if depends_on_z(g, memo):
      found.setdefault(key, g)

  seen: set = set()

  def visit(e):
    if id(e) in seen or e[0] != "op":
      return
    seen.add(id(e))
    name, args = e[1].name, e[3]
    if name in _COMPARE_DIFFERENCE and len(args) == 2 and not any(map(boolean, args)):
      a, b = args
      add(("sub", id(a), id(b)), node(jax.lax.sub_p, {}, (a, b)))
    elif name in ("abs", "sign") and not boolean(args[0]):
      add(("id", id(args[0])), args[0])
    elif name == "clamp":
      lo, x, hi = args
      add(("sub", id(x), id(lo)), node(jax.lax.sub_p, {}, (x, lo)))
      add(("sub", id(x), id(hi)), node(jax.lax.sub_p, {}, (x, hi)))
    for a in args:
      visit(a)

  visit(expr)
  return [(g, monotone(g)) for g in found.values()]


_INCREASING = frozenset({"atan", "asinh", "atanh", "cbrt", "erf", "erf_inv", "exp", "exp2",
                         "expm1", "log", "log1p", "logistic", "sinh", "sqrt", "tanh",
                         "convert_element_type", "copy", "copy_p", "reduce_precision"})


def monotone(expr) -> bool:
  """Whether expr is structurally monotone in z at each location (then it has at
  most one root there)."""
  memo: dict = {}
  either = 2  # monotone, direction unknown (e.g. times a location constant)

  def merge(dirs):
    moving = {d for d in dirs if d != 0}
    if len(moving) != 1:
      return None
    (d,) = moving
    return d if d != either or sum(x != 0 for x in dirs) == 1 else None

  def direction(e):
    """+1 / -1 increasing / decreasing in z, `either`, 0 constant, None unknown."""
    if not depends_on_z(e, memo):
      return 0
    if e[0] == "z":
      return 1
    name, args = e[1].name, e[3]
    dirs = [direction(a) for a in args]
    if None in dirs:
      return None
    if name in _INCREASING or name in ("max", "min", "add"):
      return merge(dirs)
    if name == "neg":
      return dirs[0] if dirs[0] == either else -dirs[0]
    if name == "sub":
      return merge([dirs[0], dirs[1] if dirs[1] == either else -dirs[1]])
    if (name == "mul" and 0 in dirs) or (name == "div" and dirs[1] == 0):
      k = 0 if dirs[0] != 0 else 1  # the z-dependent factor
      constant = args[1 - k]
      if constant[0] == "lit" and not isinstance(constant[1], jax.core.Tracer) \
          and np.ndim(constant[1]) == 0 and float(constant[1]) != 0:
        return dirs[k] if dirs[k] == either else dirs[k] * int(np.sign(float(constant[1])))
      return either  # a fixed factor at each location
    return None

  return direction(expr) is not None


def evaluate(expr, z, ctx_values):
  """Evaluates expr elementwise, broadcasting z and the constants.

  `ctx_values` maps id(ctx node) -> the array to use for it (or is a
  sequence aligned with `ctx_nodes(expr)`).
  """
  if not isinstance(ctx_values, dict):
    ctx_values = {id(n): v for n, v in zip(ctx_nodes(expr), ctx_values)}
  memo: dict = {}
  dtype = jnp.result_type(z)

  def visit(e):
    key = id(e)
    if key in memo:
      return memo[key]
    kind = e[0]
    if kind == "z":
      out = z
    elif kind == "lit":
      out = _in_dtype(e[1], dtype)
    elif kind == "ctx":
      out = _in_dtype(ctx_values[id(e)], dtype)
    else:
      prim, params, args = e[1], dict(e[2]), e[3]
      vals = [visit(a) for a in args]
      shape = jnp.broadcast_shapes(*(jnp.shape(v) for v in vals))
      # numpy values (phi's literals) are broadcast by numpy: a jnp broadcast of a
      # constant runs eagerly under `ensure_compile_time_eval` (closed-form probes), a
      # separately compiled XLA program per literal and shape.
      vals = [np.broadcast_to(v, shape) if isinstance(v, np.ndarray | np.generic)
              else jnp.broadcast_to(v, shape) for v in vals]
      if prim.name == "convert_element_type" and jnp.issubdtype(params["new_dtype"],
                                                                 jnp.floating):
        # float targets follow the kernel's dtype (float32 models, float64 kernels)
        out = vals[0].astype(jnp.result_type(z))
      else:
        out = prim.bind(*vals, **params)
    memo[key] = out
    return out

  return visit(expr)


def _in_dtype(value, dtype):
  """A float constant of phi in the dtype phi is evaluated in.

  The kernel's dtype is its inputs' (moments of float64 inputs through a
  float32 layer are float64, and float32 kernels must stay float32 under
  jax_enable_x64); phi's literals and location constants follow it, so that
  primitives that need equal dtypes (lax.sub, lax.max) accept them.
  """
  if jnp.issubdtype(jnp.result_type(value), jnp.floating) and jnp.result_type(value) != dtype:
    if isinstance(value, np.ndarray | np.generic):
      return np.asarray(value, dtype)  # stays a numpy constant (see `evaluate`)
    return jnp.asarray(value).astype(dtype)
  return value


@dataclasses.dataclass(frozen=True)
class _Sides:
  """Per-side location constants, reshaped for one moment array."""
  a: tuple
  b: tuple


def _ctx_pair(ctx, d, full, pair, which=(0, 1)):
  sides_a, sides_b = [], []
  for c in ctx:
    a, b = pair_broadcast(c[which[0]], c[which[1]], d, full, pair)
    sides_a.append(a)
    sides_b.append(b)
  return _Sides(tuple(sides_a), tuple(sides_b))


def _with_trailing(values):
  return tuple(jnp.asarray(v)[..., None] for v in values)


def materialize(root: Root, expr, full: bool, points: int, same_batch=False) -> Root:
  """Moments of phi(z) where phi = expr, z the root variable.

  `same_batch`: True if both batches are the same (x2=None), so the pair
  arrays' entries (a, a[, s, s]) are points paired with themselves
  (correlation exactly 1 in the closed forms) and quadratures are mirrored to
  keep the kernel exactly symmetric; an (n1, n2) boolean array marking such
  pairs if the batches are two blocks of one batch (`moments.same_point`).
  """
  if expr is None or expr is Z:
    return root
  ctx = [n[1] for n in ctx_nodes(expr)]
  d = len(root.spatial)
  dtype = root.nngp.dtype
  n1, n2 = root.var1.shape[0], root.var2.shape[0]
  loc1, loc2 = (n1, *root.spatial), (n2, *root.spatial)
  ctx1 = tuple(jnp.broadcast_to(c[0], loc1) for c in ctx)
  ctx2 = tuple(jnp.broadcast_to(c[1], loc2) for c in ctx)
  # x2=None: one batch, whose single-input moments are one array (`moments.per_side`);
  # without location constants each side's moments are then computed once.
  one_batch = not ctx and root.var2 is root.var1 and root.mean2 is root.mean1
  m1 = jnp.zeros(loc1, dtype) if root.mean1 is None else root.mean1
  m2 = m1 if one_batch else jnp.zeros(loc2, dtype) if root.mean2 is None else root.mean2

  if is_affine(expr):
    beta1 = evaluate(expr, jnp.zeros(loc1, dtype), ctx1)
    alpha1 = evaluate(expr, jnp.ones(loc1, dtype), ctx1) - beta1
    if one_batch:
      alpha2, beta2 = alpha1, beta1
    else:
      beta2 = evaluate(expr, jnp.zeros(loc2, dtype), ctx2)
      alpha2 = evaluate(expr, jnp.ones(loc2, dtype), ctx2) - beta2

    def second(arr, sa, sb, ma, mb, pair):
      (aa, ab), (ba, bb), (mma, mmb) = (pair_broadcast(sa[0], sb[0], d, full, pair),
                                        pair_broadcast(sa[1], sb[1], d, full, pair),
                                        pair_broadcast(ma, mb, d, full, pair))
      # Cross terms summed first (swapped in entry (b, a): exact symmetry for x2=None).
      return aa * ab * arr + (aa * bb * mma + ba * ab * mmb) + ba * bb

    def grad(arr, sa, sb, pair):
      aa, ab = pair_broadcast(sa, sb, d, full, pair)
      return aa * ab * arr

    s1, s2 = (alpha1, beta1), (alpha2, beta2)
    # Decided from the structure, not the values (which are traced under jit):
    # a zero-mean Gaussian stays zero-mean under a linear map, keeping closed forms.
    has_mean = root.mean1 is not None or not is_linear(expr)
    var1 = second(root.var1, s1, s1, m1, m1, False)
    mean1 = alpha1 * m1 + beta1 if has_mean else None
    out = dataclasses.replace(
        root,
        nngp=second(root.nngp, s1, s2, m1, m2, True),
        ntk=grad(root.ntk, alpha1, alpha2, True),
        var1=var1, var2=var1 if one_batch else second(root.var2, s2, s2, m2, m2, False),
        mean1=mean1, mean2=mean1 if one_batch else alpha2 * m2 + beta2 if has_mean else None,
        gathered_from=None, law=None)
    if root.gaussian or not pairlaw.known(root):
      return out
    coefficients = {"nngp": (s1, s2, True), "var1": (s1, s1, False), "var2": (s2, s2, False)}

    def affine_law(m, name):
      (alpha_a, beta_a), (alpha_b, beta_b), pair = coefficients[name]
      (aa, ab), (ba, bb) = (pair_broadcast(alpha_a, alpha_b, d, full, pair),
                            pair_broadcast(beta_a, beta_b, d, full, pair))
      return pairlaw.affine(m, aa, ba, ab, bb)

    return pairlaw.attach(out, lambda: pairlaw.law_of(root, full).map(affine_law))

  if not root.gaussian:
    split = split_affine(expr) if ctx and pairlaw.known(root) else None
    if split is not None:
      # phi = F(A(z)) after a normalization: the affine map A (location constants) maps
      # the pair laws exactly, then F is location-free.
      f_node, a_node = split
      return materialize(materialize(root, a_node, full, points, same_batch), f_node, full,
                         points, same_batch)
    if not pairlaw.known(root) or ctx:
      raise NotGaussianError()
    return _materialize_from_law(root, expr, full, same_batch)

  split = split_affine(expr) if ctx else None
  if split is not None:
    # phi = F(A(z)): the affine map is exact and keeps Gaussianity, and F alone
    # has no location constants, so it can be matched to a closed form.
    f_node, a_node = split
    return materialize(materialize(root, a_node, full, points, same_batch), f_node, full, points,
                       same_batch)

  # Zero means (None) are structural: no covariance correction to trace.
  centered = root.mean1 is None and root.mean2 is None
  if not ctx:
    _check_defined(expr, dtype)
  kinks = switches(expr)
  form = None
  if not ctx and centered:
    form = _closed_form(expr, kinks, dtype)

  if form is not None and one_batch and not full and whole_batch(same_batch):
    # x2=None in the diagonal layout: a point's variance is its pair with itself, the
    # diagonal of the NNGP array. Read there, the separate variance chain feeds nothing
    # but the returned variances, and XLA drops it when those are not returned (four of a
    # conv layer's seven fused kernels: compile time).
    v1 = v2 = pair_diagonal(root.nngp)
  else:
    v1 = diag_of(root.var1, d, full)
    v2 = v1 if one_batch else diag_of(root.var2, d, full)
    if not centered:
      v1 = v1 - m1 * m1
      v2 = v1 if one_batch else v2 - m2 * m2

  def moments(arr, ctx_a, ctx_b, va, vb, ma, mb, pair):
    """Returns E[phi(u) phi(v)] and E[phi'(u) phi'(v)] for one moment array."""
    va_b, vb_b = pair_broadcast(va, vb, d, full, pair)
    ma_b, mb_b = pair_broadcast(ma, mb, d, full, pair)
    cov = arr if centered else arr - ma_b * mb_b
    if form is not None:
      same = same_point(arr.shape[0], root.spatial, full, pair, same_batch)
      return ex.affine_kappa_dkappa(form, cov, va_b, vb_b, same=same)
    fa, breaks_a = _side(expr, kinks, ctx_a, va_b, ma_b)
    fb, breaks_b = _side(expr, kinks, ctx_b, vb_b, mb_b)
    dfa, dfb = ex.derivative(fa), ex.derivative(fb)
    if kinks:
      kappa, dkappa = ex.pair_expectations_piecewise(((fa, fb), (dfa, dfb)), cov, va_b, vb_b,
                                                     ma_b, mb_b, breaks_a, breaks_b)
    else:
      kappa, dkappa = ex.pair_expectations(((fa, fb), (dfa, dfb)), cov, va_b, vb_b, ma_b,
                                           mb_b, points)
    return kappa, dkappa

  pair_sides = _ctx_pair(ctx, d, full, True) if ctx else _Sides((), ())
  nngp, dk = moments(root.nngp, pair_sides.a, pair_sides.b, v1, v2, m1, m2, True)
  if whole_batch(same_batch) and form is None:
    # Quadratures treat the two sides of a pair differently (outer and inner
    # variable): mirrored here so the kernel stays exactly symmetric.
    nngp, dk = mirror(nngp, d, full), mirror(dk, d, full)
  ctx11 = [(c[0], c[0]) for c in ctx]
  ctx22 = [(c[1], c[1]) for c in ctx]
  s11 = _ctx_pair(ctx11, d, full, False) if ctx else _Sides((), ())
  s22 = _ctx_pair(ctx22, d, full, False) if ctx else _Sides((), ())
  var1, _ = moments(root.var1, s11.a, s11.b, v1, v1, m1, m1, False)
  var2 = var1 if one_batch else moments(root.var2, s22.a, s22.b, v2, v2, m2, m2, False)[0]

  def mean(va, ma, cvals):
    if form is not None:
      return ex.affine_mean(form, va)
    return _expectation(expr, kinks, cvals, va, ma, points)

  mean1 = mean(v1, m1, ctx1)
  nngp, ntk = one_buffer(nngp, dk * root.ntk)
  out = dataclasses.replace(
      root, nngp=nngp, ntk=ntk, var1=var1, var2=var2,
      mean1=mean1, mean2=mean1 if one_batch else mean(v2, m2, ctx2), gaussian=False,
      gathered_from=None, law=None)
  if ctx:
    return out  # pair laws are carried for location-independent phi only
  f, gs = _law_side(expr)
  # phi(z) is no longer Gaussian; its pair laws are built only if a later
  # nonlinearity needs them (a post-activation residual sum). phi's two-slope closed
  # form (relu, leaky_relu, abs), if any, lets `pairlaw` integrate exactly inside.
  return pairlaw.attach(out, lambda: pairlaw.law_of(root, full).push_compress(
      f, gs, homogeneous.two_slopes(expr, dtype)))


def _mirrored(arr, d, full, same_batch):
  """x2=None: the pair-law quadrature's two sides made exactly symmetric."""
  return mirror(arr, d, full) if whole_batch(same_batch) else arr


def _law_side(expr):
  """phi (location-independent) and its switching functions, as `pairlaw.push` takes them."""
  f = lambda t: evaluate(expr, t, ())
  return f, [(lambda t, g=g: evaluate(g, t, ()), mono, is_affine(g))
             for g, mono in switches(expr)]


def _materialize_from_law(root: Root, expr, full: bool, same_batch=False) -> Root:
  """Moments of phi(z) for a non-Gaussian z of known pair laws (see `pairlaw`):
  E[phi(u_A) phi(u_B)] and E[phi'(u_A) phi'(u_B) T] by quadrature over each
  entry's law; the pushed-forward laws are kept for the next nonlinearity."""
  d = len(root.spatial)
  f, gs = _law_side(expr)
  inner = homogeneous.two_slopes(expr, root.nngp.dtype)  # see `materialize`
  law = pairlaw.law_of(root, full)
  nngp, var1, var2 = law.push_moments(f, gs, inner)
  out = dataclasses.replace(
      root, nngp=_mirrored(nngp["ab"], d, full, same_batch),
      ntk=_mirrored(nngp["t"], d, full, same_batch), var1=var1["ab"], var2=var2["ab"],
      mean1=diag_of(var1["a"], d, full), mean2=diag_of(var2["a"], d, full),
      gaussian=False, gathered_from=None, law=None)
  return pairlaw.attach(out, lambda: law.push_compress(f, gs, inner))


def _closed_form(expr, kinks, dtype):
  """The closed form `a core(s z) + b` of a location-free phi, or None.

  Recognition evaluates phi on probe points eagerly (~0.1-0.4 s); a network
  has the same phi at every layer, so results are memoized by phi's structure
  (primitives, parameters, literal values) and dtype.
  """
  key = _structure(expr)
  if key is not None:
    key = (key, jnp.dtype(dtype).name)
    if key in _CLOSED_FORMS:
      return _CLOSED_FORMS[key]
  # Positively homogeneous phi (relu, leaky_relu, abs) are read off the structure, with
  # no probes to compile (see `homogeneous`); others are fitted on probe points.
  form = homogeneous.relu_pair_form(expr, dtype)
  if form is None:
    gs = [lambda t, g=g: evaluate(g, t, ()) for g, _ in kinks]
    if ex.kinks_only_at_zero(gs, dtype):
      form = ex.recognize(lambda t: evaluate(expr, t, ()), dtype)
  if key is not None and len(_CLOSED_FORMS) < 1024:
    _CLOSED_FORMS[key] = form
  return form


_CLOSED_FORMS: dict = {}


def _structure(expr):
  """A hashable description of a location-free expression, or None if it has
  parts that cannot be compared (traced literals, unhashable parameters)."""
  memo: dict = {}

  def visit(e):
    if id(e) in memo:
      return memo[id(e)]
    if e[0] == "z":
      out = ("z",)
    elif e[0] == "lit":
      if isinstance(e[1], jax.core.Tracer):
        raise TypeError
      value = np.asarray(e[1])
      out = ("lit", value.dtype.str, value.shape, value.tobytes())
    elif e[0] == "op":
      out = ("op", e[1], e[2], tuple(visit(a) for a in e[3]))
    else:
      raise TypeError
    memo[id(e)] = out
    return out

  try:
    key = visit(expr)
    hash(key)
    return key
  except TypeError:
    return None


class NotGaussianError(Exception):
  """A nonlinearity was applied to a field that is not Gaussian."""


class UndefinedPhiError(InfiniteWidthError):
  """phi is NaN for some real inputs, which a Gaussian field takes (sqrt, log)."""


def _check_defined(expr, dtype):
  """Raises `UndefinedPhiError` if the location-free phi is NaN somewhere on the line
  (memoized by phi's structure, like closed-form recognition)."""
  if homogeneous.is_homogeneous(expr):
    return  # built from steps finite on finite inputs (see `homogeneous`)
  key = _structure(expr)
  if key is not None:
    key = (key, jnp.dtype(dtype).name)
    if key in _DEFINED:
      point = _DEFINED[key]
    else:
      point = ex.first_undefined_point(lambda t: evaluate(expr, t, ()), dtype)
      if len(_DEFINED) < 1024:
        _DEFINED[key] = point
  else:
    point = ex.first_undefined_point(lambda t: evaluate(expr, t, ()), dtype)
  if point is not None:
    raise UndefinedPhiError(
        f"the nonlinearity is undefined (NaN) at z = {point:.3g}, but its input is a Gaussian "
        "field that takes every real value (e.g. sqrt or log of a pre-activation), so its "
        "expectation does not exist.")


_DEFINED: dict = {}


def means(root: Root, expr, full: bool, points: int):
  """E[phi(z)] at every input and position of each batch: ((n1, *S), (n2, *S))."""
  d = len(root.spatial)
  dtype = root.nngp.dtype
  n1, n2 = root.var1.shape[0], root.var2.shape[0]
  out = []
  for n, var, mean, side in ((n1, root.var1, root.mean1, 0), (n2, root.var2, root.mean2, 1)):
    loc = (n, *root.spatial)
    m = jnp.zeros(loc, dtype) if mean is None else mean
    if expr is None or expr is Z:
      out.append(m)
      continue
    nodes = ctx_nodes(expr)
    cvals = tuple(jnp.broadcast_to(c[1][side], loc) for c in nodes)
    if is_affine(expr):
      beta = evaluate(expr, jnp.zeros(loc, dtype), cvals)
      alpha = evaluate(expr, jnp.ones(loc, dtype), cvals) - beta
      out.append(alpha * m + beta)
      continue
    if not root.gaussian and is_quadratic(expr):
      out.append(_quadratic_mean(expr, diag_of(var, d, full), m, cvals))
      continue
    if not root.gaussian:
      if not pairlaw.known(root) or nodes:
        raise NotGaussianError()
      f, gs = _law_side(expr)
      inner = homogeneous.two_slopes(expr, dtype)
      law = pairlaw.law_of(root, full)
      sums = pairlaw.push_moments(law.var1 if side == 0 else law.var2, f, f, gs, gs, inner)
      out.append(diag_of(sums["a"], d, full))
      continue
    v = diag_of(var, d, full) - m * m
    out.append(_expectation(expr, switches(expr), cvals, v, m, points))
  return tuple(out)


def _side(expr, kinks, ctx_values, var, mean):
  """phi at one side of a pair (its location constants bound) and its breakpoints."""
  by_node = {id(n): c for n, c in zip(ctx_nodes(expr), _with_trailing(ctx_values))}
  f = lambda t: evaluate(expr, t, by_node)
  if not kinks:
    return f, None
  gs = [(lambda t, g=g: evaluate(g, t, by_node), mono) for g, mono in kinks]
  return f, ex.switch_points(gs, mean, ex.safe_sqrt(var), jnp.result_type(var))


def _expectation(expr, kinks, ctx_values, var, mean, points):
  f, breaks = _side(expr, kinks, ctx_values, var, mean)
  if kinks:
    return ex.expectation_piecewise(f, var, mean, breaks)
  return ex.expectation(f, var, mean, points)
