"""Name the machine a benchmark ran on: CPU model, cores, threads, library versions.

Used by ``benchmarks/conftest.py`` (into pytest-benchmark's ``machine_info``), by the
report (into ``docs/benchmarks.md``) and to name the raw JSON files.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import socket
import subprocess
import time


def cpu_model():
    """Return the CPU model name.

    Returns
    -------
    str
        ``model name`` from ``/proc/cpuinfo``, else ``Model name`` from ``lscpu``, else
        :func:`platform.processor`, else ``"unknown CPU"``.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in text.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown CPU"


def _lscpu_field(name):
    """Return one field of ``lscpu``'s output, or ``None``.

    Parameters
    ----------
    name : str
        Field name without the colon, e.g. ``"L3 cache"``.

    Returns
    -------
    str or None
        The field's value.
    """
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return None


def _version(module_name):
    """Return a module's ``__version__``, or ``None`` when it is not installed.

    Parameters
    ----------
    module_name : str
        Importable name.

    Returns
    -------
    str or None
        The version string.
    """
    try:
        module = __import__(module_name)
    except Exception:  # an installed but broken package counts as absent
        return None
    return getattr(module, "__version__", "unknown")


def cpu_busy_fraction(seconds=1.0):
    """Measure how busy the CPUs are with *other* work, while this process sleeps.

    Benchmarks on a shared machine are only as good as its quietness: a process that
    takes one of two cores halves a parallel kernel's speed. The report records this
    before and after a run and warns when it was not near zero.

    Parameters
    ----------
    seconds : float, optional
        How long to sample ``/proc/stat``.

    Returns
    -------
    float or None
        Fraction of all CPUs' time that was not idle (0 to 1); ``None`` without
        ``/proc/stat``.
    """

    def sample():
        with open("/proc/stat", encoding="utf-8") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = total1 - total0
    return 0.0 if elapsed <= 0 else 1 - (idle1 - idle0) / elapsed


def _proc_stat_seconds():
    """Return the (busy, total) CPU seconds of all CPUs since boot, from ``/proc/stat``.

    Returns
    -------
    tuple of float or None
        ``None`` without ``/proc/stat``.
    """
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    total = sum(fields)
    return (total - fields[3] - fields[4]) / ticks, total / ticks


def _own_cpu_seconds():
    """CPU time of this process and of its ended, waited-for children, in seconds."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class OtherProcessesMonitor:
    """Measure the CPU time other processes took while this process ran a benchmark.

    On a machine shared with other work, a benchmark whose cores were taken is slower for
    reasons that have nothing to do with the code measured. This monitor tells such
    benchmarks apart: the busy time of all CPUs (``/proc/stat``) minus this process's own
    CPU time (every thread of it) and that of its children that ended and were waited for
    (the compile-time benchmark runs its measurements in child processes), over the
    elapsed CPU time of all CPUs.

    Examples
    --------
    >>> monitor = OtherProcessesMonitor()
    >>> fraction = monitor.fraction()
    >>> fraction is None or 0.0 <= fraction <= 1.0
    True
    """

    def __init__(self):
        self._start = _proc_stat_seconds()
        self._own = _own_cpu_seconds()

    def fraction(self):
        """Return the fraction of all CPUs' time used by other processes since creation.

        Returns
        -------
        float or None
            Between 0 and 1 (resolution: one clock tick, 10 ms, of each CPU); ``None``
            without ``/proc/stat`` or when no time has passed.
        """
        end = _proc_stat_seconds()
        if self._start is None or end is None:
            return None
        busy, total = end[0] - self._start[0], end[1] - self._start[1]
        if total <= 0:
            return None
        own = _own_cpu_seconds() - self._own
        return min(1.0, max(0.0, (busy - own) / total))


def describe(threads=None):
    """Describe this machine and the software the benchmarks run on.

    Parameters
    ----------
    threads : int, optional
        Threads the benchmarks use (numba and torch); default ``numba.get_num_threads()``.

    Returns
    -------
    dict
        ``hostname``, ``cpu_model``, ``cpu_count`` (logical CPUs usable by this process),
        ``l2_cache``, ``l3_cache``, ``threads``, ``threading_layer``, ``python``,
        ``numba``, ``numpy``, ``torch``, ``date`` (ISO, UTC).
    """
    import numba

    if threads is None:
        threads = numba.get_num_threads()
    try:  # the layer actually in use, known once a parallel kernel has run
        threading_layer = numba.threading_layer()
    except ValueError:
        threading_layer = f"{numba.config.THREADING_LAYER} (requested)"
    try:
        cpu_count = len(os.sched_getaffinity(0))
    except AttributeError:
        cpu_count = os.cpu_count()
    return {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_count": cpu_count,
        "l2_cache": _lscpu_field("L2 cache"),
        "l3_cache": _lscpu_field("L3 cache"),
        "threads": int(threads),
        "threading_layer": threading_layer,
        "python": platform.python_version(),
        "numba": _version("numba"),
        "numpy": _version("numpy"),
        "torch": _version("torch"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def slug(text):
    """Turn free text into a short file-name-safe slug.

    Parameters
    ----------
    text : str
        E.g. ``"AMD EPYC 7B13 64-Core Processor"``.

    Returns
    -------
    str
        Lower case, runs of other characters replaced by ``-``, at most 40 characters.
    """
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "unknown"


def results_name(kind="cpu", info=None):
    """Return the file name of a raw results JSON for this machine and today.

    Parameters
    ----------
    kind : str, optional
        ``"cpu"`` (or ``"cuda"`` for a GPU run).
    info : dict, optional
        Output of :func:`describe`; computed when missing.

    Returns
    -------
    str
        ``<kind>_<cpu-model>_<hostname>_<YYYY-MM-DD>.json``.
    """
    info = info or describe()
    date = info["date"][:10]
    return f"{kind}_{slug(info['cpu_model'])}_{slug(info['hostname'])}_{date}.json"
