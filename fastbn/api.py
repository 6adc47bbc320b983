"""The public functions: check every argument, pick the device, call the kernels.

All checks run before anything is written: a call that raises leaves ``out`` and the
running statistics exactly as they were.
"""

import functools
import math
import warnings

import numpy as np

from . import _checks, cpu, distributed

_ON_NONFINITE = ("raise", "warn")
_NORMALIZE_ARGS = ("x", "running_mean", "running_var", "gamma", "beta", "out")


# --------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------

def is_cuda_array(a):
    """True when ``a`` lives on a CUDA device (it has ``__cuda_array_interface__``).

    Examples
    --------
    >>> import numpy as np
    >>> is_cuda_array(np.zeros(3))
    False
    """
    if hasattr(a, "__cuda_array_interface__"):
        return True
    # Device arrays of Numba's CUDA simulator have no interface of their own until
    # fastbn.cuda gives them one; recognize them by their type.
    return type(a).__name__ == "FakeCUDAArray" and type(a).__module__.startswith("numba")


def _cuda_backend(names, *arrays):
    """Return :mod:`fastbn.cuda` when the array arguments live on a GPU, else None.

    Parameters
    ----------
    names : tuple of str
        The arguments' names, for the error message.
    *arrays : array or None
        The array arguments, in the order of ``names``.

    Raises
    ------
    TypeError
        Host and device arrays are mixed in one call.
    """
    for a in arrays:  # the common case, NumPy arrays, is decided in this loop
        if a is not None and type(a) is not np.ndarray:
            break
    else:
        return None
    named = [(name, a) for name, a in zip(names, arrays) if a is not None]
    on_device = [name for name, a in named if is_cuda_array(a)]
    if not on_device:
        return None
    if len(on_device) != len(named):
        on_host = [name for name, a in named if not is_cuda_array(a)]
        raise TypeError(f"arguments must all be CUDA arrays or all host arrays: "
                        f"{', '.join(on_device)} on the GPU, {', '.join(on_host)} on the host")
    from . import cuda
    return cuda


def _check_no_stream(stream):
    """``stream=`` only means something for GPU arrays."""
    if stream is not None:
        raise ValueError("stream= applies to CUDA arrays only; the arguments are host arrays")


def _as_host(name, a):
    """Return ``a`` as a plain NumPy array in native byte order, converting once.

    Lists, scalars and PyTorch CPU tensors are converted; ``np.matrix`` and other ndarray
    subclasses are viewed as plain arrays (results are plain arrays); a non-native byte
    order (``'>f4'``) is copied into the native one. A ``numpy.ma`` masked array is a
    TypeError (its mask would be dropped).
    """
    if a is None:
        return a
    if type(a) is not np.ndarray:
        _checks.check_not_masked(name, a)
        a = np.asarray(a)
        if type(a) is not np.ndarray:
            a = a.view(np.ndarray)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    return a


# --------------------------------------------------------------------------------------
# Shared preparation
# --------------------------------------------------------------------------------------

_FLOAT32 = np.dtype(np.float32)
_FLOAT64 = np.dtype(np.float64)


def _compute_dtype(dtype):
    """float16 is computed in float32 (Numba has no float16 arithmetic on the CPU); the
    kernels take native byte order only."""
    return _FLOAT32 if dtype.char in "ef" else _FLOAT64


def _stats_dtype(dtype):
    """Saved statistics: float64 for float64 input, float32 otherwise."""
    return _FLOAT64 if dtype.char == "d" else _FLOAT32


@functools.lru_cache(maxsize=64)
def _constant(C, value, dtype):
    """A read-only array of ``C`` copies of ``value`` (gamma or beta left out)."""
    a = np.full(C, value, dtype)
    a.flags.writeable = False
    return a


def _channel(p):
    """A per-channel array as the kernels take it: ``p`` itself when it is native float32
    or float64 (the kernels read either as float64), else its exact float64 copy (float16
    and the like, which Numba cannot load on the CPU)."""
    dtype = p.dtype
    return p if dtype is _FLOAT32 or dtype is _FLOAT64 else p.astype(_FLOAT64)


def _param(p, C, fill, dtype):
    """A per-channel parameter for the kernels: ``p`` (see :func:`_channel`), or ``C``
    copies of ``fill`` in the statistics dtype of ``dtype`` (the dtype users' parameters
    usually have, so the kernels need no other build)."""
    return _constant(C, fill, _stats_dtype(dtype)) if p is None else _channel(p)


