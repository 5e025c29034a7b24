"""Float64 references for the quadrature accuracy test: E[phi(u) phi(v)] and
E[phi'(u) phi'(v)] for tanh, sigmoid, silu, softplus over a grid of variances,
means and correlations; writes tests/data/quadrature_references.npz.

Each reference is a composite Gauss-Legendre integral in the standardized
variables (x, y) on [-12, 12] with `--pieces` pieces of 10 points (pieces of
width 0.08 standard deviations, far below the 0.16 std feature width of
tanh at variance 100); a sample is recomputed with pieces twice as wide and the
script asserts they agree to 1e-11 (relative to sqrt(E phi(u)^2 E phi(v)^2);
measured 3.5e-12, from the wider pieces: Gauss-Legendre's error falls
geometrically with the pieces' width, so the references' own is far smaller).

  python scripts/quadrature_references.py [--pieces 300]
"""

from __future__ import annotations

import argparse
import itertools
import os

import numpy as np
from scipy.special import expit

FUNCTIONS = {
    "tanh": (np.tanh, lambda z: 1 / np.cosh(z) ** 2),
    "sigmoid": (expit, lambda z: expit(z) * (1 - expit(z))),
    "silu": (lambda z: z * expit(z), lambda z: expit(z) * (1 + z * (1 - expit(z)))),
    "softplus": (lambda z: np.logaddexp(0, z), expit),
}
VARIANCES = (1e-4, 1e-2, 1.0, 4.0, 25.0, 100.0)
CORRELATIONS = (-1.0, -0.6, 0.5, 0.999, 1.0)
# (mean of u, vb / va); v has mean -m: centred equal sides, and shifted unequal ones.
SIDES = ((0.0, 1.0), (0.7, 0.5))


def _rule(pieces: int):
  g, w = np.polynomial.legendre.leggauss(10)
  edges = np.linspace(-12.0, 12.0, pieces + 1)
  lo, hi = edges[:-1, None], edges[1:, None]
  x = lo + (hi - lo) / 2 * (g + 1)
  weights = (hi - lo) / 2 * w * np.exp(-x * x / 2) / np.sqrt(2 * np.pi)
  return x.ravel(), weights.ravel()


def pair(fa, fb, va, vb, rho, ma, mb, pieces):
  """E[fa(u) fb(v)], u = ma + sa x, v = mb + sb (rho x + sqrt(1 - rho^2) y)."""
  x, w = _rule(pieces)
  sa, sb = np.sqrt(va), np.sqrt(vb)
  u = ma + sa * x
  if abs(rho) == 1.0:
    return float(np.sum(w * fa(u) * fb(mb + sb * rho * x)))
  resid = sb * np.sqrt(1 - rho * rho)
  inner = fb(mb + sb * rho * x[:, None] + resid * x[None, :]) @ w
  return float(np.sum(w * fa(u) * inner))


def table(pieces: int, every: int = 1):
  rows, values = [], []
  count = 0
  for name, (f, df) in FUNCTIONS.items():
    for v, rho, (m, ratio) in itertools.product(VARIANCES, CORRELATIONS, SIDES):
      va, vb = v, ratio * v
      count += 1
      if count % every:
        continue
      for deriv, g in (("kappa", f), ("dkappa", df)):
        value = pair(g, g, va, vb, rho, m, -m, pieces)
        square, one = (lambda z, g=g: g(z) ** 2), (lambda z: 1.0 + 0 * z)
        scale = np.sqrt(pair(square, one, va, vb, 1.0, m, -m, pieces)
                        * pair(one, square, va, vb, 1.0, m, -m, pieces))
        rows.append((name, deriv, va, vb, rho, m, -m))
        values.append((value, scale))
  return rows, np.asarray(values)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--pieces", type=int, default=300)
  args = parser.parse_args()
  rows, fine = table(args.pieces)
  _, coarse = table(args.pieces // 2, every=5)  # a sample: the check costs as much
  sample = fine[[i for i in range(len(rows)) if (i // 2 + 1) % 5 == 0]]
  gap = np.max(np.abs(sample[:, 0] - coarse[:, 0]) / sample[:, 1])
  print(f"{len(rows)} references; max relative gap between resolutions {gap:.1e}")
  assert gap < 1e-11, gap
  out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "tests", "data", "quadrature_references.npz")
  names = np.array([r[0] for r in rows])
  kinds = np.array([r[1] for r in rows])
  numbers = np.array([r[2:] for r in rows], np.float64)
  np.savez(out, function=names, kind=kinds, va_vb_rho_ma_mb=numbers, value=fine[:, 0],
           scale=fine[:, 1])
  print("wrote", out)


if __name__ == "__main__":
  main()
