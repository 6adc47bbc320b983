"""CPU kernels of masked statistics (``mask=``): Numba ``prange`` loops over the canonical
``(outer, C, inner)`` view and the mask's ``(outer, inner)`` view.

The mask selects the positions whose values enter the statistics; it is the same for
every channel, so the count ``m`` of True positions is one number. Two kernels are new,
the others are those of the unmasked path (:mod:`fastbn.cpu`):

- :func:`moments`: per-channel mean and M2 over the True positions (the forward's
  statistics; the forward then normalizes every position with :func:`fastbn.cpu.normalize`).
- :func:`input_grad`: ``dx = a * dy + mask * (b * (x - mean) + d)`` (the backward's sums
  are those of every position, :func:`fastbn.cpu.grad_sums`; see docs/math.md).

They are separate kernels, not a flag of the unmasked ones, so that the unmasked path's
code, hence its speed, is untouched.

Determinism and accuracy follow :mod:`fastbn.cpu`: a fixed partition into chunks of whole
rows that depends on the shape and dtype only, one thread per (channel, chunk), chunk
summaries ``(shift, dev, M2)`` in float64 shifted by the chunk's first True value (the
two-pass method from cache when that value is an outlier), merged per channel in chunk
order through their pooled mean (no ``E[x^2] - E[x]^2`` cancellation). A chunk without a
True position contributes nothing. Masked-out values are never read into a sum (a select,
not a multiplication by 0: a NaN in the padding stays out).
"""

import functools
import types
from typing import NamedTuple

import numpy as np
from numba import prange

from . import _config, cpu
from ._config import njit

_REDUCE = _config.JIT_OPTIONS
_ELEMENTWISE = _config.ELEMENTWISE_JIT_OPTIONS
_EXACT = _config.EXACT_JIT_OPTIONS

MEAN_HI, MEAN_LO, SCALE, SHIFT = cpu.MEAN_HI, cpu.MEAN_LO, cpu.SCALE, cpu.SHIFT
_MERGE_BLOCK = _config.MERGE_BLOCK


class _Builds(NamedTuple):
    """A ``parallel=True`` build of a driver and a serial one, for calls too small to pay
    for a parallel region (``_config.SERIAL_BYTES``), as :func:`fastbn.cpu._builds` does."""

    parallel: object
    serial: object


def _two_builds(options):
    """Decorator: compile a driver twice, parallel and serial, each under its own
    qualified name (its own entry in Numba's on-disk cache)."""

    def build(fn):
        copy = types.FunctionType(
            fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__
        )
        copy.__qualname__ = fn.__qualname__ + "_serial"
        copy.__doc__ = fn.__doc__
        return _Builds(njit(parallel=True, **options)(fn), njit(**options)(copy))

    return build


def _build(builds, x3):
    """The build of a driver for ``x3``'s size."""
    return builds.serial if x3.nbytes < _config.SERIAL_BYTES else builds.parallel


# --------------------------------------------------------------------------------------
# The partition
# --------------------------------------------------------------------------------------