def _compute_view(view, dtype):
    """The kernel input: the view itself, or its float32 copy for float16 data."""
    compute = _compute_dtype(dtype)
    return view.x3 if view.x3.dtype == compute else view.x3.astype(compute)


class _Output:
    """Where a kernel writes an x-shaped result, and how the caller receives it.

    The kernel always writes into ``work``, a C-contiguous ``(outer, C, inner)`` array of
    the compute dtype. When that can be ``out`` itself, nothing more happens; otherwise
    (float16, another layout, partial overlap with an input) :meth:`finish` copies the
    result into ``out`` or returns a fresh array in the input's layout.
    """

    __slots__ = ("out", "view", "dtype", "direct", "work")

    def __init__(self, out, view, dtype, inputs=()):
        self.out = out
        self.view = view
        self.dtype = dtype
        if out is None:
            self.direct = False
            self.work = np.empty(view.x3.shape, _compute_dtype(dtype))
            return
        compute = _compute_dtype(dtype)
        # out of another byte order, or an ndarray subclass, receives a copy (finish)
        direct = (_checks.direct_output(out, view, inputs)
                  if compute == dtype and type(out) is np.ndarray and out.dtype == compute
                  else None)
        self.direct = direct is not None
        self.work = direct if self.direct else np.empty(view.x3.shape, compute)

    def finish(self):
        """Return the result as the caller sees it (``out`` when one was given)."""
        if self.direct:
            return self.out
        result = _checks.restore_layout(self.work, self.view)
        if self.out is not None:
            np.copyto(self.out, result, casting="unsafe")
            return self.out
        return result.astype(self.dtype) if result.dtype != self.dtype else result


def _direct_view(x, axis, stream, *params):
    """``x`` as its ``(outer, C, inner)`` view when the call may take the direct path.

    The direct path serves the most common call, small ones included, in a few
    operations: ``x`` a C-contiguous float32 or float64 NumPy array, ``axis`` a valid
    ``int``, no ``stream``, every per-channel argument None or a native float32 or
    float64 NumPy array of shape ``(C,)``, which the kernels take as it is (and, checked
    by :func:`_direct_out`, no ``out`` or a plain one).
    These conditions imply that every check of the general path passes; they are
    sufficient, not necessary: any other call (None returned) takes the general path,
    whose checks raise the errors. Both paths run the same kernels on the same view, so
    their results are bitwise identical (tested).

    Examples
    --------
    >>> import numpy as np
    >>> _direct_view(np.zeros((8, 3, 5), np.float32), 1, None, np.ones(3)).shape
    (8, 3, 5)
    >>> _direct_view(np.zeros((8, 3, 5), np.float16), 1, None) is None
    True
    """
    if (type(x) is not np.ndarray or stream is not None or type(axis) is not int
            or (x.dtype is not _FLOAT32 and x.dtype is not _FLOAT64)
            or not x.flags.c_contiguous):
        return None
    shape = x.shape
    ndim = len(shape)
    if ndim < 2 or not -ndim <= axis < ndim:
        return None
    axis %= ndim
    C = shape[axis]
    channels = (C,)
    for p in params:
        if p is not None and (type(p) is not np.ndarray or p.shape != channels
                              or (p.dtype is not _FLOAT32 and p.dtype is not _FLOAT64)):
            return None
    if ndim == 2:  # the most common call: spare the tuple slices (~0.8 us of ~10)
        return x.reshape(shape[0], C, 1) if axis else x.reshape(1, C, shape[1])
    return x.reshape(math.prod(shape[:axis]), C, math.prod(shape[axis + 1:]))


def _direct_out(out, x, *inputs):
    """Where the direct path writes: a new array, or ``out``; None when it cannot.

    ``out`` qualifies when it is a writable C-contiguous NumPy array of x's shape and
    dtype that is one of the inputs or shares no memory with them (the general path
    handles every other ``out``).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.zeros((4, 2))
    >>> _direct_out(x, x, x) is x
    True
    >>> _direct_out(x[::-1], x, x) is None
    True
    """
    if out is None:
        return np.empty(x.shape, x.dtype)
    if not (type(out) is np.ndarray and out.shape == x.shape and out.dtype == x.dtype
            and out.flags.c_contiguous and out.flags.writeable):
        return None
    for a in inputs:
        if out is not a and np.may_share_memory(out, a):
            return None
    return out


