"""Shared operations: written once, above the backends.

The training forward (with the running-statistics update, the momentum rule and the
non-finite policy), the backward and the inference, each with or without synchronized
BatchNorm (:class:`fastbn.distributed.Sync`). Every function takes a backend ``be``
(:mod:`fastbn._cpu_backend` or :mod:`fastbn.cuda`) and arrays it has wrapped and the
public functions have checked; it calls the backend's operations (canonical view, output,
kernels) and never looks at the array kind itself.

Deliberate differences between devices are backend capabilities, not forks of the logic:
``be.DEFERRED_NONFINITE`` (the GPU updates the running statistics on the device and
reports non-finite batches later, :func:`fastbn.cuda.check_nonfinite`).
"""

import functools
import math
import warnings
from typing import NamedTuple

import numpy as np

from . import _checks, _config, cpu, distributed

ON_NONFINITE = ("raise", "warn")
_FLOAT32 = np.dtype(np.float32)
_FLOAT64 = np.dtype(np.float64)


def stats_dtype(dtype):
    """Saved statistics and parameter gradients: float64 for float64 data, else float32."""
    return _FLOAT64 if dtype.char == "d" else _FLOAT32


# --------------------------------------------------------------------------------------
# Checks shared by the public functions and the layer
# --------------------------------------------------------------------------------------


def check_forward_args(x, gamma, beta, axis, eps, out, activation):
    """Checks shared by every forward; returns ``(axis, relu)``."""
    _checks.check_input("x", x)
    axis = _checks.normalize_axis(axis, x.ndim)
    C = x.shape[axis]
    _checks.check_channel_param("gamma", gamma, C, axis)
    _checks.check_channel_param("beta", beta, C, axis)
    _checks.check_eps(eps)
    _checks.check_out("out", out, x.shape, np.dtype(x.dtype))
    return axis, _checks.check_activation(activation)


def check_on_nonfinite(on_nonfinite):
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be 'raise' or 'warn', got {on_nonfinite!r}")


def momentum_factor(momentum, num_batches_tracked):
    """The weight of the new batch: ``momentum``, or ``1 / (n + 1)`` for a cumulative average."""
    momentum = _checks.check_momentum(momentum)
    if num_batches_tracked is not None:  # checked whenever given, used for momentum=None
        n = _checks.check_num_batches_tracked(num_batches_tracked)
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ValueError(
            "momentum=None (cumulative average) needs num_batches_tracked, the "
            "number of batches the running statistics already average"
        )
    return 1.0 / (n + 1)


# --------------------------------------------------------------------------------------
# The running statistics
# --------------------------------------------------------------------------------------


class Running(NamedTuple):
    """A running-statistics update to make: the arrays (a backend's), the weight of the
    new batch (:func:`momentum_factor`), the variance rule and the non-finite policy."""

    mean: object
    var: object
    factor: float
    unbiased: bool
    on_nonfinite: str = "raise"


def running_values(running_mean, running_var, mean, var, m, factor, unbiased):
    """The updated running statistics, rounded to their storage dtypes, not yet stored.

    ``running = (1 - factor) * running + factor * batch`` (the unbiased batch variance
    ``var * m / (m - 1)`` when ``unbiased``), in float64, then rounded once to each
    array's own dtype (float16 and any byte order included): see
    :func:`fastbn.cpu.running_values`. A value too large for the storage dtype comes back
    as inf, for :func:`check_finite` to refuse.

    Parameters
    ----------
    running_mean, running_var : ndarray, shape (C,)
        Host arrays (read only here).
    mean, var : ndarray of float64, shape (C,)
        Batch mean and biased variance.

    Returns
    -------
    tuple
        ``(new_mean, new_var, finite)``: arrays of the dtypes of ``running_mean`` and
        ``running_var``, and whether the batch statistics and the new values are all
        finite.
    """
    C = mean.shape[0]
    rm_dtype, rv_dtype = running_mean.dtype, running_var.dtype
    if rm_dtype.char in "fd" and rv_dtype.char in "fd" and rm_dtype.isnative and rv_dtype.isnative:
        new_mean, new_var = np.empty(C, rm_dtype), np.empty(C, rv_dtype)
        finite = cpu.running_values(
            running_mean, running_var, mean, var, m, factor, unbiased, new_mean, new_var
        )
        return new_mean, new_var, finite
    # float16 or another byte order, which Numba cannot load: float64 copies in, the same
    # arithmetic, then one rounding to the storage dtype by NumPy
    new64 = np.empty(C), np.empty(C)
    cpu.running_values(
        running_mean.astype(np.float64),
        running_var.astype(np.float64),
        mean,
        var,
        m,
        factor,
        unbiased,
        *new64,
    )
    with np.errstate(over="ignore", invalid="ignore"):
        new_mean, new_var = new64[0].astype(rm_dtype), new64[1].astype(rv_dtype)
    finite = bool(
        np.isfinite(mean).all()
        and np.isfinite(var).all()
        and np.isfinite(new_mean).all()
        and np.isfinite(new_var).all()
    )
    return new_mean, new_var, finite


