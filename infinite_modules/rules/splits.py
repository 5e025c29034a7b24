"""Channel splits: slices of a field's channel axis (`x[..., a:b]`, `jnp.split`,
`jnp.array_split`, `nn.glu`) and their concatenation back.

A range of C' of the C channels of a field is a field of width C' with the
same per-channel law (its moments are unchanged; only the width, which the
standard parameterization's fan-ins see, changes). Disjoint ranges are
independent fields, overlapping ones are not: which channels of which source
a piece holds is recorded in its origins (`channels.Part`), so sums and
products of pieces know whether they are independent. The same range of one
field is the same root (memoized per interpretation), so `a * relu(a)` for
two slices `a` of one range fuses into one elementwise function of one
variable like any other dependent product.
"""

from __future__ import annotations

import dataclasses
import itertools
from fractions import Fraction

import numpy as np

from infinite_modules import channels as ch
from infinite_modules.interpreter import RULES
from infinite_modules.values import Field, Root, is_group

_HINT = ("Split a field that is not a channel concatenation (slice the pieces before "
         "concatenating them), or use `interop.monte_carlo_kernel_fn`.")


def channel_piece(interp, eqn, field: Field, start: int, stop: int) -> Field:
  """The channels [start, stop) of `field` (whose channel axis is one whole axis)."""
  if any(is_group(a) for atoms in field.axes for a in atoms):
    raise eqn.error(
        f"it slices the channel axis of a field whose channels are split into groups "
        f"{field.axes} (heads, GroupNorm groups); which channels of each group the slice "
        "holds is not tracked.", _HINT)
  if not field.root.homogeneous:
    raise eqn.error(
        "it slices the channels of a channel concatenation of different fields; which of "
        "them the slice holds is not tracked.", _HINT)
  if stop <= start:
    raise eqn.error("it takes an empty range of channels.")
  base, lo, hi = _base_range(interp, field.root)
  width = Fraction(hi - lo)
  c = field.root.channels
  new_lo, new_hi = lo + width * Fraction(start, c), lo + width * Fraction(stop, c)
  if ch.is_whole(new_lo, new_hi):
    return Field(base, field.axes, field.expr, field.ctx)
  key = ("channel-piece", id(base), new_lo, new_hi)
  cached = interp.materialized.get(key)
  if cached is None:
    piece = dataclasses.replace(
        base, channels=int(stop - start), origins=ch.restrict(base.origins, new_lo, new_hi), gathered_from=None)
    # Keeps `base` alive (ids are keys) and lets slices of the piece find its base.
    interp.materialized[key] = (base, piece)
    interp.materialized[("channel-piece-of", id(piece))] = (piece, base, new_lo, new_hi)
    cached = (base, piece)
  return Field(cached[1], field.axes, field.expr, field.ctx)


def _base_range(interp, root: Root):
  """(root it was sliced from, lo, hi) for a channel piece; (root, 0, 1) otherwise."""
  entry = interp.materialized.get(("channel-piece-of", id(root)))
  if entry is not None and entry[0] is root:
    return entry[1], entry[2], entry[3]
  return (root, *ch.WHOLE)


def split_rule(interp, eqn, invals):
  """`lax.split` (jnp.split / array_split): consecutive channel ranges, or positions."""
  (x,) = invals
  axis = eqn.params["axis"]
  sizes = [int(s) for s in eqn.params["sizes"]]
  if not isinstance(x, Field):
    raise eqn.error("splitting parameters is not supported.")
  bounds = np.concatenate([[0], np.cumsum(sizes)])
  if x.axes[axis] == ("c",):
    return [channel_piece(interp, eqn, x, int(a), int(b)) for a, b in itertools.pairwise(bounds)]
  from infinite_modules.rules.structural import _gather_field
  return [_gather_field(interp, eqn, x, axis, np.arange(a, b))
          for a, b in itertools.pairwise(bounds)]


def reassembled(interp, fields) -> Field | None:
  """The whole field if `fields` are its consecutive channel pieces in order (the
  inverse of a split, with the same pending elementwise function), else None."""
  first = fields[0]
  pieces = []
  for f in fields:
    same_ctx = len(f.ctx) == len(first.ctx) and all(a is b for a, b in zip(f.ctx, first.ctx))
    if f.expr is not first.expr or f.axes != first.axes or not same_ctx:
      return None
    pieces.append(_base_range(interp, f.root))
  base = pieces[0][0]
  if any(p[0] is not base for p in pieces):
    return None
  edges = [(lo, hi) for _, lo, hi in pieces]
  if edges[0][0] != 0 or edges[-1][1] != 1:
    return None
  if any(a[1] != b[0] for a, b in itertools.pairwise(edges)):
    return None
  return Field(base, first.axes, first.expr, first.ctx)


RULES["split"] = split_rule
