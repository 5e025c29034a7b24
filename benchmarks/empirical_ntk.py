"""Empirical NTK timings per implementation; prints JSON.

Workloads (float32, ``trace_axes=(-1,)``, ``x2=None``):

* ``mlp``: 3x512 ReLU MLP (Flax linen), 784 inputs, 10 outputs, 64 examples;
* ``cnn``: 3 conv layers (3x3, 64 channels, SAME, ReLU), global average pooling,
  Dense(10); 16x16x3 inputs, 16 examples.

Every implementation is ``jax.jit``-compiled first (compile time reported separately),
then run ``--repeats`` times; the minimum wall time is reported. ``auto`` is timed as a
user calls it (eagerly: its first call selects and compiles, later calls dispatch to the
chosen executable), and ``auto_picks_fastest`` compares its choice with the measured
fastest of the three explicit implementations.

Side by side with Neural Tangents 0.6.5 (old JAX + TF venv, never a dependency of this
project): build it with ``../shared/tools/nt_baseline_venv.sh /tmp/ntvenv`` and pass
``--compare-nt /tmp/ntvenv/bin/python``; this script then re-runs itself in that venv
with ``--nt-baseline`` (equivalent ``stax`` networks) and reports our/NT ratios.

  python benchmarks/empirical_ntk.py [--vmap-axes 0|none] [--repeats 3]
                                     [--workloads mlp,cnn] [--compare-nt PYTHON]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

IMPLS = ("jacobian_contraction", "ntk_vector_products", "structured_derivatives")
NT_CODES = {"jacobian_contraction": 1, "ntk_vector_products": 2, "structured_derivatives": 3}
WORKLOADS = {
    "mlp": {"description": "3x512 ReLU MLP, 784 -> 10, 64 examples", "shape": (64, 784)},
    "cnn": {"description": "3x conv3x3-64 ReLU, global avg pool, Dense(10); 16x16x3, "
                            "16 examples", "shape": (16, 16, 16, 3)},
}


def _time(fn, args, repeats):
  import jax
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return first, best


# ----------------------------------------------------------------------------- ours


def _plain_model(name):
  """The same networks as plain ``(init, f(params, x))`` (for machines without Flax)."""
  import jax
  import jax.numpy as jnp

  def dense(key, n_in, n_out):
    return {"kernel": jax.random.normal(key, (n_in, n_out)) / jnp.sqrt(n_in),
            "bias": jnp.zeros((n_out,))}

  def conv(key, c_in, c_out):
    return {"kernel": jax.random.normal(key, (3, 3, c_in, c_out)) / jnp.sqrt(9 * c_in),
            "bias": jnp.zeros((c_out,))}

  def init(key, x):
    keys = jax.random.split(key, 4)
    if name == "mlp":
      sizes = [x.shape[-1], 512, 512, 512, 10]
      return [dense(k, a, b) for k, a, b in zip(keys, sizes[:-1], sizes[1:])]
    chans = [x.shape[-1], 64, 64, 64]
    return [conv(k, a, b) for k, a, b in zip(keys, chans[:-1], chans[1:])] + [
        dense(keys[3], 64, 10)]

  def f(params, x):
    for p in params[:-1]:
      if name == "mlp":
        x = x @ p["kernel"] + p["bias"]
      else:
        x = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = x + p["bias"]
      x = jax.nn.relu(x)
    if name == "cnn":
      x = x.mean(axis=(1, 2))
    return x @ params[-1]["kernel"] + params[-1]["bias"]

  return init, f


def _flax_model(name):
  import flax.linen as nn

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      for _ in range(3):
        x = nn.relu(nn.Dense(512)(x))
      return nn.Dense(10)(x)

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      for _ in range(3):
        x = nn.relu(nn.Conv(64, (3, 3), padding="SAME")(x))
      return nn.Dense(10)(x.mean(axis=(1, 2)))

  return MLP() if name == "mlp" else CNN()


def run_ours(workloads, vmap_axes, repeats):
  import jax
  import numpy as np

  import interop

  results = {}
  for name in workloads:
    spec = WORKLOADS[name]
    x = jax.random.normal(jax.random.PRNGKey(0), spec["shape"])
    try:
      model = _flax_model(name)
      variables = model.init(jax.random.PRNGKey(1), x)
    except ImportError:  # no Flax on this machine: the same network as f(params, x)
      init, model = _plain_model(name)
      variables = init(jax.random.PRNGKey(1), x)
    seconds, compile_s, kernels = {}, {}, {}
    for impl in IMPLS:
      fn = jax.jit(interop.empirical_ntk_fn(model, vmap_axes=vmap_axes,
                                            implementation=impl))
      t0 = time.perf_counter()
      compiled = fn.lower(x, None, variables).compile()
      compile_s[impl] = time.perf_counter() - t0
      _, seconds[impl] = _time(compiled, (x, None, variables), repeats)
      kernels[impl] = np.asarray(compiled(x, None, variables))
    auto = interop.empirical_ntk_fn(model, vmap_axes=vmap_axes)
    compile_s["auto"], seconds["auto"] = _time(auto, (x, None, variables), repeats)
    choice = auto.choose(x, None, variables, {}).name.lower()
    ref = kernels["jacobian_contraction"]
    max_rel_err = {k: float(np.abs(v - ref).max() / np.abs(ref).max())
                   for k, v in kernels.items()}
    fastest = min(IMPLS, key=lambda k: seconds[k])
    results[name] = {
        "description": spec["description"],
        "seconds": seconds,
        "compile_seconds": compile_s,
        "auto_choice": choice,
        "fastest": fastest,
        "auto_picks_fastest": choice == fastest,
        "speedup_structured_vs_jacobian_contraction":
            seconds["jacobian_contraction"] / seconds["structured_derivatives"],
        "max_rel_diff_vs_jacobian_contraction": max_rel_err,
        "auto_estimates": [
            {"implementation": e.implementation.name.lower(), "flops": e.flops,
             "bytes": e.bytes, "temp_bytes": e.temp_bytes, "est_seconds": e.seconds,
             "measured_seconds": e.measured} for e in auto.last_estimates],
    }
  return results


# ----------------------------------------------------------------------------- NT


def run_nt(workloads, vmap_axes, repeats):
  import jax
  import neural_tangents as nt
  from neural_tangents import stax

  results = {}
  for name in workloads:
    spec = WORKLOADS[name]
    if name == "mlp":
      layers = []
      for _ in range(3):
        layers += [stax.Dense(512, parameterization="standard"), stax.Relu()]
      init_fn, apply_fn, _ = stax.serial(*layers, stax.Dense(10, parameterization="standard"))
    else:
      layers = []
      for _ in range(3):
        layers += [stax.Conv(64, (3, 3), padding="SAME", parameterization="standard"),
                   stax.Relu()]
      init_fn, apply_fn, _ = stax.serial(*layers, stax.GlobalAvgPool(),
                                         stax.Dense(10, parameterization="standard"))
    x = jax.random.normal(jax.random.PRNGKey(0), spec["shape"])
    _, params = init_fn(jax.random.PRNGKey(1), x.shape)
    seconds, compile_s = {}, {}
    for impl in IMPLS:
      fn = jax.jit(nt.empirical_ntk_fn(apply_fn, vmap_axes=vmap_axes,
                                       implementation=NT_CODES[impl]))
      t0 = time.perf_counter()
      compiled = fn.lower(x, None, params).compile()
      compile_s[impl] = time.perf_counter() - t0
      _, seconds[impl] = _time(compiled, (x, None, params), repeats)
    results[name] = {"seconds": seconds, "compile_seconds": compile_s}
  return {"neural_tangents": nt.__version__, "jax": jax.__version__, "results": results}


# ----------------------------------------------------------------------------- main


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--vmap-axes", default="0", help="'0' (default) or 'none'")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--workloads", default="mlp,cnn")
  parser.add_argument("--compare-nt", default=None, metavar="PYTHON",
                      help="python of a venv with neural_tangents 0.6.5")
  parser.add_argument("--nt-baseline", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  vmap_axes = None if args.vmap_axes.lower() == "none" else int(args.vmap_axes)
  workloads = [w for w in args.workloads.split(",") if w]

  if args.nt_baseline:
    print(json.dumps(run_nt(workloads, vmap_axes, args.repeats)))
    return

  import jax
  out = {
      "backend": jax.default_backend(),
      "device": str(jax.devices()[0].device_kind),
      "jax": jax.__version__,
      "host": platform.processor() or platform.machine(),
      "dtype": "float32",
      "trace_axes": [-1],
      "vmap_axes": vmap_axes,
      "results": run_ours(workloads, vmap_axes, args.repeats),
  }
  if args.compare_nt:
    cmd = [args.compare_nt, __file__, "--nt-baseline", "--vmap-axes", args.vmap_axes,
           "--repeats", str(args.repeats), "--workloads", ",".join(workloads)]
    if out["backend"] != "cpu":
      print("warning: NT runs on CPU; ratios against a non-CPU backend are not "
            "comparable (set JAX_PLATFORMS=cpu).", file=sys.stderr)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    nt_out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["neural_tangents"] = nt_out
    ratios = {}
    for name, res in out["results"].items():
      nt_sec = nt_out["results"][name]["seconds"]
      ratios[name] = {impl: nt_sec[impl] / res["seconds"][impl] for impl in IMPLS}
      ratios[name]["auto_vs_nt_best"] = min(nt_sec.values()) / res["seconds"]["auto"]
    out["nt_time_over_ours"] = ratios
  json.dump(out, sys.stdout, indent=1)
  print()


if __name__ == "__main__":
  main()
