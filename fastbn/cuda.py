"""The CUDA backend: the host side of the ``numba.cuda`` kernels.

:func:`fastbn.backends.backend_for` picks this backend when the arrays of a call carry
``__cuda_array_interface__`` (Numba device arrays, CuPy arrays, PyTorch CUDA tensors);
the shared operations of :mod:`fastbn._ops` then call its backend operations (the same
names as :mod:`fastbn._cpu_backend`). Here: array interop, devices and streams, memory,
launch configuration and the kernel launches. This module is imported lazily:
``import fastbn`` never needs a GPU or numba-cuda.

What happens in a call
----------------------
1. The public functions check every argument (shape, dtype, axis, eps, momentum, ``out``)
   with the helpers of :mod:`fastbn._checks` *before* any kernel is launched or anything
   is written.
2. The input is seen as the canonical ``(outer, C, inner)`` view, as on the CPU: a
   permutation of a contiguous block (C order, Fortran order, NHWC, transposes) is viewed
   without a copy; any other strided array is gathered once into a contiguous copy.
3. Kernels of :mod:`fastbn._cuda_kernels` run on the caller's stream: two launches per
   training forward (statistics partials; merge + normalize + running-statistics update),
   one for inference, two for the backward. The launch configuration is a cached function
   of the shape.
4. Results come back as the same kind of array as the input (Numba, CuPy or PyTorch), in
   the input's memory layout; statistics (``mean``, ``invstd``, ``dgamma``, ``dbeta``)
   too, on the device.

Nothing here synchronizes the host with the GPU, except where documented:
:func:`check_nonfinite`, :func:`nonfinite_count`, :func:`to_host`, :func:`copy_into` from
host memory, and every training call when ``FASTBN_CUDA_SYNC_NONFINITE=1``.

Non-finite batch statistics
---------------------------
The running statistics never take in NaN or inf: the device checks every channel's
batch mean and variance before the update and, if any is not finite, updates no channel
and counts the batch in a per-device counter. Raising at once would need a host
synchronization in every training call, so by default the report is deferred:
:func:`check_nonfinite` raises ``FloatingPointError`` (for calls made with
``on_nonfinite="raise"``, the default) or warns (``"warn"``). With
``FASTBN_CUDA_SYNC_NONFINITE=1`` (``fastbn._config.CUDA_SYNC_NONFINITE``) every such call
synchronizes its stream and reports at once, as the CPU path does.
"""

import contextlib
import functools
import math
import threading
import types
import warnings
from typing import NamedTuple

import numpy as np

try:
    from numba import cuda as _nbcuda
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "fastbn's GPU path needs numba-cuda: pip install 'fastbn[cuda]' (or pip install numba-cuda)"
    ) from exc

from . import _checks, _config
from . import _cuda_kernels as _kernels

SIMULATOR = _kernels.SIMULATOR

__all__ = [
    "as_device",
    "check_nonfinite",
    "copy_into",
    "launch_config",
    "nonfinite_count",
    "shard_grad_sums",
    "shard_moments",
    "to_device",
    "to_host",
]

NAME = "cuda"
DEFERRED_NONFINITE = True  # the device updates and counts; check_nonfinite reports


# --------------------------------------------------------------------------------------
# The simulator's device arrays
# --------------------------------------------------------------------------------------

if SIMULATOR:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray as _FakeCUDAArray

    def _simulated_interface(self):
        """``__cuda_array_interface__`` of a simulator array (its memory is host memory)."""
        a = self._ary
        return {
            "shape": tuple(a.shape),
            "strides": None if a.flags.c_contiguous else tuple(a.strides),
            "typestr": a.dtype.str,
            "data": (a.ctypes.data if a.size else 0, not a.flags.writeable),
            "version": 3,
            "stream": None,
        }

    # Numba's simulator arrays lack the interface that real device arrays have, so that
    # fastbn.api would take them for host arrays. Give them one: in the simulator, device
    # memory is host memory, and the pointer is a host pointer.
    if not hasattr(_FakeCUDAArray, "__cuda_array_interface__"):
        _FakeCUDAArray.__cuda_array_interface__ = property(_simulated_interface)


class _HostInterface:
    """An ``__array_interface__`` holder (simulator: a device pointer is a host pointer)."""

    def __init__(self, desc, owner):
        self.__array_interface__ = {
            "shape": tuple(desc["shape"]),
            "strides": desc.get("strides"),
            "typestr": desc["typestr"],
            "data": (desc["data"][0], False),
            "version": 3,
        }
        self.owner = owner


def _from_interface(desc, owner):
    """A Numba device array over the memory that ``desc`` describes; keeps ``owner`` alive.

    Never synchronizes (``sync=False``): fastbn launches on the caller's stream, which
    orders its work after whatever produced the array.
    """
    if SIMULATOR:
        shape = tuple(desc["shape"])
        if math.prod(shape) == 0:
            return _nbcuda.device_array(shape, np.dtype(desc["typestr"]))
        return _FakeCUDAArray(np.asarray(_HostInterface(desc, owner)))
    return _nbcuda.from_cuda_array_interface(desc, owner=owner, sync=False)


# --------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------


