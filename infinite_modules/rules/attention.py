"""Attention: products of two fields (queries x keys) and of attention weights with a field.

Infinite-width limit with the number of heads H fixed and head_dim C -> infinity
(Hron et al. 2020, "Infinite attention: NNGP and NTK for deep attention networks").
Heads are the channel groups of a `DenseGeneral(features=(H, C))` projection (or of a
reshape (..., H * C) -> (..., H, C)); each head is an i.i.d. copy.

Logits. S(a, q, k) = t sum_c f(z_q)_c g(z'_k)_c, with f = alpha z, g = beta z' linear
in the query and key fields and t = alpha beta their product scale:
* t = 1 / C (1/head_dim scaling): the sum obeys the law of large numbers,
  S -> t C E[z_q z'_k] deterministically (per example). For keys and queries from
  the same projection (tied weights, Neural Tangents' `linear_scaling=True`) this is
  t C times the field's covariance between positions q and k; for independent
  projections it is t C m_q m'_k (zero for zero-mean fields: uniform attention).
  The logits' dependence on the query/key weights contributes O(1/C) to the NTK and
  vanishes in the limit (as in NT).
* t = 1 / sqrt(C) (the usual scaling): S converges to a Gaussian process over (query,
  key) positions and the attention weights stay random: `rules.gaussian_logits`
  estimates the block's second moments by Monte Carlo over the Gaussian logits.

Attention weights P (deterministic, per example, the same in every head) applied to a
value field V: O(a, q) = sum_k P_a(q, k) V(a, k) per channel, a linear map of positions:
  nngp'(a, b; q, q') = sum_{k, k'} P_a(q, k) P_b(q', k') nngp(a, b; k, k'),
and the same for the NTK, the variances and (linearly) the means. Gaussian in, Gaussian out.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from infinite_modules import elementwise as ew
from infinite_modules import moments as mo
from infinite_modules.interpreter import Interpreter
from infinite_modules.values import Concrete, Field, Root, is_group

_HINT = ("Use logits scaled by 1/head_dim (a custom `attention_fn`), or "
         "`interop.monte_carlo_kernel_fn` for a Monte Carlo estimate of the kernel.")
# Relative tolerance when recognising t C = 1 or t sqrt(C) = 1 (float32 scale factors).
_SCALE_RTOL = 1e-5


def _linear_scale(eqn, field: Field) -> float:
  """alpha in f = alpha z for a field whose expression is a constant multiple of z."""
  if field.expr is None:
    return 1.0
  if not ew.is_linear(field.expr) or ew.ctx_nodes(field.expr):
    raise eqn.error(
        "the product of two fields has an operand that is not a constant multiple of a "
        "Gaussian field (a nonlinearity or a per-example normalisation between the "
        "projection and the product), whose limit is not implemented.", _HINT)
  with jax.ensure_compile_time_eval():
    return float(np.asarray(ew.evaluate(field.expr, np.float64(1.0), [])))


def _layout(eqn, field: Field, contracting, batch):
  """Checks one operand's axes; returns (batch atoms, its free spatial atom or None)."""
  if [field.axes[i] for i in contracting] != [("c",)]:
    raise eqn.error(f"a product of two fields must contract exactly their channel axes, got "
                    f"{[field.axes[i] for i in contracting]}.", _HINT)
  batch_atoms = [field.axes[i] for i in batch]
  if ("b",) not in batch_atoms or any(len(a) != 1 or not (a[0] == "b" or is_group(a[0]))
                                      for a in batch_atoms):
    raise eqn.error("a product of two fields must keep the batch axis and the heads (channel "
                    f"groups) as batch dimensions, got {batch_atoms}.", _HINT)
  free = [i for i in range(len(field.axes)) if i not in contracting and i not in batch]
  spatial = [field.axes[i] for i in free if field.axes[i] != ("u",)]
  if len(spatial) > 1 or any(len(a) != 1 or not isinstance(a[0], int) for a in spatial):
    raise eqn.error(f"a product of two fields with free axes {spatial} (only one position "
                    "axis per operand is supported).", _HINT)
  return batch_atoms, (spatial[0][0] if spatial else None)


