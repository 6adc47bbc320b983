"""The backward through fixed statistics under ``comm=``.

Run by every rank of ``mpiexec -n P python frozen_checks.py``.

Every rank builds the same global batch and fixed statistics, takes its (uneven) shard
and checks ``batch_norm_backward(..., training=False, comm=COMM_WORLD)``: ``dx`` is the
rank's shard of the single-process ``dx`` of the whole batch (bitwise: it needs nothing
from the other ranks), ``dgamma`` and ``dbeta`` are the single-process sums over the
whole batch and bitwise identical on every rank; ranks that mix ``training=True`` and
``False`` all raise ValueError and leave ``out`` untouched; the layer after an eval-mode
forward likewise. Rank 0 gathers one outcome per case and rank (``"ok"`` or what went
wrong) and prints ``RESULT <json>``; nothing asserts here, so a failing check never
leaves another rank waiting.
"""

import json

import numpy as np
from mpi4py import MPI

import fastbn

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()
SIZE = COMM.Get_size()

LAYOUTS = {"NC": ((6,), 1), "NCHW": ((3, 4, 5), 1), "NHWC": ((4, 5, 3), -1)}


def _rows(pattern):
    if pattern == "uneven":
        return [1] + [5 + 2 * r for r in range(1, SIZE)]
    return [0] + [6] * (SIZE - 1)  # an empty shard on rank 0


def _data(layout, dtype, rows, seed=5):
    rest, axis = LAYOUTS[layout]
    shape = (sum(rows), *rest)
    C = shape[axis]
    rng = np.random.default_rng(seed)
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    mean = 3.0 + rng.standard_normal(C)
    invstd = 1.0 / np.sqrt(rng.uniform(1.0, 4.0, C) + 1e-5)
    gamma = rng.normal(1.0, 0.5, C).astype(dtype)
    beta = rng.normal(size=C).astype(dtype)
    start = sum(rows[:RANK])
    return x, dy, mean, invstd, gamma, beta, axis, slice(start, start + rows[RANK])


def _same_on_every_rank(a):
    gathered = COMM.allgather(None if a is None else np.asarray(a))
    return all(g is not None and np.array_equal(g, gathered[0]) for g in gathered)


def _case(layout, dtype, pattern="uneven", activation=None, affine=True):
    x, dy, mean, invstd, gamma, beta, axis, shard = _data(layout, dtype, _rows(pattern))
    g, b = (gamma, beta) if affine else (None, None)
    e_dx, e_dgamma, e_dbeta = fastbn.batch_norm_backward(
        dy, x, mean, invstd, g, b, axis=axis, activation=activation, training=False
    )
    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        dy[shard],
        x[shard],
        mean,
        invstd,
        g,
        b,
        axis=axis,
        activation=activation,
        training=False,
        comm=COMM,
    )
    problems = []
    if not np.array_equal(dx, e_dx[shard]):
        problems.append("dx differs from the single-process shard")
    if not affine:
        if dgamma is not None or dbeta is not None:
            problems.append("gradients of a non-affine call")
    else:
        rtol = 1e-12 if dtype == "float64" else 1e-5
        for name, got, want in (("dgamma", dgamma, e_dgamma), ("dbeta", dbeta, e_dbeta)):
            if got is None or got.dtype != want.dtype:
                problems.append(f"{name} is {got!r}")
            elif not np.allclose(got, want, rtol=rtol, atol=rtol):
                problems.append(f"{name} {got} != {want}")
    if not _same_on_every_rank(dgamma) and affine:
        problems.append("dgamma differs between ranks")
    return "ok" if not problems else "; ".join(problems)


def _mixed_training(with_out):
    """Rank 0 asks for the training backward, the others for the frozen one."""
    x, dy, mean, invstd, gamma, beta, axis, shard = _data("NC", "float64", _rows("uneven"))
    out = np.full_like(x[shard], 7.0) if with_out else None
    try:
        fastbn.batch_norm_backward(
            dy[shard], x[shard], mean, invstd, gamma, beta, out=out, training=RANK != 0, comm=COMM
        )
    except ValueError as exc:
        if "training" not in str(exc) and "fixed statistics" not in str(exc):
            return f"ValueError without the reason: {exc}"
        if with_out and not np.all(out == 7.0):
            return "out was written"
        return "ok"
    except Exception as exc:  # noqa: BLE001 - reported
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _layer(mixed):
    rng = np.random.default_rng(8)
    x = rng.normal(2.0, 3.0, size=(6 * SIZE, 3))
    dy = rng.normal(size=x.shape)
    shard = slice(6 * RANK, 6 * RANK + 6)
    bn = fastbn.BatchNorm(3, dtype=np.float64, comm=COMM)
    bn.forward(x[shard], training=True)  # collective: the same running statistics everywhere
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    if mixed:
        if RANK == 0:
            bn.forward(x[shard], training=False)  # local
        try:
            bn.backward(dy[shard])
        except ValueError:
            return "ok"
        except Exception as exc:  # noqa: BLE001
            return f"{type(exc).__name__}: {exc}"
        return "no error"
    bn.forward(x[shard], training=False)
    dx = bn.backward(dy[shard])
    invstd = 1.0 / np.sqrt(rv + bn.eps)
    problems = []
    if not np.allclose(dx, dy[shard] * invstd, rtol=1e-12, atol=1e-12):
        problems.append("dx")
    if not np.allclose(bn.dbeta, dy.sum(axis=0), rtol=1e-12, atol=1e-12):
        problems.append(f"dbeta {bn.dbeta}")
    if not np.allclose(bn.dgamma, (dy * (x - rm) * invstd).sum(axis=0), rtol=1e-12, atol=1e-12):
        problems.append(f"dgamma {bn.dgamma}")
    if not (np.array_equal(bn.running_mean, rm) and np.array_equal(bn.running_var, rv)):
        problems.append("running statistics changed")
    if not _same_on_every_rank(bn.dgamma):
        problems.append("dgamma differs between ranks")
    return "ok" if not problems else "; ".join(problems)


def main():
    cases = {
        "NC_float32": lambda: _case("NC", "float32"),
        "NC_float64": lambda: _case("NC", "float64"),
        "NCHW_float64": lambda: _case("NCHW", "float64"),
        "NCHW_float32": lambda: _case("NCHW", "float32"),
        "NHWC_float32": lambda: _case("NHWC", "float32"),
        "relu_float64": lambda: _case("NCHW", "float64", activation="relu"),
        "neither": lambda: _case("NC", "float64", affine=False),
        "empty_shard": lambda: _case("NCHW", "float64", pattern="empty"),
        "mixed_training": lambda: _mixed_training(False),
        "out_untouched_on_mismatch": lambda: _mixed_training(True),
        "layer_eval": lambda: _layer(False),
        "layer_mixed": lambda: _layer(True),
    }
    outcomes = {}
    for name, run in cases.items():
        try:
            outcomes[name] = run()
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            outcomes[name] = f"{type(exc).__name__}: {exc}"
    gathered = COMM.gather(outcomes, root=0)
    if RANK == 0:
        print("RESULT " + json.dumps({"size": SIZE, "ranks": gathered}), flush=True)


if __name__ == "__main__":
    main()
