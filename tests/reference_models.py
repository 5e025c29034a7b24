"""Test helpers for the kernel tests: reference models and Monte Carlo estimators.

* `flax_model(layers)` / `haiku_model(layers)` build the Flax linen (and, for dense
  networks, Haiku) model equivalent to a Neural Tangents spec of `tests/data/cases.json`
  (the mapping of `shared/reference/README.md`).
* `load_case(name)` returns the spec and the stored reference kernels.
* `mc_nngp` / `mc_ntk` estimate kernels of the *actual* model by averaging empirical
  kernels over many random initializations (a jitted lax.map over PRNG keys);
  `assert_mc_close` compares such an estimate with an analytic kernel using an error
  normalized by sqrt(K(x, x) K(x', x')) (a correlation-scale error, the scale taken from the
  MC estimate itself) and checks that the Monte Carlo noise is small enough for the bound
  to have power.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.nn.initializers import normal, variance_scaling, zeros

DATA = pathlib.Path(__file__).parent / "data"
CASES: dict = json.loads((DATA / "cases.json").read_text())
FCN_CASES = [name for name, spec in CASES.items()
             if all(layer[0] in ("dense", "relu", "erf", "gelu") for layer in spec["layers"])]


def load_case(name: str):
  """(spec, {x1, x2, nngp12, ntk12, nngp11, ntk11}) as float64 numpy arrays."""
  with np.load(DATA / f"{name}.npz") as d:
    data = {k: np.asarray(d[k], np.float64) for k in
            ("x1", "x2", "nngp12", "ntk12", "nngp11", "ntk11")}
  return CASES[name], data


# ------------------------------------------------------------------------ Flax builder

def _dense(width, w_std, b_std):
  return nn.Dense(width, use_bias=b_std is not None,
                  kernel_init=variance_scaling(w_std ** 2, "fan_in", "normal"),
                  bias_init=normal(b_std) if b_std else zeros)


def apply_layers(layers, x):
  """Applies a spec's layers inside an `nn.compact` method."""
  for layer in layers:
    kind = layer[0]
    if kind == "dense":
      _, width, w_std, b_std = layer
      x = _dense(width, w_std, b_std)(x)
    elif kind == "conv":
      _, width, kernel, strides, padding, w_std, b_std = layer
      x = nn.Conv(width, tuple(kernel), tuple(strides), padding=padding,
                  use_bias=b_std is not None,
                  kernel_init=variance_scaling(w_std ** 2, "fan_in", "normal"),
                  bias_init=normal(b_std) if b_std else zeros)(x)
    elif kind == "relu":
      x = nn.relu(x)
    elif kind == "erf":
      x = jax.lax.erf(x)
    elif kind == "gelu":
      x = nn.gelu(x, approximate=False)
    elif kind == "avgpool":
      _, window, strides, padding = layer
      x = nn.avg_pool(x, tuple(window), tuple(strides), padding)
    elif kind == "flatten":
      x = x.reshape(x.shape[0], -1)
    elif kind == "gap":
      x = x.mean(axis=tuple(range(1, x.ndim - 1)))
    elif kind == "residual":
      x = x + apply_layers(layer[1], x)
    elif kind == "layernorm":
      x = nn.LayerNorm(epsilon=1e-12, use_bias=False, use_scale=False)(x)
    else:
      raise ValueError(f"unknown layer {kind!r}")
  return x


class SpecNet(nn.Module):
  """A Flax linen module built from a Neural Tangents-style layer spec."""
  layers: tuple

  @nn.compact
  def __call__(self, x):
    return apply_layers(self.layers, x)


def _freeze(obj):
  return tuple(_freeze(v) for v in obj) if isinstance(obj, (list, tuple)) else obj


def flax_model(layers) -> nn.Module:
  return SpecNet(_freeze(layers))


# ----------------------------------------------------------------------- Haiku builder

