"""Model adapters for the infinite-width side: one place for Flax/Haiku specifics.

`as_traceable(model, x_example)` turns a Flax linen module, a Haiku transform,
a Flax NNX module or a pair `(apply_fn, params)` into a `Traceable`: a pure
`apply(params, x)`, example params, and the exact `Prior` of every param leaf
(read from the initializer that created it).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from infinite_modules.errors import InfiniteWidthError, PriorError
from infinite_modules.priors import Prior, prior_from_initializer

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Traceable:
  """A model reduced to what the kernel interpreter needs.

  Attributes:
    apply: `apply(params, x) -> y`, pure.
    params: the trainable params (a pytree of arrays).
    priors: a pytree with the structure of `params` whose leaves are `Prior`s.
    paths: a pytree with the structure of `params` of '/'-joined leaf names.
  """
  apply: Callable[[PyTree, jax.Array], jax.Array]
  params: PyTree
  priors: PyTree
  paths: PyTree


def _path_name(path) -> str:
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _leaf_paths(params: PyTree) -> PyTree:
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  return jax.tree_util.tree_unflatten(treedef, [_path_name(p) for p, _ in flat])


def _resolve_priors(params: PyTree, recorded: Mapping[str, Any], overrides, what: str) -> PyTree:
  """Builds the prior tree: explicit overrides first, then recorded initializers."""
  paths = _leaf_paths(params)
  override_map: dict[str, Any] = {}
  if overrides is not None:
    if isinstance(overrides, Mapping) and all(isinstance(k, str) for k in overrides):
      override_map = dict(overrides)
    else:
      flat_o = jax.tree_util.tree_leaves(overrides, is_leaf=lambda v: isinstance(v, Prior))
      flat_p = jax.tree_util.tree_leaves(paths)
      if len(flat_o) != len(flat_p):
        raise PriorError("`priors` must be a dict {param path: Prior} or a pytree matching params.")
      override_map = dict(zip(flat_p, flat_o))
    unknown = set(override_map) - set(jax.tree_util.tree_leaves(paths))
    if unknown:
      raise PriorError(f"`priors` names unknown parameters {sorted(unknown)}; "
                       f"known: {sorted(jax.tree_util.tree_leaves(paths))}.")

  def prior_of(path: str, leaf) -> Prior:
    shape = np.shape(leaf)
    if path in override_map:
      return prior_from_initializer(override_map[path], shape, path)
    if path not in recorded:
      raise PriorError(
          f"No initializer is known for parameter `{path}` of this {what}. Pass an "
          f"explicit prior: `im.kernel_fn(..., priors={{'{path}': im.Prior(variance=..., mean=0.)}})`.")
    return prior_from_initializer(recorded[path], shape, path)

  priors = jax.tree_util.tree_map(prior_of, paths, params)
  return priors, paths


@contextlib.contextmanager
def _record_linen_initializers(record: dict[str, Any]):
  """Records `init_fn` of every `Module.param` call, keyed by param path."""
  import flax.linen as nn
  original = nn.Module.param

  def param(self, name, init_fn, *args, **kwargs):
    path = "/".join((*self.scope.path, name))
    record[path] = init_fn
    return original(self, name, init_fn, *args, **kwargs)

  nn.Module.param = param
  try:
    yield
  finally:
    nn.Module.param = original


def _from_linen(model, x_example, priors, apply_kwargs, rng) -> Traceable:
  recorded: dict[str, Any] = {}
  with _record_linen_initializers(recorded):
    init = lambda r, x: model.init(r, x, **apply_kwargs)
    # Only the params' shapes are needed (their priors come from the initializers),
    # so nothing is computed unless other collections (BatchNorm statistics) need
    # values; those come from one compiled program, not each initializer on its own.
    variables = jax.eval_shape(init, rng, x_example)
    if any(name != "params" for name in variables):
      variables = jax.jit(init)(rng, x_example)
  variables = dict(variables)
  if "params" not in variables:
    raise PriorError("The Flax module has no `params` collection: nothing to take to infinite width.")
  params = variables.pop("params")
  rest = variables

  def apply(p, x):
    try:
      return model.apply({"params": p, **rest}, x, **apply_kwargs)
    except Exception as e:
      _raise_training_mode(e)
      raise

  prior_tree, paths = _resolve_priors(params, recorded, priors, "Flax module")
  return Traceable(apply, params, prior_tree, paths)


def _raise_training_mode(error: Exception) -> None:
  """Re-raises Flax's errors for training-mode layers as `InfiniteWidthError`s that say why.

  In `kernel_fn` the model is applied with immutable variables and no PRNGs, so a layer in
  training mode fails inside Flax: BatchNorm with batch statistics (it updates its
  `batch_stats`) and Dropout with random masks (it asks for a `dropout` PRNG).
  """
  import flax.errors
  if isinstance(error, flax.errors.ModifyScopeVariableError):
    raise InfiniteWidthError(
        f"The model updates a variable while it is applied ({error}). A layer in training "
        "mode, e.g. nn.BatchNorm(use_running_average=False) normalizing with batch "
        "statistics, mixes the examples of a batch, so the kernel of one pair of inputs would "
        "depend on the others: it has no infinite-width kernel. Use "
        "use_running_average=True (e.g. apply_kwargs={'train': False}).") from error
  if isinstance(error, flax.errors.InvalidRngError):
    raise InfiniteWidthError(
        f"The model needs a PRNG while it is applied ({error}). A random layer, e.g. "
        "nn.Dropout(deterministic=False) in training mode, has no deterministic "
        "infinite-width kernel. Use deterministic=True (e.g. apply_kwargs={'train': False}), "
        "or `interop.monte_carlo_kernel_fn`.") from error


def _from_haiku(transformed, x_example, priors, apply_kwargs, rng) -> Traceable:
  import haiku as hk
  from haiku._src import base as hk_base

  recorded: dict[str, Any] = {}

  def creator(next_creator, shape, dtype, init, context):
    recorded[f"{context.module_name}/{context.name}"] = init
    return next_creator(shape, dtype, init)

  with hk_base.custom_creator_unsafe(creator):
    initialized = transformed.init(rng, x_example, **apply_kwargs)
  with_state = isinstance(transformed, hk.TransformedWithState)
  params, state = initialized if with_state else (initialized, None)

  # hk.without_apply_rng(...) drops the rng argument of apply.
  rng_args = (None,) if _haiku_apply_takes_rng(transformed, params, state, x_example,
                                               apply_kwargs) else ()

  def apply(p, x):
    try:
      if with_state:
        return transformed.apply(p, state, *rng_args, x, **apply_kwargs)[0]
      return transformed.apply(p, *rng_args, x, **apply_kwargs)
    except hk_base.MissingRNGError as e:
      raise _haiku_rng_error(e) from e

  # Haiku stores params as {module_name: {param_name: array}}.
  prior_tree, paths = _resolve_priors(params, recorded, priors, "Haiku transform")
  return Traceable(apply, params, prior_tree, paths)


def _haiku_rng_error(error: Exception) -> InfiniteWidthError:
  return InfiniteWidthError(
      f"The model draws random numbers while it is applied ({error}). A random layer, e.g. "
      "hk.dropout in training mode, has no deterministic infinite-width kernel. Make it "
      "deterministic (e.g. an is_training=False flag), or use "
      "`interop.monte_carlo_kernel_fn`.")


def _haiku_apply_takes_rng(transformed, params, state, x, apply_kwargs) -> bool:
  from haiku._src import base as hk_base
  lead = (params, state) if state is not None else (params,)
  try:
    jax.eval_shape(lambda: transformed.apply(*lead, None, x, **apply_kwargs))
    return True
  except hk_base.MissingRNGError as e:
    raise _haiku_rng_error(e) from e
  except TypeError:
    jax.eval_shape(lambda: transformed.apply(*lead, x, **apply_kwargs))
    return False


def _from_nnx(module, x_example, priors, apply_kwargs) -> Traceable:
  from flax import nnx
  del x_example
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  pure = nnx.to_pure_dict(params)

  def apply(p, x):
    new_params = jax.tree_util.tree_map(lambda v: v, params)
    nnx.replace_by_pure_dict(new_params, p)
    return nnx.merge(graphdef, new_params, rest)(x, **apply_kwargs)

  prior_tree, paths = _resolve_priors(pure, _nnx_default_initializers(module), priors, "NNX module")
  return Traceable(apply, pure, prior_tree, paths)


def _nnx_default_initializers(module) -> dict[str, Any]:
  """NNX modules do not keep their initializers; none are known without `priors`."""
  del module
  return {}


def as_traceable(model, x_example, *, priors=None, apply_kwargs: Mapping[str, Any] | None = None,
                 rng: jax.Array | None = None) -> Traceable:
  """Normalizes a model into a `Traceable`.

  Args:
    model: a `flax.linen.Module`, a `haiku.Transformed` /
      `haiku.TransformedWithState`, a `flax.nnx.Module`, or a pair
      `(apply_fn, params)` where `apply_fn(params, x)` is pure.
    x_example: an example input batch (its values are not used for the kernel).
    priors: optional overrides, `{param path: Prior or initializer}` or a
      pytree of `Prior`s matching the params. Required for `(apply_fn, params)`
      and NNX modules, which do not record their initializers.
    apply_kwargs: extra keyword arguments passed to every model call
      (e.g. `{"train": False}`).
    rng: key used to initialize the model (the kernel does not depend on it).
  """
  apply_kwargs = dict(apply_kwargs or {})
  rng = jax.random.PRNGKey(0) if rng is None else rng
  try:
    import flax.linen as nn
    if isinstance(model, nn.Module):
      return _from_linen(model, x_example, priors, apply_kwargs, rng)
  except ImportError:  # pragma: no cover
    pass
  try:
    import haiku as hk
    if isinstance(model, (hk.Transformed, hk.TransformedWithState)):
      return _from_haiku(model, x_example, priors, apply_kwargs, rng)
  except ImportError:  # pragma: no cover
    pass
  try:
    from flax import nnx
    if isinstance(model, nnx.Module):
      return _from_nnx(model, x_example, priors, apply_kwargs)
  except ImportError:  # pragma: no cover
    pass
  if isinstance(model, tuple) and len(model) == 2 and callable(model[0]):
    apply_fn, params = model
    if priors is None:
      raise PriorError("`(apply_fn, params)` models carry no initializers: pass `priors=` "
                       "(a dict {param path: im.Prior(...)} or a pytree of Priors matching params).")
    prior_tree, paths = _resolve_priors(params, {}, priors, "model")
    return Traceable(lambda p, x: apply_fn(p, x, **apply_kwargs), params, prior_tree, paths)
  raise TypeError(
      f"Unsupported model of type {type(model).__name__}: expected a flax.linen.Module, "
      "a haiku.Transformed, a flax.nnx.Module or a pair (apply_fn, params).")
