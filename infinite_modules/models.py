"""Model adapters for the infinite-width side: one place for Flax/Haiku specifics.

`as_traceable(model, x_example)` turns a Flax linen module, a Haiku transform,
a Flax NNX module or a pair `(apply_fn, params)` into a `Traceable`: a pure
`apply(params, x)`, example params, and the exact `Prior` of every param leaf
(read from the initializer that created it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy  # for jax.numpy.result_type
import numpy as np

from infinite_modules.errors import InfiniteWidthError, PriorError
from infinite_modules.priors import InitializerCall, Prior, prior_from_initializer

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


def _abstract(rng):
  """The init key as an abstract value (shape-only init): the default key, PRNGKey(0),
  is not computed (its seeding is a compiled program of its own)."""
  return jax.eval_shape(jax.random.PRNGKey, 0) if rng is None else rng


def _concrete(rng):
  return jax.random.PRNGKey(0) if rng is None else rng


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

  missing = [path for path in jax.tree_util.tree_leaves(paths)
             if path not in override_map and path not in recorded]
  if missing:
    template = ", ".join(f"'{p}': im.Prior(variance=..., mean=0.)" for p in missing)
    nnx_hint = (" (For NNX layers, build the model inside `with im.record_nnx_initializers():` "
                "and their initializers are known.)" if what == "NNX module" else "")
    raise PriorError(
        f"No initializer is known for {len(missing)} parameter(s) of this {what}: "
        f"{', '.join(f'`{p}`' for p in missing)}. Pass explicit priors for all of them: "
        f"`im.kernel_fn(..., priors={{{template}}})`.{nnx_hint}")

  def prior_of(path: str, leaf) -> Prior:
    shape = np.shape(leaf)
    if path in override_map:
      return prior_from_initializer(override_map[path], shape, path)
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
    # The shape the initializer is called with (per layer inside nn.scan) fixes its fans.
    if args and isinstance(args[0], (tuple, list)) and all(isinstance(s, int) for s in args[0]):
      record[path] = InitializerCall(init_fn, tuple(args[0]))
    return original(self, name, init_fn, *args, **kwargs)

  nn.Module.param = param
  try:
    yield
  finally:
    nn.Module.param = original


def _from_linen(model, x_example, priors, apply_kwargs, rng) -> Traceable:
  recorded: dict[str, Any] = {}
  try:
    with _record_linen_initializers(recorded):
      init = lambda r, x: model.init(r, x, **apply_kwargs)
      # Only the params' shapes are needed (their priors come from the initializers),
      # so nothing is computed unless other collections (BatchNorm statistics) need
      # values; those come from one compiled program, not each initializer on its own.
      variables = jax.eval_shape(init, _abstract(rng), x_example)
      if any(name != "params" for name in variables):
        variables = jax.jit(init)(_concrete(rng), x_example)
  except NameError as e:
    _raise_named_axis(e)
    raise
  except TypeError as e:
    _raise_bad_apply_kwargs(e, apply_kwargs)
    raise
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
      _raise_named_axis(e)
      raise

  prior_tree, paths = _resolve_priors(params, recorded, priors, "Flax module")
  return Traceable(apply, params, prior_tree, paths)


def _raise_bad_apply_kwargs(error: TypeError, apply_kwargs) -> None:
  """A keyword of `apply_kwargs` the model's `__call__` does not take: say which argument."""
  if apply_kwargs and "unexpected keyword argument" in str(error):
    raise ValueError(
        f"The model does not accept apply_kwargs={dict(apply_kwargs)!r} ({error}). Pass only "
        "keyword arguments of the model's __call__ (e.g. apply_kwargs={'train': False} for a "
        "model whose __call__ takes `train`), or none.") from error


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


def _raise_named_axis(error: Exception) -> None:
  """Re-raises JAX's unbound-axis-name error (a collective over a named batch axis, e.g.
  nn.BatchNorm(axis_name='batch') in training mode, as in Flax's ImageNet ResNet) as an
  `InfiniteWidthError` that says why and what to do."""
  if isinstance(error, NameError) and "axis name" in str(error):
    raise InfiniteWidthError(
        "The model reduces over a named axis while it is applied (a collective such as "
        "psum/pmean over the batch, e.g. nn.BatchNorm(use_running_average=False, "
        f"axis_name='batch') in training mode: {str(error).splitlines()[0]}). Statistics over "
        "the batch mix the examples, so there is no infinite-width kernel. Put the model in "
        "evaluation mode, e.g. apply_kwargs={'train': False}.") from error


