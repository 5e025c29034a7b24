"""`im.batch`: a kernel function applied to a whole dataset, tile by tile."""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from collections.abc import Callable

import jax
import numpy as np

from infinite_modules.api import KernelFn
from infinite_modules.batching import outputs
from infinite_modules.batching.dispatch import DIAGONAL, OFF, EagerTiles, ShardedTiles, TileCall
from infinite_modules.batching.tiles import TilePlan, digest, num_examples
from infinite_modules.kernel import Kernel


def batch(kernel_fn: Callable, batch_size: int, *, progress: bool = True,
          devices: list | None = None, mesh: jax.sharding.Mesh | None = None, jit: bool = True,
          in_flight: int = 2, checkpoint_seconds: float = 10.0) -> Callable:
  """Wraps a kernel function to compute whole-dataset kernels tile by tile.

  The (n1, n2) kernel is cut into tiles of `batch_size x batch_size` examples
  (any n1, n2: the last tiles are computed on padded blocks and clipped, so one
  compiled tile function serves all). Tiles run asynchronously on every device
  of `mesh` (default: all local devices) while finished tiles are copied into
  the output, with a progress bar (tiles, entries per second, ETA). Memory on
  a device is bounded by `in_flight + 1` tiles; on the host by the output (or
  about one tile, with `path=`). A host-side loop: call it outside `jax.jit`.

  With `x2=None` the kernel is symmetric, K(x_j, x_i) = K(x_i, x_j)^T, so only
  the tiles on and above the diagonal are computed (diagonal tiles as
  `kernel_fn(x_i, None)`); outputs with extra axes (empirical kernels with
  `trace_axes=()`) compute their lower tiles too.

  Several hosts: after `jax.distributed.initialize()`, process k of P computes
  tiles k, k + P, ... of the tile list on its local devices and writes them
  into the shared output file (`path=` is then required); every process
  returns the whole kernel once all have finished.

  Args:
    kernel_fn: `kernel_fn(x1, x2, *args, **kwargs)`: an `im.kernel_fn`
      (`args`/`kwargs`: `get`), an `interop.empirical_ntk_fn(model)` /
      `empirical_nngp_fn` (`args`: `variables`), an
      `interop.empirical_kernel_fn` (`args`: `get, variables`), an
      `interop.monte_carlo_kernel_fn` (`kwargs`: `get`; use `jit=False`), or
      any function with that convention returning an array, a namedtuple or a
      `Kernel` whose leaves have the two example axes first (leaves named
      `cov1`/`cov2` one, `error` none).
    batch_size: examples per tile side. A tile holds batch_size^2 kernel
      entries per output array, and the kernel function's intermediates:
      about batch_size^2 numbers per layer for the diagonal layout and
      batch_size^2 (HW)^2 for the full layout of a CNN (`kernel_fn.layout`).
    progress: show a tqdm progress bar.
    devices: the devices to use (default: all local devices).
    mesh: a `jax.sharding.Mesh` of local devices to use instead of `devices`
      (all of its devices, tiles sharded along one flattened axis).
    jit: trace the kernel function once per tile shape and run stacks of tiles
      with `jax.shard_map` (True), or call it eagerly per tile, round-robin
      over the devices (False: for kernel functions that cannot be traced,
      such as `interop.monte_carlo_kernel_fn`, which loops over samples).
    in_flight: jobs (stacks of one tile per device) dispatched ahead of the
      one being copied to the host.
    checkpoint_seconds: with `path=`, how often finished tiles are synced to
      disk and recorded in the resume ledger.

  Returns:
    `batched(x1, x2=None, *args, path=None, **kwargs)`: the kernel function's
    output for the whole inputs, as NumPy arrays, or with `path` as read-only
    `numpy.memmap`s of `.npy` files (a one-array output in `path`, several in
    `<stem>.<name>.npy`). A run with `path` that was killed resumes from the
    tiles it had finished (recorded in `<stem>.tiles*`): call it again with the
    same arguments. The ledger identifies the inputs and tiling; on resume one
    finished tile is recomputed and must match the file, so a different kernel
    function is refused rather than mixed in.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
      or batch_size < 1:
    raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
  if devices is not None and mesh is not None:
    raise ValueError("Pass either `devices` or `mesh`, not both.")
  if in_flight < 1:
    raise ValueError(f"in_flight must be >= 1, got {in_flight}.")

  compiled = {}

  def batched(x1, x2=None, *args, path: str | os.PathLike | None = None, **kwargs):
    _warn_if_estimated(kernel_fn, args, kwargs)
    chosen = list(mesh.devices.flat) if mesh is not None else list(devices or jax.local_devices())
    return _Run(kernel_fn, int(batch_size), chosen, jit, in_flight, checkpoint_seconds,
                progress, compiled).compute(x1, x2, args, kwargs, path)

  return batched


def _warn_if_estimated(kernel_fn, args, kwargs):
  """An `im.kernel_fn` of a model with estimated steps asked for bare arrays warns here,
  at the user's call, rather than from inside the first traced tile; the `KernelFn` warns
  once, so its tile calls then stay quiet (at most one warning per batched call)."""
  if not isinstance(kernel_fn, KernelFn):
    return
  get = args[0] if args else kwargs.get("get")
  if get is not None:
    kernel_fn._warn_estimated(kernel_fn.estimates, stacklevel=3)


@dataclasses.dataclass
class _Run:
  kernel_fn: Callable
  batch_size: int
  devices: list
  jit: bool
  in_flight: int
  checkpoint_seconds: float
  progress: bool
  compiled: dict

  def compute(self, x1, x2, args, kwargs, path):
    process, processes = jax.process_index(), jax.process_count()
    foreign = [d for d in self.devices if d.process_index != process]
    if foreign:
      raise ValueError(f"im.batch uses this process's devices; {foreign} belong to other "
                       "processes (each process of a multi-host run computes its own tiles).")
    if processes > 1 and path is None:
      raise ValueError("With several processes (jax.distributed), im.batch writes into one "
                       "shared file: pass path= (on a file system all hosts see).")
    symmetric = x2 is None
    x1 = jax.tree_util.tree_map(np.asarray, x1)
    x2 = x1 if symmetric else jax.tree_util.tree_map(np.asarray, x2)
    plan = TilePlan.create(num_examples(x1), num_examples(x2), self.batch_size, symmetric)
    call = TileCall(self.kernel_fn, args, kwargs)
    runner = (ShardedTiles if self.jit else EagerTiles)(call, self.devices, plan, x1, x2,
                                                            self.compiled)

    store = outputs.MemoryStore() if path is None else outputs.NpyStore(path)
    ledger, resumed = None, False
    if path is not None:
      identity = {"format": 1, "n1": plan.n1, "n2": plan.n2, "batch_size": self.batch_size,
                  "symmetric": symmetric, "x1": digest(x1), "x2": None if symmetric else digest(x2)}
      ledger = outputs.TileLedger(store.base, identity, plan.grid, process)
      resumed = ledger.load()
    done = ledger.done if ledger is not None else np.zeros(plan.grid, bool)
    # Diagonal tiles are kernel_fn(x, None): a KernelFn then sets the correlation of each
    # point with itself to exactly 1 (as the unbatched x2=None kernel does); empirical
    # kernels reuse work.
    diagonal = symmetric

    def kind(tile):
      return DIAGONAL if diagonal and tile[0] == tile[1] else OFF

    # The first tile runs alone: its output fixes the arrays to allocate. On a resumed
    # run it is a finished tile, recomputed to check the file holds this kernel.
    upper = plan.upper()
    mine = [t for t in upper[process::processes] if not done[t]]
    first = next(t for t in upper if done[t]) if resumed else (mine[0] if mine else upper[0])
    (_, first_leaves), treedef = _single(runner.fetch(runner.dispatch(kind(first), [first])))
    specs = outputs.leaf_specs(jax.tree_util.tree_unflatten(treedef, first_leaves), plan)
    mirror = symmetric and outputs.can_mirror(specs)
    store.allocate(specs, existing=resumed)
    if resumed:
      _check_resumed_tile(store, specs, plan, first, first_leaves)
    if symmetric and not mirror:
      mine += [t for t in plan.lower()[process::processes] if not done[t]]

    tracker = _Tracker(plan, store, specs, ledger, mirror, self.checkpoint_seconds,
                       self.progress, len(mine), process, processes)
    try:
      if first in mine:
        mine.remove(first)
        tracker.finished(first, first_leaves)
      queue = collections.deque()
      limit = self.in_flight * (len(self.devices) if runner.width == 1 else 1)
      for job in _jobs(mine, kind, runner.width):
        queue.append(runner.dispatch(*job))  # asynchronous: returns before the tiles finish
        if len(queue) > limit:
          for tile, leaves in runner.fetch(queue.popleft())[0]:
            tracker.finished(tile, leaves)
      while queue:
        for tile, leaves in runner.fetch(queue.popleft())[0]:
          tracker.finished(tile, leaves)
    finally:
      tracker.close()
    if processes > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"im.batch {store.base}")
    if ledger is not None:
      _check_complete(ledger, plan, mirror)
    result = [store.read(k) for k in range(len(specs))]
    store.close()
    return _assemble(treedef, result, specs, x1, x2)


def _single(fetched):
  results, treedef = fetched
  return results[0], treedef


def _jobs(tiles, kind, width):
  """(kind, tiles) jobs of up to `width` tiles of one kind, diagonal tiles first."""
  for k in (DIAGONAL, OFF):
    same = [t for t in tiles if kind(t) == k]
    for s in range(0, len(same), width):
      yield k, same[s:s + width]


def _check_resumed_tile(store, specs, plan, tile, leaves):
  fresh = []
  for spec, leaf in zip(specs, leaves):
    if spec.role == outputs.BLOCK:
      (r0, r1), (c0, c1) = plan.rows(tile[0]), plan.cols(tile[1])
      fresh.append(np.asarray(leaf)[:r1 - r0, :c1 - c0])
  for spec, new, old in zip([s for s in specs if s.role == outputs.BLOCK], fresh,
                            outputs.read_tile(store, specs, plan, tile)):
    scale = float(np.max(np.abs(old))) if old.size else 0.0
    if not np.allclose(new, old, rtol=1e-4, atol=1e-6 * scale):
      raise ValueError(
          f"im.batch: cannot resume: tile {tile} of {spec.name!r} recomputed now differs from "
          "the one in the file (by up to "
          f"{float(np.max(np.abs(new - old))):.3g}), so the file holds another kernel function's "
          "result. Delete the output files and their .tiles files, or pass another path.")


def _check_complete(ledger, plan, mirror):
  ledger.load()  # every process's tiles
  needed = plan.upper() + ([] if mirror else plan.lower())
  missing = [t for t in needed if not ledger.done[t]]
  if missing:
    raise RuntimeError(f"im.batch: tiles {missing[:5]} (of {len(missing)}) were not computed; "
                       "run again with the same arguments to finish them.")


def _assemble(treedef, arrays, specs, x1, x2):
  out = jax.tree_util.tree_unflatten(treedef, arrays)
  if isinstance(out, Kernel):
    errors = [a for a, s in zip(arrays, specs) if s.role == outputs.PER_TILE]
    out = dataclasses.replace(
        out, shape1=tuple(np.shape(x1)), shape2=tuple(np.shape(x2)),
        error=float(np.max(errors[0])) if errors else out.error)
  return out


class _Tracker:
  """Writes finished tiles, records them in the ledger every few seconds, shows progress."""

  def __init__(self, plan, store, specs, ledger, mirror, checkpoint_seconds, progress, total,
               process, processes):
    self.plan, self.store, self.specs, self.ledger, self.mirror = plan, store, specs, ledger, mirror
    self.checkpoint_seconds = checkpoint_seconds
    self.pending = []
    self.entries = 0
    self.start = self.last_sync = time.monotonic()
    self.bar = None
    if progress:
      from tqdm.auto import tqdm
      where = f" (process {process + 1}/{processes})" if processes > 1 else ""
      self.bar = tqdm(total=total, desc=f"kernel tiles{where}", unit="tile", leave=False)

  def finished(self, tile, leaves):
    outputs.write_tile(self.store, self.specs, self.plan, tile, leaves, self.mirror)
    self.pending.append(tile)
    self.entries += self.plan.entries(tile, self.mirror)
    now = time.monotonic()
    if self.ledger is not None and now - self.last_sync > self.checkpoint_seconds:
      self.checkpoint()
    if self.bar is not None:
      self.bar.update(1)
      self.bar.set_postfix_str(f"{self.entries / max(now - self.start, 1e-9):.3g} entries/s",
                               refresh=False)

  def checkpoint(self):
    self.last_sync = time.monotonic()
    if self.ledger is None or not self.pending:
      return
    self.store.sync()
    for i, j in self.pending:
      self.ledger.mark((i, j))
      if self.mirror:
        self.ledger.mark((j, i))
    self.pending = []
    self.ledger.save()

  def close(self):
    self.checkpoint()
    if self.bar is not None:
      self.bar.close()
