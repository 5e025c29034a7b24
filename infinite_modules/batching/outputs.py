"""Where finished tiles go: NumPy arrays in RAM, or `.npy` files with a resume ledger."""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os

import jax
import numpy as np

from infinite_modules.batching.tiles import Tile, TilePlan

# How the leading axes of one output leaf of a tile relate to the tile's examples.
BLOCK = "block"  # (size1, size2, ...): one entry per pair of examples (nngp, ntk)
ROWS = "rows"  # (size1, ...): one per example of x1 (Kernel.cov1)
COLS = "cols"  # (size2, ...): one per example of x2 (Kernel.cov2)
PER_TILE = "per_tile"  # (): one number per tile (Kernel.error, combined by max)
_ROLE_BY_NAME = {"cov1": ROWS, "cov2": COLS, "error": PER_TILE}


@dataclasses.dataclass(frozen=True)
class LeafSpec:
  """One output array of the whole kernel: its name, role, full shape and dtype."""
  name: str
  role: str
  shape: tuple[int, ...]
  dtype: np.dtype


def leaf_specs(tile_output, plan: TilePlan) -> list[LeafSpec]:
  """The whole-kernel arrays for the output pytree of one tile (leaves without a stack axis).

  Leaves named `cov1` / `cov2` (a `Kernel`, or a namedtuple from `get=`) are per
  example of x1 / x2, a leaf named `error` is one bound per tile; every other
  leaf must have the tile's two example axes first (nngp, ntk, and empirical
  kernels with extra output axes, e.g. `trace_axes=()`).
  """
  specs = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tile_output)[0]:
    leaf = np.asarray(leaf)
    keys = [getattr(k, "name", getattr(k, "key", getattr(k, "idx", None))) for k in path]
    name = ".".join(str(k) for k in keys) or "kernel"
    role = _ROLE_BY_NAME.get(str(keys[-1]) if keys else None, BLOCK)
    want = {BLOCK: (plan.size1, plan.size2), ROWS: (plan.size1,), COLS: (plan.size2,),
            PER_TILE: ()}[role]
    if leaf.shape[:len(want)] != want or (role == PER_TILE and leaf.ndim):
      raise ValueError(
          f"im.batch: output {name!r} of a tile of {plan.size1} x {plan.size2} examples has "
          f"shape {leaf.shape}, but its leading axes must be {want} (the tile's examples). "
          "Kernels diagonal over the batch axis (diagonal_axes containing 0) or traced over it "
          "cannot be tiled; compute them without im.batch.")
    full = {BLOCK: (plan.n1, plan.n2), ROWS: (plan.n1,), COLS: (plan.n2,),
            PER_TILE: plan.grid}[role] + leaf.shape[len(want):]
    specs.append(LeafSpec(name, role, full, leaf.dtype))
  return specs


def can_mirror(specs: list[LeafSpec]) -> bool:
  """Whether K(x_j, x_i) = K(x_i, x_j)^T gives the tiles below the diagonal.

  True for (n1, n2) kernels; kernels with extra output axes (e.g. (n1, n2, k, k)
  for `trace_axes=()`) pair their axes in a layout this module does not know,
  so their lower tiles are computed instead of guessed.
  """
  return all(len(s.shape) == 2 for s in specs if s.role == BLOCK)


def write_tile(store, specs: list[LeafSpec], plan: TilePlan, tile: Tile, leaves, mirror: bool):
  """Writes one tile's outputs (padding clipped), and its transpose below the diagonal."""
  i, j = tile
  (r0, r1), (c0, c1) = plan.rows(i), plan.cols(j)
  mirror = mirror and i != j
  for k, (spec, leaf) in enumerate(zip(specs, leaves)):
    leaf = np.asarray(leaf, spec.dtype)
    if spec.role == BLOCK:
      block = leaf[:r1 - r0, :c1 - c0]
      store.write(k, (r0, c0), block)
      if mirror:
        # Transpose into a contiguous copy first: writing the strided view straight into
        # untouched output pages costs ~1 s per 1000 x 1000 tile (page faults in
        # column order), the copy 0.06 s.
        store.write(k, (c0, r0), np.ascontiguousarray(block.T))
    elif spec.role == ROWS:
      store.write(k, (r0,), leaf[:r1 - r0])
    elif spec.role == COLS:
      store.write(k, (c0,), leaf[:c1 - c0])
    else:
      store.write(k, (i, j), leaf.reshape(1, 1))
      if mirror:
        store.write(k, (j, i), leaf.reshape(1, 1))


def read_tile(store, specs: list[LeafSpec], plan: TilePlan, tile: Tile) -> list[np.ndarray]:
  """The stored (clipped) block outputs of a tile, in the order of `specs`' BLOCK leaves."""
  (r0, r1), (c0, c1) = plan.rows(tile[0]), plan.cols(tile[1])
  return [store.read(k)[r0:r1, c0:c1] for k, s in enumerate(specs) if s.role == BLOCK]


class MemoryStore:
  """The whole kernel as NumPy arrays in RAM (no resume)."""

  resumable = False

  def allocate(self, specs: list[LeafSpec], *, existing: bool = False) -> None:
    del existing  # nothing to resume in RAM
    # np.empty: pages are touched only when tiles land, and every entry gets written.
    self.arrays = [np.zeros(s.shape, s.dtype) if s.role == PER_TILE else np.empty(s.shape, s.dtype)
                   for s in specs]

  def write(self, k: int, offset: tuple[int, ...], value: np.ndarray) -> None:
    self.arrays[k][tuple(slice(o, o + n) for o, n in zip(offset, value.shape))] = value

  def read(self, k: int) -> np.ndarray:
    return self.arrays[k]

  def sync(self) -> None:
    pass

  def close(self) -> None:
    pass


