"""The public functions: check every argument, pick the backend, call the shared operations.

Each function first tries the CPU's direct path
(:func:`fastbn._cpu_backend.direct_view`), which serves the common NumPy call in a few
operations. Every other call checks its arguments once
(:mod:`fastbn._checks`), picks the backend of its arrays (:func:`fastbn.backends.backend_for`:
the CPU one for host arrays, :mod:`fastbn.cuda` for GPU arrays) and runs the operation of
:mod:`fastbn._ops`, written once for every backend.

All checks run before anything is written: a call that raises leaves ``out`` and the
running statistics exactly as they were.
"""

import functools
import inspect
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from . import _checks, _ops, backends, distributed
from ._checks import is_cuda_array
from ._cpu_backend import direct_backward as _direct_backward
from ._cpu_backend import direct_forward as _direct_forward
from ._cpu_backend import direct_frozen_backward as _direct_frozen_backward
from ._cpu_backend import direct_inference as _direct_inference
from ._cpu_backend import direct_mask as _direct_mask
from ._cpu_backend import direct_masked_backward as _direct_masked_backward
from ._cpu_backend import direct_masked_forward as _direct_masked_forward
from ._cpu_backend import direct_options as _direct_options
from ._cpu_backend import direct_out as _direct_out
from ._cpu_backend import direct_residual as _direct_residual
from ._cpu_backend import direct_residual_backward as _direct_residual_backward
from ._cpu_backend import direct_residual_forward as _direct_residual_forward
from ._cpu_backend import direct_residual_inference as _direct_residual_inference
from ._cpu_backend import direct_train as _direct_train
from ._cpu_backend import direct_view as _direct_view
from ._cpu_backend import from_masked_array as _from_masked_array
from ._cpu_backend import is_tensor as _is_tensor
from ._cpu_backend import tensor_call as _tensor_call

__all__ = [
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_forward",
    "batch_norm_inference",
    "is_cuda_array",
]

_NORMALIZE_ARGS = ("x", "running_mean", "running_var", "gamma", "beta", "out", "residual")
_FORWARD_ARGS = ("x", "gamma", "beta", "out", "residual")
_BACKWARD_ARGS = ("dy", "x", "mean", "invstd", "gamma", "beta", "out", "residual")


def _tensors(function):
    """Let ``function`` take PyTorch tensors: CPU tensors in, CPU tensors out, zero-copy
    both ways (:func:`fastbn._cpu_backend.tensor_call`); tensors that require grad are
    read detached. A NumPy first argument costs one type check."""
    names = tuple(inspect.signature(function).parameters)
    # A NumPy call without comm= goes to the function itself, past the wrapper of
    # distributed.synchronized (which does just that when comm is None): one Python
    # call less on every small call.
    plain = getattr(function, "__wrapped__", function)

    @functools.wraps(function)
    def call(*args, **kwargs):
        first = args[0] if args else kwargs.get("x", kwargs.get("dy"))
        if type(first) is np.ndarray:
            return (
                plain(*args, **kwargs) if kwargs.get("comm") is None else function(*args, **kwargs)
            )
        if not _is_tensor(first):
            return function(*args, **kwargs)
        return _tensor_call(function, names, first, args, kwargs)

    return call


# --------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------


