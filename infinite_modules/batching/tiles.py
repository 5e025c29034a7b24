"""Which tiles make up an (n1, n2) kernel, and the padded input blocks of each."""

from __future__ import annotations

import dataclasses
import hashlib

import jax
import numpy as np

Tile = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class TilePlan:
  """An (n1, n2) kernel cut into tiles of `size1 x size2` examples.

  Tile (i, j) covers rows `[i size1, (i + 1) size1)` and columns
  `[j size2, (j + 1) size2)`, clipped to the kernel; the last tiles of a ragged
  n are computed on blocks padded to the full size (so one compiled function
  serves every tile) and clipped when written. A `symmetric` plan (x2 = x1)
  computes the tiles on and above the diagonal; the ones below are their
  transposes.
  """
  n1: int
  n2: int
  size1: int
  size2: int
  symmetric: bool

  @classmethod
  def create(cls, n1: int, n2: int, batch_size: int, symmetric: bool) -> TilePlan:
    return cls(n1, n2, min(batch_size, n1), min(batch_size, n2), symmetric)

  @property
  def grid(self) -> tuple[int, int]:
    return -(-self.n1 // self.size1), -(-self.n2 // self.size2)

  def upper(self) -> list[Tile]:
    """The tiles to compute: all of them, or those on and above the diagonal."""
    t1, t2 = self.grid
    return [(i, j) for i in range(t1) for j in range(t2) if not self.symmetric or j >= i]

  def lower(self) -> list[Tile]:
    """The tiles strictly below the diagonal of a symmetric plan."""
    t1, _ = self.grid
    return [(i, j) for i in range(t1) for j in range(i)] if self.symmetric else []

  def rows(self, i: int) -> tuple[int, int]:
    return i * self.size1, min((i + 1) * self.size1, self.n1)

  def cols(self, j: int) -> tuple[int, int]:
    return j * self.size2, min((j + 1) * self.size2, self.n2)

  def entries(self, tile: Tile, mirror: bool) -> int:
    """Kernel entries a tile fills (twice its size when mirrored below the diagonal)."""
    (r0, r1), (c0, c1) = self.rows(tile[0]), self.cols(tile[1])
    return (r1 - r0) * (c1 - c0) * (2 if mirror and tile[0] != tile[1] else 1)


def padded_block(x, start: int, size: int):
  """Examples `[start, start + size)` of the pytree `x`, padded by repeating the block's
  first example (a real input, so no kernel sees a degenerate all-zero row)."""
  def one(a):
    piece = a[start:start + size]
    if piece.shape[0] < size:
      piece = np.concatenate([piece, np.repeat(piece[:1], size - piece.shape[0], axis=0)])
    return piece
  return jax.tree_util.tree_map(one, x)


def num_examples(x) -> int:
  leaves = jax.tree_util.tree_leaves(x)
  if not leaves:
    raise ValueError("The inputs are empty (no arrays).")
  n = {np.shape(a)[0] if np.ndim(a) else None for a in leaves}
  if len(n) != 1 or None in n:
    raise ValueError(f"Every input array needs the same leading (example) axis; got sizes {n}.")
  return n.pop()


def digest(x) -> str:
  """A fingerprint of an input pytree (shapes, dtypes and bytes), to recognise a resumed run."""
  h = hashlib.sha1()
  for a in jax.tree_util.tree_leaves(x):
    a = np.ascontiguousarray(a)
    h.update(f"{a.shape}{a.dtype}".encode())
    h.update(memoryview(a).cast("B"))
  return h.hexdigest()
