"""Laying out benchmark results: terminal and Markdown tables, plots, docs/benchmarks.md.

The page's prose lives in ``benchmarks/report_template.md`` (:func:`template_blocks`);
this module computes what goes into it from :mod:`benchmarks.analyse`'s rows and
summaries. Nothing here runs a benchmark.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from string import Template

from benchmarks import compile_time, interleaved
from benchmarks.analyse import (
    BUSY_WARNING,
    DEVICE_ORDER,
    PROVIDER_ORDER,
    geometric_mean,
    large_cases,
)
from benchmarks.cases import MIN_TRAFFIC, OPS, TRAFFIC
from benchmarks.formatting import (
    format_pct,
    format_ratio,
    format_shape,
    format_time,
    table,
)

TEMPLATE_PATH = Path(__file__).resolve().parent / "report_template.md"

_BLOCK = re.compile(r"^<!-- template: (\w+) -->\n", re.MULTILINE)


# ---------------------------------------------------------------------------- tables


def summary_table(summary, markdown=True):
    """Format :func:`summarize`'s output: one line per (device, case, op).

    Parameters
    ----------
    summary : list of dict
        Output of :func:`benchmarks.analyse.summarize`.
    markdown : bool, optional
        Markdown or plain text.

    Returns
    -------
    str
        Columns: device, op, shape, dtype, layout, the median time of each provider
        (``*``: other processes took more than :data:`BUSY_WARNING` of the CPUs during
        it), fastbn's GB/s and fractions of copy bandwidth, fastbn's speed-ups.
    """
    headers = [
        "device",
        "op",
        "shape",
        "dtype",
        "layout",
        ">fastbn",
        ">torch",
        ">numpy",
        ">fastbn GB/s",
        ">% copy (same size)",
        ">% copy (large)",
        ">vs torch",
        ">vs numpy",
    ]

    def cell(group, provider):
        mark = "*" if provider in group.get("disturbed", ()) else ""
        return format_time(group["times"].get(provider)) + mark

    body = [
        [
            g["device"],
            g["op"],
            format_shape(g["shape"]),
            g["dtype"],
            g["layout"],
            cell(g, "fastbn"),
            cell(g, "torch"),
            cell(g, "numpy"),
            "-" if g["gbps"] is None else f"{g['gbps']:.1f}",
            format_pct(g["frac_copy"]),
            format_pct(g["frac_copy_large"]),
            format_ratio(g["speedup_vs_torch"]),
            format_ratio(g["speedup_vs_numpy"]),
        ]
        for g in summary
    ]
    return table(headers, body, markdown)


def full_table(rows, markdown=True):
    """Format every benchmark: one line per (device, case, op, provider).

    Parameters
    ----------
    rows : list of dict
        Output of :func:`benchmarks.analyse.rows_from_json`.
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
    headers = [
        "device",
        "op",
        "shape",
        "dtype",
        "layout",
        "provider",
        ">median",
        ">GB/s",
        ">GB/s (best round)",
        ">% copy (same size)",
        ">% copy (large)",
        ">copy GB/s (same size)",
        ">copy GB/s (large)",
        ">other processes",
    ]
    body = [
        [
            r["device"],
            r["op"],
            format_shape(r["shape"]),
            r["dtype"],
            r["layout"],
            r["provider"],
            format_time(r["median_s"]),
            f"{r['gbps']:.2f}",
            "-" if r.get("gbps_best") is None else f"{r['gbps_best']:.2f}",
            format_pct(r["frac_copy"]),
            format_pct(r["frac_copy_large"]),
            "-" if r["copy_gbps_same_size"] is None else f"{r['copy_gbps_same_size']:.1f}",
            "-" if r["copy_gbps_large"] is None else f"{r['copy_gbps_large']:.1f}",
            format_pct(r.get("other_cpu")),
        ]
        for r in rows
    ]
    return table(headers, body, markdown)


# ------------------------------------------------------------------------------ plot


