"""Compile fastbn's CPU kernels ahead of use, into Numba's on-disk cache.

A kernel is compiled on its first call (seconds each: docs/cpu.md, "Compile time"), and
every process after the first loads it from the on-disk cache. :func:`precompile` pays
all of it at once, before use — at install time, in a container build, before an MPI job
starts its ranks — in a pool of processes that compile disjoint sets of kernels into the
shared cache (its writes are locked between processes: ``fastbn._config._LockedCacheFile``).

A *job* is one operation (forward, backward, inference, the separate passes) for one data
dtype, one layout family (rows: ``(N, C)`` and NHWC; strided: NCHW and the like) and one
build (serial for small arrays, parallel for large ones); it compiles by calling the
kernels on small arrays of that kind, so the types compiled are exactly those that the
API passes.

``fastbn precompile`` is the command line of the same (see :func:`add_parser`).
"""

import concurrent.futures
import multiprocessing
import os
import time
from typing import NamedTuple

import numpy as np

#: Data dtypes compiled by default.
DTYPES = ("float32", "float64")

_FAMILIES = ("rows", "strided")
_BUILDS = ("serial", "parallel")
# The operations of a job, in the order a training step meets them. "passes" are the
# separate passes of the guarded and synchronized paths (statistics, normalize, gradient
# sums, input gradient) and the running-statistics update; the fused drivers exist for
# the strided family only.
_OPERATIONS = (
    "forward",
    "backward",
    "inference",
    "passes",
    "forward_fused",
    "backward_fused",
    "frozen_backward",
)


class Job(NamedTuple):
    """One unit of precompilation (see the module docstring).

    Attributes
    ----------
    dtype : str
        The input's dtype: ``float32`` or ``float64``, or ``float16`` (computed in
        float32, with float64 per-channel arrays, as the API passes them).
    family : str
        ``rows`` or ``strided``.
    build : str
        ``serial`` or ``parallel``.
    operation : str
        One of ``forward``, ``backward``, ``inference``, ``passes``, ``forward_fused``,
        ``backward_fused``, ``frozen_backward`` (through fixed statistics).
    """

    dtype: str
    family: str
    build: str
    operation: str


def jobs(dtypes=DTYPES):
    """Every :class:`Job` for ``dtypes``, the most used first.

    Examples
    --------
    >>> len(jobs(["float32"]))
    24
    """
    found = []
    for operation in _OPERATIONS:
        for dtype in dtypes:
            for family in _FAMILIES:
                if family == "rows" and operation.endswith("_fused"):
                    continue
                for build in _BUILDS:
                    found.append(Job(str(np.dtype(dtype)), family, build, operation))
    return found


def _arrays(job):
    """An ``(outer, C, inner)`` input of the job's family and build, and its dtypes.

    Returns
    -------
    tuple
        ``(x3, compute dtype, per-channel dtype)``.
    """
    from . import _config

    compute = np.float32 if job.dtype == "float16" else np.dtype(job.dtype).type
    channel = np.float64 if job.dtype in ("float16", "float64") else np.float32
    C = 4
    itemsize = np.dtype(compute).itemsize
    inner = 1 if job.family == "rows" else 64
    # parallel: one row of values more than the serial limit
    outer = 2 if job.build == "serial" else _config.SERIAL_BYTES // (C * inner * itemsize) + 1
    x3 = np.random.default_rng(0).standard_normal((outer, C, inner)).astype(compute)
    return x3, compute, channel


