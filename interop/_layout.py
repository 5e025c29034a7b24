"""Output-layout conventions shared by all empirical kernels (Neural Tangents' conventions).

A kernel between outputs ``f(x1)`` of shape ``(A_0, A_1, ...)`` and ``f(x2)`` of shape
``(B_0, B_1, ...)`` is, axis by axis (in the order of the output axes):

* a **trace axis** ``i`` (``trace_axes``): contracted, ``sum_{a} K[..a.., ..a..]``, and
  the result divided by the product of all traced sizes (a mean, so kernels do not grow
  with the number of logits);
* a **diagonal axis** ``i`` (``diagonal_axes``): kept once, ``K[..a.., ..a..]``;
* any other axis: kept twice, as the adjacent pair ``(A_i, B_i)``.

For ``f(x)`` of shape ``(N, K)``: ``trace_axes=(-1,)`` gives ``(N1, N2)``,
``trace_axes=()`` gives ``(N1, N2, K, K)``, ``diagonal_axes=(0,), trace_axes=()`` gives
``(N, K, K)``. Every kernel is expressed as an ``einsum`` whose operand labels come
from :func:`kernel_layout`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Axes = int | Sequence[int]
VMapAxes = Any

__all__ = [
  "KernelLayout",
  "canonicalize_axes",
  "canonicalize_vmap_axes",
  "contract",
  "kernel_layout",
  "side_fn",
  "split_kwargs",
]


def canonicalize_axes(axes: Axes, ndim: int, name: str) -> tuple[int, ...]:
  """Sorted non-negative axes; raises a clear error for out-of-range or repeated axes."""
  if isinstance(axes, (int, np.integer)) and not isinstance(axes, bool):
    axes = (int(axes),)
  try:
    axes = tuple(axes)
  except TypeError:
    raise TypeError(f"`{name}` must be an int or a sequence of ints, got {axes!r}.") from None
  out = []
  for a in axes:
    if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
      raise TypeError(f"`{name}` must contain ints, got {axes!r}.")
    if not -ndim <= a < ndim:
      raise ValueError(
          f"`{name}={axes!r}` is out of range for a model output of rank {ndim} "
          f"(valid axes are {-ndim}..{ndim - 1}).")
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"`{name}={axes!r}` repeats an axis.")
  return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class KernelLayout:
  """Einsum labels that produce the NT kernel layout for one pair of output leaves.

  Attributes:
    labels1: label of every axis of ``f(x1)``.
    labels2: label of every axis of ``f(x2)``.
    out_labels: labels of the kernel, in NT order.
    out_shape: shape of the kernel.
    trace_size: product of traced sizes (the kernel is divided by it).
    next_label: first label not used here (callers allocate theirs from it).
  """

  labels1: tuple[int, ...]
  labels2: tuple[int, ...]
  out_labels: tuple[int, ...]
  out_shape: tuple[int, ...]
  trace_size: int
  next_label: int


def kernel_layout(shape1: Sequence[int], shape2: Sequence[int], trace_axes: Axes,
                  diagonal_axes: Axes) -> KernelLayout:
  """Builds the :class:`KernelLayout` for outputs of shapes ``shape1`` and ``shape2``."""
  shape1, shape2 = tuple(shape1), tuple(shape2)
  if len(shape1) != len(shape2):
    raise ValueError(
        f"f(x1) and f(x2) must have the same rank, got shapes {shape1} and {shape2}.")
  ndim = len(shape1)
  trace = canonicalize_axes(trace_axes, ndim, "trace_axes")
  diag = canonicalize_axes(diagonal_axes, ndim, "diagonal_axes")
  if set(trace) & set(diag):
    raise ValueError(
        f"An axis cannot be both traced and diagonal: trace_axes={trace_axes!r}, "
        f"diagonal_axes={diagonal_axes!r}.")
  labels1, labels2, out_labels, out_shape = [], [], [], []
  label = 0
  for i, (a, b) in enumerate(zip(shape1, shape2)):
    if i in trace or i in diag:
      if a != b:
        kind = "trace_axes" if i in trace else "diagonal_axes"
        raise ValueError(
            f"f(x1) and f(x2) must have equal sizes on {kind}; axis {i} has sizes {a} and "
            f"{b} (shapes {shape1} and {shape2}).")
      labels1.append(label)
      labels2.append(label)
      if i in diag:
        out_labels.append(label)
        out_shape.append(a)
      label += 1
    else:
      labels1.append(label)
      labels2.append(label + 1)
      out_labels += [label, label + 1]
      out_shape += [a, b]
      label += 2
  trace_size = math.prod(shape1[i] for i in trace)
  return KernelLayout(tuple(labels1), tuple(labels2), tuple(out_labels), tuple(out_shape),
                      trace_size, label)


def contract(operands: Sequence[jax.Array], labels: Sequence[Sequence[int]],
             out_labels: Sequence[int]) -> jax.Array:
  """``einsum`` over integer labels with an optimal contraction order."""
  args = []
  for op, lab in zip(operands, labels):
    if op.ndim != len(lab):
      raise AssertionError(f"einsum operand of shape {op.shape} got labels {lab}.")
    args += [op, list(lab)]
  return jnp.einsum(*args, list(out_labels), optimize="optimal")


def contraction_cost(operands: Sequence[Any], labels: Sequence[Sequence[int]],
                     out_labels: Sequence[int]) -> float:
  """FLOPs of the optimal contraction order of :func:`contract` (from ``opt_einsum``)."""
  import opt_einsum

  sym = opt_einsum.get_symbol
  eq = ",".join("".join(sym(x) for x in ls) for ls in labels)
  eq += "->" + "".join(sym(x) for x in out_labels)
  shapes = [tuple(jnp.shape(op)) for op in operands]
  _, info = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize="optimal")
  return float(info.opt_cost)


# ----------------------------------------------------------------------------- kwargs


def _same_inputs(x1: PyTree, x2: PyTree) -> jax.Array | bool:
  l1, l2 = jax.tree_util.tree_leaves(x1), jax.tree_util.tree_leaves(x2)
  if len(l1) != len(l2) or any(jnp.shape(a) != jnp.shape(b) for a, b in zip(l1, l2)):
    return False
  return jnp.all(jnp.array([jnp.all(a == b) for a, b in zip(l1, l2)]))


def _split_key(key: Any, x1: PyTree, x2: PyTree) -> tuple[Any, Any]:
  if key is None:
    return None, None
  if isinstance(key, tuple) and len(key) == 2:
    return key
  other = jax.random.fold_in(key, 1)
  same = _same_inputs(x1, x2)
  if same is False:
    return key, other
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    data = jnp.where(same, jax.random.key_data(key), jax.random.key_data(other))
    return key, jax.random.wrap_key_data(data, impl=jax.random.key_impl(key))
  return key, jnp.where(same, key, other)


def split_kwargs(kwargs: Mapping[str, Any], x1: PyTree, x2: PyTree | None
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Neural Tangents' rule for per-side keyword arguments.

  * ``rng``: when ``x2`` is given, side 2 gets ``fold_in(rng, 1)`` unless ``x1 == x2``
    (so dropout masks differ between different inputs); a pair ``(rng1, rng2)`` is used
    as is.
  * any other 2-tuple ``(v1, v2)`` is split between the sides;
  * everything else goes to both sides.
  """
  kw1, kw2 = {}, {}
  for k, v in kwargs.items():
    if k == "rng" and x2 is not None:
      kw1[k], kw2[k] = _split_key(v, x1, x2)
    elif isinstance(v, tuple) and len(v) == 2:
      kw1[k], kw2[k] = v
    else:
      kw1[k] = kw2[k] = v
  return kw1, kw2


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def partition_kwargs(kwargs: Mapping[str, Any]) -> tuple[list, Any, tuple]:
  """Splits keyword arguments into array leaves (traced) and everything else (static)."""
  leaves, treedef = jax.tree_util.tree_flatten(dict(kwargs))
  dyn = [x for x in leaves if _is_array(x)]
  static = tuple(None if _is_array(x) else x for x in leaves)
  return dyn, treedef, static