class _Arg:
    """A CUDA array argument: its interface, shape, dtype, kind and Numba view.

    Exposes ``shape``, ``dtype``, ``ndim`` and ``flags.writeable`` so that the checks of
    :mod:`fastbn._checks` apply unchanged.

    Parameters
    ----------
    obj : object with ``__cuda_array_interface__``
    name : str
        Argument name for messages.
    """

    def __init__(self, obj, name):
        desc = getattr(obj, "__cuda_array_interface__", None)
        if desc is None:
            raise TypeError(
                f"{name} must be a CUDA array (Numba, CuPy or PyTorch), got {type(obj).__name__}"
            )
        self.obj = obj
        self.name = name
        self.desc = desc
        self.shape = tuple(int(n) for n in desc["shape"])
        self.dtype = np.dtype(desc["typestr"])
        self.ndim = len(self.shape)
        self.size = math.prod(self.shape)
        self.flags = types.SimpleNamespace(writeable=not desc["data"][1])
        self.kind = _kind(obj)
        self._dev = None
        if not self.dtype.isnative:
            # the kernels read native floats; CuPy and PyTorch have no other byte order
            raise TypeError(
                f"{name} must be in native byte order on the GPU, got dtype "
                f"{self.dtype.str!r}: convert it with "
                f"a.view(a.dtype.newbyteorder()).byteswap() (or on the host)"
            )
        if any(s % self.dtype.itemsize for s in self.strides):
            raise ValueError(
                f"{name} has strides {self.strides} that are not multiples of "
                f"its item size {self.dtype.itemsize}"
            )

    @property
    def ptr(self):
        return int(self.desc["data"][0] or 0)

    @property
    def strides(self):
        """Strides in bytes (C-contiguous ones when the interface gives None)."""
        strides = self.desc.get("strides")
        if strides is not None:
            return tuple(int(s) for s in strides)
        return _c_strides(self.shape, self.dtype.itemsize)

    @property
    def dev(self):
        """The argument as a Numba device array (a view, no copy)."""
        if self._dev is None:
            if SIMULATOR and isinstance(self.obj, _FakeCUDAArray):
                self._dev = self.obj
            else:
                self._dev = _from_interface(self.desc, self.obj)
        return self._dev

    def view(self, shape, strides=None, offset=0):
        """A Numba view of this argument's memory with another shape/strides (bytes)."""
        desc = {
            "shape": tuple(shape),
            "strides": strides,
            "typestr": self.desc["typestr"],
            "data": (self.ptr + offset, False),
            "version": 3,
        }
        return _from_interface(desc, self.obj)


def _kind(obj):
    """``"torch"``, ``"cupy"`` or ``"numba"`` (anything else with the interface)."""
    module = type(obj).__module__.split(".")[0]
    return module if module in ("torch", "cupy") else "numba"


def _c_strides(shape, itemsize):
    strides = []
    step = itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _require_gpu():
    """Raise a clear error when no CUDA GPU (nor the simulator) is available."""
    try:
        available = _nbcuda.is_available()
    except Exception:  # noqa: BLE001 - a broken driver is "no GPU" too
        available = False
    if not available:
        raise RuntimeError(
            "no CUDA GPU is available (numba.cuda.is_available() is False); "
            "use NumPy arrays for the CPU kernels, or set "
            "NUMBA_ENABLE_CUDASIM=1 for Numba's (slow) CUDA simulator"
        )


# --------------------------------------------------------------------------------------
# Devices, streams, memory
# --------------------------------------------------------------------------------------


def _device_index(arg):
    """The GPU of a CuPy/PyTorch array, or None (Numba arrays: the current device)."""
    if arg.kind == "torch":
        return arg.obj.device.index
    if arg.kind == "cupy":
        return arg.obj.device.id
    return None


def _device_context(arg):
    """Make the array's GPU Numba's current device for the duration of a call."""
    if SIMULATOR:
        return contextlib.nullcontext()
    index = _device_index(arg)
    if index is None or index == _nbcuda.get_current_device().id:
        return contextlib.nullcontext()
    return _nbcuda.gpus[index]


def _device_key():
    return 0 if SIMULATOR else _nbcuda.get_current_device().id


def _external(handle):
    handle = int(handle)
    if SIMULATOR:
        return _nbcuda.default_stream(), 0
    if handle == 0:
        return _nbcuda.default_stream(), 0
    return _nbcuda.external_stream(handle), handle


def _resolve_stream(stream, arg):
    """The Numba stream to launch on, and a hashable key for it.

    ``stream`` may be a Numba stream, a ``torch.cuda.Stream``, a ``cupy.cuda.Stream`` or
    a raw ``cudaStream_t`` handle (int). None means the current stream of the array's
    library (PyTorch's or CuPy's current stream; Numba's default stream).
    """
    if stream is None:
        if SIMULATOR or arg is None or arg.kind == "numba":
            return _nbcuda.default_stream(), 0
        if arg.kind == "torch":
            import torch

            return _external(torch.cuda.current_stream(arg.obj.device).cuda_stream)
        import cupy

        return _external(cupy.cuda.get_current_stream().ptr)
    if hasattr(stream, "cuda_stream"):  # torch.cuda.Stream
        return _external(stream.cuda_stream)
    if hasattr(stream, "ptr"):  # cupy.cuda.Stream
        return _external(stream.ptr)
    if isinstance(stream, (int, np.integer)) and not isinstance(stream, bool):
        return _external(stream)
    if hasattr(stream, "synchronize"):  # a Numba stream
        handle = getattr(stream, "handle", None)
        for convert in (int, lambda h: h.value):
            try:
                return stream, int(convert(handle))
            except (TypeError, ValueError, AttributeError):
                pass
        return stream, id(stream)
    if hasattr(stream, "__cuda_stream__"):  # the CUDA stream protocol of other libraries
        return _external(stream.__cuda_stream__()[1])
    raise TypeError(
        f"stream must be a Numba, CuPy or PyTorch CUDA stream or an int "
        f"handle, got {type(stream).__name__}"
    )


_TORCH_DTYPES = {}


def _empty(kind, like, shape, dtype, stream):
    """A new C-contiguous device array of the given kind, on ``like``'s device.

    CuPy and PyTorch arrays come from their own (stream-ordered, pooled) allocators;
    Numba arrays from Numba's memory manager.
    """
    dtype = np.dtype(dtype)
    if kind == "torch":
        import torch

        if not _TORCH_DTYPES:
            _TORCH_DTYPES.update(
                {
                    np.dtype(np.float16): torch.float16,
                    np.dtype(np.float32): torch.float32,
                    np.dtype(np.float64): torch.float64,
                    np.dtype(np.int32): torch.int32,
                }
            )
        return torch.empty(tuple(shape), dtype=_TORCH_DTYPES[dtype], device=like.device)
    if kind == "cupy":
        import cupy

        with cupy.cuda.Device(like.device.id):
            return cupy.empty(tuple(shape), dtype)
    return _nbcuda.device_array(tuple(shape), dtype, stream=stream)


_local = threading.local()
_counter_lock = threading.Lock()
_nonfinite_counters = {}
_dummies = {}


