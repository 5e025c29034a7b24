"""Automatic ``vmap_axes``: prove from the model's jaxpr that examples are independent.

Every empirical NTK implementation is much faster when it may evaluate the model one
example at a time (``jax.vmap`` over the batch, NT's ``vmap_axes``): then the per-example
Jacobians are ``O x P`` instead of ``N O x P``. That is exact only if output row ``i``
depends on input row ``i`` alone, *and* its derivative with respect to the parameters
does too. This module decides it conservatively from the program itself, the way
``im.kernel_fn`` finds the batch axis with probe traces:

1. trace the **forward-mode derivative** ``(p, x, t) -> jvp(f(., x), p, t)`` (so custom
   JVP rules are part of what is checked, not only the primal) at two batch sizes
   ``s`` and ``s + 1`` (``s = max(N, 2)``), with the batch along axis 0 of every input
   leaf;
2. walk both jaxprs in lockstep. Every variable has either *no batch axis* (same shape
   in both traces: parameters, constants) or exactly one *batch axis* (the only axis
   whose size differs, equal to the batch size), and a per-primitive rule (below) must
   prove that the equation maps row ``i`` of its batched operands to row ``i`` of its
   outputs without looking at other rows: elementwise operations, ``dot_general`` /
   ``conv_general_dilated`` / reductions / windows / slices / pads / gathers that do not
   touch the batch axis, broadcasts that replicate along it, and reshapes that keep it
   whole. Anything else -- a reduction over the batch (training-mode BatchNorm, batch
   statistics), an ``iota`` or random bits shaped by the batch (dropout masks depend on
   the position in the batch), collectives with ``axis_name``, loops, unknown
   primitives -- stops the proof, and the kernel keeps the exact non-vmapped path;
3. trace once more at batch size 1 (what ``jax.vmap`` evaluates) and require the same
   sequence of primitives, so Python code that branches on the batch size is caught.

The result is a :class:`BatchIndependence`: the input / output axes to use as
``vmap_axes``, or the reason (primitive and position in the program) why not.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

PyTree = Any

__all__ = ["BatchIndependence", "detect_batch_independence"]


@dataclasses.dataclass(frozen=True)
class BatchIndependence:
  """What :func:`detect_batch_independence` found.

  Attributes:
    independent: whether examples were proven independent.
    x_axis: batch axis of every input leaf (``None`` when not independent).
    fx_axis: pytree (structure of ``f(x)``) of the batch axis of every output leaf.
    reason: why examples are not (proven) independent, or what was found.
  """

  independent: bool
  x_axis: int | None
  fx_axis: PyTree
  reason: str

  def describe(self) -> str:
    if self.independent:
      return (f"examples are independent: vmap over input axis {self.x_axis}, output axes "
              f"{jax.tree_util.tree_leaves(self.fx_axis)} ({self.reason})")
    return f"examples may interact, exact non-vmapped path: {self.reason}"


class _Coupled(Exception):
  """The proof failed at one equation."""


# Primitives whose outputs are elementwise functions of equally shaped operands (rank-0
# operands broadcast). Their batch axis is that of their batched operands.
_ELEMENTWISE = frozenset({
    "abs", "acos", "acosh", "add", "add_any", "and", "asin", "asinh", "atan", "atan2", "atanh",
    "bitcast_convert_type", "cbrt", "ceil", "clamp", "complex", "conj", "convert_element_type",
    "copy", "copy_p", "cos", "cosh", "digamma", "div", "eq", "erf", "erf_inv", "erfc", "exp",
    "exp2", "expm1", "floor", "ge", "gt", "igamma", "igammac", "imag", "integer_pow", "is_finite",
    "le", "lgamma", "log", "log1p", "logistic", "lt", "max", "min", "mul", "ne", "neg",
    "nextafter", "not", "or", "population_count", "pow", "real", "reduce_precision", "rem",
    "round", "rsqrt", "select_n", "shift_left", "shift_right_arithmetic", "shift_right_logical",
    "sign", "sin", "sinh", "sqrt", "square", "sub", "tan", "tanh", "xor", "stop_gradient",
    "sharding_constraint",
})

# Calls whose sub-jaxpr is the primal computation (analysed inline).
_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint",
                    "remat2", "custom_jvp_call"})

_REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod",
                         "reduce_and", "reduce_or", "reduce_xor", "argmax", "argmin"})
_CUMULATIVE = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})
_WINDOWS = frozenset({"reduce_window_sum", "reduce_window_max", "reduce_window_min",
                      "reduce_window", "select_and_gather_add", "select_and_scatter_add"})

Axis = int | None  # batch axis of one variable, None: no batch axis


def _shape(v: Any) -> tuple[int, ...]:
  return tuple(getattr(v.aval, "shape", ()))


def _where(eqn: Any) -> str:
  info = getattr(eqn, "source_info", None)
  names = getattr(info, "name_stack", None)
  stack = str(names) if names is not None else ""
  return f"`{eqn.primitive.name}`" + (f" at {stack}" if stack else "")


@dataclasses.dataclass
class _Walker:
  """Lockstep analysis of two traces ``a`` (batch size ``na``) and ``b`` (``nb``)."""

  na: int
  nb: int

  def batch_axis_of(self, va: Any, vb: Any) -> Axis:
    """The batch axis a variable's shapes show, checked to be the batch size."""
    sa, sb = _shape(va), _shape(vb)
    if len(sa) != len(sb):
      raise _Coupled("a value changes rank with the batch size")
    diff = [i for i, (p, q) in enumerate(zip(sa, sb)) if p != q]
    if not diff:
      return None
    if len(diff) > 1 or (sa[diff[0]], sb[diff[0]]) != (self.na, self.nb):
      raise _Coupled("a value's shape depends on the batch size other than along one "
                     "batch axis")
    return diff[0]

  def run(self, ja: Any, jb: Any, in_axes: Sequence[Axis]) -> list[Axis]:
    env: dict[Any, Axis] = {}

    def read(v: Any) -> Axis:
      return None if isinstance(v, jcore.Literal) else env[v]

    for v in ja.constvars:
      env[v] = None
    for v, ax in zip(ja.invars, in_axes):
      env[v] = ax
    if len(ja.eqns) != len(jb.eqns):
      raise _Coupled("the program changes with the batch size")
    for ea, eb in zip(ja.eqns, jb.eqns):
      if ea.primitive is not eb.primitive or len(ea.outvars) != len(eb.outvars):
        raise _Coupled("the program changes with the batch size")
      ins = [read(v) for v in ea.invars]
      try:
        outs = self.equation(ea, eb, ins)
      except _Coupled as err:
        raise _Coupled(f"{_where(ea)}: {err}") from None
      for va, vb, ax in zip(ea.outvars, eb.outvars, outs):
        shown = self.batch_axis_of(va, vb)
        if shown != ax and ax is None:
          raise _Coupled(f"{_where(ea)}: makes a batch-sized value without reading the "
                         "examples (it can depend on the position in the batch)")
        if shown != ax:
          raise _Coupled(f"{_where(ea)}: output batch axis {shown} where the rule "
                         f"gives {ax}")
        env[va] = ax
    return [read(v) for v in ja.outvars]

  def equation(self, ea: Any, eb: Any, ins: list[Axis]) -> list[Axis]:
    name = ea.primitive.name
    if all(a is None for a in ins):
      # No batched operand: the outputs must not depend on the batch size at all (an
      # ``iota`` or random bits shaped by the batch would be position dependent),
      # except for broadcasts, which replicate along a new batch axis.
      if name == "broadcast_in_dim":
        return [self.batch_axis_of(ea.outvars[0], eb.outvars[0])]
      if name in _CALLS:
        return self.call(ea, eb, ins)
      return [None] * len(ea.outvars)
    if name in _ELEMENTWISE:
      return self.elementwise(ea, ins)
    if name in _CALLS:
      return self.call(ea, eb, ins)
    rule = _RULES.get(name)
    if rule is None:
      raise _Coupled("no batch-independence rule for this primitive")
    return rule(self, ea, ins)

  def elementwise(self, ea: Any, ins: list[Axis]) -> list[Axis]:
    axes = {a for a in ins if a is not None}
    if len(axes) != 1:
      raise _Coupled("operands have their batch axis at different positions")
    (axis,) = axes
    for v, a in zip(ea.invars, ins):
      shape = _shape(v)
      if a is None and shape and shape[axis] != 1:
        raise _Coupled("an unbatched operand has a non-broadcast batch-axis size")
    return [axis] * len(ea.outvars)

  def call(self, ea: Any, eb: Any, ins: list[Axis]) -> list[Axis]:
    sa, sb = _sub(ea), _sub(eb)
    if sa is None or sb is None:
      raise _Coupled("a call without an inspectable sub-program")
    n_consts = len(sa.invars) - len(ins)
    return self.run(sa, sb, [None] * n_consts + ins)


