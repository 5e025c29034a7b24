"""Structure rules for the structured-derivatives NTK (Novak et al. 2022, Sec. 3.3).

Two registries, keyed by primitive name, in the style of ``jax.experimental.jet``:

``LINEAR_RULES[name](params, invals, pos, u_shape) -> LinearForm``
  For an equation ``y = prim(..., u, ...)`` that is *linear in its parameter operand*
  ``u = invals[pos]``, express it as one ``einsum``

      y[Y] = scale * sum_{labels not in Y}  X_1[L_1] ... X_m[L_m] * u[U]

  whose operands ``X_i`` are computed from the other (input-dependent) operands. The
  NTK contribution of ``u`` is then, for output cotangents ``G_s = df(x_s)/dy``,

      Theta_u = <J_1, J_2>_u = sum  G_1[A_1, Y_1] X_1..[..] X_2..[..] G_2[A_2, Y_2]

  with the labels of ``u`` shared between both sides, contracted in the cheapest order
  (``opt_einsum``). For ``y = x W`` this is ``(x_1 x_2^T) * (G_1 G_2^T)``: the weight
  Jacobian ``dy/dW = x (x) I`` is never materialized.

``CHAIN_RULES[name](params, pos, tags, in_shape, out_shape) -> tags | None``
  Parameter-only equations between a parameter leaf ``theta`` and its use ``u``
  (``reshape``, ``transpose``, ``broadcast_in_dim``, ``convert_element_type``,
  multiplication by constants, ...). ``u = c * B(theta)`` where ``B`` permutes and
  broadcasts. ``tags[i]`` says whether axis ``i`` of ``u`` enumerates entries of
  ``theta`` (``True``, "tied": shared label between the two sides) or replicates them
  (``False``, "broadcast": summed separately on each side, since
  ``B^T g = sum_broadcast g``). ``c`` is recovered as the chain evaluated at
  ``theta = 1``. A rule returns ``None`` when the structure is lost; the leaf then takes
  the generic (Jacobian) path, which is always correct.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["CHAIN_RULES", "ELEMENTWISE_CHAIN", "LINEAR_RULES", "LinearForm"]


@dataclasses.dataclass
class LinearForm:
  """``y[y_labels] = scale * einsum(operands[i][operand_labels[i]]..., u[u_labels])``.

  Labels are small local ints; the interpreter renames them per side.
  """

  operands: tuple[jax.Array, ...]
  operand_labels: tuple[tuple[int, ...], ...]
  u_labels: tuple[int, ...]
  y_labels: tuple[int, ...]
  scale: float = 1.0


LinearRule = Callable[[dict, Sequence[Any], int, tuple[int, ...]], LinearForm | None]
LINEAR_RULES: dict[str, LinearRule] = {}


def _dot_general_rule(params: dict, invals: Sequence[Any], pos: int,
                      u_shape: tuple[int, ...]) -> LinearForm:
  """``y[b, i, j] = sum_c lhs[b, i, c] rhs[b, c, j]`` for any dimension numbers."""
  (lc, rc), (lb, rb) = params["dimension_numbers"]
  x = invals[1 - pos]
  lhs_nd = len(u_shape) if pos == 0 else x.ndim
  rhs_nd = len(u_shape) if pos == 1 else x.ndim
  lhs = list(range(lhs_nd))
  nxt = lhs_nd
  rhs = [-1] * rhs_nd
  for a, b in zip(lc, rc):
    rhs[b] = lhs[a]
  for a, b in zip(lb, rb):
    rhs[b] = lhs[a]
  for j in range(rhs_nd):
    if rhs[j] < 0:
      rhs[j] = nxt
      nxt += 1
  lhs_free = [lhs[i] for i in range(lhs_nd) if i not in lc and i not in lb]
  rhs_free = [rhs[j] for j in range(rhs_nd) if j not in rc and j not in rb]
  y = tuple([lhs[a] for a in lb] + lhs_free + rhs_free)
  x_labels, u_labels = (tuple(rhs), tuple(lhs)) if pos == 0 else (tuple(lhs), tuple(rhs))
  return LinearForm((x,), (x_labels,), u_labels, y)


def _broadcast_labels(shape: tuple[int, ...], y_shape: tuple[int, ...], nxt: int
                      ) -> tuple[tuple[int, ...], int]:
  """Labels of an elementwise operand: ``y``'s label, or a fresh one on size-1 axes that
  are implicitly broadcast (jaxprs allow ``(5, 3) + (1, 3)``)."""
  if not shape:
    return (), nxt
  labels = []
  for i, (s, t) in enumerate(zip(shape, y_shape)):
    if s == t:
      labels.append(i)
    else:
      labels.append(nxt)
      nxt += 1
  return tuple(labels), nxt


def _elementwise_shapes(x: Any, u_shape: tuple[int, ...]) -> tuple[int, ...] | None:
  xs = tuple(jnp.shape(x))
  nd = max(len(xs), len(u_shape))
  if len(xs) not in (0, nd) or len(u_shape) not in (0, nd):
    return None
  try:
    return tuple(jnp.broadcast_shapes(xs, u_shape))
  except ValueError:
    return None


def _mul_rule(params: dict, invals: Sequence[Any], pos: int,
              u_shape: tuple[int, ...]) -> LinearForm | None:
  """``y = x * u`` (Hadamard): ``dy/du = diag(x)``."""
  del params
  x = invals[1 - pos]
  y_shape = _elementwise_shapes(x, u_shape)
  if y_shape is None:
    return None
  nxt = len(y_shape)
  x_labels, nxt = _broadcast_labels(tuple(jnp.shape(x)), y_shape, nxt)
  u_labels, nxt = _broadcast_labels(u_shape, y_shape, nxt)
  return LinearForm((x,), (x_labels,), u_labels, tuple(range(len(y_shape))))


def _add_rule(sign_of_rhs: float) -> LinearRule:
  def rule(params: dict, invals: Sequence[Any], pos: int,
           u_shape: tuple[int, ...]) -> LinearForm | None:
    """``y = x +/- u``: ``dy/du = +/- I`` (broadcast over size-1 or scalar ``u``)."""
    del params
    y_shape = _elementwise_shapes(invals[1 - pos], u_shape)
    if y_shape is None:
      return None
    u_labels, _ = _broadcast_labels(u_shape, y_shape, len(y_shape))
    return LinearForm((), (), u_labels, tuple(range(len(y_shape))),
                      scale=sign_of_rhs if pos == 1 else 1.0)
  return rule


def conv_patches(x: jax.Array, filter_shape: Sequence[int], params: dict) -> jax.Array:
  """The image patches of ``conv_general_dilated(x, W, **params)``, shape
  ``(batch, *out_spatial, *filter_shape, channels)`` (channels minor).

  Pure data movement, so exact: ``x`` is padded (``lax.pad``; interior padding is the
  input dilation, negative edges crop) and, for each filter offset ``k``, strided-sliced
  from ``k * rhs_dilation`` with the window strides; the slices are concatenated along
  the channel axis. XLA's CPU backend runs this ~3x faster than
  ``lax.conv_general_dilated_patches`` (a grouped convolution with a one-hot filter):
  2.9 ms vs 9.1 ms for 16 x 16 x 16 x 64 inputs and a 3 x 3 filter, one thread.
  """
  lhs_spec = params["dimension_numbers"][0]
  xt = jnp.transpose(x, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))  # (N, *spatial, C)
  nsp = len(filter_shape)
  config = [(0, 0, 0)]
  for (lo, hi), ld in zip(params["padding"], params["lhs_dilation"]):
    config.append((lo, hi, ld - 1))
  config.append((0, 0, 0))
  xp = lax.pad(xt, jnp.zeros((), xt.dtype), config)
  out_sizes = []
  for i in range(nsp):
    span = (filter_shape[i] - 1) * params["rhs_dilation"][i] + 1
    out_sizes.append(max(0, (xp.shape[1 + i] - span) // params["window_strides"][i] + 1))
  slices = []
  for offset in itertools.product(*(range(f) for f in filter_shape)):
    start = [0] + [k * r for k, r in zip(offset, params["rhs_dilation"])] + [0]
    limit = ([xp.shape[0]] + [st + (o - 1) * s + 1 if o else st for st, o, s in
                              zip(start[1:], out_sizes, params["window_strides"])]
             + [xp.shape[-1]])
    strides = [1, *params["window_strides"], 1]
    slices.append(lax.slice(xp, start, limit, strides))
  patches = jnp.concatenate(slices, axis=-1) if len(slices) > 1 else slices[0]
  return patches.reshape(patches.shape[:-1] + tuple(filter_shape) + (xt.shape[-1],))


def _conv_rule(params: dict, invals: Sequence[Any], pos: int,
               u_shape: tuple[int, ...]) -> LinearForm | None:
  """``y = conv(x, W)`` as ``y[b, o, s] = sum_{c, k} P[b, s, k, c] W[o, c, k]``.

  ``P`` are the image patches (:func:`conv_patches`, any strides, padding, lhs/rhs
  dilation and layout), so the rule reduces to a ``dot_general``.

  With ``feature_group_count = G`` (grouped and depthwise convolutions) input channel
  ``c = g C_g + c'`` only feeds outputs ``o`` of group ``g(o) = o // (O / G)``, and ``W``
  has ``C_g`` input features:

      y[b, o, s] = sum_{g, c', k} E[g, o] P[b, s, k, g, c'] W[o, c', k],
      E[g, o] = 1 if g = g(o) else 0,

  exact with a ``G x O`` one-hot operand ``E``. ``batch_group_count > 1`` (which only
  appears in the transposes of grouped convolutions) takes the generic path.
  """
  groups = params["feature_group_count"]
  if pos != 1 or params["batch_group_count"] != 1:
    return None
  x = invals[0]
  lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
  filter_shape = tuple(u_shape[d] for d in rhs_spec[2:])
  n_in, n_out = x.shape[lhs_spec[1]], u_shape[rhs_spec[0]]
  if n_in % groups or n_out % groups or u_shape[rhs_spec[1]] * groups != n_in:
    return None
  patches = conv_patches(x, filter_shape, params)  # (N, *out_spatial, *filter, C)
  patches = patches.reshape(patches.shape[:-1] + (groups, n_in // groups))
  nd = x.ndim
  y = tuple(range(nd))  # y axis d has label d
  g_label, c_label = nd, nd + 1
  k_labels = tuple(range(nd + 2, nd + 2 + len(filter_shape)))
  batch_and_spatial = (out_spec[0], *out_spec[2:])
  u_labels = [0] * len(u_shape)
  u_labels[rhs_spec[0]] = out_spec[1]
  u_labels[rhs_spec[1]] = c_label
  for i, d in enumerate(rhs_spec[2:]):
    u_labels[d] = k_labels[i]
  if groups == 1:  # no group axis: drop it from the patches
    patches = patches.reshape(patches.shape[:-2] + (n_in,))
    return LinearForm((patches,), (batch_and_spatial + k_labels + (c_label,),),
                      tuple(u_labels), y)
  one_hot = (jnp.arange(groups)[:, None] == jnp.arange(n_out)[None, :] // (n_out // groups)
             ).astype(x.dtype)
  return LinearForm((one_hot, patches),
                    ((g_label, out_spec[1]), batch_and_spatial + k_labels + (g_label, c_label)),
                    tuple(u_labels), y)


LINEAR_RULES["dot_general"] = _dot_general_rule
LINEAR_RULES["mul"] = _mul_rule
LINEAR_RULES["add"] = _add_rule(1.0)
LINEAR_RULES["add_any"] = _add_rule(1.0)
LINEAR_RULES["sub"] = _add_rule(-1.0)
LINEAR_RULES["conv_general_dilated"] = _conv_rule


# ----------------------------------------------------------------------------- chains

Tags = tuple[bool, ...]
ChainRule = Callable[[dict, int, Tags, tuple[int, ...], tuple[int, ...]], Tags | None]
CHAIN_RULES: dict[str, ChainRule] = {}

#: Chain primitives that scale ``u`` elementwise (so ``c != 1`` may need evaluating).
ELEMENTWISE_CHAIN = frozenset({"mul", "div", "neg"})


def _same_tags(params: dict, pos: int, tags: Tags, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...]) -> Tags | None:
  del params, pos
  return tags if in_shape == out_shape else None


def _numerator_only(params: dict, pos: int, tags: Tags, in_shape: tuple[int, ...],
                    out_shape: tuple[int, ...]) -> Tags | None:
  return _same_tags(params, pos, tags, in_shape, out_shape) if pos == 0 else None


def _transpose_tags(params: dict, pos: int, tags: Tags, in_shape: tuple[int, ...],
                    out_shape: tuple[int, ...]) -> Tags:
  del pos, in_shape, out_shape
  return tuple(tags[p] for p in params["permutation"])


def _broadcast_tags(params: dict, pos: int, tags: Tags, in_shape: tuple[int, ...],
                    out_shape: tuple[int, ...]) -> Tags | None:
  if pos != 0:
    return None
  out = [False] * len(out_shape)
  for i, d in enumerate(params["broadcast_dimensions"]):
    out[d] = tags[i] and in_shape[i] == out_shape[d]
  return tuple(out)


def _squeeze_tags(params: dict, pos: int, tags: Tags, in_shape: tuple[int, ...],
                  out_shape: tuple[int, ...]) -> Tags:
  del pos, in_shape, out_shape
  dims = {d % len(tags) for d in params["dimensions"]}
  return tuple(t for i, t in enumerate(tags) if i not in dims)


def _reshape_tags(params: dict, pos: int, tags: Tags, in_shape: tuple[int, ...],
                  out_shape: tuple[int, ...]) -> Tags | None:
  if pos != 0 or params.get("dimensions") is not None:
    return None
  big_in = [(s, t) for s, t in zip(in_shape, tags) if s != 1]
  big_out = [s for s in out_shape if s != 1]
  if [s for s, _ in big_in] == big_out:
    it = iter(t for _, t in big_in)
    return tuple(True if s == 1 else next(it) for s in out_shape)
  if all(t for _, t in big_in):
    return (True,) * len(out_shape)
  return None


for _name in ("convert_element_type", "copy", "copy_p", "reduce_precision", "neg"):
  CHAIN_RULES[_name] = _same_tags
CHAIN_RULES["mul"] = _same_tags
CHAIN_RULES["div"] = _numerator_only
CHAIN_RULES["transpose"] = _transpose_tags
CHAIN_RULES["broadcast_in_dim"] = _broadcast_tags
CHAIN_RULES["squeeze"] = _squeeze_tags
CHAIN_RULES["reshape"] = _reshape_tags


def tied_size(tags: Tags, shape: tuple[int, ...]) -> int:
  return math.prod(s for s, t in zip(shape, tags) if t)
