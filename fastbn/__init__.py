"""fastbn: Numba-compiled Batch Normalization kernels under a NumPy-style API.

Public names::

    batch_norm_forward, batch_norm_backward, batch_norm_inference, batch_norm,
    BatchNorm, cuda_available, precompile
"""

from . import _config  # noqa: F401  (sets the thread-safe threading layer first)
from ._precompile import precompile
from .api import batch_norm, batch_norm_backward, batch_norm_forward, batch_norm_inference
from .layer import BatchNorm

__version__ = "0.1.0"


def cuda_available():
    """True when a CUDA GPU (or Numba's CUDA simulator) can run fastbn's GPU kernels.

    Never raises: without numba-cuda or a GPU it returns False.

    Examples
    --------
    >>> import fastbn
    >>> isinstance(fastbn.cuda_available(), bool)
    True
    """
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:  # no numba-cuda, no driver: no GPU
        return False


__all__ = [
    "batch_norm_forward",
    "batch_norm_backward",
    "batch_norm_inference",
    "batch_norm",
    "BatchNorm",
    "cuda_available",
    "precompile",
    "__version__",
]
