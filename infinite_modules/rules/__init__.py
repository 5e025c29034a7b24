"""Kernel transfer rules, grouped by family. Importing registers them."""

from infinite_modules.rules import elementwise, embedding, linear, structural  # noqa: F401
