r"""Predictions of infinitely wide (or linearized) networks: GP inference and training dynamics.

A drop-in replacement for Neural Tangents' ``nt.predict``: same function names, signatures,
argument conventions and numbers. Every function takes training data (kernels or a
``kernel_fn``) and returns a ``predict_fn`` that is evaluated on test data and/or times.

Conventions (identical to Neural Tangents)
------------------------------------------
*Kernels and* ``trace_axes``. Outputs ``f(x)`` have the shape of ``y_train`` (batch axis
first). A kernel between two batches has shape ``zip(f1.shape, f2.shape)`` with the pairs of
``trace_axes`` removed, e.g. for ``y_train`` of shape ``(n, k)``:

* ``trace_axes=(-1,)`` (default): kernel ``(n1, n2)``, interpreted as :math:`\Theta\otimes I_k`
  (the same kernel for every output channel) -- what infinite-width kernels give;
* ``trace_axes=()``: kernel ``(n1, n2, k, k)``, the full output-output kernel -- what an
  empirical NTK of a finite network with ``trace_axes=()`` gives.

Internally each kernel is flattened to a matrix (``make_2d``: first-batch axes as rows, second
as columns), targets to a matrix with the traced axes as columns.

*Loss and time.* Mean squared error is normalised by the number of training outputs,

.. math::  \mathcal{L}(f) = \frac{1}{2\,|y|}\,\lVert f(\mathcal{X}) - y \rVert_2^2,
   \qquad |y| = \texttt{y\_train.size},

so continuous-time gradient descent with learning rate :math:`\eta` in function space reads

.. math::  \frac{d f_{\text{train}}}{dt} = -\frac{\eta}{|y|}\,\Theta\,(f_{\text{train}} - y),
   \qquad \frac{d f_{\text{test}}}{dt} = -\frac{\eta}{|y|}\,\Theta_{\ast\mathcal{X}}\,
   (f_{\text{train}} - y).

Times ``t`` are measured in steps: absolute time is ``learning_rate * t``, so ``t`` steps of
discrete gradient descent with a small learning rate match time ``t``. With
:math:`\tau = \eta t / |y|` the closed form is

.. math::  f_{\text{train}}(t) = y + e^{-\tau\Theta}\,(f_{\text{train}}(0) - y),\qquad
   f_{\text{test}}(t) = f_{\text{test}}(0)
   + \Theta_{\ast\mathcal{X}}\,\Theta^{-1}\bigl(I - e^{-\tau\Theta}\bigr)\,(y - f_{\text{train}}(0)).

*Regularisation.* ``diag_reg`` replaces the train-train kernel by :math:`\Theta + \lambda I`
everywhere (in the dynamics and in the solves), with :math:`\lambda` = ``diag_reg`` times the
mean of the kernel's diagonal, or ``diag_reg`` itself if ``diag_reg_absolute_scale=True``.

Numerics
--------
* Infinite time (``t=None``) uses a Cholesky solve. If the (regularised) kernel is not
  numerically positive definite, the Cholesky factor is non-finite; instead of returning NaNs
  the solve falls back to the eigendecomposition pseudo-inverse (eigenvalues at or below
  ``n * eps * max|eigenvalue|`` are dropped), which is the infinite-time limit of gradient
  flow on the kernel's range. When the kernel is concrete this is decided once, with a
  ``UserWarning`` suggesting ``diag_reg``; when the kernel is traced (built inside
  ``jit``/``grad``) it is decided at run time by ``lax.cond``, silently. A concrete kernel
  containing NaN/inf raises ``ValueError``.
* Finite times use one symmetric eigendecomposition, reused for all times. Eigenvalues
  :math:`\le 0` (round-off of a PSD kernel) are clipped to 0; their directions do not move
  (Neural Tangents does the same for negative ones and returns NaN for exact zeros).
* Factorisations are computed lazily on the first call and cached for later calls. If the
  kernel is concrete they are computed eagerly even when the call is inside ``jit``
  (``jax.ensure_compile_time_eval``), so ``jax.jit(predict_fn)`` works and reuses them; when the
  kernel itself is traced (``predict_fn`` built inside ``jit``/``grad``), they are traced too
  and not cached.

Differences from Neural Tangents (all additive)
-----------------------------------------------
* ``gradient_descent``: times may be in any order (NT requires increasing); ``t=None``/inf
  raises ``ValueError`` (NT's ODE solve never terminates); ``rtol``/``atol``/``mxstep`` are
  exposed.
* Shape mismatches between ``y_train`` and kernels raise ``ValueError`` naming the shapes; an
  unsupported ``get`` raises ``ValueError`` (NT: ``NotImplementedError`` in the ensemble).
* A zero eigenvalue gives 0 instead of NaN, a non-positive-definite kernel the pseudo-inverse
  instead of NaN (see above).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import jax.scipy as jsp
import numpy as np
from jax.experimental import ode

__all__ = [
    "ArrayOrScalar",
    "Gaussian",
    "ODEState",
    "PredictFn",
    "PredictFnODE",
    "gp_inference",
    "gradient_descent",
    "gradient_descent_mse",
    "gradient_descent_mse_ensemble",
    "max_learning_rate",
]

Array = jax.Array
Axes = int | Sequence[int]
Get = str | tuple[str, ...] | None
ArrayOrScalar = None | int | float | Array
"""Alias for optional arrays or scalars."""


class Gaussian(NamedTuple):
    """A ``(mean, covariance)`` pair.

    Attributes:
      mean: shape of the function outputs (``y``-like, possibly with leading time axes).
      covariance: shape of the respective kernel ``zip(f.shape, f.shape)`` without trace axes.
    """

    mean: Array
    covariance: Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ODEState:
    """State of the function-space ODE solved by :func:`gradient_descent`.

    Attributes:
      fx_train: training set outputs.
      fx_test: test set outputs.
      qx_train: training set auxiliary variable (momentum velocity).
      qx_test: test set auxiliary variable (momentum velocity).
    """

    fx_train: Array | None = None
    fx_test: Array | None = None
    qx_train: Array | None = None
    qx_test: Array | None = None


class PredictFn(Protocol):
    """Signature of the function returned by :func:`gradient_descent_mse`."""

    def __call__(
        self,
        t: ArrayOrScalar = None,
        fx_train_0: ArrayOrScalar = 0.0,
        fx_test_0: ArrayOrScalar = None,
        k_test_train: Array | None = None,
    ) -> Array | tuple[Array, Array]: ...


class PredictFnODE(Protocol):
    """Signature of the function returned by :func:`gradient_descent`."""

    def __call__(
        self,
        t: ArrayOrScalar = None,
        fx_train_or_state_0: ArrayOrScalar | ODEState = 0.0,
        fx_test_0: ArrayOrScalar = None,
        k_test_train: Array | None = None,
    ) -> Array | tuple[Array, Array] | ODEState: ...


# ---------------------------------------------------------------------------------------------
# Closed-form gradient flow on MSE.
# ---------------------------------------------------------------------------------------------


def gradient_descent_mse(
    k_train_train: Array,
    y_train: Array,
    learning_rate: float = 1.0,
    diag_reg: float = 0.0,
    diag_reg_absolute_scale: bool = False,
    trace_axes: Axes = (-1,),
) -> PredictFn:
    r"""Outputs of a network trained by continuous-time gradient descent on MSE, in closed form.

    With :math:`\Theta` = ``k_train_train`` (+ regulariser), :math:`\tau = \eta t / |y|` and the
    eigendecomposition :math:`\Theta = V \operatorname{diag}(\lambda) V^\top` (computed once and
    reused for every ``t``):

    .. math::
       f_{\text{train}}(t) &= f_{\text{train}}(0)
           + V \operatorname{diag}\bigl(e^{-\tau\lambda} - 1\bigr) V^\top (f_{\text{train}}(0) - y),\\
       f_{\text{test}}(t) &= f_{\text{test}}(0) + \Theta_{\ast\mathcal{X}}\,
           V \operatorname{diag}\Bigl(\frac{1 - e^{-\tau\lambda}}{\lambda}\Bigr) V^\top
           (y - f_{\text{train}}(0)).

    ``t=None`` is :math:`t=\infty`: :math:`f_{\text{train}} = y` and
    :math:`f_{\text{test}} = f_{\text{test}}(0) + \Theta_{\ast\mathcal{X}}\Theta^{-1}
    (y - f_{\text{train}}(0))` by a Cholesky solve. For an infinite-width NTK and
    :math:`f(0) = 0` this is the infinite-width network's mean prediction; with an empirical NTK
    and the network's initial outputs it is the linearized network ([Lee et al. 2019,
    arXiv:1902.06720]; [Jacot et al. 2018, arXiv:1806.07572]).

    Args:
      k_train_train: train-train kernel, shape ``zip(y_train.shape, y_train.shape)`` without
        ``trace_axes``, e.g. ``(n, n)`` for ``y_train`` of shape ``(n, k)`` and the default
        ``trace_axes=(-1,)``.
      y_train: training targets, batch axis first.
      learning_rate: learning rate :math:`\eta`; times are in steps (``absolute = lr * t``).
      diag_reg: diagonal regulariser :math:`\lambda` added to ``k_train_train``.
      diag_reg_absolute_scale: ``True``: ``diag_reg`` is absolute; ``False`` (default): it is
        relative to the mean of the kernel's diagonal.
      trace_axes: axes of ``y_train`` along which the kernel is :math:`\Theta\otimes I`.

    Returns:
      ``predict_fn(t=None, fx_train_0=0., fx_test_0=None, k_test_train=None)`` returning
      ``fx_train_t``, ``fx_test_t`` (if ``fx_train_0 is None``) or ``(fx_train_t, fx_test_t)``,
      with leading axes ``jnp.shape(t)``. ``k_test_train`` has shape ``zip(f_test.shape,
      y_train.shape)`` without ``trace_axes``; for regularised train-set predictions pass
      ``k_test_train=k_train_train`` and ``fx_test_0=fx_train_0``.
    """
    layout = _Layout.make(y_train, trace_axes)
    k_train_train = _as_kernel_array(k_train_train, "k_train_train")
    layout.check_kernel(k_train_train, "k_train_train", square=True)
    y_train = jnp.asarray(y_train)
    dtype = _float_dtype(k_train_train, y_train)
    factors = _TrainFactors(lambda _: k_train_train, diag_reg, diag_reg_absolute_scale,
                            "k_train_train", inputs=k_train_train)
    scale = learning_rate / y_train.size

    def predict_fn(
        t: ArrayOrScalar = None,
        fx_train_0: ArrayOrScalar = 0.0,
        fx_test_0: ArrayOrScalar = None,
        k_test_train: Array | None = None,
    ) -> Array | tuple[Array, Array]:
        """Train [and test] outputs at time[s] ``t`` (``None`` = convergence)."""
        _check_inputs(fx_train_0, fx_test_0, k_test_train)
        if fx_train_0 is not None:
            fx_train_0 = jnp.asarray(fx_train_0)
            _check_broadcast(fx_train_0, y_train.shape, "fx_train_0")
        if fx_test_0 is None:
            k_test_train = None
        else:
            fx_test_0 = jnp.asarray(fx_test_0)
            k_test_train = _as_kernel_array(k_test_train, "k_test_train")
            test_shape = layout.check_kernel(k_test_train, "k_test_train", square=False)
            _check_broadcast(fx_test_0, layout.output_shape(test_shape), "fx_test_0")

        if t is None:
            fx_train_t = None if fx_train_0 is None else y_train.astype(dtype)
            fx_test_t = None
            if fx_test_0 is not None:
                solver, sargs = factors.solver("ntk")
                fx_test_t = _mse_infinite(sargs, y_train, fx_train_0, fx_test_0, k_test_train,
                                          solver=solver, layout=layout, dtype=dtype)
            return _pack(fx_train_t, fx_test_t)

        evals, evecs = factors.eigh("ntk")
        return _pack(*_mse_finite(evals, evecs, y_train, fx_train_0, fx_test_0, k_test_train,
                                  jnp.asarray(t, dtype), scale, layout=layout, dtype=dtype))

    return predict_fn


# ---------------------------------------------------------------------------------------------
# ODE: any loss, optional momentum.
# ---------------------------------------------------------------------------------------------


def gradient_descent(
    loss: Callable[[Array, Array], Array],
    k_train_train: Array,
    y_train: Array,
    learning_rate: float = 1.0,
    momentum: float | None = None,
    trace_axes: Axes = (-1,),
    *,
    rtol: float = 1.4e-8,
    atol: float = 1.4e-8,
    mxstep: float = math.inf,
) -> PredictFnODE:
    r"""Function-space gradient descent (with optional momentum) on any loss, via an ODE solver.

    Solves, with ``jax.experimental.ode.odeint`` (adaptive Dormand-Prince), the linearized
    dynamics

    .. math::  \frac{df_{\text{train}}}{dt} = -\eta\,\Theta\,\nabla_f\mathcal{L}(f_{\text{train}}),
       \qquad \frac{df_{\text{test}}}{dt} = -\eta\,\Theta_{\ast\mathcal{X}}\,
       \nabla_f\mathcal{L}(f_{\text{train}}).

    For ``loss = lambda f, y: 0.5 * jnp.mean((f - y) ** 2)`` this is exactly
    :func:`gradient_descent_mse`. With ``momentum`` :math:`m` (heavy ball, not Nesterov) the
    discrete update :math:`v \leftarrow m v - \eta g,\ f \leftarrow f + v` is solved as
    :math:`\dot f = q,\ \dot q = -\Theta\nabla\mathcal{L} + \frac{m-1}{\sqrt\eta} q` in units
    of :math:`\sqrt\eta`, i.e. ``absolute_time = sqrt(learning_rate) * t`` (so ``t`` still
    counts steps).

    Args:
      loss: ``loss(f(x_train), y_train)`` -> scalar; should treat batch and output axes
        symmetrically (e.g. a mean over all entries).
      k_train_train: train-train NTK, shape ``zip(y_train.shape, y_train.shape)`` without
        ``trace_axes``.
      y_train: training targets.
      learning_rate: learning rate; ``t`` counts steps.
      momentum: momentum coefficient, or ``None`` for plain gradient descent.
      trace_axes: axes of ``y_train`` along which the kernel is :math:`\Theta\otimes I`.
      rtol: relative tolerance of ``odeint``.
      atol: absolute tolerance of ``odeint``.
      mxstep: maximum number of solver steps per requested time.

    Returns:
      ``predict_fn(t, fx_train_or_state_0=0., fx_test_0=None, k_test_train=None)``. ``t`` is a
      finite, non-negative scalar or array of any shape and order; outputs get leading axes
      ``jnp.shape(t)``. Passing an :class:`ODEState` (e.g. ``ODEState(fx_train_0, fx_test_0)``)
      instead of ``fx_train_0`` returns the full ``ODEState`` (with momentum velocities). With
      ``fx_train_0=None`` the training outputs start at 0 and only test outputs are returned.
    """
    layout = _Layout.make(y_train, trace_axes)
    k_train_train = _as_kernel_array(k_train_train, "k_train_train")
    layout.check_kernel(k_train_train, "k_train_train", square=True)
    y_train = jnp.asarray(y_train)
    dtype = _float_dtype(k_train_train, y_train)
    grad_loss = jax.grad(loss)

    time_scale = learning_rate if momentum is None else learning_rate**0.5
    damping = None if momentum is None else (momentum - 1.0) / learning_rate**0.5

    def kernel_action(k: Array, g: Array) -> Array:
        return layout.from_2d(_to_2d(k).astype(dtype) @ layout.to_2d(g), k.shape[::2])

    def dstate_dt(state: ODEState, unused_t: Array, k_dd: Array, y: Array,
                  k_td: Array | None) -> ODEState:
        g = grad_loss(state.fx_train, y)
        df_train = -kernel_action(k_dd, g)
        df_test = None if state.fx_test is None else -kernel_action(k_td, g)
        if momentum is None:
            return ODEState(df_train, df_test)
        dq_train = df_train + damping * state.qx_train
        dq_test = None if df_test is None else df_test + damping * state.qx_test
        return ODEState(state.qx_train, state.qx_test, dq_train, dq_test)

    @jax.jit
    def solve(k_dd: Array, y: Array, state_0: ODEState, t: Array, k_td: Array | None
              ) -> ODEState:
        state_0 = jax.tree_util.tree_map(lambda x: x.astype(dtype), state_0)
        flat = t.reshape(-1) * time_scale
        order = jnp.argsort(flat)
        ts = flat[order]
        # odeint evaluates the initial state at its first time, which must differ from the
        # next one: start slightly below 0 when t=0 is requested (as Neural Tangents does).
        start = jnp.where(ts[:1] > 0, jnp.zeros((1,), dtype), jnp.full((1,), -1e-24, dtype))
        states = ode.odeint(dstate_dt, state_0, jnp.concatenate([start, ts]), k_dd, y, k_td,
                            rtol=rtol, atol=atol, mxstep=mxstep)
        inverse = jnp.argsort(order)
        return jax.tree_util.tree_map(
            lambda x: x[1:][inverse].reshape(t.shape + x.shape[1:]), states)

    def predict_fn(
        t: ArrayOrScalar = None,
        fx_train_or_state_0: ArrayOrScalar | ODEState = 0.0,
        fx_test_0: ArrayOrScalar = None,
        k_test_train: Array | None = None,
    ) -> Array | tuple[Array, Array] | ODEState:
        """Train [and test] outputs (or full ``ODEState``) at time[s] ``t``."""
        _check_inputs(fx_train_or_state_0, fx_test_0, k_test_train)
        if t is None:
            raise ValueError(
                "gradient_descent integrates an ODE and needs finite times `t`; t=None "
                "(infinity) would never finish. For MSE use gradient_descent_mse, which "
                "supports t=None in closed form.")
        is_state = isinstance(fx_train_or_state_0, ODEState)
        if is_state:
            s = fx_train_or_state_0
            fx_train_0, fx_test_0 = s.fx_train, s.fx_test
            qx_train_0, qx_test_0 = s.qx_train, s.qx_test
        else:
            fx_train_0, qx_train_0, qx_test_0 = fx_train_or_state_0, None, None
        if momentum is None and (qx_train_0 is not None or qx_test_0 is not None):
            raise ValueError("Got momentum state variables (qx_train/qx_test) while "
                             "`momentum is None`.")

        test_shape = None
        if fx_test_0 is None:
            k_test_train = None
        else:
            k_test_train = _as_kernel_array(k_test_train, "k_test_train")
            test_shape = layout.output_shape(
                layout.check_kernel(k_test_train, "k_test_train", square=False))

        def init(x: Any, shape: tuple[int, ...], name: str) -> Array:
            if x is None:
                return jnp.zeros(shape, dtype)
            x = jnp.asarray(x)
            _check_broadcast(x, shape, name)
            return jnp.broadcast_to(x, shape)

        f_train = init(fx_train_0, y_train.shape, "fx_train_0")
        f_test = None if test_shape is None else init(fx_test_0, test_shape, "fx_test_0")
        q_train = q_test = None
        if momentum is not None:
            q_train = init(qx_train_0, y_train.shape, "qx_train")
            q_test = None if test_shape is None else init(qx_test_0, test_shape, "qx_test")

        t = jnp.asarray(t, dtype)
        if _is_concrete(t):
            t_host = np.asarray(t)
            if not (np.all(np.isfinite(t_host)) and np.all(t_host >= 0)):
                raise ValueError(f"gradient_descent needs finite, non-negative times; got t={t}.")
        states = solve(k_train_train, y_train, ODEState(f_train, f_test, q_train, q_test), t,
                       k_test_train)
        if is_state:
            return states
        if fx_train_0 is None:
            return states.fx_test
        return _pack(states.fx_train, states.fx_test)

    return predict_fn


# ---------------------------------------------------------------------------------------------
# Exact GP posterior.
# ---------------------------------------------------------------------------------------------


def gp_inference(
    k_train_train: Any,
    y_train: Array,
    diag_reg: float = 0.0,
    diag_reg_absolute_scale: bool = False,
    trace_axes: Axes = (-1,),
) -> Callable[..., Any]:
    r"""Posterior of the NNGP, of the infinite NTK ensemble, or of the "NTK-GP".

    With :math:`K` the NNGP, :math:`\Theta` the NTK, :math:`\ast` the test and
    :math:`\mathcal{X}` the train set (all train-train kernels including the regulariser):

    * ``"nngp"`` -- exact posterior of an infinitely wide Bayesian network:
      :math:`\mu = K_{\ast\mathcal{X}} K^{-1} y,\
      \Sigma = K_{\ast\ast} - K_{\ast\mathcal{X}} K^{-1} K_{\mathcal{X}\ast}`.
    * ``"ntk"`` -- infinite ensemble of infinitely wide networks trained to convergence by
      gradient flow on MSE: :math:`\mu = \Theta_{\ast\mathcal{X}}\Theta^{-1} y`,
      :math:`\Sigma = K_{\ast\ast} + \Theta_{\ast\mathcal{X}}\Theta^{-1} K \Theta^{-1}
      \Theta_{\mathcal{X}\ast} - (\Theta_{\ast\mathcal{X}}\Theta^{-1}K_{\mathcal{X}\ast}
      + \text{h.c.})` [arXiv:1902.06720].
    * ``"ntkgp"`` -- GP with the NTK as covariance [arXiv:2007.05864]:
      :math:`\mu = \Theta_{\ast\mathcal{X}}\Theta^{-1} y,\
      \Sigma = \Theta_{\ast\ast} - \Theta_{\ast\mathcal{X}}\Theta^{-1}\Theta_{\mathcal{X}\ast}`.

    Solves use a cached Cholesky factorisation (with the pseudo-inverse fallback described in
    the module docstring).

    Args:
      k_train_train: train-train kernel: an array (used for whichever of nngp/ntk is asked),
        or an object with ``.nngp`` and/or ``.ntk`` (``Kernel``, namedtuple). The NTK
        covariance needs both.
      y_train: training targets.
      diag_reg: diagonal regulariser added to the train-train kernel.
      diag_reg_absolute_scale: ``True``: absolute; ``False``: relative to the mean diagonal.
      trace_axes: axes of ``y_train`` along which kernels are :math:`\cdot\otimes I`.

    Returns:
      ``predict_fn(get=None, k_test_train=None, k_test_test=None)``. ``get`` is ``"nngp"``,
      ``"ntk"``, ``"ntkgp"`` or a tuple of them (``None`` = ``("nngp", "ntk")``); a string
      gives one result, a tuple a namedtuple ``Gaussians`` with those fields. Each result is
      the mean, or a :class:`Gaussian` ``(mean, covariance)`` if ``k_test_test`` is given.
      ``k_test_train=None`` means the training set (``N(y_train, 0)``; pass any non-``None``
      ``k_test_test`` such as ``True`` for the zero covariance).
    """
    layout = _Layout.make(y_train, trace_axes)
    y_train = jnp.asarray(y_train)

    def train_kernel(g: str) -> Array:
        k = _kernel_attr(k_train_train, g, "k_train_train")
        layout.check_kernel(k, "k_train_train", square=True)
        return k

    factors = _TrainFactors(train_kernel, diag_reg, diag_reg_absolute_scale, "k_train_train",
                            inputs=k_train_train)

    def predict_fn(get: Get = None, k_test_train: Any = None, k_test_test: Any = None) -> Any:
        """Posterior mean [and covariance] on the test set (or the training set)."""
        is_str, gets = _canonicalize_get(get, ("nngp", "ntk", "ntkgp"))
        out = _gp_posterior(factors, layout, y_train, _has_nngp(k_train_train), gets,
                            k_test_train, k_test_test)
        return _format_get(out, is_str, "Gaussians")

    return predict_fn


def _gp_posterior(factors: _TrainFactors, layout: _Layout, y_train: Array, train_has_nngp: bool,
                  gets: tuple[str, ...], k_test_train: Any, k_test_test: Any) -> dict[str, Any]:
    """Shared body of :func:`gp_inference` and the ``t=None`` ensemble (formulas there)."""
    out = {}
    for g in gets:
        k = "ntk" if g == "ntkgp" else g
        k_dd = factors.kernel(k)
        dtype = _float_dtype(k_dd, y_train)
        if k_test_train is None:
            mean = y_train.astype(dtype)
            out[g] = (mean if k_test_test is None
                      else Gaussian(mean, jnp.zeros(k_dd.shape, k_dd.dtype)))
            continue

        k_td = _kernel_attr(k_test_train, k, "k_test_train")
        test_shape = layout.check_kernel(k_td, "k_test_train", square=False)
        solver, sargs = factors.solver(k)
        if k_test_test is None:
            out[g] = _gp_core(sargs, y_train, k_td, None, None, None, solver=solver,
                              layout=layout, mode="mean", dtype=dtype)[0]
            continue

        if g == "ntk" and not (train_has_nngp and _has_nngp(k_test_train)):
            raise ValueError(
                'The NTK posterior covariance (get="ntk" with k_test_test) needs both NNGP '
                "and NTK train-train and test-train kernels: pass objects with `.nngp` and "
                "`.ntk` (e.g. kernel_fn(x, None, get=('nngp', 'ntk'))) as k_train_train "
                "and k_test_train.")
        g_init = "ntk" if g == "ntkgp" else "nngp"  # covariance of the outputs at init
        k_tt = _kernel_attr(k_test_test, g_init, "k_test_test")
        _check_square_test(k_tt, test_shape, "k_test_test")
        if g == "ntk":
            nngp_td = _kernel_attr(k_test_train, "nngp", "k_test_train")
            layout.check_kernel(nngp_td, "k_test_train.nngp", square=False)
            mean, cov = _gp_core(sargs, y_train, k_td, nngp_td, k_tt, factors.kernel("nngp"),
                                 solver=solver, layout=layout, mode="ntk", dtype=dtype)
        else:
            mean, cov = _gp_core(sargs, y_train, k_td, None, k_tt, None, solver=solver,
                                 layout=layout, mode="gp", dtype=dtype)
        out[g] = Gaussian(mean, cov)
    return out


# ---------------------------------------------------------------------------------------------
# Infinite ensemble trained on MSE, from a kernel_fn.
# ---------------------------------------------------------------------------------------------


def gradient_descent_mse_ensemble(
    kernel_fn: Callable[..., Any],
    x_train: Any,
    y_train: Array,
    learning_rate: float = 1.0,
    diag_reg: float = 0.0,
    diag_reg_absolute_scale: bool = False,
    trace_axes: Axes = (-1,),
    **kernel_fn_train_train_kwargs: Any,
) -> Callable[..., Any]:
    r"""Mean and covariance of an infinite ensemble of networks trained by gradient flow on MSE.

    The outputs at initialisation are a centred GP with covariance :math:`K` (NNGP); training
    is linear with kernel :math:`\Theta`. With :math:`\tau = \eta t/|y|`,
    :math:`\Theta = V\operatorname{diag}(\lambda)V^\top` and
    :math:`\phi_\tau(\lambda) = (1 - e^{-\tau\lambda})/\lambda`, ``get="ntk"`` gives
    [arXiv:1902.06720]

    .. math::
       \mu_\ast(t) &= \Theta_{\ast\mathcal{X}}\, V\phi_\tau(\lambda)V^\top y,\\
       \Sigma_{\ast\ast}(t) &= K_{\ast\ast} + A^\top K A - (\Theta_{\ast\mathcal{X}}
           V\phi_\tau(\lambda)V^\top K_{\mathcal{X}\ast} + \text{h.c.}),
           \quad A = V\phi_\tau(\lambda)V^\top\Theta_{\mathcal{X}\ast},

    and ``get="nngp"`` (only the readout trained, :math:`\Theta` replaced by :math:`K`):
    :math:`\mu_\ast(t) = K_{\ast\mathcal{X}} V\phi_\tau(\lambda)V^\top y`,
    :math:`\Sigma_{\ast\ast}(t) = K_{\ast\ast} - K_{\ast\mathcal{X}}V\phi_{2\tau}(\lambda)V^\top
    K_{\mathcal{X}\ast}`. On the training set: :math:`\mu = (I - e^{-\tau\Theta})y`,
    :math:`\Sigma = e^{-\tau\Theta}Ke^{-\tau\Theta}` (ntk) or :math:`Ke^{-2\tau K}` (nngp).
    ``t=None`` is the limit :math:`t\to\infty`, computed by :func:`gp_inference`.

    Args:
      kernel_fn: ``kernel_fn(x1, x2, get, **kwargs)``; ``get`` a string returns an array, a
        tuple a namedtuple (or any object with those attributes). E.g. from
        ``infinite_modules.kernel_fn``; an empirical/Monte Carlo kernel works but the result
        then only approximates the infinite ensemble. A ``kernel_fn`` with estimated steps
        (``kernel_fn.exact`` False) gives one ``EstimatedKernelWarning``, here.
      x_train: training inputs.
      y_train: training targets.
      learning_rate: learning rate; ``t`` counts steps.
      diag_reg: diagonal regulariser added to the train-train kernels.
      diag_reg_absolute_scale: ``True``: absolute; ``False``: relative to the mean diagonal.
      trace_axes: axes of ``y_train`` along which kernels are :math:`\cdot\otimes I`.
      **kernel_fn_train_train_kwargs: passed to ``kernel_fn`` for the train-train kernel, and
        (updated by ``predict_fn``'s keyword arguments) for the test kernels. A value that is
        a pair ``(for_x1, for_x2)`` of arrays in both is combined as ``(test, train)`` for the
        test-train kernel, as in Neural Tangents.

    Returns:
      ``predict_fn(t=None, x_test=None, get=None, compute_cov=False, **kernel_fn_test_test_kwargs)``
      -> mean, or :class:`Gaussian` if ``compute_cov``; a namedtuple ``Gaussians`` over ``get``
      if ``get`` is a tuple or ``None`` (= ``("nngp", "ntk")``). ``x_test=None`` gives the
      training set; leading axes ``jnp.shape(t)``.
    """
    _warn_if_estimated(kernel_fn)
    layout = _Layout.make(y_train, trace_axes)
    y_train = jnp.asarray(y_train)
    scale = learning_rate / y_train.size

    def train_kernels(gets: tuple[str, ...]) -> dict[str, Array]:
        if len(gets) == 1:
            res = kernel_fn(x_train, None, gets[0], **kernel_fn_train_train_kwargs)
        else:
            res = kernel_fn(x_train, None, gets, **kernel_fn_train_train_kwargs)
        out = {}
        for g in gets:
            out[g] = jnp.asarray(_fetch(res, g))
            layout.check_kernel(out[g], f"kernel_fn(x_train, None, get={g!r})", square=True)
        return out

    factors = _TrainFactors(lambda g: train_kernels((g,))[g], diag_reg,
                            diag_reg_absolute_scale, "kernel_fn(x_train, None)",
                            get_kernels=train_kernels,
                            inputs=(x_train, kernel_fn_train_train_kwargs))

    def predict_fn(
        t: ArrayOrScalar = None,
        x_test: Any = None,
        get: Get = None,
        compute_cov: bool = False,
        **kernel_fn_test_test_kwargs: Any,
    ) -> Any:
        """Ensemble mean [and covariance] on ``x_test`` (or the train set) at time[s] ``t``."""
        is_str, gets = _canonicalize_get(get, ("nngp", "ntk"))
        deps = (("nngp",) if ("nngp" in gets or compute_cov) else ()) + (
            ("ntk",) if "ntk" in gets else ())
        factors.prefetch(deps)

        k_td: dict[str, Array] | None = None
        nngp_tt = None
        test_shape = layout.non_trace_shape
        if x_test is not None:
            kw_td, kw_tt = _merge_kwargs(kernel_fn_train_train_kwargs, kernel_fn_test_test_kwargs)
            res = kernel_fn(x_test, x_train, deps, **kw_td)
            k_td = {g: jnp.asarray(_fetch(res, g)) for g in deps}
            for g, k in k_td.items():
                test_shape = layout.check_kernel(k, f"kernel_fn(x_test, x_train, get={g!r})",
                                                 square=False)
            if compute_cov:
                nngp_tt = jnp.asarray(_fetch(kernel_fn(x_test, None, "nngp", **kw_tt), "nngp"))
                _check_square_test(nngp_tt, test_shape, "kernel_fn(x_test, None, get='nngp')")

        if t is None:
            kt = None if k_td is None else _KernelPair(**k_td)
            ktt = (True if compute_cov else None) if x_test is None else nngp_tt
            out = _gp_posterior(factors, layout, y_train, True, gets, kt, ktt)
            return _format_get(out, is_str, "Gaussians")

        dtype = _float_dtype(*[factors.kernel(g) for g in deps], y_train)
        t = jnp.asarray(t, dtype)
        out = {}
        for g in gets:
            evals, evecs = factors.eigh(g)
            mean, cov = _ensemble_finite(
                evals, evecs, y_train, t, scale, None if k_td is None else k_td[g],
                factors.kernel("nngp") if compute_cov else None,
                None if k_td is None or not compute_cov else k_td["nngp"], nngp_tt,
                layout=layout, g=g, compute_cov=compute_cov, dtype=dtype)
            out[g] = Gaussian(mean, cov) if compute_cov else mean
        return _format_get(out, is_str, "Gaussians")

    return predict_fn


def _warn_if_estimated(kernel_fn: Any) -> None:
    """An ``im.kernel_fn`` with estimated steps: the predictions use its bare arrays, so its
    ``EstimatedKernelWarning`` is given here, at the user's call (once per ``KernelFn``: the
    kernel calls of ``predict_fn`` then stay quiet)."""
    from infinite_modules.api import KernelFn  # this module otherwise needs no kernel code

    if isinstance(kernel_fn, KernelFn):
        kernel_fn._warn_estimated(kernel_fn.estimates, stacklevel=3)


def max_learning_rate(
    ntk_train_train: Array,
    y_train_size: int | None = None,
    momentum: float = 0.0,
    eps: float = 1e-12,
) -> Array:
    r"""Largest learning rate for which full-batch (momentum) gradient descent on MSE converges.

    With the loss :math:`\frac{1}{2|y|}\lVert f - y\rVert^2`, one step multiplies the
    residual by :math:`I - \frac{\eta}{|y|}\Theta`, a contraction iff
    :math:`\eta < 2|y|/\lambda_{\max}(\Theta)`; heavy-ball momentum :math:`m` extends this to
    :math:`2(1+m)|y|/\lambda_{\max}` ("Why Momentum Really Works", distill.pub 2017).

    Args:
      ntk_train_train: analytic or empirical NTK on the training data (any ``make_2d``-able
        shape).
      y_train_size: ``y_train.size``; ``None`` infers it from the kernel assuming
        ``trace_axes=()`` (rows of the flattened kernel).
      momentum: momentum coefficient.
      eps: added to :math:`\lambda_{\max}` to avoid dividing by 0.

    Returns:
      The maximal learning rate, a scalar array.
    """
    k = jnp.asarray(ntk_train_train)
    rows, cols = math.prod(k.shape[::2]), math.prod(k.shape[1::2])
    if k.ndim % 2 or rows != cols:
        raise ValueError(f"ntk_train_train must be a square kernel; got shape {k.shape}.")
    factor = rows if y_train_size is None else y_train_size
    return 2 * (1 + momentum) * factor / (_lambda_max(k) + eps)


# ---------------------------------------------------------------------------------------------
# Numerical cores: each is one jitted function, so a prediction compiles a handful of XLA
# programs per shape instead of one per primitive.
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("absolute",))
def _regularize(k: Array, diag_reg: Any, absolute: bool) -> Array:
    r"""2-D kernel plus :math:`\lambda I` (relative: ``diag_reg`` times the mean diagonal)."""
    k = _to_2d(k)
    k = k.astype(_float_dtype(k))
    n = k.shape[0]
    reg = diag_reg if absolute else diag_reg * jnp.trace(k) / n
    return k + reg * jnp.eye(n, dtype=k.dtype)


@functools.partial(jax.jit, static_argnames=("absolute",))
def _factor_cholesky(k: Array, diag_reg: Any, absolute: bool
                     ) -> tuple[Array, Array, Array, Array]:
    a = _regularize(k, diag_reg, absolute)
    chol = jnp.linalg.cholesky(a)
    return a, chol, jnp.all(jnp.isfinite(chol)), jnp.all(jnp.isfinite(k))


@functools.partial(jax.jit, static_argnames=("absolute",))
def _factor_eigh(k: Array, diag_reg: Any, absolute: bool) -> tuple[Array, Array, Array]:
    evals, evecs = jnp.linalg.eigh(_regularize(k, diag_reg, absolute))
    return evals, evecs, jnp.all(jnp.isfinite(k))


def _solve(solver: str, sargs: tuple[Array, ...], b: Array) -> Array:
    """``K^{-1} b`` for the regularised train kernel, with the factors from
    :meth:`_TrainFactors.solver`: ``"chol"`` (Cholesky), ``"pinv"`` (Cholesky failed:
    eigen pseudo-inverse) or ``"cond"`` (not known before run time: ``lax.cond``)."""
    if solver == "pinv":
        evals, evecs = sargs
        return _pinv_apply(evals, evecs, b.astype(jnp.result_type(evecs.dtype, b.dtype)))
    chol = sargs[1] if solver == "cond" else sargs[0]
    b = b.astype(jnp.result_type(chol.dtype, b.dtype))

    def cho(b: Array) -> Array:
        return jsp.linalg.cho_solve((chol, True), b)

    if solver == "chol":
        return cho(b)
    a, _, ok = sargs

    def pinv(b: Array) -> Array:
        evals, evecs = jnp.linalg.eigh(a)
        return _pinv_apply(evals, evecs, b)

    return jax.lax.cond(ok, cho, pinv, b)


def _pinv_apply(evals: Array, evecs: Array, b: Array) -> Array:
    cutoff = evals.shape[0] * jnp.finfo(evals.dtype).eps * jnp.max(jnp.abs(evals))
    keep = evals > cutoff
    inv = jnp.where(keep, 1 / jnp.where(keep, evals, 1), 0)
    return evecs @ (inv[:, None] * (evecs.T @ b))


@functools.partial(jax.jit, static_argnames=("solver", "layout", "dtype"))
def _mse_infinite(sargs: tuple[Array, ...], y: Array, f0: Array | None, ft0: Array,
                  k_td: Array, *, solver: str, layout: _Layout, dtype: Any) -> Array:
    resid = y if f0 is None else y - f0
    test_shape = k_td.shape[::2]
    delta = _to_2d(k_td).astype(dtype) @ _solve(solver, sargs,
                                                layout.to_2d(resid.astype(dtype)))
    ft0 = jnp.broadcast_to(ft0, layout.output_shape(test_shape)).astype(dtype)
    return ft0 + layout.from_2d(delta.astype(dtype), test_shape)


@functools.partial(jax.jit, static_argnames=("layout", "dtype"))
def _mse_finite(evals: Array, evecs: Array, y: Array, f0: Array | None, ft0: Array | None,
                k_td: Array | None, t: Array, scale: Any, *, layout: _Layout, dtype: Any
                ) -> tuple[Array | None, Array | None]:
    tau = (t.reshape(-1, 1) * scale).astype(dtype)
    evals, evecs = evals[None].astype(dtype), evecs.astype(dtype)
    resid = (y if f0 is None else y - f0).astype(dtype)
    coef = evecs.T @ layout.to_2d(resid)  # (p, c)
    fx_train = fx_test = None
    if f0 is not None:
        delta = jnp.einsum("ji,ti,ic->tjc", evecs, _one_minus_decay(evals, tau), coef)
        fx_train = (jnp.broadcast_to(f0, y.shape).astype(dtype)
                    + layout.from_2d(delta, layout.non_trace_shape, t.shape))
    if ft0 is not None:
        test_shape = k_td.shape[::2]
        b = _to_2d(k_td).astype(dtype) @ evecs
        delta = jnp.einsum("qi,ti,ic->tqc", b, _phi(evals, tau), coef)
        ft0 = jnp.broadcast_to(ft0, layout.output_shape(test_shape)).astype(dtype)
        fx_test = ft0 + layout.from_2d(delta, test_shape, t.shape)
    return fx_train, fx_test


@functools.partial(jax.jit, static_argnames=("solver", "layout", "mode", "dtype"))
def _gp_core(sargs: tuple[Array, ...], y: Array, k_td: Array, nngp_td: Array | None,
             k_tt: Array | None, nngp_dd: Array | None, *, solver: str, layout: _Layout,
             mode: str, dtype: Any) -> tuple[Array, Array | None]:
    """Posterior mean and (``mode`` "gp": GP; "ntk": NTK ensemble) covariance."""
    test_shape = k_td.shape[::2]
    k_td2 = _to_2d(k_td)
    y2 = layout.to_2d(y.astype(dtype))
    # one solve for all right-hand sides: [y, K_X*, (NNGP_X*)]
    rhs = [y2] + ([] if mode == "mean" else [k_td2.T]) + (
        [_to_2d(nngp_td).T] if mode == "ntk" else [])
    sol = _solve(solver, sargs, jnp.concatenate(rhs, axis=1))
    q = k_td2.shape[0]
    mean = layout.from_2d((k_td2 @ sol[:, :y2.shape[1]]).astype(dtype), test_shape)
    if mode == "mean":
        return mean, None
    inv_td = sol[:, y2.shape[1]:y2.shape[1] + q]  # K^{-1} K_X*
    k_tt2 = _to_2d(k_tt)
    if mode == "gp":
        cov = k_tt2 - k_td2 @ inv_td
    else:
        cross = k_td2 @ sol[:, y2.shape[1] + q:]  # Theta_*X Theta^{-1} K_X*
        cov = inv_td.T @ _to_2d(nngp_dd) @ inv_td - cross - cross.T + k_tt2
    return mean, _cov_from_2d(cov.astype(dtype), test_shape)


@functools.partial(jax.jit, static_argnames=("layout", "g", "compute_cov", "dtype"))
def _ensemble_finite(evals: Array, evecs: Array, y: Array, t: Array, scale: Any,
                     k_td: Array | None, nngp_dd: Array | None, nngp_td: Array | None,
                     nngp_tt: Array | None, *, layout: _Layout, g: str, compute_cov: bool,
                     dtype: Any) -> tuple[Array, Array | None]:
    """Ensemble mean [and covariance] at times ``t`` (formulas in the public docstring)."""
    tau = (t.reshape(-1, 1) * scale).astype(dtype)
    evals, evecs = evals[None].astype(dtype), evecs.astype(dtype)
    coef = evecs.T @ layout.to_2d(y.astype(dtype))
    if k_td is None:  # training set
        test_shape = layout.non_trace_shape
        mean = jnp.einsum("ji,ti,ic->tjc", evecs, _one_minus_decay(evals, tau), coef)
    else:
        test_shape = k_td.shape[::2]
        b = _to_2d(k_td).astype(dtype) @ evecs  # (q, p)
        mean = jnp.einsum("qi,ti,ic->tqc", b, _phi(evals, tau), coef)
    mean = layout.from_2d(mean, test_shape, t.shape)
    if not compute_cov:
        return mean, None

    nngp_dd = _to_2d(nngp_dd).astype(dtype)
    if k_td is None:
        if g == "nngp":  # K e^{-2 tau K}
            decay2 = jnp.where(evals > 0, evals, 0) * _decay(evals, 2 * tau)
            cov = jnp.einsum("ji,ti,ki->tjk", evecs, decay2, evecs)
        else:  # e^{-tau Theta} K e^{-tau Theta}
            e = jnp.einsum("ji,ti,ki->tjk", evecs, _decay(evals, tau), evecs)
            cov = e @ nngp_dd @ e
    else:
        nngp_tt2 = _to_2d(nngp_tt).astype(dtype)
        if g == "nngp":
            cov = nngp_tt2 - jnp.einsum("qi,ti,ri->tqr", b, _phi(evals, 2 * tau), b)
        else:
            phi = _phi(evals, tau)
            a = jnp.einsum("ji,ti,qi->tjq", evecs, phi, b)  # V phi V^T Theta_{X*}
            cross = jnp.einsum("qi,ti,ri->tqr", b, phi, _to_2d(nngp_td).astype(dtype) @ evecs)
            cov = (jnp.swapaxes(a, -1, -2) @ nngp_dd @ a - cross
                   - jnp.swapaxes(cross, -1, -2) + nngp_tt2)
    return mean, _cov_from_2d(cov, test_shape, t.shape)


@jax.jit
def _lambda_max(k: Array) -> Array:
    return jnp.linalg.eigvalsh(_to_2d(k))[-1]


# Functions of the eigenvalues. Directions with eigenvalue <= 0 (round-off of a PSD kernel) are
# frozen: they neither decay nor move the test outputs; `safe` keeps tau = inf from making NaNs.


def _decay(evals: Array, tau: Array) -> Array:
    r""":math:`e^{-\tau\lambda}` for :math:`\lambda > 0`, else 1."""
    pos = evals > 0
    return jnp.where(pos, jnp.exp(-tau * jnp.where(pos, evals, 1)), 1)


def _one_minus_decay(evals: Array, tau: Array) -> Array:
    r""":math:`1 - e^{-\tau\lambda}` for :math:`\lambda > 0`, else 0."""
    pos = evals > 0
    return jnp.where(pos, -jnp.expm1(-tau * jnp.where(pos, evals, 1)), 0)


def _phi(evals: Array, tau: Array) -> Array:
    r""":math:`(1 - e^{-\tau\lambda})/\lambda` for :math:`\lambda > 0`, else 0."""
    pos = evals > 0
    safe = jnp.where(pos, evals, 1)
    return jnp.where(pos, -jnp.expm1(-tau * safe) / safe, 0)


# ---------------------------------------------------------------------------------------------
# Internal helpers.
# ---------------------------------------------------------------------------------------------


class _KernelPair:
    """Minimal ``.nngp``/``.ntk`` container handed from the ensemble to the GP posterior."""

    def __init__(self, nngp: Array | None = None, ntk: Array | None = None):
        self.nngp = nngp
        self.ntk = ntk


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Axis bookkeeping for ``y_train`` and ``trace_axes`` (kernels <-> matrices); hashable."""

    y_shape: tuple[int, ...]
    trace_axes: tuple[int, ...]  # non-negative, sorted

    @classmethod
    def make(cls, y_train: Any, trace_axes: Axes) -> _Layout:
        shape = tuple(int(d) for d in jnp.shape(y_train))
        ndim = len(shape)
        if ndim == 0:
            raise ValueError("y_train must have a batch axis; got a scalar.")
        axes = (trace_axes,) if isinstance(trace_axes, int) else tuple(trace_axes)
        canon = set()
        for a in axes:
            if not isinstance(a, (int, np.integer)) or not -ndim <= a < ndim:
                raise ValueError(f"trace_axes={trace_axes!r} is invalid for y_train of shape "
                                 f"{shape}: each axis must be an int in [{-ndim}, {ndim}).")
            canon.add(int(a) % ndim)
        if 0 in canon:
            raise ValueError(
                f"trace_axes={trace_axes!r} includes the batch axis 0 of y_train (shape {shape})."
                " For 1-D targets use trace_axes=() or reshape y_train to (n, 1).")
        return cls(shape, tuple(sorted(canon)))

    @property
    def trace(self) -> tuple[int, ...]:
        """Trace axes as negative indices: valid with extra leading (time) axes."""
        return tuple(a - len(self.y_shape) for a in self.trace_axes)

    @property
    def trace_shape(self) -> tuple[int, ...]:
        return tuple(self.y_shape[a] for a in self.trace_axes)

    @property
    def non_trace_shape(self) -> tuple[int, ...]:
        return tuple(s for i, s in enumerate(self.y_shape) if i not in self.trace_axes)

    def to_2d(self, f: Array) -> Array:
        """``y``-like array -> (non-traced entries, traced entries)."""
        f = jnp.moveaxis(f, self.trace, tuple(range(-len(self.trace), 0)))
        return f.reshape((-1, math.prod(self.trace_shape)))

    def from_2d(self, m: Array, non_trace_shape: tuple[int, ...],
                lead: tuple[int, ...] = ()) -> Array:
        """(lead..., rows, traced entries) -> ``y``-like array with leading ``lead`` axes."""
        m = m.reshape(tuple(lead) + tuple(non_trace_shape) + self.trace_shape)
        return jnp.moveaxis(m, tuple(range(-len(self.trace), 0)), self.trace)

    def output_shape(self, non_trace_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Full output shape for a batch whose non-traced shape is ``non_trace_shape``."""
        shape = list(non_trace_shape)
        for a in self.trace_axes:
            shape.insert(a, self.y_shape[a])
        return tuple(shape)

    def check_kernel(self, k: Any, name: str, *, square: bool) -> tuple[int, ...]:
        """Validates a kernel's shape against ``y_train``; returns its first-batch shape."""
        shape = tuple(jnp.shape(k))
        nt = self.non_trace_shape
        expected_train = tuple(d for s in nt for d in (s, s))
        if len(shape) != 2 * len(nt) or shape[1::2] != nt or (square and shape[::2] != nt):
            if square:
                want = f"shape {expected_train}"
            else:
                want = f"{2 * len(nt)} axes with the train sizes {nt} at the odd positions"
            raise ValueError(
                f"{name} has shape {shape}, but y_train of shape {self.y_shape} with "
                f"trace_axes={self.trace_axes} needs {want}. A kernel has shape "
                "zip(f1.shape, f2.shape) without the trace axes: with (n, k) targets an "
                "(n1, n2) kernel needs trace_axes=(-1,), an (n1, n2, k, k) one trace_axes=().")
        return shape[::2]


def _check_square_test(k: Any, test_shape: tuple[int, ...], name: str) -> None:
    shape = tuple(jnp.shape(k))
    expected = tuple(d for s in test_shape for d in (s, s))
    if shape != expected:
        raise ValueError(f"{name} has shape {shape}; expected {expected} to match k_test_train.")


def _check_broadcast(x: Array, shape: tuple[int, ...], name: str) -> None:
    try:
        if np.broadcast_shapes(jnp.shape(x), shape) == shape:
            return
    except ValueError:
        pass
    raise ValueError(f"{name} has shape {jnp.shape(x)}, not broadcastable to the expected "
                     f"output shape {shape}.")


def _to_2d(k: Array) -> Array:
    """Interleaved kernel ``(a1, b1, a2, b2, ...)`` -> matrix ``(a1*a2*..., b1*b2*...)``."""
    if k.ndim % 2:
        raise ValueError(f"A kernel must have an even number of axes; got shape {k.shape}.")
    half = k.ndim // 2
    k = jnp.moveaxis(k, tuple(range(1, k.ndim, 2)), tuple(range(half, k.ndim)))
    return k.reshape((math.prod(k.shape[:half]), math.prod(k.shape[half:])))


def _cov_from_2d(cov: Array, shape: tuple[int, ...], lead: tuple[int, ...] = ()) -> Array:
    """``(lead..., P, P)`` -> ``lead + zip(shape, shape)`` (inverse of :func:`_to_2d`)."""
    n, ln = len(shape), len(lead)
    cov = cov.reshape(tuple(lead) + tuple(shape) * 2)
    return jnp.moveaxis(cov, tuple(range(ln + n, ln + 2 * n)), tuple(range(ln + 1, ln + 2 * n, 2)))


def _float_dtype(*xs: Any) -> Any:
    dtype = jnp.result_type(*[x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype
                              for x in xs])
    if not jnp.issubdtype(dtype, jnp.inexact):
        dtype = jnp.result_type(dtype, float)
    return np.dtype(dtype)


def _is_concrete(*trees: Any) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(trees))