def _workspace(key, n_values, stream):
    """Per-(device, stream, Python thread) float64 scratch and the update ticket.

    Reused across calls: work on one stream is ordered, and each Python thread has its
    own, so concurrent calls never share one. Grows (one allocation) when too small.
    """
    cache = getattr(_local, "workspaces", None)
    if cache is None:
        cache = _local.workspaces = {}
    entry = cache.get(key)
    if entry is None or entry[0].shape[0] < n_values:
        size = max(n_values, 2 * entry[0].shape[0] if entry else 0, 256)
        ticket = entry[1] if entry else _nbcuda.device_array(1, np.int32, stream=stream)
        entry = cache[key] = (_nbcuda.device_array(size, np.float64, stream=stream), ticket)
    return entry[0][:n_values], entry[1]


def _nonfinite_counter(device_key):
    """The device's counters of skipped updates: ``[raise-mode calls, warn-mode calls]``."""
    counter = _nonfinite_counters.get(device_key)
    if counter is None:
        with _counter_lock:
            counter = _nonfinite_counters.get(device_key)
            if counter is None:
                counter = _nonfinite_counters[device_key] = _nbcuda.to_device(np.zeros(2, np.int32))
    return counter


def _dummy(device_key):
    """A 1-element float64 device array standing in for absent optional arrays."""
    dummy = _dummies.get(device_key)
    if dummy is None:
        dummy = _dummies[device_key] = _nbcuda.device_array(1, np.float64)
    return dummy


# --------------------------------------------------------------------------------------
# Launch configuration and launches
# --------------------------------------------------------------------------------------


class LaunchConfig(NamedTuple):
    """One partition of ``(outer, C, inner)`` shared by every kernel of an operation.

    Attributes
    ----------
    width : int
        1 (strided family) or the rows family's tile width (channels per block).
    nblk : int
        Blocks (chunks) per channel or tile.
    chunk : int
        Values (strided) or rows (rows) per chunk.
    grid : int
        Blocks per launch.
    threads : int
        Threads per block.
    """

    width: int
    nblk: int
    chunk: int
    grid: int
    threads: int


