"""``implementation="auto"``: pick the fastest NTK implementation for given shapes.

NT's ``AUTO`` compares the FLOPs that XLA reports for the compiled candidates and is
documented to be wrong on CPU and GPU. Two things go wrong there: backend-optimized HLO
can hide FLOPs inside library calls (oneDNN / Eigen on CPU, cuBLAS / cuDNN custom calls
on GPU), and FLOPs alone ignore that Jacobian contraction is bound by memory traffic (it
streams ``N * O * P`` Jacobian entries). Here:

1. every candidate is lowered for the call's shapes (no execution); its *unoptimized*
   HLO gives platform-independent FLOPs (every dot and convolution counted) and an
   upper bound on the bytes it moves (before fusion, every intermediate is written and
   read once);
2. candidates that are far behind even in the most favourable case (their FLOPs alone,
   ``flops / F``, exceed :data:`PRUNE_WITHIN` times the best upper bound
   ``flops / F + bytes_unfused / B``) are dropped without being compiled: compiling Jacobian contraction for a ResNet costs seconds and
   gigabytes, and it cannot win where its FLOPs are 300x those of structured
   derivatives;
3. the remaining candidates are compiled; the cost is
   ``max(flops_hlo, flops_compiled) / F + bytes / B`` with the bytes accessed of the
   *compiled* HLO (after fusion) and ``F`` / ``B`` a sustained throughput / bandwidth
   for the backend (:data:`THROUGHPUT`);
4. candidates whose compiled temporary memory does not fit in the device are skipped;
5. when the two best estimates are within :data:`MEASURE_WITHIN` of each other, the
   close candidates are run (on the call's arrays, or on stand-in arrays of the same
   shapes while tracing; interleaved for :data:`MEASURE_ROUNDS` rounds, minimum per
   candidate) and the fastest wins, so near-ties are settled by measurement rather
   than by the model;
6. the choice is cached per shapes, dtypes, static keyword arguments and backend, and
   the dispatcher is itself a ``jax.jit`` function, so later calls cost what the chosen
   implementation costs.

Why the same rule holds on CPU and GPU. The model only has to rank candidates whose
costs differ by more than :data:`MEASURE_WITHIN`; closer ones are timed. On CPU
(measured, README "Performance") the ranking is decided by FLOPs: structured
derivatives need ``N O`` activation backward passes plus per-layer Gram or weight-
Jacobian products, Jacobian contraction the same backward passes plus the
``(N O)^2 P`` product, NTK-vector products ``N`` times more backward passes; the
2-core machine sustains ~8 GFLOP/s per core on these kernels and ~8 GB/s. On a GPU
(no GPU was available to measure this rule) the ratios of FLOPs between the candidates
are the same numbers, since they are computed from the same unoptimized HLO, and
the GPU entries of :data:`THROUGHPUT` (20 TFLOP/s, 1.5 TB/s, an A100/H100-class
sustained rate with float32 matmuls) shift the balance towards the bytes term:
``F / B`` is ~13 FLOP/byte on a GPU vs ~2 on the CPU, so a candidate that streams a
large Jacobian (Jacobian contraction: ``N O P`` entries written and read) is charged
relatively more there, as it should be on a bandwidth-bound device. Where that
estimate is within 2x of structured derivatives, the timing step decides, exactly
as on CPU; the choice never depends on the compiled GPU FLOP count, which omits
cuBLAS/cuDNN custom calls.

The selection happens when the dispatcher is traced, so it works the same inside an
outer ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from interop._layout import hashable as _hashable
from interop._layout import is_traced as _is_traced
from interop._layout import jit as layout_jit
from interop._layout import merge_kwargs as _merge_kwargs
from interop._layout import partition_kwargs as _partition_kwargs

PyTree = Any

__all__ = ["MEASURE_ROUNDS", "MEASURE_WITHIN", "PRUNE_WITHIN", "THROUGHPUT", "Bounds", "Estimate", "auto_ntk_fn",
           "bounds", "worth_compiling"]

#: Sustained (FLOP/s, bytes/s) per backend platform for the cost model.
THROUGHPUT: dict[str, tuple[float, float]] = {
    "cpu": (8e9 * max(1, os.cpu_count() or 1), 8e9),
    "gpu": (2.0e13, 1.5e12),
    "cuda": (2.0e13, 1.5e12),
    "rocm": (2.0e13, 1.5e12),
    "tpu": (1.0e14, 1.0e12),
}

#: Estimates within this factor are settled by timing (when not tracing).
MEASURE_WITHIN = 2.0


@dataclasses.dataclass
class Estimate:
  """Cost-model inputs and result for one candidate."""

  implementation: Any
  flops: float
  bytes: float
  temp_bytes: float
  seconds: float
  compiled: Any = None
  measured: float | None = None


def _abstract(tree: PyTree) -> PyTree:
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jax.dtypes.result_type(x))
      if isinstance(x, (jax.Array, np.ndarray, np.generic)) else x, tree)


def _device_memory() -> float:
  dev = jax.devices()[0]
  try:
    stats = dev.memory_stats()
  except Exception:  # noqa: BLE001 - backends without memory stats
    stats = None
  if stats and "bytes_limit" in stats:
    return float(stats["bytes_limit"])
  try:
    return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
  except (ValueError, OSError, AttributeError):  # pragma: no cover
    return float("inf")


def _cost(d: Any) -> dict:
  if isinstance(d, (list, tuple)):
    d = d[0] if d else {}
  return d or {}


@dataclasses.dataclass
class Bounds:
  """Cost bounds of one lowered (not yet compiled) candidate, in seconds:
  ``lower = flops / F`` (no memory traffic at all) and ``upper = flops / F +
  bytes_unfused / B`` (every intermediate written and read once)."""

  implementation: Any
  lowered: Any
  lower: float
  upper: float


def bounds(impl: Any, fn: Callable, args: tuple, platform: str) -> Bounds:
  """Lowers ``fn(*args)`` (no compilation) and returns its :class:`Bounds`."""
  lowered = layout_jit(fn).lower(*args)
  pre = _cost(lowered.cost_analysis())
  f, b = THROUGHPUT.get(platform, THROUGHPUT["gpu"])
  flops = float(pre.get("flops", 0.0))
  return Bounds(impl, lowered, flops / f, flops / f + float(pre.get("bytes accessed", 0.0)) / b)


#: A lowered candidate whose lower bound exceeds this many times the best upper bound is
#: not compiled. It is :data:`MEASURE_WITHIN` (the window in which candidates are
#: timed) times 2, a margin for the bounds themselves: the compiled HLO may count more
#: FLOPs (expanded ops) or bytes (layout copies) than the unoptimized one.
PRUNE_WITHIN = 2 * MEASURE_WITHIN


def worth_compiling(candidates: list[Bounds]) -> list[Bounds]:
  """The candidates that may be competitive: those whose lower bound is at most
  :data:`PRUNE_WITHIN` times the smallest upper bound."""
  best_upper = min(c.upper for c in candidates)
  return [c for c in candidates if c.lower <= PRUNE_WITHIN * best_upper]


def estimate(impl: Any, fn: Callable | None, args: tuple, platform: str,
             lowered: Any = None) -> Estimate:
  """Compiles ``fn(*args)`` (or the given ``lowered``) and returns its cost-model
  estimate (no execution)."""
  if lowered is None:
    lowered = layout_jit(fn).lower(*args)
  compiled = lowered.compile()
  pre, post = _cost(lowered.cost_analysis()), _cost(compiled.cost_analysis())
  flops = max(float(pre.get("flops", 0.0)), float(post.get("flops", 0.0)))
  nbytes = float(post.get("bytes accessed", pre.get("bytes accessed", 0.0)))
  try:
    temp = float(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # noqa: BLE001
    temp = 0.0
  f, b = THROUGHPUT.get(platform, THROUGHPUT["gpu"])
  return Estimate(impl, flops, nbytes, temp, flops / f + nbytes / b, compiled)


#: Timing rounds for near-ties; each round runs every close candidate once.
MEASURE_ROUNDS = 3


def _time_round_robin(estimates: list[Estimate], args: tuple,
                      rounds: int = MEASURE_ROUNDS) -> None:
  """Sets ``e.measured`` to the minimum wall time of ``e.compiled(*args)`` for each
  estimate, after one warm-up call each. The candidates are interleaved round by round,
  so that a load change on a shared machine affects all of them alike instead of
  favouring whichever happened to be timed in a quiet moment."""
  for e in estimates:
    jax.block_until_ready(e.compiled(*args))
    e.measured = float("inf")
  for _ in range(rounds):
    for e in estimates:
      t = time.perf_counter()
      jax.block_until_ready(e.compiled(*args))
      e.measured = min(e.measured, time.perf_counter() - t)


def _stand_in(tree: PyTree) -> PyTree | None:
  """Concrete arrays with the shapes and dtypes of ``tree`` (for timing while tracing)."""
  key = jax.random.PRNGKey(0)
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  out = []
  for x in leaves:
    shape, dtype = np.shape(x), jax.dtypes.result_type(x)
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      return None
    if jax.dtypes.issubdtype(dtype, np.floating):
      key, sub = jax.random.split(key)
      out.append(jax.random.normal(sub, shape, dtype))
    else:
      out.append(np.zeros(shape, dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


class _AutoNtk:
  """Callable ``ntk_fn(x1, x2, variables, **kwargs)`` dispatching to the chosen candidate.

  Attributes:
    cache: ``{signature: implementation}`` of the choices made so far.
    last_estimates: the :class:`Estimate` list of the latest selection (compiled
      candidates only).
    last_pruned: the implementations the latest selection dropped before compiling
      (see :func:`worth_compiling`).
  """

  def __init__(self, candidates: Mapping[Any, Callable[..., PyTree]]):
    self.candidates = dict(candidates)
    self.cache: dict[Any, Any] = {}
    self.last_estimates: list[Estimate] = []
    self.last_pruned: list[Any] = []
    self._dispatch: dict[Any, Callable] = {}

  def _key(self, x1: PyTree, x2: PyTree, variables: Any, dyn: list, treedef: Any,
           static: tuple) -> Any:
    def sig(tree: PyTree) -> Any:
      leaves, td = jax.tree_util.tree_flatten(tree)
      return td, tuple((np.shape(x), str(jax.dtypes.result_type(x))) if hasattr(x, "shape")
                       else _hashable(x) for x in leaves)
    return (sig(x1), sig(x2), sig(variables), sig(dyn), treedef,
            tuple(_hashable(s) for s in static), jax.default_backend())

  def choose(self, x1: PyTree, x2: PyTree, variables: Any, kwargs: Mapping[str, Any]
             ) -> Any:
    """Returns the implementation ``auto`` uses for these arguments."""
    dyn, treedef, static = _partition_kwargs(kwargs)
    return self._select(x1, x2, variables, dyn, treedef, static)

  def _select(self, x1: PyTree, x2: PyTree, variables: Any, dyn: list, treedef: Any,
              static: tuple) -> Any:
    key = self._key(x1, x2, variables, dyn, treedef, static)
    if key in self.cache:
      return self.cache[key]
    platform = jax.default_backend()
    args = (x1, x2, variables, dyn)
    abstract = _abstract(args) if not _is_traced(args) else jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype) if hasattr(x, "dtype") else x,
        args)
    lowered, errors = [], []
    for impl, cand in self.candidates.items():
      def fn(a: PyTree, b: PyTree, v: Any, d: list, cand: Callable = cand) -> PyTree:
        return cand(a, b, v, **_merge_kwargs(d, treedef, static))
      try:
        lowered.append(bounds(impl, fn, abstract, platform))
      except Exception as err:  # noqa: BLE001 - a candidate that cannot run is skipped
        errors.append(err)
    if not lowered:
      raise errors[0]
    kept = worth_compiling(lowered)
    self.last_pruned = [c.implementation for c in lowered if c not in kept]
    estimates = []
    for c in kept:
      try:
        estimates.append(estimate(c.implementation, None, abstract, platform, c.lowered))
      except Exception as err:  # noqa: BLE001 - e.g. out of memory while compiling
        errors.append(err)
    if not estimates:
      raise errors[0]
    limit = 0.8 * _device_memory()
    fitting = [e for e in estimates if e.temp_bytes <= limit] or [
        min(estimates, key=lambda e: e.temp_bytes)]
    fitting.sort(key=lambda e: e.seconds)
    best = fitting[0]
    close = [e for e in fitting if e.seconds <= MEASURE_WITHIN * best.seconds]
    if len(close) > 1:
      with jax.ensure_compile_time_eval():  # run eagerly even while being traced
        concrete = args if not _is_traced(args) else _stand_in(abstract)
        if concrete is not None:
          _time_round_robin(close, concrete)
          best = min(close, key=lambda e: e.measured)
    for e in estimates:
      e.compiled = None  # executables are not kept; the dispatcher compiles the winner
    self.last_estimates = estimates
    self.cache[key] = best.implementation
    return best.implementation

  def __call__(self, x1: PyTree, x2: PyTree | None, variables: Any, **kwargs: Any) -> PyTree:
    dyn, treedef, static = _partition_kwargs(kwargs)

    def dispatch(x1: PyTree, x2: PyTree | None, variables: Any, dyn: list) -> PyTree:
      impl = self._select(x1, x2, variables, dyn, treedef, static)
      return self.candidates[impl](x1, x2, variables, **_merge_kwargs(dyn, treedef, static))

    if _is_traced((x1, x2, variables, dyn)):  # inside an outer transformation
      return dispatch(x1, x2, variables, dyn)
    skey = (treedef, _hashable(static))
    if skey not in self._dispatch:
      self._dispatch[skey] = layout_jit(dispatch)
    return self._dispatch[skey](x1, x2, variables, dyn)


def auto_ntk_fn(candidates: Mapping[Any, Callable[..., PyTree]]) -> _AutoNtk:
  """Wraps NTK candidates ``{implementation: ntk_fn}`` into the ``auto`` dispatcher."""
  return _AutoNtk(candidates)
