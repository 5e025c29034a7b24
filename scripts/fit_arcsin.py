"""Fits the polynomial behind `infinite_modules.inverse_trig` (run to reproduce its constants).

asin(s) = s + s z P(z) with z = s^2 in [0, 1/4] (every argument of arcsin / arccos
is reduced to |s| <= 1/2). P is the Chebyshev interpolant (in z) of
f(z) = (asin(sqrt z) / sqrt z - 1) / z, computed in 50-digit arithmetic and
converted to monomial coefficients for Horner's scheme. Prints, per degree,
the largest relative error of s + s z P(z) on a fine grid, then the chosen
coefficients.

  python scripts/fit_arcsin.py
"""

import mpmath as mp

mp.mp.dps = 50
HI = mp.mpf(1) / 4


def target(z):
  if z == 0:
    return mp.mpf(1) / 6
  s = mp.sqrt(z)
  return (mp.asin(s) / s - 1) / z


def chebyshev_fit(degree):
  """Monomial coefficients (lowest first) of the Chebyshev interpolant on [0, HI]."""
  n = degree + 1
  nodes = [HI / 2 * (1 + mp.cos(mp.pi * (k + mp.mpf(1) / 2) / n)) for k in range(n)]
  values = [target(z) for z in nodes]
  # Newton divided differences, then expansion to monomials (exact in 50 digits).
  coef = list(values)
  for j in range(1, n):
    for i in range(n - 1, j - 1, -1):
      coef[i] = (coef[i] - coef[i - 1]) / (nodes[i] - nodes[i - j])
  poly = [mp.mpf(0)] * n
  for i in range(n - 1, -1, -1):
    # poly = poly * (z - nodes[i]) + coef[i]
    shifted = [mp.mpf(0)] + poly[:-1]
    poly = [shifted[k] - nodes[i] * poly[k] for k in range(n)]
    poly[0] += coef[i]
  return poly


def max_relative_error(poly, rounded):
  worst = mp.mpf(0)
  for k in range(2001):
    z = HI * k / 2000
    s = mp.sqrt(z)
    p = mp.mpf(0)
    for c in reversed(poly):
      p = p * z + (mp.mpf(float(c)) if rounded else c)
    approx = s + s * z * p
    exact = mp.asin(s)
    if exact != 0:
      worst = max(worst, abs(approx - exact) / exact)
  return worst


if __name__ == "__main__":
  for degree in range(3, 15):
    poly = chebyshev_fit(degree)
    print(degree, mp.nstr(max_relative_error(poly, rounded=True), 3))
  for degree in (5, 12):
    print(f"degree {degree}:", [float(c) for c in chebyshev_fit(degree)])