@_tensors
@distributed.synchronized("batch_norm_forward")
def batch_norm_forward(
    x: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    axis: int = 1,
    eps: float = 1e-5,
    out: Any = None,
    activation: str | None = None,
    residual: Any = None,
    mask: ArrayLike | None = None,
    stream: Any = None,
    comm: Any = None,
) -> tuple[Any, Any, Any]:
    """Normalize ``x`` with its batch statistics (training forward).

    ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` per channel, where ``mean`` and
    the biased ``var`` are taken over every axis but ``axis``; with ``residual=z``,
    ``y = act(gamma * (x - mean) / sqrt(var + eps) + beta + z)`` (a ResNet block's
    ``relu(bn(x) + z)`` with ``activation="relu"``), the add in the normalizing pass.

    Parameters
    ----------
    x : array, ndim >= 2
        float16, float32 or float64, any byte order on the host (results in native
        order). NumPy arrays run on the CPU kernels, CUDA arrays (Numba device arrays,
        CuPy, PyTorch CUDA tensors) on the GPU kernels. A ``numpy.ma`` masked array
        whose mask is the same for every channel gives its mask to ``mask`` (its
        unmasked positions are True; with ``mask`` given too, both must hold); one whose
        mask varies across channels is a TypeError. An empty batch (no value per
        channel) gives an empty ``y`` and NaN ``mean``/``invstd`` of shape (C,); one
        value per channel is a ValueError.
    gamma, beta : array of shape (C,), optional
        Scale and shift; None means 1 and 0.
    axis : int, default 1
        The channel axis (kept); every other axis is reduced. ``-1`` for NHWC.
    eps : float, default 1e-5
        Added to the variance; must be > 0.
    out : array, optional
        Preallocated output of x's shape and dtype (may be ``x`` itself).
    activation : {None, "relu"}, optional
        ``"relu"`` applies ``max(y, 0)`` in the same pass.
    residual : array, optional
        ``z``, added to the normalized ``x`` before the activation: x's shape and dtype,
        any memory layout, the same kind of array as ``x``; ``out`` may be ``z`` itself.
        It does not enter the statistics. Its gradient is
        ``batch_norm_backward(..., residual=z, residual_grad=True)``'s fourth result.
    mask : bool array, optional
        Masked statistics: x's shape without the channel axis (``(N,)`` for ``(N, C)``,
        ``(N, L)`` for ``(N, C, L)``, ``(N, H, W)`` for NCHW and NHWC), or a shape NumPy
        broadcasts to it. The mean and variance are those of the True positions only;
        ``y`` is computed at every position (Keras's semantics). Fewer than 2 True
        positions is a ValueError. The array kind of ``x`` (a device array on the GPU).
    stream : CUDA stream, optional
        GPU arrays only: the stream to launch on (a Numba stream, ``cupy.cuda.Stream`` or
        ``torch.cuda.Stream``); default the current stream of the array's library.
    comm : mpi4py.MPI.Comm, optional
        Synchronized BatchNorm over MPI: every rank passes its shard of the batch and gets
        the results of the whole batch (the concatenation of the shards in rank order),
        to rounding; collective, so every rank of ``comm`` must make the same call.
        Host arrays only. See :mod:`fastbn.distributed`.

    Returns
    -------
    y : array
        Same shape, dtype and kind as ``x``.
    mean : array, shape (C,)
        Batch mean (float64 for float64 input, float32 otherwise).
    invstd : array, shape (C,)
        ``1 / sqrt(var + eps)``; with ``mean``, what :func:`batch_norm_backward` needs.

    Raises
    ------
    TypeError
        ``x`` or a parameter is not a float array; host and GPU arrays are mixed.
    ValueError
        ndim < 2, bad axis, parameter shape not ``(C,)``, fewer than 2 values per
        channel (in the global batch with ``comm``; True positions with ``mask``), eps
        <= 0, ``out`` of the wrong shape or dtype, ``mask`` of the wrong shape.
    fastbn.distributed.DistributedError
        With ``comm``: another rank failed (it raises its own error).

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]], dtype=np.float32)
    >>> y, mean, invstd = fastbn.batch_norm_forward(x)
    >>> np.round(y, 3)
    array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> mean
    array([ 2., 20.], dtype=float32)

    A ResNet block's ``relu(bn(x) + z)`` in one pass over ``x`` and ``z``:

    >>> z = np.array([[0.5, 2.0], [-3.0, 0.5]], dtype=np.float32)
    >>> y, _, _ = fastbn.batch_norm_forward(x, residual=z, activation="relu")
    >>> np.round(y, 3)
    array([[0. , 1. ],
           [0. , 1.5]], dtype=float32)

    With a mask, the third row (padding) stays out of the statistics:

    >>> x = np.array([[1.0], [3.0], [100.0]])
    >>> y, mean, invstd = fastbn.batch_norm_forward(x, mask=np.array([True, True, False]))
    >>> mean, np.round(y.ravel(), 3)
    (array([2.]), array([-1.,  1., 98.]))
    """
    x3 = _direct_view(x, axis, stream, gamma, beta)
    if (
        x3 is not None
        and comm is None
        and _direct_options(eps, activation)
        and x3.shape[0] * x3.shape[2] >= 2
        and x3.shape[1]
    ):
        relu = activation == "relu"
        if residual is not None:
            if (
                mask is None
                and (z3 := _direct_residual(residual, x, x3)) is not None
                and (y := _direct_out(out, x, x, residual)) is not None
            ):
                return _direct_residual_forward(x3, z3, y, gamma, beta, eps, relu)
        elif mask is None:
            if (y := _direct_out(out, x, x)) is not None:
                return _direct_forward(x3, y, gamma, beta, eps, relu)
        elif (w := _direct_mask(mask, x, axis, x3)) is not None and (
            y := _direct_out(out, x, x, mask)
        ) is not None:
            return _direct_masked_forward(x3, w, y, gamma, beta, eps, relu)
    x, mask = _from_masked_array(x, axis, mask)
    be = backends.backend_for((*_FORWARD_ARGS, "mask"), x, gamma, beta, out, residual, mask)
    be.check_stream(stream)
    x, gamma, beta = be.wrap("x", x), be.wrap("gamma", gamma), be.wrap("beta", beta)
    out, residual, mask = be.wrap_out(out), be.wrap("residual", residual), be.wrap("mask", mask)
    axis, relu = _ops.check_forward_args(x, gamma, beta, axis, eps, out, activation)
    _checks.check_residual(residual, x.shape, x.dtype)
    _checks.check_mask(mask, x.shape, axis)
    if comm is None:  # with comm the rule applies to the global batch (Sync)
        _checks.check_batch(x.shape, axis, training=True)
    return _ops.train_forward(
        be,
        x,
        gamma,
        beta,
        axis,
        float(eps),
        relu,
        out,
        stream,
        dtype=_ops.stats_dtype(x.dtype),
        comm=comm,
        residual=residual,
        mask=mask,
    )


