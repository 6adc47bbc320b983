"""Synchronized BatchNorm on CUDA arrays (host staging), one run per rank under ``mpiexec``.

Meant for the Numba CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, small
``FASTBN_CUDA_THREADS``; tests/test_distributed.py sets the environment) or a real GPU.
Every rank builds the same global batch from fixed seeds, computes the single-process CPU
results on the whole batch (NumPy arrays, no ``comm``) and the synchronized results on
its own shard as device arrays (``comm=COMM``), and compares. Rank 0 prints one line
``RESULT <json>`` (the format of tests/mpi/sync_checks.py: ``equality`` cases with the
largest differences over all ranks and cross-rank identity; ``errors`` outcomes).
"""

import json
import sys

import numpy as np
from mpi4py import MPI
from numba import cuda

import fastbn
from fastbn.distributed import DistributedError

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from sync_checks import Case, make  # noqa: E402

# ``--self``: one process, ``comm=MPI.COMM_SELF`` (run without mpiexec)
COMM = MPI.COMM_SELF if "--self" in sys.argv else MPI.COMM_WORLD
RANK = COMM.Get_rank()
SIZE = COMM.Get_size()

# (layout, global shape for N rows, channel axis, dtype, rows per rank)
CASES = [
    ("NCHW", lambda n: (n, 3, 4, 5), 1, "float64", [3 + 3 * r for r in range(SIZE)]),
    (
        "NC",
        lambda n: (n, 6),
        1,
        "float32",
        [1] + [9 + 2 * r for r in range(1, SIZE)] if SIZE > 1 else [7],
    ),  # a one-row rank
    ("NHWC", lambda n: (n, 4, 5, 3), -1, "float64", [2 + 3 * r for r in range(SIZE)]),
]


def host(a):
    return a.copy_to_host() if a is not None else None


def equality_cases():
    results = []
    for seed, (layout, shape_of, axis, dtype, rows) in enumerate(CASES, start=100):
        x, dy, gamma, beta, part = make(shape_of, axis, rows, dtype, seed)
        xs, dys = np.ascontiguousarray(x[part]), np.ascontiguousarray(dy[part])
        dev = cuda.to_device
        key = dict(layout=layout, dtype=dtype, rows=rows)
        C = x.shape[axis]

        case = Case(op="forward_backward", **key)
        y, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta, axis=axis)
        ys, means, invstds = fastbn.batch_norm_forward(
            dev(xs), dev(gamma), dev(beta), axis=axis, comm=COMM
        )
        ys, means, invstds = host(ys), host(means), host(invstds)
        case.compare("y", ys, y[part])
        case.compare("mean", means, mean)
        case.compare("invstd", invstds, invstd)
        dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta, axis=axis)
        dxs, dgammas, dbetas = fastbn.batch_norm_backward(
            dev(dys), dev(xs), dev(means), dev(invstds), dev(gamma), dev(beta), axis=axis, comm=COMM
        )
        dxs, dgammas, dbetas = host(dxs), host(dgammas), host(dbetas)
        case.compare("dx", dxs, dx[part])
        case.compare("dgamma", dgammas, dgamma)
        case.compare("dbeta", dbetas, dbeta)
        for name, a in (
            ("mean", means),
            ("invstd", invstds),
            ("dgamma", dgammas),
            ("dbeta", dbetas),
        ):
            case.same_everywhere(name, a)
        results.append(case.result())

        case = Case(op="batch_norm", **key)
        rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
        rms, rvs = dev(np.zeros(C, dtype)), dev(np.ones(C, dtype))
        for step in range(2):
            xb = x + np.asarray(step, dtype)
            y = fastbn.batch_norm(xb, rm, rv, gamma, beta, training=True, axis=axis)
            ys = fastbn.batch_norm(
                dev(np.ascontiguousarray(xb[part])),
                rms,
                rvs,
                dev(gamma),
                dev(beta),
                training=True,
                axis=axis,
                comm=COMM,
            )
        case.compare("y", host(ys), y[part])
        case.compare("running_mean", host(rms), rm)
        case.compare("running_var", host(rvs), rv)
        case.same_everywhere("running_mean", host(rms))
        case.same_everywhere("running_var", host(rvs))
        results.append(case.result())

        case = Case(op="layer_relu", **key)
        single = fastbn.BatchNorm(C, axis=axis, dtype=dtype, activation="relu")
        synced = fastbn.BatchNorm(C, axis=axis, dtype=dtype, activation="relu", comm=COMM)
        for layer in (single, synced):
            layer.gamma[:] = gamma
            layer.beta[:] = beta
        synced.to("cuda")
        y = single.forward(x, training=True)
        ys = host(synced.forward(dev(xs), training=True))
        dx = single.backward(dy)
        dxs = host(synced.backward(dev(dys)))
        case.compare("y", ys, y[part])
        case.compare("dx", dxs, dx[part])
        assert synced.num_batches_tracked == single.num_batches_tracked == 1
        for name in ("dgamma", "dbeta", "running_mean", "running_var"):
            case.compare(name, host(getattr(synced, name)), getattr(single, name))
            case.same_everywhere(name, host(getattr(synced, name)))
        results.append(case.result())
    return results


