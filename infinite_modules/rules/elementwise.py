"""Rules for elementwise primitives: fusion into phi, biases and scales.

* Field op Concrete/literal (any elementwise primitive): appended to the
  field's expression phi; concrete operands become location constants.
* Field op Field of the same root: fused into phi as well (x + relu(x)).
* Field +/- Field of independent roots: sum of independent fields,
  `linear.add_independent`.
* Field * Field of independent roots: `products.multiply_independent`.
* Field + ParamRef (bias) and Field * ParamRef (scale): `linear.add_bias`,
  `linear.scale_by_param`.
* ParamRef times a constant: folded into the ParamRef's factor.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from infinite_modules import elementwise as ew
from infinite_modules import pairlaw
from infinite_modules.errors import NOT_GAUSSIAN_HINT, NOT_GAUSSIAN_WHY
from infinite_modules.interpreter import RULES, concrete_scalar
from infinite_modules.rules import linear, products
from infinite_modules.rules.axes import to_location
from infinite_modules.values import Concrete, Field, ParamRef


def _param_rule(interp, eqn, invals):
  name = eqn.name
  refs = [v for v in invals if isinstance(v, ParamRef)]
  fields = [v for v in invals if isinstance(v, Field)]
  if len(refs) == 1 and not fields:
    ref = refs[0]
    others = [v for v in invals if v is not ref]
    if name in ("convert_element_type", "copy", "copy_p", "reduce_precision"):
      return [ref]
    if name == "neg":
      return [_scaled(ref, -1.0)]
    if name == "mul" and len(others) == 1:
      scalar = _scalar_for(others[0], ref.shape)
      if scalar is not None:
        return [_scaled(ref, scalar)]
      if isinstance(others[0], Concrete):
        return [_scaled(ref, others[0])]
    if name == "div" and invals[0] is ref:
      scalar = _scalar_for(invals[1], ref.shape)
      if scalar is not None and scalar != 0:
        return [_scaled(ref, 1.0 / scalar)]
  if len(refs) == 1 and len(fields) == 1 and len(invals) == 2:
    field, ref = fields[0], refs[0]
    if name == "add":
      return [linear.add_bias(interp, eqn, field, ref, 1.0)]
    if name == "sub" and invals[0] is field:
      return [linear.add_bias(interp, eqn, field, ref, -1.0)]
    if name == "mul":
      return [linear.scale_by_param(interp, eqn, field, ref)]
  raise eqn.error("this combination of parameters and fields has no exact rule "
                  "(parameters may only be contracted by dot_general/conv, added as biases "
                  "or multiplied as per-channel scales).")


def _scalar_for(v, shape) -> float | None:
  """v as a python float if it acts on an array of `shape` as a scalar: a concrete
  scalar, or an input-independent constant with all entries equal that does not
  broadcast `shape` to a larger one (e.g. BatchNorm's rsqrt(var + eps) with the
  running variance at its initial value)."""
  scalar = concrete_scalar(v)
  if scalar is not None or not isinstance(v, Concrete):
    return scalar
  value = _uniform_constant(v)
  if value is None or np.broadcast_shapes(tuple(shape), np.shape(v.v1)) != tuple(shape):
    return None
  return value


def _uniform_constant(v: Concrete) -> float | None:
  """The common value of a concrete, input-independent array whose entries are all
  equal (known at trace time), else None.

  Such a constant is a scalar for the kernel: as a literal it keeps phi free of
  location constants, so closed forms still apply (an eval-mode BatchNorm then
  costs what a scale and a bias cost, not a per-location quadrature).
  """
  if v.batch_axis is not None or isinstance(v.v1, jax.core.Tracer) or np.size(v.v1) == 0:
    return None
  try:
    arr = np.asarray(v.v1)
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None
  if not np.issubdtype(arr.dtype, np.number):
    return None
  first = arr.reshape(-1)[0]
  return float(first) if np.all(arr == first) else None


def _scaled(ref: ParamRef, factor) -> ParamRef:
  # Constant factors (e.g. BatchNorm running statistics) stay concrete inside jit.
  with jax.ensure_compile_time_eval():
    return _scaled_eager(ref, factor)


def _scaled_eager(ref: ParamRef, factor) -> ParamRef:
  if isinstance(factor, Concrete) or isinstance(ref.factor, Concrete):
    if isinstance(ref.factor, Concrete) and isinstance(factor, Concrete):
      new = Concrete(jnp.asarray(ref.factor.v1) * factor.v1, jnp.asarray(ref.factor.v2) * factor.v2,
                     factor.batch_axis if factor.batch_axis is not None else ref.factor.batch_axis)
    elif isinstance(factor, Concrete):
      new = Concrete(factor.v1 * ref.factor, factor.v2 * ref.factor, factor.batch_axis,
                     factor.const_axes)
    else:
      new = Concrete(ref.factor.v1 * factor, ref.factor.v2 * factor, ref.factor.batch_axis,
                     ref.factor.const_axes)
    return dataclasses.replace(ref, factor=new)
  return dataclasses.replace(ref, factor=ref.factor * factor)


def elementwise_rule(interp, eqn, invals):
  if any(isinstance(v, ParamRef) for v in invals):
    return _param_rule(interp, eqn, invals)
  fields = [v for v in invals if isinstance(v, Field)]
  roots = {id(f.root) for f in fields}
  if len(roots) > 1:
    if eqn.name in ("add", "sub") and len(fields) == 2:
      a, b = invals
      return [linear.add_independent(interp, eqn, a, b, -1.0 if eqn.name == "sub" else 1.0)]
    if eqn.name == "mul" and len(fields) == 2:
      return [products.multiply_independent(interp, eqn, *invals)]
    raise eqn.error("it combines fields from different sources; only their sums and products "
                    "are exact.")
  template = fields[0]
  for f in fields[1:]:
    if f.axes != template.axes:
      raise eqn.error(f"it combines one field in two layouts {template.axes} and {f.axes} "
                      "(broadcasting a field is not supported).")
  args = []
  for v in invals:
    if isinstance(v, Field):
      args.append(v.expr if v.expr is not None else ew.Z)
    else:
      scalar_like = v.batch_axis is None and jnp.ndim(v.v1) == 0
      # A constant known to be the same everywhere (jnp.zeros_like(x), a
      # broadcast literal) is a scalar too, whatever its shape.
      uniform = np.size(v.v1) > 0 and len(v.const_axes) == jnp.ndim(v.v1)
      if not (scalar_like or uniform) and _uniform_constant(v) is not None:
        # An input-independent constant with equal entries (BatchNorm's running
        # mean at its initial value): a scalar too.
        scalar_like = jnp.ndim(v.v1) <= len(template.axes)
      if scalar_like or uniform:
        # Keep literals as numpy values: a jnp value would be staged into the
        # surrounding jit trace and block closed-form recognition.
        if isinstance(v.v1, jax.core.Tracer):
          lit = jnp.ravel(v.v1)[0]
        else:
          lit = np.asarray(v.v1).reshape(-1)[0]
        args.append(("lit", lit))
      else:
        args.append(("ctx", to_location(v, template, eqn)))
  if (eqn.name == "convert_element_type" and len(args) == 1
      and jnp.issubdtype(eqn.e1.invars[0].aval.dtype, jnp.floating)
      and jnp.issubdtype(eqn.params["new_dtype"], jnp.floating)):
    # Keep phi in the kernel's dtype: float casts are no-ops on moments. Casts
    # from bool/int (a mask h > 0) stay in phi, evaluated in the kernel's dtype.
    return [template]
  expr = ew.node(eqn.primitive, eqn.params, args)
  if template.root.random_moments is not None and not ew.is_affine(expr):
    # A Gaussian scale mixture's channel averages stay random: even a quadratic
    # (a normalization's variance) has no kernel from its unconditional moments.
    from infinite_modules.rules.gaussian_logits import mixture_error
    raise mixture_error(eqn, template.root, "a nonlinearity")
  if not pairlaw.known(template.root) and not (ew.is_affine(expr) or ew.is_quadratic(expr)):
    # Raised here rather than where phi is materialized, so the message names
    # the nonlinearity's module, not its consumer's. Quadratics stay pending: a
    # normalization's channel mean of (z - m)**2 needs only the field's moments.
    raise eqn.error(NOT_GAUSSIAN_WHY, NOT_GAUSSIAN_HINT)
  return [Field(template.root, template.axes, expr)]


for _name in ew.ELEMENTWISE:
  RULES[_name] = elementwise_rule