def _pack(fx_train: Array | None, fx_test: Array | None) -> Any:
    if fx_test is None:
        return fx_train
    if fx_train is None:
        return fx_test
    return fx_train, fx_test


def _check_inputs(fx_train_or_state_0: Any, fx_test_0: Any, k_test_train: Any) -> None:
    if isinstance(fx_train_or_state_0, ODEState):
        if fx_test_0 is not None:
            raise ValueError("fx_test_0 is part of the ODEState and must be None.")
        fx_train_0, fx_test_0 = fx_train_or_state_0.fx_train, fx_train_or_state_0.fx_test
    else:
        fx_train_0 = fx_train_or_state_0
    if fx_train_0 is None and fx_test_0 is None:
        raise ValueError("Both fx_train_0 and fx_test_0 are None: nothing to predict.")
    if fx_test_0 is not None and k_test_train is None:
        raise ValueError("Predictions on the test set (fx_test_0 given) need k_test_train.")


def _as_kernel_array(k: Any, name: str) -> Array:
    if hasattr(k, "ntk") or hasattr(k, "nngp"):
        raise TypeError(f"{name} must be an array; got {type(k).__name__}. Pass e.g. `{name}.ntk`"
                        " (gradient descent dynamics are governed by the NTK).")
    return jnp.asarray(k)


