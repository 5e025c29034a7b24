"""`scan`: loops over layers (`nn.scan`, `jax.lax.scan` over stacked parameters).

A scan of length L is the composition of L copies of its body. Unrolled, iteration i
sees slice i of each scanned-over input. For stacked parameters (`nn.scan(...,
variable_axes={"params": 0})`: a leaf (L, *shape) holding L independent draws) the
slices are independent parameters, one per layer, so each iteration is an ordinary
layer with fresh weights: the unrolled network's kernel is exact. A parameter passed
to every iteration unsliced (`variable_broadcast="params"`, a recurrent cell's weights
in `nn.RNN`) is one weight used by all steps (weight sharing): `Interpreter.claim`
accepts it for dense weights and biases, whose uses' joint law `sharing` tracks, and
a scan's per-step output fields are stacked with their cross-step moments.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from infinite_modules.errors import InfiniteWidthError
from infinite_modules.interpreter import RULES, Interpreter, run_jaxpr
from infinite_modules.values import Concrete, Field, ParamRef


def _closed(e):
  j = e.params["jaxpr"]
  return j.jaxpr, j.consts


def _param_slice(ref: ParamRef, i: int) -> ParamRef:
  """Layer i of a stacked parameter: its own entries, claimed under their own key."""
  return dataclasses.replace(ref, leaf=(ref.leaf, "layer", ref.leaf_axes[0], i),
                             shape=ref.shape[1:], leaf_axes=ref.leaf_axes[1:])


def _concrete_slice(eqn, v: Concrete, i: int) -> Concrete:
  if v.batch_axis == 0:
    raise eqn.error("a scan over the batch axis processes examples one after the other "
                    "through a carry, which can mix them.", "Scan over layers or positions.")
  batch_axis = None if v.batch_axis is None else v.batch_axis - 1
  v1 = jnp.asarray(v.v1)[i]
  v2 = v1 if v.v2 is v.v1 else jnp.asarray(v.v2)[i]
  const = frozenset(a - 1 for a in v.const_axes if a > 0)
  return Concrete(v1, v2, batch_axis, const)


def scan_rule(interp: Interpreter, eqn, invals):
  """Unrolls the scan: carry_{i+1}, y_i = body(consts, carry_i, xs[i])."""
  p = eqn.params
  length, n_consts, n_carry = p["length"], p["num_consts"], p["num_carry"]
  consts, carry, xs = (invals[:n_consts], invals[n_consts:n_consts + n_carry],
                       invals[n_consts + n_carry:])
  for x in xs:
    if isinstance(x, Field):
      raise eqn.error(
          "a scan over the positions of a field (a recurrence fed by a hidden layer, e.g. "
          "an RNN on top of an embedding or of another RNN): the cross-step moments of "
          "per-step slices of a field are not tracked; recurrences over the network's "
          "input are supported.",
          "Feed the recurrence the input sequence itself, or use "
          "`interop.monte_carlo_kernel_fn`.")
    if isinstance(x, ParamRef):
      if x.leaf_axes[0] is None:
        raise eqn.error(f"the parameter `{x.path}` is broadcast along the scanned axis: every "
                        "iteration would use the same weights (weight sharing).")
      # The whole leaf belongs to this scan; its layers are claimed one by one below.
      interp.claim(x, eqn)
  (j1, c1), (j2, c2), (jp, _) = (_closed(e) for e in (eqn.e1, eqn.e2, eqn.ep))
  order = range(length - 1, -1, -1) if p["reverse"] else range(length)
  ys = {}
  for i in order:
    x_i = [_param_slice(x, i) if isinstance(x, ParamRef) else _concrete_slice(eqn, x, i)
           for x in xs]
    try:
      outs = run_jaxpr(interp, j1, j2, jp, c1, c2, [*consts, *carry, *x_i], prefix=eqn.where)
    except InfiniteWidthError as e:
      if n_carry and length > 1 and not any(isinstance(x, ParamRef) for x in xs):
        raise _recurrence_error(eqn, length, e) from e
      raise
    carry = outs[:n_carry]
    ys[i] = outs[n_carry:]
  stacked = []
  for k in range(len(eqn.e1.outvars) - n_carry):
    per_step = [ys[i][k] for i in range(length)]
    if all(isinstance(y, Concrete) for y in per_step):
      stacked.append(_stack(eqn, per_step))
    elif all(isinstance(y, Field) for y in per_step):
      # Per-step outputs (a recurrence's states): their cross-step moments (`sharing`).
      stacked.append(interp.sharing.stack(interp, eqn, per_step))
    else:
      raise eqn.error("a scan stacks per-step outputs that are fields at some steps and "
                      "input-only values at others.")
  return [*carry, *stacked]


def _recurrence_error(eqn, length: int, cause: Exception):
  """The error of a recurrent cell's step, named as a recurrence."""
  return eqn.error(
      f"the recurrence scanned here (a cell applied at each of its {length} steps with the "
      f"same weights, as in nn.RNN) has no exact kernel: {cause} -- Recurrences "
      "h_t = phi(W_i x_t + W_h h_{t-1} + b) (nn.SimpleCell, hk.VanillaRNN) are exact; gated "
      "cells (nn.LSTMCell, nn.OptimizedLSTMCell, nn.GRUCell) multiply their state by a gate "
      "(c_t = f_t * c_{t-1} + i_t * g_t, h_t = (1 - z_t) * n_t + z_t * h_{t-1}): products of "
      "dependent non-Gaussian fields, which have no exact kernel rule.",
      "Use nn.SimpleCell, or `interop.monte_carlo_kernel_fn` for a Monte Carlo estimate.")


def _stack(eqn, values) -> Concrete:
  axes = {v.batch_axis for v in values}
  if len(axes) != 1:
    raise eqn.error("unexpected scan output layout.")
  (axis,) = axes
  v1 = jnp.stack([jnp.asarray(v.v1) for v in values])
  v2 = v1 if all(v.v2 is v.v1 for v in values) else jnp.stack([jnp.asarray(v.v2) for v in values])
  return Concrete(v1, v2, None if axis is None else axis + 1)


RULES["scan"] = scan_rule
