"""The fused residual add ``relu(bn(x) + z)`` against the same thing in three calls.

A ResNet block ends in ``relu(bn(x) + z)``. fastbn computes it in the normalizing pass
(``residual=z, activation="relu"``); without that, it is a BatchNorm, an add and a ReLU,
each a pass over memory. Variants (*providers*), training (batch statistics) and
inference (running statistics):

``fastbn``
    ``fastbn.batch_norm_forward(x, gamma, beta, residual=z, activation="relu")``
    (``batch_norm_inference`` in inference): the fused kernel.
``fastbn+numpy``
    ``y = fastbn.batch_norm_forward(x, gamma, beta)``, then ``np.add(y, z, out=y)`` and
    ``np.maximum(y, 0, out=y)``: fastbn's kernels, the add and the ReLU in place (the
    cheapest unfused form; NumPy's element-wise loops run on one thread).
``torch``
    ``torch.relu(F.batch_norm(x, ...) + z)``, as a PyTorch ResNet writes it (the
    ``torchvision`` block does ``out += identity; out = relu(out)``: the same passes).

Bytes moved (x-sized arrays, when nothing stays in cache between passes)
-----------------------------------------------------------------------

==================  ==============  =====  ======  ==========================================
op                  variant         reads  writes  passes
==================  ==============  =====  ======  ==========================================
residual_forward    fused           3      1       statistics (x); normalize + add + ReLU
                                                   (x, z -> y)
residual_forward    unfused         5      3       statistics (x); normalize (x -> y);
                                                   add (y, z -> y); ReLU (y -> y)
residual_inference  fused           2      1       normalize + add + ReLU (x, z -> y)
residual_inference  unfused         4      3       normalize (x -> y); add; ReLU
==================  ==============  =====  ======  ==========================================

The fused training forward moves 4 arrays instead of 8 (half), inference 3 instead of 7
(43 %). Every benchmark's GB/s figure uses the fused count (so the ratios between
variants are ratios of times); ``extra_info`` carries each variant's own count too.

Run the pytest-benchmark suite (``pytest benchmarks/test_residual_cpu.py
--benchmark-only``) or the paired comparison, interleaved rounds of the three variants
(the drift of a shared machine stays out of the ratios; see :mod:`benchmarks.interleaved`):
``python -m benchmarks.residual``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import pytest

from benchmarks.cases import (
    CPU_CASES,
    EPS,
    import_fastbn,
    make_inputs,
    reduce_axes,
    torch_channels_at_1,
)
from benchmarks.conftest import _set_threads
from benchmarks.formatting import format_time

#: op -> variant -> (reads, writes) of x-sized arrays; see the module docstring.
TRAFFIC = {
    "residual_forward": {"fused": (3, 1), "unfused": (5, 3)},
    "residual_inference": {"fused": (2, 1), "unfused": (4, 3)},
}
OPS = tuple(TRAFFIC)

#: provider -> its variant in :data:`TRAFFIC`.
VARIANT = {"fastbn": "fused", "fastbn+numpy": "unfused", "torch": "unfused"}

#: The cases: the CPU suite's large float32 ones (the small one is overhead-bound).
CASES = tuple(case for case in CPU_CASES if not case.tag and case.dtype == "float32")


def bytes_moved(op, variant, nbytes):
    """Bytes ``variant`` of ``op`` moves on an x of ``nbytes`` bytes.

    Examples
    --------
    >>> bytes_moved("residual_forward", "fused", 100), bytes_moved("residual_forward", "unfused", 100)
    (400, 800)
    """
    reads, writes = TRAFFIC[op][variant]
    return (reads + writes) * int(nbytes)


def residual_of(inputs):
    """The residual ``z`` of a case: seeded normal values in x's layout and dtype."""
    rng = np.random.default_rng(20261207)
    return rng.standard_normal(inputs.x.shape, dtype=inputs.x.dtype)