def _has_nngp(k: Any) -> bool:
    return getattr(k, "nngp", None) is not None


def _kernel_attr(k: Any, g: str, name: str) -> Array:
    """``k`` itself if an array, else ``k.<g>`` (``Kernel``/namedtuple)."""
    if k is None:
        raise ValueError(f"{name} is None but the {g!r} kernel is needed.")
    if not (hasattr(k, "nngp") or hasattr(k, "ntk")) and hasattr(k, "shape"):
        return jnp.asarray(k)
    v = getattr(k, g, None)
    if v is None:
        raise ValueError(f"{name} ({type(k).__name__}) has no {g!r} kernel, which get= needs.")
    return jnp.asarray(v)


def _fetch(res: Any, g: str) -> Array:
    """``g`` from a ``kernel_fn`` result (array, namedtuple, ``Kernel``, or dict)."""
    if isinstance(res, dict):
        if g not in res:
            raise ValueError(f"kernel_fn returned a dict without {g!r}.")
        return res[g]
    if hasattr(res, g):
        v = getattr(res, g)
        if v is None:
            raise ValueError(f"kernel_fn returned {type(res).__name__} with {g}=None.")
        return v
    if hasattr(res, "shape"):
        return res
    raise ValueError(f"kernel_fn returned {type(res).__name__}, expected an array or an object "
                     f"with a {g!r} attribute.")


