"""Data-parallel training checks, run by every rank of ``mpiexec -n P python train_checks.py``.

Every rank trains the same MLP (with BatchNorm) on the same synthetic dataset with the
trainer's own epoch loop and :class:`fastbn.nn.DataParallel` as its ``parallel=`` hook;
rank 0 also trains it in a single process with the same global batch and compares.
Rank 0 prints ``RESULT <json>`` with the per-epoch metrics of both runs, the largest
parameter / running-statistic difference, and whether parameters and running statistics
are bitwise identical on every rank.
"""

import json

import numpy as np
from mpi4py import MPI

from fastbn import nn
from fastbn.data import make_synthetic
from fastbn.nn import DataParallel

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()
EPOCHS = 2
BATCH = 130  # 2000 rows: 15 full batches and one of 50; shards of 130 are uneven


def build():
    ds = make_synthetic(n_train=2000, n_test=500, num_features=64, seed=5)
    model = nn.build_mlp(ds.num_features, ds.num_classes, (32, 16), rng=0)
    return ds, model, nn.Adam(model.store, lr=3e-3), nn.SoftmaxCrossEntropy()


def model_arrays(model):
    arrays = [model.store.values.copy()]
    for layer in model.layers:
        if isinstance(layer, nn.BatchNorm):
            arrays += [layer.bn.running_mean.copy(), layer.bn.running_var.copy()]
    return arrays


def main():
    ds, model, opt, loss = build()
    parallel = DataParallel(model, COMM)
    rng = np.random.default_rng(11)
    synced = []
    for _ in range(EPOCHS):
        train = nn.train_epoch(
            model, loss, opt, ds.x_train, ds.y_train, BATCH, rng, parallel=parallel
        )
        test = nn.evaluate(model, loss, ds.x_test, ds.y_test, parallel=parallel)
        synced.append(train + test)
    mine = model_arrays(model)
    everyone = COMM.gather([a.tobytes() for a in mine], root=0)
    if RANK != 0:
        return
    identical = all(theirs == everyone[0] for theirs in everyone)

    ds, model, opt, loss = build()
    rng = np.random.default_rng(11)
    single = []
    for _ in range(EPOCHS):
        train = nn.train_epoch(model, loss, opt, ds.x_train, ds.y_train, BATCH, rng)
        test = nn.evaluate(model, loss, ds.x_test, ds.y_test)
        single.append(train + test)
    reference = model_arrays(model)
    diff = max(float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(mine, reference))
    print(
        "RESULT "
        + json.dumps(
            {
                "size": COMM.Get_size(),
                "synced": synced,
                "single": single,
                "max_param_diff": diff,
                "identical_on_ranks": identical,
            }
        )
    )


if __name__ == "__main__":
    main()
