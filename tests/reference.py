"""Slow, obviously correct float64 NumPy reference of every fastbn operation.

Written straight from the formulas of docs/math.md, with NumPy's own reductions in
float64 and no attempt at speed. Every test compares fastbn with these.
"""

import numpy as np


def _axes(x, axis):
    axis = axis % x.ndim
    return tuple(d for d in range(x.ndim) if d != axis), axis


def _bcast(p, x, axis):
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    return np.asarray(p, dtype=np.float64).reshape(shape)


def _param(p, C, fill):
    return np.full(C, fill) if p is None else np.asarray(p, dtype=np.float64)


def forward(x, gamma=None, beta=None, axis=1, eps=1e-5, activation=None):
    """Training forward: ``(y, mean, invstd, var)``, all float64."""
    x = np.asarray(x, dtype=np.float64)
    red, axis = _axes(x, axis)
    C = x.shape[axis]
    mean = x.mean(axis=red)
    var = ((x - _bcast(mean, x, axis)) ** 2).mean(axis=red)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - _bcast(mean, x, axis)) * _bcast(invstd, x, axis)
    y = _bcast(_param(gamma, C, 1.0), x, axis) * xhat + _bcast(_param(beta, C, 0.0), x, axis)
    if activation == "relu":
        y = np.maximum(y, 0.0)
    return y, mean, invstd, var


def inference(
    x, running_mean, running_var, gamma=None, beta=None, axis=1, eps=1e-5, activation=None
):
    """Inference with given statistics, float64."""
    x = np.asarray(x, dtype=np.float64)
    C = x.shape[axis % x.ndim]
    xhat = (x - _bcast(running_mean, x, axis)) / np.sqrt(_bcast(running_var, x, axis) + eps)
    y = _bcast(_param(gamma, C, 1.0), x, axis) * xhat + _bcast(_param(beta, C, 0.0), x, axis)
    if activation == "relu":
        y = np.maximum(y, 0.0)
    return y


def backward(dy, x, mean, invstd, gamma=None, beta=None, axis=1, activation=None):
    """Backward from the given statistics: ``(dx, dgamma, dbeta)``, float64.

    ``dx = gamma * invstd / m * (m * dy - dbeta - xhat * dgamma)``; with ReLU, ``dy`` is
    first zeroed where the recomputed pre-activation output is <= 0.
    """
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    red, axis = _axes(x, axis)
    C = x.shape[axis]
    m = x.size // C
    g = _param(gamma, C, 1.0)
    xhat = (x - _bcast(mean, x, axis)) * _bcast(invstd, x, axis)
    if activation == "relu":
        pre = _bcast(g, x, axis) * xhat + _bcast(_param(beta, C, 0.0), x, axis)
        dy = np.where(pre > 0, dy, 0.0)
    dbeta = dy.sum(axis=red)
    dgamma = (dy * xhat).sum(axis=red)
    dx = (
        _bcast(g * np.asarray(invstd, dtype=np.float64), x, axis)
        / m
        * (m * dy - _bcast(dbeta, x, axis) - xhat * _bcast(dgamma, x, axis))
    )
    return dx, dgamma, dbeta


def frozen_backward(dy, x, mean, invstd, gamma=None, beta=None, axis=1, activation=None):
    """Backward through fixed statistics (``mean``/``invstd`` constants): ``(dx, dgamma,
    dbeta)``, float64.

    ``y = gamma * (x - mean) * invstd + beta``, so ``dx = gamma * invstd * dy``,
    ``dgamma = sum(dy * xhat)``, ``dbeta = sum(dy)``; with ReLU, ``dy`` is first zeroed
    where the pre-activation output is <= 0.
    """
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    red, axis = _axes(x, axis)
    C = x.shape[axis]
    g = _param(gamma, C, 1.0)
    invstd = np.asarray(invstd, dtype=np.float64)
    xhat = (x - _bcast(mean, x, axis)) * _bcast(invstd, x, axis)
    if activation == "relu":
        pre = _bcast(g, x, axis) * xhat + _bcast(_param(beta, C, 0.0), x, axis)
        dy = np.where(pre > 0, dy, 0.0)
    return dy * _bcast(g * invstd, x, axis), (dy * xhat).sum(axis=red), dy.sum(axis=red)


