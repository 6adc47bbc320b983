"""Shared operations of the layer's variants: batch renormalization and ghost batches.

Written once above the backends, like :mod:`fastbn._ops` (whose operations they reuse):
each function takes a backend ``be`` and arrays it has wrapped, and calls only the
backend interface (canonical view, output, ``shard_moments``, ``normalize``) and the
shared operations. The per-channel arithmetic (renormalization's ``r`` and ``d``, the
exact merge of the ghost batches' statistics) is float64 on the host, ``2 * C`` values
per batch or ghost batch.

- Batch renormalization (Ioffe, 2017; Keras's ``renorm``): the batch's moments, then
  ``r`` and ``d`` from the renorm statistics, folded into the affine coefficients
  (``gamma * r``, ``gamma * d + beta``) of one normalize pass; the backward is plain
  BatchNorm's with those coefficients, ``r`` and ``d`` being constants of the gradient.
- Ghost batches (Hoffer et al., 2017; tf-keras's ``virtual_batch_size``): the kernels on
  each chunk of ``k`` consecutive samples; the running statistics from the exact moments
  of the whole batch (:func:`fastbn.distributed.merge_moments`).
"""

import math
from typing import NamedTuple

import numpy as np

from . import _ops
from .distributed import merge_moments

_FLOAT64 = np.dtype(np.float64)


def check_renorm_clipping(renorm_clipping):
    """``(rmin, rmax, dmax)`` of a Keras ``renorm_clipping`` dict, checked.

    Missing keys default to ``rmin=0``, ``rmax=inf``, ``dmax=inf``, as in Keras.

    Parameters
    ----------
    renorm_clipping : dict or None
        Keys among ``"rmin"``, ``"rmax"``, ``"dmax"``; values real numbers.

    Returns
    -------
    tuple of float

    Raises
    ------
    TypeError
        Not a dict, or a value that is not a real number.
    ValueError
        An unknown key, a NaN, ``rmax < rmin`` or ``dmax < 0`` (Keras's checks; an
        ``rmin`` below 0 is no bound, ``r`` being positive, and is taken as Keras does).

    Examples
    --------
    >>> check_renorm_clipping({"rmax": 3.0})
    (0.0, 3.0, inf)
    """
    if renorm_clipping is None:
        renorm_clipping = {}
    if not isinstance(renorm_clipping, dict):
        raise TypeError(
            "renorm_clipping must be a dict with keys among 'rmin', 'rmax', 'dmax', got "
            f"{type(renorm_clipping).__name__}"
        )
    unknown = sorted(str(k) for k in set(renorm_clipping) - {"rmin", "rmax", "dmax"})
    if unknown:
        raise ValueError(
            f"renorm_clipping has unknown key(s) {unknown}: expected keys among "
            "'rmin', 'rmax', 'dmax'"
        )
    values = {}
    for key, default in (("rmin", 0.0), ("rmax", math.inf), ("dmax", math.inf)):
        value = renorm_clipping.get(key, default)
        if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)
        ):
            raise TypeError(
                f"renorm_clipping[{key!r}] must be a real number, got {type(value).__name__}"
            )
        if math.isnan(value):
            raise ValueError(f"renorm_clipping[{key!r}] must not be NaN")
        values[key] = float(value)
    rmin, rmax, dmax = values["rmin"], values["rmax"], values["dmax"]
    if rmax < rmin:
        raise ValueError(f"renorm_clipping['rmax'] must be >= rmin ({rmin}), got {rmax}")
    if dmax < 0:
        raise ValueError(f"renorm_clipping['dmax'] must be >= 0, got {dmax}")
    return rmin, rmax, dmax


def ramp_clipping(step, ramp_steps):
    """The paper's ramp of the clipping bounds after ``step`` training steps.

    ``rmax`` goes linearly from 1 to 3 and ``dmax`` from 0 to 5 over ``ramp_steps``
    steps, then stays; ``rmin = 1 / rmax`` (Ioffe, 2017, section 4: at first plain
    BatchNorm, then renormalization relaxed gradually).

    Returns
    -------
    tuple of float
        ``(rmin, rmax, dmax)``.

    Examples
    --------
    >>> ramp_clipping(0, 100), ramp_clipping(50, 100), ramp_clipping(500, 100)
    ((1.0, 1.0, 0.0), (0.5, 2.0, 2.5), (0.3333333333333333, 3.0, 5.0))
    """
    t = min(step / ramp_steps, 1.0)
    rmax = 1.0 + 2.0 * t
    return 1.0 / rmax, rmax, 5.0 * t


