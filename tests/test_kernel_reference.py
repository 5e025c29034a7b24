"""`kernel_fn` against Neural Tangents reference kernels (tests/data, float64, 1e-6 relative).

Every case of `cases.json` is rebuilt as the equivalent Flax linen module; the dense cases
also as a Haiku transform. Plus: a float32 run at ~1e-4 and a jitted call equal to the
eager one.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from reference_models import CASES, FCN_CASES, flax_model, haiku_model, load_case, rel_err

import infinite_modules as im

RTOL = 1e-6


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _check_case(kf, data, rtol):
  k12 = kf(data["x1"], data["x2"])
  k11 = kf(data["x1"])
  errors = {
      "nngp12": rel_err(k12.nngp, data["nngp12"]),
      "ntk12": rel_err(k12.ntk, data["ntk12"]),
      "nngp11": rel_err(k11.nngp, data["nngp11"]),
      "ntk11": rel_err(k11.ntk, data["ntk11"]),
  }
  assert max(errors.values()) < rtol, errors
  # The diagonal variances agree with the diagonal of the x1-x1 kernel.
  np.testing.assert_allclose(k11.cov1, np.diag(data["nngp11"]), rtol=rtol * 10)
  np.testing.assert_allclose(k12.cov2, np.diag(kf(data["x2"]).nngp), rtol=rtol * 10)


_SLOW_FLAX = {"resnet_block_ntk"}  # costly to compile; covered by its own slow test


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_FLAX else n for n in CASES])
def test_flax_matches_neural_tangents(name, x64):
  spec, data = load_case(name)
  kf = im.kernel_fn(flax_model(spec["layers"]), data["x1"][:1], parameterization=spec["param"])
  assert kf.parameterization == spec["param"]
  # conv stacks read out by flatten need only the spatial diagonal; pooling needs all pairs
  pooled = any(layer[0] in ("gap", "avgpool") for layer in spec["layers"])
  assert kf.layout == ("full" if pooled else "diagonal")
  _check_case(kf, data, RTOL)


@pytest.mark.parametrize("name", FCN_CASES)
def test_haiku_matches_neural_tangents(name, x64):
  spec, data = load_case(name)
  kf = im.kernel_fn(haiku_model(spec["layers"]), data["x1"][:2], parameterization=spec["param"])
  _check_case(kf, data, RTOL)


def test_float32_matches_reference():
  """Without x64 the same case runs in float32 and agrees to float32 accuracy."""
  spec, data = load_case("fcn_relu_ntk")
  x1, x2 = data["x1"].astype(np.float32), data["x2"].astype(np.float32)
  kf = im.kernel_fn(flax_model(spec["layers"]), x1[:1], parameterization=spec["param"])
  k = kf(x1, x2)
  assert k.nngp.dtype == np.float32 and k.ntk.dtype == np.float32
  assert rel_err(k.nngp, data["nngp12"]) < 1e-4
  assert rel_err(k.ntk, data["ntk12"]) < 1e-4


@pytest.mark.parametrize("name", [
    "fcn_relu_standard", pytest.param("cnn_gap_ntk", marks=pytest.mark.slow)])
def test_jit_equals_eager(name, x64):
  spec, data = load_case(name)
  kf = im.kernel_fn(flax_model(spec["layers"]), data["x1"][:1], parameterization=spec["param"])
  eager = kf(data["x1"], data["x2"], get=("nngp", "ntk"))
  jitted = jax.jit(kf, static_argnames="get")(data["x1"], data["x2"], get=("nngp", "ntk"))
  np.testing.assert_allclose(jitted.nngp, eager.nngp, rtol=1e-12, atol=0)
  np.testing.assert_allclose(jitted.ntk, eager.ntk, rtol=1e-12, atol=0)
  assert rel_err(jitted.ntk, data["ntk12"]) < RTOL
  # A jitted Kernel (get=None) is a pytree too.
  k = jax.jit(kf)(data["x1"], data["x2"])
  np.testing.assert_allclose(k.nngp, eager.nngp, rtol=1e-12, atol=0)


def test_haiku_without_apply_rng(x64):
  spec, data = load_case("fcn_erf_ntk")
  kf = im.kernel_fn(haiku_model(spec["layers"], without_apply_rng=True), data["x1"][:2])
  _check_case(kf, data, RTOL)
