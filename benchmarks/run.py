"""Running the benchmark suite: the suite itself, its reruns, the interleaved rounds.

Every measurement runs in a subprocess (``pytest benchmarks --benchmark-only``,
``python -m benchmarks.interleaved``) whose output is the progress indication, with the
allocator settings of :data:`STEADY_MALLOC`; :func:`wait_until_idle` waits for other
processes to leave the CPUs first, and :func:`rerun_disturbed` reruns the benchmarks
they disturbed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import machine
from benchmarks.analyse import BUSY_WARNING, load

ROOT = Path(__file__).resolve().parent.parent


def wait_until_idle(max_wait_s, threshold=BUSY_WARNING):
    """Wait until other processes use less than ``threshold`` of the CPUs.

    Parameters
    ----------
    max_wait_s : float
        Give up (and go on) after this long.
    threshold : float, optional
        Fraction of all CPU time.

    Returns
    -------
    float or None
        The last busy fraction sampled.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        busy = machine.cpu_busy_fraction(1.0)
        if busy is None or busy < threshold or time.monotonic() >= deadline:
            return busy
        print(
            f"waiting for an idle machine: other processes use {100 * busy:.0f}% of the CPUs",
            flush=True,
        )
        time.sleep(4.0)


# glibc malloc settings of the benchmark process: no mmap for large blocks and no trimming
# of the heap, so that an x-sized output freed by one call is reused by the next, as in a
# training loop's steady state. Without them, whether a provider's fresh output page-faults
# on every call depended on the process's allocation history: PyTorch's NCHW backward took
# 3.3 ms in one process and 11-15 ms in another (thousands of page faults per call).
STEADY_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**36)}


def run_suite(json_path, keyword=None, targets=None):
    """Run ``pytest benchmarks --benchmark-only`` in a subprocess, writing ``json_path``.

    Parameters
    ----------
    json_path : pathlib.Path
        Where pytest-benchmark writes its JSON.
    keyword : str, optional
        A ``-k`` expression selecting benchmarks.
    targets : sequence of str, optional
        pytest node ids to run instead of the whole ``benchmarks/`` directory.

    Returns
    -------
    int
        pytest's exit code. Its output (one line per benchmark, then pytest-benchmark's
        tables) goes to this process's stdout as the run's progress.
    """
    command = [
        sys.executable,
        "-m",
        "pytest",
        *(targets or ["benchmarks"]),
        "--benchmark-only",
        f"--benchmark-json={json_path}",
        "-p",
        "no:cacheprovider",
        "-v",
        "--benchmark-columns=min,median,max,rounds,iterations",
        "--benchmark-sort=name",
    ]
    if keyword:
        command += ["-k", keyword]
    shown = command if len(command) < 20 else command[:4] + ["..."] + command[-8:]
    print("running:", " ".join(shown), flush=True)
    return subprocess.call(command, cwd=ROOT, env=dict(os.environ, **STEADY_MALLOC))


def run_interleaved(steady=True):
    """Run ``python -m benchmarks.interleaved`` in a subprocess.

    Parameters
    ----------
    steady : bool, optional
        True (default): with the suite's allocator settings (:data:`STEADY_MALLOC`), so
        that both providers reuse their freed outputs as in the suite. False: with glibc's
        defaults (the variables of :data:`STEADY_MALLOC` removed from the environment), as
        a program that sets nothing runs: a large fresh output is then mapped anew, and
        page-faulted in, by every call.

    Returns
    -------
    list of dict or None
        Its results (see :func:`benchmarks.interleaved.measure_all`); None when it could
        not run (PyTorch missing). Its output (a line per case and op, then the table) is
        this process's progress.
    """
    env = {k: v for k, v in os.environ.items() if k not in STEADY_MALLOC}
    if steady:
        env.update(STEADY_MALLOC)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "interleaved.json"
        code = subprocess.call(
            [sys.executable, "-m", "benchmarks.interleaved", "--json", str(out)], cwd=ROOT, env=env
        )
        if code != 0 or not out.exists():
            print("the interleaved timings did not run", file=sys.stderr)
            return None
        return json.loads(out.read_text(encoding="utf-8"))


def rerun_disturbed(data, retries=2, wait_s=300.0):
    """Rerun the benchmarks that other processes disturbed, and keep the new results.

    Parameters
    ----------
    data : dict
        pytest-benchmark JSON of the run, updated in place: a rerun benchmark's entry is
        replaced, and the copy bandwidths measured by the reruns are added.
    retries : int, optional
        Rounds of reruns; each waits up to ``wait_s`` for a quiet machine first.
    wait_s : float, optional
        See :func:`wait_until_idle`.

    Returns
    -------
    list of str
        Full names of the benchmarks still disturbed after the last round.
    """

    def still_disturbed():
        return [
            b["fullname"]
            for b in data.get("benchmarks", [])
            if (b.get("extra_info") or {}).get("other_processes_cpu") is not None
            and b["extra_info"]["other_processes_cpu"] > BUSY_WARNING
        ]

    for attempt in range(retries):
        names = still_disturbed()
        if not names:
            return []
        print(
            f"rerun {attempt + 1}/{retries}: {len(names)} benchmark(s) ran while other "
            "processes took the CPUs",
            flush=True,
        )
        wait_until_idle(wait_s)
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "rerun.json"
            code = run_suite(raw, targets=names)
            if code != 0 or not raw.exists():
                print(f"the rerun failed (pytest exit code {code}); keeping the first results")
                return still_disturbed()
            rerun = load(raw)
        fresh = {b["fullname"]: b for b in rerun["benchmarks"]}
        data["benchmarks"] = [fresh.get(b["fullname"], b) for b in data["benchmarks"]]
        copies = data.setdefault("copy_bandwidth", {})
        for device, entries in (rerun.get("copy_bandwidth") or {}).items():
            copies.setdefault(device, []).extend(entries)
    return still_disturbed()