def logits_rule(interp: Interpreter, eqn, lhs: Field, rhs: Field):
  """S = sum_c lhs_c rhs_c for query and key fields: deterministic 1/head_dim logits."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  batch_l, pos_l = _layout(eqn, lhs, lc, lb)
  batch_r, pos_r = _layout(eqn, rhs, rc, rb)
  if batch_l != batch_r:
    raise eqn.error(f"the operands' batch dimensions {batch_l} and {batch_r} differ.", _HINT)
  if len(lhs.root.spatial) != 1 or len(rhs.root.spatial) != 1 or None in (pos_l, pos_r):
    raise eqn.error("attention logits are supported for sequences (one position axis).",
                    _HINT)
  width = lhs.root.channels
  if rhs.root.channels != width:
    raise eqn.error("a product of fields of different widths.", _HINT)
  t = _linear_scale(eqn, lhs) * _linear_scale(eqn, rhs)
  same = lhs.root is rhs.root
  if not same and (lhs.root.origins & rhs.root.origins):
    raise eqn.error("queries and keys depend on the same random parameters in different "
                    "ways; their cross-covariance is not tracked.", _HINT)
  lroot = _materialized(interp, eqn, lhs)
  rroot = lroot if same else _materialized(interp, eqn, rhs)
  for root in (lroot, rroot):
    if root.random_moments is not None:
      from infinite_modules.rules.gaussian_logits import mixture_error
      raise mixture_error(eqn, root, "an attention layer (its logits)")
  if same and not interp.full:
    raise mo.NeedFullLayout()
  values = []
  for side in (1, 2):
    if same:
      var = lroot.var1 if side == 1 else lroot.var2
      s = var  # (n, L, L): E[z_q z_k] (uncentered) at positions (q, k)
    else:
      ml = lroot.mean1 if side == 1 else lroot.mean2
      mr = rroot.mean1 if side == 1 else rroot.mean2
      n = interp.n1 if side == 1 else interp.n2
      if ml is None or mr is None:
        s = jnp.zeros((n, lroot.spatial[0], rroot.spatial[0]), interp.dtype)
      else:
        s = ml[:, :, None] * mr[:, None, :]
    values.append(_to_output(eqn, width * s, batch_l, lb, lc, lhs, side))
  # Constant along the head axes: every head is an i.i.d. copy with the same limit.
  heads = frozenset(j for j, atoms in enumerate(batch_l) if atoms != ("b",))
  lfree = [i for i in range(len(lhs.axes)) if i not in lc and i not in lb]
  rfree = [i for i in range(len(rhs.axes)) if i not in rc and i not in rb]
  layout = tuple([atoms[0] for atoms in batch_l]
                 + ["u" if lhs.axes[i] == ("u",) else "q" for i in lfree]
                 + ["u" if rhs.axes[i] == ("u",) else "k" for i in rfree])
  return [Logits(values[0], values[1], batch_l.index(("b",)), heads, width, t, eqn.where,
                 lroot, rroot, layout)]


@dataclasses.dataclass(frozen=True, eq=False)
class Logits:
  """sum_c f_c g_c of two fields, times `scale`: its limit depends on the scale.

  `sum1`/`sum2` hold C E[z_q z'_k] (the law-of-large-numbers value of the unscaled
  sum, zero for independent zero-mean fields) per side in the product's output layout.
  Multiplications and divisions by constants update `scale`; any other use resolves
  the value (module docstring): deterministic for scale = 1 / C, refused otherwise.
  """
  sum1: jax.Array
  sum2: jax.Array
  batch_axis: int
  const_axes: frozenset
  width: int
  scale: float
  where: str
  query: Root  # the moments of the query and key fields z, z' (for Gaussian logits)
  key: Root
  layout: tuple  # per output axis: "b", a head (group) atom, "q", "k" or "u" (unit)

  def consumed_by(self, interp, eqn, invals):
    """The outputs of `eqn` if it keeps the logits pending, else None (then `resolve`).

    Products with (and divisions by) constant scalars update the scale; calls (jit,
    custom_jvp) are entered with the logits still pending. Any other use of 1/sqrt(C)
    logits continues on Monte Carlo samples of their Gaussian limit.
    """
    from infinite_modules.interpreter import RULES, concrete_scalar, enter_call
    if RULES.get(eqn.name) is enter_call:
      return enter_call(interp, eqn, invals)
    if eqn.name == "mul" and len(invals) == 2:
      other = invals[1] if invals[0] is self else invals[0]
    elif eqn.name == "div" and len(invals) == 2 and invals[0] is self:
      other = invals[1]
    else:
      other = None
    scalar = None if other is None else concrete_scalar(other)
    if scalar is None or scalar == 0:
      if abs(self.scale * np.sqrt(self.width) - 1) <= _SCALE_RTOL:
        from infinite_modules.rules import gaussian_logits
        sampled = gaussian_logits.sample(interp, eqn, self)
        return sampled.consumed_by(interp, eqn, [sampled if v is self else v for v in invals])
      return None
    factor = 1.0 / scalar if eqn.name == "div" else scalar
    return [dataclasses.replace(self, scale=self.scale * factor)]

  def resolve(self, eqn) -> Concrete:
    """The deterministic 1/head_dim limit, or an error saying why there is none."""
    t, width = self.scale, self.width
    where = f" (logits computed in `{self.where}`)" if self.where else ""
    if abs(t * width - 1) <= _SCALE_RTOL:
      return Concrete(t * self.sum1, t * self.sum2, self.batch_axis, self.const_axes)
    if abs(t * np.sqrt(width) - 1) <= _SCALE_RTOL:
      raise eqn.error(
          f"attention logits scaled by 1/sqrt(head_dim) (head_dim {width}){where} converge "
          "to a Gaussian process over (query, key) positions at infinite width, and the "
          "attention weights stay random (Hron et al. 2020); the expectation of the softmax "
          "over Gaussian logits is not implemented.", _HINT)
    raise eqn.error(
        f"attention logits scaled by {t:.6g} = {t * width:.6g} / head_dim (head_dim "
        f"{width}){where}: only 1/head_dim gives deterministic attention weights at infinite "
        "width.", _HINT)


def _materialized(interp, eqn, field: Field) -> Root:
  from infinite_modules.rules.linear import materialize
  return materialize(interp, eqn, Field(field.root, field.axes))


def _to_output(eqn, s, batch_atoms, lb, lc, lhs: Field, side: int):
  """(n, Lq, Lk) logits in dot_general's output layout: batch dims, lhs free, rhs free."""
  shape = eqn.out_shape(0, side)
  n = s.shape[0]
  lfree = [i for i in range(len(lhs.axes)) if i not in lc and i not in lb]
  n_lhs = len(batch_atoms) + len(lfree)
  rest = shape[n_lhs:]  # the rhs free axes
  out = s
  target = [n if atoms == ("b",) else 1 for atoms in batch_atoms]
  target += [s.shape[1] if lhs.axes[i] != ("u",) else 1 for i in lfree]
  target += [s.shape[2] if size != 1 else 1 for size in rest]
  out = out.reshape(target)
  return jnp.broadcast_to(out, shape)


