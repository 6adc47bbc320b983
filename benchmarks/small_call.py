"""Where a small call's microseconds go: each stage of the CPU's direct path, in paired rounds.

A ``(256, 64)`` float32 batch is 64 KiB: the kernel reads it from L1/L2 in a few
microseconds, so the host side (the public function's wrappers, the argument checks, the
allocation of the output, Numba's dispatch, which costs per argument) is a large part of
the call. This script times, for the training forward, inference and backward:

``public``
    The public function, as a user calls it (``fastbn.batch_norm_forward(x, g, b)``).
``host``
    The backend's direct-path function on the canonical view, output allocated
    (:func:`fastbn._cpu_backend.direct_forward` and friends): the public call less its
    wrappers and its checks.
``kernel``
    The compiled driver that the direct path calls (for this case, a small-call driver:
    ``cpu.small_forward_kernel`` and friends), every array preallocated.
``dispatch``
    A compiled function that does nothing, called with the kernel's arguments: Numba's
    dispatch (typing each argument, unboxing it).
``empty``
    ``numpy.empty`` of the output.

and PyTorch's own kernel (``torch.ops.aten.native_batch_norm`` / ``_backward``, no Python
wrapper) in the same rounds. Every round times ``iterations`` calls of each stage in turn
(the order rotating between rounds), so that all see the same machine state; each figure
is a median over rounds. The differences between stages are the breakdown docs/cpu.md
reports: wrappers and checks = public - host, allocation and plan = host - kernel,
computation = kernel - dispatch.

Run ``python -m benchmarks.small_call [--threads N]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numba
import numpy as np

from benchmarks.cases import CPU_CASES, EPS, import_fastbn, make_inputs
from benchmarks.formatting import format_time

#: The suite's small case.
SMALL = next(case for case in CPU_CASES if case.tag == "small")


@numba.njit(cache=False)
def _nothing(*args):
    """Take any arguments, do nothing: Numba's dispatch cost alone."""
    return 0


def stages(op, inputs):
    """The timed callables of ``op`` (see the module docstring).

    Parameters
    ----------
    op : {"forward", "inference", "backward"}
    inputs : benchmarks.cases.Inputs

    Returns
    -------
    dict
        ``{stage name: no-argument callable}``; ``"torch"`` only when PyTorch is installed.
    """
    fastbn = import_fastbn()
    from fastbn import _cpu_backend, cpu

    d = inputs
    x, dy, g, b = d.x, d.dy, d.gamma, d.beta
    x3 = x.reshape(x.shape[0], x.shape[1], 1)
    dy3 = dy.reshape(x3.shape)
    y3 = np.empty_like(x3)
    drivers = cpu.drivers_for(x3)  # the drivers the direct path calls
    found = {}
    if op == "forward":
        if drivers.small:
            kernel = cpu.small_forward_kernel
            args = (x3, EPS, g, b, False, y3, np.empty((2, x3.shape[1]), x.dtype))
        else:
            kernel = drivers.forward
            stats = np.empty((3, x3.shape[1]))
            args = (x3, drivers.chunk, EPS, g, b, False, y3, stats[0], stats[1], stats[2])
        found["public"] = lambda: fastbn.batch_norm_forward(x, g, b, eps=EPS)
        found["host"] = lambda: _cpu_backend.direct_forward(
            x3, np.empty(x.shape, x.dtype), g, b, EPS, False
        )
    elif op == "inference":
        kernel = cpu.small_inference_kernel if drivers.small else drivers.inference
        rm, rv = d.running_mean, d.running_var
        args = (x3, rm, rv, g, b, EPS, False, y3)
        found["public"] = lambda: fastbn.batch_norm_inference(x, rm, rv, g, b, eps=EPS)
        found["host"] = lambda: _cpu_backend.direct_inference(
            x3, np.empty(x.shape, x.dtype), rm, rv, g, b, EPS, False
        )
    else:
        grads = np.empty((2, x3.shape[1]), x.dtype)
        mean, invstd = d.mean, d.invstd
        if drivers.small:
            kernel = cpu.small_backward_kernel
            args = (dy3, x3, mean, invstd, g, b, False, y3, grads)
        else:
            kernel = drivers.backward
            args = (dy3, x3, drivers.chunk, mean, invstd, g, b, False, y3, grads[0], grads[1])
        found["public"] = lambda: fastbn.batch_norm_backward(dy, x, mean, invstd, g, b)
        found["host"] = lambda: _cpu_backend.direct_backward(
            dy3, x3, mean, invstd, g, b, False, np.empty(x3.shape, x.dtype)
        )
    found["kernel"] = lambda: kernel(*args)
    found["dispatch"] = lambda: _nothing(*args)
    found["empty"] = lambda: np.empty(x.shape, x.dtype)
    try:
        import torch
    except ImportError:
        return found
    tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
    tg, tb = torch.from_numpy(g), torch.from_numpy(b)
    trm, trv = torch.from_numpy(d.running_mean), torch.from_numpy(d.running_var)
    native_forward = torch.ops.aten.native_batch_norm
    native_backward = torch.ops.aten.native_batch_norm_backward
    if op == "forward":
        found["torch"] = lambda: native_forward(tx, tg, tb, None, None, True, 0.1, EPS)
    elif op == "inference":
        found["torch"] = lambda: native_forward(tx, tg, tb, trm, trv, False, 0.1, EPS)
    else:
        _, sm, si = native_forward(tx, tg, tb, None, None, True, 0.1, EPS)
        mask = [True, True, True]
        found["torch"] = lambda: native_backward(tdy, tx, tg, None, None, sm, si, True, EPS, mask)
    return found


def measure(op, case=SMALL, rounds=100, iterations=50):
    """Median seconds per call of every stage of ``op``, in rotating paired rounds.

    Returns
    -------
    dict
        ``{stage: seconds}``.

    Examples
    --------
    >>> t = measure("inference", rounds=2, iterations=2)  # doctest: +SKIP
    >>> t["kernel"] <= t["public"]  # doctest: +SKIP
    True
    """
    calls = stages(op, make_inputs(case))
    names = list(calls)
    for call in calls.values():
        for _ in range(iterations):
            call()
    times = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            call = calls[name]
            start = time.perf_counter()
            for _ in range(iterations):
                call()
            times[name].append((time.perf_counter() - start) / iterations)
    return {name: statistics.median(t) for name, t in times.items()}


def format_table(results, threads):
    """The breakdown of :func:`measure`'s results as a Markdown table."""
    lines = [
        f"| op ({threads} thread{'s' if threads > 1 else ''}) | public | wrappers + checks "
        "| allocation + plan | dispatch | computation | torch | torch / public |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for op, t in results.items():
        torch_s = t.get("torch")
        ratio = f"{torch_s / t['public']:.2f}x" if torch_s else "-"
        lines.append(
            f"| {op} | {format_time(t['public'])} | {format_time(t['public'] - t['host'])} "
            f"| {format_time(t['host'] - t['kernel'])} | {format_time(t['dispatch'])} "
            f"| {format_time(t['kernel'] - t['dispatch'])} "
            f"| {format_time(torch_s) if torch_s else '-'} "
            f"| {ratio} |"
        )
    return "\n".join(lines)


def main(argv=None):
    """Command line: the breakdown of the three operations, as a Markdown table."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.small_call", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args(argv)
    numba.set_num_threads(args.threads)
    try:
        import torch
    except ImportError:
        pass
    else:
        torch.set_num_threads(args.threads)
    results = {op: measure(op, rounds=args.rounds) for op in ("forward", "inference", "backward")}
    print(format_table(results, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
