"""Output-shared cotangents: when the cotangent of a layer factors into a per-example part
and a per-output part.

Let ``y`` be the output of a structured equation and suppose every path from ``y`` to the
network outputs first runs through *elementwise* equations to one value ``d = h(y)``
(same shape, e.g. bias, BatchNorm in eval mode, ReLU, a residual ``+ x``) and then
through a map ``L`` that is linear in ``d`` with coefficients that do not depend on the
input (sums, means, reshapes, dense layers, convolutions with parameter weights, plus
terms that do not depend on ``y``). Then for example ``i`` and output basis vector ``o``

    G_io = df_o(x_i) / dy = D_i (.) B_o,    D_i = h'(y_i)  (the diagonal of dd/dy),
                                             B_o = L^T e_o  (the same for every example),

and if ``L`` first sums ``d`` over some axes ``A`` (global average pooling), ``B_o`` is
constant along ``A``. A weight Jacobian ``J_io = sum_A X_i G_io`` then factors as
``(sum_A X_i D_i) (.) B_o``: ``N`` patch products instead of ``N O``
(:func:`interop.structured.structured_kernel`'s *factored* route).

:func:`find_shared_cotangent` proves this from the jaxpr (never by matching a model):

* **diagonal phase**: an equation whose ``y``-dependent operands are all diagonal values
  of ``y``'s shape, with a primitive of :data:`ELEMENTWISE` (or a ``custom_jvp_call`` whose
  traced JVP is itself elementwise), gives a diagonal value;
* **linear phase**: an equation fed by the single *frontier* ``d`` or by linear values,
  whose primitive is linear in them (:data:`LINEAR`) with every other multiplicative
  operand independent of the input;
* every output that depends on ``y`` is linear (or ``d`` itself).

``D`` is then computed exactly by forward-mode differentiation along the diagonal phase
(tangent of ones) and ``B`` as the cotangent of ``d``; values of integer or boolean type
carry no derivative and are ignored (AD treats them as constants).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

__all__ = ["ELEMENTWISE", "LINEAR", "SharedCotangent", "find_shared_cotangent"]

#: Primitives that act entry by entry on operands of equal shape (scalars broadcast), so
#: their Jacobian with respect to a full-shape operand is diagonal.
ELEMENTWISE = frozenset({
    "abs", "acos", "acosh", "add", "add_any", "asin", "asinh", "atan", "atan2", "atanh",
    "cbrt", "ceil", "clamp", "convert_element_type", "copy", "copy_p", "cos", "cosh",
    "digamma", "div", "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "floor",
    "integer_pow", "lgamma", "log", "log1p", "logistic", "max", "min", "mul", "neg", "pow",
    "reduce_precision", "rem", "round", "rsqrt", "select_n", "sign", "sin", "sinh", "sqrt",
    "square", "sub", "tan", "tanh",
})

#: Primitives linear in their ``d``-dependent operands (given the listed conditions on
#: the others, checked in :func:`_linear_step`).
LINEAR = frozenset({
    "add", "add_any", "broadcast_in_dim", "concatenate", "conv_general_dilated",
    "convert_element_type", "copy", "copy_p", "div", "dot_general", "mul", "neg", "pad",
    "reduce_precision", "reduce_sum", "reduce_window_sum", "reshape", "slice", "squeeze",
    "sub", "transpose",
})


@dataclasses.dataclass(frozen=True)
class SharedCotangent:
  """``df/dy = D (.) B`` for the output ``boundary`` of a structured equation.

  ``diag_nodes`` are the equations from ``boundary`` to ``frontier`` (``d``) in program
  order; ``summed_axes`` are the axes of ``d`` along which ``B`` is constant.
  """

  boundary: int
  frontier: int
  diag_nodes: tuple[int, ...]
  summed_axes: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _Linear:
  """A linear-phase value ``v = F(sum_summed d) + c``. ``aligned[j]`` is the axis of ``d``
  that axis ``j`` of ``v`` runs along with the same map for every index (so a later sum
  over ``j`` is a sum of ``d`` over it), or ``None``."""

  aligned: tuple[int | None, ...]
  summed: frozenset[int]

  def lost(self, ndim: int) -> _Linear:
    return _Linear((None,) * ndim, self.summed)


def _shape(prog: Any, r: Any) -> tuple[int, ...]:
  return tuple(prog.avals[r].shape) if isinstance(r, int) else tuple(jnp.shape(r.val))


def _inexact(aval: Any) -> bool:
  return jnp.issubdtype(aval.dtype, jnp.inexact)


def find_shared_cotangent(prog: Any, tags: dict, start: int,
                          cache: dict | None = None) -> SharedCotangent | None:
  """Proves ``df/dy = D (.) B`` for ``y = prog.nodes[start].outs[0]`` (see the module
  docstring), or returns ``None``. ``tags`` are the program's dependence tags
  (:func:`interop.structured._tags`); ``cache`` memoizes custom-JVP checks."""
  cache = {} if cache is None else cache
  y = prog.nodes[start].outs[0]
  shape = tuple(prog.avals[y].shape)
  diag: set[int] = {y}
  diag_nodes: list[int] = []
  lin: dict[int, _Linear] = {}
  frontier: int | None = None
  for m in range(start + 1, len(prog.nodes)):
    node = prog.nodes[m]
    dep = [p for p, r in enumerate(node.ins) if isinstance(r, int) and (r in diag or r in lin)]
    if not dep:
      continue
    if len(node.outs) != 1:
      return None
    if not _inexact(prog.avals[node.outs[0]]):
      continue  # no derivative flows through integer or boolean values
    if all(node.ins[p] in diag for p in dep) and _elementwise(prog, node, dep, shape, cache):
      diag.add(node.outs[0])
      diag_nodes.append(m)
      continue
    for p in dep:
      r = node.ins[p]
      if r in diag:
        if frontier not in (None, r):
          return None  # two diagonal values feed the linear phase: a sum of two factors
        frontier = r
    ins = {p: lin[node.ins[p]] if node.ins[p] in lin
           else _Linear(tuple(range(len(shape))), frozenset()) for p in dep}
    out = _linear_step(prog, tags, node, ins)
    if out is None:
      return None
    lin[node.outs[0]] = out
  summed: frozenset[int] | None = None
  for r in prog.out_refs:
    if not isinstance(r, int) or (r not in diag and r not in lin):
      continue
    if r in diag:
      if frontier not in (None, r):
        return None
      frontier = r
      s: frozenset[int] = frozenset()
    else:
      s = lin[r].summed
    summed = s if summed is None else summed & s
  if frontier is None or summed is None:
    return None
  return SharedCotangent(y, frontier, _ancestors(prog, diag_nodes, frontier),
                         tuple(sorted(summed)))


def _ancestors(prog: Any, diag_nodes: list[int], frontier: int) -> tuple[int, ...]:
  """The diagonal equations ``frontier`` depends on (the others need no derivative)."""
  producer = {prog.nodes[m].outs[0]: m for m in diag_nodes}
  need, todo = set(), [frontier]
  while todo:
    m = producer.get(todo.pop())
    if m is None or m in need:
      continue
    need.add(m)
    todo.extend(r for r in prog.nodes[m].ins if isinstance(r, int))
  return tuple(m for m in diag_nodes if m in need)


def _elementwise(prog: Any, node: Any, dep: list[int], shape: tuple[int, ...],
                 cache: dict) -> bool:
  if tuple(prog.avals[node.outs[0]].shape) != shape:
    return False
  if any(_shape(prog, node.ins[p]) != shape for p in dep):
    return False  # a broadcast diagonal operand would not be diagonal
  name = node.eqn.primitive.name
  if name == "convert_element_type":
    return True  # inexact to inexact (integer outputs are skipped before)
  if name in ELEMENTWISE:
    return True
  if name == "custom_jvp_call":
    key = (id(node.eqn), tuple(dep))
    if key not in cache:
      cache[key] = False  # while being checked (a rule calling itself is refused)
      cache[key] = _custom_jvp_is_diagonal(prog, node, dep, cache)
    return cache[key]
  return False


def _custom_jvp_is_diagonal(prog: Any, node: Any, dep: list[int], cache: dict) -> bool:
  """Traces the JVP of the call (its custom rule, which AD will use) and checks that the
  tangents of the ``dep`` operands only pass through elementwise equations of full shape,
  so the Jacobian AD uses is diagonal (its coefficients, functions of the primal values,
  may be anything)."""
  import jax

  from interop import structured  # the program tracer; imported here to avoid a cycle

  abstract = {p: jax.ShapeDtypeStruct(prog.avals[node.ins[p]].shape,
                                      prog.avals[node.ins[p]].dtype) for p in dep}
  others = {p: jax.ShapeDtypeStruct(prog.avals[r].shape, prog.avals[r].dtype)
            for p, r in enumerate(node.ins) if isinstance(r, int) and p not in abstract}

  def fn(other_vals: dict, dep_vals: tuple) -> Any:
    primals, tangents = dep_vals

    def call(*xs: Any) -> Any:
      vals = [r.val if not isinstance(r, int) else other_vals.get(p)
              for p, r in enumerate(node.ins)]
      for p, x in zip(dep, xs):
        vals[p] = x
      return structured._bind(node.eqn, vals)

    return jax.jvp(call, primals, tangents)

  try:
    sub = structured.trace_program(fn, others, (tuple(abstract[p] for p in dep),
                                                tuple(abstract[p] for p in dep)))
  except Exception:  # noqa: BLE001 - an untraceable rule is simply not structured
    return False
  sources = set(sub.data_ids[len(dep):])  # the tangents
  shape = tuple(prog.avals[node.outs[0]].shape)
  for n in sub.nodes:
    d = [p for p, r in enumerate(n.ins) if isinstance(r, int) and r in sources]
    if not d:
      continue
    if len(n.outs) != 1:
      return False
    if not _inexact(sub.avals[n.outs[0]]):
      continue
    if not _elementwise(sub, n, d, shape, cache):
      return False
    sources.add(n.outs[0])
  return True


def _coefficient(tags: dict, r: Any) -> bool:
  """An operand that may multiply ``d``: it does not depend on the input."""
  return not isinstance(r, int) or not tags[r].data


def _linear_step(prog: Any, tags: dict, node: Any, ins: dict[int, _Linear]
                 ) -> _Linear | None:
  """The linear-phase value of ``node``'s output, or ``None`` if ``node`` is not linear
  in its ``d``-dependent operands ``ins`` with input-independent coefficients."""
  name = node.eqn.primitive.name
  params = node.eqn.params
  out_nd = len(prog.avals[node.outs[0]].shape)
  others = [r for p, r in enumerate(node.ins) if p not in ins]
  if name not in LINEAR:
    return None
  summed = frozenset.intersection(*(v.summed for v in ins.values()))
  first = next(iter(ins.values()))
  if name in ("add", "add_any", "sub"):
    out_shape = tuple(prog.avals[node.outs[0]].shape)
    if any(_shape(prog, node.ins[p]) != out_shape for p in ins):
      return None
    aligned = tuple(a if all(v.aligned[j] == a for v in ins.values()) else None
                    for j, a in enumerate(first.aligned))
    return _Linear(aligned, summed)  # the other operand (if any) is an offset
  if name == "concatenate":
    return _Linear((None,) * out_nd, summed)
  if len(ins) != 1:
    return None  # products of two d-dependent values are not linear
  (pos, v), = ins.items()
  if name in ("convert_element_type", "copy", "copy_p", "reduce_precision", "neg"):
    return v
  if name in ("mul", "div", "dot_general", "conv_general_dilated"):
    if not all(_coefficient(tags, r) for r in others):
      return None
    if name == "div" and pos != 0:
      return None
    if name == "conv_general_dilated":
      return v.lost(out_nd) if pos == 0 else None
    if name == "dot_general":
      return _Linear(_dot_aligned(params, pos, v, len(_shape(prog, node.ins[1 - pos]))),
                     v.summed)
    scalar = all(_shape(prog, r) == () for r in others)
    return v if scalar else v.lost(out_nd)
  if name in ("pad", "slice", "reduce_window_sum"):
    if pos != 0:
      return None
    return v.lost(out_nd)
  if name == "reduce_sum":
    axes = set(params["axes"])
    grown = {v.aligned[j] for j in axes if v.aligned[j] is not None}
    return _Linear(tuple(a for j, a in enumerate(v.aligned) if j not in axes),
                   v.summed | grown)
  if name == "transpose":
    return _Linear(tuple(v.aligned[p] for p in params["permutation"]), v.summed)
  if name == "squeeze":
    dims = {d % len(v.aligned) for d in params["dimensions"]}
    return _Linear(tuple(a for j, a in enumerate(v.aligned) if j not in dims), v.summed)
  if name == "broadcast_in_dim":
    if pos != 0:
      return None
    in_shape = _shape(prog, node.ins[0])
    out_shape = tuple(prog.avals[node.outs[0]].shape)
    aligned: list[int | None] = [None] * out_nd
    for i, d in enumerate(params["broadcast_dimensions"]):
      if in_shape[i] == out_shape[d]:
        aligned[d] = v.aligned[i]
    return _Linear(tuple(aligned), v.summed)
  if name == "reshape":
    if params.get("dimensions") is not None:
      return None
    in_shape = _shape(prog, node.ins[0])
    out_shape = tuple(prog.avals[node.outs[0]].shape)
    big_in = [(s, a) for s, a in zip(in_shape, v.aligned) if s != 1]
    if [s for s, _ in big_in] != [s for s in out_shape if s != 1]:
      return v.lost(out_nd)
    it = iter(a for _, a in big_in)
    return _Linear(tuple(None if s == 1 else next(it) for s in out_shape), v.summed)
  return None


def _dot_aligned(params: dict, pos: int, v: _Linear, other_nd: int
                 ) -> tuple[int | None, ...]:
  """Output alignment of ``dot_general``: the free axes of the ``d`` operand keep theirs
  (the coefficient does not vary along them); batch axes do not."""
  (lc, rc), (lb, rb) = params["dimension_numbers"]
  nd = len(v.aligned)
  lhs_nd, rhs_nd = (nd, other_nd) if pos == 0 else (other_nd, nd)
  lhs_free = [i for i in range(lhs_nd) if i not in lc and i not in lb]
  rhs_free = [i for i in range(rhs_nd) if i not in rc and i not in rb]
  out: list[int | None] = [None] * len(lb)
  out += [v.aligned[i] if pos == 0 else None for i in lhs_free]
  out += [v.aligned[i] if pos == 1 else None for i in rhs_free]
  return tuple(out)
