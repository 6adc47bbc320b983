"""Synchronized BatchNorm over MPI (fastbn.distributed and the ``comm=`` keyword).

Two kinds of tests:

- in-process: the pure merge/sum/shard helpers, and ``comm=MPI.COMM_SELF`` (one rank),
  which must give exactly the results without ``comm``;
- multi-process: ``tests/mpi/sync_checks.py`` under ``mpiexec -n 2`` and ``-n 3``, once
  per rank count (each launch pays Numba's cache loading in every rank, so every check
  runs inside that one launch and rank 0 reports JSON). A timeout on the launch turns a
  hang (a rank left waiting in a collective) into a failure.

Skipped when mpi4py or ``mpiexec`` is missing (``pip install 'fastbn[mpi]'``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import helpers
import numpy as np
import pytest

import fastbn
from fastbn import distributed
from fastbn.nn import parallel

MPI = pytest.importorskip(
    "mpi4py.MPI", reason="synchronized BatchNorm needs mpi4py (pip install 'fastbn[mpi]')"
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "mpi"
LAUNCH_TIMEOUT = 300  # seconds; the 3-rank run takes ~15 s on 2 cores

# Tolerances of synchronized vs single-process results (relative, floored at 1 in
# magnitude). Both compute float64 statistics; they differ only in how partial results are
# grouped (per rank, then merged, vs per chunk of the whole batch): a few ulps of float64,
# times the condition number of sums like dgamma that cancel. float32 outputs are rounded
# from float64 statistics, so they almost always agree exactly; one float32 ulp is allowed.
REL_TOL = {"float64": 1e-11, "float32": 2.5e-7}


MPIEXEC = helpers.find_mpiexec()
needs_mpiexec = pytest.mark.skipif(
    MPIEXEC is None, reason="mpiexec not found (pip install 'fastbn[mpi]' brings MPICH's)"
)


def run_mpi(script, ranks, *args, timeout=LAUNCH_TIMEOUT, extra_env=None):
    """:func:`helpers.run_mpi` with this file's launch timeout."""
    return helpers.run_mpi(script, ranks, *args, timeout=timeout, extra_env=extra_env)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda p: f"{p}ranks")
def sync_results(request):
    if MPIEXEC is None:
        pytest.skip("mpiexec not found")
    return run_mpi(SCRIPTS / "sync_checks.py", request.param)


# --------------------------------------------------------------------------------------
# Multi-process
# --------------------------------------------------------------------------------------


@pytest.mark.mpi
@needs_mpiexec
def test_synchronized_equals_single_process(sync_results):
    cases = sync_results["equality"]
    layouts = {c["layout"] for c in cases}
    assert {"NC", "NCHW", "NHWC"} <= layouts
    assert {c["dtype"] for c in cases} == {"float32", "float64"}
    assert any(1 in c["rows"] for c in cases), "no case with a one-row rank"
    if sync_results["size"] >= 3:
        assert any(0 in c["rows"] for c in cases), "no case with an empty rank"
    failures = []
    for c in cases:
        for name, (abs_diff, rel) in c["diffs"].items():
            if not rel <= REL_TOL[c["dtype"]]:
                failures.append(
                    f"{c['op']} {c['layout']} {c['dtype']} rows={c['rows']}: "
                    f"{name} differs by {rel:.3g} (abs {abs_diff:.3g})"
                )
    assert not failures, "\n".join(failures)


@pytest.mark.mpi
@needs_mpiexec
def test_masked_synchronized_equals_single_process():
    """mask= under mpiexec -n 3: uneven shards and masks, a rank whose shard has no True
    position (its count 0 still weighs in), an empty rank, a rank without a mask."""
    result = run_mpi(SCRIPTS / "mask_checks.py", 3)
    cases = result["cases"]
    assert any(c["empty_rank"] is not None for c in cases)
    assert any(0 in c["rows"] for c in cases)
    assert any(c["unmasked_rank"] is not None for c in cases)
    failures = []
    for c in cases:
        label = f"{c['layout']} {c['dtype']} rows={c['rows']} empty={c['empty_rank']}"
        # float32 y and dx are rounded from float64 statistics; the layer and the
        # per-channel results are float64: REL_TOL of the case's dtype covers both
        for name, (abs_diff, rel) in c["diffs"].items():
            if not rel <= REL_TOL[c["dtype"]]:
                failures.append(f"{label}: {name} differs by {rel:.3g} (abs {abs_diff:.3g})")
        for name, same in c["identical"].items():
            if not same:
                failures.append(f"{label}: {name} not bitwise identical on every rank")
    assert not failures, "\n".join(failures)


