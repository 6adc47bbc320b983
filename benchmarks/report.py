"""Run the benchmark suite and turn its results into a table, a plot and docs/benchmarks.md.

Usage::

    python -m benchmarks.report                  # run the suite, compile times, write docs
    python -m benchmarks.report --json FILE      # report on an existing pytest-benchmark JSON
    python -m benchmarks.report -k "NCHW and forward" --no-compile-time --no-interleaved

Running the suite means ``pytest benchmarks --benchmark-only`` in a subprocess (its output
is the progress indication). fastbn and PyTorch are also timed in interleaved rounds
(:mod:`benchmarks.interleaved`), with the suite's allocator settings and again with
glibc's defaults. The raw JSON, with the compile times, the interleaved
timings and the machine description added, is saved as
``benchmarks/results/<kind>_<cpu>_<host>_<date>.json``.
The report prints, per benchmark: op, shape, dtype, layout, provider, median time, GB/s,
fraction of the copy bandwidth measured in the same run, and fastbn's speed-up over
PyTorch and NumPy; it writes the same into ``docs/benchmarks.md`` with one bar plot per
device (``docs/img/benchmarks_<device>.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import machine
from benchmarks.cases import MIN_TRAFFIC, OPS, TRAFFIC, bytes_moved

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
DOC_PATH = ROOT / "docs" / "benchmarks.md"
IMG_DIR = ROOT / "docs" / "img"

PROVIDER_ORDER = ("fastbn", "torch", "numpy")
DEVICE_ORDER = ("cpu", "cuda")

# A machine busier than this with other processes (fraction of all CPU time) gets a
# warning in the report: a stolen core halves a parallel kernel's speed.
BUSY_WARNING = 0.10


# ------------------------------------------------------------------------------ data


def load(path):
    """Read a pytest-benchmark JSON file.

    Parameters
    ----------
    path : str or pathlib.Path
        The file.

    Returns
    -------
    dict
        The document.
    """
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def best_copy_bandwidths(data):
    """Return the best copy bandwidth measured at each array size in a run.

    A run (the suite and its reruns) may measure the same size several times; on a
    machine whose caches and memory are shared with other work the measurements differ,
    and the yardstick is the best the machine showed.

    Parameters
    ----------
    data : dict
        pytest-benchmark JSON with ``copy_bandwidth`` (see ``conftest.py``).

    Returns
    -------
    dict
        ``(device, nbytes) -> GB/s``.
    """
    best = {}
    for device, entries in (data.get("copy_bandwidth") or {}).items():
        for entry in entries:
            key = (device, int(entry["nbytes"]))
            best[key] = max(best.get(key, 0.0), float(entry["gbps"]))
    return best


def rows_from_json(data):
    """Extract one flat row per benchmark of the suite from a pytest-benchmark document.

    Parameters
    ----------
    data : dict
        pytest-benchmark JSON (``{"benchmarks": [{"stats": ..., "extra_info": ...}]}``).
        Benchmarks without ``extra_info["op"]`` (not from this suite) are ignored.

    Returns
    -------
    list of dict
        Keys: ``device, op, case, shape, dtype, layout, provider, median_s, gbps,
        gbps_best`` (from the fastest round, for a machine that was not quiet), ``
        frac_copy, frac_copy_large, copy_gbps_same_size, copy_gbps_large, bytes_moved,
        x_bytes, threads, host_overhead_us, other_cpu, name``; sorted by device, case (order of
        first appearance), op, provider. The copy bandwidths are the best measured at
        that size in the run (:func:`best_copy_bandwidths`).
    """
    rows = []
    case_order = {}
    best_copy = best_copy_bandwidths(data)
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "op" not in info:
            continue
        stats = bench.get("stats") or {}
        median = stats.get("median", info.get("median_s"))
        if median is None:
            continue
        best = stats.get("min")
        moved = info["bytes_moved"]
        gbps = moved / median / 1e9
        same, large = info.get("copy_gbps_same_size"), info.get("copy_gbps_large")
        if same is not None:
            same = max(same, best_copy.get((info["device"], int(info["x_bytes"])), 0.0))
        if large is not None:
            large = max(large, best_copy.get((info["device"], int(info["copy_large_bytes"])), 0.0))
        case_order.setdefault((info["device"], info["case"]), len(case_order))
        rows.append({
            "name": bench.get("name", ""),
            "device": info["device"],
            "op": info["op"],
            "case": info["case"],
            "shape": tuple(info["shape"]),
            "dtype": info["dtype"],
            "layout": info["layout"],
            "provider": info["provider"],
            "median_s": median,
            "gbps": gbps,
            "gbps_best": moved / best / 1e9 if best else None,
            "frac_copy": gbps / same if same else None,
            "frac_copy_large": gbps / large if large else None,
            "copy_gbps_same_size": same,
            "copy_gbps_large": large,
            "bytes_moved": moved,
            "x_bytes": info.get("x_bytes"),
            "threads": info.get("threads"),
            "host_overhead_us": info.get("host_overhead_us"),
            "other_cpu": info.get("other_processes_cpu"),
        })

    def key(row):
        return (DEVICE_ORDER.index(row["device"]) if row["device"] in DEVICE_ORDER else 9,
                case_order[(row["device"], row["case"])],
                OPS.index(row["op"]) if row["op"] in OPS else 9,
                PROVIDER_ORDER.index(row["provider"]) if row["provider"] in PROVIDER_ORDER else 9)

    return sorted(rows, key=key)


def summarize(rows):
    """Put the providers of each (device, case, op) side by side.

    Parameters
    ----------
    rows : list of dict
        Output of :func:`rows_from_json`.

    Returns
    -------
    list of dict
        One dict per (device, case, op), in the order of ``rows``: the case fields,
        ``times`` (provider -> median seconds), fastbn's ``gbps``, ``frac_copy``,
        ``frac_copy_large`` (``None`` without a fastbn row), ``speedup_vs_torch`` /
        ``speedup_vs_numpy`` (the other provider's time over fastbn's; ``None`` when one is
        missing), ``torch_frac_copy`` (PyTorch's GB/s over the same-size copy bandwidth)
        and ``ceiling_vs_torch``: PyTorch's time over the shortest any implementation
        could take, its :data:`benchmarks.cases.MIN_TRAFFIC` at the better of the two copy
        bandwidths (``None`` when something is missing).
    """
    groups = {}
    for row in rows:
        group = groups.setdefault((row["device"], row["case"], row["op"]), {
            "device": row["device"], "case": row["case"], "op": row["op"],
            "shape": row["shape"], "dtype": row["dtype"], "layout": row["layout"],
            "times": {}, "gbps": None, "frac_copy": None, "frac_copy_large": None,
            "bytes_moved": row["bytes_moved"], "x_bytes": row.get("x_bytes"),
            "copy_gbps": (row["copy_gbps_same_size"], row["copy_gbps_large"]),
        })
        group["times"][row["provider"]] = row["median_s"]
        group.setdefault("disturbed", set())
        if disturbed(row):
            group["disturbed"].add(row["provider"])
        if row["provider"] == "fastbn":
            group.update(gbps=row["gbps"], frac_copy=row["frac_copy"],
                         frac_copy_large=row["frac_copy_large"])
    for group in groups.values():
        fastbn_time = group["times"].get("fastbn")
        for other in ("torch", "numpy"):
            other_time = group["times"].get(other)
            group[f"speedup_vs_{other}"] = (other_time / fastbn_time
                                            if fastbn_time and other_time else None)
        torch_time = group["times"].get("torch")
        same, large = group.pop("copy_gbps")
        copy = max((c for c in (same, large) if c), default=None)
        group["torch_frac_copy"] = (group["bytes_moved"] / torch_time / 1e9 / same
                                    if torch_time and same else None)
        group["ceiling_vs_torch"] = (
            torch_time * copy * 1e9 / bytes_moved(group["op"], group["x_bytes"], MIN_TRAFFIC)
            if torch_time and copy and group["x_bytes"] else None)
    return list(groups.values())


def disturbed(row):
    """Return whether other processes took a noticeable share of the CPUs during a row.

    Parameters
    ----------
    row : dict
        A row of :func:`rows_from_json`.

    Returns
    -------
    bool
        ``other_cpu`` above :data:`BUSY_WARNING`.
    """
    return row.get("other_cpu") is not None and row["other_cpu"] > BUSY_WARNING


def geometric_mean(values):
    """Return the geometric mean of the values that are not ``None``.

    Parameters
    ----------
    values : iterable of float or None
        Positive numbers.

    Returns
    -------
    float or None
        ``None`` when there is no value.
    """
    values = [v for v in values if v]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


# ------------------------------------------------------------------------ formatting


def format_time(seconds):
    """Format a duration with a unit that keeps 3-4 significant digits.

    Parameters
    ----------
    seconds : float or None
        The duration.

    Returns
    -------
    str
        E.g. ``"12.3 ms"``, ``"45.6 us"``; ``"-"`` for ``None``.
    """
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}" if seconds / scale < 100 else \
                f"{seconds / scale:.0f} {unit}"
    return f"{seconds * 1e9:.0f} ns"


def _pct(fraction):
    """Format a fraction as a percentage, ``"-"`` for ``None``."""
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def _ratio(ratio):
    """Format a speed-up as ``"1.23x"``, ``"-"`` for ``None``."""
    return "-" if ratio is None else f"{ratio:.2f}x"


def _shape(shape):
    """Format a shape as ``"32x64x56x56"``."""
    return "x".join(map(str, shape))


def table(headers, body, markdown=True):
    """Lay out a table as Markdown or as aligned plain text.

    Parameters
    ----------
    headers : list of str
        Column titles; a title starting with ``>`` is right-aligned (the ``>`` is dropped).
    body : list of list of str
        The cells.
    markdown : bool, optional
        Markdown pipe table (default) or space-aligned text for a terminal.

    Returns
    -------
    str
        The table, without a trailing newline.
    """
    right = [h.startswith(">") for h in headers]
    headers = [h.lstrip(">") for h in headers]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join("---:" if r else "---" for r in right) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *body)]

    def line(cells):
        return "  ".join(str(c).rjust(w) if r else str(c).ljust(w)
                         for c, w, r in zip(cells, widths, right))

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(c) for c in body])


def summary_table(summary, markdown=True):
    """Format :func:`summarize`'s output: one line per (device, case, op).

    Parameters
    ----------
    summary : list of dict
        Output of :func:`summarize`.
    markdown : bool, optional
        Markdown or plain text.

    Returns
    -------
    str
        Columns: device, op, shape, dtype, layout, the median time of each provider
        (``*``: other processes took more than :data:`BUSY_WARNING` of the CPUs during
        it), fastbn's GB/s and fractions of copy bandwidth, fastbn's speed-ups.
    """
    headers = ["device", "op", "shape", "dtype", "layout", ">fastbn", ">torch", ">numpy",
               ">fastbn GB/s", ">% copy (same size)", ">% copy (large)",
               ">vs torch", ">vs numpy"]
    def cell(group, provider):
        mark = "*" if provider in group.get("disturbed", ()) else ""
        return format_time(group["times"].get(provider)) + mark

    body = [[g["device"], g["op"], _shape(g["shape"]), g["dtype"], g["layout"],
             cell(g, "fastbn"), cell(g, "torch"), cell(g, "numpy"),
             "-" if g["gbps"] is None else f"{g['gbps']:.1f}",
             _pct(g["frac_copy"]), _pct(g["frac_copy_large"]),
             _ratio(g["speedup_vs_torch"]), _ratio(g["speedup_vs_numpy"])]
            for g in summary]
    return table(headers, body, markdown)


def full_table(rows, markdown=True):
    """Format every benchmark: one line per (device, case, op, provider).

    Parameters
    ----------
    rows : list of dict
        Output of :func:`rows_from_json`.
    markdown : bool, optional
        Markdown or plain text.

    Returns
    -------
    str
        Columns: device, op, shape, dtype, layout, provider, median, GB/s (from the median
        and from the fastest round), % of the same-size and of the large-array copy
        bandwidth (from the median), both copy bandwidths, and the share of the CPUs
        other processes took during the benchmark.
    """
    headers = ["device", "op", "shape", "dtype", "layout", "provider", ">median", ">GB/s",
               ">GB/s (best round)", ">% copy (same size)", ">% copy (large)",
               ">copy GB/s (same size)", ">copy GB/s (large)", ">other processes"]
    body = [[r["device"], r["op"], _shape(r["shape"]), r["dtype"], r["layout"], r["provider"],
             format_time(r["median_s"]), f"{r['gbps']:.2f}",
             "-" if r.get("gbps_best") is None else f"{r['gbps_best']:.2f}",
             _pct(r["frac_copy"]),
             _pct(r["frac_copy_large"]),
             "-" if r["copy_gbps_same_size"] is None else f"{r['copy_gbps_same_size']:.1f}",
             "-" if r["copy_gbps_large"] is None else f"{r['copy_gbps_large']:.1f}",
             _pct(r.get("other_cpu"))]
            for r in rows]
    return table(headers, body, markdown)


# ------------------------------------------------------------------------------ plot


def plot(rows, device, path):
    """Draw GB/s per provider, one panel per op, against the copy bandwidth.

    Parameters
    ----------
    rows : list of dict
        Output of :func:`rows_from_json`; only ``device``'s rows are drawn.
    device : str
        ``"cpu"`` or ``"cuda"``.
    path : pathlib.Path
        PNG file to write.

    Returns
    -------
    pathlib.Path or None
        ``path``, or ``None`` when there is nothing to draw.

    Notes
    -----
    Within a panel, each group of bars is one case; the black segment across a group is
    the copy bandwidth measured at that case's size, the dashed line the large-array copy
    bandwidth.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["device"] == device]
    if not rows:
        return None
    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    providers = [p for p in PROVIDER_ORDER if any(r["provider"] == p for r in rows)]
    colors = {"fastbn": "#1f77b4", "torch": "#ff7f0e", "numpy": "#2ca02c"}
    columns = 2 if len(ops) > 1 else 1
    fig, axes = plt.subplots(math.ceil(len(ops) / columns), columns, squeeze=False,
                             figsize=(7 * columns, 3.6 * math.ceil(len(ops) / columns)))
    width = 0.8 / max(len(providers), 1)
    for ax, op in zip(axes.flat, ops):
        by_key = {(r["case"], r["provider"]): r for r in rows if r["op"] == op}
        large = None
        for i, case in enumerate(cases):
            for j, provider in enumerate(providers):
                row = by_key.get((case, provider))
                if row is None:
                    continue
                ax.bar(i - 0.4 + width * (j + 0.5), row["gbps"], width,
                       color=colors.get(provider), label=provider)
                large = row["copy_gbps_large"] or large
            same = next((by_key[(case, p)]["copy_gbps_same_size"] for p in providers
                         if (case, p) in by_key), None)
            if same:
                ax.hlines(same, i - 0.45, i + 0.45, colors="black", linewidth=2,
                          label="copy, same size" if i == 0 else None)
        if large:
            ax.axhline(large, color="gray", linestyle="--", linewidth=1,
                       label="copy, large array")
        ax.set_title(f"{device}: {op} ({'+'.join(map(str, TRAFFIC[op]))} R+W of x)")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([c.replace("-", "\n") for c in cases], fontsize=7)
        ax.set_ylabel("GB/s")
    legend = {}
    for ax in axes.flat:
        handles, labels = ax.get_legend_handles_labels()
        legend.update(zip(labels, handles))
    for ax in list(axes.flat)[len(ops):]:
        ax.set_visible(False)
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=len(legend), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- markdown


