"""Rules for token models: embedding lookups and learned positional embeddings.

An embedding table E (num_embeddings, features) with i.i.d. entries of mean mu
and variance v, looked up at integer tokens t, gives the field
f_c(a, p) = E[t_a(p), c]: channels are i.i.d. (one column of E each), and

  E[f_c(a, p) f_c(b, q)] = v [t_a(p) == t_b(q)] + mu^2,
  ntk(a, p; b, q) = g [t_a(p) == t_b(q)]

(g the gradient coefficient of E). It is an exact Gaussian input layer when
the initializer is Gaussian. A learned positional embedding P (1, L, features)
added to a field is the same with t(p) = p: an input-independent field,
independent of everything else, with covariance v [p == q].
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from infinite_modules.interpreter import RULES, Interpreter
from infinite_modules.values import Concrete, Field, ParamRef, Root, new_origin

_HINT = ("Look up rows of a 2-D embedding table with integer tokens (nn.Embed, hk.Embed, "
         "jnp.take(table, tokens, axis=0)), or use `interop.monte_carlo_kernel_fn`.")


def token_field(interp: Interpreter, eqn, ref: ParamRef, t1, t2, *, spatial, nan1=None,
                nan2=None) -> Root:
  """The root of E[t] for token arrays t1 (n1, *S), t2 (n2, *S) (see module docstring).

  `nan1`/`nan2` (optional boolean arrays like t1/t2) mark lookups that return NaN
  (out-of-range tokens with Flax's fill mode): their kernel entries are NaN as well.
  """
  if isinstance(ref.factor, Concrete):
    raise eqn.error(f"the embedding `{ref.path}` is scaled by an input-dependent value.", _HINT)
  interp.claim(ref, eqn)
  s = float(ref.factor)
  v, mu = s * s * ref.prior.variance, s * ref.prior.mean
  g = s * s * interp.grad_coefficient(ref.prior)
  d = len(spatial)
  size = int(np.prod(spatial))

  def equal(ta, tb, pair: bool):
    na, nb = ta.shape[0], tb.shape[0]
    a = ta.reshape(na, size)
    b = tb.reshape(nb, size)
    if interp.full:
      eq = a[:, None, :, None] == b[None, :, None, :] if pair else a[:, :, None] == a[:, None, :]
      shape = (na, nb, *spatial, *spatial) if pair else (na, *spatial, *spatial)
    else:
      eq = a[:, None, :] == b[None, :, :] if pair else jnp.ones_like(a, bool)
      shape = (na, nb, *spatial) if pair else (na, *spatial)
    return eq.astype(interp.dtype).reshape(shape)

  def poisoned(arr, bad_a, bad_b, pair: bool):
    if bad_a is None:
      return arr
    na = bad_a.shape[0]
    a = bad_a.reshape(na, *spatial)
    if pair:
      b = bad_b.reshape(bad_b.shape[0], *spatial)
      a = a.reshape(a.shape[:1] + (1,) + a.shape[1:] + ((1,) * d if interp.full else ()))
      b = b.reshape((1,) + b.shape[:1] + (((1,) * d) if interp.full else ()) + b.shape[1:])
      bad = a | b
    else:
      bad = a.reshape(a.shape + ((1,) * d if interp.full else ()))
      if interp.full:
        bad = bad | a.reshape(a.shape[:1] + (1,) * d + a.shape[1:])
    return jnp.where(bad, jnp.nan, arr)

  eq12, eq11, eq22 = equal(t1, t2, True), equal(t1, t1, False), equal(t2, t2, False)
  second = lambda eq: v * eq + mu * mu
  mean = (lambda t: jnp.full(t.shape, mu, interp.dtype).reshape(t.shape[0], *spatial)) \
      if mu != 0 else (lambda t: None)
  return Root(
      nngp=poisoned(second(eq12), nan1, nan2, True), ntk=poisoned(g * eq12, nan1, nan2, True),
      var1=poisoned(second(eq11), nan1, None, False),
      var2=poisoned(second(eq22), nan2, None, False),
      mean1=mean(t1), mean2=mean(t2), spatial=tuple(spatial), channels=_channels(ref),
      gaussian=ref.prior.gaussian or v == 0, origins=new_origin() if v > 0 else frozenset())


def _channels(ref: ParamRef) -> int:
  return int(ref.shape[-1])


def gather_rule(interp: Interpreter, eqn, invals):
  """`table[tokens]` for a parameter table and concrete integer tokens: an embedding lookup.

  Supported is the row lookup that `jnp.take(table, tokens, axis=0)` and
  `table[tokens]` emit: the tokens pick whole rows (one axis collapsed, every other
  axis taken whole), the table has one axis of features (the channel axis).
  """
  table, indices = invals
  if not isinstance(table, ParamRef) or not isinstance(indices, Concrete):
    raise eqn.error("only embedding lookups (rows of a parameter table picked by integer "
                    "inputs) have a kernel rule; gathers of fields or by parameters do not.",
                    _HINT)
  p = eqn.params
  dn = p["dimension_numbers"]
  shape = table.shape
  if (len(dn.start_index_map) != 1 or tuple(dn.collapsed_slice_dims) != tuple(dn.start_index_map)
      or dn.operand_batching_dims or dn.start_indices_batching_dims):
    raise eqn.error(f"a gather with dimension numbers {dn} is not a lookup of whole rows.", _HINT)
  row_axis = dn.start_index_map[0]
  slice_sizes = tuple(p["slice_sizes"])
  if any(s != shape[i] for i, s in enumerate(slice_sizes) if i != row_axis):
    raise eqn.error("a gather takes parts of rows of the table, not whole rows.", _HINT)
  rest = [i for i in range(len(shape)) if i != row_axis]
  wide = [i for i in rest if shape[i] != 1]
  if len(wide) != 1 or table.leaf_axes[row_axis] is None or table.leaf_axes[wide[0]] is None:
    raise eqn.error(f"an embedding table `{table.path}` must have one row axis and one feature "
                    f"axis (got shape {shape}).", _HINT)
  if wide[0] != rest[-1] or len(shape) != 2:
    raise eqn.error(f"the embedding table `{table.path}` must be 2-D (rows, features).", _HINT)
  if indices.batch_axis is None:
    raise eqn.error("the tokens of an embedding lookup do not depend on the input.", _HINT)
  mode = p["mode"]
  rows = shape[row_axis]
  t1, t2 = (jnp.asarray(t)[..., 0] for t in (indices.v1, indices.v2))
  if jnp.ndim(indices.v1) < 1 or np.shape(indices.v1)[-1] != 1:
    raise eqn.error("unexpected index layout of an embedding lookup.", _HINT)
  nan1 = nan2 = None
  if mode == lax.GatherScatterMode.FILL_OR_DROP:
    fill = p["fill_value"]
    if fill is not None and not np.isnan(fill):
      raise eqn.error(f"an embedding lookup fills out-of-range tokens with {fill}.", _HINT)
    nan1, nan2 = ((t < 0) | (t >= rows) for t in (t1, t2))
  else:  # CLIP and PROMISE_IN_BOUNDS clamp the row index.
    t1, t2 = (jnp.clip(t, 0, rows - 1) for t in (t1, t2))
  batch_axis = indices.batch_axis
  if batch_axis == jnp.ndim(indices.v1) - 1:
    raise eqn.error("unexpected index layout of an embedding lookup.", _HINT)
  t1, t2 = (jnp.moveaxis(t, batch_axis, 0) for t in (t1, t2))
  nan1, nan2 = ((None if m is None else jnp.moveaxis(m, batch_axis, 0)) for m in (nan1, nan2))
  spatial = tuple(t1.shape[1:])
  root = token_field(interp, eqn, table, t1, t2, spatial=spatial, nan1=nan1, nan2=nan2)
  # Output axes: the index batch dims (all index dims but the last) in order, with the
  # table's feature axis at `offset_dims`.
  index_atoms, k = [], 0
  for i in range(jnp.ndim(indices.v1) - 1):
    if i == batch_axis:
      index_atoms.append(("b",))
    else:
      index_atoms.append((k,))
      k += 1
  offset_atoms = [("c",) if i == wide[0] else ("u",) for i in rest]
  out_rank = len(index_atoms) + len(offset_atoms)
  axes, it_index, it_offset = [], iter(index_atoms), iter(offset_atoms)
  for i in range(out_rank):
    axes.append(next(it_offset) if i in dn.offset_dims else next(it_index))
  return [Field(root, tuple(axes))]


def positional_field(interp: Interpreter, eqn, ref: ParamRef, field: Field) -> Field | None:
  """A parameter added to `field` that varies along the field's positions and channels
  (a learned positional embedding `pos[:, :length]`): an input-independent field with
  E[P(p) P(q)] = v [p == q] + mu^2, independent of `field`. None if `ref` is not that."""
  rank = len(field.axes)
  if len(ref.shape) != rank:
    return None
  channel = field.channel_axis()
  spatial_axes = []
  for i, atoms in enumerate(field.axes):
    varies = ref.leaf_axes[i] is not None and ref.shape[i] != 1
    if i == channel:
      if not varies or ref.shape[i] != field.root.channels:
        return None
    elif varies:
      if len(atoms) != 1 or not isinstance(atoms[0], int):
        return None
      spatial_axes.append(atoms[0])
  d = len(field.root.spatial)
  if not spatial_axes or sorted(spatial_axes) != list(range(d)):
    return None
  # Position ids in the root's spatial order: p -> its flat index; equal ids, equal rows.
  spatial = field.root.spatial
  ids = jnp.arange(int(np.prod(spatial))).reshape(spatial)
  t1 = jnp.broadcast_to(ids, (interp.n1, *spatial))
  t2 = jnp.broadcast_to(ids, (interp.n2, *spatial))
  root = token_field(interp, eqn, ref, t1, t2, spatial=spatial)
  return Field(root, field.axes)


RULES["gather"] = gather_rule
