"""Positively homogeneous phi: its closed form read off its structure, without probes.

A function with phi(t z) = t phi(z) for every t > 0 is, on the real line,
exactly phi(z) = p z for z > 0 and n z for z < 0 with p = phi(1) and
n = -phi(-1): `expectations.ReluPair` (relu, leaky_relu, abs, -relu, max(z, a z),
...). Whether phi is such a function can be decided from its expression (the
`elementwise` tree of primitives over z and literals) by tracking the degree of
homogeneity of every node:

* z has degree 1, a nonzero finite literal degree 0, the zero literal any degree;
* sums, differences, max and min need a common degree of their arguments;
* a product adds degrees; a quotient by a nonzero finite literal keeps them;
* a comparison of two nodes of a common degree is scale invariant (degree 0),
  and so are logical combinations of comparisons;
* select_n with a degree-0 predicate has the common degree of its cases;
* negation, abs, copies and float conversions keep the degree.

Anything else (another primitive, a location constant, a literal in a sum with z)
is not decided here: `expectations.recognize` fits it on probe points instead. The
structural route matters for the first call: recognition evaluates phi and its
derivatives on concrete probes, which compiles a small XLA program per primitive;
p and n here are two numpy evaluations of phi, in the kernel's dtype (the values
recognition would fit from phi(1) and phi(-1)).
"""

from __future__ import annotations

import numpy as np

from infinite_modules import expectations as ex
from infinite_modules.gaussian_pieces import TwoSlopes

_SAME_DEGREE = {"add": np.add, "sub": np.subtract, "max": np.maximum, "min": np.minimum}
_KEEP = {"neg": np.negative, "abs": np.abs, "copy": None, "copy_p": None}
_COMPARE = {"gt": np.greater, "ge": np.greater_equal, "lt": np.less, "le": np.less_equal,
            "eq": np.equal, "ne": np.not_equal}
_LOGICAL = {"not": np.logical_not, "and": np.logical_and, "or": np.logical_or,
            "xor": np.logical_xor}
_ANY = frozenset({0, 1})


def relu_pair_form(expr, dtype) -> ex.Affine | None:
  """`Affine(ReluPair(phi(1), -phi(-1)), 1, 1, 0)` if phi = expr is positively
  homogeneous of degree 1 by its structure (see the module docstring), else None."""
  if 1 not in _degrees(expr, {}):
    return None
  p = float(_evaluate(expr, np.asarray(1.0, dtype), dtype))
  n = -float(_evaluate(expr, np.asarray(-1.0, dtype), dtype))
  if not (np.isfinite(p) and np.isfinite(n)):
    return None
  return ex.Affine(ex.ReluPair(p, n), 1.0, 1.0, 0.0)


def two_slopes(expr, dtype) -> TwoSlopes | None:
  """phi = expr as `TwoSlopes(phi(1), -phi(-1))` (exactly p z for z > 0, n z for z < 0)
  if it is positively homogeneous of degree 1 by its structure, else None: the form
  whose one-dimensional Gaussian expectations `gaussian_pieces` gives in closed form."""
  form = relu_pair_form(expr, dtype)
  return None if form is None else TwoSlopes(form.core.p, form.core.n)


def is_homogeneous(expr) -> bool:
  """Whether phi = expr is positively homogeneous of degree 1 by its structure (then
  finite wherever z is, so defined on the whole line)."""
  return 1 in _degrees(expr, {})


def _literal(value):
  """The literal's value as a numpy array, or None if it is not a finite constant."""
  try:
    value = np.asarray(value)
  except Exception:  # noqa: BLE001  (a traced literal: not a constant here)
    return None
  if value.dtype == object or not np.all(np.isfinite(value)):
    return None
  return value


def _degrees(e, memo) -> frozenset:
  """The degrees of homogeneity node `e` has (empty: none decided)."""
  key = id(e)
  if key in memo:
    return memo[key]
  kind = e[0]
  if kind == "z":
    out = frozenset({1})
  elif kind == "lit":
    value = _literal(e[1])
    out = frozenset() if value is None else _ANY if not np.any(value) else frozenset({0})
  elif kind == "op":
    out = _op_degrees(e[1].name, dict(e[2]), [_degrees(a, memo) for a in e[3]], e[3])
  else:  # a location constant
    out = frozenset()
  memo[key] = out
  return out


def _op_degrees(name, params, args, nodes) -> frozenset:
  common = frozenset.intersection(*args) if args else frozenset()
  if name in _SAME_DEGREE:
    return common
  if name in _KEEP:
    return args[0]
  if name == "convert_element_type":
    # Float targets only: a conversion to an integer rounds (not homogeneous); a
    # predicate (bool, degree 0) converted to a float factor stays degree 0.
    return args[0] if np.issubdtype(params["new_dtype"], np.floating) else frozenset()
  if name == "mul":
    return frozenset(a + b for a in args[0] for b in args[1]) & _ANY
  if name == "div":
    value = _literal(nodes[1][1]) if nodes[1][0] == "lit" else None
    return args[0] if value is not None and np.all(value != 0) else frozenset()
  if name in _COMPARE:
    return frozenset({0}) if common else frozenset()
  if name in _LOGICAL:
    return frozenset({0}) if all(0 in a for a in args) else frozenset()
  if name == "select_n":
    cases = frozenset.intersection(*args[1:]) if len(args) > 1 else frozenset()
    return cases if 0 in args[0] else frozenset()
  return frozenset()


def _evaluate(e, z, dtype):
  """phi(z) in numpy for an expression `_degrees` accepted (float nodes in `dtype`)."""
  kind = e[0]
  if kind == "z":
    return z
  if kind == "lit":
    value = np.asarray(e[1])
    return value.astype(dtype) if np.issubdtype(value.dtype, np.floating) else value
  name, args = e[1].name, [_evaluate(a, z, dtype) for a in e[3]]
  if name in _SAME_DEGREE:
    return _SAME_DEGREE[name](*args).astype(dtype)
  if name in _KEEP:
    fn = _KEEP[name]
    return args[0] if fn is None else fn(args[0])
  if name == "convert_element_type":
    return np.asarray(args[0]).astype(dtype)
  if name in ("mul", "div"):
    a, b = (np.asarray(v).astype(dtype) for v in args)
    return (a * b if name == "mul" else a / b).astype(dtype)
  if name in _COMPARE:
    return _COMPARE[name](*args)
  if name in _LOGICAL:
    return _LOGICAL[name](*args)
  if name == "select_n":
    which, cases = np.asarray(args[0]), args[1:]
    return np.choose(which.astype(int), [np.asarray(c).astype(dtype) for c in cases])
  raise AssertionError(f"{name} is not a homogeneous step")  # excluded by _degrees