def check_finite(mean, var, on_nonfinite, new=None, stacklevel=3):
    """Raise (or warn) when batch statistics are not finite, or when the running
    statistics would not be finite after the update (``new``, from
    :func:`running_values`: the batch statistics overflow the storage dtype, say
    float32 data of std 1e20); return whether the update may be stored."""
    if new is not None:
        if new[2]:
            return True
    elif np.isfinite(mean).all() and np.isfinite(var).all():
        return True
    bad = np.flatnonzero(~(np.isfinite(mean) & np.isfinite(var)))
    if bad.size:
        message = (
            f"batch statistics are not finite in {bad.size} channel(s) (first: "
            f"{bad[:5].tolist()}); the running statistics were left unchanged"
        )
    else:
        bad = np.flatnonzero(~(np.isfinite(new[0]) & np.isfinite(new[1])))
        message = (
            f"the running statistics (running_mean {new[0].dtype}, running_var "
            f"{new[1].dtype}) would not be finite after this batch's update in "
            f"{bad.size} channel(s) (first: {bad[:5].tolist()}): the batch "
            f"statistics overflow their dtype (or they were not finite already); "
            f"the running statistics were left unchanged"
        )
    if on_nonfinite == "raise":
        raise FloatingPointError(message + " (pass on_nonfinite='warn' to get the output anyway)")
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)
    return False


@functools.lru_cache(maxsize=8)
def overflow_limit(dtype):
    """The smallest magnitude that rounds to inf in ``dtype`` (inf for float64): a running
    statistic of that size or more would overflow its storage (the rule of
    :func:`running_values`, for backends that update on the device)."""
    info = np.finfo(dtype)
    if info.bits == 64:
        return math.inf
    biggest = float(info.max)
    ulp = biggest - float(np.nextafter(info.max, info.max.dtype.type(0)))
    return biggest + ulp / 2  # exact in float64; round-half-to-even takes it to inf


def update_running(be, running, mean, var, m, st):
    """Apply the policy to the batch statistics ``(mean, var)`` (float64 host arrays) and
    store the new running statistics when it accepts them; returns whether it did."""
    new = running_values(
        be.to_host(running.mean),
        be.to_host(running.var),
        mean,
        var,
        m,
        running.factor,
        running.unbiased,
    )
    if check_finite(mean, var, running.on_nonfinite, new, stacklevel=5):
        be.store(running.mean, new[0], st)
        be.store(running.var, new[1], st)
        return True
    return False


# --------------------------------------------------------------------------------------
# Operations
# --------------------------------------------------------------------------------------


