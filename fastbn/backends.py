"""Backend selection: the CPU backend for host arrays, the CUDA backend for GPU arrays.

Each backend implements the same operations (see docs/architecture.md):
:mod:`fastbn._cpu_backend` and :mod:`fastbn.cuda`. The CUDA one is imported on first
use, so ``import fastbn`` never needs numba-cuda.
"""

import numpy as np

from . import _checks, _cpu_backend

cpu = _cpu_backend


def cuda():
    """The CUDA backend, :mod:`fastbn.cuda` (imported on first use)."""
    from . import cuda as backend

    return backend


def backend_for(names, *arrays):
    """The backend of the array arguments (None ones ignored).

    Parameters
    ----------
    names : tuple of str
        The arguments' names, for the error message.
    *arrays : array or None
        The array arguments, in the order of ``names``.

    Raises
    ------
    TypeError
        Host and device arrays are mixed in one call.

    Examples
    --------
    >>> backend_for(("x",), np.zeros(3)).NAME
    'cpu'
    """
    for a in arrays:  # the common case, NumPy arrays, is decided in this loop
        if a is not None and type(a) is not np.ndarray:
            break
    else:
        return cpu
    named = [(name, a) for name, a in zip(names, arrays) if a is not None]
    on_device = [name for name, a in named if _checks.is_cuda_array(a)]
    if not on_device:
        return cpu
    if len(on_device) != len(named):
        on_host = [name for name, a in named if not _checks.is_cuda_array(a)]
        raise TypeError(
            f"arguments must all be CUDA arrays or all host arrays: "
            f"{', '.join(on_device)} on the GPU, {', '.join(on_host)} on the host"
        )
    return cuda()


def backend_of(a):
    """The backend of one array."""
    return cuda() if _checks.is_cuda_array(a) else cpu
