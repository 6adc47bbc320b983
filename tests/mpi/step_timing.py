"""Time data-parallel training steps and the collectives they use (docs/distributed.md).

Run as ``mpiexec -n P python tests/mpi/step_timing.py [--batch B] [--steps K]`` (also with
P = 1, which runs without MPI collectives: the single-process baseline). Not a test:
pytest does not collect it. Rank 0 prints one line ``RESULT <json>`` with

- ``step_ms``: median time of one training step of the default MLP
  (784-64-BN-32-BN-10, Adam) at global batch ``B``, over ``K`` steps after warm-up;
- ``grad_allreduce_ms``: median time of the step's gradient Allreduce (52 842 float64);
- ``bn_sync_us``: median time of one synchronized BatchNorm forward + backward on a
  ``(B / P, C)`` shard, and of the same call without ``comm``, for C in 64, 256, 1024;
- ``allgather_us``: median time of an Allgather of 3 int64 and of 2*C float64 per rank.
"""

import argparse
import json
import time

import numpy as np
from mpi4py import MPI

import fastbn
from fastbn import nn
from fastbn.nn.parallel import DataParallel, shard_bounds

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()


def median_time(fn, repeat):
    times = []
    for _ in range(repeat):
        COMM.Barrier()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    # the slowest rank decides: collectives finish together, compute may not
    slowest = np.empty(len(times))
    COMM.Allreduce(np.array(times), slowest, op=MPI.MAX)
    return float(np.median(slowest))


def training_step(batch, steps):
    rng = np.random.default_rng(0)
    x = rng.random((batch * 8, 784), dtype=np.float32)
    y = rng.integers(0, 10, batch * 8)
    model = nn.build_mlp(rng=0)
    opt = nn.Adam(model.store)
    parallel = DataParallel(model, COMM) if SIZE > 1 else None
    first, stop = shard_bounds(batch, RANK, SIZE)
    acc = np.zeros(2)
    from fastbn.nn import _ops

    ops = _ops.ops_for(np)
    state = {"i": 0}

    def step():
        start = (state["i"] % 8) * batch
        state["i"] += 1
        xb, yb = x[start + first : start + stop], y[start + first : start + stop]
        logits = model.forward(xb, True)
        grad = np.empty_like(logits)
        ops.softmax_cross_entropy(logits, yb, grad, 1.0 / batch, acc)
        model.backward(grad)
        if parallel is not None:
            parallel.reduce_gradients()
        opt.step()

    for _ in range(10):
        step()
    step_s = median_time(step, steps)
    reduce_s = median_time(parallel.reduce_gradients, steps) if parallel else 0.0
    return step_s, reduce_s, model.store.size


def bn_sync(batch, repeat):
    out = {}
    first, stop = shard_bounds(batch, RANK, SIZE)
    for C in (64, 256, 1024):
        rng = np.random.default_rng(C)
        x = rng.standard_normal((stop - first, C)).astype(np.float32)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        g, b = np.ones(C, np.float32), np.zeros(C, np.float32)

        def call(comm, x=x, dy=dy, g=g, b=b):
            y, mean, invstd = fastbn.batch_norm_forward(x, g, b, comm=comm)
            fastbn.batch_norm_backward(dy, x, mean, invstd, g, b, comm=comm)

        call(COMM)
        call(None)
        out[C] = {
            "synced": median_time(lambda: call(COMM), repeat) * 1e6,
            "local": median_time(lambda: call(None), repeat) * 1e6,
        }
    return out


def allgather(repeat):
    out = {}
    # The agreement's header (6 int64) and payload (2 C + 1 float64) per rank.
    header = np.zeros(6, np.int64)
    table = np.empty((SIZE, 6), np.int64)
    out["header_6xint64"] = median_time(lambda: COMM.Allgather(header, table), repeat) * 1e6
    for C in (64, 256, 1024):
        local = np.zeros(2 * C + 1)
        gathered = np.empty((SIZE, 2 * C + 1))
        out[f"payload_2x{C}+1xfloat64"] = (
            median_time(
                lambda local=local, gathered=gathered: COMM.Allgather(local, gathered), repeat
            )
            * 1e6
        )
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    step_s, reduce_s, n_params = training_step(args.batch, args.steps)
    result = {
        "ranks": SIZE,
        "batch": args.batch,
        "step_ms": step_s * 1e3,
        "grad_allreduce_ms": reduce_s * 1e3,
        "parameters": n_params,
        "bn_sync_us": bn_sync(args.batch, args.steps),
        "allgather_us": allgather(args.steps),
    }
    if RANK == 0:
        print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
