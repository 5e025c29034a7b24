"""Shared setup of the ``interop`` tests: fast-compiling float64 runs and pytree helpers.

``from interop_helpers import x64_fast_compile`` in a test module makes the autouse
fixture apply to that module.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

import interop

#: Tests check values, not speed: skip XLA's backend optimizations (3x faster compiles).
FAST_COMPILE = {"xla_backend_optimization_level": 0}
fast_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


@pytest.fixture(autouse=True)
def x64_fast_compile(monkeypatch):
  """float64 on, and ``interop``'s own jit compiles with ``FAST_COMPILE``."""
  monkeypatch.setattr(interop._layout, "JIT_COMPILER_OPTIONS", FAST_COMPILE)
  with jax.enable_x64(True):
    yield


def f64(tree):
  """Floating leaves cast to float64, other leaves as they are."""
  return jax.tree_util.tree_map(
      lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def perturb(tree, key, scale=0.3):
  """Adds ``scale * N(0, 1)`` noise to every floating leaf (one key per leaf)."""
  leaves, td = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(td, [
      a + scale * jax.random.normal(k, a.shape, a.dtype)
      if jnp.issubdtype(a.dtype, jnp.floating) else a for a, k in zip(leaves, keys)])
