"""Fixtures of the benchmark suite: thread counts, copy bandwidth, recording of results.

``pytest benchmarks --benchmark-only`` runs the suite; it is kept out of the default test
run by ``testpaths = ["tests"]`` in ``pyproject.toml``.

Environment variables
---------------------
FASTBN_BENCH_THREADS
    Threads for Numba and PyTorch (default: Numba's maximum, ``NUMBA_NUM_THREADS``).
"""

from __future__ import annotations

import os

import numba
import pytest

from benchmarks import machine
from benchmarks.bandwidth import CopyBandwidthCache, copy_bandwidth, cuda_copy_bandwidth
from benchmarks.cases import bytes_moved

_COPY_CACHES = {}
_RUN_STATE = {}


def benchmark_threads():
    """Return the thread count the suite runs Numba and PyTorch with.

    Returns
    -------
    int
        ``FASTBN_BENCH_THREADS`` if set, else ``numba.config.NUMBA_NUM_THREADS``.
    """
    return int(os.environ.get("FASTBN_BENCH_THREADS", numba.config.NUMBA_NUM_THREADS))


def _set_threads():
    """Give Numba and PyTorch (when installed) the same thread count.

    Returns
    -------
    int
        The thread count now in force, read back from ``numba.get_num_threads()``.
    """
    threads = benchmark_threads()
    numba.set_num_threads(threads)
    try:
        import torch
    except ImportError:
        pass
    else:
        torch.set_num_threads(threads)
        assert torch.get_num_threads() == numba.get_num_threads()
    return numba.get_num_threads()


@pytest.fixture(scope="session", autouse=True)
def threads(request):
    """Set and return the common thread count of Numba and PyTorch for the whole run.

    Also samples, once, how busy the machine is with other work before the first
    benchmark (see :func:`benchmarks.machine.cpu_busy_fraction`).

    Parameters
    ----------
    request : pytest.FixtureRequest
        Gives the ``--benchmark-disable`` option.

    Returns
    -------
    int
        The thread count.
    """
    if not request.config.getoption("benchmark_disable", False):
        _RUN_STATE["cpu_busy_before"] = machine.cpu_busy_fraction()
    return _set_threads()


@pytest.fixture(scope="session")
def cpu_copy_bandwidth(threads):
    """Copy bandwidths of this CPU, measured lazily in this run, once per array size.

    Parameters
    ----------
    threads : int
        The session's thread count.

    Returns
    -------
    CopyBandwidthCache
        ``.large`` (256 MiB) and ``.at(nbytes)``.
    """
    cache = CopyBandwidthCache(lambda nbytes: copy_bandwidth(nbytes, threads=threads))
    _COPY_CACHES["cpu"] = cache
    return cache


@pytest.fixture(scope="session")
def gpu_copy_bandwidth():
    """Device-to-device copy bandwidths of the CUDA GPU, measured lazily in this run.

    Returns
    -------
    CopyBandwidthCache
        ``.large`` (256 MiB) and ``.at(nbytes)``.
    """
    cache = CopyBandwidthCache(cuda_copy_bandwidth)
    _COPY_CACHES["cuda"] = cache
    return cache


@pytest.fixture
def record_result(threads):
    """Return :func:`record` with the session's thread count filled in.

    Parameters
    ----------
    threads : int
        The session's thread count.

    Returns
    -------
    callable
        ``record_result(benchmark, provider=..., op=..., case=..., device=...,
        copy_cache=...)``; it also records the share of the CPUs that other processes
        took from this fixture's set-up (before the inputs were built) to the end of the
        recording (which may include a copy-bandwidth measurement).
    """
    monitor = machine.OtherProcessesMonitor()

    def record_result(benchmark, **kwargs):
        record(benchmark, threads=threads, **kwargs)  # may measure a copy bandwidth too
        benchmark.extra_info["other_processes_cpu"] = monitor.fraction()

    return record_result


def record(benchmark, *, provider, op, case, device, copy_cache, threads):
    """Fill ``benchmark.extra_info`` after a timed run: what ran, bytes, GB/s, roofline.

    Parameters
    ----------
    benchmark : pytest_benchmark.fixture.BenchmarkFixture
        The fixture, after ``pedantic`` ran.
    provider : str
        ``"fastbn"``, ``"torch"`` or ``"numpy"``.
    op : str
        One of :data:`benchmarks.cases.OPS`.
    case : benchmarks.cases.Case
        The shape, layout and dtype.
    device : str
        ``"cpu"`` or ``"cuda"``.
    copy_cache : CopyBandwidthCache
        Copy bandwidths of that device, measured in this run.
    threads : int
        Thread count (CPU) used by every provider.

    Notes
    -----
    ``frac_copy`` is GB/s over the copy bandwidth measured **at the size of x** (same
    cache regime as the benchmark); ``frac_copy_large`` is over the large-array (DRAM)
    copy bandwidth. With ``--benchmark-disable`` nothing is timed and only the description
    of the benchmark is recorded.
    """
    moved = bytes_moved(op, case.nbytes)
    info = benchmark.extra_info
    info.update(
        provider=provider,
        op=op,
        case=case.id,
        shape=list(case.shape),
        dtype=case.dtype,
        layout=case.layout,
        axis=case.axis,
        device=device,
        threads=threads,
        x_bytes=case.nbytes,
        bytes_moved=moved,
    )
    if benchmark.disabled or benchmark.stats is None:
        return
    median = benchmark.stats.stats.median
    gbps = moved / median / 1e9
    same, large = copy_cache.at(case.nbytes), copy_cache.large
    info.update(
        median_s=median,
        gbps=gbps,
        copy_gbps_same_size=same.gbps,
        copy_method_same_size=same.method,
        copy_gbps_large=large.gbps,
        copy_method_large=large.method,
        copy_large_bytes=large.nbytes,
        frac_copy=gbps / same.gbps,
        frac_copy_large=gbps / large.gbps,
        frac_copy_uses="copy_gbps_same_size",
    )


def pytest_benchmark_update_machine_info(config, machine_info):
    """Add the machine description of :func:`benchmarks.machine.describe`.

    Parameters
    ----------
    config : pytest.Config
        Unused.
    machine_info : dict
        pytest-benchmark's machine description, updated in place under ``"fastbn"``.
    """
    info = machine.describe(threads=benchmark_threads())
    info["cpu_busy_before"] = _RUN_STATE.get("cpu_busy_before")
    info["cpu_busy_after"] = machine.cpu_busy_fraction()
    machine_info["fastbn"] = info


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Add every copy-bandwidth measurement of the run to the JSON.

    Parameters
    ----------
    config : pytest.Config
        Unused.
    benchmarks : list
        Unused.
    output_json : dict
        The JSON document, updated in place under ``"copy_bandwidth"``.
    """
    output_json["copy_bandwidth"] = {
        device: cache.measured() for device, cache in _COPY_CACHES.items()
    }