def _sub(eqn: Any) -> Any:
  sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
  if isinstance(sub, jcore.ClosedJaxpr):
    return sub.jaxpr
  return sub if isinstance(sub, jcore.Jaxpr) else None


def _only(ins: list[Axis], pos: int = 0) -> int:
  """The batch axis of operand ``pos``, requiring all other operands unbatched."""
  if ins[pos] is None or any(a is not None for i, a in enumerate(ins) if i != pos):
    raise _Coupled("a batched operand in a position that mixes examples")
  return ins[pos]


def _shift(axis: int, removed: Sequence[int]) -> int:
  return axis - sum(1 for d in removed if d < axis)


def _reduction(w: _Walker, ea: Any, ins: list[Axis]) -> list[Axis]:
  axis = _only(ins)
  axes = tuple(ea.params["axes"])
  if axis in axes:
    raise _Coupled("reduces over the batch axis (batch statistics couple examples)")
  return [_shift(axis, axes)] * len(ea.outvars)


def _cumulative(w: _Walker, ea: Any, ins: list[Axis]) -> list[Axis]:
  axis = _only(ins)
  if ea.params["axis"] == axis:
    raise _Coupled("accumulates along the batch axis")
  return [axis]


def _same_axis_all(ins: list[Axis], forbidden: Sequence[int] = ()) -> int:
  axes = set(ins)
  if len(axes) != 1 or None in axes:
    raise _Coupled("operands are not all batched along the same axis")
  (axis,) = axes
  if axis in forbidden:
    raise _Coupled("operates along the batch axis")
  return axis


