"""JIT compile time and import time of fastbn, each measured in a fresh process.

Numba compiles a kernel on its first call. fastbn's kernels are compiled with
``cache=True``, so the machine code is written to disk and a later process only loads it.
This module measures, per case (shape, layout, dtype):

cold first call
    A fresh Python process, with ``NUMBA_CACHE_DIR`` pointing to an empty temporary
    directory: the first ``batch_norm_forward`` and then the first ``batch_norm_backward``
    compile everything they need.
warm first call
    Another fresh process with the *same* cache directory (now filled): the first calls
    load the cached machine code. Target: under 1 s for forward + backward.
import
    ``import fastbn`` in those processes (NumPy and Numba included, as a user pays it).

Every number is the median over ``--repeats`` processes (one process per cold run, each
with its own empty cache directory). Also in each process: the second call of forward +
backward, for scale.

Run ``python -m benchmarks.compile_time [--json FILE]``; the report
(``python -m benchmarks.report``) runs it too and puts the numbers in its JSON and in
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Target for the warm-cache first call (forward + backward) in a fresh process, seconds.
WARM_TARGET_S = 1.0

#: (name, shape, axis, dtype) of the first calls measured.
CASES = (
    ("NCHW-32x64x56x56-float32", (32, 64, 56, 56), 1, "float32"),
    ("NC-256x64-float32", (256, 64), 1, "float32"),
)

_CHILD = r"""
import json, resource, sys, time

def cpu_s():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

start, start_cpu = time.perf_counter(), cpu_s()
import numba
from numba.core import event
compiles, stack = [], []

class Compiles(event.Listener):
    # per compiled function and signature: CPU seconds, those of nested compiles excluded
    def on_start(self, ev):
        stack.append([cpu_s(), 0.0])
    def on_end(self, ev):
        began, nested = stack.pop()
        spent = cpu_s() - began
        if stack:
            stack[-1][1] += spent
        compiles.append([ev.data["dispatcher"].py_func.__qualname__, spent - nested])

event.register("numba:compile", Compiles())
import fastbn
import_s, import_cpu_s = time.perf_counter() - start, cpu_s() - start_cpu
import numpy as np
shape, axis, dtype = json.loads(sys.argv[1])
rng = np.random.default_rng(0)
x = rng.standard_normal(shape).astype(dtype)
dy = rng.standard_normal(shape).astype(dtype)
gamma = np.ones(shape[axis], dtype)
beta = np.zeros(shape[axis], dtype)

def step():
    t0, c0 = time.perf_counter(), cpu_s()
    y, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta, axis=axis)
    t1, c1 = time.perf_counter(), cpu_s()
    fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta, axis=axis)
    t2, c2 = time.perf_counter(), cpu_s()
    return t1 - t0, t2 - t1, (c1 - c0) + (c2 - c1)

first_forward_s, first_backward_s, first_cpu_s = step()
second_forward_s, second_backward_s, _ = step()
print(json.dumps({"import_s": import_s, "import_cpu_s": import_cpu_s,
                  "first_forward_s": first_forward_s, "first_backward_s": first_backward_s,
                  "first_call_cpu_s": first_cpu_s, "second_forward_s": second_forward_s,
                  "second_backward_s": second_backward_s, "process_cpu_s": cpu_s(),
                  "compiles": compiles}))
"""


def run_child(cache_dir, shape, axis, dtype):
    """Run the first calls of forward + backward in a fresh Python process.

    Parameters
    ----------
    cache_dir : str
        ``NUMBA_CACHE_DIR`` of the child.
    shape : tuple of int
        Shape of x.
    axis : int
        Channel axis.
    dtype : str
        dtype of x.

    Returns
    -------
    dict
        ``import_s``, ``first_forward_s``, ``first_backward_s``, ``first_call_s`` (their
        sum), ``second_forward_s``, ``second_backward_s``, ``process_s``: the wall time
        of the whole child process, interpreter start-up included; the CPU seconds
        (user + system) ``import_cpu_s``, ``first_call_cpu_s`` and ``process_cpu_s`` (the
        whole child); ``compiles``, the number of functions (and signatures) Numba
        compiled, and ``compile_cpu_s``, ``{function: CPU seconds}`` of each, the
        compilations of the functions it calls excluded.

    Raises
    ------
    RuntimeError
        The child failed; its stderr is in the message.
    """
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), FASTBN_CACHE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    start = time.perf_counter()
    start_cpu = _children_cpu_s()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps([list(shape), axis, dtype])],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    process_s = time.perf_counter() - start
    process_cpu_s = _children_cpu_s() - start_cpu
    if proc.returncode != 0:
        raise RuntimeError(f"compile-time child failed ({proc.returncode}):\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["first_call_s"] = result["first_forward_s"] + result["first_backward_s"]
    result["process_s"] = process_s
    result["process_cpu_s"] = process_cpu_s
    per_function = {}
    for name, seconds in result["compiles"]:
        per_function[name] = per_function.get(name, 0.0) + seconds
    result["compiles"] = len(result["compiles"])
    result["compile_cpu_s"] = per_function
    return result


def _children_cpu_s():
    """CPU seconds (user + system) of this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _median_of(runs):
    """Return the per-key median of a list of result dicts.

    Parameters
    ----------
    runs : list of dict
        Results of :func:`run_child`.

    Returns
    -------
    dict
        Same keys, median values (per function for ``compile_cpu_s``).
    """
    median = {
        key: statistics.median(run[key] for run in runs)
        for key in runs[0]
        if key != "compile_cpu_s"
    }
    names = sorted({name for run in runs for name in run["compile_cpu_s"]})
    median["compile_cpu_s"] = {
        name: statistics.median(run["compile_cpu_s"].get(name, 0.0) for run in runs)
        for name in names
    }
    return median


