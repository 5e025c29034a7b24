"""Exact infinite-width NNGP and NTK kernels of unmodified Flax / Haiku models.

    import infinite_modules as im
    kernel_fn = im.kernel_fn(model, x_example, parameterization="ntk")
    ntk = kernel_fn(x1, x2, get="ntk")
"""

from infinite_modules import predict
from infinite_modules.api import KernelFn, kernel_fn
from infinite_modules.batching import batch
from infinite_modules.errors import InfiniteWidthError, PriorError, UnsupportedPrimitiveError
from infinite_modules.haiku_state import HaikuWithState, haiku_eval_state
from infinite_modules.interpreter import register_rule
from infinite_modules.kernel import Estimate, EstimatedKernelWarning, Kernel
from infinite_modules.models import record_nnx_initializers
from infinite_modules.modules import LayerKernel, register_module
from infinite_modules.priors import Prior, prior_from_initializer

__all__ = [
    "Estimate",
    "EstimatedKernelWarning",
    "HaikuWithState",
    "InfiniteWidthError",
    "Kernel",
    "KernelFn",
    "LayerKernel",
    "Prior",
    "PriorError",
    "UnsupportedPrimitiveError",
    "batch",
    "haiku_eval_state",
    "kernel_fn",
    "predict",
    "prior_from_initializer",
    "record_nnx_initializers",
    "register_module",
    "register_rule",
]
