"""CPU kernels: Numba ``prange`` loops over the canonical ``(outer, C, inner)`` view.

Every kernel here receives C-contiguous arrays already checked and shaped by
:mod:`fastbn.api`; kernels only compute. There are two kernel families:

- **strided** (``inner > 1``, e.g. NCHW): a channel is ``outer`` contiguous runs of
  ``inner`` elements. Its ``m = outer * inner`` values are split into chunks of ``L``
  consecutive values (in ``(o, i)`` order), and work items are ``(channel, chunk)`` pairs.
- **rows** (``inner == 1``, e.g. ``(N, C)`` and NHWC): channels are contiguous in memory.
  The ``outer`` rows are split into chunks of whole rows; each item reduces all channels
  of its rows at once, vectorized across channels. The elementwise passes, which need no
  fixed partition, take one row per item.

Determinism: chunk sizes depend only on the shape and dtype (``_config.CHUNK_BYTES``),
each chunk is reduced by one thread in a fixed order, and chunk partials are merged per
channel in chunk order. The thread count changes who computes a chunk, never what is
computed, so results are bitwise identical for every ``numba.set_num_threads`` value.

Accuracy: statistics accumulate in float64. Each chunk (which fits in L2) is summarized
as a shift, the deviation of its mean from the shift and its sum of squared deviations,
in one pass shifted by the chunk's first value (rows: its first row), with a fallback to
the corrected two-pass algorithm, from cache, when that value is an outlier. A channel's
chunks are merged through their pooled mean, relative to the
first chunk's shift (``M2 = sum(M2_k + n_k (mean_k - mean)^2)``, no negative term). There
is no ``E[x^2] - E[x]^2`` cancellation, so data with a large offset (``1e4 + randn``)
keeps full float32 accuracy, and float64 data keeps float64 accuracy.

The normalization subtracts the float64 mean as a hi + lo pair of the data's dtype, so
``x - mean`` is exact to the last bit of the data's precision even when the mean does
not fit in float32.

Each driver is written for one family and compiled twice from one source: a
``parallel=True`` build and a serial build for calls too small to pay for a parallel
region (``_config.SERIAL_BYTES``). A call compiles only the build it runs, and helpers
are inlined into their callers where the options allow: compilation, not computation,
is what a process's first call waits for (docs/cpu.md, "Compile time").
"""

import functools
import types
from typing import NamedTuple

import numba
import numpy as np
from numba import prange

from . import _config
from ._config import njit

# The three option sets of the CPU kernels (fastbn._config says why each exists).
_REDUCE = _config.JIT_OPTIONS
_ELEMENTWISE = _config.ELEMENTWISE_JIT_OPTIONS
_EXACT = _config.EXACT_JIT_OPTIONS

# Helpers compiled as part of each caller (Numba inlines their IR) rather than each on
# its own: every separately compiled function costs its own typing, optimization and
# machine code, and its caller optimizes and emits its code again (docs/cpu.md, "Compile
# time"). Inlined code takes the caller's options, so only helpers whose every caller
# has their option set are inlined: the reductions' per-item helpers (called by the
# drivers, which take _REDUCE) and the integer-only index helpers (fast-math flags
# apply to floating-point operations only). Not the helpers called from several places
# in one caller: Numba runs its front end on an inlined helper once per call site. Nor
# the helpers that hold a reduction loop: with ``reassoc``, how LLVM vectorizes the loop
# (hence the order of the sum, hence its last bits) depends on the code around it, and
# inlined its results changed.
_INLINE_REDUCE = dict(_REDUCE, inline="always")
_INLINE_INTEGER = dict(_EXACT, inline="always")


def _inlined(helper, options):
    """An ``inline="always"`` twin of ``helper``, compiled with ``options`` (its own).

    A helper that callers of another option set call too must stay a separately compiled
    function (inlined, it would take their options); callers of its own set call the
    twin, which is compiled as part of them (see ``_INLINE_REDUCE``).
    """
    return njit(inline="always", **options)(helper.py_func)


# Values per work item of the strided elementwise passes (normalize, dx): enough to
# amortize the loop overhead, small enough to balance threads. Partition does not affect
# results.
_ELEMENTWISE_CHUNK = _config.ELEMENTWISE_CHUNK

# Channels per work item of the merges of chunk partials (see :func:`_merge_chunks`).
_MERGE_BLOCK = _config.MERGE_BLOCK

# Rows of the coefficient table ``coef`` (shape (4, C), the data's dtype) that every
# normalizing kernel reads: y = ((x - MEAN_HI) - MEAN_LO) * SCALE + SHIFT.
MEAN_HI, MEAN_LO, SCALE, SHIFT = 0, 1, 2, 3


# --------------------------------------------------------------------------------------
# Per-item helpers (one thread, one chunk). Shared by every driver below.
# --------------------------------------------------------------------------------------


@njit(**_INLINE_INTEGER)
def _chunk_span(k, chunk, runs, outer, inner):
    """Where chunk ``k`` of a strided channel lies: ``(o0, o1, i_first, i_last)``.

    The chunk holds the channel's flat values ``[k * chunk, (k + 1) * chunk)`` (the last
    one fewer), in ``(o, i)`` order: rows ``o0 <= o < o1`` of the ``(outer, C, inner)``
    view, the first from offset ``i_first``, the last up to ``i_last``, the others whole.

    Parameters
    ----------
    k, chunk : int
        Chunk index and values per chunk.
    runs : int
        ``chunk // inner`` when chunks are whole runs (``inner`` divides ``chunk``), else
        0. Whole-run chunks, the rule for short runs, need no division here: this is
        computed for every work item, and short runs make many small items.
    outer, inner : int

    Returns
    -------
    tuple of int
    """
    if runs:
        o0 = k * runs
        return o0, min(o0 + runs, outer), 0, inner
    j0 = k * chunk
    j1 = min(j0 + chunk, outer * inner)
    o0 = j0 // inner
    o1 = (j1 - 1) // inner + 1
    return o0, o1, j0 - o0 * inner, j1 - (o1 - 1) * inner


@njit(**_INLINE_INTEGER)
def _whole_runs(chunk, inner):
    """``chunk // inner`` when ``inner`` divides ``chunk``, else 0 (see :func:`_chunk_span`)."""
    return chunk // inner if chunk % inner == 0 else 0


@njit(**_INLINE_INTEGER)
def _chunk_run(o, o0, o1, i_first, i_last, C, c, inner):
    """Row ``o`` of a strided chunk (see :func:`_chunk_span`) in the flat array:
    ``(base, i0, i1)``, the flat offset of the run of channel ``c`` and the range of
    its values in the chunk, as unsigned integers (no wraparound checks in the loops)."""
    return (
        np.uint64((o * C + c) * inner),
        np.uint64(i_first if o == o0 else 0),
        np.uint64(i_last if o == o1 - 1 else inner),
    )


@njit(**_REDUCE)
def _shifted_sums_strided(x1, C, inner, c, o0, o1, i_first, i_last, k):
    """``(sum(x - k), sum((x - k)**2))`` in float64 over one chunk of channel ``c``.

    ``x1`` is the flat ``(outer, C, inner)`` array; the chunk is rows ``o0 <= o < o1``,
    the first from offset ``i_first``, the last up to ``i_last`` (see
    :func:`_chunk_span`). Flat unsigned offsets, not a slice per run: with short runs
    (small H*W) building the slices cost as much as the arithmetic.

    Returns
    -------
    tuple of float
    """
    s = 0.0
    q = 0.0
    for o in range(o0, o1):
        base, i0, i1 = _chunk_run(o, o0, o1, i_first, i_last, C, c, inner)
        for i in range(i0, i1):
            d = np.float64(x1[base + i]) - k
            s += d
            q += d * d
    return s, q


@njit(**_INLINE_REDUCE)
def _chunk_moments_strided(x1, C, inner, c, o0, o1, i_first, i_last):
    """Summary ``(shift, dev, m2)`` of channel ``c`` over one chunk (see :func:`_merge_chunks`).

    One pass in float64, shifted by ``K``, the chunk's first value: with ``d = x - K``,
    ``S = sum(d)`` and ``Q = sum(d**2)``, the chunk's mean is ``K + S / n`` (kept as the
    pair ``shift = K``, ``dev = S / n``, which carries the mean beyond float64 precision)
    and ``m2 = Q - S**2 / n``. ``Q = m2 + n (mean - K)**2`` and ``K`` is a sample of the
    channel, so ``Q`` is typically about ``2 m2``: the subtraction loses a bit or so, never
    the ``E[x^2] - E[x]^2`` cancellation of unshifted sums. Where ``Q > 16 m2`` (``K`` an
    outlier) or a sum is not finite, the chunk (in cache) is reduced again by the
    corrected two-pass algorithm: ``K`` becomes the plain mean. The choice depends on the
    data only, never on the threads.

    Parameters
    ----------
    x1 : ndarray, 1-D
        The flat ``(outer, C, inner)`` array.
    C, inner : int
    c : int
        Channel.
    o0, o1, i_first, i_last : int
        The chunk (see :func:`_chunk_span`).

    Returns
    -------
    tuple of float
        ``(shift, dev, m2)``.
    """
    n = (o1 - o0) * inner - i_first - (inner - i_last)
    k = np.float64(x1[(o0 * C + c) * inner + i_first])
    s, q = _shifted_sums_strided(x1, C, inner, c, o0, o1, i_first, i_last, k)
    if not q <= 16.0 * (q - s * s / n):  # also true for a NaN
        s, _ = _shifted_sums_strided(x1, C, inner, c, o0, o1, i_first, i_last, 0.0)
        k = s / n
        s, q = _shifted_sums_strided(x1, C, inner, c, o0, o1, i_first, i_last, k)
    dev = s / n
    return k, dev, q - s * dev


@njit(**_INLINE_INTEGER)
def _quarter(r0, r1):
    """Rows per quarter of the row range ``[r0, r1)``: the rows reductions read the four
    quarters at once, rows ``r``, ``r + h``, ``r + 2h`` and ``r + 3h``, then the
    ``(r1 - r0) % 4`` rows left from ``r0 + 4h`` one at a time.

    Four sequential streams keep more memory reads in flight than one: measured on the
    2-core VM (docs/cpu.md), the moments of a large rows batch ran 1.4-1.55x faster, the
    gradient sums 1.1-1.2x. Adjacent rows read as a block (``r``, ``r + 1``, ...) were
    *slower* than one row at a time once the row was 1 KiB long.
    """
    return (r1 - r0) // 4


