"""Tests of the trainer: learning, exact resume, atomic checkpoints, metrics, the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fastbn import cli, data, nn
from fastbn.nn import checkpoint

# A small synthetic set keeps every run here well under a second.
SMALL = dict(n_train=600, n_test=200, seed=0)


@pytest.fixture(scope="module")
def small():
    return data.make_synthetic(**SMALL)


def test_short_synthetic_run_learns(small):
    # PyTorch's BatchNorm momentum (0.1): with Keras's 0.99 the running statistics of
    # a run this short (57 steps) are still mostly their initial values.
    history = nn.fit(
        small, epochs=3, hidden=(32, 16), batch_size=32, lr=1e-2, bn_convention="torch", log=None
    )
    records = history.epochs
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[-1]["test_acc"] > 0.9  # chance is 0.1
    for r in records:
        assert set(r) >= {
            "epoch",
            "train_loss",
            "train_acc",
            "test_loss",
            "test_acc",
            "seconds",
            "samples_per_s",
        }
        assert r["samples_per_s"] == pytest.approx(600 / r["seconds"])


def test_runs_are_deterministic(small):
    a = nn.fit(small, epochs=2, hidden=(16,), log=None, seed=3)
    b = nn.fit(small, epochs=2, hidden=(16,), log=None, seed=3)
    c = nn.fit(small, epochs=2, hidden=(16,), log=None, seed=4)
    np.testing.assert_array_equal(a.model.store.values, b.model.store.values)
    assert not np.array_equal(a.model.store.values, c.model.store.values)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_resume_continues_exactly(small, tmp_path, optimizer):
    kw = dict(hidden=(24, 12), batch_size=50, optimizer=optimizer, lr=1e-2, log=None, seed=7)
    full = nn.fit(small, epochs=3, **kw)
    ck = tmp_path / "run.npz"
    nn.fit(small, epochs=2, save=ck, **kw)
    resumed = nn.fit(small, epochs=3, resume=ck, log=None)  # options come from ck
    assert resumed.config["optimizer"] == optimizer and resumed.config["hidden"] == [24, 12]
    for key, value in full.model.state_dict().items():
        np.testing.assert_array_equal(resumed.model.state_dict()[key], value, err_msg=key)
    for key, value in full.optimizer.state_dict().items():
        np.testing.assert_array_equal(resumed.optimizer.state_dict()[key], value, err_msg=key)
    strip = [
        {k: v for k, v in r.items() if "second" not in k and k != "samples_per_s"}
        for r in full.epochs
    ]
    assert [
        {k: v for k, v in r.items() if "second" not in k and k != "samples_per_s"}
        for r in resumed.epochs
    ] == strip


def test_resume_refuses_a_different_architecture(small, tmp_path):
    ck = tmp_path / "run.npz"
    nn.fit(small, epochs=1, hidden=(8,), save=ck, log=None)
    with pytest.raises(ValueError, match="hidden=.* contradicts the checkpoint"):
        nn.fit(small, epochs=2, hidden=(9,), resume=ck, log=None)
    with pytest.raises(ValueError, match="batch_norm=False contradicts"):
        nn.fit(small, epochs=2, batch_norm=False, resume=ck, log=None)
    # Already done: nothing to train, history returned as saved.
    assert len(nn.fit(small, epochs=1, resume=ck, log=None).epochs) == 1


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ck = tmp_path / "ck.npz"
    state = dict(
        model_state={"w": np.arange(3.0)},
        optimizer_state={"t": np.array(1)},
        epoch=1,
        rng_state={"x": 1},
        history=[{"epoch": 1}],
        config={},
    )
    checkpoint.save_checkpoint(ck, **state)
    before = ck.read_bytes()

    def crash(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(ck, **dict(state, epoch=2))
    assert ck.read_bytes() == before
    assert os.listdir(tmp_path) == ["ck.npz"]  # the temporary file is gone
    assert checkpoint.load_checkpoint(ck)["epoch"] == 1


def test_bad_checkpoints_name_the_file(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load_checkpoint(tmp_path / "none.npz")
    truncated = tmp_path / "t.npz"
    checkpoint.save_checkpoint(
        truncated,
        model_state={"w": np.zeros(1000)},
        optimizer_state={},
        epoch=1,
        rng_state={},
        history=[],
        config={},
    )
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(checkpoint.CheckpointError, match=str(truncated)):
        checkpoint.load_checkpoint(truncated)
    other = tmp_path / "o.npz"
    np.savez(other, a=np.zeros(2))
    with pytest.raises(checkpoint.CheckpointError, match="not a fastbn trainer checkpoint"):
        checkpoint.load_checkpoint(other)


def test_metrics_json_is_written_every_epoch(small, tmp_path):
    out = tmp_path / "m.json"
    nn.fit(small, epochs=2, hidden=(8,), metrics_out=out, log=None)
    record = json.loads(out.read_text())
    assert [e["epoch"] for e in record["epochs"]] == [1, 2]
    assert record["config"]["hidden"] == [8] and record["config"]["batch_norm"] is True


def test_progress_and_summary_lines(small):
    lines = []
    nn.fit(small, epochs=1, hidden=(8,), log=lines.append, progress=True)
    assert len(lines) == 2 and lines[0].startswith("data: synthetic generated (600 training")
    assert "test_acc" in lines[1] and "samples/s" in lines[1]


def test_fit_argument_errors(small):
    with pytest.raises(ValueError, match="optimizer must be"):
        nn.fit(small, epochs=1, optimizer="rmsprop", log=None)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        nn.fit(small, epochs=1, batch_size=0, log=None)
    with pytest.raises(ValueError, match="threads must lie in"):
        nn.fit(small, epochs=1, threads=10_000, log=None)
    with pytest.raises(ValueError, match="epochs must be >= 0"):
        nn.fit(small, epochs=-1, log=None)


def test_set_threads():
    import numba

    before = numba.get_num_threads()
    try:
        info = nn.set_threads(1)
        assert info["numba"] == 1 and numba.get_num_threads() == 1
    finally:
        nn.set_threads(before)


# --------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------


def test_cli_train_writes_metrics_plot_and_checkpoint(tmp_path, capsys):
    metrics, plot, ck = tmp_path / "m.json", tmp_path / "c.png", tmp_path / "ck.npz"
    rc = cli.main(
        [
            "train",
            "--dataset",
            "synthetic",
            "--epochs",
            "1",
            "--hidden",
            "16,8",
            "--batch-size",
            "256",
            "--seed",
            "1",
            "--threads",
            "1",
            "--metrics-out",
            str(metrics),
            "--plot",
            str(plot),
            "--save",
            str(ck),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "epoch   1/1" in out
    assert json.loads(metrics.read_text())["epochs"][0]["epoch"] == 1
    assert plot.read_bytes()[:4] == b"\x89PNG"
    rc = cli.main(
        ["train", "--resume", str(ck), "--epochs", "2", "--quiet", "--metrics-out", str(metrics)]
    )
    assert rc == 0 and capsys.readouterr().out == ""
    record = json.loads(metrics.read_text())
    assert [e["epoch"] for e in record["epochs"]] == [1, 2]
    assert record["config"]["hidden"] == [16, 8] and record["config"]["seed"] == 1


def test_cli_compare_no_bn(tmp_path):
    metrics, plot = tmp_path / "m.json", tmp_path / "c.png"
    rc = cli.main(
        [
            "train",
            "--dataset",
            "synthetic",
            "--epochs",
            "1",
            "--hidden",
            "8",
            "--compare-no-bn",
            "--quiet",
            "--metrics-out",
            str(metrics),
            "--plot",
            str(plot),
        ]
    )
    assert rc == 0 and plot.exists()
    record = json.loads(metrics.read_text())
    assert record["config"]["batch_norm"] is True
    assert record["compare_no_bn"]["config"]["batch_norm"] is False


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--hidden", "64,x"])
    assert info.value.code == 2
    assert "--hidden must be comma-separated" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([])
    assert (
        cli.main(
            [
                "train",
                "--dataset",
                "synthetic",
                "--compare-no-bn",
                "--save",
                str(tmp_path / "x.npz"),
            ]
        )
        == 2
    )
    assert cli.main(["train", "--resume", str(tmp_path / "missing.npz")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_cli_missing_data_lists_places(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(data.DATASETS["fashion-mnist"], "system_dirs", [str(tmp_path / "no")])
    (tmp_path / "d").mkdir()
    assert cli.main(["train", "--data", str(tmp_path / "d"), "--no-download"]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "d") in err and "apt-get install dataset-fashion-mnist" in err


def test_cli_cuda_without_gpu_is_a_clear_error(capsys):
    try:
        import cupy  # noqa: F401

        pytest.skip("CuPy is installed")
    except ImportError:
        pass
    assert cli.main(["train", "--dataset", "synthetic", "--device", "cuda", "--quiet"]) == 1
    assert "needs CuPy" in capsys.readouterr().err


def test_python_dash_m_fastbn_train(tmp_path):
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
            "--lr",
            "0.01",
            "--bn-convention",
            "torch",
            "--quiet",
            "--metrics-out",
            str(metrics),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(metrics.read_text())["epochs"][0]["test_acc"] > 0.5


# --------------------------------------------------------------------------------------
# Precise statistics and the folded inference model
# --------------------------------------------------------------------------------------


def test_precise_bn_sets_exact_statistics_and_leaves_the_weights_alone(small):
    common = dict(epochs=2, hidden=(16, 8), batch_size=64, log=None)
    plain = nn.fit(small, **common)
    precise = nn.fit(small, precise_bn=True, **common)
    assert precise.config["precise_bn"] is True and plain.config["precise_bn"] is False
    # Training normalizes with batch statistics: the weights are bitwise those without it.
    np.testing.assert_array_equal(precise.model.store.values, plain.model.store.values)
    assert all(r["precise_bn_seconds"] >= 0 for r in precise.epochs)
    assert all("precise_bn_seconds" not in r for r in plain.epochs)
    # The final running statistics are the exact ones of the training set...
    twin = nn.build_mlp(small.num_features, small.num_classes, (16, 8), rng=0)
    twin.load_state_dict(precise.model.state_dict())
    for layer in twin.layers:
        if isinstance(layer, nn.BatchNorm):
            layer.bn.running_mean[...] = 0.0
            layer.bn.running_var[...] = 1.0
    nn.update_bn_stats(twin, [small.x_train])
    got, want = precise.model.state_dict(), twin.state_dict()
    for key in want:
        # fit runs the BLAS on one thread, this test on the default count: the matrix
        # products may round differently (float32, one ulp ~1.2e-7 relative).
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7, err_msg=key)
    # ...and the batch counts are those of the training steps.
    assert (
        got["layers.1.num_batches_tracked"]
        == plain.model.state_dict()["layers.1.num_batches_tracked"]
    )
    # The reported test accuracy is the model's with those statistics.
    acc = nn.evaluate(precise.model, nn.SoftmaxCrossEntropy(), small.x_test, small.y_test)[1]
    assert precise.epochs[-1]["test_acc"] == acc


def test_precise_bn_is_kept_when_resuming(small, tmp_path):
    ck = tmp_path / "ck.npz"
    common = dict(hidden=(8,), batch_size=64, log=None)
    nn.fit(small, epochs=1, precise_bn=True, save=str(ck), **common)
    resumed = nn.fit(small, epochs=2, resume=str(ck), **common)
    assert resumed.config["precise_bn"] is True
    assert "precise_bn_seconds" in resumed.epochs[-1]
    whole = nn.fit(small, epochs=2, precise_bn=True, **common)
    np.testing.assert_array_equal(resumed.model.store.values, whole.model.store.values)
    assert resumed.epochs[-1]["test_acc"] == whole.epochs[-1]["test_acc"]


def test_fold_writes_an_inference_model_that_predicts_like_the_trained_one(small, tmp_path):
    path = tmp_path / "folded.npz"
    history = nn.fit(small, epochs=1, hidden=(16, 8), fold=str(path), log=None)
    record = history.to_dict()["fold"]
    assert record["path"] == str(path)
    assert record["layers"] == [
        "Dense(784, 16, activation='relu')",
        "Dense(16, 8, activation='relu')",
        "Dense(8, 10, activation=None)",
    ]
    assert record["max_rel_logit_diff"] <= 1e-4  # float32 (tests/test_nn_fold.py)
    with np.load(path) as saved:
        state = dict(saved)
    model = nn.build_mlp(hidden=(16, 8), batch_norm=False, rng=1)
    model.load_state_dict(state)
    loss = nn.SoftmaxCrossEntropy()
    test_loss, test_acc = nn.evaluate(model, loss, small.x_test, small.y_test)
    assert (test_loss, test_acc) == (record["test_loss"], record["test_acc"])
    trained = history.model.predict(small.x_test)
    scale = np.abs(trained).max()
    assert np.abs(model.predict(small.x_test) - trained).max() <= 1e-4 * scale
