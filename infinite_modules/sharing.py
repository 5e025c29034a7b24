"""Weight sharing: the joint Gaussian law of the outputs of one weight used several times.

Tensor Programs (Yang 2019, "Tensor Programs I/IIb"): the outputs g_a = W h_a of
one weight matrix W (entries i.i.d. N(0, v), fan-in C) applied to several inputs
h_a are, at infinite width, jointly Gaussian G-vars, independent of the G-vars
of every other weight, with (per channel, for inputs x, x')

  E[g_a(x) g_b(x')] = s_a s_b v C E[h_a(x) h_b(x')]                       (1)

(s_a the constant factor of use a). The NTK of the shared weight sums over its
uses, so the tangents of two uses covary through the same dW:

  Theta(g_a(x), g_b(x')) = s_a s_b (v C Theta(h_a(x), h_b(x')) + g C E[h_a(x) h_b(x')])  (2)

with g the gradient coefficient (v in NTK parameterization, 1 in standard); the
usual forward rules for a single field are unchanged. A random bias b is one
Gaussian vector whatever the number of times it is added: all its uses are the
same G-var, with E = Var(b), Theta = g.

`SharedWeights` (one per kernel evaluation, `Interpreter.sharing`) records every
use of a parameter (`claim` is the entry point) and, for Gaussian fields without
spatial positions, writes each as an affine combination of *atoms* (one per
weight use, one per random bias):  z = m + sum_k c_k A_k. Atoms of different
weights are independent; atoms of one weight have the cross moments (1), (2),
computed when a later use appears. Cross moments of two such fields follow by
bilinearity, and those of phi_a(z_a), phi_b(z_b) by a bivariate Gaussian
expectation. Sums of dependent fields (`d(x1) + d(x2)`), uses of a weight on
dependent inputs (`d(relu(d(h)))`, a recurrence h_t = phi(W_i x_t + W_h h_{t-1} + b))
and stacks of dependent fields (a scan's per-step outputs) are then exact.

Fields this does not describe (spatial positions, non-Gaussian roots with shared
sources) raise an error naming the shared parameter and its uses.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from infinite_modules import elementwise as ew
from infinite_modules import expectations as ex
from infinite_modules.values import Concrete, Field, ParamRef, Root, new_origin

SHARING_HINT = ("Weight sharing is exact for dense weights (dot_general) and biases on "
                "fields without spatial positions (MLP features, recurrent cells' states); "
                "give each use its own parameters, or use `interop.monte_carlo_kernel_fn`.")


@dataclasses.dataclass(frozen=True)
class Cross:
  """Uncentered cross moments of two fields a, b of the same channel index.

  ab[i, j] = E[a(x1_i) b(x2_j)], ba[i, j] = E[b(x1_i) a(x2_j)] (n1, n2);
  s1[i] = E[a(x1_i) b(x1_i)] (n1,), s2 the same on the second batch;
  ntk_ab, ntk_ba: the tangent cross moments Theta(a(x1_i), b(x2_j)) and
  Theta(b(x1_i), a(x2_j)).
  """
  ab: Any
  ba: Any
  s1: Any
  s2: Any
  ntk_ab: Any
  ntk_ba: Any

  def arrays(self) -> tuple:
    return (self.ab, self.ba, self.s1, self.s2, self.ntk_ab, self.ntk_ba)

  def swapped(self) -> Cross:
    """The cross moments of (b, a)."""
    return Cross(self.ba, self.ab, self.s1, self.s2, self.ntk_ba, self.ntk_ab)

  def scaled(self, c) -> Cross:
    return Cross(*(c * x for x in self.arrays()))

  def __add__(self, other: Cross) -> Cross:
    return Cross(*(x + y for x, y in zip(self.arrays(), other.arrays())))


def own_cross(root: Root) -> Cross:
  """The cross moments of a field with itself."""
  ntk = jnp.zeros_like(root.nngp) if root.ntk is None else root.ntk
  return Cross(root.nngp, root.nngp, root.var1, root.var2, ntk, ntk)


@dataclasses.dataclass
class Use:
  """One use of a dense weight: g = s W h with h the input (a Field or a Concrete)."""
  atom: tuple
  where: str
  value: Any        # the input h
  scale: float      # s
  width: float      # C: the contracted width (1 for a concrete input, summed explicitly)
  contracted: tuple  # contracted axes of a concrete input


@dataclasses.dataclass
class SharedWeights:
  """Uses of every parameter, atoms of Gaussian fields and the atoms' cross moments."""
  interp: Any  # the Interpreter (layout, quadrature points, gradient coefficients, dtype)
  uses: dict = dataclasses.field(default_factory=dict)       # leaf -> [(primitive, where)]
  dense_uses: dict = dataclasses.field(default_factory=dict)  # leaf -> [Use]
  tokens: dict = dataclasses.field(default_factory=dict)     # leaf -> origin token
  parts: dict = dataclasses.field(default_factory=dict)      # id(root) -> (root, {atom: c})
  atom_self: dict = dataclasses.field(default_factory=dict)  # atom -> Cross with itself
  atom_cross: dict = dataclasses.field(default_factory=dict)  # (atom, atom) -> Cross
  atom_weight: dict = dataclasses.field(default_factory=dict)  # atom -> leaf

  # -- bookkeeping ---------------------------------------------------------------

  def claim(self, ref: ParamRef, eqn, shareable: bool) -> None:
    """Records a use of `ref` by `eqn`. A parameter may be used again only where
    every use is `shareable` (a dense weight or a bias); otherwise the error
    names the parameter and all its uses."""
    seen = self.uses.setdefault(ref.leaf, [])
    seen.append((eqn.name, eqn.where or "<top level>", shareable))
    if len(seen) > 1 and not all(s for _, _, s in seen):
      listed = "; ".join(f"`{name}` in `{where}`" for name, where, _ in seen)
      raise eqn.error(
          f"parameter `{ref.path}` is used {len(seen)} times (weight sharing: {listed}); "
          "its uses' outputs are correlated, and only shared dense weights and biases "
          "have a kernel rule.", SHARING_HINT)

  def token(self, ref: ParamRef) -> frozenset:
    """The origin token of a parameter: the same for all its uses, so fields computed
    from different uses are never taken for independent."""
    if ref.leaf not in self.tokens:
      self.tokens[ref.leaf] = new_origin()
    return self.tokens[ref.leaf]

  def register(self, root: Root, combination: dict) -> Root:
    self.parts[id(root)] = (root, combination)
    return root

  def combination(self, root: Root) -> dict | None:
    entry = self.parts.get(id(root))
    return None if entry is None else entry[1]

  # -- rules' hooks ---------------------------------------------------------------

  def weight_use(self, interp, eqn, ref: ParamRef, value, root: Root, width: float,
                 contracted: tuple = ()) -> Root:
    """Registers the output `root` of a dense use s W h (h = `value`) as an atom and,
    if W was used before, the cross moments (1), (2) with each earlier use."""
    root = dataclasses.replace(root, origins=self.token(ref))
    uses = self.dense_uses.setdefault(ref.leaf, [])
    use = Use((ref.leaf, len(uses)), eqn.where or "<top level>", value, float(ref.factor),
              width, tuple(contracted))
    self.atom_weight[use.atom] = ref.leaf
    self.atom_self[use.atom] = own_cross(root)
    if uses and root.spatial:
      raise self._error(eqn, ref, uses + [use],
                        "a use's output has spatial positions, whose cross-use moments are "
                        "not tracked.")
    v, g = ref.prior.variance, interp.grad_coefficient(ref.prior)
    for old in uses:
      if old.atom in self.atom_self and self.atom_self[old.atom].ab.ndim != 2:
        raise self._error(eqn, ref, uses + [use], "an earlier use's output has spatial "
                          "positions, whose cross-use moments are not tracked.")
      h = self.cross_values(eqn, use, old, ref, uses)
      s = use.scale * old.scale * use.width
      c = Cross(s * v * h.ab, s * v * h.ba, s * v * h.s1, s * v * h.s2,
                s * (v * h.ntk_ab + g * h.ab), s * (v * h.ntk_ba + g * h.ba))
      self.atom_cross[(use.atom, old.atom)] = c
    uses.append(use)
    if not root.spatial:
      self.register(root, {use.atom: 1.0})
    return root

  def bias_use(self, interp, eqn, ref: ParamRef, scale: float, root_in: Root, root: Root) -> Root:
    """`root` = `root_in` + scale * b for a bias b: origins and atoms of the sum."""
    token = self.token(ref)
    if token & root_in.origins:
      raise eqn.error(
          f"the bias `{ref.path}` is added to a field that already depends on it; the sum "
          "of a bias and a function of it is not Gaussian.", SHARING_HINT)
    root = dataclasses.replace(root, origins=root.origins | token)
    atom = (ref.leaf, "bias")
    if atom not in self.atom_self:
      # The atom is the centered bias b - mu itself (its uses' factors are coefficients).
      v, g = ref.prior.variance, interp.grad_coefficient(ref.prior)
      dtype = root.nngp.dtype
      n1, n2 = root.var1.shape[0], root.var2.shape[0]
      pair = lambda value: jnp.full((n1, n2), value, dtype)
      self.atom_self[atom] = Cross(pair(v), pair(v), jnp.full((n1,), v, dtype),
                                   jnp.full((n2,), v, dtype), pair(g), pair(g))
      self.atom_weight[atom] = atom
    parts = self.combination(root_in)
    if parts is not None and root.gaussian and not root.spatial:
      self.register(root, {**parts, atom: parts.get(atom, 0.0) + scale})
    return root

  def sum_registered(self, root: Root, ra: Root, rb: Root, sign: float) -> Root:
    """Registers the atoms of root = ra + sign * rb when both are known."""
    pa, pb = self.combination(ra), self.combination(rb)
    if pa is not None and pb is not None and root.gaussian and not root.spatial:
      self.register(root, _combine(pa, 1.0, pb, sign))
    return root

  def sum_dependent(self, eqn, a: Field, b: Field, sign: float) -> Root:
    """a + sign * b for dependent Gaussian fields (sharing a weight): exact from the
    cross moments, M = ca^2 M_a + cb^2 M_b + ca cb (E[a b'] + E[b a'])."""
    (ra, ca), (rb, cb) = self._linear(a), self._linear(b)
    cb = sign * cb
    if (ra is None or rb is None or self.combination(ra) is None
        or self.combination(rb) is None or ra.spatial or rb.spatial
        or ra.channels != rb.channels or not (ra.homogeneous and rb.homogeneous)):
      return None
    c = self.cross_roots(ra, rb)
    ma1, ma2 = ra.means()
    mb1, mb2 = rb.means()
    ntk_a = 0.0 if ra.ntk is None else ra.ntk
    ntk_b = 0.0 if rb.ntk is None else rb.ntk
    root = Root(
        nngp=ca * ca * ra.nngp + cb * cb * rb.nngp + ca * cb * (c.ab + c.ba),
        ntk=ca * ca * ntk_a + cb * cb * ntk_b + ca * cb * (c.ntk_ab + c.ntk_ba),
        var1=ca * ca * ra.var1 + cb * cb * rb.var1 + 2 * ca * cb * c.s1,
        var2=ca * ca * ra.var2 + cb * cb * rb.var2 + 2 * ca * cb * c.s2,
        mean1=None if ra.mean1 is None and rb.mean1 is None else ca * ma1 + cb * mb1,
        mean2=None if ra.mean2 is None and rb.mean2 is None else ca * ma2 + cb * mb2,
        spatial=(), channels=ra.channels, gaussian=True, origins=ra.origins | rb.origins)
    return self.register(root, _combine(self.combination(ra), ca, self.combination(rb), cb))

  def stack(self, interp, eqn, fields: list) -> Field:
    """Fields of one width (each (batch, channel), e.g. a scan's per-step outputs)
    stacked along a new leading position axis t: moments E[f_t(x) f_s(x')] for all
    pairs (t, s) (the diagonal t = s in the diagonal layout)."""
    from infinite_modules.rules.linear import materialize
    roots = [materialize(interp, eqn, f) for f in fields]
    T = len(fields)
    if any(f.axes != (("b",), ("c",)) for f in fields) or len({r.channels for r in roots}) != 1:
      raise eqn.error("it stacks fields that are not all (batch, channel) fields of one width.",
                      SHARING_HINT)

    def grid(get, own):
      if not self.interp.full:
        return jnp.stack([own(r) for r in roots], axis=-1)
      rows = []
      for t in range(T):
        row = []
        for s in range(T):
          row.append(own(roots[t]) if t == s else get(self.cross_fields(eqn, fields[t],
                                                                        fields[s])))
        rows.append(jnp.stack(row, axis=-1))
      return jnp.stack(rows, axis=-2)

    nngp = grid(lambda c: c.ab, lambda r: r.nngp)
    ntk = grid(lambda c: c.ntk_ab, lambda r: jnp.zeros_like(r.nngp) if r.ntk is None else r.ntk)
    var1 = grid(lambda c: c.s1, lambda r: r.var1)
    var2 = grid(lambda c: c.s2, lambda r: r.var2)
    means = [r.means() for r in roots]
    has_mean = any(r.mean1 is not None for r in roots)
    gaussian = all(f.expr is None and r.gaussian and self.combination(r) is not None
                   for f, r in zip(fields, roots))
    origins = frozenset().union(*(r.origins for r in roots))
    root = Root(nngp=nngp, ntk=ntk, var1=var1, var2=var2,
                mean1=jnp.stack([m[0] for m in means], axis=-1) if has_mean else None,
                mean2=jnp.stack([m[1] for m in means], axis=-1) if has_mean else None,
                spatial=(T,), channels=roots[0].channels, gaussian=gaussian, origins=origins)
    return Field(root, ((0,), ("b",), ("c",)))

  # -- cross moments --------------------------------------------------------------

  def cross_roots(self, ra: Root, rb: Root) -> Cross | None:
    """E[z_a z_b'] of two roots without spatial positions, or None if unknown."""
    if ra is rb:
      return own_cross(ra)
    pa, pb = self.combination(ra), self.combination(rb)
    ma1, ma2 = ra.means()
    mb1, mb2 = rb.means()
    means = Cross(ma1[:, None] * mb2[None, :], mb1[:, None] * ma2[None, :], ma1 * mb1,
                  ma2 * mb2, 0 * ma1[:, None] * mb2[None, :], 0 * mb1[:, None] * ma2[None, :])
    if pa is None or pb is None:
      return means if not ra.origins & rb.origins else None
    total = means
    for ka, ca in pa.items():
      for kb, cb in pb.items():
        c = self._atom_cross(ka, kb)
        if c is not None:
          total = total + c.scaled(ca * cb)
    return total

  def _atom_cross(self, ka, kb) -> Cross | None:
    if ka == kb:
      return self.atom_self[ka]
    if self.atom_weight[ka] != self.atom_weight[kb]:
      return None  # G-vars of different weights are independent (and centered)
    if (ka, kb) in self.atom_cross:
      return self.atom_cross[(ka, kb)]
    return self.atom_cross[(kb, ka)].swapped()

  def cross_values(self, eqn, use: Use, old: Use, ref: ParamRef, uses) -> Cross:
    """E[h_a h_b'] (and the tangent cross moments) of two uses' inputs, summed over a
    concrete input's contracted entries or per channel of a field."""
    a, b = use.value, old.value
    if _is_zero(a) or _is_zero(b):
      zeros = _zero_cross(a if isinstance(a, Concrete) else b, use, old)
      if zeros is not None:
        return zeros
    if isinstance(a, Concrete) and isinstance(b, Concrete):
      xa1, xa2 = _arrange(a, use.contracted, self.interp.dtype)
      xb1, xb2 = _arrange(b, old.contracted, self.interp.dtype)
      if xa1.shape[1:] != xb1.shape[1:]:
        raise self._error(eqn, ref, uses + [use], "its uses contract inputs of different sizes.")
      zero = jnp.zeros((xa1.shape[0], xb2.shape[0]), xa1.dtype)
      return Cross(xa1 @ xb2.T, xb1 @ xa2.T, jnp.sum(xa1 * xb1, -1), jnp.sum(xa2 * xb2, -1),
                   zero, zero)
    if isinstance(a, Field) and isinstance(b, Field):
      if a.axes != (("b",), ("c",)) or b.axes != (("b",), ("c",)):
        raise self._error(eqn, ref, uses + [use], "a use's input is not a (batch, channel) "
                          "field.")
      return self.cross_fields(eqn, a, b, ref, uses + [use])
    raise self._error(eqn, ref, uses + [use],
                      "it is applied both to the network's input (a finite number of features) "
                      "and to an infinite-width field.")

  def cross_fields(self, eqn, a: Field, b: Field, ref=None, uses=()) -> Cross:
    """E[phi_a(z_a(x)) phi_b(z_b(x'))] and E[phi_a' phi_b'] Theta(z_a, z_b) per channel."""
    if a.root.channels != b.root.channels or not (a.root.homogeneous and b.root.homogeneous):
      raise self._error(eqn, ref, uses, "its inputs are fields of different widths or "
                        "channel concatenations.")
    if a.root is b.root and a.expr is b.expr:
      from infinite_modules.rules.linear import materialize
      return own_cross(materialize(self.interp, eqn, a))
    c = self.cross_roots(a.root, b.root)
    if c is None:
      raise self._error(eqn, ref, uses, "the cross-covariance of the fields it combines is "
                        "not tracked (they share random parameters through operations other "
                        "than dense layers, biases and sums).")
    if a.expr is None and b.expr is None:
      return c
    if ew.ctx_nodes(a.expr or ew.Z) or ew.ctx_nodes(b.expr or ew.Z):
      raise self._error(eqn, ref, uses, "a nonlinearity with per-example constants (e.g. "
                        "after a LayerNorm) is applied to a shared weight's input.")
    if not a.root.origins & b.root.origins:
      (pa1, pa2), (pb1, pb2) = (ew.means(r.root, r.expr, False, self.interp.points) for r in (a, b))
      zero = 0 * pa1[:, None] * pb2[None, :]
      return Cross(pa1[:, None] * pb2[None, :], pb1[:, None] * pa2[None, :], pa1 * pb1,
                   pa2 * pb2, zero, zero)
    if not (a.root.gaussian and b.root.gaussian):
      raise self._error(eqn, ref, uses, "the fields it combines are not Gaussian.")
    ma1, ma2 = a.root.means()
    mb1, mb2 = b.root.means()
    va1, va2 = a.root.var1 - ma1 * ma1, a.root.var2 - ma2 * ma2
    vb1, vb2 = b.root.var1 - mb1 * mb1, b.root.var2 - mb2 * mb2
    ea, eb = a.expr or ew.Z, b.expr or ew.Z

    def pair(cov, va, vb, ma, mb):
      return _phi_pair(ea, eb, cov - ma * mb, va, vb, ma, mb, self.interp.points)

    col, row = (lambda t: t[:, None]), (lambda t: t[None, :])
    ab, dab = pair(c.ab, col(va1), row(vb2), col(ma1), row(mb2))
    ba, dba = pair(c.ba.T, col(va2), row(vb1), col(ma2), row(mb1))  # a on batch 2, b on 1
    s1, _ = pair(c.s1, va1, vb1, ma1, mb1)
    s2, _ = pair(c.s2, va2, vb2, ma2, mb2)
    return Cross(ab, ba.T, s1, s2, dab * c.ntk_ab, dba.T * c.ntk_ba)

  def _linear(self, f: Field):
    """(root, alpha) with f = alpha z for a linear phi without constants, else (None, 0)."""
    if f.expr is None:
      return f.root, 1.0
    if ew.is_linear(f.expr) and not ew.ctx_nodes(f.expr):
      alpha = ew.evaluate(f.expr, jnp.ones((), f.root.nngp.dtype), ())
      return f.root, alpha
    return None, 0.0

  def _error(self, eqn, ref, uses, why: str):
    if ref is None:
      return eqn.error(f"weight sharing: {why}", SHARING_HINT)
    listed = "; ".join(f"`{u.where}`" for u in uses)
    return eqn.error(f"parameter `{ref.path}` is used {len(uses)} times (weight sharing: "
                     f"{listed}): {why}", SHARING_HINT)