def train_forward(
    be,
    x,
    gamma,
    beta,
    axis,
    eps,
    relu,
    out,
    stream,
    dtype=None,
    running=None,
    comm=None,
    residual=None,
    mask=None,
):
    """The training forward on checked, wrapped arguments: ``(y, mean, invstd)``.

    Parameters
    ----------
    residual : array, optional
        z of ``y = act(bn(x) + z)`` (checked by :func:`fastbn._checks.check_residual`): added in the
        normalizing pass, after the statistics pass (it does not change them).
    dtype : numpy.dtype or None
        The dtype of the returned ``mean`` and ``invstd`` (None: not needed, None returned).
    running : Running, optional
        Update these running statistics from the batch's (refused when not finite, by
        ``running.on_nonfinite``); nothing is written to ``out`` before the check.
    comm : fastbn.distributed.Sync, optional
        The statistics are those of every rank's ``x`` (two collectives).
    mask : array, optional
        Checked by :func:`fastbn._checks.check_mask`: the statistics are those of the
        True positions (with ``comm``, of every rank's, each rank weighted by its count);
        ``y`` is written everywhere. A mask that is all True takes the unmasked path.
    """
    C = x.shape[axis]
    with be.scope(x, stream) as st:
        if comm is None and x.size == 0:  # an empty output; NaN statistics (no values)
            y = be.empty_output(x, axis, out, st)
            if dtype is None:
                return y, None, None
            return y, be.stats(x, C, dtype, st, math.nan), be.stats(x, C, dtype, st, math.nan)
        v = be.view(x, axis, st)
        zv = None if residual is None else be.view(residual, axis, st, order=v.order)
        dest = be.output(out, v, x, st, also=zv)
        w, count = _masked(be, mask, x, axis, v, st, comm)
        if comm is not None or w is not None or residual is not None:
            # the statistics first, on the host, then one normalizing pass (+ z)
            if comm is not None:
                mean, var = comm.moments_from_local(
                    C, count, lambda: _shard_moments(be, x, v, st, w), dtype=x.dtype
                )
                m = comm.count
            else:
                mean, m2 = _shard_moments(be, x, v, st, w)
                var, m = m2 / count, count
            if running is not None:
                update_running(be, running, mean, var, m, st)
            if x.size:
                be.normalize(x, v, dest, mean, var, gamma, beta, eps, relu, st, residual=zv)
            invstd = 1.0 / np.sqrt(var + eps)
            return (
                dest.finish(),
                be.stats_from_host(mean, x, dtype, st),
                be.stats_from_host(invstd, x, dtype, st),
            )
        m = x.size // C
        if running is not None and be.DEFERRED_NONFINITE:  # the update on the device
            correction = m / (m - 1.0) if running.unbiased else 1.0
            mode = 0 if running.on_nonfinite == "raise" else 1
            limits = overflow_limit(running.mean.dtype), overflow_limit(running.var.dtype)
            mean, invstd, _ = be.forward(
                x,
                v,
                dest,
                gamma,
                beta,
                eps,
                relu,
                st,
                dtype,
                (running.mean, running.var, running.factor, correction, mode, limits),
            )
            y = dest.finish()
            if _config.CUDA_SYNC_NONFINITE:
                be.report_nonfinite(st)
            return y, mean, invstd
        if running is not None and out is not None:  # check before out is written
            mean, m2 = be.shard_moments(x, v, st)
            var = m2 / m
            if update_running(be, running, mean, var, m, st):
                be.normalize(x, v, dest, mean, var, gamma, beta, eps, relu, st)
                invstd = 1.0 / np.sqrt(var + eps)
                return (
                    dest.finish(),
                    be.stats_from_host(mean, x, dtype, st),
                    be.stats_from_host(invstd, x, dtype, st),
                )
            # refused with on_nonfinite="warn": the output all the same
            mean, invstd, _ = be.forward(x, v, dest, gamma, beta, eps, relu, st, dtype)
            return dest.finish(), mean, invstd
        mean, invstd, host = be.forward(x, v, dest, gamma, beta, eps, relu, st, dtype)
        if running is not None:
            update_running(be, running, host[0], host[1], m, st)
        return dest.finish(), mean, invstd


def _shard_moments(be, x, v, st, w):
    """This array's ``(mean, M2)``: over the True positions of ``w`` when given."""
    return be.shard_moments(x, v, st) if w is None else be.shard_moments(x, v, st, mask=w)


def _masked(be, mask, x, axis, v, st, comm):
    """``(w, count)``: the mask as the backend's kernels take it (None when there is none,
    or when it is all True: the unmasked kernels then run, bitwise the unmasked result)
    and the values per channel of this array that enter the statistics. Without ``comm``
    fewer than 2 True positions in a non-empty batch are a ValueError."""
    outer, _, inner = v.x3.shape
    if mask is None:
        return None, outer * inner if x.size else 0
    w, count = be.mask_view(mask, x, axis, v, st)
    if comm is None:
        _checks.check_mask_count(count, outer * inner)
    return (None if count == outer * inner else w), count


def _residual_dy(be, x, v, dyv, axis, mean, invstd, gamma, beta, relu, residual, st):
    """The gradient of the sum ``bn(x) + z`` in ``act(bn(x) + z)``: ``(dz, its view)``.

    ``dz = dy * [bn(x) + z > 0]`` with ``relu`` (the mask recomputed from ``residual``'s
    view), a copy of ``dy`` without: a new x-shaped array of x's kind, which the
    BatchNorm backward then takes as its ``dy``, without ReLU.
    """
    zv = be.view(residual, axis, st, order=v.order) if relu else dyv
    g = be.output(None, v, x, st)
    if x.size:
        be.residual_grad(x, v, dyv, zv, g, mean, invstd, gamma, beta, relu, st)
    dz = g.finish()
    return dz, be.view(be.wrap("dz", dz), axis, st, order=v.order)