@_tensors
@distributed.synchronized("batch_norm_backward")
def batch_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    mean: ArrayLike,
    invstd: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    axis: int = 1,
    out: Any = None,
    activation: str | None = None,
    residual: Any = None,
    residual_grad: bool = False,
    training: bool = True,
    mask: ArrayLike | None = None,
    stream: Any = None,
    comm: Any = None,
) -> tuple[Any, ...]:
    """Gradients of :func:`batch_norm_forward` with respect to x, gamma and beta (and
    the residual, with ``residual_grad=True``).

    ``dx = gamma * invstd / m * (m * dy - dbeta - xhat * dgamma)`` with
    ``dbeta = sum(dy)``, ``dgamma = sum(dy * xhat)`` and ``xhat = (x - mean) * invstd``.

    With ``training=False`` the statistics were constants of the forward (frozen
    BatchNorm: the running statistics, ``invstd = 1 / sqrt(running_var + eps)``), and
    the gradient is PyTorch's eval-mode one: ``dx = gamma * invstd * dy``, with the same
    ``dgamma`` and ``dbeta``. One read of dy and x, one write of dx.

    Parameters
    ----------
    dy : array
        Gradient of the loss with respect to ``y``; same shape as ``x``.
    x : array
        The forward's input.
    mean, invstd : array of shape (C,)
        The statistics returned by :func:`batch_norm_forward`.
    gamma : array of shape (C,), optional
        The forward's scale (None: 1).
    beta : array of shape (C,), optional
        The forward's shift; its values are only read with ``activation="relu"``, to
        recompute the mask (passing it still asks for ``dgamma`` and ``dbeta``).
    axis : int, default 1
    out : array, optional
        Preallocated ``dx`` (may be ``dy`` itself).
    activation : {None, "relu"}, optional
        The forward's activation: ``dy`` is masked where the recomputed ``y`` is <= 0.
    residual : array, optional
        The forward's ``residual`` z: with ``activation="relu"`` the mask is that of
        ``bn(x) + z`` (recomputed from x, the statistics, gamma, beta and z). Without an
        activation it is not needed (checked when given).
    residual_grad : bool, default False
        Also return the residual's gradient ``dz`` (fourth): ``dy`` masked where
        ``bn(x) + z <= 0`` with ``activation="relu"``, a copy of ``dy`` without. It
        needs ``residual`` with ``activation="relu"``. Not a bool: TypeError.
    training : bool, default True
        True: ``mean`` and ``invstd`` are the batch statistics of a training forward
        (:func:`batch_norm_forward`), functions of ``x``. False: they were fixed
        (running statistics, :func:`batch_norm_inference`): the gradient through fixed
        statistics. Not a bool: TypeError.
    mask : bool array, optional
        The forward's ``mask`` (a ``numpy.ma`` ``x`` gives its own, as in the forward):
        the gradient of the masked forward. With ``m`` True positions,
        ``dx = gamma * invstd * (dy - mask * (dbeta + xhat * dgamma) / m)``: positions
        out of the mask receive ``gamma * invstd * dy`` only; ``dgamma`` and ``dbeta``
        are sums over every position (``y`` depends on gamma and beta everywhere).
        With ``training=False`` a ValueError (fixed statistics take no mask).
    stream : CUDA stream, optional
        GPU arrays only (see :func:`batch_norm_forward`).
    comm : mpi4py.MPI.Comm, optional
        Synchronized BatchNorm (see :func:`batch_norm_forward`): ``mean`` and ``invstd``
        are then the global statistics of the synchronized forward, ``dgamma`` and
        ``dbeta`` are sums over every rank's batch (the same on every rank) and ``dx`` is
        this rank's shard of the gradient of the whole batch. With ``training=False``,
        ``dgamma`` and ``dbeta`` are the same sums over every rank's batch, and ``dx``
        needs nothing from the other ranks (``mean`` and ``invstd`` are the same fixed
        statistics on every rank); the call is still collective, and every rank must
        pass the same ``training`` (ranks that mix them all raise ValueError).

    Returns
    -------
    dx : array
        Same shape, dtype and kind as ``x``.
    dgamma, dbeta : array of shape (C,) or None
        Both come back whenever the call is affine (``gamma`` or ``beta`` given):
        ``dbeta = sum(dy)`` does not need ``beta``. Both are None only when neither is
        given. Statistics dtype. On an empty batch: zeros.
    dz : array
        With ``residual_grad=True`` only: the residual's gradient, a new array of x's
        shape, dtype and kind.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.array([[1.0], [3.0]])
    >>> y, mean, invstd = fastbn.batch_norm_forward(x)
    >>> dx, dgamma, dbeta = fastbn.batch_norm_backward(np.array([[1.0], [1.0]]), x, mean, invstd,
    ...                                                gamma=np.ones(1), beta=np.zeros(1))
    >>> dx.ravel(), dbeta
    (array([0., 0.]), array([2.]))

    Through ``relu(bn(x) + z)``: ``dz`` is ``dy`` where the output is positive.

    >>> z = np.array([[-5.0], [0.5]])
    >>> y, mean, invstd = fastbn.batch_norm_forward(x, residual=z, activation="relu")
    >>> dx, _, _, dz = fastbn.batch_norm_backward(np.array([[1.0], [1.0]]), x, mean, invstd,
    ...                                           activation="relu", residual=z,
    ...                                           residual_grad=True)
    >>> np.round(y.ravel(), 3), dz.ravel()
    (array([0. , 1.5]), array([0., 1.]))

    Through fixed statistics (frozen BatchNorm), ``dx = gamma * invstd * dy``:

    >>> rm, rv = np.array([1.0]), np.array([4.0])
    >>> invstd = 1.0 / np.sqrt(rv + 1e-5)
    >>> dx, dgamma, dbeta = fastbn.batch_norm_backward(
    ...     np.array([[1.0], [1.0]]), x, rm, invstd, gamma=np.full(1, 2.0), training=False)
    >>> np.round(dx.ravel(), 4), np.round(dgamma, 4), dbeta
    (array([1., 1.]), array([1.]), array([2.]))
    """
    if training is not True and training is not False:
        training = _checks.check_flag("training", training)
    if residual_grad is not True and residual_grad is not False:  # "no" must not add dz
        residual_grad = _checks.check_flag("residual_grad", residual_grad)
    if not training and mask is not None:
        raise ValueError(
            "mask= applies to training=True (batch statistics); with training=False the "
            "statistics were fixed and the gradient does not depend on a mask"
        )
    x3 = _direct_view(x, axis, stream, mean, invstd, gamma, beta)
    w = None if mask is None or x3 is None else _direct_mask(mask, x, axis, x3)
    z3 = None if residual is None or x3 is None else _direct_residual(residual, x, x3)
    # the residual's gradient first, then the plain backward on it (as in _ops.backward)
    with_dz = residual_grad is True or (activation == "relu" and residual is not None)
    if (
        x3 is not None
        and (mask is None or w is not None)
        and comm is None
        and (residual is None or (z3 is not None and mask is None))
        and (residual_grad is False or residual_grad is True)
        and (not with_dz or (training and mask is None and (z3 is not None or activation is None)))
        and mean is not None
        and invstd is not None
        and type(dy) is np.ndarray
        and dy.shape == x.shape
        and dy.dtype == x.dtype
        and dy.flags.c_contiguous
        and x.size
        and _direct_options(1.0, activation)
        and (
            dx := _direct_out(out, x, x, dy)
            if w is None and z3 is None
            else _direct_out(out, x, x, dy, mask if z3 is None else residual)
        )
        is not None
    ):
        relu = activation == "relu"
        if with_dz:
            dgamma, dbeta, dz = _direct_residual_backward(
                dy, x3, z3, mean, invstd, gamma, beta, relu, dx
            )
            dz = (dz,) if residual_grad else ()
            if gamma is None and beta is None:
                return (dx, None, None) + dz
            return (dx, dgamma, dbeta) + dz
        if w is not None:  # training (a mask with training=False was refused above)
            dy3, dx3 = dy.reshape(x3.shape), dx.reshape(x3.shape)
            dgamma, dbeta = _direct_masked_backward(
                dy3, x3, w, mean, invstd, gamma, beta, relu, dx3
            )
        else:
            direct = _direct_backward if training else _direct_frozen_backward
            dgamma, dbeta = direct(dy, x3, mean, invstd, gamma, beta, relu, dx)
        if gamma is None and beta is None:
            return dx, None, None
        return dx, dgamma, dbeta
    if training:
        x, mask = _from_masked_array(x, axis, mask)
    be = backends.backend_for(
        (*_BACKWARD_ARGS, "mask"), *(dy, x, mean, invstd, gamma, beta, out, residual, mask)
    )
    be.check_stream(stream)
    dy, x = be.wrap("dy", dy), be.wrap("x", x)
    mean, invstd = be.wrap("mean", mean), be.wrap("invstd", invstd)
    gamma, beta = be.wrap("gamma", gamma), be.wrap("beta", beta)
    out, residual, mask = be.wrap_out(out), be.wrap("residual", residual), be.wrap("mask", mask)
    dtype, axis, C, relu = _checks.check_backward_args(
        dy, x, mean, invstd, gamma, beta, axis, out, activation
    )
    _checks.check_residual(residual, x.shape, dtype)
    _checks.check_mask(mask, x.shape, axis)
    if residual_grad and relu and residual is None:
        raise ValueError(
            "residual_grad=True with activation='relu' needs residual=, the forward's z: "
            "the ReLU mask depends on it"
        )
    affine = gamma is not None or beta is not None  # then both gradients come back
    grads = (x, _ops.stats_dtype(dtype)) if affine else None
    # fixed statistics take no mask (refused by the checks above)
    extra = {"mask": mask} if training else {}
    return (_ops.backward if training else _ops.frozen_backward)(
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
        grads=grads,
        comm=comm,
        residual=residual,
        residual_grad=residual_grad,
        **extra,
    )


