"""GPU benchmarks: fastbn's CUDA kernels vs PyTorch/cuDNN, and the host-side overhead.

Skipped cleanly without a GPU, without ``fastbn.cuda_available``, and (for timings)
under the CUDA simulator. Every timed call synchronizes the device before it returns.
"""

from __future__ import annotations

import pytest

from benchmarks.cases import OPS, make_inputs
from benchmarks.cuda_cases import GPU_CASES, GPU_PROVIDERS, TINY_CASE, gpu_skip_reason


@pytest.fixture(scope="module")
def gpu(request):
    """Skip the module's tests when the GPU benchmarks cannot run.

    Parameters
    ----------
    request : pytest.FixtureRequest
        Gives the ``--benchmark-disable`` option.
    """
    enabled = not request.config.getoption("benchmark_disable", False)
    reason = gpu_skip_reason(benchmark_enabled=enabled)
    if reason:
        pytest.skip(reason)


def _run(benchmark, record_result, gpu_copy_bandwidth, case, op, provider):
    """Time one GPU provider's ``op`` on ``case`` and record its throughput.

    Parameters
    ----------
    benchmark : pytest_benchmark.fixture.BenchmarkFixture
        The timer.
    record_result : callable
        Fills ``extra_info``.
    gpu_copy_bandwidth : benchmarks.bandwidth.CopyBandwidthCache
        This run's device-to-device copy bandwidths.
    case : benchmarks.cases.Case
        Shape, layout, dtype, rounds.
    op : str
        The operation.
    provider : str
        ``"fastbn"`` or ``"torch"``.
    """
    call = GPU_PROVIDERS[provider](op, make_inputs(case))
    call()  # JIT compilation, cuDNN plan selection: not timed
    benchmark.group = f"cuda {op} {case.id}"
    benchmark.pedantic(call, rounds=case.rounds, iterations=case.iterations, warmup_rounds=3)
    record_result(
        benchmark, provider=provider, op=op, case=case, device="cuda", copy_cache=gpu_copy_bandwidth
    )


@pytest.mark.parametrize("provider", list(GPU_PROVIDERS))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda case: case.id)
def test_cuda(gpu, benchmark, record_result, gpu_copy_bandwidth, case, op, provider):
    """Time ``op`` on ``case`` on the GPU (see :func:`_run`)."""
    _run(benchmark, record_result, gpu_copy_bandwidth, case, op, provider)


@pytest.mark.parametrize("provider", list(GPU_PROVIDERS))
def test_cuda_host_overhead(gpu, benchmark, record_result, gpu_copy_bandwidth, provider):
    """Time one forward call on a tiny GPU input: the host-side cost of a call.

    Argument checks, kernel launches and the synchronization dominate at this size, so
    the median time is the fixed overhead every call pays; it is recorded in ``extra_info``
    as ``host_overhead_us``.
    """
    _run(benchmark, record_result, gpu_copy_bandwidth, TINY_CASE, "forward", provider)
    if benchmark.stats is not None:
        benchmark.extra_info["host_overhead_us"] = benchmark.stats.stats.median * 1e6