def provider(name, op, inputs, z):
    """A no-argument callable doing one call of ``op`` by provider ``name``.

    Parameters
    ----------
    name : str
        A key of :data:`VARIANT`.
    op : str
        One of :data:`OPS`.
    inputs : benchmarks.cases.Inputs
    z : numpy.ndarray
        The residual.

    Returns
    -------
    callable
        Each allocates its output, as a user's call does. Skips the test when PyTorch
        is asked for and missing.
    """
    d, axis = inputs, inputs.case.axis
    training = op == "residual_forward"
    if name == "torch":
        torch = pytest.importorskip("torch")
        functional = torch.nn.functional
        x, zt = torch_channels_at_1(torch, d.x, axis), torch_channels_at_1(torch, z, axis)
        weight, bias = torch.from_numpy(d.gamma), torch.from_numpy(d.beta)
        rm, rv = torch.from_numpy(d.running_mean), torch.from_numpy(d.running_var)
        if training:
            return lambda: torch.relu(
                functional.batch_norm(x, None, None, weight, bias, training=True, eps=EPS) + zt
            )
        return lambda: torch.relu(
            functional.batch_norm(x, rm, rv, weight, bias, training=False, eps=EPS) + zt
        )
    fastbn = import_fastbn()
    if name == "fastbn":
        if training:
            return lambda: fastbn.batch_norm_forward(
                d.x, d.gamma, d.beta, axis=axis, eps=EPS, residual=z, activation="relu"
            )
        return lambda: fastbn.batch_norm_inference(
            d.x, d.running_mean, d.running_var, d.gamma, d.beta, axis=axis, eps=EPS,
            residual=z, activation="relu",
        )  # fmt: skip

    def unfused():
        if training:
            y = fastbn.batch_norm_forward(d.x, d.gamma, d.beta, axis=axis, eps=EPS)[0]
        else:
            y = fastbn.batch_norm_inference(
                d.x, d.running_mean, d.running_var, d.gamma, d.beta, axis=axis, eps=EPS
            )
        np.add(y, z, out=y)
        np.maximum(y, 0, out=y)
        return y

    return unfused


def check_agreement(inputs, z):
    """The three variants compute the same ``y`` (to float32 rounding): a benchmark of
    different results would mean nothing."""
    _, param_shape_of = reduce_axes(inputs.x.ndim, inputs.case.axis)
    for op in OPS:
        results = {}
        for name in VARIANT:
            try:
                y = provider(name, op, inputs, z)()
            except pytest.skip.Exception:
                continue
            y = y[0] if isinstance(y, tuple) else y  # batch_norm_forward: (y, mean, invstd)
            results[name] = np.asarray(y.movedim(1, inputs.case.axis) if name == "torch" else y)
        reference = results["fastbn+numpy"]
        for name, y in results.items():
            np.testing.assert_allclose(y, reference, rtol=1e-4, atol=1e-4, err_msg=f"{op} {name}")


def measure(case, op, rounds=30, progress=print):
    """Time the three variants of ``op`` on ``case`` in interleaved rounds.

    Returns
    -------
    dict
        ``{"case", "op", "rounds", "threads", "times": {provider: median s},
        "ratios": {provider: median over rounds of its time over fastbn's},
        "bytes": {provider: bytes its variant moves}}``.
    """
    threads = _set_threads()
    inputs = make_inputs(case)
    z = residual_of(inputs)
    calls = {}
    for name in VARIANT:
        try:
            calls[name] = provider(name, op, inputs, z)
        except pytest.skip.Exception:
            pass
    for call in calls.values():  # compile, fault the outputs in
        call()
    times = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    result = {
        "case": case.id,
        "op": op,
        "rounds": rounds,
        "threads": threads,
        "times": {name: statistics.median(t) for name, t in times.items()},
        "ratios": {
            name: statistics.median(a / b for a, b in zip(t, times["fastbn"]))
            for name, t in times.items()
        },
        "bytes": {name: bytes_moved(op, VARIANT[name], case.nbytes) for name in calls},
    }
    if progress:
        progress(format_table([result]).splitlines()[-1])
    return result


def format_table(results):
    """Results of :func:`measure` as a Markdown table.

    Examples
    --------
    >>> r = {"case": "NC-8x4-float32", "op": "residual_inference", "rounds": 3,
    ...      "times": {"fastbn": 1e-3, "fastbn+numpy": 2e-3}, "ratios": {"fastbn": 1.0,
    ...      "fastbn+numpy": 2.0}, "bytes": {"fastbn": 384, "fastbn+numpy": 896}}
    >>> print(format_table([r]))
    | case | op | rounds | fused | fastbn+numpy (x fused) | torch (x fused) | bytes fused / unfused |
    |---|---|---:|---:|---:|---:|---:|
    | NC-8x4-float32 | residual_inference | 3 | 1 ms | 2 ms (2.00x) | - | 384 / 896 |
    """
    lines = [
        "| case | op | rounds | fused | fastbn+numpy (x fused) | torch (x fused) "
        "| bytes fused / unfused |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        cells = []
        for name in ("fastbn+numpy", "torch"):
            if name in r["times"]:
                cells.append(f"{format_time(r['times'][name])} ({r['ratios'][name]:.2f}x)")
            else:
                cells.append("-")
        lines.append(
            f"| {r['case']} | {r['op']} | {r['rounds']} | {format_time(r['times']['fastbn'])} "
            f"| {cells[0]} | {cells[1]} | {r['bytes']['fastbn']} / {r['bytes']['fastbn+numpy']} |"
        )
    return "\n".join(lines)


def main(argv=None):
    """Command line: the paired comparison on every case of :data:`CASES`."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.residual", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    results = []
    for case in CASES:
        inputs = make_inputs(case)
        check_agreement(inputs, residual_of(inputs))
        for op in OPS:
            results.append(measure(case, op, rounds=args.rounds, progress=print))
    print(format_table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
