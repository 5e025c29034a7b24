"""The inner integral of the pair-law path in closed form (`gaussian_pieces.TwoSlopes`).

Witnesses:
* E[phi(V)], E[phi(V)^2], E[phi'(V)] for V ~ N(c, s^2) against a brute-force high-order
  Gauss-Legendre quadrature in V (float64, 1e-12), for relu, leaky_relu, abs, -relu and the
  identity, with s -> 0 (and s = 0: V deterministic) and |c / s| up to 1e3;
* `pairlaw.push_moments` with the closed form against the quadrature path run with a
  high-order, wide rule (the same X nodes, Y integrated on 40 points per piece over
  +- 10 standard deviations): equal to ~1e-12, chunked scan and tangents included; with
  the default rules, to the quadrature path's stated accuracy;
* a post-activation ResNet: the kernel with the closed form equals the quadrature path's,
  and relu / abs reach `pairlaw` with their closed form while other phi do not.
"""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.nn import initializers as jinit

import infinite_modules as im
from infinite_modules import elementwise as ew
from infinite_modules import homogeneous, pairlaw
from infinite_modules.gaussian_pieces import TwoSlopes

SLOPES = {"relu": (1.0, 0.0), "leaky_relu": (1.0, 0.1), "abs": (1.0, -1.0),
          "-relu": (-1.0, 0.0), "identity": (1.0, 1.0)}
RELU_SWITCH = [(lambda t: t, True, True)]


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _brute_force(p, n, c, s, points=200, width=14.0):
  """(E phi(V), E phi(V)^2, E phi'(V)) by Gauss-Legendre in y over +- width, V = c + s y,
  split at the kink y = -c / s (numpy, float64); s = 0: phi at c."""
  phi = lambda v: np.where(v > 0, p * v, n * v)
  dphi = lambda v: np.where(v > 0, p, n)
  if s == 0:
    return phi(c), phi(c) ** 2, dphi(c)
  kink = -c / s
  edges = sorted({-width, width} | ({kink} if abs(kink) < width else set()))
  g, w = np.polynomial.legendre.leggauss(points)
  out = np.zeros(3)
  for lo, hi in itertools.pairwise(edges):
    y = lo + (hi - lo) / 2 * (g + 1)
    v = c + s * y
    dens = (hi - lo) / 2 * w * np.exp(-0.5 * y * y) / np.sqrt(2 * np.pi)
    out += [np.sum(dens * phi(v)), np.sum(dens * phi(v) ** 2), np.sum(dens * dphi(v))]
  return tuple(out)


CASES = [(0.3, 1.0), (-0.7, 0.4), (2.0, 1e-3), (-2.0, 1e-3), (1.5, 1e-9), (-1.5, 1e-12),
         (0.0, 1.0), (1e-9, 1e-9), (40.0, 1.0), (-40.0, 1.0), (5.0, 5e-3), (-5.0, 5e-3),
         (1.2, 0.0), (-0.8, 0.0), (0.0, 2.5), (-3.0, 0.5), (0.0, 0.0)]


def test_conditional_moments_match_brute_force_quadrature(x64):
  """All phi at once (one compile): p, n broadcast against the cases. At c = s = 0 (V = 0)
  phi' takes the mean slope (p + n) / 2."""
  names = list(SLOPES)
  p, n = (jnp.asarray([[SLOPES[k][i]] for k in names], jnp.float64) for i in (0, 1))
  c, s = (jnp.asarray(v, jnp.float64) for v in zip(*CASES))
  got = jax.jit(lambda p, n, c, s: TwoSlopes(p, n).conditional(c, s))(p, n, c, s)
  for row, name in enumerate(names):
    pp, nn_ = SLOPES[name]
    for i, (ci, si) in enumerate(CASES):
      want = list(_brute_force(pp, nn_, ci, si))
      if ci == 0 and si == 0:
        want[2] = (pp + nn_) / 2
      scale = ci * ci + si * si
      for k, (g, wv, size) in enumerate(zip(got, want, (np.sqrt(scale), scale, 1.0))):
        assert np.isfinite(float(g[row, i]))
        assert abs(float(g[row, i]) - wv) <= 1e-12 * size, (name, ci, si, k)


