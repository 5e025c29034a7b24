"""Rules for structural primitives on fields and parameters.

reshape/transpose/broadcast regroup a field's logical axes (elementwise
functions commute with them, so phi stays pending); slicing, padding,
reversal and concatenation along spatial axes are gathers of positions;
sums and windows over spatial axes are linear maps of the moments (pooling);
sums over the channel axis are deterministic at infinite width (law of large
numbers) and give concrete per-example values (as in LayerNorm statistics).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from infinite_modules import channels as ch
from infinite_modules import elementwise as ew
from infinite_modules import moments as mo
from infinite_modules.interpreter import _ALWAYS_RULE, RULES, Interpreter, evaluate_concrete
from infinite_modules.modules import GROUP_NORM_SCOPE
from infinite_modules.rules.axes import from_location
from infinite_modules.rules.linear import materialize
from infinite_modules.rules.splits import channel_piece, reassembled
from infinite_modules.values import (
    Concrete,
    Field,
    ParamRef,
    Root,
    atom_size,
    group_atom,
    is_group,
)

# ---------------------------------------------------------------- regrouping

def _regroup_field(interp: Interpreter, eqn, field: Field, new_shape) -> Field:
  n = interp.n1
  flat = [(a, atom_size(field.root, a, n)) for atoms in field.axes for a in atoms if a != "u"]
  channels = field.root.channels
  batch_axis = eqn.out_batch_axis()
  axes, ptr = [], 0
  for i, size in enumerate(new_shape):
    if i == batch_axis:
      if ptr >= len(flat) or flat[ptr][0] != "b":
        raise eqn.error("a reshape moves or merges the batch axis, mixing examples.")
      axes.append(("b",))
      ptr += 1
      continue
    group, prod = [], 1
    while prod < size or (size == prod and ptr < len(flat) and flat[ptr][1] == 1
                          and flat[ptr][0] != "b" and group):
      if ptr >= len(flat) or flat[ptr][0] == "b":
        raise eqn.error("a reshape merges the batch axis with other axes, mixing examples.")
      atom, atom_len = flat[ptr]
      if (atom == "c" and not group and atom_len > size and atom_len % size == 0
          and (GROUP_NORM_SCOPE in eqn.where or _splits_heads(new_shape, i, size, atom_len))):
        # (..., C) -> (..., G, C // G) in a GroupNorm, or (..., C) -> (..., heads, head_dim)
        # in attention: G groups of C // G channels.
        channels = _split_channels(eqn, field, size, atom_len)
        group.append(group_atom(size))
        prod = size
        flat[ptr] = ("c", channels)
        break
      group.append(atom)
      prod *= atom_len
      ptr += 1
    if prod != size:
      raise eqn.error(f"a reshape to {tuple(new_shape)} splits a spatial or channel axis of the "
                      f"field {field.axes} (only merging/splitting along earlier merges, and "
                      "splitting the channel axis into groups inside nn.GroupNorm / "
                      "hk.GroupNorm or into (heads, head_dim) with heads <= head_dim, are "
                      "supported).")
    axes.append(tuple(group) if group else ("u",))
  leftover = flat[ptr:]
  if any(s != 1 or a == "b" for a, s in leftover):
    raise eqn.error("unexpected reshape of a field.")
  axes, channels = _merge_groups(eqn, axes, channels)
  root = field.root
  if channels != root.channels:
    root = dataclasses.replace(root, channels=channels, gathered_from=None)
  # A size-1 channel axis may be squeezed away (e.g. a scalar output).
  drop = tuple(sorted(a for a, _ in leftover if isinstance(a, int)))
  if drop:
    base = materialize(interp, eqn, Field(root, field.axes, field.expr))
    root = mo.squeeze_spatial(base, interp.full, drop)
    keep = [k for k in range(len(base.spatial)) if k not in drop]
    renumber = {k: j for j, k in enumerate(keep)}
    axes = [tuple(renumber.get(a, a) for a in ax) for ax in axes]
    return Field(root, tuple(axes))
  return Field(root, tuple(axes), field.expr)


def _splits_heads(new_shape, i: int, size: int, channels: int) -> bool:
  """Whether a reshape splits the channel axis C into (heads, head_dim) at axes (i, i + 1).

  Attention (`hk.MultiHeadAttention`, hand-written heads) reshapes (..., C) into
  (..., heads, C // heads) with the head dimension last. The limit keeps the number of
  heads fixed and takes head_dim to infinity. A split whose trailing factor is smaller
  than its leading one (x.reshape(n, C // 2, 2) pairs neighbouring channels) does not
  fit that limit and is refused rather than guessed.
  """
  return i + 1 < len(new_shape) and new_shape[i + 1] == channels // size and size <= channels // size


def _split_channels(eqn, field: Field, groups: int, channels: int) -> int:
  """Channels per group when a GroupNorm splits the channel axis into `groups` groups.

  The limit keeps the number of groups fixed and takes the channels per group to
  infinity; each group is then an i.i.d. copy of the field (so its statistics are those
  of the whole channel axis). Only done inside GroupNorm (`GROUP_NORM_SCOPE`): in general
  a split does not say which part is fixed (x.reshape(n, C // 2, 2) pairs channels).
  One channel per group (GroupNorm with group_size=1) is no split at all: its
  per-channel statistics are sums over positions of one channel, which do not
  concentrate, and raise where they are subtracted.
  """
  if not field.root.homogeneous:
    raise eqn.error(
        "a reshape splits the channel axis of a channel concatenation of different fields "
        "into groups: each group holds a different mix of them, which is not tracked.",
        "Normalize the fields before concatenating them, or use "
        "`interop.monte_carlo_kernel_fn`.")
  return channels // groups


def _merge_groups(eqn, axes, channels: int):
  """Merges group atoms back into the channel atom of the same axis (undoes a split)."""
  out = []
  for atoms in axes:
    if "c" not in atoms or not any(is_group(a) for a in atoms):
      out.append(atoms)
      continue
    real = [a for a in atoms if a != "u"]
    run = [j for j, a in enumerate(real) if a == "c" or is_group(a)]
    if run != list(range(run[0], run[-1] + 1)):
      raise eqn.error(f"a reshape merges channel groups with other axes {atoms}.")
    for a in real:
      if is_group(a):
        channels *= a[1]
    out.append(tuple(real[:run[0]]) + ("c",) + tuple(real[run[-1] + 1:]))
  return out, channels


def _regroup_param(eqn, ref: ParamRef, new_shape) -> ParamRef:
  flat = [(la, s) for la, s in zip(ref.leaf_axes, ref.shape) if s != 1]
  leaf_axes, ptr = [], 0
  for size in new_shape:
    if size == 1:
      leaf_axes.append(None)
      continue
    if ptr >= len(flat) or flat[ptr][1] != size:
      raise eqn.error(f"a reshape of parameter `{ref.path}` merges or splits its axes.")
    leaf_axes.append(flat[ptr][0])
    ptr += 1
  return dataclasses.replace(ref, shape=tuple(new_shape), leaf_axes=tuple(leaf_axes))


def reshape_rule(interp, eqn, invals):
  x = invals[0]
  new_shape = eqn.out_shape()
  if isinstance(x, ParamRef):
    return [_regroup_param(eqn, x, new_shape)]
  if isinstance(x, Field):
    return [_regroup_field(interp, eqn, x, new_shape)]
  if all(isinstance(v, Concrete) for v in invals):
    return _reshape_concrete(eqn, invals)
  raise eqn.error("unexpected operands.")


def _reshape_concrete(eqn, invals):
  """Evaluates a reshape of concrete values, keeping track of their constant axes.

  A per-group statistic (constant along the groups at infinite width) is repeated to
  every channel by a broadcast and a reshape that merges (groups, channels per group);
  the merged axis is constant if all the axes it merges are.
  """
  (out,) = evaluate_concrete(eqn, invals)
  x = invals[0]
  if not x.const_axes or eqn.name != "reshape":
    return [out]
  in_shape = tuple(eqn.e1.invars[0].aval.shape)
  out_shape = tuple(eqn.e1.outvars[0].aval.shape)
  const, i, j = set(), 0, 0
  while i < len(in_shape) or j < len(out_shape):
    # One block: the fewest consecutive input and output axes with equal sizes.
    ins, outs, pi, po = [], [], 1, 1
    if i < len(in_shape):
      ins.append(i)
      pi *= in_shape[i]
      i += 1
    if j < len(out_shape):
      outs.append(j)
      po *= out_shape[j]
      j += 1
    while pi != po:
      if pi < po:
        ins.append(i)
        pi *= in_shape[i]
        i += 1
      else:
        outs.append(j)
        po *= out_shape[j]
        j += 1
    if all(k in x.const_axes or in_shape[k] == 1 for k in ins):
      const.update(outs)
  const.update(k for k, s in enumerate(out_shape) if s == 1)
  const.discard(out.batch_axis)
  return [dataclasses.replace(out, const_axes=frozenset(const))]


def squeeze_rule(interp, eqn, invals):
  return reshape_rule(interp, eqn, invals)


def transpose_rule(interp, eqn, invals):
  x = invals[0]
  perm = eqn.params["permutation"]
  if isinstance(x, ParamRef):
    return [dataclasses.replace(x, shape=tuple(x.shape[p] for p in perm),
                                leaf_axes=tuple(x.leaf_axes[p] for p in perm))]
  return [Field(x.root, tuple(x.axes[p] for p in perm), x.expr)]


def broadcast_rule(interp, eqn, invals):
  x = invals[0]
  shape = eqn.params["shape"]
  dims = eqn.params["broadcast_dimensions"]
  if isinstance(x, ParamRef):
    leaf_axes = [None] * len(shape)
    for j, i in enumerate(dims):
      leaf_axes[i] = x.leaf_axes[j] if x.shape[j] == shape[i] else None
      if x.shape[j] != shape[i] and x.shape[j] != 1:
        raise eqn.error("bad broadcast of a parameter.")
    return [dataclasses.replace(x, shape=tuple(shape), leaf_axes=tuple(leaf_axes))]
  axes = [("u",)] * len(shape)
  in_shape = eqn.e1.invars[0].aval.shape
  for j, i in enumerate(dims):
    if in_shape[j] != shape[i] and i != eqn.out_batch_axis():
      raise eqn.error("broadcasting a field along an axis copies it (perfectly correlated "
                      "copies), which is not supported.")
    axes[i] = x.axes[j]
  for i, s in enumerate(shape):
    if i not in dims and s != 1:
      raise eqn.error("broadcasting a field along a new axis copies it, which is not "
                      "supported.")
  return [Field(x.root, tuple(axes), x.expr)]


# ---------------------------------------------------------------- reductions

def reduce_sum_rule(interp, eqn, invals):
  (x,) = invals
  if not isinstance(x, Field):
    raise eqn.error("sums of parameters are not supported.")
  axes = tuple(eqn.params["axes"])
  atoms = [a for i in axes for a in x.axes[i]]
  if "b" in atoms:
    raise eqn.error("it sums over the batch axis (statistics over examples), so one "
                    "example's output depends on the others.",
                    "Use BatchNorm(use_running_average=True) or per-example operations.")
  remaining = tuple(x.axes[i] for i in range(len(x.axes)) if i not in axes)
  spatial_dims = tuple(sorted(a for a in atoms if isinstance(a, int)))
  groups = int(np.prod([a[1] for a in atoms if is_group(a)]))
  if "c" in atoms:
    # Law of large numbers: sum_c phi(z_c) = C E[phi(z)], deterministic per example
    # (a sum over channel groups too multiplies by their number: each group is an
    # i.i.d. copy).
    if x.root.mean1 is None and x.root.mean2 is None and (x.expr is None
                                                         or ew.is_linear(x.expr)):
      # A channel sum of a zero-mean field is exactly zero: kept as a concrete
      # (untraced) zero, so that x - mean stays structurally linear and a
      # nonlinearity after it (LayerNorm -> relu) keeps its closed form.
      dtype = eqn.e1.outvars[0].aval.dtype
      zeros = [np.zeros(eqn.out_shape(0, side), dtype) for side in (1, 2)]
      return [Concrete(zeros[0], zeros[1], eqn.out_batch_axis(),
                       frozenset(range(len(zeros[0].shape))))]
    try:
      m1, m2 = ew.means(x.root, x.expr, interp.full, interp.points)
    except ew.NotGaussianError:
      if x.root.random_moments is not None:
        from infinite_modules.rules.gaussian_logits import mixture_error
        raise mixture_error(eqn, x.root, "a nonlinear statistic over the channels (e.g. "
                            "LayerNorm's variance)") from None
      raise eqn.error("a nonlinear statistic of a non-Gaussian field has no exact rule.") from None
    c = x.root.channels * groups
    out = []
    for m, n in ((m1, interp.n1), (m2, interp.n2)):
      m = c * jnp.sum(m, axis=tuple(1 + k for k in spatial_dims)) if spatial_dims else c * m
      keep = [k for k in range(len(x.root.spatial)) if k not in spatial_dims]
      root_view = dataclasses.replace(x.root, spatial=tuple(x.root.spatial[k] for k in keep))
      renumber = {k: j for j, k in enumerate(keep)}
      axes_view = [tuple(renumber.get(a, a) for a in ax) for ax in remaining]
      out.append(from_location(m, axes_view, root_view, n))
    # Per-group statistics are the same in every group (constant along group axes).
    const = frozenset(i for i, ax in enumerate(remaining)
                      if any(is_group(a) for a in ax) and all(is_group(a) or a == "u" for a in ax))
    return [Concrete(out[0], out[1], eqn.out_batch_axis(), const)]
  if groups > 1:
    raise eqn.error("it sums a field over channel groups but not over the channels within "
                    "them (a finite sum of dependent copies), which is not supported.")
  root = materialize(interp, eqn, x)
  root = mo.sum_spatial(root, interp.full, spatial_dims)
  keep = [k for k in range(len(x.root.spatial)) if k not in spatial_dims]
  renumber = {k: j for j, k in enumerate(keep)}
  new_axes = tuple(tuple(renumber.get(a, a) for a in ax) for ax in remaining)
  return [Field(root, new_axes)]


def reduce_window_sum_rule(interp, eqn, invals):
  (x,) = invals
  p = eqn.params
  if not isinstance(x, Field):
    raise eqn.error("pooling of parameters is not supported.")
  if any(v != 1 for v in p["base_dilation"]):
    raise eqn.error("window sums with base dilation are not supported.")
  root = materialize(interp, eqn, x)
  axes = list(x.axes)
  for i, atoms in enumerate(x.axes):
    window, stride = p["window_dimensions"][i], p["window_strides"][i]
    dilation, pad = p["window_dilation"][i], tuple(p["padding"][i])
    if window == 1 and stride == 1 and pad == (0, 0):
      continue
    if len(atoms) != 1 or not isinstance(atoms[0], int):
      raise eqn.error(f"pooling over the non-spatial axis {atoms} (batch or channel).")
    if window > 1 and not interp.full:
      raise mo.NeedFullLayout()
    root = mo.window_sum(root, interp.full, atoms[0], window, stride, dilation, pad,
                         same_tap=False)
  return [Field(root, tuple(axes))]


# ---------------------------------------------------------------- gathers

def _gather_field(interp, eqn, field: Field, k_axis: int, index) -> Field:
  """Gathers positions along logical axis k_axis (a single spatial atom)."""
  atoms = field.axes[k_axis]
  if len(atoms) != 1 or not isinstance(atoms[0], int):
    raise eqn.error(f"slicing/padding the axis {atoms} of a field (only spatial axes can be "
                    "sliced or padded; channel slicing only as a whole channel axis).")
  k = atoms[0]
  root = materialize(interp, eqn, field)
  base, base_index = root, None
  if root.gathered_from is not None:
    base, base_index = root.gathered_from
  index = np.asarray(index)
  if base_index is not None:
    prev = np.asarray(base_index[k]) if base_index[k] is not None else None
    composed = index if prev is None else np.where(index >= 0, prev[np.maximum(index, 0)], -1)
  else:
    composed = index
  new = mo.gather(root, interp.full, k, index)
  full_index = list(base_index) if base_index is not None else [None] * len(root.spatial)
  full_index[k] = composed
  new = dataclasses.replace(new, gathered_from=(base, tuple(full_index)))
  return Field(new, field.axes)


def slice_rule(interp, eqn, invals):
  (x,) = invals
  if isinstance(x, ParamRef):
    # A slice of i.i.d. entries (a learned positional embedding pos[:, :length]) has the
    # same prior entry by entry; used once, it is as exact as the whole parameter.
    return [dataclasses.replace(x, shape=tuple(eqn.out_shape()))]
  if not isinstance(x, Field):
    raise eqn.error("slicing parameters is not supported.")
  p = eqn.params
  strides = p["strides"] or (1,) * len(x.axes)
  out = x
  in_shape = eqn.e1.invars[0].aval.shape
  for i, atoms in enumerate(x.axes):
    start, limit, stride = p["start_indices"][i], p["limit_indices"][i], strides[i]
    if (start, limit, stride) == (0, in_shape[i], 1):
      continue
    if atoms == ("c",):
      if stride != 1:
        raise eqn.error("strided channel slices are not supported.")
      out = channel_piece(interp, eqn, out, start, limit)
      continue
    out = _gather_field(interp, eqn, out, i, np.arange(start, limit, stride))
  return [out]


def pad_rule(interp, eqn, invals):
  x, value = invals
  if not isinstance(x, Field):
    raise eqn.error("padding parameters is not supported.")
  if not (isinstance(value, Concrete) and value.batch_axis is None
          and np.all(np.asarray(value.v1) == 0)):
    raise eqn.error("padding a field with a non-zero value is not supported.")
  out = x
  in_shape = eqn.e1.invars[0].aval.shape
  for i, (lo, hi, interior) in enumerate(eqn.params["padding_config"]):
    if (lo, hi, interior) == (0, 0, 0):
      continue
    n = in_shape[i]
    size = lo + hi + n + max(n - 1, 0) * interior
    index = np.full(size, -1)
    for j in range(n):
      pos = lo + j * (interior + 1)
      if 0 <= pos < size:
        index[pos] = j
    out = _gather_field(interp, eqn, out, i, index)
  return [out]


def rev_rule(interp, eqn, invals):
  (x,) = invals
  if isinstance(x, ParamRef):
    # A reversed weight (Flax ConvTranspose(transpose_kernel=True)) permutes i.i.d.
    # entries: the same prior, each entry still used once.
    return [x]
  if not isinstance(x, Field):
    raise eqn.error("unexpected operands.")
  out = x
  in_shape = eqn.e1.invars[0].aval.shape
  for i in eqn.params["dimensions"]:
    out = _gather_field(interp, eqn, out, i, np.arange(in_shape[i])[::-1])
  return [out]


def concatenate_rule(interp, eqn, invals):
  dim = eqn.params["dimension"]
  if not all(isinstance(v, Field) for v in invals):
    raise eqn.error("concatenating a field with inputs or parameters is not supported.")
  first = invals[0]
  if first.axes[dim] == ("c",):
    return [_concat_channels(interp, eqn, invals)]
  atoms = first.axes[dim]
  if len(atoms) != 1 or not isinstance(atoms[0], int):
    raise eqn.error(f"concatenation along the axis {atoms}.")
  k = atoms[0]
  roots = [materialize(interp, eqn, v) for v in invals]
  bases, indices = [], []
  for r in roots:
    base, idx = (r.gathered_from if r.gathered_from is not None else (r, (None,) * len(r.spatial)))
    bases.append(base)
    indices.append(idx)
  if any(b is not bases[0] for b in bases) or any(v.axes != first.axes for v in invals):
    raise eqn.error(
        "it concatenates different fields along a spatial axis; their cross-covariance is not "
        "tracked (concatenating slices/pads of one field, as circular padding does, is "
        "supported).")
  base = bases[0]
  for j in range(len(base.spatial)):
    if j != k and any(not _same_index(idx[j], indices[0][j]) for idx in indices):
      raise eqn.error("concatenated pieces differ along another axis.")
  full_idx = [np.arange(base.spatial[k]) if idx[k] is None else np.asarray(idx[k])
              for idx in indices]
  index = np.concatenate(full_idx)
  other = list(indices[0])
  root = base
  for j, idx in enumerate(other):
    if j != k and idx is not None:
      root = mo.gather(root, interp.full, j, idx)
  root = mo.gather(root, interp.full, k, index)
  other[k] = index
  root = dataclasses.replace(root, gathered_from=(base, tuple(other)))
  return [Field(root, first.axes)]


def _same_index(a, b) -> bool:
  if a is None or b is None:
    return a is None and b is None
  return np.array_equal(np.asarray(a), np.asarray(b))


def _concat_channels(interp, eqn, fields) -> Field:
  """Channel concatenation: per-channel moments are the width-weighted average.

  Consecutive channel pieces of one field, in order, give that field back.
  """
  from infinite_modules.rules.linear import _spatial_correspondence
  whole = reassembled(interp, fields)
  if whole is not None:
    return whole
  roots = []
  for f in fields:
    r = materialize(interp, eqn, f)
    r = mo.permute_spatial(r, interp.full, _spatial_correspondence(eqn, fields[0], f))
    roots.append(r)
  # Python floats keep the moments' dtype (numpy scalars would promote float32).
  widths = [float(r.channels) for r in roots]
  total = sum(widths)
  avg = lambda name: sum(w / total * getattr(r, name) for w, r in zip(widths, roots))

  def avg_mean(name):
    if all(getattr(r, name) is None for r in roots):
      return None
    return sum(w / total * (getattr(r, name) if getattr(r, name) is not None else 0.0)
               for w, r in zip(widths, roots))

  # The pieces' channels no longer line up with their sources' channel ranges.
  origins = ch.widen(frozenset().union(*(r.origins for r in roots)))
  root = Root(nngp=avg("nngp"), ntk=avg("ntk"), var1=avg("var1"), var2=avg("var2"),
              mean1=avg_mean("mean1"), mean2=avg_mean("mean2"), spatial=roots[0].spatial,
              channels=int(total), gaussian=False, origins=origins,
              homogeneous=len(roots) == 1 and roots[0].homogeneous,
              random_moments=next((r.random_moments for r in roots if r.random_moments),
                                  None))
  return Field(root, fields[0].axes)


def _no_rule(message, hint=None):
  def rule(interp, eqn, invals):
    raise eqn.error(message, hint)
  return rule


RULES.update({
    "reshape": reshape_rule,
    "squeeze": squeeze_rule,
    "expand_dims": squeeze_rule,
    "transpose": transpose_rule,
    "broadcast_in_dim": broadcast_rule,
    "reduce_sum": reduce_sum_rule,
    "reduce_window_sum": reduce_window_sum_rule,
    "slice": slice_rule,
    "pad": pad_rule,
    "rev": rev_rule,
    "concatenate": concatenate_rule,
    "sharding_constraint": lambda interp, eqn, invals: [invals[0]],
    "optimization_barrier": lambda interp, eqn, invals: list(invals),
    "reduce_min": _no_rule("a minimum over an axis of a field has no closed-form kernel."),
    "argmax": _no_rule("argmax of a field has no kernel."),
    "argmin": _no_rule("argmin of a field has no kernel."),
    "sort": _no_rule("sorting a field has no kernel."),
    "reduce_window_min": _no_rule("min pooling has no closed-form kernel."),
    "stop_gradient": _no_rule("stop_gradient on a field changes the NTK in a way not modelled."),
    "cumsum": _no_rule("cumulative sums of fields are not supported."),
    "reduce_prod": _no_rule("products over an axis of a field are not supported."),
})
# Reshapes of concrete values go through `reshape_rule` too, to keep their constant axes.
_ALWAYS_RULE.add("reshape")