@pytest.mark.mpi
@needs_mpiexec
def test_statistics_and_gradients_bitwise_identical_on_every_rank(sync_results):
    not_identical = [
        f"{c['op']} {c['layout']} {c['dtype']} rows={c['rows']}: {name}"
        for c in sync_results["equality"]
        for name, same in c["identical"].items()
        if not same
    ]
    assert not not_identical, "\n".join(not_identical)
    names = {name for c in sync_results["equality"] for name in c["identical"]}
    assert {"mean", "invstd", "dgamma", "dbeta", "running_mean", "running_var"} <= names


def _outcomes(results, scenario):
    return [tuple(o) for o in results["errors"][scenario]]


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize(
    "scenario, failing_rank, own_error",
    [
        ("forward_bad_dtype_on_rank_1", 1, "TypeError"),
        ("backward_bad_gamma_on_rank_0", 0, "ValueError"),
        ("layer_bad_channels_on_last_rank", -1, "ValueError"),
    ],
)
def test_a_failing_rank_makes_every_rank_raise(sync_results, scenario, failing_rank, own_error):
    size = sync_results["size"]
    failing_rank %= size
    expected = [
        (own_error, None) if r == failing_rank else ("DistributedError", [failing_rank])
        for r in range(size)
    ]
    assert _outcomes(sync_results, scenario) == expected


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize(
    "scenario, error",
    [
        ("channel_mismatch_on_last_rank", "ValueError"),
        ("one_value_in_global_batch", "ValueError"),
        ("nan_on_rank_0", "FloatingPointError"),
    ],
)
def test_global_errors_raise_alike_on_every_rank(sync_results, scenario, error):
    assert _outcomes(sync_results, scenario) == [(error, None)] * sync_results["size"]


MISMATCHES = [
    "mismatch_forward_on_rank_0_backward_elsewhere",
    "mismatch_forward_on_rank_0_batch_norm_elsewhere",
    "mismatch_backward_on_rank_0_batch_norm_elsewhere",
    "mismatch_backward_on_rank_0_forward_elsewhere",
    "mismatch_layer_forward_on_rank_0_backward_elsewhere",
    "mismatch_dtype_on_last_rank",
    "mismatch_float16_float32",
    "channel_mismatch_on_last_rank",
]


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("scenario", MISMATCHES)
def test_mismatched_calls_raise_the_same_error_on_every_rank(sync_results, scenario):
    """Ranks that make different calls (operation, payload kind) or pass a different C or
    dtype: every rank raises the same ValueError, naming what each rank did, instead of
    merging payloads of another kind (issue 18: rank 0's forward used to normalize with
    rank 1's gradient sums)."""
    size = sync_results["size"]
    assert _outcomes(sync_results, scenario) == [("ValueError", None)] * size
    messages = sync_results["errors"]["messages"][scenario]
    assert len(set(messages)) == 1, messages
    assert "disagree on" in messages[0]


@pytest.mark.mpi
@needs_mpiexec
def test_mismatch_messages_name_each_rank(sync_results):
    messages = sync_results["errors"]["messages"]
    text = messages["mismatch_forward_on_rank_0_backward_elsewhere"][0]
    assert "batch_norm_forward [batch moments] on rank 0" in text
    assert "batch_norm_backward [gradient sums] on rank" in text
    text = messages["mismatch_dtype_on_last_rank"][0]
    assert "float64 on rank" in text and "float32 on rank" in text
    assert "float16 on rank 0" in messages["mismatch_float16_float32"][0]


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize(
    "scenario, failing_rank, own_error",
    [
        ("forward_kernel_fails_on_rank_1", 1, "MemoryError"),
        ("backward_kernel_fails_on_rank_1", 1, "MemoryError"),
        ("conversion_fails_on_last_rank", -1, "ValueError"),
        ("layer_kernel_fails_on_rank_0", 0, "MemoryError"),
    ],
)
def test_a_rank_failing_after_the_header_makes_every_rank_raise(
    sync_results, scenario, failing_rank, own_error
):
    """A failure between the header and the payload collective (in the kernel, in the
    conversion of its result) used to leave the others waiting, or MPICH aborting with
    "Message truncated": the failing rank now enters the payload as failed."""
    size = sync_results["size"]
    failing_rank %= size
    expected = [
        (own_error, None) if r == failing_rank else ("DistributedError", [failing_rank])
        for r in range(size)
    ]
    assert _outcomes(sync_results, scenario) == expected
    messages = sync_results["errors"]["messages"][scenario]
    other = (failing_rank + 1) % size
    assert f"rank {failing_rank}: {own_error}" in messages[other]
    assert "after the header collective" in messages[other]


