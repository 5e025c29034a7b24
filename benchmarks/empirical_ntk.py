"""Empirical NTK timings per implementation; prints JSON.

Workloads (float32, ``vmap_axes=0``, ``x2=None``, i.e. the kernel of a batch with
itself):

* ``mlp``: 3x512 ReLU MLP (Flax linen), 784 inputs, 10 outputs, 64 examples;
* ``cnn``: 3 conv layers (3x3, 64 channels, SAME, ReLU), global average pooling,
  Dense(10); 16x16x3 inputs, 16 examples;
* ``resnet18``: ResNet-18 with the CIFAR stem (Flax linen, BatchNorm in eval mode,
  11.2M parameters), 32x32x3 inputs, 10 outputs, 8 examples (``--workloads resnet18``;
  not in the default list, Jacobian contraction needs ~4 GB and minutes there).

By default the **full** NTK is computed, ``trace_axes=()``: shape ``(N, N, O, O)``
(here ``(64, 64, 10, 10)``, ``(16, 16, 10, 10)``, ``(8, 8, 10, 10)``), which is what the benchmarks of
"Fast Finite Width Neural Tangent Kernel" (Novak et al. 2022) and NT's own
``examples/empirical_ntk.py`` compute. ``--trace-axes -1`` gives NT's default
output-traced ``(N, N)`` kernel instead (Jacobian contraction is ``O`` times cheaper
there, so the structured-derivatives advantage is smaller).

Inputs and parameters are drawn with NumPy (not ``jax.random``, whose streams changed
between JAX versions), so ``benchmarks/nt_empirical_ntk.py`` computes the very same
kernels with Neural Tangents in its old-JAX venv and the two can be compared entry by
entry.

Timings exclude compilation: every implementation is ``jax.jit``-compiled first
(``lower().compile()``, reported as ``compile_seconds``) and called once to warm up;
then ``--repeats`` rounds run all implementations in turn (interleaved, so that load
from other processes on a shared machine hits all of them alike; fast ones several
times per round), each call timed to ``jax.block_until_ready``; the minimum per
implementation is reported. ``auto`` is timed as a user calls it (eagerly: its first
call selects and compiles and is reported as its ``compile_seconds``; later calls
dispatch to the chosen executable), and ``auto_picks_fastest`` compares its choice with
the measured fastest of the timed explicit implementations; ``auto_estimates`` are its
cost-model inputs for the candidates it compiled, ``auto_pruned`` the candidates it
dropped before compiling. ``--implementations auto`` alone reports the default call's
time and peak memory without the explicit implementations in the same process. ``--vmap-axes auto``
times the default call (ours finds the batch axes from the model; NT, which has no such
mode, gets ``0``). ``--cpu-time`` turns off XLA's multi-threaded Eigen and reports
process CPU time (all threads: XLA's thunk executor may still run independent operations
concurrently on its pool), which other jobs on a shared machine disturb far less than
wall time (it compares work, not parallel speed-up). Each workload reports the
batch-independence finding, the process's peak RSS so far (``peak_rss_gb``), each
compiled implementation's temporary buffer (``temp_bytes``, allocated on every call)
and, for the fastest call of each implementation, its user and system CPU seconds and
minor page faults (``cpu_usage_of_fastest_call``). With glibc's default malloc a
temporary buffer above its mmap threshold (at most 32 MB) is mapped afresh on every
call and its pages are zeroed by the kernel on first touch (system time);
``MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=2000000000 MALLOC_ARENA_MAX=1``
in the environment keeps freed memory for reuse and removes that cost for every
implementation alike.

Side by side with Neural Tangents 0.6.5 (old JAX + TF venv, never a dependency of this
project): build it with ``../shared/tools/nt_baseline_venv.sh /tmp/ntvenv`` and pass
``--compare-nt /tmp/ntvenv/bin/python``; this script then runs
``benchmarks/nt_empirical_ntk.py`` in that venv (same workloads, same arrays) and adds
NT's timings, the NT/ours time ratios and the largest difference between NT's kernels
and ours.

  python benchmarks/empirical_ntk.py [--trace-axes ''|-1] [--vmap-axes 0|none|auto]
                                     [--repeats 3] [--workloads mlp,cnn,resnet18]
                                     [--implementations jacobian_contraction,...,auto]
                                     [--cpu-time] [--compare-nt PYTHON]
                                     [--nt-implementations ...]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

IMPLS = ("jacobian_contraction", "ntk_vector_products", "structured_derivatives")
NT_CODES = {"jacobian_contraction": 1, "ntk_vector_products": 2, "structured_derivatives": 3}
WORKLOADS = {
    "mlp": {"description": "3x512 ReLU MLP, 784 -> 10, 64 examples", "shape": (64, 784)},
    "cnn": {"description": "3x conv3x3-64 ReLU, global avg pool, Dense(10); 16x16x3, "
                            "16 examples", "shape": (16, 16, 16, 3)},
    "resnet18": {"description": "ResNet-18 (CIFAR stem, BatchNorm in eval mode), 32x32x3 "
                                "-> 10, 8 examples", "shape": (8, 32, 32, 3)},
}


def parse_axes(text):
  """``''`` / ``'none'`` -> ``()``; ``'-1'`` -> ``(-1,)``; ``'0,1'`` -> ``(0, 1)``."""
  text = text.strip().lower()
  if text in ("", "none", "()"):
    return ()
  return tuple(int(a) for a in text.strip("()").split(",") if a.strip())


def parse_vmap_axes(text):
  """``'none'`` -> ``None``; ``'auto'`` -> ``'auto'`` (ours: found from the model; NT,
  which has no such mode, gets ``0``); ``'0'`` -> ``0``."""
  text = text.lower()
  return None if text == "none" else "auto" if text == "auto" else int(text)


#: Implementations timed (``--implementations``; all by default).
TIMED = IMPLS
#: ``time.perf_counter`` (wall) or ``time.process_time`` (``--cpu-time``).
CLOCK = time.perf_counter


def add_common_args(parser):
  """The options this script and ``nt_empirical_ntk.py`` share."""
  parser.add_argument("--trace-axes", default="",
                      help="'' (default: full NTK, trace_axes=()) or e.g. '-1'")
  parser.add_argument("--vmap-axes", default="0",
                      help="'0' (default), 'none' or 'auto' (ours finds them; NT gets 0)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--workloads", default="mlp,cnn")
  parser.add_argument("--implementations", default=",".join(IMPLS + ("auto",)),
                      help="comma-separated subset of " + ",".join(IMPLS + ("auto",)))
  parser.add_argument("--cpu-time", action="store_true",
                      help="no multi-threaded Eigen in XLA, time = process CPU time (robust "
                           "to other load on a shared machine; compares work, not parallel "
                           "speed)")


def parse_common_args(args):
  """``(trace_axes, vmap_axes, workloads)`` from the options of ``add_common_args``;
  sets :data:`TIMED` and :data:`CLOCK` (and, for ``--cpu-time``, ``XLA_FLAGS``, so call
  it before JAX is imported)."""
  global TIMED, CLOCK
  chosen = [i for i in args.implementations.split(",") if i]
  unknown = set(chosen) - set(IMPLS) - {"auto"}
  if unknown:
    raise SystemExit(f"unknown implementations {sorted(unknown)}")
  TIMED = tuple(chosen)
  if args.cpu_time:
    # Eigen single-threaded; XLA's thunk executor may still overlap independent operations
    # (hence process CPU time). "intra_op_parallelism_threads" is a TensorFlow session
    # option, not an XLA flag: XLA ignored it without a leading "--" and aborts on it with
    # one ("Unknown flag in XLA_FLAGS"), so it is not set.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false").strip()
    CLOCK = time.process_time
  return (parse_axes(args.trace_axes), parse_vmap_axes(args.vmap_axes),
          [w for w in args.workloads.split(",") if w])


def forwarded_args(args):
  """The common options as command-line arguments (for the NT subprocess)."""
  out = ["--trace-axes", args.trace_axes or "none", "--vmap-axes", args.vmap_axes,
         "--repeats", str(args.repeats), "--workloads", args.workloads,
         "--implementations", args.nt_implementations or args.implementations]
  return out + (["--cpu-time"] if args.cpu_time else [])


def output_header(library, trace_axes, vmap_axes, repeats):
  """The settings every JSON output starts with."""
  return {
      "library": library,
      **machine_info(),
      "dtype": "float32",
      "trace_axes": list(trace_axes),
      "vmap_axes": vmap_axes,
      "repeats": repeats,
      "implementations": list(TIMED),
      "clock": "process CPU time, Eigen single-threaded" if CLOCK is time.process_time else "wall",
      "load_average": os.getloadavg(),
  }


def machine_info():
  import jax
  return {
      "backend": jax.default_backend(),
      "device": str(jax.devices()[0].device_kind),
      "cpu_count": os.cpu_count(),
      "host": platform.processor() or platform.machine(),
      "python": platform.python_version(),
      "jax": jax.__version__,
  }


def cpu_usage():
  """``(user seconds, system seconds, minor page faults)`` of this process so far
  (``getrusage``; zeros where the ``resource`` module is missing)."""
  try:
    import resource
  except ImportError:  # pragma: no cover - not on Unix
    return 0.0, 0.0, 0
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime, r.ru_stime, r.ru_minflt


def time_fn(fn, args, usage=None):
  """Time (:data:`CLOCK`) of one call of ``fn(*args)``, to ``block_until_ready``.

  With ``usage`` (a dict) the call's user and system CPU seconds and minor page faults
  are stored there too: system time is mostly the kernel zeroing pages that the call
  touches for the first time (XLA allocates an executable's temporaries on every call,
  and glibc maps allocations above its mmap threshold, at most 32 MB, afresh each time).
  """
  import jax
  u0 = cpu_usage()
  t0 = CLOCK()
  jax.block_until_ready(fn(*args))
  t = CLOCK() - t0
  if usage is not None:
    u1 = cpu_usage()
    usage.update(user_s=u1[0] - u0[0], sys_s=u1[1] - u0[1],
                 minor_page_faults=u1[2] - u0[2])
  return t


def time_round_robin(fns, args, repeats, calls_per_round_s=1.0, usage=None):
  """Minimum wall time per function of ``fns`` (``{name: fn}``), all on ``args``.

  Each function is called once to warm up (its time is returned separately: for a
  compiled executable it is a plain run, for ``auto`` it includes selection and
  compilation). Then ``repeats`` rounds run every function in turn, so that a load
  change on a shared machine hits all of them alike; within a round a fast function is
  called several times (up to ``calls_per_round_s`` seconds, at most 10 calls).
  Returns ``(first_call_seconds, min_seconds)``, two dicts; with ``usage`` (a dict) it
  also stores, per function, the :func:`time_fn` usage of its fastest call there.
  """
  first = {name: time_fn(fn, args) for name, fn in fns.items()}
  per_round = {name: max(1, min(10, int(calls_per_round_s / max(t, 1e-6))))
               for name, t in first.items()}
  best = {name: float("inf") for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      for _ in range(per_round[name]):
        call: dict = {}
        t = time_fn(fn, args, call)
        if t < best[name]:
          best[name] = t
          if usage is not None:
            usage[name] = call
  return first, best


def compile_impls(make_fn, x, variables):
  """Compiles ``jax.jit(make_fn(impl))`` for every timed implementation of ``IMPLS`` on
  ``(x, None, variables)`` and runs it once. Returns ``(fns, compile_seconds, kernels)``,
  dicts by implementation: the compiled executables, their compile times and their
  kernels as NumPy arrays."""
  import jax
  import numpy as np
  fns, compile_s, kernels = {}, {}, {}
  for impl in (i for i in IMPLS if i in TIMED):
    fn = jax.jit(make_fn(impl))
    t0 = time.perf_counter()
    fns[impl] = fn.lower(x, None, variables).compile()
    compile_s[impl] = time.perf_counter() - t0
    kernels[impl] = np.asarray(fns[impl](x, None, variables))
  return fns, compile_s, kernels


def result_entry(name, x, variables, kernels, seconds, compile_s, choice):
  """The per-workload results both scripts report (times, ``auto``'s choice, kernel
  differences against Jacobian contraction, or the first timed implementation)."""
  import numpy as np
  ref_name = "jacobian_contraction" if "jacobian_contraction" in kernels else next(
      iter(kernels))
  ref = kernels[ref_name]
  timed = [i for i in IMPLS if i in seconds]
  fastest = min(timed, key=lambda k: seconds[k]) if timed else None
  out = {
      "description": WORKLOADS[name]["description"],
      "sizes": sizes(name, x, variables, ref.shape),
      "seconds": seconds,
      "compile_seconds": compile_s,
      "auto_choice": choice,
      "fastest": fastest,
      "auto_picks_fastest": choice == fastest if choice and fastest else None,
      f"max_rel_diff_vs_{ref_name}": {
          k: float(np.abs(v - ref).max() / np.abs(ref).max()) for k, v in kernels.items()},
  }
  if "jacobian_contraction" in seconds and "structured_derivatives" in seconds:
    out["speedup_structured_vs_jacobian_contraction"] = (
        seconds["jacobian_contraction"] / seconds["structured_derivatives"])
  return out


# ----------------------------------------------------------------------------- models


def plain_model(name):
  """The same networks as plain ``(init, f(params, x))`` (for machines without Flax)."""
  import jax
  import jax.numpy as jnp

  def dense(n_in, n_out):
    return {"bias": jnp.zeros((n_out,)), "kernel": jnp.zeros((n_in, n_out))}

  def conv(c_in, c_out):
    return {"bias": jnp.zeros((c_out,)), "kernel": jnp.zeros((3, 3, c_in, c_out))}

  if name not in ("mlp", "cnn"):
    raise ImportError(f"the {name} workload needs Flax")

  def init(key, x):
    del key
    if name == "mlp":
      sizes = [x.shape[-1], 512, 512, 512, 10]
      return [dense(a, b) for a, b in itertools.pairwise(sizes)]
    chans = [x.shape[-1], 64, 64, 64]
    return [conv(a, b) for a, b in itertools.pairwise(chans)] + [dense(64, 10)]

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


def flax_model(name):
  """The workload as a Flax linen module (works with Flax 0.7.5 and current Flax)."""
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

  class BasicBlock(nn.Module):
    channels: int
    stride: int

    @nn.compact
    def __call__(self, x):
      norm = functools.partial(nn.BatchNorm, use_running_average=True)
      h = nn.Conv(self.channels, (3, 3), (self.stride, self.stride), use_bias=False)(x)
      h = nn.relu(norm()(h))
      h = norm()(nn.Conv(self.channels, (3, 3), use_bias=False)(h))
      if self.stride != 1 or x.shape[-1] != self.channels:
        x = nn.Conv(self.channels, (1, 1), (self.stride, self.stride), use_bias=False)(x)
        x = norm()(x)
      return nn.relu(x + h)

  class ResNet18(nn.Module):
    """He et al. 2016 ResNet-18 with the CIFAR stem (3x3 conv, no max pool)."""

    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.BatchNorm(use_running_average=True)(
          nn.Conv(64, (3, 3), use_bias=False)(x)))
      for i, channels in enumerate((64, 128, 256, 512)):
        for j in range(2):
          x = BasicBlock(channels, 2 if i > 0 and j == 0 else 1)(x)
      return nn.Dense(10)(x.mean(axis=(1, 2)))

  return {"mlp": MLP, "cnn": CNN, "resnet18": ResNet18}[name]()


def numpy_inputs(name):
  """The workload's inputs, float32, from NumPy's generator (same in every JAX version)."""
  import numpy as np
  return np.random.default_rng(0).standard_normal(WORKLOADS[name]["shape"]).astype(
      np.float32)


def numpy_params(tree):
  """Fills a parameter pytree (from ``init``) with NumPy draws, leaf by leaf in
  flattening order: weights ``N(0, 1 / fan_in)`` (LeCun normal, Flax's default), biases
  ``N(0, 0.1^2)`` (non-zero, so bias gradients are not trivially equal)."""
  import jax
  import numpy as np
  rng = np.random.default_rng(1)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  out = []
  for path, leaf in leaves:
    shape = np.shape(leaf)
    if "batch_stats" in jax.tree_util.keystr(path):  # BatchNorm running statistics
      stat = np.ones(shape) if "var" in jax.tree_util.keystr(path) else np.zeros(shape)
      out.append(stat.astype(np.float32))
    elif len(shape) == 1:
      base = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0  # BatchNorm scale
      out.append((base + 0.1 * rng.standard_normal(shape)).astype(np.float32))
    else:
      fan_in = int(np.prod(shape[:-1]))
      out.append((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32))
  return jax.tree_util.tree_unflatten(treedef, out)


def workload(name, flax_ok=True):
  """``(model_or_f, x, variables, apply_fn)`` for a workload, all float32."""
  import jax
  x = numpy_inputs(name)
  if flax_ok:
    try:
      model = flax_model(name)
      variables = numpy_params(model.init(jax.random.PRNGKey(1), x))
      return model, x, variables, model.apply
    except ImportError:  # no Flax on this machine: the same network as f(params, x)
      pass
  init, f = plain_model(name)
  variables = numpy_params(init(None, x))
  return f, x, variables, f


def sizes(name, x, variables, kernel_shape):
  import jax
  import numpy as np
  return {
      "n_examples": int(x.shape[0]),
      "input_shape": list(x.shape[1:]),
      "outputs": 10,
      "n_params": int(sum(np.size(a) for a in jax.tree_util.tree_leaves(variables))),
      "kernel_shape": list(kernel_shape),
  }


# ----------------------------------------------------------------------------- ours


def run_ours(workloads, trace_axes, vmap_axes, repeats):
  import interop

  results, kernels_out = {}, {}
  for name in workloads:
    model, x, variables, _ = workload(name)
    fns, compile_s, kernels = compile_impls(
        lambda impl, model=model: interop.empirical_ntk_fn(
            model, trace_axes=trace_axes, vmap_axes=vmap_axes, implementation=impl),
        x, variables)
    auto = None
    if "auto" in TIMED:
      auto = interop.empirical_ntk_fn(model, trace_axes=trace_axes, vmap_axes=vmap_axes)
      fns["auto"] = auto
    temp_bytes = {impl: fn.memory_analysis().temp_size_in_bytes
                  for impl, fn in fns.items() if hasattr(fn, "memory_analysis")}
    usage: dict = {}
    first, seconds = time_round_robin(fns, (x, None, variables), repeats, usage=usage)
    choice = None
    if auto is not None:
      compile_s["auto"] = first["auto"]
      choice = auto.choose(x, None, variables, {}).name.lower()
      if not kernels:  # only auto timed: its kernel is the one reported
        import numpy as np
        kernels["auto"] = np.asarray(auto(x, None, variables))
    kernels_out[name] = kernels.get("structured_derivatives")
    results[name] = {
        **result_entry(name, x, variables, kernels, seconds, compile_s, choice),
        "batch": interop.structure_report(model, x, variables,
                                          vmap_axes=vmap_axes)["batch"][0],
        "peak_rss_gb": peak_rss_gb(),
        "temp_bytes": temp_bytes,
        "cpu_usage_of_fastest_call": usage,
    }
    if auto is not None:
      results[name]["auto_estimates"] = [
          {"implementation": e.implementation.name.lower(), "flops": e.flops,
           "bytes": e.bytes, "temp_bytes": e.temp_bytes, "est_seconds": e.seconds,
           "measured_seconds": e.measured} for e in auto.last_estimates]
      results[name]["auto_pruned"] = [i.name.lower() for i in auto.last_pruned]
  return results, kernels_out


def peak_rss_gb():
  """Peak resident memory of this process so far (GB), from ``getrusage``."""
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


# ----------------------------------------------------------------------------- main


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_common_args(parser)
  parser.add_argument("--compare-nt", default=None, metavar="PYTHON",
                      help="python of a venv with neural_tangents 0.6.5")
  parser.add_argument("--nt-implementations", default=None,
                      help="NT's subset (default: --implementations); e.g. without 'auto', "
                           "which runs Jacobian contraction on the MLP")
  args = parser.parse_args(argv)
  trace_axes, vmap_axes, workloads = parse_common_args(args)

  out = output_header("interop (this repository)", trace_axes, vmap_axes, args.repeats)
  out["results"], kernels = run_ours(workloads, trace_axes, vmap_axes, args.repeats)
  if args.compare_nt:
    import numpy as np
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nt_empirical_ntk.py")
    with tempfile.TemporaryDirectory() as tmp:
      cmd = [args.compare_nt, script, *forwarded_args(args), "--save-kernels", tmp]
      if out["backend"] != "cpu":
        print("warning: NT runs on CPU; ratios against a non-CPU backend are not "
              "comparable (set JAX_PLATFORMS=cpu).", file=sys.stderr)
      env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
      env.pop("PYTHONPATH", None)
      proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
      if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"NT baseline failed (exit {proc.returncode})")
      nt_out = json.loads(proc.stdout)
      diffs = {}
      for name in workloads:
        path = os.path.join(tmp, f"{name}.npy")
        ours = kernels[name]
        if ours is not None and os.path.exists(path):
          theirs = np.load(path)
          diffs[name] = float(np.abs(theirs - ours).max() / np.abs(ours).max())
    out["neural_tangents"] = nt_out
    ratios = {}
    for name, res in out["results"].items():
      nt_sec, ours_sec = nt_out["results"][name]["seconds"], res["seconds"]
      ratios[name] = {impl: nt_sec[impl] / ours_sec[impl] for impl in IMPLS
                      if impl in nt_sec and impl in ours_sec}
      if "auto" in ours_sec:
        if "auto" in nt_sec:
          ratios[name]["auto_vs_nt_auto"] = nt_sec["auto"] / ours_sec["auto"]
        ratios[name]["auto_vs_nt_best"] = min(
            nt_sec[i] for i in IMPLS if i in nt_sec) / ours_sec["auto"]
    out["nt_time_over_ours"] = ratios
    out["max_rel_diff_nt_vs_ours"] = diffs
  json.dump(out, sys.stdout, indent=1)
  print()


if __name__ == "__main__":
  main()
