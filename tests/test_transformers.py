"""Transformer building blocks from Flax's own examples: what gets a kernel and what
raises one precise error.

The encoder is Flax's `examples/wmt/models.py` encoder shrunk (embedding, positional
embedding, pre-LayerNorm self-attention block with an MLP, final LayerNorm): the
embedding and learned positions have exact rules (tests/test_tokens.py); attention
has none yet, and must say so where it happens rather than fail elsewhere or guess.
"""

from __future__ import annotations

import flax.linen as nn
import numpy as np
import pytest

import infinite_modules as im


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


def test_wmt_encoder_with_learned_positions_names_attention():
  with pytest.raises(im.UnsupportedPrimitiveError,
                     match=r"(?s)dot_general.*SelfAttention.*attention.*not implemented"):
    im.kernel_fn(Encoder(nn.initializers.normal(0.02)), TOKENS)


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


def test_scan_with_broadcast_parameters_is_weight_sharing():
  x = np.ones((2, 5), np.float32)
  with pytest.raises(im.InfiniteWidthError, match="more than one layer"):
    im.kernel_fn(Stack(broadcast=True), x)
