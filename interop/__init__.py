"""Finite-width tools on Flax / Haiku params: empirical kernels, linearization, training."""

from interop.adapters import ModelAdapter as ModelAdapter
from interop.adapters import adapt as adapt
from interop.adapters import nnx_factory as nnx_factory
from interop.empirical import NtkImplementation as NtkImplementation
from interop.empirical import empirical_kernel_fn as empirical_kernel_fn
from interop.empirical import empirical_nngp_fn as empirical_nngp_fn
from interop.empirical import empirical_ntk_fn as empirical_ntk_fn
from interop.empirical import empirical_ntk_vp_fn as empirical_ntk_vp_fn
from interop.empirical import structure_report as structure_report
from interop.monte_carlo import monte_carlo_kernel_fn as monte_carlo_kernel_fn
from interop.taylor import linearize as linearize
from interop.taylor import taylor_expand as taylor_expand
