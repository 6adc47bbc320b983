"""Synchronized BatchNorm checks, run by every rank of ``mpiexec -n P python sync_checks.py``.

Every rank generates the same global arrays from fixed seeds, computes the single-process
results on the whole batch (no ``comm``) and the synchronized results on its own shard,
and compares them. Rank 0 gathers everything and prints one line ``RESULT <json>``:

- ``equality``: one entry per case (function, layout, dtype, shard sizes) with the largest
  absolute and relative difference of each quantity over all ranks, and whether the
  per-channel results (statistics, dgamma, dbeta, running statistics) are bitwise
  identical on every rank;
- ``errors``: one entry per failure scenario with the outcome on each rank (the exception
  type name, or ``"ok"``) and the failing ranks a ``DistributedError`` named.

tests/test_distributed.py runs this script and asserts on that JSON; nothing here asserts,
so one failing comparison never leaves other ranks waiting.
"""

import contextlib
import json
import sys
import warnings

import numpy as np
from mpi4py import MPI

import fastbn
from fastbn import cpu
from fastbn.distributed import DistributedError

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()
SIZE = COMM.Get_size()

LAYOUTS = {
    # name: (global shape for N rows, channel axis)
    "NC": (lambda n: (n, 6), 1),
    "NCHW": (lambda n: (n, 3, 4, 5), 1),
    "NHWC": (lambda n: (n, 4, 5, 3), -1),
    # large enough for the parallel kernels and several reduction chunks per channel
    "NCHW_large": (lambda n: (4 * n, 8, 48, 48), 1),
}
DTYPES = ("float32", "float64")


def shard_patterns():
    """Rows per rank of each tested global batch: uneven, a rank with one row, a rank with none."""
    patterns = [[1] + [7 + 2 * r for r in range(1, SIZE)]]  # rank 0 holds one row
    patterns.append([5 + 3 * r for r in range(SIZE)])  # uneven, all > 1
    if SIZE >= 3:
        patterns.append([4, 1] + [0] * (SIZE - 2))  # empty ranks
    return patterns


