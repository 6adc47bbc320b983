"""CUDA kernels (``numba.cuda``) over the canonical ``(outer, C, inner)`` view.

The GPU twin of :mod:`fastbn.cpu`: the same view, the same two families, the same
formulas. Host-side code (arguments, streams, launch configuration) is in
:mod:`fastbn.cuda`; kernels here only compute.

Work partition (one launch configuration per shape, shared by every kernel of an op)
-------------------------------------------------------------------------------------
A 1-D grid of ``groups * nblk`` blocks of ``T`` threads; block ``b`` is group
``b // nblk``, chunk ``k = b % nblk``.

- **strided** (``inner > 1``, NCHW): a group is one channel ``c`` and ``width = 1``.
  Chunk ``k`` is the flat range ``[k * chunk, (k + 1) * chunk)`` of the channel's
  ``m = outer * inner`` values in ``(o, i)`` order; thread ``t`` takes values
  ``j0 + t, j0 + t + T, ...`` (consecutive threads read consecutive addresses). The
  ``(o, i)`` position advances by ``divmod(T, inner)`` with one compare per step, never a
  division.
- **rows** (``inner == 1``, ``(N, C)`` and NHWC): a group is a tile of ``width`` adjacent
  channels (a power of two <= 32); thread ``t`` is lane ``tx = t % width`` (channel
  ``tile * width + tx``) of row ``ty = t // width``. Chunk ``k`` is a range of ``chunk``
  rows; row ``ty`` takes rows ``r0 + ty, r0 + ty + T / width, ...``. A warp reads whole
  row segments of ``width`` channels: coalesced.

Reductions (deterministic: no float atomics, a fixed combination order)
------------------------------------------------------------------------
Per thread: its values are taken in batches of ``_BATCH``; each batch's mean and sum of
squared deviations are computed two-pass from registers, in float64, and merged into the
thread's ``(n, mean, M2)`` with Chan's formula. There is no ``E[x^2] - E[x]^2``
cancellation at any level, also for data with a large offset or an outlier.
Per block: a warp-shuffle tree (offsets 16, 8, ... down to ``width``) then the warps in
order through shared memory. Across blocks: launch 1 writes one partial per
``(channel, chunk)``; in launch 2 every block merges the partials of its channel(s) in the
same fixed order (threads take partials ``ty, ty + T / width, ...``, then the same block
tree), so all blocks of a channel hold bitwise the same statistics, then normalize their
own chunk. The backward sums ``sum dy`` and ``sum dy * (x - mean)`` the same way.

Under Numba's CUDA simulator (which has no warp shuffles) the shuffle tree is replayed
serially from shared memory: the same merges in the same order, so the simulator computes
the same bits as the shuffle code would (which itself runs only on a real GPU).

Numerics mirror the CPU kernels: float64 statistics; the normalized value is
``((x - hi) - lo) * scale + shift`` in the compute dtype (float32 for float16 data), with
the float64 mean split into ``hi + lo``; the ReLU backward recomputes the forward's sign
with the same device function. float16 data is read and written as float16.

The cast of the coefficients to the compute dtype is a compile-time choice: the device
functions that compute in it are built once per compute dtype
(:func:`_compute_functions`), each statistics kernel over them by its own factory
(``_forward_apply_kernel``, ...), and :func:`build` assembles one namespace of kernels per
compute dtype from them.
"""

import functools
import math
import os
import types

import numba
import numpy as np
from numba import cuda

from . import _config

try:  # numba-cuda >= 0.20
    from numba.cuda.core import config as _cuda_config

    SIMULATOR = bool(_cuda_config.ENABLE_CUDASIM)
except ImportError:  # pragma: no cover - older numba with the built-in CUDA target
    SIMULATOR = (
        bool(getattr(numba.config, "ENABLE_CUDASIM", 0))
        or os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"
    )

# Threads per block: every launch uses exactly this many, so shared arrays have a
# compile-time size. Warp shuffles need whole warps.
THREADS = _config.CUDA_THREADS_PER_BLOCK
if THREADS % 32 or not 32 <= THREADS <= 1024:
    raise ValueError(f"FASTBN_CUDA_THREADS must be a multiple of 32 in [32, 1024], got {THREADS}")

# Values per register batch of the per-thread statistics (two-pass within a batch).
# Changing it changes the last bits of the statistics, nothing else.
_BATCH = 8

_FULL_MASK = 0xFFFFFFFF
_JIT = dict(_config.CUDA_JIT_OPTIONS)
_DEVICE = dict(_JIT, device=True)


# --------------------------------------------------------------------------------------
# Device functions shared by every kernel
# --------------------------------------------------------------------------------------


