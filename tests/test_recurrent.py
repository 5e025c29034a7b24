"""Recurrent cells: nn.RNN(nn.SimpleCell), h_t = tanh(W_i x_t + b + W_h h_{t-1}).

Every pre-activation z_t is a sum of G-vars of W_i, W_h and the bias, shared by all steps
(`infinite_modules/sharing.py`): E[z_t(x) z_s(x')] = v_i <x_t, x'_s> / d + v_b
+ v_h E[h_{t-1}(x) h_{s-1}(x')], a recursion over time pairs. The last state needs only
t = s (and equals the kernel of an unrolled network with fresh weights per step, an
exact witness); reading all outputs (a mean over time) needs t != s, checked by Monte
Carlo on the real Flax model, where the kernel with independent steps fails.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.nn import initializers as jinit
from reference_models import assert_mc_close, linen_init_apply, mc_nngp, mc_ntk

import infinite_modules as im


def normal(var):
  return jinit.variance_scaling(var, "fan_in", "normal")


class Recurrent(nn.Module):
  width: int = 64
  last: bool = True
  dtype: object = jnp.float32
  n_out: int | None = None

  @nn.compact
  def __call__(self, x):
    cell = nn.SimpleCell(self.width, kernel_init=normal(1.0), recurrent_kernel_init=normal(1.5),
                         bias_init=jinit.normal(0.3), param_dtype=self.dtype)
    y = nn.RNN(cell)(x)
    y = y[:, -1] if self.last else jnp.mean(y, axis=1)
    return nn.Dense(self.n_out or self.width, kernel_init=normal(1.0), param_dtype=self.dtype)(y)


class Unrolled(nn.Module):
  """The same recurrence with fresh weights and biases at every step."""
  width: int = 64
  last: bool = True

  @nn.compact
  def __call__(self, x):
    h, ys = jnp.zeros((x.shape[0], self.width), x.dtype), []
    for t in range(x.shape[1]):
      h = jnp.tanh(nn.Dense(self.width, kernel_init=normal(1.0), bias_init=jinit.normal(0.3))(
          x[:, t]) + nn.Dense(self.width, use_bias=False, kernel_init=normal(1.5))(h))
      ys.append(h)
    y = h if self.last else sum(ys) / len(ys)
    return nn.Dense(self.width, kernel_init=normal(1.0))(y)


def _sequences(n, seed, length=3, dim=4):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, length, dim))


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_last_state_equals_unrolled_network(parameterization):
  """Exact, float64: the last state's kernel needs only same-time moments, which do not
  see whether the steps share their weights."""
  with jax.enable_x64(True):
    x1, x2 = _sequences(3, 0), _sequences(2, 1)
    kf = im.kernel_fn(Recurrent(dtype=jnp.float64), x1[:1], parameterization=parameterization)
    k = kf(x1, x2)
    u = im.kernel_fn(Unrolled(), x1[:1], parameterization=parameterization)(x1, x2)
    np.testing.assert_allclose(k.nngp, u.nngp, rtol=1e-12)
    np.testing.assert_allclose(k.ntk, u.ntk, rtol=1e-12)
    assert kf.layout == "diagonal"


def test_all_outputs_monte_carlo():
  """Mean over time of all states, width 512, 128 inits of the real nn.RNN: NNGP within
  5%; the kernel of the same recurrence with independent weights per step (no cross-time
  moments) fails the same bound (measured: 0.6-1.1% vs 32-40%, MC noise 0.8%)."""
  x1 = _sequences(3, 2).astype(np.float32)
  x2 = _sequences(2, 3).astype(np.float32)
  x2[0] = 0.9 * x1[0] + 0.4 * x2[0]
  model = Recurrent(width=512, last=False)
  kf = im.kernel_fn(model, x1[:1])
  assert kf.layout == "full"
  k = kf(x1, x2)
  init, apply = linen_init_apply(model, x1[:1])
  est = mc_nngp(init, apply, np.concatenate([x1, x2]), samples=128, seed=5)
  assert_mc_close(est, len(x1), k.nngp, k.cov1, k.cov2, what="rnn nngp")
  wrong = im.kernel_fn(Unrolled(width=512, last=False), x1[:1])(x1, x2)
  with pytest.raises(AssertionError):
    assert_mc_close(est, len(x1), wrong.nngp, wrong.cov1, wrong.cov2, what="independent")


@pytest.mark.slow
def test_all_outputs_ntk_monte_carlo():
  """Mean empirical NTK of the real nn.RNN (standard parameterization, width 256, 16
  outputs, 256 inits)."""
  x1 = _sequences(3, 2).astype(np.float32)
  x2 = _sequences(2, 3).astype(np.float32)
  model = Recurrent(width=256, last=False, n_out=16)
  k = im.kernel_fn(model, x1[:1], parameterization="standard")(x1, x2)
  init, apply = linen_init_apply(model, x1[:1])
  est = mc_ntk(init, apply, np.concatenate([x1, x2]), samples=256, seed=6)
  assert_mc_close(est, len(x1), k.ntk, what="rnn ntk")


@pytest.mark.parametrize("cell", [nn.LSTMCell, pytest.param(nn.GRUCell, marks=pytest.mark.slow)])
def test_gated_cells_name_the_recurrence(cell):
  class Gated(nn.Module):
    @nn.compact
    def __call__(self, x):
      rnn = nn.RNN(cell(16, recurrent_kernel_init=jinit.normal(0.25)))
      return nn.Dense(1)(rnn(x)[:, -1])

  x = _sequences(2, 0).astype(np.float32)
  with pytest.raises(im.UnsupportedPrimitiveError,
                     match=r"(?s)scan.*RNN.*recurrence.*multiply their state by a gate"):
    im.kernel_fn(Gated(), x)
