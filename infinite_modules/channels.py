"""Channel ranges of fields: which channels of which random source a field holds.

A field's channels are i.i.d. at infinite width, so disjoint ranges of the
channel axis of one field (`jnp.split`, `nn.glu`, `h[..., :k]`) are independent
fields: they are functions of different weight columns (rows of the weight
matrices that made them), with the same per-channel law as the whole. Two
ranges that overlap share channels and are dependent; equal ranges are the
same field.

`Root.origins` holds one token per independent source (`values.new_origin`).
A root cut out of a channel range carries, next to each such token `t`, a
`Part(t, lo, hi)`: its channel j is channel lo + j (hi - lo) / C of the
source's channel axis (lo, hi fractions of it, exact `Fraction`s). A token
with no `Part` spans the whole channel axis. Keeping the token itself in the
set makes a plain intersection `a.origins & b.origins` conservative (any two
pieces of one source look dependent), so code that does not know about
ranges never mistakes dependent pieces for independent ones; `shared` is the
exact test.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction

WHOLE = (Fraction(0), Fraction(1))


@dataclasses.dataclass(frozen=True)
class Part:
  """The channels [lo, hi) (fractions of the channel axis) of the source `token`."""
  token: int
  lo: Fraction
  hi: Fraction


def ranges(origins: frozenset) -> dict:
  """token -> list of (lo, hi) channel ranges of that source a root depends on."""
  out: dict = {}
  for o in origins:
    if isinstance(o, Part):
      out.setdefault(o.token, []).append((o.lo, o.hi))
  for o in origins:
    if not isinstance(o, Part):
      out.setdefault(o, [WHOLE])
  return out


def shared(a: frozenset, b: frozenset) -> bool:
  """Whether roots with origins `a` and `b` share randomness (some source's channel
  ranges overlap), i.e. are not independent."""
  ra, rb = ranges(a), ranges(b)
  for token in ra.keys() & rb.keys():
    if any(lo1 < hi2 and lo2 < hi1 for lo1, hi1 in ra[token] for lo2, hi2 in rb[token]):
      return True
  return False


def restrict(origins: frozenset, lo: Fraction, hi: Fraction) -> frozenset:
  """Origins of the channels [lo, hi) (fractions of the current channel axis) of a
  homogeneous root with `origins`: each source's range is narrowed accordingly."""
  out = set()
  for token, spans in ranges(origins).items():
    out.add(token)
    for a, b in spans:
      out.add(Part(token, a + (b - a) * lo, a + (b - a) * hi))
  return frozenset(out)


def widen(origins: frozenset) -> frozenset:
  """The same sources over their whole channel axes: for a channel concatenation,
  whose channels no longer line up with its pieces' (a conservative answer)."""
  return frozenset(o for o in origins if not isinstance(o, Part))


def is_whole(lo: Fraction, hi: Fraction) -> bool:
  return (lo, hi) == WHOLE