def _direct_options(eps, activation):
    """True when ``eps`` and ``activation`` need no conversion (see :func:`_direct_view`)."""
    return type(eps) is float and 0.0 < eps < math.inf and (activation is None
                                                            or activation == "relu")


def _running_values(running_mean, running_var, mean, var, m, factor, unbiased):
    """The updated running statistics, rounded to their storage dtypes, not yet stored.

    ``running = (1 - factor) * running + factor * batch`` (the unbiased batch variance
    ``var * m / (m - 1)`` when ``unbiased``), in float64, then rounded once to each
    array's own dtype (float16 and any byte order included): see
    :func:`fastbn.cpu.running_values`. A value too large for the storage dtype comes back
    as inf, for :func:`_check_finite` to refuse.

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
        finite = cpu.running_values(running_mean, running_var, mean, var, m, factor, unbiased,
                                    new_mean, new_var)
        return new_mean, new_var, finite
    # float16 or another byte order, which Numba cannot load: float64 copies in, the same
    # arithmetic, then one rounding to the storage dtype by NumPy
    new64 = np.empty(C), np.empty(C)
    cpu.running_values(running_mean.astype(np.float64), running_var.astype(np.float64), mean,
                       var, m, factor, unbiased, *new64)
    with np.errstate(over="ignore", invalid="ignore"):
        new_mean, new_var = new64[0].astype(rm_dtype), new64[1].astype(rv_dtype)
    finite = bool(np.isfinite(mean).all() and np.isfinite(var).all()
                  and np.isfinite(new_mean).all() and np.isfinite(new_var).all())
    return new_mean, new_var, finite


def _store_running(running_mean, running_var, new):
    """Write the values of :func:`_running_values` into the caller's arrays, in place."""
    running_mean[...] = new[0]
    running_var[...] = new[1]


def _check_finite(mean, var, on_nonfinite, new=None):
    """Raise (or warn) when batch statistics are not finite, or when the running
    statistics would not be finite after the update (``new``, from
    :func:`_running_values`: the batch statistics overflow the storage dtype, say
    float32 data of std 1e20); return whether the update may be stored."""
    if new is not None:
        if new[2]:
            return True
    elif np.isfinite(mean).all() and np.isfinite(var).all():
        return True
    bad = np.flatnonzero(~(np.isfinite(mean) & np.isfinite(var)))
    if bad.size:
        message = (f"batch statistics are not finite in {bad.size} channel(s) (first: "
                   f"{bad[:5].tolist()}); the running statistics were left unchanged")
    else:
        bad = np.flatnonzero(~(np.isfinite(new[0]) & np.isfinite(new[1])))
        message = (f"the running statistics (running_mean {new[0].dtype}, running_var "
                   f"{new[1].dtype}) would not be finite after this batch's update in "
                   f"{bad.size} channel(s) (first: {bad[:5].tolist()}): the batch "
                   f"statistics overflow their dtype (or they were not finite already); "
                   f"the running statistics were left unchanged")
    if on_nonfinite == "raise":
        raise FloatingPointError(message + " (pass on_nonfinite='warn' to get the output anyway)")
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    return False


# --------------------------------------------------------------------------------------
# Internal operations on checked arguments (shared by the functions and the layer)
# --------------------------------------------------------------------------------------

