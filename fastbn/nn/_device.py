"""Array modules for the trainer's devices: NumPy on the CPU, CuPy (imported lazily) on a GPU."""

import numpy as np

from .._install import install_hint

DEVICES = ("cpu", "cuda")


def array_module(device="cpu"):
    """The array module that holds a model's arrays on ``device``.

    Parameters
    ----------
    device : {"cpu", "cuda"}, default "cpu"
        ``"cpu"``: NumPy (matrix products on the CPU BLAS, the rest on fastbn's Numba
        kernels). ``"cuda"``: CuPy (matrix products on cuBLAS, BatchNorm on fastbn's CUDA
        kernels).

    Returns
    -------
    module
        :mod:`numpy` or :mod:`cupy`.

    Raises
    ------
    ValueError
        Unknown device.
    RuntimeError
        ``"cuda"`` without CuPy installed or without a usable GPU; the message says how to
        get them.

    Examples
    --------
    >>> array_module("cpu").__name__
    'numpy'
    """
    if device == "cpu":
        return np
    if device != "cuda":
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError(
            "device='cuda' needs CuPy for the matrix products and numba-cuda for the "
            f"BatchNorm kernels: {install_hint('cuda')} (CuPy for CUDA 12), "
            f"or use device='cpu' ({exc})"
        ) from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError without a driver, or no GPU at all
        raise RuntimeError(
            f"device='cuda': CuPy is installed but no CUDA GPU is usable ({exc}); use device='cpu'"
        ) from exc
    if count < 1:
        raise RuntimeError("device='cuda': no CUDA GPU found; use device='cpu'")
    return cupy


def module_of(a):
    """The array module of an array: NumPy for host arrays, CuPy for CuPy arrays.

    Parameters
    ----------
    a : array

    Returns
    -------
    module

    Examples
    --------
    >>> module_of(np.zeros(2)).__name__
    'numpy'
    """
    if isinstance(a, np.ndarray):
        return np
    import cupy

    return cupy.get_array_module(a)


def to_host(a):
    """A NumPy copy (or view, for host arrays) of a NumPy or CuPy array.

    Parameters
    ----------
    a : array

    Returns
    -------
    numpy.ndarray

    Examples
    --------
    >>> to_host(np.arange(3))
    array([0, 1, 2])
    """
    if isinstance(a, np.ndarray):
        return a
    return a.get()
