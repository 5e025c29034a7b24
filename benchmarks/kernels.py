"""Exact infinite-width kernels: our `im.kernel_fn` side by side with Neural Tangents; prints JSON.

Workloads (float32, NTK parameterization, W_std = sqrt(2), no biases, `x2=None`,
`get=("nngp", "ntk")`), written as plain Flax modules on our side and as the
equivalent `neural_tangents.stax` networks on NT's:

* ``fcn``: 1024 inputs of 784 features, 3 x [Dense 512, ReLU], Dense 1;
* ``cnn_flatten``: 64 x 16x16x3, 10 x [Conv 64 3x3 SAME, ReLU], Flatten, Dense 1;
* ``cnn_gap``: 8 x 16x16x3, 5 x [Conv 64 3x3 SAME, ReLU], global average pool, Dense 1;
* ``readme_flatten`` / ``readme_gap``: Neural Tangents' README network, 21 x [Conv 8
  3x3 SAME, ReLU] on 32x32x3, then Flatten (n = 64) or global average pooling (n = 4).

Both libraries run in this process on the same JAX: NT 0.6.5's `stax` is made
importable on current JAX by ``../shared/tools/nt_stax_on_current_jax.py``
(``pip install --no-deps neural-tangents==0.6.5 frozendict``; benchmark only, never a
dependency of this project). Without NT the script reports our side only.

Per workload and library: ``first_call_s`` (build the kernel function, trace, compile
and run once: what a user waits for; ``first_call_cpu_s`` the same in CPU time of this
process, less sensitive to other processes on a shared machine; ours is
``im.kernel_fn(model, x)`` then the jitted ``kernel_fn(x, None, ...)``, NT's builds the
``stax`` network, jits and calls it; in one process ours runs first, so NT's first call
finds JAX's own caches warm: ``--isolate`` times each in a fresh process;
``first_call_example1_s``: ours with ``x[:1]`` as the example, so the call's batch size
is new to the kernel function; ``--breakdown`` adds our first call's phases, wall and
CPU time), then ``--repeats`` interleaved rounds (ours, NT, ours, NT, ...; load from other processes
hits both alike) of the jitted call, each
timed to ``block_until_ready``; ``seconds`` is the minimum. ``ratio`` is NT seconds /
ours (> 1: we are faster), ``ms_per_entry`` seconds * 1000 / n^2,
``max_rel_diff`` max |ours - NT| / max |NT| over both kernels. ``flops`` /
``bytes`` / ``transcendentals`` come from XLA's cost analysis of each compiled
program; ``min_flops`` is a lower bound for the math (the input Gram matrix, plus one
multiply-add per window tap, per moment entry and per layer; transcendentals not
counted). The header records the machine and its load average.

  python benchmarks/kernels.py [--workloads fcn,cnn_flatten,cnn_gap] [--repeats 3]
                               [--n fcn=256,cnn_gap=4] [--no-nt] [--isolate] [--breakdown]

``--isolate`` runs each library in its own process (one after the other) and adds its
peak memory: ``peak_rss_gb`` (the process's peak resident set) and, on a GPU/TPU,
``device_peak_gb`` (``jax.devices()[0].memory_stats()["peak_bytes_in_use"]``); use it
for the README network rows and on an accelerator. ``temp_bytes`` is XLA's temporary
buffer size for the compiled program (``memory_analysis()``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "..", "shared", "tools"))

import flax.linen as nn
import jax
from jax.nn.initializers import variance_scaling

import infinite_modules as im

W_VAR = 2.0


@dataclasses.dataclass(frozen=True)
class Workload:
  """`depth` x [Dense/Conv `width`, ReLU] then a readout, on inputs of `shape`."""
  n: int
  shape: tuple[int, ...]
  depth: int
  width: int
  conv: bool
  readout: str  # "dense" (fcn), "flatten" or "gap"

  def min_flops(self) -> float:
    """Input Gram matrix + one multiply-add per window tap per moment entry per layer."""
    n2 = self.n * self.n
    if not self.conv:
      return 2.0 * n2 * math.prod(self.shape) + 2.0 * n2 * self.depth
    positions = math.prod(self.shape[:-1])
    entries = n2 * positions * (positions if self.readout == "gap" else 1)
    gram = 2.0 * entries * self.shape[-1]
    taps = 9 * (9 if self.readout == "gap" else 1)
    return gram + 2.0 * entries * taps * self.depth


WORKLOADS = {
    "fcn": Workload(1024, (784,), 3, 512, False, "dense"),
    "cnn_flatten": Workload(64, (16, 16, 3), 10, 64, True, "flatten"),
    "cnn_gap": Workload(8, (16, 16, 3), 5, 64, True, "gap"),
    "readme_flatten": Workload(64, (32, 32, 3), 21, 8, True, "flatten"),
    "readme_gap": Workload(4, (32, 32, 3), 21, 8, True, "gap"),
}
DEFAULT = ("fcn", "cnn_flatten", "cnn_gap")


class FlaxNet(nn.Module):
  """The workload as a plain Flax module."""
  w: Workload

  @nn.compact
  def __call__(self, x):
    init = variance_scaling(W_VAR, "fan_in", "normal")
    for _ in range(self.w.depth):
      if self.w.conv:
        x = nn.Conv(self.w.width, (3, 3), padding="SAME", use_bias=False, kernel_init=init)(x)
      else:
        x = nn.Dense(self.w.width, use_bias=False, kernel_init=init)(x)
      x = nn.relu(x)
    if self.w.readout == "flatten":
      x = x.reshape(x.shape[0], -1)
    elif self.w.readout == "gap":
      x = x.mean(axis=(1, 2))
    return nn.Dense(1, use_bias=False, kernel_init=init)(x)


def nt_kernel_fn(w: Workload):
  """The same network in Neural Tangents' stax (None if NT is not importable)."""
  try:
    import nt_stax_on_current_jax  # noqa: F401
    from neural_tangents import stax
  except Exception:  # noqa: BLE001  (NT absent or broken: report our side only)
    return None
  std = math.sqrt(W_VAR)
  layers = []
  for _ in range(w.depth):
    if w.conv:
      layers.append(stax.Conv(w.width, (3, 3), padding="SAME", W_std=std, b_std=None))
    else:
      layers.append(stax.Dense(w.width, W_std=std, b_std=None))
    layers.append(stax.Relu())
  if w.readout == "flatten":
    layers.append(stax.Flatten())
  elif w.readout == "gap":
    layers.append(stax.GlobalAvgPool())
  layers.append(stax.Dense(1, W_std=std, b_std=None))
  return stax.serial(*layers)[2]


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return {k: float(cost.get(k, 0.0)) for k in ("flops", "bytes accessed", "transcendentals")}


