"""Tests of the ``fastbn`` command's first contact: options checked before training,
honest Ctrl-C, the compile notice, files that follow the umask, malformed checkpoints."""

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastbn import _install, cli, data
from fastbn.nn import checkpoint
from fastbn.nn import train as train_module

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--dataset", "synthetic", "--hidden", "8", "--quiet"]


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if the command gets as far as training."""

    def fit(*args, **kwargs):
        raise AssertionError("training started although an option is wrong")

    monkeypatch.setattr(train_module, "fit", fit)


def _child_env(**extra):
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    env.update(extra)
    return env


# --------------------------------------------------------------------------------------
# Every option is checked before training
# --------------------------------------------------------------------------------------


def test_a_missing_data_dir_is_an_error_before_training(tmp_path, capsys, no_training):
    missing = tmp_path / "missing" / "dir"
    assert cli.main(["train", "--data", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastbn train: error: --data: ") and str(missing) in err
    assert "does not exist" in err


def test_a_data_path_that_is_a_file_or_unreadable(tmp_path, capsys, monkeypatch, no_training):
    regular = tmp_path / "f"
    regular.write_text("")
    assert cli.main(["train", "--data", str(regular)]) == 1
    assert f"{regular} is not a directory" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        data.os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode)
    )
    assert cli.main(["train", "--data", str(locked)]) == 1
    assert f"{locked}: permission denied" in capsys.readouterr().err


def test_missing_data_dir_from_the_command_line(tmp_path):
    missing = tmp_path / "missing" / "dir"
    result = subprocess.run(
        [sys.executable, "-m", "fastbn", "train", "--data", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_child_env(),
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr
    assert str(missing) in result.stderr and "epoch" not in result.stdout


def test_the_dataset_used_is_printed(tmp_path, capsys):
    assert cli.main(["train", "--dataset", "synthetic", "--epochs", "1", "--hidden", "8"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "data: synthetic generated (6,000 training, 1,000 test samples)"


def test_plot_without_matplotlib_fails_before_training(tmp_path, capsys, monkeypatch, no_training):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )
    assert cli.main(["train", *FAST, "--plot", str(tmp_path / "c.png")]) == 1
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and _install.install_hint("plot") in err
    assert "fastbn[" not in err


def test_distributed_on_a_gpu_is_refused_up_front(capsys, no_training):
    assert cli.main(["train", *FAST, "--distributed", "--device", "cuda"]) == 1
    assert "--distributed trains on the CPU only" in capsys.readouterr().err


def test_outputs_that_cannot_be_written(tmp_path, capsys, no_training):
    assert cli.main(["train", *FAST, "--save", str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["train", *FAST, "--metrics-out", str(blocker / "m.json")]) == 1
    assert "is not a directory" in capsys.readouterr().err


def test_epochs_zero_and_a_finished_resume_say_so(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--epochs", "-1"])
    capsys.readouterr()
    assert cli.main(["train", *FAST, "--epochs", "0"]) == 0
    assert "nothing to train: --epochs 0" in capsys.readouterr().err
    ck = tmp_path / "ck.npz"
    assert cli.main(["train", *FAST, "--epochs", "2", "--save", str(ck)]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(ck), "--epochs", "2"]) == 0
    err = capsys.readouterr().err
    assert f"nothing to train: {ck} already holds 2 epochs" in err and "--epochs 3" in err


def test_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text
    # One paragraph per option: its help text, folded by argparse.
    options = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    for option in options:
        assert len(re.findall(r"\(default|Default ", option)) <= 1, option
    for flag in ("--epochs", "--batch-size", "--device", "--blas-threads", "--lr"):
        paragraph = next(o for o in options if o.startswith(flag))
        assert "default" in paragraph.lower(), flag


def test_install_hints_follow_the_installation(monkeypatch, tmp_path):
    assert _install.install_hint("plot") in (
        'pip install -e ".[plot]"',
        f'pip install -e "{ROOT}[plot]"',
    )
    monkeypatch.chdir(tmp_path)
    assert _install.install_hint("mpi") == f'pip install -e "{ROOT}[mpi]"'
    monkeypatch.setattr(_install, "_source_root", lambda: None)
    assert _install.install_hint("mpi") == "pip install mpi4py mpich"
    assert _install.install_hint("plot") == "pip install matplotlib"


def test_no_hint_names_a_package_index_fastbn():
    pattern = re.compile(r"""pip install ['"]?fastbn\[""")
    files = [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "fastbn").rglob("*.py")),
    ]
    offenders = [str(f.relative_to(ROOT)) for f in files if pattern.search(f.read_text())]
    # fastbn/cuda.py belongs to another change; everything else must be clean.
    assert [f for f in offenders if f != "fastbn/cuda.py"] == []


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


