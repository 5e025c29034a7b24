"""Monte Carlo NNGP / NTK: empirical kernels averaged over random initializations.

.. math::

   \\hat K(x_1, x_2) = \\frac{1}{S} \\sum_{s=1}^{S} f_{\\theta_s}(x_1) f_{\\theta_s}(x_2)^T,
   \\qquad
   \\hat\\Theta(x_1, x_2) = \\frac{1}{S} \\sum_{s=1}^{S}
   \\sum_\\theta w_\\theta\\, J_{\\theta_s}(x_1) J_{\\theta_s}(x_2)^T,
   \\qquad \\theta_s \\sim \\text{init}.

This is the estimator of the infinite-width kernels for architectures without an exact
rule (max-pooling, attention with softmax, BatchNorm with batch statistics, ...): as the
width grows, ``E[hat K]`` and ``E[hat Theta]`` converge to the NNGP and NTK, and the
estimator's error is ``O(1 / sqrt(S))``.

``parameterization="standard"`` uses the model exactly as written (``w_theta = 1``).
``parameterization="ntk"`` reparameterizes every trainable leaf as
``theta = mu_theta + sigma_theta * omega`` with ``omega`` of unit variance (NT's NTK
parameterization); then ``w_theta = sigma_theta^2``, the per-entry variance of the
leaf's initializer (a constant-initialized leaf such as a zero bias gets ``w = 0``).
Pass the variances as ``leaf_variances`` if you know them; otherwise they are
estimated from pilot initializations, drawn until every leaf has
:data:`PILOT_DRAWS` entries (at most :data:`PILOT_MAX_INITS` initializations), which
bounds the relative error of each estimate by about ``sqrt(2 / PILOT_DRAWS)``. The
NNGP does not depend on the parameterization.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from interop._layout import Axes, VMapAxes
from interop._layout import jit as layout_jit
from interop._layout import merge_kwargs as _merge_kwargs
from interop._layout import partition_kwargs as _partition_kwargs
from interop.adapters import adapt
from interop.empirical import (
  AUTO_VMAP_AXES,
  NtkImplementation,
  _canonicalize_get,
  _kernel_tuple,
  canonicalize_implementation,
  empirical_nngp_fn,
  empirical_ntk_fn,
)

PyTree = Any

__all__ = ["PILOT_DRAWS", "PILOT_MAX_INITS", "monte_carlo_kernel_fn"]

#: Entries per leaf used to estimate its initializer variance (``parameterization="ntk"``).
PILOT_DRAWS = 1 << 17
#: Upper bound on the pilot initializations.
PILOT_MAX_INITS = 4096
_PILOT_CHUNK = 64


def _leaf_variances(init: Callable, split: Callable, key: jax.Array, x_example: Any
                    ) -> list[jax.Array]:
  """Per-leaf variance of the initializer, pooled over entries and pilot draws."""
  shapes = jax.eval_shape(lambda k: split(init(k, x_example))[0], key)
  sizes = [max(1, int(np.prod(s.shape))) for s in jax.tree_util.tree_leaves(shapes)]
  n_inits = int(min(PILOT_MAX_INITS, max(_PILOT_CHUNK, -(-PILOT_DRAWS // min(sizes)))))
  n_inits = -(-n_inits // _PILOT_CHUNK) * _PILOT_CHUNK

  @jax.jit
  def moments(keys: jax.Array) -> tuple[list, list]:
    params = jax.vmap(lambda k: split(init(k, x_example))[0])(keys)
    leaves = jax.tree_util.tree_leaves(params)
    return [jnp.sum(p) for p in leaves], [jnp.sum(jnp.square(p)) for p in leaves]

  s1 = s2 = None
  for keys in jnp.split(jax.random.split(key, n_inits), n_inits // _PILOT_CHUNK):
    a, b = moments(keys)
    s1 = a if s1 is None else [x + y for x, y in zip(s1, a)]
    s2 = b if s2 is None else [x + y for x, y in zip(s2, b)]
  counts = [size * n_inits for size in sizes]
  return [jnp.maximum(q / n - (p / n) ** 2, 0.0) for p, q, n in zip(s1, s2, counts)]


def _blocks(n: int, batch_size: int) -> list[tuple[int, int]]:
  if batch_size <= 0 or batch_size >= n:
    return [(0, n)]
  return [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _slice(x: PyTree, lo: int, hi: int) -> PyTree:
  return jax.tree_util.tree_map(lambda a: a[lo:hi], x)


def monte_carlo_kernel_fn(
    model: Any,
    x_example: Any,
    n_samples: int,
    batch_size: int = 0,
    key: jax.Array | None = None,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: VMapAxes = AUTO_VMAP_AXES,
    implementation: str | int | NtkImplementation = "auto",
    parameterization: str = "standard",
    sample_batch_size: int = 1,
    progress: bool = True,
    leaf_variances: PyTree | None = None,
) -> Callable[..., Any]:
  """Returns ``kernel_fn(x1, x2=None, get=None, **apply_fn_kwargs)``: Monte Carlo kernels.

  Args:
    model: anything :func:`interop.adapters.adapt` accepts that can be re-initialized:
      a Flax linen module, a Haiku transform, an ``(init_fn, apply_fn)`` pair with
      ``init_fn(key, x) -> params``, or :func:`interop.adapters.nnx_factory`.
    x_example: input used to initialize the model (its values do not matter).
    n_samples: number of random initializations ``S``.
    batch_size: if positive, ``x1`` and ``x2`` are processed in blocks of this many
      examples along axis 0 (NT's ``batch_size``); the kernel's leading axes must be
      the example axes (axis 0 of ``f(x)`` not traced).
    key: PRNG key for the initializations (default ``PRNGKey(0)``).
    trace_axes, diagonal_axes, vmap_axes, implementation: as in
      :func:`interop.empirical_ntk_fn`.
    parameterization: ``"standard"`` (the model as written) or ``"ntk"`` (see module
      docstring).
    sample_batch_size: initializations evaluated together (``jax.vmap``) per step.
    progress: show a ``tqdm`` progress bar over the samples.
    leaf_variances: for ``parameterization="ntk"``, the per-entry initializer variance
      of every trainable leaf (a pytree like the trainable params, scalars), instead of
      estimating them.

  Returns:
    ``kernel_fn(x1, x2=None, get=None, **apply_fn_kwargs)``; ``get`` as in
    :func:`interop.empirical_kernel_fn` (``None`` returns both as a namedtuple).
  """
  adapter = adapt(model)
  if adapter.init is None:
    raise TypeError(
        f"Monte Carlo kernels need to re-initialize the model, but a {adapter.name} "
        "adapter has no `init`. Pass a Flax linen module, a Haiku transform, an "
        "(init_fn, apply_fn) pair, or interop.adapters.nnx_factory(make_model).")
  if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) \
      or n_samples < 1:
    raise ValueError(f"`n_samples` must be a positive int, got {n_samples!r}.")
  if parameterization not in ("standard", "ntk"):
    raise ValueError(
        f"`parameterization` must be 'standard' or 'ntk', got {parameterization!r}.")
  canonicalize_implementation(implementation)
  sample_batch_size = max(1, min(int(sample_batch_size), int(n_samples)))
  key = jax.random.PRNGKey(0) if key is None else key
  key, pilot_key = jax.random.split(key)
  keys = jax.random.split(key, n_samples)
  init, split = adapter.init, adapter.split

  ntk_fn = empirical_ntk_fn(adapter, trace_axes, diagonal_axes, vmap_axes, implementation)
  nngp_fn = empirical_nngp_fn(adapter, trace_axes, diagonal_axes)
  weights_cache: list[list[jax.Array] | None] = []

  def leaf_weights() -> list[jax.Array] | None:
    if parameterization == "standard":
      return None
    if not weights_cache:
      if leaf_variances is not None:
        weights_cache.append([jnp.asarray(v) for v in
                              jax.tree_util.tree_leaves(leaf_variances)])
      else:
        weights_cache.append(_leaf_variances(init, split, pilot_key, x_example))
    return weights_cache[0]

  step_cache: dict[Any, Callable] = {}

  def make_step(names: tuple[str, ...], treedef: Any, static: tuple, x2_none: bool
                ) -> Callable:
    def one(k: jax.Array, x1: Any, x2: Any, dyn: list, w: Any) -> dict[str, PyTree]:
      variables = init(k, x_example)
      kw = _merge_kwargs(dyn, treedef, static)
      out = {}
      if "nngp" in names:
        out["nngp"] = nngp_fn(x1, x2, variables, **kw)
      if "ntk" in names:
        extra = {} if w is None else {"_leaf_weights": w}
        out["ntk"] = ntk_fn(x1, x2, variables, **extra, **kw)
      return out

    def step(ks: jax.Array, x1: Any, x2: Any, dyn: list, w: Any) -> dict[str, PyTree]:
      outs = jax.vmap(one, in_axes=(0, None, None, None, None))(ks, x1, x2, dyn, w)
      return jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), outs)

    del x2_none
    return layout_jit(step)

  def estimate(x1: Any, x2: Any, names: tuple[str, ...], kwargs: dict, desc: str
               ) -> dict[str, PyTree]:
    dyn, treedef, static = _partition_kwargs(kwargs)
    ck = (names, treedef, tuple(repr(s) for s in static), x2 is None)
    if ck not in step_cache:
      step_cache[ck] = make_step(names, treedef, static, x2 is None)
    step = step_cache[ck]
    w = leaf_weights()
    total = None
    bar = None
    if progress:
      from tqdm.auto import tqdm
      bar = tqdm(total=n_samples, desc=desc, leave=False)
    for lo in range(0, n_samples, sample_batch_size):
      ks = keys[lo:lo + sample_batch_size]
      part = step(ks, x1, x2, dyn, w)
      total = part if total is None else jax.tree_util.tree_map(jnp.add, total, part)
      if bar is not None:
        bar.update(len(ks))
    if bar is not None:
      bar.close()
    return jax.tree_util.tree_map(lambda a: a / n_samples, total)

  def kernel_fn(x1: Any, x2: Any = None, get: None | str | Sequence[str] = None,
                **apply_fn_kwargs: Any) -> Any:
    names, single = _canonicalize_get(get)
    n1 = jax.tree_util.tree_leaves(x1)[0].shape[0]
    diag_batch = 0 in _batch_diag_axes(diagonal_axes)
    if batch_size and batch_size > 0 and (n1 > batch_size or (
        x2 is not None and jax.tree_util.tree_leaves(x2)[0].shape[0] > batch_size)):
      if x2 is None and not diag_batch:
        x2_full = x1
      else:
        x2_full = x2
      result = _blocked(estimate, x1, x2_full, x2 is None, names, apply_fn_kwargs,
                        batch_size, diag_batch)
    else:
      result = estimate(x1, x2, names, apply_fn_kwargs, "MC kernel")
    if single:
      return result[names[0]]
    cls = _kernel_tuple(names)
    return jax.tree_util.tree_map(lambda *v: cls(*v), *(result[g] for g in names))

  return kernel_fn


def _batch_diag_axes(diagonal_axes: Axes) -> tuple[int, ...]:
  if isinstance(diagonal_axes, int):
    return (diagonal_axes,)
  return tuple(diagonal_axes)


def _blocked(estimate: Callable, x1: Any, x2: Any, symmetric: bool, names: tuple[str, ...],
             kwargs: dict, batch_size: int, diag_batch: bool) -> dict[str, PyTree]:
  """Assembles the kernel from blocks of ``batch_size`` examples of ``x1`` and ``x2``."""
  n1 = jax.tree_util.tree_leaves(x1)[0].shape[0]
  b1 = _blocks(n1, batch_size)
  if diag_batch:
    if x2 is not None:
      raise ValueError("With diagonal_axes containing the batch axis, x2 must be None.")
    parts = [estimate(_slice(x1, lo, hi), None, names, kwargs, f"MC block {i + 1}/{len(b1)}")
             for i, (lo, hi) in enumerate(b1)]
    return jax.tree_util.tree_map(lambda *ps: jnp.concatenate(ps, axis=0), *parts)
  n2 = jax.tree_util.tree_leaves(x2)[0].shape[0]
  b2 = _blocks(n2, batch_size)
  rows = []
  count = 0
  for i, (lo1, hi1) in enumerate(b1):
    row = []
    for j, (lo2, hi2) in enumerate(b2):
      count += 1
      same = symmetric and i == j
      row.append(estimate(_slice(x1, lo1, hi1), None if same else _slice(x2, lo2, hi2),
                          names, kwargs, f"MC block {count}/{len(b1) * len(b2)}"))
    rows.append(jax.tree_util.tree_map(lambda *ps: jnp.concatenate(ps, axis=1), *row))
  return jax.tree_util.tree_map(lambda *ps: jnp.concatenate(ps, axis=0), *rows)