def frozen_loss(x, gamma, beta, w, mean, invstd, axis=1, activation=None):
    """A scalar ``sum(w * y)`` of the forward with fixed ``mean``/``invstd``: its gradient
    is :func:`frozen_backward` with ``dy = w`` (for finite differences)."""
    x = np.asarray(x, dtype=np.float64)
    xhat = (x - _bcast(mean, x, axis)) * _bcast(invstd, x, axis)
    y = _bcast(gamma, x, axis) * xhat + _bcast(beta, x, axis)
    if activation == "relu":
        y = np.maximum(y, 0.0)
    return float((w * y).sum())


def update_running(running_mean, running_var, mean, var, m, momentum, unbiased=True):
    """New running statistics (float64), PyTorch's convention by default."""
    correction = m / (m - 1) if unbiased else 1.0
    new_mean = (1 - momentum) * np.asarray(running_mean, np.float64) + momentum * mean
    new_var = (1 - momentum) * np.asarray(running_var, np.float64) + momentum * var * correction
    return new_mean, new_var


def loss_for_gradcheck(x, gamma, beta, w, axis=1, eps=1e-5, activation=None):
    """A scalar ``sum(w * y)`` whose gradient is :func:`backward` with ``dy = w``."""
    y = forward(x, gamma, beta, axis, eps, activation)[0]
    return float((w * y).sum())


def population_moments(batches, unbiased):
    """Mean and variance of the rows of all ``batches`` concatenated, float64.

    ``unbiased`` divides the sum of squared deviations by ``n - 1`` (PyTorch's running
    variance), else by ``n`` (Keras's).
    """
    x = np.concatenate([np.asarray(b, dtype=np.float64) for b in batches])
    mean = x.mean(axis=0)
    ss = ((x - mean) ** 2).sum(axis=0)
    return mean, ss / (x.shape[0] - 1 if unbiased else x.shape[0])


def mlp_inference(x, layers):
    """Inference of a stack of layers, float64.

    ``layers``: tuples ``("dense", weight (in, out), bias, activation)``,
    ``("bn", running_mean, running_var, gamma, beta, eps, activation)`` (gamma/beta None
    for a layer without them) or ``("relu",)``.
    """
    h = np.asarray(x, dtype=np.float64)
    for spec in layers:
        if spec[0] == "dense":
            _, w, b, activation = spec
            h = h @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
            if activation == "relu":
                h = np.maximum(h, 0.0)
        elif spec[0] == "bn":
            _, mean, var, gamma, beta, eps, activation = spec
            h = inference(h, mean, var, gamma, beta, axis=1, eps=eps, activation=activation)
        else:
            h = np.maximum(h, 0.0)
    return h


def residual_forward(x, z, gamma=None, beta=None, axis=1, eps=1e-5, activation=None):
    """``act(bn(x) + z)`` with batch statistics: ``(y, mean, invstd)``, float64."""
    y, mean, invstd, _ = forward(x, gamma, beta, axis, eps)
    y = y + np.asarray(z, dtype=np.float64)
    if activation == "relu":
        y = np.maximum(y, 0.0)
    return y, mean, invstd


def residual_inference(
    x, z, running_mean, running_var, gamma=None, beta=None, axis=1, eps=1e-5, activation=None
):
    """``act(bn(x) + z)`` with given statistics, float64."""
    y = inference(x, running_mean, running_var, gamma, beta, axis, eps) + np.asarray(z, np.float64)
    return np.maximum(y, 0.0) if activation == "relu" else y


