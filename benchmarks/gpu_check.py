"""The Python side of ``bash benchmarks/gpu_check.sh``: arguments, device, results JSON.

The shell script runs the steps (each under ``timeout``); this module does what needs no
GPU to test:

``plan [OUTDIR] [options]``
    Check the arguments and print them as shell assignments for the script to ``eval``
    (:func:`parse_args`, :func:`shell_plan`).
``device FILE``
    Describe the GPU (``nvidia-smi``, numba-cuda, PyTorch) into ``FILE``
    (:func:`describe_device`); exit 2 when Numba sees no GPU, 3 under the CUDA simulator.
``assemble --device FILE --tests-log FILE --tests-rc N --bench-json FILE --bench-rc N --outdir DIR``
    Put the device, the outcome of the CUDA tests and the benchmarks' pytest-benchmark JSON
    into one results JSON named after the GPU, print the summary (median, GB/s, % of the
    copy bandwidth, speed-up over PyTorch/cuDNN) and exit non-zero when a step failed
    (:func:`assemble`). The file is a pytest-benchmark document, so
    ``python -m benchmarks.report --json FILE`` renders it like a CPU run.

Examples
--------
>>> args = parse_args(["plan", "/tmp/out", "--install"])
>>> args.outdir, args.install, args.tests_timeout + args.bench_timeout <= BUDGET_S
('/tmp/out', True, True)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

from benchmarks import analyse, machine, render

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTDIR = "benchmarks/results"

#: The PyTorch that ``--install`` pins (the version of the development environment; its
#: Linux wheels on PyPI are CUDA 12 builds).
TORCH_VERSION = "2.13.0"

#: The whole check must finish within this many seconds (8 minutes).
BUDGET_S = 480
#: Seconds kept for what is not a timed step: device query, JSON, start-up of Python.
OVERHEAD_S = 45
TESTS_TIMEOUT_S = 200
BENCH_TIMEOUT_S = 220

#: Environment variables of the simulator tests that must not reach a real-GPU run.
SIMULATOR_VARIABLES = (
    "NUMBA_ENABLE_CUDASIM",
    "FASTBN_CUDA_THREADS",
    "FASTBN_CUDA_MIN_VALUES_PER_THREAD",
    "FASTBN_CUDA_TARGET_BLOCKS",
    "FASTBN_CUDA_TEST_CHILD",
    "FASTBN_CUDA_TEST_SHARD",
)


# ------------------------------------------------------------------------------ arguments


def _parser():
    """The command line of the module (see the module docstring).

    Returns
    -------
    argparse.ArgumentParser
    """
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check", description="Python side of benchmarks/gpu_check.sh."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    plan = commands.add_parser("plan", help="check the script's arguments, print them for eval")
    plan.add_argument(
        "outdir",
        nargs="?",
        default=DEFAULT_OUTDIR,
        help=f"where the results JSON goes (default {DEFAULT_OUTDIR})",
    )
    plan.add_argument(
        "--install",
        action="store_true",
        help='first pip install -e ".[test,cuda]" torch==TORCH (see the script)',
    )
    plan.add_argument(
        "--torch",
        default=TORCH_VERSION,
        metavar="VERSION",
        help=f"the PyTorch version --install pins (default {TORCH_VERSION})",
    )
    plan.add_argument(
        "--tests-timeout",
        type=int,
        default=TESTS_TIMEOUT_S,
        metavar="S",
        help=f"seconds for the CUDA tests (default {TESTS_TIMEOUT_S})",
    )
    plan.add_argument(
        "--bench-timeout",
        type=int,
        default=BENCH_TIMEOUT_S,
        metavar="S",
        help=f"seconds for the GPU benchmarks (default {BENCH_TIMEOUT_S})",
    )
    plan.add_argument("--skip-tests", action="store_true", help="do not run the CUDA tests")
    plan.add_argument("--skip-bench", action="store_true", help="do not run the benchmarks")

    device = commands.add_parser("device", help="describe the GPU into a JSON file")
    device.add_argument("path", type=Path)

    assemble_ = commands.add_parser("assemble", help="write the results JSON, print a summary")
    assemble_.add_argument("--device", type=Path, required=True, help="output of `device`")
    assemble_.add_argument("--tests-log", type=Path, help="output of the CUDA tests")
    assemble_.add_argument("--tests-rc", type=int, help="their exit code (absent: not run)")
    assemble_.add_argument("--bench-json", type=Path, help="pytest-benchmark JSON")
    assemble_.add_argument("--bench-rc", type=int, help="the benchmarks' exit code")
    assemble_.add_argument("--outdir", default=DEFAULT_OUTDIR)
    return parser


def parse_args(argv):
    """Parse and check the arguments of one command.

    Parameters
    ----------
    argv : list of str
        E.g. ``["plan", "out", "--install"]``.

    Returns
    -------
    argparse.Namespace

    Raises
    ------
    SystemExit
        On unknown options, a timeout below 1 s, or timeouts that do not fit in
        :data:`BUDGET_S` with :data:`OVERHEAD_S`.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "plan":
        for name in ("tests_timeout", "bench_timeout"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1 s")
        used = (0 if args.skip_tests else args.tests_timeout) + (
            0 if args.skip_bench else args.bench_timeout
        )
        if used + OVERHEAD_S > BUDGET_S:
            parser.error(
                f"--tests-timeout + --bench-timeout = {used} s leaves less than "
                f"{OVERHEAD_S} s of the {BUDGET_S} s budget for the rest"
            )
        if not re.fullmatch(r"[0-9A-Za-z.+-]+", args.torch):
            parser.error(f"--torch must be a version, got {args.torch!r}")
    return args


def shell_plan(args):
    """The checked arguments as ``NAME=value`` lines for the script's ``eval``.

    Parameters
    ----------
    args : argparse.Namespace
        Of the ``plan`` command.

    Returns
    -------
    str
        One assignment per line, values quoted for the shell.

    Examples
    --------
    >>> print(shell_plan(parse_args(["plan", "my dir"])))  # doctest: +NORMALIZE_WHITESPACE
    OUTDIR='my dir'
    INSTALL=0
    TORCH_VERSION=2.13.0
    TESTS_TIMEOUT=200
    BENCH_TIMEOUT=220
    RUN_TESTS=1
    RUN_BENCH=1
    """
    values = {
        "OUTDIR": args.outdir,
        "INSTALL": int(args.install),
        "TORCH_VERSION": args.torch,
        "TESTS_TIMEOUT": args.tests_timeout,
        "BENCH_TIMEOUT": args.bench_timeout,
        "RUN_TESTS": int(not args.skip_tests),
        "RUN_BENCH": int(not args.skip_bench),
    }
    return "\n".join(f"{name}={shlex.quote(str(value))}" for name, value in values.items())


# --------------------------------------------------------------------------------- device


def _run_text(command):
    """stdout of a command, or ``None`` when it cannot run or fails."""
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def query_nvidia_smi(run=_run_text):
    """What ``nvidia-smi`` says about GPU 0.

    Parameters
    ----------
    run : callable, optional
        ``run(command) -> stdout or None`` (replaced in tests).

    Returns
    -------
    dict
        ``name``, ``driver``, ``memory``, ``compute_cap`` and ``cuda`` (the driver's CUDA
        version from the banner); an empty dict without ``nvidia-smi``.

    Examples
    --------
    >>> fake = {"--query-gpu": "NVIDIA H200, 570.86.15, 143771 MiB, 9.0\\n",
    ...         "banner": "| NVIDIA-SMI 570.86.15   Driver Version: 570.86.15   CUDA Version: 12.8 |"}
    >>> query_nvidia_smi(lambda c: fake["--query-gpu" if len(c) > 1 else "banner"])["cuda"]
    '12.8'
    """
    csv = run(
        [
            "nvidia-smi",
            "--query-gpu=name,driver_version,memory.total,compute_cap",
            "--format=csv,noheader",
        ]
    )
    if not csv:
        return {}
    fields = [f.strip() for f in csv.strip().splitlines()[0].split(",")]
    fields += [None] * (4 - len(fields))
    info = dict(zip(("name", "driver", "memory", "compute_cap"), fields[:4]))
    banner = run(["nvidia-smi"]) or ""
    match = re.search(r"CUDA Version:\s*([0-9.]+)", banner)
    info["cuda"] = match.group(1) if match else None
    return info


def _distribution_version(name):
    """The installed version of a distribution, or ``None``."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def query_numba():
    """What numba-cuda says about the current device.

    Returns
    -------
    dict
        ``available``, ``simulator``, and with a GPU ``name``, ``compute_capability``,
        ``runtime`` and ``driver`` (CUDA versions as ``"12.8"``), ``numba``,
        ``numba_cuda``; ``error`` when a query failed.
    """
    info = {"available": False, "simulator": os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"}
    try:
        import numba
        from numba import cuda

        info["numba"] = numba.__version__
        info["numba_cuda"] = _distribution_version("numba-cuda")
        info["available"] = bool(cuda.is_available())
        if not info["available"] or info["simulator"]:
            return info
        device = cuda.get_current_device()
        name = device.name
        info["name"] = name.decode() if isinstance(name, bytes) else str(name)
        info["compute_capability"] = ".".join(map(str, device.compute_capability))
        info["runtime"] = ".".join(map(str, cuda.runtime.get_version()))
        from numba.cuda.cudadrv.driver import driver

        info["driver"] = ".".join(map(str, driver.get_version()))
    except Exception as exc:  # noqa: BLE001 - a description, never a crash
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


def query_torch():
    """What PyTorch says about CUDA (``{}`` without PyTorch).

    Returns
    -------
    dict
        ``version``, ``cuda`` (its build's CUDA), ``cudnn``, ``available`` and
        ``device_name``.
    """
    try:
        import torch
    except ImportError:
        return {}
    info = {
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "available": bool(torch.cuda.is_available()),
    }
    try:
        info["cudnn"] = torch.backends.cudnn.version()
        if info["available"]:
            info["device_name"] = torch.cuda.get_device_name(0)
    except Exception as exc:  # noqa: BLE001 - a description, never a crash
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


def describe_device(nvidia_smi=None, numba_device=None, torch=None):
    """Describe the GPU, its driver and CUDA versions, and the Python side.

    Parameters
    ----------
    nvidia_smi, numba_device, torch : callable, optional
        The three queries; default :func:`query_nvidia_smi`, :func:`query_numba`,
        :func:`query_torch` (replaced in tests).

    Returns
    -------
    dict
        ``name`` (nvidia-smi's, else numba's), ``driver``, ``cuda`` (the driver's CUDA
        version), ``nvidia_smi``, ``numba``, ``torch``, ``hostname``, ``date`` (ISO, UTC).

    Examples
    --------
    >>> d = describe_device(lambda: {}, lambda: {"available": True, "name": "GPU X",
    ...                     "driver": "12.8"}, lambda: {})
    >>> d["name"], d["driver"], d["cuda"]
    ('GPU X', None, '12.8')
    """
    smi = (nvidia_smi or query_nvidia_smi)()
    nb = (numba_device or query_numba)()
    th = (torch or query_torch)()
    return {
        "name": smi.get("name") or nb.get("name"),
        "driver": smi.get("driver"),
        "cuda": smi.get("cuda") or nb.get("driver"),
        "nvidia_smi": smi,
        "numba": nb,
        "torch": th,
        "hostname": socket.gethostname(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def device_line(device):
    """One line naming the device for the page's *Machine* section.

    Examples
    --------
    >>> device_line({"name": "NVIDIA H200", "driver": "570.86.15", "cuda": "12.8",
    ...              "numba": {"compute_capability": "9.0"},
    ...              "torch": {"version": "2.13.0", "cuda": "12.8", "cudnn": 91000}})
    '**NVIDIA H200** (compute capability 9.0), driver 570.86.15, CUDA 12.8; PyTorch 2.13.0 (CUDA 12.8, cuDNN 91000)'
    """
    numba_info, torch_info = device.get("numba") or {}, device.get("torch") or {}
    line = (
        f"**{device.get('name')}** (compute capability "
        f"{numba_info.get('compute_capability') or (device.get('nvidia_smi') or {}).get('compute_cap')}), "
        f"driver {device.get('driver')}, CUDA {device.get('cuda')}"
    )
    if torch_info:
        line += (
            f"; PyTorch {torch_info.get('version')} (CUDA {torch_info.get('cuda')}, "
            f"cuDNN {torch_info.get('cudnn')})"
        )
    return line


# ------------------------------------------------------------------------------- assemble


def outcome_of_tests(log_text, rc):
    """Summarize the CUDA tests' run.

    Parameters
    ----------
    log_text : str or None
        pytest's output.
    rc : int or None
        Its exit code (124/137: killed by ``timeout``; ``None``: not run).

    Returns
    -------
    dict
        ``ran``, ``rc``, ``timed_out``, ``ok``, ``summary`` (pytest's last line) and the
        ``passed`` / ``failed`` / ``skipped`` / ``errors`` counts it names.

    Examples
    --------
    >>> outcome_of_tests("...\\n=== 30 passed, 2 skipped in 95.1s ===\\n", 0)["passed"]
    30
    >>> outcome_of_tests("", 124)["timed_out"]
    True
    """
    if rc is None:
        return {"ran": False, "rc": None, "timed_out": False, "ok": None, "summary": None}
    lines = [line.strip(" =") for line in (log_text or "").splitlines() if line.strip()]
    summary = next(
        (
            line
            for line in reversed(lines)
            if re.search(r"\b(passed|failed|error|errors|skipped|no tests ran)\b", line)
        ),
        None,
    )
    counts = {}
    for key, pattern in (
        ("passed", "passed"),
        ("failed", "failed"),
        ("skipped", "skipped"),
        ("errors", "errors?"),
    ):
        match = re.search(rf"(\d+) {pattern}\b", summary or "")
        counts[key] = int(match.group(1)) if match else 0
    timed_out = rc in (124, 137)
    return {
        "ran": True,
        "rc": rc,
        "timed_out": timed_out,
        "ok": rc == 0 and counts["passed"] > 0,
        "summary": summary,
        **counts,
    }


def results_path(outdir, device):
    """``OUTDIR/cuda_<gpu>_<host>_<YYYY-MM-DD>.json`` for a description of the device.

    Examples
    --------
    >>> results_path("out", {"name": "NVIDIA H200", "hostname": "node-7",
    ...                      "date": "2026-12-03T20:00:00+00:00"}).as_posix()
    'out/cuda_nvidia-h200_node-7_2026-12-03.json'
    """
    return Path(outdir) / (
        f"cuda_{machine.slug(str(device.get('name')))}_"
        f"{machine.slug(str(device.get('hostname')))}_"
        f"{str(device.get('date'))[:10]}.json"
    )


def assemble(device, tests, bench, bench_rc):
    """The results document of a GPU check.

    Parameters
    ----------
    device : dict
        :func:`describe_device`.
    tests : dict
        :func:`outcome_of_tests`.
    bench : dict or None
        The benchmarks' pytest-benchmark JSON (``None`` when there is none).
    bench_rc : int or None
        Their exit code (``None``: not run).

    Returns
    -------
    dict
        The pytest-benchmark document (``benchmarks``, ``machine_info`` with ``gpu``,
        ``copy_bandwidth``; empty when the benchmarks did not run) plus ``gpu_check``:
        ``device``, ``tests``, ``benchmarks`` (``ran``, ``rc``, ``timed_out``, ``ok``,
        ``count``, ``providers``) and ``rows`` (per CUDA benchmark: case, op, provider,
        ``median_s``, ``gbps``, ``frac_copy``, ``frac_copy_large``, ``copy_gbps_same_size``,
        ``copy_gbps_large``), and ``ok``.
    """
    data = dict(bench or {})
    data.setdefault("benchmarks", [])
    data["machine_info"] = dict(data.get("machine_info") or {}, gpu=device_line(device))
    rows = [r for r in analyse.rows_from_json(data) if r["device"] == "cuda"]
    providers = sorted({r["provider"] for r in rows})
    ran = bench_rc is not None
    bench_outcome = {
        "ran": ran,
        "rc": bench_rc,
        "timed_out": bench_rc in (124, 137),
        "ok": (bench_rc == 0 and "fastbn" in providers) if ran else None,
        "count": len(rows),
        "providers": providers,
    }
    keys = (
        "case",
        "op",
        "provider",
        "median_s",
        "gbps",
        "frac_copy",
        "frac_copy_large",
        "copy_gbps_same_size",
        "copy_gbps_large",
    )
    data["gpu_check"] = {
        "device": device,
        "tests": tests,
        "benchmarks": bench_outcome,
        "rows": [{k: r.get(k) for k in keys} for r in rows],
        "ok": all(step["ok"] is not False for step in (tests, bench_outcome)),
    }
    return data


def summary_text(data):
    """The terminal summary of an assembled document.

    Parameters
    ----------
    data : dict
        :func:`assemble`'s output.

    Returns
    -------
    str
        The device, the two steps' outcomes, and the summary table (median per provider,
        fastbn's GB/s and % of the copy bandwidth, speed-up over PyTorch/cuDNN).
    """
    check = data["gpu_check"]
    tests, bench = check["tests"], check["benchmarks"]
    lines = [
        f"device: {data['machine_info']['gpu']}",
        "CUDA tests: "
        + (
            "not run"
            if not tests["ran"]
            else f"{tests['summary']} (exit {tests['rc']}"
            + (", timed out" if tests["timed_out"] else "")
            + ")"
        ),
        "benchmarks: "
        + (
            "not run"
            if not bench["ran"]
            else f"{bench['count']} timed, providers {bench['providers']} "
            f"(exit {bench['rc']}" + (", timed out" if bench["timed_out"] else "") + ")"
        ),
    ]
    rows = analyse.rows_from_json(data)
    if rows:
        lines += ["", render.summary_table(analyse.summarize(rows), markdown=False)]
    return "\n".join(lines)


def _read_json(path):
    """A JSON file, or ``None`` when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return None


def main(argv=None):
    """Command line (see the module docstring).

    Returns
    -------
    int
        0 on success.
    """
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "plan":
        print(shell_plan(args))
        return 0
    if args.command == "device":
        device = describe_device()
        Path(args.path).write_text(json.dumps(device, indent=1) + "\n", encoding="utf-8")
        print(f"device: {device_line(device)}")
        if device["numba"].get("simulator"):
            print(
                "NUMBA_ENABLE_CUDASIM=1: a GPU check never runs under the simulator",
                file=sys.stderr,
            )
            return 3
        if not device["numba"].get("available"):
            print(
                "Numba sees no CUDA GPU: " + str(device["numba"].get("error", "")), file=sys.stderr
            )
            return 2
        return 0
    device = _read_json(args.device) or {}
    log = (
        args.tests_log.read_text(encoding="utf-8", errors="replace")
        if args.tests_log and args.tests_log.exists()
        else None
    )
    data = assemble(
        device,
        outcome_of_tests(log, args.tests_rc),
        _read_json(args.bench_json) if args.bench_json else None,
        args.bench_rc,
    )
    out = results_path(args.outdir, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(summary_text(data))
    print(f"saved {out}")
    return 0 if data["gpu_check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
