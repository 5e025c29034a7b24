"""The same empirical NTK timings with Neural Tangents 0.6.5; prints JSON.

Runs in the separate venv that ``../shared/tools/nt_baseline_venv.sh DIR`` builds
(NT 0.6.5, JAX 0.4.23, Flax 0.7.5, TensorFlow CPU), never in this project's
environment::

  bash ../shared/tools/nt_baseline_venv.sh /tmp/ntvenv
  /tmp/ntvenv/bin/python benchmarks/nt_empirical_ntk.py [--trace-axes ''|-1]
      [--vmap-axes 0|none] [--repeats 3] [--workloads mlp,cnn] [--save-kernels DIR]

The workloads, models (the same Flax linen modules), arrays (NumPy draws), dtype
(float32), ``trace_axes`` (default ``()``: the full ``(N, N, O, O)`` NTK),
``vmap_axes`` (default ``0``) and timing protocol are those of
``benchmarks/empirical_ntk.py`` (imported from it), with ``nt.empirical_ntk_fn`` at
``implementation=`` 1 (Jacobian contraction), 2 (NTK-vector products), 3 (structured
derivatives) and 0 (NT's FLOP-based auto, which NT documents as unreliable on CPU/GPU;
its choice is read from the FLOP counts it prints while selecting). ``--save-kernels``
writes NT's structured-derivatives kernel per workload as ``DIR/<name>.npy``, so
``empirical_ntk.py --compare-nt`` can compare it with ours.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import empirical_ntk as bench  # stdlib-only at import time

CODE_NAMES = {1: "jacobian_contraction", 2: "ntk_vector_products",
              3: "structured_derivatives"}


def _auto_choice(printed):
  """NT's auto prints ``impl=NtkImplementation.X, flops=F`` per candidate; returns the
  candidate with the fewest FLOPs (what it picks) and the FLOP table."""
  flops = {}
  for impl, value in re.findall(r"impl=(?:NtkImplementation\.)?(\w+), flops=([-\d.e+]+)",
                                printed):
    flops[CODE_NAMES[int(impl)] if impl.isdigit() else impl.lower()] = float(value)
  choice = min(flops, key=flops.get) if flops else None
  return choice, flops


def trainable_only(apply_fn, variables):
  """NT differentiates every leaf it is given; ours only Flax's ``params``. For a model
  with other collections (ResNet-18's BatchNorm ``batch_stats``) NT gets
  ``f(params, x)`` with the rest closed over, so both compute the same kernel."""
  if not hasattr(variables, "keys") or set(variables.keys()) == {"params"}:
    return apply_fn, variables
  rest = {k: v for k, v in variables.items() if k != "params"}

  def f(params, x):
    return apply_fn({**rest, "params": params}, x)

  return f, variables["params"]


def run_nt(workloads, trace_axes, vmap_axes, repeats, save_dir=None):
  import jax
  import neural_tangents as nt
  import numpy as np

  results = {}
  for name in workloads:
    _, x, variables, apply_fn = bench.workload(name)
    apply_fn, variables = trainable_only(apply_fn, variables)
    fns, compile_s, kernels = bench.compile_impls(
        lambda impl, apply_fn=apply_fn: nt.empirical_ntk_fn(
            apply_fn, trace_axes=trace_axes, vmap_axes=vmap_axes,
            implementation=bench.NT_CODES[impl]),
        x, variables)
    # NT's auto compiles every candidate to count FLOPs, then runs the winner; it is
    # jitted here (as the explicit implementations are) and timed like ours: the first
    # call selects and compiles, the later calls run the compiled winner.
    if "auto" in bench.TIMED:
      fns["auto"] = jax.jit(nt.empirical_ntk_fn(apply_fn, trace_axes=trace_axes,
                                                vmap_axes=vmap_axes, implementation=0))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
      first, seconds = bench.time_round_robin(fns, (x, None, variables), repeats)
    choice, auto_flops = None, {}
    if "auto" in bench.TIMED:
      compile_s["auto"] = first["auto"]
      choice, auto_flops = _auto_choice(buf.getvalue())
    results[name] = {
        **bench.result_entry(name, x, variables, kernels, seconds, compile_s, choice),
        "auto_flops": auto_flops,
    }
    if save_dir and "structured_derivatives" in kernels:
      np.save(os.path.join(save_dir, f"{name}.npy"), kernels["structured_derivatives"])
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  bench.add_common_args(parser)
  parser.add_argument("--save-kernels", default=None, metavar="DIR")
  args = parser.parse_args(argv)
  trace_axes, vmap_axes, workloads = bench.parse_common_args(args)
  if vmap_axes == "auto":  # NT has no automatic mode; its fastest setting is 0
    vmap_axes = 0

  import neural_tangents as nt
  out = bench.output_header(f"neural_tangents {nt.__version__}", trace_axes, vmap_axes,
                            args.repeats)
  out["results"] = run_nt(workloads, trace_axes, vmap_axes, args.repeats, args.save_kernels)
  json.dump(out, sys.stdout, indent=1)
  print()


if __name__ == "__main__":
  main()