@pytest.mark.mpi
@needs_mpiexec
def test_big_endian_shard_never_hangs(sync_results):
    """Big-endian x on rank 1: converted (every rank succeeds) or rank 1's own error with
    a DistributedError on the others; the launch finishing at all is the main check."""
    size = sync_results["size"]
    outcomes = _outcomes(sync_results, "big_endian_on_rank_1")
    if outcomes != [("ok", None)] * size:
        assert all(o == ("DistributedError", [1]) for r, o in enumerate(outcomes) if r != 1)
        assert outcomes[1][0] not in ("ok", "DistributedError")


@pytest.mark.mpi
@needs_mpiexec
def test_warn_path_with_out_on_one_rank_exchanges_once(sync_results):
    """batch_norm(on_nonfinite="warn") with out= on rank 0 only: rank 0 writes its output
    again without a second exchange that the other ranks would not make."""
    size = sync_results["size"]
    assert _outcomes(sync_results, "warn_with_out_on_rank_0") == [("ok", None)] * size


@pytest.mark.mpi
@needs_mpiexec
def test_inference_is_not_collective(sync_results):
    outcomes = _outcomes(sync_results, "inference_bad_running_on_rank_1")
    assert outcomes[1] == ("ValueError", None)
    assert all(o == ("ok", None) for r, o in enumerate(outcomes) if r != 1)


@pytest.mark.mpi
@needs_mpiexec
def test_communicator_usable_and_state_untouched_after_errors(sync_results):
    size = sync_results["size"]
    assert _outcomes(sync_results, "normal_call_afterwards") == [("ok", None)] * size
    assert sync_results["errors"]["state_untouched"] == [True] * size


@pytest.mark.mpi
@needs_mpiexec
def test_empty_global_batch_is_the_single_process_empty_batch(sync_results):
    """Every rank's shard empty in training: each rank gets what the single-process call
    gives on an empty batch (empty outputs, NaN mean/invstd, zero dgamma/dbeta) with the
    running statistics and the layer untouched, and the next call works (it used to
    raise "empty batch" on every rank)."""
    expected = {
        "forward": True,
        "backward": True,
        "batch_norm": True,
        "layer": True,
        "afterwards": True,
    }
    assert sync_results["empty_global_batch"] == [expected] * sync_results["size"]


# --------------------------------------------------------------------------------------
# In-process: one rank (MPI.COMM_SELF) and the pure helpers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", [((33, 5), 1), ((6, 3, 7, 5), 1), ((6, 7, 5, 3), -1)])
def test_one_rank_is_bitwise_the_single_process_result(shape, axis, dtype):
    rng = np.random.default_rng(7)
    x = (10.0 + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    gamma, beta = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    plain = fastbn.batch_norm_forward(x, gamma, beta, axis=axis)
    synced = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, comm=MPI.COMM_SELF)
    for a, b in zip(plain, synced):
        np.testing.assert_array_equal(a, b)
    plain = fastbn.batch_norm_backward(dy, x, *plain[1:], gamma, beta, axis=axis)
    synced = fastbn.batch_norm_backward(
        dy, x, *synced[1:], gamma, beta, axis=axis, comm=MPI.COMM_SELF
    )
    for a, b in zip(plain, synced):
        np.testing.assert_array_equal(a, b)
    rm, rv, rms, rvs = np.zeros(C), np.ones(C), np.zeros(C), np.ones(C)
    fastbn.batch_norm(x, rm, rv, gamma, beta, training=True, axis=axis)
    fastbn.batch_norm(x, rms, rvs, gamma, beta, training=True, axis=axis, comm=MPI.COMM_SELF)
    np.testing.assert_array_equal(rm, rms)
    np.testing.assert_array_equal(rv, rvs)