def _empty_backward(be, x, axis, out, grads, residual_grad, st):
    """The backward of an empty batch: an empty dx (and dz), zero gradients."""
    dx = be.empty_output(x, axis, out, st)
    dz = (be.empty_output(x, axis, None, st),) if residual_grad else ()
    if grads is None:
        return (dx, None, None) + dz
    like, dtype = grads
    C = x.shape[axis]
    zeros = be.stats(like, C, dtype, st, 0.0), be.stats(like, C, dtype, st, 0.0)
    return (dx, *zeros) + dz


def _backward_views(
    be, dy, x, axis, mean, invstd, gamma, beta, relu, out, residual, residual_grad, st
):
    """The views and output of a backward: ``(v, dyv, dest, dz, relu)``.

    With ``residual_grad``, or ``relu`` and ``residual``, dy becomes the residual's
    gradient ``dz`` (:func:`_residual_dy`) and the BatchNorm backward runs on it without
    ReLU; ``dz`` is ``(dz,)`` to return with ``residual_grad``, else ``()``.
    """
    v = be.view(x, axis, st)
    dyv = be.view(dy, axis, st, order=v.order)
    dz = ()
    if residual_grad or (relu and residual is not None):
        dz, dyv = _residual_dy(be, x, v, dyv, axis, mean, invstd, gamma, beta, relu, residual, st)
        dz, relu = (dz,) if residual_grad else (), False
    return v, dyv, be.output(out, v, x, st, also=dyv), dz, relu


def backward(
    be,
    dy,
    x,
    mean,
    invstd,
    gamma,
    beta,
    axis,
    relu,
    out,
    stream,
    grads=None,
    comm=None,
    mask=None,
    residual=None,
    residual_grad=False,
):
    """The backward on checked, wrapped arguments: ``(dx, dgamma, dbeta)``, and the
    residual's gradient ``dz`` fourth with ``residual_grad``.

    Parameters
    ----------
    residual : array, optional
        The forward's z of ``y = act(bn(x) + z)`` (needed with ``relu`` only: the mask).
    residual_grad : bool, optional
        Also return ``dz``: ``dy`` masked where ``bn(x) + z <= 0`` with ``relu``, a copy
        of ``dy`` without. With ``relu`` and ``residual``, ``dz`` is computed first and
        the plain backward (no mask) runs on it: one more pass than the ReLU backward,
        the one that writes ``dz``.
    grads : tuple, optional
        ``(like, dtype)``: return ``dgamma`` and ``dbeta`` in ``dtype``, as arrays of
        ``like``'s kind; None: neither (both None).
    comm : fastbn.distributed.Sync, optional
        ``dgamma`` and ``dbeta`` are sums over every rank's batch and ``dx`` uses the
        global count (two collectives).
    mask : array, optional
        The forward's mask: ``dgamma`` and ``dbeta`` are still sums over every position
        (``y`` depends on gamma and beta everywhere), the statistics' terms of ``dx``
        use the True positions' count and enter at those positions only (docs/math.md).
    """
    C = x.shape[axis]
    with be.scope(x, stream) as st:
        if comm is None and x.size == 0:
            return _empty_backward(be, x, axis, out, grads, residual_grad, st)
        v, dyv, dest, dz, relu = _backward_views(
            be, dy, x, axis, mean, invstd, gamma, beta, relu, out, residual, residual_grad, st
        )
        w, count = _masked(be, mask, x, axis, v, st, comm)
        if comm is None and w is None:
            dgamma, dbeta = be.backward(x, v, dyv, dest, mean, invstd, gamma, beta, relu, st, grads)
            return (dest.finish(), dgamma, dbeta) + dz
        if comm is None:  # the backend's own masked backward (the CPU's direct path's)
            dgamma, dbeta = be.masked_backward(
                x, v, dyv, dest, mean, invstd, gamma, beta, relu, w, count, st, grads
            )
            return (dest.finish(), dgamma, dbeta) + dz
        outer, _, inner = v.x3.shape

        def local():
            return be.shard_grad_sums(x, v, dyv, mean, invstd, gamma, beta, relu, st)

        if comm is None:
            sums = local()
        else:  # the header carries the statistics' count, the payload every position's sums
            n_local = outer * inner if x.size else 0
            sums = comm.grad_sums_from_local(C, n_local, local, dtype=x.dtype, count=count)
            count = comm.count
        extra = {} if w is None else {"mask": w}
        dgamma, dbeta = be.input_grad(
            x, v, dyv, dest, mean, invstd, gamma, beta, relu, sums, count, st, grads, **extra
        )
        return (dest.finish(), dgamma, dbeta) + dz


