"""Channel splits: `jnp.split`, `jnp.array_split`, channel slices, `nn.glu`, and
concatenating the pieces back (`rules/splits.py`, `channels.py`).

Disjoint channel ranges of one field are independent fields; the same range is the same
field; overlapping ranges are dependent and refused. Witnesses: Monte Carlo over random
inits of the real Flax model (width 1024 split in two), whose bound rejects the kernel of
the pieces treated as one field; exact identities between the spellings of a split.
"""

from __future__ import annotations

from fractions import Fraction

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
from test_products import _inputs, assert_rejected, check_nngp, check_ntk_standard, dense, readout

import infinite_modules as im
from infinite_modules import channels as ch


def glu(x):
  return nn.glu(dense(1024, 2.0, 0.3)(x))


def glu_one_half(x):
  """The wrong model: value and gate from the same channels (dependent pieces)."""
  a = dense(512, 2.0, 0.3)(x)
  return a * nn.sigmoid(a)


def test_glu_nngp_and_bound_rejects_dependent_halves():
  est = check_nngp(glu, samples=250)
  assert_rejected(est, glu_one_half)


def test_glu_ntk_standard():
  """Standard parameterization sees the pieces' widths (512 channels each)."""
  check_ntk_standard(glu)


def _kernel(body, x1, x2, parameterization="standard"):
  return im.kernel_fn(readout(body, n_out=1), x1[:1], parameterization=parameterization)(x1, x2)


def _same(k1, k2, rtol=1e-6):
  np.testing.assert_allclose(k1.nngp, k2.nngp, rtol=rtol, atol=1e-7)
  np.testing.assert_allclose(k1.ntk, k2.ntk, rtol=rtol, atol=1e-7)


def _glu_by_slices(x):
  y = dense(64, 2.0, 0.3)(x)
  return y[:, :32] * nn.sigmoid(y[:, 32:])


def test_spellings_of_a_split_agree():
  """nn.glu, jnp.split and slices x[:, :k], x[:, k:] give one kernel."""
  x1, x2 = _inputs()
  by_glu = _kernel(lambda x: nn.glu(dense(64, 2.0, 0.3)(x)), x1, x2)
  _same(by_glu, _kernel(_glu_by_slices, x1, x2))


def test_array_split_pieces_are_independent_with_their_widths():
  """relu(a) * b + c of three array_split pieces (22, 21, 21 channels): each piece an
  independent field of the whole field's law, with its own width in the NTK."""
  x1, x2 = _inputs()

  def body(x):
    a, b, c = jnp.array_split(dense(64, 2.0, 0.3)(x), 3, axis=-1)
    return nn.relu(a[:, :21]) * b + c

  k = _kernel(body, x1, x2, parameterization="ntk")
  relu = _kernel(lambda x: nn.relu(dense(64, 2.0, 0.3)(x)), x1, x2, "ntk")
  lin = _kernel(lambda x: dense(64, 2.0, 0.3)(x), x1, x2, "ntk")
  # readout (variance 1) of the field: nngp = K_field; ntk = K_field + T_field.
  kr, kl = relu.nngp, lin.nngp
  tr, tl = relu.ntk - kr, lin.ntk - kl
  np.testing.assert_allclose(k.nngp, kr * kl + kl, rtol=1e-5)
  np.testing.assert_allclose(k.ntk, (kr * kl + kl) + (kl * tr + kr * tl + tl), rtol=1e-5)


def _mask_of_same_range(x):
  y = dense(64)(x)
  return y[:, :32] * (y[:, :32] > 0)


def _sin_cos_of_same_range(x):
  y = dense(64)(x)
  return jnp.sin(jnp.split(y, 2, -1)[0][:, :16]) * jnp.cos(y[:, :16])


