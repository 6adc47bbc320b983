"""Elementwise operations of the trainer, in two interchangeable implementations.

- :class:`CpuOps`: serial Numba kernels, compiled by :func:`fastbn._config.njit` with its
  options (the on-disk cache locked between processes, like every CPU kernel). The
  arrays of one training step are small (a batch of 128 rows), so entering a parallel
  region (~15-20 us) would cost more than the work; each kernel makes one pass over its
  data and fuses what NumPy would do in several (bias + ReLU, ReLU mask + bias gradient,
  softmax + cross-entropy + gradient + accuracy, the whole Adam update).
- :class:`ArrayOps`: the same operations written with array-module calls (``xp`` is
  :mod:`numpy` or :mod:`cupy`). This is the GPU implementation (CuPy runs each call on
  the device) and, with NumPy, an independent reference for the Numba kernels in tests.

Every operation writes into arrays given by the caller (no allocation on the hot path)
and reductions accumulate in float64. Loss and accuracy are *added* into a float64
accumulator array of the caller's device, so a GPU epoch never synchronizes per batch.
"""

import math

import numpy as np

from .. import _config
from .._config import njit

_JIT = dict(_config.JIT_OPTIONS)


# --------------------------------------------------------------------------------------
# Numba kernels
# --------------------------------------------------------------------------------------


@njit(**_JIT)
def _bias_activation_kernel(z, bias, relu):
    """In place ``z = act(z + bias)`` over the rows of ``z``; one read and one write.

    Parameters
    ----------
    z : ndarray, shape (n, C)
        Pre-activations (``x @ W``); overwritten.
    bias : ndarray, shape (C,)
    relu : bool
        Apply ``max(., 0)`` after the bias.
    """
    n, C = z.shape
    for i in range(n):
        for c in range(C):
            v = z[i, c] + bias[c]
            if relu and v < 0:
                z[i, c] = 0
            else:
                z[i, c] = v


@njit(**_JIT)
def _activation_grad_bias_kernel(dy, y, relu, dz, dbias):
    """``dz = dy * (y > 0)`` (or ``dy``) and ``dbias = sum_rows(dz)``; one pass.

    Parameters
    ----------
    dy : ndarray, shape (n, C)
        Gradient of the loss with respect to the layer's output.
    y : ndarray, shape (n, C)
        The layer's output (after the ReLU, whose sign equals the pre-activation's).
    relu : bool
    dz : ndarray, shape (n, C)
        Output: gradient with respect to the pre-activation. May be ``dy`` itself.
    dbias : ndarray, shape (C,)
        Output.
    """
    n, C = dy.shape
    acc = np.zeros(C, np.float64)
    for i in range(n):
        for c in range(C):
            if relu and not y[i, c] > 0:
                dz[i, c] = 0
            else:
                g = dy[i, c]
                dz[i, c] = g
                acc[c] += g
    for c in range(C):
        dbias[c] = acc[c]


@njit(**_JIT)
def _relu_kernel(x, y):
    """``y = max(x, 0)``; one read, one write.

    Parameters
    ----------
    x, y : ndarray, shape (n, C)
    """
    n, C = x.shape
    for i in range(n):
        for c in range(C):
            v = x[i, c]
            if v > 0:
                y[i, c] = v
            else:
                y[i, c] = 0


@njit(**_JIT)
def _relu_grad_kernel(dy, y, dx):
    """``dx = dy * (y > 0)``; two reads, one write.

    Parameters
    ----------
    dy, y, dx : ndarray, shape (n, C)
    """
    n, C = dy.shape
    for i in range(n):
        for c in range(C):
            if y[i, c] > 0:
                dx[i, c] = dy[i, c]
            else:
                dx[i, c] = 0


