"""JIT options and tuning constants, in one place.

Every kernel in fastbn takes its compiler options from here; no module hard-codes
``fastmath=`` or ``cache=``.

- ``FASTMATH`` is LLVM's fast-math set *without* ``nnan`` and ``ninf``: reductions may be
  reassociated (so they vectorize) and contracted into FMAs, but NaN and inf keep their
  meaning, so a non-finite batch is still detected.
- ``JIT_OPTIONS`` are the options of every CPU kernel (``cache=True`` keeps compiled
  machine code on disk, so a second process starts fast; ``nogil=True`` lets several
  Python threads call the kernels at once).
- :func:`njit` is ``numba.njit`` with an inter-process lock around the on-disk cache of
  each function (see :class:`_LockedCacheFile`): every CPU kernel is compiled through it.
- The threading layer is ``threadsafe`` (TBB if installed, else OpenMP): Numba's
  ``workqueue`` fallback aborts the process when two Python threads enter a parallel
  region at once. A ``NUMBA_THREADING_LAYER`` set by the user wins.
- The reduction partition (``CHUNK_BYTES``) is a fixed function of the shape and dtype,
  never of the thread count: this is what makes CPU results bitwise identical for every
  ``numba.set_num_threads`` value.

Environment variables
---------------------
FASTBN_CACHE
    ``0`` turns the on-disk JIT cache off (default on).
FASTBN_CUDA_THREADS
    Threads per block of the CUDA kernels (default 256; tests under the simulator use a
    small value so that multi-block and tail paths run).
"""

import contextlib
import os

import numba
from numba.core import caching

try:
    import fcntl
except ImportError:  # not POSIX: Numba's cache as it is
    fcntl = None

FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

CACHE = os.environ.get("FASTBN_CACHE", "1") != "0"

JIT_OPTIONS = {
    "fastmath": FASTMATH,
    "cache": CACHE,
    "nogil": True,
    "error_model": "numpy",
    "boundscheck": False,
}

# Reductions are split into chunks of this many bytes of x per channel (half the 512 KiB
# L2 of a core of the development machine), so that a chunk that must be reduced a second
# time (see cpu._chunk_moments_strided) is read again from cache. Changing it changes the
# last bits of results, nothing else.
CHUNK_BYTES = 256 * 1024

# A strided chunk (whole runs of a channel) also holds at least this many bytes of its
# channel. With short runs and many channels, CHUNK_BYTES of all channels left a single
# run per (channel, chunk) work item (a (128, 1024, 7, 7) float32 batch: runs of 196
# bytes, 131072 items), whose fixed costs, a summary and a partial to merge, outweighed
# its 49 values. Measured on the development VM (docs/cpu.md): statistics 1.3-2.5x and
# gradient sums 1.06-1.66x faster; items of 2 KiB and more made the gradient sums, which
# read dy and x, slower again. Changing it changes the last bits of results.
CHUNK_MIN_CHANNEL_BYTES = 1024


def _last_level_cache_bytes(default=32 * 1024 * 1024):
    """Size of the largest CPU cache (Linux sysfs), or ``default`` when it is not known.

    Examples
    --------
    >>> _last_level_cache_bytes() > 0
    True
    """
    sizes = []
    root = "/sys/devices/system/cpu/cpu0/cache"
    with contextlib.suppress(OSError):
        for entry in os.listdir(root):
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(root, entry, "size")) as f:
                    text = f.read().strip().upper()
                scale = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1:], 1)
                sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=default)


# The last-level cache. A training forward (backward) whose x (dy and x) fits in it finds
# them there on its second pass: fusing the passes per channel then only costs speed.
LLC_BYTES = _last_level_cache_bytes()

# Per-channel fusion (the thread that computes a channel's statistics normalizes it, or
# computes its dx, while it is still in cache) takes a channel of at most this many bytes
# per array, ...
FUSE_BYTES = 512 * 1024

# ... made of contiguous runs (``inner`` values) at least this long: one thread walking a
# single channel of short runs streams poorly. Measured on the development machine
# (2-core Zen 3, 512 KiB L2 per core, 32 MiB L3), fusion against the two passes: runs of
# 3136 bytes (28 x 28 float32) lost 8-22% in every shape tried; runs of 12544 bytes
# (56 x 56) won 8-29% when the arrays read were larger than the L3 and lost 5-9% when they
# fitted in it (cpu._fusable).
FUSE_MIN_RUN_BYTES = 8192

# Below this many bytes of x a call runs the serial build of a kernel: entering a parallel
# region costs ~15-20 us, more than the whole computation of a small call.
SERIAL_BYTES = 256 * 1024

# Values per work item of the strided elementwise passes (normalize, dx; the rows family
# takes one row per item). Does not affect results.
ELEMENTWISE_CHUNK = 16384

# Channels per work item of the merge of chunk partials (cpu._merge_chunks): rows of
# 1 KiB of the float64 partials, and work for both cores from C = 256 on. Does not affect
# results.
MERGE_BLOCK = 128