class Renorm(NamedTuple):
    """The renorm state of a layer (a backend's ``(C,)`` arrays: the renorm statistics
    and the running standard deviation), Keras's ``renorm_momentum`` (the weight of the
    *old* value) and the clipping bounds."""

    mean: object
    std: object
    running_std: object
    momentum: float
    rmin: float
    rmax: float
    dmax: float


def _host64(be, a, C, fill):
    """A per-channel array as float64 host values (``fill`` for None)."""
    if a is None:
        return np.full(C, fill)
    return np.asarray(be.to_host(a), dtype=np.float64)


def _moments(be, x, v, C, st, comm):
    """``(mean, var, count)`` of the batch (every rank's with ``comm``), float64 host."""
    if comm is None:
        m = x.size // C
        mean, m2 = be.shard_moments(x, v, st)
        return mean, m2 / m, m
    outer, _, inner = v.x3.shape
    n_local = outer * inner if x.size else 0
    mean, var = comm.moments_from_local(
        C, n_local, lambda: be.shard_moments(x, v, st), dtype=x.dtype
    )
    return mean, var, comm.count


def renorm_train_forward(be, x, gamma, beta, axis, eps, relu, dtype, renorm, running, comm=None):
    """The batch-renormalization training forward: ``(y, mean, invstd, gamma_r, beta_r, r, d)``.

    Keras 3's ``BatchNormalization(renorm=True)``: ``y = ((x - mean) * invstd * r + d) *
    gamma + beta`` with ``r = clip(std / s, rmin, rmax)``, ``d = clip((mean - renorm_mean)
    / s, -dmax, dmax)``, ``std = sqrt(var + eps)`` of the batch and ``s = max(renorm_std,
    sqrt(eps))`` (the renorm statistics before this step's update). Then the renorm
    statistics move towards the batch's ``mean`` and ``std`` with ``renorm.momentum``, and
    the running mean and running standard deviation towards them with
    ``running.factor``; the running variance becomes ``max(running_std**2 - eps, 0)``.
    With ``running.unbiased`` (PyTorch's convention) the running standard deviation
    follows ``sqrt(var * m / (m - 1) + eps)``. Nothing is written when a statistic is not
    finite (a FloatingPointError, the policy of :func:`fastbn._ops.check_finite`). With
    ``running`` None (the layer's ``update_running_stats=False``) no statistic moves.

    Parameters
    ----------
    be : backend module
    x, gamma, beta : wrapped arrays (``gamma``/``beta`` may be None)
    dtype : numpy.dtype
        dtype of the returned ``mean``/``invstd`` (the backward's saved statistics).
    renorm : Renorm
    running : fastbn._ops.Running or None
    comm : fastbn.distributed.Sync, optional
        Synchronized batch statistics (every rank's ``x``).

    Returns
    -------
    tuple
        ``y``; ``mean``, ``invstd`` (``dtype``); ``gamma_r``, ``beta_r`` (the folded
        coefficients, wrapped arrays of the statistics dtype of ``x``); ``r``, ``d``
        (float64 host arrays).
    """
    C = x.shape[axis]
    with be.scope(x, None) as st:
        v = be.view(x, axis, st)
        mean, var, m = _moments(be, x, v, C, st, comm)
        std = np.sqrt(var + eps)
        renorm_mean = _host64(be, renorm.mean, C, 0.0)
        renorm_std = _host64(be, renorm.std, C, 1.0)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            s = np.maximum(renorm_std, math.sqrt(eps))  # Keras: no division by ~0 early on
            r = np.clip(std / s, renorm.rmin, renorm.rmax)
            d = np.clip((mean - renorm_mean) / s, -renorm.dmax, renorm.dmax)
        if running is not None:
            updates = _renorm_updates(be, renorm, running, mean, var, std, m, eps)
            finite = updates[1] and bool(np.isfinite(r).all() and np.isfinite(d).all())
            _ops.check_finite(mean, var, "raise", updates[0] + (finite,), stacklevel=4)
        g = _host64(be, gamma, C, 1.0)
        b = _host64(be, beta, C, 0.0)
        coef_dtype = _ops.stats_dtype(x.dtype)
        gamma_r = be.wrap_state("gamma", be.stats_from_host(g * r, x, coef_dtype, st))
        beta_r = be.wrap_state("beta", be.stats_from_host(g * d + b, x, coef_dtype, st))
        dest = be.output(None, v, x, st)
        if x.size:
            be.normalize(x, v, dest, mean, var, gamma_r, beta_r, eps, relu, st)
        if running is not None:
            (new_mean, new_var), _, (new_renorm_mean, new_renorm_std, new_std) = updates
            be.store(renorm.mean, new_renorm_mean, st)
            be.store(renorm.std, new_renorm_std, st)
            be.store(renorm.running_std, new_std, st)
            be.store(running.mean, new_mean, st)
            be.store(running.var, new_var, st)
        invstd = 1.0 / std
        return (
            dest.finish(),
            be.stats_from_host(mean, x, dtype, st),
            be.stats_from_host(invstd, x, dtype, st),
            gamma_r,
            beta_r,
            r,
            d,
        )