def _forward_training(x, axis, gamma, beta, eps, relu, out, guard, comm=None):
    """Training forward on checked host arguments.

    Parameters
    ----------
    guard : callable or None
        ``guard(mean, var)`` says whether the caller accepts the statistics (it rejects
        non-finite ones): ``out`` must then not be written before they are known, so a
        caller-provided ``out`` takes the two-pass path.
    comm : fastbn.distributed.Sync, optional
        Synchronized BatchNorm: the statistics are those of every rank's ``x`` together
        (two collectives); the global count is then ``comm.count``.

    Returns
    -------
    tuple
        ``(dest, mean64, var64, invstd64)``; ``dest`` is None when ``guard`` refused
        the statistics before a caller-provided ``out`` was written.
    """
    view = _checks.canonical_view(x, axis)
    C = view.x3.shape[1]
    dest = _Output(out, view, x.dtype)
    x3 = _compute_view(view, x.dtype)
    g = _param(gamma, C, 1.0, x.dtype)
    b = _param(beta, C, 0.0, x.dtype)
    if comm is not None or (guard is not None and out is not None):
        if comm is not None:
            mean, var = comm.moments(x3, dtype=x.dtype)
        else:
            mean, m2 = cpu.moments(x3)
            var = m2 / (x3.size // C)
        invstd = 1.0 / np.sqrt(var + eps)
        if guard is not None and not guard(mean, var):
            return None, mean, var, invstd
        coef = cpu.coefficients(mean, invstd, g, b, x3.dtype)
        cpu.normalize(x3, coef, relu, dest.work)
    else:
        mean, var, invstd = cpu.forward_training(x3, g, b, eps, relu, dest.work)
    return dest, mean, var, invstd


def _backward(dy, x, mean, invstd, gamma, beta, axis, relu, out, comm=None):
    """Backward on checked host arguments; returns ``(dx, dgamma, dbeta)``.

    The gradients of the parameters come in the statistics dtype of ``x``.

    With ``comm`` (a :class:`fastbn.distributed.Sync`), ``dgamma`` and ``dbeta`` are sums
    over every rank's batch and ``dx`` uses the global count (two collectives).
    """
    view = _checks.canonical_view(x, axis)
    dy_view = _checks.canonical_view(dy, axis, order=view.order)
    C = view.x3.shape[1]
    dest = _Output(out, view, x.dtype, inputs=(dy_view.x3,))
    x3 = _compute_view(view, x.dtype)
    dy3 = _compute_view(dy_view, x.dtype)
    g = _param(gamma, C, 1.0, x.dtype)
    b = _param(beta, C, 0.0, x.dtype)
    if comm is None:
        dgamma, dbeta = cpu.backward(dy3, x3, _channel(mean), _channel(invstd), g, b, relu,
                                     dest.work)
        return dest.finish(), dgamma, dbeta
    invstd64 = np.asarray(invstd, dtype=np.float64)
    coef = cpu.coefficients(_channel(mean), invstd64, g, b, x3.dtype)
    s_dy, s_dyx = comm.grad_sums(dy3, x3, coef, relu, dtype=x.dtype)
    if x3.size:
        cpu.input_grad(dy3, x3, coef, s_dy, s_dyx, comm.count, invstd64,
                       np.asarray(g, dtype=np.float64), relu, dest.work)
    stats = _stats_dtype(x.dtype)
    return dest.finish(), (s_dyx * invstd64).astype(stats, copy=False), s_dy.astype(stats, copy=False)


def _check_forward_args(x, gamma, beta, axis, eps, out, activation):
    """Checks shared by every forward; returns ``(axis, relu)``."""
    _checks.check_input("x", x)
    axis = _checks.normalize_axis(axis, x.ndim)
    C = x.shape[axis]
    _checks.check_channel_param("gamma", gamma, C, axis)
    _checks.check_channel_param("beta", beta, C, axis)
    _checks.check_eps(eps)
    _checks.check_out("out", out, x.shape, np.dtype(x.dtype))
    return axis, _checks.check_activation(activation)


def _empty_result(x, out):
    """The x-shaped result of a call on an empty ``x``: ``out``, or a new empty array."""
    return out if out is not None else np.empty(x.shape, x.dtype)


def _saved(a, dtype):
    """A statistic in the statistics dtype of ``dtype`` (no copy when it already is)."""
    return a.astype(_stats_dtype(dtype), copy=False)


# --------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------

@distributed.synchronized("batch_norm_forward")
def batch_norm_forward(x, gamma=None, beta=None, *, axis=1, eps=1e-5, out=None,
                       activation=None, stream=None, comm=None):
    """Normalize ``x`` with its batch statistics (training forward).

    ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` per channel, where ``mean`` and
    the biased ``var`` are taken over every axis but ``axis``.

    Parameters
    ----------
    x : array, ndim >= 2
        float16, float32 or float64, any byte order on the host (results in native
        order). NumPy arrays run on the CPU kernels, CUDA arrays (Numba device arrays,
        CuPy, PyTorch CUDA tensors) on the GPU kernels. A ``numpy.ma`` masked array is a
        TypeError. An empty batch (no value per channel) gives an empty ``y`` and NaN
        ``mean``/``invstd`` of shape (C,); one value per channel is a ValueError.
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
        channel (in the global batch with ``comm``), eps <= 0, ``out`` of the wrong shape
        or dtype.
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
    """
    x3 = _direct_view(x, axis, stream, gamma, beta)
    if (x3 is not None and comm is None and _direct_options(eps, activation)
            and x3.shape[0] * x3.shape[2] >= 2 and x3.shape[1]
            and (y := _direct_out(out, x, x)) is not None):
        C = x3.shape[1]
        mean, _, invstd = cpu.forward_training(
            x3, _param(gamma, C, 1.0, x.dtype), _param(beta, C, 0.0, x.dtype), eps,
            activation == "relu", y.reshape(x3.shape))
        return y, _saved(mean, x.dtype), _saved(invstd, x.dtype)
    backend = _cuda_backend(("x", "gamma", "beta", "out"), x, gamma, beta, out)
    if backend is not None:
        return backend.batch_norm_forward(x, gamma, beta, axis=axis, eps=eps, out=out,
                                          activation=activation, stream=stream, comm=comm)
    _check_no_stream(stream)
    x, gamma, beta = _as_host("x", x), _as_host("gamma", gamma), _as_host("beta", beta)
    axis, relu = _check_forward_args(x, gamma, beta, axis, eps, out, activation)
    if comm is None:  # with comm the rule applies to the global batch (Sync.moments)
        C, _ = _checks.check_batch(x.shape, axis, training=True)
        if x.size == 0:  # like PyTorch: an empty output; NaN statistics (no values)
            nan = np.full(C, np.nan, _stats_dtype(x.dtype))
            return _empty_result(x, out), nan, nan.copy()
    dest, mean, _, invstd = _forward_training(x, axis, gamma, beta, float(eps), relu, out,
                                              guard=None, comm=comm)
    return dest.finish(), _saved(mean, x.dtype), _saved(invstd, x.dtype)


@distributed.synchronized("batch_norm_backward")
def batch_norm_backward(dy, x, mean, invstd, gamma=None, beta=None, *, axis=1, out=None,
                        activation=None, stream=None, comm=None):
    """Gradients of :func:`batch_norm_forward` with respect to x, gamma and beta.

    ``dx = gamma * invstd / m * (m * dy - dbeta - xhat * dgamma)`` with
    ``dbeta = sum(dy)``, ``dgamma = sum(dy * xhat)`` and ``xhat = (x - mean) * invstd``.

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
    stream : CUDA stream, optional
        GPU arrays only (see :func:`batch_norm_forward`).
    comm : mpi4py.MPI.Comm, optional
        Synchronized BatchNorm (see :func:`batch_norm_forward`): ``mean`` and ``invstd``
        are then the global statistics of the synchronized forward, ``dgamma`` and
        ``dbeta`` are sums over every rank's batch (the same on every rank) and ``dx`` is
        this rank's shard of the gradient of the whole batch.

    Returns
    -------
    dx : array
        Same shape, dtype and kind as ``x``.
    dgamma, dbeta : array of shape (C,) or None
        Both come back whenever the call is affine (``gamma`` or ``beta`` given):
        ``dbeta = sum(dy)`` does not need ``beta``. Both are None only when neither is
        given. Statistics dtype. On an empty batch: zeros.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.array([[1.0], [3.0]])
    >>> y, mean, invstd = fastbn.batch_norm_forward(x)
    >>> dx, dgamma, dbeta = fastbn.batch_norm_backward(np.array([[1.0], [1.0]]), x, mean, invstd,
    ...                                                gamma=np.ones(1), beta=np.zeros(1))
    >>> dx.ravel(), dbeta
    (array([0., 0.]), array([2.]))
    """
    x3 = _direct_view(x, axis, stream, mean, invstd, gamma, beta)
    if (x3 is not None and comm is None and mean is not None and invstd is not None
            and type(dy) is np.ndarray and dy.shape == x.shape and dy.dtype == x.dtype
            and dy.flags.c_contiguous and x.size and _direct_options(1.0, activation)
            and (dx := _direct_out(out, x, x, dy)) is not None):
        C = x3.shape[1]
        dgamma, dbeta = cpu.backward(dy.reshape(x3.shape), x3, mean, invstd,
                                     _param(gamma, C, 1.0, x.dtype), _param(beta, C, 0.0, x.dtype),
                                     activation == "relu", dx.reshape(x3.shape))
        if gamma is None and beta is None:
            return dx, None, None
        return dx, dgamma, dbeta
    backend = _cuda_backend(("dy", "x", "mean", "invstd", "gamma", "beta", "out"),
                            dy, x, mean, invstd, gamma, beta, out)
    if backend is not None:
        return backend.batch_norm_backward(dy, x, mean, invstd, gamma, beta, axis=axis,
                                           out=out, activation=activation, stream=stream,
                                           comm=comm)
    _check_no_stream(stream)
    dy, x = _as_host("dy", dy), _as_host("x", x)
    mean, invstd = _as_host("mean", mean), _as_host("invstd", invstd)
    gamma, beta = _as_host("gamma", gamma), _as_host("beta", beta)
    dtype, axis, C, relu = _checks.check_backward_args(dy, x, mean, invstd, gamma, beta, axis,
                                                       out, activation)
    affine = gamma is not None or beta is not None
    if x.size == 0 and comm is None:
        zeros = np.zeros(C, _stats_dtype(dtype))
        return (_empty_result(x, out), zeros if affine else None,
                zeros.copy() if affine else None)
    dx, dgamma, dbeta = _backward(dy, x, mean, invstd, gamma, beta, axis, relu, out, comm)
    if not affine:
        return dx, None, None
    return dx, _saved(dgamma, dtype), _saved(dbeta, dtype)


def batch_norm_inference(x, running_mean, running_var, gamma=None, beta=None, *, axis=1,
                         eps=1e-5, out=None, activation=None, stream=None):
    """Normalize ``x`` with given (running) statistics: one read of x, one write of y.

    ``y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta``.

    Parameters
    ----------
    x : array, ndim >= 2
    running_mean, running_var : array of shape (C,)
    gamma, beta : array of shape (C,), optional
    axis : int, default 1
    eps : float, default 1e-5
    out : array, optional
    activation : {None, "relu"}, optional
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
    x3 = _direct_view(x, axis, stream, running_mean, running_var, gamma, beta)
    if (x3 is not None and running_mean is not None and running_var is not None
            and _direct_options(eps, activation)
            and (y := _direct_out(out, x, x)) is not None):
        C = x3.shape[1]
        cpu.inference(x3, running_mean, running_var, _param(gamma, C, 1.0, x.dtype),
                      _param(beta, C, 0.0, x.dtype), eps, activation == "relu",
                      y.reshape(x3.shape))
        return y
    backend = _cuda_backend(_NORMALIZE_ARGS, x, running_mean, running_var, gamma, beta, out)
    if backend is not None:
        return backend.batch_norm_inference(x, running_mean, running_var, gamma, beta,
                                            axis=axis, eps=eps, out=out, activation=activation,
                                            stream=stream)
    _check_no_stream(stream)
    x, gamma, beta = _as_host("x", x), _as_host("gamma", gamma), _as_host("beta", beta)
    running_mean = _as_host("running_mean", running_mean)
    running_var = _as_host("running_var", running_var)
    axis, relu = _check_forward_args(x, gamma, beta, axis, eps, out, activation)
    C = x.shape[axis]
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required for inference")
    _checks.check_channel_param("running_mean", running_mean, C, axis)
    _checks.check_channel_param("running_var", running_var, C, axis)
    return _inference(x, axis, running_mean, running_var, gamma, beta, float(eps), relu, out)


def _inference(x, axis, running_mean, running_var, gamma, beta, eps, relu, out):
    """Inference on checked host arguments."""
    view = _checks.canonical_view(x, axis)
    C = view.x3.shape[1]
    dest = _Output(out, view, x.dtype)
    x3 = _compute_view(view, x.dtype)
    cpu.inference(x3, _channel(running_mean), _channel(running_var),
                  _param(gamma, C, 1.0, x.dtype),
                  _param(beta, C, 0.0, x.dtype), eps, relu, dest.work)
    return dest.finish()


@distributed.synchronized("batch_norm", when=lambda kwargs: bool(kwargs.get("training")))
def batch_norm(x, running_mean=None, running_var=None, gamma=None, beta=None, *,
               training=False, momentum=0.1, eps=1e-5, axis=1, out=None, activation=None,
               num_batches_tracked=None, running_var_unbiased=True, on_nonfinite="raise",
               stream=None, comm=None):
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
        statistics untouched (PyTorch's behaviour).
    momentum : float in [0, 1] or None, default 0.1
        Weight of the new batch. None gives the cumulative average of all batches seen,
        which needs ``num_batches_tracked``. A str, bytes or bool is a TypeError.
    eps : float, default 1e-5
    axis : int, default 1
    out : array, optional
    activation : {None, "relu"}, optional
    num_batches_tracked : int, optional
        With ``momentum=None``: how many batches the running statistics already average.
        An integer >= 0 (checked whenever given).
    running_var_unbiased : bool, default True
    on_nonfinite : {"raise", "warn"}, default "raise"
        What to do when the batch statistics are not finite, or when the updated running
        statistics would not be finite in their own dtype (an overflow: float32 data of
        std 1e20, float16 running statistics past 65504): raise ``FloatingPointError``
        before anything is written, or warn and return the output while leaving the
        running statistics untouched. Either way they never take in NaN or inf.
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

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
    >>> rm, rv = np.zeros(2), np.ones(2)
    >>> y = fastbn.batch_norm(x, rm, rv, training=True, momentum=0.5)
    >>> rm, rv
    (array([1., 2.]), array([1.5, 4.5]))
    """
    backend = _cuda_backend(_NORMALIZE_ARGS, x, running_mean, running_var, gamma, beta, out)
    if backend is not None:
        return backend.batch_norm(x, running_mean, running_var, gamma, beta,
                                  training=training, momentum=momentum, eps=eps, axis=axis,
                                  out=out, activation=activation,
                                  num_batches_tracked=num_batches_tracked,
                                  running_var_unbiased=running_var_unbiased,
                                  on_nonfinite=on_nonfinite, stream=stream, comm=comm)
    _check_no_stream(stream)
    x, gamma, beta = _as_host("x", x), _as_host("gamma", gamma), _as_host("beta", beta)
    axis, relu = _check_forward_args(x, gamma, beta, axis, eps, out, activation)
    C = x.shape[axis]
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var are required when training=False")
        _checks.check_channel_param("running_mean", running_mean, C, axis)
        _checks.check_channel_param("running_var", running_var, C, axis)
        return _inference(x, axis, running_mean, running_var, gamma, beta, float(eps), relu, out)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    factor = _momentum_factor(momentum, num_batches_tracked)
    if on_nonfinite not in _ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be 'raise' or 'warn', got {on_nonfinite!r}")
    if running_mean is not None:
        _checks.check_running("running_mean", running_mean, C, axis)
        _checks.check_running("running_var", running_var, C, axis)
    if comm is None:  # with comm the rule applies to the global batch (Sync.moments)
        _, m = _checks.check_batch(x.shape, axis, training=True)
        if x.size == 0:  # like PyTorch: an empty output, running statistics untouched
            return _empty_result(x, out)
    track = running_mean is not None
    update = []  # the running values the guard accepted, stored once the output is known

    def guard(mean, var):
        count = comm.count if comm is not None else m
        new = _running_values(running_mean, running_var, mean, var, count, factor,
                              running_var_unbiased)
        update.append(new)
        return new[2]

    dest, mean, var, _ = _forward_training(x, axis, gamma, beta, float(eps), relu, out,
                                           guard=guard if track else None, comm=comm)
    if track:
        new = update[0] if update else _running_values(
            running_mean, running_var, mean, var, comm.count if comm is not None else m,
            factor, running_var_unbiased)
        if _check_finite(mean, var, on_nonfinite, new):
            _store_running(running_mean, running_var, new)
    if dest is None:  # refused statistics with on_nonfinite="warn" and a caller's out
        dest, mean, var, _ = _forward_training(x, axis, gamma, beta, float(eps), relu, out,
                                               guard=None, comm=comm)
    return dest.finish()


def _momentum_factor(momentum, num_batches_tracked):
    """The weight of the new batch: ``momentum``, or ``1 / (n + 1)`` for a cumulative average."""
    momentum = _checks.check_momentum(momentum)
    if num_batches_tracked is not None:  # checked whenever given, used for momentum=None
        n = _checks.check_num_batches_tracked(num_batches_tracked)
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked, the "
                         "number of batches the running statistics already average")
    return 1.0 / (n + 1)
