"""Token models and multi-axis features: Flax's wrapped initializers, DenseGeneral to
(heads, head_dim) and back, head-splitting reshapes, nn.Embed / hk.Embed on integer
tokens, learned positional embeddings.

Exact rules are checked against closed forms and against equivalent flat models
(a (heads, head_dim) split of i.i.d. channels must not change any kernel); the
embedding kernel against Monte Carlo averages over inits of the real Flax model.
"""

from __future__ import annotations

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.nn import initializers as jinit
from reference_models import assert_mc_close, linen_init_apply, mc_nngp

import infinite_modules as im
from infinite_modules.models import _record_linen_initializers
from infinite_modules.priors import prior_from_initializer

GAUSS = jinit.variance_scaling(1.0, "fan_in", "normal")


def _recorded_priors(model, x):
  record = {}
  with _record_linen_initializers(record):
    variables = nn.unbox(model.init(jax.random.PRNGKey(0), x))
  params = variables["params"]
  return {k: prior_from_initializer(f, np.shape(params[k]), k) for k, f in record.items()}


# ---------------------------------------------------------------- wrapped initializers

def test_dense_general_priors_use_the_flattened_shape():
  """DenseGeneral draws a (prod(in), prod(features)) matrix and reshapes it: fan_avg of
  the kernel (5, 4, 2, 8) is (20 + 16) / 2, not that of the 4-D shape (40 + 8 ...)."""
  model = nn.DenseGeneral((2, 8), axis=(-2, -1),
                          kernel_init=jinit.variance_scaling(1.0, "fan_avg", "normal"),
                          bias_init=jinit.normal(0.3))
  priors = _recorded_priors(model, jnp.ones((3, 5, 4)))
  assert priors["kernel"].variance == pytest.approx(2.0 / (20 + 16), rel=1e-12)
  assert priors["bias"] == im.Prior(0.3 ** 2, 0.0)
  # Default initializers (lecun_normal is truncated: its variance is exact, not Gaussian).
  priors = _recorded_priors(nn.DenseGeneral((2, 8)), jnp.ones((3, 5)))
  assert priors["kernel"].variance == pytest.approx(1.0 / 5, rel=1e-12)
  assert priors["bias"] == im.Prior(0.0, 0.0)


def test_boxing_wrappers_are_read_through():
  init = nn.with_partitioning(jinit.variance_scaling(2.0, "fan_in", "normal"), (None, "x"))
  assert prior_from_initializer(init, (6, 3)) == im.Prior(2.0 / 6, 0.0)
  init = nn.with_logical_partitioning(jinit.normal(0.5), ("a",))
  assert prior_from_initializer(init, (4,)) == im.Prior(0.25, 0.0)


def test_unknown_wrapper_still_raises():
  def my_init(key, shape, dtype=jnp.float32):
    return GAUSS(key, shape, dtype) * 2
  with pytest.raises(im.PriorError, match="my_init"):
    prior_from_initializer(my_init, (3, 4), "my_init")


# ---------------------------------------------------------------- multi-axis features

class Heads(nn.Module):
  """DenseGeneral to (heads, head_dim), a nonlinearity per entry, DenseGeneral back."""
  split: bool

  @nn.compact
  def __call__(self, x):
    if self.split:
      h = nn.DenseGeneral((2, 8), kernel_init=GAUSS, bias_init=jinit.normal(0.5))(x)
    else:
      h = nn.Dense(16, kernel_init=GAUSS, bias_init=jinit.normal(0.5))(x)
    h = nn.relu(h)
    if self.split:
      return nn.DenseGeneral(3, axis=(-2, -1), kernel_init=GAUSS)(h).mean(1)
    return nn.Dense(3, kernel_init=GAUSS)(h).mean(1)


def test_dense_general_heads_equal_flat_dense():
  """(heads, head_dim) outputs are i.i.d. like heads * head_dim channels: same kernels."""
  x = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
  y = x[:2] * 0.5
  # (Standard parameterization: its NTK depends on the fans, the NNGP on the variances.)
  split = im.kernel_fn(Heads(True), x, parameterization="standard")(x, y)
  flat = im.kernel_fn(Heads(False), x, parameterization="standard")(x, y)
  np.testing.assert_allclose(split.nngp, flat.nngp, rtol=1e-6)
  np.testing.assert_allclose(split.ntk, flat.ntk, rtol=1e-6)


def test_haiku_head_split_reshape_equals_flat():
  def net(split):
    def f(x):
      h = hk.Linear(16)(x)
      if split:
        h = h.reshape(*h.shape[:-1], 2, 8)  # (..., heads, head_dim), as hk.MultiHeadAttention
      h = jax.nn.relu(h)
      if split:
        h = h.reshape(*h.shape[:-2], 16)
      return hk.Linear(2)(h)
    return hk.without_apply_rng(hk.transform(f))

  x = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)
  a = im.kernel_fn(net(True), x)(x)
  b = im.kernel_fn(net(False), x)(x)
  np.testing.assert_allclose(a.nngp, b.nngp, rtol=1e-6)
  np.testing.assert_allclose(a.ntk, b.ntk, rtol=1e-6)