def _machine_section(data):
    """Describe the machine of a results document in Markdown.

    Parameters
    ----------
    data : dict
        pytest-benchmark JSON with ``machine_info["fastbn"]`` (see ``conftest.py``).

    Returns
    -------
    str
        A bullet list.
    """
    info = data.get("machine_info", {}).get("fastbn") or {}
    if not info:
        return "- machine: not recorded in the JSON"

    def busy(value):
        return "not measured" if value is None else f"{100 * value:.0f}%"

    lines = [
        f"- CPU: **{info.get('cpu_model')}**, {info.get('cpu_count')} logical CPUs usable, "
        f"L2 {info.get('l2_cache')}, L3 {info.get('l3_cache')} (lscpu's totals over the "
        f"instances; host `{info.get('hostname')}`)",
        f"- threads: {info.get('threads')} for Numba and PyTorch alike (Numba threading "
        f"layer `{info.get('threading_layer')}`); NumPy runs on one thread",
        f"- Python {info.get('python')}, numba {info.get('numba')}, numpy {info.get('numpy')}, "
        f"torch {info.get('torch')}",
        f"- date: {info.get('date')}",
        f"- CPU time taken by other processes, sampled for 1 s: {busy(info.get('cpu_busy_before'))} "
        f"before the run, {busy(info.get('cpu_busy_after'))} after",
    ]
    gpu = data.get("machine_info", {}).get("gpu")
    if gpu:
        lines.append(f"- GPU: {gpu}")
    return "\n".join(lines)