def run_job(job):
    """Compile the kernels of ``job`` (in this process, into the on-disk cache).

    Parameters
    ----------
    job : Job

    Returns
    -------
    float
        Seconds it took.
    """
    from . import _cpu_backend, cpu

    start = time.perf_counter()
    x3, compute, channel = _arrays(job)
    C = x3.shape[1]
    gamma, beta = np.ones(C, channel), np.zeros(C, channel)
    # the statistics as the forward saves them: float64 for float64 data, else float32
    stats = np.float64 if compute is np.float64 else np.float32
    mean, invstd = np.zeros(C, stats), np.ones(C, stats)
    out = np.empty_like(x3)
    # The parameters as users pass them (writable), and as the API fills in left-out ones
    # (read-only, which Numba compiles as another type).
    constant = np.ones(C, stats), np.zeros(C, stats)
    for a in constant:
        a.flags.writeable = False
    # the direct path's arrays as an (N, C) call passes them (the small-call drivers take
    # the caller's y, dy and dx as they are)
    x2, out2 = (x3[:, :, 0], out[:, :, 0]) if job.family == "rows" else (x3, out)
    for g, b in ((gamma, beta), constant):
        if job.operation in ("forward", "forward_fused"):
            cpu.forward_training(x3, g, b, 1e-5, False, out, fuse=job.operation == "forward_fused")
            if job.operation == "forward":  # the small calls' driver (rows, serial)
                _cpu_backend.direct_forward(x3, out2, g, b, 1e-5, False)
        elif job.operation in ("backward", "backward_fused"):
            saved = [(mean, invstd)]
            if g is gamma:  # the layer saves float64 statistics whatever the data's dtype
                saved.append((mean.astype(np.float64), invstd.astype(np.float64)))
            for m, s in saved:
                cpu.backward(x3, x3, m, s, g, b, False, out, fuse=job.operation == "backward_fused")
                if job.operation == "backward":  # the small calls' driver (rows, serial)
                    _cpu_backend.direct_backward(x2, x3, m, s, g, b, False, out2)
        elif job.operation == "frozen_backward":  # as the API and the layer call it
            _cpu_backend.direct_frozen_backward(x3, x3, mean, invstd, g, b, False, out)
            if g is gamma:  # the layer's fixed statistics are float64
                _cpu_backend.direct_frozen_backward(
                    x3, x3, mean.astype(np.float64), invstd.astype(np.float64), g, b, False, out
                )
        elif job.operation == "inference":
            cpu.inference(x3, mean.astype(channel), invstd.astype(channel), g, b, 1e-5, False, out)
            _cpu_backend.direct_inference(
                x3, out2, mean.astype(channel), invstd.astype(channel), g, b, 1e-5, False
            )
    if job.operation == "passes":  # of the guarded and synchronized paths
        mean64, m2 = cpu.moments(x3)
        invstd64 = 1.0 / np.sqrt(m2 / (x3.size // C) + 1e-5)
        coef = cpu.coefficients(mean64, invstd64, gamma, beta, compute)
        cpu.normalize(x3, coef, False, out)
        s_dy, s_dyx = cpu.grad_sums(x3, x3, coef, False)
        cpu.input_grad(
            x3, x3, coef, s_dy, s_dyx, x3.size // C, invstd64, gamma.astype(np.float64), False, out
        )
        cpu.running_values(
            np.zeros(C, channel),
            np.ones(C, channel),
            mean64,
            m2,
            2,
            0.1,
            True,
            np.empty(C, channel),
            np.empty(C, channel),
        )
    return time.perf_counter() - start


def _progress_bar(total, enabled):
    """A tqdm progress bar when asked for and tqdm is installed, else None."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="fastbn precompile", unit="kernel set")


def precompile(dtypes=DTYPES, *, processes=None, progress=True):
    """Compile every CPU kernel for ``dtypes`` into Numba's on-disk cache, in parallel.

    Later processes (with the same cache directory: ``NUMBA_CACHE_DIR``, or Numba's
    default next to the package) then load the kernels instead of compiling them on
    their first call. Safe to run while other processes compile or load the same kernels
    (the cache is locked between processes), and cheap to run again (what is cached is
    loaded, not compiled).

    Parameters
    ----------
    dtypes : sequence of str, optional
        Data dtypes: ``float32``, ``float64``, ``float16``.
    processes : int, optional
        Worker processes (default: the CPU count, at most the number of jobs). 1 compiles
        in this process.
    progress : bool, optional
        Show a progress bar (tqdm, when installed).

    Returns
    -------
    dict
        ``{"jobs": n, "processes": p, "seconds": wall time}``.

    Raises
    ------
    ValueError
        An unsupported dtype.

    Examples
    --------
    >>> import fastbn
    >>> result = fastbn.precompile(["float64"], processes=1, progress=False)
    >>> result["jobs"] > 0 and result["processes"]
    1
    """
    dtypes = [str(np.dtype(d)) for d in dtypes]
    bad = [d for d in dtypes if d not in ("float16", "float32", "float64")]
    if bad:
        raise ValueError(f"dtypes must be float16, float32 or float64, got {bad}")
    todo = jobs(dtypes)
    if processes is None:
        processes = os.cpu_count() or 1
    processes = max(1, min(int(processes), len(todo)))
    bar = _progress_bar(len(todo), progress)
    start = time.perf_counter()
    try:
        if processes == 1:
            for job in todo:
                run_job(job)
                if bar is not None:
                    bar.update()
        else:
            # spawn: a fresh interpreter per worker (no forked Numba threading state)
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
                for future in concurrent.futures.as_completed(
                    [pool.submit(run_job, job) for job in todo]
                ):
                    future.result()
                    if bar is not None:
                        bar.update()
    finally:
        if bar is not None:
            bar.close()
    return {"jobs": len(todo), "processes": processes, "seconds": time.perf_counter() - start}


def add_parser(subparsers):
    """Add the ``precompile`` subcommand to the ``fastbn`` command's ``subparsers``."""
    p = subparsers.add_parser(
        "precompile",
        help="compile the CPU kernels ahead of use (into Numba's disk cache)",
        description=__doc__.split("\n\n")[0] + " Run it once per cache directory "
        "(NUMBA_CACHE_DIR): every later process loads the kernels instead of compiling them.",
    )
    p.add_argument(
        "--dtypes",
        default=",".join(DTYPES),
        metavar="D1,D2",
        help="data dtypes, comma-separated (float16, float32, float64; default %(default)s)",
    )
    p.add_argument(
        "--processes", type=int, default=None, help="worker processes (default: the CPU count)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run_cli)


def _run_cli(args):
    """Run ``fastbn precompile``; returns the exit status."""
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    try:
        result = precompile(dtypes, processes=args.processes, progress=not args.quiet)
    except ValueError as exc:
        print(f"fastbn precompile: {exc}")
        return 2
    if not args.quiet:
        print(
            f"compiled {result['jobs']} kernel sets in {result['seconds']:.1f} s "
            f"with {result['processes']} processes"
        )
    return 0
