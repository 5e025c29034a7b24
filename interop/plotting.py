"""Matplotlib plots of training runs and finite-vs-infinite comparisons.

matplotlib is an optional dependency (`pip install 'infinite-modules[demo]'`);
it is imported when a plot is made. Every function draws into `ax` when given
(so plots compose into your own figures) and returns the axes it drew on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from interop.compare import Comparison, WidthSweep
from interop.training import TrainResult

if TYPE_CHECKING:  # pragma: no cover
  from matplotlib.axes import Axes
  from matplotlib.figure import Figure

__all__ = [
    "plot_accuracy_over_width",
    "plot_agreement_over_time",
    "plot_agreement_over_width",
    "plot_comparison",
    "plot_loss_curves",
]

_RMSE_LABELS = {
    "rmse_finite_infinite": "finite vs infinite",
    "rmse_linearized_infinite": "linearized vs infinite",
    "rmse_finite_linearized": "finite vs linearized",
    "rmse_ensemble_mean_infinite_mean": "ensemble mean vs infinite mean",
}


def _pyplot():
  try:
    import matplotlib.pyplot as plt
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("interop.plotting needs matplotlib: pip install matplotlib "
                      "(or pip install 'infinite-modules[demo]').") from e
  return plt


def _axes(ax: Axes | None, figsize=(5.0, 3.6)) -> Axes:
  if ax is not None:
    return ax
  _, ax = _pyplot().subplots(figsize=figsize, layout="constrained")
  return ax


def _band(ax: Axes, x: np.ndarray, y: np.ndarray, label: str, **kwargs: Any) -> None:
  """Plots `y` `(T,)` as a line, or `(T, E)` as the member mean with a min-max band."""
  y = np.asarray(y)
  if y.ndim == 1:
    ax.plot(x, y, label=label, **kwargs)
    return
  (line,) = ax.plot(x, y.mean(axis=1), label=label, **kwargs)
  ax.fill_between(x, y.min(axis=1), y.max(axis=1), color=line.get_color(), alpha=0.2, lw=0)


def _default_rmse_metrics(available: Mapping[str, Any]) -> list[str]:
  """The RMSE metrics in `available` that the agreement plots show by default."""
  return [m for m in _RMSE_LABELS if m in available and m != "rmse_ensemble_mean_infinite_mean"]


def _log_x(x: np.ndarray) -> tuple[np.ndarray, bool]:
  """Log x-axis when the recorded points span decades (step 0 is dropped then)."""
  positive = x[x > 0]
  return x, positive.size > 2 and positive.max() / positive.min() > 50


def plot_loss_curves(results: TrainResult | Mapping[str, TrainResult], *,
                     learning_rate: float | None = None, test: bool = True,
                     ax: Axes | None = None) -> Axes:
  """Training (solid) and test (dashed) loss against step, for one or several runs.

  Ensembles are drawn as the member mean with a min-max band.

  Args:
    results: a `TrainResult` or `{label: TrainResult}`.
    learning_rate: if given, the x-axis is the continuous time `lr * step`.
    test: also draw the test losses (when recorded).
    ax: axes to draw on (default: a new figure).
  """
  ax = _axes(ax)
  if isinstance(results, TrainResult):
    results = {"": results}
  colors = _pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
  for i, (label, r) in enumerate(results.items()):
    x = r.steps * (learning_rate if learning_rate else 1.0)
    color = colors[i % len(colors)]
    _band(ax, x, r.train_loss, f"{label} train".strip(), color=color)
    if test and r.test_loss is not None:
      _band(ax, x, r.test_loss, f"{label} test".strip(), color=color, ls="--")
  ax.set_xlabel("time  t = lr * step" if learning_rate else "step")
  ax.set_ylabel("loss")
  ax.set_yscale("log")
  ax.legend(fontsize="small")
  return ax


def plot_agreement_over_time(comparison: Comparison, *,
                             metrics: Sequence[str] | None = None,
                             ax: Axes | None = None) -> Axes:
  """Test-output RMSE between finite, linearized and infinite networks against time."""
  ax = _axes(ax)
  metrics = metrics or _default_rmse_metrics(comparison.metrics)
  x, log = _log_x(comparison.times)
  keep = x > 0 if log else slice(None)
  for m in metrics:
    ax.plot(x[keep], comparison.metrics[m][keep], marker=".", label=_RMSE_LABELS.get(m, m))
  if log:
    ax.set_xscale("log")
  ax.set_xlabel("time  t = lr * step")
  ax.set_ylabel("test output RMSE")
  ax.legend(fontsize="small")
  return ax


def plot_agreement_over_width(sweep: WidthSweep, *, metrics: Sequence[str] | None = None,
                              index: int = -1, guide: bool = True,
                              ax: Axes | None = None) -> Axes:
  """RMSE between finite / linearized / infinite test outputs against width (log-log).

  Args:
    sweep: from `interop.compare.compare_widths`.
    metrics: RMSE metric names (default: those in the sweep).
    index: recorded step to show (default: the end of training).
    guide: draw a `1/sqrt(width)` reference line, the expected rate.
    ax: axes to draw on.
  """
  ax = _axes(ax)
  metrics = metrics or _default_rmse_metrics(sweep.comparisons[0].metrics)
  widths = np.asarray(sweep.widths, float)
  for m in metrics:
    values = np.array([c.metrics[m][index] for c in sweep.comparisons])
    ax.plot(widths, values, marker="o", label=_RMSE_LABELS.get(m, m))
  if guide and metrics:
    ref = np.array([c.metrics[metrics[0]][index] for c in sweep.comparisons])[0]
    ax.plot(widths, ref * np.sqrt(widths[0] / widths), color="grey", ls=":",
            label=r"$\propto 1/\sqrt{\mathrm{width}}$")
  ax.set_yscale("log")
  return _width_axis(ax, widths, "test output RMSE")


def _width_axis(ax: Axes, widths: np.ndarray, ylabel: str) -> Axes:
  """A log x-axis "width" labelled with the widths themselves, `ylabel` and a legend."""
  from matplotlib.ticker import NullLocator

  ax.set_xscale("log")
  ax.set_xticks(widths, [str(int(w)) for w in widths])
  ax.xaxis.set_minor_locator(NullLocator())
  ax.set_xlabel("width")
  ax.set_ylabel(ylabel)
  ax.legend(fontsize="small")
  return ax


def plot_comparison(comparison: Comparison, *, title: str | None = None) -> Figure:
  """Three panels: test loss over time, agreement over time, final outputs scatter.

  The scatter shows every test output of every member at the end of training,
  finite (and linearized) against the infinite-width prediction.
  """
  plt = _pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(13.0, 3.6), layout="constrained")
  x, log = _log_x(comparison.times)
  keep = x > 0 if log else slice(None)
  m = comparison.metrics
  for name, label, style in (("loss_finite", "finite", "-"), ("loss_linearized", "linearized",
                             "--"), ("loss_infinite", "infinite", ":")):
    if name in m:
      axes[0].plot(x[keep], m[name][keep], ls=style, label=label)
  if log:
    axes[0].set_xscale("log")
  axes[0].set_yscale("log")
  axes[0].set_xlabel("time  t = lr * step")
  axes[0].set_ylabel("test loss")
  axes[0].legend(fontsize="small")
  plot_agreement_over_time(comparison, ax=axes[1])
  inf = comparison.infinite_test[-1].ravel()
  axes[2].scatter(inf, comparison.finite.test_outputs[-1].ravel(), s=3, alpha=0.5,
                  label="finite")
  if comparison.linearized is not None:
    axes[2].scatter(inf, comparison.linearized.test_outputs[-1].ravel(), s=3, alpha=0.5,
                    label="linearized")
  lo, hi = float(inf.min()), float(inf.max())
  axes[2].plot([lo, hi], [lo, hi], color="grey", lw=1)
  axes[2].set_xlabel("infinite-width prediction")
  axes[2].set_ylabel("network output")
  axes[2].legend(fontsize="small")
  if title:
    fig.suptitle(title)
  return fig


def plot_accuracy_over_width(sweep: WidthSweep, *, index: int = -1,
                             infinite_time_accuracy: float | None = None,
                             ax: Axes | None = None) -> Axes:
  """Test accuracy of finite, ensemble-mean and linearized networks against width.

  Horizontal lines: the infinite-width network at the same time and, if given,
  `infinite_time_accuracy` (e.g. the NTK prediction at t = infinity).
  """
  ax = _axes(ax)
  widths = np.asarray(sweep.widths, float)
  for key, label in (("accuracy_finite", "finite (mean over members)"),
                     ("accuracy_ensemble", "finite ensemble mean"),
                     ("accuracy_linearized", "linearized")):
    if key in sweep.comparisons[0].metrics:
      ax.plot(widths, [c.metrics[key][index] for c in sweep.comparisons], marker="o",
              label=label)
  ax.axhline(sweep.comparisons[0].metrics["accuracy_infinite_mean"][index], color="k", ls="--",
             label="infinite width, same t")
  if infinite_time_accuracy is not None:
    ax.axhline(infinite_time_accuracy, color="grey", ls=":", label="infinite width, t = inf")
  return _width_axis(ax, widths, "test accuracy")