class NpyStore:
  """The whole kernel in `.npy` files, written tile by tile with `os.pwrite`.

  `pwrite` (rather than a writable `numpy.memmap`) keeps written pages in the
  page cache and out of the process's resident set, so a kernel larger than RAM
  costs the process about one tile. A one-array output goes to `path`; several
  arrays (a `Kernel`, a namedtuple) to `<path stem>.<name>.npy` beside it.
  Files are created at their final size and every process writes its own tiles
  into them (on a shared file system for several hosts).
  """

  resumable = True

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self.base = self.path.removesuffix(".npy")

  def file_names(self, specs: list[LeafSpec]) -> list[str]:
    if len(specs) == 1:
      return [self.path]
    return [f"{self.base}.{s.name}.npy" for s in specs]

  def allocate(self, specs: list[LeafSpec], *, existing: bool) -> None:
    """Opens the files; `existing`: a resumed run, whose files must match `specs`."""
    self.specs, self.names = specs, self.file_names(specs)
    self.fds, self.offsets = [], []
    for spec, name in zip(specs, self.names):
      header = _npy_header(spec.shape, spec.dtype)
      size = len(header) + int(np.prod(spec.shape)) * spec.dtype.itemsize
      if existing:
        found = _read_npy_header(name)
        if found != (spec.shape, spec.dtype):
          raise ValueError(
              f"im.batch: cannot resume into {name}: it holds {found}, but this kernel is "
              f"{(spec.shape, spec.dtype)}. Delete it and its .tiles files to start over.")
      fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o644)
      if not existing:
        os.pwrite(fd, header, 0)  # every process writes the same bytes: no race
        os.ftruncate(fd, size)
      self.fds.append(fd)
      self.offsets.append(len(header))

  def write(self, k: int, offset: tuple[int, ...], value: np.ndarray) -> None:
    spec, fd = self.specs[k], self.fds[k]
    item = spec.dtype.itemsize
    inner = int(np.prod(spec.shape[len(offset):], dtype=np.int64))  # entries per index tuple
    if len(offset) == 1:
      os.pwrite(fd, np.ascontiguousarray(value).tobytes(),
                self.offsets[k] + offset[0] * inner * item)
      return
    r0, c0 = offset
    n2 = spec.shape[1]
    for r in range(value.shape[0]):  # one contiguous run of a row per write
      os.pwrite(fd, np.ascontiguousarray(value[r]).tobytes(),
                self.offsets[k] + ((r0 + r) * n2 + c0) * inner * item)

  def read(self, k: int) -> np.ndarray:
    return np.load(self.names[k], mmap_mode="r")

  def sync(self) -> None:
    """Makes the written tiles durable before the ledger says they are done."""
    for fd in self.fds:
      os.fdatasync(fd)

  def close(self) -> None:
    for fd in self.fds:
      os.close(fd)
    self.fds = []


def _npy_header(shape, dtype) -> bytes:
  buffer = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      buffer, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
               "shape": tuple(shape)})
  return buffer.getvalue()


def _read_npy_header(name):
  try:
    array = np.load(name, mmap_mode="r")
  except (OSError, ValueError):
    return None
  return tuple(array.shape), array.dtype


class TileLedger:
  """The sidecar of a file output: which tiles are finished, so a killed run resumes.

  `<base>.tiles.json` records what the files hold (kernel size, tiling, a digest
  of the inputs); each process records its finished tiles in its own
  `<base>.tiles-p<k>.npy` (a boolean grid, replaced atomically), so processes
  never write the same file. A tile is recorded only after its data is synced.
  """

  def __init__(self, base: str, identity: dict, grid: tuple[int, int], process: int):
    self.meta = f"{base}.tiles.json"
    self.pattern = f"{base}.tiles-p*.npy"
    self.own = f"{base}.tiles-p{process}.npy"
    self.identity = identity
    self.done = np.zeros(grid, bool)
    self.mine = np.zeros(grid, bool)

  def load(self) -> bool:
    """Reads earlier progress; returns whether there is any (a resumed run)."""
    if os.path.exists(self.meta):
      with open(self.meta) as f:
        recorded = json.load(f)
      if recorded != self.identity:
        raise ValueError(
            f"im.batch: {self.meta} records another kernel ({recorded}), not this one "
            f"({self.identity}). Delete the output files and their .tiles files, or pass "
            "another path.")
      for name in glob.glob(self.pattern):
        flags = np.load(name)
        if flags.shape == self.done.shape:
          self.done |= flags
      self.mine |= _load_or_empty(self.own, self.done.shape)
    else:
      _atomic_write(self.meta, json.dumps(self.identity).encode())
    return bool(self.done.any())

  def mark(self, tile: Tile) -> None:
    self.mine[tile] = self.done[tile] = True

  def save(self) -> None:
    buffer = io.BytesIO()
    np.save(buffer, self.mine)
    _atomic_write(self.own, buffer.getvalue())


def _load_or_empty(name, shape):
  return np.load(name) if os.path.exists(name) else np.zeros(shape, bool)


def _atomic_write(name: str, data: bytes) -> None:
  tmp = f"{name}.{os.getpid()}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, name)
