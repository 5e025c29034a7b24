"""Finite-width tools on Flax / Haiku params: empirical kernels, linearization, training."""

from interop.adapters import ModelAdapter as ModelAdapter
from interop.adapters import adapt as adapt
from interop.adapters import nnx_factory as nnx_factory
from interop.compare import Comparison as Comparison
from interop.compare import WidthSweep as WidthSweep
from interop.compare import compare_widths as compare_widths
from interop.empirical import NtkImplementation as NtkImplementation
from interop.empirical import empirical_kernel_fn as empirical_kernel_fn
from interop.empirical import empirical_nngp_fn as empirical_nngp_fn
from interop.empirical import empirical_ntk_fn as empirical_ntk_fn
from interop.empirical import empirical_ntk_vp_fn as empirical_ntk_vp_fn
from interop.empirical import structure_report as structure_report
from interop.monte_carlo import monte_carlo_kernel_fn as monte_carlo_kernel_fn
from interop.ntk_layers import NTKConv as NTKConv
from interop.ntk_layers import NTKDense as NTKDense
from interop.taylor import linearize as linearize
from interop.taylor import taylor_expand as taylor_expand
from interop.training import TrainResult as TrainResult
from interop.training import accuracy as accuracy
from interop.training import cross_entropy_loss as cross_entropy_loss
from interop.training import init_ensemble as init_ensemble
from interop.training import mse_loss as mse_loss
from interop.training import train as train
from interop.training import train_ensemble as train_ensemble
