"""Finite networks vs their infinite-width limit, side by side.

`compare` trains a model (an ensemble of independent initializations) with
full-batch `optax.sgd(learning_rate)` on `mse_loss`, trains its
linearization from the same initializations with the same optimizer, and
solves the infinite-width gradient flow with the analytic NTK
(`im.kernel_fn` + `im.predict.gradient_descent_mse`) at the matched
continuous times

    t = learning_rate * step,   loss = 0.5 * ||f(X) - Y||^2 / Y.size

(`interop.training.mse_loss`; the same normalization as `im.predict`). The
infinite-width prediction for member `e` starts from that member's own outputs
at initialization, so for wide networks it tracks each trained network, not
just their mean [Lee et al. 2019, "Wide neural networks of any depth evolve
as linear models under gradient descent", https://arxiv.org/abs/1902.06720].

Parameterization: the analytic kernel must describe the network that is
trained. `parameterization="standard"` (default) is the model exactly as
written: a plain Flax model at its widths, or a model built from
`interop.ntk_layers` (which is then in NTK parameterization, with a
width-independent kernel). `parameterization="ntk"` describes a plain Flax
model *rescaled* to NTK parameterization, which is not what `optax` trains
when given the plain model, so use it only with a kernel that matches.

`compare_widths` repeats the comparison over widths; the mismatch between
finite and infinite networks shrinks as the width grows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from interop import adapters, training

__all__ = ["Comparison", "WidthSweep", "compare", "compare_widths", "kernel_matrix", "rmse"]

PyTree = Any


def rmse(a: np.ndarray, b: np.ndarray, axis: int | tuple[int, ...] | None = None) -> np.ndarray:
  """Root mean squared difference of `a` and `b` over `axis` (all axes by default)."""
  return np.sqrt(np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64)),
                         axis=axis))


def kernel_matrix(kernel_fn: Callable, x1: jax.Array, x2: jax.Array | None = None,
                  get: str = "ntk", batch_size: int | None = None) -> np.ndarray:
  """`kernel_fn(x1, x2, get=get)` as a numpy array, computed in row blocks of `batch_size`.

  Blocking bounds memory for kernels with large intermediates (CNNs).
  """
  x2_ = x1 if x2 is None else x2
  if batch_size is None or batch_size >= len(x1):
    return np.asarray(kernel_fn(x1, x2_, get=get))
  blocks = [np.asarray(kernel_fn(x1[i:i + batch_size], x2_, get=get))
            for i in range(0, len(x1), batch_size)]
  return np.concatenate(blocks, axis=0)


class Comparison(NamedTuple):
  """Finite, linearized and infinite-width networks at matched training times.

  `T` recorded steps, `E` ensemble members (independent initializations).

  Attributes:
    steps: recorded SGD steps `(T,)`.
    times: continuous times `learning_rate * steps`, `(T,)`.
    learning_rate: the SGD learning rate.
    parameterization: the parameterization of the analytic kernel.
    finite: the trained networks (`training.TrainResult`, outputs `(T, E, n, out)`).
    linearized: their linearizations trained the same way, or `None`.
    infinite_train, infinite_test: `(T, E, n, out)` infinite-width predictions
      started from each member's initial outputs.
    infinite_mean_train, infinite_mean_test: `(T, n, out)` the infinite-width
      mean prediction (initial outputs 0: the mean over initializations).
    metrics: name -> `(T,)` array; see `compare`.
    ntk_train_train, ntk_test_train: the analytic NTK blocks used.
  """

  steps: np.ndarray
  times: np.ndarray
  learning_rate: float
  parameterization: str
  finite: training.TrainResult
  linearized: training.TrainResult | None
  infinite_train: np.ndarray
  infinite_test: np.ndarray
  infinite_mean_train: np.ndarray
  infinite_mean_test: np.ndarray
  metrics: dict[str, np.ndarray]
  ntk_train_train: np.ndarray
  ntk_test_train: np.ndarray

  def summary(self, index: int = -1) -> dict[str, float]:
    """Every metric at recorded step `index` (default: the end of training)."""
    return {name: float(values[index]) for name, values in self.metrics.items()}


def _metrics(y_train, y_test, finite, linearized, inf_train, inf_test, inf_mean_test):
  """Per-time metrics; `rmse_*` are over test outputs unless suffixed `_train`."""
  m: dict[str, np.ndarray] = {}
  reduce = (1, 2, 3)  # member, example, output
  m["rmse_finite_infinite"] = rmse(finite.test_outputs, inf_test, reduce)
  m["rmse_finite_infinite_train"] = rmse(finite.train_outputs, inf_train, reduce)
  if linearized is not None:
    m["rmse_linearized_infinite"] = rmse(linearized.test_outputs, inf_test, reduce)
    m["rmse_linearized_infinite_train"] = rmse(linearized.train_outputs, inf_train, reduce)
    m["rmse_finite_linearized"] = rmse(finite.test_outputs, linearized.test_outputs, reduce)
  m["rmse_ensemble_mean_infinite_mean"] = rmse(finite.test_outputs.mean(1), inf_mean_test, (1, 2))
  m["accuracy_finite"] = training.accuracy(finite.test_outputs, y_test).mean(-1)
  m["accuracy_ensemble"] = training.accuracy(finite.test_outputs.mean(1), y_test)
  if linearized is not None:
    m["accuracy_linearized"] = training.accuracy(linearized.test_outputs, y_test).mean(-1)
  m["accuracy_infinite"] = training.accuracy(inf_test, y_test).mean(-1)
  m["accuracy_infinite_mean"] = training.accuracy(inf_mean_test, y_test)
  loss = lambda f, y: np.asarray(jax.vmap(jax.vmap(training.mse_loss, (0, None)), (0, None))(
      jnp.asarray(f), jnp.asarray(y))).mean(-1)
  m["loss_finite"] = np.asarray(finite.test_loss).mean(-1)
  m["train_loss_finite"] = np.asarray(finite.train_loss).mean(-1)
  if linearized is not None:
    m["loss_linearized"] = np.asarray(linearized.test_loss).mean(-1)
    m["train_loss_linearized"] = np.asarray(linearized.train_loss).mean(-1)
  m["loss_infinite"] = loss(inf_test, y_test)
  m["train_loss_infinite"] = loss(inf_train, y_train)
  m["loss_infinite_mean"] = loss(inf_mean_test[:, None], y_test)
  return m


def _kernel_model(model: Any, params: PyTree) -> Any:
  """What `im.kernel_fn` takes for `model`: the model itself or `(apply_fn, params)`."""
  adapter = adapters.adapt(model)
  if adapter.name in ("flax.linen", "flax.nnx", "haiku", "haiku(with state)"):
    return getattr(model, "__self__", model)  # a bound linen `module.apply` -> the module
  return adapter.bind(jax.tree.map(lambda a: a[0], params))


def _im():
  try:
    import infinite_modules as im
  except ImportError as e:  # pragma: no cover - same distribution
    raise ImportError("interop.compare needs the infinite_modules package.") from e
  return im


def compare(model: Any, x_train: jax.Array, y_train: jax.Array, x_test: jax.Array,
            y_test: jax.Array, *, learning_rate: float, steps: int | Sequence[int],
            key: jax.Array | int = 0, n_members: int = 1, params: PyTree | None = None,
            init_fn: Callable[[jax.Array], PyTree] | None = None,
            parameterization: Literal["standard", "ntk"] = "standard",
            linearized: bool = True, kernel_fn: Callable | None = None,
            ntk_train_train: np.ndarray | None = None, ntk_test_train: np.ndarray | None = None,
            kernel_kwargs: Mapping[str, Any] | None = None,
            kernel_batch_size: int | None = None, diag_reg: float = 0.0,
            progress: bool = False) -> Comparison:
  """Trains `model` and its linearization with SGD and compares with the infinite-width NTK.

  Args:
    model: a Flax linen / nnx module, a Haiku transform or `apply_fn(params, x)`
      (see `training.train`). Plain callables need `params` or `init_fn`.
    x_train, y_train, x_test, y_test: data; targets `(n, out)` (one-hot for
      classification; accuracy is the argmax, or the sign for one output).
    learning_rate: SGD learning rate; time `t = learning_rate * step`.
    steps: recorded steps (0 = initialization, the last = total), or an int
      for ~101 evenly spaced records.
    key: PRNG key or int seed for the ensemble's initializations.
    n_members: number of independently initialized networks.
    params: optional stacked initial params (`training.init_ensemble`);
      overrides `key` / `n_members`.
    init_fn: `init_fn(key) -> params`, for nnx modules and plain callables.
    parameterization: of the analytic kernel, `"standard"` = the model as
      written (see the module docstring).
    linearized: also train the linearized networks.
    kernel_fn: a precomputed `im.kernel_fn(...)` to reuse (e.g. across widths
      when the kernel is width independent).
    ntk_train_train, ntk_test_train: precomputed analytic NTK blocks; skip the
      kernel computation entirely.
    kernel_kwargs: extra arguments for `im.kernel_fn`, e.g. `priors` (needed for
      nnx modules and plain apply functions).
    kernel_batch_size: compute kernels in row blocks of this size.
    diag_reg: passed to `im.predict.gradient_descent_mse`.
    progress: show progress bars.

  Returns:
    A `Comparison`. `metrics` (each `(T,)`, on the test set unless the name
    ends in `_train`; means over members where per member):
    `rmse_finite_infinite`, `rmse_linearized_infinite`,
    `rmse_finite_linearized` (output RMSE; `_train` variants on the training
    set), `rmse_ensemble_mean_infinite_mean`, `accuracy_finite`,
    `accuracy_ensemble` (of the mean output), `accuracy_linearized`,
    `accuracy_infinite` (started from the members' initial outputs),
    `accuracy_infinite_mean` (the mean prediction), and the `mse_loss` values
    `loss_*` (test) and `train_loss_*`.
  """
  im = _im()
  if not (isinstance(learning_rate, (int, float)) and learning_rate > 0):
    raise ValueError(f"learning_rate must be a positive number, got {learning_rate!r}.")
  x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
  x_test, y_test = jnp.asarray(x_test), jnp.asarray(y_test)
  for name, y in (("y_train", y_train), ("y_test", y_test)):
    if y.ndim != 2:
      raise ValueError(f"{name} must have shape (n, out), got {y.shape}; reshape a vector of "
                       "targets with y[:, None].")
  steps = training._canonical_steps(steps)
  if steps[0] != 0:
    raise ValueError("steps must start at 0: the infinite-width prediction starts from the "
                     "networks' outputs at initialization.")
  if params is None:
    if isinstance(key, int):
      key = jax.random.PRNGKey(key)
    params = training.init_ensemble(model, key, n_members, x_train, init_fn=init_fn)
  n_members = jax.tree.leaves(params)[0].shape[0]

  if ntk_train_train is None or ntk_test_train is None:
    if kernel_fn is None:
      kernel_fn = im.kernel_fn(_kernel_model(model, params), x_train,
                               parameterization=parameterization, **(kernel_kwargs or {}))
    ntk_train_train = kernel_matrix(kernel_fn, x_train, None, "ntk", kernel_batch_size)
    ntk_test_train = kernel_matrix(kernel_fn, x_test, x_train, "ntk", kernel_batch_size)

  optimizer = optax.sgd(learning_rate)
  common = {"x_test": x_test, "y_test": y_test, "loss": training.mse_loss}
  finite = training.train_ensemble(model, params, x_train, y_train, optimizer, steps,
                                   progress="finite" if progress else False, **common)
  lin = None
  if linearized:
    lin = training.train_ensemble(model, params, x_train, y_train, optimizer, finite.steps,
                                  linearize=True, progress="linearized" if progress else False,
                                  **common)
  times = learning_rate * finite.steps.astype(np.float64)

  dtype = np.result_type(finite.train_outputs.dtype, np.float32)
  predict_fn = im.predict.gradient_descent_mse(
      jnp.asarray(ntk_train_train), y_train, learning_rate=1.0, diag_reg=diag_reg)

  def infinite(f0_train, f0_test):
    out_train, out_test = predict_fn(t=jnp.asarray(times), fx_train_0=f0_train,
                                     fx_test_0=f0_test, k_test_train=jnp.asarray(ntk_test_train))
    return np.asarray(out_train, dtype), np.asarray(out_test, dtype)

  per_member = [infinite(jnp.asarray(finite.train_outputs[0, e]),
                         jnp.asarray(finite.test_outputs[0, e])) for e in range(n_members)]
  inf_train = np.stack([p[0] for p in per_member], axis=1)
  inf_test = np.stack([p[1] for p in per_member], axis=1)
  zeros_train = jnp.zeros_like(y_train)
  zeros_test = jnp.zeros((x_test.shape[0], y_train.shape[1]), y_train.dtype)
  inf_mean_train, inf_mean_test = infinite(zeros_train, zeros_test)
  return Comparison(
      steps=finite.steps, times=times, learning_rate=float(learning_rate),
      parameterization=parameterization, finite=finite, linearized=lin,
      infinite_train=inf_train, infinite_test=inf_test, infinite_mean_train=inf_mean_train,
      infinite_mean_test=inf_mean_test,
      metrics=_metrics(np.asarray(y_train), np.asarray(y_test), finite, lin, inf_train,
                       inf_test, inf_mean_test),
      ntk_train_train=np.asarray(ntk_train_train), ntk_test_train=np.asarray(ntk_test_train))


class WidthSweep(NamedTuple):
  """`compare` at several widths.

  Attributes:
    widths: the widths, increasing.
    comparisons: one `Comparison` per width.
  """

  widths: tuple[int, ...]
  comparisons: tuple[Comparison, ...]

  def final(self, metric: str) -> np.ndarray:
    """`metric` at the end of training, one value per width."""
    return np.array([c.metrics[metric][-1] for c in self.comparisons])

  def table(self, metrics: Sequence[str] | None = None, index: int = -1) -> str:
    """A plain-text table: one row per width, metric values at recorded step `index`."""
    if metrics is None:
      metrics = [m for m in ("accuracy_finite", "accuracy_ensemble", "accuracy_linearized",
                             "accuracy_infinite_mean", "rmse_finite_infinite",
                             "rmse_linearized_infinite", "rmse_finite_linearized")
                 if m in self.comparisons[0].metrics]
    header = ["width"] + [_SHORT.get(m, m) for m in metrics]
    rows = [[str(w)] + [f"{c.metrics[m][index]:.4f}" for m in metrics]
            for w, c in zip(self.widths, self.comparisons)]
    sizes = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(cell.rjust(s) for cell, s in zip(r, sizes))
    return "\n".join([fmt(header), "  ".join("-" * s for s in sizes)] + [fmt(r) for r in rows])


_SHORT = {
    "accuracy_finite": "acc_finite", "accuracy_ensemble": "acc_ens_mean",
    "accuracy_linearized": "acc_lin", "accuracy_infinite": "acc_inf",
    "accuracy_infinite_mean": "acc_inf_mean", "rmse_finite_infinite": "rmse(fin,inf)",
    "rmse_linearized_infinite": "rmse(lin,inf)", "rmse_finite_linearized": "rmse(fin,lin)",
    "rmse_ensemble_mean_infinite_mean": "rmse(ens,inf_mean)",
}


def compare_widths(make_model: Callable[[int], Any], widths: Sequence[int], x_train: jax.Array,
                   y_train: jax.Array, x_test: jax.Array, y_test: jax.Array, *,
                   learning_rate: float, steps: int | Sequence[int], share_kernel: bool = False,
                   progress: bool = False, **compare_kwargs: Any) -> WidthSweep:
  """Runs `compare(make_model(width), ...)` for each width.

  Args:
    make_model: width -> model.
    widths: the widths to compare.
    share_kernel: compute the analytic NTK once (from the first width) and reuse
      it. Correct only when the kernel does not depend on the width: models
      built from `interop.ntk_layers` (NTK parameterization). Plain Flax models
      in standard parameterization have width-dependent NTKs: leave it False.
    progress: print one progress bar per width.
    **compare_kwargs: passed to `compare` (`key`, `n_members`, `linearized`, ...).
  """
  widths = tuple(int(w) for w in widths)
  if not widths:
    raise ValueError("widths is empty.")
  kernels = {k: compare_kwargs.pop(k) for k in ("ntk_train_train", "ntk_test_train")
             if k in compare_kwargs}
  out = []
  for width in widths:
    c = compare(make_model(width), x_train, y_train, x_test, y_test,
                learning_rate=learning_rate, steps=steps, progress=progress,
                **kernels, **compare_kwargs)
    if share_kernel and not kernels:
      kernels = {"ntk_train_train": c.ntk_train_train, "ntk_test_train": c.ntk_test_train}
    out.append(c)
  return WidthSweep(widths, tuple(out))
