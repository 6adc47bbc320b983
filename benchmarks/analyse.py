"""From a pytest-benchmark JSON to rows, per-case summaries and headroom numbers.

:func:`rows_from_json` flattens the suite's benchmarks (one row per device, case, op and
provider, with GB/s and fractions of the copy bandwidth measured in the same run);
:func:`summarize` puts the providers of a case side by side with fastbn's speed-ups and
the ceiling no implementation can pass (:data:`benchmarks.cases.MIN_TRAFFIC` at the copy
bandwidth). Nothing here prints or writes: :mod:`benchmarks.render` lays the results out.
"""

from __future__ import annotations

import json
import math

from benchmarks.cases import MIN_TRAFFIC, OPS, bytes_moved

PROVIDER_ORDER = ("fastbn", "torch", "numpy")
DEVICE_ORDER = ("cpu", "cuda")

# A machine busier than this with other processes (fraction of all CPU time) gets a
# warning in the report: a stolen core halves a parallel kernel's speed.
BUSY_WARNING = 0.10


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
        rows.append(
            {
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
            }
        )

    def key(row):
        return (
            DEVICE_ORDER.index(row["device"]) if row["device"] in DEVICE_ORDER else 9,
            case_order[(row["device"], row["case"])],
            OPS.index(row["op"]) if row["op"] in OPS else 9,
            PROVIDER_ORDER.index(row["provider"]) if row["provider"] in PROVIDER_ORDER else 9,
        )

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
        group = groups.setdefault(
            (row["device"], row["case"], row["op"]),
            {
                "device": row["device"],
                "case": row["case"],
                "op": row["op"],
                "shape": row["shape"],
                "dtype": row["dtype"],
                "layout": row["layout"],
                "times": {},
                "gbps": None,
                "frac_copy": None,
                "frac_copy_large": None,
                "bytes_moved": row["bytes_moved"],
                "x_bytes": row.get("x_bytes"),
                "copy_gbps": (row["copy_gbps_same_size"], row["copy_gbps_large"]),
            },
        )
        group["times"][row["provider"]] = row["median_s"]
        group.setdefault("disturbed", set())
        if disturbed(row):
            group["disturbed"].add(row["provider"])
        if row["provider"] == "fastbn":
            group.update(
                gbps=row["gbps"], frac_copy=row["frac_copy"], frac_copy_large=row["frac_copy_large"]
            )
    for group in groups.values():
        fastbn_time = group["times"].get("fastbn")
        for other in ("torch", "numpy"):
            other_time = group["times"].get(other)
            group[f"speedup_vs_{other}"] = (
                other_time / fastbn_time if fastbn_time and other_time else None
            )
        torch_time = group["times"].get("torch")
        same, large = group.pop("copy_gbps")
        copy = max((c for c in (same, large) if c), default=None)
        group["torch_frac_copy"] = (
            group["bytes_moved"] / torch_time / 1e9 / same if torch_time and same else None
        )
        group["ceiling_vs_torch"] = (
            torch_time * copy * 1e9 / bytes_moved(group["op"], group["x_bytes"], MIN_TRAFFIC)
            if torch_time and copy and group["x_bytes"]
            else None
        )
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


def large_cases(groups):
    """The groups of the large cases (the small call is not in the geometric means).

    Parameters
    ----------
    groups : iterable of dict
        Entries of :func:`summarize` (anything with a ``case`` name).

    Returns
    -------
    list of dict
        Those whose case is neither ``small...`` nor ``tiny...``.

    Examples
    --------
    >>> [g["case"] for g in large_cases([{"case": "small-NC"}, {"case": "NCHW-32x64"}])]
    ['NCHW-32x64']
    """
    return [g for g in groups if not g["case"].startswith(("small", "tiny"))]
