"""Empirical (finite-width) NNGP and NTK of Flax / NNX / Haiku models and ``f(params, x)``.

Definitions (Neural Tangents' conventions, see :mod:`interop._layout` for shapes):

* NNGP: ``K(x1, x2) = f(x1) f(x2)^T``, one kernel per output leaf.
* NTK: ``Theta(x1, x2) = sum_theta J_theta(x1) J_theta(x2)^T``, ``J_theta = df/dtheta``
  summed over the *trainable* parameter leaves only (Flax ``params``, NNX ``Param``,
  Haiku params; everything else passes through unchanged).

Both are traced over ``trace_axes`` (and divided by the traced size) and kept on the
diagonal over ``diagonal_axes``.

NTK implementations (Novak et al. 2022, https://arxiv.org/abs/2206.08720):

* ``"jacobian_contraction"`` (NT ``1``): materialize ``J(x1)``, ``J(x2)`` by reverse mode
  and contract. Cost ``~ N O [backward] + N^2 O^2 P``; memory ``N O P``.
* ``"ntk_vector_products"`` (NT ``2``): columns ``Theta e = J(x1) (J(x2)^T e)`` by one VJP
  and one JVP per output basis vector ``e``; no contraction over ``P``.
* ``"structured_derivatives"`` (NT ``3``): :mod:`interop.structured`; never materializes
  per-example Jacobians of structured weights.
* ``"auto"`` (NT ``0``, the default): compiles the candidates for the given shapes and
  picks the one with the lowest estimated run time from the compiled HLO's FLOP and byte
  counts and the backend (:mod:`interop.autoselect`), skipping candidates whose memory
  does not fit. The choice is cached per input shapes.
"""

from __future__ import annotations

import collections
import enum
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from interop import structured as sd
from interop._layout import (
  Axes,
  KernelLayout,
  VMapAxes,
  canonicalize_vmap_axes,
  contract,
  hashable,
  is_traced,
  kernel_layout,
  merge_kwargs,
  partition_kwargs,
  side_fn,
  split_kwargs,
  squeeze_out,
)
from interop._layout import jit as layout_jit
from interop.adapters import ModelAdapter, adapt
from interop.batch_independence import BatchIndependence, detect_batch_independence

PyTree = Any
KernelFn = Callable[..., PyTree]

__all__ = [
  "NtkImplementation",
  "canonicalize_implementation",
  "empirical_kernel_fn",
  "empirical_nngp_fn",
  "empirical_ntk_fn",
  "empirical_ntk_vp_fn",
]


class NtkImplementation(enum.IntEnum):
  """NT's integer codes; the string names are accepted everywhere too."""

  AUTO = 0
  JACOBIAN_CONTRACTION = 1
  NTK_VECTOR_PRODUCTS = 2
  STRUCTURED_DERIVATIVES = 3


_NAMES = {
    "auto": NtkImplementation.AUTO,
    "jacobian_contraction": NtkImplementation.JACOBIAN_CONTRACTION,
    "ntk_vector_products": NtkImplementation.NTK_VECTOR_PRODUCTS,
    "structured_derivatives": NtkImplementation.STRUCTURED_DERIVATIVES,
}


def canonicalize_implementation(implementation: str | int | NtkImplementation
                                ) -> NtkImplementation:
  """Maps a string name, NT integer or :class:`NtkImplementation` to the enum."""
  if isinstance(implementation, str):
    key = implementation.lower().replace("-", "_").replace(" ", "_")
    if key in _NAMES:
      return _NAMES[key]
  elif (isinstance(implementation, (int, np.integer)) and not isinstance(implementation, bool)
        and int(implementation) in {m.value for m in NtkImplementation}):
    return NtkImplementation(int(implementation))
  raise ValueError(
      f"Unknown NTK implementation {implementation!r}; use one of {sorted(_NAMES)} or NT's "
      "integers 0 (auto), 1 (jacobian contraction), 2 (NTK-vector products), "
      "3 (structured derivatives).")


# ----------------------------------------------------------------------------- context