def merge_kwargs(dyn: Sequence[Any], treedef: Any, static: tuple) -> dict[str, Any]:
  """Inverse of :func:`partition_kwargs`."""
  it = iter(dyn)
  return jax.tree_util.tree_unflatten(treedef, [next(it) if s is None else s for s in static])


def hashable(x: Any) -> Any:
  """``x`` if hashable, else its ``repr`` (for cache keys of static arguments)."""
  try:
    hash(x)
    return x
  except TypeError:
    return repr(x)


#: Extra XLA compiler options for the kernels' internal ``jax.jit`` (``None``: defaults).
#: E.g. ``{"xla_backend_optimization_level": 0}`` trades run time for compile time.
JIT_COMPILER_OPTIONS: dict[str, Any] | None = None


def jit(fn: Callable) -> Callable:
  """``jax.jit`` with :data:`JIT_COMPILER_OPTIONS` read at call time."""
  return jax.jit(fn, compiler_options=JIT_COMPILER_OPTIONS)


def is_traced(tree: PyTree) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


# ----------------------------------------------------------------------------- vmap_axes


def canonicalize_vmap_axes(vmap_axes: VMapAxes, x: PyTree, fx: PyTree,
                           kwargs: Mapping[str, Any]) -> tuple[PyTree, PyTree, dict]:
  """NT's ``vmap_axes``: ``(in_axes, out_axes, kwargs_axes)`` or one axis for x and f(x).

  Returns ``(x_axis, fx_axis, kw_axes)`` with non-negative ints (or ``None``) broadcast
  to the structure of ``x``, ``f(x)`` and the keyword arguments.
  """
  if isinstance(vmap_axes, tuple) and len(vmap_axes) == 3:
    x_axis, fx_axis, kw_axes = vmap_axes
  else:
    x_axis, fx_axis, kw_axes = vmap_axes, vmap_axes, {}
  kw_axes = dict(kw_axes or {})
  unknown = set(kw_axes) - set(kwargs)
  if unknown:
    raise ValueError(f"vmap_axes names keyword arguments {sorted(unknown)} that were not "
                     "passed to the kernel function.")

  def broadcast(axis: Any, tree: PyTree, name: str) -> PyTree:
    if axis is None:
      return None
    if isinstance(axis, (int, np.integer)):
      axis = jax.tree_util.tree_map(lambda _: int(axis), tree)

    def mod(a: Any, leaf: Any) -> Any:
      if a is None:
        return None
      nd = jnp.ndim(leaf)
      if not -nd <= a < nd:
        raise ValueError(f"vmap_axes: {name} axis {a} is out of range for an array of "
                         f"rank {nd}.")
      return a % nd

    return jax.tree_util.tree_map(mod, axis, tree)

  x_axis = broadcast(x_axis, x, "input")
  fx_axis = broadcast(fx_axis, fx, "output")
  kw_axes = {k: broadcast(v, kwargs[k], f"kwargs[{k!r}]") for k, v in kw_axes.items()}
  if (x_axis is None) != (fx_axis is None):
    raise ValueError("vmap_axes must give both an input and an output axis (or neither).")
  return x_axis, fx_axis, kw_axes


