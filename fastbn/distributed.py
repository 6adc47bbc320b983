"""Synchronized BatchNorm across processes over MPI: the collectives and their maths.

This module is the shared operation behind ``comm=``: the agreement of the ranks, the
exchange of per-rank summaries and their deterministic combination (NumPy only). The
data-parallel trainer built on it (:class:`fastbn.nn.parallel.DataParallel`) lives in
:mod:`fastbn.nn`, above the public API; nothing here imports it.

With ``comm=`` (an mpi4py communicator) the training forward and the backward of
:func:`fastbn.batch_norm_forward`, :func:`fastbn.batch_norm_backward`,
:func:`fastbn.batch_norm` and :class:`fastbn.BatchNorm` normalize with the statistics of
the *global* batch, the concatenation of every rank's shard: each rank's results equal the
single-process results on that concatenation, to rounding.

What travels, per call, per BatchNorm layer (P ranks, C channels)::

    1. header   Allgather of 6 int64 per rank:
                  (status, operation, payload kind, C, dtype, values per channel)
    2. payload  Allgather of 2*C + 1 float64 per rank:
                  forward:  (mean, M2) of the local shard, per channel
                  backward: (sum dy, sum dy*(x - mean)) of the local shard, per channel
                  and a status

The header is the agreement. A rank whose local checks fail enters it with a failure
status instead of raising at once, so no rank is left waiting in the payload collective;
every rank then raises (the failing one its own error, the others a
:class:`DistributedError` naming it). Every rank compares the operation (the function or
layer method called), the payload kind (batch moments or gradient sums), C and the
dtype of ``x`` over the whole table, so ranks that make different calls raise the same
``ValueError`` instead of merging payloads of another kind. The header also carries the
shard sizes, so the "more than one value per channel" rule applies to the global batch:
a rank may hold one row, or none. A rank that fails between the two collectives (in its
kernel, in a conversion) enters the payload with a failure status, with the same
outcome. After the payload no collective follows: a rank that fails there raises alone.
A rank that never makes the call cannot be detected: the others wait, as in every
collective.

An empty global batch (every rank's shard holds 0 values per channel) has no batch
statistics. The header says so to every rank alike, so no payload follows: each rank
raises :class:`EmptyGlobalBatch`, which :func:`synchronized` catches to run the call as
the single-process call on that rank's (empty) shard: empty outputs, NaN ``mean`` and
``invstd``, zero gradients of the parameters, running statistics and the layer's state
untouched on every rank, as without ``comm`` (and as in PyTorch).

Determinism: the payload is gathered, not reduced. Every rank merges the gathered
summaries itself, in rank order, with the same NumPy expressions (Chan's formula for
moments, a left-to-right sum for gradient sums). Each of those expressions is a sequence
of correctly rounded IEEE operations with no fused multiply-add, so all ranks obtain
bitwise-identical statistics even on different CPU models, and running statistics stay
identical on every rank. An ``Allreduce`` would leave the summation order to the MPI
library.

mpi4py is never imported here: the collectives are the communicator's own methods, so
this module imports without mpi4py.
"""

import contextlib
import functools
import zlib

import numpy as np

from . import cpu

_OK = 0
_FAILED = 1

# The header: one row of int64 per rank
_STATUS, _OPERATION, _KIND, _CHANNELS, _DTYPE, _COUNT = range(6)
_HEADER = 6

# What a call's payload holds (the kind of statistics it exchanges)
MOMENTS = 1  # per channel (mean, M2) of x: the training forward
GRAD_SUMS = 2  # per channel (sum dy, sum dy * (x - mean)): the backward
# the same sums for the backward through fixed statistics (training=False): a kind of its
# own, so that ranks mixing the two backwards in one call disagree in the header
FROZEN_GRAD_SUMS = 3
_KIND_NAMES = {
    MOMENTS: "batch moments",
    GRAD_SUMS: "gradient sums",
    FROZEN_GRAD_SUMS: "gradient sums through fixed statistics",
}

# The collective this rank of a call enters next (see Sync.abort)
_NEXT_HEADER, _NEXT_PAYLOAD, _NEXT_NONE = "header", "payload", None

# Operation codes seen in this process -> names (every rank imports the same fastbn, so
# every rank knows the names of the codes the others send)
_OPERATIONS = {}


