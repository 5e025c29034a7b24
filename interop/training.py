"""Train Flax linen / NNX / Haiku models (or their linearization) with optax.

One loop serves single networks and ensembles: `train` trains one set of
params, `train_ensemble` trains a stack of independently initialized params
(from `init_ensemble`) in parallel with `jax.vmap`. Both record the train /
test outputs and losses at requested steps, run full-batch or minibatch, and
can show a tqdm progress bar.

The MSE normalization is shared with `interop.compare` and matches
`infinite_modules.predict` (Neural Tangents' convention):

    mse_loss(f, y) = 0.5 * ||f - y||^2 / y.size

so full-batch `optax.sgd(learning_rate)` for `steps` steps is the explicit
Euler discretization of the gradient flow that
`im.predict.gradient_descent_mse` solves, at continuous time
`t = learning_rate * steps`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from interop import adapters, taylor

__all__ = [
  "LOSSES",
  "TrainResult",
  "accuracy",
  "cross_entropy_loss",
  "get_loss",
  "init_ensemble",
  "mse_loss",
  "record_steps",
  "train",
  "train_ensemble",
]

PyTree = Any
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


# ----------------------------------------------------------------------------
# Losses and metrics.


def mse_loss(fx: jax.Array, y: jax.Array) -> jax.Array:
  """`0.5 * ||fx - y||^2 / y.size`: the loss `im.predict.gradient_descent_mse` solves.

  Dividing by the number of target entries (examples x outputs) is Neural
  Tangents' normalization; with it, `optax.sgd(lr)` for `n` full-batch steps
  approximates the gradient flow at time `t = lr * n`.
  """
  return 0.5 * jnp.sum(jnp.square(fx - y)) / y.size


def cross_entropy_loss(fx: jax.Array, y: jax.Array) -> jax.Array:
  """Softmax cross-entropy averaged over examples; `y` is one-hot or probabilities."""
  return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(fx, axis=-1), axis=-1))


LOSSES: dict[str, LossFn] = {"mse": mse_loss, "cross_entropy": cross_entropy_loss}


def get_loss(loss: str | LossFn) -> LossFn:
  """Returns the loss function named `loss` (see `LOSSES`) or `loss` itself if callable."""
  if callable(loss):
    return loss
  try:
    return LOSSES[loss]
  except KeyError:
    raise ValueError(f"Unknown loss {loss!r}; use one of {sorted(LOSSES)} or a callable "
                     "loss(outputs, targets) -> scalar.") from None


def accuracy(fx: jax.Array | np.ndarray, y: jax.Array | np.ndarray) -> np.ndarray:
  """Classification accuracy over the example axis (the second-to-last axis of `fx`).

  `y` holds float one-hot (or score) targets `(n, out)` or integer labels
  `(n,)`; it broadcasts against `fx`. With a single output (`fx.shape[-1] == 1`) the sign is the
  class, and `y` holds +-1 (or any signed) targets. Leading axes (time,
  ensemble member) are kept: the result has shape `fx.shape[:-2]`.
  """
  fx, y = np.asarray(fx), np.asarray(y)
  if fx.shape[-1] == 1:
    y = y if y.shape[-1:] == (1,) else y[..., None]
    return np.mean(np.sign(fx[..., 0]) == np.sign(y[..., 0]), axis=-1)
  labels = y if np.issubdtype(y.dtype, np.integer) else np.argmax(y, axis=-1)
  return np.mean(np.argmax(fx, axis=-1) == labels, axis=-1)


def _linearized(apply: Callable) -> Callable:
  """`apply(p, (frozen, p0), x)` of `interop.linearize` around `p0`: f(p0) + J(p0)(p - p0)."""
  def apply_lin(p, frozen_and_p0, x):
    frozen, p0 = frozen_and_p0
    return taylor.linearize(lambda q, x_: apply(q, frozen, x_), p0)(p, x)
  return apply_lin


# ----------------------------------------------------------------------------
# Results and the loop.


class TrainResult(NamedTuple):
  """Outputs and losses recorded during training.

  Shapes use `T = len(steps)` and, for `train_ensemble`, `E` ensemble members
  (the `[E,]` axis is absent for `train`).

  Attributes:
    steps: recorded step numbers, `(T,)`; step 0 is the initialization.
    train_outputs: `(T, [E,] n_train, out)` network outputs on `x_train`.
    train_loss: `(T, [E])` loss on the full training set.
    test_outputs: `(T, [E,] n_test, out)` or `None` without `x_test`.
    test_loss: `(T, [E])` or `None` without `y_test`.
    params: final params, in the format they were given (stacked for ensembles).
  """

  steps: np.ndarray
  train_outputs: np.ndarray
  train_loss: np.ndarray
  test_outputs: np.ndarray | None
  test_loss: np.ndarray | None
  params: PyTree


def record_steps(total: int, num: int = 101) -> np.ndarray:
  """`num` roughly evenly spaced integer steps from 0 to `total`, both included."""
  if total < 0:
    raise ValueError(f"total steps must be >= 0, got {total}.")
  return np.unique(np.round(np.linspace(0, total, num)).astype(np.int64))


def _canonical_steps(steps: int | Sequence[int]) -> np.ndarray:
  if isinstance(steps, (int, np.integer)):
    return record_steps(int(steps))
  arr = np.asarray(steps)
  if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"steps must be an int or a non-empty 1-D sequence of ints, got {steps!r}.")
  if np.any(arr < 0) or np.any(np.diff(arr) <= 0):
    raise ValueError(f"recorded steps must be >= 0 and strictly increasing, got {arr.tolist()}.")
  return arr.astype(np.int64)


def _check_data(x_train, y_train, x_test, y_test, batch_size):
  if jnp.shape(x_train)[0] != jnp.shape(y_train)[0]:
    raise ValueError(f"x_train and y_train have different numbers of examples: "
                     f"{jnp.shape(x_train)[0]} vs {jnp.shape(y_train)[0]}.")
  if y_test is not None and x_test is None:
    raise ValueError("y_test given without x_test.")
  if x_test is not None and y_test is not None and jnp.shape(x_test)[0] != jnp.shape(y_test)[0]:
    raise ValueError(f"x_test and y_test have different numbers of examples: "
                     f"{jnp.shape(x_test)[0]} vs {jnp.shape(y_test)[0]}.")
  n = jnp.shape(x_train)[0]
  if batch_size is not None and not (isinstance(batch_size, (int, np.integer))
                                     and 0 < batch_size <= n):
    raise ValueError(f"batch_size must be an int in [1, {n}] (n_train) or None for full "
                     f"batch, got {batch_size!r}.")


def _run(apply: Callable, trainable: PyTree, frozen: PyTree, *, x_train, y_train, optimizer,
         steps: np.ndarray, loss_fn: LossFn, x_test, y_test, batch_size, key, ensemble: bool,
         progress: bool | str) -> tuple[PyTree, np.ndarray, np.ndarray, Any, Any]:
  """The training loop shared by `train` and `train_ensemble`."""
  n_train = jnp.shape(x_train)[0]
  batches_per_epoch = n_train // batch_size if batch_size else 1

  def batch(i, key_, xtr, ytr):
    if not batch_size:
      return xtr, ytr
    epoch, j = i // batches_per_epoch, i % batches_per_epoch
    perm = jax.random.permutation(jax.random.fold_in(key_, epoch), n_train)
    idx = jax.lax.dynamic_slice(perm, (j * batch_size,), (batch_size,))
    return xtr[idx], ytr[idx]

  def objective(p, frozen_, xb, yb):
    return loss_fn(apply(p, frozen_, xb), yb)

  grad_fn = jax.grad(objective)

  def run_segment(p, opt_state, frozen_, key_, start, n, xtr, ytr):
    def body(i, carry):
      p_, s_ = carry
      xb, yb = batch(i, key_, xtr, ytr)
      updates, s_ = optimizer.update(grad_fn(p_, frozen_, xb, yb), s_, p_)
      return optax.apply_updates(p_, updates), s_
    return jax.lax.fori_loop(start, start + n, body, (p, opt_state))

  def evaluate(p, frozen_, xtr, ytr, xte, yte):
    out_tr = apply(p, frozen_, xtr)
    out_te = apply(p, frozen_, xte) if xte is not None else None
    loss_tr = loss_fn(out_tr, ytr)
    loss_te = loss_fn(out_te, yte) if yte is not None else None
    return out_tr, out_te, loss_tr, loss_te

  if ensemble:
    run_segment = jax.vmap(run_segment, in_axes=(0, 0, 0, 0, None, None, None, None))
    evaluate = jax.vmap(evaluate, in_axes=(0, 0, None, None, None, None))
    opt_state = jax.vmap(optimizer.init)(trainable)
  else:
    opt_state = optimizer.init(trainable)
  run_segment = jax.jit(run_segment)
  evaluate = jax.jit(evaluate)

  n_records = len(steps)
  total = int(steps[-1])
  chunk = max(1, total // 50) if progress else max(total, 1)
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc=progress if isinstance(progress, str) else "training",
               unit="step", leave=False)
  records = []
  p, current = trainable, 0
  try:
    for r in range(n_records):
      target = int(steps[r])
      while current < target:
        n = min(chunk, target - current)
        p, opt_state = run_segment(p, opt_state, frozen, key, current, n, x_train, y_train)
        current += n
        if bar is not None:
          jax.block_until_ready(p)
          bar.update(n)
      records.append(evaluate(p, frozen, x_train, y_train, x_test, y_test))
  finally:
    if bar is not None:
      bar.close()
  stack = lambda i: (None if records[0][i] is None
                     else np.stack([np.asarray(rec[i]) for rec in records]))
  return p, stack(0), stack(2), stack(1), stack(3)


def _train(model, params, x_train, y_train, optimizer, steps, *, loss, x_test, y_test,
           batch_size, key, linearize, progress, ensemble):
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(f"optimizer must be an optax.GradientTransformation (e.g. "
                    f"optax.sgd(0.1)), got {type(optimizer).__name__}.")
  _check_data(x_train, y_train, x_test, y_test, batch_size)
  adapter = adapters.adapt(model)
  if params is None and ensemble:
    raise ValueError("train_ensemble needs stacked params: see init_ensemble.")
  steps = _canonical_steps(steps)
  if batch_size and key is None:
    raise ValueError("Minibatch training shuffles the data: pass key=jax.random.PRNGKey(...).")
  split = jax.vmap(adapter.split) if ensemble else adapter.split
  trainable, frozen = split(params)
  apply = lambda p, frozen_, x: adapter.apply(p, frozen_, x)
  if linearize:
    apply = _linearized(apply)
    frozen = (frozen, trainable)
  if key is None:
    key = jax.random.PRNGKey(0)  # unused: full batch
  if ensemble:
    n_members = jax.tree.leaves(trainable)[0].shape[0]
    key = jax.random.split(key, n_members)
  final, train_out, train_loss, test_out, test_loss = _run(
      apply, trainable, frozen, x_train=jnp.asarray(x_train), y_train=jnp.asarray(y_train),
      optimizer=optimizer, steps=steps, loss_fn=get_loss(loss),
      x_test=None if x_test is None else jnp.asarray(x_test),
      y_test=None if y_test is None else jnp.asarray(y_test),
      batch_size=batch_size, key=key, ensemble=ensemble, progress=progress)
  if linearize:
    frozen = frozen[0]
  merge = jax.vmap(adapter.merge) if ensemble else adapter.merge
  return TrainResult(steps=steps, train_outputs=train_out, train_loss=train_loss,
                     test_outputs=test_out, test_loss=test_loss, params=merge(final, frozen))


def train(model: Any, params: PyTree, x_train: jax.Array, y_train: jax.Array,
          optimizer: optax.GradientTransformation, steps: int | Sequence[int], *,
          loss: str | LossFn = "mse", x_test: jax.Array | None = None,
          y_test: jax.Array | None = None, batch_size: int | None = None,
          key: jax.Array | None = None, linearize: bool = False,
          progress: bool | str = False) -> TrainResult:
  """Trains one network with an optax optimizer, recording outputs and losses.

  Args:
    model: any model `interop.adapters.adapt` accepts: a `flax.linen.Module`
      (params: its variables, e.g. `model.init(key, x)`; only the `"params"`
      collection is trained), a `flax.nnx.Module` (params: an `nnx.State` or
      `None` for the module's own; only `nnx.Param` is trained; write the
      result back with `nnx.update(model, result.params)`), a
      `haiku.Transformed` (params from its `init`) or `TransformedWithState`
      (params: the `(params, state)` pair; state is held fixed), an
      `(init_fn, apply_fn)` pair, or any `apply_fn(params, x)`, e.g.
      `interop.linearize(f, params_0)`.
    params: initial params (see `model`).
    x_train, y_train: training inputs and targets (`(n_train, out)`).
    optimizer: any `optax.GradientTransformation`; `optax.sgd(lr)` with
      `loss="mse"` matches `im.predict.gradient_descent_mse` at `t = lr * step`.
    steps: the steps at which to record (strictly increasing, 0 = initial
      params; the last one is the total number of steps), or an int `T` for
      ~101 evenly spaced records in `[0, T]`.
    loss: `"mse"` (`mse_loss`), `"cross_entropy"` or a callable
      `loss(outputs, targets) -> scalar`.
    x_test, y_test: optional test set, evaluated at the recorded steps.
    batch_size: `None` for full-batch gradient descent, else minibatches
      drawn without replacement from a fresh shuffle every epoch (the last
      incomplete batch of an epoch is dropped).
    key: PRNG key for the minibatch shuffles (required with `batch_size`).
    linearize: train the first-order Taylor expansion of the model around
      `params` instead of the model (`interop.linearize`).
    progress: show a tqdm progress bar (a string sets its description).

  Returns:
    A `TrainResult`; `train_outputs[0]` are the outputs at step 0 if recorded.
  """
  return _train(model, params, x_train, y_train, optimizer, steps, loss=loss, x_test=x_test,
                y_test=y_test, batch_size=batch_size, key=key, linearize=linearize,
                progress=progress, ensemble=False)


def train_ensemble(model: Any, params: PyTree, x_train: jax.Array, y_train: jax.Array,
                   optimizer: optax.GradientTransformation, steps: int | Sequence[int], *,
                   loss: str | LossFn = "mse", x_test: jax.Array | None = None,
                   y_test: jax.Array | None = None, batch_size: int | None = None,
                   key: jax.Array | None = None, linearize: bool = False,
                   progress: bool | str = False) -> TrainResult:
  """Trains an ensemble in parallel (`jax.vmap` over members); see `train`.

  `params` is a stack of independently initialized params with a leading
  member axis, e.g. from `init_ensemble`. With minibatches every member gets
  its own shuffles (from `key`). Recorded outputs and losses get a member axis
  after the time axis: `(T, E, n, out)` and `(T, E)`.
  """
  return _train(model, params, x_train, y_train, optimizer, steps, loss=loss, x_test=x_test,
                y_test=y_test, batch_size=batch_size, key=key, linearize=linearize,
                progress=progress, ensemble=True)


def init_ensemble(model: Any, key: jax.Array, n_members: int, x_example: jax.Array | None = None,
                  *, init_fn: Callable[[jax.Array], PyTree] | None = None) -> PyTree:
  """Initializes `n_members` independent copies of `model`, stacked on a leading axis.

  Args:
    model: as in `train`.
    key: PRNG key; member `i` is initialized from `jax.random.split(key, n)[i]`.
    n_members: ensemble size.
    x_example: an input batch for `model.init` (linen and haiku models).
    init_fn: `init_fn(key) -> params` in the format `train` takes for this
      model; needed when the model cannot draw its own params (plain apply
      functions; nnx Modules, e.g. `lambda k: nnx.state(MyModel(rngs=nnx.Rngs(k)))`,
      unless wrapped with `interop.adapters.nnx_factory`).

  Returns:
    The stacked params, ready for `train_ensemble`.
  """
  if not (isinstance(n_members, (int, np.integer)) and n_members >= 1):
    raise ValueError(f"n_members must be a positive int, got {n_members!r}.")
  if init_fn is None:
    adapter = adapters.adapt(model)
    if adapter.init is None:
      raise ValueError(
          f"init_ensemble cannot re-draw the params of this {adapter.name} model: pass "
          "init_fn(key) -> params, or for an nnx Module the model "
          "interop.adapters.nnx_factory(lambda rngs: MyModel(..., rngs=rngs)).")
    if x_example is None:
      raise ValueError("x_example (an input batch) is needed to initialize the model.")
    x_example = jnp.asarray(x_example)
    init_fn = lambda k: adapter.init(k, x_example)
  return jax.jit(jax.vmap(init_fn))(jax.random.split(key, n_members))