def test_same_channel_range_is_one_field():
  """Two slices of the same range are the same field: h[:, :k] * (h[:, :k] > 0) is relu of
  one variable (the kernel of the unsplit field), not a product of kernels; so is a range
  reached in two steps (a slice of a split piece)."""
  x1, x2 = _inputs()
  relu = _kernel(lambda x: nn.relu(dense(32)(x)), x1, x2, "ntk")
  _same(_kernel(_mask_of_same_range, x1, x2, "ntk"), relu, rtol=1e-5)
  half_sin = _kernel(lambda x: 0.5 * jnp.sin(2.0 * dense(16)(x)), x1, x2, "ntk")
  _same(_kernel(_sin_cos_of_same_range, x1, x2, "ntk"), half_sin, rtol=1e-5)


def test_overlapping_channel_ranges_raise():
  x1, _ = _inputs()
  for body, prim in ((lambda y: y[:, :32] * y[:, 16:48], "mul"),
                     (lambda y: y[:, :32] + y[:, 16:48], "add"),
                     (lambda y: jnp.split(y[:, 16:], 2, -1)[0] * y[:, :24], "mul")):
    with pytest.raises(im.UnsupportedPrimitiveError, match=f"`{prim}`.*same random"):
      _kernel(lambda x, body=body: body(dense(64)(x)), x1, x1)


def test_concatenating_the_pieces_back_gives_the_field():
  """concatenate(split(h)) is h again: its nonlinearity has a kernel (it is Gaussian) and
  its channels can be sliced again."""
  x1, x2 = _inputs()
  h = lambda x: dense(64, 2.0, 0.3)(x)
  back = _kernel(lambda x: nn.relu(jnp.concatenate(jnp.split(h(x), 4, -1), -1))[:, 8:40],
                 x1, x2, "ntk")
  whole = _kernel(lambda x: nn.relu(h(x)), x1, x2, "ntk")
  _same(back, whole)


def _relu_of_halves(x):
  y = dense(64, 1.0)(x)
  return nn.relu(y[:, :32] + y[:, 32:])


def test_sum_of_disjoint_pieces_is_a_sum_of_independent_fields():
  x1, x2 = _inputs()
  k = _kernel(_relu_of_halves, x1, x2, "ntk")
  double = _kernel(lambda x: nn.relu(dense(32, 2.0)(x)), x1, x2, "ntk")
  np.testing.assert_allclose(k.nngp, double.nngp, rtol=1e-5)


def test_channel_ranges_overlap_exactly():
  t = 7
  half = ch.restrict(frozenset([t]), Fraction(0), Fraction(1, 2))
  other = ch.restrict(frozenset([t]), Fraction(1, 2), Fraction(1))
  assert not ch.shared(half, other)
  assert ch.shared(half, frozenset([t]))
  quarter = ch.restrict(other, Fraction(0), Fraction(1, 2))  # [1/2, 3/4) of the source
  assert ch.ranges(quarter) == {t: [(Fraction(1, 2), Fraction(3, 4))]}
  assert ch.shared(quarter, other) and not ch.shared(quarter, half)
  # A plain intersection stays conservative: any two pieces of one source meet.
  assert half & other
  assert not ch.shared(half, frozenset([8]))


def test_haiku_glu_equals_flax_glu():
  """The same split through Haiku (`jax.nn.glu` of an hk.Linear) gives the Flax kernel."""
  import haiku as hk
  import jax

  x1, x2 = _inputs()
  init = hk.initializers.VarianceScaling(2.0, "fan_in", "normal")
  f = hk.transform(lambda x: hk.Linear(1, w_init=hk.initializers.VarianceScaling(
      1.0, "fan_in", "normal"), with_bias=False)(jax.nn.glu(hk.Linear(
          64, w_init=init, with_bias=False)(x))))
  haiku = im.kernel_fn(f, x1[:1], parameterization="standard")(x1, x2)
  _same(haiku, _kernel(lambda x: nn.glu(dense(64, 2.0)(x)), x1, x2), rtol=1e-5)