def operation_code(where):
    """A code for the operation named ``where``, the same in every process.

    Parameters
    ----------
    where : str

    Returns
    -------
    int
        CRC-32 of the name (not Python's ``hash``, which differs between processes).

    Examples
    --------
    >>> operation_code("batch_norm_forward") == operation_code("batch_norm_forward")
    True
    >>> operation_code("batch_norm_forward") != operation_code("batch_norm_backward")
    True
    """
    code = zlib.crc32(where.encode())
    _OPERATIONS.setdefault(code, where)
    return code


def _dtype_code(dtype):
    """``dtype`` as an int for the header (0: not given); byte order left out.

    Examples
    --------
    >>> import numpy as np
    >>> _dtype_name(_dtype_code(np.dtype(">f4")))
    'float32'
    """
    if dtype is None:
        return 0
    dtype = np.dtype(dtype)
    return ord(dtype.kind) * 256 + dtype.itemsize


def _dtype_name(code):
    if code == 0:
        return "unspecified"
    with contextlib.suppress(TypeError):
        return np.dtype(f"{chr(code // 256)}{code % 256}").name
    return f"dtype code {code}"


def _on_ranks(table, name_of):
    """``"A on ranks 0, 2; B on rank 1"``: the values of one header field, grouped."""
    groups = {}
    for r, row in enumerate(table):
        groups.setdefault(name_of(row), []).append(r)
    return "; ".join(
        f"{value} on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
        for value, ranks in groups.items()
    )


def _operation_name(row):
    operation = _OPERATIONS.get(row[_OPERATION], f"operation {row[_OPERATION]}")
    return f"{operation} [{_KIND_NAMES.get(row[_KIND], row[_KIND])}]"


def _differ_in_operation(table):
    """Whether the header rows of the ranks name different operations or payloads."""
    return any(row[c] != table[0][c] for row in table for c in (_OPERATION, _KIND))


def _disagreements(table):
    """What the header rows of the ranks disagree on, one phrase per field.

    Examples
    --------
    >>> ok = [0, operation_code("batch_norm_forward"), MOMENTS, 4, _dtype_code("f8"), 5]
    >>> _disagreements([ok, ok])
    []
    >>> _disagreements([ok, ok[:3] + [3] + ok[4:]])
    ['the number of channels (C=4 on rank 0; C=3 on rank 1)']
    """
    first = table[0]
    found = []
    fields = (
        ("the operation", (_OPERATION, _KIND), _operation_name),
        ("the number of channels", (_CHANNELS,), lambda row: f"C={row[_CHANNELS]}"),
        ("the dtype", (_DTYPE,), lambda row: _dtype_name(row[_DTYPE])),
    )
    for what, columns, name_of in fields:
        if any(row[c] != first[c] for row in table for c in columns):
            found.append(f"{what} ({_on_ranks(table, name_of)})")
    return found


class DistributedError(RuntimeError):
    """Another rank failed in a synchronized call; this rank raised so as not to hang.

    Attributes
    ----------
    ranks : tuple of int
        The ranks that failed.
    errors : tuple of str
        Their errors, ``"ExceptionType: message"``, in the order of ``ranks``.
    """

    def __init__(self, message, ranks=(), errors=()):
        super().__init__(message)
        self.ranks = tuple(ranks)
        self.errors = tuple(errors)


class EmptyGlobalBatch(Exception):
    """Every rank's shard of a synchronized call is empty: no batch statistics exist.

    Raised alike on every rank by :meth:`Sync.agree` (no payload collective follows) and
    caught by :func:`synchronized`, which then runs the call without ``comm`` on each
    rank: the single-process result of an empty batch. Code that drives a :class:`Sync`
    itself sees it.

    Attributes
    ----------
    ranks : int
        The number of ranks, all of them empty.
    """

    def __init__(self, where, ranks):
        super().__init__(
            f"{where}: the global batch is empty: every one of the {ranks} "
            f"ranks holds 0 values per channel"
        )
        self.ranks = ranks


def check_comm(comm):
    """Check that ``comm`` looks like an mpi4py intra-communicator.

    Parameters
    ----------
    comm : object
        Expected: ``mpi4py.MPI.Comm`` (e.g. ``MPI.COMM_WORLD``).

    Raises
    ------
    TypeError
        ``comm`` lacks the methods fastbn calls (``Get_rank``, ``Get_size``,
        ``Allgather``, ``allgather``).

    Examples
    --------
    >>> check_comm(object())
    Traceback (most recent call last):
    ...
    TypeError: comm must be an mpi4py communicator (e.g. mpi4py.MPI.COMM_WORLD), got object
    """
    if not all(hasattr(comm, name) for name in ("Get_rank", "Get_size", "Allgather", "allgather")):
        raise TypeError(
            f"comm must be an mpi4py communicator (e.g. mpi4py.MPI.COMM_WORLD), "
            f"got {type(comm).__name__}"
        )


