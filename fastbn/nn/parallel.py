"""Data-parallel training over MPI: the trainer's epoch loop, sharded.

:class:`DataParallel` is the hook that :func:`fastbn.nn.train_epoch` and
:func:`fastbn.nn.evaluate` take as ``parallel=``: it shards every global batch
(:meth:`DataParallel.shard`), sums the gradients over the ranks after the backward
(:meth:`DataParallel.reduce_gradients`) and the epoch's loss and accuracy totals at the
end (:meth:`DataParallel.reduce_totals`). The loop itself is the single-process one.
BatchNorm is synchronized by the core (``comm=`` on :class:`fastbn.BatchNorm`, see
:mod:`fastbn.distributed`); this module only points the model's BatchNorm layers at the
communicator.

mpi4py, an optional dependency (fastbn's ``mpi`` extra), is imported by the
functions that need its constants, so ``import fastbn.nn`` works without it.
"""

import numpy as np

from .. import distributed
from .layers import BatchNorm

__all__ = ["DataParallel", "shard_bounds", "allreduce_mean", "broadcast_arrays"]


def shard_bounds(n, rank, size):
    """Rows ``[start, stop)`` of a batch of ``n`` rows that rank ``rank`` of ``size`` holds.

    Contiguous shards in rank order; the first ``n % size`` ranks hold one row more, so
    concatenating the shards in rank order gives the batch back. A rank may get 0 rows
    when ``n < size``.

    Parameters
    ----------
    n, rank, size : int

    Returns
    -------
    tuple of int

    Raises
    ------
    ValueError
        Not ``0 <= rank < size``.

    Examples
    --------
    >>> [shard_bounds(10, r, 4) for r in range(4)]
    [(0, 3), (3, 6), (6, 8), (8, 10)]
    """
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"need 0 <= rank < size, got rank={rank}, size={size}")
    base, extra = divmod(int(n), size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def allreduce_mean(comm, arrays):
    """Average arrays over all ranks, in place, in one ``Allreduce`` of one packed buffer.

    The arrays are packed into one contiguous float64 buffer (one collective, however
    many arrays; float64 so that the sum over ranks does not add rounding of its own),
    summed, divided by the number of ranks and written back in each array's dtype.
    Host (NumPy) arrays only.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm
    arrays : sequence of ndarray
        Updated in place; None entries are skipped.

    Examples
    --------
    >>> from mpi4py import MPI                                  # doctest: +SKIP
    >>> import numpy as np                                      # doctest: +SKIP
    >>> g = np.full(3, float(MPI.COMM_WORLD.rank))              # doctest: +SKIP
    >>> allreduce_mean(MPI.COMM_WORLD, [g])                     # doctest: +SKIP
    """
    from mpi4py import MPI

    distributed.check_comm(comm)
    arrays = [a for a in arrays if a is not None]
    if not arrays:
        return
    sizes = [a.size for a in arrays]
    buffer = np.empty(sum(sizes))
    offset = 0
    for a, k in zip(arrays, sizes):
        buffer[offset : offset + k] = a.ravel()
        offset += k
    comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
    buffer /= comm.Get_size()
    offset = 0
    for a, k in zip(arrays, sizes):
        a[...] = buffer[offset : offset + k].reshape(a.shape)
        offset += k


def broadcast_arrays(comm, arrays, root=0):
    """Overwrite ``arrays`` on every rank with their values on ``root`` (in place).

    Used once before data-parallel training so every rank starts from the same
    parameters, whatever its random seed.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm
    arrays : sequence of ndarray
        C-contiguous host arrays, the same shapes and dtypes on every rank; None entries
        are skipped.
    root : int, default 0

    Raises
    ------
    ValueError
        An array is not C-contiguous.

    Examples
    --------
    >>> from mpi4py import MPI                                  # doctest: +SKIP
    >>> import numpy as np                                      # doctest: +SKIP
    >>> w = np.full(2, float(MPI.COMM_WORLD.rank))              # doctest: +SKIP
    >>> broadcast_arrays(MPI.COMM_WORLD, [w]); w                # doctest: +SKIP
    array([0., 0.])
    """
    distributed.check_comm(comm)
    for a in arrays:
        if a is None:
            continue
        if not a.flags.c_contiguous:
            raise ValueError("broadcast_arrays needs C-contiguous arrays")
        comm.Bcast(a, root=root)


class DataParallel:
    """Data-parallel training of a :class:`fastbn.nn.Sequential` (host arrays) over MPI.

    Every rank holds the whole model and the whole dataset, draws the same shuffle, and
    takes its shard (:func:`shard_bounds`) of every global batch. Pass it as
    ``parallel=`` to :func:`fastbn.nn.train_epoch` (and :func:`fastbn.nn.evaluate`); per
    step the trainer's loop then runs

    - forward with synchronized BatchNorm (statistics of the global batch),
    - the loss gradient scaled by ``1 / global batch size`` (the gradient of the global
      mean loss, whatever the shard sizes),
    - backward (BatchNorm's ``dgamma``/``dbeta`` come out global already),
    - :meth:`reduce_gradients`: one ``Allreduce`` (sum, float64) of the flat gradient
      array; BatchNorm entries are zeroed on every rank but 0 first, so they pass
      through exactly,
    - the optimizer step, identical on every rank.

    The parameters therefore follow the single-process run with the same global batch,
    to rounding. Creating it points every BatchNorm layer of the model at ``comm`` and
    broadcasts rank 0's parameters and running statistics (a collective: every rank
    creates it).

    Parameters
    ----------
    model : fastbn.nn.Sequential
        On the CPU (``device="cpu"``).
    comm : mpi4py.MPI.Comm

    Attributes
    ----------
    model : fastbn.nn.Sequential
    comm : mpi4py.MPI.Comm
    rank, size : int
    global_grads : ndarray of bool, shape (model.store.size,)
        Gradient entries that are already global (synchronized BatchNorm parameters).

    Raises
    ------
    TypeError
        ``comm`` is not an mpi4py communicator.
    ValueError
        The model is not on the CPU: its gradients would need an Allreduce of device
        arrays (a CUDA-aware MPI). The functions and the layer do take ``comm=`` with
        CUDA arrays (docs/distributed.md).

    Examples
    --------
    >>> from mpi4py import MPI                                        # doctest: +SKIP
    >>> import numpy as np                                            # doctest: +SKIP
    >>> from fastbn import nn                                         # doctest: +SKIP
    >>> from fastbn.data import make_synthetic                        # doctest: +SKIP
    >>> ds = make_synthetic(n_train=512, n_test=64)                   # doctest: +SKIP
    >>> model = nn.build_mlp(ds.num_features, ds.num_classes, (16,), rng=0)  # doctest: +SKIP
    >>> parallel = DataParallel(model, MPI.COMM_WORLD)                # doctest: +SKIP
    >>> opt, loss = nn.Adam(model.store, lr=1e-2), nn.SoftmaxCrossEntropy()  # doctest: +SKIP
    >>> nn.train_epoch(model, loss, opt, ds.x_train, ds.y_train, 64,
    ...                np.random.default_rng(0), parallel=parallel)   # doctest: +SKIP
    """

    def __init__(self, model, comm):
        distributed.check_comm(comm)
        if model.xp is not np:
            raise ValueError(
                f"DataParallel trains host models only (device='cpu'), got a "
                f"model on device={model.device!r}: its gradient Allreduce "
                f"would need device buffers (a CUDA-aware MPI); the functions "
                f"and fastbn.BatchNorm do take comm= with CUDA arrays (see "
                f"docs/distributed.md)"
            )
        self.model = model
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        norms = [layer for layer in model.layers if isinstance(layer, BatchNorm)]
        for layer in norms:
            layer.bn.comm = comm
        # The BatchNorm layers' gradients are views into the flat gradient array: mark
        # the parameters whose views they are.
        synced = {id(grad) for layer in norms for grad in (layer.gamma_grad, layer.beta_grad)}
        self.global_grads = np.zeros(model.store.size, dtype=bool)
        offset = 0
        for p in model.store:
            if id(p.grad) in synced:
                self.global_grads[offset : offset + p.grad.size] = True
            offset += p.grad.size
        self._buffer = np.empty(model.store.size)
        # Same starting point on every rank, whatever each rank's seed was.
        running = [a for layer in norms for a in (layer.bn.running_mean, layer.bn.running_var)]
        broadcast_arrays(comm, [model.store.values] + running)
        counts = comm.bcast([layer.bn.num_batches_tracked for layer in norms], root=0)
        for layer, n in zip(norms, counts):
            layer.bn.num_batches_tracked = n

    def bounds(self, n):
        """Rows ``[start, stop)`` of ``n`` rows that this rank holds (:func:`shard_bounds`)."""
        return shard_bounds(n, self.rank, self.size)

    def shard(self, rows):
        """This rank's part of a global batch.

        Parameters
        ----------
        rows : array, shape (n, ...)
            The batch's row indices (or rows), the same on every rank.

        Returns
        -------
        array
            A view: rows ``bounds(n)`` of ``rows`` (may be empty).
        """
        start, stop = self.bounds(rows.shape[0])
        return rows[start:stop]

    def reduce_gradients(self):
        """Sum ``model.store.grads`` over all ranks, in place (one ``Allreduce``).

        Dense gradients are per-shard partial sums of the global-mean-loss gradient, so
        their sum is the global gradient; synchronized BatchNorm gradients are global
        already and are contributed by rank 0 alone (the others send zeros), which adds
        no rounding.
        """
        from mpi4py import MPI

        grads = self.model.store.grads
        buffer = self._buffer
        buffer[...] = grads
        if self.rank != 0:
            buffer[self.global_grads] = 0.0
        self.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
        grads[...] = buffer

    def reduce_totals(self, totals):
        """Sum per-rank totals (the loss sum and hit count of an epoch) over all ranks.

        Parameters
        ----------
        totals : ndarray of float64
            Host array, updated in place; the same values on every rank afterwards.
        """
        from mpi4py import MPI

        self.comm.Allreduce(MPI.IN_PLACE, totals, op=MPI.SUM)
