"""Running tiles of a kernel function on devices, asynchronously.

Two ways, one interface (`width` tiles per job, `dispatch(kind, tiles)` returns
at once, `fetch(job)` waits and copies to the host):

* `ShardedTiles` stacks `width` tiles and runs them as one `jax.jit` of a
  `jax.shard_map` over a one-axis `Mesh` of the devices: each device computes
  one tile with the per-device program, compiled once.
* `EagerTiles` calls the kernel function on one tile at a time, placed on the
  devices in turn, for kernel functions that cannot be traced as a whole
  (e.g. `interop.monte_carlo_kernel_fn`, a Python loop over samples).

A job's kind is "diagonal" (a tile of a symmetric kernel on the diagonal,
computed as `kernel_fn(x_i, None)` so the kernel function can reuse its work)
or "off" (`kernel_fn(x_i, x_j)`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from infinite_modules.batching.tiles import Tile, TilePlan, padded_block

DIAGONAL, OFF = "diagonal", "off"


class TileCall:
  """`kernel_fn(a, b, *args, **kwargs)` with the array leaves of args/kwargs as inputs.

  Arrays (e.g. the `variables` of an empirical kernel) are passed to the compiled
  tile function rather than baked into it as constants; everything else (`get`,
  flags) is static.
  """

  def __init__(self, kernel_fn, args: tuple, kwargs: dict):
    self.kernel_fn = kernel_fn
    leaves, self.treedef = jax.tree_util.tree_flatten((args, kwargs))
    self.is_array = [isinstance(a, (np.ndarray, jax.Array)) for a in leaves]
    self.arrays = [a for a, d in zip(leaves, self.is_array) if d]
    self.static = [a for a, d in zip(leaves, self.is_array) if not d]

  @property
  def signature(self):
    """What the traced tile function depends on besides array shapes; None if unhashable."""
    key = (self.treedef, tuple(self.is_array), tuple(self.static))
    try:
      hash(key)
    except TypeError:
      return None
    return key

  def __call__(self, a, b, arrays):
    arrays, static = iter(arrays), iter(self.static)
    leaves = [next(arrays) if d else next(static) for d in self.is_array]
    args, kwargs = jax.tree_util.tree_unflatten(self.treedef, leaves)
    return self.kernel_fn(a, b, *args, **kwargs)


class ShardedTiles:
  """Stacks of `len(devices)` tiles, one per device, through `jax.shard_map`."""

  def __init__(self, call: TileCall, devices, plan: TilePlan, x1, x2, cache: dict):
    self.mesh = Mesh(np.asarray(devices).reshape(-1), ("tiles",))
    self.width = self.mesh.size
    self.plan, self.x1, self.x2 = plan, x1, x2
    self.stacked = NamedSharding(self.mesh, P("tiles"))
    self.arrays = jax.device_put(call.arrays, NamedSharding(self.mesh, P()))
    # `cache` lives as long as the batched function: later calls (other inputs, the same
    # tile shapes) reuse the compiled tile functions.
    self.fns = {}
    for kind in (DIAGONAL, OFF):
      if call.signature is None:
        self.fns[kind] = self._compile(call, kind)
        continue
      key = (kind, tuple(devices), call.signature)
      if key not in cache:
        cache[key] = self._compile(call, kind)
      self.fns[kind] = cache[key]

  def _compile(self, call: TileCall, kind: str):
    def per_device(a, b, arrays):
      a, b = (jax.tree_util.tree_map(lambda v: v[0], t) for t in (a, b))
      out = call(a, None if kind == DIAGONAL else b, arrays)
      return jax.tree_util.tree_map(lambda v: jax.numpy.asarray(v)[None], out)
    return jax.jit(jax.shard_map(per_device, mesh=self.mesh, in_specs=(P("tiles"), P("tiles"), P()),
                                 out_specs=P("tiles"), check_vma=False))

  def dispatch(self, kind: str, tiles: list[Tile]):
    padded = tiles + [tiles[-1]] * (self.width - len(tiles))  # a full stack: one shape
    p = self.plan
    a = _stack([padded_block(self.x1, p.rows(i)[0], p.size1) for i, _ in padded])
    b = a if kind == DIAGONAL else _stack(
        [padded_block(self.x2, p.cols(j)[0], p.size2) for _, j in padded])
    a = jax.device_put(a, self.stacked)
    b = a if kind == DIAGONAL else jax.device_put(b, self.stacked)
    return tiles, self.fns[kind](a, b, self.arrays)

  def fetch(self, job):
    """[(tile, host leaves)] of a job, and the output's tree structure."""
    tiles, out = job
    leaves, treedef = jax.tree_util.tree_flatten(out)
    leaves = [np.asarray(v) for v in leaves]  # waits for this job only
    return [(t, [v[k] for v in leaves]) for k, t in enumerate(tiles)], treedef


class EagerTiles:
  """One tile per call of the kernel function, on the devices in turn."""

  width = 1

  def __init__(self, call: TileCall, devices, plan: TilePlan, x1, x2, cache: dict):
    del cache  # nothing compiled here: the kernel function compiles (or not) itself
    self.call, self.devices, self.plan, self.x1, self.x2 = call, list(devices), plan, x1, x2
    self.arrays = [jax.device_put(call.arrays, d) for d in self.devices]
    self.count = 0

  def dispatch(self, kind: str, tiles: list[Tile]):
    ((i, j),) = tiles
    k = self.count % len(self.devices)
    self.count += 1
    p, device = self.plan, self.devices[k]
    a = jax.device_put(padded_block(self.x1, p.rows(i)[0], p.size1), device)
    b = None if kind == DIAGONAL else jax.device_put(
        padded_block(self.x2, p.cols(j)[0], p.size2), device)
    return tiles, self.call(a, b, self.arrays[k])

  def fetch(self, job):
    tiles, out = job
    leaves, treedef = jax.tree_util.tree_flatten(out)
    return [(tiles[0], [np.asarray(v) for v in leaves])], treedef


def _stack(blocks):
  return jax.tree_util.tree_map(lambda *b: np.stack(b), *blocks)