def frozen_backward(
    be,
    dy,
    x,
    mean,
    invstd,
    gamma,
    beta,
    axis,
    relu,
    out,
    stream,
    grads=None,
    comm=None,
    residual=None,
    residual_grad=False,
):
    """The backward through fixed statistics on checked, wrapped arguments:
    ``(dx, dgamma, dbeta)``, and ``dz`` fourth with ``residual_grad`` (``residual`` and
    ``residual_grad`` as in :func:`backward`).

    ``mean`` and ``invstd`` were constants of the forward, so ``dx = gamma * invstd * dy``
    (ReLU-masked) needs no reduction, and ``dgamma = invstd * sum dy * (x - mean)``,
    ``dbeta = sum dy``: one fused pass (``be.frozen_backward``).

    Parameters
    ----------
    grads : tuple, optional
        As in :func:`backward`.
    comm : fastbn.distributed.Sync, optional
        ``dgamma`` and ``dbeta`` are sums over every rank's batch (the same on every
        rank), as in the training backward; ``dx`` is this rank's own (no global term).
        The sums travel as :data:`fastbn.distributed.FROZEN_GRAD_SUMS`, so ranks that
        mix ``training=True`` and ``False`` in one call all raise. ``dx`` is written
        after the exchange, so a failure on any rank leaves ``out`` as it was.
    """
    C = x.shape[axis]
    with be.scope(x, stream) as st:
        if comm is None and x.size == 0:
            return _empty_backward(be, x, axis, out, grads, residual_grad, st)
        v, dyv, dest, dz, relu = _backward_views(
            be, dy, x, axis, mean, invstd, gamma, beta, relu, out, residual, residual_grad, st
        )
        if comm is None:
            dgamma, dbeta = be.frozen_backward(
                x, v, dyv, dest, mean, invstd, gamma, beta, relu, st, grads
            )
            return (dest.finish(), dgamma, dbeta) + dz
        outer, _, inner = v.x3.shape
        n_local = outer * inner if x.size else 0
        s_dy, s_dyx = comm.grad_sums_from_local(
            C,
            n_local,
            lambda: be.shard_grad_sums(x, v, dyv, mean, invstd, gamma, beta, relu, st),
            dtype=x.dtype,
            kind=distributed.FROZEN_GRAD_SUMS,
        )
        if x.size:
            be.frozen_backward(x, v, dyv, dest, mean, invstd, gamma, beta, relu, st, None)
        if grads is None:
            return (dest.finish(), None, None) + dz
        like, dtype = grads
        dgamma = s_dyx * np.asarray(be.to_host(invstd), dtype=np.float64)
        return (
            dest.finish(),
            be.stats_from_host(dgamma, like, dtype, st),
            be.stats_from_host(s_dy, like, dtype, st),
        ) + dz


def frozen_statistics(be, like, running_mean, running_var, eps):
    """The fixed statistics of an inference forward as its backward takes them:
    ``(mean, invstd)``, float64 ``(C,)`` arrays of the kind of ``like`` (an array the
    backend has wrapped).

    ``invstd = 1 / sqrt(running_var + eps)`` in float64, the value the inference kernels
    compute (so the ReLU mask the backward recomputes is the forward's, bit for bit).
    """
    with be.scope(like, None) as st:
        mean = np.asarray(be.to_host(running_mean), dtype=np.float64)
        invstd = 1.0 / np.sqrt(np.asarray(be.to_host(running_var), dtype=np.float64) + eps)
        return (
            be.stats_from_host(mean, like, _FLOAT64, st),
            be.stats_from_host(invstd, like, _FLOAT64, st),
        )


def inference(
    be, x, running_mean, running_var, gamma, beta, axis, eps, relu, out, stream, residual=None
):
    """The inference on checked, wrapped arguments: ``y`` (``act(bn(x) + z)`` with
    ``residual``, in the same pass)."""
    with be.scope(x, stream) as st:
        v = be.view(x, axis, st)
        if residual is None:
            dest = be.output(out, v, x, st)
            be.inference(x, v, dest, running_mean, running_var, gamma, beta, eps, relu, st)
        else:
            zv = be.view(residual, axis, st, order=v.order)
            dest = be.output(out, v, x, st, also=zv)
            be.inference(
                x, v, dest, running_mean, running_var, gamma, beta, eps, relu, st, residual=zv
            )
        return dest.finish()