def value_product_axes(eqn, field: Field, weights_batch_axis: int, weights_first: bool,
                       what: str, hint: str):
  """The axes of O = P V, attention weights P (`what`) times a value field V, checked:
  V's single position axis is contracted, and the product is batched over examples
  (paired with the weights' batch axis) and head groups only.

  Returns (P's contracted, P's batch, V's contracted, V's batch axes, V's batch atoms).
  """
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  pc, pb, vc, vb = (lc, lb, rc, rb) if weights_first else (rc, rb, lc, lb)
  v_contracted = [field.axes[i] for i in vc]
  if len(v_contracted) != 1 or len(v_contracted[0]) != 1 or not isinstance(
      v_contracted[0][0], int) or len(field.root.spatial) != 1:
    raise eqn.error(f"a product of {what} with a field must contract the field's (single) "
                    f"position axis, got {v_contracted}.", hint)
  v_batch = [field.axes[i] for i in vb]
  if ("b",) not in v_batch or any(a != ("b",) and not (len(a) == 1 and is_group(a[0]))
                                  for a in v_batch):
    raise eqn.error(f"unexpected batch dimensions {v_batch} of a product with a field.", hint)
  if pb[v_batch.index(("b",))] != weights_batch_axis:
    raise eqn.error("the weights' batch axis is not paired with the field's.", hint)
  return pc, pb, vc, vb, v_batch