@cuda.jit(**_DEVICE)
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two ``(count, mean, M2)`` summaries (Chan, Golub and LeVeque).

    Either count may be 0 (then the other summary is returned unchanged).

    Returns
    -------
    tuple of float
        ``(n, mean, m2)`` of the union.
    """
    if n_b == 0.0:
        return n_a, mean_a, m2_a
    if n_a == 0.0:
        return n_b, mean_b, m2_b
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + delta * delta * (n_a * n_b / n)
    return n, mean, m2


if SIMULATOR:

    @cuda.jit(**_DEVICE)
    def _warp_merge(n, mean, m2, width, sh_n, sh_mean, sh_m2):
        """The warp-shuffle tree of :func:`_block_merge`, emulated for the simulator.

        The simulator has no warp shuffles, and each of its barriers is slow. So every
        thread publishes its summary in shared memory and lanes ``< width`` replay the
        shuffle tree serially: the same merges in the same order, hence bitwise the
        same result in the lanes that are used. Every thread of the block must call it.
        """
        tid = cuda.threadIdx.x
        lane = tid % 32
        base = tid - lane
        sh_n[tid] = n
        sh_mean[tid] = mean
        sh_m2[tid] = m2
        cuda.syncthreads()
        if lane < width:
            vn = cuda.local.array(32, numba.float64)
            vmean = cuda.local.array(32, numba.float64)
            vm2 = cuda.local.array(32, numba.float64)
            for j in range(32):
                vn[j] = sh_n[base + j]
                vmean[j] = sh_mean[base + j]
                vm2[j] = sh_m2[base + j]
            delta = 16
            while delta >= width:
                for j in range(delta):
                    vn[j], vmean[j], vm2[j] = _chan_merge(
                        vn[j], vmean[j], vm2[j], vn[j + delta], vmean[j + delta], vm2[j + delta]
                    )
                delta //= 2
            n = vn[lane]
            mean = vmean[lane]
            m2 = vm2[lane]
        cuda.syncthreads()
        return n, mean, m2

    @cuda.jit(**_DEVICE)
    def _warp_sum2(a, b, width, sh_a, sh_b):
        """The warp-shuffle tree of :func:`_block_sum2`, emulated for the simulator."""
        tid = cuda.threadIdx.x
        lane = tid % 32
        base = tid - lane
        sh_a[tid] = a
        sh_b[tid] = b
        cuda.syncthreads()
        if lane < width:
            va = cuda.local.array(32, numba.float64)
            vb = cuda.local.array(32, numba.float64)
            for j in range(32):
                va[j] = sh_a[base + j]
                vb[j] = sh_b[base + j]
            delta = 16
            while delta >= width:
                for j in range(delta):
                    va[j] += va[j + delta]
                    vb[j] += vb[j + delta]
                delta //= 2
            a = va[lane]
            b = vb[lane]
        cuda.syncthreads()
        return a, b
else:

    @cuda.jit(**_DEVICE)
    def _warp_merge(n, mean, m2, width, sh_n, sh_mean, sh_m2):
        """Shuffle tree within each warp: offsets 16, 8, ..., ``width``.

        Lanes ``< width`` end with the merge of all lanes congruent to them modulo
        ``width``. Every lane of the warp must call it (full mask); the shared arrays are
        not used on the GPU.
        """
        delta = 16
        while delta >= width:
            n_o = cuda.shfl_down_sync(_FULL_MASK, n, delta)
            mean_o = cuda.shfl_down_sync(_FULL_MASK, mean, delta)
            m2_o = cuda.shfl_down_sync(_FULL_MASK, m2, delta)
            n, mean, m2 = _chan_merge(n, mean, m2, n_o, mean_o, m2_o)
            delta //= 2
        return n, mean, m2

    @cuda.jit(**_DEVICE)
    def _warp_sum2(a, b, width, sh_a, sh_b):
        """Shuffle-tree sums within each warp (see :func:`_warp_merge`)."""
        delta = 16
        while delta >= width:
            a += cuda.shfl_down_sync(_FULL_MASK, a, delta)
            b += cuda.shfl_down_sync(_FULL_MASK, b, delta)
            delta //= 2
        return a, b


@cuda.jit(**_DEVICE)
def _block_merge(n, mean, m2, width, sh_n, sh_mean, sh_m2):
    """Merge the ``(n, mean, M2)`` of all threads with the same lane ``tid % width``.

    Warp-shuffle tree (offsets 16, 8, ..., ``width``), then the warps in order through
    shared memory. Every thread of the block must call it. The result is valid in threads
    ``tid < width`` (lane ``tid``); the shared arrays are free again on return.

    Parameters
    ----------
    n, mean, m2 : float
        This thread's summary (``n`` may be 0).
    width : int
        Power of two <= 32: the number of independent lanes (channels) of the block.
    sh_n, sh_mean, sh_m2 : shared float64 arrays of ``THREADS`` values
    """
    tid = cuda.threadIdx.x
    lane = tid % 32
    warp = tid // 32
    n, mean, m2 = _warp_merge(n, mean, m2, width, sh_n, sh_mean, sh_m2)
    if lane < width:
        sh_n[warp * 32 + lane] = n
        sh_mean[warp * 32 + lane] = mean
        sh_m2[warp * 32 + lane] = m2
    cuda.syncthreads()
    if tid < width:
        for w in range(1, cuda.blockDim.x // 32):
            n, mean, m2 = _chan_merge(
                n, mean, m2, sh_n[w * 32 + tid], sh_mean[w * 32 + tid], sh_m2[w * 32 + tid]
            )
    cuda.syncthreads()
    return n, mean, m2


@cuda.jit(**_DEVICE)
def _block_sum2(a, b, width, sh_a, sh_b):
    """Sum two values over all threads with the same lane ``tid % width``.

    Same tree and order as :func:`_block_merge`; the result is valid in ``tid < width``.
    """
    tid = cuda.threadIdx.x
    lane = tid % 32
    warp = tid // 32
    a, b = _warp_sum2(a, b, width, sh_a, sh_b)
    if lane < width:
        sh_a[warp * 32 + lane] = a
        sh_b[warp * 32 + lane] = b
    cuda.syncthreads()
    if tid < width:
        for w in range(1, cuda.blockDim.x // 32):
            a += sh_a[w * 32 + tid]
            b += sh_b[w * 32 + tid]
    cuda.syncthreads()
    return a, b


@cuda.jit(**_DEVICE)
def _store_moments(n, mean, m2, width, c, k, part, sh_n, sh_mean, sh_m2):
    """Merge the block's summaries (:func:`_block_merge`) and write channel ``c``'s
    partial ``part[:, c, k] = (n, mean, M2)`` (lanes ``< width``, ``c < C``). Every
    thread of the block must call it."""
    n, mean, m2 = _block_merge(n, mean, m2, width, sh_n, sh_mean, sh_m2)
    if cuda.threadIdx.x < width and c < part.shape[1]:
        part[0, c, k] = n
        part[1, c, k] = mean
        part[2, c, k] = m2


@cuda.jit(**_DEVICE)
def _store_sums(a, b, width, c, k, part, sh_a, sh_b):
    """Sum the block's ``(a, b)`` (:func:`_block_sum2`) and write channel ``c``'s partial
    ``part[:, c, k] = (a, b)``, as :func:`_store_moments` does."""
    a, b = _block_sum2(a, b, width, sh_a, sh_b)
    if cuda.threadIdx.x < width and c < part.shape[1]:
        part[0, c, k] = a
        part[1, c, k] = b


@cuda.jit(**_DEVICE)
def _assign(x, width, nblk, chunk):
    """This thread's share of the partition (see the module docstring).

    Parameters
    ----------
    x : device array, shape (outer, C, inner)
    width : int
        1 for the strided family, the tile width for the rows family.
    nblk : int
        Chunks (blocks) per group.
    chunk : int
        Values (strided) or rows (rows) per chunk.

    Returns
    -------
    tuple of int
        ``(c, o, i, count, step_o, step_i, k)``: the channel (may be >= C in the last
        rows tile), the first position, the number of values this thread visits, the
        step of the position, and the chunk index.
    """
    outer = x.shape[0]
    C = x.shape[1]
    inner = x.shape[2]
    T = cuda.blockDim.x
    tid = cuda.threadIdx.x
    group = cuda.blockIdx.x // nblk
    k = cuda.blockIdx.x - group * nblk
    if inner > 1:
        m = outer * inner
        j = k * chunk + tid
        j1 = min(k * chunk + chunk, m)
        count = 0
        if j < j1:
            count = (j1 - j + T - 1) // T
        o = j // inner
        i = j - o * inner
        step_o = T // inner
        step_i = T - step_o * inner
        return group, o, i, count, step_o, step_i, k
    rows_per_pass = T // width
    c = group * width + tid % width
    r = k * chunk + tid // width
    r1 = min(k * chunk + chunk, outer)
    count = 0
    if r < r1 and c < C:
        count = (r1 - r + rows_per_pass - 1) // rows_per_pass
    return c, r, 0, count, rows_per_pass, 0, k


@cuda.jit(**_DEVICE)
def _advance(o, i, step_o, step_i, inner):
    """The next position ``(o, i)`` of a thread's walk: ``step_o`` rows and ``step_i``
    columns on, carried over ``inner`` (one compare, never a division; see :func:`_assign`).
    """
    o += step_o
    i += step_i
    if i >= inner:
        i -= inner
        o += 1
    return o, i


@cuda.jit(**_DEVICE)
def _thread_moments(x, c, o, i, count, step_o, step_i):
    """``(n, mean, M2)`` in float64 of the ``count`` values this thread visits.

    Values are taken ``_BATCH`` at a time into registers; each batch is reduced two-pass
    (mean, then squared deviations) and merged with Chan's formula. One read of x.
    """
    inner = x.shape[2]
    buf = cuda.local.array(_BATCH, numba.float64)
    n = 0.0
    mean = 0.0
    m2 = 0.0
    done = 0
    while done < count:
        nb = min(_BATCH, count - done)
        s = 0.0
        for b in range(_BATCH):
            if b < nb:
                v = np.float64(x[o, c, i])
                buf[b] = v
                s += v
                o, i = _advance(o, i, step_o, step_i, inner)
        mean_b = s / nb
        q = 0.0
        for b in range(_BATCH):
            if b < nb:
                d = buf[b] - mean_b
                q += d * d
        n, mean, m2 = _chan_merge(n, mean, m2, np.float64(nb), mean_b, q)
        done += nb
    return n, mean, m2


@cuda.jit(**_DEVICE)
def _param(p, c, present, default):
    """``float64(p[c])`` when the per-channel parameter is given, else ``default``."""
    if present:
        return np.float64(p[c])
    return default


# --------------------------------------------------------------------------------------
# Device functions in the compute dtype
# --------------------------------------------------------------------------------------


@functools.cache
def _compute_functions(compute):
    """The device functions whose arithmetic is in the ``compute`` dtype.

    The cast of the coefficients is a compile-time choice, so these are built once per
    compute dtype and shared by every kernel of that dtype.

    Parameters
    ----------
    compute : numpy dtype
        float32 (float16 and float32 data) or float64.

    Returns
    -------
    types.SimpleNamespace
        ``affine``, ``coefficients``, ``thread_normalize``, ``thread_grad_sums``,
        ``thread_input_grad``.
    """
    CT = np.dtype(compute).type

    @cuda.jit(**_DEVICE)
    def _affine(x, hi, lo, scale, shift):
        """``((x - hi) - lo) * scale + shift`` in the compute dtype, never reassociated.

        The one formula of the normalized value: the forward writes it and the ReLU
        backward recomputes its sign with it, so both agree on the mask bit for bit.
        """
        return ((CT(x) - hi) - lo) * scale + shift

    @cuda.jit(**_DEVICE)
    def _coefficients(mean, scale64, shift64):
        """``(hi, lo, scale, shift)`` in the compute dtype; ``hi + lo`` is the float64 mean."""
        hi = CT(mean)
        lo = CT(mean - np.float64(hi))
        return hi, lo, CT(scale64), CT(shift64)

    @cuda.jit(**_DEVICE)
    def _channel_coefficients(mean, invstd, gamma, has_gamma, beta, has_beta, c):
        """:func:`_coefficients` of channel ``c`` from its float64 ``mean`` and
        ``invstd``: ``scale = gamma[c] * invstd``, ``shift = beta[c]`` (1 and 0 when not
        given)."""
        return _coefficients(
            mean, _param(gamma, c, has_gamma, 1.0) * invstd, _param(beta, c, has_beta, 0.0)
        )

    @cuda.jit(**_DEVICE)
    def _grad_coefficients(kk, invstd, s_dy, s_dyx, m):
        """``(a, b, d)`` of ``dx = a * dy + b * (x - mean) + d`` in the compute dtype:
        ``a = kk`` (``gamma * invstd``), ``b = -a * invstd * dgamma / m`` with
        ``dgamma = invstd * s_dyx``, ``d = -a * s_dy / m``, from the float64 sums over
        ``m`` values."""
        dgamma = invstd * s_dyx
        return CT(kk), CT(-kk * invstd * dgamma / m), CT(-kk * s_dy / m)

    @cuda.jit(**_DEVICE)
    def _thread_normalize(x, y, c, o, i, count, step_o, step_i, hi, lo, scale, shift, relu):
        """``y = ((x - hi) - lo) * scale + shift`` (then ReLU) over this thread's values."""
        inner = x.shape[2]
        zero = CT(0)
        for _ in range(count):
            v = _affine(x[o, c, i], hi, lo, scale, shift)
            if relu and v < zero:
                v = zero
            y[o, c, i] = v
            o, i = _advance(o, i, step_o, step_i, inner)

    @cuda.jit(**_DEVICE)
    def _thread_grad_sums(dy, x, c, o, i, count, step_o, step_i, hi, lo, scale, shift, relu):
        """``(sum dy, sum dy * (x - mean))`` in float64 over this thread's values.

        With ``relu``, ``dy`` counts only where the recomputed forward output is > 0.
        """
        inner = x.shape[2]
        zero = CT(0)
        mean = np.float64(hi) + np.float64(lo)
        s_dy = 0.0
        s_dyx = 0.0
        for _ in range(count):
            g = np.float64(dy[o, c, i])
            if relu and _affine(x[o, c, i], hi, lo, scale, shift) <= zero:
                g = 0.0
            s_dy += g
            s_dyx += g * (np.float64(x[o, c, i]) - mean)
            o, i = _advance(o, i, step_o, step_i, inner)
        return s_dy, s_dyx

    @cuda.jit(**_DEVICE)
    def _thread_input_grad(
        dy, x, dx, c, o, i, count, step_o, step_i, hi, lo, scale, shift, a, b, d, relu
    ):
        """``dx = a * dy + b * ((x - hi) - lo) + d`` (ReLU-masked dy) over this thread's values."""
        inner = x.shape[2]
        zero = CT(0)
        for _ in range(count):
            xv = x[o, c, i]
            g = CT(dy[o, c, i])
            if relu and _affine(xv, hi, lo, scale, shift) <= zero:
                g = zero
            dx[o, c, i] = a * g + b * ((CT(xv) - hi) - lo) + d
            o, i = _advance(o, i, step_o, step_i, inner)

    @cuda.jit(**_DEVICE)
    def _thread_residual(
        a, x, z, out, c, o, i, count, step_o, step_i, hi, lo, scale, shift, relu, grad
    ):
        """Over this thread's values: ``out = act(_affine(x) + z)``, or with ``grad``
        ``out = a`` (dy) zeroed with ``relu`` where that sum is not positive. The sum is
        the same expression in both, so the backward's mask is the forward's bit for bit."""
        inner = x.shape[2]
        zero = CT(0)
        for _ in range(count):
            v = _affine(x[o, c, i], hi, lo, scale, shift) + CT(z[o, c, i])
            if grad:
                out[o, c, i] = a[o, c, i] if not relu or v > zero else zero
            else:
                if relu and v < zero:
                    v = zero
                out[o, c, i] = v
            o, i = _advance(o, i, step_o, step_i, inner)

    return types.SimpleNamespace(
        affine=_affine,
        coefficients=_coefficients,
        channel_coefficients=_channel_coefficients,
        grad_coefficients=_grad_coefficients,
        thread_normalize=_thread_normalize,
        thread_grad_sums=_thread_grad_sums,
        thread_input_grad=_thread_input_grad,
        thread_residual=_thread_residual,
    )