@njit(**_JIT)
def _softmax_cross_entropy_kernel(logits, labels, grad, grad_scale, acc):
    """Softmax, cross-entropy, its gradient and the correct count, one pass per row.

    Per row: ``lse = max + log(sum(exp(z - max)))`` (no overflow for any logits);
    ``loss = lse - z[label]``; ``grad = (softmax - onehot) * grad_scale``.

    Parameters
    ----------
    logits : ndarray, shape (n, K)
    labels : ndarray of int, shape (n,)
    grad : ndarray, shape (n, K)
        Output.
    grad_scale : float
        ``1 / n`` for the gradient of the mean loss.
    acc : ndarray of float64, shape (2,)
        ``acc[0] += sum of losses``, ``acc[1] += number of rows whose arg-max is the label``
        (ties go to the first maximum, as in NumPy's ``argmax``).
    """
    n, K = logits.shape
    loss_sum = 0.0
    correct = 0
    for i in range(n):
        zmax = logits[i, 0]
        best = 0
        for k in range(1, K):
            if logits[i, k] > zmax:
                zmax = logits[i, k]
                best = k
        s = 0.0
        for k in range(K):
            e = math.exp(np.float64(logits[i, k]) - zmax)
            grad[i, k] = e
            s += e
        label = labels[i]
        loss_sum += math.log(s) + zmax - np.float64(logits[i, label])
        if best == label:
            correct += 1
        inv = grad_scale / s
        for k in range(K):
            grad[i, k] = grad[i, k] * inv
        grad[i, label] -= grad_scale
    acc[0] += loss_sum
    acc[1] += correct


@njit(**_JIT)
def _adam_kernel(param, grad, m, v, alpha, beta1, beta2, eps_hat):
    """One Adam step over flat arrays, one pass: four reads, three writes.

    ``m += (1 - beta1) (g - m)``; ``v += (1 - beta2) (g^2 - v)``;
    ``param -= alpha * m / (sqrt(v) + eps_hat)``. The bias corrections are folded into
    ``alpha`` and ``eps_hat`` by the caller.

    Parameters
    ----------
    param, grad, m, v : ndarray, shape (P,)
        ``param``, ``m``, ``v`` are updated in place.
    alpha, beta1, beta2, eps_hat : float
    """
    one_b1 = 1.0 - beta1
    one_b2 = 1.0 - beta2
    for j in range(param.shape[0]):
        g = grad[j]
        mj = m[j] + one_b1 * (g - m[j])
        vj = v[j] + one_b2 * (g * g - v[j])
        m[j] = mj
        v[j] = vj
        param[j] -= alpha * mj / (math.sqrt(vj) + eps_hat)


@njit(**_JIT)
def _sgd_kernel(param, grad, velocity, lr, momentum, nesterov):
    """One SGD-with-momentum step (PyTorch's form), one pass.

    ``velocity = momentum * velocity + g``; ``param -= lr * (g + momentum * velocity)``
    when ``nesterov`` else ``param -= lr * velocity``.

    Parameters
    ----------
    param, grad, velocity : ndarray, shape (P,)
        ``param`` and ``velocity`` are updated in place.
    lr, momentum : float
    nesterov : bool
    """
    for j in range(param.shape[0]):
        g = grad[j]
        vel = momentum * velocity[j] + g
        velocity[j] = vel
        if nesterov:
            param[j] -= lr * (g + momentum * vel)
        else:
            param[j] -= lr * vel


# --------------------------------------------------------------------------------------
# The two implementations
# --------------------------------------------------------------------------------------


class CpuOps:
    """The trainer's elementwise operations on NumPy arrays, as Numba kernels.

    Examples
    --------
    >>> import numpy as np
    >>> z = np.array([[-1.0, 2.0]], dtype=np.float32)
    >>> CpuOps.bias_activation(z, np.array([0.5, 0.5], np.float32), relu=True)
    >>> z
    array([[0. , 2.5]], dtype=float32)
    """

    xp = np

    @staticmethod
    def bias_activation(z, bias, relu):
        """In place ``z = relu(z + bias)`` (or ``z + bias``).

        See :func:`_bias_activation_kernel`.
        """
        _bias_activation_kernel(z, bias, bool(relu))

    @staticmethod
    def activation_grad_bias(dy, y, relu, dz, dbias):
        """``dz = dy * (y > 0)`` (or ``dy``), ``dbias = dz.sum(0)``."""
        _activation_grad_bias_kernel(dy, y, bool(relu), dz, dbias)

    @staticmethod
    def relu(x, y):
        """``y = max(x, 0)``."""
        _relu_kernel(x, y)

    @staticmethod
    def relu_grad(dy, y, dx):
        """``dx = dy * (y > 0)``."""
        _relu_grad_kernel(dy, y, dx)

    @staticmethod
    def softmax_cross_entropy(logits, labels, grad, grad_scale, acc):
        """Fused softmax + cross-entropy + gradient; adds loss sum and correct count to ``acc``."""
        _softmax_cross_entropy_kernel(logits, labels, grad, float(grad_scale), acc)

    @staticmethod
    def adam(param, grad, m, v, alpha, beta1, beta2, eps_hat):
        """One Adam step in place (flat arrays)."""
        _adam_kernel(param, grad, m, v, float(alpha), float(beta1), float(beta2), float(eps_hat))

    @staticmethod
    def sgd(param, grad, velocity, lr, momentum, nesterov):
        """One SGD-with-momentum step in place (flat arrays)."""
        _sgd_kernel(param, grad, velocity, float(lr), float(momentum), bool(nesterov))