def plot(rows, device, path):
    """Draw GB/s per provider, one panel per op, against the copy bandwidth.

    Parameters
    ----------
    rows : list of dict
        Output of :func:`benchmarks.analyse.rows_from_json`; only ``device``'s rows are drawn.
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
    fig, axes = plt.subplots(
        math.ceil(len(ops) / columns),
        columns,
        squeeze=False,
        figsize=(7 * columns, 3.6 * math.ceil(len(ops) / columns)),
    )
    width = 0.8 / max(len(providers), 1)
    for ax, op in zip(axes.flat, ops):
        by_key = {(r["case"], r["provider"]): r for r in rows if r["op"] == op}
        large = None
        for i, case in enumerate(cases):
            for j, provider in enumerate(providers):
                row = by_key.get((case, provider))
                if row is None:
                    continue
                ax.bar(
                    i - 0.4 + width * (j + 0.5),
                    row["gbps"],
                    width,
                    color=colors.get(provider),
                    label=provider,
                )
                large = row["copy_gbps_large"] or large
            same = next(
                (
                    by_key[(case, p)]["copy_gbps_same_size"]
                    for p in providers
                    if (case, p) in by_key
                ),
                None,
            )
            if same:
                ax.hlines(
                    same,
                    i - 0.45,
                    i + 0.45,
                    colors="black",
                    linewidth=2,
                    label="copy, same size" if i == 0 else None,
                )
        if large:
            ax.axhline(large, color="gray", linestyle="--", linewidth=1, label="copy, large array")
        ax.set_title(f"{device}: {op} ({'+'.join(map(str, TRAFFIC[op]))} R+W of x)")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([c.replace("-", "\n") for c in cases], fontsize=7)
        ax.set_ylabel("GB/s")
    legend = {}
    for ax in axes.flat:
        handles, labels = ax.get_legend_handles_labels()
        legend.update(zip(labels, handles))
    for ax in list(axes.flat)[len(ops) :]:
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
            body.append(
                [
                    device,
                    f"{entry['nbytes'] / 1e6:.2f} MB",
                    f"{entry['gbps']:.1f}",
                    entry["method"],
                    others,
                ]
            )
    if not body:
        return "No copy bandwidth was recorded in this run."
    return table(["device", ">array size", ">best GB/s", "best method", "all methods (GB/s)"], body)


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
        parts.append(
            "small call "
            + ", ".join(f"{op} {format_ratio(v['speedup'])}" for op, v in small[0]["ops"].items())
        )
    if large:
        ops = [op for op in OPS if all(op in r["ops"] for r in large)]
        parts.append(
            "large cases (geometric mean) "
            + ", ".join(
                f"{op} {format_ratio(geometric_mean(r['ops'][op]['speedup'] for r in large))}"
                for op in ops
            )
        )
    return f"\n- cpu, **{label}** against PyTorch: " + "; ".join(parts)


def _observations(summary):
    """Compute the headline numbers of a run as Markdown bullets.

    Parameters
    ----------
    summary : list of dict
        Output of :func:`benchmarks.analyse.summarize`.

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
            chosen = [g for g in large_cases(groups) if g["op"] == op]
            if not chosen:
                continue
            torch_gm = geometric_mean(g["speedup_vs_torch"] for g in chosen)
            numpy_gm = geometric_mean(g["speedup_vs_numpy"] for g in chosen)
            fracs = [g["frac_copy"] for g in chosen if g["frac_copy"] is not None]
            parts = []
            if torch_gm:
                parts.append(f"{format_ratio(torch_gm)} the speed of PyTorch")
            if numpy_gm:
                parts.append(f"{format_ratio(numpy_gm)} the speed of NumPy")
            if fracs:
                parts.append(
                    f"{format_pct(min(fracs))} to {format_pct(max(fracs))} of the same-size "
                    f"copy bandwidth"
                )
            if parts:
                lines.append(
                    f"- {device} **{op}**: fastbn runs at "
                    + ", ".join(parts)
                    + " (speed-ups: geometric mean over the large cases)"
                )
    return "\n".join(lines) if lines else "- no fastbn results on the large cases in this run"


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
        groups = large_cases(g for g in summary if g["device"] == device)
        parts = []
        for op in OPS:
            chosen = [g for g in groups if g["op"] == op and g["ceiling_vs_torch"]]
            if chosen:
                parts.append(
                    f"{op} {format_ratio(geometric_mean(g['ceiling_vs_torch'] for g in chosen))} "
                    f"PyTorch (fastbn "
                    f"{format_ratio(geometric_mean(g['speedup_vs_torch'] for g in chosen))})"
                )
        if parts:
            lines.append(
                f"\n- {device} **headroom**: no implementation can run faster than "
                + ", ".join(parts)
                + ", geometric means over the large cases (see *Headroom*)"
            )
    return "".join(lines)


def _headroom_section(summary, blocks):
    """The *Headroom* section: how far PyTorch is from the roofline, per large case.

    Parameters
    ----------
    summary : list of dict
        Output of :func:`benchmarks.analyse.summarize`.
    blocks : dict
        :func:`template_blocks`.

    Returns
    -------
    str
        Markdown; empty when no case has a PyTorch time.
    """
    groups = [g for g in large_cases(summary) if g["ceiling_vs_torch"]]
    if not groups:
        return ""
    reads_writes = ", ".join(f"{op} {r} + {w}" for op, (r, w) in MIN_TRAFFIC.items())
    body = [
        [
            g["device"],
            g["op"],
            format_shape(g["shape"]),
            g["dtype"],
            g["layout"],
            format_pct(g["torch_frac_copy"]),
            format_ratio(g["ceiling_vs_torch"]),
            format_ratio(g["speedup_vs_torch"]),
            format_pct(
                g["speedup_vs_torch"] / g["ceiling_vs_torch"] if g["speedup_vs_torch"] else None
            ),
        ]
        for g in groups
    ]
    return blocks["headroom"].substitute(
        reads_writes=reads_writes,
        table=table(
            [
                "device",
                "op",
                "shape",
                "dtype",
                "layout",
                ">torch % copy (same size)",
                ">ceiling vs torch",
                ">fastbn vs torch",
                ">of ceiling",
            ],
            body,
        ),
    )