def _timed(fn, x) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(x))
  return time.perf_counter() - start


def _memory(compiled) -> dict:
  """XLA's buffer sizes for the compiled program (temporaries: the working memory)."""
  try:
    m = compiled.memory_analysis()
    return {"temp_bytes": float(m.temp_size_in_bytes)}
  except Exception:  # noqa: BLE001  (not every backend reports it)
    return {}


def _peaks() -> dict:
  """Peak resident memory of this process and, on an accelerator, peak device memory."""
  import resource
  out = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["device_peak_gb"] = stats["peak_bytes_in_use"] / 2 ** 30
  return out


def run_side(name: str, w: Workload, side: str, repeats: int, save: str) -> dict:
  """One library alone in this process (`--isolate`): its time, first call and peak
  memory (the process's peak RSS, `memory_stats()` on an accelerator); the kernels
  are saved to `save` (.npz) for the comparison."""
  x = np.random.RandomState(0).randn(w.n, *w.shape).astype(np.float32)
  jax.block_until_ready(jax.jit(lambda a: a * 2)(np.ones(3, np.float32)))
  if side == "nt":
    nt_kernel_fn(w)  # imports NT (not timed, as in `run`)
  start, cpu = time.perf_counter(), time.process_time()
  if side == "ours":
    kf = im.kernel_fn(FlaxNet(w), x)
    fn = jax.jit(lambda a: tuple(kf(a, None, get=("nngp", "ntk"))))
  else:
    nt = nt_kernel_fn(w)
    fn = jax.jit(lambda a: tuple(nt(a, None, ("nngp", "ntk"))))
  out = jax.block_until_ready(fn(x))
  first, first_cpu = time.perf_counter() - start, time.process_time() - cpu
  best = min(_timed(fn, x) for _ in range(repeats))
  np.savez(save, nngp=np.asarray(out[0]), ntk=np.asarray(out[1]))
  compiled = fn.lower(x).compile()
  return {"seconds": best, "first_call_s": first, "first_call_cpu_s": first_cpu,
          "ms_per_entry": best * 1000 / w.n ** 2,
          **_cost(compiled), **_memory(compiled), **_peaks()}