def chunk_rows(shape, itemsize):
    """Outer rows per reduction chunk of an ``(outer, C, inner)`` shape (a function of
    the shape and dtype only, never of the thread count).

    As many rows as make ``_config.CHUNK_BYTES`` of all channels, and, for the strided
    family, at least ``_config.CHUNK_MIN_CHANNEL_BYTES`` of one channel (see
    :func:`fastbn.cpu._chunk`); at least one row.

    Examples
    --------
    >>> chunk_rows((1000, 64, 1), 4)
    1024
    """
    outer, C, inner = shape
    rows = _config.CHUNK_BYTES // max(1, C * inner * itemsize)
    if inner > 1:
        rows = max(rows, -(-_config.CHUNK_MIN_CHANNEL_BYTES // (inner * itemsize)))
    return max(1, rows)


@njit(**_EXACT)  # serial: it reads the mask only (1/C of x), a parallel region costs more
def _chunk_counts(w1, inner, rows, counts, first):
    """True positions of each chunk of ``rows`` outer rows, and the flat position of its
    first one (-1 when none).

    Parameters
    ----------
    w1 : ndarray of bool, 1-D
        The flat ``(outer, inner)`` mask.
    inner, rows : int
    counts, first : ndarray of int64, shape (n_chunks,)
        Outputs.
    """
    total = w1.shape[0]
    for k in range(counts.shape[0]):
        j0 = k * rows * inner
        j1 = min(j0 + rows * inner, total)
        n = 0
        for j in range(j0, j1):  # a count without a branch: it vectorizes
            n += w1[j] != 0
        f = -1
        if n:
            for j in range(j0, j1):
                if w1[j]:
                    f = j
                    break
        counts[k] = n
        first[k] = f


# --------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------


@njit(**_REDUCE)
def _masked_sums_strided(x1, w1, C, inner, c, o0, o1, k):
    """``(sum(x - k), sum((x - k)**2))`` in float64 over the True positions of rows
    ``[o0, o1)`` of channel ``c`` (flat arrays, unsigned offsets)."""
    s = 0.0
    q = 0.0
    n = np.uint64(inner)
    for o in range(o0, o1):
        base = np.uint64((o * C + c) * inner)
        wbase = np.uint64(o * inner)
        for i in range(n):
            # the value loaded whatever its bit, then selected: a branch around the load
            # vectorized worse (measured 1.14x against 1.08x the unmasked loop)
            e = np.float64(x1[base + i]) - k
            d = e if w1[wbase + i] != 0 else 0.0
            s += d
            q += d * d
    return s, q


@njit(**_REDUCE)
def _masked_sums_rows(x, w1, r0, r1, k, s, q):
    """Per channel, ``s = sum(x - k)`` and ``q = sum((x - k)**2)`` over the True rows of
    ``[r0, r1)`` (``w1``: the mask, one byte per row), vectorized across channels.

    The loop of :func:`fastbn.cpu._shifted_sums_rows`: the four quarters of the rows at
    once (four sequential memory streams: the unmasked kernel measured 1.4-1.55x faster
    so), each row's deviations multiplied by its mask bit as 0.0 or 1.0, then the rows
    left, False ones skipped. Every row of the chunk is read: reading the True rows only,
    through their indices, broke the streams of a random mask (1.6-2x the unmasked pass,
    docs/cpu.md), and a select per row instead of the product was not vectorized (1.4-3x).
    A non-finite value in a False row makes the sums non-finite (``0 * inf`` is NaN): the
    caller then takes :func:`_masked_sums_rows_select`.
    """
    C = x.shape[1]
    s[:] = 0.0
    q[:] = 0.0
    h = (r1 - r0) // 4
    for r in range(r0, r0 + h):
        t0 = np.float64(w1[r] != 0)
        t1 = np.float64(w1[r + h] != 0)
        t2 = np.float64(w1[r + 2 * h] != 0)
        t3 = np.float64(w1[r + 3 * h] != 0)
        for c in range(C):
            d0 = (np.float64(x[r, c]) - k[c]) * t0
            d1 = (np.float64(x[r + h, c]) - k[c]) * t1
            d2 = (np.float64(x[r + 2 * h, c]) - k[c]) * t2
            d3 = (np.float64(x[r + 3 * h, c]) - k[c]) * t3
            s[c] += (d0 + d1) + (d2 + d3)
            q[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    for r in range(r0 + 4 * h, r1):
        if w1[r]:
            for c in range(C):
                d = np.float64(x[r, c]) - k[c]
                s[c] += d
                q[c] += d * d


@njit(**_REDUCE)
def _masked_sums_rows_select(x, w1, r0, r1, k, s, q):
    """:func:`_masked_sums_rows` with the False rows skipped, never multiplied: a NaN or
    an infinity in the padding stays out. Row by row (slower), for the chunks whose
    product form was not finite."""
    C = x.shape[1]
    s[:] = 0.0
    q[:] = 0.0
    for r in range(r0, r1):
        if w1[r]:
            for c in range(C):
                d = np.float64(x[r, c]) - k[c]
                s[c] += d
                q[c] += d * d


@njit(**_EXACT)
def _finite(s, q):
    """True when every value of ``s`` and ``q`` is finite."""
    for c in range(s.shape[0]):
        if not (np.isfinite(s[c]) and np.isfinite(q[c])):
            return False
    return True


@njit(**_EXACT)
def _merge_masked(part_shift, part_dev, part_m2, counts, k0, c0, c1, m, mean, m2):
    """Merge the chunk summaries of channels ``c0 <= c < c1`` (see
    :func:`fastbn.cpu._merge_chunks`), skipping chunks without a True position; ``k0``
    is the first chunk with one (its shift is the reference), ``m`` the total count."""
    for c in range(c0, c1):
        mean[c] = 0.0
        m2[c] = 0.0
    for k in range(counts.shape[0]):
        n_k = counts[k]
        if n_k == 0:
            continue
        for c in range(c0, c1):
            mean[c] += n_k * ((part_shift[k, c] - part_shift[k0, c]) + part_dev[k, c])
    for c in range(c0, c1):
        mean[c] = mean[c] / m
    for k in range(counts.shape[0]):
        n_k = counts[k]
        if n_k == 0:
            continue
        for c in range(c0, c1):
            d = ((part_shift[k, c] - part_shift[k0, c]) + part_dev[k, c]) - mean[c]
            m2[c] += part_m2[k, c] + n_k * (d * d)
    for c in range(c0, c1):
        mean[c] = part_shift[k0, c] + mean[c]


@njit(**_EXACT)
def _merge_all_chunks(part_shift, part_dev, part_m2, counts, mean, m2):
    """Every channel's chunk summaries ``(n_chunks, C)`` merged into ``mean`` and ``m2``
    (:func:`_merge_masked`, blocks of channels in order), serially: one parallel region
    fewer for the drivers that call it."""
    n_chunks, C = part_shift.shape
    m = 0
    k0 = -1
    for k in range(n_chunks):
        m += counts[k]
        if k0 < 0 and counts[k] > 0:
            k0 = k
    block = _MERGE_BLOCK
    for b in range((C + block - 1) // block):
        c0 = b * block
        _merge_masked(
            part_shift, part_dev, part_m2, counts, k0, c0, min(c0 + block, C), m, mean, m2
        )


@_two_builds(_REDUCE)
def _moments_strided(x, w, rows, counts, first, mean, m2):
    """Masked mean and M2 per channel, strided family (``inner > 1``).

    One read of x and of the mask per channel (a chunk whose first True value is an
    outlier is reduced again, from cache). Work items are ``(chunk, channel)`` pairs in
    chunk-major order.

    Parameters
    ----------
    x : ndarray, shape (outer, C, inner)
    w : ndarray of bool, shape (outer * inner,)
        The flat ``(outer, inner)`` mask.
    rows : int
        Outer rows per chunk.
    counts, first : ndarray of int64, shape (n_chunks,)
        From :func:`_chunk_counts`.
    mean, m2 : ndarray of float64, shape (C,)
        Outputs.
    """
    outer, C, inner = x.shape
    n_chunks = counts.shape[0]
    part_shift = np.zeros((n_chunks, C))
    part_dev = np.zeros((n_chunks, C))
    part_m2 = np.zeros((n_chunks, C))
    x1 = x.reshape(-1)
    w1 = w.reshape(-1)
    for t in prange(C * n_chunks):
        k = t // C
        c = t - k * C
        n = counts[k]
        if n == 0:
            continue
        o0 = k * rows
        o1 = min(o0 + rows, outer)
        j = first[k]
        o = j // inner
        kk = np.float64(x1[(o * C + c) * inner + (j - o * inner)])
        s, q = _masked_sums_strided(x1, w1, C, inner, c, o0, o1, kk)
        if not q <= 16.0 * (q - s * s / n):  # also true for a NaN
            s, _ = _masked_sums_strided(x1, w1, C, inner, c, o0, o1, 0.0)
            kk = s / n
            s, q = _masked_sums_strided(x1, w1, C, inner, c, o0, o1, kk)
        dev = s / n
        part_shift[k, c] = kk
        part_dev[k, c] = dev
        part_m2[k, c] = q - s * dev
    _merge_all_chunks(part_shift, part_dev, part_m2, counts, mean, m2)


@_two_builds(_REDUCE)
def _moments_rows(x, w, rows, counts, first, mean, m2):
    """Masked mean and M2 per channel, rows family (``inner == 1``): each chunk of rows
    reduces every channel at once over its True rows (:func:`_masked_sums_rows`); a chunk
    without one is not read.

    Parameters as :func:`_moments_strided` (``x`` of shape ``(outer, C, 1)``).
    """
    outer, C, _ = x.shape
    x2 = x.reshape(outer, C)
    w1 = w.reshape(-1)
    n_chunks = counts.shape[0]
    part_shift = np.zeros((n_chunks, C))
    part_dev = np.zeros((n_chunks, C))
    part_m2 = np.zeros((n_chunks, C))
    for k in prange(n_chunks):
        n = counts[k]
        if n == 0:
            continue
        r0 = k * rows
        r1 = min(r0 + rows, outer)
        kk = np.empty(C)
        s = np.empty(C)
        q = np.empty(C)
        for c in range(C):
            kk[c] = x2[first[k], c]
        _masked_sums_rows(x2, w1, r0, r1, kk, s, q)
        exact = not _finite(s, q)  # a non-finite value somewhere: skip the False rows
        if exact:
            _masked_sums_rows_select(x2, w1, r0, r1, kk, s, q)
        well_conditioned = True
        for c in range(C):
            if not q[c] <= 16.0 * (q[c] - s[c] * s[c] / n):  # also true for a NaN
                well_conditioned = False
        if not well_conditioned:
            for rerun in range(2):  # the plain sum, then the sums shifted by its mean
                if rerun:
                    for c in range(C):
                        kk[c] = s[c] / n
                else:
                    kk[:] = 0.0
                if exact:
                    _masked_sums_rows_select(x2, w1, r0, r1, kk, s, q)
                else:
                    _masked_sums_rows(x2, w1, r0, r1, kk, s, q)
        for c in range(C):
            dev = s[c] / n
            part_shift[k, c] = kk[c]
            part_dev[k, c] = dev
            part_m2[k, c] = q[c] - s[c] * dev
    _merge_all_chunks(part_shift, part_dev, part_m2, counts, mean, m2)


# --------------------------------------------------------------------------------------
# Input gradient
# --------------------------------------------------------------------------------------


@njit(**_ELEMENTWISE)
def _affine(x, hi, lo, scale, shift):
    """The forward's normalized value, written as :func:`fastbn.cpu.affine` writes it (the
    same options, so that the recomputed ReLU mask is the forward's bit for bit)."""
    return ((x - hi) - lo) * scale + shift


@_two_builds(_ELEMENTWISE)
def _input_grad_rows(dy, x, w, coef, dcoef, relu, dx):
    """``dx = a * dy`` at False rows, ``a * dy + b * (x - mean) + d`` at True rows; one
    read of dy, x and the mask, one write of dx (rows family).

    Parameters
    ----------
    dy, x, dx : ndarray, shape (outer, C, 1)
    w : ndarray of bool, shape (outer,)
    coef : ndarray, shape (4, C)
    dcoef : ndarray, shape (3, C)
        ``a``, ``b``, ``d`` (:func:`fastbn.cpu.fill_grad_coefficients` with the masked count).
    relu : bool
    """
    outer, C, _ = x.shape
    x2 = x.reshape(outer, C)
    dy2 = dy.reshape(outer, C)
    dx2 = dx.reshape(outer, C)
    w1 = w.reshape(-1)
    hi, lo, scale, shift = coef[MEAN_HI], coef[MEAN_LO], coef[SCALE], coef[SHIFT]
    a, b, d = dcoef[0], dcoef[1], dcoef[2]
    zero = coef.dtype.type(0)
    for r in prange(outer):
        if w1[r]:
            for c in range(C):
                xv = x2[r, c]
                g = dy2[r, c]
                if relu and _affine(xv, hi[c], lo[c], scale[c], shift[c]) <= zero:
                    g = zero
                dx2[r, c] = a[c] * g + b[c] * ((xv - hi[c]) - lo[c]) + d[c]
        else:
            for c in range(C):
                g = dy2[r, c]
                if relu and _affine(x2[r, c], hi[c], lo[c], scale[c], shift[c]) <= zero:
                    g = zero
                dx2[r, c] = a[c] * g


@njit(**dict(_ELEMENTWISE, inline="always"))
def _input_grad_run(dy1, x1, w1, dx1, base, wbase, n, hi, lo, scale, shift, a, b, d, relu, zero):
    """The masked dx of one run of ``n`` values (flat arrays, unsigned offsets: ``base``
    into dy, x and dx, ``wbase`` into the mask): ``a * dy`` where the mask is False,
    ``a * dy + b * (x - mean) + d`` where it is True, ``dy`` zeroed where the recomputed
    ReLU output is not positive (``zero``: 0 in the data's dtype). Compiled as part of
    its callers (both take the elementwise options), :func:`_input_grad_strided` and
    :func:`_input_grad_channel`.

    The value is loaded whatever the mask bit, then selected (no branch around the
    loads), so that the loop vectorizes.
    """
    for i in range(n):
        xv = x1[base + i]
        g = dy1[base + i]
        if relu and _affine(xv, hi, lo, scale, shift) <= zero:
            g = zero
        v = a * g
        if w1[wbase + i]:
            v = a * g + b * ((xv - hi) - lo) + d
        dx1[base + i] = v


@_two_builds(_ELEMENTWISE)
def _input_grad_strided(dy, x, w, coef, dcoef, relu, dx):
    """:func:`_input_grad_rows` for the strided family; a work item is one run (one
    outer row of one channel)."""
    outer, C, inner = x.shape
    dy1 = dy.reshape(-1)
    x1 = x.reshape(-1)
    dx1 = dx.reshape(-1)
    w1 = w.reshape(-1)
    zero = coef.dtype.type(0)
    n = np.uint64(inner)
    for t in prange(outer * C):
        o = t // C
        c = t - o * C
        _input_grad_run(
            dy1,
            x1,
            w1,
            dx1,
            np.uint64(t * inner),
            np.uint64(o * inner),
            n,
            coef[MEAN_HI, c],
            coef[MEAN_LO, c],
            coef[SCALE, c],
            coef[SHIFT, c],
            dcoef[0, c],
            dcoef[1, c],
            dcoef[2, c],
            relu,
            zero,
        )


# --------------------------------------------------------------------------------------
# Whole operations: one call from Python (the direct path's drivers)
# --------------------------------------------------------------------------------------


# The passes the whole-operation drivers call, bound to each family's and build's pass
# drivers in the builds' own globals (see _composed).
_moments_pass = _normalize_pass = _grad_sums_pass = _input_grad_pass = None


def _forward(x, w, rows, m, eps, gamma, beta, relu, y, stats):
    """The masked training forward in one call: the chunk counts, the masked statistics
    (``_moments_pass``: :func:`_moments_rows` or :func:`_moments_strided`), then the
    normalize pass over every position (``_normalize_pass``: :func:`fastbn.cpu.normalize`'s
    driver).

    The kernels of the general path (:func:`moments`, then
    :func:`fastbn.cpu.coefficients` and :func:`fastbn.cpu.normalize`), in its order and
    with its arithmetic: bitwise its results. One Numba dispatch instead of several, for
    small calls, whose time is mostly host time.

    Parameters
    ----------
    x, y : ndarray, shape (outer, C, inner)
    w : ndarray of bool, shape (outer * inner,)
        The flat ``(outer, inner)`` mask.
    rows : int
        :func:`chunk_rows`.
    m : int
        True positions of ``w`` (at least 2).
    eps : float
    gamma, beta : ndarray, shape (C,), any float dtype
    relu : bool
    stats : ndarray of float64, shape (3, C)
        Output: mean, ``invstd`` and the biased variance, in these rows.
    """
    outer, C, inner = x.shape
    n_chunks = max(1, (outer + rows - 1) // rows)
    counts = np.empty(n_chunks, np.int64)
    first = np.empty(n_chunks, np.int64)
    _chunk_counts(w.reshape(-1), inner, rows, counts, first)
    mean = stats[0]
    invstd = stats[1]
    var = stats[2]
    _moments_pass(x, w, rows, counts, first, mean, var)
    for c in range(C):
        var[c], invstd[c] = cpu.variance_invstd(var[c], m, eps)
    _normalize_pass(x, cpu.coefficient_table(mean, invstd, gamma, beta, x.dtype), relu, y)


def _backward(dy, x, w, chunk, m, mean, invstd, gamma, beta, relu, dx, grads):
    """The masked backward in one call: the gradient sums over every position
    (``_grad_sums_pass``: :func:`fastbn.cpu.grad_sums`'s driver), then the masked dx
    (``_input_grad_pass``: :func:`_input_grad_rows` or :func:`_input_grad_strided`).

    The kernels and arithmetic of the general path (:func:`fastbn.cpu.grad_sums`, then
    :func:`input_grad`): bitwise its results, in one Numba dispatch.

    Parameters
    ----------
    dy, x, dx : ndarray, shape (outer, C, inner)
    w : ndarray of bool, shape (outer * inner,)
        The flat ``(outer, inner)`` mask.
    chunk : int
        The reduction chunk of :func:`fastbn.cpu.plan`.
    m : int
        True positions of ``w``.
    mean, invstd, gamma, beta : ndarray, shape (C,), any float dtype
    relu : bool
    grads : ndarray, shape (2, C)
        Output: ``dgamma`` and ``dbeta``.
    """
    C = x.shape[1]
    coef = cpu.coefficient_table(mean, invstd, gamma, beta, x.dtype)
    s_dy = np.empty(C)
    s_dyx = np.empty(C)
    _grad_sums_pass(dy, x, chunk, coef, relu, s_dy, s_dyx)
    invstd64 = np.empty(C)
    gamma64 = np.empty(C)
    for c in range(C):
        invstd64[c] = np.float64(invstd[c])
        gamma64[c] = np.float64(gamma[c])
    dcoef = np.empty((3, C), x.dtype)
    cpu.fill_grad_coefficients(s_dy, s_dyx, m, invstd64, gamma64, coef, dcoef)
    _input_grad_pass(dy, x, w, coef, dcoef, relu, dx)
    for c in range(C):
        grads[0, c] = s_dyx[c] * invstd64[c]
        grads[1, c] = s_dy[c]


@njit(**_ELEMENTWISE)  # not inlined: the reductions' options would contract its formula
def _input_grad_channel(dy1, x1, w1, dx1, outer, C, inner, c, coef, dcoef, relu):
    """The masked dx of channel ``c`` (flat arrays): the formula of
    :func:`_input_grad_strided`, run by run (:func:`_input_grad_run`)."""
    hi = coef[MEAN_HI, c]
    lo = coef[MEAN_LO, c]
    scale = coef[SCALE, c]
    shift = coef[SHIFT, c]
    a = dcoef[0, c]
    b = dcoef[1, c]
    d = dcoef[2, c]
    zero = coef.dtype.type(0)
    n = np.uint64(inner)
    for o in range(outer):
        base = np.uint64((o * C + c) * inner)
        wbase = np.uint64(o * inner)
        _input_grad_run(dy1, x1, w1, dx1, base, wbase, n, hi, lo, scale, shift, a, b, d, relu, zero)


@_two_builds(_REDUCE)
def _backward_fused(dy, x, w, chunk, m, mean, invstd, gamma, beta, relu, dx, grads):
    """:func:`_backward` fused per channel (strided family only), where
    :func:`fastbn.cpu.plan` fuses the unmasked backward (``fuse_backward``): each thread
    takes whole channels, the two sums over every position (the chunks of
    :func:`fastbn.cpu.grad_sums`, summed in chunk order), then the masked dx while dy and
    x are still in its cache. One read of dy and x from memory, one write of dx.

    The same per-chunk sums, in the same order, and the same elementwise formula as
    :func:`_backward`: its results to rounding (LLVM may compile the chunk helper
    differently inside this driver, as for the unmasked fused backward), and the same
    bits for any thread count. Parameters as :func:`_backward`.
    """
    outer, C, inner = x.shape
    n_values = outer * inner
    n_chunks = (n_values + chunk - 1) // chunk
    coef = cpu.coefficient_table(mean, invstd, gamma, beta, x.dtype)
    dcoef = np.empty((3, C), x.dtype)
    runs = cpu.whole_runs(chunk, inner)
    dy1 = dy.reshape(-1)
    x1 = x.reshape(-1)
    dx1 = dx.reshape(-1)
    w1 = w.reshape(-1)
    for c in prange(C):
        s_dy = 0.0
        s_dyx = 0.0
        for k in range(n_chunks):
            o0, o1, i0, i1 = cpu.chunk_span(k, chunk, runs, outer, inner)
            a_k, b_k = cpu.chunk_grad_sums_strided(dy1, x1, C, inner, c, o0, o1, i0, i1, coef, relu)
            s_dy += a_k
            s_dyx += b_k
        invstd_c = np.float64(invstd[c])
        grads[0, c] = s_dyx * invstd_c
        grads[1, c] = s_dy
        cpu.fill_grad_coefficient(s_dy, s_dyx, m, invstd_c, np.float64(gamma[c]), c, coef, dcoef)
        _input_grad_channel(dy1, x1, w1, dx1, outer, C, inner, c, coef, dcoef, relu)


class _Families(NamedTuple):
    """The builds of a whole-operation driver for each family."""

    rows: _Builds
    strided: _Builds


def _composed(fn, calls):
    """Build ``fn`` for each family and build: its global names bound to the pass
    drivers of ``calls`` (``{name: {family: _Builds}}``), serial ones in the serial build.
    The parallel build is not ``parallel=True`` itself: it calls the separately compiled
    parallel passes (their prange loops inlined into a caller ran slower, see
    :func:`fastbn.cpu._two_pass`)."""
    families = []
    for family in _Families._fields:
        builds = []
        for serial in (False, True):
            scope = dict(fn.__globals__)
            for name, by_family in calls.items():
                scope[name] = getattr(by_family[family], "serial" if serial else "parallel")
            suffix = "_" + family + ("_serial" if serial else "")
            copy = types.FunctionType(
                fn.__code__, scope, fn.__name__ + suffix, fn.__defaults__, fn.__closure__
            )
            copy.__qualname__ = fn.__qualname__ + suffix
            copy.__doc__ = fn.__doc__
            builds.append(njit(**_REDUCE)(copy))
        families.append(_Builds(*builds))
    return _Families(*families)


_forward_kernels = _composed(
    _forward,
    {
        "_moments_pass": {"rows": _moments_rows, "strided": _moments_strided},
        "_normalize_pass": {
            "rows": cpu.normalize_kernels.rows,
            "strided": cpu.normalize_kernels.strided,
        },
    },
)
_backward_kernels = _composed(
    _backward,
    {
        "_grad_sums_pass": {
            "rows": cpu.grad_sums_kernels.rows,
            "strided": cpu.grad_sums_kernels.strided,
        },
        "_input_grad_pass": {"rows": _input_grad_rows, "strided": _input_grad_strided},
    },
)


# The serial rows statistics pass, compiled as part of the small-call driver below (its
# reduction helper, _masked_sums_rows, stays a separate function, as in every build).
_moments_rows_inline = njit(inline="always", **_REDUCE)(_moments_rows.serial.py_func)


@njit(**_REDUCE)
def small_forward_kernel(x, w, eps, gamma, beta, relu, y, stats):
    """The masked training forward of a small rows batch (one reduction chunk, serial):
    :func:`_forward` counting the mask itself and writing the statistics in their final
    dtype, with :func:`fastbn.cpu.normalize_small` (the unmasked small call's normalize
    pass, the same formula per value as :func:`fastbn.cpu.normalize`'s driver).

    The mask is counted here, not on the host (one ``np.count_nonzero`` fewer), so the
    count decides what is written: with fewer than 2 True positions, or all of them
    True, nothing is; the caller then raises the ValueError or takes the unmasked path,
    as the general path does. Otherwise the statistics are :func:`_forward`'s with
    ``rows = outer`` (the one chunk of :func:`chunk_rows`, which reduces the same rows):
    the same source, its statistics pass inlined, so bitwise its results (tested).

    Parameters
    ----------
    x : ndarray, shape (outer, C, 1), C-contiguous
        At most one reduction chunk of rows (``x.nbytes < _config.SERIAL_BYTES``).
    w : ndarray of bool, shape (outer,)
    eps : float
    gamma, beta : ndarray, shape (C,), float32 or float64
    relu : bool
    y : ndarray, x's dtype and size, C-contiguous, any shape
        Output, viewed as ``x``'s shape.
    stats : ndarray, shape (2, C)
        Output: the mean and ``invstd``, computed in float64, stored in its dtype.

    Returns
    -------
    int
        The True positions of ``w``.
    """
    outer, C, _ = x.shape
    counts = np.empty(1, np.int64)
    first = np.empty(1, np.int64)
    _chunk_counts(w, 1, outer, counts, first)
    m = counts[0]
    if m < 2 or m == outer:
        return m
    mean = np.empty(C)
    var = np.empty(C)
    invstd = np.empty(C)
    _moments_rows_inline(x, w, outer, counts, first, mean, var)
    for c in range(C):
        var[c], invstd[c] = cpu.variance_invstd(var[c], m, eps)
        stats[0, c] = mean[c]
        stats[1, c] = invstd[c]
    coef = cpu.coefficient_table(mean, invstd, gamma, beta, x.dtype)
    cpu.normalize_small(x, coef, relu, y.reshape(x.shape))
    return m


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------


def moments(x3, w2):
    """Per-channel mean and M2 of ``x3`` over the True positions of ``w2``, in float64.

    Parameters
    ----------
    x3 : ndarray, shape (outer, C, inner), float32 or float64, C-contiguous
    w2 : ndarray of uint8 (or bool), shape (outer, inner), C-contiguous
        At least one True position.

    Returns
    -------
    tuple of ndarray
        ``(mean, m2)``, float64, shape (C,).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([1.0, 2.0, 100.0, 4.0]).reshape(4, 1, 1)
    >>> mean, m2 = moments(x, np.array([[1], [1], [0], [1]], np.uint8))
    >>> mean, m2
    (array([2.33333333]), array([4.66666667]))
    """
    outer, C, inner = x3.shape
    w = w2.reshape(-1).view(np.bool_)
    rows = chunk_rows(x3.shape, x3.dtype.itemsize)
    n_chunks = max(1, -(-outer // rows))
    counts = np.empty(n_chunks, np.int64)
    first = np.empty(n_chunks, np.int64)
    _chunk_counts(w, inner, rows, counts, first)
    mean = np.empty(C)
    m2 = np.empty(C)
    kernel = _build(_moments_rows if inner == 1 else _moments_strided, x3)
    kernel(x3, w, rows, counts, first, mean, m2)
    return mean, m2


def input_grad(dy3, x3, w2, coef, s_dy, s_dyx, m, invstd, gamma, relu, dx3):
    """Write the masked ``dx`` from the sums over every position and the masked count.

    ``dx = gamma * invstd * (dy - mask * (s_dy + xhat * dgamma) / m)`` with
    ``dgamma = invstd * s_dyx``: one read of dy, x and the mask, one write of dx.

    Parameters
    ----------
    dy3, x3, dx3 : ndarray, shape (outer, C, inner), same dtype, C-contiguous
    w2 : ndarray of uint8 (or bool), shape (outer, inner)
    coef : ndarray, shape (4, C)
        :func:`fastbn.cpu.coefficients` of the saved statistics.
    s_dy, s_dyx : ndarray of float64, shape (C,)
        ``sum dy`` and ``sum dy * (x - mean)`` over every position (every rank's).
    m : int
        True positions (every rank's).
    invstd, gamma : ndarray of float64, shape (C,)
    relu : bool

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([0.0, 2.0, 5.0]).reshape(3, 1, 1)
    >>> w = np.array([[1], [1], [0]], np.uint8)
    >>> coef = cpu.coefficients(np.ones(1), np.ones(1), np.ones(1), np.zeros(1), x.dtype)
    >>> dx = np.empty_like(x)
    >>> input_grad(np.ones_like(x), x, w, coef, np.array([3.0]), np.array([4.0]), 2,
    ...            np.ones(1), np.ones(1), False, dx)
    >>> dx.ravel()
    array([ 1.5, -2.5,  1. ])
    """
    dcoef = np.empty((3, x3.shape[1]), x3.dtype)
    cpu.fill_grad_coefficients(s_dy, s_dyx, m, invstd, gamma, coef, dcoef)
    kernel = _build(_input_grad_rows if x3.shape[2] == 1 else _input_grad_strided, x3)
    kernel(dy3, x3, w2.reshape(-1).view(np.bool_), coef, dcoef, relu, dx3)


def forward(x3, w, m, gamma, beta, eps, relu, y3):
    """The masked training forward of the direct path: ``y3`` written from the
    statistics of ``x3`` over the ``m`` True positions of ``w`` (bitwise the results of
    :func:`moments` followed by :func:`fastbn.cpu.normalize`, in one dispatch).

    Parameters
    ----------
    x3, y3 : ndarray, shape (outer, C, inner), float32 or float64, C-contiguous
    w : ndarray of bool, shape (outer * inner,)
        The flat ``(outer, inner)`` mask (taken as it is: no conversion on this path).
    m : int
        True positions of ``w`` (at least 2).
    gamma, beta : ndarray, shape (C,), float32 or float64
    eps : float
    relu : bool

    Returns
    -------
    ndarray of float64, shape (3, C)
        Mean, ``invstd``, biased variance.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([1.0, 3.0, 100.0]).reshape(3, 1, 1)
    >>> y = np.empty_like(x)
    >>> stats = forward(x, np.array([True, True, False]), 2, np.ones(1), np.zeros(1), 0.0,
    ...                 False, y)
    >>> stats[0], y.ravel()
    (array([2.]), array([-1.,  1., 98.]))
    """
    stats = np.empty((3, x3.shape[1]))
    planned = _plan_of(x3.shape, x3.dtype.itemsize)
    planned.forward(x3, w, planned.rows, m, eps, gamma, beta, relu, y3, stats)
    return stats


def backward(dy3, x3, w, m, mean, invstd, gamma, beta, relu, dx3, grads, fuse=None):
    """The masked backward of the direct path: ``dx3`` written and ``grads`` (shape
    ``(2, C)``) set to ``dgamma`` and ``dbeta`` (bitwise the results of
    :func:`fastbn.cpu.grad_sums` followed by :func:`input_grad`, in one dispatch).

    Parameters
    ----------
    dy3, x3, dx3 : ndarray, shape (outer, C, inner), same dtype, C-contiguous
    w : ndarray of bool, shape (outer * inner,)
        The flat ``(outer, inner)`` mask.
    m : int
        True positions of ``w``.
    mean, invstd, gamma, beta : ndarray, shape (C,), float32 or float64
    relu : bool
    grads : ndarray, shape (2, C)
    fuse : bool, optional
        None (default): fused per channel where :func:`fastbn.cpu.plan` fuses the unmasked
        backward; True: fused for any strided layout; False: the two passes (the two
        agree to rounding).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([0.0, 2.0, 5.0]).reshape(3, 1, 1)
    >>> dx, grads = np.empty_like(x), np.empty((2, 1))
    >>> one = np.ones(1)
    >>> backward(np.ones_like(x), x, np.array([True, True, False]), 2, one, one, one,
    ...          np.zeros(1), False, dx, grads)
    >>> dx.ravel(), grads[1]
    (array([ 1.5, -2.5,  1. ]), array([3.]))
    """
    planned = _plan_of(x3.shape, x3.dtype.itemsize)
    kernel = planned.backward
    if fuse is not None:  # the plan's builds are serial or parallel as its own are
        builds = _backward_fused if fuse and x3.shape[2] > 1 else None
        kernel = planned.two_pass_backward if builds is None else _build(builds, x3)
    kernel(dy3, x3, w, planned.chunk, m, mean, invstd, gamma, beta, relu, dx3, grads)


class _Plan(NamedTuple):
    """The masked drivers of one shape and dtype, their builds picked (see :func:`_plan_of`)."""

    rows: int
    chunk: int
    forward: object
    backward: object
    two_pass_backward: object


@functools.lru_cache(maxsize=1024)
def _plan_of(shape, itemsize):
    """The :class:`_Plan` of a shape: the masked statistics' chunk rows, the gradient
    sums' chunk (:func:`fastbn.cpu.plan`, which also starts Numba's threading layer before
    a parallel build runs) and the whole-operation drivers of its family, serial or
    parallel builds by its size (cached: a training loop sees few shapes; a small call's
    time is mostly host time)."""
    family = "rows" if shape[2] == 1 else "strided"
    planned = cpu.plan_of(shape, itemsize)
    two_pass = getattr(_backward_kernels, family)
    fused = _backward_fused if planned.fuse_backward else two_pass

    def pick(builds):
        return builds.serial if planned.serial else builds.parallel

    return _Plan(
        chunk_rows(shape, itemsize),
        planned.chunk,
        pick(getattr(_forward_kernels, family)),
        pick(fused),
        pick(two_pass),
    )


def drivers():
    """Every driver of this module (the dispatchers the host side calls).

    Returns
    -------
    list of numba Dispatcher
    """
    builds = (_moments_strided, _moments_rows, _input_grad_rows, _input_grad_strided)
    builds += tuple(_forward_kernels) + tuple(_backward_kernels) + (_backward_fused,)
    return [_chunk_counts, small_forward_kernel] + [build for pair in builds for build in pair]