def test_one_rank_errors_are_its_own():
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        fastbn.batch_norm_forward(np.zeros((4, 3), np.int32), comm=MPI.COMM_SELF)
    with pytest.raises(ValueError, match="more than 1 value per channel in the global batch"):
        fastbn.batch_norm_forward(np.zeros((1, 3)), comm=MPI.COMM_SELF)
    bn = fastbn.BatchNorm(3, comm=MPI.COMM_SELF)
    with pytest.raises(ValueError, match=r"gamma must have shape \(2,\)"):
        bn.forward(np.zeros((4, 2), np.float32), training=True)
    assert bn.num_batches_tracked == 0
    with pytest.raises(RuntimeError, match="preceding forward"):
        bn.backward(np.zeros((4, 3), np.float32))


@pytest.mark.parametrize("shape, axis", [((0, 3), 1), ((0, 3, 5), 1), ((2, 0, 3), -1)])
def test_one_rank_empty_batch_is_the_single_process_result(shape, axis):
    """An empty global batch in training: like the single-process call (an empty output,
    NaN mean and invstd, zero parameter gradients), running statistics and the layer's
    state untouched (it used to raise "empty batch")."""
    C = shape[axis]
    x = np.zeros(shape, np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x, axis=axis, comm=MPI.COMM_SELF)
    assert y.shape == shape and y.dtype == np.float32
    assert mean.shape == (C,) and np.isnan(mean).all() and np.isnan(invstd).all()
    assert mean.dtype == np.float32 and invstd.dtype == np.float32
    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        x, x, mean, invstd, np.ones(C, np.float32), axis=axis, comm=MPI.COMM_SELF
    )
    assert dx.shape == shape
    np.testing.assert_array_equal(dgamma, np.zeros(C))
    np.testing.assert_array_equal(dbeta, np.zeros(C))
    rm, rv = np.full(C, 0.5, np.float32), np.full(C, 2.0, np.float32)
    out = np.empty(shape, np.float32)
    assert (
        fastbn.batch_norm(x, rm, rv, training=True, axis=axis, out=out, comm=MPI.COMM_SELF) is out
    )
    np.testing.assert_array_equal(rm, np.full(C, 0.5))
    np.testing.assert_array_equal(rv, np.full(C, 2.0))
    bn = fastbn.BatchNorm(C, axis=axis, comm=MPI.COMM_SELF)
    assert bn.forward(x, training=True).shape == shape
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.running_mean, np.zeros(C))
    np.testing.assert_array_equal(bn.running_var, np.ones(C))
    assert bn.backward(x).shape == shape
    np.testing.assert_array_equal(bn.dgamma, np.zeros(C))
    np.testing.assert_array_equal(bn.dbeta, np.zeros(C))


class CountingComm:
    """``MPI.COMM_SELF`` that counts the collectives it is asked for."""

    def __init__(self):
        self.calls = []

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def Allgather(self, send, recv):
        self.calls.append(("Allgather", np.asarray(send).size))
        MPI.COMM_SELF.Allgather(send, recv)

    def allgather(self, obj):
        self.calls.append(("allgather", obj))
        return MPI.COMM_SELF.allgather(obj)


def test_one_call_is_a_header_and_a_payload():
    comm = CountingComm()
    x = np.random.default_rng(0).standard_normal((8, 3))
    fastbn.batch_norm_forward(x, comm=comm)
    assert comm.calls == [("Allgather", 6), ("Allgather", 2 * 3 + 1)]


def test_a_kernel_failure_after_the_header_enters_the_payload(monkeypatch):
    """One rank: its own error, after a failed payload and the error texts' allgather;
    the next call on the communicator works."""
    from fastbn import cpu

    def fail(*args):
        raise MemoryError("simulated")

    comm = CountingComm()
    x = np.random.default_rng(0).standard_normal((8, 3))
    monkeypatch.setattr(cpu, "moments", fail)
    with pytest.raises(MemoryError, match="simulated"):
        fastbn.batch_norm_forward(x, comm=comm)
    assert comm.calls == [
        ("Allgather", 6),
        ("Allgather", 7),
        ("allgather", "MemoryError: simulated"),
    ]
    monkeypatch.undo()
    y, _, _ = fastbn.batch_norm_forward(x, comm=comm)
    np.testing.assert_array_equal(y, fastbn.batch_norm_forward(x)[0])


