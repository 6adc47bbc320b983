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