def haiku_model(layers, without_apply_rng: bool = False):
  """hk.transform of a dense/relu/erf/gelu spec, with the same priors."""
  import haiku as hk

  def forward(x):
    for layer in layers:
      kind = layer[0]
      if kind == "dense":
        _, width, w_std, b_std = layer
        x = hk.Linear(width, with_bias=b_std is not None,
                      w_init=hk.initializers.VarianceScaling(w_std ** 2, "fan_in", "normal"),
                      b_init=hk.initializers.RandomNormal(b_std) if b_std else None)(x)
      elif kind == "relu":
        x = jax.nn.relu(x)
      elif kind == "erf":
        x = jax.lax.erf(x)
      elif kind == "gelu":
        x = jax.nn.gelu(x, approximate=False)
      else:
        raise ValueError(f"haiku builder does not support {kind!r}")
    return x

  transformed = hk.transform(forward)
  return hk.without_apply_rng(transformed) if without_apply_rng else transformed


# ------------------------------------------------------------------- error measures

def rel_err(actual, desired) -> float:
  """Max-abs error relative to the largest entry of `desired`."""
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  assert actual.shape == desired.shape, (actual.shape, desired.shape)
  return float(np.max(np.abs(actual - desired)) / max(np.max(np.abs(desired)), 1e-300))


def normalized_err(actual, desired, diag1, diag2) -> np.ndarray:
  """|actual - desired| / sqrt(diag1 diag2) entrywise (a correlation-scale error)."""
  scale = np.sqrt(np.outer(np.asarray(diag1, np.float64), np.asarray(diag2, np.float64)))
  return np.abs(np.asarray(actual, np.float64) - np.asarray(desired, np.float64)) / scale


# -------------------------------------------------------------------- Monte Carlo

@dataclasses.dataclass
class MCEstimate:
  """Mean over inits of an empirical kernel and the standard error of that mean."""
  mean: np.ndarray
  stderr: np.ndarray
  samples: int


def _keys(seed: int, samples: int):
  # "rbg" keys: the XLA RngBitGenerator compiles ~2x faster than threefry on CPU, and
  # compilation dominates the cost of these small Monte Carlo programs.
  return jax.random.split(jax.random.key(seed, impl="rbg"), samples)


def _map(per_key, keys):
  """per_key over all keys: one jitted lax.map (sequential, so convolutions stay plain
  convolutions instead of the grouped ones vmap over weights would produce)."""
  return np.asarray(jax.jit(lambda ks: jax.lax.map(per_key, ks))(keys), np.float64)


def _estimate(samples: np.ndarray) -> MCEstimate:
  s = samples.shape[0]
  return MCEstimate(samples.mean(0), samples.std(0, ddof=1) / np.sqrt(s), s)


def linen_init_apply(model, x_example, apply_kwargs=None, init_kwargs=None):
  """(init(key) -> variables, apply(variables, x)) for a Flax linen module."""
  apply_kwargs = dict(apply_kwargs or {})
  init_kwargs = dict(apply_kwargs if init_kwargs is None else init_kwargs)
  init = lambda key: model.init(key, x_example, **init_kwargs)
  apply = lambda variables, x: model.apply(variables, x, **apply_kwargs)
  return init, apply


def haiku_init_apply(transformed, x_example):
  init = lambda key: transformed.init(key, x_example)
  apply = lambda params, x: transformed.apply(params, None, x) if _needs_rng(transformed) \
      else transformed.apply(params, x)
  return init, apply


def _needs_rng(transformed) -> bool:
  import inspect
  return len(inspect.signature(transformed.apply).parameters) >= 3


def mc_nngp(init, apply, x, *, samples: int, seed: int = 0) -> MCEstimate:
  """E over inits of f(x) f(x)^T / n_out (all output units averaged; f: (n, n_out)).

  Outputs with zero prior mean are assumed (as for every readout used here).
  """
  x = jnp.asarray(x)

  def per_key(key):
    f = apply(init(key), x).reshape(x.shape[0], -1)
    return f @ f.T / f.shape[1]

  return _estimate(_map(per_key, _keys(seed, samples)))