def _combine(pa: dict, ca, pb: dict, cb) -> dict:
  out = {k: ca * c for k, c in pa.items()}
  for k, c in pb.items():
    out[k] = out.get(k, 0.0) + cb * c
  return out




def _arrange(v: Concrete, contracted: tuple, dtype):
  """A concrete input as (n, k): its batch axis first, contracted entries flattened."""
  def one(x):
    x = jnp.asarray(x, dtype)
    x = jnp.transpose(x, [v.batch_axis, *contracted])
    return x.reshape(x.shape[0], -1)
  a = one(v.v1)
  return a, (a if v.v2 is v.v1 else one(v.v2))


def _is_zero(v) -> bool:
  """A concrete value known at trace time to be identically zero (an initial carry)."""
  if not isinstance(v, Concrete):
    return False
  try:
    return bool(np.all(np.asarray(v.v1) == 0) and np.all(np.asarray(v.v2) == 0))
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError, TypeError):
    return False


def _zero_cross(example: Concrete, use: Use, old: Use) -> Cross | None:
  """All-zero cross moments (one input is identically zero)."""
  def count(v):
    if isinstance(v, Concrete):
      return np.shape(v.v1)[v.batch_axis], np.shape(v.v2)[v.batch_axis]
    return v.root.var1.shape[0], v.root.var2.shape[0]
  n1, n2 = count(use.value)
  dtype = jnp.result_type(jnp.asarray(example.v1).dtype, jnp.float32)
  if isinstance(use.value, Field):
    dtype = use.value.root.nngp.dtype
  elif isinstance(old.value, Field):
    dtype = old.value.root.nngp.dtype
  z2, z1 = jnp.zeros((n1, n2), dtype), jnp.zeros((n1,), dtype)
  return Cross(z2, z2, z1, jnp.zeros((n2,), dtype), z2, z2)


