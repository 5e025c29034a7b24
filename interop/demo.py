"""Finite vs infinite width on real data, end to end: `python -m interop.demo [--quick]`.

1. Loads scikit-learn's bundled 8x8 digits (no download), 10 classes, one-hot
   targets.
2. Infinite width: the exact NNGP and NTK of an unmodified Flax MLP and Flax
   CNN (`im.kernel_fn`), and their test accuracy after infinitely long
   training (`im.predict.gradient_descent_mse`, t = infinity) and after the
   training time of step 3.
3. Finite width: the same architectures in NTK parameterization
   (`interop.ntk_layers`, which share that NTK) trained with full-batch
   `optax.sgd` at several widths, ensembles of independent initializations
   trained in parallel, next to their linearizations and the infinite-width
   prediction at the matched time `t = learning_rate * steps`
   (`interop.compare`).
4. Prints a table per architecture and saves a figure (`outputs/finite_vs_infinite.png`,
   or `--out DIR`): as the width grows the
   finite networks' outputs approach the infinite-width prediction
   (RMSE ~ 1/sqrt(width)) and their accuracy approaches its accuracy.

`--quick` runs a reduced version (fewer examples, widths and steps) in well
under a minute; it is what the tests run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from interop import compare as compare_lib
from interop import data as data_lib
from interop import ntk_layers

__all__ = ["CONFIGS", "Config", "FlaxCNN", "FlaxMLP", "main", "run"]

W_STD = 2.0 ** 0.5  # hidden layers: He initialization
B_STD = 0.05
W_OUT = 0.25  # readout: small outputs at initialization, so single networks classify well


_init_w = nn.initializers.variance_scaling(W_STD ** 2, "fan_in", "normal")
_init_out = nn.initializers.variance_scaling(W_OUT ** 2, "fan_in", "normal")
_init_b = nn.initializers.normal(B_STD)


class FlaxMLP(nn.Module):
  """An ordinary Flax MLP: Dense -> relu -> Dense (He-normal hidden weights)."""

  width: int = 512
  out: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.width, kernel_init=_init_w, bias_init=_init_b)(x))
    return nn.Dense(self.out, kernel_init=_init_out, bias_init=_init_b)(x)


class FlaxCNN(nn.Module):
  """An ordinary Flax CNN: Conv 3x3 / stride 2 -> relu -> flatten -> Dense."""

  width: int = 64
  out: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(self.width, (3, 3), strides=(2, 2), padding="SAME",
                        kernel_init=_init_w, bias_init=_init_b)(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.out, kernel_init=_init_out, bias_init=_init_b)(x)


class NTKCNN(nn.Module):
  """`FlaxCNN` in NTK parameterization (`interop.ntk_layers`): the same NNGP and NTK."""

  width: int = 64
  out: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(ntk_layers.NTKConv(self.width, (3, 3), strides=(2, 2), padding="SAME",
                                   W_std=W_STD, b_std=B_STD)(x))
    x = x.reshape(x.shape[0], -1)
    return ntk_layers.NTKDense(self.out, W_std=W_OUT, b_std=B_STD)(x)


def _ntk_mlp(width: int) -> nn.Module:
  """`FlaxMLP` in NTK parameterization: the same NNGP and NTK."""
  return ntk_layers.MLP(width, out=10, depth=1, W_std=W_STD, b_std=B_STD, W_std_out=W_OUT)


def _ntk_cnn(width: int) -> nn.Module:
  return NTKCNN(width)


@dataclasses.dataclass(frozen=True)
class Config:
  """Sizes of one demo run.

  Attributes:
    n_train, n_test: digits examples.
    mlp_widths, cnn_widths: widths of the finite networks.
    mlp_members, cnn_members: ensemble sizes.
    steps: full-batch SGD steps.
    lr_fraction: learning rate as a fraction of the largest stable one,
      `2 * y_train.size / lambda_max(NTK)`.
    n_records: recorded steps (for the curves).
    kernel_batch_size: rows per analytic kernel block.
  """

  n_train: int
  n_test: int
  mlp_widths: tuple[int, ...]
  cnn_widths: tuple[int, ...]
  mlp_members: int
  cnn_members: int
  steps: int
  lr_fraction: float = 0.4
  n_records: int = 21
  kernel_batch_size: int = 250


CONFIGS = {
    "full": Config(n_train=400, n_test=400, mlp_widths=(64, 256, 1024),
                   cnn_widths=(8, 32, 128), mlp_members=3, cnn_members=1, steps=400),
    "quick": Config(n_train=120, n_test=200, mlp_widths=(64, 1024), cnn_widths=(8, 64),
                    mlp_members=2, cnn_members=1, steps=120, n_records=7),
}


def _infinite(name: str, model: nn.Module, d: data_lib.Dataset, cfg: Config, log) -> dict:
  """Analytic NNGP / NTK of `model` and its test accuracies."""
  import infinite_modules as im

  start = time.perf_counter()
  kernel_fn = im.kernel_fn(model, d.x_train[:2], parameterization="ntk")
  x_train = jnp.asarray(d.x_train)
  x_all = jnp.concatenate([x_train, jnp.asarray(d.x_test)])
  # Both kernels in one call per block of equal size (one compilation): the last block
  # is padded with repeated rows that are dropped afterwards.
  rows, bs = x_all.shape[0], min(cfg.kernel_batch_size, x_all.shape[0])
  x_pad = jnp.concatenate([x_all, x_all[:(-rows) % bs]])
  blocks = [kernel_fn(x_pad[i:i + bs], x_train, get=("nngp", "ntk"))
            for i in range(0, x_pad.shape[0], bs)]
  n = x_train.shape[0]
  kernels = {}
  for get in ("nngp", "ntk"):
    k = np.concatenate([np.asarray(getattr(b, get)) for b in blocks])[:rows]
    kernels[get] = (k[:n], k[n:])
  acc = {}
  for get, (k_tt, k_st) in kernels.items():
    predict_fn = im.predict.gradient_descent_mse(k_tt, d.y_train, diag_reg=1e-4)
    acc[f"{get}_inf"] = float(np.mean(np.argmax(np.asarray(
        predict_fn(None, 0.0, 0.0, k_st)[1]), -1) == d.labels_test))
  log(f"  {name}: exact NNGP/NTK of the plain Flax model, {x_all.shape[0]} x {n} "
      f"kernels in {time.perf_counter() - start:.1f} s")
  return {"kernels": kernels, "accuracy": acc}


def _learning_rate(ntk_train_train: np.ndarray, y_train: np.ndarray, fraction: float) -> float:
  import infinite_modules as im
  return float(fraction * im.predict.max_learning_rate(ntk_train_train, y_train.size))


DEFAULT_OUT = "outputs"  # git-ignored, so a run leaves the checkout clean


def run(cfg: Config, out_dir: str | None = DEFAULT_OUT, seed: int = 0, plot: bool = True,
        progress: bool = False, log=print) -> dict:
  """Runs the demo with sizes `cfg`; returns the width sweeps and accuracies.

  Args:
    cfg: sizes, e.g. `CONFIGS["quick"]`.
    out_dir: where to save `finite_vs_infinite.png` (`None`: no figure).
    seed: seed of the data split and of the initializations.
    plot: save the figure (needs matplotlib).
    progress: progress bars for training.
    log: printing function.
  """
  t0 = time.perf_counter()
  log(f"interop demo: digits (8x8, 10 classes), {cfg.n_train} train / {cfg.n_test} test, "
      f"jax {jax.__version__} on {jax.default_backend()}")
  d_flat = data_lib.load_digits(cfg.n_train, cfg.n_test, seed=seed)
  d_img = data_lib.load_digits(cfg.n_train, cfg.n_test, image=True, seed=seed)
  record = np.unique(np.round(np.geomspace(1, cfg.steps, cfg.n_records - 1))).astype(int)
  record = np.concatenate([[0], record])

  log("\n[1/3] Infinite width (exact kernels)")
  results = {}
  for name, plain, make, d, widths, members in (
      ("MLP", FlaxMLP(), _ntk_mlp, d_flat, cfg.mlp_widths, cfg.mlp_members),
      ("CNN", FlaxCNN(), _ntk_cnn, d_img, cfg.cnn_widths, cfg.cnn_members)):
    inf = _infinite(name, plain, d, cfg, log)
    k_tt, k_st = inf["kernels"]["ntk"]
    lr = _learning_rate(k_tt, d.y_train, cfg.lr_fraction)
    results[name] = {"inf": inf, "make": make, "data": d, "widths": widths,
                     "members": members, "lr": lr, "k_tt": k_tt, "k_st": k_st}

  log(f"\n[2/3] Finite width: full-batch optax.sgd, {cfg.steps} steps, ensembles, "
      "linearized networks")
  for name, r in results.items():
    start = time.perf_counter()
    d = r["data"]
    r["sweep"] = compare_lib.compare_widths(
        r["make"], r["widths"], d.x_train, d.y_train, d.x_test, d.y_test,
        learning_rate=r["lr"], steps=record, key=jax.random.key(seed, impl="rbg"),
        n_members=r["members"], ntk_train_train=r["k_tt"], ntk_test_train=r["k_st"],
        progress=progress)
    log(f"  {name}: widths {list(r['widths'])} x {r['members']} members trained in "
        f"{time.perf_counter() - start:.1f} s")

  log("\n[3/3] Results")
  for name, r in results.items():
    sweep, acc = r["sweep"], r["inf"]["accuracy"]
    t_end = sweep.comparisons[0].times[-1]
    log(f"\n{name}  (infinite width, t = inf:  NNGP acc {acc['nngp_inf']:.3f},  "
        f"NTK acc {acc['ntk_inf']:.3f})")
    log(f"trained to t = lr * steps = {r['lr']:.3g} * {cfg.steps} = {t_end:.4g}; "
        f"infinite-width NTK acc at this t: "
        f"{sweep.comparisons[0].metrics['accuracy_infinite_mean'][-1]:.3f}")
    log(_table(sweep))
  if plot and out_dir is not None:
    path = _figure(results, out_dir)
    log(f"\nfigure: {path}")
  log(f"total {time.perf_counter() - t0:.1f} s")
  return results


def _table(sweep: compare_lib.WidthSweep) -> str:
  header = ["width", "acc finite", "acc ensemble", "acc linearized", "acc infinite",
            "RMSE(finite,inf)", "RMSE(lin,inf)", "RMSE(finite,lin)"]
  keys = ["accuracy_finite", "accuracy_ensemble", "accuracy_linearized", "accuracy_infinite",
          "rmse_finite_infinite", "rmse_linearized_infinite", "rmse_finite_linearized"]
  rows = [[str(w)] + [f"{c.metrics[k][-1]:.3f}" for k in keys]
          for w, c in zip(sweep.widths, sweep.comparisons)]
  rows.append(["inf"] + ["-", "-", "-",
                         f"{sweep.comparisons[-1].metrics['accuracy_infinite_mean'][-1]:.3f}",
                         "0", "0", "0"])
  sizes = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  fmt = lambda r: "  ".join(c.rjust(s) for c, s in zip(r, sizes))
  note = ("acc finite / linearized / infinite: mean over members (infinite = the infinite-width "
          "network started\nfrom each member's initial outputs); acc ensemble: the members' "
          "mean output; acc infinite at 'inf':\nthe mean prediction. RMSE over test outputs "
          "at the end of training.")
  return "\n".join([fmt(header), "  ".join("-" * s for s in sizes)] + [fmt(r) for r in rows]
                   + [note])


def _figure(results: dict, out_dir: str) -> str:
  import matplotlib

  if "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from interop import plotting

  fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), layout="constrained")
  for col, (name, r) in enumerate(results.items()):
    sweep = r["sweep"]
    plotting.plot_agreement_over_width(sweep, ax=axes[0, col])
    axes[0, col].set_title(f"{name}: finite vs infinite, end of training")
    plotting.plot_accuracy_over_width(
        sweep, infinite_time_accuracy=r["inf"]["accuracy"]["ntk_inf"], ax=axes[1, col])
    axes[1, col].set_title(f"{name}: test accuracy")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "finite_vs_infinite.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main(argv: Sequence[str] | None = None) -> int:
  """Command line entry point; see the module docstring."""
  parser = argparse.ArgumentParser(
      prog="python -m interop.demo",
      description="Finite Flax networks trained with optax vs their exact infinite-width "
                  "limit on the digits dataset.")
  parser.add_argument("--quick", action="store_true",
                      help="reduced run (fewer examples, widths and steps; < 1 minute)")
  parser.add_argument("--out", default=DEFAULT_OUT,
                      help=f"directory for finite_vs_infinite.png (default: {DEFAULT_OUT}/, "
                           "created if missing)")
  parser.add_argument("--no-plot", action="store_true", help="do not save the figure")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--progress", action="store_true", help="show training progress bars")
  args = parser.parse_args(argv)
  cfg = CONFIGS["quick" if args.quick else "full"]
  plot = not args.no_plot
  if plot:
    try:
      import matplotlib  # noqa: F401
    except ImportError:
      print("matplotlib is not installed: skipping the figure "
            "(pip install 'infinite-modules[demo]').", file=sys.stderr)
      plot = False
  run(cfg, out_dir=args.out, seed=args.seed, plot=plot, progress=args.progress)
  return 0


if __name__ == "__main__":
  sys.exit(main())