@cuda.jit(**_DEVICE)
def _update_running_last_block(
    stats,
    running_mean,
    running_var,
    factor,
    correction,
    limit_mean,
    limit_var,
    counter,
    nonfinite,
    mode,
):
    """The last block to finish updates the running statistics of every channel.

    Classic threadfence reduction: each block fences its writes of ``stats`` and takes
    a ticket from ``counter`` (an integer atomic, zeroed by launch 1); the block that
    draws the last ticket sees every channel's statistics. The update is
    ``running = (1 - factor) * running + factor * batch`` (``var * correction`` for
    the variance), in float64. If any channel's mean or variance is not finite, or any
    updated value would round to inf in its array's dtype (``abs(value) >=
    limit_mean``/``limit_var``, from the host: the smallest magnitude that rounds to
    inf, inf for float64), no channel is updated and ``nonfinite[mode]`` is
    incremented. Which block is last varies, what it computes does not.
    """
    tid = cuda.threadIdx.x
    T = cuda.blockDim.x
    cuda.threadfence()
    cuda.syncthreads()
    last = 0
    if tid == 0:
        ticket = cuda.atomic.add(counter, 0, 1)
        if ticket == cuda.gridDim.x - 1:
            last = 1
    last = cuda.syncthreads_or(last)
    if last:
        cuda.threadfence()
        C = stats.shape[1]
        bad = 0
        for c in range(tid, C, T):
            new_mean = (1.0 - factor) * np.float64(running_mean[c]) + factor * stats[0, c]
            new_var = (1.0 - factor) * np.float64(running_var[c]) + factor * stats[
                1, c
            ] * correction
            if not (
                math.isfinite(stats[0, c])
                and math.isfinite(stats[1, c])
                and abs(new_mean) < limit_mean
                and abs(new_var) < limit_var
            ):
                bad = 1
        bad = cuda.syncthreads_or(bad)
        if bad:
            if tid == 0:
                cuda.atomic.add(nonfinite, mode, 1)
        else:
            for c in range(tid, C, T):
                running_mean[c] = (1.0 - factor) * np.float64(running_mean[c]) + factor * stats[
                    0, c
                ]
                running_var[c] = (1.0 - factor) * np.float64(running_var[c]) + factor * stats[
                    1, c
                ] * correction


