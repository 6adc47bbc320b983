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
- The threading layer is ``threadsafe``: TBB, else OpenMP (Numba's ``workqueue``
  fallback aborts the process when two Python threads enter a parallel region at once).
  TBB is also fork-safe: a forked child (``multiprocessing``'s fork start method, data
  loader workers) runs parallel kernels after its parent did, which GNU OpenMP does not
  allow. fastbn depends on the ``tbb`` wheel and loads its library (:data:`TBB_LIBRARY`)
  before Numba starts its threads, since the loader does not search where the wheel puts
  it. A ``NUMBA_THREADING_LAYER`` set by the user wins.
- The reduction partition (``CHUNK_BYTES``) is a fixed function of the shape and dtype,
  never of the thread count: this is what makes CPU results bitwise identical for every
  ``numba.set_num_threads`` value.

Environment variables
---------------------
FASTBN_CACHE
    ``0`` turns the on-disk JIT cache off (default on).
NUMBA_CACHE_DIR
    Numba's own variable: where compiled kernels are cached. Without it, Numba caches
    next to the installed sources (``fastbn/__pycache__``) when that directory is
    writable, else in the user's cache directory (``~/.cache/numba``). When none of these
    is writable (a read-only system-wide install used by an account without a home),
    fastbn caches in a private directory of its own, ``<tmp>/fastbn-jit-cache-<uid>``
    (mode 0700), or, when even that fails, compiles without a cache; one warning says
    which (:func:`njit`).
FASTBN_CUDA_THREADS
    Threads per block of the CUDA kernels (default 256; tests under the simulator use a
    small value so that multi-block and tail paths run).