def run_isolated(name: str, w: Workload, repeats: int, use_nt: bool) -> dict:
  """Each library in its own process (peak memory is per process), then compared."""
  import subprocess
  import tempfile
  row = {"workload": name, "n": w.n, "input_shape": list(w.shape), "depth": w.depth,
         "width": w.width, "readout": w.readout, "min_flops": w.min_flops(), "isolated": True}
  outs = {}
  with tempfile.TemporaryDirectory() as tmp:
    for side in ("ours", "nt") if use_nt else ("ours",):
      save = os.path.join(tmp, f"{side}.npz")
      cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{side}:{name}:{w.n}",
             "--repeats", str(repeats), "--save", save]
      done = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if done.returncode != 0:
        row[side] = {"error": done.stderr.strip().splitlines()[-1:] or [str(done.returncode)]}
        continue
      row[side] = json.loads(done.stdout.strip().splitlines()[-1])
      outs[side] = dict(np.load(save))
  if "ours" in outs and "nt" in outs:
    row["ratio"] = row["nt"]["seconds"] / row["ours"]["seconds"]
    row["first_call_ratio"] = row["nt"]["first_call_s"] / row["ours"]["first_call_s"]
    row["max_rel_diff"] = max(
        float(np.max(np.abs(outs["ours"][k].astype(np.float64) - outs["nt"][k]))
              / np.max(np.abs(outs["nt"][k]))) for k in ("nngp", "ntk"))
  return row


def first_call_parts(w: Workload, x, example) -> dict:
  """Our first call split into its phases: a fresh kernel_fn (construction), then
  `jax.jit(...).trace`, `.lower()`, `.compile()` and the run, timed one by one."""
  stamps = []

  def clock():
    stamps.append((time.perf_counter(), time.process_time()))

  clock()
  kf = im.kernel_fn(FlaxNet(w), example)
  clock()
  traced = jax.jit(lambda a: tuple(kf(a, None, get=("nngp", "ntk")))).trace(x)
  clock()
  lowered = traced.lower()
  clock()
  compiled = lowered.compile()
  clock()
  jax.block_until_ready(compiled(x))
  clock()
  out = {}
  for name, (a, b) in zip(("construct", "trace", "lower", "compile", "run"),
                          itertools.pairwise(stamps)):
    out[f"{name}_s"], out[f"{name}_cpu_s"] = b[0] - a[0], b[1] - a[1]
  return out