def test_warn_path_with_out_exchanges_once():
    """batch_norm(on_nonfinite="warn", out=...) needs the statistics twice; on other
    ranks (no out) it needs them once, so the second request must not communicate."""
    comm = CountingComm()
    x = np.ones((8, 3))
    x[0, 1] = np.nan
    rm, rv, out = np.zeros(3), np.ones(3), np.empty((8, 3))
    with pytest.warns(RuntimeWarning, match="not finite"):
        fastbn.batch_norm(x, rm, rv, training=True, on_nonfinite="warn", out=out, comm=comm)
    assert [name for name, _ in comm.calls] == ["Allgather", "Allgather"]
    np.testing.assert_array_equal(rm, np.zeros(3))
    np.testing.assert_array_equal(out[:, 0], fastbn.batch_norm(x[:, :1], training=True)[:, 0])


def test_disagreement_messages_name_every_field():
    from fastbn.distributed import _disagreements, _dtype_code

    code = distributed.operation_code
    row = [0, code("batch_norm_forward"), distributed.MOMENTS, 4, _dtype_code(np.float64), 5]
    other = [0, code("batch_norm_backward"), distributed.GRAD_SUMS, 3, _dtype_code(np.float16), 5]
    found = _disagreements([row, row, other])
    assert found == [
        (
            "the operation (batch_norm_forward [batch moments] on ranks 0, 1; "
            "batch_norm_backward [gradient sums] on rank 2)"
        ),
        "the number of channels (C=4 on ranks 0, 1; C=3 on rank 2)",
        "the dtype (float64 on ranks 0, 1; float16 on rank 2)",
    ]
    assert _disagreements([row, row]) == []
    assert _dtype_code(np.dtype(">f8")) == _dtype_code(np.float64)