def _from_haiku(transformed, x_example, priors, apply_kwargs, rng, given_state=None) -> Traceable:
  import haiku as hk
  from haiku._src import base as hk_base

  from infinite_modules.haiku_state import init_creating_eval_averages

  recorded: dict[str, Any] = {}

  def creator(next_creator, shape, dtype, init, context):
    recorded[f"{context.module_name}/{context.name}"] = init
    return next_creator(shape, dtype, init)

  with_state = isinstance(transformed, hk.TransformedWithState)
  if given_state is not None and not with_state:
    raise TypeError("HaikuWithState needs a model made by hk.transform_with_state, got "
                    f"{type(transformed).__name__}.")
  try:
    with hk_base.custom_creator_unsafe(creator):
      if given_state is not None:
        # Evaluation BatchNorms read averages that init cannot create: create
        # placeholders so init runs; the state applied is `given_state`.
        params, state, _ = init_creating_eval_averages(transformed, _concrete(rng), x_example,
                                                       apply_kwargs)
      else:
        init = lambda r, x: transformed.init(r, x, **apply_kwargs)
        # As for Flax: the params' shapes suffice (their priors come from the
        # initializers); a state is applied with its values, from one compiled program
        # (run op by op, init compiles every primitive on its own).
        initialized = jax.eval_shape(init, _abstract(rng), x_example)
        if with_state and jax.tree_util.tree_leaves(initialized[1]):
          initialized = jax.jit(init)(_concrete(rng), x_example)
        params, state = initialized if with_state else (initialized, None)
  except TypeError as e:
    _raise_bad_apply_kwargs(e, apply_kwargs)
    raise
  except ValueError as e:
    if "perhaps set an init function" not in str(e):
      raise
    raise _haiku_missing_state_error(e, with_state) from e
  if given_state is not None:
    _check_same_state_layout(state, given_state)
    state = given_state

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


def _haiku_missing_state_error(error: Exception, with_state: bool) -> InfiniteWidthError:
  # Initialized with is_training=True instead, the averages would be x_example's
  # per-channel statistics through random weights: not a fixed affine map.
  wrap = "" if with_state else ("Make the model with hk.transform_with_state (BatchNorm keeps "
                                "state), then ")
  return InfiniteWidthError(
      f"Haiku could not create the model's state ({error}). hk.BatchNorm with "
      "is_training=False reads running averages that only training creates; initialized "
      "in training mode they would be the example batch's statistics through random weights, "
      "which have no exact kernel. The kernel is defined for the initial running statistics "
      "(mean 0, variance 1: each BatchNorm is then the affine map of its scale and offset). "
      f"{wrap}build that state with `state = im.haiku_eval_state(model, x_example, "
      "apply_kwargs=...)` and pass `im.HaikuWithState(model, state)` to kernel_fn; for a "
      "model with its trained state use `interop.monte_carlo_kernel_fn`.")


def _check_same_state_layout(created, given) -> None:
  """Every state entry the model reads (created at init) is in `given` with its shape/dtype.

  `given` may hold more (e.g. the EMA counters evaluation does not read).
  """
  for module, entries in created.items():
    for name, value in entries.items():
      other = given.get(module, {}).get(name) if isinstance(given, Mapping) else None
      if other is None or np.shape(other) != np.shape(value) or (
          jax.numpy.result_type(other) != jax.numpy.result_type(value)):
        raise InfiniteWidthError(
            f"The state in HaikuWithState does not match the state the model creates: "
            f"{module}/{name} is {_describe(other)} where the model reads "
            f"{_describe(value)}. Build it for the same model, x_example dtype and "
            "apply_kwargs with `im.haiku_eval_state(model, x_example, apply_kwargs=...)`.")


def _describe(value) -> str:
  if value is None:
    return "missing"
  return f"{jax.numpy.result_type(value)}{list(np.shape(value))}"


def _haiku_rng_error(error: Exception) -> InfiniteWidthError:
  return InfiniteWidthError(
      f"The model draws random numbers while it is applied ({error}). A random layer, e.g. "
      "hk.dropout in training mode, has no deterministic infinite-width kernel. Make it "
      "deterministic (e.g. an is_training=False flag), or use "
      "`interop.monte_carlo_kernel_fn`.")


def _haiku_apply_takes_rng(transformed, params, state, x, apply_kwargs) -> bool:
  from haiku._src import base as hk_base
  lead = (params, state) if state is not None else (params,)
  # The params (shapes only, see `_from_haiku`) are arguments, not closed over.
  try:
    jax.eval_shape(lambda lead: transformed.apply(*lead, None, x, **apply_kwargs), lead)
    return True
  except hk_base.MissingRNGError as e:
    raise _haiku_rng_error(e) from e
  except TypeError:
    jax.eval_shape(lambda lead: transformed.apply(*lead, x, **apply_kwargs), lead)
    return False