def rel_diff(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0, 0.0
    d = np.abs(a - b)
    return float(d.max()), float((d / np.maximum(np.abs(b), 1.0)).max())


class Case:
    """Differences and cross-rank identity of one case, filled in by every rank."""

    def __init__(self, **key):
        self.key = key
        self.diffs = {}
        self.shared = {}

    def compare(self, name, got, want):
        self.diffs[name] = rel_diff(got, want)

    def same_everywhere(self, name, a):
        self.shared[name] = np.ascontiguousarray(a).tobytes()

    def result(self):
        """Gather to every rank; return the summary (the same on every rank)."""
        everyone = COMM.allgather((self.diffs, self.shared))
        diffs = {
            name: [max(d[name][0] for d, _ in everyone), max(d[name][1] for d, _ in everyone)]
            for name in self.diffs
        }
        identical = {
            name: all(s[name] == everyone[0][1][name] for _, s in everyone) for name in self.shared
        }
        return dict(self.key, diffs=diffs, identical=identical)


def make(shape_of, axis, rows, dtype, seed):
    rng = np.random.default_rng(seed)
    n = sum(rows)
    x = (3.0 + 2.0 * rng.standard_normal(shape_of(n))).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    C = x.shape[axis]
    gamma = (1.0 + 0.5 * rng.standard_normal(C)).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    scale = x.shape[0] // n
    start = scale * sum(rows[:RANK])
    part = slice(start, start + scale * rows[RANK])
    return x, dy, gamma, beta, part


def equality_cases():
    results = []
    seed = 0
    for layout, (shape_of, axis) in LAYOUTS.items():
        for dtype in DTYPES:
            for rows in shard_patterns()[: 1 if layout.endswith("_large") else None]:
                seed += 1
                x, dy, gamma, beta, part = make(shape_of, axis, rows, dtype, seed)
                xs, dys = x[part], dy[part]
                key = dict(layout=layout, dtype=dtype, rows=rows)

                # batch_norm_forward and batch_norm_backward
                case = Case(op="forward_backward", **key)
                y, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta, axis=axis)
                ys, means, invstds = fastbn.batch_norm_forward(
                    xs, gamma, beta, axis=axis, comm=COMM
                )
                case.compare("y", ys, y[part])
                case.compare("mean", means, mean)
                case.compare("invstd", invstds, invstd)
                dx, dgamma, dbeta = fastbn.batch_norm_backward(
                    dy, x, mean, invstd, gamma, beta, axis=axis
                )
                dxs, dgammas, dbetas = fastbn.batch_norm_backward(
                    dys, xs, means, invstds, gamma, beta, axis=axis, comm=COMM
                )
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

                # batch_norm in training: running statistics (three steps)
                case = Case(op="batch_norm", **key)
                C = x.shape[axis]
                rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
                rms, rvs = np.zeros(C, dtype), np.ones(C, dtype)
                for step in range(3):
                    xb = x + np.asarray(step, dtype)
                    y = fastbn.batch_norm(xb, rm, rv, gamma, beta, training=True, axis=axis)
                    ys = fastbn.batch_norm(
                        xb[part], rms, rvs, gamma, beta, training=True, axis=axis, comm=COMM
                    )
                case.compare("y", ys, y[part])
                case.compare("running_mean", rms, rm)
                case.compare("running_var", rvs, rv)
                case.same_everywhere("running_mean", rms)
                case.same_everywhere("running_var", rvs)
                results.append(case.result())

                # the BatchNorm layer, with a fused ReLU: forward, backward, running stats
                case = Case(op="layer_relu", **key)
                single = fastbn.BatchNorm(C, axis=axis, dtype=dtype, activation="relu")
                synced = fastbn.BatchNorm(C, axis=axis, dtype=dtype, activation="relu", comm=COMM)
                for layer in (single, synced):
                    layer.gamma[:] = gamma
                    layer.beta[:] = beta
                y = single.forward(x, training=True)
                ys = synced.forward(xs, training=True)
                dx = single.backward(dy)
                dxs = synced.backward(dys)
                case.compare("y", ys, y[part])
                case.compare("dx", dxs, dx[part])
                for name in ("dgamma", "dbeta", "running_mean", "running_var"):
                    case.compare(name, getattr(synced, name), getattr(single, name))
                    case.same_everywhere(name, getattr(synced, name))
                results.append(case.result())
    return results


