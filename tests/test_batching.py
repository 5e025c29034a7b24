"""Block-wise kernel computation equals the direct one."""

import flax.linen as nn
import numpy as np
import pytest

import infinite_modules as im


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(nn.relu(nn.Dense(32)(x)))


@pytest.fixture(scope="module")
def setup():
  rng = np.random.RandomState(0)
  x1, x2 = rng.randn(7, 3).astype(np.float32), rng.randn(5, 3).astype(np.float32)
  kf = im.kernel_fn(MLP(), x1[:1])
  return kf, x1, x2, kf(x1, x2)


@pytest.mark.parametrize("batch_size", [3, 20])
def test_batched_equals_direct(setup, batch_size):
  kf, x1, x2, direct = setup
  batched = im.batch(kf, batch_size, progress=False)(x1, x2)
  for name in ("nngp", "ntk", "cov1", "cov2"):
    np.testing.assert_allclose(getattr(batched, name), getattr(direct, name), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(im.batch(kf, batch_size, progress=False)(x1, get="ntk"),
                             kf(x1, get="ntk"), rtol=1e-5, atol=1e-6)


def test_batch_rejects_bad_size():
  with pytest.raises(ValueError, match="batch_size"):
    im.batch(lambda *a: None, 0)