def _mixture(rng, e=(3, 4), k=5, dtype=np.float64):
  """Random mixtures; entry (0, 0) lies on a line (resid 0), (0, 1) nearly (resid ~1e-5)."""
  w = rng.random(e + (k,))
  va, vb = 0.5 + rng.random(e), 0.5 + rng.random(e)
  c = 0.8 * np.sqrt(va * vb) * rng.uniform(-1, 1, e)
  c[0, 0] = np.sqrt(va[0, 0] * vb[0, 0])
  c[0, 1] = np.sqrt(va[0, 1] * vb[0, 1]) * (1 - 1e-10)
  arr = lambda v: jnp.asarray(v, dtype)
  return pairlaw.Mixture(arr(rng.normal(size=e + (k,))), arr(rng.normal(size=e + (k,))),
                         arr(w / w.sum(-1, keepdims=True)), arr(va), arr(vb), arr(c),
                         arr(rng.random(e + (k,))), arr(rng.random(e)))


PHIS = {"relu": jax.nn.relu, "leaky_relu": lambda t: jax.nn.leaky_relu(t, 0.1),
        "abs": jnp.abs}


@pytest.mark.parametrize("name", PHIS)
def test_push_moments_closed_form_equals_high_order_quadrature(x64, name, monkeypatch):
  """Same X nodes; Y by a 40-point-per-piece rule over +- 10 sd: the two paths agree to
  ~1e-12 (the chunked scan forced: several chunks, padded components)."""
  f, inner = PHIS[name], TwoSlopes(*SLOPES[name])
  law = _mixture(np.random.default_rng(1))
  monkeypatch.setattr(pairlaw, "PIECE_EDGES", (-10.0, -6.0, -2.5, 0.0, 2.5, 6.0, 10.0))
  monkeypatch.setattr(pairlaw, "PIECE_POINTS", 40)
  monkeypatch.setattr(pairlaw, "_CHUNK_PARTICLES", 12 * 2 * 320)  # 2 components per chunk
  want = jax.jit(lambda m: pairlaw.push_moments(m, f, f, RELU_SWITCH, RELU_SWITCH))(law)
  got = jax.jit(lambda m: pairlaw.push_moments(m, f, f, RELU_SWITCH, RELU_SWITCH, inner))(law)
  scale = np.asarray(got["bb"] + got["aa"])
  for key in pairlaw._SUMS:
    np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-12 * scale.max(),
                               err_msg=key)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_push_moments_and_compress_within_default_quadrature_accuracy(dtype, monkeypatch):
  """Default rules: the closed form and the quadrature path differ by the latter's inner
  rule error (stated ~2e-5 on relu); float32 under jit too. `push_compress` (chunked)
  takes its second moments from the closed form and keeps them exactly."""
  with jax.enable_x64(dtype == np.float64):
    law = _mixture(np.random.default_rng(2), dtype=dtype)
    relu, inner = jax.nn.relu, TwoSlopes(1.0, 0.0)
    monkeypatch.setattr(pairlaw, "_CHUNK_PARTICLES", 12 * 2 * 900)
    old = jax.jit(lambda m: pairlaw.push_moments(m, relu, relu, RELU_SWITCH, RELU_SWITCH))(law)
    new = jax.jit(lambda m: pairlaw.push_moments(m, relu, relu, RELU_SWITCH, RELU_SWITCH,
                                                 inner))(law)
    scale = float(np.max(np.asarray(new["aa"] + new["bb"], np.float64)))
    for key in pairlaw._SUMS:
      assert new[key].dtype == dtype
      np.testing.assert_allclose(new[key], old[key], rtol=0, atol=1e-4 * scale, err_msg=key)
    law_new = jax.jit(lambda m: pairlaw.push_compress(m, relu, relu, RELU_SWITCH, RELU_SWITCH,
                                                      inner=inner))(law)
    eps = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(law_new.second_moment(), new["ab"], rtol=0, atol=eps * scale)
    np.testing.assert_allclose(law_new.tangent(), new["t"], rtol=0, atol=eps * scale)