class _Ctx(NamedTuple):
  """Everything the implementations share for one call."""

  f: Callable[..., PyTree]
  params: PyTree
  x1: PyTree
  x2: PyTree | None
  kw1: dict[str, Any]
  kw2: dict[str, Any]
  out1: PyTree  # ShapeDtypeStructs of f(x1)
  out2: PyTree
  layouts: list[KernelLayout]  # one per output leaf
  x_axis: PyTree
  fx_axis: PyTree
  kw_axes: dict[str, Any]
  leaf_weights: Sequence[Any] | None

  @property
  def out_treedef(self) -> Any:
    return jax.tree_util.tree_structure(self.out1)

  def fx_axes_list(self) -> list[int | None]:
    if self.fx_axis is None:
      return [None] * self.out_treedef.num_leaves
    return self.out_treedef.flatten_up_to(self.fx_axis)

  def kernel_dtype(self, out_leaf: Any) -> Any:
    leaves = [out_leaf] + jax.tree_util.tree_leaves(self.params)
    return sd.result_dtype(leaves)


def _check_inputs(x1: PyTree, x2: PyTree | None) -> None:
  if x1 is None:
    raise ValueError("x1 must be an array (or pytree of arrays), got None.")
  if x2 is not None:
    s1 = jax.tree_util.tree_structure(x1)
    s2 = jax.tree_util.tree_structure(x2)
    if s1 != s2:
      raise ValueError(f"x1 and x2 must have the same pytree structure, got {s1} and {s2}.")


#: Default ``vmap_axes``: find them from the model's program (:class:`_AutoVmapAxes`).
AUTO_VMAP_AXES = "auto"


class _AutoVmapAxes:
  """Resolves ``vmap_axes="auto"`` with :func:`detect_batch_independence`, cached per
  shapes (one instance is shared by the candidates of ``implementation="auto"``, so the
  detection runs once per input shapes).

  Attributes:
    last: the :class:`BatchIndependence` found by the latest resolution (both sides).
  """

  def __init__(self) -> None:
    self.cache: dict[Any, BatchIndependence] = {}
    self.last: BatchIndependence | None = None

  def _side(self, f: Callable[..., PyTree], params: PyTree, x: PyTree,
            kw: dict[str, Any]) -> BatchIndependence:
    dyn, treedef, static = partition_kwargs(kw)
    key = (jax.tree_util.tree_structure((params, x)),
           tuple((jnp.shape(a), str(jnp.result_type(a)))
                 for a in jax.tree_util.tree_leaves((params, x, dyn))),
           treedef, hashable(static))
    if key not in self.cache:
      self.cache[key] = detect_batch_independence(f, params, x, kw)
    return self.cache[key]

  def resolve(self, f: Callable[..., PyTree], params: PyTree, x1: PyTree,
              x2: PyTree | None, kw1: dict[str, Any], kw2: dict[str, Any]) -> VMapAxes:
    """``(0, fx_axis, {})`` if both sides are proven independent alike, else ``None``."""
    found = self._side(f, params, x1, kw1)
    if found.independent and x2 is not None:
      other = self._side(f, params, x2, kw2)
      if not other.independent or other.fx_axis != found.fx_axis:
        found = other if not other.independent else BatchIndependence(
            False, None, None, "x1 and x2 give different output batch axes")
    self.last = found
    return (found.x_axis, found.fx_axis, {}) if found.independent else None