# --------------------------------------------------------------------------------------
# Statistics kernels: one factory per kernel of a compute dtype, assembled by build()
# --------------------------------------------------------------------------------------


@cuda.jit(**_JIT)
def forward_partials(x, width, nblk, chunk, part, counter):
    """Launch 1 of the training forward: per-(channel, chunk) ``(n, mean, M2)``.

    One read of x. Writes ``part[:, c, k]`` (float64, shape ``(3, C, nblk)``) and
    zeroes the update ticket ``counter[0]`` for launch 2.
    """
    sh_n = cuda.shared.array(THREADS, numba.float64)
    sh_mean = cuda.shared.array(THREADS, numba.float64)
    sh_m2 = cuda.shared.array(THREADS, numba.float64)
    c, o, i, count, step_o, step_i, k = _assign(x, width, nblk, chunk)
    n, mean, m2 = _thread_moments(x, c, o, i, count, step_o, step_i)
    _store_moments(n, mean, m2, width, c, k, part, sh_n, sh_mean, sh_m2)
    if cuda.blockIdx.x == 0 and cuda.threadIdx.x == 0:
        counter[0] = 0


def _forward_apply_kernel(compute):
    """Launch 2 of the training forward (merge, normalize) for ``compute``.

    Parameters
    ----------
    compute : numpy dtype
        float32 (float16 and float32 data) or float64.

    Returns
    -------
    numba.cuda dispatcher
        ``forward_apply``.
    """
    dev = _compute_functions(compute)
    _channel_coefficients = dev.channel_coefficients
    _thread_normalize = dev.thread_normalize

    @cuda.jit(**_JIT)
    def forward_apply(
        x,
        y,
        width,
        nblk,
        chunk,
        part,
        eps,
        gamma,
        has_gamma,
        beta,
        has_beta,
        relu,
        mean_out,
        invstd_out,
        write_stats,
        stats,
        update,
        running_mean,
        running_var,
        factor,
        correction,
        limit_mean,
        limit_var,
        counter,
        nonfinite,
        mode,
    ):
        """Launch 2 of the training forward: merge the partials, normalize this chunk.

        Every block merges its channel's ``nblk`` partials in a fixed order, computes
        ``mean`` and ``invstd``, and writes ``y`` for its chunk: one read of x, one write
        of y. Blocks of chunk 0 write the statistics (``mean_out``/``invstd_out`` when
        ``write_stats``; float64 ``mean`` and biased ``var`` into ``stats``). With
        ``update``, the last block updates the running statistics
        (:func:`_update_running_last_block`).
        """
        sh_n = cuda.shared.array(THREADS, numba.float64)
        sh_mean = cuda.shared.array(THREADS, numba.float64)
        sh_m2 = cuda.shared.array(THREADS, numba.float64)
        tid = cuda.threadIdx.x
        C = x.shape[1]
        c, o, i, count, step_o, step_i, k = _assign(x, width, nblk, chunk)
        n = 0.0
        mean = 0.0
        m2 = 0.0
        if c < C:
            p = tid // width
            while p < nblk:
                n, mean, m2 = _chan_merge(n, mean, m2, part[0, c, p], part[1, c, p], part[2, c, p])
                p += cuda.blockDim.x // width
        n, mean, m2 = _block_merge(n, mean, m2, width, sh_n, sh_mean, sh_m2)
        if tid < width and c < C:
            var = m2 / n
            invstd = 1.0 / math.sqrt(var + eps)
            sh_mean[tid] = mean
            sh_m2[tid] = invstd
            if k == 0:
                if write_stats:
                    mean_out[c] = mean
                    invstd_out[c] = invstd
                stats[0, c] = mean
                stats[1, c] = var
        cuda.syncthreads()
        if count > 0:
            lane = tid % width
            invstd = sh_m2[lane]
            hi, lo, scale, shift = _channel_coefficients(
                sh_mean[lane], invstd, gamma, has_gamma, beta, has_beta, c
            )
            _thread_normalize(x, y, c, o, i, count, step_o, step_i, hi, lo, scale, shift, relu)
        if update:
            _update_running_last_block(
                stats,
                running_mean,
                running_var,
                factor,
                correction,
                limit_mean,
                limit_var,
                counter,
                nonfinite,
                mode,
            )

    return forward_apply