def _copy_section(data):
    """Tabulate every copy-bandwidth measurement of the run.

    Parameters
    ----------
    data : dict
        pytest-benchmark JSON with ``copy_bandwidth`` (see ``conftest.py``).

    Returns
    -------
    str
        A Markdown table, or a sentence when nothing was recorded.
    """
    measured = data.get("copy_bandwidth") or {}
    body = []
    for device, entries in measured.items():
        for entry in entries:
            others = ", ".join(f"{k} {v:.1f}" for k, v in entry["by_method"].items())
            body.append([device, f"{entry['nbytes'] / 1e6:.2f} MB", f"{entry['gbps']:.1f}",
                         entry["method"], others])
    if not body:
        return "No copy bandwidth was recorded in this run."
    return table(["device", ">array size", ">best GB/s", "best method", "all methods (GB/s)"],
                 body)


def _interleaved_observation(results, label="interleaved rounds"):
    """Summary lines for the interleaved timings ("" when they were not measured).

    Per op, the small case's speed-up over PyTorch and the geometric mean over the large
    cases; ``label`` names the measurement.

    Examples
    --------
    >>> print(_interleaved_observation([
    ...     {"case": "small-NC-256x64-float32", "ops": {"inference": {"speedup": 1.3}}},
    ...     {"case": "NC-65536x256-float32", "ops": {"inference": {"speedup": 1.1}}}]))
    <BLANKLINE>
    - cpu, **interleaved rounds** against PyTorch: small call inference 1.30x; large cases (geometric mean) inference 1.10x
    """
    if not results:
        return ""
    small = [r for r in results if r["case"].startswith("small")]
    large = [r for r in results if not r["case"].startswith("small")]
    parts = []
    if small:
        parts.append("small call " + ", ".join(
            f"{op} {_ratio(v['speedup'])}" for op, v in small[0]["ops"].items()))
    if large:
        ops = [op for op in OPS if all(op in r["ops"] for r in large)]
        parts.append("large cases (geometric mean) " + ", ".join(
            f"{op} {_ratio(geometric_mean(r['ops'][op]['speedup'] for r in large))}"
            for op in ops))
    return f"\n- cpu, **{label}** against PyTorch: " + "; ".join(parts)