class ArrayOps:
    """The same operations written with array-module calls (CuPy on a GPU, or NumPy).

    Parameters
    ----------
    xp : module
        :mod:`numpy` or :mod:`cupy`.

    Examples
    --------
    >>> import numpy as np
    >>> ops = ArrayOps(np)
    >>> z = np.array([[-1.0, 2.0]])
    >>> ops.bias_activation(z, np.array([0.5, 0.5]), relu=True)
    >>> z
    array([[0. , 2.5]])
    """

    def __init__(self, xp):
        self.xp = xp

    def bias_activation(self, z, bias, relu):
        """In place ``z = relu(z + bias)`` (or ``z + bias``)."""
        z += bias
        if relu:
            self.xp.maximum(z, 0, out=z)

    def activation_grad_bias(self, dy, y, relu, dz, dbias):
        """``dz = dy * (y > 0)`` (or ``dy``), ``dbias = dz.sum(0)`` (float64 sum)."""
        if relu:
            self.xp.multiply(dy, y > 0, out=dz)
        elif dz is not dy:
            dz[...] = dy
        dbias[...] = dz.sum(axis=0, dtype=self.xp.float64)

    def relu(self, x, y):
        """``y = max(x, 0)``."""
        self.xp.maximum(x, 0, out=y)

    def relu_grad(self, dy, y, dx):
        """``dx = dy * (y > 0)``."""
        self.xp.multiply(dy, y > 0, out=dx)

    def softmax_cross_entropy(self, logits, labels, grad, grad_scale, acc):
        """Softmax + cross-entropy + gradient; adds loss sum and correct count to ``acc``."""
        xp = self.xp
        z = logits.astype(xp.float64)
        zmax = z.max(axis=1, keepdims=True)
        e = xp.exp(z - zmax)
        s = e.sum(axis=1, keepdims=True)
        rows = xp.arange(z.shape[0])
        lse = xp.log(s[:, 0]) + zmax[:, 0]
        acc[0] += (lse - z[rows, labels]).sum()
        acc[1] += (xp.argmax(z, axis=1) == labels).sum()
        p = e / s
        p[rows, labels] -= 1.0
        grad[...] = p * grad_scale

    def adam(self, param, grad, m, v, alpha, beta1, beta2, eps_hat):
        """One Adam step in place (flat arrays)."""
        m += (1.0 - beta1) * (grad - m)
        v += (1.0 - beta2) * (grad * grad - v)
        param -= (alpha * m / (self.xp.sqrt(v) + eps_hat)).astype(param.dtype)

    def sgd(self, param, grad, velocity, lr, momentum, nesterov):
        """One SGD-with-momentum step in place (flat arrays)."""
        velocity *= momentum
        velocity += grad
        if nesterov:
            param -= (lr * (grad + momentum * velocity)).astype(param.dtype)
        else:
            param -= (lr * velocity).astype(param.dtype)


def ops_for(xp):
    """The operations object for an array module.

    Parameters
    ----------
    xp : module
        :mod:`numpy` (Numba kernels) or :mod:`cupy` (array-module calls on the GPU).

    Returns
    -------
    CpuOps or ArrayOps

    Examples
    --------
    >>> import numpy as np
    >>> ops_for(np) is CpuOps
    True
    """
    return CpuOps if xp is np else ArrayOps(xp)
