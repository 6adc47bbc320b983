"""Masked statistics (``mask=``) against the unmasked call, in paired rounds.

The issue's target: a masked call at most 1.3x the unmasked one on the large cases. Every
round times ``iterations`` calls of the unmasked and of the masked call in turn (the order
alternating between rounds, as :mod:`benchmarks.interleaved` does), so that both see the
same machine state; the ratio is the median of the per-round ratios.

Two masks per case (:func:`make_mask`, x's shape without the channel axis, the same for
every call): ``"padding"``, what padded batches look like (each sample keeps a leading
block of its positions, a random 50-100% along each non-batch axis; for a 2-D batch, the
first 75% of the rows), and ``"random"``, a random 75% of the positions, the worst case for
the memory streams of the rows family (its statistics read only the True rows). The forward is ``batch_norm_forward`` (masked: the
statistics pass over the True positions, then the normalize pass over every position);
the backward is ``batch_norm_backward`` with the same mask (the gradient sums over every
position, then dx with the masked terms).

Run ``python -m benchmarks.masked`` (``--json`` saves the results); the pytest-benchmark
suite times the same calls in ``benchmarks/test_masked_cpu.py``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

import numpy as np

from benchmarks.cases import CPU_CASES, EPS, import_fastbn, make_inputs
from benchmarks.conftest import _set_threads
from benchmarks.formatting import format_time

#: The operations compared.
MASKED_OPS = ("forward", "backward")

#: ``(case, rounds, iterations)``: the suite's large cases and its small one.
CASES = tuple((case, 30, 1) for case in CPU_CASES if not case.tag) + tuple(
    (case, 100, 20) for case in CPU_CASES if case.tag == "small"
)


#: The masks measured (see the module docstring).
MASK_KINDS = ("padding", "random")


@functools.cache
def make_mask(case, kind="padding"):
    """The mask of a case: x's shape without the channel axis (see the module docstring).

    Examples
    --------
    >>> from benchmarks.cases import Case
    >>> make_mask(Case("NCHW", (2, 3, 4, 5), 1, "float32")).shape
    (2, 4, 5)
    >>> make_mask(Case("NC", (8, 3), 1, "float32")).tolist()
    [True, True, True, True, True, True, False, False]
    """
    axis = case.axis % len(case.shape)
    shape = case.shape[:axis] + case.shape[axis + 1 :]
    rng = np.random.default_rng(7)
    if kind == "random":
        return rng.random(shape) < 0.75
    if len(shape) == 1:
        return np.arange(shape[0]) < int(0.75 * shape[0])
    mask = np.ones(shape, bool)
    for d in range(1, len(shape)):
        lengths = np.ceil(rng.uniform(0.5, 1.0, shape[0]) * shape[d])
        index = np.arange(shape[d]).reshape([1] * d + [-1] + [1] * (len(shape) - d - 1))
        mask &= index < lengths.reshape([-1] + [1] * (len(shape) - 1))
    return mask


def masked_provider(op, inputs, mask):
    """A no-argument callable doing one fastbn call of ``op`` (``"forward"`` or
    ``"backward"``) with ``mask`` (None: the unmasked call)."""
    fastbn = import_fastbn()
    d, axis = inputs, inputs.case.axis
    if op == "forward":
        return lambda: fastbn.batch_norm_forward(
            d.x, d.gamma, d.beta, axis=axis, eps=EPS, mask=mask
        )
    return lambda: fastbn.batch_norm_backward(
        d.dy, d.x, d.mean, d.invstd, d.gamma, d.beta, axis=axis, mask=mask
    )


def measure(case, rounds=20, iterations=1, ops=MASKED_OPS, kind="padding", progress=print):
    """Median seconds of the unmasked and masked calls and the median per-round ratio.

    Returns
    -------
    dict
        ``{"case", "mask", "rounds", "iterations", "threads", "ops": {op: {"unmasked_s",
        "masked_s", "ratio"}}}``.
    """
    threads = _set_threads()
    inputs = make_inputs(case)
    mask = make_mask(case, kind)
    result = {
        "case": case.id,
        "mask": kind,
        "rounds": rounds,
        "iterations": iterations,
        "threads": threads,
        "ops": {},
    }
    for op in ops:
        calls = {
            "unmasked": masked_provider(op, inputs, None),
            "masked": masked_provider(op, inputs, mask),
        }
        for call in calls.values():  # compile, and fault the outputs in
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
        ratios = [m / u for u, m in zip(times["unmasked"], times["masked"])]
        result["ops"][op] = {
            "unmasked_s": statistics.median(times["unmasked"]),
            "masked_s": statistics.median(times["masked"]),
            "ratio": statistics.median(ratios),
        }
        if progress:
            progress(f"{kind} mask {case.id} {op}: {result['ops'][op]['ratio']:.2f}x unmasked")
    return result


def format_table(results):
    """Results of :func:`measure` as a Markdown table.

    Examples
    --------
    >>> r = {"case": "NC-65536x256-float32", "mask": "padding", "rounds": 20, "iterations": 1,
    ...      "ops": {"forward": {"unmasked_s": 0.01, "masked_s": 0.012, "ratio": 1.2}}}
    >>> print(format_table([r]))
    | case | mask | op | rounds x calls | unmasked | masked | masked / unmasked (median of rounds) |
    |---|---|---|---:|---:|---:|---:|
    | NC-65536x256-float32 | padding | forward | 20 x 1 | 10 ms | 12 ms | 1.20x |
    """
    lines = [
        "| case | mask | op | rounds x calls | unmasked | masked "
        "| masked / unmasked (median of rounds) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for result in results:
        for op, r in result["ops"].items():
            lines.append(
                f"| {result['case']} | {result['mask']} | {op} | "
                f"{result['rounds']} x {result['iterations']} | "
                f"{format_time(r['unmasked_s'])} | {format_time(r['masked_s'])} | "
                f"{r['ratio']:.2f}x |"
            )
    return "\n".join(lines)


def main(argv=None):
    """Command line: measure every case of :data:`CASES`, print the table."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.masked", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("-k", default="", help="only the cases whose id contains this")
    args = parser.parse_args(argv)
    results = [
        measure(case, rounds=rounds, iterations=iterations, kind=kind)
        for case, rounds, iterations in CASES
        if args.k in case.id
        for kind in MASK_KINDS
    ]
    print(format_table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
