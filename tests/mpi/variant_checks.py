"""The layer's variants with ``comm``, run by every rank of ``mpiexec -n P python
variant_checks.py``.

Every rank builds the same global batches from fixed seeds, trains a layer without
``comm`` on the whole batch and a layer with ``comm`` on its own shard (several steps),
and compares. Batch renormalization with ``comm`` uses the synchronized statistics, so it
equals the single-process layer on the whole batch (uneven shards); ghost batches are per
rank, and with shards that are multiples of ``virtual_batch_size`` they are the whole
batch's own chunks, so it equals it too. Rank 0 prints ``RESULT <json>``: per case, the
largest relative difference of each quantity over all ranks. Nothing here asserts, so a
failing comparison never leaves other ranks waiting (tests/test_layer_variants.py does).
"""

import json

import numpy as np
from mpi4py import MPI

import fastbn

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / (1.0 + np.abs(b)))) if a.size else 0.0


def run(options, rows, shape_rest, axis):
    C = shape_rest[axis - 1] if axis > 0 else shape_rest[-1]
    local = fastbn.BatchNorm.keras(C, axis=axis, momentum=0.8, dtype=np.float64, **options)
    synced = fastbn.BatchNorm.keras(
        C, axis=axis, momentum=0.8, dtype=np.float64, comm=COMM, **options
    )
    for bn in (local, synced):
        bn.gamma[:] = np.linspace(0.5, 1.5, C)
        bn.beta[:] = np.linspace(-1.0, 1.0, C)
    start = sum(rows[:RANK])
    mine = slice(start, start + rows[RANK])
    worst = {}
    for step in range(3):
        rng = np.random.default_rng(step)
        x = rng.normal(1.0 + step, 1.0 + step, (sum(rows), *shape_rest))
        dy = rng.normal(size=x.shape)
        pairs = {
            "y": (synced.forward(x[mine].copy()), local.forward(x)[mine]),
            "dx": (synced.backward(dy[mine].copy()), local.backward(dy)[mine]),
            "dgamma": (synced.dgamma, local.dgamma),
            "dbeta": (synced.dbeta, local.dbeta),
        }
        for k, v in local.state_dict().items():
            pairs[k] = (synced.state_dict()[k], v)
        for k, (a, b) in pairs.items():
            worst[k] = max(worst.get(k, 0.0), rel(a, b))
    return worst


cases = {
    "renorm NCHW uneven": (
        dict(renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.5}),
        [3 + 2 * r for r in range(SIZE)],
        (3, 4, 5),
        1,
    ),
    "renorm NC": (dict(renorm=True), [6] * SIZE, (5,), 1),
    "ghost NHWC": (dict(virtual_batch_size=4), [8] * SIZE, (2, 3, 3), -1),
    "ghost NC": (dict(virtual_batch_size=2), [4 + 2 * (r % 2) for r in range(SIZE)], (5,), 1),
}
results = {name: run(*case) for name, case in cases.items()}
gathered = COMM.gather(results, root=0)
if RANK == 0:
    merged = {
        name: {k: max(g[name][k] for g in gathered) for k in results[name]} for name in results
    }
    print("RESULT " + json.dumps(merged), flush=True)