def _window(w: _Walker, ea: Any, ins: list[Axis]) -> list[Axis]:
  p = ea.params
  n_arrays = len(ea.outvars) if ea.primitive.name == "reduce_window" else len(ins)
  axes = {a for a in ins[:n_arrays] if a is not None}
  if len(axes) != 1 or any(a is not None for a in ins[n_arrays:]):
    raise _Coupled("operands are not all batched along the same axis")
  (axis,) = axes
  if any(a is None for a in ins[:n_arrays]):
    raise _Coupled("operands are not all batched along the same axis")
  trivial = (p["window_dimensions"][axis] == 1 and p["window_strides"][axis] == 1
             and tuple(p["padding"][axis]) == (0, 0)
             and p.get("base_dilation", (1,) * (axis + 1))[axis] == 1
             and p.get("window_dilation", (1,) * (axis + 1))[axis] == 1)
  if not trivial:
    raise _Coupled("the window extends along the batch axis")
  return [axis] * len(ea.outvars)


def _broadcast(w: _Walker, ea: Any, ins: list[Axis]) -> list[Axis]:
  axis = _only(ins)
  return [ea.params["broadcast_dimensions"][axis]]


def _reshape(w: _Walker, ea: Any, ins: list[Axis]) -> list[Axis]:
  axis = _only(ins)
  if ea.params.get("dimensions") is not None:
    raise _Coupled("reshape with a dimension permutation")
  sin, sout = _shape(ea.invars[0]), _shape(ea.outvars[0])
  before = math.prod(sin[:axis])
  for d in range(len(sout)):
    # The batch axis survives whole iff some output axis has the batch size with the
    # same number of elements before it (then the same number after it, too).
    if sout[d] == sin[axis] and math.prod(sout[:d]) == before:
      return [d]
  raise _Coupled("reshape merges the batch axis with other axes")


def _transpose(w: _Walker, ea: Any, ins: list[Axis]) -> list[Axis]:
  axis = _only(ins)
  return [tuple(ea.params["permutation"]).index(axis)]


