"""Softmax cross-entropy, fused with its gradient."""

import numpy as np

from . import _device, _ops

__all__ = ["SoftmaxCrossEntropy"]


class SoftmaxCrossEntropy:
    """Mean categorical cross-entropy of ``softmax(logits)``, with its gradient in one pass.

    This is Keras's ``Dense(K, activation="softmax")`` followed by
    ``categorical_crossentropy`` (or PyTorch's ``nn.CrossEntropyLoss`` on logits), with
    integer labels instead of one-hot rows. Per row,
    ``loss = logsumexp(z) - z[label]`` computed as ``max + log(sum(exp(z - max)))``: no
    overflow or ``log(0)`` for any finite logits. The gradient of the *mean* loss is
    ``(softmax(z) - onehot) / n``.

    Examples
    --------
    >>> import numpy as np
    >>> loss = SoftmaxCrossEntropy()
    >>> logits = np.array([[1000.0, 0.0], [0.0, 0.0]], np.float32)
    >>> value, grad = loss(logits, np.array([0, 1]))
    >>> round(value, 4)                   # (0 + log 2) / 2
    0.3466
    >>> grad
    array([[ 0.  ,  0.  ],
           [ 0.25, -0.25]], dtype=float32)
    """

    def __init__(self):
        self._grad = {}

    def forward_backward(self, logits, labels, acc, scale=None):
        """Gradient of the mean loss into an internal buffer; loss sum and hits into ``acc``.

        The hot-path form: nothing is returned to the host, so a GPU run does not
        synchronize per batch.

        Parameters
        ----------
        logits : array, shape (n, K)
            float32 or float64, on the model's device.
        labels : array of int, shape (n,)
            Class indices in ``[0, K)``, same device.
        acc : array of float64, shape (2,)
            ``acc[0] += sum of per-row losses``; ``acc[1] += rows whose arg-max is the label``.
        scale : float, optional
            Factor of the gradient: ``1 / n`` (the mean over these rows) by default.
            Data-parallel training passes ``1 / global batch size``, so that the ranks'
            gradients add up to the gradient of the global mean loss.

        Returns
        -------
        array, shape (n, K)
            Gradient of the mean loss (a buffer overwritten by the next call).
        """
        if logits.ndim != 2:
            raise ValueError(f"logits must be 2-D (n, classes), got shape {tuple(logits.shape)}")
        if labels.shape != (logits.shape[0],):
            raise ValueError(
                f"labels must have shape ({logits.shape[0]},) to match logits, "
                f"got {tuple(labels.shape)}"
            )
        key = (logits.shape, logits.dtype.str, _device.module_of(logits).__name__)
        grad = self._grad.get(key)
        if grad is None:
            grad = self._grad[key] = _device.module_of(logits).empty(logits.shape, logits.dtype)
        if scale is None:
            n = logits.shape[0]
            scale = 1.0 / n if n else 0.0
        _ops.ops_for(_device.module_of(logits)).softmax_cross_entropy(
            logits, labels, grad, scale, acc
        )
        return grad

    def __call__(self, logits, labels):
        """Mean loss and its gradient.

        Parameters
        ----------
        logits : array, shape (n, K)
        labels : array of int, shape (n,)

        Returns
        -------
        loss : float
        grad : array, shape (n, K)
            A new array.

        Raises
        ------
        ValueError
            Bad shapes, or a label outside ``[0, K)``.
        """
        xp = _device.module_of(logits)
        labels = xp.asarray(labels)
        n, K = logits.shape
        if n and (int(labels.min()) < 0 or int(labels.max()) >= K):
            raise ValueError(
                f"labels must lie in [0, {K}), got values in "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        acc = xp.zeros(2, np.float64)
        grad = self.forward_backward(logits, labels, acc)
        return float(acc[0]) / max(n, 1), grad.copy()