def _phi_pair(ea, eb, cov, va, vb, ma, mb, points: int):
  """(E[phi_a(u) phi_b(v)], E[phi_a'(u) phi_b'(v)]) for (u, v) Gaussian with means
  ma, mb, variances va, vb and covariance cov: Gauss-Hermite, or piecewise
  Gauss-Legendre split at the kinks when either phi has any."""
  shape = jnp.broadcast_shapes(*(jnp.shape(t) for t in (cov, va, vb, ma, mb)))
  va, vb, ma, mb = (jnp.broadcast_to(t, shape) for t in (va, vb, ma, mb))
  ka, kb = ew.switches(ea), ew.switches(eb)
  fa, breaks_a = ew._side(ea, ka, (), va, ma)
  fb, breaks_b = ew._side(eb, kb, (), vb, mb)
  dfa, dfb = ex.derivative(fa), ex.derivative(fb)
  if not ka and not kb:
    return ex.pair_expectations(((fa, fb), (dfa, dfb)), cov, va, vb, ma, mb, points)
  none = jnp.full(shape + (0,), jnp.inf, cov.dtype)
  breaks_a = none if breaks_a is None else breaks_a
  breaks_b = none if breaks_b is None else breaks_b
  return ex.pair_expectations_piecewise(((fa, fb), (dfa, dfb)), cov, va, vb, ma, mb, breaks_a,
                                        breaks_b)