def _make_ctx(f: Callable[..., PyTree], x1: PyTree, x2: PyTree | None, params: PyTree,
              kwargs: Mapping[str, Any], trace_axes: Axes, diagonal_axes: Axes,
              vmap_axes: VMapAxes, leaf_weights: Sequence[Any] | None = None,
              auto_axes: _AutoVmapAxes | None = None) -> _Ctx:
  _check_inputs(x1, x2)
  kw1, kw2 = split_kwargs(kwargs, x1, x2)
  if isinstance(vmap_axes, str) and vmap_axes == AUTO_VMAP_AXES:
    vmap_axes = (auto_axes or _AutoVmapAxes()).resolve(f, params, x1, x2, kw1, kw2)
  out1 = jax.eval_shape(lambda p, x: f(p, x, **kw1), params, x1)
  out2 = out1 if x2 is None else jax.eval_shape(lambda p, x: f(p, x, **kw2), params, x2)
  if jax.tree_util.tree_structure(out1) != jax.tree_util.tree_structure(out2):
    raise ValueError("f(x1) and f(x2) have different pytree structures.")
  layouts = [kernel_layout(a.shape, b.shape, trace_axes, diagonal_axes)
             for a, b in zip(jax.tree_util.tree_leaves(out1), jax.tree_util.tree_leaves(out2))]
  x_axis, fx_axis, kw_axes = canonicalize_vmap_axes(vmap_axes, x1, out1, kw1)
  return _Ctx(f, params, x1, x2, kw1, kw2, out1, out2, layouts, x_axis, fx_axis, kw_axes,
              leaf_weights)


def _unflatten_out(ctx: _Ctx, kernels: list[jax.Array]) -> PyTree:
  return jax.tree_util.tree_unflatten(ctx.out_treedef, kernels)


def _weight(ctx: _Ctx, leaf: int) -> Any:
  return 1.0 if ctx.leaf_weights is None else ctx.leaf_weights[leaf]


# ----------------------------------------------------------------------------- NNGP


def _nngp(ctx: _Ctx) -> PyTree:
  o1 = ctx.f(ctx.params, ctx.x1, **ctx.kw1)
  o2 = o1 if ctx.x2 is None else ctx.f(ctx.params, ctx.x2, **ctx.kw2)
  kernels = []
  for a, b, lay in zip(jax.tree_util.tree_leaves(o1), jax.tree_util.tree_leaves(o2),
                       ctx.layouts):
    kernels.append(contract([a, b], [lay.labels1, lay.labels2], lay.out_labels)
                   / lay.trace_size)
  return _unflatten_out(ctx, kernels)


# ----------------------------------------------------------------------------- JC


def _jacobians(ctx: _Ctx, x: PyTree, kw: dict[str, Any]) -> list[list[jax.Array]]:
  """Per output leaf, the list of ``d out / d theta`` (output axes first)."""

  def fn(xs: PyTree, kws: dict[str, Any]) -> PyTree:
    return jax.jacrev(lambda p: squeeze_out(ctx.f(p, xs, **kws), ctx.fx_axis))(ctx.params)

  jac = side_fn(fn, x, kw, ctx.x_axis, ctx.kw_axes, ctx.fx_axis)
  return [jax.tree_util.tree_leaves(sub) for sub in ctx.out_treedef.flatten_up_to(jac)]


def _ntk_jacobian_contraction(ctx: _Ctx) -> PyTree:
  j1 = _jacobians(ctx, ctx.x1, ctx.kw1)
  j2 = j1 if ctx.x2 is None else _jacobians(ctx, ctx.x2, ctx.kw2)
  kernels = []
  for o, (lay, out_leaf) in enumerate(zip(ctx.layouts, jax.tree_util.tree_leaves(ctx.out1))):
    dtype = ctx.kernel_dtype(out_leaf)
    total = jnp.zeros(lay.out_shape, dtype)
    for leaf, (a, b) in enumerate(zip(j1[o], j2[o])):
      plab = tuple(range(lay.next_label, lay.next_label + a.ndim - len(lay.labels1)))
      term = sd.pair_contract(a, lay.labels1 + plab, b, lay.labels2 + plab, lay.out_labels)
      total = total + _weight(ctx, leaf) * term.astype(dtype)
    kernels.append(total / lay.trace_size)
  return _unflatten_out(ctx, kernels)


# ----------------------------------------------------------------------------- NTK-VP