def _observations(summary):
    """Compute the headline numbers of a run as Markdown bullets.

    Parameters
    ----------
    summary : list of dict
        Output of :func:`summarize`.

    Returns
    -------
    str
        Geometric-mean speed-ups per device and op, and the range of fastbn's fraction of
        the copy bandwidth, for the cases that are not the small one.
    """
    lines = []
    for device in DEVICE_ORDER:
        groups = [g for g in summary if g["device"] == device]
        if not groups:
            continue
        for op in OPS:
            chosen = [g for g in _large(groups) if g["op"] == op]
            if not chosen:
                continue
            torch_gm = geometric_mean(g["speedup_vs_torch"] for g in chosen)
            numpy_gm = geometric_mean(g["speedup_vs_numpy"] for g in chosen)
            fracs = [g["frac_copy"] for g in chosen if g["frac_copy"] is not None]
            parts = []
            if torch_gm:
                parts.append(f"{_ratio(torch_gm)} the speed of PyTorch")
            if numpy_gm:
                parts.append(f"{_ratio(numpy_gm)} the speed of NumPy")
            if fracs:
                parts.append(f"{_pct(min(fracs))} to {_pct(max(fracs))} of the same-size "
                             f"copy bandwidth")
            if parts:
                lines.append(f"- {device} **{op}**: fastbn runs at " + ", ".join(parts) +
                             " (speed-ups: geometric mean over the large cases)")
    return "\n".join(lines) if lines else "- no fastbn results on the large cases in this run"