def mc_ntk(init, apply, x, *, samples: int, seed: int = 0,
           trainable=lambda variables: variables["params"],
           combine=lambda variables, params: {**variables, "params": params}) -> MCEstimate:
  """E over inits of the empirical NTK in the model's own parameters ("standard").

  Theta(x, x') = sum_p df_i(x)/dp df_i(x')/dp, averaged over the output units i
  (f: (n, n_out)); Jacobians by `jax.jacrev` of the real model, each example passed
  alone (so nothing can mix examples).
  """
  x = jnp.asarray(x)

  def per_key(key):
    variables = init(key)

    def f(p):
      return jax.vmap(lambda xi: apply(combine(variables, p), xi[None]).reshape(-1))(x)

    jac = jax.jacrev(f)(trainable(variables))  # leaves: (n, n_out, *param_shape)
    theta = 0.0
    for j in jax.tree_util.tree_leaves(jac):
      j = j.reshape(j.shape[0], j.shape[1], -1)
      theta = theta + jnp.einsum("aip,bip->ab", j, j) / j.shape[1]
    return theta

  return _estimate(_map(per_key, _keys(seed, samples)))


def assert_mc_close(estimate: MCEstimate, n1: int, k12, diag1=None, diag2=None, *,
                    bound: float = 0.05, power: float = 3.0, what: str = "kernel"):
  """Compares an MC estimate over x = concat(x1, x2) with analytic kernels.

  Checks |MC(x1, x2) - k12| (and |MC(x, x) - diag| for the given diagonals) on the
  correlation scale sqrt(MC(x, x) MC(x', x')) against `bound`, after checking that the
  MC noise on that scale is at most bound / power. The scale and the noise come from the
  MC estimate alone, so a wrong analytic kernel cannot weaken the check; with the noise
  below bound / 3, a kernel off by more than `bound` (e.g. W_std^2 off by 10%, which
  changes every entry by >= 10%) fails.
  """
  mean, stderr = estimate.mean, estimate.stderr
  d = np.diag(mean)
  assert np.all(d > 0), d
  scale = np.sqrt(np.outer(d, d))
  noise = float(np.max(stderr / scale))
  assert noise <= bound / power, (
      f"{what}: Monte Carlo noise {noise:.4f} too large for bound {bound} "
      f"({estimate.samples} samples): the test would have no power")
  errors = {"cross": np.abs(mean[:n1, n1:] - np.asarray(k12, np.float64)) / scale[:n1, n1:]}
  if diag1 is not None:
    errors["diag1"] = np.abs(d[:n1] - np.asarray(diag1, np.float64)) / d[:n1]
  if diag2 is not None:
    errors["diag2"] = np.abs(d[n1:] - np.asarray(diag2, np.float64)) / d[n1:]
  worst = {k: float(np.max(v)) for k, v in errors.items()}
  if os.environ.get("MC_VERBOSE"):
    print(f"\n[{what}] noise {noise:.4f} errors {worst}")
  assert max(worst.values()) <= bound, (
      f"{what}: Monte Carlo estimate differs from the analytic kernel by {worst} > {bound} "
      f"(noise {noise:.4f})\nMC(x1, x2):\n{mean[:n1, n1:]}\nanalytic:\n{np.asarray(k12)}\n"
      f"MC diag: {d}\nanalytic diag: {diag1}, {diag2}")
  return worst, noise


def is_symmetric_psd(k, rtol=1e-5) -> bool:
  k = np.asarray(k, np.float64)
  if not np.allclose(k, k.T, rtol=rtol, atol=rtol * np.max(np.abs(k))):
    return False
  return bool(np.min(np.linalg.eigvalsh((k + k.T) / 2)) >= -rtol * np.max(np.abs(k)))
