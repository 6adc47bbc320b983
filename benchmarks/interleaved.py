"""fastbn and PyTorch in interleaved rounds: the machine's drift stays out of the ratio.

pytest-benchmark times all the rounds of one provider, then all those of the next. A call
is then at the mercy of the machine's state during that time: on the 2-core VM where
fastbn is developed, the same ``(256, 64)`` call took 10 µs in one process and 15 µs in
the next, for fastbn and PyTorch alike, which swung the suite's speed-up of the small
case between 0.7x and 1.4x from one run to another, and the large cases drift by ±10%
between providers in the same way. Here every round times ``iterations`` calls of each
provider in turn (the order alternating between rounds), so that both see the same
machine state, and the speed-up is the median of the per-round ratios. PyTorch runs its
own kernels (``torch.ops.aten.native_batch_norm`` / ``native_batch_norm_backward``, no
Python wrapper: :func:`benchmarks.cases.torch_native_provider`). The suite's
table keeps its own numbers; this is the paired comparison. Pairing removes the drift in
time, not every difference between processes: two runs on that VM still disagreed by up
to 15% on a cell.

:data:`CASES` are the suite's small case (200 rounds of 50 calls) and its large float32
cases (40 rounds of one call), every operation.

Run ``python -m benchmarks.interleaved``; the report (``python -m benchmarks.report``)
runs it too and puts the result in its JSON and in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from benchmarks.cases import CPU_CASES, OPS, fastbn_provider, make_inputs, torch_native_provider
from benchmarks.conftest import _set_threads
from benchmarks.formatting import format_time

#: The case measured: the suite's small call.
SMALL = next(case for case in CPU_CASES if case.tag == "small")

#: PyTorch through its own kernels (``native_batch_norm``, ``native_batch_norm_backward``),
#: no Python wrapper: the small-call target's yardstick (issue 23).
PROVIDERS = {"fastbn": fastbn_provider, "torch": torch_native_provider}

#: ``(case, rounds, iterations)`` measured by :func:`measure_all`.
CASES = ((SMALL, 200, 50),) + tuple(
    (case, 40, 1) for case in CPU_CASES if not case.tag and case.dtype == "float32"
)


def measure(case=SMALL, ops=OPS, rounds=200, iterations=50, progress=print):
    """Time fastbn and PyTorch on ``case`` in interleaved rounds.

    Parameters
    ----------
    case : benchmarks.cases.Case
    ops : sequence of str
        Operations (see :data:`benchmarks.cases.OPS`).
    rounds : int
        Rounds per operation; each times ``iterations`` calls of every provider.
    iterations : int
    progress : callable, optional
        Called with a line of text per operation.

    Returns
    -------
    dict or None
        ``{"case", "rounds", "iterations", "threads", "ops": {op: {"fastbn_s", "torch_s",
        "speedup", "fastbn_faster"}}}``: median seconds per call of each provider, the
        median over rounds of torch's time over fastbn's, and the fraction of rounds in
        which fastbn was faster. None when PyTorch is not installed.

    Examples
    --------
    >>> r = measure(rounds=3, iterations=2, ops=("inference",), progress=None)  # doctest: +SKIP
    >>> sorted(r["ops"]["inference"])  # doctest: +SKIP
    ['fastbn_faster', 'fastbn_s', 'speedup', 'torch_s']
    """
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    threads = _set_threads()
    inputs = make_inputs(case)
    result = {
        "case": case.id,
        "rounds": rounds,
        "iterations": iterations,
        "threads": threads,
        "ops": {},
    }
    for op in ops:
        calls = {name: make(op, inputs) for name, make in PROVIDERS.items()}
        for call in calls.values():  # compile, and fault the outputs in
            for _ in range(iterations):
                call()
        times = {name: [] for name in calls}
        names = list(calls)
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                call = calls[name]
                start = time.perf_counter()
                for _ in range(iterations):
                    call()
                times[name].append((time.perf_counter() - start) / iterations)
        ratios = [t / f for f, t in zip(times["fastbn"], times["torch"])]
        result["ops"][op] = {
            "fastbn_s": statistics.median(times["fastbn"]),
            "torch_s": statistics.median(times["torch"]),
            "speedup": statistics.median(ratios),
            "fastbn_faster": sum(q > 1 for q in ratios) / len(ratios),
        }
        if progress:
            progress(f"interleaved {case.id} {op}: {result['ops'][op]['speedup']:.2f}x PyTorch")
    return result


def measure_all(cases=CASES, progress=print):
    """:func:`measure` on every ``(case, rounds, iterations)`` of ``cases``.

    Returns
    -------
    list of dict or None
        One result per case; None when PyTorch is not installed.
    """
    results = [
        measure(case, rounds=rounds, iterations=iterations, progress=progress)
        for case, rounds, iterations in cases
    ]
    return None if None in results else results


def format_table(results):
    """Results of :func:`measure` as a Markdown table.

    Parameters
    ----------
    results : list of dict

    Returns
    -------
    str

    Examples
    --------
    >>> r = {"case": "small-NC-256x64-float32", "rounds": 200, "iterations": 50,
    ...      "ops": {"inference": {"fastbn_s": 1e-5, "torch_s": 1.5e-5, "speedup": 1.5,
    ...                            "fastbn_faster": 0.9}}}
    >>> print(format_table([r]))
    | case | op | rounds x calls | fastbn | torch | vs torch (median of rounds) | rounds fastbn faster |
    |---|---|---:|---:|---:|---:|---:|
    | small-NC-256x64-float32 | inference | 200 x 50 | 10 us | 15 us | 1.50x | 90% |
    """
    lines = [
        "| case | op | rounds x calls | fastbn | torch | vs torch (median of rounds) "
        "| rounds fastbn faster |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for op, r in result["ops"].items():
            lines.append(
                f"| {result['case']} | {op} | {result['rounds']} x "
                f"{result['iterations']} | {format_time(r['fastbn_s'])} | "
                f"{format_time(r['torch_s'])} | {r['speedup']:.2f}x | "
                f"{r['fastbn_faster']:.0%} |"
            )
    return "\n".join(lines)


def main(argv=None):
    """Command line: measure every case of :data:`CASES`, print the table, optionally
    save the JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.interleaved", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--threads", type=int, help="threads of Numba and PyTorch (default: the suite's)"
    )
    parser.add_argument(
        "--small", action="store_true", help="the small case only (200 rounds of 50 calls)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        os.environ["FASTBN_BENCH_THREADS"] = str(args.threads)
    results = measure_all(CASES[:1] if args.small else CASES)
    if results is None:
        print("PyTorch is not installed: nothing to compare", file=sys.stderr)
        return 1
    print(format_table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