@njit(**_REDUCE)
def _shifted_sums_rows(x, r0, r1, k, s, q):
    """Per channel, ``s = sum(x - k)`` and ``q = sum((x - k)**2)`` over rows ``[r0, r1)``.

    Vectorized across channels, the four quarters of the rows at once (see
    :func:`_quarter`).

    Parameters
    ----------
    x : ndarray, shape (rows, C)
    r0, r1 : int
    k : ndarray of float64, shape (C,)
        The shifts.
    s, q : ndarray of float64, shape (C,)
        Outputs: local arrays of the caller, so that once this is inlined LLVM sees they
        alias neither ``x`` nor each other, and the loop vectorizes (measured: the same
        speed as the loop written inside :func:`_chunk_moments_rows`).
    """
    C = x.shape[1]
    s[:] = 0.0
    q[:] = 0.0
    h = _quarter(r0, r1)
    for r in range(r0, r0 + h):
        for c in range(C):
            d0 = np.float64(x[r, c]) - k[c]
            d1 = np.float64(x[r + h, c]) - k[c]
            d2 = np.float64(x[r + 2 * h, c]) - k[c]
            d3 = np.float64(x[r + 3 * h, c]) - k[c]
            s[c] += (d0 + d1) + (d2 + d3)
            q[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    for r in range(r0 + 4 * h, r1):
        for c in range(C):
            d = np.float64(x[r, c]) - k[c]
            s[c] += d
            q[c] += d * d


@njit(**_INLINE_REDUCE)
def _chunk_moments_rows(x, r0, r1, shift, dev, m2):
    """Per-channel summaries ``(shift, dev, m2)`` of rows ``[r0, r1)`` of ``x``.

    The method of :func:`_chunk_moments_strided` for every channel at once: one pass
    shifted by the chunk's first row (a second pass over the chunk, even from L2, leaves
    the memory idle while it runs), and the two-pass method, from cache, for a chunk
    where some channel has ``Q > 16 m2`` or a non-finite sum.

    Parameters
    ----------
    x : ndarray, shape (rows, C)
    r0, r1 : int
        Row range (not empty).
    shift, dev, m2 : ndarray of float64, shape (C,)
        Outputs.
    """
    C = x.shape[1]
    n = r1 - r0
    k = np.empty(C)
    s = np.empty(C)
    q = np.empty(C)
    for c in range(C):
        k[c] = x[r0, c]
    _shifted_sums_rows(x, r0, r1, k, s, q)
    well_conditioned = True
    for c in range(C):
        if not q[c] <= 16.0 * (q[c] - s[c] * s[c] / n):  # also true for a NaN
            well_conditioned = False
    if not well_conditioned:
        k[:] = 0.0
        _shifted_sums_rows(x, r0, r1, k, s, q)
        for c in range(C):
            k[c] = s[c] / n
        _shifted_sums_rows(x, r0, r1, k, s, q)
    for c in range(C):
        shift[c] = k[c]
        dev[c] = s[c] / n
        m2[c] = q[c] - s[c] * dev[c]


@njit(**_EXACT)
def _merge_chunks(part_shift, part_dev, part_m2, c0, c1, chunk, m, mean, m2):
    """Merge the chunk summaries of channels ``c0 <= c < c1``: their mean and M2.

    Chunk ``k`` has mean ``shift_k + dev_k`` (a float64 pair: see
    :func:`_chunk_moments_strided`). Relative to ``K = shift_0``, its mean is
    ``delta_k = (shift_k - K) + dev_k``; then ``mean = K + sum(n_k delta_k) / m`` and
    ``M2 = sum(M2_k + n_k (delta_k - delta)**2)`` in chunk order. Every term of the
    second sum is non-negative (no cancellation), the differences of chunk means are
    taken before any large offset rounds them, and a channel costs one division, where
    Chan's pairwise merge costs two per chunk (which dominated the statistics of
    short-run channels: a (256, 512, 7, 7) batch has 256 chunks per channel).

    The channels are merged together, row by row of the ``(n_chunks, C)`` partials (each
    channel's sums still in chunk order: the same bits as one channel at a time), in
    loops that vectorize across channels (with unsigned channel indices: signed ones
    carry a wraparound test that kept them scalar). One call per channel cost about
    18 ns a channel, most of the statistics of a wide batch: those of an (8, 4096)
    float32 batch took 74 us, and take 18 us merged this way.

    Parameters
    ----------
    part_shift, part_dev, part_m2 : ndarray of float64, shape (n_chunks, C)
    c0, c1 : int
        The channels.
    chunk : int
        Values per chunk (the last chunk may hold fewer).
    m : int
        Values per channel.
    mean, m2 : ndarray of float64, shape (C,)
        Outputs (``[c0:c1]`` written).
    """
    n_chunks = part_m2.shape[0]
    c0, c1 = np.uint64(c0), np.uint64(c1)
    for c in range(c0, c1):
        mean[c] = 0.0
        m2[c] = 0.0
    for k in range(n_chunks):
        n_k = min(chunk, m - k * chunk)
        for c in range(c0, c1):
            mean[c] += n_k * ((part_shift[k, c] - part_shift[0, c]) + part_dev[k, c])
    for c in range(c0, c1):
        mean[c] = mean[c] / m
    for k in range(n_chunks):
        n_k = min(chunk, m - k * chunk)
        for c in range(c0, c1):
            d = ((part_shift[k, c] - part_shift[0, c]) + part_dev[k, c]) - mean[c]
            m2[c] += part_m2[k, c] + n_k * (d * d)
    for c in range(c0, c1):
        mean[c] = part_shift[0, c] + mean[c]


@njit(**_EXACT)
def _sum_chunks(part_dy, part_dyx, c0, c1, s_dy, s_dyx):
    """Sum the gradient partials of channels ``c0 <= c < c1`` in chunk order, row by row
    of the ``(n_chunks, C)`` partials (see :func:`_merge_chunks`)."""
    c0, c1 = np.uint64(c0), np.uint64(c1)  # as in _merge_chunks
    for c in range(c0, c1):
        s_dy[c] = 0.0
        s_dyx[c] = 0.0
    for k in range(part_dy.shape[0]):
        for c in range(c0, c1):
            s_dy[c] += part_dy[k, c]
            s_dyx[c] += part_dyx[k, c]


@njit(**_EXACT)
def _invstd(var, eps):
    """``1 / sqrt(var + eps)`` in exact IEEE arithmetic (as NumPy computes it)."""
    return 1.0 / np.sqrt(var + eps)


_invstd_inline = _inlined(_invstd, _EXACT)


@njit(**_EXACT)
def _variance_invstd(m2, m, eps):
    """``(m2 / m, 1 / sqrt(m2 / m + eps))`` in exact IEEE arithmetic (as NumPy computes it)."""
    var = m2 / m
    return var, _invstd_inline(var, eps)


@njit(**_EXACT)
def _fill_coefficients(mean, invstd, gamma, beta, c, coef):
    """Write the normalizing coefficients of channel ``c`` into ``coef[:, c]``.

    ``y = ((x - hi) - lo) * (gamma * invstd) + beta``, where ``hi + lo`` represents the
    float64 mean in the data's dtype.

    Parameters
    ----------
    mean, invstd, gamma, beta : float
        Channel statistics and affine parameters (float64).
    c : int
    coef : ndarray, shape (4, C), the data's dtype
    """
    hi = coef.dtype.type(mean)
    coef[MEAN_HI, c] = hi
    coef[MEAN_LO, c] = mean - np.float64(hi)
    coef[SCALE, c] = gamma * invstd
    coef[SHIFT, c] = beta


_fill_coefficients_inline = _inlined(_fill_coefficients, _EXACT)


@njit(**_EXACT)
def _coefficient_table(mean, invstd, gamma, beta, dtype):
    """The ``(4, C)`` coefficient table of every channel, in ``dtype``.

    Parameters
    ----------
    mean, invstd, gamma, beta : ndarray, shape (C,), any float dtype (used as float64)
    dtype : NumPy dtype
        The data's dtype.

    Returns
    -------
    ndarray, shape (4, C)
        See :func:`_fill_coefficients`.
    """
    coef = np.empty((4, mean.shape[0]), dtype)
    for c in range(mean.shape[0]):
        _fill_coefficients_inline(
            np.float64(mean[c]),
            np.float64(invstd[c]),
            np.float64(gamma[c]),
            np.float64(beta[c]),
            c,
            coef,
        )
    return coef


# Names for the drivers of other kernel modules (fastbn.cpu_masked), which compose these
# helpers with their own passes: the same functions, hence the same bits.
variance_invstd = _variance_invstd
coefficient_table = _coefficient_table
chunk_span = _chunk_span
whole_runs = _whole_runs


@njit(**_ELEMENTWISE)
def _affine(x, hi, lo, scale, shift):
    """``((x - hi) - lo) * scale + shift`` in the data's dtype, never reassociated.

    The one formula of the normalized value: the forward writes it and the ReLU backward
    recomputes its sign with it, so both agree on the mask bit for bit.
    """
    return ((x - hi) - lo) * scale + shift


_affine_inline = _inlined(_affine, _ELEMENTWISE)


@njit(**_ELEMENTWISE)
def _normalized(x, hi, lo, scale, shift, relu, zero):
    """The forward's output value: :func:`_affine`, then ReLU if ``relu``.

    ``zero`` is 0 in the data's dtype.
    """
    v = _affine_inline(x, hi, lo, scale, shift)
    if relu and v < zero:
        v = zero
    return v


_normalized_inline = _inlined(_normalized, _ELEMENTWISE)


@njit(**_ELEMENTWISE)
def _input_grad_value(g, x, hi, lo, scale, shift, a, b, d, relu, zero):
    """``dx = a * dy + b * (x - mean) + d`` at one value, ``dy = g``.

    With ``relu``, ``dy`` counts as 0 where the forward's output, recomputed by
    :func:`_affine`, is not positive. ``zero`` is 0 in the data's dtype.
    """
    if relu and _affine_inline(x, hi, lo, scale, shift) <= zero:
        g = zero
    return a * g + b * ((x - hi) - lo) + d


_input_grad_value_inline = _inlined(_input_grad_value, _ELEMENTWISE)


@njit(**_ELEMENTWISE)
def _normalize_run(x1, y1, start, n, coef, c, relu):
    """``y = ((x - hi) - lo) * scale + shift`` (then ReLU) over ``n`` contiguous values.

    ``x1`` and ``y1`` are the flat arrays and ``start`` the flat offset of the run, all
    values of channel ``c``. Unsigned offsets spare Numba's negative-index wraparound and
    a slice per run, so the loop vectorizes cheaply even for short runs (small H*W).

    Parameters
    ----------
    x1, y1 : ndarray, 1-D
    start, n : int
    coef : ndarray, shape (4, C)
    c : int
    relu : bool
    """
    hi = coef[MEAN_HI, c]
    lo = coef[MEAN_LO, c]
    scale = coef[SCALE, c]
    shift = coef[SHIFT, c]
    zero = coef.dtype.type(0)
    base = np.uint64(start)
    for i in range(np.uint64(n)):
        y1[base + i] = _normalized_inline(x1[base + i], hi, lo, scale, shift, relu, zero)


_normalize_run_inline = _inlined(_normalize_run, _ELEMENTWISE)


@njit(**_ELEMENTWISE)
def _normalize_channel(x, y, c, j0, j1, coef, relu):
    """``y = ((x - hi) - lo) * scale + shift`` (then ReLU) over flat values ``[j0, j1)``
    of channel ``c``.

    Parameters
    ----------
    x, y : ndarray, shape (outer, C, inner)
    c, j0, j1 : int
    coef : ndarray, shape (4, C)
    relu : bool
    """
    C = x.shape[1]
    inner = x.shape[2]
    x1 = x.reshape(-1)
    y1 = y.reshape(-1)
    for o in range(j0 // inner, (j1 - 1) // inner + 1):
        i0 = max(j0 - o * inner, 0)
        _normalize_run_inline(
            x1, y1, (o * C + c) * inner + i0, min(j1 - o * inner, inner) - i0, coef, c, relu
        )


@njit(**_REDUCE)  # its reduction loop is here: see _INLINE_REDUCE
def _chunk_grad_sums_strided(dy1, x1, C, inner, c, o0, o1, i_first, i_last, coef, relu):
    """``(sum dy, sum dy * (x - mean))`` of channel ``c`` over one chunk.

    With ``relu``, ``dy`` counts only where the recomputed output is positive. Flat
    arrays and unsigned offsets, as :func:`_shifted_sums_strided`.

    Parameters
    ----------
    dy1, x1 : ndarray, 1-D
        The flat ``(outer, C, inner)`` arrays.
    C, inner : int
    c : int
    o0, o1, i_first, i_last : int
        The chunk (see :func:`_chunk_span`).
    coef : ndarray, shape (4, C)
        The saved mean (``MEAN_HI`` + ``MEAN_LO``); ``SCALE``/``SHIFT`` recompute the
        ReLU mask with :func:`_affine`, exactly as the forward computed the output.
    relu : bool

    Returns
    -------
    tuple of float
    """
    hi = coef[MEAN_HI, c]
    lo = coef[MEAN_LO, c]
    scale = coef[SCALE, c]
    shift = coef[SHIFT, c]
    mean = np.float64(hi) + np.float64(lo)
    s_dy = 0.0
    s_dyx = 0.0
    for o in range(o0, o1):
        base, i0, i1 = _chunk_run(o, o0, o1, i_first, i_last, C, c, inner)
        for i in range(i0, i1):
            xv = x1[base + i]
            g = np.float64(dy1[base + i])
            if relu and _affine(xv, hi, lo, scale, shift) <= 0:
                g = 0.0
            s_dy += g
            s_dyx += g * (np.float64(xv) - mean)
    return s_dy, s_dyx


chunk_grad_sums_strided = _chunk_grad_sums_strided  # for fastbn.cpu_masked, as above


@njit(**_REDUCE)
def _grad_terms(dy, x, r, c, coef, mean, relu):
    """``(dy, dy * (x - mean))`` at row ``r``, channel ``c``, in float64; with ``relu``,
    ``dy`` is 0 where the output recomputed by :func:`_affine` is not positive."""
    g = np.float64(dy[r, c])
    if (
        relu
        and _affine(x[r, c], coef[MEAN_HI, c], coef[MEAN_LO, c], coef[SCALE, c], coef[SHIFT, c])
        <= 0
    ):
        g = 0.0
    return g, g * (np.float64(x[r, c]) - mean)


@njit(**_REDUCE)
def _add_grad_terms(dy, x, r, h, c, coef, mean, relu, a, b):
    """Add the :func:`_grad_terms` of rows ``r``, ``r + h``, ``r + 2h``, ``r + 3h`` (the
    four quarters, see :func:`_quarter`) at channel ``c`` to ``a[c]`` and ``b[c]``."""
    g0, t0 = _grad_terms(dy, x, r, c, coef, mean, relu)
    g1, t1 = _grad_terms(dy, x, r + h, c, coef, mean, relu)
    g2, t2 = _grad_terms(dy, x, r + 2 * h, c, coef, mean, relu)
    g3, t3 = _grad_terms(dy, x, r + 3 * h, c, coef, mean, relu)
    a[c] += (g0 + g1) + (g2 + g3)
    b[c] += (t0 + t1) + (t2 + t3)


@njit(**_INLINE_REDUCE)
def _chunk_grad_sums_rows(dy, x, r0, r1, coef, relu, s_dy, s_dyx):
    """Per-channel ``sum dy`` and ``sum dy * (x - mean)`` over rows ``[r0, r1)``.

    Parameters
    ----------
    dy, x : ndarray, shape (rows, C)
    r0, r1 : int
    coef : ndarray, shape (4, C)
    relu : bool
    s_dy, s_dyx : ndarray of float64, shape (C,)
        Outputs.
    """
    C = x.shape[1]
    a = np.zeros(C)
    b = np.zeros(C)
    mean = np.empty(C)
    for c in range(C):
        mean[c] = np.float64(coef[MEAN_HI, c]) + np.float64(coef[MEAN_LO, c])
    # The four quarters of the rows at once (see _quarter), then the rows left. The ReLU
    # and plain loops are kept apart (a constant ``relu`` in each) so that the plain one
    # vectorizes.
    h = _quarter(r0, r1)
    if relu:
        for r in range(r0, r0 + h):
            for c in range(C):
                _add_grad_terms(dy, x, r, h, c, coef, mean[c], True, a, b)
    else:
        for r in range(r0, r0 + h):
            for c in range(C):
                _add_grad_terms(dy, x, r, h, c, coef, mean[c], False, a, b)
    for r in range(r0 + 4 * h, r1):
        for c in range(C):
            g, t = _grad_terms(dy, x, r, c, coef, mean[c], relu)
            a[c] += g
            b[c] += t
    for c in range(C):  # not s_dy[:] = a, whose shape check compiles string formatting
        s_dy[c] = a[c]
        s_dyx[c] = b[c]


@njit(**_EXACT)
def _fill_grad_coefficients(s_dy, s_dyx, m, invstd, gamma, c, coef, dcoef):
    """Coefficients of ``dx = a * dy + b * (x - mean) + d`` for channel ``c``.

    From ``dx = gamma * invstd / m * (m * dy - dbeta - xhat * dgamma)`` with
    ``dbeta = sum dy`` and ``dgamma = invstd * sum dy * (x - mean)``.

    Parameters
    ----------
    s_dy, s_dyx : float
        Channel sums (float64).
    m : int
        Values per channel.
    invstd, gamma : float
    c : int
    coef : ndarray, shape (4, C)
        Normalizing coefficients (mean in ``MEAN_HI``).
    dcoef : ndarray, shape (3, C)
        Output: ``a``, ``b``, ``d``.
    """
    k = gamma * invstd
    dgamma = invstd * s_dyx
    dcoef[0, c] = k
    dcoef[1, c] = -k * invstd * dgamma / m
    dcoef[2, c] = -k * s_dy / m


fill_grad_coefficient = _fill_grad_coefficients  # for fastbn.cpu_masked, as above


@njit(**_ELEMENTWISE)
def _input_grad_run(dy1, x1, dx1, start, n, coef, dcoef, c, relu):
    """``dx = a * dy + b * (x - mean) + d`` over ``n`` contiguous values of channel ``c``.

    Flat arrays and unsigned offsets, as :func:`_normalize_run`.

    Parameters
    ----------
    dy1, x1, dx1 : ndarray, 1-D
    start, n : int
    coef : ndarray, shape (4, C)
    dcoef : ndarray, shape (3, C)
    c : int
    relu : bool
    """
    hi = coef[MEAN_HI, c]
    lo = coef[MEAN_LO, c]
    scale = coef[SCALE, c]
    shift = coef[SHIFT, c]
    a = dcoef[0, c]
    b = dcoef[1, c]
    d = dcoef[2, c]
    zero = coef.dtype.type(0)
    base = np.uint64(start)
    for i in range(np.uint64(n)):
        dx1[base + i] = _input_grad_value_inline(
            dy1[base + i], x1[base + i], hi, lo, scale, shift, a, b, d, relu, zero
        )


_input_grad_run_inline = _inlined(_input_grad_run, _ELEMENTWISE)


@njit(**_ELEMENTWISE)
def _input_grad_channel(dy, x, dx, c, j0, j1, coef, dcoef, relu):
    """``dx = a * dy + b * (x - mean) + d`` over flat values ``[j0, j1)`` of channel ``c``.

    Parameters
    ----------
    dy, x, dx : ndarray, shape (outer, C, inner)
    c, j0, j1 : int
    coef : ndarray, shape (4, C)
    dcoef : ndarray, shape (3, C)
    relu : bool
    """
    C = x.shape[1]
    inner = x.shape[2]
    dy1 = dy.reshape(-1)
    x1 = x.reshape(-1)
    dx1 = dx.reshape(-1)
    for o in range(j0 // inner, (j1 - 1) // inner + 1):
        i0 = max(j0 - o * inner, 0)
        _input_grad_run_inline(
            dy1,
            x1,
            dx1,
            (o * C + c) * inner + i0,
            min(j1 - o * inner, inner) - i0,
            coef,
            dcoef,
            c,
            relu,
        )


@njit(**_REDUCE)  # its reduction loop is here: see _INLINE_REDUCE
def _frozen_run(dy1, x1, out1, base, out_base, n, hi, lo, scale, shift, mean, relu, zero):
    """``out = scale * dy`` (ReLU-masked dy) over the ``n`` values at flat offset ``base``,
    written from ``out_base`` on, and their ``(sum dy, sum dy * (x - mean))`` in float64,
    in one loop (unsigned offsets, as :func:`_shifted_sums_strided`). With ``relu``,
    ``dy`` counts as 0 where the output recomputed by :func:`_affine` is not positive.

    ``out1`` must not overlap ``dy1`` or ``x1``: the loop is vectorized behind LLVM's
    runtime overlap check, and where that check fails it runs the scalar copy of the
    loop, which sums in another order (see :func:`_chunk_frozen_strided`)."""
    s_dy = 0.0
    s_dyx = 0.0
    for i in range(n):
        xv = x1[base + i]
        g = dy1[base + i]
        if relu and _affine(xv, hi, lo, scale, shift) <= zero:
            g = zero
        out1[out_base + i] = scale * g
        g64 = np.float64(g)
        s_dy += g64
        s_dyx += g64 * (np.float64(xv) - mean)
    return s_dy, s_dyx


# Values per call of _frozen_run: a run longer than this is summed piece by piece, so that
# the buffer of the in-place path (see _chunk_frozen_strided) stays in L1.
_FROZEN_PIECE = _config.FROZEN_PIECE


@njit(**_EXACT)
def _chunk_frozen_strided(dy1, x1, dx1, C, inner, c, o0, o1, i_first, i_last, coef, relu, in_place):
    """Backward through fixed statistics over one chunk of channel ``c``: writes
    ``dx = scale * dy`` and returns ``(sum dy, sum dy * (x - mean))`` (float64).

    One loop per run (:func:`_frozen_run`, runs longer than ``_FROZEN_PIECE`` values
    piece by piece) reads dy and x once, writes dx and accumulates both sums: memory sees
    one read of each and one write of dx. With ``relu``, ``dy`` counts as 0 (in dx and in
    both sums) where the forward's output, recomputed by :func:`_affine`, is not
    positive.

    With ``in_place`` (dx is dy or x: ``out=dy``), the loop writes into a buffer of the
    item (``_FROZEN_PIECE`` values or fewer) and the piece is then copied into dx, from
    L1: the same compiled loop, with an output that overlaps nothing, computes in both
    cases, so the sums are bitwise those of a separate dx (written straight into dx, the
    loop would take LLVM's scalar fallback and sum in another order). The buffer is
    allocated here, in that case only: an array handed to every item by the driver (empty
    for a separate dx) made the separate-dx case up to 10 % slower (presumably its
    reference count, shared by the threads, changing at every item).

    Parameters
    ----------
    dy1, x1, dx1 : ndarray, 1-D
        The flat ``(outer, C, inner)`` arrays.
    C, inner : int
    c : int
    o0, o1, i_first, i_last : int
        The chunk (see :func:`_chunk_span`).
    coef : ndarray, shape (4, C)
        Coefficients of the fixed statistics: the mean (``MEAN_HI`` + ``MEAN_LO``),
        ``SCALE = gamma * invstd`` (the factor of dx) and ``SHIFT`` (the ReLU mask).
    relu : bool
    in_place : bool
        dx coincides with dy or x.

    Returns
    -------
    tuple of float
    """
    hi = coef[MEAN_HI, c]
    lo = coef[MEAN_LO, c]
    scale = coef[SCALE, c]
    shift = coef[SHIFT, c]
    zero = coef.dtype.type(0)
    mean = np.float64(hi) + np.float64(lo)
    piece = np.uint64(_FROZEN_PIECE)
    s_dy = 0.0
    s_dyx = 0.0
    if in_place:
        buffer = np.empty(min(_FROZEN_PIECE, inner), dx1.dtype)
        for o in range(o0, o1):
            base, i0, i1 = _chunk_run(o, o0, o1, i_first, i_last, C, c, inner)
            p = base + i0
            end = base + i1
            while p < end:
                n = min(end - p, piece)
                a, b = _frozen_run(
                    dy1, x1, buffer, p, np.uint64(0), n, hi, lo, scale, shift, mean, relu, zero
                )
                for i in range(n):
                    dx1[p + i] = buffer[i]
                s_dy += a
                s_dyx += b
                p += n
    else:
        for o in range(o0, o1):
            base, i0, i1 = _chunk_run(o, o0, o1, i_first, i_last, C, c, inner)
            p = base + i0
            end = base + i1
            while p < end:
                n = min(end - p, piece)
                a, b = _frozen_run(dy1, x1, dx1, p, p, n, hi, lo, scale, shift, mean, relu, zero)
                s_dy += a
                s_dyx += b
                p += n
    return s_dy, s_dyx


# The rows helper writes dx in the loop that sums: it takes the elementwise options (no
# reassociation), so that each channel's sums are in row order whatever LLVM vectorizes
# (across channels) and whether or not dx aliases dy.
@njit(**_ELEMENTWISE)
def _chunk_frozen_rows(dy, x, dx, r0, r1, coef, relu, s_dy, s_dyx):
    """:func:`_chunk_frozen_strided` for rows ``[r0, r1)`` of every channel at once.

    Vectorized across channels (each channel's sums in row order, which vectorization
    across channels does not change); the ReLU and plain loops are kept apart (a
    constant ``relu`` in each) so that the plain one vectorizes.

    Parameters
    ----------
    dy, x, dx : ndarray, shape (rows, C)
    r0, r1 : int
    coef : ndarray, shape (4, C)
    relu : bool
    s_dy, s_dyx : ndarray of float64, shape (C,)
        Outputs.
    """
    C = x.shape[1]
    a = np.zeros(C)
    b = np.zeros(C)
    mean = np.empty(C)
    for c in range(C):
        mean[c] = np.float64(coef[MEAN_HI, c]) + np.float64(coef[MEAN_LO, c])
    hi, lo, scale, shift = coef[MEAN_HI], coef[MEAN_LO], coef[SCALE], coef[SHIFT]
    zero = coef.dtype.type(0)
    if relu:
        for r in range(r0, r1):
            for c in range(C):
                xv = x[r, c]
                g = dy[r, c]
                if _affine_inline(xv, hi[c], lo[c], scale[c], shift[c]) <= zero:
                    g = zero
                dx[r, c] = scale[c] * g
                g64 = np.float64(g)
                a[c] += g64
                b[c] += g64 * (np.float64(xv) - mean[c])
    else:
        for r in range(r0, r1):
            for c in range(C):
                g = dy[r, c]
                dx[r, c] = scale[c] * g
                g64 = np.float64(g)
                a[c] += g64
                b[c] += g64 * (np.float64(x[r, c]) - mean[c])
    for c in range(C):  # not s_dy[:] = a (see _chunk_grad_sums_rows)
        s_dy[c] = a[c]
        s_dyx[c] = b[c]


@njit(**_ELEMENTWISE)
def _chunk_frozen_rows_in_place(dy, x, dx, r0, r1, coef, relu, s_dy, s_dyx):
    """:func:`_chunk_frozen_rows` when dx is dy or x (``out=dy``): each row of dx is
    computed into a buffer of C values by the loops of :func:`_chunk_frozen_rows` (the
    same arithmetic in the same order: the same bits), then copied. Written in place,
    the loop fails LLVM's runtime overlap check and runs its unvectorized copy (1.9-2.4x
    the time, docs/cpu.md).

    The loops are written out here, the ReLU test outside the row loop as in
    :func:`_chunk_frozen_rows`: through a row helper inlined into the row loop (with
    ``relu`` tested inside it), the same work took 1.6x (256 channels) to 2.6x (64
    channels) the time of the separate-dx kernel (docs/cpu.md).

    Parameters
    ----------
    dy, x, dx : ndarray, shape (rows, C)
    r0, r1 : int
    coef : ndarray, shape (4, C)
    relu : bool
    s_dy, s_dyx : ndarray of float64, shape (C,)
        Outputs.
    """
    C = x.shape[1]
    a = np.zeros(C)
    b = np.zeros(C)
    mean = np.empty(C)
    for c in range(C):
        mean[c] = np.float64(coef[MEAN_HI, c]) + np.float64(coef[MEAN_LO, c])
    hi, lo, scale, shift = coef[MEAN_HI], coef[MEAN_LO], coef[SCALE], coef[SHIFT]
    zero = coef.dtype.type(0)
    buffer = np.empty(C, dx.dtype)
    if relu:
        for r in range(r0, r1):
            for c in range(C):
                xv = x[r, c]
                g = dy[r, c]
                if _affine_inline(xv, hi[c], lo[c], scale[c], shift[c]) <= zero:
                    g = zero
                buffer[c] = scale[c] * g
                g64 = np.float64(g)
                a[c] += g64
                b[c] += g64 * (np.float64(xv) - mean[c])
            for c in range(C):
                dx[r, c] = buffer[c]
    else:
        for r in range(r0, r1):
            for c in range(C):
                g = dy[r, c]
                buffer[c] = scale[c] * g
                g64 = np.float64(g)
                a[c] += g64
                b[c] += g64 * (np.float64(x[r, c]) - mean[c])
            for c in range(C):
                dx[r, c] = buffer[c]
    for c in range(C):  # not s_dy[:] = a (see _chunk_grad_sums_rows)
        s_dy[c] = a[c]
        s_dyx[c] = b[c]


# --------------------------------------------------------------------------------------
# The fused residual add: y = act(bn(x) + z), and the ReLU mask of its backward
# --------------------------------------------------------------------------------------


@njit(**_ELEMENTWISE)
def _residual_value(x, z, hi, lo, scale, shift, relu, zero):
    """The output of the fused residual add at one value: ``_affine(x) + z``, then ReLU.

    Neither contracted nor reassociated (``_ELEMENTWISE``): the backward recomputes the
    same sum with :func:`_residual_grad_value`, so both agree on the mask bit for bit.
    """
    v = _affine_inline(x, hi, lo, scale, shift) + z
    if relu and v < zero:
        v = zero
    return v


_residual_value_inline = _inlined(_residual_value, _ELEMENTWISE)


@njit(**_ELEMENTWISE)
def _residual_grad_value(g, x, z, hi, lo, scale, shift, relu, zero):
    """The gradient of the sum ``bn(x) + z`` at one value: ``dy = g``, or 0 with ``relu``
    where the forward's ``_affine(x) + z`` is not positive."""
    if relu and _affine_inline(x, hi, lo, scale, shift) + z <= zero:
        return zero
    return g


_residual_grad_value_inline = _inlined(_residual_grad_value, _ELEMENTWISE)


@njit(**_ELEMENTWISE)
def _residual_run(x1, z1, y1, start, n, coef, c, relu):
    """``y = act(bn(x) + z)`` over ``n`` contiguous values of channel ``c`` (flat arrays,
    unsigned offsets, as :func:`_normalize_run`)."""
    hi = coef[MEAN_HI, c]
    lo = coef[MEAN_LO, c]
    scale = coef[SCALE, c]
    shift = coef[SHIFT, c]
    zero = coef.dtype.type(0)
    base = np.uint64(start)
    for i in range(np.uint64(n)):
        y1[base + i] = _residual_value_inline(
            x1[base + i], z1[base + i], hi, lo, scale, shift, relu, zero
        )


@njit(**_ELEMENTWISE)
def _residual_grad_run(dy1, x1, z1, g1, start, n, coef, c, relu):
    """``g = dy``, zeroed with ``relu`` where ``bn(x) + z`` is not positive, over ``n``
    contiguous values of channel ``c`` (as :func:`_residual_run`). One loop per
    function: with both in one function behind a flag, LLVM left the forward's scalar
    (10x slower on (64, 256, 196) float32)."""
    hi = coef[MEAN_HI, c]
    lo = coef[MEAN_LO, c]
    scale = coef[SCALE, c]
    shift = coef[SHIFT, c]
    zero = coef.dtype.type(0)
    base = np.uint64(start)
    for i in range(np.uint64(n)):
        g1[base + i] = _residual_grad_value_inline(
            dy1[base + i], x1[base + i], z1[base + i], hi, lo, scale, shift, relu, zero
        )


# --------------------------------------------------------------------------------------
# Drivers: one call from Python per operation. Each holds the prange loops, and each is
# written for one family (rows or strided), so that a call compiles the code of its own
# layout only (docs/cpu.md, "Compile time").
# --------------------------------------------------------------------------------------


def _moments_rows(x, chunk, mean, m2):
    """Per-channel mean and M2 (sum of squared deviations) of ``x``, rows family.

    One pass over memory (a chunk whose first row is an outlier is reduced again from
    cache).

    Parameters
    ----------
    x : ndarray, shape (outer, C, 1)
    chunk : int
        Rows per chunk.
    mean, m2 : ndarray of float64, shape (C,)
        Outputs.
    """
    outer, C, _ = x.shape
    x2 = x.reshape(outer, C)
    n_chunks = (outer + chunk - 1) // chunk
    part_shift = np.empty((n_chunks, C))
    part_dev = np.empty((n_chunks, C))
    part_m2 = np.empty((n_chunks, C))
    for k in prange(n_chunks):
        _chunk_moments_rows(
            x2, k * chunk, min((k + 1) * chunk, outer), part_shift[k], part_dev[k], part_m2[k]
        )
    for j in prange((C + _MERGE_BLOCK - 1) // _MERGE_BLOCK):
        c0 = j * _MERGE_BLOCK
        _merge_chunks(
            part_shift, part_dev, part_m2, c0, min(c0 + _MERGE_BLOCK, C), chunk, outer, mean, m2
        )


def _moments_strided(x, chunk, mean, m2):
    """Per-channel mean and M2 of ``x``, strided family (see :func:`_moments_rows`).

    Parameters
    ----------
    x : ndarray, shape (outer, C, inner)
    chunk : int
        Values per chunk.
    mean, m2 : ndarray of float64, shape (C,)
        Outputs.
    """
    outer, C, inner = x.shape
    m = outer * inner
    n_chunks = (m + chunk - 1) // chunk
    part_shift = np.empty((n_chunks, C))
    part_dev = np.empty((n_chunks, C))
    part_m2 = np.empty((n_chunks, C))
    runs = _whole_runs(chunk, inner)
    x1 = x.reshape(-1)
    # chunk-major order: consecutive items are consecutive in memory
    for t in prange(C * n_chunks):
        k = t // C
        c = t - k * C
        o0, o1, i0, i1 = _chunk_span(k, chunk, runs, outer, inner)
        part_shift[k, c], part_dev[k, c], part_m2[k, c] = _chunk_moments_strided(
            x1, C, inner, c, o0, o1, i0, i1
        )
    for j in prange((C + _MERGE_BLOCK - 1) // _MERGE_BLOCK):
        c0 = j * _MERGE_BLOCK
        _merge_chunks(
            part_shift, part_dev, part_m2, c0, min(c0 + _MERGE_BLOCK, C), chunk, m, mean, m2
        )


def _normalize_rows(x, coef, relu, y):
    """``y = ((x - hi) - lo) * scale + shift`` per channel, then ReLU if asked; rows family.

    One read of x, one write of y, in memory order (the partition of an elementwise pass
    does not affect results). Used by inference and by the two-pass forward.

    Parameters
    ----------
    x, y : ndarray, shape (outer, C, 1)
    coef : ndarray, shape (4, C)
    relu : bool
    """
    outer, C, _ = x.shape
    x2 = x.reshape(outer, C)
    y2 = y.reshape(outer, C)
    hi, lo, scale, shift = coef[MEAN_HI], coef[MEAN_LO], coef[SCALE], coef[SHIFT]
    zero = coef.dtype.type(0)
    # A row per iteration, its loop written here: a helper per block of rows was 7-9%
    # slower on (65536, 256) float32, a helper per row 10-20% (docs/cpu.md).
    for r in prange(outer):
        for c in range(C):
            y2[r, c] = _normalized(x2[r, c], hi[c], lo[c], scale[c], shift[c], relu, zero)


def _normalize_strided(x, coef, relu, y):
    """:func:`_normalize_rows` for the strided family.

    Parameters
    ----------
    x, y : ndarray, shape (outer, C, inner)
    coef : ndarray, shape (4, C)
    relu : bool
    """
    outer, C, inner = x.shape
    total = outer * C * inner
    chunk = _ELEMENTWISE_CHUNK
    x1 = x.reshape(-1)
    y1 = y.reshape(-1)
    for k in prange((total + chunk - 1) // chunk):
        e0 = k * chunk
        e1 = min(e0 + chunk, total)
        r0 = e0 // inner
        c = r0 % C  # then counted: a division per run cost 6% at runs of 49 values
        for r in range(r0, (e1 - 1) // inner + 1):
            start = max(e0, r * inner)
            _normalize_run(x1, y1, start, min(e1, (r + 1) * inner) - start, coef, c, relu)
            c = c + 1 if c + 1 < C else 0


def _forward_fused(x, chunk, eps, gamma, beta, relu, y, mean, var, invstd):
    """Training forward with per-channel fusion (strided family only).

    Each thread takes whole channels: chunk statistics, merge, then normalize while the
    channel is still in L2. One read of x from memory, one write of y.

    Parameters
    ----------
    x, y : ndarray, shape (outer, C, inner)
    chunk : int
    eps : float
    gamma, beta : ndarray, shape (C,), any float dtype (used as float64)
    relu : bool
    mean, var, invstd : ndarray of float64, shape (C,)
        Outputs: batch mean, biased variance and ``1 / sqrt(var + eps)``.
    """
    outer, C, inner = x.shape
    m = outer * inner
    n_chunks = (m + chunk - 1) // chunk
    coef = np.empty((4, C), x.dtype)
    part_shift = np.empty((n_chunks, C))
    part_dev = np.empty((n_chunks, C))
    part_m2 = np.empty((n_chunks, C))
    runs = _whole_runs(chunk, inner)
    x1 = x.reshape(-1)
    for c in prange(C):
        for k in range(n_chunks):
            o0, o1, i0, i1 = _chunk_span(k, chunk, runs, outer, inner)
            part_shift[k, c], part_dev[k, c], part_m2[k, c] = _chunk_moments_strided(
                x1, C, inner, c, o0, o1, i0, i1
            )
        _merge_chunks(part_shift, part_dev, part_m2, c, c + 1, chunk, m, mean, var)
        var[c], invstd[c] = _variance_invstd(var[c], m, eps)
        _fill_coefficients(mean[c], invstd[c], np.float64(gamma[c]), np.float64(beta[c]), c, coef)
        _normalize_channel(x, y, c, 0, m, coef, relu)


def _grad_sums_rows(dy, x, chunk, coef, relu, s_dy, s_dyx):
    """Per-channel ``sum dy`` and ``sum dy * (x - mean)``: one read of dy and x; rows family.

    Parameters
    ----------
    dy, x : ndarray, shape (outer, C, 1)
    chunk : int
        Rows per chunk.
    coef : ndarray, shape (4, C)
    relu : bool
    s_dy, s_dyx : ndarray of float64, shape (C,)
        Outputs.
    """
    outer, C, _ = x.shape
    x2 = x.reshape(outer, C)
    dy2 = dy.reshape(outer, C)
    n_chunks = (outer + chunk - 1) // chunk
    part_dy = np.empty((n_chunks, C))
    part_dyx = np.empty((n_chunks, C))
    for k in prange(n_chunks):
        _chunk_grad_sums_rows(
            dy2, x2, k * chunk, min((k + 1) * chunk, outer), coef, relu, part_dy[k], part_dyx[k]
        )
    for j in prange((C + _MERGE_BLOCK - 1) // _MERGE_BLOCK):
        c0 = j * _MERGE_BLOCK
        _sum_chunks(part_dy, part_dyx, c0, min(c0 + _MERGE_BLOCK, C), s_dy, s_dyx)


def _grad_sums_strided(dy, x, chunk, coef, relu, s_dy, s_dyx):
    """:func:`_grad_sums_rows` for the strided family (``chunk``: values per chunk)."""
    outer, C, inner = x.shape
    m = outer * inner
    n_chunks = (m + chunk - 1) // chunk
    part_dy = np.empty((n_chunks, C))
    part_dyx = np.empty((n_chunks, C))
    runs = _whole_runs(chunk, inner)
    dy1 = dy.reshape(-1)
    x1 = x.reshape(-1)
    for t in prange(C * n_chunks):
        k = t // C
        c = t - k * C
        o0, o1, i0, i1 = _chunk_span(k, chunk, runs, outer, inner)
        part_dy[k, c], part_dyx[k, c] = _chunk_grad_sums_strided(
            dy1, x1, C, inner, c, o0, o1, i0, i1, coef, relu
        )
    for j in prange((C + _MERGE_BLOCK - 1) // _MERGE_BLOCK):
        c0 = j * _MERGE_BLOCK
        _sum_chunks(part_dy, part_dyx, c0, min(c0 + _MERGE_BLOCK, C), s_dy, s_dyx)


def _input_grad_rows(dy, x, coef, dcoef, relu, dx):
    """``dx = a * dy + b * (x - mean) + d``: one read of dy and x, one write of dx; rows
    family.

    In memory order, like :func:`_normalize_rows`.

    Parameters
    ----------
    dy, x, dx : ndarray, shape (outer, C, 1)
    coef : ndarray, shape (4, C)
    dcoef : ndarray, shape (3, C)
    relu : bool
    """
    outer, C, _ = x.shape
    x2 = x.reshape(outer, C)
    dy2 = dy.reshape(outer, C)
    dx2 = dx.reshape(outer, C)
    hi, lo, scale, shift = coef[MEAN_HI], coef[MEAN_LO], coef[SCALE], coef[SHIFT]
    a, b, d = dcoef[0], dcoef[1], dcoef[2]
    zero = coef.dtype.type(0)
    for r in prange(outer):  # as in _normalize_rows
        for c in range(C):
            dx2[r, c] = _input_grad_value(
                dy2[r, c], x2[r, c], hi[c], lo[c], scale[c], shift[c], a[c], b[c], d[c], relu, zero
            )


def _input_grad_strided(dy, x, coef, dcoef, relu, dx):
    """:func:`_input_grad_rows` for the strided family, like :func:`_normalize_strided`."""
    outer, C, inner = x.shape
    total = outer * C * inner
    chunk = _ELEMENTWISE_CHUNK
    dy1 = dy.reshape(-1)
    x1 = x.reshape(-1)
    dx1 = dx.reshape(-1)
    for k in prange((total + chunk - 1) // chunk):
        e0 = k * chunk
        e1 = min(e0 + chunk, total)
        r0 = e0 // inner
        c = r0 % C  # then counted, as in _normalize_strided
        for r in range(r0, (e1 - 1) // inner + 1):
            start = max(e0, r * inner)
            _input_grad_run(
                dy1, x1, dx1, start, min(e1, (r + 1) * inner) - start, coef, dcoef, c, relu
            )
            c = c + 1 if c + 1 < C else 0


def _backward_fused(dy, x, chunk, mean, invstd, gamma, beta, relu, dx, dgamma, dbeta):
    """Backward with per-channel fusion (strided family only).

    Each thread takes whole channels: the two sums, then dx while dy and x are still in
    L2. One read of dy and x from memory, one write of dx.

    Parameters
    ----------
    dy, x, dx : ndarray, shape (outer, C, inner)
    chunk : int
    mean, invstd : ndarray, shape (C,), any float dtype
        The forward's saved statistics (used as float64).
    gamma, beta : ndarray, shape (C,), any float dtype
        The forward's parameters (``beta`` recomputes the ReLU mask).
    relu : bool
    dgamma, dbeta : ndarray, shape (C,)
        Outputs: ``invstd * sum dy * (x - mean)`` and ``sum dy``, computed in float64 and
        stored in the arrays' dtype.
    """
    outer, C, inner = x.shape
    m = outer * inner
    n_chunks = (m + chunk - 1) // chunk
    coef = _coefficient_table(mean, invstd, gamma, beta, x.dtype)
    dcoef = np.empty((3, C), x.dtype)
    runs = _whole_runs(chunk, inner)
    dy1 = dy.reshape(-1)
    x1 = x.reshape(-1)
    for c in prange(C):
        a = 0.0
        b = 0.0
        for k in range(n_chunks):
            o0, o1, i0, i1 = _chunk_span(k, chunk, runs, outer, inner)
            a_k, b_k = _chunk_grad_sums_strided(dy1, x1, C, inner, c, o0, o1, i0, i1, coef, relu)
            a += a_k
            b += b_k
        invstd_c = np.float64(invstd[c])
        dbeta[c] = a
        dgamma[c] = b * invstd_c
        _fill_grad_coefficients(a, b, m, invstd_c, np.float64(gamma[c]), c, coef, dcoef)
        _input_grad_channel(dy, x, dx, c, 0, m, coef, dcoef, relu)


def _residual_rows(a, x, z, coef, relu, grad, out):
    """The residual pass, rows family: ``out = act(bn(x) + z)`` (one read of x and z,
    one write), or with ``grad`` ``out = dy`` masked where that sum is not positive
    (``dy = a``; one read of dy, x and z, one write). In memory order, like
    :func:`_normalize_rows`.

    Parameters
    ----------
    a, x, z, out : ndarray, shape (outer, C, 1)
        ``a`` is read only with ``grad`` (pass ``x`` otherwise).
    coef : ndarray, shape (4, C)
    relu, grad : bool
    """
    outer, C, _ = x.shape
    a2 = a.reshape(outer, C)
    x2 = x.reshape(outer, C)
    z2 = z.reshape(outer, C)
    out2 = out.reshape(outer, C)
    hi, lo, scale, shift = coef[MEAN_HI], coef[MEAN_LO], coef[SCALE], coef[SHIFT]
    zero = coef.dtype.type(0)
    if grad:
        for r in prange(outer):
            for c in range(C):
                out2[r, c] = _residual_grad_value(
                    a2[r, c], x2[r, c], z2[r, c], hi[c], lo[c], scale[c], shift[c], relu, zero
                )
    else:
        for r in prange(outer):
            for c in range(C):
                out2[r, c] = _residual_value(
                    x2[r, c], z2[r, c], hi[c], lo[c], scale[c], shift[c], relu, zero
                )


def _residual_strided(a, x, z, coef, relu, grad, out):
    """:func:`_residual_rows` for the strided family, like :func:`_normalize_strided`."""
    outer, C, inner = x.shape
    total = outer * C * inner
    chunk = _ELEMENTWISE_CHUNK
    a1 = a.reshape(-1)
    x1 = x.reshape(-1)
    z1 = z.reshape(-1)
    out1 = out.reshape(-1)
    for k in prange((total + chunk - 1) // chunk):
        e0 = k * chunk
        e1 = min(e0 + chunk, total)
        r0 = e0 // inner
        c = r0 % C  # then counted, as in _normalize_strided
        for r in range(r0, (e1 - 1) // inner + 1):
            start = max(e0, r * inner)
            n = min(e1, (r + 1) * inner) - start
            if grad:
                _residual_grad_run(a1, x1, z1, out1, start, n, coef, c, relu)
            else:
                _residual_run(x1, z1, out1, start, n, coef, c, relu)
            c = c + 1 if c + 1 < C else 0


def _frozen_backward_rows(dy, x, chunk, coef, relu, dx, s_dy, s_dyx):
    """Backward through fixed statistics, rows family: ``dx = scale * dy`` written while
    the per-channel ``sum dy`` and ``sum dy * (x - mean)`` accumulate.

    One read of dy and x, one write of dx. The rows are reduced in the fixed chunks of
    :func:`_grad_sums_rows` (per-chunk partials, summed in chunk order): bitwise the same
    results for every thread count.

    Parameters
    ----------
    dy, x, dx : ndarray, shape (outer, C, 1)
    chunk : int
        Rows per chunk.
    coef : ndarray, shape (4, C)
        The normalizing coefficients of the fixed statistics (``SCALE`` is
        ``gamma * invstd``, the factor of dx).
    relu : bool
    s_dy, s_dyx : ndarray of float64, shape (C,)
        Outputs.
    """
    outer, C, _ = x.shape
    x2 = x.reshape(outer, C)
    dy2 = dy.reshape(outer, C)
    dx2 = dx.reshape(outer, C)
    n_chunks = (outer + chunk - 1) // chunk
    part_dy = np.empty((n_chunks, C))
    part_dyx = np.empty((n_chunks, C))
    # dx coincides with dy or x (the host passes no other overlap): see
    # _chunk_frozen_rows_in_place
    in_place = dx.size > 0 and (dx.ctypes.data == dy.ctypes.data or dx.ctypes.data == x.ctypes.data)
    for k in prange(n_chunks):
        r0 = k * chunk
        r1 = min(r0 + chunk, outer)
        if in_place:
            _chunk_frozen_rows_in_place(dy2, x2, dx2, r0, r1, coef, relu, part_dy[k], part_dyx[k])
        else:
            _chunk_frozen_rows(dy2, x2, dx2, r0, r1, coef, relu, part_dy[k], part_dyx[k])
    for j in prange((C + _MERGE_BLOCK - 1) // _MERGE_BLOCK):
        c0 = j * _MERGE_BLOCK
        _sum_chunks(part_dy, part_dyx, c0, min(c0 + _MERGE_BLOCK, C), s_dy, s_dyx)


def _frozen_backward_strided(dy, x, chunk, coef, relu, dx, s_dy, s_dyx):
    """:func:`_frozen_backward_rows` for the strided family (``chunk``: values per chunk).

    Work items are the ``(chunk, channel)`` pairs of :func:`_grad_sums_strided`, in
    chunk-major order (consecutive items are consecutive in memory); each is one pass of
    :func:`_chunk_frozen_strided` over its runs.
    """
    outer, C, inner = x.shape
    m = outer * inner
    n_chunks = (m + chunk - 1) // chunk
    part_dy = np.empty((n_chunks, C))
    part_dyx = np.empty((n_chunks, C))
    runs = _whole_runs(chunk, inner)
    dy1 = dy.reshape(-1)
    x1 = x.reshape(-1)
    dx1 = dx.reshape(-1)
    # dx coincides with dy or x (the host passes no other overlap): each item then writes
    # through a buffer of its own (see _chunk_frozen_strided).
    in_place = dx1.size > 0 and (
        dx1.ctypes.data == dy1.ctypes.data or dx1.ctypes.data == x1.ctypes.data
    )
    for t in prange(C * n_chunks):
        k = t // C
        c = t - k * C
        o0, o1, i0, i1 = _chunk_span(k, chunk, runs, outer, inner)
        part_dy[k, c], part_dyx[k, c] = _chunk_frozen_strided(
            dy1, x1, dx1, C, inner, c, o0, o1, i0, i1, coef, relu, in_place
        )
    for j in prange((C + _MERGE_BLOCK - 1) // _MERGE_BLOCK):
        c0 = j * _MERGE_BLOCK
        _sum_chunks(part_dy, part_dyx, c0, min(c0 + _MERGE_BLOCK, C), s_dy, s_dyx)


# The three drivers below are written once for both families: ``moments``,
# ``normalize``, ``grad_sums`` and ``input_grad`` (at module level, the host functions of
# the same operations) name the pass drivers of one family and build (see _two_pass).


def _forward_two_pass(x, chunk, eps, gamma, beta, relu, y, mean, var, invstd):
    """Training forward as the statistics pass then the normalize pass (x read twice).

    Same arguments and results as :func:`_forward_fused`; one call from Python.
    """
    C = x.shape[1]
    moments(x, chunk, mean, var)
    m = x.size // C if C else 1
    for c in range(C):
        var[c], invstd[c] = _variance_invstd(var[c], m, eps)
    normalize(x, _coefficient_table(mean, invstd, gamma, beta, x.dtype), relu, y)


def _backward_two_pass(dy, x, chunk, mean, invstd, gamma, beta, relu, dx, dgamma, dbeta):
    """Backward as the sums pass then the dx pass (dy and x read twice).

    Same arguments and results as :func:`_backward_fused`; one call from Python.
    """
    C = x.shape[1]
    coef = _coefficient_table(mean, invstd, gamma, beta, x.dtype)
    dcoef = np.empty((3, C), x.dtype)
    s_dy = np.empty(C)
    s_dyx = np.empty(C)
    grad_sums(dy, x, chunk, coef, relu, s_dy, s_dyx)
    m = x.size // C if C else 1
    for c in range(C):
        invstd_c = np.float64(invstd[c])
        _fill_grad_coefficients(
            s_dy[c], s_dyx[c], m, invstd_c, np.float64(gamma[c]), c, coef, dcoef
        )
        dbeta[c] = s_dy[c]
        dgamma[c] = s_dyx[c] * invstd_c
    input_grad(dy, x, coef, dcoef, relu, dx)


def _inference(x, running_mean, running_var, gamma, beta, eps, relu, y):
    """Inference: coefficients from the running statistics, then the normalize pass.

    One read of x, one write of y; one call from Python. The per-channel arrays may have
    any float dtype.
    """
    coef = np.empty((4, x.shape[1]), x.dtype)
    for c in range(x.shape[1]):
        _fill_coefficients(
            np.float64(running_mean[c]),
            _invstd(np.float64(running_var[c]), eps),
            np.float64(gamma[c]),
            np.float64(beta[c]),
            c,
            coef,
        )
    normalize(x, coef, relu, y)


class _Builds(NamedTuple):
    """The two builds of one driver for one family (see :func:`_build`)."""

    parallel: object
    serial: object


class _Kernels(NamedTuple):
    """The builds of one operation for each family; :func:`_kernel` picks one."""

    rows: _Builds
    strided: _Builds


def _builds(fn, family="", calls=({}, {}), has_prange=True):
    """Compile ``fn`` twice: a ``parallel=True`` build and a serial build.

    Each build is a copy of the function under its own qualified name (``fn``'s, plus
    ``family`` and ``_serial`` for the serial one), so that every build has its own
    entry in Numba's on-disk cache.

    Parameters
    ----------
    fn : function
        A Python function whose loops use ``prange`` (a serial build runs them in order).
    family : str, optional
        Suffix naming the family of a driver written for both (``"_rows"``).
    calls : tuple of dict, optional
        ``({global name: dispatcher}, {...})``: what the parallel and the serial build
        call by that name.
    has_prange : bool, optional
        False for a driver whose parallelism is all in the drivers it calls: both builds
        are then compiled without ``parallel=True`` (which would find nothing to do).

    Returns
    -------
    _Builds
    """
    builds = []
    for serial, suffix in ((False, family), (True, family + "_serial")):
        scope = dict(fn.__globals__)
        scope.update(calls[serial])
        copy = types.FunctionType(
            fn.__code__, scope, fn.__name__ + suffix, fn.__defaults__, fn.__closure__
        )
        copy.__qualname__ = fn.__qualname__ + suffix
        copy.__doc__ = fn.__doc__
        builds.append(njit(parallel=not serial and has_prange, **_config.JIT_OPTIONS)(copy))
    return _Builds(*builds)


def _two_pass(fn, calls):
    """The builds of a driver written for both families that calls the pass drivers.

    The serial build inlines the serial pass drivers (compiled as separate functions,
    each pass was compiled twice over, once on its own and once more as part of the
    caller). The parallel build calls the separately compiled parallel pass drivers:
    with their prange loops inlined into it, the two-pass forward of a (32, 64, 56, 56)
    float32 batch ran 3.3x slower.

    Parameters
    ----------
    fn : function
    calls : dict
        ``{global name: _Kernels}``: the pass drivers ``fn`` calls by that name.

    Returns
    -------
    _Kernels
    """
    families = []
    for family in _Kernels._fields:
        parallel = {name: getattr(kernels, family).parallel for name, kernels in calls.items()}
        serial = {
            name: njit(inline="always", **_config.JIT_OPTIONS)(
                getattr(kernels, family).serial.py_func
            )
            for name, kernels in calls.items()
        }
        families.append(_builds(fn, "_" + family, (parallel, serial), has_prange=False))
    return _Kernels(*families)


moments_kernels = _Kernels(_builds(_moments_rows), _builds(_moments_strided))
normalize_kernels = _Kernels(_builds(_normalize_rows), _builds(_normalize_strided))
grad_sums_kernels = _Kernels(_builds(_grad_sums_rows), _builds(_grad_sums_strided))
input_grad_kernels = _Kernels(_builds(_input_grad_rows), _builds(_input_grad_strided))
frozen_backward_kernels = _Kernels(
    _builds(_frozen_backward_rows), _builds(_frozen_backward_strided)
)
forward_fused_kernels = _builds(_forward_fused)
backward_fused_kernels = _builds(_backward_fused)
forward_two_pass_kernels = _two_pass(
    _forward_two_pass, {"moments": moments_kernels, "normalize": normalize_kernels}
)
backward_two_pass_kernels = _two_pass(
    _backward_two_pass, {"grad_sums": grad_sums_kernels, "input_grad": input_grad_kernels}
)
inference_kernels = _two_pass(_inference, {"normalize": normalize_kernels})
residual_kernels = _Kernels(_builds(_residual_rows), _builds(_residual_strided))


# --------------------------------------------------------------------------------------
# Small calls: one serial driver per operation for a rows batch of one chunk, with fewer
# arguments than the general drivers and its statistics written in their final dtype
# (docs/cpu.md, "Small calls"). Each runs the serial rows passes, inlined as in the
# serial two-pass builds, on a one-chunk batch: the same operations in the same order,
# so bitwise the results of the general drivers.
# --------------------------------------------------------------------------------------


@njit(**_ELEMENTWISE)
def _normalize_small(x, coef, relu, y):
    """:func:`_normalize_rows` for a small call (serial): four rows per pass of the
    channel loop.

    Each coefficient vector is loaded once for four rows, not once per row: the
    normalize pass of a (256, 64) float32 batch loads five vectors per vector written
    (x and the four coefficients), which limits it, not the arithmetic. The same formula
    per value, so the same results as :func:`_normalize_rows`. Flat arrays and unsigned
    offsets, as in :func:`_normalize_run` (with 2-D indexing the loop did not vectorize).

    Parameters
    ----------
    x, y : ndarray, shape (outer, C, 1)
    coef : ndarray, shape (4, C)
    relu : bool
    """
    outer, C, _ = x.shape
    x1 = x.reshape(-1)
    y1 = y.reshape(-1)
    hi, lo, scale, shift = coef[MEAN_HI], coef[MEAN_LO], coef[SCALE], coef[SHIFT]
    zero = coef.dtype.type(0)
    width = np.uint64(C)
    for k in range(outer // 4):
        r0 = np.uint64(4 * k * C)
        r1 = r0 + width
        r2 = r1 + width
        r3 = r2 + width
        for c in range(width):
            h, lo_c, s, t = hi[c], lo[c], scale[c], shift[c]
            y1[r0 + c] = _normalized(x1[r0 + c], h, lo_c, s, t, relu, zero)
            y1[r1 + c] = _normalized(x1[r1 + c], h, lo_c, s, t, relu, zero)
            y1[r2 + c] = _normalized(x1[r2 + c], h, lo_c, s, t, relu, zero)
            y1[r3 + c] = _normalized(x1[r3 + c], h, lo_c, s, t, relu, zero)
    for r in range(outer - outer % 4, outer):
        r0 = np.uint64(r * C)
        for c in range(width):
            y1[r0 + c] = _normalized(x1[r0 + c], hi[c], lo[c], scale[c], shift[c], relu, zero)


@njit(**_ELEMENTWISE)
def _input_grad_small(dy, x, coef, dcoef, relu, dx):
    """:func:`_input_grad_rows` for a small call (serial): four rows per pass of the
    channel loop, as in :func:`_normalize_small` (seven coefficient vectors per vector
    written, else).

    Parameters
    ----------
    dy, x, dx : ndarray, shape (outer, C, 1)
    coef : ndarray, shape (4, C)
    dcoef : ndarray, shape (3, C)
    relu : bool
    """
    outer, C, _ = x.shape
    dy1 = dy.reshape(-1)
    x1 = x.reshape(-1)
    dx1 = dx.reshape(-1)
    hi, lo, scale, shift = coef[MEAN_HI], coef[MEAN_LO], coef[SCALE], coef[SHIFT]
    a, b, d = dcoef[0], dcoef[1], dcoef[2]
    zero = coef.dtype.type(0)
    width = np.uint64(C)
    for k in range(outer // 4):
        r0 = np.uint64(4 * k * C)
        r1 = r0 + width
        r2 = r1 + width
        r3 = r2 + width
        for c in range(width):
            h, lo_c, s, t = hi[c], lo[c], scale[c], shift[c]
            a_c, b_c, d_c = a[c], b[c], d[c]
            dx1[r0 + c] = _input_grad_value(
                dy1[r0 + c], x1[r0 + c], h, lo_c, s, t, a_c, b_c, d_c, relu, zero
            )
            dx1[r1 + c] = _input_grad_value(
                dy1[r1 + c], x1[r1 + c], h, lo_c, s, t, a_c, b_c, d_c, relu, zero
            )
            dx1[r2 + c] = _input_grad_value(
                dy1[r2 + c], x1[r2 + c], h, lo_c, s, t, a_c, b_c, d_c, relu, zero
            )
            dx1[r3 + c] = _input_grad_value(
                dy1[r3 + c], x1[r3 + c], h, lo_c, s, t, a_c, b_c, d_c, relu, zero
            )
    for r in range(outer - outer % 4, outer):
        r0 = np.uint64(r * C)
        for c in range(width):
            dx1[r0 + c] = _input_grad_value(
                dy1[r0 + c],
                x1[r0 + c],
                hi[c],
                lo[c],
                scale[c],
                shift[c],
                a[c],
                b[c],
                d[c],
                relu,
                zero,
            )


def _small_forward(x, eps, gamma, beta, relu, y, stats):
    """Training forward of a one-chunk rows batch: :func:`_forward_two_pass` with the
    statistics written in their final dtype.

    Two passes over ``x`` (statistics, normalize), both from cache at this size.

    Parameters
    ----------
    x : ndarray, shape (outer, C, 1), C-contiguous
        ``outer`` at most one reduction chunk (see :class:`Drivers`).
    eps : float
    gamma, beta : ndarray, shape (C,), float32 or float64 (used as float64)
    relu : bool
    y : ndarray, x's dtype and size, C-contiguous, any shape
        Output (viewed as ``x``'s shape here: the caller passes the array it returns and
        spares a reshape, ~0.15 us of a small call).
    stats : ndarray, shape (2, C)
        Output: the batch mean and ``1 / sqrt(var + eps)``, each computed in float64 and
        stored in ``stats``'s dtype.
    """
    outer, C, _ = x.shape
    y3 = y.reshape(x.shape)
    mean = np.empty(C)
    var = np.empty(C)
    invstd = np.empty(C)
    # one chunk of `outer` rows: the chunk of the plan (>= outer) reduces the same rows
    moments(x, outer, mean, var)
    for c in range(C):
        var[c], invstd[c] = _variance_invstd(var[c], outer, eps)
        stats[0, c] = mean[c]
        stats[1, c] = invstd[c]
    _normalize_small(x, _coefficient_table(mean, invstd, gamma, beta, x.dtype), relu, y3)


def _small_backward(dy, x, mean, invstd, gamma, beta, relu, dx, grads):
    """Backward of a one-chunk rows batch: :func:`_backward_two_pass` with ``dgamma`` and
    ``dbeta`` in one array.

    Parameters
    ----------
    dy : ndarray, x's dtype and size, C-contiguous, any shape
        Viewed as ``x``'s shape here (see ``y`` in :func:`_small_forward`).
    x : ndarray, shape (outer, C, 1), C-contiguous
        ``outer`` at most one reduction chunk.
    mean, invstd, gamma, beta : ndarray, shape (C,), float32 or float64
    relu : bool
    dx : ndarray, x's dtype and size, C-contiguous, any shape
        Output, viewed as ``x``'s shape.
    grads : ndarray, shape (2, C)
        Output: ``dgamma``, ``dbeta``, computed in float64 and stored in its dtype.
    """
    outer, C, _ = x.shape
    dy3 = dy.reshape(x.shape)
    dx3 = dx.reshape(x.shape)
    coef = _coefficient_table(mean, invstd, gamma, beta, x.dtype)
    dcoef = np.empty((3, C), x.dtype)
    s_dy = np.empty(C)
    s_dyx = np.empty(C)
    grad_sums(dy3, x, outer, coef, relu, s_dy, s_dyx)
    for c in range(C):
        invstd_c = np.float64(invstd[c])
        _fill_grad_coefficients(
            s_dy[c], s_dyx[c], outer, invstd_c, np.float64(gamma[c]), c, coef, dcoef
        )
        grads[1, c] = s_dy[c]
        grads[0, c] = s_dyx[c] * invstd_c
    _input_grad_small(dy3, x, coef, dcoef, relu, dx3)


def _small_inference(x, running_mean, running_var, gamma, beta, eps, relu, y):
    """Inference of a small rows batch: :func:`_inference` with
    :func:`_normalize_small`; same arguments and results, but ``y`` of any shape (see
    :func:`_small_forward`)."""
    y3 = y.reshape(x.shape)
    coef = np.empty((4, x.shape[1]), x.dtype)
    for c in range(x.shape[1]):
        _fill_coefficients(
            np.float64(running_mean[c]),
            _invstd(np.float64(running_var[c]), eps),
            np.float64(gamma[c]),
            np.float64(beta[c]),
            c,
            coef,
        )
    _normalize_small(x, coef, relu, y3)


def _small_build(fn, calls):
    """The serial build of a small-call driver, with the serial rows pass drivers it
    calls by name (``{global name: _Kernels}``) inlined, as in :func:`_two_pass`."""
    scope = dict(fn.__globals__)
    for name, kernels in calls.items():
        scope[name] = njit(inline="always", **_config.JIT_OPTIONS)(kernels.rows.serial.py_func)
    copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = fn.__qualname__
    copy.__doc__ = fn.__doc__
    return njit(**_config.JIT_OPTIONS)(copy)


normalize_small = _normalize_small  # for fastbn.cpu_masked's small-call driver
small_forward_kernel = _small_build(_small_forward, {"moments": moments_kernels})
small_backward_kernel = _small_build(_small_backward, {"grad_sums": grad_sums_kernels})
small_inference_kernel = _small_build(_small_inference, {})


@njit(**_EXACT)
def fill_grad_coefficients(s_dy, s_dyx, m, invstd, gamma, coef, dcoef):
    """dx coefficient table of every channel (see :func:`_fill_grad_coefficients`).

    Parameters
    ----------
    s_dy, s_dyx : ndarray of float64, shape (C,)
    m : int
    invstd, gamma : ndarray of float64, shape (C,)
    coef : ndarray, shape (4, C)
    dcoef : ndarray, shape (3, C)
        Output.
    """
    for c in range(s_dy.shape[0]):
        _fill_grad_coefficients(s_dy[c], s_dyx[c], m, invstd[c], gamma[c], c, coef, dcoef)


@njit(**_EXACT)
def running_values(running_mean, running_var, mean, var, m, momentum, unbiased, new_mean, new_var):
    """``new = (1 - momentum) * running + momentum * batch``, into ``new_mean``/``new_var``.

    The running statistics themselves are not written: the caller stores the new values
    once every check has passed (nothing written before an error).

    Parameters
    ----------
    running_mean, running_var : ndarray, shape (C,)
        The current running statistics (native float32 or float64).
    mean, var : ndarray of float64, shape (C,)
        Batch mean and biased batch variance.
    m : int
        Values per channel in the (global) batch.
    momentum : float
        Weight of the new batch.
    unbiased : bool
        Use ``var * m / (m - 1)`` (PyTorch) rather than ``var`` (Keras).
    new_mean, new_var : ndarray, shape (C,)
        Output, of the running statistics' dtypes: each value is computed in float64 and
        rounded once on the store (a value too large for the dtype becomes inf).

    Returns
    -------
    bool
        True when the batch statistics and every new value are finite.
    """
    correction = m / (m - 1.0) if unbiased else 1.0
    finite = True
    for c in range(mean.shape[0]):
        new_mean[c] = (1.0 - momentum) * running_mean[c] + momentum * mean[c]
        new_var[c] = (1.0 - momentum) * running_var[c] + momentum * var[c] * correction
        if not (
            np.isfinite(mean[c])
            and np.isfinite(var[c])
            and np.isfinite(new_mean[c])
            and np.isfinite(new_var[c])
        ):
            finite = False
    return finite


def drivers():
    """Every build of every driver (the dispatchers the host side calls), in a fixed order.

    Returns
    -------
    list of numba Dispatcher
    """
    found = []
    for kernels in (
        moments_kernels,
        normalize_kernels,
        grad_sums_kernels,
        input_grad_kernels,
        forward_two_pass_kernels,
        backward_two_pass_kernels,
        inference_kernels,
        residual_kernels,
        frozen_backward_kernels,
    ):
        found += [*kernels.rows, *kernels.strided]
    found += [*forward_fused_kernels, *backward_fused_kernels]
    return found + [small_forward_kernel, small_backward_kernel, small_inference_kernel]


# --------------------------------------------------------------------------------------
# Host side: pick the build (serial or parallel) and the fused or two-pass path, allocate
# the small per-channel buffers. Arguments are checked by fastbn.api.
# --------------------------------------------------------------------------------------


class _Plan(NamedTuple):
    """How a shape is computed: a function of the shape and dtype only.

    Attributes
    ----------
    chunk : int
        Values per reduction chunk (strided) or rows per chunk (rows); see :func:`_chunk`.
    serial : bool
        Too small to pay for a parallel region (``_config.SERIAL_BYTES``).
    fuse_forward, fuse_backward : bool
        The training forward (backward) runs its passes fused per channel (see
        :func:`_fusable`).
    """

    chunk: int
    serial: bool
    fuse_forward: bool
    fuse_backward: bool


@functools.lru_cache(maxsize=1024)
def _plan_of(shape, itemsize):
    """The :class:`_Plan` of an ``(outer, C, inner)`` shape (cached: a call in a training
    loop sees the same few shapes over and over)."""
    outer, C, inner = shape
    nbytes = outer * C * inner * itemsize
    serial = nbytes < _config.SERIAL_BYTES
    if not serial:
        # Start Numba's threading layer before a parallel build runs. The parallel builds
        # of the drivers without a prange of their own (two-pass forward and backward,
        # inference) call parallel drivers; loaded from the on-disk cache they do not
        # start it, and when one of them was the first parallel call of a process, the
        # process crashed (numba/numba#8578). numba.get_num_threads() starts it.
        numba.get_num_threads()
    return _Plan(
        _chunk(shape, itemsize), serial, _fusable(shape, itemsize, 1), _fusable(shape, itemsize, 2)
    )


def _plan(x3):
    """The :class:`_Plan` of ``x3``."""
    return _plan_of(x3.shape, x3.dtype.itemsize)


plan = _plan  # the host's name for it (the direct path and the benchmarks plan once)
plan_of = _plan_of  # by shape and itemsize (fastbn.cpu_masked caches its plans so)


def _build_of(builds, plan):
    """The build of a driver (:class:`_Builds`) that ``plan`` asks for."""
    return builds.serial if plan.serial else builds.parallel


def _kernel(kernels, x3, plan):
    """The driver of ``kernels`` (:class:`_Kernels`) for ``x3``'s family and ``plan``."""
    return _build_of(kernels.rows if x3.shape[2] == 1 else kernels.strided, plan)


def _chunk(shape, itemsize):
    """Reduction chunk of an ``(outer, C, inner)`` shape: values per chunk (strided) or
    rows per chunk (rows).

    A function of the shape and dtype only, never of the thread count. Strided chunks
    are whole runs of ``inner`` values: as many outer rows as make ``CHUNK_BYTES`` of
    all channels, so that the chunk-major sweep of the reduction reads memory in order,
    and at least ``CHUNK_MIN_CHANNEL_BYTES`` of the channel, so that short runs do not
    make a work item of a few values; runs longer than ``CHUNK_BYTES`` are cut into
    ``CHUNK_BYTES`` pieces.

    Examples
    --------
    >>> _chunk((128, 1024, 49), 4)  # 7 x 7 float32 runs of 196 bytes: 6 per chunk
    294
    """
    outer, C, inner = shape
    if not outer * C * inner:  # nothing to chunk (C == 0, an empty batch): any chunk will do
        return 1
    if inner == 1:
        return max(1, _config.CHUNK_BYTES // (C * itemsize))
    run_bytes = inner * itemsize
    if run_bytes > _config.CHUNK_BYTES:
        return _config.CHUNK_BYTES // itemsize
    return inner * max(
        _config.CHUNK_BYTES // (C * run_bytes), -(-_config.CHUNK_MIN_CHANNEL_BYTES // run_bytes)
    )


def _fusable(shape, itemsize, arrays):
    """True when fusing the passes per channel pays, for an operation that reads
    ``arrays`` x-sized arrays twice in its two-pass form (forward 1, backward 2).

    Fused, a thread owns whole channels and reads each from memory once, then again from
    its cache. That pays only when every condition holds: a channel is small enough to
    stay in cache (``_config.FUSE_BYTES``); it is made of long runs (short runs, walked
    one channel per thread, defeat the prefetchers: ``_config.FUSE_MIN_RUN_BYTES``); and
    the arrays do not fit in the last-level cache, where the second of the two streaming
    passes would find them anyway (``_config.LLC_BYTES``).

    Examples
    --------
    >>> _fusable((64, 128, 28 * 28), 4, 2)  # runs of 3136 bytes: on no machine
    False
    >>> _fusable((32, 64, 56 * 56), 4, 2) == (2 * 25690112 > _config.LLC_BYTES)  # 25.7 MB
    True
    """
    outer, C, inner = shape
    channel = outer * inner * itemsize
    return (
        inner > 1  # the fused kernels are of the strided family
        and inner * itemsize >= _config.FUSE_MIN_RUN_BYTES
        and channel <= _config.FUSE_BYTES
        and arrays * C * channel > _config.LLC_BYTES
    )


def moments(x3):
    """Per-channel mean and M2 (sum of squared deviations) of ``x3``, in float64.

    Parameters
    ----------
    x3 : ndarray, shape (outer, C, inner), float32 or float64, C-contiguous

    Returns
    -------
    tuple of ndarray
        ``(mean, m2)``, float64, shape (C,).

    Examples
    --------
    >>> import numpy as np
    >>> mean, m2 = moments(np.arange(6.0).reshape(3, 2, 1))
    >>> mean, m2
    (array([2., 3.]), array([8., 8.]))
    """
    C = x3.shape[1]
    mean = np.empty(C)
    m2 = np.empty(C)
    plan = _plan(x3)
    _kernel(moments_kernels, x3, plan)(x3, plan.chunk, mean, m2)
    return mean, m2


def coefficients(mean, invstd, gamma, beta, dtype):
    """Normalizing coefficient table ``(4, C)`` in ``dtype`` (see :data:`MEAN_HI`): the
    host's entry to :func:`_coefficient_table`, which takes the same arguments.

    Examples
    --------
    >>> import numpy as np
    >>> coefficients(np.array([1.0]), np.array([2.0]), np.ones(1), np.zeros(1), np.float32)[:, 0]
    array([1., 0., 2., 0.], dtype=float32)
    """
    return _coefficient_table(mean, invstd, gamma, beta, np.dtype(dtype))


def normalize(x3, coef, relu, y3):
    """Write ``((x - hi) - lo) * scale + shift`` (then ReLU) into ``y3``: 1 read, 1 write.

    Parameters
    ----------
    x3, y3 : ndarray, shape (outer, C, inner), same dtype, C-contiguous
    coef : ndarray, shape (4, C), same dtype (from :func:`coefficients`)
    relu : bool

    Examples
    --------
    >>> import numpy as np
    >>> x = np.arange(4.0).reshape(2, 2, 1)
    >>> y = np.empty_like(x)
    >>> coef = coefficients(np.array([1.0, 2.0]), np.ones(2), np.ones(2), np.zeros(2), x.dtype)
    >>> normalize(x, coef, False, y)
    >>> y.ravel()
    array([-1., -1.,  1.,  1.])
    """
    _kernel(normalize_kernels, x3, _plan(x3))(x3, coef, relu, y3)


def inference(x3, running_mean, running_var, gamma, beta, eps, relu, y3):
    """Normalize with given statistics: ``y3 = gamma * (x3 - mean) / sqrt(var + eps) + beta``.

    Parameters
    ----------
    x3, y3 : ndarray, shape (outer, C, inner), same dtype, C-contiguous
    running_mean, running_var, gamma, beta : ndarray, shape (C,), any float dtype
    eps : float
    relu : bool

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[[1.0]], [[3.0]]])
    >>> y = np.empty_like(x)
    >>> inference(x, np.array([2.0]), np.array([1.0]), np.ones(1), np.zeros(1), 0.0, False, y)
    >>> y.ravel()
    array([-1.,  1.])
    """
    inference_kernel(x3, _plan(x3))(x3, running_mean, running_var, gamma, beta, eps, relu, y3)


def _use_fused(fuse, planned, x3):
    """Whether a training pass runs fused: as planned (``fuse`` None), or as asked, the
    fused kernels being for the strided family only."""
    return planned if fuse is None else bool(fuse) and x3.shape[2] > 1


def forward_kernel(x3, plan, fuse=None):
    """The training forward's driver for ``x3`` and its ``plan``: fused or two-pass (see
    :func:`forward_training`), serial or parallel build. Its arguments are
    ``(x3, plan.chunk, eps, gamma, beta, relu, y3, mean, var, invstd)``.

    Examples
    --------
    >>> import numpy as np
    >>> x3 = np.zeros((256, 64, 1), np.float32)
    >>> forward_kernel(x3, plan(x3)) is forward_two_pass_kernels.rows.serial
    True
    """
    if _use_fused(fuse, plan.fuse_forward, x3):
        return _build_of(forward_fused_kernels, plan)
    return _kernel(forward_two_pass_kernels, x3, plan)


def backward_kernel(x3, plan, fuse=None):
    """The backward's driver for ``x3`` and its ``plan`` (see :func:`backward`). Its
    arguments are ``(dy3, x3, plan.chunk, mean, invstd, gamma, beta, relu, dx3, dgamma,
    dbeta)``.

    Examples
    --------
    >>> import numpy as np
    >>> x3 = np.zeros((256, 64, 1), np.float32)
    >>> backward_kernel(x3, plan(x3)) is backward_two_pass_kernels.rows.serial
    True
    """
    if _use_fused(fuse, plan.fuse_backward, x3):
        return _build_of(backward_fused_kernels, plan)
    return _kernel(backward_two_pass_kernels, x3, plan)


def inference_kernel(x3, plan):
    """Inference's driver for ``x3`` and its ``plan`` (see :func:`inference`). Its
    arguments are ``(x3, running_mean, running_var, gamma, beta, eps, relu, y3)``.

    Examples
    --------
    >>> import numpy as np
    >>> x3 = np.zeros((4, 64, 1), np.float64)
    >>> inference_kernel(x3, plan(x3)) is inference_kernels.rows.serial
    True
    """
    return _kernel(inference_kernels, x3, plan)


class Drivers(NamedTuple):
    """The plan's chunk and the drivers of one shape and dtype, for the direct path.

    Attributes
    ----------
    chunk : int
        See :class:`_Plan`.
    forward, backward, inference : numba Dispatcher
        :func:`forward_kernel`, :func:`backward_kernel`, :func:`inference_kernel`.
    small : bool
        A serial rows batch of one chunk, which :data:`small_forward_kernel` and
        :data:`small_backward_kernel` take (fewer arguments, statistics in their final
        dtype; bitwise the results of ``forward`` and ``backward``).
    """

    chunk: int
    forward: object
    backward: object
    inference: object
    small: bool


@functools.lru_cache(maxsize=1024)
def _drivers_of(shape, itemsize):
    """The :class:`Drivers` of an ``(outer, C, inner)`` shape (cached as the plan is)."""
    planned = _plan_of(shape, itemsize)
    family = "rows" if shape[2] == 1 else "strided"  # as _kernel picks it
    forward = forward_fused_kernels if planned.fuse_forward else forward_two_pass_kernels
    backward = backward_fused_kernels if planned.fuse_backward else backward_two_pass_kernels
    return Drivers(
        planned.chunk,
        _build_of(forward if planned.fuse_forward else getattr(forward, family), planned),
        _build_of(backward if planned.fuse_backward else getattr(backward, family), planned),
        _build_of(getattr(inference_kernels, family), planned),
        planned.serial and family == "rows" and planned.chunk >= shape[0],
    )


def drivers_for(x3):
    """The :class:`Drivers` of ``x3``: one cached look-up for the plan and the driver of a
    small call, whose host time is a large part of it (docs/cpu.md, "Small calls").

    Examples
    --------
    >>> import numpy as np
    >>> x3 = np.zeros((256, 64, 1), np.float32)
    >>> drivers_for(x3).forward is forward_kernel(x3, plan(x3))
    True
    """
    return _drivers_of(x3.shape, x3.dtype.itemsize)


def forward_training(x3, gamma, beta, eps, relu, y3, fuse=None):
    """Batch statistics of ``x3`` and ``y3 = normalized x3``: the training forward.

    Runs fused per channel (x read from memory once) where that pays (see
    :func:`_fusable`), else as the statistics pass then the normalize pass (x read twice).

    Parameters
    ----------
    x3, y3 : ndarray, shape (outer, C, inner), same dtype, C-contiguous
    gamma, beta : ndarray, shape (C,), any float dtype (used as float64)
    eps : float
    relu : bool
    fuse : bool, optional
        None (default): the plan's choice. True: the fused path for any strided layout;
        False: the two passes (the two agree to rounding).

    Returns
    -------
    tuple of ndarray
        ``(mean, var, invstd)``: float64 batch mean, biased variance and
        ``1 / sqrt(var + eps)``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[[1.0], [2.0]], [[3.0], [6.0]]])
    >>> y = np.empty_like(x)
    >>> mean, var, _ = forward_training(x, np.ones(2), np.zeros(2), 1e-5, False, y)
    >>> mean, var
    (array([2., 4.]), array([1., 4.]))
    """
    stats = np.empty((3, x3.shape[1]))
    planned = _plan(x3)
    forward_kernel(x3, planned, fuse)(
        x3, planned.chunk, eps, gamma, beta, relu, y3, stats[0], stats[1], stats[2]
    )
    return stats[0], stats[1], stats[2]


def grad_sums(dy3, x3, coef, relu):
    """Per-channel ``sum dy`` and ``sum dy * (x - mean)`` (float64): 1 read of dy and x.

    Parameters
    ----------
    dy3, x3 : ndarray, shape (outer, C, inner), same dtype, C-contiguous
    coef : ndarray, shape (4, C)
        Coefficients of the saved statistics (mean in ``MEAN_HI``).
    relu : bool

    Returns
    -------
    tuple of ndarray
        ``(sum_dy, sum_dy_xmu)``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[[0.0]], [[2.0]]])
    >>> coef = coefficients(np.ones(1), np.ones(1), np.ones(1), np.zeros(1), x.dtype)
    >>> grad_sums(np.ones_like(x), x, coef, False)
    (array([2.]), array([0.]))
    """
    C = x3.shape[1]
    s_dy = np.empty(C)
    s_dyx = np.empty(C)
    plan = _plan(x3)
    _kernel(grad_sums_kernels, x3, plan)(dy3, x3, plan.chunk, coef, relu, s_dy, s_dyx)
    return s_dy, s_dyx


def input_grad(dy3, x3, coef, s_dy, s_dyx, m, invstd, gamma, relu, dx3):
    """Write ``dx`` from the channel sums: 1 read of dy and x, 1 write of dx.

    Parameters
    ----------
    dy3, x3, dx3 : ndarray, shape (outer, C, inner), same dtype, C-contiguous
    coef : ndarray, shape (4, C)
    s_dy, s_dyx : ndarray of float64, shape (C,)
        Sums over the whole (possibly global) batch.
    m : int
        Values per channel in the whole batch.
    invstd, gamma : ndarray of float64, shape (C,)
    relu : bool

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[[0.0]], [[2.0]]])
    >>> dx = np.empty_like(x)
    >>> coef = coefficients(np.ones(1), np.ones(1), np.ones(1), np.zeros(1), x.dtype)
    >>> s_dy, s_dyx = np.array([2.0]), np.array([0.0])
    >>> input_grad(np.ones_like(x), x, coef, s_dy, s_dyx, 2, np.ones(1), np.ones(1), False, dx)
    >>> dx.ravel()
    array([0., 0.])
    """
    dcoef = np.empty((3, x3.shape[1]), x3.dtype)
    fill_grad_coefficients(s_dy, s_dyx, m, invstd, gamma, coef, dcoef)
    _kernel(input_grad_kernels, x3, _plan(x3))(dy3, x3, coef, dcoef, relu, dx3)


def backward(dy3, x3, mean, invstd, gamma, beta, relu, dx3, fuse=None):
    """The backward pass: channel sums, then dx.

    Runs fused per channel (dy and x read from memory once) where that pays (see
    :func:`_fusable`), else reads dy and x twice.

    Parameters
    ----------
    dy3, x3, dx3 : ndarray, shape (outer, C, inner), same dtype, C-contiguous
    mean, invstd : ndarray, shape (C,), any float dtype
        The forward's saved statistics.
    gamma, beta : ndarray, shape (C,), any float dtype
        The forward's parameters.
    relu : bool
    fuse : bool, optional
        As in :func:`forward_training`.

    Returns
    -------
    tuple of ndarray
        ``(dgamma, dbeta)``: ``invstd * sum dy * (x - mean)`` and ``sum dy``, computed in
        float64 and returned in the statistics dtype (float64 for float64 data, float32
        otherwise).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[[0.0]], [[2.0]]])
    >>> dx = np.empty_like(x)
    >>> dy = np.array([[[1.0]], [[3.0]]])
    >>> backward(dy, x, np.ones(1), np.ones(1), np.ones(1), np.zeros(1), False, dx)
    (array([2.]), array([4.]))
    """
    grads = np.empty((2, x3.shape[1]), np.float64 if x3.dtype.char == "d" else np.float32)
    planned = _plan(x3)
    backward_kernel(x3, planned, fuse)(
        dy3, x3, planned.chunk, mean, invstd, gamma, beta, relu, dx3, grads[0], grads[1]
    )
    return grads[0], grads[1]


def normalize_residual(x3, z3, coef, relu, y3):
    """Write ``((x - hi) - lo) * scale + shift + z`` (then ReLU) into ``y3``: the
    normalization and the residual add in one pass (1 read of x and z, 1 write).

    Parameters
    ----------
    x3, z3, y3 : ndarray, shape (outer, C, inner), same dtype, C-contiguous
        ``y3`` may be ``x3`` or ``z3`` itself (each value is read before it is written).
    coef : ndarray, shape (4, C), same dtype (from :func:`coefficients`)
    relu : bool

    Examples
    --------
    >>> import numpy as np
    >>> x = np.arange(4.0).reshape(2, 2, 1)
    >>> y = np.empty_like(x)
    >>> coef = coefficients(np.array([1.0, 2.0]), np.ones(2), np.ones(2), np.zeros(2), x.dtype)
    >>> normalize_residual(x, np.full_like(x, 0.5), coef, True, y)
    >>> y.ravel()
    array([0. , 0. , 1.5, 1.5])
    """
    _kernel(residual_kernels, x3, _plan(x3))(x3, x3, z3, coef, relu, False, y3)


def residual_grad(dy3, x3, z3, coef, relu, g3):
    """The gradient of the sum in ``act(bn(x) + z)``: ``g3 = dy3``, zeroed with ``relu``
    where ``((x - hi) - lo) * scale + shift + z`` (the forward's, bit for bit) is not
    positive. It is the residual's gradient and the ``dy`` of the plain backward.

    One read of dy, x and z, one write (without ``relu`` ``z`` is not needed: pass
    ``dy3`` for it).

    Parameters
    ----------
    dy3, x3, z3, g3 : ndarray, shape (outer, C, inner), same dtype, C-contiguous
    coef : ndarray, shape (4, C), same dtype (from :func:`coefficients`)
    relu : bool

    Examples
    --------
    >>> import numpy as np
    >>> x = np.arange(4.0).reshape(2, 2, 1)
    >>> g = np.empty_like(x)
    >>> coef = coefficients(np.array([1.0, 2.0]), np.ones(2), np.ones(2), np.zeros(2), x.dtype)
    >>> residual_grad(np.ones_like(x), x, np.full_like(x, 0.5), coef, True, g)
    >>> g.ravel()
    array([0., 0., 1., 1.])
    """
    _kernel(residual_kernels, x3, _plan(x3))(dy3, x3, z3, coef, relu, True, g3)


def frozen_backward(dy3, x3, coef, relu, dx3):
    """The backward through fixed statistics: ``dx3 = scale * dy`` (ReLU-masked dy), and
    the per-channel sums of :func:`grad_sums`, in one pass: 1 read of dy and x, 1 write
    of dx.

    ``mean`` and ``invstd`` were constants of the forward (running statistics), so dx
    needs no sum over the batch: ``dx = gamma * invstd * dy``. The sums give the
    parameter gradients, ``dbeta = sum dy`` and ``dgamma = invstd * sum dy * (x - mean)``.
    Deterministic: fixed chunks, summed in chunk order.

    Parameters
    ----------
    dy3, x3, dx3 : ndarray, shape (outer, C, inner), same dtype, C-contiguous
        ``dx3`` may be ``dy3`` itself.
    coef : ndarray, shape (4, C)
        :func:`coefficients` of the fixed statistics, ``gamma`` and ``beta``.
    relu : bool

    Returns
    -------
    tuple of ndarray
        ``(sum_dy, sum_dy_xmu)``, float64, shape (C,).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[[0.0]], [[2.0]]])
    >>> dx = np.empty_like(x)
    >>> coef = coefficients(np.ones(1), np.full(1, 0.5), np.full(1, 2.0), np.zeros(1), x.dtype)
    >>> frozen_backward(np.array([[[1.0]], [[3.0]]]), x, coef, False, dx)
    (array([4.]), array([2.]))
    >>> dx.ravel()
    array([1., 3.])
    """
    C = x3.shape[1]
    s_dy = np.empty(C)
    s_dyx = np.empty(C)
    plan = _plan(x3)
    _kernel(frozen_backward_kernels, x3, plan)(dy3, x3, plan.chunk, coef, relu, dx3, s_dy, s_dyx)
    return s_dy, s_dyx
