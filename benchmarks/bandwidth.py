"""Copy bandwidth: the yardstick every BatchNorm benchmark is measured against.

BatchNorm is memory-bound, so the fastest it can possibly run is the speed at which the
machine moves its bytes. We measure that speed the way STREAM's ``Copy`` does, in the same
run as the benchmarks (a number from a data sheet, or from another run, is not the same
machine state): ``dst[:] = src`` over an array, counting **bytes read + bytes written**
(``2 * nbytes`` per copy; the write-allocate read of ``dst`` that a cache without
non-temporal stores also performs is *not* counted, as in STREAM).

Several ways of copying are timed and the best one is reported, so that the yardstick is
the machine's and not one implementation's; each is timed over many copies and its best
time kept, as STREAM reports its "best rate":

- ``np.copyto`` in the calling thread (glibc's ``memcpy`` uses non-temporal stores for
  large copies, which makes it the fastest single-threaded copy of arrays that do not fit
  in cache);
- ``np.copyto`` on ``threads`` equal slices, one Python thread each (NumPy releases the GIL
  while copying);
- a Numba ``prange`` copy kernel run with Numba's thread count.

Two sizes matter. A large array (256 MiB by default) measures the DRAM bandwidth. But the
(32, 64, 56, 56) float32 tensor is 25.7 MB and fits in a 32 MB L3 cache, so the roofline
of a benchmark on it is the copy bandwidth *at that size*: :func:`copy_bandwidth` is
therefore also called with each benchmark's array size, and both numbers are recorded.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numba
import numpy as np

LARGE_BYTES = 256 * 2**20


@numba.njit(parallel=True, boundscheck=False)
def _parallel_copy_kernel(dst, src):
    """Copy ``src`` into ``dst`` (both 1-D, same length) with a ``prange`` loop.

    Parameters
    ----------
    dst : numpy.ndarray
        Destination, 1-D and contiguous.
    src : numpy.ndarray
        Source, 1-D, contiguous, same length and dtype as ``dst``.

    Notes
    -----
    One pass: reads ``src`` once and writes ``dst`` once.
    """
    for i in numba.prange(src.size):
        dst[i] = src[i]


@dataclass(frozen=True)
class CopyBandwidth:
    """The result of one copy-bandwidth measurement.

    Attributes
    ----------
    nbytes : int
        Size of the source array (the destination has the same size).
    gbps : float
        Best bandwidth over the methods tried, in GB/s (1e9 bytes per second), counting
        ``2 * nbytes`` (read + write) per copy and using each method's best time.
    method : str
        The method that reached ``gbps``: ``"np.copyto"``, ``"np.copyto x<threads>"`` or
        ``"numba prange x<threads>"``.
    threads : int
        Numba's thread count during the measurement.
    by_method : dict
        GB/s of every method tried.
    """

    nbytes: int
    gbps: float
    method: str
    threads: int
    by_method: dict

    def as_dict(self):
        """Return the measurement as a JSON-friendly dict.

        Returns
        -------
        dict
            The dataclass fields.
        """
        return asdict(self)


def _best_seconds(function, nbytes, target_seconds):
    """Time ``function`` and return the best (smallest) seconds of one call.

    Parameters
    ----------
    function : callable
        Called without arguments; one call copies ``nbytes`` bytes.
    nbytes : int
        Bytes per copy, used to pick how many calls make one timed sample, so that small
        copies are not lost in the timer's resolution.
    target_seconds : float
        Rough total time to spend.

    Returns
    -------
    float
        Minimum over the samples of (sample time / calls per sample): like STREAM's
        "best rate", the yardstick is what the machine can do, not what a busy moment
        let it do (the benchmarks themselves report their median).
    """
    # Warm-up, untimed, for a tenth of a second at least: page faults of a fresh
    # destination, thread start-up, and a CPU that idled (a virtual CPU, or a core in a
    # deep power state) needs tens of milliseconds to run at full speed again; without
    # it the first measurement of a process came out ten times too slow.
    deadline = time.perf_counter() + max(0.1, target_seconds / 4)
    while time.perf_counter() < deadline:
        function()
    start = time.perf_counter()
    function()
    once = max(time.perf_counter() - start, 1e-7)
    calls = max(1, int(2e-4 / once))  # each sample lasts at least ~0.2 ms
    samples = int(min(max(target_seconds / (once * calls), 5), 200))
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(calls):
            function()
        times.append((time.perf_counter() - start) / calls)
    return float(np.min(times))


def copy_bandwidth(nbytes=LARGE_BYTES, *, threads=None, target_seconds=0.4):
    """Measure the copy bandwidth of this machine for arrays of ``nbytes`` bytes.

    Parameters
    ----------
    nbytes : int, optional
        Size of the array copied (default 256 MiB, far larger than any cache).
    threads : int, optional
        Thread count for the threaded methods; default ``numba.get_num_threads()``.
    target_seconds : float, optional
        Rough time spent per method.

    Returns
    -------
    CopyBandwidth
        The best of the methods described in the module docstring.
    """
    if threads is None:
        threads = numba.get_num_threads()
    n = max(1, int(nbytes) // 4)
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    copied = 2 * src.nbytes
    bounds = np.linspace(0, n, threads + 1).astype(np.int64)
    slices = [(src[lo:hi], dst[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]

    by_method = {}
    by_method["np.copyto"] = (
        copied / _best_seconds(lambda: np.copyto(dst, src), src.nbytes, target_seconds) / 1e9
    )
    if threads > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:

            def threaded_copyto():
                for future in [pool.submit(np.copyto, d, s) for s, d in slices]:
                    future.result()

            by_method[f"np.copyto x{threads}"] = (
                copied / _best_seconds(threaded_copyto, src.nbytes, target_seconds) / 1e9
            )
    _parallel_copy_kernel(dst[:1], src[:1])  # compile outside the timing
    by_method[f"numba prange x{threads}"] = (
        copied
        / _best_seconds(lambda: _parallel_copy_kernel(dst, src), src.nbytes, target_seconds)
        / 1e9
    )

    method = max(by_method, key=by_method.get)
    return CopyBandwidth(
        nbytes=int(src.nbytes),
        gbps=float(by_method[method]),
        method=method,
        threads=int(threads),
        by_method={k: float(v) for k, v in by_method.items()},
    )


def cuda_copy_bandwidth(nbytes=LARGE_BYTES, *, target_seconds=0.4):
    """Measure the device-to-device copy bandwidth of the current CUDA GPU.

    Parameters
    ----------
    nbytes : int, optional
        Size of the array copied (default 256 MiB, larger than any GPU L2 cache).
    target_seconds : float, optional
        Rough time to spend.

    Returns
    -------
    CopyBandwidth
        ``method`` is ``"cuda memcpy d2d"``; ``threads`` is 0. The copy is timed from the
        host with a synchronization after every copy, as the GPU benchmarks are.

    Notes
    -----
    Must not be called under the CUDA simulator: its numbers would mean nothing.
    """
    from numba import cuda

    n = max(1, int(nbytes) // 4)
    src = cuda.to_device(np.ones(n, dtype=np.float32))
    dst = cuda.device_array_like(src)

    def copy():
        dst.copy_to_device(src)
        cuda.synchronize()

    gbps = 2 * n * 4 / _best_seconds(copy, n * 4, target_seconds) / 1e9
    return CopyBandwidth(
        nbytes=n * 4,
        gbps=float(gbps),
        method="cuda memcpy d2d",
        threads=0,
        by_method={"cuda memcpy d2d": float(gbps)},
    )


class CopyBandwidthCache:
    """Copy bandwidths measured at most once per size in a run.

    Parameters
    ----------
    measure : callable
        ``measure(nbytes) -> CopyBandwidth``, e.g. :func:`copy_bandwidth`.
    large_bytes : int, optional
        Size of the large-array (DRAM) measurement.
    """

    def __init__(self, measure, large_bytes=LARGE_BYTES):
        self._measure = measure
        self._large_bytes = large_bytes
        self._by_size = {}

    @property
    def large(self):
        """CopyBandwidth: the large-array (DRAM) copy bandwidth, measured on first use."""
        return self.at(self._large_bytes)

    def at(self, nbytes):
        """Return the copy bandwidth for arrays of ``nbytes`` bytes, measuring it once.

        Parameters
        ----------
        nbytes : int
            Size of the array.

        Returns
        -------
        CopyBandwidth
            The cached or freshly measured value.
        """
        nbytes = int(nbytes)
        if nbytes not in self._by_size:
            self._by_size[nbytes] = self._measure(nbytes)
        return self._by_size[nbytes]

    def measured(self):
        """Return every measurement made so far.

        Returns
        -------
        list of dict
            One dict per size, sorted by size.
        """
        return [self._by_size[k].as_dict() for k in sorted(self._by_size)]
