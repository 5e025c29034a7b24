"""`im.batch`: tiled kernels equal the direct ones (any n, symmetric or not, in RAM or in a
file, 1 or 4 devices, 1 or 2 processes), for analytic, empirical and Monte Carlo kernel
functions; an interrupted run resumes to the same kernel."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from batching_cases import MLP, CNNPool, assert_same, inputs

import infinite_modules as im
import interop

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def setup():
  x1, x2 = inputs("fcn")
  kf = im.kernel_fn(MLP(), x1[:1])
  return kf, x1, x2, kf(x1, x2)


@pytest.mark.parametrize("batch_size", [3, 20])
def test_batched_equals_direct(setup, batch_size):
  kf, x1, x2, direct = setup
  batched = im.batch(kf, batch_size, progress=False)(x1, x2)
  assert isinstance(batched, im.Kernel) and batched.shape1 == x1.shape
  assert_same(batched, direct)
  assert_same(im.batch(kf, batch_size, progress=False)(x1, get="ntk"), kf(x1, get="ntk"))


def test_float64():
  with jax.enable_x64(True):
    x1, x2 = (x.astype(np.float64) for x in inputs("fcn"))
    kf = im.kernel_fn(MLP(), x1[:1])
    out = im.batch(kf, 3, progress=False)(x1, x2, get="ntk")
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, kf(x1, x2, get="ntk"), rtol=1e-12, atol=1e-12)


def test_symmetric_computes_the_upper_tiles_once(setup):
  kf, x1, _, _ = setup
  calls = []

  def counting(a, b, *args, **kwargs):
    calls.append(b is None)
    return kf(a, b, *args, **kwargs)

  # 7 examples in tiles of 3: a 3 x 3 grid, 3 diagonal tiles (x2=None) and 3 above.
  out = im.batch(counting, 3, progress=False, jit=False)(x1, None, get=("nngp", "cov1"))
  assert sorted(calls) == [False] * 3 + [True] * 3
  assert type(out).__name__ == "Kernels" and out._fields == ("nngp", "cov1")
  assert_same(out, kf(x1, None, get=("nngp", "cov1")))


def test_empirical_kernel_functions():
  x1, x2 = inputs("fcn")
  model = MLP()
  variables = model.init(jax.random.PRNGKey(1), x1[:1])
  # trace_axes=(): (n1, n2, 2, 2) tiles, whose lower tiles are computed, not mirrored.
  ntk_fn = interop.empirical_ntk_fn(model, trace_axes=(), implementation="jacobian_contraction")
  sym = im.batch(ntk_fn, 3, progress=False)(x1, None, variables)
  assert sym.shape == (7, 7, 2, 2)
  assert_same(sym, ntk_fn(x1, None, variables), rtol=1e-5, atol=1e-5)
  kernel_fn = interop.empirical_kernel_fn(model, implementation="jacobian_contraction")
  both = im.batch(kernel_fn, 2, progress=False)(x1, x2, ("nngp", "ntk"), variables)
  assert_same(both, kernel_fn(x1, x2, ("nngp", "ntk"), variables), rtol=1e-5, atol=1e-5)


def test_monte_carlo_kernel_function():
  x1, _ = inputs("fcn")
  mc = interop.monte_carlo_kernel_fn(MLP(), x1[:1], n_samples=2, progress=False,
                                     implementation="jacobian_contraction")
  # The same initializations serve every tile, so tiles agree with the direct estimate.
  assert_same(im.batch(mc, 4, progress=False, jit=False)(x1), mc(x1), rtol=1e-5, atol=1e-5)


def test_file_output_resumes_after_interruption(setup, tmp_path):
  kf, x1, x2, direct = setup
  path = str(tmp_path / "kernel.npy")
  calls = []

  def interrupted(a, b, *args, **kwargs):
    if len(calls) == 4:
      raise KeyboardInterrupt  # killed halfway through the 3 x 2 tiles
    calls.append(1)
    return kf(a, b, *args, **kwargs)

  batched = im.batch(interrupted, 3, progress=False, jit=False, checkpoint_seconds=0)
  with pytest.raises(KeyboardInterrupt):
    batched(x1, x2, get="ntk", path=path)
  finished = int(np.load(str(tmp_path / "kernel.tiles-p0.npy")).sum())
  assert 1 <= finished < 6  # tiles dispatched but not yet copied back are computed again
  calls.clear()
  counting = im.batch(lambda *a, **k: calls.append(1) or kf(*a, **k), 3, progress=False,
                      jit=False)
  out = counting(x1, x2, get="ntk", path=path)
  assert len(calls) == 6 - finished + 1  # the missing tiles, and one finished tile checked again
  assert isinstance(out, np.memmap)
  assert_same(out, direct.ntk)
  assert_same(np.load(path), direct.ntk)
  # A finished run returns the file; another kernel function or other inputs are refused.
  assert_same(counting(x1, x2, get="ntk", path=path), direct.ntk)
  with pytest.raises(ValueError, match="another kernel function"):
    im.batch(kf, 3, progress=False)(x1, x2, get="nngp", path=path)
  with pytest.raises(ValueError, match="records another kernel"):
    im.batch(kf, 3, progress=False)(x1 + 1, x2, get="ntk", path=path)


@pytest.mark.slow
def test_run_killed_by_sigkill_resumes(tmp_path):
  path = str(tmp_path / "k.npy")
  ledger = tmp_path / "k.tiles-p0.npy"
  proc = subprocess.Popen([sys.executable, os.path.join(HERE, "batching_cases.py"), "killed",
                           path], env=_worker_env(1))
  try:
    deadline = time.monotonic() + 240
    while not (ledger.exists() and np.load(ledger).sum() >= 5):
      assert time.monotonic() < deadline and proc.poll() is None, "no tiles were recorded"
      time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  finished = int(np.load(ledger).sum())
  assert 5 <= finished < 10 * 8  # killed midway through the 10 x 8 tiles
  x1, x2 = inputs("fcn", 40, 30)
  kf = im.kernel_fn(MLP(), x1[:1])
  assert_same(im.batch(kf, 4, progress=False)(x1, x2, get="ntk", path=path), kf(x1, x2, get="ntk"))


def test_kernel_to_files(setup, tmp_path):
  kf, x1, _, _ = setup
  out = im.batch(kf, 4, progress=False)(x1, path=str(tmp_path / "k.npy"))
  assert_same(out, kf(x1))
  assert sorted(os.listdir(tmp_path))[:5] == [
      "k.cov1.npy", "k.cov2.npy", "k.error.npy", "k.nngp.npy", "k.ntk.npy"]


def test_rejects_untileable_output():
  x1, _ = inputs("fcn")
  model = MLP()
  variables = model.init(jax.random.PRNGKey(1), x1[:1])
  diag = interop.empirical_ntk_fn(model, diagonal_axes=(0,), implementation="jacobian_contraction")
  with pytest.raises(ValueError, match="leading axes must be"):
    im.batch(diag, 3, progress=False)(x1, None, variables)


def test_batch_rejects_bad_size():
  with pytest.raises(ValueError, match="batch_size"):
    im.batch(lambda *a: None, 0)


def _worker_env(devices):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


def test_models_on_four_devices_and_one():
  """FCN, CNN-flatten (diagonal layout) and pooled CNN (full layout), symmetric and not."""
  run = subprocess.run([sys.executable, os.path.join(HERE, "batching_cases.py"), "devices"],
                       env=_worker_env(4), capture_output=True, text=True, timeout=300,
                       check=False)
  assert "DEVICES OK" in run.stdout, run.stdout + run.stderr


def test_two_processes(tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "batching_cases.py"), "host",
                             str(port), str(k), str(tmp_path)], env=_worker_env(2),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for k in range(2)]
  try:
    logs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for k, log in enumerate(logs):
    assert f"HOST {k} OK" in log, log
  x1, x2 = inputs("cnn_pool", 9, 6)
  kf = im.kernel_fn(CNNPool(), x1[:1])
  assert_same(np.load(tmp_path / "sym.npy"), kf(x1, get="ntk"))
  direct = kf(x1, x2)
  assert_same(np.load(tmp_path / "k.nngp.npy"), direct.nngp)
  assert_same(np.load(tmp_path / "k.ntk.npy"), direct.ntk)
  # Each process recorded its own share of the tiles.
  shares = [np.load(tmp_path / f"sym.tiles-p{k}.npy") for k in range(2)]
  assert shares[0].any() and shares[1].any() and (shares[0] | shares[1]).all()
