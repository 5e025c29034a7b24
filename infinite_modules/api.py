"""`kernel_fn`: exact infinite-width NNGP/NTK of an unmodified model."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from infinite_modules import elementwise as ew
from infinite_modules import expectations, first_layer, logit_draws
from infinite_modules import moments as mo
from infinite_modules import rules as _rules  # noqa: F401  (registers the rules)
from infinite_modules.errors import InfiniteWidthError
from infinite_modules.interpreter import Interpreter, run_jaxpr
from infinite_modules.kernel import (
  Estimate,
  EstimatedKernelWarning,
  Kernel,
  estimated_kernel_message,
  select,
)
from infinite_modules.models import as_traceable
from infinite_modules.modules import intercept_registered_modules
from infinite_modules.moments import NeedFullLayout
from infinite_modules.priors import Prior
from infinite_modules.rules.gaussian_logits import MixtureError
from infinite_modules.values import Concrete, Field, ParamRef

_PARAMETERIZATIONS = ("ntk", "standard")
_INPUT_LAYERS = ("gaussian", "exact")


class KernelFn:
  """`kernel_fn(x1, x2=None, get=None)` for one model (see `kernel_fn`).

  Attributes:
    layout: "diagonal" if only same-position spatial covariances are tracked
      (conv stacks read out by flatten + dense), "full" if all pairs of
      positions are (pooling); chosen by a pass over the jaxpr.
    parameterization: "ntk" or "standard".
    estimates: the steps of the model's kernel that are estimated rather than exact
      (`Estimate`s: primitive and module path, method), found by the construction pass;
      empty for an exact kernel. Such a kernel's entries are E[...] of a step with no
      closed form (max pooling: Monte Carlo over the windows; 1/sqrt(head_dim) attention:
      Monte Carlo over the Gaussian logits; post-activation residual streams: pair-law
      quadrature), K_returned = K + e with |e| <= `Kernel.error` (from `get=None`).
    exact: `not estimates`: every step is computed exactly (up to rounding and the
      stated quadrature accuracy).

  A call with `get=` a name or a tuple returns bare arrays, which cannot carry the
  error bound: for a kernel with estimates the first such call warns
  (`EstimatedKernelWarning`, once per `KernelFn`); `get=None` returns a `Kernel` with
  its `estimates` and `error` and never warns.
  """

  def __init__(self, traceable, x_example, parameterization: str, points: int,
               input_layer: str = "gaussian"):
    self._traceable = traceable
    self.input_layer = input_layer
    self._feature_shape = tuple(np.shape(x_example)[1:])
    # Positions per input (spatial or sequence axes of (n, *S, C)): the pair moment arrays
    # have about n^2 * positions entries, which decides whether x2=None goes by blocks.
    self._positions = math.prod(self._feature_shape[:-1])
    self._example_size = int(np.shape(x_example)[0])
    self.parameterization = parameterization
    self._points = points
    flat_priors = jax.tree_util.tree_leaves(traceable.priors,
                                            is_leaf=lambda p: isinstance(p, Prior))
    self._priors = flat_priors
    self._paths = jax.tree_util.tree_leaves(traceable.paths)
    self._treedef = jax.tree_util.tree_structure(traceable.params)
    self._shapes = [np.shape(p) for p in jax.tree_util.tree_leaves(traceable.params)]
    self._compute = jax.jit(self._kernel, static_argnames=("full",))
    # The construction pass: interprets the model once (abstractly) to choose the
    # layout and to raise the errors of unsupported operations here, not at the first
    # call. It traces the kernel of x_example with itself (x2=None) through the same
    # jitted function the calls use, so its program is in jit's trace cache: a call
    # `kernel_fn(x, None)` with x shaped like x_example (jitted or not) is not
    # interpreted again, only compiled.
    # In the dtype a call converts x to (float64 data is float32 without jax_enable_x64).
    dtype = _input_dtype(jax.dtypes.canonicalize_dtype(x_example.dtype))
    example = jax.ShapeDtypeStruct(np.shape(x_example), dtype)
    try:
      traced = jax.eval_shape(functools.partial(self._compute, full=False), example, None)
      self.full = False
    except NeedFullLayout:
      traced = jax.eval_shape(functools.partial(self._compute, full=True), example, None)
      self.full = True
    # A `Kernel`'s estimates are static (part of its tree structure), so the abstract
    # result of the construction pass already holds them: no second interpretation.
    self.estimates: tuple[Estimate, ...] = traced.estimates
    self._warned_estimated = False

  @property
  def layout(self) -> str:
    return "full" if self.full else "diagonal"

  @property
  def exact(self) -> bool:
    """Whether every step of the kernel is exact (no estimated step; see `estimates`)."""
    return not self.estimates

  def _warn_estimated(self, estimates: tuple[Estimate, ...], stacklevel: int) -> None:
    """Warns (`EstimatedKernelWarning`) that bare arrays of an estimated kernel are
    returned, once per `KernelFn`: later calls (and a jitted call's retraces) stay quiet.
    `stacklevel` counts from the caller of this method, as in `warnings.warn`."""
    if not estimates or self._warned_estimated:
      return
    self._warned_estimated = True
    warnings.warn(estimated_kernel_message(estimates), EstimatedKernelWarning,
                  stacklevel=stacklevel + 1)

  def __call__(self, x1, x2=None, get: str | tuple[str, ...] | None = None):
    """Kernels between the batches `x1` (n1, ...) and `x2` (n2, ...) (`x2=None`: x1).

    Args:
      get: "nngp" or "ntk" (or "cov1", "cov2") for one array, a tuple of
        names for a namedtuple, None for a `Kernel` with all of them (and, for an
        estimated kernel, its `estimates` and `error` bound; bare arrays of an estimated
        kernel come with one `EstimatedKernelWarning` per `KernelFn`).
    """
    x1 = self._check_input(x1, "x1")
    if x2 is not None:
      x2 = self._check_input(x2, "x2")
      if x1.dtype != x2.dtype:
        raise ValueError(f"x1 and x2 have different dtypes {x1.dtype} and {x2.dtype}.")
    select(Kernel(0, 0, 0, 0, (), ()), get)  # validates `get` before any work
    # x2=None is its own (symmetric) problem: one input moment, correlation
    # exactly 1 on the diagonal, an exactly symmetric result.
    kernel = self._compute(x1, x2, full=self.full)
    if get is not None:
      # This call's own estimates (static on the result, under jit too), not only the
      # construction pass's.
      self._warn_estimated(kernel.estimates, stacklevel=2)
    return select(kernel, get)

  def _check_input(self, x, name):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
      # astype would drop the imaginary part silently: a kernel of other inputs.
      raise ValueError(f"{name} is complex ({x.dtype}); the kernels are of real inputs. Pass "
                       "the real and imaginary parts as features, e.g. "
                       "`jnp.concatenate([x.real, x.imag], -1)` (and a model that takes them).")
    x = x.astype(_input_dtype(x.dtype))
    if x.ndim != len(self._feature_shape) + 1 or tuple(x.shape[1:]) != self._feature_shape:
      raise ValueError(
          f"{name} has shape {tuple(x.shape)}, but the model was traced with inputs of shape "
          f"(batch, {', '.join(map(str, self._feature_shape))}) (from x_example).")
    if x.shape[0] == 0:
      raise ValueError(f"{name} is an empty batch.")
    if not isinstance(x, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(x))):
      raise ValueError(f"{name} contains NaN or infinite values.")
    return x

  @functools.lru_cache(maxsize=32)  # noqa: B019 (one cache per kernel_fn is intended)
  def _trace(self, n: int, x_dtype) -> Any:
    dtype = _float_dtype(x_dtype)
    params = jax.tree_util.tree_unflatten(
        self._treedef, [jax.ShapeDtypeStruct(s, dtype) for s in self._shapes])
    x = jax.ShapeDtypeStruct((n, *self._feature_shape), x_dtype)
    with intercept_registered_modules():
      return jax.make_jaxpr(self._traceable.apply)(params, x)

  def _probe_size(self, n: int) -> int:
    """The batch size of the probe trace for a first batch of n (see `interpreter`).

    Any size other than n tells the batch axes apart; the example's own size is
    traced at construction already, so a call at a new batch size traces the model
    once (at that size), not twice. The construction pass itself (n = the example
    size) probes at 2 n + 1.
    """
    return self._example_size if n != self._example_size else 2 * n + 1

  def _kernel(self, x1, x2, *, full: bool) -> Kernel:
    """The kernel between x1 and x2; x2=None: between x1 and itself."""
    if x2 is None and _symmetric_blocks(x1.shape[0], self._positions) > 1:
      try:
        return self._symmetric_kernel_by_blocks(x1, full=full)
      except MixtureError:
        pass  # the logit-draw path below pairs every input with every other
    same_batch = x2 is None
    x2 = x1 if same_batch else x2
    dtype = _float_dtype(x1.dtype)
    try:
      (nngp, ntk, var1, var2, mean1, mean2), interp = self._moments(
          x1, x2, full=full, same_batch=same_batch)
      error = jnp.asarray(interp.error, dtype)
      symmetric = interp.symmetric and not full
    except MixtureError:
      # A nonlinear step after 1/sqrt(head_dim) attention: average over logit draws.
      (nngp, ntk, var1, var2, mean1, mean2), interp, error = logit_draws.average(
          functools.partial(self._moments, full=full, same_batch=False), x1, x2, dtype)
      symmetric = False
    nngp, var1, var2 = _centered(nngp, var1, var2, mean1, mean2)
    if same_batch:
      if not symmetric:
        # Not symmetric by construction (a pooling sums the two positions of a
        # pair in different orders; a rule not known to be symmetric ran).
        nngp, ntk = _mirror(nngp), _mirror(ntk)
      var2 = var1
    return Kernel(nngp=nngp, ntk=ntk, cov1=var1, cov2=var2, shape1=tuple(x1.shape),
                  shape2=tuple(x2.shape), estimates=tuple(interp.estimates), error=error)

  def _symmetric_kernel_by_blocks(self, x, *, full: bool) -> Kernel:
    """x2=None as the B(B+1)/2 block pairs (I <= J) of B blocks of the batch.

    Entry (a, b) of every kernel depends on inputs a and b alone, so the
    lower blocks are the upper ones transposed: one vmapped program over the
    upper block pairs does (B+1)/(2B) of the work of all n^2 pairs. Pairs of
    an input with itself (in the diagonal blocks) keep their exact
    correlation 1 (`moments.same_point`), and the diagonal blocks are
    averaged with their transposes, so the kernel is exactly symmetric.
    """
    n = x.shape[0]
    blocks = _symmetric_blocks(n, self._positions)
    size = -(-n // blocks)
    pad = blocks * size - n  # < size <= n: filled with copies of real inputs
    padded = jnp.concatenate([x, x[:pad]]) if pad else x
    padded = padded.reshape((blocks, size) + x.shape[1:])
    first, second = np.triu_indices(blocks)
    dtype = _float_dtype(x.dtype)
    traced = {}

    def block_pair(xa, xb, diagonal):
      same = jnp.logical_and(diagonal, jnp.eye(size, dtype=bool))
      (nngp, ntk, var1, var2, mean1, mean2), interp = self._moments(
          xa, xb, full=full, same_batch=same)
      traced["interp"] = interp
      nngp, var1, _ = _centered(nngp, var1, var2, mean1, mean2)
      return nngp, ntk, var1, jnp.asarray(interp.error, dtype)

    nngp, ntk, var, error = jax.vmap(block_pair)(
        padded[first], padded[second], jnp.asarray(first == second))
    var = var[first == second].reshape(-1)[:n]
    interp = traced["interp"]
    return Kernel(nngp=mo.unfold_upper_blocks(nngp, blocks, n),
                  ntk=mo.unfold_upper_blocks(ntk, blocks, n), cov1=var, cov2=var,
                  shape1=tuple(x.shape), shape2=tuple(x.shape),
                  estimates=tuple(interp.estimates), error=jnp.max(error))

  def _moments(self, x1, x2, *, full: bool, same_batch, logit_draw=None):
    """Uncentered output moments (nngp, ntk, var1, var2, mean1, mean2) and the interpreter."""
    dtype = _float_dtype(x1.dtype)
    n1, n2 = x1.shape[0], x2.shape[0]
    j1, j2 = self._trace(n1, x1.dtype), self._trace(n2, x1.dtype)
    jp = self._trace(self._probe_size(n1), x1.dtype)
    invals = [ParamRef(i, path, prior, shape, tuple(range(len(shape))))
              for i, (path, prior, shape) in enumerate(zip(self._paths, self._priors, self._shapes))]
    x = Concrete(x1, x2, 0)
    invals.append(first_layer.ExactInput(x) if self.input_layer == "exact" else x)
    interp = Interpreter(full=full, parameterization=self.parameterization, n1=n1, n2=n2,
                         dtype=dtype, points=self._points, same_batch=same_batch,
                         logit_draw=logit_draw)
    outs = run_jaxpr(interp, j1.jaxpr, j2.jaxpr, jp.jaxpr, j1.consts, j2.consts, invals)
    if len(outs) != 1:
      raise InfiniteWidthError(f"The model returns {len(outs)} arrays; kernel_fn needs one output.")
    out = first_layer.at_output(outs[0])
    if not isinstance(out, Field):
      raise InfiniteWidthError(
          "The model's output does not depend on any parameter through an infinitely wide "
          "layer (it has no infinite-width kernel).")
    if any(isinstance(a, int) for atoms in out.axes for a in atoms):
      raise InfiniteWidthError(
          f"The model's output keeps spatial axes (layout {out.axes}); pool or flatten them and "
          "apply a Dense readout to get an (n1, n2) kernel.")
    try:
      root = ew.materialize(out.root, out.expr, full, self._points, same_batch)
    except ew.NotGaussianError:
      raise InfiniteWidthError("The output applies a nonlinearity to a non-Gaussian field.") from None
    moments = tuple(None if a is None else a.astype(dtype) for a in (
        root.nngp, root.ntk, root.var1, root.var2, root.mean1, root.mean2))
    return moments, interp


# x2=None by blocks (`KernelFn._symmetric_kernel_by_blocks`): at least this many
# inputs per block, so the per-input arrays each block pair recomputes (2 per
# block pair against its size^2 pair entries) stay a few percent of the work.
_MIN_BLOCK = 32
# ... and only from this many entries per pair moment array (n^2 input pairs times the
# input's positions). The blocked program is larger: a vmapped copy of every layer, with
# each block's single-input moments on its own, and the unfolding. On a 10-layer conv
# net of 64 inputs of 16x16x3 (2^20 entries) it took ~0.3 s more to trace and ~0.3 s
# more to compile (CPU) to save ~0.01 s per call; at 2^24 entries (e.g. 128 inputs of
# 32x32) a call's saving is of the order of that one-time cost.
_MIN_BLOCKED_ENTRIES = 2 ** 24
# (B+1)/(2B) of the pair work: 62.5% at 4 blocks. More blocks save little more,
# while each block pair copies its inputs ((B+1)/2 copies of the batch): measured
# (CPU, one thread) on an MLP of 1024 x 784 inputs, 2 / 4 / 8 blocks took 84% /
# 68% / 82% of the unblocked time; a conv net with 64 inputs of 16x16x3, 50%.
_MAX_BLOCKS = 4


def _centered(nngp, var1, var2, mean1, mean2):
  """Uncentered second moments made covariances (unchanged for zero-mean outputs)."""
  if mean1 is None:
    return nngp, var1, var2
  return nngp - mean1[:, None] * mean2[None, :], var1 - mean1 ** 2, var2 - mean2 ** 2


def _symmetric_blocks(n: int, positions: int = 1) -> int:
  """How many blocks an x2=None batch of n inputs with `positions` positions each (the
  spatial or sequence axes of an input (n, *S, C), 1 for (n, C)) is computed by (1: not
  blocked)."""
  if n * n * positions < _MIN_BLOCKED_ENTRIES:
    return 1
  return max(1, min(_MAX_BLOCKS, n // _MIN_BLOCK))


def _input_dtype(dtype):
  """Inputs are traced with their own dtype if integer (token ids for an embedding
  lookup, which Flax's nn.Embed insists on), else as floats."""
  if jnp.issubdtype(dtype, jnp.integer):
    return jnp.dtype(jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)
  return _float_dtype(dtype)


def _mirror(k):
  """(k + k^T) / 2: exactly symmetric (floating-point addition commutes).

  Only where the computation is not symmetric by construction
  (`Interpreter.symmetric`): the mean of the two triangles is exactly
  symmetric and no less accurate, but its transposed reads fuse into the last
  layer's work.
  """
  return (k + k.T) / 2


def _float_dtype(dtype):
  if jnp.issubdtype(dtype, jnp.floating):
    return jnp.dtype(dtype)
  return jnp.dtype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)


def kernel_fn(model, x_example, *, parameterization: str = "ntk",
              priors: Mapping[str, Any] | Any | None = None,
              apply_kwargs: Mapping[str, Any] | None = None,
              quadrature_points: int | None = expectations.QUADRATURE_POINTS,
              input_layer: str = "gaussian") -> KernelFn:
  """Exact infinite-width NNGP and NTK of an unmodified model.

  Traces `model` on inputs shaped like `x_example` and interprets its jaxpr
  with kernel transfer rules, giving the kernels of the network whose hidden
  widths are taken to infinity with the priors its initializers define.

  Args:
    model: a `flax.linen.Module`, a `haiku.Transformed`/`TransformedWithState`,
      a `flax.nnx.Module` (with `priors`), or `(apply_fn, params)` (with
      `priors`).
    x_example: an example batch; fixes the input feature shape.
    parameterization: "ntk" (Neural Tangents' default: each parameter
      trained as `mean + std * omega` in omega) or "standard" (the model
      exactly as written, trained in its own parameters, at its traced
      widths).
    priors: overrides `{param path: Prior or initializer}` (or a pytree of
      `Prior` values matching the params) for parameters whose initializer is not
      known exactly.
    apply_kwargs: extra keyword arguments for every model call (e.g.
      `{"train": False}`).
    quadrature_points: None (default): smooth elementwise functions without a
      closed form are integrated by `expectations.smooth_rule` (1e-10 relative in
      float64, ~1e-6 in float32, for variances 1e-4..1e2); an int n >= 2: n-point
      Gauss-Hermite per dimension instead (cheaper, accurate only for small
      variances: 48 points are 4e-6 off for tanh at variance 1).
    input_layer: "gaussian" (default, Neural Tangents' convention): every weight is
      Gaussian with its initializer's variance. "exact": the pre-activations of a Dense
      first layer (fan-in plus random bias <= 6) have the exact law of the initializers
      (truncated normal, uniform, normal), so E[phi(u) phi(v)] and E[phi'(u) phi'(v)]
      of its nonlinearity are those of the model as initialized (`first_layer`);
      the layers after it are Gaussian at infinite width either way.

  Returns:
    A `KernelFn`: `kernel_fn(x1, x2=None, get=None)`; `get` a string gives an
    (n1, n2) array, a tuple a namedtuple, None a `Kernel`.

  Raises:
    InfiniteWidthError: the model has an operation without an exact rule
      (the message names the primitive and module path).
    PriorError: a parameter's initializer is not known exactly.
  """
  if parameterization not in _PARAMETERIZATIONS:
    raise ValueError(f"parameterization must be one of {_PARAMETERIZATIONS}, "
                     f"got {parameterization!r}.")
  if quadrature_points is not None and (isinstance(quadrature_points, bool)
                                        or not isinstance(quadrature_points, int)
                                        or quadrature_points < 2):
    raise ValueError("quadrature_points must be None (the rule of stated accuracy) or an "
                     f"int >= 2 (Gauss-Hermite points), got {quadrature_points!r}.")
  if input_layer not in _INPUT_LAYERS:
    raise ValueError(f"input_layer must be one of {_INPUT_LAYERS}, got {input_layer!r}.")
  x_example = np.asarray(x_example) if not isinstance(x_example, jax.Array) else x_example
  if np.ndim(x_example) < 1 or np.shape(x_example)[0] < 1:
    raise ValueError("x_example must be a batch of at least one input, shape (n, ...).")
  # numpy as given: the model is only traced on it (a device copy would compile a program).
  traceable = as_traceable(model, x_example, priors=priors, apply_kwargs=apply_kwargs)
  return KernelFn(traceable, x_example, parameterization, quadrature_points, input_layer)