def residual_backward(
    dy, x, z, mean, invstd, gamma=None, beta=None, axis=1, activation=None, training=True
):
    """Gradients of :func:`residual_forward`: ``(dx, dgamma, dbeta, dz)``, float64.

    The sum ``s = bn(x) + z`` receives ``ds = dy * [s > 0]`` (``dy`` without ReLU); ``z``'s
    gradient is ``ds`` and ``x``, ``gamma``, ``beta`` get :func:`backward` of ``ds``
    (:func:`frozen_backward` when not ``training``: fixed statistics).
    """
    x64 = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    if activation == "relu":
        red, axis_ = _axes(x64, axis)
        C = x64.shape[axis_]
        xhat = (x64 - _bcast(mean, x64, axis_)) * _bcast(invstd, x64, axis_)
        s = (
            _bcast(_param(gamma, C, 1.0), x64, axis_) * xhat
            + _bcast(_param(beta, C, 0.0), x64, axis_)
            + np.asarray(z, dtype=np.float64)
        )
        dy = np.where(s > 0, dy, 0.0)
    grads = backward if training else frozen_backward
    dx, dgamma, dbeta = grads(dy, x64, mean, invstd, gamma, beta, axis)
    return dx, dgamma, dbeta, dy


def residual_loss_for_gradcheck(x, z, gamma, beta, w, axis=1, eps=1e-5, activation=None):
    """A scalar ``sum(w * act(bn(x) + z))``: its gradients are :func:`residual_backward`'s
    with ``dy = w``."""
    y = residual_forward(x, z, gamma, beta, axis, eps, activation)[0]
    return float((w * y).sum())


def expand_mask(mask, x, axis=1):
    """``mask`` (x's shape without the channel axis, or broadcastable to it) as a
    float64 0/1 array of x's shape (the same for every channel)."""
    axis = axis % x.ndim
    reduced = x.shape[:axis] + x.shape[axis + 1 :]
    w = np.expand_dims(np.broadcast_to(np.asarray(mask, dtype=bool), reduced), axis)
    return np.broadcast_to(w, x.shape).astype(np.float64)


def masked_forward(x, mask, gamma=None, beta=None, axis=1, eps=1e-5, activation=None):
    """Masked training forward: statistics over the True positions, output everywhere.

    Returns ``(y, mean, invstd, var, m)``, float64, ``m`` the count of True positions.
    """
    x = np.asarray(x, dtype=np.float64)
    red, axis = _axes(x, axis)
    C = x.shape[axis]
    w = expand_mask(mask, x, axis)
    m = int(w.sum() // C) if C else 0
    mean = (w * x).sum(axis=red) / m
    var = (w * (x - _bcast(mean, x, axis)) ** 2).sum(axis=red) / m
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - _bcast(mean, x, axis)) * _bcast(invstd, x, axis)
    y = _bcast(_param(gamma, C, 1.0), x, axis) * xhat + _bcast(_param(beta, C, 0.0), x, axis)
    if activation == "relu":
        y = np.maximum(y, 0.0)
    return y, mean, invstd, var, m


def masked_backward(dy, x, mask, mean, invstd, gamma=None, beta=None, axis=1, activation=None):
    """Backward of :func:`masked_forward` from the given statistics: ``(dx, dgamma, dbeta)``.

    Every output depends on the masked statistics, so the sums run over every position;
    the statistics depend on the True positions only (docs/math.md)::

        dbeta  = sum dy,  dgamma = sum dy * xhat          (every position)
        dx     = gamma * invstd * (dy - mask * (dbeta + xhat * dgamma) / m)
    """
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    red, axis = _axes(x, axis)
    C = x.shape[axis]
    w = expand_mask(mask, x, axis)
    m = w.sum() / C
    g = _param(gamma, C, 1.0)
    xhat = (x - _bcast(mean, x, axis)) * _bcast(invstd, x, axis)
    if activation == "relu":
        pre = _bcast(g, x, axis) * xhat + _bcast(_param(beta, C, 0.0), x, axis)
        dy = np.where(pre > 0, dy, 0.0)
    dbeta = dy.sum(axis=red)
    dgamma = (dy * xhat).sum(axis=red)
    dx = _bcast(g * np.asarray(invstd, dtype=np.float64), x, axis) * (
        dy - w * (_bcast(dbeta, x, axis) + xhat * _bcast(dgamma, x, axis)) / m
    )
    return dx, dgamma, dbeta