def _ntk_vector_products(ctx: _Ctx) -> PyTree:
  """``Theta[:, e] = J(x1) J(x2)^T e`` for every basis vector ``e`` of one output leaf."""
  params = ctx.params
  p_leaves, p_tree = jax.tree_util.tree_flatten(params)
  if ctx.leaf_weights is not None:
    w = list(ctx.leaf_weights)
  else:
    w = None
  x2 = ctx.x1 if ctx.x2 is None else ctx.x2
  kw2 = ctx.kw1 if ctx.x2 is None else ctx.kw2
  out_leaves1 = jax.tree_util.tree_leaves(ctx.out1)
  out_leaves2 = jax.tree_util.tree_leaves(ctx.out2)
  fx_axes = ctx.fx_axes_list()

  def f1(p: PyTree) -> list[jax.Array]:
    return jax.tree_util.tree_leaves(ctx.f(p, ctx.x1, **ctx.kw1))

  kernels = []
  for o, lay in enumerate(ctx.layouts):
    dtype = ctx.kernel_dtype(out_leaves1[o])

    def cotangents_single(xs: PyTree, kws: dict[str, Any], o: int = o) -> PyTree:
      """Rows of ``J(x2)^T`` for every basis vector of output leaf ``o`` (flattened)."""
      def f2(p: PyTree) -> jax.Array:
        out = jax.tree_util.tree_leaves(squeeze_out(ctx.f(p, xs, **kws), ctx.fx_axis))
        return out[o]
      out, vjp = jax.vjp(f2, params)
      basis = jnp.eye(out.size, dtype=out.dtype).reshape((out.size,) + out.shape)
      return jax.vmap(vjp)(basis)[0]

    rows = side_fn(cotangents_single, x2, kw2, ctx.x_axis, ctx.kw_axes, 0)
    # rows: leading (N2, M) with vmap, (M,) without; flatten to one basis axis.
    n_lead = 2 if ctx.x_axis is not None else 1
    rows = jax.tree_util.tree_map(
        lambda r, n_lead=n_lead: r.reshape((-1,) + r.shape[n_lead:]), rows)
    if w is not None:
      rows = jax.tree_util.tree_unflatten(
          p_tree, [wi * r for wi, r in zip(w, jax.tree_util.tree_leaves(rows))])

    def column(t: PyTree, o: int = o) -> jax.Array:
      return jax.jvp(f1, (params,), (t,))[1][o]

    def column_by_double_vjp(t: PyTree, o: int = o) -> jax.Array:
      # J t as the VJP of the (linear) VJP map c -> J^T c: works where forward mode is
      # unavailable (``custom_vjp`` functions).
      out, vjp1 = jax.vjp(f1, params)
      zero = [jnp.zeros_like(a) for a in out]
      return jax.vjp(lambda c: vjp1(c)[0], zero)[1](t)[0][o]

    try:
      cols = jax.lax.map(column, rows, batch_size=_vp_chunk(p_leaves, rows))
    except TypeError as err:
      if "custom_vjp" not in str(err):
        raise
      cols = jax.lax.map(column_by_double_vjp, rows, batch_size=_vp_chunk(p_leaves, rows))
    # cols: (basis2, *out1_o). Basis order is (n2, single...) with vmap, else out2_o.
    shape2 = out_leaves2[o].shape
    if ctx.x_axis is not None:
      fx = fx_axes[o]
      single = shape2[:fx] + shape2[fx + 1:]
      cols = cols.reshape((shape2[fx],) + single + cols.shape[1:])
      lab2 = (lay.labels2[fx],) + lay.labels2[:fx] + lay.labels2[fx + 1:]
    else:
      cols = cols.reshape(shape2 + cols.shape[1:])
      lab2 = lay.labels2
    k = contract([cols], [lab2 + lay.labels1], lay.out_labels) / lay.trace_size
    kernels.append(k.astype(dtype))
  return _unflatten_out(ctx, kernels)