def _inference_kernel(compute):
    """The inference kernel (normalize with given statistics) for ``compute``.

    Parameters
    ----------
    compute : numpy dtype
        float32 (float16 and float32 data) or float64.

    Returns
    -------
    numba.cuda dispatcher
        ``inference``.
    """
    dev = _compute_functions(compute)
    _channel_coefficients = dev.channel_coefficients
    _thread_normalize = dev.thread_normalize

    @cuda.jit(**_JIT)
    def inference(
        x,
        y,
        width,
        nblk,
        chunk,
        running_mean,
        running_var,
        eps,
        gamma,
        has_gamma,
        beta,
        has_beta,
        relu,
    ):
        """Inference: ``y`` from given statistics. One read of x, one write of y."""
        c, o, i, count, step_o, step_i, k = _assign(x, width, nblk, chunk)
        if count > 0:
            invstd = 1.0 / math.sqrt(np.float64(running_var[c]) + eps)
            hi, lo, scale, shift = _channel_coefficients(
                np.float64(running_mean[c]), invstd, gamma, has_gamma, beta, has_beta, c
            )
            _thread_normalize(x, y, c, o, i, count, step_o, step_i, hi, lo, scale, shift, relu)

    return inference


def _residual_kernel(compute):
    """The residual kernel (the fused ``act(bn(x) + z)`` and its mask) for ``compute``.

    Parameters
    ----------
    compute : numpy dtype
        float32 (float16 and float32 data) or float64.

    Returns
    -------
    numba.cuda dispatcher
        ``residual``.
    """
    dev = _compute_functions(compute)
    _channel_coefficients = dev.channel_coefficients
    _thread_residual = dev.thread_residual

    @cuda.jit(**_JIT)
    def residual(
        a,
        x,
        z,
        out,
        width,
        nblk,
        chunk,
        mean,
        spread,
        is_var,
        eps,
        gamma,
        has_gamma,
        beta,
        has_beta,
        relu,
        grad,
    ):
        """``out = act(bn(x) + z)`` from given statistics (one read of x and z, one write),
        or with ``grad`` the masked ``out = a`` (dy; one more read). ``spread`` is the
        variance (``is_var``: ``invstd = 1 / sqrt(var + eps)``) or ``invstd`` itself."""
        c, o, i, count, step_o, step_i, k = _assign(x, width, nblk, chunk)
        if count > 0:
            invstd = np.float64(spread[c])
            if is_var:
                invstd = 1.0 / math.sqrt(invstd + eps)
            hi, lo, scale, shift = _channel_coefficients(
                np.float64(mean[c]), invstd, gamma, has_gamma, beta, has_beta, c
            )
            _thread_residual(
                a, x, z, out, c, o, i, count, step_o, step_i, hi, lo, scale, shift, relu, grad
            )

    return residual