def outcome(fn):
    """Run ``fn``; return ``("ok" or the exception type name, failing ranks named,
    the error message or None)``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            fn()
        return "ok", None, None
    except DistributedError as exc:
        return "DistributedError", list(exc.ranks), str(exc)
    except Exception as exc:  # the failing rank's own error
        return type(exc).__name__, None, str(exc)


@contextlib.contextmanager
def failing_on(rank, name, replacement):
    """Replace the kernel wrapper ``fastbn.cpu.<name>`` on ``rank`` only (a failure
    after the local checks, inside the synchronized call)."""
    original = getattr(cpu, name)
    if RANK == rank:
        setattr(cpu, name, replacement)
    try:
        yield
    finally:
        setattr(cpu, name, original)


def simulated_failure(*args, **kwargs):
    raise MemoryError("simulated failure in the kernel")


def wrong_shape(x3, *args):
    # a local summary that does not convert into the payload (C - 1 values)
    C = x3.shape[1]
    return np.zeros(C - 1), np.zeros(C - 1)


def mismatch_cases(x, dy):
    """Ranks that make different synchronized calls, or pass different dtypes."""
    C = x.shape[1]
    _, mean, invstd = fastbn.batch_norm_forward(x)  # local statistics, for the backward
    gamma, beta = np.ones(C), np.zeros(C)
    rm, rv = np.zeros(C), np.ones(C)
    calls = {
        "forward": lambda: fastbn.batch_norm_forward(x, gamma, beta, comm=COMM),
        "backward": lambda: fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta, comm=COMM),
        "batch_norm": lambda: fastbn.batch_norm(x, rm, rv, gamma, beta, training=True, comm=COMM),
    }
    scenarios = {}
    for first, others in (
        ("forward", "backward"),
        ("forward", "batch_norm"),
        ("backward", "batch_norm"),
        ("backward", "forward"),
    ):

        def mismatch(first=first, others=others):
            calls[first if RANK == 0 else others]()

        scenarios[f"mismatch_{first}_on_rank_0_{others}_elsewhere"] = mismatch

    def dtype_mismatch():
        fastbn.batch_norm_forward(x.astype(np.float32) if RANK == SIZE - 1 else x, comm=COMM)

    scenarios["mismatch_dtype_on_last_rank"] = dtype_mismatch

    def float16_mismatch():
        # float16 is computed in float32: the agreement is on the caller's dtype
        fastbn.batch_norm_forward(x.astype(np.float16 if RANK == 0 else np.float32), comm=COMM)

    scenarios["mismatch_float16_float32"] = float16_mismatch

    def layer_forward_vs_backward():
        bn = fastbn.BatchNorm(C, dtype=np.float64, comm=COMM)
        bn._saved = (x, 1, mean, invstd, None)  # as after a forward, without its collective
        if RANK == 0:
            bn.forward(x, training=True)
        else:
            bn.backward(dy)

    scenarios["mismatch_layer_forward_on_rank_0_backward_elsewhere"] = layer_forward_vs_backward
    rms_untouched.append((rm, rv))
    return scenarios


rms_untouched = []


def late_failure_cases(x, dy, layer, rm, rv):
    """Ranks that fail after the header collective: in the kernel or converting its result."""
    last = SIZE - 1
    scenarios = {}

    def forward_kernel_fails():
        with failing_on(1, "moments", simulated_failure):
            fastbn.batch_norm_forward(x, comm=COMM)

    scenarios["forward_kernel_fails_on_rank_1"] = forward_kernel_fails

    def backward_kernel_fails():
        _, mean, invstd = fastbn.batch_norm_forward(x, comm=COMM)
        with failing_on(1, "grad_sums", simulated_failure):
            fastbn.batch_norm_backward(dy, x, mean, invstd, np.ones(4), comm=COMM)

    scenarios["backward_kernel_fails_on_rank_1"] = backward_kernel_fails

    def conversion_fails():
        with failing_on(last, "moments", wrong_shape):
            fastbn.batch_norm(x, rm, rv, training=True, comm=COMM)

    scenarios["conversion_fails_on_last_rank"] = conversion_fails

    def layer_kernel_fails():
        with failing_on(0, "moments", simulated_failure):
            layer.forward(x, training=True)

    scenarios["layer_kernel_fails_on_rank_0"] = layer_kernel_fails

    def big_endian():
        # either converted (every rank "ok") or an error of rank 1's own, never a hang
        fastbn.batch_norm_forward(x.astype(">f8") if RANK == 1 else x, comm=COMM)

    scenarios["big_endian_on_rank_1"] = big_endian

    def warn_with_out_on_rank_0():
        # non-finite statistics with on_nonfinite="warn": rank 0 (out given) recomputes
        # its output; it must not make an exchange that the other ranks do not make
        xb = x.copy()
        if RANK == 0:
            xb[0, 0] = np.nan
        out = np.empty_like(xb) if RANK == 0 else None
        fastbn.batch_norm(xb, rm, rv, training=True, on_nonfinite="warn", out=out, comm=COMM)

    scenarios["warn_with_out_on_rank_0"] = warn_with_out_on_rank_0
    return scenarios


def error_cases():
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((6, 4))
    dy = rng.standard_normal((6, 4))
    last = SIZE - 1
    scenarios = {}

    def forward_bad_dtype():
        xb = x.astype(np.int64) if RANK == 1 else x
        fastbn.batch_norm_forward(xb, comm=COMM)

    scenarios["forward_bad_dtype_on_rank_1"] = forward_bad_dtype

    def backward_bad_gamma():
        y, mean, invstd = fastbn.batch_norm_forward(x, comm=COMM)
        gamma = np.ones(5 if RANK == 0 else 4)
        fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, comm=COMM)

    scenarios["backward_bad_gamma_on_rank_0"] = backward_bad_gamma

    def channel_mismatch():
        fastbn.batch_norm_forward(x[:, :3] if RANK == last else x, comm=COMM)

    scenarios["channel_mismatch_on_last_rank"] = channel_mismatch

    def global_single_value():
        fastbn.batch_norm_forward(x[:1] if RANK == 0 else x[:0], comm=COMM)

    scenarios["one_value_in_global_batch"] = global_single_value

    layer = fastbn.BatchNorm(4, dtype=np.float64, comm=COMM)

    def layer_bad_channels():
        layer.forward(rng.standard_normal((5, 3 if RANK == last else 4)), training=True)

    scenarios["layer_bad_channels_on_last_rank"] = layer_bad_channels

    rm, rv = np.zeros(4), np.ones(4)

    def nonfinite_on_rank_0():
        xb = x.copy()
        if RANK == 0:
            xb[2, 1] = np.nan
        fastbn.batch_norm(xb, rm, rv, training=True, comm=COMM)

    scenarios["nan_on_rank_0"] = nonfinite_on_rank_0

    def inference_bad_running_on_rank_1():
        # not collective: the failing rank raises alone and nobody waits
        fastbn.batch_norm(x, rm if RANK != 1 else np.zeros(3), rv, training=False, comm=COMM)

    scenarios["inference_bad_running_on_rank_1"] = inference_bad_running_on_rank_1

    scenarios.update(mismatch_cases(x, dy))
    scenarios.update(late_failure_cases(x, dy, layer, rm, rv))

    def afterwards():
        fastbn.batch_norm_forward(x, comm=COMM)

    scenarios["normal_call_afterwards"] = afterwards

    results = {}
    messages = {}
    for name, fn in scenarios.items():
        mine = outcome(fn)
        results[name] = COMM.allgather(mine[:2])
        messages[name] = COMM.allgather(mine[2])
    results["messages"] = messages
    untouched = (
        layer.num_batches_tracked == 0
        and np.array_equal(layer.running_mean, np.zeros(4))
        and np.array_equal(rm, np.zeros(4))
        and np.array_equal(rv, np.ones(4))
        and all(
            np.array_equal(a, np.zeros(4)) and np.array_equal(b, np.ones(4))
            for a, b in rms_untouched
        )
    )
    results["state_untouched"] = COMM.allgather(bool(untouched))
    return results


def empty_global_batch():
    """Every rank's shard empty in training: what each rank gets (the single-process
    empty-batch results: empty outputs, NaN statistics, zero parameter gradients, state
    untouched), and whether a normal call works afterwards."""
    C = 4
    checks = {}
    x = np.zeros((0, C), np.float32)
    try:
        y, mean, invstd = fastbn.batch_norm_forward(x, comm=COMM)
        checks["forward"] = (
            y.shape == x.shape
            and mean.shape == (C,)
            and bool(np.isnan(mean).all() and np.isnan(invstd).all())
        )
        dx, dgamma, dbeta = fastbn.batch_norm_backward(
            x, x, mean, invstd, np.ones(C, np.float32), comm=COMM
        )
        checks["backward"] = dx.shape == x.shape and not dgamma.any() and not dbeta.any()
        rm, rv = np.full(C, 0.5, np.float32), np.full(C, 2.0, np.float32)
        y = fastbn.batch_norm(x, rm, rv, training=True, comm=COMM)
        checks["batch_norm"] = (
            y.shape == x.shape and bool((rm == 0.5).all()) and bool((rv == 2.0).all())
        )
        layer = fastbn.BatchNorm(C, comm=COMM)
        y = layer.forward(x, training=True)
        dx = layer.backward(x)
        checks["layer"] = (
            y.shape == x.shape
            and dx.shape == x.shape
            and layer.num_batches_tracked == 0
            and bool((layer.running_mean == 0).all())
            and bool((layer.running_var == 1).all())
            and not layer.dgamma.any()
            and not layer.dbeta.any()
        )
        xs = np.arange(6.0 * C).reshape(6, C) + RANK
        y, mean, _ = fastbn.batch_norm_forward(xs, comm=COMM)
        checks["afterwards"] = bool(np.allclose(mean, np.arange(C) + 10.0 + (SIZE - 1) / 2))
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