def _large(groups):
    """The groups of the large cases (the small call is not in the geometric means)."""
    return [g for g in groups if not g["case"].startswith(("small", "tiny"))]


def _headroom_observation(summary):
    """The summary line of :func:`_headroom_section` ("" without PyTorch times).

    Examples
    --------
    >>> print(_headroom_observation([{"device": "cpu", "case": "NC-8x2-float32",
    ...     "op": "forward", "ceiling_vs_torch": 2.0, "speedup_vs_torch": 1.5}]))
    <BLANKLINE>
    - cpu **headroom**: no implementation can run faster than forward 2.00x PyTorch (fastbn 1.50x), geometric means over the large cases (see *Headroom*)
    """
    lines = []
    for device in DEVICE_ORDER:
        groups = _large(g for g in summary if g["device"] == device)
        parts = []
        for op in OPS:
            chosen = [g for g in groups if g["op"] == op and g["ceiling_vs_torch"]]
            if chosen:
                parts.append(
                    f"{op} {_ratio(geometric_mean(g['ceiling_vs_torch'] for g in chosen))} "
                    f"PyTorch (fastbn "
                    f"{_ratio(geometric_mean(g['speedup_vs_torch'] for g in chosen))})")
        if parts:
            lines.append(f"\n- {device} **headroom**: no implementation can run faster than "
                         + ", ".join(parts)
                         + ", geometric means over the large cases (see *Headroom*)")
    return "".join(lines)


def _headroom_section(summary):
    """The *Headroom* section: how far PyTorch is from the roofline, per large case.

    Parameters
    ----------
    summary : list of dict
        Output of :func:`summarize`.

    Returns
    -------
    list of str
        Markdown lines; empty when no case has a PyTorch time.
    """
    groups = [g for g in _large(summary) if g["ceiling_vs_torch"]]
    if not groups:
        return []
    reads_writes = ", ".join(f"{op} {r} + {w}" for op, (r, w) in MIN_TRAFFIC.items())
    body = [[g["device"], g["op"], _shape(g["shape"]), g["dtype"], g["layout"],
             _pct(g["torch_frac_copy"]), _ratio(g["ceiling_vs_torch"]),
             _ratio(g["speedup_vs_torch"]),
             _pct(g["speedup_vs_torch"] / g["ceiling_vs_torch"]
                  if g["speedup_vs_torch"] else None)]
            for g in groups]
    return [
        "## Headroom",
        "",
        "How fast could any implementation be? None moves less than one read of each input "
        "and one write of each output (reads + writes of x-sized arrays: "
        f"{reads_writes}), whatever it keeps in cache; none moves them faster than the copy "
        "bandwidth (the better of the same-size and the large one). *Ceiling* is PyTorch's "
        "time over that shortest time: the speed-up over PyTorch that no implementation "
        "can reach on this machine. It is generous: it assumes the data of the passes "
        "after the first come from cache, and arrays larger than the cache cannot. "
        "*torch % copy* is PyTorch's GB/s on the suite's two-pass count over the same-size "
        "copy bandwidth; *of ceiling* is fastbn's speed-up over the ceiling.",
        "",
        table(["device", "op", "shape", "dtype", "layout", ">torch % copy (same size)",
               ">ceiling vs torch", ">fastbn vs torch", ">of ceiling"], body),
        "",
    ]