def _backward_partials_kernel(compute):
    """Launch 1 of the backward (per-chunk gradient sums) for ``compute``.

    Parameters
    ----------
    compute : numpy dtype
        float32 (float16 and float32 data) or float64.

    Returns
    -------
    numba.cuda dispatcher
        ``backward_partials``.
    """
    dev = _compute_functions(compute)
    _channel_coefficients = dev.channel_coefficients
    _thread_grad_sums = dev.thread_grad_sums

    @cuda.jit(**_JIT)
    def backward_partials(
        dy, x, width, nblk, chunk, mean, invstd, gamma, has_gamma, beta, has_beta, relu, part
    ):
        """Launch 1 of the backward: per-(channel, chunk) ``sum dy`` and ``sum dy (x - mean)``.

        One read of dy and x. Writes ``part[:, c, k]`` (float64, shape ``(2, C, nblk)``).
        """
        sh_a = cuda.shared.array(THREADS, numba.float64)
        sh_b = cuda.shared.array(THREADS, numba.float64)
        c, o, i, count, step_o, step_i, k = _assign(x, width, nblk, chunk)
        s_dy = 0.0
        s_dyx = 0.0
        if count > 0:
            inv = np.float64(invstd[c])
            hi, lo, scale, shift = _channel_coefficients(
                np.float64(mean[c]), inv, gamma, has_gamma, beta, has_beta, c
            )
            s_dy, s_dyx = _thread_grad_sums(
                dy, x, c, o, i, count, step_o, step_i, hi, lo, scale, shift, relu
            )
        _store_sums(s_dy, s_dyx, width, c, k, part, sh_a, sh_b)

    return backward_partials


def _backward_apply_kernel(compute):
    """Launch 2 of the backward (merge the sums, write dx) for ``compute``.

    Parameters
    ----------
    compute : numpy dtype
        float32 (float16 and float32 data) or float64.

    Returns
    -------
    numba.cuda dispatcher
        ``backward_apply``.
    """
    dev = _compute_functions(compute)
    _channel_coefficients = dev.channel_coefficients
    _grad_coefficients = dev.grad_coefficients
    _thread_input_grad = dev.thread_input_grad

    @cuda.jit(**_JIT)
    def backward_apply(
        dy,
        x,
        dx,
        width,
        nblk,
        chunk,
        part,
        npart,
        m,
        mean,
        invstd,
        gamma,
        has_gamma,
        beta,
        has_beta,
        relu,
        dgamma_out,
        write_dgamma,
        dbeta_out,
        write_dbeta,
    ):
        """Launch 2 of the backward: merge the partial sums, write dx for this chunk.

        ``dx = a * dy + b * (x - mean) + d`` with ``a = gamma * invstd``,
        ``b = -a * invstd * dgamma / m``, ``d = -a * dbeta / m``: one read of dy and x,
        one write of dx. Blocks of chunk 0 write ``dgamma``/``dbeta`` when asked.

        ``part`` has ``npart`` partial sums per channel (``npart == nblk`` after
        :func:`backward_partials`; ``npart == 1`` for sums already reduced elsewhere, e.g.
        over every rank of a synchronized BatchNorm) and ``m`` (float) is the count the
        sums cover (``outer * inner`` locally, the global count when synchronized).
        """
        sh_a = cuda.shared.array(THREADS, numba.float64)
        sh_b = cuda.shared.array(THREADS, numba.float64)
        tid = cuda.threadIdx.x
        C = x.shape[1]
        c, o, i, count, step_o, step_i, k = _assign(x, width, nblk, chunk)
        s_dy = 0.0
        s_dyx = 0.0
        if c < C:
            p = tid // width
            while p < npart:
                s_dy += part[0, c, p]
                s_dyx += part[1, c, p]
                p += cuda.blockDim.x // width
        s_dy, s_dyx = _block_sum2(s_dy, s_dyx, width, sh_a, sh_b)
        if tid < width and c < C:
            sh_a[tid] = s_dy
            sh_b[tid] = s_dyx
            if k == 0:
                if write_dgamma:
                    dgamma_out[c] = np.float64(invstd[c]) * s_dyx
                if write_dbeta:
                    dbeta_out[c] = s_dy
        cuda.syncthreads()
        if count > 0:
            lane = tid % width
            s_dy = sh_a[lane]
            s_dyx = sh_b[lane]
            inv = np.float64(invstd[c])
            hi, lo, scale, shift = _channel_coefficients(
                np.float64(mean[c]), inv, gamma, has_gamma, beta, has_beta, c
            )
            a, b, d = _grad_coefficients(
                _param(gamma, c, has_gamma, 1.0) * inv, inv, s_dy, s_dyx, m
            )
            _thread_input_grad(
                dy, x, dx, c, o, i, count, step_o, step_i, hi, lo, scale, shift, a, b, d, relu
            )

    return backward_apply


