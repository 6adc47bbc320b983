"""The CPU side of ``benchmarks/gpu_check.sh``, tested without a GPU.

Arguments, the device description (its queries faked), the results JSON and the
script's own refusals when there is no GPU. The GPU steps themselves run only on a GPU.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.fixture
def gpu_check(monkeypatch):
    """Import ``benchmarks.gpu_check`` from the repository root.

    Returns
    -------
    module
    """
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import gpu_check

    return gpu_check


FAKE_SMI = {
    "query": "NVIDIA H200, 570.86.15, 143771 MiB, 9.0\n",
    "banner": "| NVIDIA-SMI 570.86.15    Driver Version: 570.86.15    CUDA Version: 12.8  |\n",
}


def _fake_run(command):
    """``nvidia-smi`` as a function: the CSV query or the banner."""
    return FAKE_SMI["query" if len(command) > 1 else "banner"]


def _fake_device(gpu_check):
    """A device description of an H200 with every query faked."""
    return gpu_check.describe_device(
        lambda: gpu_check.query_nvidia_smi(_fake_run),
        lambda: {
            "available": True,
            "simulator": False,
            "name": "NVIDIA H200",
            "compute_capability": "9.0",
            "runtime": "12.8",
            "driver": "12.8",
        },
        lambda: {"version": "2.13.0", "cuda": "12.8", "cudnn": 91000, "available": True},
    )


def _bench(provider, op, median, case="NCHW-32x64x56x56-float32"):
    """One CUDA entry of pytest-benchmark JSON as benchmarks/conftest.py records it."""
    x_bytes = 32 * 64 * 56 * 56 * 4
    moved = {"forward": 3, "backward": 5}[op] * x_bytes
    return {
        "name": f"test_cuda[{case}-{op}-{provider}]",
        "fullname": f"x::{provider}{op}",
        "stats": {"median": median, "min": median, "max": median, "rounds": 50},
        "extra_info": {
            "provider": provider,
            "op": op,
            "case": case,
            "shape": [32, 64, 56, 56],
            "dtype": "float32",
            "layout": "NCHW",
            "axis": 1,
            "device": "cuda",
            "threads": 16,
            "x_bytes": x_bytes,
            "bytes_moved": moved,
            "median_s": median,
            "gbps": moved / median / 1e9,
            "copy_gbps_same_size": 3000.0,
            "copy_method_same_size": "cuda memcpy d2d",
            "copy_gbps_large": 4000.0,
            "copy_method_large": "cuda memcpy d2d",
            "copy_large_bytes": 2**28,
        },
    }


def _bench_json():
    """A GPU run's pytest-benchmark JSON: fastbn and torch, forward and backward."""
    return {
        "machine_info": {
            "fastbn": {
                "cpu_model": "Test CPU",
                "cpu_count": 16,
                "threads": 16,
                "hostname": "node",
                "date": "2026-12-03T20:00:00+00:00",
            }
        },
        "benchmarks": [
            _bench("fastbn", "forward", 40e-6),
            _bench("torch", "forward", 60e-6),
            _bench("fastbn", "backward", 70e-6),
            _bench("torch", "backward", 80e-6),
        ],
        "copy_bandwidth": {
            "cuda": [
                {
                    "nbytes": 2**28,
                    "gbps": 4000.0,
                    "method": "cuda memcpy d2d",
                    "threads": 0,
                    "by_method": {"cuda memcpy d2d": 4000.0},
                }
            ]
        },
    }


# ------------------------------------------------------------------------------ arguments