def test_channel_pairing_reshape_is_refused():
  """x.reshape(n, C // 2, 2) does not say which factor is infinite: refused, not guessed."""
  def f(x):
    h = hk.Linear(16)(x)
    h = jax.nn.relu(h.reshape(h.shape[0], 8, 2)).sum(-1)
    return hk.Linear(1)(h)

  x = np.ones((2, 3), np.float32)
  with pytest.raises(im.InfiniteWidthError, match="heads <= head_dim"):
    im.kernel_fn(hk.without_apply_rng(hk.transform(f)), x)(x)


# ---------------------------------------------------------------- embeddings

class TokenModel(nn.Module):
  width: int = 16
  vocab: int = 7
  positions: bool = False

  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(self.vocab, self.width, embedding_init=jinit.normal(1.0))(tokens)
    if self.positions:
      pos = self.param("pos", jinit.normal(0.5), (1, 10, self.width))
      h = h + pos[:, :tokens.shape[1]]
    h = nn.relu(nn.Dense(self.width, kernel_init=GAUSS, bias_init=jinit.normal(0.1))(h))
    # Many i.i.d. output units: their average keeps the Monte Carlo noise low.
    return nn.Dense(64, kernel_init=GAUSS)(h.mean(1))


TOKENS1 = np.array([[1, 2, 3, 1], [3, 3, 5, 6], [0, 0, 0, 0]], np.int32)
TOKENS2 = np.array([[1, 2, 3, 1], [6, 5, 1, 3]], np.int32)


def _relu_cross(k12, k11, k22):
  """E[relu(u) relu(v)] for centered Gaussians (Cho & Saul's arc-cosine kernel)."""
  norm = np.sqrt(k11 * k22)
  c = np.clip(k12 / norm, -1, 1)
  return norm * (np.sqrt(1 - c * c) + (np.pi - np.arccos(c)) * c) / (2 * np.pi)


@pytest.mark.parametrize("positions", [pytest.param(False, marks=pytest.mark.slow), True])
def test_embed_kernel_closed_form(positions):
  """Embed (variance 1) [+ positions (variance 0.25)] -> Dense + bias (0.01) -> relu ->
  mean over positions -> Dense: the closed form with token equality across positions."""
  with jax.enable_x64(True):
    t1, t2 = TOKENS1.astype(np.int64), TOKENS2.astype(np.int64)
    k = im.kernel_fn(TokenModel(positions=positions), t1)(t1, t2)
    length = t1.shape[1]
    eye = np.eye(length) * (0.25 if positions else 0.0)

    def pre(a, b):  # covariance of the Dense pre-activations at all position pairs
      return (a[:, None] == b[None, :]).astype(float) + eye + 0.01

    expected = np.zeros((len(t1), len(t2)))
    for i, a in enumerate(t1):
      for j, b in enumerate(t2):
        k12 = pre(a, b)
        d1, d2 = np.diag(pre(a, a)), np.diag(pre(b, b))
        expected[i, j] = _relu_cross(k12, d1[:, None], d2[None, :]).mean()
    np.testing.assert_allclose(k.nngp, expected, rtol=1e-10)
    assert k.nngp.dtype == jnp.float64


def test_haiku_embed_and_integer_inputs_keep_their_dtype():
  def f(tokens):
    # (hk.Embed's default truncated normal table is not Gaussian: relu would be refused.)
    h = hk.Embed(7, 16, w_init=hk.initializers.RandomNormal())(tokens)
    return hk.Linear(1)(jax.nn.relu(h).mean(1))

  model = hk.without_apply_rng(hk.transform(f))
  k = im.kernel_fn(model, TOKENS1)(TOKENS1, TOKENS2)
  assert k.nngp.dtype == jnp.float32
  assert np.all(np.isfinite(k.nngp))
  # Identical sequences have the same kernel as the sequence with itself.
  np.testing.assert_allclose(k.nngp[0, 0], k.cov1[0], rtol=1e-6)


def test_embed_out_of_range_tokens_give_nan():
  """Flax's nn.Embed returns NaN rows for out-of-range tokens; the kernel says so."""
  t = np.array([[1, 2], [9, 1]], np.int32)
  k = im.kernel_fn(TokenModel(), t)(t)
  assert np.isfinite(k.nngp[0, 0]) and np.isnan(k.nngp[1, 1]) and np.isnan(k.nngp[0, 1])


def test_tied_embedding_is_refused():
  class Tied(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      embed = nn.Embed(7, 16)
      h = embed(tokens).mean(1)
      return embed.attend(h)

  with pytest.raises(im.InfiniteWidthError, match=r"(?s)embedding.*used 2 times.*gather"):
    im.kernel_fn(Tied(), TOKENS1)(TOKENS1)


@pytest.mark.parametrize("positions", [pytest.param(False, marks=pytest.mark.slow), True])
def test_embed_token_model_monte_carlo(positions):
  """Kernel of the Flax token model at width 512 vs the mean over 192 inits.

  Token equality across positions matters: repeated tokens at different positions
  (sequences 0 and 1) correlate the pooled features. A rule that ignored the positional
  embedding's variance (0.25 of the pre-activation variance 1.26) would be off by ~20% on
  the diagonal, four times the 5% bound."""
  model = TokenModel(width=512, positions=positions)
  k = im.kernel_fn(model, TOKENS1)(TOKENS1, TOKENS2)
  init, apply = linen_init_apply(model, TOKENS1[:1])
  est = mc_nngp(init, apply, np.concatenate([TOKENS1, TOKENS2]), samples=192, seed=3)
  assert_mc_close(est, len(TOKENS1), k.nngp, k.cov1, k.cov2, what="embed nngp")