def _frozen_backward_kernel(compute):
    """The backward through fixed statistics (launch 1 of 2) for ``compute``.

    Parameters
    ----------
    compute : numpy dtype
        float32 (float16 and float32 data) or float64.

    Returns
    -------
    numba.cuda dispatcher
        ``frozen_backward``.
    """
    CT = np.dtype(compute).type
    dev = _compute_functions(compute)
    _affine = dev.affine
    _channel_coefficients = dev.channel_coefficients

    @cuda.jit(**_JIT)
    def frozen_backward(
        dy, x, dx, width, nblk, chunk, mean, invstd, gamma, has_gamma, beta, has_beta, relu, part
    ):
        """``dx = gamma * invstd * dy`` (ReLU-masked dy) written while the per-(channel,
        chunk) ``sum dy`` and ``sum dy * (x - mean)`` accumulate.

        One read of dy and x, one write of dx; the sums go to ``part[:, c, k]`` (float64,
        shape ``(2, C, nblk)``), in the block tree of :func:`backward_partials`, for
        :func:`frozen_grads` to add in chunk order.
        """
        sh_a = cuda.shared.array(THREADS, numba.float64)
        sh_b = cuda.shared.array(THREADS, numba.float64)
        c, o, i, count, step_o, step_i, k = _assign(x, width, nblk, chunk)
        s_dy = 0.0
        s_dyx = 0.0
        if count > 0:
            inner = x.shape[2]
            inv = np.float64(invstd[c])
            hi, lo, scale, shift = _channel_coefficients(
                np.float64(mean[c]), inv, gamma, has_gamma, beta, has_beta, c
            )
            mean64 = np.float64(hi) + np.float64(lo)
            zero = CT(0)
            for _ in range(count):
                xv = x[o, c, i]
                g = CT(dy[o, c, i])
                if relu and _affine(xv, hi, lo, scale, shift) <= zero:
                    g = zero
                dx[o, c, i] = scale * g
                g64 = np.float64(g)
                s_dy += g64
                s_dyx += g64 * (np.float64(xv) - mean64)
                o, i = _advance(o, i, step_o, step_i, inner)
        _store_sums(s_dy, s_dyx, width, c, k, part, sh_a, sh_b)

    return frozen_backward


# --------------------------------------------------------------------------------------
# Masked statistics (mask=): their own kernels, the unmasked ones untouched
# --------------------------------------------------------------------------------------


@cuda.jit(**_DEVICE)
def _thread_masked_moments(x, w, c, o, i, count, step_o, step_i):
    """``(n, mean, M2)`` in float64 of the values this thread visits where ``w[o, i]``.

    The loop of :func:`_thread_moments`: ``_BATCH`` positions at a time into registers
    (with their mask bits), each batch's True values reduced two-pass and merged with
    Chan's formula (a batch without one is skipped).
    """
    inner = x.shape[2]
    buf = cuda.local.array(_BATCH, numba.float64)
    keep = cuda.local.array(_BATCH, numba.float64)
    n = 0.0
    mean = 0.0
    m2 = 0.0
    done = 0
    while done < count:
        nb = min(_BATCH, count - done)
        s = 0.0
        k = 0.0
        for b in range(_BATCH):
            if b < nb:
                t = 1.0 if w[o, i] else 0.0
                v = np.float64(x[o, c, i]) if t else 0.0
                buf[b] = v
                keep[b] = t
                s += v
                k += t
                o, i = _advance(o, i, step_o, step_i, inner)
        if k > 0.0:
            mean_b = s / k
            q = 0.0
            for b in range(_BATCH):
                if b < nb:
                    d = (buf[b] - mean_b) * keep[b]
                    q += d * d
            n, mean, m2 = _chan_merge(n, mean, m2, k, mean_b, q)
        done += nb
    return n, mean, m2


@cuda.jit(**_JIT)
def masked_forward_partials(x, w, width, nblk, chunk, part):
    """:func:`forward_partials` over the True positions of ``w`` (uint8, shape
    ``(outer, inner)``): per-(channel, chunk) ``(n, mean, M2)``, ``n`` possibly 0.

    One read of x and of the mask; :func:`merge_partials` then merges them.
    """
    sh_n = cuda.shared.array(THREADS, numba.float64)
    sh_mean = cuda.shared.array(THREADS, numba.float64)
    sh_m2 = cuda.shared.array(THREADS, numba.float64)
    c, o, i, count, step_o, step_i, k = _assign(x, width, nblk, chunk)
    n, mean, m2 = _thread_masked_moments(x, w, c, o, i, count, step_o, step_i)
    _store_moments(n, mean, m2, width, c, k, part, sh_n, sh_mean, sh_m2)


