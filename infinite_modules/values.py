"""Abstract values the interpreter assigns to jaxpr variables.

* `Concrete`: depends only on the inputs; evaluated on both batches.
* `ParamRef`: a view of one parameter leaf (its prior, which of its axes is
  which, a constant factor).
* `Field`: an infinite-width field: a tensor with one axis (the channel axis)
  taken to infinity, i.i.d. across channels. It is `expr(z)`, an elementwise
  function of the variable `z` of its `Root`, which carries the moments.

Moment layouts. With d spatial dims S = (s_1..s_d), the moment arrays are
  nngp, ntk: (n1, n2, *S) ("diag" layout, only s = s') or (n1, n2, *S, *S)
             ("full" layout, all pairs of positions);
  var1/var2: (n, *S) or (n, *S, *S): the same with both inputs from one batch;
  mean1/mean2: (n, *S) or None for zero mean.
`nngp`/`var` are uncentered second moments E[f f'] per channel.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import jax.numpy as jnp

from infinite_modules.priors import Prior

Atom = Any  # 'b' (batch), 'c' (channel), 'u' (unit), int (root spatial dim) or a group atom


def group_atom(size: int) -> tuple:
  """The atom of a finite axis that splits the channel axis into `size` groups.

  A reshape (..., C) -> (..., G, C // G) (as GroupNorm does) leaves a field of
  width C // G (the 'c' atom) with G i.i.d. copies along the group atom; merging
  the two back gives the width-C field again.
  """
  return ("g", int(size))


def is_group(atom: Atom) -> bool:
  return isinstance(atom, tuple) and len(atom) == 2 and atom[0] == "g"

_tokens = itertools.count()


def new_origin() -> frozenset:
  """A fresh source of randomness (a weight matrix, a random bias)."""
  return frozenset([next(_tokens)])


@dataclasses.dataclass(frozen=True, eq=False)
class Concrete:
  """A value computed from the inputs alone, on each batch.

  `batch_axis` is None for values that do not depend on the inputs (then
  `v1 is v2`). `const_axes` lists axes along which the value is known to be
  constant (broadcast), which lets it act on a field's channel axis.
  """
  v1: jax.Array
  v2: jax.Array
  batch_axis: int | None
  const_axes: frozenset = frozenset()

  @property
  def ndim(self):
    return jnp.ndim(self.v1)


@dataclasses.dataclass(frozen=True, eq=False)
class ParamRef:
  """A view of a parameter leaf.

  `leaf_axes[i]` is the leaf axis that view axis i comes from (None: unit or
  broadcast axis). `factor` is a python float or a `Concrete` multiplying it.
  """
  leaf: int
  path: str
  prior: Prior
  shape: tuple[int, ...]
  leaf_axes: tuple[int | None, ...]
  factor: Any = 1.0


@dataclasses.dataclass(frozen=True, eq=False)
class Root:
  """Moments of a field variable z (see module docstring for layouts).

  Attributes:
    spatial: sizes of the root's spatial dims S.
    channels: traced size of the channel axis.
    gaussian: whether z is jointly Gaussian (across inputs and positions).
    origins: tokens of the independent random sources z depends on; roots
      with disjoint origins are independent. A channel range of a field also
      holds `channels.Part`s (which channels of each source it has): ask
      `channels.shared` whether two roots are dependent.
    gathered_from: (parent Root, index arrays per spatial dim) when this root
      is a gather (slice/pad/concat) of another, so gathers of one field can
      be concatenated (circular padding).
    homogeneous: whether all channels are identically distributed. A channel
      concatenation of different fields is not: its moments are the
      width-weighted average, exact only for consumers symmetric in the
      channels (dense layers, sums over channels), not for ones that pick a
      subset of channels (channel slices, grouped convolutions, GroupNorm).
    law: for a non-Gaussian z, its pair laws (`pairlaw.LazyLaw`, tied to these
      moment arrays) when they are tracked, so nonlinearities of z have a
      kernel; None otherwise. Ask `pairlaw.law_of(root)`, not this attribute.
    random_moments: None when z's channel averages (its empirical second moments)
      converge to deterministic values, as in every Tensor Program. Otherwise a
      description of the finitely many random variables they keep depending on (the
      attention weights of a fixed number of heads with 1/sqrt(head_dim) logits,
      `rules.gaussian_logits`): z is then Gaussian only conditionally on them (a
      Gaussian scale mixture, shared by all channels). Linear maps keep it such a
      mixture with exact second moments; nonlinearities and normalisations of it are
      refused.
  """
  nngp: jax.Array
  ntk: jax.Array
  var1: jax.Array
  var2: jax.Array
  mean1: jax.Array | None
  mean2: jax.Array | None
  spatial: tuple[int, ...]
  channels: int
  gaussian: bool
  origins: frozenset
  gathered_from: Any = None
  homogeneous: bool = True
  law: Any = None
  random_moments: str | None = None

  def means(self) -> tuple:
    """(mean1, mean2) with zeros for a zero-mean side: arrays (n, *S) to compute with."""
    dtype = self.nngp.dtype
    n1, n2 = self.var1.shape[0], self.var2.shape[0]
    m1 = jnp.zeros((n1, *self.spatial), dtype) if self.mean1 is None else self.mean1
    m2 = jnp.zeros((n2, *self.spatial), dtype) if self.mean2 is None else self.mean2
    return m1, m2


@dataclasses.dataclass(frozen=True, eq=False)
class Field:
  """expr(z) for the root's z, laid out along `axes` (one atom tuple per axis)."""
  root: Root
  axes: tuple[tuple[Atom, ...], ...]
  expr: Any = None  # None: identity
  ctx: tuple = ()   # location-dependent constants used by expr, per side

  @property
  def is_identity(self):
    return self.expr is None

  def channel_axis(self) -> int | None:
    for i, atoms in enumerate(self.axes):
      if "c" in atoms:
        return i
    return None


def atom_size(root: Root, atom: Atom, n: int) -> int:
  if atom == "b":
    return n
  if atom == "c":
    return root.channels
  if atom == "u":
    return 1
  if is_group(atom):
    return atom[1]
  return root.spatial[atom]