def _from_nnx(module, x_example, priors, apply_kwargs) -> Traceable:
  import flax.errors
  from flax import nnx
  del x_example
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  pure = nnx.to_pure_dict(params)

  def apply(p, x):
    new_params = jax.tree_util.tree_map(lambda v: v, params)
    nnx.replace_by_pure_dict(new_params, p)
    try:
      return nnx.merge(graphdef, new_params, rest)(x, **apply_kwargs)
    except flax.errors.TraceContextError as e:
      raise InfiniteWidthError(
          f"The NNX model changes its state while it is applied ({type(e).__name__}: "
          f"{str(e).splitlines()[0]}). A layer in training mode (nnx.Dropout drawing masks, "
          "nnx.BatchNorm updating batch statistics) has no deterministic infinite-width "
          "kernel. Call `model.eval()` before `im.kernel_fn` (or construct the layers with "
          "deterministic=True / use_running_average=True).") from e

  prior_tree, paths = _resolve_priors(pure, nnx_initializers(module), priors, "NNX module")
  return Traceable(apply, pure, prior_tree, paths)


# NNX layers (flax 0.12) do not keep their initializers: `record_nnx_initializers`
# captures the `*_init` arguments of the layers built inside it, per instance.
_NNX_RECORDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _nnx_layer_classes():
  from flax import nnx
  names = ("Linear", "LinearGeneral", "Einsum", "Conv", "ConvTranspose", "Embed", "LayerNorm",
           "RMSNorm", "BatchNorm", "GroupNorm")
  return [getattr(nnx, n) for n in names if hasattr(nnx, n)]


@contextlib.contextmanager
def record_nnx_initializers():
  """Records the initializers of the `flax.nnx` layers constructed inside it.

  NNX modules keep only their params' values, not the initializers that drew
  them, so `kernel_fn` cannot know their priors. Build the model inside this
  context and they are known exactly, as for Flax linen::

      with im.record_nnx_initializers():
        model = MyNNXModel(rngs=nnx.Rngs(0))
      kernel_fn = im.kernel_fn(model.eval(), x)

  Each built-in layer's `*_init` arguments (`kernel_init`, `bias_init`,
  `scale_init`, `embedding_init`, defaults included) become the priors of its
  params `kernel`, `bias`, `scale`, `embedding`. Params created directly with
  `nnx.Param(...)` still need `priors=`.
  """
  patched = []
  for cls in _nnx_layer_classes():
    original = cls.__dict__.get("__init__")
    if original is None:
      continue
    signature = inspect.signature(original)

    def init(self, *args, __original=original, __signature=signature, **kwargs):
      bound = __signature.bind(self, *args, **kwargs)
      bound.apply_defaults()
      __original(self, *args, **kwargs)
      _NNX_RECORDED[self] = {name[:-len("_init")]: value
                             for name, value in bound.arguments.items()
                             if name.endswith("_init") and callable(value)}

    cls.__init__ = functools.wraps(original)(init)
    patched.append((cls, original))
  try:
    yield
  finally:
    for cls, original in patched:
      cls.__init__ = original


def nnx_initializers(module) -> dict[str, Any]:
  """Initializers of an NNX module's params that were recorded at construction
  (`record_nnx_initializers`), keyed by param path."""
  from flax import nnx
  found: dict[str, Any] = {}
  for path, sub in nnx.iter_graph(module):
    recorded = _NNX_RECORDED.get(sub) if isinstance(sub, nnx.Module) else None
    if not recorded:
      continue
    prefix = "/".join(str(p) for p in path)
    for name, init in recorded.items():
      found["/".join(filter(None, (prefix, name)))] = init
  return found


def as_traceable(model, x_example, *, priors=None, apply_kwargs: Mapping[str, Any] | None = None,
                 rng: jax.Array | None = None) -> Traceable:
  """Normalizes a model into a `Traceable`.

  Args:
    model: a `flax.linen.Module`, a `haiku.Transformed` /
      `haiku.TransformedWithState`, a `HaikuWithState` (a transform with the
      fixed state it is applied with), a `flax.nnx.Module`, or a pair
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
  try:
    import flax.linen as nn
    if isinstance(model, nn.Module):
      return _from_linen(model, x_example, priors, apply_kwargs, rng)
  except ImportError:  # pragma: no cover
    pass
  try:
    import haiku as hk

    from infinite_modules.haiku_state import HaikuWithState
    if isinstance(model, HaikuWithState):
      return _from_haiku(model.transformed, x_example, priors, apply_kwargs, rng,
                         given_state=model.state)
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