def _squeeze(w: _Walker, ea: Any, ins: list[Axis]) -> list[Axis]:
  axis = _only(ins)
  nd = len(_shape(ea.invars[0]))
  dims = [d % nd for d in ea.params["dimensions"]]
  if axis in dims:
    raise _Coupled("squeezes the batch axis")
  return [_shift(axis, dims)]


def _dot_general(w: _Walker, ea: Any, ins: list[Axis]) -> list[Axis]:
  (lc, rc), (lb, rb) = ea.params["dimension_numbers"]
  a, b = ins
  nl, nr = len(_shape(ea.invars[0])), len(_shape(ea.invars[1]))
  lfree = [d for d in range(nl) if d not in lc and d not in lb]
  rfree = [d for d in range(nr) if d not in rc and d not in rb]
  if a is not None and b is not None:
    pairs = list(zip(lb, rb))
    if (a, b) not in pairs:
      raise _Coupled("both operands batched, not along a paired batch dimension")
    return [pairs.index((a, b))]
  if a is not None:
    if a not in lfree:
      raise _Coupled("contracts over the batch axis")
    return [len(lb) + lfree.index(a)]
  if b not in rfree:
    raise _Coupled("contracts over the batch axis")
  return [len(lb) + len(lfree) + rfree.index(b)]


def _conv(w: _Walker, ea: Any, ins: list[Axis]) -> list[Axis]:
  axis = _only(ins, 0)
  lhs_spec, _, out_spec = ea.params["dimension_numbers"]
  if axis != lhs_spec[0] or ea.params["batch_group_count"] != 1:
    raise _Coupled("convolves along the batch axis (or groups the batch)")
  return [out_spec[0]]


def _pad(w: _Walker, ea: Any, ins: list[Axis]) -> list[Axis]:
  axis = _only(ins, 0)
  if tuple(ea.params["padding_config"][axis]) != (0, 0, 0):
    raise _Coupled("pads the batch axis")
  return [axis]


def _slice(w: _Walker, ea: Any, ins: list[Axis]) -> list[Axis]:
  axis = _only(ins, 0)
  p = ea.params
  strides = p.get("strides") or (1,) * len(p["start_indices"])
  if (p["start_indices"][axis] != 0 or strides[axis] != 1
      or p["limit_indices"][axis] != _shape(ea.invars[0])[axis]):
    raise _Coupled("slices the batch axis")
  return [axis]


def _dynamic_slice(w: _Walker, ea: Any, ins: list[Axis]) -> list[Axis]:
  axis = _only(ins, 0)
  if ea.params["slice_sizes"][axis] != _shape(ea.invars[0])[axis]:
    raise _Coupled("slices the batch axis")
  return [axis]  # a full-size slice is clamped to start 0 whatever the index


def _dynamic_update_slice(w: _Walker, ea: Any, ins: list[Axis]) -> list[Axis]:
  if ins[0] is None or ins[1] != ins[0] or any(a is not None for a in ins[2:]):
    raise _Coupled("updates along the batch axis")
  axis = ins[0]
  if _shape(ea.invars[1])[axis] != _shape(ea.invars[0])[axis]:
    raise _Coupled("updates part of the batch axis")
  return [axis]


def _concatenate(w: _Walker, ea: Any, ins: list[Axis]) -> list[Axis]:
  return [_same_axis_all(ins, (ea.params["dimension"],))]


def _stack(w: _Walker, ea: Any, ins: list[Axis]) -> list[Axis]:
  axis = _same_axis_all(ins)
  return [axis if axis < ea.params["axis"] else axis + 1]


def _identity(w: _Walker, ea: Any, ins: list[Axis]) -> list[Axis]:
  return list(ins)  # each output is its operand


def _split(w: _Walker, ea: Any, ins: list[Axis]) -> list[Axis]:
  axis = _only(ins)
  if ea.params["axis"] == axis:
    raise _Coupled("splits the batch axis")
  return [axis] * len(ea.outvars)


def _rev(w: _Walker, ea: Any, ins: list[Axis]) -> list[Axis]:
  axis = _only(ins)
  if axis in ea.params["dimensions"]:
    raise _Coupled("reverses the batch axis")
  return [axis]


