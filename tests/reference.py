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
