"""Transformer building blocks from Flax's own examples: what gets a kernel and what
raises one precise error.

Attention with 1/head_dim logits has deterministic attention weights at infinite width:
checked against Neural Tangents' `GlobalSelfAttention(linear_scaling=True)` (tied
query/key weights; reference arrays in tests/data, from NT 0.6.5 in float64) and against
Monte Carlo averages over wide inits of the real Flax `nn.SelfAttention`. The usual
1/sqrt(head_dim) logits stay random (tests/test_gaussian_logits.py): the block's output
is a Gaussian scale mixture, with estimated second moments.

The encoder is Flax's `examples/wmt/models.py` encoder shrunk (embedding, positional
embedding, pre-LayerNorm self-attention block with an MLP, final LayerNorm): the
embedding and learned positions have exact rules (tests/test_tokens.py), the attention
an estimated one; the LayerNorm of the residual stream after the attention needs the
law of the random attention weights, and must say so where it happens rather than fail
elsewhere or guess.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_models import assert_mc_close, is_symmetric_psd, linen_init_apply, mc_nngp

import infinite_modules as im


def vs(variance):
  """Gaussian variance-scaling initializer (the Gaussian-weight kernel is exact for it)."""
  return nn.initializers.variance_scaling(variance, "fan_in", "normal")


def sinusoidal_init(max_len, min_scale=1.0, max_scale=10000.0):
  """The wmt example's fixed sinusoidal position table (1, max_len, d)."""
  def init(key, shape, dtype=np.float32):
    del key, dtype
    d = shape[-1]
    table = np.zeros((max_len, d), np.float32)
    position = np.arange(max_len)[:, None]
    div = min_scale * np.exp(np.arange(d // 2) * (-np.log(max_scale / min_scale) / (d // 2 - 1)))
    table[:, :d // 2] = np.sin(position * div)
    table[:, d // 2:2 * (d // 2)] = np.cos(position * div)
    return table[None]
  return init


class AddPositionEmbs(nn.Module):
  max_len: int = 16
  posemb_init: object = None

  @nn.compact
  def __call__(self, inputs):
    shape = (1, self.max_len, inputs.shape[-1])
    if self.posemb_init is None:
      table = sinusoidal_init(self.max_len)(None, shape)
    else:
      table = self.param("pos_embedding", self.posemb_init, shape)
    return inputs + table[:, :inputs.shape[1], :]


class Encoder1DBlock(nn.Module):
  @nn.compact
  def __call__(self, inputs):
    x = nn.LayerNorm()(inputs)
    x = nn.SelfAttention(num_heads=2, qkv_features=16, deterministic=True)(x)
    x = x + inputs
    y = nn.LayerNorm()(x)
    y = nn.Dense(inputs.shape[-1])(nn.relu(nn.Dense(32)(y)))
    return x + y


class Encoder(nn.Module):
  posemb_init: object = None

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(11, 16, embedding_init=nn.initializers.normal(1.0))(tokens.astype("int32"))
    x = AddPositionEmbs(posemb_init=self.posemb_init)(x)
    x = Encoder1DBlock()(x)
    return nn.Dense(1)(nn.LayerNorm()(x).mean(1))


TOKENS = np.array([[1, 2, 3, 4], [4, 3, 2, 1]], np.int32)


def test_wmt_encoder_with_learned_positions_gets_an_estimated_kernel(monkeypatch):
  """Flax's default 1/sqrt(head_dim) logits: the LayerNorm after the residual sees the
  conditional moments given the logits; the kernel is averaged over logit draws."""
  from infinite_modules import logit_draws
  monkeypatch.setattr(logit_draws, "DRAWS", 64)
  k = im.kernel_fn(Encoder(nn.initializers.normal(0.02)), TOKENS)(TOKENS)
  assert not k.exact and "SelfAttention_0" in k.estimates[0].where
  assert np.all(np.isfinite(k.nngp)) and is_symmetric_psd(k.nngp, rtol=1e-4)


class PreLNBlock(nn.Module):
  """A pre-LayerNorm transformer encoder block with Flax's default initializers."""
  attention_fn: object = nn.dot_product_attention
  width: int = 16
  readout: int = 1
  # None: Flax's defaults; else Gaussian variance scaling, this variance in the attention.
  attention_variance: float | None = None

  @nn.compact
  def __call__(self, x):
    dense = {} if self.attention_variance is None else {"kernel_init": vs(1.0)}
    attention = {} if self.attention_variance is None else {
        "kernel_init": vs(self.attention_variance)}
    inputs = nn.Dense(self.width, **dense)(x)  # the block acts on a field (an embedding)
    x = nn.LayerNorm()(inputs)
    x = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=self.width,
                                        attention_fn=self.attention_fn, **attention)(x, x)
    x = x + inputs
    y = nn.LayerNorm()(x)
    y = nn.Dense(inputs.shape[-1], **dense)(nn.gelu(nn.Dense(2 * self.width, **dense)(y)))
    return nn.Dense(self.readout, **dense)((x + y).mean(1))


def test_pre_layernorm_block_gets_an_estimated_kernel(monkeypatch):
  """Flax's default attention and initializers: the residual stream after the attention is
  Gaussian given the logits; the kernel is the average over joint logit draws
  (`infinite_modules.logit_draws`): finite, symmetric, PSD, jit == no jit, float32 ~ float64
  (the same draws in both dtypes). Few draws: the estimate's accuracy is the slow test's."""
  from infinite_modules import logit_draws
  monkeypatch.setattr(logit_draws, "DRAWS", 64)
  x = _sequences(2, 0)
  kf = im.kernel_fn(PreLNBlock(), x)
  k = kf(x)
  assert not k.exact and float(k.error) > 0 and "joint draws" in k.estimates[0].method
  assert np.all(np.isfinite(k.nngp)) and np.all(np.isfinite(k.ntk))
  assert is_symmetric_psd(k.nngp, rtol=1e-4) and is_symmetric_psd(k.ntk, rtol=1e-4)
  with jax.enable_x64(True):  # under an outer jit
    kf64 = im.kernel_fn(PreLNBlock(), x.astype(np.float64))
    k64 = jax.jit(lambda a: kf64(a, get="nngp"))(x.astype(np.float64))
    assert k64.dtype == np.float64
  np.testing.assert_allclose(k64, k.nngp, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_pre_layernorm_block_monte_carlo(monkeypatch):
  """The estimated kernel of the block (Gaussian initializers, attention weights of
  variance 3: logits of standard deviation ~3, far from uniform attention) against the mean
  over 1000 inits of the real model at width 512; the deterministic-logit (1/head_dim)
  kernel of the same block fails the same check."""
  from infinite_modules import logit_draws
  monkeypatch.setattr(logit_draws, "DRAWS", 1024)
  x1, x2 = _sequences(3, 7), _sequences(2, 8)
  model = lambda **kw: PreLNBlock(attention_variance=3.0, **kw)
  k = im.kernel_fn(model(), x1)(x1, x2)
  init, apply = linen_init_apply(model(width=512, readout=64), x1[:1])
  est = mc_nngp(init, apply, np.concatenate([x1, x2]), samples=1000, seed=9)
  assert_mc_close(est, len(x1), k.nngp, k.cov1, k.cov2, what="pre-LN block nngp")
  kd = im.kernel_fn(model(attention_fn=attention_1_over_d), x1)(x1, x2)
  with pytest.raises(AssertionError):
    assert_mc_close(est, len(x1), kd.nngp, kd.cov1, kd.cov2, what="1/head_dim kernel")


def test_pre_layernorm_block_with_1_over_d_logits_is_symmetric_psd():
  """The same block with 1/head_dim logits (deterministic weights): exact, finite,
  symmetric and PSD."""
  x = _sequences(4, 7)
  k = im.kernel_fn(PreLNBlock(attention_fn=attention_1_over_d), x)(x)
  assert k.exact and np.all(np.isfinite(k.nngp)) and np.all(np.isfinite(k.ntk))
  assert is_symmetric_psd(k.nngp) and is_symmetric_psd(k.ntk)


@pytest.mark.slow
def test_pre_layernorm_block_with_1_over_d_logits_monte_carlo():
  """The exact kernel of that block against the mean over 300 inits of the real model at
  width 512 (Flax's default initializers: truncated normal weights of large fan-in)."""
  x1, x2 = _sequences(3, 7), _sequences(2, 8)
  k = im.kernel_fn(PreLNBlock(attention_fn=attention_1_over_d), x1)(x1, x2)
  init, apply = linen_init_apply(
      PreLNBlock(attention_fn=attention_1_over_d, width=512, readout=64), x1[:1])
  est = mc_nngp(init, apply, np.concatenate([x1, x2]), samples=300, seed=9)
  assert_mc_close(est, len(x1), k.nngp, k.cov1, k.cov2, what="pre-LN block nngp")


def test_wmt_encoder_with_sinusoidal_positions_names_the_constant():
  """A fixed table added to the embedding varies along the channels: channels are no
  longer identically distributed (refused at the add, in AddPositionEmbs)."""
  with pytest.raises(im.UnsupportedPrimitiveError,
                     match=r"(?s)add.*AddPositionEmbs.*per-channel constant"):
    im.kernel_fn(Encoder(), TOKENS)


# ---------------------------------------------------------------- nn.scan over layers

class ScanLayer(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    dense = nn.Dense(16, kernel_init=nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
                     bias_init=nn.initializers.normal(0.1))
    return nn.relu(dense(x)), None


class Stack(nn.Module):
  scan: bool = True
  broadcast: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(16)(x)
    if not self.scan:
      for _ in range(3):
        x, _ = ScanLayer()(x, None)
    elif self.broadcast:  # one set of weights for every layer (weight sharing)
      layers = nn.scan(ScanLayer, variable_broadcast="params", split_rngs={"params": False},
                       length=3)
      x, _ = layers()(x, None)
    else:  # the usual transformer stack: each layer its own weights
      layers = nn.scan(ScanLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=3)
      x, _ = layers()(x, None)
    return nn.Dense(1)(x)


def test_scan_over_layers_equals_the_unrolled_stack():
  """Stacked parameters are independent layers whose initializer fans are those of one
  layer (16, not 3 * 16 as the stacked leaf's shape would say): same kernels as the
  unrolled network."""
  x = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
  scanned = im.kernel_fn(Stack(), x, parameterization="standard")(x)
  unrolled = im.kernel_fn(Stack(scan=False), x, parameterization="standard")(x)
  np.testing.assert_allclose(scanned.nngp, unrolled.nngp, rtol=1e-6)
  np.testing.assert_allclose(scanned.ntk, unrolled.ntk, rtol=1e-6)


def test_scan_with_broadcast_parameters_shares_the_weights():
  """One set of weights for every layer (variable_broadcast="params"): used to be refused;
  each layer's output is the shared weight applied to the previous one, whose kernel
  (`sharing`: the uses meet nowhere here) equals the unrolled stack's. Sums of dependent
  uses have Monte Carlo evidence in tests/test_weight_sharing.py, recurrent cells in
  tests/test_recurrent.py (nn.SimpleCell; gated cells raise there)."""
  x = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
  shared = im.kernel_fn(Stack(broadcast=True), x, parameterization="standard")(x)
  unrolled = im.kernel_fn(Stack(scan=False), x, parameterization="standard")(x)
  np.testing.assert_allclose(shared.nngp, unrolled.nngp, rtol=1e-5)
  np.testing.assert_allclose(shared.ntk, unrolled.ntk, rtol=1e-5)


# ---------------------------------------------------------------- attention

def attention_1_over_d(query, key, value, mask=None, **kwargs):
  """Flax's dot-product attention with logits scaled by 1/head_dim (not 1/sqrt(head_dim)).

  (`mask` is named: Flax passes a custom attention_fn only the arguments it names.)"""
  depth = query.shape[-1]
  return nn.dot_product_attention(query / jnp.sqrt(depth).astype(query.dtype), key, value,
                                  mask=mask, **kwargs)


class TiedAttention(nn.Module):
  """NT's GlobalSelfAttention(linear_scaling=True) written in Flax: queries = keys (one
  projection), logits / head_dim, 2 heads, then GlobalAvgPool and a Dense readout."""
  head_dim: int = 8
  readout: int = 1

  @nn.compact
  def __call__(self, x):
    qk = nn.DenseGeneral((2, self.head_dim), kernel_init=vs(1.5 ** 2), use_bias=False)(x)
    v = nn.DenseGeneral((2, self.head_dim), kernel_init=vs(1.2 ** 2), use_bias=False)(x)
    weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", qk, qk) / qk.shape[-1], axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    o = nn.DenseGeneral(self.head_dim, axis=(-2, -1), kernel_init=vs(0.9 ** 2),
                        use_bias=False)(o)
    return nn.Dense(self.readout, kernel_init=vs(1.0))(o.mean(1))


def test_linear_scaling_attention_matches_neural_tangents():
  data = np.load(os.path.join(os.path.dirname(__file__), "data",
                              "attention_linear_scaling.npz"))
  with jax.enable_x64(True):
    kf = im.kernel_fn(TiedAttention(), data["x1"])
    k12 = kf(data["x1"], data["x2"])
    k11 = kf(data["x1"])
  assert kf.layout == "full" and k12.exact
  for got, ref in ((k12.nngp, "nngp12"), (k12.ntk, "ntk12"), (k11.nngp, "nngp11"),
                   (k11.ntk, "ntk11")):
    np.testing.assert_allclose(got, data[ref], rtol=1e-10, atol=1e-12)


class AttentionBlock(nn.Module):
  """A 2-head nn.SelfAttention block read out at the first position (so the attention
  weights matter: uniform weights average the positions, identity weights would not)."""
  width: int = 16
  attention_fn: object = attention_1_over_d

  @nn.compact
  def __call__(self, x):
    h = nn.SelfAttention(num_heads=2, qkv_features=self.width, out_features=self.width,
                         kernel_init=vs(1.0), bias_init=nn.initializers.normal(0.3),
                         attention_fn=self.attention_fn, deterministic=True)(x)
    return nn.Dense(64, kernel_init=vs(1.0))(h[:, 0])


def _sequences(n, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 4, 3)).astype(np.float32)
  x[:, :, 0] += 1.0  # a shared direction: positions are correlated
  return x


def test_self_attention_block_monte_carlo():
  """2-head nn.SelfAttention (1/head_dim logits) at width 512 vs the mean over 224 inits.

  Independent query and key projections give logits -> 0 and uniform attention
  weights; the readout at position 0 then sees the average of all positions'
  values. A rule that skipped the attention (identity weights) is off by 13% to 200%
  of the correlation scale on the cross entries here (computed with the same
  projections and no attention), well past the 5% bound."""
  x1, x2 = _sequences(3, 0), _sequences(2, 1)
  model = AttentionBlock(width=512)
  k = im.kernel_fn(model, x1)(x1, x2)
  init, apply = linen_init_apply(model, x1[:1])
  est = mc_nngp(init, apply, np.concatenate([x1, x2]), samples=224, seed=4)
  assert_mc_close(est, len(x1), k.nngp, k.cov1, k.cov2, what="attention nngp")


@pytest.mark.slow
def test_tied_attention_monte_carlo():
  """The tied-weight (NT linear_scaling) attention at head_dim 512: non-uniform weights."""
  x1, x2 = _sequences(3, 2), _sequences(2, 3)
  model = TiedAttention(head_dim=512, readout=64)
  k = im.kernel_fn(model, x1)(x1, x2)
  init, apply = linen_init_apply(model, x1[:1])
  est = mc_nngp(init, apply, np.concatenate([x1, x2]), samples=200, seed=5)
  assert_mc_close(est, len(x1), k.nngp, k.cov1, k.cov2, what="tied attention nngp")


def test_attention_kernel_is_symmetric_psd():
  x = _sequences(5, 6)
  k = im.kernel_fn(AttentionBlock(), x)(x)
  assert is_symmetric_psd(k.nngp) and is_symmetric_psd(k.ntk)


class CausalAttention(nn.Module):
  """nn.MultiHeadDotProductAttention with a causal mask and 1/head_dim logits, read out at
  position 1 (or the same computed by hand: the mean of the values at positions 0 and 1)."""
  by_hand: bool = False

  @nn.compact
  def __call__(self, x):
    if self.by_hand:
      v = nn.DenseGeneral((2, 8), kernel_init=vs(1.0), name="value")(x)
      o = v[:, :2].mean(1)
      h = nn.DenseGeneral(x.shape[-1], axis=(-2, -1), kernel_init=vs(1.0), name="out")(o)
    else:
      mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
      h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16, kernel_init=vs(1.0),
                                          attention_fn=attention_1_over_d)(x, x, mask=mask)
      h = h[:, 1]
    return nn.Dense(1, kernel_init=vs(1.0))(h)


def test_causal_mask_gives_uniform_weights_over_the_past():
  """Logits -> 0 (independent query/key projections), so the causal softmax averages the
  values of positions 0..q: position 1 reads the mean of positions 0 and 1, exactly."""
  x1, x2 = _sequences(3, 0), _sequences(2, 1)
  a = im.kernel_fn(CausalAttention(), x1)(x1, x2)
  b = im.kernel_fn(CausalAttention(by_hand=True), x1)(x1, x2)
  np.testing.assert_allclose(a.nngp, b.nngp, rtol=1e-5)
  np.testing.assert_allclose(a.ntk, b.ntk, rtol=1e-5)
