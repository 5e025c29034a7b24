"""The `Kernel` object returned by `kernel_fn(x1, x2)` with `get=None`."""

from __future__ import annotations

import collections
import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Kernel:
  """Infinite-width kernels between two batches of inputs (NT's vocabulary).

  Attributes:
    nngp: (n1, n2) covariance of the network outputs (one output channel;
      output channels are i.i.d.).
    ntk: (n1, n2) neural tangent kernel.
    cov1: (n1,) output variance of each input of the first batch.
    cov2: (n2,) output variance of each input of the second batch.
    shape1: shape of the first input batch.
    shape2: shape of the second input batch.
    estimates: the steps of the computation that are estimated rather than
      exact (empty for an exact kernel), each with its method.
    error: a bound on the absolute error of the `nngp` and `ntk` entries from
      those steps (0 for an exact kernel).
  """
  nngp: jax.Array
  ntk: jax.Array
  cov1: jax.Array
  cov2: jax.Array
  shape1: tuple[int, ...] = dataclasses.field(metadata={"static": True})
  shape2: tuple[int, ...] = dataclasses.field(metadata={"static": True})
  estimates: tuple[Estimate, ...] = dataclasses.field(default=(), metadata={"static": True})
  error: jax.Array | float = 0.0

  @property
  def exact(self) -> bool:
    """Whether every step of the kernel is exact (no estimated expectation)."""
    return not self.estimates


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A step of a kernel computation that is estimated rather than exact.

  Attributes:
    where: the primitive and module path of the step.
    method: how it is estimated (e.g. "quasi-Monte Carlo, 4096 points, seed 0").
  """
  where: str
  method: str


class EstimatedKernelWarning(UserWarning):
  """A kernel with estimated steps was returned as bare arrays (`get=` a name or a tuple).

  A `Kernel` (`get=None`) carries its `estimates` and `error` bound; bare arrays
  cannot, so `KernelFn` warns once instead. Filter it with
  `warnings.filterwarnings("ignore", category=im.EstimatedKernelWarning)`.
  """


def estimated_kernel_message(estimates: tuple[Estimate, ...]) -> str:
  """The `EstimatedKernelWarning` text: which steps are estimated and where the bound is."""
  steps = "; ".join(f"{e.where} ({e.method})" for e in estimates)
  return (f"This kernel is estimated, not exact: {len(estimates)} step(s) have no exact closed "
          f"form: {steps}. The arrays returned for `get=` a name or a tuple do not carry the "
          "error bound: call with `get=None` for a `Kernel` whose `.error` bounds the absolute "
          "error of the nngp/ntk entries (`.estimates` names the steps); `KernelFn.estimates` "
          "lists them without a call. Warned once per kernel_fn.")


_GET_NAMES = ("nngp", "ntk", "cov1", "cov2")


def select(kernel: Kernel, get):
  """Implements the `get=` convention: str -> array, tuple -> namedtuple, None -> Kernel."""
  if get is None:
    return kernel
  if isinstance(get, str):
    _check_names((get,))
    return getattr(kernel, get)
  get = tuple(get)
  _check_names(get)
  return _namedtuple(get)(*(getattr(kernel, name) for name in get))


def _check_names(names):
  bad = [n for n in names if n not in _GET_NAMES]
  if bad or not names:
    raise ValueError(f"`get` must name some of {_GET_NAMES}, got {names}.")
  if len(set(names)) != len(names):
    raise ValueError(f"`get` names a kernel more than once: {names}; name each once.")


@__import__("functools").lru_cache(maxsize=None)
def _namedtuple(names):
  return collections.namedtuple("Kernels", names)