def test_plan_defaults_and_options(gpu_check):
    args = gpu_check.parse_args(["plan"])
    assert args.outdir == "benchmarks/results"
    assert not args.install and args.torch == gpu_check.TORCH_VERSION
    assert args.tests_timeout + args.bench_timeout + gpu_check.OVERHEAD_S <= gpu_check.BUDGET_S
    args = gpu_check.parse_args(
        [
            "plan",
            "out dir",
            "--install",
            "--torch",
            "2.9.1",
            "--tests-timeout",
            "100",
            "--skip-bench",
        ]
    )
    plan = dict(line.split("=", 1) for line in gpu_check.shell_plan(args).splitlines())
    assert plan == {
        "OUTDIR": "'out dir'",
        "INSTALL": "1",
        "TORCH_VERSION": "2.9.1",
        "TESTS_TIMEOUT": "100",
        "BENCH_TIMEOUT": str(gpu_check.BENCH_TIMEOUT_S),
        "RUN_TESTS": "1",
        "RUN_BENCH": "0",
    }


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "--bogus"],
        ["plan", "--tests-timeout", "0"],
        ["plan", "--tests-timeout", "300", "--bench-timeout", "300"],  # over the 8 minutes
        ["plan", "--torch", "2.13; rm -rf /"],
        ["plan", "a", "b"],
        [],
    ],
)
def test_bad_arguments_are_refused(gpu_check, argv, capsys):
    with pytest.raises(SystemExit) as info:
        gpu_check.parse_args(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_skipped_step_frees_its_time(gpu_check):
    args = gpu_check.parse_args(["plan", "--skip-bench", "--tests-timeout", "400"])
    assert args.tests_timeout == 400


def test_plan_is_safe_to_eval_in_bash(gpu_check, tmp_path):
    """The script evals the plan: a hostile OUTDIR stays one literal value."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    outdir = str(tmp_path / "a b'$(touch pwned)\"")
    plan = gpu_check.shell_plan(gpu_check.parse_args(["plan", outdir]))
    proc = subprocess.run(
        [bash, "-c", 'eval "$1"; printf %s "$OUTDIR"', "-", plan],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout == outdir
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------------- device


def test_device_description_from_faked_queries(gpu_check):
    device = _fake_device(gpu_check)
    assert device["name"] == "NVIDIA H200"
    assert device["driver"] == "570.86.15"
    assert device["cuda"] == "12.8"
    assert device["nvidia_smi"]["compute_cap"] == "9.0"
    assert device["numba"]["compute_capability"] == "9.0"
    assert device["torch"]["cudnn"] == 91000
    assert device["hostname"] and device["date"][:2] == "20"
    line = gpu_check.device_line(device)
    assert line.startswith("**NVIDIA H200** (compute capability 9.0), driver 570.86.15")
    assert "cuDNN 91000" in line


def test_device_without_nvidia_smi_uses_numba(gpu_check):
    assert gpu_check.query_nvidia_smi(lambda command: None) == {}
    device = gpu_check.describe_device(
        dict, lambda: {"available": True, "name": "GPU", "driver": "12.4"}, dict
    )
    assert (device["name"], device["driver"], device["cuda"]) == ("GPU", None, "12.4")
    assert "PyTorch" not in gpu_check.device_line(device)


@pytest.mark.parametrize(
    "numba_info, code",
    [
        ({"available": False, "simulator": False}, 2),
        ({"available": True, "simulator": True}, 3),
        ({"available": True, "simulator": False, "name": "NVIDIA H200"}, 0),
    ],
)
def test_device_command_exit_codes(gpu_check, monkeypatch, tmp_path, numba_info, code):
    monkeypatch.setattr(gpu_check, "query_nvidia_smi", dict)
    monkeypatch.setattr(gpu_check, "query_numba", lambda: numba_info)
    monkeypatch.setattr(gpu_check, "query_torch", dict)
    path = tmp_path / "device.json"
    assert gpu_check.main(["device", str(path)]) == code
    assert json.loads(path.read_text())["numba"] == numba_info


# ------------------------------------------------------------------------------- assemble


def test_tests_outcome_parses_pytest(gpu_check):
    log = "tests/test_cuda.py ....s\n==== 33 passed, 2 skipped, 1 deselected in 95.1s ====\n"
    outcome = gpu_check.outcome_of_tests(log, 0)
    assert outcome["ok"] and outcome["passed"] == 33 and outcome["skipped"] == 2
    failed = gpu_check.outcome_of_tests("== 1 failed, 30 passed, 1 error in 9s ==", 1)
    assert not failed["ok"] and failed["failed"] == 1 and failed["errors"] == 1
    assert gpu_check.outcome_of_tests("", 124) | {"summary": None} == {
        "ran": True,
        "rc": 124,
        "timed_out": True,
        "ok": False,
        "summary": None,
        "passed": 0,
        "failed": 0,
        "skipped": 0,
        "errors": 0,
    }
    assert gpu_check.outcome_of_tests(None, None)["ran"] is False
    # every test skipped (no GPU seen) is not a pass
    assert not gpu_check.outcome_of_tests("== 35 skipped in 1s ==", 0)["ok"]


def test_assemble_json_shape(gpu_check):
    device = _fake_device(gpu_check)
    tests = gpu_check.outcome_of_tests("== 33 passed in 95s ==", 0)
    data = gpu_check.assemble(device, tests, _bench_json(), 0)
    json.dumps(data)  # serializable
    assert len(data["benchmarks"]) == 4  # the pytest-benchmark document is kept
    assert data["machine_info"]["gpu"].startswith("**NVIDIA H200**")
    assert data["machine_info"]["fastbn"]["cpu_model"] == "Test CPU"
    check = data["gpu_check"]
    assert set(check) == {"device", "tests", "benchmarks", "rows", "ok"}
    assert check["ok"] is True
    assert check["device"]["name"] == "NVIDIA H200"
    assert check["benchmarks"] == {
        "ran": True,
        "rc": 0,
        "timed_out": False,
        "ok": True,
        "count": 4,
        "providers": ["fastbn", "torch"],
    }
    forward = next(r for r in check["rows"] if r["op"] == "forward" and r["provider"] == "fastbn")
    assert set(forward) == {
        "case",
        "op",
        "provider",
        "median_s",
        "gbps",
        "frac_copy",
        "frac_copy_large",
        "copy_gbps_same_size",
        "copy_gbps_large",
    }
    gbps = 3 * 32 * 64 * 56 * 56 * 4 / 40e-6 / 1e9
    assert forward["gbps"] == pytest.approx(gbps)
    assert forward["frac_copy"] == pytest.approx(gbps / 3000.0)
    assert forward["frac_copy_large"] == pytest.approx(gbps / 4000.0)
    text = gpu_check.summary_text(data)
    assert "NVIDIA H200" in text and "33 passed" in text and "1.50x" in text


def test_assemble_without_benchmarks_or_with_failures(gpu_check):
    device = _fake_device(gpu_check)
    not_run = gpu_check.outcome_of_tests(None, None)
    data = gpu_check.assemble(device, not_run, None, None)
    assert data["benchmarks"] == [] and data["gpu_check"]["rows"] == []
    assert data["gpu_check"]["ok"] is True  # nothing asked, nothing failed
    assert "not run" in gpu_check.summary_text(data)
    timed_out = gpu_check.assemble(
        device, gpu_check.outcome_of_tests("== 3 passed ==", 0), None, 124
    )
    assert timed_out["gpu_check"]["benchmarks"]["timed_out"]
    assert timed_out["gpu_check"]["ok"] is False
    failing = gpu_check.assemble(
        device, gpu_check.outcome_of_tests("== 1 failed ==", 1), _bench_json(), 0
    )
    assert failing["gpu_check"]["ok"] is False


def test_assemble_command_writes_named_json_that_the_report_renders(gpu_check, tmp_path, capsys):
    device = _fake_device(gpu_check)
    (tmp_path / "device.json").write_text(json.dumps(device))
    (tmp_path / "tests.log").write_text("== 33 passed in 95s ==\n")
    (tmp_path / "bench.json").write_text(json.dumps(_bench_json()))
    outdir = tmp_path / "out"
    code = gpu_check.main(
        [
            "assemble",
            "--device",
            str(tmp_path / "device.json"),
            "--tests-log",
            str(tmp_path / "tests.log"),
            "--tests-rc",
            "0",
            "--bench-json",
            str(tmp_path / "bench.json"),
            "--bench-rc",
            "0",
            "--outdir",
            str(outdir),
        ]
    )
    assert code == 0
    (path,) = outdir.iterdir()
    assert (
        path.name == f"cuda_nvidia-h200_{gpu_check.machine.slug(device['hostname'])}_"
        f"{device['date'][:10]}.json"
    )
    assert str(path) in capsys.readouterr().out
    data = json.loads(path.read_text())
    assert data["gpu_check"]["tests"]["passed"] == 33

    from benchmarks import report

    doc = tmp_path / "page.md"
    report.report(data, doc_path=doc, img_dir=tmp_path / "img")
    page = doc.read_text()
    assert "- GPU: **NVIDIA H200**" in page
    assert "| cuda | forward | 32x64x56x56 | float32 | NCHW |" in page


def test_assemble_command_fails_when_a_step_failed(gpu_check, tmp_path):
    (tmp_path / "device.json").write_text(json.dumps(_fake_device(gpu_check)))
    code = gpu_check.main(
        [
            "assemble",
            "--device",
            str(tmp_path / "device.json"),
            "--bench-json",
            str(tmp_path / "missing.json"),
            "--bench-rc",
            "124",
            "--outdir",
            str(tmp_path),
        ]
    )
    assert code == 1


# --------------------------------------------------------------------------------- script


def _script(*args, env=None):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    environment = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    environment["PYTHONPATH"] = str(ROOT) + os.pathsep + environment.get("PYTHONPATH", "")
    return subprocess.run(
        [bash, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
        cwd=ROOT.parent,
        check=False,
    )


def test_script_refuses_bad_arguments():
    proc = _script("--bogus")
    assert proc.returncode == 2
    assert "unrecognized arguments: --bogus" in proc.stderr


@pytest.mark.skipif(
    os.environ.get("NUMBA_ENABLE_CUDASIM") == "1",
    reason="the script clears the simulator setting; this checks a GPU-less run",
)
def test_script_without_a_gpu_stops_at_the_device(tmp_path):
    """No GPU here: the script names the problem and stops before any step."""
    pytest.importorskip("numba.cuda")
    import fastbn

    if fastbn.cuda_available():
        pytest.skip("a GPU is present: the script would run the whole check")
    proc = _script(str(tmp_path / "out"), env={"NUMBA_ENABLE_CUDASIM": "1"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Numba sees no CUDA GPU" in proc.stderr
    assert "== CUDA tests" not in proc.stdout
    assert not (tmp_path / "out").exists()