def _vp_chunk(p_leaves: Sequence[Any], rows: PyTree) -> int:
  n = jax.tree_util.tree_leaves(rows)[0].shape[0]
  per_row = sum(int(np.prod(jnp.shape(p))) * jnp.dtype(jnp.result_type(p)).itemsize
                for p in p_leaves) or 1
  return int(max(1, min(n, (1 << 30) // per_row)))


def empirical_ntk_vp_fn(model_or_f: Any, x1: PyTree, x2: PyTree | None, variables: Any,
                        **apply_fn_kwargs: Any) -> Callable[[PyTree], PyTree]:
  """NTK-vector product ``v -> Theta(x1, x2) v = J(x1) J(x2)^T v`` without forming Theta.

  Costs one VJP on ``x2`` and one JVP on ``x1`` per call (NT's ``empirical_ntk_vp_fn``).
  ``v`` has the structure of ``f(x2)``; the result that of ``f(x1)``.
  """
  f, params = adapt(model_or_f).bind(variables)
  kw1, kw2 = split_kwargs(apply_fn_kwargs, x1, x2)
  xb = x1 if x2 is None else x2

  def ntk_vp(v: PyTree) -> PyTree:
    _, vjp = jax.vjp(lambda p: f(p, xb, **kw2), params)
    t = vjp(v)[0]
    return jax.jvp(lambda p: f(p, x1, **kw1), (params,), (t,))[1]

  return ntk_vp


# ----------------------------------------------------------------------------- SD


def _single_example(tree: PyTree, axes: PyTree) -> PyTree:
  def one(a: Any, x: Any) -> jax.ShapeDtypeStruct:
    shape = list(jnp.shape(x))
    if a is not None:
      shape[a] = 1
    return jax.ShapeDtypeStruct(tuple(shape), jnp.result_type(x))
  if axes is None:
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x),
                                                                 jnp.result_type(x)), tree)
  return jax.tree_util.tree_map(one, axes, tree, is_leaf=lambda a: a is None)


def _program(ctx: _Ctx, x: PyTree, kw: dict[str, Any]) -> sd.Program:
  mapped = {k: v for k, v in kw.items() if k in ctx.kw_axes}
  shared = {k: v for k, v in kw.items() if k not in ctx.kw_axes}
  data = (_single_example(x, ctx.x_axis),
          {k: _single_example(v, ctx.kw_axes[k]) for k, v in mapped.items()})

  def fn(p: PyTree, d: tuple) -> PyTree:
    xs, kwm = d
    return squeeze_out(ctx.f(p, xs, **shared, **kwm), ctx.fx_axis)

  return sd.trace_program(fn, ctx.params, data)


def _structured(ctx: _Ctx) -> PyTree:
  p_leaves = jax.tree_util.tree_leaves(ctx.params)
  prog1 = _program(ctx, ctx.x1, ctx.kw1)
  plan1 = sd.plan_structure(prog1)
  if ctx.x2 is None:
    prog2, plan2 = prog1, plan1
  else:
    prog2 = _program(ctx, ctx.x2, ctx.kw2)
    plan1, plan2 = sd.merge_plans(prog1, plan1, prog2, sd.plan_structure(prog2))
  groups = sd.cotangent_groups(prog1, plan1)
  if ctx.x2 is not None:
    groups = tuple(sorted(set(groups) & set(sd.cotangent_groups(prog2, plan2))))
  fx_axes = ctx.fx_axes_list()
  vmapped = ctx.x_axis is not None

  def run(prog: sd.Program, plan: sd.Plan, x: PyTree, kw: dict[str, Any], metas: dict
          ) -> tuple:
    def fn(xs: PyTree, kws: dict[str, Any]) -> tuple:
      mapped = {k: v for k, v in kws.items() if k in ctx.kw_axes}
      data_leaves = jax.tree_util.tree_leaves((xs, mapped))
      return sd.side_arrays(prog, plan, p_leaves, data_leaves, metas)
    out_axes = (list(fx_axes), 0, None, 0) if vmapped else None
    return side_fn(fn, x, kw, ctx.x_axis, ctx.kw_axes, out_axes)

  metas1: dict = {}
  jac1, ops1, sc1, d1 = run(prog1, plan1, ctx.x1, ctx.kw1, metas1)
  if ctx.x2 is None:
    jac2, ops2, sc2, d2, metas2 = jac1, ops1, sc1, d1, metas1
  else:
    metas2: dict = {}
    jac2, ops2, sc2, d2 = run(prog2, plan2, ctx.x2, ctx.kw2, metas2)
  kernels = []
  for o, (lay, out_leaf) in enumerate(zip(ctx.layouts, jax.tree_util.tree_leaves(ctx.out1))):
    n_axis = fx_axes[o] if vmapped else None
    k = sd.structured_kernel(lay, plan1, plan2, jac1[o], jac2[o], ops1, ops2, sc1, sc2,
                             metas1, metas2, n_axis, ctx.leaf_weights,
                             ctx.kernel_dtype(out_leaf), symmetric=ctx.x2 is None,
                             groups=groups, diags1=d1, diags2=d2)
    kernels.append(k / lay.trace_size)
  return _unflatten_out(ctx, kernels)


