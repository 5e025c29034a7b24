"""``implementation="auto"``: pick the fastest NTK implementation for given shapes.

NT's ``AUTO`` compares the FLOPs that XLA reports for the compiled candidates and is
documented to be wrong on CPU and GPU. Two things go wrong there: backend-optimized HLO
can hide FLOPs inside library calls, and FLOPs alone ignore that Jacobian contraction is
bound by memory traffic (it streams ``N * O * P`` Jacobian entries). Here:

1. every candidate is lowered and compiled for the call's shapes (no execution);
2. its cost is ``max(flops_hlo, flops_compiled) / F + bytes / B`` with the FLOPs of the
   *unoptimized* HLO (platform independent, counts every dot and convolution), the
   bytes accessed of the *compiled* HLO (after fusion), and ``F`` / ``B`` a sustained
   throughput / bandwidth for the backend (:data:`THROUGHPUT`);
3. candidates whose compiled temporary memory does not fit in the device are skipped;
4. when the two best estimates are within :data:`MEASURE_WITHIN` of each other, the
   close candidates are run (on the call's arrays, or on stand-in arrays of the same
   shapes while tracing; interleaved for :data:`MEASURE_ROUNDS` rounds, minimum per
   candidate) and the fastest wins, so near-ties are settled by measurement rather
   than by the model;
5. the choice is cached per shapes, dtypes and static keyword arguments, and the
   dispatcher is itself a ``jax.jit`` function, so later calls cost what the chosen
   implementation costs.

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

__all__ = ["MEASURE_ROUNDS", "MEASURE_WITHIN", "THROUGHPUT", "Estimate", "auto_ntk_fn"]

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


def estimate(impl: Any, fn: Callable, args: tuple, platform: str) -> Estimate:
  """Compiles ``fn(*args)`` and returns its cost-model estimate (no execution)."""
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
    last_estimates: the :class:`Estimate` list of the latest selection.
  """

  def __init__(self, candidates: Mapping[Any, Callable[..., PyTree]]):
    self.candidates = dict(candidates)
    self.cache: dict[Any, Any] = {}
    self.last_estimates: list[Estimate] = []
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
    estimates, errors = [], []
    for impl, cand in self.candidates.items():
      def fn(a: PyTree, b: PyTree, v: Any, d: list, cand: Callable = cand) -> PyTree:
        return cand(a, b, v, **_merge_kwargs(d, treedef, static))
      try:
        estimates.append(estimate(impl, fn, abstract, platform))
      except Exception as err:  # noqa: BLE001 - a candidate that cannot run is skipped
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