def weights_rule(interp: Interpreter, eqn, weights: Concrete, field: Field, weights_first: bool):
  """O = P V: deterministic attention weights applied to a value field (module docstring)."""
  pc, pb, vc, vb, v_batch = value_product_axes(
      eqn, field, weights.batch_axis, weights_first, "input-dependent weights", _HINT)
  for j, atoms in enumerate(v_batch):
    if atoms != ("b",) and pb[j] not in weights.const_axes and np.shape(weights.v1)[pb[j]] != 1:
      raise eqn.error(
          "the attention weights differ between heads, so the heads of the output are not "
          "identically distributed (not tracked).", _HINT)
  p_free = [i for i in range(weights.ndim) if i not in pc and i not in pb]
  if len(p_free) != 1 or len(pc) != 1:
    raise eqn.error("attention weights must have one query and one key axis.", _HINT)
  if not interp.full:
    raise mo.NeedFullLayout()
  root = _materialized(interp, eqn, field)

  def per_example(v):  # (n, Lq, Lk), taking head 0 (all heads are equal)
    v = jnp.asarray(v, interp.dtype)
    heads = [pb[j] for j, atoms in enumerate(v_batch) if atoms != ("b",)]
    index = [slice(None)] * v.ndim
    for h in heads:
      index[h] = slice(0, 1)
    v = v[tuple(index)]
    v = jnp.moveaxis(v, [weights.batch_axis, p_free[0], pc[0]], [0, 1, 2])
    return v.reshape(v.shape[:3])

  p1, p2 = per_example(weights.v1), per_example(weights.v2)
  nngp = jnp.einsum("aqk,bpl,abkl->abqp", p1, p2, root.nngp)
  ntk = jnp.einsum("aqk,bpl,abkl->abqp", p1, p2, root.ntk)
  var1 = jnp.einsum("aqk,apl,akl->aqp", p1, p1, root.var1)
  var2 = jnp.einsum("aqk,apl,akl->aqp", p2, p2, root.var2)
  mean1 = None if root.mean1 is None else jnp.einsum("aqk,ak->aq", p1, root.mean1)
  mean2 = None if root.mean2 is None else jnp.einsum("aqk,ak->aq", p2, root.mean2)
  new = dataclasses.replace(root, nngp=nngp, ntk=ntk, var1=var1, var2=var2, mean1=mean1,
                            mean2=mean2, spatial=(p1.shape[1],), gathered_from=None)
  batch_axes = list(v_batch)
  v_free = [field.axes[i] for i in range(len(field.axes)) if i not in vc and i not in vb]
  p_axes = [(0,)]
  free = (p_axes + v_free) if weights_first else (v_free + p_axes)
  return [Field(new, tuple(batch_axes + free))]


def product_rule(interp: Interpreter, eqn, invals):
  """dot_general of two fields, or of input-dependent weights with a field (attention)."""
  lhs, rhs = invals
  if isinstance(lhs, Field) and isinstance(rhs, Field):
    return logits_rule(interp, eqn, lhs, rhs)
  if isinstance(lhs, Concrete) and isinstance(rhs, Field):
    return weights_rule(interp, eqn, lhs, rhs, True)
  if isinstance(lhs, Field) and isinstance(rhs, Concrete):
    return weights_rule(interp, eqn, rhs, lhs, False)
  raise eqn.error("unexpected operands of a product with a field.", _HINT)