def template_blocks(path=TEMPLATE_PATH):
    """Read the prose blocks of the page (see the comment at the top of the file).

    Parameters
    ----------
    path : pathlib.Path, optional
        The template file.

    Returns
    -------
    dict
        Block name -> :class:`string.Template` of its text, trailing blank lines dropped.

    Examples
    --------
    >>> blocks = template_blocks()
    >>> blocks["raw_json"].substitute(json_name="results/x.json")
    'Raw results of this page: [`results/x.json`](../results/x.json).'
    """
    pieces = _BLOCK.split(Path(path).read_text(encoding="utf-8"))
    return {name: Template(text.rstrip("\n")) for name, text in zip(pieces[1::2], pieces[2::2])}


def _compile_time_section(data, blocks):
    """The compile-time block of the page: the measured table, or a sentence."""
    compile_times = data.get("compile_time")
    if not compile_times:
        return blocks["compile_time_missing"].substitute()
    verdict = (
        "met"
        if all(e["warm_first_call_under_target"] for e in compile_times["cases"])
        else "**not met**"
    )
    return blocks["compile_time"].substitute(
        repeats=compile_times["repeats"],
        other_processes=format_pct(compile_times.get("other_processes_cpu")),
        table=compile_time.format_table(compile_times),
        target_s=f"{compile_times['warm_target_s']:g}",
        verdict=verdict,
    )


def _interleaved_sections(data, blocks):
    """The interleaved-rounds blocks of the page, each ending with a blank line ("" when
    they were not measured)."""
    text = ""
    paired = data.get("interleaved")
    if paired:
        text += (
            blocks["interleaved"].substitute(
                threads=paired[0]["threads"], table=interleaved.format_table(paired)
            )
            + "\n\n"
        )
    default_malloc = data.get("interleaved_default_malloc")
    if default_malloc:
        text += (
            blocks["interleaved_default_malloc"].substitute(
                table=interleaved.format_table(default_malloc)
            )
            + "\n\n"
        )
    return text


def render_markdown(data, rows, summary, images, json_name=None):
    """Write the whole ``docs/benchmarks.md`` text.

    Parameters
    ----------
    data : dict
        The results document (pytest-benchmark JSON plus ``compile_time``).
    rows : list of dict
        Output of :func:`benchmarks.analyse.rows_from_json`.
    summary : list of dict
        Output of :func:`benchmarks.analyse.summarize`.
    images : list of str
        Paths of the plots, relative to ``docs/``.
    json_name : str, optional
        Path of the raw JSON relative to the repository root, cited in the text.

    Returns
    -------
    str
        Markdown: the blocks of ``benchmarks/report_template.md`` filled in.
    """
    blocks = template_blocks()
    traffic = table(
        ["op", ">reads", ">writes", "passes"],
        [
            ["forward", "2", "1", "pass 1 reads x (mean, variance); pass 2 reads x, writes y"],
            ["inference", "1", "1", "reads x, writes y (running statistics)"],
            [
                "backward",
                "4",
                "1",
                "pass 1 reads dy, x (dbeta, dgamma); pass 2 reads dy, x, writes dx",
            ],
            ["forward_backward", "6", "2", "the sum"],
            [
                "frozen_backward",
                "2",
                "1",
                "one pass: reads dy, x (dbeta, dgamma), writes dx (fixed statistics)",
            ],
        ],
    )
    observations = (
        _observations(summary)
        + _interleaved_observation(data.get("interleaved"))
        + _interleaved_observation(
            data.get("interleaved_default_malloc"), "interleaved rounds, glibc's default allocator"
        )
        + _headroom_observation(summary)
    )
    headroom = _headroom_section(summary, blocks)
    text = (
        blocks["page"].substitute(
            machine=_machine_section(data),
            observations=observations,
            busy_pct=f"{100 * BUSY_WARNING:.0f}",
            summary_table=summary_table(summary),
            figures="".join(
                f"![GB/s per provider against the copy bandwidth]({image})\n\n" for image in images
            ),
            headroom=headroom + "\n\n" if headroom else "",
            traffic=traffic,
            copy_bandwidth=_copy_section(data),
            compile_time=_compile_time_section(data, blocks),
            interleaved=_interleaved_sections(data, blocks),
            full_table=full_table(rows),
        )
        + "\n"
    )
    if json_name:
        text += "\n" + blocks["raw_json"].substitute(json_name=json_name) + "\n"
    return text
