"""Kernel transfer rules, grouped by family. Importing registers them."""

from infinite_modules.rules import control, elementwise, embedding, linear, structural  # noqa: F401
from infinite_modules.rules import pooling_max  # noqa: F401  (after structural)