@_tensors
def batch_norm_inference(
    x: ArrayLike,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    axis: int = 1,
    eps: float = 1e-5,
    out: Any = None,
    activation: str | None = None,
    residual: Any = None,
    stream: Any = None,
) -> Any:
    """Normalize ``x`` with given (running) statistics: one read of x, one write of y.

    ``y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta``; with
    ``residual=z``, ``act(... + z)`` in the same pass (one more read, of z).

    Parameters
    ----------
    x : array, ndim >= 2
    running_mean, running_var : array of shape (C,)
    gamma, beta : array of shape (C,), optional
    axis : int, default 1
    eps : float, default 1e-5
    out : array, optional
    activation : {None, "relu"}, optional
    residual : array, optional
        ``z`` added before the activation (see :func:`batch_norm_forward`).
    stream : CUDA stream, optional
        GPU arrays only (see :func:`batch_norm_forward`).

    Returns
    -------
    array
        Same shape, dtype and kind as ``x``.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.array([[1.0, 2.0], [3.0, 4.0]])
    >>> fastbn.batch_norm_inference(x, np.array([2.0, 3.0]), np.array([1.0, 1.0]), eps=1e-12)
    array([[-1., -1.],
           [ 1.,  1.]])
    """
    y = _direct_inference_call(
        x, running_mean, running_var, gamma, beta, axis, eps, out, activation, residual, stream
    )
    if y is not None:
        return y
    be = backends.backend_for(
        _NORMALIZE_ARGS, x, running_mean, running_var, gamma, beta, out, residual
    )
    be.check_stream(stream)
    x, gamma, beta = be.wrap("x", x), be.wrap("gamma", gamma), be.wrap("beta", beta)
    running_mean = be.wrap("running_mean", running_mean)
    running_var = be.wrap("running_var", running_var)
    out, residual = be.wrap_out(out), be.wrap("residual", residual)
    axis, relu = _ops.check_forward_args(x, gamma, beta, axis, eps, out, activation)
    _checks.check_residual(residual, x.shape, x.dtype)
    return _inference(
        be, x, running_mean, running_var, gamma, beta, axis, eps, relu, out, stream, residual,
        "for inference",
    )  # fmt: skip