def render_markdown(data, rows, summary, images, json_name=None):
    """Write the whole ``docs/benchmarks.md`` text.

    Parameters
    ----------
    data : dict
        The results document (pytest-benchmark JSON plus ``compile_time``).
    rows : list of dict
        Output of :func:`rows_from_json`.
    summary : list of dict
        Output of :func:`summarize`.
    images : list of str
        Paths of the plots, relative to ``docs/``.
    json_name : str, optional
        Path of the raw JSON relative to the repository root, cited in the text.

    Returns
    -------
    str
        Markdown.
    """
    from benchmarks import compile_time

    traffic = table(["op", ">reads", ">writes", "passes"], [
        ["forward", "2", "1", "pass 1 reads x (mean, variance); pass 2 reads x, writes y"],
        ["inference", "1", "1", "reads x, writes y (running statistics)"],
        ["backward", "4", "1", "pass 1 reads dy, x (dbeta, dgamma); pass 2 reads dy, x, writes dx"],
        ["forward_backward", "6", "2", "the sum"],
    ])
    parts = [
        "# Benchmarks",
        "",
        "_Generated by `python -m benchmarks.report`; do not edit by hand (rerun it)._",
        "",
        "BatchNorm is memory-bound: its yardstick is the memory bandwidth of the machine. Every "
        "benchmark below is reported as its median time, its throughput in GB/s for the bytes "
        "it must move, and that throughput as a fraction of the **copy bandwidth measured in "
        "the same run**, next to PyTorch and a plain NumPy implementation with equal thread "
        "counts.",
        "",
        "## Machine",
        "",
        _machine_section(data),
        "",
        "## Summary",
        "",
        _observations(summary) + _interleaved_observation(data.get("interleaved"))
        + _interleaved_observation(data.get("interleaved_default_malloc"),
                                   "interleaved rounds, glibc's default allocator")
        + _headroom_observation(summary),
        "",
        "Times are medians; *vs torch* and *vs numpy* are the other provider's median time "
        "over fastbn's (above 1: fastbn is faster). *% copy (same size)* divides fastbn's "
        "GB/s by the copy bandwidth measured at the size of x, the roofline of the same "
        "cache regime; *% copy (large)* divides it by the copy bandwidth of a 256 MiB array "
        "(DRAM); both are the best measured at that size in this run (suite and reruns). A time marked `*` was taken while other processes used more than "
        f"{100 * BUSY_WARNING:.0f}% of the CPUs (the last column of the full table says how "
        "much); the report reruns such benchmarks when the machine is quiet again, and a "
        "mark that remains means it never was.",
        "",
        summary_table(summary),
        "",
    ]
    for image in images:
        parts += [f"![GB/s per provider against the copy bandwidth]({image})", ""]
    parts += _headroom_section(summary)
    parts += [
        "## How the numbers are made",
        "",
        "**Suite.** `pytest benchmarks --benchmark-only` (pytest-benchmark, "
        "`benchmark.pedantic`): one untimed call first (JIT compilation, page faults of the "
        "outputs), 2 untimed warm-up rounds, then 15-20 timed rounds per large case (30 rounds "
        "of 50 calls for the small one). On the CPU every provider allocates its outputs, "
        "as a caller would without `out=`; the suite runs with glibc's `MALLOC_MMAP_MAX_=0` "
        "and a high `MALLOC_TRIM_THRESHOLD_`, so a freed output is reused by the next call "
        "(a training loop's steady state) instead of page-faulting afresh, which made "
        "PyTorch's backward vary threefold between processes. "
        "PyTorch runs `torch.nn.functional.batch_norm` for forward and inference and "
        "`torch.ops.aten.native_batch_norm(_backward)` for backward (the kernels autograd "
        "calls); NHWC input is a `channels_last` tensor. NumPy is the obvious "
        "`x.mean`/`x.var`/broadcasting implementation in `benchmarks/cases.py`, on one thread. "
        "On a GPU, fastbn runs on Numba device arrays and PyTorch on CUDA tensors (cuDNN), "
        "and every timed call synchronizes the device.",
        "",
        "**Bytes moved** are counted in x-sized arrays, the least a two-pass kernel moves "
        "when x does not stay in cache between passes (per-channel vectors are negligible):",
        "",
        traffic,
        "",
        "A kernel that keeps a channel in cache between its passes moves less, and can pass "
        "100 % on this count; all providers are counted alike, so their ratios are ratios of "
        "times.",
        "",
        "**Copy bandwidth** is STREAM's *Copy*: `dst[:] = src`, counting bytes read plus "
        "bytes written (the write-allocate read is not counted), from the best time over "
        "many copies as STREAM does. The best of three ways is kept: `np.copyto` on one thread, `np.copyto` on one slice per thread, and a Numba "
        "`prange` copy with Numba's thread count. It is measured on a 256 MiB array and again "
        "at the size of each benchmark's x: the (32, 64, 56, 56) float32 tensor is 25.7 MB "
        "and fits in a 32 MB L3, so its roofline is the copy bandwidth at 25.7 MB, not the "
        "DRAM one. Measured in this run (every measurement; the fractions use the best at "
        "each size):",
        "",
        _copy_section(data),
        "",
    ]
    compile_times = data.get("compile_time")
    parts += ["## Compile time (first call) and import time", ""]
    if compile_times:
        verdict = ("met" if all(e["warm_first_call_under_target"] for e in compile_times["cases"])
                   else "**not met**")
        parts += [
            "Measured by `python -m benchmarks.compile_time`, each number the median of "
            f"{compile_times['repeats']} fresh processes. *Cold*: empty Numba cache "
            "(`NUMBA_CACHE_DIR` a new temporary directory), everything is compiled. *Warm*: "
            "a new process on the same, now filled, cache directory. *Whole process* "
            "includes the interpreter's start-up. Other processes took "
            f"{_pct(compile_times.get('other_processes_cpu'))} of the CPUs meanwhile.",
            "",
            compile_time.format_table(compile_times),
            "",
            f"Target: warm-cache first call (forward + backward) under "
            f"{compile_times['warm_target_s']:g} s in a fresh process: {verdict}.",
            "",
        ]
    else:
        parts += ["Not measured in this run (`python -m benchmarks.compile_time`).", ""]
    paired = data.get("interleaved")
    default_malloc = data.get("interleaved_default_malloc")
    if paired or default_malloc:
        from benchmarks import interleaved  # here: it imports this module
    if paired:
        parts += [
            "## Interleaved rounds",
            "",
            "The suite times all the rounds of one provider, then those of the next, so a "
            "change in the machine's state between them enters the ratio: on this VM the "
            "same small call took 10 µs in one process and 15 µs in another, for fastbn and "
            "PyTorch alike. `python -m benchmarks.interleaved` therefore times fastbn and "
            "PyTorch again, the two in turn within each round (the order alternating), "
            f"{paired[0]['threads']} threads each, on the small case and the large float32 "
            "cases. *vs torch* is the median over rounds of PyTorch's time over fastbn's in "
            "the same round; times are medians. Pairing removes the drift in time, not every "
            "difference between processes: on this VM two runs still disagreed by up to 15% "
            "on a cell (the 2-D inference, 1.05x and 0.93x).",
            "",
            interleaved.format_table(paired),
            "",
        ]
    if default_malloc:
        parts += [
            "### With glibc's default allocator",
            "",
            "The suite and the table above run with `MALLOC_MMAP_MAX_=0` and a high "
            "`MALLOC_TRIM_THRESHOLD_` (see *How the numbers are made*): a training loop's "
            "steady state, where a freed output is reused by the next call. A program that "
            "sets neither gets glibc's defaults, under which an output of more than 32 MiB "
            "(and often a smaller one) is a fresh mapping in every call, page-faulted in as "
            "it is written. The same interleaved rounds, run in a process with the defaults, "
            "show what such a caller sees. Neither provider is given `out=`; the speed-ups "
            "of the targets are the suite's, not these.",
            "",
            interleaved.format_table(default_malloc),
            "",
        ]
    parts += [
        "## All benchmarks",
        "",
        full_table(rows),
        "",
        "## Reproduce",
        "",
        "```sh",
        "python -m benchmarks.report                  # suite + compile time + this page",
        "pytest benchmarks --benchmark-only           # the suite alone",
        "python -m benchmarks.report --json FILE      # this page from a saved JSON",
        "python -m benchmarks.compile_time            # first-call and import times",
        "python -m benchmarks.interleaved             # fastbn and PyTorch, interleaved rounds",
        "```",
        "",
    ]
    if json_name:
        parts += [f"Raw results of this page: [`{json_name}`](../{json_name}).", ""]
    return "\n".join(parts)