# --------------------------------------------------------------------------------------
# Fixed-order combination of gathered per-rank summaries (pure NumPy, no MPI)
# --------------------------------------------------------------------------------------


def merge_moments(counts, means, m2s):
    """Merge per-rank ``(count, mean, M2)`` summaries in rank order (Chan et al.).

    Chan, Golub and LeVeque's pairwise formula (the GPU kernels merge their partials with
    it too), vectorized over channels::

        n     = n_a + n_b
        delta = mean_b - mean_a
        mean  = mean_a + delta * (n_b / n)
        M2    = M2_a + M2_b + delta**2 * (n_a * n_b / n)

    Ranks with a count of 0 are skipped. Plain NumPy operations (each correctly rounded,
    never contracted into an FMA) make the result a deterministic function of the inputs
    on every machine.

    Parameters
    ----------
    counts : array_like of int, shape (P,)
        Values per channel on each rank.
    means, m2s : array_like of float64, shape (P, C)
        Per-rank mean and sum of squared deviations of each channel.

    Returns
    -------
    n : int
        Total count.
    mean, m2 : ndarray of float64, shape (C,)
        Mean and M2 of the union (zeros when every count is 0).

    Examples
    --------
    >>> import numpy as np
    >>> a, b = np.array([1.0, 2.0]), np.array([3.0, 6.0, 9.0])
    >>> n, mean, m2 = merge_moments([2, 3], [[a.mean()], [b.mean()]],
    ...                             [[((a - a.mean())**2).sum()], [((b - b.mean())**2).sum()]])
    >>> n, mean.round(12), (m2 / n).round(12)
    (5, array([4.2]), array([8.56]))
    >>> x = np.concatenate([a, b]); round(float(x.mean()), 12), round(float(x.var()), 12)
    (4.2, 8.56)
    """
    means = np.asarray(means, dtype=np.float64)
    m2s = np.asarray(m2s, dtype=np.float64)
    C = means.shape[1]
    n = 0
    mean = np.zeros(C)
    m2 = np.zeros(C)
    for k, n_k in enumerate(counts):
        n_k = int(n_k)
        if n_k == 0:
            continue
        if n == 0:
            n, mean, m2 = n_k, means[k].copy(), m2s[k].copy()
            continue
        total = n + n_k
        delta = means[k] - mean
        mean = mean + delta * (n_k / total)
        m2 = m2 + m2s[k] + delta * delta * (n * n_k / total)
        n = total
    return n, mean, m2


def sum_in_order(parts):
    """Sum the rows of ``parts`` left to right (row 0 + row 1 + ...), elementwise.

    Unlike an MPI ``Allreduce`` (whose order the library chooses) or ``numpy.sum``
    (pairwise), the order is fixed, so every rank that sums the same gathered rows gets
    the same bits.

    Parameters
    ----------
    parts : ndarray, shape (P, ...)

    Returns
    -------
    ndarray, shape parts.shape[1:]

    Examples
    --------
    >>> import numpy as np
    >>> sum_in_order(np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    array([ 9., 12.])
    """
    total = np.array(parts[0], copy=True)
    for k in range(1, parts.shape[0]):
        total += parts[k]
    return total


# --------------------------------------------------------------------------------------
# One synchronized call
# --------------------------------------------------------------------------------------


