"""The trainer and ``fastbn train`` with the BatchNorm variants: ``--renorm`` and
``--virtual-batch-size``, recorded in the metrics JSON, kept across a resume."""

import json

import numpy as np
import pytest

from fastbn import cli
from fastbn.nn import build_mlp, fit

FAST = ["--dataset", "synthetic", "--hidden", "16", "--quiet", "--epochs", "1"]


def test_build_mlp_passes_the_variants_to_every_batch_norm_layer():
    model = build_mlp(hidden=(8, 4), rng=0, bn_renorm=True)
    bns = [layer.bn for layer in model.layers if hasattr(layer, "bn")]
    assert len(bns) == 2 and all(bn.renorm for bn in bns)
    assert "layers.1.renorm_stddev" in model.state_dict()
    ghost = build_mlp(hidden=(8,), rng=0, bn_virtual_batch_size=4, bn_position="before_relu")
    assert ghost.layers[1].bn.virtual_batch_size == 4 and "virtual_batch_size=4" in repr(ghost)
    pre = np.random.default_rng(0).normal(2.0, 3.0, (12, 8)).astype(np.float32)
    y = ghost.layers[1].forward(pre, True)
    # ghost batches: each chunk of 4 rows has its own statistics before the fused ReLU
    for i in range(0, 12, 4):
        c = pre[i : i + 4].astype(np.float64)
        expected = np.maximum((c - c.mean(0)) / np.sqrt(c.var(0) + 1e-3), 0)
        np.testing.assert_allclose(y[i : i + 4], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "flags,renorm,k", [(["--renorm"], True, None), (["--virtual-batch-size", "16"], False, 16)]
)
def test_cli_flags_train_and_are_recorded(tmp_path, flags, renorm, k):
    metrics = tmp_path / "m.json"
    assert cli.main(["train", *FAST, *flags, "--metrics-out", str(metrics)]) == 0
    record = json.loads(metrics.read_text())
    assert record["config"]["bn_renorm"] is renorm
    assert record["config"]["bn_virtual_batch_size"] == k
    assert record["epochs"][0]["test_acc"] > 0.8  # the synthetic data is easy: it learns


def test_a_virtual_batch_size_that_does_not_divide_is_an_error(capsys):
    # batch 128: 48 does not divide it; 32 divides it but not the last batch (6000 % 128)
    assert cli.main(["train", *FAST, "--virtual-batch-size", "48"]) == 1
    assert "bn_virtual_batch_size=48 must be >= 1 and divide batch_size" in capsys.readouterr().err
    assert cli.main(["train", *FAST, "--virtual-batch-size", "32"]) == 1
    assert "last batch" in capsys.readouterr().err


def test_renorm_resumes_with_its_statistics(tmp_path):
    path = str(tmp_path / "ck.npz")
    first = fit("synthetic", epochs=1, hidden=(8,), bn_renorm=True, save=path, log=None)
    resumed = fit("synthetic", epochs=2, hidden=(8,), resume=path, log=None)
    assert resumed.config["bn_renorm"] is True and len(resumed.epochs) == 2
    straight = fit("synthetic", epochs=2, hidden=(8,), bn_renorm=True, log=None)
    assert resumed.epochs[-1]["test_loss"] == pytest.approx(straight.epochs[-1]["test_loss"])
    assert first.epochs[0]["test_loss"] == straight.epochs[0]["test_loss"]
    with pytest.raises(ValueError, match="bn_renorm=False contradicts"):
        fit("synthetic", epochs=2, hidden=(8,), resume=path, bn_renorm=False, log=None)