# ---------------------------------------------------------------------------- running


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
        print(f"waiting for an idle machine: other processes use {100 * busy:.0f}% of the CPUs",
              flush=True)
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
    command = [sys.executable, "-m", "pytest", *(targets or ["benchmarks"]), "--benchmark-only",
               f"--benchmark-json={json_path}", "-p", "no:cacheprovider", "-v",
               "--benchmark-columns=min,median,max,rounds,iterations", "--benchmark-sort=name"]
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
        code = subprocess.call([sys.executable, "-m", "benchmarks.interleaved", "--json",
                                str(out)], cwd=ROOT, env=env)
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
        return [b["fullname"] for b in data.get("benchmarks", [])
                if (b.get("extra_info") or {}).get("other_processes_cpu") is not None
                and b["extra_info"]["other_processes_cpu"] > BUSY_WARNING]

    for attempt in range(retries):
        names = still_disturbed()
        if not names:
            return []
        print(f"rerun {attempt + 1}/{retries}: {len(names)} benchmark(s) ran while other "
              "processes took the CPUs", flush=True)
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


def report(data, *, doc_path=DOC_PATH, img_dir=IMG_DIR, json_name=None, write=True):
    """Print the tables of a results document and write the Markdown page and plots.

    Parameters
    ----------
    data : dict
        pytest-benchmark JSON (plus ``compile_time`` when measured).
    doc_path : pathlib.Path, optional
        The Markdown file.
    img_dir : pathlib.Path, optional
        Where the PNG plots go.
    json_name : str, optional
        The raw JSON, cited in the page.
    write : bool, optional
        ``False`` only prints.

    Returns
    -------
    tuple of (list of dict, list of dict)
        The rows and the summary.
    """
    rows = rows_from_json(data)
    summary = summarize(rows)
    print()
    print(summary_table(summary, markdown=False))
    print()
    busy = [data.get("machine_info", {}).get("fastbn", {}).get(k)
            for k in ("cpu_busy_before", "cpu_busy_after")]
    if any(b is not None and b > BUSY_WARNING for b in busy):
        print(f"WARNING: other processes used more than {100 * BUSY_WARNING:.0f}% of the CPUs "
              "around this run; its numbers may be low.")
    if not write:
        return rows, summary
    images = []
    for device in DEVICE_ORDER:
        path = plot(rows, device, Path(img_dir) / f"benchmarks_{device}.png")
        if path is not None:
            images.append(os.path.relpath(path, Path(doc_path).parent))
    Path(doc_path).parent.mkdir(parents=True, exist_ok=True)
    Path(doc_path).write_text(render_markdown(data, rows, summary, images, json_name),
                              encoding="utf-8")
    print(f"wrote {doc_path}" + "".join(f", {Path(doc_path).parent / i}" for i in images))
    return rows, summary