class Sync:
    """A communicator seen by one synchronized call: its collectives and error agreement.

    fastbn's API creates one per call (see :func:`synchronized`); users pass the mpi4py
    communicator itself as ``comm=``. A call makes one *exchange*, two collectives:

    1. the header (:meth:`agree`): every rank's status, operation, payload kind, C,
       dtype and shard size. Every rank checks that all agree, with the same table, so
       every rank raises the same error when they do not;
    2. the payload: every rank's ``2 * C`` float64 summary plus a status slot, so that a
       rank that fails between the two collectives (in its kernel, in a conversion) still
       enters the payload and every rank learns it there.

    A rank that fails before its header enters it as a failed rank (:meth:`abort`, called
    by :func:`synchronized`). After the payload no collective follows in the call: a
    rank that fails there (in the normalization, in ``dx``) raises alone, and the others
    hold correct results.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm
    where : str
        Name of the call (the operation), for the agreement and for messages.

    Attributes
    ----------
    rank, size : int
    operation : int
        Code of ``where`` (:func:`operation_code`), carried in the header.
    count : int or None
        Values per channel in the global batch, after :meth:`moments` or
        :meth:`grad_sums`.

    Examples
    --------
    >>> from mpi4py import MPI                                  # doctest: +SKIP
    >>> import numpy as np                                      # doctest: +SKIP
    >>> sync = Sync(MPI.COMM_WORLD, "example")                  # doctest: +SKIP
    >>> mean, var = sync.moments(np.ones((4, 3, 1)))            # doctest: +SKIP
    >>> sync.count == 4 * sync.size                             # doctest: +SKIP
    True
    """

    def __init__(self, comm, where):
        check_comm(comm)
        self.comm = comm
        self.where = where
        self.operation = operation_code(where)
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.count = None
        self._next = _NEXT_HEADER
        self._channels = 0
        self._result = None

    @property
    def started(self):
        """True once this call entered its header collective."""
        return self._next != _NEXT_HEADER

    # -- error agreement ---------------------------------------------------------------

    def agree(self, channels, count, kind=MOMENTS, dtype=None):
        """Header collective: exchange and compare what every rank is about to do.

        Parameters
        ----------
        channels : int
            C on this rank.
        count : int
            Values per channel on this rank (may be 0).
        kind : int, default MOMENTS
            What the payload will hold (:data:`MOMENTS` or :data:`GRAD_SUMS`).
        dtype : numpy.dtype, optional
            The dtype of the call's input (``x``).

        Returns
        -------
        list of int, length P
            Values per channel on every rank.

        Raises
        ------
        DistributedError
            Another rank failed before the header (it raises its own error).
        ValueError
            The ranks disagree on the operation, the payload kind, the number of
            channels or the dtype, or (``MOMENTS``) the global batch holds exactly one
            value per channel; every rank raises the same error.
        EmptyGlobalBatch
            Every rank holds 0 values per channel (raised on every rank; no payload
            follows, :func:`synchronized` runs the call without ``comm``).
        """
        header = np.array(
            [_OK, self.operation, kind, channels, _dtype_code(dtype), count], dtype=np.int64
        )
        # Python lists: for the few ranks of a typical job, cheaper than NumPy calls
        # (from here until the payload, errors are raised alike: abort() does nothing)
        table = self._allgather_header(header).tolist()
        failed = [r for r, row in enumerate(table) if row[_STATUS] != _OK]
        if failed:
            self._raise_failures(failed, "before the header collective")
        disagreements = _disagreements(table)
        if disagreements:
            # the same text on every rank: named after the operation only when all agree
            where = "synchronized BatchNorm" if _differ_in_operation(table) else self.where
            raise ValueError(
                f"{where}: the {self.size} ranks of a synchronized call "
                f"must make the same call on the same kind of data; they "
                f"disagree on {'; '.join(disagreements)} (every rank raises "
                f"this error)"
            )
        counts = [row[_COUNT] for row in table]
        if not any(counts):  # every rank sees it: none enters the payload
            raise EmptyGlobalBatch(self.where, self.size)
        if kind == MOMENTS:
            self._check_global_count(counts)
        self._channels = channels
        self._next = _NEXT_PAYLOAD
        return counts

    def abort(self, exc):
        """Enter the collective this rank owes the others as a failed rank, so none hangs.

        Called (by :func:`synchronized`) with the exception this rank is about to raise.
        Before the header: enters the header with a failure status. Between the header
        and the payload: enters the payload with a failure status. Otherwise (an error
        every rank raises alike, or one after the payload) it does nothing.

        Parameters
        ----------
        exc : BaseException
        """
        if self._next == _NEXT_HEADER:
            self._allgather_header(np.array([_FAILED, self.operation, 0, -1, 0, 0], dtype=np.int64))
        elif self._next == _NEXT_PAYLOAD:
            self._allgather_payload(np.zeros(2 * self._channels), _FAILED)
        else:
            return
        self._next = _NEXT_NONE
        self.comm.allgather(f"{type(exc).__name__}: {exc}")

    def _allgather_header(self, header):
        self._next = _NEXT_NONE
        table = np.empty((self.size, _HEADER), dtype=np.int64)
        self.comm.Allgather(header, table)
        return table

    def _allgather_payload(self, values, status=_OK):
        """Payload collective: ``values`` (float64, ``2 * C``) and a status from every
        rank; returns the ``(P, 2 * C)`` table, or raises when a rank failed."""
        self._next = _NEXT_NONE
        buf = np.empty(values.size + 1)
        buf[:-1] = values
        buf[-1] = status
        table = np.empty((self.size, buf.size))
        self.comm.Allgather(buf, table)
        if status == _OK:
            failed = np.flatnonzero(table[:, -1] != _OK).tolist()
            if failed:
                self._raise_failures(failed, "after the header collective")
        return table[:, :-1]

    def _raise_failures(self, ranks, when):
        errors = self.comm.allgather(None)
        details = "; ".join(f"rank {r}: {errors[r]}" for r in ranks)
        raise DistributedError(
            f"{self.where} failed on rank{'s' if len(ranks) > 1 else ''} "
            f"{', '.join(map(str, ranks))} of {self.size} {when} ({details}); rank "
            f"{self.rank} raises too, so that no rank waits forever in a collective",
            ranks,
            [errors[r] for r in ranks],
        )

    def _exchange(self, kind, C, n_local, local, dtype, has_values=None):
        """Header, this rank's summary, payload: the ``(P, 2, C)`` table and the counts.

        ``n_local`` is the count the header carries; ``local`` is computed when
        ``has_values`` (default: ``n_local > 0``).

        A call exchanges once: a second request of the same reduction returns the first
        result without communicating (only some ranks may ask twice, e.g. ``batch_norm``
        with ``on_nonfinite="warn"`` and an ``out``).
        """
        if self._result is not None:
            if self._result[0] != kind or self._result[1] != C:
                raise RuntimeError(
                    f"{self.where}: a synchronized call exchanges once; "
                    f"it cannot ask for another reduction"
                )
            return self._result[2]
        counts = self.agree(C, n_local, kind, dtype)
        values = np.zeros(2 * C)
        if n_local if has_values is None else has_values:  # a failure: payload as failed
            first, second = local() if callable(local) else local
            values[:C] = first
            values[C:] = second
        table = self._allgather_payload(values).reshape(self.size, 2, C)
        self._result = (kind, C, (counts, table))
        return counts, table

    # -- the synchronized reductions ---------------------------------------------------

    def moments(self, x3, dtype=None):
        """Global per-channel mean and biased variance of every rank's ``x3``.

        Two collectives: the header, then an Allgather of the local ``(mean, M2)``
        (``2 * C`` float64 and a status), merged in rank order by :func:`merge_moments`.

        Parameters
        ----------
        x3 : ndarray, shape (outer, C, inner), float32 or float64, C-contiguous
            This rank's shard in the canonical view; ``outer * inner`` may be 0.
        dtype : numpy.dtype, optional
            The dtype of the caller's ``x`` (default ``x3.dtype``), agreed on by the ranks.

        Returns
        -------
        mean, var : ndarray of float64, shape (C,)
            Bitwise identical on every rank. Sets :attr:`count`.

        Raises
        ------
        ValueError
            The global batch has exactly 1 value per channel (on every rank).
        EmptyGlobalBatch
            The global batch has no value per channel (on every rank).
        """
        outer, C, inner = x3.shape
        return self.moments_from_local(
            C, outer * inner, lambda: cpu.moments(x3), dtype=x3.dtype if dtype is None else dtype
        )

    def moments_from_local(self, C, n_local, local, dtype=None):
        """:meth:`moments` from this rank's own summary, wherever it was computed.

        The GPU path computes ``local`` on the device before calling this (only the
        ``2 * C`` float64 values are staged on the host).

        Parameters
        ----------
        C : int
            Channels.
        n_local : int
            Values per channel on this rank (may be 0).
        local : callable or tuple
            ``(mean, M2)`` of this rank's shard (float64, shape ``(C,)``), or a callable
            returning it (called after the header, only when ``n_local > 0``; if it
            raises, this rank enters the payload as failed and the others raise
            :class:`DistributedError`).
        dtype : numpy.dtype, optional
            The dtype of the caller's ``x``, agreed on by the ranks.

        Returns
        -------
        mean, var : ndarray of float64, shape (C,)
            Bitwise identical on every rank. Sets :attr:`count`.
        """
        counts, table = self._exchange(MOMENTS, C, n_local, local, dtype)
        n, mean, m2 = merge_moments(counts, table[:, 0], table[:, 1])
        self.count = n
        return mean, m2 / n

    def grad_sums(self, dy3, x3, coef, relu, dtype=None):
        """Global per-channel ``sum dy`` and ``sum dy * (x - mean)`` over every rank.

        Two collectives: the header, then an Allgather of the local sums (``2 * C``
        float64 and a status), added in rank order by :func:`sum_in_order`.

        Parameters
        ----------
        dy3, x3 : ndarray, shape (outer, C, inner), same dtype, C-contiguous
        coef : ndarray, shape (4, C)
            Coefficients of the (global) saved statistics.
        relu : bool
        dtype : numpy.dtype, optional
            The dtype of the caller's ``x`` (default ``x3.dtype``), agreed on by the ranks.

        Returns
        -------
        sum_dy, sum_dy_xmu : ndarray of float64, shape (C,)
            Bitwise identical on every rank. Sets :attr:`count`.
        """
        outer, C, inner = x3.shape
        return self.grad_sums_from_local(
            C,
            outer * inner,
            lambda: cpu.grad_sums(dy3, x3, coef, relu),
            dtype=x3.dtype if dtype is None else dtype,
        )

    def grad_sums_from_local(self, C, n_local, local, dtype=None, kind=GRAD_SUMS, count=None):
        """:meth:`grad_sums` from this rank's own sums, wherever they were computed.

        Parameters
        ----------
        C, n_local : int
            Channels; values per channel on this rank (may be 0).
        local : callable or tuple
            ``(sum dy, sum dy * (x - mean))`` of this rank's shard (float64, shape
            ``(C,)``), or a callable returning it (called after the header, only when
            ``n_local > 0``; see :meth:`moments_from_local`).
        dtype : numpy.dtype, optional
            The dtype of the caller's ``x``, agreed on by the ranks.
        kind : int, default GRAD_SUMS
            :data:`GRAD_SUMS` (the training backward) or :data:`FROZEN_GRAD_SUMS` (the
            backward through fixed statistics), agreed on by the ranks.
        count : int, optional
            The values per channel of this rank that entered the forward's statistics,
            when not all did (``mask=``; default ``n_local``): :attr:`count` is their
            sum over the ranks, the sums are still those of every value.

        Returns
        -------
        sum_dy, sum_dy_xmu : ndarray of float64, shape (C,)
            Bitwise identical on every rank. Sets :attr:`count`.
        """
        header_count = n_local if count is None else count
        counts, table = self._exchange(kind, C, header_count, local, dtype, n_local > 0)
        total = sum_in_order(table)
        self.count = sum(counts)
        return total[0], total[1]

    def _check_global_count(self, counts):
        m = sum(counts)
        if m == 1:
            raise ValueError(
                f"{self.where}: training needs more than 1 value per channel "
                f"in the global batch, got 1 (values per channel on ranks "
                f"0..{self.size - 1}: {counts})"
            )
        return m