def _renorm_updates(be, renorm, running, mean, var, std, m, eps):
    """The statistics a renorm step stores, rounded to their dtypes, not yet stored:
    ``((running_mean, running_var), finite, (renorm_mean, renorm_std, running_std))``
    (see :func:`renorm_train_forward`)."""
    C = mean.shape[0]
    renorm_mean = _host64(be, renorm.mean, C, 0.0)
    renorm_std = _host64(be, renorm.std, C, 1.0)
    w = renorm.momentum
    with np.errstate(over="ignore", invalid="ignore"):
        new_renorm_mean = (w * renorm_mean + (1.0 - w) * mean).astype(renorm.mean.dtype)
        new_renorm_std = (w * renorm_std + (1.0 - w) * std).astype(renorm.std.dtype)
        std_running = np.sqrt(var * (m / (m - 1.0) if running.unbiased else 1.0) + eps)
    # the running mean and standard deviation: the rule of every running statistic
    new_mean, new_std, finite = _ops.running_values(
        be.to_host(running.mean),
        be.to_host(renorm.running_std),
        mean,
        std_running,
        m,
        running.factor,
        False,
    )
    with np.errstate(over="ignore", invalid="ignore"):
        new_std64 = new_std.astype(np.float64)
        new_var = np.maximum(new_std64 * new_std64 - eps, 0.0).astype(running.var.dtype)
    finite = bool(
        finite
        and np.isfinite(new_var).all()
        and np.isfinite(new_renorm_mean).all()
        and np.isfinite(new_renorm_std).all()
    )
    return (new_mean, new_var), finite, (new_renorm_mean, new_renorm_std, new_std)


def renorm_backward(be, dy, x, mean, invstd, gamma_r, beta_r, r, d, axis, relu, grads, comm=None):
    """The backward of :func:`renorm_train_forward`, ``r`` and ``d`` held constant.

    ``dx`` is plain BatchNorm's with the folded coefficients ``gamma_r = gamma * r``;
    ``dbeta = sum dy`` and ``dgamma = r * sum(dy * xhat) + d * sum(dy)`` (the derivative
    of ``y`` with respect to ``gamma`` is ``r * xhat + d``).

    Parameters
    ----------
    grads : tuple or None
        ``(like, dtype)`` as for :func:`fastbn._ops.backward`.

    Returns
    -------
    tuple
        ``(dx, dgamma, dbeta)`` (None, None without ``grads``).
    """
    if grads is None:
        dx, _, _ = _ops.backward(
            be, dy, x, mean, invstd, gamma_r, beta_r, axis, relu, None, None, comm=comm
        )
        return dx, None, None
    like, dtype = grads
    dx, dxhat_sum, dbeta = _ops.backward(
        be,
        dy,
        x,
        mean,
        invstd,
        gamma_r,
        beta_r,
        axis,
        relu,
        None,
        None,
        grads=(like, _FLOAT64),
        comm=comm,
    )
    s_dy = np.asarray(be.to_host(dbeta), dtype=np.float64)
    s_dy_xhat = np.asarray(be.to_host(dxhat_sum), dtype=np.float64)
    with be.scope(x, None) as st:
        dgamma = be.stats_from_host(r * s_dy_xhat + d * s_dy, like, dtype, st)
        dbeta = be.stats_from_host(s_dy, like, dtype, st)
    return dx, dgamma, dbeta


