"""Exact infinite-width NNGP and NTK kernels of unmodified Flax / Haiku models."""
