"""pytest-benchmark timings of fastbn.torch against torch.nn.BatchNorm2d in a small CNN.

The calls of :mod:`benchmarks.torch_cnn` (``bn-layers``, ``train-step``, ``small-call``),
one benchmark per provider; ``python -m benchmarks.torch_cnn`` measures the same calls in
paired rounds, which is what docs/torch.md reports. Skipped without torch.
"""

from __future__ import annotations

import pytest

from benchmarks import torch_cnn

pytest.importorskip("torch")

#: ``(rounds, iterations)``: fewer rounds than the paired script, the same calls.
ROUNDS = {"bn-layers": (10, 1), "train-step": (3, 1), "small-call": (50, 20)}


@pytest.mark.parametrize("provider", ["torch", "fastbn"])
@pytest.mark.parametrize("op", torch_cnn.OPS)
def test_torch_cnn(benchmark, threads, op, provider):
    """Time ``op`` with ``provider``'s BatchNorm2d (the session's thread count for both).

    Parameters
    ----------
    benchmark : pytest_benchmark.fixture.BenchmarkFixture
    threads : int
        The session's thread count (``FASTBN_BENCH_THREADS``; docs/torch.md uses 2).
    op : str
    provider : str
    """
    call = torch_cnn.make_calls(op)[provider]
    call()  # compile, fault in
    rounds, iterations = ROUNDS[op]
    benchmark.group = f"torch-cnn {op}"
    benchmark.extra_info.update(provider=provider, op=op, threads=threads)
    benchmark.pedantic(call, rounds=rounds, iterations=iterations, warmup_rounds=1)
