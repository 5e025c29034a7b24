"""Structure of the compiled kernel computation (cost that cannot regress) and x2=None.

* The XLA cost analysis of a conv stack's kernel: transcendental operations grow
  linearly with depth (each layer's nonlinearity evaluated once per moment entry, not
  once per window tap and compounded over the layers, as when window sums were sums
  of shifted slices).
* An eval-mode BatchNorm costs what a scale costs (no quadrature) and gives the same
  kernel as the equivalent constant scale.
* x2=None: exactly symmetric kernels, and correlation exactly 1 on the diagonal, so a
  float32 ReLU NTK matches the float64 one to 1e-5 (the clipped 1 - eps correlation
  gave 3e-4 per layer). Large batches (from 2^24 entries per pair moment array) are
  computed by blocks (only the upper block pairs): the same kernel, symmetric, with the
  same exact diagonal; an MLP's input Gram matrix alone by upper block products.
* The compiled program of an MLP grows linearly with depth; global pooling sums and a
  conv input's few-channel Gram matrix avoid the XLA kernels that cost memory or time.
* ReLU-type kernels evaluate no scalar `atan2` (XLA's CPU backend runs it one element
  at a time): arccos is `inverse_trig`'s polynomial.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.nn.initializers import variance_scaling

import infinite_modules as im


def _he():
  return variance_scaling(2.0, "fan_in", "normal")


class ConvStack(nn.Module):
  depth: int
  pool: bool = False

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = nn.relu(nn.Conv(8, (3, 3), padding="SAME", kernel_init=_he(), use_bias=False)(x))
    x = x.mean((1, 2)) if self.pool else x.reshape(x.shape[0], -1)
    return nn.Dense(1, kernel_init=_he(), use_bias=False)(x)


def _compiled(kf, x):
  return jax.jit(lambda a: kf(a, None, get=("nngp", "ntk"))).lower(x).compile()


def _cost(kf, x) -> dict:
  cost = _compiled(kf, x).cost_analysis()
  return cost[0] if isinstance(cost, list) else cost


@pytest.mark.parametrize("pool", [False, True], ids=["flatten", "pooled"])
def test_transcendentals_grow_linearly_with_depth(pool):
  # Every conv block adds the same work: equal increments. Each layer's nonlinearity
  # fused into the next window sum's taps made them grow (2376, 10692, 22464 for the
  # flatten stack: increments 8316, 11772; now 1188, 1188).
  x = np.random.RandomState(0).randn(3, 6, 6, 2).astype(np.float32)
  counts = [_cost(im.kernel_fn(ConvStack(depth, pool), x[:1]), x)["transcendentals"]
            for depth in (1, 2, 3)]
  first, second = counts[1] - counts[0], counts[2] - counts[1]
  assert 0 < second <= 1.05 * first, counts


class BatchNormNet(nn.Module):
  batch_norm: bool

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), kernel_init=_he())(x)
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=True, epsilon=1e-5)(x)
    else:  # BatchNorm at its initial running statistics (mean 0, variance 1)
      x = x / jnp.sqrt(1.0 + 1e-5)
    x = nn.relu(x)
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(8, (3, 3), kernel_init=_he())(x))
    return nn.Dense(1, kernel_init=_he())(x.mean((1, 2)))


def test_eval_batch_norm_costs_a_scale():
  x = np.random.RandomState(1).randn(2, 6, 6, 2).astype(np.float32)
  compiled = [_compiled(im.kernel_fn(BatchNormNet(bn), x[:1]), x) for bn in (True, False)]
  costs = [c.cost_analysis() for c in compiled]
  ops = [(c[0] if isinstance(c, list) else c)["transcendentals"] for c in costs]
  # A per-location quadrature of the relu multiplies this by ~100.
  assert ops[0] <= 1.2 * ops[1], ops
  (nngp_bn, ntk_bn), (nngp, ntk) = (f(x) for f in compiled)
  np.testing.assert_allclose(nngp_bn, nngp, rtol=1e-5)
  np.testing.assert_allclose(ntk_bn, ntk, rtol=1e-5)


class TanhMLP(nn.Module):
  depth: int = 3

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = jnp.tanh(nn.Dense(64, kernel_init=variance_scaling(1.5, "fan_in", "normal"),
                            bias_init=nn.initializers.normal(0.1))(x))
    return nn.Dense(1)(x)


# float64 is slow (~25 s: tanh's quadrature compiles long); float32 keeps the rule covered.
@pytest.mark.parametrize("dtype", [np.float32, pytest.param(np.float64, marks=pytest.mark.slow)])
def test_x2_none_exactly_symmetric(dtype):
  # tanh uses Gauss-Hermite quadrature with the two sides of a pair in different
  # roles (outer / inner variable): both triangles are computed, they differ by rounding.
  x = np.random.RandomState(2).randn(7, 5).astype(dtype)
  with jax.enable_x64(dtype == np.float64):
    kf = im.kernel_fn(TanhMLP(), x[:1])
    k = kf(x, None)
    for name in ("nngp", "ntk"):
      arr = np.asarray(getattr(k, name))
      assert arr.dtype == dtype
      np.testing.assert_array_equal(arr, arr.T, err_msg=name)
    np.testing.assert_array_equal(np.asarray(k.cov1), np.asarray(k.cov2))
    # ...and equal to the general two-batch computation up to the quadrature's
    # asymmetry (each quadrature's two triangles are averaged where it is computed).
    general = np.asarray(kf(x, x + 0.0).ntk)
    np.testing.assert_allclose(k.ntk, (general + general.T) / 2,
                               rtol=1e-5 if dtype == np.float32 else 1e-9)


class ReluMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    for _ in range(3):
      x = nn.relu(nn.Dense(512, kernel_init=_he(), use_bias=False)(x))
    return nn.Dense(1, kernel_init=_he(), use_bias=False)(x)


class DeepMLP(nn.Module):
  depth: int

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = nn.relu(nn.Dense(16, kernel_init=_he())(x))
    return nn.Dense(1, kernel_init=_he())(x)


def test_compiled_mlp_grows_linearly_with_depth():
  """Each Dense + relu layer adds the same compiled instructions. A correlation XLA may
  fuse into its consumers (c times reciprocal square roots, not a division) let every
  layer's kernels recompute all layers before it: 348, 494, 620, 746 instructions added
  by layers 2..5, and compile time quadratic in depth."""
  import re
  x = np.random.RandomState(0).randn(6, 8).astype(np.float32)
  counts = []
  for depth in (1, 2, 3, 4):
    kf = im.kernel_fn(DeepMLP(depth), x)
    text = jax.jit(lambda a, kf=kf: kf(a, None, ("nngp", "ntk"))).lower(x).compile().as_text()
    counts.append(len(re.findall(r"^\s+\S+ = ", text, re.MULTILINE)))
  added = np.diff(counts)
  assert added.max() - added.min() <= 0.05 * added.mean(), counts


def test_float32_relu_ntk_diagonal_matches_float64():
  # The fcn benchmark workload, smaller: the diagonal's correlation is 1 exactly, so
  # arccos does not turn float32 rounding (1 - eps) into sqrt(eps).
  x = np.random.RandomState(3).randn(16, 64)
  kf = im.kernel_fn(ReluMLP(), x[:1].astype(np.float32))
  k32 = kf(x.astype(np.float32), None)
  with jax.enable_x64(True):
    k64 = im.kernel_fn(ReluMLP(), x[:1])(x, None)
  for name in ("nngp", "ntk"):
    ref = np.asarray(getattr(k64, name))
    err = np.max(np.abs(np.asarray(getattr(k32, name), np.float64) - ref)) / np.max(np.abs(ref))
    assert err < 1e-5, (name, err)


class BiasConvFlatten(nn.Module):
  @nn.compact
  def __call__(self, x):
    init = _he()
    for _ in range(2):
      x = nn.Conv(4, (3, 3), padding="SAME", kernel_init=init,
                  bias_init=nn.initializers.normal(0.2))(x)
      x = nn.relu(x)
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(1, kernel_init=init, bias_init=nn.initializers.normal(0.1))(x)


class TwoBranchLayerNorm(nn.Module):
  """Sums of independent fields with means, LayerNorm (location constants), biases."""

  @nn.compact
  def __call__(self, x):
    init, bias = _he(), nn.initializers.normal(0.3)
    h = nn.relu(nn.Dense(16, kernel_init=init, bias_init=bias)(x))
    h = h + nn.relu(nn.Dense(16, kernel_init=init, bias_init=bias)(x))
    h = nn.relu(nn.LayerNorm()(nn.Dense(16, kernel_init=init, bias_init=bias)(h)))
    return nn.Dense(1, kernel_init=init, bias_init=bias)(h)


@pytest.mark.parametrize("model, input_layers",
                         [(ReluMLP(), 1), (BiasConvFlatten(), 1), (TwoBranchLayerNorm(), 2),
                          (ConvStack(2, pool=True), 1)],
                         ids=["mlp", "conv_bias_flatten", "two_branch_layernorm", "conv_pooled"])
def test_x2_none_symmetric_without_a_final_mirror(model, input_layers):
  # Closed-form stacks in the diagonal layout are symmetric by construction (the input
  # Gram matrix is symmetrized once, every later step treats both sides alike), so the
  # compiled program has no (k + k^T) / 2 on the kernel: its transposed reads fuse into
  # the last layer and doubled the fcn benchmark's time. Pooled stacks keep the mirror.
  x = np.random.RandomState(4).randn(5, 6, 6, 2).astype(np.float32)
  if isinstance(model, (ReluMLP, TwoBranchLayerNorm)):
    x = x.reshape(5, -1)
  kf = im.kernel_fn(model, x[:1])
  nngp, ntk = kf(x, None, get=("nngp", "ntk"))
  for arr in (nngp, ntk):
    arr = np.asarray(arr)
    np.testing.assert_array_equal(arr, arr.T)
  # Off the diagonal, where the general computation's float32 correlation is not 1 - eps.
  general = kf(x, x + 0.0, get=("nngp", "ntk"))
  off = ~np.eye(len(x), dtype=bool)
  for ours, ref in zip((nngp, ntk), general):
    np.testing.assert_allclose(np.asarray(ours)[off], np.asarray(ref)[off], rtol=1e-5)
  # Swaps of the two inputs: one per input Gram matrix's symmetrization (a final
  # mirror would add two).
  transposes = str(jax.make_jaxpr(lambda a: kf(a, None, get=("nngp", "ntk")))(x)).count(
      "transpose[permutation=(1, 0")
  assert transposes == input_layers + (0 if kf.layout == "diagonal" else 2), transposes


class MaxPoolNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), padding="SAME", kernel_init=_he())(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return nn.Dense(1, kernel_init=_he())(x.reshape(x.shape[0], -1))


@pytest.fixture
def small_blocks(monkeypatch):
  """Blocks of >= 4 inputs (not 32) from any size, so small batches take the blocked path."""
  from infinite_modules import api
  monkeypatch.setattr(api, "_MIN_BLOCK", 4)
  monkeypatch.setattr(api, "_MIN_BLOCKED_ENTRIES", 0)
  return api


def test_blocks_only_where_the_pair_work_is_large():
  """x2=None goes by blocks from 2^24 entries per pair moment array (n^2 x positions)."""
  from infinite_modules import api
  assert api._symmetric_blocks(1024) == 1  # an MLP batch: one input Gram matrix product
  assert api._symmetric_blocks(64, 16 * 16) == 1
  assert api._symmetric_blocks(128, 32 * 32) == 4
  assert api._symmetric_blocks(4096) == 4


@pytest.mark.parametrize("n", [7, 300])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_symmetric_gram(n, dtype):
  """The input Gram matrix is exactly symmetric and equals the matrix product."""
  from infinite_modules import moments as mo
  a = np.random.RandomState(n).randn(n, 33).astype(dtype)
  with jax.enable_x64(dtype == np.float64):
    g = np.asarray(jax.jit(mo.symmetric_gram)(a))
  assert g.dtype == dtype
  np.testing.assert_array_equal(g, g.T)
  ref = a.astype(np.float64) @ a.T.astype(np.float64)
  tol = 1e-5 if dtype == np.float32 else 1e-13
  np.testing.assert_allclose(g, ref, rtol=tol, atol=tol * np.abs(ref).max())


@pytest.mark.parametrize("shape, axes", [((3, 2, 4, 5), (2, 3)), ((3, 4, 5), (1, 2)),
                                         ((2, 3, 1, 2), (2, 3)), ((2, 1), (1,)),
                                         ((3, 4, 5), (1,))])
def test_global_sum_of_moments(shape, axes):
  """The global sum (pooling) of moment arrays: two overlapping windows, not a reduction
  (which XLA's CPU backend fused with materialized copies of all its operands)."""
  from infinite_modules import moments as mo
  arr = np.random.RandomState(0).randn(*shape)
  with jax.enable_x64(True):
    out = np.asarray(jax.jit(lambda a: mo._sum_axes(a, list(axes)))(arr))
  np.testing.assert_allclose(out, arr.sum(axis=axes), rtol=1e-13)


def test_conv_input_gram_without_a_transpose():
  """A conv input with few channels: its pair moments (n, n, *S) are summed in place, with
  no transpose of the whole moment array, and equal the per-position products."""
  from infinite_modules.rules.linear import _input_moments
  x = np.random.RandomState(0).randn(6, 5, 4, 3)
  with jax.enable_x64(True):
    root = _input_moments(x, x, 0, (3,), [1, 2], False, jnp.float64)
    text = jax.jit(lambda v: _input_moments(v, v, 0, (3,), [1, 2], False, jnp.float32).nngp
                   ).lower(x.astype(np.float32)).as_text()
  ref = np.einsum("aijc,bijc->abij", x, x)
  np.testing.assert_allclose(root.nngp, ref, rtol=1e-13)
  np.testing.assert_array_equal(root.nngp, np.transpose(root.nngp, (1, 0, 2, 3)))
  assert "dot_general" not in text


# tanh_mlp is slow (~20 s, quadrature); the blocked program is covered by the other three.
@pytest.mark.parametrize("model, n", [pytest.param("tanh_mlp", 13, marks=pytest.mark.slow),
                                      ("relu_conv", 8), ("relu_conv", 18), ("max_pool", 9)])
def test_x2_none_by_blocks_is_the_whole_kernel(small_blocks, monkeypatch, model, n):
  """B(B+1)/2 upper block pairs (B = 2, 3, 4; 9, 13 and 18 inputs need padding) give the
  kernel of all pairs: symmetric, equal to the unblocked x2=None kernel, with the exact
  correlation 1 of the diagonal (float32 against float64), and the estimate's error
  bound of a sampled rule (max pooling) carried through."""
  api = small_blocks
  rng = np.random.RandomState(n)
  if model == "tanh_mlp":
    net, x = TanhMLP(depth=2), rng.randn(n, 5)
  elif model == "relu_conv":
    net, x = BiasConvFlatten(), rng.randn(n, 5, 5, 2)
  else:
    net, x = MaxPoolNet(), rng.randn(n, 4, 4, 2)
  assert api._symmetric_blocks(n) == min(4, n // 4) > 1
  with jax.enable_x64(True):
    kf = im.kernel_fn(net, x[:1])
    blocked = kf(x, None)
    monkeypatch.setattr(api, "_MAX_BLOCKS", 1)
    whole = im.kernel_fn(net, x[:1])(x, None)
  # Quadratures (tanh) treat the two sides of a pair differently: the unblocked kernel
  # averages both triangles, the blocked one has each off-diagonal block once.
  # Max pooling is estimated from draws conditioned on the pair's first input, so entry
  # (a, b) of a block pair and its mirror are two estimates (the unblocked kernel averages
  # them): equal within the stated error bound.
  tol = 1e-9 if model == "tanh_mlp" else 1e-12
  for name in ("nngp", "ntk"):
    ours, ref = np.asarray(getattr(blocked, name)), np.asarray(getattr(whole, name))
    np.testing.assert_array_equal(ours, ours.T)
    atol = float(blocked.error) if model == "max_pool" else tol * np.abs(ref).max()
    np.testing.assert_allclose(ours, ref, rtol=tol, atol=atol)
    np.testing.assert_allclose(np.diag(ours), np.diag(ref), rtol=1e-12)
  np.testing.assert_allclose(blocked.cov1, whole.cov1, rtol=1e-12)
  assert blocked.estimates == whole.estimates
  np.testing.assert_allclose(blocked.error, whole.error, rtol=1e-12)
  if model == "relu_conv":
    k32 = kf(x.astype(np.float32), None)
    for name in ("nngp", "ntk"):
      ref = np.asarray(getattr(blocked, name))
      err = np.abs(np.asarray(getattr(k32, name), np.float64) - ref).max() / np.abs(ref).max()
      assert err < 1e-5, (name, err)


def test_x2_none_by_blocks_under_jit_and_grad(small_blocks):
  x = np.random.RandomState(5).randn(10, 4).astype(np.float32)
  kf = im.kernel_fn(ReluMLP(), x[:1])
  ntk = jax.jit(lambda a: kf(a, None, "ntk"))(x)
  np.testing.assert_allclose(ntk, kf(x, None, "ntk"), rtol=1e-6)
  grad = jax.grad(lambda a: kf(a, None, "ntk").sum())(jnp.asarray(x))
  assert np.all(np.isfinite(np.asarray(grad)))


def test_no_scalar_atan2_in_relu_kernels():
  x = np.zeros((3, 4), np.float32)
  kf = im.kernel_fn(ReluMLP(), x)
  text = jax.jit(lambda a: kf(a, None, ("nngp", "ntk"))).lower(x).as_text()
  assert "atan2" not in text


def test_one_fused_kernel_per_relu_layer():
  """A relu layer's NNGP and NTK are written by one fused XLA kernel (`moments.one_buffer`):
  as two arrays XLA compiled three kernels per layer, the correlation and a square root
  materialized between them (fcn: 19 kernels against NT's 14; now 13)."""
  import re
  x = np.random.RandomState(0).randn(6, 8).astype(np.float32)
  counts = []
  for depth in (2, 4):
    kf = im.kernel_fn(DeepMLP(depth), x)
    text = jax.jit(lambda a, kf=kf: kf(a, None, ("nngp", "ntk"))).lower(x).compile().as_text()
    entry = text[text.index("ENTRY"):]
    big = [s for s in re.findall(r"^\s*(?:ROOT )?\S+ = (\S+) fusion\(", entry, re.MULTILINE)
           if s.count(",") >= 1]  # (n, n) arrays and larger; per-input variances aside
    counts.append(len(big))
  assert counts[1] - counts[0] <= 2, counts


def test_flax_model_does_not_import_haiku():
  """Haiku's hooks are installed only when the user has imported Haiku: importing it for a
  Flax model cost the first `kernel_fn` 0.1-0.3 s."""
  import subprocess
  import sys
  code = ("import sys, numpy as np, flax.linen as nn, infinite_modules as im\n"
          "m = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(1)])\n"
          "im.kernel_fn(m, np.ones((2, 3), np.float32))\n"
          "assert 'haiku' not in sys.modules, 'haiku imported'\n")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
