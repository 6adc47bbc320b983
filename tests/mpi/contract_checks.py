"""The backward contract under ``comm=``.

Run by every rank of ``mpiexec -n 2 python contract_checks.py``.

Every rank builds the same global batch, takes its shard, and checks that
``batch_norm_backward(..., comm=COMM_WORLD)`` returns ``dgamma`` and ``dbeta`` whenever
the call is affine (gamma or beta given) and equal to the single-process result on the
whole batch, both None otherwise; the layer likewise. Rank 0 gathers one outcome per case
and rank (``"ok"`` or what went wrong) and prints ``RESULT <json>``; nothing asserts here,
so a failing check never leaves another rank waiting.
"""

import json

import numpy as np
from mpi4py import MPI

import fastbn

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()
SIZE = COMM.Get_size()


def _close(a, b):
    return a is not None and np.allclose(a, b, rtol=1e-10, atol=1e-10)


def _case(rows, with_gamma, with_beta):
    rng = np.random.default_rng(7)
    n = sum(rows)
    x = rng.normal(3.0, 2.0, size=(n, 4, 3))
    dy = rng.normal(size=x.shape)
    gamma = rng.normal(1.0, 0.3, size=4) if with_gamma else None
    beta = rng.normal(size=4) if with_beta else None
    _, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta)
    _, e_dgamma, e_dbeta = fastbn.batch_norm_backward(
        dy, x, mean, invstd, np.ones(4) if gamma is None else gamma, beta
    )
    start = sum(rows[:RANK])
    shard = slice(start, start + rows[RANK])
    _, g_mean, g_invstd = fastbn.batch_norm_forward(x[shard], gamma, beta, comm=COMM)
    _, dgamma, dbeta = fastbn.batch_norm_backward(
        dy[shard], x[shard], g_mean, g_invstd, gamma, beta, comm=COMM
    )
    if not (with_gamma or with_beta):
        return "ok" if dgamma is None and dbeta is None else f"got {dgamma}, {dbeta}"
    if dgamma is None or dbeta is None:
        return f"missing gradient: dgamma={dgamma}, dbeta={dbeta}"
    if not (_close(dgamma, e_dgamma) and _close(dbeta, e_dbeta)):
        return f"dgamma {dgamma} / {e_dgamma}, dbeta {dbeta} / {e_dbeta}"
    return "ok"


def _layer(affine):
    rng = np.random.default_rng(8)
    x = rng.normal(size=(6 * SIZE, 3))
    dy = rng.normal(size=x.shape)
    bn = fastbn.BatchNorm(3, affine=affine, dtype=np.float64, comm=COMM)
    shard = slice(6 * RANK, 6 * RANK + 6)
    bn.forward(x[shard], training=True)
    bn.backward(dy[shard])
    if not affine:
        return "ok" if bn.dgamma is None and bn.dbeta is None else "gradients of a non-affine layer"
    return "ok" if _close(bn.dbeta, dy.sum(axis=0)) else f"dbeta {bn.dbeta}"


def main():
    outcomes = {}
    cases = {
        "gamma": ([5, 7], True, False),
        "beta": ([5, 7], False, True),
        "both": ([5, 7], True, True),
        "neither": ([5, 7], False, False),
        "empty_shard_gamma": ([0, 6], True, False),
    }
    for name, (rows, with_gamma, with_beta) in cases.items():
        try:
            outcomes[name] = _case(rows[:SIZE] + [3] * (SIZE - 2), with_gamma, with_beta)
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            outcomes[name] = f"{type(exc).__name__}: {exc}"
    for name, affine in (("layer_affine", True), ("layer_not_affine", False)):
        try:
            outcomes[name] = _layer(affine)
        except Exception as exc:  # noqa: BLE001
            outcomes[name] = f"{type(exc).__name__}: {exc}"
    gathered = COMM.gather(outcomes, root=0)
    if RANK == 0:
        print("RESULT " + json.dumps({"size": SIZE, "ranks": gathered}), flush=True)


if __name__ == "__main__":
    main()