def _direct_inference_call(
    x, running_mean, running_var, gamma, beta, axis, eps, out, activation, residual, stream
):
    """Inference on the CPU's direct path when the call qualifies (see
    :func:`fastbn._cpu_backend.direct_view`): ``y``; None when it does not (the general
    path then checks the arguments and raises the errors).
    :func:`batch_norm_inference` and ``batch_norm(training=False)``."""
    x3 = _direct_view(x, axis, stream, running_mean, running_var, gamma, beta)
    if (
        x3 is None
        or running_mean is None
        or running_var is None
        or not _direct_options(eps, activation)
    ):
        return None
    relu = activation == "relu"
    if residual is None:
        if (y := _direct_out(out, x, x)) is not None:
            return _direct_inference(x3, y, running_mean, running_var, gamma, beta, eps, relu)
    elif (z3 := _direct_residual(residual, x, x3)) is not None and (
        y := _direct_out(out, x, x, residual)
    ) is not None:
        return _direct_residual_inference(
            x3, z3, y, running_mean, running_var, gamma, beta, eps, relu
        )
    return None


def _inference(be, x, running_mean, running_var, gamma, beta, axis, eps, relu, out, stream,
               residual, when):  # fmt: skip
    """The general path's inference, after the arguments' own checks: the running
    statistics checked (``when`` says for what, in the message), then the backend's
    normalization with them (:func:`batch_norm_inference`, ``batch_norm(training=False)``)."""
    _checks.check_running_stats(running_mean, running_var, x.shape[axis], axis, when)
    return _ops.inference(
        be, x, running_mean, running_var, gamma, beta, axis, float(eps), relu, out, stream,
        residual=residual,
    )  # fmt: skip


