"""The kernel interpreter: walks a model's jaxpr with abstract values.

The model is traced three times with identical structure: on the first
batch, on the second batch, and on a probe batch of a different size; an
axis whose size differs between the first and the probe trace is the batch
axis (so a batch of size 1 is never confused with a unit axis). Equations of
the three traces are walked in lockstep; each primitive's rule (from
`RULES`, keyed by primitive name, extensible with `register_rule`) maps the
abstract values of its inputs to those of its outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from infinite_modules.errors import unsupported
from infinite_modules.values import Concrete, Field, ParamRef

Rule = Callable[..., list]
RULES: dict[str, Rule] = {}
_USER_RULES: set[str] = set()


def register_rule(name: str, rule: Rule | None = None):
  """Registers a kernel transfer rule for the primitive called `name`.

  A rule is `rule(interp, eqn, invals) -> list of outvals`: `eqn` is an
  `Eqn` (the equation in the three traces, its params and module path),
  `invals` the abstract values (`Concrete`, `ParamRef`, `Field`) of its
  inputs. Usable as a decorator. A user rule replaces the built-in one.
  """
  if rule is None:
    return lambda r: register_rule(name, r)
  RULES[name] = rule
  SYMMETRIC_RULES.discard(name)  # not known to compute both sides of a pair alike
  _USER_RULES.add(name)
  return rule


@dataclasses.dataclass
class Eqn:
  """One equation seen in the three traces (first batch, second batch, probe)."""
  e1: jcore.JaxprEqn
  e2: jcore.JaxprEqn
  ep: jcore.JaxprEqn
  # Module path of the enclosing call (a jit/pjit sub-jaxpr's name stacks are
  # relative to the call site).
  prefix: str = ""

  @property
  def name(self) -> str:
    return self.e1.primitive.name

  @property
  def primitive(self):
    return self.e1.primitive

  @property
  def params(self) -> dict:
    return self.e1.params

  @property
  def where(self) -> str:
    stack = str(getattr(self.e1.source_info, "name_stack", "") or "")
    return "/".join(part for part in (self.prefix, stack) if part)

  def out_batch_axis(self, k: int = 0) -> int | None:
    return batch_axis_of(self.e1.outvars[k].aval.shape, self.ep.outvars[k].aval.shape)

  def out_shape(self, k: int = 0, side: int = 1):
    eqn = self.e1 if side == 1 else self.e2
    return tuple(eqn.outvars[k].aval.shape)

  def error(self, why: str, hint: str | None = None):
    return unsupported(self.name, self.where, why, hint)


def batch_axis_of(shape1, shape_probe) -> int | None:
  diff = [i for i, (a, b) in enumerate(zip(shape1, shape_probe)) if a != b]
  if len(shape1) != len(shape_probe) or len(diff) > 1:
    raise unsupported("reshape", "", "an intermediate mixes the batch axis with other axes.",
                      "Keep examples independent.")
  return diff[0] if diff else None


@dataclasses.dataclass
class Interpreter:
  """State of one kernel evaluation."""
  full: bool
  parameterization: str
  n1: int
  n2: int
  dtype: jnp.dtype
  points: int
  # x2=None: both batches are the same, so (a, a) pairs are points paired with themselves;
  # or an (n1, n2) boolean array marking such pairs when the batches are two blocks of
  # one batch (x2=None computed by blocks; see `moments.same_point`).
  same_batch: object = False
  # x2=None: whether every step so far computed each pair array's entries (a, b) and
  # (b, a) by the same floating-point operations (see `SYMMETRIC_RULES`), so the
  # kernel is exactly symmetric without a final (k + k^T) / 2, whose transposed reads
  # XLA fuses into the last layer's elementwise work (doubling an MLP's time).
  symmetric: bool = True
  used_params: set = dataclasses.field(default_factory=set)
  materialized: dict = dataclasses.field(default_factory=dict)
  # Steps estimated rather than computed exactly, and the sum of their error bounds.
  estimates: list = dataclasses.field(default_factory=list)
  error: object = 0.0
  # Uses of every parameter and the joint law of shared weights' outputs (`sharing`).
  sharing: object = None
  # (key, sign) when the kernel is computed one draw of the 1/sqrt(head_dim) attention
  # logits at a time (`logit_draws`): each attention layer then draws sign * (one joint
  # sample) and returns the conditional Gaussian moments of its output.
  logit_draw: object = None

  def __post_init__(self):
    from infinite_modules.sharing import SharedWeights
    self.sharing = SharedWeights(self)

  def record_estimate(self, eqn: Eqn, method: str, error) -> None:
    """Marks the kernel as estimated at `eqn` with an absolute error bound `error`
    (a scalar, possibly traced) on the kernel entries it affects."""
    from infinite_modules.kernel import Estimate
    self.estimates.append(Estimate(f"`{eqn.name}` at {eqn.where or '<top level>'}", method))
    self.error = self.error + error

  def grad_coefficient(self, prior) -> float:
    """Weight of a parameter's gradient in the NTK.

    NTK parameterization trains theta = mean + std * omega in omega, so the
    gradient w.r.t. omega is std * (gradient w.r.t. theta): coefficient std^2.
    Standard parameterization trains theta itself: coefficient 1.
    """
    return prior.variance if self.parameterization == "ntk" else 1.0

  def claim(self, ref: ParamRef, eqn: Eqn, shareable: bool = False):
    """Records that `eqn` uses the parameter `ref`.

    A parameter used again (weight sharing: a module called twice, a scan with
    broadcast parameters, a recurrent cell) is allowed only where every use is
    `shareable`: dense weights and biases, whose uses' joint law `sharing` tracks;
    any other reuse raises an error naming the parameter and its uses.
    """
    self.sharing.claim(ref, eqn, shareable)
    self.used_params.add(ref.leaf)


def _literal_value(v):
  return np.asarray(v.val)


def run_jaxpr(interp: Interpreter, j1, j2, jp, consts1, consts2, invals, prefix: str = ""):
  """Interprets one (sub-)jaxpr given in its three traces; `prefix` is the module
  path of the call that contains it."""
  env: dict = {}

  def read(var):
    if isinstance(var, jcore.Literal):
      val = _literal_value(var)
      return Concrete(val, val, None)
    return env[var]

  for v, c1, c2 in zip(j1.constvars, consts1, consts2):
    env[v] = Concrete(c1, c2, None)
  for v, x in zip(j1.invars, invals):
    env[v] = x
  if not len(j1.eqns) == len(j2.eqns) == len(jp.eqns):
    raise unsupported(
        "trace", prefix, "the model's jaxpr changes with the batch size "
        f"({len(j1.eqns)}, {len(j2.eqns)} and {len(jp.eqns)} equations in the traces of the "
        "first batch, the second batch and a probe batch), so their steps cannot be matched.",
        "Make the model's operations independent of the batch size (no Python branches on "
        "x.shape[0], no squeeze of the batch axis).")
  for e1, e2, ep in zip(j1.eqns, j2.eqns, jp.eqns):
    eqn = Eqn(e1, e2, ep, prefix)
    invals_e = [read(v) for v in e1.invars]
    outs = apply_rule(interp, eqn, invals_e)
    for v, o in zip(e1.outvars, outs):
      env[v] = o
  return [read(v) for v in j1.outvars]


def apply_rule(interp: Interpreter, eqn: Eqn, invals):
  deferred = [v for v in invals if hasattr(v, "consumed_by")]
  if deferred:
    # A value whose limit depends on how it is used next (attention logits: the scale
    # applied after the product decides between deterministic and Gaussian logits).
    interp.symmetric = False
    outs = deferred[0].consumed_by(interp, eqn, invals)
    if outs is not None:
      return outs
    invals = [v.resolve(eqn) if hasattr(v, "consumed_by") else v for v in invals]
  if all(isinstance(v, Concrete) for v in invals) and eqn.name not in _ALWAYS_RULE:
    return evaluate_concrete(eqn, invals)
  rule = RULES.get(eqn.name)
  if rule is None:
    raise eqn.error("there is no kernel transfer rule for it on infinite-width fields or "
                    "parameters.")
  if eqn.name not in SYMMETRIC_RULES and not _elementwise(eqn.name):
    interp.symmetric = False
  return rule(interp, eqn, invals)


# Built-in rules that compute the two sides of every pair array alike, given
# symmetric inputs in the diagonal layout: per-position linear maps and sums
# (weights, convolution windows, slices, padding, reshapes), elementwise
# expressions (whose moments `elementwise.materialize` computes symmetrically:
# closed forms are symmetric functions of (c, va, vb); quadratures are mirrored
# there), sums of independent fields, biases and scales. A rule not listed
# here (attention, embeddings, scans, a user's rule) makes the kernel of
# `x2=None` mirrored at the end instead. Checked by
# tests/test_kernel_speed_structure.py.
SYMMETRIC_RULES: set[str] = {
    "dot_general", "conv_general_dilated", "reshape", "squeeze", "expand_dims", "transpose",
    "broadcast_in_dim", "reduce_sum", "slice", "pad", "pjit", "jit", "closed_call",
    "core_call", "remat", "checkpoint", "remat2", "custom_jvp_call", "custom_vjp_call",
    "custom_vjp_call_jaxpr"}


# Primitives whose rule must run even on concrete inputs.
_ALWAYS_RULE: set[str] = set()


def evaluate_concrete(eqn: Eqn, invals) -> list:
  """Evaluates a primitive on both batches (values depending on inputs only)."""
  in_batch = any(v.batch_axis is not None for v in invals)
  constant = not any(isinstance(v.v1, jax.core.Tracer) or isinstance(v.v2, jax.core.Tracer)
                     for v in invals)
  # A value with no batch axis in any input can still have one in its output
  # (jnp.zeros_like(x) is a broadcast of a literal to x's shape): it is then
  # evaluated on the second batch's shapes as well.
  axes = [eqn.out_batch_axis(k) for k in range(len(eqn.e1.outvars))]
  batch_out = any(axis is not None for axis in axes)
  # Values not computed from traced inputs (BatchNorm running statistics, a
  # structurally zero channel mean) stay concrete even inside a jit trace, so
  # their values can be checked.
  with jax.ensure_compile_time_eval() if constant else contextlib.nullcontext():
    outs1 = _bind(eqn.e1, [v.v1 for v in invals])
    # x2=None: the second batch is the first one (one trace, the same input arrays),
    # so its values are the first batch's, computed once.
    same = eqn.e2 is eqn.e1 and all(v.v2 is v.v1 for v in invals)
    if (in_batch or batch_out) and not same:
      outs2 = _bind(eqn.e2, [v.v2 for v in invals])
    else:
      outs2 = outs1
  results = []
  for k, (o1, o2, axis) in enumerate(zip(outs1, outs2, axes)):
    if in_batch and axis is None and np.ndim(o1) >= 0 and _depends_on_batch(eqn):
      raise eqn.error("it combines different examples of the batch (e.g. batch "
                      "statistics), so the kernel of one pair of inputs would depend on the "
                      "others.", "Use running averages (e.g. BatchNorm(use_running_average=True)).")
    results.append(Concrete(o1, o2 if axis is not None else o1, axis,
                            _const_axes(eqn, invals, k)))
  return results


def _depends_on_batch(eqn: Eqn) -> bool:
  return eqn.name not in ("iota", "shape")


def _bind(e, vals):
  out = e.primitive.bind(*vals, **e.params)
  return list(out) if e.primitive.multiple_results else [out]


def _const_axes(eqn: Eqn, invals, k) -> frozenset:
  """Axes along which a concrete output is known constant (for channel checks)."""
  shape = eqn.out_shape(k)
  name = eqn.name
  if name == "broadcast_in_dim":
    (v,) = invals[:1]
    dims = eqn.params["broadcast_dimensions"]
    in_shape = np.shape(v.v1)
    const = {i for i in range(len(shape)) if i not in dims}
    for j, i in enumerate(dims):
      if _unit(v, j, in_shape) or j in v.const_axes:
        const.add(i)
    return frozenset(const)
  if name in ("reduce_max", "reduce_min", "reduce_sum", "argmax", "argmin"):
    # A reduction keeps the constant axes it does not reduce (softmax over keys of
    # attention logits that are the same in every head).
    (v,) = invals[:1]
    reduced = set(eqn.params["axes"])
    kept = [i for i in range(np.ndim(v.v1)) if i not in reduced]
    return frozenset(j for j, i in enumerate(kept) if i in v.const_axes)
  if name == "stop_gradient":
    return invals[0].const_axes
  from infinite_modules.elementwise import ELEMENTWISE
  if name in ELEMENTWISE:
    const = set(range(len(shape)))
    for v in invals:
      vs = np.shape(v.v1)
      offset = len(shape) - len(vs)
      own = {i for i in range(len(shape)) if i < offset or _unit(v, i - offset, vs)
             or (i - offset) in v.const_axes}
      const &= own
    return frozenset(const)
  return frozenset()


def _unit(v: Concrete, axis: int, shape) -> bool:
  """A size-1 axis that broadcasts: not the batch axis, which varies with the
  example even when the batch has a single example."""
  return shape[axis] == 1 and axis != v.batch_axis


def enter_call(interp: Interpreter, eqn: Eqn, invals):
  """Rule for call-like primitives: interpret the inner jaxpr."""
  inner = [_inner_jaxpr(e) for e in (eqn.e1, eqn.e2, eqn.ep)]
  (j1, c1), (j2, c2), (jp, _) = inner
  return run_jaxpr(interp, j1, j2, jp, c1, c2, invals, prefix=eqn.where)


def _inner_jaxpr(e):
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    if key in e.params:
      j = e.params[key]
      if isinstance(j, jcore.ClosedJaxpr):
        return j.jaxpr, j.consts
      return j, ()
  raise unsupported(e.primitive.name, "", "call primitive without an inner jaxpr.")


for _name in ("pjit", "jit", "closed_call", "core_call", "remat", "checkpoint",
              "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "remat2"):
  RULES[_name] = enter_call
  _ALWAYS_RULE.add(_name)


def field_or_param(invals) -> bool:
  return any(isinstance(v, (Field, ParamRef)) for v in invals)


def as_array_pair(v: Concrete):
  return jnp.asarray(v.v1), jnp.asarray(v.v2)


def concrete_scalar(v) -> float | None:
  """A python float if v is a concrete input-independent scalar (else None)."""
  if isinstance(v, Concrete) and v.batch_axis is None and np.size(v.v1) == 1:
    try:
      return float(np.asarray(v.v1).reshape(()))
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
      return None
  return None



def _elementwise(name: str) -> bool:
  from infinite_modules.elementwise import ELEMENTWISE
  return name in ELEMENTWISE and name not in _USER_RULES