def structure_report(model_or_f: Any, x: PyTree, variables: Any,
                     vmap_axes: VMapAxes = AUTO_VMAP_AXES,
                     **apply_fn_kwargs: Any) -> dict[str, list[str]]:
  """Which parameter leaves the structured-derivatives NTK structures, and which it
  handles generically (by Jacobian contraction), e.g. to find a slow layer; under
  ``"shared_cotangent"`` the structured leaves whose cotangent factors into a
  per-example and a per-output part (:mod:`interop.shared_cotangents`; these may take
  the factored route); and under ``"batch"`` whether examples were evaluated one at a time (with ``vmap_axes="auto"``:
  what the batch-independence analysis found, or which primitive stopped it)."""
  f, params = adapt(model_or_f).bind(variables)
  auto_axes = _AutoVmapAxes()
  ctx = _make_ctx(f, x, None, params, apply_fn_kwargs, (), (), vmap_axes,
                  auto_axes=auto_axes)
  if auto_axes.last is not None:
    batch = auto_axes.last.describe()
  elif ctx.x_axis is None:
    batch = "vmap_axes=None given: exact non-vmapped path"
  else:
    batch = f"vmap_axes given: input axes {jax.tree_util.tree_leaves(ctx.x_axis)}"
  prog = _program(ctx, x, ctx.kw1)
  plan = sd.plan_structure(prog)
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(params)[0]]
  return {
      "structured": [f"{paths[u.leaf]}: {prog.nodes[u.node].eqn.primitive.name}"
                     for u in plan.structured],
      "generic": [paths[i] for i in plan.generic],
      "unused": [paths[i] for i in plan.unused],
      "shared_cotangent": [
          f"{paths[u.leaf]}: df/dy = D (.) B, B constant along output axes "
          f"{list(sh.summed_axes)}" for u, sh in zip(plan.structured, plan.shared)
          if sh is not None],
      "batch": [batch],
  }


# ----------------------------------------------------------------------------- dispatch


_IMPLS: dict[NtkImplementation, Callable[[_Ctx], PyTree]] = {
    NtkImplementation.JACOBIAN_CONTRACTION: _ntk_jacobian_contraction,
    NtkImplementation.NTK_VECTOR_PRODUCTS: _ntk_vector_products,
    NtkImplementation.STRUCTURED_DERIVATIVES: _structured,
}


class _KernelCall:
  """``kernel(x1, x2, variables, **kwargs)`` that compiles itself with :func:`jax.jit`.

  Eager (op-by-op) evaluation of Jacobians compiles every primitive separately, which
  is slow on the first call; called with concrete arrays, the kernel is instead compiled
  once per input shapes and non-array keyword arguments (which are static). Under an
  outer transformation (``jit``, ``vmap``, ``grad``) it is traced inline.
  """

  def __init__(self, adapter: ModelAdapter,
               compute: Callable[[PyTree, PyTree, PyTree, Any, Any, dict], PyTree]):
    self.adapter = adapter
    self.compute = compute
    self._jitted: dict[Any, Callable] = {}

  def __call__(self, x1: PyTree, x2: PyTree | None, variables: Any, *,
               _leaf_weights: Sequence[Any] | None = None, **apply_fn_kwargs: Any) -> PyTree:
    _check_inputs(x1, x2)
    params, rest = self.adapter.split(variables)
    dyn, treedef, static = partition_kwargs(apply_fn_kwargs)
    args = (x1, x2, params, rest, _leaf_weights, dyn)
    if is_traced(args):
      return self.compute(x1, x2, params, rest, _leaf_weights, apply_fn_kwargs)
    key = (treedef, hashable(static))
    if key not in self._jitted:
      def run(x1: PyTree, x2: PyTree, params: PyTree, rest: Any, w: Any, dyn: list
              ) -> PyTree:
        return self.compute(x1, x2, params, rest, w, merge_kwargs(dyn, treedef, static))
      self._jitted[key] = layout_jit(run)
    return self._jitted[key](*args)


