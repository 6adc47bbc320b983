"""Masked synchronized BatchNorm, run by every rank of ``mpiexec -n P python mask_checks.py``.

Every rank builds the same global batch and global mask from fixed seeds, computes the
single-process masked results on the whole batch (no ``comm``) and the synchronized
results on its own shard of rows (uneven shards; a rank whose shard has no True position;
an empty rank; a rank that passes no mask, all of its positions valid), and compares
them. Rank 0 prints one line ``RESULT <json>``: per case, the largest absolute and
relative difference of each quantity over every rank, and whether the per-channel
results are bitwise identical on every rank. tests/test_distributed.py asserts on it;
nothing here asserts, so no rank is left waiting.
"""

import json
import zlib

import numpy as np
from mpi4py import MPI

import fastbn

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()
SIZE = COMM.Get_size()

LAYOUTS = {
    "NC": (lambda n: (n, 6), 1),
    "NCL": (lambda n: (n, 3, 7), 1),
    "NCHW": (lambda n: (n, 3, 4, 5), 1),
    "NHWC": (lambda n: (n, 4, 5, 3), -1),
    "NCHW_large": (lambda n: (2 * n, 8, 40, 40), 1),  # parallel kernels, several chunks
}


def patterns():
    """``(rows per rank, rank whose shard is all False, rank that passes no mask)``."""
    uneven = [3 + 2 * r for r in range(SIZE)]
    found = [(uneven, SIZE - 1, None), (uneven, None, 0)]
    if SIZE >= 3:
        found.append(([4, 0] + [5] * (SIZE - 2), 0, None))  # an empty rank, a masked-out one
    return found


def rel_diff(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0, 0.0
    d = np.abs(a - b)
    return float(d.max()), float((d / np.maximum(np.abs(b), 1.0)).max())


def run_case(layout, dtype, rows, empty_rank, unmasked_rank):
    shape_of, axis = LAYOUTS[layout]
    n = sum(rows)
    shape = shape_of(n)
    # the same arrays on every rank (str hashes differ between processes: crc32)
    rng = np.random.default_rng(zlib.crc32(f"{layout} {dtype} {rows}".encode()))
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    ax = axis % len(shape)
    C = shape[ax]
    gamma = rng.uniform(0.5, 1.5, C).astype(dtype)
    beta = rng.normal(size=C).astype(dtype)
    mask = rng.random(shape[:ax] + shape[ax + 1 :]) < 0.6
    bounds = np.concatenate([[0], np.cumsum(rows)])
    if layout == "NCHW_large":  # rows are whole samples of 2 rows each
        bounds = 2 * bounds
    for r in range(SIZE):  # at least 2 True positions in every non-empty shard
        mask[bounds[r] : bounds[r + 1]].reshape(-1)[:2] = True
    if empty_rank is not None:
        mask[bounds[empty_rank] : bounds[empty_rank + 1]] = False
    if unmasked_rank is not None:
        mask[bounds[unmasked_rank] : bounds[unmasked_rank + 1]] = True
    start, stop = bounds[RANK], bounds[RANK + 1]
    xs, dys, ms = x[start:stop], dy[start:stop], mask[start:stop]
    my_mask = None if RANK == unmasked_rank else ms

    diffs, shared = {}, {}
    y, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, mask=mask)
    ys, means, invstds = fastbn.batch_norm_forward(
        xs, gamma, beta, axis=axis, mask=my_mask, comm=COMM
    )
    diffs["y"] = rel_diff(ys, y[start:stop])
    diffs["mean"] = rel_diff(means, mean)
    diffs["invstd"] = rel_diff(invstds, invstd)
    shared["stats"] = np.concatenate([means, invstds]).tobytes()

    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        dy, x, mean, invstd, gamma, beta, axis=axis, mask=mask
    )
    dxs, dgammas, dbetas = fastbn.batch_norm_backward(
        dys, xs, means, invstds, gamma, beta, axis=axis, mask=my_mask, comm=COMM
    )
    diffs["dx"] = rel_diff(dxs, dx[start:stop])
    diffs["dgamma"] = rel_diff(dgammas, dgamma)
    diffs["dbeta"] = rel_diff(dbetas, dbeta)
    shared["grads"] = np.concatenate([dgammas, dbetas]).tobytes()

    rm, rv = np.zeros(C), np.ones(C)
    rms, rvs = np.zeros(C), np.ones(C)
    fastbn.batch_norm(x, rm, rv, gamma, beta, training=True, axis=axis, mask=mask)
    fastbn.batch_norm(xs, rms, rvs, gamma, beta, training=True, axis=axis, mask=my_mask, comm=COMM)
    diffs["running_mean"] = rel_diff(rms, rm)
    diffs["running_var"] = rel_diff(rvs, rv)
    shared["running"] = np.concatenate([rms, rvs]).tobytes()

    layer = fastbn.BatchNorm(C, axis=axis, dtype=np.float64)
    synced = fastbn.BatchNorm(C, axis=axis, dtype=np.float64, comm=COMM)
    y_layer = layer.forward(x, training=True, mask=mask)
    ys_layer = synced.forward(xs, training=True, mask=my_mask)
    diffs["layer_y"] = rel_diff(ys_layer, y_layer[start:stop])
    diffs["layer_dx"] = rel_diff(synced.backward(dys), layer.backward(dy)[start:stop])
    diffs["layer_dgamma"] = rel_diff(synced.dgamma, layer.dgamma)
    diffs["layer_running_var"] = rel_diff(synced.running_var, layer.running_var)

    everyone = COMM.allgather((diffs, shared))
    worst = {
        k: [max(d[k][0] for d, _ in everyone), max(d[k][1] for d, _ in everyone)] for k in diffs
    }
    identical = {k: all(s[k] == everyone[0][1][k] for _, s in everyone) for k in shared}
    return {
        "layout": layout,
        "dtype": dtype,
        "rows": [int(r) for r in rows],
        "empty_rank": empty_rank,
        "unmasked_rank": unmasked_rank,
        "diffs": worst,
        "identical": identical,
    }


def main():
    cases = []
    for layout in LAYOUTS:
        for dtype in ("float32", "float64"):
            for rows, empty_rank, unmasked_rank in patterns():
                cases.append(run_case(layout, dtype, rows, empty_rank, unmasked_rank))
    if RANK == 0:
        print("RESULT " + json.dumps({"size": SIZE, "cases": cases}), flush=True)


if __name__ == "__main__":
    main()
