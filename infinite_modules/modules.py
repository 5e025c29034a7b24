"""Infinite-width counterparts for whole Flax module classes.

`register_module(MyBlock, rule)` makes the interpreter treat every call of a
`MyBlock` instance as one opaque step whose kernel map is `rule`, instead of
tracing through its body. Use it for a block with a known closed form, or one
whose body has no exact per-primitive rule (e.g. a normalization you know
the limit of). The rule maps a `LayerKernel` (the moments of the block's
input field) to the `LayerKernel` of its output (same shape as the input):

    def scaled_relu(k: im.LayerKernel, module) -> im.LayerKernel:
        ...  # new nngp / ntk / var1 / var2 from k's
    im.register_module(ScaledRelu, scaled_relu)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
from collections.abc import Callable

import jax
from jax.extend import core as jcore

from infinite_modules.interpreter import RULES
from infinite_modules.values import Field, new_origin


@dataclasses.dataclass(frozen=True)
class LayerKernel:
  """Moments of a field, as a module rule sees them (see `values` for layouts).

  Attributes:
    nngp, ntk: `(n1, n2, *S)` or `(n1, n2, *S, *S)` per-channel second moments/NTK.
    var1, var2: the same within each batch.
    mean1, mean2: `(n, *S)` per-channel means, or None for zero.
    full: whether all pairs of spatial positions are tracked.
    gaussian: whether the field is Gaussian (a rule's output usually is not).
  """
  nngp: jax.Array
  ntk: jax.Array
  var1: jax.Array
  var2: jax.Array
  mean1: jax.Array | None = None
  mean2: jax.Array | None = None
  full: bool = False
  gaussian: bool = False


ModuleRule = Callable[[LayerKernel, object], LayerKernel]
MODULE_RULES: dict[type, ModuleRule] = {}


def register_module(module_class: type, rule: ModuleRule) -> None:
  """Registers the infinite-width kernel map `rule` for a Flax module class.

  `rule(kernel_in: LayerKernel, module) -> LayerKernel` is called with the
  moments of the block's (single) input field and the module instance; the
  block must return a field of the same shape. Subclasses match too.
  """
  MODULE_RULES[module_class] = rule


def _rule_for(module) -> ModuleRule | None:
  for cls in type(module).__mro__:
    if cls in MODULE_RULES:
      return MODULE_RULES[cls]
  return None


class _Opaque:
  """Hashable-by-identity holder for a module in primitive params."""

  def __init__(self, module, rule):
    self.module, self.rule = module, rule


module_call_p = jcore.Primitive("infinite_module_call")
module_call_p.def_abstract_eval(lambda x, *, holder, out_aval: out_aval)


def _interceptor(next_fun, args, kwargs, context):
  rule = _rule_for(context.module)
  if rule is None or context.method_name != "__call__" or len(args) != 1 or kwargs:
    return next_fun(*args, **kwargs)
  out = jax.eval_shape(functools.partial(next_fun), *args)
  aval = jax.core.ShapedArray(out.shape, out.dtype)
  return module_call_p.bind(args[0], holder=_Opaque(context.module, rule), out_aval=aval)


# Name scope around every GroupNorm call while tracing: inside it, a reshape that splits the
# channel axis into (groups, channels per group) is read as a fixed number of groups of
# infinitely many channels (see `rules.structural`); elsewhere such a split raises, since
# e.g. x.reshape(n, C // 2, 2) means pairs of channels, a fixed size.
GROUP_NORM_SCOPE = "group_norm_groups"


def _mark_group_norm(next_fun, args, kwargs, context, module_class):
  if isinstance(context.module, module_class) and context.method_name == "__call__":
    with jax.named_scope(GROUP_NORM_SCOPE):
      return next_fun(*args, **kwargs)
  return next_fun(*args, **kwargs)


@contextlib.contextmanager
def intercept_registered_modules():
  """While active, calls of registered module classes trace as one primitive, and
  GroupNorm calls (Flax and Haiku) trace inside `GROUP_NORM_SCOPE`."""
  with contextlib.ExitStack() as stack:
    # A model can only be built from a library the user has imported already, so the
    # hooks are installed only for those: importing Haiku here would cost a Flax user
    # a quarter of a second on the first kernel_fn.
    nn = sys.modules.get("flax.linen")
    if nn is not None:
      stack.enter_context(nn.intercept_methods(
          functools.partial(_mark_group_norm, module_class=nn.GroupNorm)))
      if MODULE_RULES:
        stack.enter_context(nn.intercept_methods(_interceptor))
    hk = sys.modules.get("haiku")
    if hk is not None:
      stack.enter_context(hk.intercept_methods(
          functools.partial(_mark_group_norm, module_class=hk.GroupNorm)))
    yield


def _module_call_rule(interp, eqn, invals):
  from infinite_modules.rules.linear import materialize
  (x,) = invals
  holder = eqn.params["holder"]
  if not isinstance(x, Field):
    raise eqn.error(f"registered module {type(holder.module).__name__} received a value that "
                    "is not an infinite-width field.")
  if tuple(eqn.e1.invars[0].aval.shape) != tuple(eqn.params["out_aval"].shape):
    raise eqn.error(f"registered module {type(holder.module).__name__} changes the shape of "
                    "its input; module rules must preserve it.")
  root = materialize(interp, eqn, x)
  k_in = LayerKernel(root.nngp, root.ntk, root.var1, root.var2, root.mean1, root.mean2,
                     interp.full, root.gaussian)
  k_out = holder.rule(k_in, holder.module)
  new = dataclasses.replace(
      root, nngp=k_out.nngp, ntk=k_out.ntk, var1=k_out.var1, var2=k_out.var2,
      mean1=k_out.mean1, mean2=k_out.mean2,
      # A Gaussian scale mixture in stays one (its random moments are not the rule's).
      gaussian=k_out.gaussian and root.random_moments is None,
      origins=root.origins | new_origin(), gathered_from=None)
  return [Field(new, x.axes)]


RULES["infinite_module_call"] = _module_call_rule
