"""Deep nets (64 layers) on awkward inputs: zero, duplicated and opposite inputs, scales
1e-6 .. 1e6, a batch of one — kernels finite, symmetric and positive semi-definite.

By default 8 layers (closed forms relu, erf) and 3 (quadrature: tanh, a kinked lambda);
64 layers for all of them under `-m slow`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.nn import initializers as jinit

import infinite_modules as im

ACTIVATIONS = {"relu": nn.relu, "erf": jax.lax.erf, "tanh": jnp.tanh,
               "shifted_relu": lambda z: jnp.maximum(z - 0.3, 0.0)}


class Deep(nn.Module):
  act: object
  depth: int

  @nn.compact
  def __call__(self, x):
    w = jinit.variance_scaling(2.0, "fan_in", "normal")
    for _ in range(self.depth):
      x = self.act(nn.Dense(8, kernel_init=w, bias_init=jinit.normal(0.1))(x))
    return nn.Dense(1, kernel_init=w)(x)


def _awkward(dtype):
  base = np.random.default_rng(0).normal(size=(1, 3))
  scales = np.array([0.0, 1e-6, 1e-3, 1.0, 1.0, -1.0, 1e3, 1e6])[:, None]
  return (scales * base).astype(dtype)


def _check(k):
  for name in ("nngp", "ntk"):
    a = np.asarray(getattr(k, name), np.float64)
    scale = float(np.max(np.abs(a)))
    assert np.all(np.isfinite(a)), (name, a)
    assert scale > 0, name
    np.testing.assert_array_equal(a, a.T)  # x2=None: exactly symmetric
    assert np.min(np.linalg.eigvalsh(a)) >= -1e-6 * scale, (name, np.linalg.eigvalsh(a))


# 64 layers cost ~20 s (closed forms) to minutes (quadrature) on 2 shared cores: slow profile.
CASES = [(a, 8, d) for a in ("relu", "erf") for d in (np.float32, np.float64)]
CASES += [(a, 3, np.float64) for a in ("tanh", "shifted_relu")]
CASES += [pytest.param(a, 64, d, marks=pytest.mark.slow)
          for a in ACTIVATIONS for d in (np.float32, np.float64)]


@pytest.mark.parametrize("act,depth,dtype", CASES)
def test_deep_net_on_awkward_inputs(act, depth, dtype):
  with jax.enable_x64(dtype == np.float64):
    x = _awkward(dtype)
    kf = im.kernel_fn(Deep(ACTIVATIONS[act], depth), x[:1])
    k = kf(x, None)
    assert k.ntk.dtype == dtype
    _check(k)
    _check(kf(x[3:4], None))                           # a batch of one
    # Duplicated inputs give equal rows. Their mutual entry is not known to pair a point
    # with itself (only x2=None's diagonal is), so its correlation is 1 - O(eps) and the
    # arc-cosine kernels turn that into O(sqrt(eps)): measured 9e-9 relative in float64.
    np.testing.assert_allclose(k.ntk[3], k.ntk[4], rtol=1e-3 if dtype == np.float32 else 1e-7)
