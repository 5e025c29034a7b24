"""The Haiku state an evaluation-mode `hk.BatchNorm` network's kernel is defined for.

`hk.BatchNorm(...)(x, is_training=False)` computes

    (x - average_mean) * scale / sqrt(average_var + eps) + offset

from the running averages its two `hk.ExponentialMovingAverage`s keep as
state. Only training creates them: `init` in evaluation mode fails with Haiku's
"No value for 'average' ... perhaps set an init function?", and `init` in
training mode stores the example batch's statistics through RANDOM weights
(per-channel values that depend on the weights, not a fixed affine map).

The kernel is defined for the running statistics every framework starts
from (Flax's initial `mean = 0`, `var = 1`): then an evaluation BatchNorm is
the affine map `x * scale / sqrt(1 + eps) + offset` of its own parameters,
identical across channels, and the network has an exact infinite-width kernel.
`haiku_eval_state` builds that state; `HaikuWithState` hands it to `kernel_fn`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


@dataclasses.dataclass(frozen=True)
class HaikuWithState:
  """A `hk.transform_with_state` model together with the state it is applied with.

  `im.kernel_fn(HaikuWithState(transformed, state), x_example, apply_kwargs=...)`
  computes the kernel of `transformed.apply(params, state, ..., x)` with this
  fixed `state` (typically `haiku_eval_state(...)`); params are initialized as
  usual and their initializers give the priors.
  """
  transformed: Any
  state: PyTree


@dataclasses.dataclass(frozen=True)
class _MovingAverage:
  """One `hk.ExponentialMovingAverage` of an evaluation-mode BatchNorm and its target value."""
  module_name: str
  value: float
  decay: float
  zero_debias: bool
  warmup_length: int


def _is_eval_call(module, args, kwargs) -> bool:
  """Whether a `hk.BatchNorm.__call__` reads the running averages."""
  bound = inspect.signature(type(module).__call__).bind(module, *args, **kwargs)
  bound.apply_defaults()
  return not bound.arguments["is_training"] and not bound.arguments["test_local_stats"]


def _stat_shape(module, inputs) -> tuple[int, ...]:
  """The shape Haiku gives the averages: `inputs` with the reduced axes kept as 1."""
  ndim = np.ndim(inputs)
  channel = module.channel_index % ndim
  axis = module.axis if module.axis is not None else [i for i in range(ndim) if i != channel]
  axis = [a % ndim for a in axis]
  return tuple(1 if i in axis else np.shape(inputs)[i] for i in range(ndim))


def init_creating_eval_averages(transformed, rng, x_example, apply_kwargs: Mapping[str, Any]):
  """`transformed.init(rng, x_example, **apply_kwargs)` that creates the running averages
  every evaluation-mode `hk.BatchNorm` reads (zeros, placeholders) and lists them.

  Returns:
    `(params, state, averages)`: `averages` a list of `_MovingAverage`.
  """
  import haiku as hk

  averages: list[_MovingAverage] = []

  def interceptor(next_f, args, kwargs, context):
    module = context.module
    if (isinstance(module, hk.BatchNorm) and context.method_name == "__call__"
        and _is_eval_call(module, args, kwargs)):
      inputs = args[0] if args else kwargs["inputs"]
      shape, dtype = _stat_shape(module, inputs), jnp.result_type(inputs)
      for ema, value in ((module.mean_ema, 0.0), (module.var_ema, 1.0)):
        ema.initialize(shape, dtype)
        averages.append(_MovingAverage(ema.module_name, value, float(ema.decay),
                                       bool(ema.zero_debias), int(ema.warmup_length)))
    return next_f(*args, **kwargs)

  with hk.intercept_methods(interceptor):
    params, state = transformed.init(rng, x_example, **apply_kwargs)
  return params, state, averages


def _consistent_entries(average: _MovingAverage, like) -> dict[str, jax.Array]:
  """`counter`, `hidden`, `average` of an EMA that has seen `average.value` once.

  Haiku's EMA keeps `hidden <- decay * hidden + (1 - decay) * value` and (zero
  debiasing) reports `hidden / (1 - decay**counter)`: after one update from
  `hidden = 0`, `counter = 1` and `hidden = (1 - decay) * value`. Without zero
  debiasing the warm-up counter starts at `-warmup_length` and `hidden` is the
  average itself. Evaluation reads only `average`, which is exactly `value`.
  """
  dtype = jnp.result_type(like)
  value = jnp.full(np.shape(like), average.value, dtype)
  if average.zero_debias:
    hidden = jnp.full(np.shape(like), (1.0 - average.decay) * average.value, dtype)
    counter = 1
  else:
    hidden = value
    counter = 1 - average.warmup_length
  return {"counter": jnp.asarray(counter, jnp.int32), "hidden": hidden, "average": value}


def haiku_eval_state(transformed, x_example, *, apply_kwargs: Mapping[str, Any] | None = None,
                     rng: jax.Array | None = None) -> PyTree:
  """The state of a `hk.transform_with_state` model whose BatchNorms are at their start.

  Every `hk.BatchNorm` applied with `is_training=False` gets running mean 0 and
  running variance 1 (Flax's initial statistics), so it computes the affine map
  `x * scale / sqrt(1 + eps) + offset` of its parameters: the kernel of the
  model with this state is exact. The EMAs' `counter` and `hidden` entries are
  those of an average that has seen the value once, so Haiku reports exactly
  mean 0 / variance 1 and a later training step continues consistently. Other
  state is as `transformed.init` creates it.

  Use it as `im.kernel_fn(im.HaikuWithState(transformed, state), x, apply_kwargs=...)`.

  Args:
    transformed: a `haiku.TransformedWithState`.
    x_example: an example batch.
    apply_kwargs: the model's keyword arguments in evaluation mode (e.g.
      `{"is_training": False}`).
    rng: the init key (the state does not depend on it).

  Raises:
    TypeError: `transformed` is not a `hk.transform_with_state` model.
  """
  import haiku as hk
  if not isinstance(transformed, hk.TransformedWithState):
    raise TypeError("haiku_eval_state needs a model made by hk.transform_with_state, got "
                    f"{type(transformed).__name__}.")
  rng = jax.random.PRNGKey(0) if rng is None else rng
  _, state, averages = init_creating_eval_averages(transformed, rng, jnp.asarray(x_example),
                                                   dict(apply_kwargs or {}))
  state = {name: dict(entries) for name, entries in state.items()}
  for average in averages:
    state[average.module_name] = _consistent_entries(
        average, state[average.module_name]["average"])
  return state
