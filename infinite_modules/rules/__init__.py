"""Kernel transfer rules, grouped by family. Importing registers them."""

from infinite_modules.rules import control, elementwise, embedding, linear, structural  # noqa: F401