def measure(cases=CASES, repeats=3, progress=print):
    """Measure cold and warm first calls and the import time of every case.

    Parameters
    ----------
    cases : sequence of tuple, optional
        ``(name, shape, axis, dtype)`` tuples.
    repeats : int, optional
        Processes per measurement (cold runs each get a new empty cache directory).
    progress : callable, optional
        Called with a line of text before each process; ``None`` for silence.

    Returns
    -------
    dict
        ``{"warm_target_s": ..., "repeats": ..., "cases": [{"case", "cold", "warm",
        "warm_first_call_under_target"}, ...], "other_processes_cpu": ...}`` where ``cold``
        and ``warm`` are medians of :func:`run_child` results and the last entry is the
        share of the CPUs other processes took meanwhile.
    """
    from benchmarks.machine import OtherProcessesMonitor

    monitor = OtherProcessesMonitor()
    results = []
    for name, shape, axis, dtype in cases:
        cold_runs, warm_runs = [], []
        for i in range(repeats):
            with tempfile.TemporaryDirectory(prefix="fastbn-numba-cache-") as cache_dir:
                if progress:
                    progress(f"compile time {name}: cold run {i + 1}/{repeats} (empty cache)")
                cold_runs.append(run_child(cache_dir, shape, axis, dtype))
                if progress:
                    progress(f"compile time {name}: warm run {i + 1}/{repeats} (same cache)")
                warm_runs.append(run_child(cache_dir, shape, axis, dtype))
        cold, warm = _median_of(cold_runs), _median_of(warm_runs)
        results.append(
            {
                "case": name,
                "shape": list(shape),
                "axis": axis,
                "dtype": dtype,
                "cold": cold,
                "warm": warm,
                "warm_first_call_under_target": warm["first_call_s"] < WARM_TARGET_S,
            }
        )
    return {
        "warm_target_s": WARM_TARGET_S,
        "repeats": repeats,
        "cases": results,
        "other_processes_cpu": monitor.fraction(),
    }


def format_table(compile_times):
    """Format the result of :func:`measure` as a Markdown table.

    Parameters
    ----------
    compile_times : dict
        Output of :func:`measure`.

    Returns
    -------
    str
        One row per case and cache state.
    """
    lines = [
        "| case | cache | import | first forward | first backward | first fwd+bwd "
        "| second fwd+bwd | whole process | whole process, CPU | compiled |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in compile_times["cases"]:
        for state in ("cold", "warm"):
            r = entry[state]
            second = r["second_forward_s"] + r["second_backward_s"]
            lines.append(
                f"| {entry['case']} | {state} | {r['import_s']:.2f} s "
                f"| {r['first_forward_s']:.2f} s | {r['first_backward_s']:.2f} s "
                f"| **{r['first_call_s']:.2f} s** | {second * 1e3:.1f} ms "
                f"| {r['process_s']:.2f} s | {_seconds(r.get('process_cpu_s'))} "
                f"| {r.get('compiles', '-')} |"
            )
    return "\n".join(lines)


def _seconds(value):
    """``1.23 s``, or ``-`` for a number older results do not have."""
    return "-" if value is None else f"{value:.2f} s"


def format_breakdown(compile_times, top=25):
    """Format the cold runs' compile time per function as a Markdown table.

    Parameters
    ----------
    compile_times : dict
        Output of :func:`measure`.
    top : int, optional
        Functions listed per case (the most expensive).

    Returns
    -------
    str
        Per case, the CPU seconds Numba spent compiling each function (median over the
        cold runs; the compilations of the functions it calls excluded).
    """
    lines = []
    for entry in compile_times["cases"]:
        per_function = entry["cold"].get("compile_cpu_s", {})
        total = sum(per_function.values())
        lines += [
            f"{entry['case']}: {entry['cold'].get('compiles', 0):.0f} compilations, "
            f"{total:.2f} s CPU",
            "",
            "| function | CPU s |",
            "|---|---:|",
        ]
        for name, seconds in sorted(per_function.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"| `{name}` | {seconds:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    """Command line: measure and print the compile and import times.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        0 when every warm first call meets the target, 1 otherwise.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="processes per measurement")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    compile_times = measure(repeats=args.repeats)
    print(format_table(compile_times))
    print()
    print(format_breakdown(compile_times))
    if args.json:
        args.json.write_text(json.dumps(compile_times, indent=2) + "\n")
    ok = all(entry["warm_first_call_under_target"] for entry in compile_times["cases"])
    print(f"warm-cache first call under {WARM_TARGET_S:g} s: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
