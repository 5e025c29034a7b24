"""Linear maps on the moment arrays of a `Root`, in either spatial layout.

All spatial operations of the interpreter (convolution windows, pooling,
padding, slicing, global sums, transposes) reduce to a few maps on the moment
arrays; each is written once here for both layouts. "pair" arrays (nngp,
ntk) have 2 leading batch axes, "single" arrays (var1, var2) have 1, and
means have 1 leading axis and always one spatial axis per dim.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax import lax

from infinite_modules.values import Root


class NeedFullLayout(Exception):
  """Raised inside the diagonal-layout pass when an op needs all position pairs."""


def spatial_axes(lead: int, d: int, full: bool, k: int) -> tuple[int, ...]:
  return (lead + k, lead + d + k) if full else (lead + k,)


def per_side(fn, side1, side2):
  """(fn(side1), fn(side2)), computed once when both sides are one array.

  With x2=None both batches are the same, and the rules that see it pass the first
  side's array as the second (`linear._input_moments`): keeping them one array keeps
  each later step from tracing, lowering and compiling the same work twice.
  """
  out1 = fn(side1)
  return out1, out1 if side2 is side1 else fn(side2)


def one_buffer(nngp, ntk):
  """(nngp, ntk) written into one stacked buffer and read back as its two halves.

  The NNGP and NTK of a nonlinearity share every transcendental (correlation,
  arccos, square roots). Returned as two arrays, XLA gives each its own fused
  kernel and materializes the shared intermediates between them (three kernels
  and three extra passes over the moments per ReLU layer); as the halves of one
  array they are one kernel that writes both, and the halves are free views.
  """
  if ntk is None or jnp.shape(nngp) != jnp.shape(ntk):
    return nngp, ntk
  # The barrier keeps XLA from simplifying slice(concatenate(a, b)) back to a and b.
  both = lax.optimization_barrier(jnp.stack([nngp, ntk]))
  return both[0], both[1]


def map_arrays(root: Root, full: bool, second, mean=None, stack_pair: bool = False,
               **changes) -> Root:
  """Applies `second(arr, lead)` to the second moments and `mean(arr)` to means
  (`stack_pair`: to the NNGP and NTK arrays stacked, as one array with lead + 1 leading
  axes, when both have the same shape).

  An input's pseudo-root has `ntk=None` (structurally zero: no parameter
  before it), which stays None rather than becoming a window sum of zeros
  that XLA would constant-fold at compile time.
  """
  mean = mean or (lambda a: a)
  var1, var2 = per_side(lambda v: second(v, 1), root.var1, root.var2)
  mean1, mean2 = per_side(lambda m: None if m is None else mean(m), root.mean1, root.mean2)
  if stack_pair and root.ntk is not None and root.ntk.shape == root.nngp.shape:
    nngp, ntk = second(jnp.stack([root.nngp, root.ntk]), 3)
  else:
    nngp = second(root.nngp, 2)
    ntk = None if root.ntk is None else second(root.ntk, 2)
  return dataclasses.replace(
      root, nngp=nngp, ntk=ntk,
      var1=var1, var2=var2, mean1=mean1, mean2=mean2, gathered_from=None, **changes)


def _take(arr, axis, index):
  """arr gathered along axis by index, with zeros where index < 0."""
  index = np.asarray(index)
  taken = jnp.take(arr, np.maximum(index, 0), axis=axis)
  if np.all(index >= 0):
    return taken
  shape = [1] * taken.ndim
  shape[axis] = len(index)
  return taken * jnp.asarray((index >= 0).reshape(shape), taken.dtype)


def gather(root: Root, full: bool, k: int, index) -> Root:
  """Spatial dim k re-indexed: new position t holds old position index[t] (or 0 if < 0)."""
  d = len(root.spatial)

  def second(arr, lead):
    for axis in spatial_axes(lead, d, full, k):
      arr = _take(arr, axis, index)
    return arr

  spatial = tuple(len(index) if i == k else s for i, s in enumerate(root.spatial))
  return map_arrays(root, full, second, lambda m: _take(m, 1 + k, index), spatial=spatial)


def window_sum(root: Root, full: bool, k: int, window: int, stride: int, dilation: int,
               padding: tuple[int, int], same_tap: bool = True) -> Root:
  """Sum over a sliding window along spatial dim k.

  same_tap=True (convolution: each tap has its own independent weights, so
  only equal taps correlate):
    out[t, t'] = sum_j in[t*stride + j*dilation - lo, t'*stride + j*dilation - lo].
  same_tap=False (pooling: a fixed linear map of the field, all tap pairs):
    out[t, t'] = sum_j sum_j' in[t*stride + j*dilation - lo, t'*stride + j'*dilation - lo].
  Zero outside the input.

  Each sum is one XLA `reduce_window` (for the diagonal window of same_tap
  in the full layout, along the flattened diagonal), never a sum of shifted
  slices: XLA fuses an elementwise producer into each
  slice that reads it, so the previous layer's nonlinearity (arccos, sqrt)
  would be evaluated once per tap, and compounded over a chain of layers the
  cost would grow quadratically with depth. Window ops read a materialized
  input (XLA does not fuse expensive producers into consumers that reuse
  their operand's elements), so each moment entry is computed once.
  """
  d = len(root.spatial)
  lo, hi = padding
  if lo < 0 or hi < 0:
    raise ValueError("Negative convolution padding is not supported.")
  size = root.spatial[k] + lo + hi
  out = (size - dilation * (window - 1) - 1) // stride + 1
  if out <= 0:
    raise ValueError(f"Window {window} (dilation {dilation}) larger than padded size {size}.")
  spec = _Window(window, stride, dilation, (lo, hi))

  def second(arr, lead):
    axes = spatial_axes(lead, d, full, k)
    if len(axes) == 1:
      return spec.sum(arr, axes[0])
    if same_tap:
      return spec.diagonal_sum(arr, axes)
    for axis in axes:  # a linear map applied to both positions independently
      arr = spec.sum(arr, axis)
    return arr

  spatial = tuple(out if i == k else s for i, s in enumerate(root.spatial))
  # Diagonal layout: the NNGP and NTK arrays are summed as one stacked array (one
  # reduce_window instead of two: half the window ops XLA compiles, and the layer's
  # nonlinearity writes both into one buffer). The full layout's diagonal sums keep
  # one op per array (its moments are the largest arrays; no extra stacked copy).
  return map_arrays(root, full, second, lambda m: spec.sum(m, 1 + k), spatial=spatial,
                    stack_pair=not full)


@dataclasses.dataclass(frozen=True)
class _Window:
  """A 1-D sliding window: size, stride, dilation and (lo, hi) zero padding."""
  size: int
  stride: int
  dilation: int
  padding: tuple[int, int]

  def sum(self, arr, axis: int):
    """out[t] = sum_j arr[t*stride + j*dilation - lo] along `axis` (one reduce_window)."""
    ones = [1] * arr.ndim
    dims, strides, dilation, pads = list(ones), list(ones), list(ones), [(0, 0)] * arr.ndim
    dims[axis], strides[axis], dilation[axis] = self.size, self.stride, self.dilation
    pads[axis] = self.padding
    return lax.reduce_window(arr, np.array(0, arr.dtype), lax.add, tuple(dims), tuple(strides),
                             tuple(pads), window_dilation=tuple(dilation))

  def diagonal_sum(self, arr, axes: tuple[int, int]):
    """out[t, t'] = sum_j arr[t*stride + j*dilation - lo, t'*stride + j*dilation - lo].

    One `reduce_window` along a diagonal: with both axes zero-padded and the
    block of axes p..q (p < q, any axes between them) flattened, stepping both
    positions by one moves the flat index by step = (elements per p index) + 1,
    so the window is `size` taps with dilation `dilation * step`. Valid windows
    never run past a row, so no entries wrap around.
    """
    p, q = sorted(axes)
    lo, hi = self.padding
    widths = [(0, 0)] * arr.ndim
    widths[p] = widths[q] = (lo, hi)
    padded = jnp.pad(arr, widths)
    block = padded.shape[p:q + 1]
    flat = padded.reshape(padded.shape[:p] + (-1,) + padded.shape[q + 1:])
    step = int(np.prod(block[1:])) + 1
    reach = (self.size - 1) * self.dilation * step
    ones = [1] * flat.ndim
    dims, dilation, pads = list(ones), list(ones), [(0, 0)] * flat.ndim
    dims[p], dilation[p], pads[p] = self.size, self.dilation * step, (0, reach)
    summed = lax.reduce_window(flat, np.array(0, arr.dtype), lax.add, tuple(dims),
                               tuple(ones), tuple(pads), window_dilation=tuple(dilation))
    summed = summed.reshape(padded.shape)
    size = padded.shape[p]
    out = (size - self.dilation * (self.size - 1) - 1) // self.stride + 1
    index = [slice(None)] * arr.ndim
    index[p] = index[q] = slice(0, (out - 1) * self.stride + 1, self.stride)
    return summed[tuple(index)]


def sum_spatial(root: Root, full: bool, dims: tuple[int, ...]) -> Root:
  """Sum of the field over spatial dims (global pooling): needs all position pairs."""
  if not dims:
    return root
  if not full:
    raise NeedFullLayout()
  return _sum_out(root, full, dims)


def _sum_out(root: Root, full: bool, dims: tuple[int, ...]) -> Root:
  """Sums the moments over spatial dims (both positions of each pair in the full layout)."""
  if not dims:
    return root
  d = len(root.spatial)

  def second(arr, lead):
    return _sum_axes(arr, [a for k in dims for a in spatial_axes(lead, d, full, k)])

  spatial = tuple(s for i, s in enumerate(root.spatial) if i not in dims)
  return map_arrays(root, full, second, lambda m: _sum_axes(m, [1 + k for k in dims]),
                    spatial=spatial)


def _sum_axes(arr, axes):
  """arr summed over `axes`.

  Trailing axes (a global pooling in either layout) are flattened and summed as two
  halves by one `reduce_window` (then the halves added), not by one reduction: XLA's
  CPU backend fuses the nonlinearity producing the moments into a reduction's kernel
  in a way that materializes every operand of that nonlinearity as a whole array
  (constants broadcast to the moments' size included: 10 arrays of the moments'
  size live at once on Neural Tangents' pooled README network, 64 MB each). A
  window reduction with more than one output reads one materialized array instead.
  """
  axes = sorted(axes)
  keep = arr.ndim - len(axes)
  if axes != list(range(keep, arr.ndim)) or np.prod(arr.shape[keep:]) < 2:
    return jnp.sum(arr, axis=tuple(axes))
  flat = arr.reshape(arr.shape[:keep] + (-1,))
  m = flat.shape[-1]
  # Two overlapping windows of m - 1 entries (which XLA does not turn into a reduction):
  # the first misses only the last entry.
  windows = lax.reduce_window(flat, np.array(0, arr.dtype), lax.add, (1,) * keep + (m - 1,),
                              (1,) * (keep + 1), "VALID")
  return windows[..., 0] + flat[..., m - 1]


def diagonal_sum(arr, lead: int, d: int, full: bool, dims: tuple[int, ...]):
  """sum_s arr[.., s, s] over spatial dims `dims` (a contraction over positions)."""
  if not dims:
    return arr
  if not full:
    return jnp.sum(arr, axis=tuple(lead + k for k in dims))
  keep = [k for k in range(d) if k not in dims]
  # Move the contracted pairs to the end, take their diagonal, sum it.
  src = [lead + k for k in dims] + [lead + d + k for k in dims]
  arr = jnp.moveaxis(arr, src, list(range(arr.ndim - 2 * len(dims), arr.ndim)))
  sizes = arr.shape[arr.ndim - 2 * len(dims):][: len(dims)]
  m = int(np.prod(sizes))
  arr = arr.reshape(arr.shape[: arr.ndim - 2 * len(dims)] + (m, m))
  del keep
  return jnp.trace(arr, axis1=-2, axis2=-1)


def permute_spatial(root: Root, full: bool, perm: tuple[int, ...]) -> Root:
  """Reorders the root's spatial dims: new dim i is old dim perm[i]."""
  d = len(root.spatial)
  if tuple(perm) == tuple(range(d)):
    return root

  def second(arr, lead):
    order = list(range(lead)) + [lead + p for p in perm]
    if full:
      order += [lead + d + p for p in perm]
    return jnp.transpose(arr, order)

  return map_arrays(root, full, second, lambda m: jnp.transpose(m, [0] + [1 + p for p in perm]),
                    spatial=tuple(root.spatial[p] for p in perm))


def diag_of(var, d: int, full: bool):
  """Per-position variances (n, *S) from a single array (n, *S[, *S])."""
  if not full or d == 0:
    return var
  n = var.shape[0]
  sizes = var.shape[1:1 + d]
  m = int(np.prod(sizes))
  flat = var.reshape((n, m, m))
  return jnp.diagonal(flat, axis1=1, axis2=2).reshape((n,) + sizes)


def pair_diagonal(arr):
  """arr[i, i, ...] as an (n, ...) array, for a pair array (n, n, ...) of a batch with
  itself (a strided slice of the flattened pairs: fuses into its consumers)."""
  n = arr.shape[0]
  return arr.reshape((n * n,) + arr.shape[2:])[::n + 1]


def pair_broadcast(side1, side2, d: int, full: bool, pair: bool):
  """Broadcasts per-position arrays of the two sides against a moment array.

  side arrays have shape (n, *S) (+ trailing dims). For a pair array the result
  broadcasts against (n1, n2, *S[, *S]); for a single array (pair=False, both
  sides from the same batch) against (n, *S[, *S]).
  """
  def expand(a, first: bool):
    a = jnp.asarray(a)
    n, rest = a.shape[:1], a.shape[1:1 + d]
    trailing = a.shape[1 + d:]
    ones = (1,) * d
    if pair:
      lead = (n[0], 1) if first else (1, n[0])
    else:
      lead = n
    if full:
      spatial = rest + ones if first else ones + rest
    else:
      spatial = rest
    return a.reshape(lead + spatial + trailing)
  return expand(side1, True), expand(side2, False)


def whole_batch(same_batch) -> bool:
  """Whether `same_batch` says x2 is x1 (not blocks of one batch, not unrelated batches)."""
  return same_batch is True


def same_point(n: int, spatial: tuple[int, ...], full: bool, pair: bool, same_batch):
  """Which entries of a moment array pair a point (input, position) with itself.

  `same_batch`: True if both batches are one (x2=None), an (n1, n2) boolean
  array marking the pairs of one input with itself if the batches are two
  blocks of one batch (x2=None computed by blocks, `api`), False otherwise.

  A boolean mask broadcasting against a pair array (n1, n2, *S[, *S])
  (pair=True) or a single array (n, *S[, *S]); None if no entry does. In the
  diagonal layout every entry of a single array is such a pair. Built from
  iotas, which XLA fuses into the consumer, rather than an (n, n, ...)
  constant embedded in the program.
  """
  d = len(spatial)
  blocks = pair and not isinstance(same_batch, bool)
  if pair and same_batch is False:
    return None
  if not (full and d) and not pair:
    return np.ones((1,) * (1 + d), dtype=bool)
  shape, first, second = [], [], []
  if pair and not blocks:
    shape += [n, n]
    first.append(0)
    second.append(1)
  if full and d:
    m = int(np.prod(spatial))
    lead = len(shape)
    shape += [m, m]
    first.append(lead)
    second.append(lead + 1)
  if not pair:
    shape = [1] + shape
    first, second = [a + 1 for a in first], [a + 1 for a in second]
  mask = None
  for a, b in zip(first, second):
    eq = lax.broadcasted_iota(np.int32, shape, a) == lax.broadcasted_iota(np.int32, shape, b)
    mask = eq if mask is None else mask & eq
  positions = tuple(spatial) * 2 if full and d else (1,) * d
  if blocks:
    inputs = same_batch.reshape(same_batch.shape + (1,) * len(positions))
    return inputs if mask is None else inputs & mask.reshape((1, 1) + positions)
  lead = shape[:1] if not pair else [n, n]
  return mask.reshape(tuple(lead) + positions)


def mirror(arr, d: int, full: bool):
  """(k + k^T) / 2 for a pair array of a batch with itself: exactly symmetric.

  k^T swaps the two inputs (and, in the full layout, the two positions) of
  every entry; floating-point addition commutes, so entry (a, b) and (b, a)
  are the same number.
  """
  first = list(range(2, 2 + d))
  order = [1, 0] + (list(range(2 + d, 2 + 2 * d)) + first if full else first)
  return (arr + jnp.transpose(arr, order)) / 2


def squeeze_spatial(root: Root, full: bool, dims: tuple[int, ...]) -> Root:
  """Removes spatial dims of size 1 (valid in both layouts)."""
  assert all(root.spatial[k] == 1 for k in dims)
  return _sum_out(root, full, dims)


def unfold_upper_blocks(pairs, blocks: int, n: int):
  """The (n, n) symmetric kernel from its upper block pairs (`np.triu_indices(blocks)`
  order), shape (blocks (blocks + 1) / 2, size, size).

  The pairs are scattered into the upper blocks of a (blocks, blocks, size,
  size) array; block (I, J) below the diagonal is block (J, I) transposed, and
  diagonal blocks are averaged with their transposes (exactly symmetric). A
  scatter, not slices or a gather, reads the pairs: XLA fuses the last layer's
  work into those (into each of the B^2 slices, or per gathered entry).
  """
  size = pairs.shape[1]
  first, second = np.triu_indices(blocks)
  upper = jnp.zeros((blocks, blocks, size, size), pairs.dtype).at[first, second].set(
      pairs, unique_indices=True, indices_are_sorted=True)
  lower = upper.transpose(1, 0, 3, 2)
  row = lax.broadcasted_iota(jnp.int32, upper.shape, 0)
  col = lax.broadcasted_iota(jnp.int32, upper.shape, 1)
  out = jnp.where(row < col, upper, jnp.where(row > col, lower, (upper + lower) / 2))
  return out.transpose(0, 2, 1, 3).reshape(blocks * size, blocks * size)[:n, :n]


def symmetric_gram(a):
  """a a^T for a of shape (n, k), exactly symmetric ((g + g^T) / 2: a matrix product's
  two triangles may round apart).

  One matrix product. Products of the upper block pairs only (62.5% of the FLOPs at
  4 blocks, whether one product per pair or one batched product of the gathered
  blocks) ran slower inside the whole kernel on CPU (fcn, n = 1024: 0.037 s against
  0.028 s a call; n = 2048: 0.20 against 0.16), and compiled longer.
  """
  return mirror(jnp.einsum("az,bz->ab", a, a), 0, False)