def masked_loss_for_gradcheck(x, mask, gamma, beta, w, axis=1, eps=1e-5, activation=None):
    """A scalar ``sum(w * y)`` of the masked forward (its gradient: :func:`masked_backward`)."""
    y = masked_forward(x, mask, gamma, beta, axis, eps, activation)[0]
    return float((w * y).sum())


# --------------------------------------------------------------------------------------
# The layer's variants: batch renormalization and ghost batches
#
# Written once over NumPy arrays or PyTorch tensors (``_ops_of``), so that the forward
# that gives the reference outputs is also the function whose autograd gradient (torch,
# when installed) or central finite differences (NumPy) give the reference gradients.
# --------------------------------------------------------------------------------------


# The NumPy counterpart of torch's ``detach`` for finite differences: while
# ``_CONSTANTS["replay"]`` holds the values a formula's constants took at the unperturbed
# point, each ``_constant`` call returns the next of them, so that a perturbed evaluation
# sees r and d (say) held fixed, as autograd does.
_CONSTANTS = {"record": None, "replay": None}


def _constant(v):
    if _CONSTANTS["replay"] is not None:
        return _CONSTANTS["replay"].pop(0)
    if _CONSTANTS["record"] is not None:
        _CONSTANTS["record"].append(v)
    return v


def _ops_of(a):
    """``(mean over axes keeping them, sqrt, clip, constant)`` for NumPy or torch."""
    if isinstance(a, np.ndarray):
        return (
            lambda v, red: v.mean(axis=red, keepdims=True),
            np.sqrt,
            np.clip,
            _constant,
        )
    import torch

    return (
        lambda v, red: v.mean(dim=red, keepdim=True),
        torch.sqrt,
        lambda v, lo, hi: torch.clamp(v, lo, hi),
        lambda v: v.detach(),  # r and d: constants of the gradient
    )


def _bn_chunk(x, g, b, red, eps, relu):
    mean_of, sqrt, _, _ = _ops_of(x)
    mean = mean_of(x, red)
    var = mean_of((x - mean) ** 2, red)
    y = (x - mean) / sqrt(var + eps) * g + b
    return y.clip(min=0) if relu else y


def renorm_formula(x, g, b, axis, eps, renorm_mean, renorm_std, clipping, relu=False):
    """Batch renormalization's training output (Keras 3's ``renorm``), NumPy or torch.

    ``y = ((x - mean) / std * r + d) * g + b``, ``r = clip(std / s, rmin, rmax)``,
    ``d = clip((mean - renorm_mean) / s, -dmax, dmax)``, ``s = max(renorm_std,
    sqrt(eps))``, with ``r`` and ``d`` detached (constants); ``g``, ``b``, ``renorm_*``
    broadcast to ``x``.
    """
    mean_of, sqrt, clip, const = _ops_of(x)
    red = _axes(x, axis)[0]
    mean = mean_of(x, red)
    std = sqrt(mean_of((x - mean) ** 2, red) + eps)
    rmin, rmax, dmax = clipping
    s = renorm_std.clip(min=eps**0.5)
    r = const(clip(std / s, rmin, rmax))
    d = const(clip((mean - renorm_mean) / s, -dmax, dmax))
    y = ((x - mean) / std * r + d) * g + b
    return y.clip(min=0) if relu else y


def ghost_formula(x, g, b, axis, eps, k, relu=False):
    """Ghost batch normalization's training output: plain BatchNorm on each chunk of
    ``k`` consecutive samples along axis 0 (``g``, ``b`` broadcast), NumPy or torch."""
    red = _axes(x, axis)[0]
    chunks = [_bn_chunk(x[i : i + k], g, b, red, eps, relu) for i in range(0, x.shape[0], k)]
    if isinstance(x, np.ndarray):
        return np.concatenate(chunks, axis=0)
    import torch

    return torch.cat(chunks, dim=0)


def _has_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


# Whether :func:`formula_grads` differentiates exactly (torch's autograd) or by central
# finite differences; their error, about 1e-16 * |loss| / 1e-6 of rounding plus the
# step's truncation, stays below FD_TOL on the tests' losses (|loss| < 100).
AUTOGRAD = _has_torch()
FD_TOL = 1e-6


