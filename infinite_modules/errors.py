"""Exceptions raised when a model has no exact infinite-width kernel."""

from __future__ import annotations


class InfiniteWidthError(ValueError):
  """The model (or an input) has no exact infinite-width kernel as traced.

  Raised instead of ever returning a kernel that might be wrong. The message
  names the primitive, the Flax/Haiku module path it came from (from the
  jaxpr's name stack) and a way out.
  """


class UnsupportedPrimitiveError(InfiniteWidthError):
  """A primitive has no kernel transfer rule for the abstract values it sees."""


class PriorError(InfiniteWidthError):
  """A parameter's initializer has no known exact prior."""


def unsupported(primitive: str, where: str, why: str, hint: str | None = None) -> UnsupportedPrimitiveError:
  """Builds the standard error for a primitive the interpreter cannot handle."""
  hint = hint or (
      "Register a rule with `infinite_modules.register_rule`, a module "
      "counterpart with `infinite_modules.register_module`, or use "
      "`interop.monte_carlo_kernel_fn` for a Monte Carlo estimate.")
  location = f" in module `{where}`" if where else ""
  return UnsupportedPrimitiveError(
      f"`{primitive}`{location}: {why} {hint}")


NOT_GAUSSIAN_WHY = (
    "a nonlinearity is applied to a field that is not Gaussian (e.g. the sum of a "
    "nonlinearity's output and another field, or a field plus a non-Gaussian bias), "
    "whose kernel depends on more than its covariance.")
NOT_GAUSSIAN_HINT = (
    "Apply a linear layer (Dense/Conv) before the nonlinearity, or use "
    "`interop.monte_carlo_kernel_fn` (for a non-Gaussian bias of a first Dense layer with "
    "a small fan-in: `im.kernel_fn(..., input_layer=\"exact\")`).")