def synchronized(where, when=None):
    """Decorator: give a function a ``comm=`` keyword with error agreement.

    With ``comm=None`` the function runs as before (it receives ``comm=None``). With a
    communicator it receives a fresh :class:`Sync` as ``comm``; if it raises before its
    header collective, or between the header and the payload, the wrapper enters the
    collective the others wait in as a failed rank (:meth:`Sync.abort`) and re-raises, so
    the other ranks raise a :class:`DistributedError` instead of waiting forever. The
    header carries ``where`` as the operation: every rank of a call must make the same.

    When the header shows an empty global batch (:class:`EmptyGlobalBatch`, raised on
    every rank alike before anything is written), the function runs again with
    ``comm=None`` on each rank: an empty batch is the same call with or without ``comm``
    (empty outputs, NaN statistics, zero parameter gradients, state untouched).

    Parameters
    ----------
    where : str
        Name used in error messages.
    when : callable, optional
        ``when(kwargs) -> bool``: whether this call is collective (e.g. only in
        training). It must depend only on arguments that are the same on every rank.
        When False the function receives ``comm=None``.

    Returns
    -------
    callable

    Examples
    --------
    >>> @synchronized("double")
    ... def double(x, *, comm=None):
    ...     return 2 * x
    >>> double(3)
    6
    """
    operation_code(where)  # known by name on every rank, for the agreement's messages

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, comm=None, **kwargs):
            if comm is None or (when is not None and not when(kwargs)):
                return fn(*args, comm=None, **kwargs)
            sync = Sync(comm, where)
            try:
                return fn(*args, comm=sync, **kwargs)
            except EmptyGlobalBatch:
                pass  # every rank raised it after the header: no collective is owed
            except Exception as exc:
                sync.abort(exc)
                raise
            return fn(*args, comm=None, **kwargs)

        return wrapper

    return decorate