def _masked_input_grad_kernel(compute):
    """The masked dx kernel for ``compute`` (float32 for float16 and float32 data).

    Returns
    -------
    numba.cuda dispatcher
        ``masked_input_grad``.
    """
    CT = np.dtype(compute).type
    dev = _compute_functions(compute)
    _grad_coefficients = dev.grad_coefficients
    _channel_coefficients = dev.channel_coefficients
    _affine = dev.affine

    @cuda.jit(**_JIT)
    def masked_input_grad(
        dy,
        x,
        w,
        dx,
        width,
        nblk,
        chunk,
        sums,
        m,
        mean,
        invstd,
        gamma,
        has_gamma,
        beta,
        has_beta,
        relu,
    ):
        """``dx = a * dy`` where ``w`` is False, ``a * dy + b * (x - mean) + d`` where it
        is True, from the sums over every position ``sums`` (float64, ``(2, C, 1)``) and
        the True positions' count ``m`` (float): one read of dy, x and the mask, one write
        of dx (``a``, ``b``, ``d`` as in :func:`_backward_apply_kernel`)."""
        c, o, i, count, step_o, step_i, k = _assign(x, width, nblk, chunk)
        if count > 0:
            inv = np.float64(invstd[c])
            hi, lo, scale, shift = _channel_coefficients(
                np.float64(mean[c]), inv, gamma, has_gamma, beta, has_beta, c
            )
            a, b, d = _grad_coefficients(
                _param(gamma, c, has_gamma, 1.0) * inv, inv, sums[0, c, 0], sums[1, c, 0], m
            )
            inner = x.shape[2]
            zero = CT(0)
            for _ in range(count):
                xv = x[o, c, i]
                gv = CT(dy[o, c, i])
                if relu and _affine(xv, hi, lo, scale, shift) <= zero:
                    gv = zero
                v = a * gv
                if w[o, i]:
                    v = a * gv + b * ((CT(xv) - hi) - lo) + d
                dx[o, c, i] = v
                o, i = _advance(o, i, step_o, step_i, inner)

    return masked_input_grad


@functools.cache
def build(compute):
    """Compile-on-first-use kernels whose coefficients are in ``compute`` dtype.

    Assembled from the per-kernel factories above; ``forward_partials`` does not depend
    on the compute dtype and is shared.

    Parameters
    ----------
    compute : numpy dtype
        float32 (float16 and float32 data) or float64.

    Returns
    -------
    types.SimpleNamespace
        ``forward_partials``, ``forward_apply``, ``backward_partials``,
        ``backward_apply``, ``inference``, ``residual``, ``frozen_backward``,
        ``masked_forward_partials``, ``masked_input_grad``.
    """
    return types.SimpleNamespace(
        forward_partials=forward_partials,
        forward_apply=_forward_apply_kernel(compute),
        inference=_inference_kernel(compute),
        residual=_residual_kernel(compute),
        backward_partials=_backward_partials_kernel(compute),
        backward_apply=_backward_apply_kernel(compute),
        frozen_backward=_frozen_backward_kernel(compute),
        masked_forward_partials=masked_forward_partials,
        masked_input_grad=_masked_input_grad_kernel(compute),
    )


# --------------------------------------------------------------------------------------
# Layout and bookkeeping kernels (any dtype; no statistics)
# --------------------------------------------------------------------------------------


@cuda.jit(**_DEVICE)
def _strided_position(k, shape, strides, offset):
    """Element offset of the ``k``-th value (C order over ``shape``) of a strided span."""
    rem = k
    pos = offset
    for d in range(len(shape) - 1, -1, -1):
        q = rem // shape[d]
        pos += (rem - q * shape[d]) * strides[d]
        rem = q
    return pos


@cuda.jit(**_JIT)
def gather(src, dst, shape, strides, offset):
    """``dst[k] = src[offset + sum(index_d(k) * strides[d])]``: strided to contiguous.

    ``src`` is a 1-D view spanning the strided array's memory, ``dst`` a contiguous 1-D
    array of ``prod(shape)`` values (C order over ``shape``); strides are in elements.
    Casts to ``dst``'s dtype. Grid-stride loop.
    """
    for k in range(cuda.grid(1), dst.shape[0], cuda.gridsize(1)):
        dst[k] = src[_strided_position(k, shape, strides, offset)]


@cuda.jit(**_JIT)
def scatter(src, dst, shape, strides, offset):
    """The inverse of :func:`gather`: contiguous ``src`` into a strided ``dst`` span."""
    for k in range(cuda.grid(1), src.shape[0], cuda.gridsize(1)):
        dst[_strided_position(k, shape, strides, offset)] = src[k]


@cuda.jit(**_JIT)
def merge_partials(part, moments, out):
    """Combine each channel's partials in chunk order into ``out`` (float64, ``(2, C)``).

    One thread per channel. With ``moments``, ``part`` is ``(3, C, nblk)`` from
    ``forward_partials`` and ``out`` receives ``(mean, M2)`` (Chan's merge, left to
    right); otherwise ``part`` is ``(2, C, nblk)`` from ``backward_partials`` and ``out``
    receives the two sums (left to right). Used by synchronized BatchNorm, which stages
    these ``2 * C`` values on the host.
    """
    c = cuda.grid(1)
    if c < part.shape[1]:
        a = 0.0
        b = 0.0
        if moments:
            n = 0.0
            for k in range(part.shape[2]):
                n, a, b = _chan_merge(n, a, b, part[0, c, k], part[1, c, k], part[2, c, k])
        else:
            for k in range(part.shape[2]):
                a += part[0, c, k]
                b += part[1, c, k]
        out[0, c] = a
        out[1, c] = b


@cuda.jit(**_JIT)
def frozen_grads(part, invstd, dgamma_out, dbeta_out):
    """Launch 2 of the backward through fixed statistics: each channel's partials of
    :func:`frozen_backward` added in chunk order (left to right, as
    :func:`merge_partials`); ``dgamma = invstd * sum dy * (x - mean)`` and
    ``dbeta = sum dy`` stored in the outputs' dtype. One thread per channel.
    """
    c = cuda.grid(1)
    if c < part.shape[1]:
        a = 0.0
        b = 0.0
        for k in range(part.shape[2]):
            a += part[0, c, k]
            b += part[1, c, k]
        dgamma_out[c] = np.float64(invstd[c]) * b
        dbeta_out[c] = a


@cuda.jit(**_JIT)
def fill(a, value):
    """``a[:] = value`` for a contiguous 1-D array. Grid-stride loop."""
    for k in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
        a[k] = value


@cuda.jit(**_JIT)
def take_counts(counter, out):
    """``out[j] = counter[j]; counter[j] = 0`` atomically (one thread per entry)."""
    j = cuda.grid(1)
    if j < counter.shape[0]:
        out[j] = cuda.atomic.exch(counter, j, 0)
