"""Mapping between a field's logical axes and its root's location coordinates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from infinite_modules.values import Concrete, Field, atom_size, is_group


def logical_atoms(field: Field, n: int):
  """[(atom, size)] per logical axis."""
  return [[(a, atom_size(field.root, a, n)) for a in atoms] for atoms in field.axes]


def _uniform_along(value, axis) -> bool:
  try:
    arr = np.asarray(value)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return False
  first = np.take(arr, [0], axis=axis)
  return bool(np.all(arr == first))


def to_location(conc: Concrete, field: Field, eqn) -> tuple:
  """A concrete operand of an elementwise op with `field`, in root coordinates.

  Returns per-side arrays of shape (n or 1, *S or 1s) (`S` the root's spatial
  dims). The operand must be constant along the channel axis: a per-channel
  constant would make channels non-identically distributed.
  """
  d = len(field.root.spatial)
  rank = len(field.axes)
  offset = rank - conc.ndim
  if offset < 0:
    raise eqn.error("an operand has more axes than the field it combines with.")
  location = ["b", *range(d)]
  out = []
  for value in (conc.v1, conc.v2):
    v = jnp.asarray(value)
    v = v.reshape((1,) * offset + v.shape)
    names, sizes = [], []
    for i, atoms in enumerate(field.axes):
      if v.shape[i] == 1:
        continue
      if "c" in atoms or any(is_group(a) for a in atoms):
        if (i - offset) in conc.const_axes or _uniform_along(v, i):
          v = jnp.take(v, jnp.array([0]), axis=i)
          continue
        what = "infinite channel axis" if "c" in atoms else "channel-group axis"
        raise eqn.error(
            f"an operand varies along the {what} (a per-channel constant), so "
            "channels would not be identically distributed.",
            "Per-channel constants must be parameters with an i.i.d. initializer.")
      for a in atoms:
        if a != "u":
          names.append(a)
          sizes.append(v.shape[i] if a == "b" else field.root.spatial[a])
    # Split merged axes into atoms, order them as (batch, *root spatial dims).
    v = v.reshape(sizes)
    present = [a for a in location if a in names]
    v = jnp.transpose(v, [names.index(a) for a in present])
    out.append(v.reshape([v.shape[present.index(a)] if a in present else 1 for a in location]))
  return tuple(out)


def from_location(arr, axes, root, n: int):
  """Inverse of `to_location` for channel-free logical axes: (n, *S) -> logical.

  Group atoms (channel groups) are broadcast: the value is the same in every group.
  """
  d = len(root.spatial)
  names = ["b"] + list(range(d))
  seq = [a for atoms in axes for a in atoms if a != "u"]
  order = []
  for a in seq:
    if a == "c":
      raise ValueError("from_location expects no channel atom")
    if not is_group(a):
      order.append(names.index(a))
  # Sum out spatial dims not present (callers reduce them before).
  arr = jnp.transpose(arr, order + [i for i in range(1 + d) if i not in order]) if order else arr
  if any(is_group(a) for a in seq):
    for j, a in enumerate(seq):
      if is_group(a):
        arr = jnp.expand_dims(arr, j)
    arr = jnp.broadcast_to(arr, tuple(atom_size(root, a, n) for a in seq) + arr.shape[len(seq):])
  shape = []
  for atoms in axes:
    size = 1
    for a in atoms:
      size *= atom_size(root, a, n)
    shape.append(size)
  return arr.reshape(shape)