def _sort(w: _Walker, ea: Any, ins: list[Axis]) -> list[Axis]:
  axis = _same_axis_all(ins, (ea.params["dimension"],))
  return [axis] * len(ea.outvars)


def _top_k(w: _Walker, ea: Any, ins: list[Axis]) -> list[Axis]:
  axis = _only(ins)
  nd = len(_shape(ea.invars[0]))
  if axis == nd - 1 or axis == ea.params.get("axis", nd - 1) % nd:
    raise _Coupled("selects along the batch axis")
  return [axis] * len(ea.outvars)


def _gather(w: _Walker, ea: Any, ins: list[Axis]) -> list[Axis]:
  """Lookups ``operand[indices]`` with an unbatched operand (embedding tables): output
  batch dimensions follow the indices' batch dimensions in order."""
  if ins[0] is not None or ins[1] is None:
    raise _Coupled("gathers from a batched operand")
  dn = ea.params["dimension_numbers"]
  if tuple(getattr(dn, "operand_batching_dims", ())):
    raise _Coupled("gather with batching dimensions")
  nd_idx = len(_shape(ea.invars[1]))
  idx_batch = [d for d in range(nd_idx - 1)]  # the last indices axis is the index vector
  if ins[1] not in idx_batch:
    raise _Coupled("the batch axis is the gather index vector")
  nd_out = len(_shape(ea.outvars[0]))
  out_batch = [d for d in range(nd_out) if d not in dn.offset_dims]
  return [out_batch[idx_batch.index(ins[1])]]


def _cond(w: _Walker, ea: Any, ins: list[Axis]) -> list[Axis]:
  raise _Coupled("conditionals are not analysed")


_RULES: dict[str, Callable[[_Walker, Any, list[Axis]], list[Axis]]] = {
    **{n: _reduction for n in _REDUCTIONS},
    **{n: _cumulative for n in _CUMULATIVE},
    **{n: _window for n in _WINDOWS},
    "broadcast_in_dim": _broadcast,
    "reshape": _reshape,
    "transpose": _transpose,
    "squeeze": _squeeze,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "pad": _pad,
    "slice": _slice,
    "dynamic_slice": _dynamic_slice,
    "dynamic_update_slice": _dynamic_update_slice,
    "concatenate": _concatenate,
    "split": _split,
    "stack": _stack,
    "optimization_barrier": _identity,
    "rev": _rev,
    "sort": _sort,
    "top_k": _top_k,
    "gather": _gather,
}


def _same_value(u: Any, v: Any) -> bool:
  if u is v:
    return True
  if isinstance(u, jax.core.Tracer) or isinstance(v, jax.core.Tracer):
    return False
  try:
    return bool(np.shape(u) == np.shape(v) and np.array_equal(np.asarray(u), np.asarray(v)))
  except Exception:  # noqa: BLE001 - not array-like: fall back to ==
    try:
      return bool(u == v)
    except Exception:  # noqa: BLE001
      return False


def _jaxprs(p: Any) -> list:
  subs = p if isinstance(p, (tuple, list)) else (p,)
  return [q for q in subs if isinstance(q, (jcore.Jaxpr, jcore.ClosedJaxpr))]