def _kernel_call(model_or_f: Any, kernel: Callable[[_Ctx], PyTree], trace_axes: Axes,
                 diagonal_axes: Axes, vmap_axes: VMapAxes,
                 auto_axes: _AutoVmapAxes | None = None) -> _KernelCall:
  """A :class:`_KernelCall` computing ``kernel(ctx)`` of the adapted model."""
  adapter = adapt(model_or_f)
  auto_axes = auto_axes or _AutoVmapAxes()

  def compute(x1: PyTree, x2: PyTree | None, params: PyTree, rest: Any,
              leaf_weights: Sequence[Any] | None, kwargs: dict) -> PyTree:
    def f(p: PyTree, x: PyTree, **kw: Any) -> PyTree:
      return adapter.apply(p, rest, x, **kw)
    ctx = _make_ctx(f, x1, x2, params, kwargs, trace_axes, diagonal_axes, vmap_axes,
                    leaf_weights, auto_axes)
    return kernel(ctx)

  return _KernelCall(adapter, compute)


def _ntk_impl_fn(model_or_f: Any, trace_axes: Axes, diagonal_axes: Axes, vmap_axes: VMapAxes,
                 implementation: NtkImplementation,
                 auto_axes: _AutoVmapAxes | None = None) -> _KernelCall:
  return _kernel_call(model_or_f, _IMPLS[implementation], trace_axes, diagonal_axes, vmap_axes,
                      auto_axes)


def empirical_ntk_fn(
    model_or_f: Any,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: VMapAxes = AUTO_VMAP_AXES,
    implementation: str | int | NtkImplementation = "auto",
) -> KernelFn:
  r"""Returns ``ntk_fn(x1, x2, variables, **apply_fn_kwargs)``: one draw of the empirical NTK.

  .. math:: \Theta(x_1, x_2) = \sum_{\theta \in \text{trainable}}
     \frac{\partial f(x_1)}{\partial \theta}
     \frac{\partial f(x_2)}{\partial \theta}^T

  traced over ``trace_axes`` (divided by their size) and diagonal over ``diagonal_axes``
  (NT's conventions: for ``f(x)`` of shape ``(N, K)`` the default gives ``(N1, N2)``;
  ``trace_axes=()`` gives ``(N1, N2, K, K)``).

  Args:
    model_or_f: a Flax linen module (or its ``.apply``), an NNX module, a Haiku
      transform, or ``f(params, x, **kwargs)`` exactly as in NT (see
      :func:`interop.adapters.adapt`).
    trace_axes: output axes to trace over.
    diagonal_axes: output axes to keep only the diagonal of.
    vmap_axes: ``"auto"`` (default): examples are evaluated one at a time (``jax.vmap``
      along axis 0 of the inputs and the output axes found) when the model's program
      proves that they are independent, and all together otherwise (training-mode
      BatchNorm, batch statistics, dropout; see
      :func:`interop.batch_independence.detect_batch_independence`; the finding is in
      :func:`structure_report`). An explicit value wins, with NT's meaning: ``None``
      (no assumption, never vmapped), an int (batch axis of ``x`` and ``f(x)``), or
      ``(in_axes, out_axes, kwargs_axes)``; setting it certifies that examples do not
      interact. Per-example evaluation makes every implementation much faster.
    implementation: ``"auto"`` (default), ``"jacobian_contraction"``,
      ``"ntk_vector_products"``, ``"structured_derivatives"``, or NT's ints 0-3.

  Returns:
    ``ntk_fn(x1, x2, variables, **apply_fn_kwargs)``; ``x2=None`` means ``x2 = x1``.
    ``variables`` is what the model takes (Flax variables dict, ``nnx.State``, Haiku
    params or ``(params, state)``, or ``params`` for ``f``). Keyword arguments go to the
    model (``rng=`` is split between ``x1`` and ``x2`` as in NT). ``ntk_fn`` is
    jit-compatible; wrap it in :func:`jax.jit` for speed.
  """
  impl = canonicalize_implementation(implementation)
  auto_axes = _AutoVmapAxes()
  if impl == NtkImplementation.AUTO:
    from interop import autoselect
    candidates = {i: _ntk_impl_fn(model_or_f, trace_axes, diagonal_axes, vmap_axes, i,
                                  auto_axes)
                  for i in _IMPLS}
    return autoselect.auto_ntk_fn(candidates)
  return _ntk_impl_fn(model_or_f, trace_axes, diagonal_axes, vmap_axes, impl, auto_axes)


