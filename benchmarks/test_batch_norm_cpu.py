"""CPU benchmarks: fastbn vs PyTorch vs NumPy, every op on every case of ``CPU_CASES``.

Run with ``pytest benchmarks --benchmark-only`` (select with ``-k``, e.g.
``-k "forward and NCHW"``). Each benchmark records in ``extra_info`` what ran, the bytes
it moves (see :mod:`benchmarks.cases`), its GB/s and its fraction of the copy bandwidth
measured in the same run (see :mod:`benchmarks.bandwidth`).
"""

from __future__ import annotations

import pytest

from benchmarks.cases import CPU_CASES, CPU_PROVIDERS, OPS, make_inputs


@pytest.mark.parametrize("provider", list(CPU_PROVIDERS))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda case: case.id)
def test_cpu(benchmark, record_result, cpu_copy_bandwidth, case, op, provider):
    """Time one provider's ``op`` on ``case`` and record its throughput.

    Parameters
    ----------
    benchmark : pytest_benchmark.fixture.BenchmarkFixture
        The timer.
    record_result : callable
        Fills ``extra_info`` (see ``benchmarks/conftest.py``).
    cpu_copy_bandwidth : benchmarks.bandwidth.CopyBandwidthCache
        This run's copy bandwidths.
    case : benchmarks.cases.Case
        Shape, layout, dtype, rounds.
    op : str
        The operation.
    provider : str
        ``"fastbn"``, ``"torch"`` or ``"numpy"``.
    """
    call = CPU_PROVIDERS[provider](op, make_inputs(case))
    # The first call compiles (fastbn's JIT) and faults in fresh output pages; it is not
    # timed, nor are the warm-up rounds.
    call()
    benchmark.group = f"{op} {case.id}"
    benchmark.pedantic(call, rounds=case.rounds, iterations=case.iterations, warmup_rounds=2)
    record_result(
        benchmark, provider=provider, op=op, case=case, device="cpu", copy_cache=cpu_copy_bandwidth
    )