"""

import contextlib
import ctypes
import os
import site
import stat
import sys
import tempfile
import warnings

import numba
from numba.core import caching, event

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
                scale = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
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

# Values per loop of the strided backward through fixed statistics (cpu._frozen_run): runs
# longer than this are summed piece by piece, and with ``out=dy`` a piece goes through a
# buffer of this many values, which stays in L1 (16 KiB of float32). Changing it changes
# the last bits of dgamma and dbeta for runs longer than it, nothing else.
FROZEN_PIECE = 4096

# Channels per work item of the merge of chunk partials (cpu._merge_chunks): rows of
# 1 KiB of the float64 partials, and work for both cores from C = 256 on. Does not affect
# results.
MERGE_BLOCK = 128

CUDA_THREADS_PER_BLOCK = int(os.environ.get("FASTBN_CUDA_THREADS", "256"))

# --- Threading layer ---------------------------------------------------------------------
# TBB: safe with several Python threads in parallel regions at once (Numba's workqueue
# aborts the process) and in a forked child after the parent ran one (GNU OpenMP kills
# the child, and multiprocessing's fork Pool hangs). The tbb wheel, a dependency, puts
# its library in <prefix>/lib, where the dynamic loader does not look; loaded here with
# RTLD_GLOBAL, before Numba starts its threads, Numba's TBB layer finds it by name.
_TBB_LIBRARY_NAMES = {"linux": "libtbb.so.12", "darwin": "libtbb.12.dylib"}

# Values of NUMBA_THREADING_LAYER that may select TBB (user-chosen ones win; for these
# the library is preloaded so that Numba can load it).
_TBB_LAYERS = {"tbb", "safe", "threadsafe", "forksafe", "default"}


def _tbb_candidates(name):
    """Paths where the tbb wheel may have put ``name``: the library directories of
    the interpreter's prefixes (venv, base, conda, user base), then the wheel's own
    record of its files."""
    prefixes = [sys.prefix, sys.exec_prefix, sys.base_prefix, os.environ.get("CONDA_PREFIX")]
    with contextlib.suppress(Exception):
        prefixes.append(site.getuserbase())
    seen = set()
    for prefix in prefixes:
        if prefix:
            path = os.path.join(prefix, "lib", name)
            if path not in seen and os.path.exists(path):
                seen.add(path)
                yield path
    with contextlib.suppress(Exception):  # a broken or missing distribution record
        from importlib import metadata

        for file in metadata.files("tbb") or ():
            if file.name == name:
                path = str(file.locate())
                if path not in seen and os.path.exists(path):
                    seen.add(path)
                    yield path


def _load_tbb():
    """Load TBB's shared library globally; return its path, or None when not found.

    Examples
    --------
    >>> path = _load_tbb()
    >>> path is None or os.path.basename(path).startswith("libtbb")
    True
    """
    name = _TBB_LIBRARY_NAMES.get(sys.platform)
    if name is None:  # Windows: the wheel's DLL directory is on the search path already
        return None
    for path in _tbb_candidates(name):
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return path
        except OSError:
            continue
    return None


_USER_LAYER = os.environ.get("NUMBA_THREADING_LAYER")

# The TBB library fastbn loaded (a path), or None: not found (Numba may still find a
# system-wide TBB), or NUMBA_THREADING_LAYER names a layer that is not TBB.
TBB_LIBRARY = _load_tbb() if _USER_LAYER is None or _USER_LAYER.lower() in _TBB_LAYERS else None

if _USER_LAYER is None:
    # TBB when it loads, else OpenMP: both thread-safe; OpenMP (GNU) is not fork-safe.
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


def _private_cache_dir():
    """A cache directory only this user can write: ``<tmp>/fastbn-jit-cache-<uid>``.

    Created with mode 0700. An existing one is used only when it is a real directory
    owned by this user and writable by nobody else: anyone who can write a cache can
    make fastbn run their machine code.

    Returns
    -------
    str or None
        The directory, or None when it cannot be created or is not safe.
    """
    uid = os.getuid() if hasattr(os, "getuid") else None
    try:
        path = os.path.join(
            tempfile.gettempdir(), f"fastbn-jit-cache-{uid if uid is not None else 'user'}"
        )
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        info = os.lstat(path)
    except OSError:
        return None
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_mode & 0o022
        or (uid is not None and info.st_uid != uid)
        or not os.access(path, os.W_OK)
    ):
        return None
    return path


# Where fastbn caches when Numba's locators find no writable place: resolved once, on the
# first kernel Numba refuses to cache ("unset" until then; None: caching off).
_fallback = {"dir": "unset"}


@contextlib.contextmanager
def _numba_cache_dir(path):
    """Numba's ``config.CACHE_DIR`` set to ``path`` while a dispatcher is created.

    Numba reads it once, when the dispatcher's cache locator is chosen, so the kernels
    created inside keep ``path`` and nothing else in the process is redirected.
    """
    previous = numba.config.CACHE_DIR
    numba.config.CACHE_DIR = path
    try:
        yield
    finally:
        numba.config.CACHE_DIR = previous


def _jit_with_fallback(fn, options):
    """``numba.njit(**options)(fn)``; when Numba finds no writable cache location (it
    raises at decoration), the same with a private cache directory, else without a cache.

    One warning per process says where the cache went.
    """
    try:
        return numba.njit(**options)(fn)
    except RuntimeError as exc:
        if not options.get("cache") or "no locator available" not in str(exc):
            raise
    if _fallback["dir"] == "unset":
        _fallback["dir"] = _private_cache_dir()
        where = (
            f"caching compiled kernels in {_fallback['dir']}"
            if _fallback["dir"]
            else "compiling without a cache (every process compiles again)"
        )
        warnings.warn(
            f"fastbn: no writable JIT cache location; {where} (set "
            f"NUMBA_CACHE_DIR to choose one, FASTBN_CACHE=0 for none)",
            RuntimeWarning,
            stacklevel=4,
        )
    if _fallback["dir"] is not None:
        with _numba_cache_dir(_fallback["dir"]):
            try:
                return numba.njit(**options)(fn)
            except RuntimeError:
                pass
    return numba.njit(**dict(options, cache=False))(fn)


def njit(**options):
    """``numba.njit(**options)``, with the function's on-disk cache locked between
    processes (:class:`_LockedCacheFile`) when ``cache`` is on and the OS has ``flock``.

    When no cache location is writable (Numba would raise ``cannot cache function ...:
    no locator available``), the kernel is cached in a private directory instead, or not
    at all, with one warning: importing fastbn never fails for want of a cache.

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
        dispatcher = _jit_with_fallback(fn, options)
        cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
        if fcntl is not None and type(cache_file) is caching.IndexDataCacheFile:
            cache_file.__class__ = _LockedCacheFile
        return dispatcher

    return decorate


class _CompileWatch(event.Listener):
    """Counts Numba compilations in progress (``numba:compile`` events).

    Numba fires the event only when it really compiles: a kernel loaded from the on-disk
    cache is silent. The trainer and ``python -m fastbn`` use it to say "compiling
    kernels" exactly when they do, and their Ctrl-C handler to know that an interrupt
    would land inside the compiler (which does not survive one cleanly).
    """

    def __init__(self):
        self.depth = 0
        self.callbacks = []

    def on_start(self, ev):
        self.depth += 1
        for callback in list(self.callbacks):
            callback()

    def on_end(self, ev):
        self.depth = max(self.depth - 1, 0)


_COMPILE_WATCH = _CompileWatch()
event.register("numba:compile", _COMPILE_WATCH)


def compiling():
    """Whether Numba is compiling a function in this process right now.

    Examples
    --------
    >>> compiling()
    False
    """
    return _COMPILE_WATCH.depth > 0


@contextlib.contextmanager
def on_compile(callback):
    """Call ``callback()`` each time Numba starts compiling a function inside the block.

    Examples
    --------
    >>> calls = []
    >>> with on_compile(lambda: calls.append(1)):
    ...     _ = numba.njit(lambda v: v + 1)(1)
    >>> len(calls) >= 1
    True
    """
    _COMPILE_WATCH.callbacks.append(callback)
    try:
        yield
    finally:
        _COMPILE_WATCH.callbacks.remove(callback)


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