CUDA_THREADS_PER_BLOCK = int(os.environ.get("FASTBN_CUDA_THREADS", "256"))

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "threadsafe"


class _LockedCacheFile(caching.IndexDataCacheFile):
    """Numba's on-disk cache of one function, read and written under a file lock.

    The cache keeps an index (signature -> numbered data file) and the data files. Two
    processes that compile different signatures of one function at the same time can
    interleave their writes so that the index names one signature's machine code for
    another (numba/numba#4807); every later process then loads the wrong code and
    crashes. MPI ranks, parallel test shards and job arrays started on a fresh install
    do exactly that. Here a save (index read, index write, data write) holds an
    exclusive ``flock`` on ``<index>.lock``, and a load (index read, data read) a shared
    one, so neither sees the other half done.
    """

    @contextlib.contextmanager
    def _locked(self, operation):
        try:
            fd = os.open(self._index_path + ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:  # an unwritable cache directory: Numba saves nothing there
            yield
            return
        try:
            fcntl.flock(fd, operation)
            yield
        finally:
            os.close(fd)  # releases the lock

    def save(self, key, data):
        with self._locked(fcntl.LOCK_EX):
            super().save(key, data)

    def load(self, key):
        with self._locked(fcntl.LOCK_SH):
            return super().load(key)


def njit(**options):
    """``numba.njit(**options)``, with the function's on-disk cache locked between
    processes (:class:`_LockedCacheFile`) when ``cache`` is on and the OS has ``flock``.

    Examples
    --------
    >>> from fastbn._config import njit
    >>> twice = njit(nogil=True)(lambda v: 2 * v)  # no cache: nothing to lock
    >>> twice(21)
    42
    >>> from fastbn import cpu  # every kernel there is cached, hence locked
    >>> type(cpu.moments_kernels.rows.parallel._cache._cache_file).__name__
    '_LockedCacheFile'
    """
    def decorate(fn):
        dispatcher = numba.njit(**options)(fn)
        cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
        if fcntl is not None and type(cache_file) is caching.IndexDataCacheFile:
            cache_file.__class__ = _LockedCacheFile
        return dispatcher
    return decorate

# --- CUDA kernels (fastbn/cuda.py, fastbn/_cuda_kernels.py) ---------------------------
# Options of every numba.cuda kernel. No fastmath: it would flush denormals, approximate
# sqrt/division and let ``(x - hi) - lo`` be reassociated. BatchNorm is memory-bound.
CUDA_JIT_OPTIONS = {"fastmath": False}

# Launch configuration of the CUDA kernels: about CUDA_TARGET_BLOCKS blocks per launch
# (enough to fill an H100's 132 SMs several times over), but at least
# CUDA_MIN_VALUES_PER_THREAD values per thread, and at most CUDA_MAX_PARTIALS partials
# per channel. These fix the reduction partition as a function of the shape alone (not of
# the GPU model, nor of timing), so results are bitwise reproducible; changing them
# changes the last bits of the statistics, nothing else. (The environment variables are
# tuning knobs; the simulator tests set small values so that tiny arrays take several
# blocks per channel.)
CUDA_TARGET_BLOCKS = int(os.environ.get("FASTBN_CUDA_TARGET_BLOCKS", "1024"))
CUDA_MIN_VALUES_PER_THREAD = int(os.environ.get("FASTBN_CUDA_MIN_VALUES_PER_THREAD", "16"))
CUDA_MAX_PARTIALS = 1024

# Non-finite batch statistics on the GPU never enter the running statistics (the device
# skips the update and counts the batch). With this set ("1"), every GPU training call
# that updates running statistics synchronizes its stream and reports at once
# (FloatingPointError / RuntimeWarning); otherwise fastbn.cuda.check_nonfinite() reports.
CUDA_SYNC_NONFINITE = os.environ.get("FASTBN_CUDA_SYNC_NONFINITE", "0") == "1"

# --- Option sets of the CPU kernels (fastbn/cpu.py) -----------------------------------
# Reductions take JIT_OPTIONS (FASTMATH: reassociated, hence vectorized).
# Elementwise helpers must not be reassociated: ``(x - mean_hi) - mean_lo`` would fold
# into ``x - (mean_hi + mean_lo)`` and lose the low part. Nor contracted: whether a
# multiply-add becomes an FMA depends on the inlining context, and the same formula must
# round the same way in every driver (the synchronized backward computes dx in its own).
ELEMENTWISE_JIT_OPTIONS = dict(JIT_OPTIONS, fastmath=FASTMATH - {"reassoc", "contract"})
# Per-channel arithmetic (merges, coefficients, variance, running statistics) is C-sized:
# plain IEEE operations cost nothing there and give the same bits whichever kernel, or
# NumPy on the host, computes them.
EXACT_JIT_OPTIONS = dict(JIT_OPTIONS, fastmath=False)
