"""Materialized weight Jacobians formed in chunks (``structured._materialized_contract``).

A weight Jacobian ``J`` larger than ``structured._JACOBIAN_CHUNK_BYTES`` is formed and
consumed as ``sum_c J_1[..., c] J_2[..., c]^T`` over chunks of one weight label inside a
``lax.fori_loop``. The real budget is far above these small models' Jacobians, so the
test lowers it (and forces the materialized route on every structured use) to run the
chunked path on conv layers (grouped and depthwise: their one-hot operand carries the
chunked output-channel label), dense layers and biases, and checks it against the
``jax.jacobian`` definition in float64 to 1e-6, for full, traced and diagonal kernels,
with and without ``vmap_axes`` and ``x2``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from interop_helpers import (
  fast_jit,
  x64_fast_compile,  # noqa: F401  (autouse fixture)
)
from test_interop_conv import _inputs, _reference, make_conv_case
from test_interop_empirical import trace_diag

import interop
from interop import structured as sd

#: (vmap_axes, trace_axes, diagonal_axes, x2 given): the fast run is vmapped, full, with
#: ``x2`` (both sides sliced); the slow run adds no vmap, traced, diagonal and ``x2=None``.
FAST = [(0, (), (), True)]
SLOW = [(None, (-1,), (), False), (0, (), (0,), False), ("auto", (), (), False)]


def _force_chunked_materialize(monkeypatch, budget):
  """Every structured use takes the materialized route with a ``budget``-byte chunk
  limit; returns the list of chunkings chosen (``None`` where ``J`` fits)."""
  chosen = []
  chunking = sd._jacobian_chunking

  def spy(t, layout, limit):
    c = chunking(t, layout, limit)
    chosen.append(c)
    return c

  monkeypatch.setattr(sd, "choose_route", lambda term: "materialize")
  monkeypatch.setattr(sd, "_JACOBIAN_CHUNK_BYTES", budget)
  monkeypatch.setattr(sd, "_jacobian_chunking", spy)
  return chosen


def _check(monkeypatch, settings):
  chosen = _force_chunked_materialize(monkeypatch, budget=200)
  model, variables, _, _ = make_conv_case("linen")
  x1, x2 = _inputs()
  full_12, full_11 = _reference("linen")
  fns = [interop.empirical_ntk_fn(model, trace, diag, vmap, "structured_derivatives")
         for vmap, trace, diag, _ in settings]

  @fast_jit
  def run(x1, x2, variables):
    return [fn(x1, x2 if given else None, variables)
            for fn, (*_, given) in zip(fns, settings)]

  for got, (vmap, trace, diag, given) in zip(run(x1, x2, variables), settings):
    expected = trace_diag(full_12 if given else full_11, 2, trace, diag)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max(),
                               err_msg=f"vmap_axes={vmap} trace={trace} diagonal={diag}")
  chunked = [c for c in chosen if c is not None]
  assert chunked, "the chunked path was not taken"
  assert any(1 < c.count for c in chunked)
  assert any(c.size > 1 for c in chunked)  # chunks of several indices, not only single ones
  assert all(c.count * c.size > 1 for c in chunked)


def test_chunked_weight_jacobians_match_jacobian(monkeypatch):
  _check(monkeypatch, FAST)


@pytest.mark.slow
def test_chunked_weight_jacobians_all_settings(monkeypatch):
  _check(monkeypatch, SLOW)


def test_chunked_weight_jacobians_float32(monkeypatch):
  """float32 in, float32 out, same kernel as the unchunked route to float32 precision."""
  model, variables, _, _ = make_conv_case("linen")
  x1, _ = _inputs()
  x1 = x1.astype(jnp.float32)
  variables = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), variables)
  monkeypatch.setattr(sd, "choose_route", lambda term: "materialize")
  whole = interop.empirical_ntk_fn(model, (), (), 0, "structured_derivatives")
  expected = fast_jit(whole)(x1, None, variables)
  chosen = _force_chunked_materialize(monkeypatch, budget=200)
  got = fast_jit(interop.empirical_ntk_fn(model, (), (), 0, "structured_derivatives"))(
      x1, None, variables)
  assert any(c is not None for c in chosen)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
