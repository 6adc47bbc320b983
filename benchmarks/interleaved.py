"""The small call, timed in interleaved rounds: fastbn and PyTorch alternate round by round.

pytest-benchmark times all the rounds of one provider, then all those of the next. A call
of a few microseconds is then at the mercy of the machine's state during that fraction
of a second: on the 2-core VM where fastbn is developed, the same ``(256, 64)`` call took
10 µs in one process and 15 µs in the next, for fastbn and PyTorch alike, which swung the
suite's speed-up of the small case between 0.7x and 1.4x from one run to another. Here
every round times ``iterations`` calls of each provider in turn (the order alternating
between rounds), so that both see the same machine state, and the speed-up is the
median of the per-round ratios. The suite's table keeps its own numbers; this is the
comparison of the small call that one can trust on a noisy machine.

Run ``python -m benchmarks.interleaved``; the report (``python -m benchmarks.report``)
runs it too and puts the result in its JSON and in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from benchmarks.cases import CPU_CASES, OPS, fastbn_provider, make_inputs, torch_provider
from benchmarks.conftest import _set_threads

#: The case measured: the suite's small call.
SMALL = next(case for case in CPU_CASES if case.tag == "small")

PROVIDERS = {"fastbn": fastbn_provider, "torch": torch_provider}


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
    result = {"case": case.id, "rounds": rounds, "iterations": iterations, "threads": threads,
              "ops": {}}
    for op in ops:
        calls = {name: make(op, inputs) for name, make in PROVIDERS.items()}
        for call in calls.values():  # compile, and fault the outputs in
            for _ in range(iterations):
                call()
        times = {name: [] for name in calls}
        names = list(calls)
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
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
            progress(f"interleaved {case.id} {op}: "
                     f"{result['ops'][op]['speedup']:.2f}x PyTorch")
    return result


def format_table(result):
    """The result of :func:`measure` as a Markdown table.

    Parameters
    ----------
    result : dict

    Returns
    -------
    str

    Examples
    --------
    >>> r = {"ops": {"inference": {"fastbn_s": 1e-5, "torch_s": 1.5e-5, "speedup": 1.5,
    ...                            "fastbn_faster": 0.9}}}
    >>> print(format_table(r))
    | op | fastbn | torch | vs torch (median of rounds) | rounds fastbn faster |
    |---|---:|---:|---:|---:|
    | inference | 10.0 us | 15.0 us | 1.50x | 90% |
    """
    lines = ["| op | fastbn | torch | vs torch (median of rounds) | rounds fastbn faster |",
             "|---|---:|---:|---:|---:|"]
    for op, r in result["ops"].items():
        lines.append(f"| {op} | {r['fastbn_s'] * 1e6:.1f} us | {r['torch_s'] * 1e6:.1f} us | "
                     f"{r['speedup']:.2f}x | {r['fastbn_faster']:.0%} |")
    return "\n".join(lines)


def main(argv=None):
    """Command line: measure, print the table, optionally save the JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.interleaved",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    result = measure(rounds=args.rounds, iterations=args.iterations)
    if result is None:
        print("PyTorch is not installed: nothing to compare", file=sys.stderr)
        return 1
    print(format_table(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
