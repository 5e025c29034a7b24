"""Whole-dataset kernels, tile by tile, on every local device and every host (`im.batch`)."""

from infinite_modules.batching.batch import batch

__all__ = ["batch"]