def _save_small(path):
    checkpoint.save_checkpoint(
        path,
        model_state={"w": np.ones(3)},
        optimizer_state={"t": np.array(1)},
        epoch=1,
        rng_state=np.random.default_rng(0).bit_generator.state,
        history=[],
        config={"seed": 0},
    )


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        _save_small(tmp_path / "ck.npz")
        checkpoint.atomic_write_bytes(tmp_path / "m.json", b"{}")
    finally:
        os.umask(old)
    for name in ("ck.npz", "m.json"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~mask, name


def test_a_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "m.json"
    checkpoint.atomic_write_bytes(path, b"{}")
    os.chmod(path, 0o640)
    checkpoint.atomic_write_bytes(path, b"[]")
    assert os.stat(path).st_mode & 0o777 == 0o640 and path.read_bytes() == b"[]"


def test_a_killed_writes_temporary_file_is_removed_by_the_next_save(tmp_path):
    ck = tmp_path / "ck.npz"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname().replace(".", "_")
    stale = tmp_path / f".ck.npz.{host}.{gone.pid}.abc123.tmp"
    live = tmp_path / f".ck.npz.{host}.{os.getppid()}.def456.tmp"  # a writer still running
    other_host = tmp_path / f".ck.npz.elsewhere.{gone.pid}.x.tmp"
    for f in (stale, live, other_host):
        f.write_bytes(b"\0" * 1000)
    _save_small(ck)
    assert not stale.exists() and live.exists() and other_host.exists()
    assert checkpoint.load_checkpoint(ck)["epoch"] == 1


def test_a_write_killed_by_sigkill_is_cleaned_up(tmp_path):
    ck = tmp_path / "ck.npz"
    code = (
        f"import time\nfrom fastbn.nn import checkpoint\n"
        f"def write(f):\n    f.write(b'x' * 1000)\n    f.flush()\n"
        f"    print('writing', flush=True)\n    time.sleep(60)\n"
        f"checkpoint._atomic_replace({str(ck)!r}, write)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_child_env()
    )
    assert child.stdout.readline().strip() == "writing"
    child.kill()
    child.wait()
    assert len(list(tmp_path.glob(".ck.npz.*.tmp"))) == 1 and not ck.exists()
    _save_small(ck)
    assert list(tmp_path.glob(".ck.npz.*.tmp")) == [] and ck.exists()


def _rewrite(path, out, meta=None, drop=None):
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    if meta is not None:
        arrays["meta"] = np.array(json.dumps(meta))
    if drop is not None:
        del arrays[drop]
    np.savez(out, **arrays)
    return out


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
    ck = tmp_path_factory.mktemp("ck") / "ck.npz"
    assert cli.main(["train", *FAST, "--epochs", "1", "--save", str(ck)]) == 0
    return ck


@pytest.mark.parametrize(
    "case", ["number", "no_epoch", "bad_epoch", "no_parameter", "bad_rng", "bad_config", "not_npz"]
)
def test_a_malformed_checkpoint_is_a_one_line_error(real_checkpoint, tmp_path, capsys, case):
    with np.load(real_checkpoint, allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
        parameter = next(k for k in f.files if k.startswith("model."))
    bad = tmp_path / "bad.npz"
    if case == "number":
        _rewrite(real_checkpoint, bad, meta=42)
    elif case == "no_epoch":
        _rewrite(real_checkpoint, bad, meta={k: v for k, v in meta.items() if k != "epoch"})
    elif case == "bad_epoch":
        _rewrite(real_checkpoint, bad, meta=dict(meta, epoch="one"))
    elif case == "no_parameter":
        _rewrite(real_checkpoint, bad, drop=parameter)
    elif case == "bad_rng":
        _rewrite(real_checkpoint, bad, meta=dict(meta, rng_state={"bit_generator": "?"}))
    elif case == "bad_config":
        _rewrite(real_checkpoint, bad, meta=dict(meta, config=dict(meta["config"], hidden="x")))
    else:
        bad.write_bytes(b"not a zip file")
    assert cli.main(["train", "--resume", str(bad), "--epochs", "3", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastbn train: error: ") and str(bad) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_an_unreadable_checkpoint_says_permission_denied(real_checkpoint, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(real_checkpoint))

    monkeypatch.setattr(checkpoint.np, "load", refuse)
    assert cli.main(["train", "--resume", str(real_checkpoint), "--epochs", "3"]) == 1
    err = capsys.readouterr().err
    assert "permission denied" in err and "truncated" not in err and "corrupt" not in err


# --------------------------------------------------------------------------------------
# The compile notice and Ctrl-C
# --------------------------------------------------------------------------------------


def test_cold_cache_says_compiling_once_and_times_only_training(tmp_path):
    metrics = tmp_path / "m.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastbn",
            "train",
            "--dataset",
            "synthetic",
            "--epochs",
            "1",
            "--hidden",
            "8",
            "--metrics-out",
            str(metrics),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=_child_env(NUMBA_CACHE_DIR=str(tmp_path / "jit")),
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(train_module.COMPILE_NOTICE) == 1
    assert re.search(r"kernels compiled in \d+\.\d s", result.stderr)
    record = json.loads(metrics.read_text())
    # The warm-up holds the compilation; the epoch's time is training alone.
    assert record["config"]["warmup_seconds"] > 5 * record["epochs"][0]["seconds"]


def test_warm_kernels_are_not_announced(capsys):
    for _ in range(2):
        assert cli.main(["train", "--dataset", "synthetic", "--epochs", "1", "--hidden", "8"]) == 0
    assert train_module.COMPILE_NOTICE not in capsys.readouterr().err


def _start_training(tmp_path, *args, cache=None):
    env = _child_env(NUMBA_CACHE_DIR=str(cache)) if cache else _child_env()
    return subprocess.Popen(
        [sys.executable, "-m", "fastbn", "train", "--dataset", "synthetic", "--hidden", "8", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )


def test_ctrl_c_while_compiling_exits_130_and_claims_nothing(tmp_path):
    ck = tmp_path / "ck.npz"
    child = _start_training(tmp_path, "--epochs", "3", "--save", str(ck), cache=tmp_path / "jit")
    try:
        seen = ""
        while train_module.COMPILE_NOTICE not in seen:
            line = child.stderr.readline()
            assert line, f"no compile notice; stderr: {seen}"
            seen += line
        time.sleep(0.5)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
    err = seen + err
    assert child.returncode == 130, err
    # The signal lands inside the compiler, or between two of its compilations (the
    # warm-up also runs NumPy code): both end the run at once with a truthful line.
    assert re.search(
        r"fastbn train: interrupted( while compiling kernels)?; no checkpoint "
        r"was written to " + re.escape(str(ck)),
        err,
    ), err
    assert "last completed epoch" not in err and "error" not in err
    assert "Traceback" not in err and "epoch   1/" not in out
    assert not ck.exists()


def test_ctrl_c_after_a_saved_epoch_names_the_checkpoint(tmp_path):
    ck = tmp_path / "ck.npz"
    child = _start_training(tmp_path, "--epochs", "100000", "--save", str(ck))
    try:
        line = ""
        while not line.startswith("epoch   1/"):
            line = child.stdout.readline()
            assert line, child.stderr.read()
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 130, err
    assert f"the last completed epoch is in {ck}" in err and "Traceback" not in err
    assert checkpoint.load_checkpoint(ck)["epoch"] >= 1


def test_a_swallowed_interrupt_still_ends_the_run(monkeypatch, capsys):
    def fit(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:
            pass  # what a library that catches too much does
        return train_module.History([], {})

    monkeypatch.setattr(train_module, "fit", fit)
    assert cli.main(["train", *FAST, "--epochs", "1"]) == 130
    assert capsys.readouterr().err.strip() == "fastbn train: interrupted"


def test_an_error_caused_by_an_interrupt_is_reported_as_the_interrupt(monkeypatch, capsys):
    def fit(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt as interrupt:
            raise RuntimeError(
                "no compiled object yet for <Library '_normalize_serial'>"
            ) from interrupt

    monkeypatch.setattr(train_module, "fit", fit)
    assert cli.main(["train", *FAST, "--epochs", "1"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "fastbn train: interrupted" and "error" not in err


def test_self_check_says_compiling_only_when_it_compiles(monkeypatch, capsys):
    import numba

    from fastbn import __main__ as self_check

    real_demo = self_check.demo

    def demo(shape, **kwargs):  # a cold cache, in miniature: something really compiles
        numba.njit(lambda v: v + 1)(1)
        numba.njit(lambda v: v + 2)(1)
        return real_demo((4, 3, 5, 5))

    monkeypatch.setattr(self_check, "demo", demo)
    assert self_check.main([]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("compiling kernels, first run only…") == 1
    assert "kernels compiled in" in captured.err and "OK" in captured.out
    monkeypatch.setattr(self_check, "demo", lambda shape: real_demo((4, 3, 5, 5)))
    assert self_check.main([]) == 0
    assert "compiling" not in capsys.readouterr().err


def test_signal_handler_is_restored(monkeypatch):
    before = signal.getsignal(signal.SIGINT)
    assert cli.main(["train", *FAST, "--epochs", "1"]) == 0
    assert signal.getsignal(signal.SIGINT) is before


# --------------------------------------------------------------------------------------
# --precise-bn and --fold
# --------------------------------------------------------------------------------------


def test_precise_bn_and_fold_flags_reach_the_metrics(tmp_path, capsys):
    metrics, folded = tmp_path / "m.json", tmp_path / "folded.npz"
    argv = ["train", "--dataset", "synthetic", "--hidden", "8", "--epochs", "2"]
    argv += ["--precise-bn", "--fold", str(folded), "--metrics-out", str(metrics)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "precise BN" in out and f"written to {folded}" in out
    record = json.loads(metrics.read_text())
    assert record["config"]["precise_bn"] is True
    assert all("precise_bn_seconds" in epoch for epoch in record["epochs"])
    assert record["fold"]["path"] == str(folded) and folded.exists()
    assert record["fold"]["test_acc"] == record["epochs"][-1]["test_acc"]
    with np.load(folded) as saved:
        assert sorted(saved) == [f"layers.{i}.{k}" for i in (0, 1) for k in ("bias", "weight")]
    # Without the flags: neither in the metrics.
    assert cli.main(["train", *FAST, "--epochs", "1", "--metrics-out", str(metrics)]) == 0
    record = json.loads(metrics.read_text())
    assert record["config"]["precise_bn"] is False and "fold" not in record


def test_an_unwritable_fold_file_is_an_error_before_training(tmp_path, capsys, no_training):
    assert cli.main(["train", *FAST, "--fold", str(tmp_path)]) == 1
    assert "--fold" in capsys.readouterr().err
