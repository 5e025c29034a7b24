"""Rules that create or combine fields linearly: dense, conv, bias, scale, sums.

Notation: a layer y = s * sum_{j in fan-in} W_j x_j with W i.i.d. of
variance v (prior), C the traced width of the contracted channel axis, and M
the per-channel second moment of x. Then (Neal 1996; Lee et al. 2018; Jacot
et al. 2018; Arora et al. 2019 for convolutions):
  nngp' = s^2 v C M,   ntk' = s^2 v C ntk + g s^2 C M,
with g the gradient coefficient (v in NTK parameterization, 1 in standard),
and M summed over the positions a convolution window or a flatten contracts.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from infinite_modules import channels as ch
from infinite_modules import elementwise as ew
from infinite_modules import moments as mo
from infinite_modules import pairlaw
from infinite_modules.errors import NOT_GAUSSIAN_HINT, NOT_GAUSSIAN_WHY
from infinite_modules.interpreter import RULES, Interpreter
from infinite_modules.rules.axes import to_location
from infinite_modules.values import (
    Concrete,
    Field,
    ParamRef,
    Root,
    atom_size,
    group_atom,
    is_group,
    new_origin,
)


def materialize(interp: Interpreter, eqn, field: Field) -> Root:
  """The moments of a field, raising a named error if phi needs Gaussian input.

  Memoized per (root, phi): several consumers of one field (e.g. the slices
  that circular padding concatenates) must see the same root.
  """
  if field.expr is None:
    return field.root
  key = (id(field.root), id(field.expr))
  cached = interp.materialized.get(key)
  if cached is not None:
    return cached[2]
  try:
    root = ew.materialize(field.root, field.expr, interp.full, interp.points, interp.same_batch)
  except ew.NotGaussianError:
    if field.root.random_moments is not None:
      from infinite_modules.rules.gaussian_logits import mixture_error
      raise mixture_error(eqn, field.root, "a nonlinearity") from None
    raise eqn.error(NOT_GAUSSIAN_WHY, NOT_GAUSSIAN_HINT) from None
  except ew.UndefinedPhiError as err:
    raise eqn.error(str(err), "Apply it to a positive field (e.g. sqrt(softplus(h)) or "
                    "sqrt(h * h + eps)), or use `interop.monte_carlo_kernel_fn`.") from None
  interp.materialized[key] = (field.root, field.expr, root)  # keeps the ids alive
  if _through_pair_law(field):
    interp.record_estimate(eqn, PAIR_LAW_METHOD,
                           PAIR_LAW_RELATIVE_ERROR * jnp.max(jnp.abs(root.nngp)))
  return root


# The pair-law quadrature of a nonlinearity of a non-Gaussian field (see `pairlaw`)
# merges each entry's law into GRID x GRID cells: measured against a simulation of
# the limit with 2e6 channels, relative errors of <= 3e-3 after 3 residual blocks.
PAIR_LAW_RELATIVE_ERROR = 1e-2
PAIR_LAW_METHOD = (f"pair-law quadrature of a nonlinearity of a non-Gaussian field "
                   f"({pairlaw.GRID}x{pairlaw.GRID} cells per entry; measured relative error "
                   f"<= 3e-3 after 3 residual blocks, stated as {PAIR_LAW_RELATIVE_ERROR:g} of "
                   "the step's largest second moment)")


def _through_pair_law(field: Field) -> bool:
  """Whether phi(z) of this field is computed from the pair laws of a non-Gaussian z."""
  return not field.root.gaussian and not ew.is_affine(field.expr) and pairlaw.known(field.root)


def _weight(interp: Interpreter, eqn, ref: ParamRef, contracted: tuple[int, ...],
            shareable: bool = False):
  """Checks a weight view; returns (its output axes in the view, prior variance * s^2, g * s^2).

  `shareable`: the rule records its output with `interp.sharing.weight_use`, so the
  weight may be used more than once (weight sharing).

  The output axes are the free axes the leaf varies along. Several of them
  (`DenseGeneral(features=(heads, head_dim))`) hold i.i.d. outputs like one
  axis of their product: the last is the channel axis taken to infinity, the
  others finite channel groups (`group_atom`), each group an i.i.d. copy.
  """
  if isinstance(ref.factor, Concrete):
    raise eqn.error(f"the weight `{ref.path}` is scaled by an input-dependent value.")
  if ref.prior.mean != 0:
    raise eqn.error(
        f"the weight `{ref.path}` has an initializer with non-zero mean {ref.prior.mean}; "
        "its output does not converge to a centered Gaussian process at infinite width.",
        "Use a zero-mean initializer.")
  free = [i for i in range(len(ref.shape)) if i not in contracted]
  wide = [i for i in free if ref.leaf_axes[i] is not None]
  if len(wide) > 1 and eqn.name != "dot_general":
    raise eqn.error(
        f"the weight `{ref.path}` must have exactly one output (channel) axis, got free axes of "
        f"sizes {[ref.shape[i] for i in free]}.")
  if not wide or any(ref.shape[i] != 1 for i in free if i not in wide):
    raise eqn.error(
        f"the weight `{ref.path}` must have an output (channel) axis and be broadcast along no "
        f"other free axis; got free axes of sizes {[ref.shape[i] for i in free]}.")
  # Size-1 output axes before the channel axis are unit axes, not groups.
  wide = [i for i in wide[:-1] if ref.shape[i] != 1] + wide[-1:]
  if any(ref.leaf_axes[i] is None and ref.shape[i] != 1 for i in contracted):
    raise eqn.error(f"the weight `{ref.path}` is broadcast along a contracted axis.")
  interp.claim(ref, eqn, shareable)
  s2 = float(ref.factor) ** 2
  if ref.prior.variance * s2 == 0:
    _warn_zero_weight(interp, eqn, ref)
  return tuple(wide), ref.prior.variance * s2, interp.grad_coefficient(ref.prior) * s2


def _warn_zero_weight(interp: Interpreter, eqn, ref: ParamRef) -> None:
  """A weight whose prior has zero variance (e.g. hk.nets.ResNet's zero-initialized
  logits) makes its layer's output identically zero at initialization: the NNGP of
  everything it feeds is degenerate, and so is the NTK in NTK parameterization."""
  import warnings
  ntk = ("and NTK are" if interp.parameterization == "ntk" else "is")
  warnings.warn(
      f"The weight `{ref.path}` (`{eqn.name}` in module `{eqn.where}`) has a zero-variance "
      f"prior (e.g. a zeros initializer): its layer outputs 0 at initialization, so the "
      f"NNGP {ntk} degenerate (zero) from there on. Pass a prior with positive variance, "
      f"e.g. priors={{'{ref.path}': im.Prior(variance=1.0 / fan_in)}}, or use "
      "parameterization='standard' for the NTK of the model as initialized.",
      UserWarning, stacklevel=2)


def _new_root(nngp, ntk, var1, var2, spatial, channels, random_moments=None) -> Root:
  # A matmul Gaussianizes an input whose second moments are deterministic; an input
  # that is a Gaussian scale mixture (random second moments, `Root.random_moments`)
  # gives a Gaussian scale mixture again, with the same exact second moments.
  return Root(nngp=nngp, ntk=ntk, var1=var1, var2=var2, mean1=None, mean2=None,
              spatial=tuple(spatial), channels=channels, gaussian=random_moments is None,
              origins=new_origin(), random_moments=random_moments)


def _scaled_layer(root_in: Root, variance: float, grad: float, width: float, spatial, channels):
  """Applies nngp' = v C M and ntk' = v C ntk + g C M (C = `width`)."""
  factor = variance * width
  ntk = grad * width * root_in.nngp
  if root_in.ntk is not None:  # None: an input's moments (no parameter before them)
    ntk = factor * root_in.ntk + ntk
  var1, var2 = mo.per_side(lambda v: factor * v, root_in.var1, root_in.var2)
  return _new_root(factor * root_in.nngp, ntk, var1, var2, spatial, channels,
                   root_in.random_moments)


# Up to this many contracted features per input position, the input's pair moments are
# summed elementwise rather than by a batched matrix product (see `_input_moments`).
_FEW_FEATURES = 16


def _input_moments(x1, x2, batch_axis: int, contracted, free, full: bool, dtype):
  """Second moments of a concrete input, summed over its contracted axes.

  Returns a pseudo-root whose 'positions' are the free non-batch axes, with
  `ntk=None` (no parameter before the input).
  """
  def arrange(x):
    x = jnp.asarray(x, dtype)
    x = jnp.transpose(x, [batch_axis, *free, *contracted])
    k = int(np.prod(x.shape[1 + len(free):]))
    return x.reshape(x.shape[:1 + len(free)] + (k,))

  a = arrange(x1)
  b = a if x2 is x1 else arrange(x2)  # x2=None: one input moment
  d = len(free)
  letters = "defghijklm"[:d]
  primed = "nopqrstuvw"[:d]
  if full:
    pair = f"a{letters}z,b{primed}z->ab{letters}{primed}"
    single = f"a{letters}z,a{primed}z->a{letters}{primed}"
  else:
    pair = f"a{letters}z,b{letters}z->ab{letters}"
    single = f"a{letters}z,a{letters}z->a{letters}"
  if b is a and d == 0:
    # x2=None without positions: the input Gram matrix, exactly symmetric.
    nngp = mo.symmetric_gram(a)
  else:
    if d and not full and a.shape[-1] <= _FEW_FEATURES:
      # Per position, few features (an image's channels): products summed in place,
      # (n1, n2, *S) directly. A batched matrix product over the positions puts them
      # first and needs a transpose of the whole moment array after it.
      nngp = jnp.sum(a[:, None] * b[None, :], axis=-1)
    else:
      nngp = jnp.einsum(pair, a, b)
    if b is a:
      # Exactly symmetric, so that every later step (all symmetric in the two
      # sides) keeps it so (a matrix product's two triangles may round differently).
      nngp = mo.mirror(nngp, d, full)
  var1 = jnp.einsum(single, a, a)
  var2 = var1 if b is a else jnp.einsum(single, b, b)
  return Root(nngp=nngp, ntk=None, var1=var1, var2=var2, mean1=None, mean2=None,
              spatial=tuple(a.shape[1:1 + d]), channels=1, gaussian=False, origins=frozenset())


def dot_general_rule(interp: Interpreter, eqn, invals):
  lhs, rhs = invals
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  if not any(isinstance(v, ParamRef) for v in invals) and any(isinstance(v, Field)
                                                              for v in invals):
    # Queries x keys, attention weights x values.
    from infinite_modules.rules.attention import product_rule
    interp.symmetric = False  # not known to compute both sides of a pair alike
    return product_rule(interp, eqn, invals)
  if lb or rb:
    return _per_position_rule(interp, eqn, lhs, rhs)
  if isinstance(rhs, ParamRef) and isinstance(lhs, (Field, Concrete)):
    x, xc, w, wc, x_first = lhs, tuple(lc), rhs, tuple(rc), True
  elif isinstance(lhs, ParamRef) and isinstance(rhs, (Field, Concrete)):
    x, xc, w, wc, x_first = rhs, tuple(rc), lhs, tuple(lc), False
  else:
    raise eqn.error(
        "only products of a field or input with a weight parameter have an exact kernel "
        "(besides attention: field x field and input-dependent weights x field).")
  out_axes, factor, grad = _weight(interp, eqn, w, wc, shareable=True)
  width_out = w.shape[out_axes[-1]]
  # Several output axes: the last is the channel axis, the others finite channel groups.
  w_axes = [("c",) if i == out_axes[-1] else (group_atom(w.shape[i]),) if i in out_axes
            else ("u",) for i in range(len(w.shape)) if i not in wc]

  if isinstance(x, Concrete):
    if x.batch_axis is None or x.batch_axis in xc:
      raise eqn.error("a weight is applied to a value that does not have a batch axis "
                      "or contracts it.")
    free = [i for i in range(x.ndim) if i not in xc and i != x.batch_axis]
    root_in = _input_moments(x.v1, x.v2, x.batch_axis, xc, free, interp.full, interp.dtype)
    root = _scaled_layer(root_in, factor, grad, 1.0, root_in.spatial, width_out)
    # Every use is recorded: a later use of the same weight is correlated with this one.
    root = interp.sharing.weight_use(interp, eqn, w, x, root, 1.0, xc)
    x_axes, j = [], 0
    for i in range(x.ndim):
      if i == x.batch_axis:
        x_axes.append(("b",))
      elif i in free:
        x_axes.append((j,))
        j += 1
  else:
    contracted_atoms = [a for i in xc for a in x.axes[i]]
    free_atoms = [a for i in range(len(x.axes)) if i not in xc for a in x.axes[i]]
    if any(is_group(a) for a in free_atoms):
      _no_group_atoms(eqn, x)
    if "c" not in contracted_atoms or "b" in contracted_atoms:
      raise eqn.error("a weight must contract the field's channel axis (and not its batch "
                      "axis).")
    # Contracting channel groups with the channel axis (DenseGeneral(axis=(-2, -1)) on
    # (heads, head_dim)) sums groups * channels i.i.d. channels.
    groups = int(np.prod([a[1] for a in contracted_atoms if is_group(a)]))
    root_in = materialize(interp, eqn, x)
    d = len(root_in.spatial)
    dims = tuple(sorted(a for a in contracted_atoms if isinstance(a, int)))
    keep = [k for k in range(d) if k not in dims]
    reduced = dataclasses.replace(
        root_in,
        nngp=mo.diagonal_sum(root_in.nngp, 2, d, interp.full, dims),
        ntk=mo.diagonal_sum(root_in.ntk, 2, d, interp.full, dims),
        var1=mo.diagonal_sum(root_in.var1, 1, d, interp.full, dims),
        var2=mo.diagonal_sum(root_in.var2, 1, d, interp.full, dims))
    spatial = [root_in.spatial[k] for k in keep]
    root = _scaled_layer(reduced, factor, grad, root_in.channels * groups, spatial, width_out)
    root = interp.sharing.weight_use(interp, eqn, w, x, root, root_in.channels * groups)
    renumber = {k: j for j, k in enumerate(keep)}
    x_axes = [tuple(renumber.get(a, a) for a in x.axes[i]) for i in range(len(x.axes))
              if i not in xc]
  axes = (*x_axes, *w_axes) if x_first else (*w_axes, *x_axes)
  return [Field(root, tuple(axes))]


def _per_position_rule(interp: Interpreter, eqn, lhs, rhs):
  """A product batched over positions with a weight that has its own entries at each
  position (`nn.ConvLocal`, NT's `stax.ConvLocal`: locally connected), on an input.

  y(p)_c = sum_j W[p, j, c] x(p)_j with W i.i.d. across positions, so
    nngp'(p, p') = [p == p'] s^2 v sum_j x(p)_j x'(p)_j,  ntk' = [p == p'] g s^2 sum_j ...:
  outputs at different positions are independent (different weights).
  """
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  if isinstance(rhs, ParamRef) and isinstance(lhs, Concrete):
    x, xc, xb, w, wc, wb, x_first = lhs, tuple(lc), tuple(lb), rhs, tuple(rc), tuple(rb), True
  elif isinstance(lhs, ParamRef) and isinstance(rhs, Concrete):
    x, xc, xb, w, wc, wb, x_first = rhs, tuple(rc), tuple(rb), lhs, tuple(lc), tuple(lb), False
  else:
    raise eqn.error(
        "batched matrix products are supported between an input and a weight with its own "
        "entries per position (nn.ConvLocal as a first layer); a locally connected layer "
        "on a field (after another layer) is not.",
        "Use nn.ConvLocal only on the inputs, or `interop.monte_carlo_kernel_fn`.")
  if x.batch_axis is None or x.batch_axis in xc or x.batch_axis in xb:
    raise eqn.error("a per-position weight is applied to a value without a batch axis or one "
                    "that contracts or batches it.")
  if any(w.leaf_axes[i] is None and w.shape[i] != 1 for i in wb):
    raise eqn.error(f"the weight `{w.path}` is broadcast along the positions it is batched "
                    "over (the same weight at every position: use a convolution).")
  if [i for i in range(x.ndim) if i not in xc and i not in xb and i != x.batch_axis]:
    raise eqn.error("a per-position product whose input keeps free axes besides the batch.")
  out_axes, factor, grad = _weight(interp, eqn, w, wc + wb)
  if len(out_axes) != 1:
    raise eqn.error(f"the weight `{w.path}` must have one output (channel) axis.")
  width_out = w.shape[out_axes[0]]
  positions = tuple(x.v1.shape[i] for i in xb)

  def arrange(v):  # (n, P, K): batch, the batched positions, the contracted entries
    v = jnp.transpose(jnp.asarray(v, interp.dtype), [x.batch_axis, *xb, *xc])
    return v.reshape(v.shape[0], int(np.prod(positions)), -1)

  a = arrange(x.v1)
  b = a if x.v2 is x.v1 else arrange(x.v2)
  d = len(positions)

  def moments(u, v, pair):
    same = jnp.einsum("apk,bpk->abp" if pair else "apk,apk->ap", u, v)
    lead = same.shape[:-1]
    if interp.full:  # zero between different positions: independent weights
      eye = jnp.eye(same.shape[-1], dtype=same.dtype)
      same = same[..., :, None] * eye
      return same.reshape(lead + positions + positions)
    return same.reshape(lead + positions)

  root_in = Root(nngp=moments(a, b, True), ntk=None, var1=moments(a, a, False),
                 var2=moments(b, b, False), mean1=None, mean2=None, spatial=positions,
                 channels=1, gaussian=False, origins=frozenset())
  root = _scaled_layer(root_in, factor, grad, 1.0, positions, width_out)
  batch_axes = [(k,) for k in range(d)]
  x_axes = [("b",)]
  w_axes = [("c",) if i == out_axes[0] else ("u",) for i in range(len(w.shape))
            if i not in wc and i not in wb]
  axes = (*batch_axes, *x_axes, *w_axes) if x_first else (*batch_axes, *w_axes, *x_axes)
  return [Field(root, tuple(axes))]


def _no_group_atoms(eqn, field: Field):
  if any(is_group(a) for atoms in field.axes for a in atoms):
    raise eqn.error(
        f"a weight is applied to a field whose channel axis is split into groups {field.axes} "
        "(as inside GroupNorm); merge the groups back into the channel axis first.")


def _check_groups(eqn, lhs, rhs: ParamRef, rhs_spec, groups: int) -> int:
  """Checks a grouped convolution; returns its contracted width (input channels per group).

  With G = feature_group_count fixed and the channels per group taken to infinity,
  output channel o sums its own group's C_in / G input channels, which are i.i.d. like
  all channels of the field: the kernel is that of a dense convolution over C_in / G
  channels. That needs infinitely many channels per group (not depthwise) and a field
  whose channels are identically distributed (not a channel concatenation).
  """
  per_group = rhs.shape[rhs_spec[1]]
  hint = ("Use feature_group_count=1, or `interop.monte_carlo_kernel_fn` for a Monte Carlo "
          "estimate of this model's kernel.")
  if isinstance(lhs, Concrete):
    raise eqn.error(
        f"a grouped convolution (feature_group_count={groups}) of the network's input: each "
        "group sees different input channels, so the output channels are not identically "
        "distributed and the output is not one infinite-width field.", hint)
  if per_group == 1:
    raise eqn.error(
        f"a depthwise convolution (feature_group_count={groups}, one input channel per "
        "group): each output channel is a finite sum of one input channel's positions, not a "
        "sum over infinitely many channels, so it is not Gaussian at infinite width and its "
        "kernel has no closed form in terms of the input's covariance.", hint)
  if not lhs.root.homogeneous:
    raise eqn.error(
        f"a grouped convolution (feature_group_count={groups}) of a channel concatenation of "
        "different fields: each group sees a different mix of them, which is not tracked.",
        hint)
  return per_group


def _dilation_index(n: int, dilation: int, lo: int, hi: int):
  """Positions of the zero-inserted, padded input: index[t] = input position or -1 (zero)."""
  size = lo + hi + (n - 1) * dilation + 1
  index = np.full(max(size, 0), -1)
  for j in range(n):
    pos = lo + j * dilation
    if 0 <= pos < size:
      index[pos] = j
  return index


def conv_rule(interp: Interpreter, eqn, invals):
  lhs, rhs = invals
  p = eqn.params
  if isinstance(lhs, Field) and isinstance(rhs, Concrete):
    # nn.ConvLocal extracts patches with a fixed one-hot kernel before its per-position
    # product; on an input both are concrete, on a field the patches are not tracked.
    raise eqn.error(
        "a convolution of a field with a fixed (input-independent) kernel, e.g. the patch "
        "extraction of a locally connected layer (nn.ConvLocal) after another layer, is not "
        "supported; nn.ConvLocal on the inputs is.",
        "Use nn.ConvLocal as a first layer, or `interop.monte_carlo_kernel_fn`.")
  if not isinstance(rhs, ParamRef) or not isinstance(lhs, (Field, Concrete)):
    raise eqn.error("only convolutions of a field or input with a weight parameter are exact.")
  if p["batch_group_count"] != 1:
    raise eqn.error(
        f"batch_group_count={p['batch_group_count']} convolves groups of examples together "
        "(as in a weight-gradient computation), mixing the examples of a batch.",
        "Use batch_group_count=1, or `interop.monte_carlo_kernel_fn`.")
  dn = p["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  nd = len(lhs_spec) - 2
  groups = p["feature_group_count"]
  per_group = _check_groups(eqn, lhs, rhs, rhs_spec, groups) if groups != 1 else None
  contracted = tuple(rhs_spec[1:])
  (out_axis,), factor, grad = _weight(interp, eqn, rhs, contracted)
  width_out = rhs.shape[out_axis]
  if out_axis != rhs_spec[0]:
    raise eqn.error("unexpected convolution kernel layout.")
  windows = [rhs.shape[rhs_spec[2 + i]] for i in range(nd)]
  if isinstance(lhs, Concrete):
    if lhs.batch_axis != lhs_spec[0]:
      raise eqn.error("the convolution input's batch axis is not the traced batch axis.")
    root_in = _input_moments(lhs.v1, lhs.v2, lhs_spec[0], (lhs_spec[1],), list(lhs_spec[2:]),
                             interp.full, interp.dtype)
    width_in = 1.0
  else:
    _no_group_atoms(eqn, lhs)
    if lhs.axes[lhs_spec[0]] != ("b",) or lhs.axes[lhs_spec[1]] != ("c",):
      raise eqn.error("the convolution's batch/feature axes are not the field's batch/channel "
                      "axes.")
    atoms = [lhs.axes[lhs_spec[2 + i]] for i in range(nd)]
    if any(len(a) != 1 or not isinstance(a[0], int) for a in atoms):
      raise eqn.error(f"convolution over non-spatial or merged axes {atoms}.")
    root_in = materialize(interp, eqn, lhs)
    root_in = mo.permute_spatial(root_in, interp.full, tuple(a[0] for a in atoms))
    width_in = root_in.channels
    if per_group is not None:
      if root_in.channels != groups * per_group:
        raise eqn.error("unexpected grouped convolution kernel shape.")
      width_in = per_group
  root = root_in
  for i in range(nd):
    padding = tuple(p["padding"][i])
    if p["lhs_dilation"][i] != 1 or min(padding) < 0:
      # Input dilation (transposed convolutions) inserts zeros between positions and
      # negative padding crops: both are a gather of positions (zero where none).
      index = _dilation_index(root.spatial[i], p["lhs_dilation"][i], *padding)
      if len(index) == 0:
        raise eqn.error("the dilated and padded input is empty.")
      root = mo.gather(root, interp.full, i, index)
      padding = (0, 0)
    root = mo.window_sum(root, interp.full, i, windows[i], p["window_strides"][i],
                         p["rhs_dilation"][i], padding)
  root = _scaled_layer(root, factor, grad, width_in, root.spatial, width_out)
  axes = [None] * (nd + 2)
  axes[out_spec[0]] = ("b",)
  axes[out_spec[1]] = ("c",)
  for i in range(nd):
    axes[out_spec[2 + i]] = (i,)
  return [Field(root, tuple(axes))]


def _per_channel(eqn, field: Field, ref: ParamRef, what: str):
  """Checks that ref varies only along the field's channel axis and channel groups.

  A parameter with one i.i.d. entry per (group, channel) (the bias of
  `DenseGeneral(features=(heads, head_dim))`) acts like a per-channel one.
  """
  rank = len(field.axes)
  if len(ref.shape) > rank:
    raise eqn.error(f"the {what} `{ref.path}` has more axes than the field.")
  offset = rank - len(ref.shape)
  # Axes without a leaf axis are broadcast (the same value at every example or
  # position); the leaf's own axes must lie along the channel axis (and groups).
  mapped = [i for i, la in enumerate(ref.leaf_axes) if la is not None and ref.shape[i] != 1]
  size = int(np.prod([ref.shape[i] for i in mapped]))
  groups = [a for atoms in field.axes for a in atoms if is_group(a)]
  width = field.root.channels * int(np.prod([g[1] for g in groups]))
  covered = [a for i in mapped for a in field.axes[offset + i] if a != "u"]
  # (A width-1 channel axis has no mapped leaf axis: nothing to cover.)
  ok = (size == width and all(a == "c" or is_group(a) for a in covered)
        and len(set(covered)) == len(covered)
        and set(covered) >= {a for a in ("c", *groups) if atom_size(field.root, a, 1) != 1})
  if not ok:
    raise eqn.error(
        f"the {what} `{ref.path}` must vary exactly along the field's channel axis (one value "
        "per channel); a scalar or per-position parameter correlates the channels.")


def add_bias(interp: Interpreter, eqn, field: Field, ref: ParamRef, sign: float) -> Field:
  """x + b with b_c i.i.d. (mean mu, variance v) independent of x:
  E[(x + b)(x' + b)] = M + mu (m + m') + mu^2 + v;  ntk' = ntk + g.

  A parameter that varies along the positions too (a learned positional
  embedding) is an independent input-free field (`embedding.positional_field`).
  """
  from infinite_modules.rules.embedding import positional_field
  if not isinstance(ref.factor, Concrete):
    signed = dataclasses.replace(ref, factor=sign * float(ref.factor))
    positional = positional_field(interp, eqn, signed, field)
    if positional is not None:
      return add_independent(interp, eqn, field, positional, 1.0)
  _per_channel(eqn, field, ref, "bias")
  if isinstance(ref.factor, Concrete):
    raise eqn.error(f"the bias `{ref.path}` is scaled by an input-dependent value.")
  interp.claim(ref, eqn, shareable=True)
  s = sign * float(ref.factor)
  mu, var = s * ref.prior.mean, s * s * ref.prior.variance
  grad = interp.grad_coefficient(ref.prior) * s * s
  root = materialize(interp, eqn, field)
  d, full = len(root.spatial), interp.full
  m1, m2 = root.means()

  def second(arr, ma, mb, pair):
    if mu == 0:
      return arr + var
    a, b = mo.pair_broadcast(ma, mb, d, full, pair)
    return arr + mu * (a + b) + mu * mu + var

  has_mean = root.mean1 is not None or mu != 0
  new = dataclasses.replace(
      root, nngp=second(root.nngp, m1, m2, True), ntk=root.ntk + grad,
      var1=second(root.var1, m1, m1, False), var2=second(root.var2, m2, m2, False),
      mean1=m1 + mu if has_mean else None, mean2=m2 + mu if has_mean else None,
      gaussian=root.gaussian and (ref.prior.gaussian or var == 0), gathered_from=None)
  # The bias's own origin token (the same at every use: a bias may be shared).
  new = interp.sharing.bias_use(interp, eqn, ref, s, root, new)
  if var == 0 or ref.prior.gaussian:
    # A constant or Gaussian bias maps the pair laws of a non-Gaussian field exactly
    # (a shift, or the sum with an independent Gaussian of covariance v at both points).
    def shift(m, name):
      if var == 0:
        return pairlaw.affine(m, 1.0, mu, 1.0, mu)
      full_v = jnp.full_like(m.va, var)
      return pairlaw.add(m, pairlaw.gaussian(full_v, full_v, full_v, mu, mu,
                                             None if m.theta is None else grad))
    new = _carry_law(root, new, shift, full)
  return Field(new, field.axes)


def _carry_law(old: Root, new: Root, fn, full: bool) -> Root:
  """`new` with the pair laws of `old` mapped by `fn(mixture, name)`, where `old` is a
  non-Gaussian field of known laws (a residual stream through a normalization's scale
  and bias), so that a nonlinearity after it still has a kernel."""
  if old.gaussian or new.gaussian or not pairlaw.known(old):
    return new
  return pairlaw.attach(new, lambda: pairlaw.law_of(old, full).map(fn))


def scale_by_param(interp: Interpreter, eqn, field: Field, ref: ParamRef) -> Field:
  """gamma * x with gamma_c i.i.d. (mean mu, variance v) independent of x:
  E[gamma x gamma x'] = (mu^2 + v) M;  ntk' = (mu^2 + v) ntk + g M."""
  _per_channel(eqn, field, ref, "scale")
  if isinstance(ref.factor, Concrete):
    # A LayerNorm multiplies rsqrt(var + eps) (per example) into its scale first.
    ctx = ("ctx", to_location(ref.factor, field, eqn))
    base = field.expr if field.expr is not None else ew.Z
    field = Field(field.root, field.axes, ew.node(_mul(), _mul_params(), [base, ctx]))
    ref = dataclasses.replace(ref, factor=1.0)
  interp.claim(ref, eqn)
  s = float(ref.factor)
  mu, var = s * ref.prior.mean, s * s * ref.prior.variance
  grad = interp.grad_coefficient(ref.prior) * s * s
  second = mu * mu + var
  root = materialize(interp, eqn, field)
  new = dataclasses.replace(
      root, nngp=second * root.nngp, ntk=second * root.ntk + grad * root.nngp,
      var1=second * root.var1, var2=second * root.var2,
      mean1=None if root.mean1 is None else mu * root.mean1,
      mean2=None if root.mean2 is None else mu * root.mean2,
      gaussian=root.gaussian and var == 0,
      origins=root.origins | (new_origin() if var > 0 else frozenset()), gathered_from=None)
  if var == 0:  # a constant scale (LayerNorm's at initialization) maps the pair laws exactly
    new = _carry_law(root, new, lambda m, _: pairlaw.affine(m, mu, 0.0, mu, 0.0), interp.full)
  return Field(new, field.axes)


def _mul():
  import jax
  return jax.lax.mul_p


def _mul_params() -> dict:
  """The params `lax.mul` binds with in this JAX version (jax 0.10 adds `out_dtype`,
  which mul's transpose rule requires: without it input gradients fail)."""
  import jax
  return dict(jax.make_jaxpr(jax.lax.mul)(1.0, 1.0).eqns[0].params)


def _spatial_correspondence(eqn, a: Field, b: Field):
  """perm with b's root spatial dim perm[k] aligned with a's dim k."""
  if len(a.axes) != len(b.axes):
    raise eqn.error("it adds fields of different ranks.")
  mapping = {}
  for xa, xb in zip(a.axes, b.axes):
    if len(xa) != len(xb):
      raise eqn.error(f"it adds fields with different layouts {a.axes} and {b.axes}.")
    for ta, tb in zip(xa, xb):
      if isinstance(ta, int) and isinstance(tb, int):
        mapping[ta] = tb
      elif ta != tb:
        raise eqn.error(f"it adds fields with different layouts {a.axes} and {b.axes}.")
  d = len(a.root.spatial)
  return tuple(mapping[k] for k in range(d))


def add_independent(interp: Interpreter, eqn, a: Field, b: Field, sign: float) -> Field:
  """Sum of two fields from disjoint random sources (e.g. a residual x + f(x)).

  Independent fields add their kernels: M = M_a + M_b + m_a m_b' + m_b m_a',
  ntk = ntk_a + ntk_b (gradient cross terms vanish at infinite width). Fields
  that share a source (overlapping origins) raise: their cross-covariance is
  not tracked, and assuming independence would be silently wrong.
  """
  ra = materialize(interp, eqn, a)
  rb = materialize(interp, eqn, b)
  if ch.shared(ra.origins, rb.origins):
    # Outputs of one shared weight (d(x1) + d(x2)) have a known joint Gaussian law.
    shared = interp.sharing.sum_dependent(eqn, a, b, sign) if a.axes == b.axes else None
    if shared is not None:
      return Field(shared, a.axes)
    raise eqn.error(
        "it adds two fields that depend on the same random parameters in different ways "
        "(e.g. z + relu(z + b)); their cross-covariance is not tracked, and assuming "
        "independence would give a wrong kernel. Per-channel statistics over spatial "
        "positions (per-channel normalization: nn.GroupNorm(group_size=1), nn.InstanceNorm) "
        "are such fields: over finitely many positions they stay random as the width "
        "grows, unlike LayerNorm's statistics over infinitely many channels.",
        "Normalize over channels (nn.LayerNorm, or nn.GroupNorm with a fixed num_groups), "
        "or use `interop.monte_carlo_kernel_fn` for a Monte Carlo estimate.")
  if ra.channels != rb.channels:
    raise eqn.error("it adds fields of different widths.")
  rb = mo.permute_spatial(rb, interp.full, _spatial_correspondence(eqn, a, b))
  if ra.spatial != rb.spatial:
    raise eqn.error("it adds fields with different spatial sizes.")
  d, full = len(ra.spatial), interp.full
  ma1, ma2 = ra.means()
  mb1, mb2 = rb.means()
  mb1, mb2 = sign * mb1, sign * mb2
  has_mean = ra.mean1 is not None or rb.mean1 is not None

  def second(xa, xb, pa, pb, qa, qb, pair):
    if not has_mean:
      return xa + xb
    a1, b2 = mo.pair_broadcast(pa, qb, d, full, pair)
    b1, a2 = mo.pair_broadcast(qa, pb, d, full, pair)
    # The cross terms summed first: entry (b, a) has them swapped, so this keeps
    # the kernel of a batch with itself exactly symmetric.
    return xa + xb + (a1 * b2 + b1 * a2)

  root = Root(
      nngp=second(ra.nngp, rb.nngp, ma1, ma2, mb1, mb2, True), ntk=ra.ntk + rb.ntk,
      var1=second(ra.var1, rb.var1, ma1, ma1, mb1, mb1, False),
      var2=second(ra.var2, rb.var2, ma2, ma2, mb2, mb2, False),
      mean1=ma1 + mb1 if has_mean else None, mean2=ma2 + mb2 if has_mean else None,
      spatial=ra.spatial, channels=ra.channels, gaussian=ra.gaussian and rb.gaussian,
      origins=ra.origins | rb.origins, homogeneous=ra.homogeneous and rb.homogeneous,
      random_moments=ra.random_moments or rb.random_moments)
  root = interp.sharing.sum_registered(root, ra, rb, sign)
  if not root.gaussian and pairlaw.known(ra) and pairlaw.known(rb):
    # A post-activation residual stream: carry the pair laws of the sum, so a
    # nonlinearity of it has a kernel (`pairlaw`).
    root = pairlaw.attach(root, lambda: _sum_law(ra, rb, full, sign))
  return Field(root, a.axes)


def _sum_law(ra: Root, rb: Root, full: bool, sign: float):
  la, lb = pairlaw.law_of(ra, full), pairlaw.law_of(rb, full)
  return pairlaw.PairLaw(*(pairlaw.add(x, y, sign) for x, y in
                           ((la.nngp, lb.nngp), (la.var1, lb.var1), (la.var2, lb.var2))))


RULES["dot_general"] = dot_general_rule
RULES["conv_general_dilated"] = conv_rule