def empirical_nngp_fn(model_or_f: Any, trace_axes: Axes = (-1,), diagonal_axes: Axes = ()
                      ) -> KernelFn:
  r"""Returns ``nngp_fn(x1, x2, variables, **apply_fn_kwargs)``: ``f(x_1) f(x_2)^T``.

  One kernel per output leaf, traced over ``trace_axes`` (divided by their size) and
  diagonal over ``diagonal_axes``, with NT's output layout. See :func:`empirical_ntk_fn`.
  """
  return _kernel_call(model_or_f, _nngp, trace_axes, diagonal_axes, None)


_GETS = ("nngp", "ntk")


def _canonicalize_get(get: None | str | Sequence[str]) -> tuple[tuple[str, ...], bool]:
  if get is None:
    return _GETS, False
  if isinstance(get, str):
    get, single = (get,), True
  else:
    get, single = tuple(get), False
  if not get:
    raise ValueError("`get` must be non-empty.")
  get = tuple(g.lower() for g in get)
  bad = [g for g in get if g not in _GETS]
  if bad or len(set(get)) != len(get):
    raise ValueError(f"`get` must name distinct kernels among {_GETS}, got {get!r}.")
  return get, single


@functools.cache
def _kernel_tuple(names: tuple[str, ...]) -> type:
  return collections.namedtuple("EmpiricalKernel", names)


def empirical_kernel_fn(
    model_or_f: Any,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: VMapAxes = AUTO_VMAP_AXES,
    implementation: str | int | NtkImplementation = "auto",
) -> KernelFn:
  """Returns ``kernel_fn(x1, x2, get, variables, **apply_fn_kwargs)`` for NNGP and/or NTK.

  ``get`` is ``"nngp"``, ``"ntk"`` (returns that array), a tuple of them (returns an
  ``EmpiricalKernel`` namedtuple in that order) or ``None`` (both). Arguments as in
  :func:`empirical_ntk_fn`; ``vmap_axes`` and ``implementation`` apply to the NTK.
  """
  fns = {
      "nngp": empirical_nngp_fn(model_or_f, trace_axes, diagonal_axes),
      "ntk": empirical_ntk_fn(model_or_f, trace_axes, diagonal_axes, vmap_axes,
                              implementation),
  }

  def kernel_fn(x1: PyTree, x2: PyTree | None, get: None | str | Sequence[str],
                variables: Any, **apply_fn_kwargs: Any) -> Any:
    names, single = _canonicalize_get(get)
    values = {g: fns[g](x1, x2, variables, **apply_fn_kwargs) for g in names}
    if single:
      return values[names[0]]
    cls = _kernel_tuple(names)
    return jax.tree_util.tree_map(lambda *v: cls(*v), *(values[g] for g in names))

  return kernel_fn