def _canonicalize_get(get: Get, allowed: tuple[str, ...]) -> tuple[bool, tuple[str, ...]]:
    """``(get was a single string, tuple of lowercase names)``, validated."""
    if get is None:
        return False, ("nngp", "ntk")
    is_str = isinstance(get, str)
    gets = (get,) if is_str else tuple(get)
    if not gets:
        raise ValueError("get must be non-empty.")
    if not all(isinstance(g, str) for g in gets):
        raise ValueError(f"get must be a string or a tuple of strings; got {get!r}.")
    gets = tuple(g.lower() for g in gets)
    if len(set(gets)) < len(gets):
        raise ValueError(f"All entries of get must be unique; got {get!r}.")
    bad = [g for g in gets if g not in allowed]
    if bad:
        raise ValueError(f"get={get!r}: {bad} not supported here; choose from {allowed}.")
    return is_str, gets


_NAMEDTUPLES: dict[tuple[str, tuple[str, ...]], type] = {}


def _format_get(out: dict[str, Any], is_str: bool, name: str) -> Any:
    if is_str:
        return next(iter(out.values()))
    fields = tuple(out)
    if (name, fields) not in _NAMEDTUPLES:
        _NAMEDTUPLES[(name, fields)] = collections.namedtuple(name, fields)
    return _NAMEDTUPLES[(name, fields)](*out.values())


