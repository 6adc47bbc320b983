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

This module is the command line; the work is done by :mod:`benchmarks.run` (the suite,
its reruns, the interleaved rounds, waiting for an idle machine),
:mod:`benchmarks.analyse` (rows, summaries, headroom), :mod:`benchmarks.render` (tables,
plots, the page, whose prose is ``benchmarks/report_template.md``) and
:mod:`benchmarks.formatting` (shared by the render and :mod:`benchmarks.interleaved`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import analyse, compile_time, machine, render, run

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
DOC_PATH = ROOT / "docs" / "benchmarks.md"
IMG_DIR = ROOT / "docs" / "img"


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
    rows = analyse.rows_from_json(data)
    summary = analyse.summarize(rows)
    print()
    print(render.summary_table(summary, markdown=False))
    print()
    busy = [
        data.get("machine_info", {}).get("fastbn", {}).get(k)
        for k in ("cpu_busy_before", "cpu_busy_after")
    ]
    if any(b is not None and b > analyse.BUSY_WARNING for b in busy):
        print(
            f"WARNING: other processes used more than {100 * analyse.BUSY_WARNING:.0f}% of the CPUs "
            "around this run; its numbers may be low."
        )
    if not write:
        return rows, summary
    images = []
    for device in analyse.DEVICE_ORDER:
        path = render.plot(rows, device, Path(img_dir) / f"benchmarks_{device}.png")
        if path is not None:
            images.append(os.path.relpath(path, Path(doc_path).parent))
    Path(doc_path).parent.mkdir(parents=True, exist_ok=True)
    Path(doc_path).write_text(
        render.render_markdown(data, rows, summary, images, json_name), encoding="utf-8"
    )
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
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description="Run fastbn's benchmarks and write docs/benchmarks.md.",
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="report on this pytest-benchmark JSON instead of running the suite",
    )
    parser.add_argument("-k", dest="keyword", help="pytest -k expression selecting benchmarks")
    parser.add_argument(
        "--no-compile-time",
        action="store_true",
        help="do not measure the first-call (JIT) and import times",
    )
    parser.add_argument(
        "--compile-time",
        action="store_true",
        help="with --json: measure compile times now (else taken from the JSON)",
    )
    parser.add_argument(
        "--no-interleaved",
        action="store_true",
        help="do not time fastbn and PyTorch in interleaved rounds",
    )
    parser.add_argument(
        "--compile-repeats",
        type=int,
        default=3,
        help="fresh processes per compile-time measurement",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for other processes to leave the CPUs",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="rounds of reruns of the benchmarks disturbed by other processes",
    )
    parser.add_argument("--doc", type=Path, default=DOC_PATH, help="Markdown page to write")
    parser.add_argument("--img-dir", type=Path, default=IMG_DIR, help="directory of the plots")
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help="directory of the raw JSON of a new run",
    )
    parser.add_argument(
        "--print-only",
        action="store_true",
        help="print the tables, write no page, plot or results JSON",
    )
    args = parser.parse_args(argv)

    json_name = None
    if args.json:
        data = analyse.load(args.json)
        try:
            json_name = str(args.json.resolve().relative_to(ROOT))
        except ValueError:
            json_name = None
    else:
        if args.wait_idle > 0:
            run.wait_until_idle(args.wait_idle)
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "raw.json"
            start = time.perf_counter()
            code = run.run_suite(raw, args.keyword)
            if code != 0 or not raw.exists():
                print(f"the benchmark suite failed (pytest exit code {code})", file=sys.stderr)
                return code or 1
            data = analyse.load(raw)
        data["suite_wall_s"] = time.perf_counter() - start
        if args.retries:
            left = run.rerun_disturbed(data, retries=args.retries, wait_s=max(args.wait_idle, 60.0))
            if left:
                print(f"{len(left)} benchmark(s) still ran on a busy machine; they are marked *")
    if (not args.json and not args.no_compile_time) or args.compile_time:
        if args.wait_idle > 0:
            run.wait_until_idle(args.wait_idle)
        data["compile_time"] = compile_time.measure(
            repeats=args.compile_repeats, progress=lambda line: print(line, flush=True)
        )
        print(compile_time.format_table(data["compile_time"]))
    if not args.json and not args.no_interleaved:
        data["interleaved"] = run.run_interleaved()
        data["interleaved_default_malloc"] = run.run_interleaved(steady=False)
    if not args.json and not args.print_only:
        info = (data.get("machine_info") or {}).get("fastbn") or machine.describe()
        has_gpu = any(
            b.get("extra_info", {}).get("device") == "cuda" for b in data.get("benchmarks", [])
        )
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
    report(
        data,
        doc_path=args.doc,
        img_dir=args.img_dir,
        json_name=json_name,
        write=not args.print_only,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
