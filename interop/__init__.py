"""Finite-width tools on Flax / Haiku params: empirical kernels, linearization, training."""
