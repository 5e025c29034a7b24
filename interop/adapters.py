"""One internal form for Flax linen, Flax NNX, Haiku and plain ``f(params, x)`` models.

Everything model-library specific in :mod:`interop` lives in this module. The rest of
the package only sees a :class:`ModelAdapter`, which answers four questions:

1. **Which leaves are trainable?** ``split(variables) -> (params, rest)`` separates the
   differentiated parameters from everything that passes through unchanged
   (Flax's non-``params`` collections such as ``batch_stats``, Haiku state, NNX
   ``BatchStat``/RNG variables). ``merge(params, rest)`` is its inverse.
2. **How is the model evaluated on an input?** ``apply(params, rest, x, **kwargs)``
   returns the model output as a pytree (the *kernel view*, used by the empirical
   kernels and Monte Carlo kernels).
3. **How is the model's own apply function called?** ``call(variables, *args,
   **kwargs)`` has exactly the signature of the user's apply function (``module.apply``,
   ``transformed.apply(params, rng, x)``, ``transformed.apply(params, state, rng, x)``,
   ``f(params, x)``); ``split_output`` / ``join_output`` separate the differentiable
   output from auxiliary outputs (Flax ``mutable`` updates, Haiku new state). This is
   the *call view*, used by :func:`interop.linearize` and :func:`interop.taylor_expand`
   so that the returned functions are drop-in replacements for the apply function.
4. **How are fresh parameters drawn?** ``init(key, x)`` (``None`` when unknown), used by
   :func:`interop.monte_carlo_kernel_fn`.

Accepted models (see :func:`adapt`):

* ``flax.linen.Module`` instance, or its bound ``module.apply``: variables are the
  dict returned by ``module.init``; only the ``"params"`` collection is trainable.
* ``flax.nnx.Module`` instance: variables are an ``nnx.State`` (full or ``nnx.Param``
  only; missing non-parameter variables are taken from the module), the module
  itself, or ``None`` (the module's current state). Only ``nnx.Param`` is trainable.
  For Monte Carlo kernels wrap a factory with :func:`nnx_factory`.
* ``haiku.Transformed``: variables are Haiku params; pass ``rng=`` as a keyword.
* ``haiku.TransformedWithState``: variables are the pair ``(params, state)``; state is
  not differentiated.
* ``(init_fn, apply_fn)`` pair with ``init_fn(key, x) -> params`` and
  ``apply_fn(params, x, **kwargs)``.
* any other callable ``f(params, x, **kwargs)``: every leaf of ``params`` is trainable,
  exactly as in Neural Tangents.
* an existing :class:`ModelAdapter` (returned unchanged).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax

PyTree = Any

__all__ = ["ModelAdapter", "adapt", "flax_params_only", "nnx_factory"]


def _main_only(raw: Any, args: tuple, kwargs: Mapping[str, Any]) -> tuple[Any, Any]:
  del args, kwargs
  return raw, None


def _join_main(main: Any, aux: Any) -> Any:
  del aux
  return main


def _no_rest_split(variables: PyTree) -> tuple[PyTree, Any]:
  return variables, None


def _no_rest_merge(params: PyTree, rest: Any) -> PyTree:
  del rest
  return params


@dataclasses.dataclass(frozen=True)
class ModelAdapter:
  """Internal form of a model; see the module docstring for the two views.

  Attributes:
    name: short description of the model kind (``"flax.linen"``, ``"haiku"``, ...).
    split: ``variables -> (params, rest)``; ``params`` is the trainable pytree.
    merge: ``(params, rest) -> variables``.
    apply: kernel view, ``apply(params, rest, x, **kwargs) -> output pytree``.
    init: ``init(key, x) -> variables`` or ``None`` if the model cannot be re-drawn.
    call: call view, same signature as the model's apply function, first positional
      argument is the call-view variables.
    call_split: call-view ``first_arg -> (params, rest)``.
    call_merge: inverse of ``call_split``.
    split_output: ``(raw_output, args, kwargs) -> (differentiable output, aux)``.
    join_output: ``(output, aux) -> raw_output``.
  """

  name: str
  split: Callable[[Any], tuple[PyTree, Any]]
  merge: Callable[[PyTree, Any], Any]
  apply: Callable[..., PyTree]
  init: Callable[[jax.Array, Any], Any] | None
  call: Callable[..., Any]
  call_split: Callable[[Any], tuple[PyTree, Any]]
  call_merge: Callable[[PyTree, Any], Any]
  split_output: Callable[[Any, tuple, Mapping[str, Any]], tuple[PyTree, Any]] = _main_only
  join_output: Callable[[PyTree, Any], Any] = _join_main

  def bind(self, variables: Any) -> tuple[Callable[..., PyTree], PyTree]:
    """Returns ``(f, params)`` with ``f(params, x, **kwargs)`` the NT-style apply function."""
    params, rest = self.split(variables)

    def f(p: PyTree, x: Any, **kwargs: Any) -> PyTree:
      return self.apply(p, rest, x, **kwargs)

    return f, params


# ----------------------------------------------------------------------------- plain


def _from_function(f: Callable[..., Any], init: Callable | None = None) -> ModelAdapter:
  def apply(params: PyTree, rest: Any, x: Any, **kwargs: Any) -> PyTree:
    del rest
    return f(params, x, **kwargs)

  return ModelAdapter(
      name="function", split=_no_rest_split, merge=_no_rest_merge, apply=apply, init=init,
      call=f, call_split=_no_rest_split, call_merge=_no_rest_merge)


# ----------------------------------------------------------------------------- Flax linen


def _is_linen_module(obj: Any) -> bool:
  try:
    import flax.linen as nn
  except ImportError:  # pragma: no cover - flax is a dependency
    return False
  return isinstance(obj, nn.Module)


def _split_flax_variables(variables: Any) -> tuple[PyTree, dict[str, Any]]:
  if not isinstance(variables, Mapping):
    raise TypeError(
        "A Flax linen model expects the variables dict returned by `module.init` "
        f"(a mapping with a 'params' collection), got {type(variables).__name__}.")
  rest = {k: v for k, v in variables.items() if k != "params"}
  return variables.get("params", {}), rest


def _merge_flax_variables(params: PyTree, rest: Mapping[str, Any]) -> dict[str, Any]:
  return {**rest, "params": params}


def _flax_returns_aux(kwargs: Mapping[str, Any]) -> bool:
  mutable = kwargs.get("mutable", False)
  return (mutable is not False and mutable is not None) or bool(
      kwargs.get("capture_intermediates", False))


def _from_linen(module: Any) -> ModelAdapter:
  def apply(params: PyTree, rest: Mapping[str, Any], x: Any, **kwargs: Any) -> PyTree:
    out = module.apply(_merge_flax_variables(params, rest), x, **kwargs)
    return out[0] if _flax_returns_aux(kwargs) else out

  def init(key: jax.Array, x: Any) -> Any:
    return module.init(key, x)

  def split_output(raw: Any, args: tuple, kwargs: Mapping[str, Any]) -> tuple[Any, Any]:
    del args
    if _flax_returns_aux(kwargs):
      return raw[0], raw[1]
    return raw, None

  def join_output(main: Any, aux: Any) -> Any:
    return main if aux is None else (main, aux)

  return ModelAdapter(
      name="flax.linen", split=_split_flax_variables, merge=_merge_flax_variables,
      apply=apply, init=init, call=module.apply, call_split=_split_flax_variables,
      call_merge=_merge_flax_variables, split_output=split_output, join_output=join_output)


def flax_params_only(module: Any) -> ModelAdapter:
  """Adapter for a linen module whose ``variables`` argument is just the params pytree."""
  def apply(params: PyTree, rest: Any, x: Any, **kwargs: Any) -> PyTree:
    del rest
    return module.apply({"params": params}, x, **kwargs)

  def call(params: PyTree, *args: Any, **kwargs: Any) -> Any:
    return module.apply({"params": params}, *args, **kwargs)

  return ModelAdapter(
      name="flax.linen(params)", split=_no_rest_split, merge=_no_rest_merge, apply=apply,
      init=lambda key, x: module.init(key, x)["params"], call=call,
      call_split=_no_rest_split, call_merge=_no_rest_merge)


# ----------------------------------------------------------------------------- Flax NNX


def _nnx():
  from flax import nnx
  return nnx


def _is_nnx_module(obj: Any) -> bool:
  try:
    nnx = _nnx()
  except ImportError:  # pragma: no cover
    return False
  return isinstance(obj, nnx.Module)


def _from_nnx(module: Any) -> ModelAdapter:
  nnx = _nnx()
  graphdef, default_params, default_rest = nnx.split(module, nnx.Param, ...)

  def split(variables: Any) -> tuple[PyTree, Any]:
    if variables is None:
      return default_params, default_rest
    if isinstance(variables, nnx.Module):
      _, p, r = nnx.split(variables, nnx.Param, ...)
      return p, r
    if not isinstance(variables, nnx.State):
      raise TypeError(
          "An NNX model expects an `nnx.State` (e.g. `nnx.state(model)` or the params "
          f"from `nnx.split(model, nnx.Param, ...)`), the module, or None; got "
          f"{type(variables).__name__}.")
    p, r = _split_state(nnx, variables)
    if not jax.tree_util.tree_leaves(r):
      r = default_rest
    return p, r

  def merge(params: PyTree, rest: Any) -> Any:
    if hasattr(nnx, "merge_state"):
      return nnx.merge_state(params, rest)
    return nnx.State.merge(params, rest)  # pragma: no cover - older flax

  def apply(params: PyTree, rest: Any, x: Any, **kwargs: Any) -> PyTree:
    model = nnx.merge(graphdef, params, rest)
    return model(x, **kwargs)

  def call(state: Any, *args: Any, **kwargs: Any) -> Any:
    p, r = split(state)
    return nnx.merge(graphdef, p, r)(*args, **kwargs)

  return ModelAdapter(
      name="flax.nnx", split=split, merge=merge, apply=apply, init=None, call=call,
      call_split=split, call_merge=merge)


def _split_state(nnx: Any, state: Any) -> tuple[Any, Any]:
  if hasattr(nnx, "split_state"):
    return nnx.split_state(state, nnx.Param, ...)
  return state.split(nnx.Param, ...)  # pragma: no cover - older flax


def nnx_factory(factory: Callable[[Any], Any], seed_key: jax.Array | None = None
                ) -> ModelAdapter:
  """Adapter for NNX models that can be re-drawn: ``factory(nnx.Rngs) -> nnx.Module``.

  ``init(key, x)`` builds a fresh module with ``factory(nnx.Rngs(key))`` and returns its
  state, so :func:`interop.monte_carlo_kernel_fn` can average over initializations.
  """
  nnx = _nnx()
  key = jax.random.PRNGKey(0) if seed_key is None else seed_key
  template = _from_nnx(factory(nnx.Rngs(key)))

  def init(key: jax.Array, x: Any) -> Any:
    del x
    return nnx.state(factory(nnx.Rngs(key)))

  return dataclasses.replace(template, name="flax.nnx(factory)", init=init)


# ----------------------------------------------------------------------------- Haiku


def _haiku_types() -> tuple[type, type] | None:
  try:
    import haiku as hk
  except ImportError:  # pragma: no cover
    return None
  return hk.Transformed, hk.TransformedWithState


def _from_haiku(transformed: Any) -> ModelAdapter:
  def apply(params: PyTree, rest: Any, x: Any, rng: Any = None, **kwargs: Any) -> PyTree:
    del rest
    return transformed.apply(params, rng, x, **kwargs)

  def init(key: jax.Array, x: Any) -> Any:
    return transformed.init(key, x)

  return ModelAdapter(
      name="haiku", split=_no_rest_split, merge=_no_rest_merge, apply=apply, init=init,
      call=transformed.apply, call_split=_no_rest_split, call_merge=_no_rest_merge)


def _from_haiku_with_state(transformed: Any) -> ModelAdapter:
  def split(variables: Any) -> tuple[PyTree, Any]:
    if not (isinstance(variables, (tuple, list)) and len(variables) == 2):
      raise TypeError(
          "A haiku.TransformedWithState model expects variables `(params, state)` as "
          f"returned by `transformed.init`, got {type(variables).__name__}.")
    return variables[0], variables[1]

  def merge(params: PyTree, state: Any) -> tuple[PyTree, Any]:
    return params, state

  def apply(params: PyTree, state: Any, x: Any, rng: Any = None, **kwargs: Any) -> PyTree:
    return transformed.apply(params, state, rng, x, **kwargs)[0]

  def init(key: jax.Array, x: Any) -> Any:
    return transformed.init(key, x)

  def split_output(raw: Any, args: tuple, kwargs: Mapping[str, Any]) -> tuple[Any, Any]:
    del args, kwargs
    return raw[0], raw[1]

  def join_output(main: Any, aux: Any) -> Any:
    return main, aux

  return ModelAdapter(
      name="haiku(with state)", split=split, merge=merge, apply=apply, init=init,
      call=transformed.apply, call_split=_no_rest_split, call_merge=_no_rest_merge,
      split_output=split_output, join_output=join_output)


# ----------------------------------------------------------------------------- dispatch


def _is_bound_linen_apply(f: Any) -> bool:
  return (inspect.ismethod(f) and getattr(f, "__name__", "") == "apply"
          and _is_linen_module(f.__self__))


def adapt(model: Any) -> ModelAdapter:
  """Turns any supported model object into a :class:`ModelAdapter`.

  Args:
    model: a ``flax.linen.Module`` (or its bound ``.apply``), a ``flax.nnx.Module``, a
      ``haiku.Transformed`` / ``haiku.TransformedWithState``, an ``(init_fn, apply_fn)``
      pair, a callable ``f(params, x, **kwargs)``, or a :class:`ModelAdapter`.

  Returns:
    The adapter.

  Raises:
    TypeError: if ``model`` is none of the above.
  """
  if isinstance(model, ModelAdapter):
    return model
  if _is_linen_module(model):
    return _from_linen(model)
  if _is_bound_linen_apply(model):
    return _from_linen(model.__self__)
  if _is_nnx_module(model):
    return _from_nnx(model)
  hk_types = _haiku_types()
  if hk_types is not None:
    transformed, with_state = hk_types
    if isinstance(model, with_state):
      return _from_haiku_with_state(model)
    if isinstance(model, transformed):
      return _from_haiku(model)
  if (isinstance(model, tuple) and len(model) == 2 and callable(model[0])
      and callable(model[1])):
    return _from_function(model[1], init=model[0])
  if callable(model):
    return _from_function(model)
  raise TypeError(
      "Expected a flax.linen.Module (or its .apply), a flax.nnx.Module, a "
      "haiku.Transformed / TransformedWithState, an (init_fn, apply_fn) pair or a "
      f"function f(params, x); got {type(model).__name__}.")