@functools.lru_cache(maxsize=1024)
def launch_config(shape3, dtype, device_key=0):
    """The launch configuration of ``(outer, C, inner)`` data, computed once per shape.

    About ``_config.CUDA_TARGET_BLOCKS`` blocks, at least
    ``_config.CUDA_MIN_VALUES_PER_THREAD`` values per thread, at most
    ``_config.CUDA_MAX_PARTIALS`` chunks per channel. A function of the shape only, so
    results are reproducible bit for bit.

    Parameters
    ----------
    shape3 : tuple of int
        ``(outer, C, inner)``.
    dtype : str
        The data's dtype (part of the cache key).
    device_key : int, optional
        The device (part of the cache key).

    Returns
    -------
    LaunchConfig

    Examples
    --------
    >>> cfg = launch_config((64, 3, 100), "<f4")
    >>> cfg.width, cfg.grid == 3 * cfg.nblk
    (1, True)
    """
    outer, C, inner = shape3
    T = _kernels.THREADS
    per_thread = _config.CUDA_MIN_VALUES_PER_THREAD
    if inner > 1:
        m = outer * inner
        nblk = max(
            1,
            min(
                -(-_config.CUDA_TARGET_BLOCKS // C),
                -(-m // (T * per_thread)),
                _config.CUDA_MAX_PARTIALS,
            ),
        )
        chunk = max(1, -(-m // nblk))
        nblk = max(1, -(-m // chunk))
        return LaunchConfig(1, nblk, chunk, C * nblk, T)
    width = 1
    while width < min(C, 32):
        width *= 2
    tiles = -(-C // width)
    rows_per_pass = T // width
    nblk = max(
        1,
        min(
            -(-_config.CUDA_TARGET_BLOCKS // tiles),
            -(-outer // (rows_per_pass * per_thread)),
            _config.CUDA_MAX_PARTIALS,
        ),
    )
    chunk = max(1, -(-outer // nblk))
    nblk = max(1, -(-outer // chunk))
    return LaunchConfig(width, nblk, chunk, tiles * nblk, T)


def _launch(kernel, grid, threads, stream, *args):
    """Launch ``kernel`` (the one place where fastbn launches GPU work)."""
    kernel[grid, threads, stream](*args)


def _copy_grid(n):
    return max(1, min(-(-n // _kernels.THREADS), _config.CUDA_TARGET_BLOCKS))


def _compute_dtype(dtype):
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


# --------------------------------------------------------------------------------------
# The canonical view and outputs
# --------------------------------------------------------------------------------------


class _View(NamedTuple):
    """``x3`` (Numba, C-contiguous ``(outer, C, inner)``), the memory order, its shape."""

    x3: object
    order: tuple
    shape_t: tuple
    span: tuple  # (pointer, bytes) of the memory x3 reads


def _contiguous_in_order(shape, strides, itemsize, order):
    """True when the array transposed by ``order`` is C-contiguous (size-1 axes ignored)."""
    step = itemsize
    for d in reversed(order):
        if shape[d] > 1:
            if strides[d] != step:
                return False
            step *= shape[d]
    return True


def _memory_order(arg):
    """Axes from the slowest to the fastest, or None when no permutation is contiguous."""
    shape, strides, itemsize = arg.shape, arg.strides, arg.dtype.itemsize
    identity = tuple(range(arg.ndim))
    if _contiguous_in_order(shape, strides, itemsize, identity):
        return identity
    if _contiguous_in_order(shape, strides, itemsize, identity[::-1]):
        return identity[::-1]
    order = tuple(sorted(identity, key=lambda d: -strides[d]))
    return order if _contiguous_in_order(shape, strides, itemsize, order) else None


def _span(arg):
    """A 1-D Numba view of all the memory a strided array touches.

    Returns
    -------
    tuple
        ``(view, offset, strides)``: element ``index`` of the array is
        ``view[offset + sum(index * strides)]`` (strides in elements).
    """
    itemsize = arg.dtype.itemsize  # strides are multiples of it (checked by _Arg)
    lo = sum(min(0, s * (n - 1)) for s, n in zip(arg.strides, arg.shape))
    hi = sum(max(0, s * (n - 1)) for s, n in zip(arg.strides, arg.shape))
    view = arg.view(((hi - lo) // itemsize + 1,), None, offset=lo)
    return view, -lo // itemsize, tuple(s // itemsize for s in arg.strides)


def _gather(arg, order, stream):
    """Copy ``arg`` into a new C-contiguous array laid out as ``arg.transpose(order)``."""
    shape_t = tuple(arg.shape[d] for d in order)
    buf = _Arg(_empty(arg.kind, arg.obj, shape_t, arg.dtype, stream), arg.name)
    src, offset, strides = _span(arg)
    n = arg.size
    _launch(
        _kernels.gather,
        _copy_grid(n),
        _kernels.THREADS,
        stream,
        src,
        buf.view((n,)),
        shape_t,
        tuple(strides[d] for d in order),
        offset,
    )
    return buf


def _canonical(arg, axis, stream, order=None):
    """The canonical view of ``arg`` (copied once when no permutation is contiguous).

    With ``order`` (another array's memory order), ``arg`` is viewed in that order,
    copied into it when it does not match.
    """
    if order is None:
        order = _memory_order(arg)
        if order is None:
            order = tuple(range(arg.ndim))
    shape_t = tuple(arg.shape[d] for d in order)
    p = order.index(axis)
    shape3 = (math.prod(shape_t[:p]), shape_t[p], math.prod(shape_t[p + 1 :]))
    nbytes = arg.size * arg.dtype.itemsize
    if _contiguous_in_order(arg.shape, arg.strides, arg.dtype.itemsize, order):
        return _View(arg.view(shape3), order, shape_t, (arg.ptr, nbytes))
    buf = _gather(arg, order, stream)
    return _View(buf.view(shape3), order, shape_t, (0, 0))


class _Output:
    """Where a kernel writes an x-shaped result, and how the caller receives it.

    The kernels write into ``y3``, a C-contiguous ``(outer, C, inner)`` Numba array of
    the data's dtype. That is ``out`` itself when its layout matches the input's and it
    does not partially overlap an input; otherwise a temporary that :meth:`finish` scatters
    into ``out`` (one more launch). Without ``out``, a new array of the input's kind and
    memory layout.
    """

    def __init__(self, out, view, like, dtype, stream, inputs=()):
        self.out = out
        self.view = view
        self.stream = stream
        self.result = None
        shape3 = view.x3.shape
        if out is not None:
            y3 = self._direct(out, view, inputs)
            self.direct = y3 is not None
            if not self.direct:  # a temporary of the input's kind (its pool, not cudaMalloc)
                y3 = _Arg(_empty(like.kind, like.obj, shape3, dtype, stream), "y").view(shape3)
            self.y3 = y3
            return
        self.direct = True
        buf = _empty(like.kind, like.obj, view.shape_t, dtype, stream)
        buf_arg = _Arg(buf, "y")
        self.y3 = buf_arg.view(shape3)
        inverse = tuple(int(a) for a in np.argsort(view.order))
        if view.order == tuple(range(len(view.order))):
            self.result = buf
        elif like.kind == "torch":
            self.result = buf.permute(*inverse)
        elif like.kind == "cupy":
            self.result = buf.transpose(inverse)
        else:
            strides = buf_arg.strides
            self.result = buf_arg.view(
                tuple(view.shape_t[a] for a in inverse), tuple(strides[a] for a in inverse)
            )

    @staticmethod
    def _direct(out, view, inputs):
        """``out`` as the kernel's ``(outer, C, inner)`` view, or None."""
        itemsize = out.dtype.itemsize
        if not _contiguous_in_order(out.shape, out.strides, itemsize, view.order):
            return None
        start, nbytes = out.ptr, out.size * itemsize
        for ptr, size in (view.span,) + tuple(inputs):
            if size and ptr < start + nbytes and start < ptr + size and ptr != start:
                return None
        return out.view(view.x3.shape)

    def finish(self):
        """The result as the caller sees it (``out`` when one was given)."""
        if self.out is None:
            return self.result
        if not self.direct:
            dst, offset, strides = _span(self.out)
            n = self.out.size
            _launch(
                _kernels.scatter,
                _copy_grid(n),
                _kernels.THREADS,
                self.stream,
                self.y3.reshape(n),
                dst,
                self.view.shape_t,
                tuple(strides[d] for d in self.view.order),
                offset,
            )
        return self.out.obj


def _stats_output(like, C, dtype, stream):
    """A ``(C,)`` statistics array of the input's kind: ``(native, numba view)``."""
    native = _empty(like.kind, like.obj, (C,), dtype, stream)
    return native, _Arg(native, "stat").dev


def _dev(arg, device_key):
    """The Numba view of an optional argument, and whether it was given."""
    if arg is None:
        return _dummy(device_key), False
    return arg.dev, True


def _params(gamma, beta, relu, device_key):
    """``(gamma, has_gamma, beta, has_beta, relu)``: the arguments every statistics kernel
    takes in this order (:func:`_dev` views)."""
    return (*_dev(gamma, device_key), *_dev(beta, device_key), bool(relu))


# --------------------------------------------------------------------------------------
# Operations on checked arguments
# --------------------------------------------------------------------------------------


def _setup(x, view):
    """``(device_key, x3, launch config, kernels)`` of an operation on ``view``."""
    device_key = _device_key()
    x3 = view.x3
    cfg = launch_config(x3.shape, x.dtype.str, device_key)
    return device_key, x3, cfg, _kernels.build(_compute_dtype(x.dtype))


def _moment_partials(x3, cfg, kernels, work_key, extra, stream):
    """Launch 1 of the forward: ``(work, part, ticket)``, ``part`` the ``(3, C, nblk)``
    partials at the start of the workspace (``extra`` more values after them)."""
    C = x3.shape[1]
    n_part = 3 * C * cfg.nblk
    work, ticket = _workspace(work_key, n_part + extra, stream)
    part = work[:n_part].reshape(3, C, cfg.nblk)
    _launch(
        kernels.forward_partials,
        cfg.grid,
        cfg.threads,
        stream,
        x3,
        cfg.width,
        cfg.nblk,
        cfg.chunk,
        part,
        ticket,
    )
    return work, part, ticket


def _forward_training(
    x, view, y3, gamma, beta, eps, relu, mean_out, invstd_out, stream, stream_key, running=None
):
    """Two launches: statistics partials, then merge + normalize (+ running update).

    Parameters
    ----------
    x : _Arg
    view : _View
    y3 : Numba array, shape (outer, C, inner)
    gamma, beta : _Arg or None
    eps : float
    relu : bool
    mean_out, invstd_out : Numba arrays of shape (C,) or None
    stream, stream_key
        From :func:`_resolve_stream`.
    running : tuple, optional
        ``(running_mean, running_var, factor, correction, mode)`` to update the running
        statistics on the device (mode 0: on_nonfinite="raise", 1: "warn").
    """
    device_key, x3, cfg, kernels = _setup(x, view)
    C = x3.shape[1]
    n_part = 3 * C * cfg.nblk
    work, part, ticket = _moment_partials(x3, cfg, kernels, (device_key, stream_key), 2 * C, stream)
    stats = work[n_part : n_part + 2 * C].reshape(2, C)
    dummy = _dummy(device_key)
    write_stats = mean_out is not None
    if running is None:
        update, rm, rv, factor, correction, mode = False, dummy, dummy, 0.0, 1.0, 0
        limit_mean = limit_var = math.inf
    else:
        rm_arg, rv_arg, factor, correction, mode, (limit_mean, limit_var) = running
        update, rm, rv = True, rm_arg.dev, rv_arg.dev
    _launch(
        kernels.forward_apply,
        cfg.grid,
        cfg.threads,
        stream,
        x3,
        y3,
        cfg.width,
        cfg.nblk,
        cfg.chunk,
        part,
        float(eps),
        *_params(gamma, beta, relu, device_key),
        mean_out if write_stats else dummy,
        invstd_out if write_stats else dummy,
        write_stats,
        stats,
        update,
        rm,
        rv,
        float(factor),
        float(correction),
        limit_mean,
        limit_var,
        ticket,
        _nonfinite_counter(device_key),
        mode,
    )


def _inference(x, view, y3, running_mean, running_var, gamma, beta, eps, relu, stream):
    """One launch: ``y`` from the given statistics."""
    device_key, x3, cfg, kernels = _setup(x, view)
    _launch(
        kernels.inference,
        cfg.grid,
        cfg.threads,
        stream,
        x3,
        y3,
        cfg.width,
        cfg.nblk,
        cfg.chunk,
        running_mean.dev,
        running_var.dev,
        float(eps),
        *_params(gamma, beta, relu, device_key),
    )


def _residual(x, view, a3, z3, out3, mean, spread, is_var, gamma, beta, eps, relu, grad, stream):
    """One launch of the residual kernel (see :func:`fastbn._cuda_kernels._residual_kernel`)."""
    device_key, x3, cfg, kernels = _setup(x, view)
    _launch(
        kernels.residual,
        cfg.grid,
        cfg.threads,
        stream,
        a3,
        x3,
        z3,
        out3,
        cfg.width,
        cfg.nblk,
        cfg.chunk,
        mean,
        spread,
        bool(is_var),
        float(eps),
        *_params(gamma, beta, relu, device_key),
        bool(grad),
    )


def _backward(
    x,
    view,
    dy3,
    dx3,
    mean,
    invstd,
    gamma,
    beta,
    relu,
    dgamma_out,
    dbeta_out,
    stream,
    stream_key,
    sums=None,
    count=None,
):
    """Two launches: partial sums, then merge + dx (+ dgamma/dbeta).

    With ``sums`` (float64 device array ``(2, C, 1)``: ``sum dy`` and
    ``sum dy * (x - mean)`` already reduced elsewhere, e.g. over every rank) and ``count``
    (the values per channel they cover), one launch: dx (+ dgamma/dbeta) from them.
    """
    device_key, x3, cfg, kernels = _setup(x, view)
    outer, _, inner = x3.shape
    if sums is None:
        part = _backward_partials(x, view, dy3, mean, invstd, gamma, beta, relu, stream, stream_key)
        npart, count = cfg.nblk, outer * inner
    else:
        part, npart = sums, 1
    dummy = _dummy(device_key)
    _launch(
        kernels.backward_apply,
        cfg.grid,
        cfg.threads,
        stream,
        dy3,
        x3,
        dx3,
        cfg.width,
        cfg.nblk,
        cfg.chunk,
        part,
        npart,
        float(count),
        mean.dev,
        invstd.dev,
        *_params(gamma, beta, relu, device_key),
        dummy if dgamma_out is None else dgamma_out,
        dgamma_out is not None,
        dummy if dbeta_out is None else dbeta_out,
        dbeta_out is not None,
    )


def _backward_partials(x, view, dy3, mean, invstd, gamma, beta, relu, stream, stream_key):
    """Launch 1 of the backward: per-(channel, chunk) sums into the workspace ``(2, C, nblk)``."""
    device_key, x3, cfg, kernels = _setup(x, view)
    C = x3.shape[1]
    n_part = 2 * C * cfg.nblk
    work, _ = _workspace((device_key, stream_key), n_part, stream)
    part = work[:n_part].reshape(2, C, cfg.nblk)
    _launch(
        kernels.backward_partials,
        cfg.grid,
        cfg.threads,
        stream,
        dy3,
        x3,
        cfg.width,
        cfg.nblk,
        cfg.chunk,
        mean.dev,
        invstd.dev,
        *_params(gamma, beta, relu, device_key),
        part,
    )
    return part


def _fill(dev, value, stream):
    n = dev.shape[0]
    if n:
        _launch(_kernels.fill, _copy_grid(n), _kernels.THREADS, stream, dev, value)


# --------------------------------------------------------------------------------------
# Synchronized BatchNorm (comm=): reductions on the device, 2 * C float64 staged on the host
# --------------------------------------------------------------------------------------


def _stage(part, moments, stream):
    """Merge ``part`` per channel on the device and copy the ``(2, C)`` result to the host.

    Synchronizes ``stream``; returns two float64 host arrays of shape ``(C,)``.
    """
    C = part.shape[1]
    out = _nbcuda.device_array((2, C), np.float64, stream=stream)
    _launch(
        _kernels.merge_partials,
        max(1, -(-C // _kernels.THREADS)),
        _kernels.THREADS,
        stream,
        part,
        bool(moments),
        out,
    )
    host = out.copy_to_host(stream=stream)
    stream.synchronize()
    return host[0].copy(), host[1].copy()


def _store(dst, values, stream):
    """Write host ``values`` into the device array ``dst`` (``_Arg`` or Numba, any strides)."""
    if not isinstance(dst, _Arg):
        dst = _Arg(dst, "stat")
    if dst.size == 0:
        return
    src = _nbcuda.to_device(np.ascontiguousarray(values, dtype=dst.dtype).ravel(), stream=stream)
    span, offset, strides = _span(dst)
    _launch(
        _kernels.scatter,
        _copy_grid(dst.size),
        _kernels.THREADS,
        stream,
        src,
        span,
        dst.shape,
        strides,
        offset,
    )


# --------------------------------------------------------------------------------------
# Backend operations (called by fastbn._ops; the same names as fastbn._cpu_backend)
# --------------------------------------------------------------------------------------


def wrap(name, a):
    """A CUDA array argument as an :class:`_Arg` (None stays None)."""
    return None if a is None else _Arg(a, name)


wrap_running = wrap_state = wrap


def wrap_out(out):
    return wrap("out", out)


def unwrap(arg):
    """The caller's array of an :class:`_Arg`."""
    return arg.obj


def check_stream(stream):
    """Any stream is taken (:func:`_resolve_stream` converts it)."""


@contextlib.contextmanager
def scope(x, stream):
    """Run on ``x``'s GPU; yields ``(stream, key)`` from :func:`_resolve_stream`."""
    with _device_context(x):
        yield _resolve_stream(stream, x)


def view(x, axis, st, order=None):
    """The canonical view of ``x`` (an empty one, without memory, for an empty ``x``)."""
    if x.size == 0:
        shape3 = (math.prod(x.shape[:axis]), x.shape[axis], math.prod(x.shape[axis + 1 :]))
        return _View(_nbcuda.device_array(shape3, x.dtype), tuple(range(x.ndim)), x.shape, (0, 0))
    return _canonical(x, axis, st[0], order)


def output(out, v, x, st, also=None):
    """The destination of an x-shaped result (``also``: the view of another input)."""
    return _Output(out, v, x, x.dtype, st[0], inputs=() if also is None else (also.span,))


def empty_output(x, axis, out, st):
    """The x-shaped result of a call on an empty ``x``."""
    return output(out, view(x, axis, st), x, st).finish()


def stats(like, C, dtype, st, fill=0.0):
    """A ``(C,)`` array of ``fill``, of ``like``'s kind."""
    native, dev = _stats_output(like, C, dtype, st[0])
    _fill(dev, fill, st[0])
    return native


def stats_from_host(values, like, dtype, st):
    """Float64 host statistics as a ``(C,)`` array of ``like``'s kind in ``dtype``."""
    if dtype is None:
        return None
    native, dev = _stats_output(like, values.shape[0], dtype, st[0])
    _store(dev, values, st[0])
    return native


def store(arg, values, st):
    """Write host ``values`` into the device array ``arg``."""
    _store(arg, values, st[0])


def mask_view(mask, x, axis, v, st):
    """The mask on the device as the kernels read it (uint8, ``(outer, inner)`` in x's
    memory order) and its count of True positions: laid out on the host
    (:func:`fastbn._checks.mask_layout`; the count is needed there before anything is
    written), so a call with a mask copies it to the host and back (synchronizes)."""
    w, count = _checks.mask_layout(to_host(mask), x.shape, axis, v.order, v.x3.shape)
    return _nbcuda.to_device(w, stream=st[0]), count


def shard_moments(x, v, st, mask=None):
    """``(mean, M2)`` per channel of this array (float64 host arrays; synchronizes):
    launch 1 of the forward, then a merge; only ``2 * C`` float64 reach the host. With
    ``mask`` (from :func:`mask_view`), over its True positions."""
    device_key, x3, cfg, kernels = _setup(x, v)
    if mask is not None:
        part = _nbcuda.device_array((3, x3.shape[1], cfg.nblk), np.float64, stream=st[0])
        _launch(
            kernels.masked_forward_partials,
            cfg.grid,
            cfg.threads,
            st[0],
            *(x3, mask, cfg.width, cfg.nblk, cfg.chunk, part),
        )
        return _stage(part, True, st[0])
    _, part, _ = _moment_partials(x3, cfg, kernels, (device_key, st[1]), 0, st[0])
    return _stage(part, True, st[0])


def forward(x, v, dest, gamma, beta, eps, relu, st, dtype, running=None):
    """The training forward (two launches): ``(mean, invstd, None)`` in ``dtype`` (None
    when ``dtype`` is None). ``running``: ``(running_mean, running_var, factor,
    correction, mode)``, updated on the device (mode 0: on_nonfinite="raise", 1: "warn")."""
    stream, key = st
    mean = invstd = mean_dev = invstd_dev = None
    if dtype is not None:
        C = v.x3.shape[1]
        mean, mean_dev = _stats_output(x, C, dtype, stream)
        invstd, invstd_dev = _stats_output(x, C, dtype, stream)
    _forward_training(
        x, v, dest.y3, gamma, beta, eps, relu, mean_dev, invstd_dev, stream, key, running
    )
    return mean, invstd, None


def normalize(x, v, dest, mean, var, gamma, beta, eps, relu, st, residual=None):
    """``y`` from given float64 host statistics, copied to the device: :func:`inference`
    with them."""
    stats64 = _nbcuda.to_device(np.stack([mean, var]), stream=st[0])
    mean64, var64 = (types.SimpleNamespace(dev=a) for a in stats64)
    inference(x, v, dest, mean64, var64, gamma, beta, eps, relu, st, residual)


def inference(x, v, dest, running_mean, running_var, gamma, beta, eps, relu, st, residual=None):
    """``y`` from the running statistics (one launch): the inference kernel; with
    ``residual`` (z's view in x's order), ``act(bn(x) + z)``: the residual kernel."""
    if x.size and residual is not None:
        _residual(
            x, v, v.x3, residual.x3, dest.y3, running_mean.dev, running_var.dev, True,
            gamma, beta, eps, relu, False, st[0],
        )  # fmt: skip
    elif x.size:
        _inference(x, v, dest.y3, running_mean, running_var, gamma, beta, eps, relu, st[0])


def residual_grad(x, v, dyv, zv, dest, mean, invstd, gamma, beta, relu, st):
    """dy masked where ``bn(x) + z <= 0`` (with ``relu``; a copy of dy without), into
    ``dest`` (one launch)."""
    _residual(
        x, v, dyv.x3, zv.x3, dest.y3, mean.dev, invstd.dev, False,
        gamma, beta, 0.0, relu, True, st[0],
    )  # fmt: skip


def _grads(grads, C, stream):
    """``(dgamma, dbeta)`` arrays of ``grads = (like, dtype)`` and their Numba views."""
    if grads is None:
        return None, None, None, None
    dgamma, dgamma_dev = _stats_output(grads[0], C, grads[1], stream)
    dbeta, dbeta_dev = _stats_output(grads[0], C, grads[1], stream)
    return dgamma, dbeta, dgamma_dev, dbeta_dev


def backward(x, v, dyv, dest, mean, invstd, gamma, beta, relu, st, grads):
    """dx (two launches); returns ``(dgamma, dbeta)`` (None, None without ``grads``)."""
    stream, key = st
    dgamma, dbeta, dgamma_dev, dbeta_dev = _grads(grads, v.x3.shape[1], stream)
    _backward(
        x, v, dyv.x3, dest.y3, mean, invstd, gamma, beta, relu, dgamma_dev, dbeta_dev, stream, key
    )
    return dgamma, dbeta


def frozen_backward(x, v, dyv, dest, mean, invstd, gamma, beta, relu, st, grads):
    """dx through fixed statistics and the partial sums (one pass), then ``dgamma`` and
    ``dbeta`` from them (a small launch, when asked); returns them as :func:`backward`."""
    stream, key = st
    device_key, x3, cfg, kernels = _setup(x, v)
    C = x3.shape[1]
    dgamma, dbeta, dgamma_dev, dbeta_dev = _grads(grads, C, stream)
    part = _workspace((device_key, key), 2 * C * cfg.nblk, stream)[0].reshape(2, C, cfg.nblk)
    views = (dyv.x3, x3, dest.y3, cfg.width, cfg.nblk, cfg.chunk, mean.dev, invstd.dev)
    params = (*_params(gamma, beta, relu, device_key), part)
    _launch(kernels.frozen_backward, cfg.grid, cfg.threads, stream, *views, *params)
    if grads is not None:
        grid = -(-C // cfg.threads)
        grad_args = (part, invstd.dev, dgamma_dev, dbeta_dev)
        _launch(_kernels.frozen_grads, grid, cfg.threads, stream, *grad_args)
    return dgamma, dbeta


def shard_grad_sums(x, v, dyv, mean, invstd, gamma, beta, relu, st):
    """``(sum dy, sum dy * (x - mean))`` per channel (float64 host arrays; synchronizes)."""
    return _stage(
        _backward_partials(x, v, dyv.x3, mean, invstd, gamma, beta, relu, *st), False, st[0]
    )


def masked_backward(x, v, dyv, dest, mean, invstd, gamma, beta, relu, mask, count, st, grads):
    """The masked backward of one array (no ``comm``): :func:`shard_grad_sums`, then
    :func:`input_grad` with ``mask``; returns ``(dgamma, dbeta)``."""
    sums = shard_grad_sums(x, v, dyv, mean, invstd, gamma, beta, relu, st)
    return input_grad(
        x, v, dyv, dest, mean, invstd, gamma, beta, relu, sums, count, st, grads, mask=mask
    )


def input_grad(x, v, dyv, dest, mean, invstd, gamma, beta, relu, sums, count, st, grads, mask=None):
    """dx from sums over ``count`` values per channel (one launch); returns
    ``(dgamma, dbeta)`` as :func:`backward` does. With ``mask`` (from :func:`mask_view`),
    ``count`` is the True positions' and only those carry the statistics' terms."""
    stream, key = st
    C = v.x3.shape[1]
    dgamma, dbeta, dgamma_dev, dbeta_dev = _grads(grads, C, stream)
    s_dy, s_dyx = sums
    if x.size:
        sums_dev = _nbcuda.to_device(np.stack([s_dy, s_dyx]).reshape(2, C, 1), stream=stream)
    if x.size and mask is not None:
        device_key, x3, cfg, kernels = _setup(x, v)
        args = (dyv.x3, x3, mask, dest.y3, cfg.width, cfg.nblk, cfg.chunk, sums_dev)
        args += (float(count), mean.dev, invstd.dev, *_params(gamma, beta, relu, device_key))
        _launch(kernels.masked_input_grad, cfg.grid, cfg.threads, stream, *args)
    elif x.size:
        _backward(
            x,
            v,
            dyv.x3,
            dest.y3,
            mean,
            invstd,
            gamma,
            beta,
            relu,
            dgamma_dev,
            dbeta_dev,
            stream,
            key,
            sums=sums_dev,
            count=count,
        )
        return dgamma, dbeta
    if grads is not None:  # from the host sums (masked, or an empty shard)
        _store(dgamma_dev, s_dyx * to_host(invstd).astype(np.float64), stream)
        _store(dbeta_dev, s_dy, stream)
    return dgamma, dbeta


def report_nonfinite(st):
    """Report at once (``FASTBN_CUDA_SYNC_NONFINITE=1``): :func:`check_nonfinite`."""
    check_nonfinite(st[0])


# --------------------------------------------------------------------------------------
# Non-finite reporting
# --------------------------------------------------------------------------------------


def _take_counts(stream):
    """Read and reset the device's skipped-update counters.

    Synchronizes ``stream`` first, or the whole device when it is None (the counters
    are incremented by work on any stream).
    """
    if stream is None:
        _nbcuda.synchronize()
    stream, _ = _resolve_stream(stream, None)
    counter = _nonfinite_counter(_device_key())
    taken = _nbcuda.device_array(2, np.int32, stream=stream)
    _launch(_kernels.take_counts, 1, 32, stream, counter, taken)
    counts = taken.copy_to_host(stream=stream)
    stream.synchronize()
    return int(counts[0]), int(counts[1])


def nonfinite_count(stream=None):
    """Number of GPU training calls whose running-statistics update was skipped.

    Counts the calls (on the current device) whose batch statistics were not finite since
    the last :func:`nonfinite_count` or :func:`check_nonfinite`, and resets the count.
    Synchronizes ``stream``, or the whole device when ``stream`` is None (the default):
    pass the stream you launched on to wait for that stream only.

    Returns
    -------
    int

    Examples
    --------
    >>> import fastbn.cuda  # doctest: +SKIP
    >>> fastbn.cuda.nonfinite_count()  # doctest: +SKIP
    0
    """
    raised, warned = _take_counts(stream)
    return raised + warned


def check_nonfinite(stream=None):
    """Report GPU training calls whose non-finite batch statistics were kept out.

    Synchronizes ``stream`` (the whole device when None), reads and resets the device's
    counters atomically, then warns
    (``RuntimeWarning``) for calls made with ``on_nonfinite="warn"`` and raises
    ``FloatingPointError`` for calls made with ``on_nonfinite="raise"`` (the default,
    and every :class:`fastbn.BatchNorm` training call). In every case the running
    statistics were left unchanged by those calls.

    Raises
    ------
    FloatingPointError
        Some call made with ``on_nonfinite="raise"`` had non-finite batch statistics.
    """
    raised, warned = _take_counts(stream)
    if warned:
        warnings.warn(
            f"batch statistics were not finite in {warned} GPU training call(s) "
            f"(or would overflow the running statistics' dtype); the running "
            f"statistics were left unchanged",
            RuntimeWarning,
            stacklevel=2,
        )
    if raised:
        raise FloatingPointError(
            f"batch statistics were not finite in {raised} GPU training "
            f"call(s) (or would overflow the running statistics' "
            f"dtype); the running statistics were left unchanged "
            f"(pass on_nonfinite='warn' to be warned instead)"
        )


# --------------------------------------------------------------------------------------
# Array kinds: the layer's state, copies between host and device
# --------------------------------------------------------------------------------------

_KINDS = ("numba", "cupy", "torch")


def check_kind(kind):
    """Raise unless a GPU is available and ``kind`` names a device array type."""
    _require_gpu()
    if kind not in _KINDS:
        raise ValueError(f"kind must be 'numba', 'cupy' or 'torch', got {kind!r}")


def as_device(value, kind="numba"):
    """``value`` (host or device) as a device array of ``kind``: itself when it already
    is one, else a copy; None stays None."""
    if value is None:
        return None
    if _checks.is_cuda_array(value):
        if _kind(value) == kind:
            return value
        value = to_host(value)
    return _to_kind(np.asarray(value), kind)


def to_device(layer, kind="numba"):
    """Put a :class:`fastbn.BatchNorm`'s parameters, statistics and gradients on the GPU.

    The same as ``layer.to("cuda", kind=kind)``.

    Parameters
    ----------
    layer : fastbn.BatchNorm
    kind : {"numba", "cupy", "torch"}, default "numba"
        The array type of the device state.

    Returns
    -------
    fastbn.BatchNorm
        ``layer`` (modified in place; a saved forward is dropped).

    Raises
    ------
    RuntimeError
        No CUDA GPU is available.
    """
    return layer.to("cuda", kind=kind)


def _to_kind(host, kind):
    """A device copy of a host array as a Numba, CuPy or PyTorch array."""
    host = np.ascontiguousarray(host)
    if kind == "torch":
        import torch

        return torch.as_tensor(host, device="cuda")
    if kind == "cupy":
        import cupy

        return cupy.asarray(host)
    return _nbcuda.to_device(host)


def copy_into(device_array, values):
    """Copy ``values`` (host or device, any float dtype) into ``device_array`` in place.

    From host memory the copy is synchronous (pageable memory); device to device it is
    one launch on the default stream.
    """
    dst = _Arg(device_array, "device_array")
    if _checks.is_cuda_array(values):
        src = _Arg(values, "values")
        if src.shape != dst.shape:
            raise ValueError(f"values must have shape {dst.shape}, got {src.shape}")
        if not _contiguous_in_order(
            dst.shape, dst.strides, dst.dtype.itemsize, tuple(range(dst.ndim))
        ):
            raise ValueError("copy_into needs a C-contiguous destination")
        stream = _nbcuda.default_stream()
        if src.size:
            span, offset, strides = _span(src)
            _launch(
                _kernels.gather,
                _copy_grid(src.size),
                _kernels.THREADS,
                stream,
                span,
                dst.dev.reshape(dst.size),
                src.shape,
                strides,
                offset,
            )
        return device_array
    host = np.ascontiguousarray(np.asarray(values), dtype=dst.dtype)
    if host.shape != dst.shape:
        raise ValueError(f"values must have shape {dst.shape}, got {host.shape}")
    dst.dev.copy_to_device(host)
    return device_array


def to_host(device_array):
    """A NumPy copy of a CUDA array (synchronous).

    Examples
    --------
    >>> import numpy as np, fastbn.cuda  # doctest: +SKIP
    >>> fastbn.cuda.to_host(numba.cuda.to_device(np.ones(3)))  # doctest: +SKIP
    array([1., 1., 1.])
    """
    arg = device_array if isinstance(device_array, _Arg) else _Arg(device_array, "device_array")
    if arg.size == 0:
        return np.empty(arg.shape, arg.dtype)
    order = _memory_order(arg)
    if order is None:
        stream = _nbcuda.default_stream()
        buf = _gather(arg, tuple(range(arg.ndim)), stream)
        return buf.dev.copy_to_host(stream=stream)
    host = arg.dev.copy_to_host()
    return np.array(host, copy=True)