def run(name: str, w: Workload, repeats: int, use_nt: bool, breakdown: bool = False) -> dict:
  x = np.random.RandomState(0).randn(w.n, *w.shape).astype(np.float32)
  sides = {}

  # First call as a user makes it: kernel_fn of the model with the data as example,
  # then the jitted call on that data.
  start, cpu = time.perf_counter(), time.process_time()
  kf = im.kernel_fn(FlaxNet(w), x)
  ours = jax.jit(lambda a: tuple(kf(a, None, get=("nngp", "ntk"))))
  result_ours = jax.block_until_ready(ours(x))
  sides["ours"] = {"fn": ours, "first_call_s": time.perf_counter() - start,
                   "first_call_cpu_s": time.process_time() - cpu, "out": result_ours}
  # The same with a one-example x_example: the call is at another batch size, so it
  # is interpreted again (construction's trace is at the example's shape).
  start = time.perf_counter()
  kf1 = im.kernel_fn(FlaxNet(w), x[:1])
  jax.block_until_ready(jax.jit(lambda a: tuple(kf1(a, None, get=("nngp", "ntk"))))(x))
  sides["ours"]["first_call_example1_s"] = time.perf_counter() - start

  nt = nt_kernel_fn(w) if use_nt else None  # imports NT (not timed)
  if nt is not None:
    start, cpu = time.perf_counter(), time.process_time()
    nt = nt_kernel_fn(w)
    nt_jit = jax.jit(lambda a: tuple(nt(a, None, ("nngp", "ntk"))))
    result_nt = jax.block_until_ready(nt_jit(x))
    sides["nt"] = {"fn": nt_jit, "first_call_s": time.perf_counter() - start,
                   "first_call_cpu_s": time.process_time() - cpu, "out": result_nt}

  times = {side: [] for side in sides}
  for _ in range(repeats):  # interleaved
    for side, s in sides.items():
      times[side].append(_timed(s["fn"], x))

  row = {"workload": name, "n": w.n, "input_shape": list(w.shape), "depth": w.depth,
         "width": w.width, "readout": w.readout, "layout": kf.layout,
         "min_flops": w.min_flops()}
  for side, s in sides.items():
    best = min(times[side])
    compiled = s["fn"].lower(x).compile()
    row[side] = {"seconds": best, "first_call_s": s["first_call_s"],
                 "first_call_cpu_s": s["first_call_cpu_s"],
                 "ms_per_entry": best * 1000 / w.n ** 2, **_cost(compiled), **_memory(compiled)}
    if "first_call_example1_s" in s:
      row[side]["first_call_example1_s"] = s["first_call_example1_s"]
  if breakdown:
    row["ours"]["first_call_parts"] = first_call_parts(w, x, x)
  if "nt" in sides:
    row["ratio"] = row["nt"]["seconds"] / row["ours"]["seconds"]
    row["first_call_ratio"] = row["nt"]["first_call_s"] / row["ours"]["first_call_s"]
    diffs = []
    for a, b in zip(sides["ours"]["out"], sides["nt"]["out"]):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      diffs.append(float(np.max(np.abs(a - b)) / np.max(np.abs(b))))
    row["max_rel_diff"] = max(diffs)
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workloads", default=",".join(DEFAULT),
                      help=f"comma-separated, from {sorted(WORKLOADS)}")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--n", default="", help="batch size overrides, e.g. fcn=256,cnn_gap=4")
  parser.add_argument("--no-nt", action="store_true", help="our side only")
  parser.add_argument("--isolate", action="store_true",
                      help="each library in its own process (peak RSS / device memory per "
                           "library; use on an accelerator)")
  parser.add_argument("--breakdown", action="store_true",
                      help="also time our first call's phases (construct, trace, lower, "
                           "compile, run) on a fresh kernel_fn")
  parser.add_argument("--child", help=argparse.SUPPRESS)  # side:workload:n, for --isolate
  parser.add_argument("--save", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    side, name, n = args.child.split(":")
    w = dataclasses.replace(WORKLOADS[name], n=int(n))
    print(json.dumps(run_side(name, w, side, args.repeats, args.save)), flush=True)
    return
  sizes = dict(item.split("=") for item in args.n.split(",") if item)
  header = {"machine": platform.machine(), "cpus": os.cpu_count(),
            "device": str(jax.devices()[0]), "jax": jax.__version__,
            "load_average_before": os.getloadavg()}
  print(json.dumps({"header": header}), flush=True)
  # Start the backend before the first timed call of either library.
  jax.block_until_ready(jax.jit(lambda a: a * 2)(np.ones(3, np.float32)))
  for name in args.workloads.split(","):
    w = WORKLOADS[name]
    if name in sizes:
      w = dataclasses.replace(w, n=int(sizes[name]))
    if args.isolate:
      row = run_isolated(name, w, args.repeats, not args.no_nt)
    else:
      row = run(name, w, args.repeats, not args.no_nt, args.breakdown)
    row["load_average"] = os.getloadavg()
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
