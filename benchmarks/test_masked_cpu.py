"""CPU benchmarks of masked statistics: the masked and the unmasked fastbn call of each
case of ``CPU_CASES`` (see :mod:`benchmarks.masked` for the mask and the paired ratio).

Run with ``pytest benchmarks/test_masked_cpu.py --benchmark-only``; the benchmark group
puts the two calls of a case side by side.
"""

from __future__ import annotations

import pytest

from benchmarks.cases import CPU_CASES, make_inputs
from benchmarks.masked import MASK_KINDS, MASKED_OPS, make_mask, masked_provider


@pytest.mark.parametrize("variant", ["unmasked", *MASK_KINDS])
@pytest.mark.parametrize("op", MASKED_OPS)
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda case: case.id)
def test_masked_cpu(benchmark, record_result, cpu_copy_bandwidth, case, op, variant):
    """Time fastbn's ``op`` on ``case`` with one of the case's masks (``variant`` a kind
    of :data:`benchmarks.masked.MASK_KINDS`) or without (``"unmasked"``), and record its throughput (bytes: those of the unmasked operation, so that
    the GB/s of the two compare as their times do)."""
    mask = None if variant == "unmasked" else make_mask(case, variant)
    call = masked_provider(op, make_inputs(case), mask)
    call()  # compiles; faults the output pages in
    benchmark.group = f"mask {op} {case.id}"
    benchmark.pedantic(call, rounds=case.rounds, iterations=case.iterations, warmup_rounds=2)
    record_result(
        benchmark,
        provider=f"fastbn-{variant}",
        op=op,
        case=case,
        device="cpu",
        copy_cache=cpu_copy_bandwidth,
    )
