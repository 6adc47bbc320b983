"""Synchronized BatchNorm with ``residual=``, run by every rank of ``mpiexec -n P``.

Every rank builds the same global x, z and dy from fixed seeds, computes the
single-process results on the whole batch and the synchronized ones on its shard (uneven
row counts, one rank with a single row), and rank 0 prints ``RESULT <json>``: per case the
largest absolute difference of each quantity over all ranks, and whether the per-channel
results are bitwise identical on every rank. Nothing here asserts (a failing rank must
never leave the others waiting); tests/test_residual.py asserts on the JSON.
"""

import json

import numpy as np
from mpi4py import MPI

import fastbn

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()
SIZE = COMM.Get_size()
LAYOUTS = {"NC": (lambda n: (n, 5), 1), "NCHW": (lambda n: (n, 3, 4, 5), 1),
           "NHWC": (lambda n: (n, 4, 5, 3), -1)}  # fmt: skip


def main():
    rows = [1] + [3 + 2 * r for r in range(1, SIZE)]
    start = sum(rows[:RANK])
    part = slice(start, start + rows[RANK])
    cases = []
    for seed, (layout, (shape_of, axis)) in enumerate(LAYOUTS.items()):
        for dtype in ("float32", "float64"):
            rng = np.random.default_rng(seed)
            x, z, dy = (rng.standard_normal(shape_of(sum(rows))).astype(dtype) for _ in range(3))
            C = x.shape[axis]
            gamma = rng.uniform(0.5, 1.5, C).astype(dtype)
            beta = rng.standard_normal(C).astype(dtype)
            kw = dict(axis=axis, activation="relu")
            y, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta, residual=z, **kw)
            ys, means, invstds = fastbn.batch_norm_forward(
                x[part], gamma, beta, residual=z[part], comm=COMM, **kw
            )
            grads = fastbn.batch_norm_backward(
                dy, x, mean, invstd, gamma, beta, residual=z, residual_grad=True, **kw
            )
            grads_s = fastbn.batch_norm_backward(
                dy[part], x[part], means, invstds, gamma, beta, residual=z[part],
                residual_grad=True, comm=COMM, **kw,
            )  # fmt: skip
            rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
            rms, rvs = rm.copy(), rv.copy()
            fastbn.batch_norm(x, rm, rv, gamma, beta, training=True, residual=z, **kw)
            fastbn.batch_norm(
                x[part], rms, rvs, gamma, beta, training=True, residual=z[part], comm=COMM, **kw
            )
            pairs = {
                "y": (ys, y[part]),
                "mean": (means, mean),
                "invstd": (invstds, invstd),
                "dx": (grads_s[0], grads[0][part]),
                "dgamma": (grads_s[1], grads[1]),
                "dbeta": (grads_s[2], grads[2]),
                "dz": (grads_s[3], grads[3][part]),
                "running_mean": (rms, rm),
                "running_var": (rvs, rv),
            }
            diffs = {
                k: float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
                if np.size(a) else 0.0
                for k, (a, b) in pairs.items()
            }  # fmt: skip
            shared = np.concatenate([means, invstds, grads_s[1], grads_s[2], rms, rvs]).tobytes()
            everyone = COMM.allgather((diffs, shared))
            cases.append(
                dict(
                    layout=layout,
                    dtype=dtype,
                    rows=rows,
                    diffs={k: max(d[k] for d, _ in everyone) for k in diffs},
                    identical=all(s == everyone[0][1] for _, s in everyone),
                )
            )
    if RANK == 0:
        print("RESULT " + json.dumps({"cases": cases}), flush=True)


if __name__ == "__main__":
    main()