def test_layer_with_comm_matches_layer_without():
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 3.0, (50, 4)).astype(np.float32)
    a, b = fastbn.BatchNorm(4), fastbn.BatchNorm(4, comm=MPI.COMM_SELF)
    np.testing.assert_array_equal(a.forward(x, training=True), b.forward(x, training=True))
    np.testing.assert_array_equal(a.backward(x), b.backward(x))
    for name in ("dgamma", "dbeta", "running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(a.forward(x, training=False), b.forward(x, training=False))


def test_comm_must_be_a_communicator():
    with pytest.raises(TypeError, match="mpi4py communicator"):
        fastbn.batch_norm_forward(np.zeros((4, 3)), comm="world")
    with pytest.raises(TypeError, match="mpi4py communicator"):
        fastbn.BatchNorm(3, comm=object())


@pytest.mark.parametrize("counts", [[5, 1, 7], [0, 4, 0, 3], [1, 1], [9]])
def test_merge_moments_matches_the_whole_batch(counts):
    rng = np.random.default_rng(sum(counts))
    shards = [1e4 + rng.standard_normal((n, 3)) for n in counts]
    whole = np.concatenate(shards)
    means = [s.mean(axis=0) if len(s) else np.zeros(3) for s in shards]
    m2s = [((s - s.mean(axis=0)) ** 2).sum(axis=0) if len(s) else np.zeros(3) for s in shards]
    n, mean, m2 = distributed.merge_moments(counts, means, m2s)
    assert n == len(whole)
    np.testing.assert_allclose(mean, whole.mean(axis=0), rtol=1e-15)
    # the shards' own NumPy means carry ~1e-12 of absolute error at a 1e4 offset
    np.testing.assert_allclose(m2 / n, whole.var(axis=0), rtol=1e-10)


def test_merge_moments_is_the_pooled_mean_and_m2():
    n, mean, m2 = distributed.merge_moments([3, 5], [[1.5], [-2.0]], [[0.7], [4.0]])
    pooled = (3 * 1.5 + 5 * -2.0) / 8
    assert n == 8
    np.testing.assert_allclose(mean[0], pooled, rtol=1e-15)
    np.testing.assert_allclose(
        m2[0], 0.7 + 4.0 + 3 * (1.5 - pooled) ** 2 + 5 * (-2.0 - pooled) ** 2, rtol=1e-15
    )


def test_sum_in_order_is_left_to_right():
    parts = np.array([[1e16], [1.0], [-1e16]])
    # (1e16 + 1) - 1e16 == 0 in float64: the fixed order shows in the result
    assert distributed.sum_in_order(parts)[0] == 0.0


@pytest.mark.parametrize("n, size", [(10, 4), (3, 5), (0, 2), (17, 1)])
def test_shard_bounds_cover_the_batch_in_order(n, size):
    bounds = [parallel.shard_bounds(n, r, size) for r in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_allreduce_mean_and_broadcast_on_one_rank():
    g = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(2)]
    parallel.allreduce_mean(MPI.COMM_SELF, g)
    np.testing.assert_array_equal(g[0], np.arange(6, dtype=np.float32).reshape(2, 3))
    w = np.arange(3.0)
    parallel.broadcast_arrays(MPI.COMM_SELF, [w])
    np.testing.assert_array_equal(w, np.arange(3.0))


# --------------------------------------------------------------------------------------
# Data-parallel training
# --------------------------------------------------------------------------------------


def test_data_parallel_on_one_rank_is_the_single_process_epoch():
    """``parallel=`` on ``MPI.COMM_SELF`` runs the trainer's own loop: bitwise the same
    parameters, running statistics and metrics as without it."""
    from fastbn import nn
    from fastbn.data import make_synthetic

    ds = make_synthetic(n_train=300, n_test=70, num_features=20, seed=2)
    runs = []
    for use_parallel in (False, True):
        model = nn.build_mlp(
            ds.num_features, ds.num_classes, (12, 8), rng=0, bn_position="before_relu"
        )
        opt, loss = nn.Adam(model.store, lr=1e-2), nn.SoftmaxCrossEntropy()
        hook = nn.DataParallel(model, MPI.COMM_SELF) if use_parallel else None
        rng = np.random.default_rng(4)
        metrics = [
            nn.train_epoch(model, loss, opt, ds.x_train, ds.y_train, 64, rng, parallel=hook),
            nn.evaluate(model, loss, ds.x_test, ds.y_test, 32, parallel=hook),
        ]
        runs.append((metrics, model.state_dict()))
    assert runs[0][0] == runs[1][0]
    for name, value in runs[0][1].items():
        np.testing.assert_array_equal(runs[1][1][name], value, err_msg=name)


def test_data_parallel_marks_the_batch_norm_gradients_and_syncs_the_layers():
    from fastbn import nn

    model = nn.build_mlp(10, 3, (6, 5), rng=0)
    hook = nn.DataParallel(model, MPI.COMM_SELF)
    expected = np.concatenate(
        [np.full(p.grad.size, p.name.endswith((".gamma", ".beta"))) for p in model.store]
    )
    np.testing.assert_array_equal(hook.global_grads, expected)
    assert hook.global_grads.sum() == 2 * (6 + 5)
    norms = [layer for layer in model.layers if isinstance(layer, nn.BatchNorm)]
    assert len(norms) == 2 and all(layer.bn.comm is MPI.COMM_SELF for layer in norms)


def test_data_parallel_refuses_a_gpu_model_by_name():
    import types

    from fastbn import nn

    gpu_model = types.SimpleNamespace(xp=types.ModuleType("cupy"), device="cuda", layers=[])
    with pytest.raises(ValueError, match="host models only.*device='cuda'"):
        nn.DataParallel(gpu_model, MPI.COMM_SELF)
    with pytest.raises(TypeError, match="mpi4py communicator"):
        nn.DataParallel(nn.build_mlp(4, 2, (3,), rng=0), "world")


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.parametrize("ranks", [2, 3])
def test_data_parallel_training_follows_the_single_process_run(ranks):
    result = run_mpi(SCRIPTS / "train_checks.py", ranks)
    assert result["identical_on_ranks"], "parameters or running statistics differ across ranks"
    # float32 parameters after 32 Adam steps: the two runs group sums differently (per
    # shard, then across ranks), which moves parameters by a few float32 ulps.
    assert result["max_param_diff"] < 1e-4
    for synced, single in zip(result["synced"], result["single"]):
        train_loss, train_acc, test_loss, test_acc = synced
        np.testing.assert_allclose([train_loss, test_loss], [single[0], single[2]], rtol=1e-5)
        assert abs(train_acc - single[1]) <= 2 / 2000 and abs(test_acc - single[3]) <= 2 / 500


@pytest.mark.mpi
@needs_mpiexec
def test_fastbn_train_distributed_command(tmp_path):
    """``mpiexec -n 2 fastbn train --distributed`` reaches the single-process metrics."""
    from fastbn.nn import fit

    args = [
        "--dataset",
        "synthetic",
        "--epochs",
        "2",
        "--hidden",
        "16",
        "--batch-size",
        "100",
        "--seed",
        "3",
        "--quiet",
    ]
    env = dict(
        os.environ,
        NUMBA_NUM_THREADS="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [
            MPIEXEC,
            "-n",
            "2",
            sys.executable,
            "-m",
            "fastbn",
            "train",
            "--distributed",
            *args,
            "--metrics-out",
            "metrics.json",
            "--save",
            "checkpoint.npz",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["config"]["ranks"] == 2
    assert (tmp_path / "checkpoint.npz").exists()
    single = fit("synthetic", epochs=2, hidden=(16,), batch_size=100, seed=3, log=None)
    for got, want in zip(record["epochs"], single.epochs):
        np.testing.assert_allclose(got["train_loss"], want["train_loss"], rtol=1e-5)
        assert abs(got["test_acc"] - want["test_acc"]) <= 0.002


# --------------------------------------------------------------------------------------
# CUDA arrays (host staging), under the Numba CUDA simulator
# --------------------------------------------------------------------------------------

# The environment of tests/test_cuda.py's simulator runs: small blocks, so that several
# chunks per channel (and the merge of their partials) are exercised.
CUDA_SIM_ENV = {
    "NUMBA_ENABLE_CUDASIM": "1",
    "FASTBN_CUDA_THREADS": "64",
    "FASTBN_CUDA_MIN_VALUES_PER_THREAD": "4",
    "FASTBN_CUDA_TARGET_BLOCKS": "8",
    "FASTBN_CUDA_SYNC_NONFINITE": "0",
}


def _check_cuda_equality(results):
    cases = results["equality"]
    assert {c["op"] for c in cases} == {"forward_backward", "batch_norm", "layer_relu"}
    failures = [
        f"{c['op']} {c['layout']} {c['dtype']} rows={c['rows']}: {name} differs by "
        f"{rel:.3g} (abs {abs_diff:.3g})"
        for c in cases
        for name, (abs_diff, rel) in c["diffs"].items()
        if not rel <= REL_TOL[c["dtype"]]
    ]
    failures += [
        f"{c['op']} {c['layout']} {c['dtype']}: {name} not identical on every rank"
        for c in cases
        for name, same in c["identical"].items()
        if not same
    ]
    assert not failures, "\n".join(failures)


@pytest.mark.mpi
@needs_mpiexec
def test_cuda_arrays_synchronized_equal_single_process_cpu():
    """mpiexec -n 2, uneven shards (one of 1 row), device arrays with comm= vs the CPU
    results on the whole batch: y, mean, invstd, dx, dgamma, dbeta, running statistics;
    plus the error agreement (a bad dtype on rank 1, NaN on rank 0, forward vs backward,
    float64 vs float32)."""
    results = run_mpi(SCRIPTS / "cuda_sync_checks.py", 2, extra_env=CUDA_SIM_ENV)
    assert results["size"] == 2
    _check_cuda_equality(results)
    assert any(1 in c["rows"] for c in results["equality"])
    errors = results["errors"]
    assert [tuple(o) for o in errors["forward_bad_dtype_on_rank_1"]] == [
        ("DistributedError", [1]),
        ("TypeError", None),
    ]
    assert [tuple(o) for o in errors["nan_on_rank_0"]] == [("FloatingPointError", None)] * 2
    for mismatch in ("mismatch_forward_on_rank_0_backward_on_rank_1", "mismatch_dtype_on_rank_1"):
        assert [tuple(o) for o in errors[mismatch]] == [("ValueError", None)] * 2, mismatch
    assert [tuple(o) for o in errors["normal_call_afterwards"]] == [("ok", None)] * 2
    assert errors["state_untouched"] == [True, True]
    empty = {"forward": True, "backward": True, "batch_norm": True, "layer": True}
    assert results["empty_global_batch"] == [empty, empty]


def test_cuda_arrays_with_comm_self_equal_cpu():
    """One process, ``comm=MPI.COMM_SELF`` on device arrays (simulator) vs the CPU."""
    results = run_mpi(SCRIPTS / "cuda_sync_checks.py", None, "--self", extra_env=CUDA_SIM_ENV)
    assert results["size"] == 1
    _check_cuda_equality(results)
    assert results["empty_global_batch"] == [
        {"forward": True, "backward": True, "batch_norm": True, "layer": True}
    ]
