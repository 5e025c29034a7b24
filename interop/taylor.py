"""Linearized and Taylor-expanded models with the call signature of the original.

For trainable parameters ``theta`` (Flax ``params``, NNX ``Param``, Haiku params, or
all leaves of ``params`` for a plain ``f``) and ``delta = theta - theta_0``:

.. math::

   f_\\text{lin}(\\theta, x) = f(\\theta_0, x) + J_{\\theta_0}(x)\\, \\delta,
   \\qquad
   f_\\text{tay}(\\theta, x) = \\sum_{k=0}^{d} \\frac{1}{k!}\\,
   D^k f(\\theta_0, x)[\\delta, \\ldots, \\delta].

The returned functions take exactly the arguments of the model's apply function
(``module.apply(variables, x, train=..., mutable=..., rngs=...)``,
``transformed.apply(params, rng, x)``, ``transformed.apply(params, state, rng, x)``,
``f(params, x)``), so they drop into an optax training loop in place of ``apply``.
Non-trainable inputs (``batch_stats``, Haiku state, RNG keys, ...) are taken from the
call, not from ``theta_0``. Auxiliary outputs (Flax ``mutable`` updates, Haiku's new
state) are the original model's, evaluated at ``theta_0``: they are bookkeeping, not
part of the expansion.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from interop.adapters import adapt

PyTree = Any

__all__ = ["linearize", "taylor_expand"]


def _is_float(x: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _delta(p: PyTree, p0: PyTree) -> PyTree:
  def sub(a: Any, b: Any) -> Any:
    if _is_float(b):
      return jnp.asarray(a, jnp.result_type(b)) - b
    return np.zeros(np.shape(b), jax.dtypes.float0)
  return jax.tree_util.tree_map(sub, p, p0)


def _base(p: PyTree, p0: PyTree) -> PyTree:
  """``theta_0`` for floating leaves, the call's value for the others (e.g. counters)."""
  return jax.tree_util.tree_map(lambda a, b: b if _is_float(b) else a, p, p0)


def _check_structure(p: PyTree, p0: PyTree) -> None:
  s, s0 = jax.tree_util.tree_structure(p), jax.tree_util.tree_structure(p0)
  if s != s0:
    raise ValueError("The parameters passed to the expanded function must have the "
                     f"structure of params_0; got {s} and {s0}.")
  for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(p0)):
    if np.shape(a) != np.shape(b):
      raise ValueError(f"Parameter shape {np.shape(a)} does not match params_0's "
                       f"{np.shape(b)}.")


def linearize(f: Any, params_0: Any) -> Callable[..., Any]:
  """First-order Taylor expansion of ``f`` around ``params_0`` (NT's ``linearize``).

  Args:
    f: ``f(params, *args, **kwargs)``, a Flax linen module or its bound ``.apply``, an
      NNX module (called as ``f_lin(state, *args)``), or a Haiku transform.
    params_0: the expansion point, in the form the first argument of ``f`` takes
      (Flax variables dict, ``nnx.State``, Haiku params, params pytree).

  Returns:
    ``f_lin`` with the signature of ``f``:
    ``f_lin(theta) = f(theta_0) + jvp(f, theta_0, theta - theta_0)``, computed with one
    forward-mode pass (no Jacobian is formed).
  """
  return taylor_expand(f, params_0, 1)


def taylor_expand(f: Any, params_0: Any, degree: int) -> Callable[..., Any]:
  """``degree``-order Taylor expansion of ``f`` in its trainable parameters.

  The ``k``-th term ``D^k f(theta_0)[delta]^k / k!`` is a ``k``-fold nested ``jax.jvp``
  along ``delta = theta - theta_0``, so the expansion of a polynomial of degree
  ``<= degree`` in the parameters is exact. Arguments as in :func:`linearize`.

  Raises:
    ValueError: if ``degree`` is not a non-negative integer.
  """
  if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or degree < 0:
    raise ValueError(f"`degree` must be a non-negative int, got {degree!r}.")
  degree = int(degree)
  adapter = adapt(f)
  theta_0, _ = adapter.call_split(params_0)

  def f_expanded(variables: Any, *args: Any, **kwargs: Any) -> Any:
    theta, rest = adapter.call_split(variables)
    _check_structure(theta, theta_0)
    delta = _delta(theta, theta_0)
    base = _base(theta, theta_0)

    def model(q: PyTree) -> tuple[PyTree, Any]:
      raw = adapter.call(adapter.call_merge(q, rest), *args, **kwargs)
      return adapter.split_output(raw, args, kwargs)

    out_0, aux = model(base)
    if degree == 0:
      return adapter.join_output(out_0, aux)

    def main(q: PyTree) -> PyTree:
      return model(q)[0]

    def derivatives(order: int) -> Callable[[PyTree], list[PyTree]]:
      """``q -> [D^1 f(q)[delta], ..., D^order f(q)[delta]^order]``."""
      if order == 1:
        return lambda q: [jax.jvp(main, (q,), (delta,))[1]]
      lower = derivatives(order - 1)

      def nested(q: PyTree) -> list[PyTree]:
        prim, tan = jax.jvp(lower, (q,), (delta,))
        return [prim[0]] + tan
      return nested

    terms = derivatives(degree)(base)
    out = out_0
    for k, term in enumerate(terms, start=1):
      out = jax.tree_util.tree_map(lambda o, t, k=k: o + t / math.factorial(k), out, term)
    return adapter.join_output(out, aux)

  return f_expanded