def _expression(phi, dtype):
  """phi's `elementwise` expression tree, from its jaxpr (calls and custom_jvp inlined)."""
  closed = jax.make_jaxpr(phi)(jnp.zeros((), dtype))

  def walk(jaxpr, consts, args):
    env = {v: ("lit", c) for v, c in zip(jaxpr.constvars, consts)}
    env.update(zip(jaxpr.invars, args))
    read = lambda v: ("lit", v.val) if isinstance(v, jax.extend.core.Literal) else env[v]
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      inner = eqn.params.get("call_jaxpr", eqn.params.get("jaxpr"))
      if inner is not None:
        outs = walk(inner.jaxpr, inner.consts, ins)
      else:
        outs = [ew.node(eqn.primitive, eqn.params, ins)]
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]

  return walk(closed.jaxpr, closed.consts, [ew.Z])[0]


RECOGNIZED = {"relu": (jax.nn.relu, (1.0, 0.0)), "abs": (jnp.abs, (1.0, -1.0)),
              "leaky_relu": (lambda t: jax.nn.leaky_relu(t, 0.1), (1.0, 0.1)),
              "-relu": (lambda t: -jax.nn.relu(t), (-1.0, 0.0)),
              "where": (lambda t: jnp.where(t > 0, 2 * t, -0.5 * t), (2.0, -0.5)),
              "relu6": (jax.nn.relu6, None), "relu + 0.1": (lambda t: jax.nn.relu(t) + 0.1, None),
              "relu(t - 1)": (lambda t: jax.nn.relu(t - 1.0), None), "gelu": (jax.nn.gelu, None)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_two_slopes_read_off_the_structure(dtype):
  """phi = p z (z > 0), n z (z < 0) exactly, in the kernel's dtype; others: None."""
  with jax.enable_x64(dtype == np.float64):
    for name, (phi, slopes) in RECOGNIZED.items():
      got = homogeneous.two_slopes(_expression(phi, dtype), dtype)
      if slopes is None:
        assert got is None, name
      else:
        want = tuple(float(np.asarray(v, dtype)) for v in slopes)
        assert (got.p, got.n) == want, (name, got)
        z = np.linspace(-3, 3, 13).astype(dtype)
        np.testing.assert_array_equal(np.asarray(got(jnp.asarray(z))), np.asarray(phi(z)),
                                      err_msg=name)


def _dense(width, w_var):
  return nn.Dense(width, kernel_init=jinit.variance_scaling(w_var, "fan_in", "normal"),
                  use_bias=False)


class PostAct(nn.Module):
  """A dense stem, one post-activation block act(h + Dense(relu(Dense(h)))), and a second
  nonlinearity of the stream (its law pushed and compressed before it)."""
  act: object

  @nn.compact
  def __call__(self, x):
    h = self.act(_dense(32, 2.0)(x))
    h = self.act(h + _dense(32, 1.0)(nn.relu(_dense(32, 2.0)(h))))
    h = self.act(h + _dense(32, 1.0)(x))
    return _dense(1, 1.0)(h)


@pytest.mark.slow  # ~15-80 s each on 2 loaded cores; the closed-form path of relu is also
# in the default run through tests/test_nongaussian.py (against a simulation of the limit)
@pytest.mark.parametrize("name", ["relu", "abs", "relu6"])
def test_kernel_with_closed_form_equals_quadrature_path(x64, name, monkeypatch):
  """Kernels with phi's closed form inside the pair-law path equal those of the quadrature
  path to its accuracy; relu / abs reach `pairlaw` with their closed form, relu6 without."""
  act = {"relu": nn.relu, "abs": jnp.abs, "relu6": nn.relu6}[name]
  x = np.random.default_rng(0).normal(size=(3, 4))
  seen = []
  push_moments = pairlaw.push_moments

  def spy(*args, **kw):
    seen.append(args[5] if len(args) > 5 else kw.get("inner"))
    return push_moments(*args, **kw)

  monkeypatch.setattr(pairlaw, "push_moments", spy)
  got = im.kernel_fn(PostAct(act), x[:1])(x)
  want_inner = {"relu": TwoSlopes(1.0, 0.0), "abs": TwoSlopes(1.0, -1.0), "relu6": None}[name]
  assert seen and all(s == want_inner for s in seen), seen
  monkeypatch.setattr(homogeneous, "two_slopes", lambda expr, dtype: None)
  want = im.kernel_fn(PostAct(act), x[:1])(x)
  for a, b in ((got.nngp, want.nngp), (got.ntk, want.ntk)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(np.max(b)))