def _same_program(ja: Any, jb: Any, j1: Any) -> None:
  """Checks that the trace ``j1`` at batch size 1 (what ``jax.vmap`` evaluates) is the
  trace ``ja`` at batch size ``s`` up to the parameters that also differ between ``ja``
  and ``jb`` (batch size ``s + 1``: shapes). Literals and constants must be equal in all
  three, so a model that branches on or scales by the batch size is caught."""
  if isinstance(ja, jcore.ClosedJaxpr):
    if not (len(ja.consts) == len(jb.consts) == len(j1.consts)) or not all(
        _same_value(a, b) and _same_value(a, c)
        for a, b, c in zip(ja.consts, jb.consts, j1.consts)):
      raise _Coupled("a constant of the program depends on the batch size")
    ja, jb, j1 = ja.jaxpr, jb.jaxpr, j1.jaxpr
  if not (len(ja.eqns) == len(jb.eqns) == len(j1.eqns)):
    raise _Coupled("the program changes with the batch size")
  for ea, eb, e1 in zip(ja.eqns, jb.eqns, j1.eqns):
    if not (ea.primitive is eb.primitive is e1.primitive):
      raise _Coupled("the program changes with the batch size")
    for va, vb, v1 in zip(ea.invars, eb.invars, e1.invars):
      lits = [isinstance(v, jcore.Literal) for v in (va, vb, v1)]
      if any(lits) and not (all(lits) and _same_value(va.val, vb.val)
                            and _same_value(va.val, v1.val)):
        raise _Coupled(f"{_where(ea)}: a literal depends on the batch size")
    if set(ea.params) != set(e1.params):
      raise _Coupled("the program changes with the batch size")
    for key, pa in ea.params.items():
      pb, p1 = eb.params.get(key), e1.params.get(key)
      subs = _jaxprs(pa)
      if subs:
        for qa, qb, q1 in zip(subs, _jaxprs(pb), _jaxprs(p1)):
          _same_program(qa, qb, q1)
      elif _same_value(pa, pb) and not _same_value(pa, p1):
        raise _Coupled(f"{_where(ea)}: the program at batch size 1 differs from the "
                       "batched one")


def _with_batch(x: PyTree, n: int) -> PyTree:
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct((n,) + tuple(jnp.shape(a))[1:], jnp.result_type(a)), x)


def detect_batch_independence(f: Callable[..., PyTree], params: PyTree, x: PyTree,
                              kwargs: Mapping[str, Any]) -> BatchIndependence:
  """Decides whether ``f(params, x, **kwargs)`` treats examples independently.

  The batch is axis 0 of every leaf of ``x``; array keyword arguments are shared by all
  examples (they are not sliced). Returns a :class:`BatchIndependence`; when it says
  ``independent``, ``f(params, x)[i] == f(params, x[i:i+1])[0]`` along the reported
  output axes and so are the parameter Jacobians of every row, for every batch size.
  """
  leaves = jax.tree_util.tree_leaves(x)
  if not leaves or any(jnp.ndim(a) == 0 for a in leaves):
    return BatchIndependence(False, None, None, "an input leaf has no batch axis")
  sizes = {jnp.shape(a)[0] for a in leaves}
  if len(sizes) != 1:
    return BatchIndependence(False, None, None,
                             f"input leaves disagree on the batch size (axis 0): {sizes}")
  s = max(2, sizes.pop())
  abstract = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), params)

  def jvp(p: PyTree, xs: PyTree, t: PyTree) -> PyTree:
    return jax.jvp(lambda q: f(q, xs, **kwargs), (p,), (t,))

  try:
    traces = {n: jax.make_jaxpr(jvp, return_shape=True)(abstract, _with_batch(x, n),
                                                        abstract)
              for n in (s, s + 1, 1)}
  except Exception as err:  # noqa: BLE001 - e.g. custom_vjp has no forward mode
    return BatchIndependence(False, None, None,
                             f"the model's forward-mode derivative cannot be traced "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:120]})")
  (ja, out_shape), (jb, _), (j1, _) = traces[s], traces[s + 1], traces[1]
  n_p = len(jax.tree_util.tree_leaves(abstract))
  n_x = len(leaves)
  in_axes = [None] * n_p + [0] * n_x + [None] * n_p
  walker = _Walker(s, s + 1)
  try:
    outs = walker.run(ja.jaxpr, jb.jaxpr, in_axes)
    _same_program(ja, jb, j1)
  except _Coupled as err:
    return BatchIndependence(False, None, None, str(err))
  primal_tree = jax.tree_util.tree_structure(out_shape[0])
  n_out = primal_tree.num_leaves
  if any(a is None for a in outs):
    return BatchIndependence(False, None, None, "an output (or its derivative) has no "
                             "batch axis")
  primal, tangent = outs[:n_out], outs[n_out:]
  if primal != tangent:
    return BatchIndependence(False, None, None,
                             "outputs and their derivatives have different batch axes")
  return BatchIndependence(True, 0, jax.tree_util.tree_unflatten(primal_tree, primal),
                           "proven on the forward-mode derivative's jaxpr")