def _merge_kwargs(train_kw: dict[str, Any], test_kw: dict[str, Any]
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword arguments for the test-train and test-test ``kernel_fn`` calls (NT's rule)."""
    kw_td, kw_tt = dict(train_kw), dict(train_kw)

    def is_arrays(v: Any) -> bool:
        leaves = jax.tree_util.tree_leaves(v)
        return bool(leaves) and all(hasattr(x, "shape") for x in leaves)

    def is_pair(v: Any) -> bool:
        return isinstance(v, tuple) and len(v) == 2

    for key, v_tt in test_kw.items():
        v_td = v_tt
        if key in train_kw:
            v_dd = train_kw[key]
            if is_arrays(v_dd) and is_arrays(v_tt):
                if is_pair(v_dd) and is_pair(v_tt):
                    v_td = (v_tt[0], v_dd[0])
            elif v_dd is not v_tt and v_dd != v_tt:
                raise ValueError(
                    f"kernel_fn keyword {key!r} is {v_dd!r} for the train-train kernel but "
                    f"{v_tt!r} for the test kernels; they must agree.")
        kw_td[key], kw_tt[key] = v_td, v_tt
    return kw_td, kw_tt


class _TrainFactors:
    """Lazily computed, cached factorisations of the regularised train-train kernel(s).

    Values computed from concrete inputs are cached (and computed eagerly even when first
    requested inside ``jit``); values that depend on tracers are recomputed per call so that
    no tracer outlives its trace.
    """

    def __init__(self, get_kernel: Callable[[str], Array], diag_reg: float,
                 absolute: bool, name: str,
                 get_kernels: Callable[[tuple[str, ...]], dict[str, Array]] | None = None,
                 inputs: Any = ()):
        self._get_kernel = get_kernel
        self._inputs = inputs  # what the kernels are computed from (for concreteness)
        self._get_kernels = get_kernels
        self._diag_reg = diag_reg
        self._absolute = bool(absolute)
        self._name = name
        self._cache: dict[tuple[str, str], Any] = {}

    def _cached(self, key: tuple[str, str], compute: Callable[[], Any], inputs: Any) -> Any:
        if key in self._cache:
            return self._cache[key]
        value = compute()
        if not _is_concrete(value) and _is_concrete(inputs):
            # Called inside jit/grad on concrete data: compute it now, once, instead of
            # staging it into every trace. (Not done by default: tracing a jitted function
            # under ensure_compile_time_eval evaluates its constants op by op.)
            with jax.ensure_compile_time_eval():
                value = compute()
        if _is_concrete(value):
            self._cache[key] = value
        return value

    def prefetch(self, gets: tuple[str, ...]) -> None:
        """Computes several missing kernels in one call (``kernel_fn`` with a tuple ``get``)."""
        missing = tuple(g for g in gets if ("kernel", g) not in self._cache)
        if len(missing) < 2 or self._get_kernels is None:
            return
        ks = self._cached(("kernels", ",".join(missing)), lambda: self._get_kernels(missing),
                          self._inputs)
        for g in missing:
            self._cached(("kernel", g), lambda g=g: jnp.asarray(ks[g]), ks)

    def kernel(self, g: str) -> Array:
        return self._cached(("kernel", g), lambda: jnp.asarray(self._get_kernel(g)),
                            self._inputs)

    def _check_finite(self, g: str, finite: Array) -> None:
        if _is_concrete(finite) and not bool(finite):
            raise ValueError(f"{self._name} ({g}) contains NaN or inf.")

    def cholesky(self, g: str) -> tuple[Array, Array, Array]:
        """``(regularised kernel, lower Cholesky factor, factor is finite)``."""
        def compute() -> tuple[Array, Array, Array]:
            a, chol, ok, finite = _factor_cholesky(self.kernel(g), self._diag_reg,
                                                   absolute=self._absolute)
            self._check_finite(g, finite)
            if _is_concrete(ok) and not bool(ok):
                warnings.warn(
                    f"{self._name} ({g}) with diag_reg={self._diag_reg} is not numerically "
                    "positive definite (Cholesky failed); using the eigendecomposition "
                    "pseudo-inverse instead. Consider a small diag_reg (e.g. 1e-6 relative) "
                    "or float64.", stacklevel=5)
            return a, chol, ok
        return self._cached(("chol", g), compute, self.kernel(g))

    def solver(self, g: str) -> tuple[str, tuple[Array, ...]]:
        """``(kind, factors)`` for :func:`_solve`; the kind is static when known eagerly."""
        a, chol, ok = self.cholesky(g)
        if not _is_concrete(ok):
            return "cond", (a, chol, ok)
        if bool(ok):
            return "chol", (chol,)
        return "pinv", self.eigh(g)

    def eigh(self, g: str) -> tuple[Array, Array]:
        """Eigenvalues (ascending) and eigenvectors of the regularised kernel."""
        def compute() -> tuple[Array, Array]:
            evals, evecs, finite = _factor_eigh(self.kernel(g), self._diag_reg,
                                                absolute=self._absolute)
            self._check_finite(g, finite)
            return evals, evecs
        return self._cached(("eigh", g), compute, self.kernel(g))
