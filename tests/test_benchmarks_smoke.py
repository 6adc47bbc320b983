"""Smoke tests of the benchmark suite, so that CI catches a broken ``benchmarks/``.

Nothing here is timed: the report is built from a tiny synthetic pytest-benchmark JSON,
and the suite's small case runs once per provider with ``--benchmark-disable``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def report_module(monkeypatch):
    """Import ``benchmarks.report`` from the repository root.

    Returns
    -------
    module
        ``benchmarks.report``.
    """
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import report

    return report


def _bench(provider, op, median, case="NCHW-2x3x4x4-float32", device="cpu"):
    """One pytest-benchmark entry as the suite writes it.

    Parameters
    ----------
    provider, op : str
        What ran.
    median : float
        Median seconds.
    case : str, optional
        Case id.
    device : str, optional
        ``"cpu"`` or ``"cuda"``.

    Returns
    -------
    dict
        ``name``, ``stats``, ``extra_info``.
    """
    x_bytes = 2 * 3 * 4 * 4 * 4
    moved = {
        "forward": 3,
        "inference": 2,
        "backward": 5,
        "forward_backward": 8,
        "frozen_backward": 3,
    }[op] * x_bytes
    return {
        "name": f"test_cpu[{case}-{op}-{provider}]",
        "stats": {"median": median, "min": median, "max": median, "rounds": 3},
        "extra_info": {
            "provider": provider,
            "op": op,
            "case": case,
            "shape": [2, 3, 4, 4],
            "dtype": "float32",
            "layout": "NCHW",
            "axis": 1,
            "device": device,
            "threads": 2,
            "x_bytes": x_bytes,
            "bytes_moved": moved,
            "median_s": median,
            "gbps": moved / median / 1e9,
            "copy_gbps_same_size": 40.0,
            "copy_method_same_size": "np.copyto",
            "copy_gbps_large": 20.0,
            "copy_method_large": "numba prange x2",
            "copy_large_bytes": 2**28,
        },
    }


def _synthetic():
    """A tiny results document: two ops, three providers, plus a foreign benchmark.

    Returns
    -------
    dict
        pytest-benchmark JSON with ``machine_info``, ``copy_bandwidth`` and
        ``compile_time`` as ``benchmarks/conftest.py`` and the report add them.
    """
    benchmarks = [
        _bench("numpy", "forward", 4e-6),
        _bench("fastbn", "forward", 1e-6),
        _bench("torch", "forward", 2e-6),
        _bench("fastbn", "backward", 2e-6),
        _bench("numpy", "backward", 8e-6),
        {"name": "test_other", "stats": {"median": 1.0}, "extra_info": {}},
    ]
    warm = {
        "import_s": 0.4,
        "first_forward_s": 0.3,
        "first_backward_s": 0.1,
        "first_call_s": 0.4,
        "second_forward_s": 0.001,
        "second_backward_s": 0.001,
        "process_s": 1.2,
    }
    cold = dict(warm, first_forward_s=5.0, first_backward_s=4.0, first_call_s=9.0)
    return {
        "machine_info": {
            "fastbn": {
                "cpu_model": "Test CPU",
                "cpu_count": 2,
                "threads": 2,
                "hostname": "h",
                "date": "2024-01-01T00:00:00+00:00",
                "cpu_busy_before": 0.0,
                "cpu_busy_after": 0.0,
            }
        },
        "benchmarks": benchmarks,
        "copy_bandwidth": {
            "cpu": [
                {
                    "nbytes": 384,
                    "gbps": 40.0,
                    "method": "np.copyto",
                    "threads": 2,
                    "by_method": {"np.copyto": 40.0},
                }
            ]
        },
        "compile_time": {
            "warm_target_s": 1.0,
            "repeats": 1,
            "cases": [
                {
                    "case": "NCHW-2x3x4x4-float32",
                    "shape": [2, 3, 4, 4],
                    "axis": 1,
                    "dtype": "float32",
                    "cold": cold,
                    "warm": warm,
                    "warm_first_call_under_target": True,
                }
            ],
        },
    }


def test_report_tables_from_synthetic_json(report_module, tmp_path):
    """Rows, speed-ups, tables, plot and Markdown come out of a synthetic JSON."""
    from benchmarks import analyse, render

    data = _synthetic()
    rows = analyse.rows_from_json(data)
    assert [(r["op"], r["provider"]) for r in rows] == [
        ("forward", "fastbn"),
        ("forward", "torch"),
        ("forward", "numpy"),
        ("backward", "fastbn"),
        ("backward", "numpy"),
    ]
    forward = rows[0]
    assert forward["gbps"] == pytest.approx(3 * 384 / 1e-6 / 1e9)
    assert forward["frac_copy"] == pytest.approx(forward["gbps"] / 40.0)
    assert forward["frac_copy_large"] == pytest.approx(forward["gbps"] / 20.0)

    summary = analyse.summarize(rows)
    assert summary[0]["speedup_vs_torch"] == pytest.approx(2.0)
    assert summary[0]["speedup_vs_numpy"] == pytest.approx(4.0)
    assert summary[1]["speedup_vs_torch"] is None
    assert summary[1]["speedup_vs_numpy"] == pytest.approx(4.0)
    # headroom: PyTorch's forward (2 us) against 1 read + 1 write of x at the better copy
    # bandwidth (40 GB/s): 2 * 384 B / 40 GB/s = 19.2 ns, a ceiling of 2e-6 / 19.2e-9
    assert summary[0]["ceiling_vs_torch"] == pytest.approx(2e-6 / (2 * 384 / 40e9))
    assert summary[0]["torch_frac_copy"] == pytest.approx(3 * 384 / 2e-6 / 1e9 / 40.0)
    assert summary[1]["ceiling_vs_torch"] is None

    text = render.summary_table(summary, markdown=False)
    assert "2.00x" in text and "4.00x" in text

    doc, img_dir = tmp_path / "benchmarks.md", tmp_path / "img"
    report_module.report(data, doc_path=doc, img_dir=img_dir, json_name="results/x.json")
    page = doc.read_text()
    assert "Test CPU" in page
    assert "| cpu | forward | 2x3x4x4 | float32 | NCHW |" in page
    assert "img/benchmarks_cpu.png" in page
    assert "Target: warm-cache first call" in page
    assert "## Headroom" in page and "**headroom**: no implementation can run faster" in page
    assert (img_dir / "benchmarks_cpu.png").stat().st_size > 0


def test_report_cli_reads_json(tmp_path):
    """``python -m benchmarks.report --json FILE`` runs end to end without the suite."""
    source = tmp_path / "run.json"
    source.write_text(json.dumps(_synthetic()))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.report",
            "--json",
            str(source),
            "--doc",
            str(tmp_path / "page.md"),
            "--img-dir",
            str(tmp_path / "img"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "forward" in proc.stdout
    assert (tmp_path / "page.md").exists()


def test_copy_bandwidth_is_measured(report_module):
    """The copy-bandwidth yardstick returns a positive number and names its method."""
    from benchmarks.bandwidth import copy_bandwidth

    result = copy_bandwidth(1 << 16, threads=1, target_seconds=0.01)
    assert result.gbps > 0
    assert result.method in result.by_method


def test_frozen_rows_compares_every_variant(report_module, capsys):
    """``benchmarks.frozen_rows`` times each variant against the plain loop on a small case."""
    from benchmarks.frozen_rows import _case

    _case((64, 8), 2)
    out = capsys.readouterr().out
    for name in ("frozen ", "plain ", "frozen@2K", "plain@2K", "frozen out=dy"):
        assert name in out, out


def test_small_benchmarks_run_untimed(tmp_path):
    """Every provider and op of the small case runs once under pytest-benchmark.

    ``--benchmark-disable`` calls each benchmarked function once, untimed: a broken
    provider or fixture fails here. The GPU module is collected too (and skips without
    a GPU).
    """
    env = dict(os.environ, FASTBN_BENCH_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "benchmarks",
            "-k",
            "small or host_overhead",
            "--benchmark-disable",
            "-q",
            "-p",
            "no:cacheprovider",
            "-rs",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout
    assert "failed" not in proc.stdout


def _as_numpy(result, axis):
    """Turn a provider's result into a tuple of NumPy arrays in x's layout.

    Parameters
    ----------
    result : array, tensor or tuple of them
        What a provider's call returned.
    axis : int
        The channel axis of x (PyTorch results have the channel at position 1).

    Returns
    -------
    tuple of numpy.ndarray
        The outputs.
    """
    outputs = result if isinstance(result, (tuple, list)) else (result,)
    arrays = []
    for out in outputs:
        if hasattr(out, "detach"):  # a torch tensor: channel back where x has it
            out = out.detach()
            out = out.movedim(1, axis % out.ndim) if out.ndim > 1 else out
            out = out.numpy()
        arrays.append(out)
    return tuple(arrays)


@pytest.mark.parametrize(
    "layout, shape, axis",
    [("NCHW", (4, 3, 5, 5), 1), ("NHWC", (4, 5, 5, 3), -1), ("NC", (37, 6), 1)],
)
def test_providers_compute_the_same(report_module, layout, shape, axis):
    """fastbn, NumPy and PyTorch providers agree: the suite compares like with like."""
    from benchmarks.cases import CPU_PROVIDERS, OPS, Case, make_inputs

    providers = ["fastbn", "numpy"]
    try:
        import torch  # noqa: F401

        providers.append("torch")
    except ImportError:
        pass
    inputs = make_inputs(Case(layout, shape, axis, "float64"))
    for op in OPS:
        results = {p: _as_numpy(CPU_PROVIDERS[p](op, inputs)(), axis) for p in providers}
        outputs = 1 if op in ("forward", "inference") else 3  # y, or (dx, dgamma, dbeta)
        for provider in providers[1:]:
            for mine, theirs in zip(results["fastbn"][:outputs], results[provider][:outputs]):
                np.testing.assert_allclose(
                    mine, theirs, rtol=1e-9, atol=1e-9, err_msg=f"{op}: fastbn vs {provider}"
                )


def test_interleaved_rounds(report_module, tmp_path):
    """fastbn and PyTorch timed in interleaved rounds: both providers measured, the
    speed-up is the median of per-round ratios, and the report renders the section."""
    pytest.importorskip("torch")
    from benchmarks import interleaved

    result = interleaved.measure(
        rounds=5, iterations=2, ops=("inference", "backward"), progress=None
    )
    assert list(result["ops"]) == ["inference", "backward"]
    for r in result["ops"].values():
        assert r["fastbn_s"] > 0 and r["torch_s"] > 0 and r["speedup"] > 0
        assert 0.0 <= r["fastbn_faster"] <= 1.0
    data = _synthetic()
    data["interleaved"] = [result]
    default_malloc = dict(result, iterations=3)
    data["interleaved_default_malloc"] = [default_malloc]
    doc = tmp_path / "benchmarks.md"
    report_module.report(data, doc_path=doc, img_dir=tmp_path / "img")
    page = doc.read_text()
    assert "## Interleaved rounds" in page
    assert "small call inference" in page
    assert f"| {result['case']} | backward | 5 x 2 |" in page
    assert "### With glibc's default allocator" in page
    assert "interleaved rounds, glibc's default allocator** against PyTorch" in page
    assert f"| {result['case']} | backward | 5 x 3 |" in page


@pytest.mark.parametrize("op", ["forward", "inference", "backward"])
def test_small_call_stages_compute_what_the_public_call_does(op):
    """The stages of benchmarks.small_call time the public call's work: the host stage and
    the kernel stage write the public call's output bit for bit, PyTorch's native kernel
    agrees to float32 rounding, and the breakdown table renders every stage."""
    pytest.importorskip("torch")
    from benchmarks import small_call
    from benchmarks.cases import make_inputs

    inputs = make_inputs(small_call.SMALL)
    calls = small_call.stages(op, inputs)
    public = calls["public"]()
    host = calls["host"]()
    first = lambda r: r[0] if isinstance(r, tuple) else r  # noqa: E731
    if op == "backward":  # the host stage returns (dgamma, dbeta), dx being its argument
        np.testing.assert_array_equal(np.stack(host), np.stack(public[1:]))
    else:
        np.testing.assert_array_equal(first(host), first(public))
        # float32 outputs of order 1 computed by two float32 formulas: a few ulps apart
        np.testing.assert_allclose(
            first(calls["torch"]()).numpy(), first(public), rtol=1e-4, atol=1e-4
        )
    times = small_call.measure(op, rounds=3, iterations=2)
    assert set(times) == set(calls) and all(t > 0 for t in times.values())
    table = small_call.format_table({op: times}, 1)
    assert f"| {op} |" in table and "torch / public" in table


@pytest.mark.parametrize(
    "layout, shape, axis", [("NCHW", (4, 3, 5, 5), 1), ("NHWC", (4, 5, 5, 3), -1)]
)
def test_residual_benchmark_variants_agree_and_measure(report_module, layout, shape, axis):
    """The fused residual benchmark compares like with like (fused, fastbn + NumPy add +
    ReLU, PyTorch's ``relu(bn(x) + z)``), and its paired measurement fills every field."""
    from benchmarks import residual
    from benchmarks.cases import Case, make_inputs

    case = Case(layout, shape, axis, "float32")
    inputs = make_inputs(case)
    residual.check_agreement(inputs, residual.residual_of(inputs))
    result = residual.measure(case, "residual_forward", rounds=3, progress=None)
    assert result["times"]["fastbn"] > 0 and result["ratios"]["fastbn"] == 1.0
    assert result["bytes"]["fastbn"] * 2 == result["bytes"]["fastbn+numpy"]
    assert f"| {case.id} | residual_forward | 3 |" in residual.format_table([result])


def test_torch_cnn_calls_run_and_agree(monkeypatch):
    """benchmarks/torch_cnn.py's calls on a small activation, untimed: both providers run
    every op, and the BatchNorm layers' input gradients are the same."""
    pytest.importorskip("torch")
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import torch_cnn

    shape = (4, 8, 6, 6)
    for op in torch_cnn.OPS:
        result = torch_cnn.paired(torch_cnn.make_calls(op, shape), rounds=2)
        assert result["torch"] > 0 and result["fastbn"] > 0 and result["speedup"] > 0
        assert result["best"]["fastbn"] <= result["fastbn"]
    torch_cnn.direct_small_call()()
    grads = {}
    for name, call in torch_cnn.make_calls("bn-layers", shape).items():
        call()
        grads[name] = [x.grad.clone() for x in call.inputs]
    for theirs, ours in zip(grads["torch"], grads["fastbn"]):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-4, atol=1e-5)


def test_torch_cnn_step_layers_cover_the_step(monkeypatch):
    """benchmarks/torch_cnn.py's per-layer breakdown of the training step: a forward and
    a backward time for every layer of the CNN and the loss, for both providers."""
    pytest.importorskip("torch")
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import torch_cnn

    result = torch_cnn.measure_layers(rounds=2, shape=(4, 8, 6, 6))
    layers = result["layers"]
    assert len(layers) == 2 * (9 + 1)  # 9 layers and the loss, forward and backward
    assert "1 BatchNorm2d backward" in layers and "loss forward" in layers
    for times in layers.values():
        assert set(times) == {"torch", "fastbn"}
        assert all(t >= 0 for t in times.values())
    faults = torch_cnn.measure_layers(rounds=1, shape=(4, 8, 6, 6), clock=torch_cnn.page_faults)
    assert faults["layers"].keys() == layers.keys()
    assert all(n >= 0 and n == int(n) for t in faults["layers"].values() for n in t.values())
