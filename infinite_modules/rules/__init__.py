"""Kernel transfer rules, grouped by family. Importing registers them."""

from infinite_modules.rules import (  # noqa: F401
    control,
    elementwise,
    embedding,
    linear,
    pooling_max,
    products,
    splits,
    structural,
)