@_tensors
@distributed.synchronized("batch_norm", when=lambda kwargs: bool(kwargs.get("training")))
def batch_norm(
    x: ArrayLike,
    running_mean: Any = None,
    running_var: Any = None,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    out: Any = None,
    activation: str | None = None,
    residual: Any = None,
    num_batches_tracked: int | None = None,
    running_var_unbiased: bool = True,
    on_nonfinite: str = "raise",
    mask: ArrayLike | None = None,
    stream: Any = None,
    comm: Any = None,
) -> Any:
    """BatchNorm in the manner of ``torch.nn.functional.batch_norm``.

    In training, normalize with the batch statistics and, when running statistics are
    given, update them in place::

        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var  = (1 - momentum) * running_var  + momentum * var * m / (m - 1)

    (unbiased variance, PyTorch's convention; ``running_var_unbiased=False`` uses the
    biased one, Keras's). Otherwise normalize with the running statistics.

    Parameters
    ----------
    x : array, ndim >= 2
    running_mean, running_var : array of shape (C,), optional
        Required when not training; updated in place when training.
    gamma, beta : array of shape (C,), optional
    training : bool, default False
        In training, an empty batch gives an empty output and leaves the running
        statistics untouched (PyTorch's behaviour). A Python or NumPy bool (anything
        else is a TypeError, as in PyTorch: ``"False"`` is no mode).
    momentum : float in [0, 1] or None, default 0.1
        Weight of the new batch. None gives the cumulative average of all batches seen,
        which needs ``num_batches_tracked``. A str, bytes or bool is a TypeError.
    eps : float, default 1e-5
    axis : int, default 1
    out : array, optional
    activation : {None, "relu"}, optional
    residual : array, optional
        ``z`` added before the activation, in both modes (see :func:`batch_norm_forward`).
    num_batches_tracked : int, optional
        With ``momentum=None``: how many batches the running statistics already average.
        An integer >= 0 (checked whenever given).
    running_var_unbiased : bool, default True
        A Python or NumPy bool (else a TypeError).
    on_nonfinite : {"raise", "warn"}, default "raise"
        What to do when the batch statistics are not finite, or when the updated running
        statistics would not be finite in their own dtype (an overflow: float32 data of
        std 1e20, float16 running statistics past 65504): raise ``FloatingPointError``
        before anything is written, or warn and return the output while leaving the
        running statistics untouched. Either way they never take in NaN or inf.
    mask : bool array, optional
        Training only: masked statistics (see :func:`batch_norm_forward`); the running
        variance's unbiased correction uses the count of True positions ``m``:
        ``var * m / (m - 1)``. With ``training=False`` a ValueError (the running
        statistics take no mask). A ``numpy.ma`` ``x`` in training gives its mask.
    stream : CUDA stream, optional
        GPU arrays only (see :func:`batch_norm_forward`).
    comm : mpi4py.MPI.Comm, optional
        In training, synchronized BatchNorm (see :func:`batch_norm_forward`): the batch
        statistics, hence the running statistics, are those of the global batch and the
        same on every rank. Ignored when not training (no communication).

    Returns
    -------
    array
        Same shape, dtype and kind as ``x``.

    Raises
    ------
    FloatingPointError
        Non-finite batch statistics, or a running update that would overflow, in
        training with running statistics (by default).
    TypeError
        ``training`` not a bool, ``momentum`` or ``eps`` not a number, a non-float array.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
    >>> rm, rv = np.zeros(2), np.ones(2)
    >>> y = fastbn.batch_norm(x, rm, rv, training=True, momentum=0.5)
    >>> rm, rv
    (array([1., 2.]), array([1.5, 4.5]))
    """
    if training is not True and training is not False:  # "False" must not train
        training = _checks.check_flag("training", training)
    if running_var_unbiased is not True and running_var_unbiased is not False:
        running_var_unbiased = _checks.check_flag("running_var_unbiased", running_var_unbiased)
    if training and comm is None and out is None and residual is None and running_mean is not None:
        # the direct path of training with running statistics (see batch_norm_forward)
        x3 = _direct_view(x, axis, stream, running_mean, running_var, gamma, beta)
        w = None if mask is None or x3 is None else _direct_mask(mask, x, axis, x3)
        if (
            x3 is not None
            and (mask is None or w is not None)
            and running_var is not None
            and _direct_options(eps, activation)
            and x3.shape[0] * x3.shape[2] >= 2
            and x3.shape[1]
            and running_mean.flags.writeable
            and running_var.flags.writeable
            and running_mean.flags.c_contiguous  # else the checks (e.g. a stride of 0)
            and running_var.flags.c_contiguous
        ):
            factor = _ops.momentum_factor(momentum, num_batches_tracked)
            _ops.check_on_nonfinite(on_nonfinite)
            y = np.empty(x.shape, x.dtype)
            # a warning points where the general path's does (distributed's wrapper)
            _direct_train(
                x3,
                y.reshape(x3.shape),
                gamma,
                beta,
                eps,
                activation == "relu",
                running_mean,
                running_var,
                factor,
                running_var_unbiased,
                on_nonfinite,
                stacklevel=2,
                w=w,
            )
            return y
    if training is False and mask is None:  # the direct path of batch_norm_inference
        if num_batches_tracked is not None:  # checked whenever given, as below
            _checks.check_num_batches_tracked(num_batches_tracked)
        y = _direct_inference_call(
            x, running_mean, running_var, gamma, beta, axis, eps, out, activation, residual, stream
        )
        if y is not None:
            return y
    if not training and mask is not None:
        raise ValueError(
            "mask= applies to training (batch statistics); with training=False the "
            "running statistics normalize every position, and a mask would change nothing"
        )
    if training:
        x, mask = _from_masked_array(x, axis, mask)
    be = backends.backend_for(
        (*_NORMALIZE_ARGS, "mask"),
        *(x, running_mean, running_var, gamma, beta, out, residual, mask),
    )
    be.check_stream(stream)
    x, gamma, beta = be.wrap("x", x), be.wrap("gamma", gamma), be.wrap("beta", beta)
    running_mean = be.wrap_running("running_mean", running_mean)
    running_var = be.wrap_running("running_var", running_var)
    out, residual, mask = be.wrap_out(out), be.wrap("residual", residual), be.wrap("mask", mask)
    axis, relu = _ops.check_forward_args(x, gamma, beta, axis, eps, out, activation)
    _checks.check_residual(residual, x.shape, x.dtype)
    _checks.check_mask(mask, x.shape, axis)
    C = x.shape[axis]
    if not training:
        # not used without training, but "checked whenever it is given" (docs/api.md);
        # momentum and on_nonfinite are not read here (as in PyTorch's eval mode)
        if num_batches_tracked is not None:
            _checks.check_num_batches_tracked(num_batches_tracked)
        return _inference(
            be, x, running_mean, running_var, gamma, beta, axis, eps, relu, out, stream,
            residual, "when training=False",
        )  # fmt: skip
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    factor = _ops.momentum_factor(momentum, num_batches_tracked)
    _ops.check_on_nonfinite(on_nonfinite)
    running = None
    if running_mean is not None:
        _checks.check_running("running_mean", running_mean, C, axis)
        _checks.check_running("running_var", running_var, C, axis)
        for name, r in (("running_mean", running_mean), ("running_var", running_var)):
            # both are written: one would overwrite the other (host arrays: NumPy tells)
            if type(out) is np.ndarray and type(r) is np.ndarray and np.may_share_memory(out, r):
                raise ValueError(
                    f"out must not share memory with {name}: both are results of the call"
                )
        running = _ops.Running(
            running_mean, running_var, factor, running_var_unbiased, on_nonfinite
        )
    if comm is None:  # with comm the rule applies to the global batch (Sync)
        _checks.check_batch(x.shape, axis, training=True)
    return _ops.train_forward(
        be,
        x,
        gamma,
        beta,
        axis,
        float(eps),
        relu,
        out,
        stream,
        running=running,
        comm=comm,
        residual=residual,
        mask=mask,
    )[0]