def formula_grads(formula, x, gamma, beta, dy, axis, *args, **kwargs):
    """``(y, dx, dgamma, dbeta)`` of ``formula(x, g, b, axis, *args)`` against ``sum(dy * y)``.

    PyTorch's autograd in float64 when torch is installed, else central finite
    differences (step 1e-6, exact to ~1e-8 on these smooth functions away from ReLU
    kinks; see :data:`FD_TOL`) with the formula's constants (torch's ``detach``) held at
    their values at the unperturbed point. ``gamma``/``beta`` None: 1 / 0, their
    gradient None.
    """
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    C = x.shape[axis % x.ndim]
    g = _param(gamma, C, 1.0)
    b = _param(beta, C, 0.0)
    extra = [_bcast(a, x, axis) if isinstance(a, np.ndarray) else a for a in args]
    if AUTOGRAD:
        import torch

        y = formula(x, _bcast(g, x, axis), _bcast(b, x, axis), axis, *extra, **kwargs)
        X, G, B = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, g, b))
        shape = [1] * x.ndim
        shape[axis % x.ndim] = -1
        targs = [torch.tensor(a) if isinstance(a, np.ndarray) else a for a in extra]
        out = formula(X, G.reshape(shape), B.reshape(shape), axis, *targs, **kwargs)
        (out * torch.tensor(dy)).sum().backward()
        dx, dg, db = (t.grad.numpy() for t in (X, G, B))
    else:
        recorded = []  # the constants' values at the unperturbed point
        _CONSTANTS["record"] = recorded
        try:
            y = formula(x, _bcast(g, x, axis), _bcast(b, x, axis), axis, *extra, **kwargs)
        finally:
            _CONSTANTS["record"] = None

        def loss(xx, gg, bb):
            _CONSTANTS["replay"] = list(recorded)
            try:
                out = formula(xx, _bcast(gg, x, axis), _bcast(bb, x, axis), axis, *extra, **kwargs)
            finally:
                _CONSTANTS["replay"] = None
            return float((dy * out).sum())

        def numeric(a, f):
            grad = np.zeros_like(a)
            for i in np.ndindex(a.shape):
                step = np.zeros_like(a)
                step[i] = 1e-6
                grad[i] = (f(a + step) - f(a - step)) / 2e-6
            return grad

        dx = numeric(x, lambda v: loss(v, g, b))
        dg = numeric(g, lambda v: loss(x, v, b))
        db = numeric(b, lambda v: loss(x, g, v))
    return y, dx, None if gamma is None else dg, None if beta is None else db


def batch_moments(x, axis):
    """Mean and biased variance per channel of the whole batch (float64)."""
    x = np.asarray(x, np.float64)
    red, _ = _axes(x, axis)
    return x.mean(axis=red), x.var(axis=red)


def renorm_update(state, x, axis, eps, renorm_momentum, factor, unbiased=False):
    """Keras 3's renorm step on ``state`` (a dict of float64 arrays: ``renorm_mean``,
    ``renorm_stddev``, ``running_mean``, ``running_stddev``, ``running_var``), returned as
    a new dict.

    The renorm statistics move towards the batch's mean and ``sqrt(var + eps)`` with
    ``renorm_momentum`` (weight of the old value); the running mean and standard deviation
    towards the batch's with ``factor`` (weight of the new; the standard deviation from
    the unbiased variance when ``unbiased``); ``running_var = max(running_stddev**2 -
    eps, 0)``.
    """
    mean, var = batch_moments(x, axis)
    m = np.asarray(x).size // mean.size
    std = np.sqrt(var + eps)
    std_running = np.sqrt(var * (m / (m - 1) if unbiased else 1.0) + eps)
    w = renorm_momentum
    running_std = (1 - factor) * state["running_stddev"] + factor * std_running
    return dict(
        renorm_mean=w * state["renorm_mean"] + (1 - w) * mean,
        renorm_stddev=w * state["renorm_stddev"] + (1 - w) * std,
        running_mean=(1 - factor) * state["running_mean"] + factor * mean,
        running_stddev=running_std,
        running_var=np.maximum(running_std**2 - eps, 0.0),
    )