def outcome(fn):
    try:
        fn()
    except DistributedError as exc:
        return ("DistributedError", list(exc.ranks))
    except Exception as exc:  # noqa: BLE001 - the type is the outcome
        return (type(exc).__name__, None)
    return ("ok", None)


def error_cases():
    x = cuda.to_device(np.random.default_rng(RANK).standard_normal((4, 3)))
    rm, rv = cuda.to_device(np.zeros(3)), cuda.to_device(np.ones(3))

    def forward_bad_dtype():
        bad = cuda.to_device(np.zeros((4, 3), np.int32)) if RANK == 1 else x
        fastbn.batch_norm(bad, rm, rv, training=True, comm=COMM)

    def nonfinite_on_rank_0():
        h = np.ones((4, 3))
        if RANK == 0:
            h[0, 1] = np.nan
        fastbn.batch_norm(cuda.to_device(h), rm, rv, training=True, comm=COMM)

    def forward_vs_backward():
        # device arrays: the agreement is the CPU path's (the header precedes the payload)
        if RANK == 0:
            fastbn.batch_norm_forward(x, comm=COMM)
        else:
            _, mean, invstd = fastbn.batch_norm_forward(x)
            fastbn.batch_norm_backward(x, x, mean, invstd, comm=COMM)

    def dtype_mismatch():
        h = np.ones((4, 3), np.float32 if RANK == 1 else np.float64)
        h[0] = 0.0
        fastbn.batch_norm_forward(cuda.to_device(h), comm=COMM)

    def afterwards():
        fastbn.batch_norm_forward(x, comm=COMM)

    results = {}
    for name, fn in (
        ("forward_bad_dtype_on_rank_1", forward_bad_dtype),
        ("nan_on_rank_0", nonfinite_on_rank_0),
        ("mismatch_forward_on_rank_0_backward_on_rank_1", forward_vs_backward),
        ("mismatch_dtype_on_rank_1", dtype_mismatch),
        ("normal_call_afterwards", afterwards),
    ):
        results[name] = COMM.allgather(outcome(fn))
    untouched = np.array_equal(rm.copy_to_host(), np.zeros(3)) and np.array_equal(
        rv.copy_to_host(), np.ones(3)
    )
    results["state_untouched"] = COMM.allgather(bool(untouched))
    return results


def empty_global_batch():
    """Every rank's shard an empty device array in training: the single-process
    empty-batch results on every rank (see sync_checks.empty_global_batch)."""
    C = 3
    checks = {}
    x = cuda.to_device(np.zeros((0, C), np.float32))
    try:
        y, mean, invstd = fastbn.batch_norm_forward(x, comm=COMM)
        checks["forward"] = (
            y.shape == x.shape
            and bool(np.isnan(host(mean)).all())
            and bool(np.isnan(host(invstd)).all())
        )
        dx, dgamma, dbeta = fastbn.batch_norm_backward(
            x, x, mean, invstd, cuda.to_device(np.ones(C, np.float32)), comm=COMM
        )
        checks["backward"] = (
            dx.shape == x.shape and not host(dgamma).any() and not host(dbeta).any()
        )
        rm = cuda.to_device(np.full(C, 0.5, np.float32))
        rv = cuda.to_device(np.full(C, 2.0, np.float32))
        y = fastbn.batch_norm(x, rm, rv, training=True, comm=COMM)
        checks["batch_norm"] = (
            y.shape == x.shape and bool((host(rm) == 0.5).all()) and bool((host(rv) == 2.0).all())
        )
        layer = fastbn.BatchNorm(C, comm=COMM).to("cuda")
        y = layer.forward(x, training=True)
        dx = layer.backward(x)
        checks["layer"] = (
            y.shape == x.shape
            and dx.shape == x.shape
            and layer.num_batches_tracked == 0
            and bool((host(layer.running_mean) == 0).all())
            and not host(layer.dgamma).any()
            and not host(layer.dbeta).any()
        )
    except Exception as exc:  # reported, never raised: the other ranks must not wait
        checks["error"] = f"{type(exc).__name__}: {exc}"
    return COMM.allgather(checks)


def main():
    equality = equality_cases()
    errors = error_cases()
    empty = empty_global_batch()
    if RANK == 0:
        print(
            "RESULT "
            + json.dumps(
                {"size": SIZE, "equality": equality, "errors": errors, "empty_global_batch": empty}
            )
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
