"""Whole-dataset kernels with `im.batch`: wall time, entries per second, peak RSS; prints JSON.

Workloads (float32, one process, all local devices, inputs from NumPy):

* ``mlp_symmetric``: NTK of a 3 x 512 ReLU MLP (Flax linen, Dense(1) readout) on
  20,000 inputs of dimension 784, ``x2=None``: a 20,000 x 20,000 kernel (1.6 GB)
  assembled in RAM from the tiles on and above the diagonal.
* ``mlp_full``: the same kernel with ``x2=x1`` (every tile computed), for the
  symmetric speed-up.
* ``mlp_file``: ``mlp_symmetric`` written into a ``.npy`` file (``path=``).
* ``cnn_symmetric``: NTK of a small CNN with pooling (two 3x3 SAME convolutions with
  ReLU, global average pooling, Dense(1); 8 x 8 x 3 inputs; full spatial layout) on
  400 inputs in tiles of 100, ``x2=None``.

Each workload runs in its own subprocess, so ``resource.getrusage`` peak RSS
(``ru_maxrss``) is that workload's alone. Reported per workload: ``wall_s`` (tracing,
compilation and all tiles), ``entries_per_s`` (kernel entries / wall),
``peak_rss_gb``, ``output_gb`` and ``rss_over_output``, and ``max_rel_error``: the
largest difference from ``kernel_fn`` computed directly on 300 random rows x 300
other random columns, relative to the largest kernel entry. The summary adds
``symmetric_over_full`` (wall-time ratio) and the load average before and after
(the machine may be shared).

  python benchmarks/scale.py [--quick] [--batch-size 1000] [--workloads mlp_symmetric,...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

FULL = {"mlp": 20_000, "cnn": 400}
QUICK = {"mlp": 2_000, "cnn": 32}
WORKLOADS = ("mlp_symmetric", "mlp_full", "mlp_file", "cnn_symmetric")


def _model(kind):
  import flax.linen as nn
  import jax.numpy as jnp

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      for _ in range(3):
        x = nn.relu(nn.Dense(512)(x))
      return nn.Dense(1)(x)

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      for _ in range(2):
        x = nn.relu(nn.Conv(64, (3, 3), padding="SAME")(x))
      return nn.Dense(1)(jnp.mean(x, axis=(1, 2)))

  return (MLP(), (784,)) if kind == "mlp" else (CNN(), (8, 8, 3))


def run_workload(name: str, n: int, batch_size: int, directory: str) -> dict:
  """One workload in this process; returns its measurements."""
  import numpy as np

  import infinite_modules as im

  kind, mode = name.split("_")
  model, shape = _model(kind)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, *shape)).astype(np.float32)
  start = time.perf_counter()
  kf = im.kernel_fn(model, x[:1])
  batched = im.batch(kf, batch_size)
  if mode == "full":
    k = batched(x, x, get="ntk")
  elif mode == "file":
    k = batched(x, get="ntk", path=os.path.join(directory, f"{name}.npy"))
  else:
    k = batched(x, get="ntk")
  wall = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
  # Disjoint rows and columns: diagonal entries of a float32 ReLU NTK are ill-conditioned
  # (arccos near 1) and differ by ~5e-4 between any two compiled shapes (both as far from
  # float64); the tests check them at small sizes.
  perm = rng.permutation(n)
  rows, cols = np.sort(perm[:min(n // 2, 300)]), np.sort(perm[n // 2:][:300])
  direct = np.asarray(kf(x[rows], x[cols], get="ntk"))
  error = float(np.max(np.abs(np.asarray(k[np.ix_(rows, cols)]) - direct)) / np.max(np.abs(direct)))
  return {"workload": name, "n": n, "input_shape": list(shape), "batch_size": batch_size,
          "layout": kf.layout, "wall_s": round(wall, 2), "entries_per_s": float(f"{n * n / wall:.4g}"),
          "peak_rss_gb": round(peak / 1e9, 3), "output_gb": round(k.nbytes / 1e9, 3),
          "rss_over_output": round(peak / k.nbytes, 3), "max_rel_error": float(f"{error:.3g}")}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small sizes, for development")
  parser.add_argument("--batch-size", type=int, default=None)
  parser.add_argument("--workloads", default=",".join(WORKLOADS))
  parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one workload
  parser.add_argument("--dir", help=argparse.SUPPRESS)
  args = parser.parse_args()
  sizes = QUICK if args.quick else FULL
  if args.one:
    kind = args.one.split("_")[0]
    batch_size = args.batch_size or (1000 if kind == "mlp" else 100) // (4 if args.quick else 1)
    print(json.dumps(run_workload(args.one, sizes[kind], batch_size, args.dir)))
    return
  results = {"load_before": os.getloadavg(), "workloads": []}
  with tempfile.TemporaryDirectory() as directory:
    for name in args.workloads.split(","):
      cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--dir", directory]
      cmd += ["--quick"] if args.quick else []
      cmd += ["--batch-size", str(args.batch_size)] if args.batch_size else []
      out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
      results["workloads"].append(json.loads(out.strip().splitlines()[-1]))
      print(json.dumps(results["workloads"][-1]), file=sys.stderr)
  times = {w["workload"]: w["wall_s"] for w in results["workloads"]}
  if "mlp_symmetric" in times and "mlp_full" in times:
    results["symmetric_over_full"] = round(times["mlp_symmetric"] / times["mlp_full"], 3)
  results["load_after"] = os.getloadavg()
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
