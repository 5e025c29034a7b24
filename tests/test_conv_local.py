"""`nn.ConvLocal` (locally connected: each position its own weights) as a first layer,
against Neural Tangents' `stax.ConvLocal` (reference arrays in tests/data/convlocal.npz,
from NT 0.6.5 in float64 on the same inputs via /work/shared/tools/nt_stax_on_current_jax.py:
ConvLocal(8, (3,), SAME, W_std=sqrt(2), b_std=0.1) -> Relu -> Flatten or GlobalAvgPool ->
Dense(1, W_std=1); and a 2-D strided VALID one with GlobalAvgPool)."""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import numpy as np
import pytest

import infinite_modules as im

DATA = os.path.join(os.path.dirname(__file__), "data", "convlocal.npz")


class Local(nn.Module):
  readout: str = "flatten"

  @nn.compact
  def __call__(self, x):
    # NT's fan-in of a locally connected weight is window * in_channels, not the
    # positions * window * in_channels that Flax's variance_scaling reads from the
    # (positions..., window * in, out) leaf: normal(std) gives NT's variance.
    if self.readout == "pool2d":  # 2-D, strided, VALID
      h = nn.ConvLocal(8, (2, 3), strides=(1, 2), padding="VALID",
                       kernel_init=nn.initializers.normal(np.sqrt(2 / 12)),
                       bias_init=nn.initializers.normal(0.1))(x)
    else:
      h = nn.ConvLocal(8, (3,), padding="SAME", kernel_init=nn.initializers.normal(np.sqrt(2 / 6)),
                       bias_init=nn.initializers.normal(0.1))(x)
    h = nn.relu(h)
    if self.readout == "flatten":
      h = h.reshape(h.shape[0], -1)
    else:
      h = h.mean(tuple(range(1, h.ndim - 1)))
    return nn.Dense(1, kernel_init=nn.initializers.variance_scaling(1.0, "fan_in", "normal"))(h)


@pytest.mark.parametrize("readout,layout", [("flatten", "diagonal"), ("pool", "full"),
                                            ("pool2d", "full")])
def test_conv_local_matches_neural_tangents(readout, layout):
  data = np.load(DATA)
  suffix = "_2d" if readout == "pool2d" else ""
  x1, x2 = data["x1" + suffix], data["x2" + suffix]
  with jax.enable_x64(True):
    kf = im.kernel_fn(Local(readout), x1)
    k12, k11 = kf(x1, x2), kf(x1)
  assert kf.layout == layout and k12.exact
  for got, ref in ((k12.nngp, "nngp12"), (k12.ntk, "ntk12"), (k11.nngp, "nngp11")):
    np.testing.assert_allclose(got, data[f"{readout}_{ref}"], rtol=1e-10, atol=1e-12)
  # x2=None: ReLU's derivative kernel at correlation exactly 1, where NT's arccos of a
  # clipped correlation is off by ~2e-9.
  np.testing.assert_allclose(k11.ntk, data[f"{readout}_ntk11"], rtol=1e-8)


def test_conv_local_after_a_layer_is_refused_precisely():
  class Second(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.ConvLocal(8, (3,), padding="SAME")(nn.relu(nn.Dense(8)(x)))
      return nn.Dense(1)(h.mean(1))

  with pytest.raises(im.UnsupportedPrimitiveError,
                     match=r"(?s)conv_general_dilated.*Second/ConvLocal_0.*nn.ConvLocal"):
    im.kernel_fn(Second(), np.ones((2, 5, 2), np.float32))