def _expand(tree: PyTree, axes: PyTree) -> PyTree:
  if axes is None:
    return tree
  return jax.tree_util.tree_map(lambda a, x: x if a is None else jnp.expand_dims(x, a),
                                axes, tree, is_leaf=lambda a: a is None)


def squeeze_out(tree: PyTree, axes: PyTree) -> PyTree:
  if axes is None:
    return tree
  return jax.tree_util.tree_map(lambda a, x: x if a is None else jnp.squeeze(x, a),
                                axes, tree, is_leaf=lambda a: a is None)


def side_fn(fn: Callable[..., Any], x: PyTree, kwargs: Mapping[str, Any], x_axis: PyTree,
            kw_axes: Mapping[str, PyTree], out_axes: Any) -> Any:
  """Evaluates ``fn(x, kwargs)``, per example when ``x_axis`` is given.

  With ``x_axis`` (NT's ``vmap_axes``), ``fn`` sees one example at a time with its batch
  axis kept at size 1 (``expand_dims``), and the results are stacked by ``jax.vmap`` at
  ``out_axes``. Keyword arguments named in ``kw_axes`` are sliced the same way; the
  others are shared.
  """
  if x_axis is None:
    return fn(x, dict(kwargs))
  mapped = {k: v for k, v in kwargs.items() if k in kw_axes}
  shared = {k: v for k, v in kwargs.items() if k not in kw_axes}

  def single(xi: PyTree, kw_i: dict[str, Any]) -> Any:
    xi = _expand(xi, x_axis)
    kw_i = {k: _expand(v, kw_axes[k]) for k, v in kw_i.items()}
    return fn(xi, {**shared, **kw_i})

  in_axes = (x_axis, {k: kw_axes[k] for k in mapped})
  return jax.vmap(single, in_axes=in_axes, out_axes=out_axes)(x, mapped)
