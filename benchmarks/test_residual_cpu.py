"""CPU benchmarks of the fused residual add ``relu(bn(x) + z)`` (see
:mod:`benchmarks.residual`): fastbn's fused kernel, fastbn + a NumPy add + ReLU, and
PyTorch's ``relu(batch_norm(x) + z)``, in training and inference.

Run with ``pytest benchmarks/test_residual_cpu.py --benchmark-only``. ``extra_info``
carries the bytes each variant moves and the GB/s and fraction of the copy bandwidth
(measured in the same run) at the fused variant's byte count. The entries name their
operation ``residual_op`` (not ``op``), so the main suite's report, whose tables are of
the four BatchNorm operations, leaves them out; ``python -m benchmarks.residual`` gives
their paired table.
"""

from __future__ import annotations

import pytest

from benchmarks.cases import make_inputs
from benchmarks.residual import CASES, OPS, VARIANT, bytes_moved, provider, residual_of


@pytest.mark.parametrize("name", list(VARIANT))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_residual(benchmark, threads, cpu_copy_bandwidth, case, op, name):
    """Time one variant of ``op`` on ``case`` and record its traffic and throughput."""
    inputs = make_inputs(case)
    call = provider(name, op, inputs, residual_of(inputs))
    call()  # compilation, first-touch of the outputs: not timed
    benchmark.group = f"{op} {case.id}"
    benchmark.pedantic(call, rounds=case.rounds, iterations=case.iterations, warmup_rounds=2)
    fused = bytes_moved(op, "fused", case.nbytes)
    info = benchmark.extra_info
    info.update(
        provider=name,
        residual_op=op,
        case=case.id,
        device="cpu",
        threads=threads,
        x_bytes=case.nbytes,
        variant=VARIANT[name],
        variant_bytes=bytes_moved(op, VARIANT[name], case.nbytes),
        bytes_moved=fused,
    )
    if benchmark.disabled or benchmark.stats is None:
        return
    median = benchmark.stats.stats.median
    copy = cpu_copy_bandwidth.at(case.nbytes)
    info.update(median_s=median, gbps=fused / median / 1e9, copy_gbps_same_size=copy.gbps)
    info["frac_copy"] = info["gbps"] / copy.gbps