def main(argv=None):
    """Command line of the report (see the module docstring).

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success, pytest's exit code when the suite failed.
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                     description="Run fastbn's benchmarks and write docs/benchmarks.md.")
    parser.add_argument("--json", type=Path,
                        help="report on this pytest-benchmark JSON instead of running the suite")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression selecting benchmarks")
    parser.add_argument("--no-compile-time", action="store_true",
                        help="do not measure the first-call (JIT) and import times")
    parser.add_argument("--compile-time", action="store_true",
                        help="with --json: measure compile times now (else taken from the JSON)")
    parser.add_argument("--no-interleaved", action="store_true",
                        help="do not time fastbn and PyTorch in interleaved rounds")
    parser.add_argument("--compile-repeats", type=int, default=3,
                        help="fresh processes per compile-time measurement")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to this long for other processes to leave the CPUs")
    parser.add_argument("--retries", type=int, default=2,
                        help="rounds of reruns of the benchmarks disturbed by other processes")
    parser.add_argument("--doc", type=Path, default=DOC_PATH, help="Markdown page to write")
    parser.add_argument("--img-dir", type=Path, default=IMG_DIR, help="directory of the plots")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                        help="directory of the raw JSON of a new run")
    parser.add_argument("--print-only", action="store_true",
                        help="print the tables, write no page, plot or results JSON")
    args = parser.parse_args(argv)

    json_name = None
    if args.json:
        data = load(args.json)
        try:
            json_name = str(args.json.resolve().relative_to(ROOT))
        except ValueError:
            json_name = None
    else:
        if args.wait_idle > 0:
            wait_until_idle(args.wait_idle)
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "raw.json"
            start = time.perf_counter()
            code = run_suite(raw, args.keyword)
            if code != 0 or not raw.exists():
                print(f"the benchmark suite failed (pytest exit code {code})", file=sys.stderr)
                return code or 1
            data = load(raw)
        data["suite_wall_s"] = time.perf_counter() - start
        if args.retries:
            left = rerun_disturbed(data, retries=args.retries, wait_s=max(args.wait_idle, 60.0))
            if left:
                print(f"{len(left)} benchmark(s) still ran on a busy machine; they are marked *")
    if (not args.json and not args.no_compile_time) or args.compile_time:
        from benchmarks import compile_time

        if args.wait_idle > 0:
            wait_until_idle(args.wait_idle)
        data["compile_time"] = compile_time.measure(
            repeats=args.compile_repeats, progress=lambda line: print(line, flush=True))
        print(compile_time.format_table(data["compile_time"]))
    if not args.json and not args.no_interleaved:
        data["interleaved"] = run_interleaved()
        data["interleaved_default_malloc"] = run_interleaved(steady=False)
    if not args.json and not args.print_only:
        info = (data.get("machine_info") or {}).get("fastbn") or machine.describe()
        has_gpu = any(b.get("extra_info", {}).get("device") == "cuda"
                      for b in data.get("benchmarks", []))
        out = Path(args.results_dir) / machine.results_name("cuda" if has_gpu else "cpu", info)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        print(f"saved {out}")
        try:
            json_name = str(out.resolve().relative_to(ROOT))
        except ValueError:
            json_name = str(out)
    elif args.compile_time:
        args.json.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    report(data, doc_path=args.doc, img_dir=args.img_dir, json_name=json_name,
           write=not args.print_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