def check_virtual_batch(shape, axis, k):
    """Raise unless a batch of ``shape`` splits into ghost batches of ``k`` samples.

    The batch axis is axis 0 and must not be the channel axis; its length must be a
    multiple of ``k``.
    """
    if axis == 0:
        raise ValueError(
            "virtual_batch_size needs the batch on axis 0 and the channels elsewhere, "
            f"got the channel axis 0 (x.shape {tuple(shape)})"
        )
    if shape[0] % k:
        raise ValueError(
            f"virtual_batch_size={k} must divide the batch size (x.shape[0]), got "
            f"x.shape[0]={shape[0]}"
        )


def ghost_train_forward(be, x, gamma, beta, axis, eps, relu, k, dtype, running, comm=None):
    """The ghost-batch training forward: ``(y, means, invstds)``.

    Each chunk ``x[g*k:(g+1)*k]`` is normalized with its own statistics (``gamma`` and
    ``beta`` shared). The running statistics take the exact statistics of the whole
    batch, merged from the chunks' ``(mean, M2)`` (Chan), and of every rank's batch with
    ``comm`` (the ghost batches themselves are per rank). Every chunk's moments are
    computed and the policy applied before any output is written.

    Returns
    -------
    tuple
        ``y``; ``means``, ``invstds``: lists of the chunks' statistics (``dtype``).
    """
    C = x.shape[axis]
    chunks = [be.wrap("x", be.unwrap(x)[g : g + k]) for g in range(0, x.shape[0], k)]
    with be.scope(x, None) as st:
        views = [be.view(c, axis, st) for c in chunks]
        moments = [be.shard_moments(c, v, st) for c, v in zip(chunks, views)]
        m = chunks[0].size // C
        n, mean, m2 = merge_moments(
            [m] * len(chunks), [mo[0] for mo in moments], [mo[1] for mo in moments]
        )
        if comm is not None:
            mean, var = comm.moments_from_local(C, n, (mean, m2), dtype=x.dtype)
            n = comm.count
        else:
            var = m2 / n
        if running is not None:
            _ops.update_running(be, running, mean, var, n, st)
        y = be.empty_output(x, axis, None, st)
        means, invstds = [], []
        for g, (c, v, (mean_g, m2_g)) in enumerate(zip(chunks, views, moments)):
            var_g = m2_g / m
            dest = be.output(be.wrap_out(y[g * k : (g + 1) * k]), v, c, st)
            be.normalize(c, v, dest, mean_g, var_g, gamma, beta, eps, relu, st)
            dest.finish()
            means.append(be.stats_from_host(mean_g, x, dtype, st))
            invstds.append(be.stats_from_host(1.0 / np.sqrt(var_g + eps), x, dtype, st))
        return y, means, invstds


def ghost_backward(be, dy, x, means, invstds, gamma, beta, axis, relu, grads, comm=None):
    """The backward of :func:`ghost_train_forward`: ``(dx, dgamma, dbeta)``.

    Each chunk's ``dx`` is plain BatchNorm's over its ``k`` samples; ``dgamma`` and
    ``dbeta`` are the sums of the chunks', added in chunk order (float64), and with
    ``comm`` the sums over every rank's (one collective), identical on every rank.
    """
    k = x.shape[0] // len(means)
    like = x if grads is None else grads[0]
    with be.scope(x, None) as st:
        dx = be.empty_output(x, axis, None, st)
        s_dy = s_dy_xhat = 0.0
        for g, (mean_g, invstd_g) in enumerate(zip(means, invstds)):
            s = slice(g * k, (g + 1) * k)
            _, dgamma_g, dbeta_g = _ops.backward(
                be,
                be.wrap("dy", be.unwrap(dy)[s]),
                be.wrap("x", be.unwrap(x)[s]),
                be.wrap_state("mean", mean_g),
                be.wrap_state("invstd", invstd_g),
                gamma,
                beta,
                axis,
                relu,
                be.wrap_out(dx[s]),
                None,
                grads=(like, _FLOAT64),
            )
            s_dy_xhat = s_dy_xhat + np.asarray(be.to_host(dgamma_g), dtype=np.float64)
            s_dy = s_dy + np.asarray(be.to_host(dbeta_g), dtype=np.float64)
        if comm is not None:  # one collective on every rank, affine or not
            s_dy, s_dy_xhat = comm.grad_sums_from_local(
                x.shape[axis], x.size // x.shape[axis], (s_dy, s_dy_xhat), dtype=x.dtype
            )
        if grads is None:
            return dx, None, None
        return (
            dx,
            be.stats_from_host(s_dy_xhat, like, grads[1], st),
            be.stats_from_host(s_dy, like, grads[1], st),
        )
