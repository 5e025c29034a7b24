"""Small models and inputs shared by the batching tests and their subprocess workers.

Run as a script it is the worker of the multi-device and multi-host tests:
  python tests/batching_cases.py devices            (under a 4-device XLA_FLAGS)
  python tests/batching_cases.py host PORT K OUT    (process K of 2 of a jax.distributed run)
  python tests/batching_cases.py killed PATH        (a slow run into PATH, to be SIGKILLed)
"""

from __future__ import annotations

import os
import sys

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

_NORMAL = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, kernel_init=_NORMAL)(nn.relu(nn.Dense(16, kernel_init=_NORMAL)(x)))


class CNNFlatten(nn.Module):  # diagonal layout
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), padding="SAME", kernel_init=_NORMAL)(x))
    return nn.Dense(1, kernel_init=_NORMAL)(x.reshape(x.shape[0], -1))


class CNNPool(nn.Module):  # full layout
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), padding="SAME", kernel_init=_NORMAL)(x))
    return nn.Dense(1, kernel_init=_NORMAL)(jnp.mean(x, axis=(1, 2)))


MODELS = {"fcn": (MLP, (3,)), "cnn_flatten": (CNNFlatten, (4, 4, 1)),
          "cnn_pool": (CNNPool, (4, 4, 1))}


def inputs(name, n1=7, n2=5, seed=0):
  shape = MODELS[name][1]
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n1, *shape)).astype(np.float32),
          rng.normal(size=(n2, *shape)).astype(np.float32))


def assert_same(batched, direct, rtol=1e-5, atol=1e-6):
  """Batched equals direct to float rounding, field by field (arrays, namedtuples, Kernels)."""
  import jax
  leaves_b = jax.tree_util.tree_leaves(batched)
  leaves_d = jax.tree_util.tree_leaves(direct)
  assert len(leaves_b) == len(leaves_d)
  for b, d in zip(leaves_b, leaves_d):
    np.testing.assert_allclose(np.asarray(b), np.asarray(d), rtol=rtol, atol=atol)


def _devices_worker():
  """Every model, symmetric and not, ragged, on 4 devices and on 1; and an empirical NTK."""
  import jax

  import infinite_modules as im
  import interop
  assert jax.device_count() == 4, jax.devices()
  for name, (model, _) in MODELS.items():
    x1, x2 = inputs(name)
    kf = im.kernel_fn(model(), x1[:1])
    direct, direct_sym = kf(x1, x2), kf(x1)
    for devices in (None, jax.devices()[:1]):
      batched = im.batch(kf, 3, devices=devices, progress=False)  # 3 x 2 tiles, ragged
      assert_same(batched(x1, x2), direct)
      assert_same(batched(x1), direct_sym)
  x1, x2 = inputs("fcn")
  model = MLP()
  variables = model.init(jax.random.PRNGKey(0), x1[:1])
  ntk_fn = interop.empirical_ntk_fn(model, trace_axes=(), implementation="jacobian_contraction")
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 2), ("a", "b"))
  assert_same(im.batch(ntk_fn, 2, mesh=mesh, progress=False)(x1, None, variables),
              ntk_fn(x1, None, variables))
  print("DEVICES OK")


def _killed_worker(path):
  """Writes an FCN kernel into `path` slowly (0.2 s per tile), to be killed midway."""
  import time

  import infinite_modules as im
  x1, x2 = inputs("fcn", 40, 30)
  kf = im.kernel_fn(MLP(), x1[:1])

  def slow(*args, **kwargs):
    time.sleep(0.2)
    return kf(*args, **kwargs)

  im.batch(slow, 4, progress=False, jit=False, checkpoint_seconds=0)(x1, x2, get="ntk",
                                                                     path=path)


def _host_worker(port, process, out):
  import jax
  jax.config.update("jax_platforms", "cpu")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                             process_id=process, initialization_timeout=60)
  import infinite_modules as im
  x1, x2 = inputs("cnn_pool", 9, 6)
  kf = im.kernel_fn(CNNPool(), x1[:1])
  k = im.batch(kf, 2, progress=False)(x1, None, get="ntk", path=os.path.join(out, "sym.npy"))
  assert k.shape == (9, 9) and jax.local_device_count() == 2
  im.batch(kf, 4, progress=False)(x1, x2, get=("nngp", "ntk"), path=os.path.join(out, "k.npy"))
  print(f"HOST {process} OK", flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if sys.argv[1] == "devices":
    _devices_worker()
  elif sys.argv[1] == "killed":
    _killed_worker(sys.argv[2])
  else:
    _host_worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
