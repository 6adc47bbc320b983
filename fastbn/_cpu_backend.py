"""The CPU backend: NumPy arrays, the canonical view, outputs, and the calls of the
:mod:`fastbn.cpu` kernels.

It implements the backend operations that :mod:`fastbn._ops` calls (the CUDA backend,
:mod:`fastbn.cuda`, has the same names). Arrays here are host arrays in native byte
order (:func:`wrap`); the statistics the operations exchange are float64 host arrays.
"""

import contextlib
import functools
import math
import sys

import numpy as np

from . import _checks, _config, _ops, cpu, cpu_masked

NAME = "cpu"
DEFERRED_NONFINITE = False  # non-finite statistics are reported in the call itself

FLOAT32 = np.dtype(np.float32)
FLOAT64 = np.dtype(np.float64)
BOOL = np.dtype(np.bool_)


# --------------------------------------------------------------------------------------
# Array kinds
# --------------------------------------------------------------------------------------


def wrap(name, a):
    """Return ``a`` as a plain NumPy array in native byte order, converting once.

    Lists, scalars and PyTorch CPU tensors are converted; ``np.matrix`` and other ndarray
    subclasses are viewed as plain arrays (results are plain arrays); a non-native byte
    order (``'>f4'``) is copied into the native one. A ``numpy.ma`` masked array is a
    TypeError (its mask would be dropped).
    """
    if a is None:
        return a
    if type(a) is not np.ndarray:
        if is_tensor(a):
            return tensor_array(name, a)
        _checks.check_not_masked(name, a)
        try:
            a = np.asarray(a)
        except (ValueError, TypeError) as error:  # a ragged list: NumPy's words name nothing
            raise TypeError(
                f"{name} must be an array (or a list NumPy makes one of), got a "
                f"{type(a).__name__} it cannot convert ({error})"
            ) from None
        if type(a) is not np.ndarray:
            a = a.view(np.ndarray)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    return a


def from_masked_array(x, axis, mask):
    """``(x, mask)`` with a ``numpy.ma`` ``x`` turned into its data and its mask.

    numpy.ma marks the *invalid* positions; ``mask=`` the valid ones, for every channel
    at once. So the mask of ``x`` must not vary along ``axis``, else a TypeError says
    why; its valid positions become ``mask`` (and-ed with a given host ``mask``, which
    is checked first). Any other ``x`` comes back as it is.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.ma.masked_array(np.zeros((3, 2)), mask=[[0, 0], [1, 1], [0, 0]])
    >>> from_masked_array(x, 1, None)[1]
    array([ True, False,  True])
    """
    if not isinstance(x, np.ma.MaskedArray):
        return x, mask
    data = x.data
    if data.ndim < 2:  # the checks of x say what is wrong
        return data, mask
    axis = _checks.normalize_axis(axis, data.ndim)
    invalid = np.ma.getmaskarray(x)
    if data.shape[axis] and not (invalid == np.take(invalid, [0], axis=axis)).all():
        raise TypeError(
            f"x is a numpy.ma.MaskedArray whose mask varies across the channels (axis "
            f"{axis}): masked statistics take one mask for every channel (the positions "
            f"along the other axes). Pass x.filled(value) or x.data, with mask= of shape "
            f"{data.shape[:axis] + data.shape[axis + 1 :]} if you want one"
        )
    valid = (
        ~invalid.any(axis=axis)
        if data.shape[axis]
        else np.ones(data.shape[:axis] + data.shape[axis + 1 :], bool)
    )
    if mask is None:
        return data, valid
    if isinstance(mask, np.ma.MaskedArray) or _checks.is_cuda_array(mask):
        return data, mask  # refused by the checks (a masked mask; mixed devices)
    mask = np.asarray(mask)
    _checks.check_mask(mask, data.shape, axis)
    return data, valid & mask


def unwrap(a):
    """The array as the caller sees it (the inverse of :func:`wrap`)."""
    return a


def is_tensor(a):
    """True for a PyTorch tensor or parameter, told by its type's module (fastbn never
    imports torch itself).

    Examples
    --------
    >>> import numpy as np
    >>> is_tensor(np.zeros(3))
    False
    """
    return type(a).__module__.partition(".")[0] == "torch"


def tensor_array(name, t):
    """The NumPy view of a PyTorch CPU tensor: zero-copy, its memory and strides
    (``channels_last`` stays NHWC in memory), detached (a tensor that requires grad is
    read, never differentiated: :mod:`fastbn.torch` is the autograd-aware interface).

    Raises
    ------
    TypeError
        A bfloat16 tensor (the kernels have none; :mod:`fastbn.torch` computes it in
        float32), a tensor on another device than the CPU and not a CUDA array, or any
        other tensor NumPy cannot view.
    """
    dtype = str(t.dtype)
    if dtype == "torch.bfloat16":
        raise TypeError(
            f"{name} must be a float16, float32 or float64 tensor, got torch.bfloat16, "
            f"which fastbn's kernels do not take: convert it (x.float()), or use "
            f"fastbn.torch, which computes bfloat16 in float32"
        )
    if t.device.type != "cpu":
        raise TypeError(f"{name} must be a CPU or CUDA tensor, got one on {t.device}")
    try:
        return t.detach().numpy()
    except (TypeError, RuntimeError) as error:  # conjugate or negative views, sparse
        raise TypeError(f"{name}: fastbn cannot read this tensor in place ({error})") from None


def tensor_result(a, like):
    """A host result ``a`` as the caller's kind of array: a PyTorch tensor sharing its
    memory when ``like`` (the caller's input) is a PyTorch CPU tensor, else ``a``.

    Examples
    --------
    >>> import numpy as np
    >>> y = np.zeros(3)
    >>> tensor_result(y, np.ones(3)) is y
    True
    """
    if type(a) is not np.ndarray or type(like) is np.ndarray or not is_tensor(like):
        return a
    if like.is_cuda:
        return a
    return sys.modules["torch"].from_numpy(a)  # a tensor came in: torch is imported


def tensor_call(function, names, first, args, kwargs):
    """Call ``function`` (a public function, its parameters ``names``) on tensors.

    ``first``, its first array argument (``x``, or ``dy``), is a tensor and fixes the kind
    of the results. PyTorch CPU tensors go in as zero-copy NumPy views (running statistics
    and ``out`` are thus written in place), CUDA tensors as detached tensors; the NumPy
    results come back as tensors sharing their memory (``out`` as the tensor given),
    tuples of results element by element.
    """
    on_host = not first.is_cuda
    views = {}

    def convert(name, a):
        if not is_tensor(a):
            return a
        if not on_host or a.is_cuda:
            return a.detach()
        view = tensor_array(name, a)
        views[id(view)] = a
        return view

    args = tuple(convert(name, a) for name, a in zip(names, args))
    kwargs = {k: convert(k, a) for k, a in kwargs.items()}
    result = function(*args, **kwargs)
    if not on_host:
        return result
    from_numpy = sys.modules["torch"].from_numpy  # a tensor came in: torch is imported

    def back(a):
        if type(a) is not np.ndarray:
            return a
        given = views.get(id(a))
        return given if given is not None else from_numpy(a)

    return tuple(back(a) for a in result) if type(result) is tuple else back(result)


def wrap_running(name, a):
    """Running statistics as they are: updated in place, whatever their dtype or byte
    order (:func:`fastbn._checks.check_running` checks them); a PyTorch tensor as its
    NumPy view (:func:`tensor_array`), updated in place as well."""
    return tensor_array(name, a) if is_tensor(a) else a


def wrap_state(name, a):
    """The layer's own arrays (native host arrays) as they are."""
    return a


def wrap_out(out):
    """``out`` as the operations take it (checked by :func:`fastbn._checks.check_out`); a
    PyTorch tensor as its NumPy view, written in place."""
    return tensor_array("out", out) if is_tensor(out) else out


def check_stream(stream):
    """``stream=`` only means something for GPU arrays."""
    if stream is not None:
        raise ValueError("stream= applies to CUDA arrays only; the arguments are host arrays")


_NO_SCOPE = contextlib.nullcontext()


def scope(x, stream):
    """Nothing to set up on the host (the CUDA backend picks the device and stream)."""
    return _NO_SCOPE


def to_host(a):
    """A host array as it is."""
    return a


def store(a, values, st=None):
    """Write ``values`` into the host array ``a`` in place (rounded to its dtype)."""
    a[...] = values


def copy_into(a, values):
    """Copy ``values`` into the host array ``a`` in place."""
    a[...] = values
    return a


# --------------------------------------------------------------------------------------
# dtypes and per-channel arrays
# --------------------------------------------------------------------------------------


def compute_dtype(dtype):
    """float16 is computed in float32 (Numba has no float16 arithmetic on the CPU); the
    kernels take native byte order only."""
    return FLOAT32 if dtype.char in "ef" else FLOAT64


def stats_dtype(dtype):
    """Saved statistics: float64 for float64 input, float32 otherwise."""
    return FLOAT64 if dtype.char == "d" else FLOAT32


@functools.lru_cache(maxsize=64)
def _constant(C, value, dtype):
    """A read-only array of ``C`` copies of ``value`` (gamma or beta left out)."""
    a = np.full(C, value, dtype)
    a.flags.writeable = False
    return a


def channel(p):
    """A per-channel array as the kernels take it: ``p`` itself when it is native float32
    or float64 (the kernels read either as float64), else its exact float64 copy (float16
    and the like, which Numba cannot load on the CPU)."""
    dtype = p.dtype
    return p if dtype is FLOAT32 or dtype is FLOAT64 else p.astype(FLOAT64)


def param(p, C, fill, dtype):
    """A per-channel parameter for the kernels: ``p`` (see :func:`channel`), or ``C``
    copies of ``fill`` in the statistics dtype of ``dtype`` (the dtype users' parameters
    usually have, so the kernels need no other build)."""
    return _constant(C, fill, stats_dtype(dtype)) if p is None else channel(p)


def saved(a, dtype):
    """A float64 statistic in ``dtype`` (no copy when it already is); None for None."""
    if dtype is None:
        return None
    return a if a.dtype == dtype else a.astype(dtype)


def stats(like, C, dtype, st=None, fill=0.0):
    """A new ``(C,)`` array of ``fill``."""
    return np.full(C, fill, dtype)


def stats_from_host(values, like, dtype, st=None):
    """Float64 host statistics in ``dtype`` (None when ``dtype`` is None)."""
    return saved(values, dtype)


# --------------------------------------------------------------------------------------
# The canonical view and outputs
# --------------------------------------------------------------------------------------


def view(x, axis, st=None, order=None):
    """The canonical ``(outer, C, inner)`` view of ``x``.

    See :func:`fastbn._checks.canonical_view`.
    """
    return _checks.canonical_view(x, axis, order=order)


def _compute_view(v, dtype):
    """The kernel input: the view itself, or its float32 copy for float16 data."""
    compute = compute_dtype(dtype)
    return v.x3 if v.x3.dtype == compute else v.x3.astype(compute)


class Output:
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
            self.work = np.empty(view.x3.shape, compute_dtype(dtype))
            return
        compute = compute_dtype(dtype)
        # out of another byte order, or an ndarray subclass, receives a copy (finish)
        direct = (
            _checks.direct_output(out, view, inputs)
            if compute == dtype and type(out) is np.ndarray and out.dtype == compute
            else None
        )
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


def output(out, v, x, st=None, also=None):
    """The destination of an x-shaped result (``also``: the view of another input)."""
    return Output(out, v, x.dtype, inputs=() if also is None else (also.x3,))


def empty_output(x, axis, out, st=None):
    """The x-shaped result of a call on an empty ``x``: ``out``, or a new empty array."""
    return out if out is not None else np.empty(x.shape, x.dtype)


# --------------------------------------------------------------------------------------
# The direct path (CPU)
# --------------------------------------------------------------------------------------


def direct_view(x, axis, stream, *params):
    """``x`` as its ``(outer, C, inner)`` view when the call may take the direct path.

    The direct path serves the most common call, small ones included, in a few
    operations: ``x`` a C-contiguous float32 or float64 NumPy array, ``axis`` a valid
    ``int``, no ``stream``, every per-channel argument None or a native float32 or
    float64 NumPy array of shape ``(C,)``, which the kernels take as it is (and, checked
    by :func:`direct_out`, no ``out`` or a plain one).
    These conditions imply that every check of the general path passes; they are
    sufficient, not necessary: any other call (None returned) takes the general path,
    whose checks raise the errors. Both paths run the same kernels on the same view, so
    their results are bitwise identical (tested).

    Examples
    --------
    >>> import numpy as np
    >>> direct_view(np.zeros((8, 3, 5), np.float32), 1, None, np.ones(3)).shape
    (8, 3, 5)
    >>> direct_view(np.zeros((8, 3, 5), np.float16), 1, None) is None
    True
    """
    if (
        type(x) is not np.ndarray
        or stream is not None
        or type(axis) is not int
        or (x.dtype is not FLOAT32 and x.dtype is not FLOAT64)
        or not x.flags.c_contiguous
    ):
        return None
    shape = x.shape
    ndim = len(shape)
    if ndim < 2 or not -ndim <= axis < ndim:
        return None
    axis %= ndim
    C = shape[axis]
    channels = (C,)
    for p in params:
        if p is not None and (
            type(p) is not np.ndarray
            or p.shape != channels
            or (p.dtype is not FLOAT32 and p.dtype is not FLOAT64)
        ):
            return None
    if ndim == 2:  # the most common call: spare the tuple slices (~0.8 us of ~10)
        return x.reshape(shape[0], C, 1) if axis else x.reshape(1, C, shape[1])
    return x.reshape(math.prod(shape[:axis]), C, math.prod(shape[axis + 1 :]))


def direct_out(out, x, *inputs):
    """Where the direct path writes: a new array, or ``out``; None when it cannot.

    ``out`` qualifies when it is a writable C-contiguous NumPy array of x's shape and
    dtype that is one of the inputs or shares no memory with them (the general path
    handles every other ``out``).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.zeros((4, 2))
    >>> direct_out(x, x, x) is x
    True
    >>> direct_out(x[::-1], x, x) is None
    True
    """
    if out is None:
        return np.empty(x.shape, x.dtype)
    if not (
        type(out) is np.ndarray
        and out.shape == x.shape
        and out.dtype == x.dtype
        and out.flags.c_contiguous
        and out.flags.writeable
    ):
        return None
    for a in inputs:
        if out is not a and np.may_share_memory(out, a):
            return None
    return out


def direct_options(eps, activation):
    """True when ``eps`` and ``activation`` need no conversion (see :func:`direct_view`)."""
    return (
        type(eps) is float and 0.0 < eps < math.inf and (activation is None or activation == "relu")
    )


def direct_train(
    x3,
    y3,
    gamma,
    beta,
    eps,
    relu,
    running_mean,
    running_var,
    factor,
    unbiased,
    on_nonfinite,
    stacklevel,
    w=None,
):
    """The training forward of the direct path: ``y3`` written from ``x3`` (the views of
    :func:`direct_view` and :func:`direct_out`), the running statistics (None: none)
    updated by the rules of :func:`fastbn._ops.running_values` and
    :func:`fastbn._ops.check_finite`; returns the float64 ``(mean, var, invstd)``.

    With ``w`` (from :func:`direct_mask`), the statistics of its True positions
    (:func:`fastbn.cpu_masked.forward`), their count ``m`` in the running variance's
    correction; an all-True mask takes the unmasked kernels and fewer than 2 True
    positions are the general path's ValueError, raised before anything is written.

    The same kernels, in the same order, as :func:`fastbn._ops.train_forward` on the
    same view with ``out`` None: bitwise the same results (tested). ``stacklevel``: that
    of a warning, seen from the caller of this function.
    """
    outer, C, inner = x3.shape
    m = outer * inner
    if w is not None:
        count = np.count_nonzero(w)
        if count < 2:
            _checks.check_mask_count(count, m)
        if count == m:
            w = None
    gamma = param(gamma, C, 1.0, x3.dtype)
    beta = param(beta, C, 0.0, x3.dtype)
    if w is None:
        mean, var, invstd = cpu.forward_training(x3, gamma, beta, eps, relu, y3)
    else:
        m = count
        mean, invstd, var = cpu_masked.forward(x3, w, m, gamma, beta, eps, relu, y3)
    if running_mean is not None:
        new = _ops.running_values(running_mean, running_var, mean, var, m, factor, unbiased)
        if _ops.check_finite(mean, var, on_nonfinite, new, stacklevel=stacklevel + 2):
            running_mean[...] = new[0]
            running_var[...] = new[1]
    return mean, var, invstd


def direct_forward(x3, y, gamma, beta, eps, relu):
    """The training forward of the direct path (no running statistics): ``y`` (from
    :func:`direct_out`) written from ``x3`` (from :func:`direct_view`); returns
    ``(y, mean, invstd)``, the statistics in the statistics dtype.

    The kernel of :func:`cpu.forward_training` on the same view, bitwise its results,
    with less around it, since a small call is mostly host time (docs/cpu.md, "Small
    calls"): the plan and the driver are looked up once, gamma and beta (None or native
    float32/float64, as :func:`direct_view` admits) go to the kernel as they are, and
    the kernel writes the mean and ``invstd`` into adjacent rows of one buffer, so that
    float32 statistics take one conversion.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[1.0], [3.0]], np.float32)
    >>> y, mean, invstd = direct_forward(x.reshape(2, 1, 1), np.empty_like(x), None, None,
    ...                                  1e-5, False)
    >>> y.ravel(), mean, mean.dtype
    (array([-0.999995,  0.999995], dtype=float32), array([2.], dtype=float32), dtype('float32'))
    """
    C = x3.shape[1]
    drivers = cpu.drivers_for(x3)
    if gamma is None:
        gamma = _constant(C, 1.0, stats_dtype(x3.dtype))
    if beta is None:
        beta = _constant(C, 0.0, stats_dtype(x3.dtype))
    if drivers.small:  # the statistics written by the kernel in their dtype, y as it is
        stats = np.empty((2, C), x3.dtype)
        cpu.small_forward_kernel(x3, eps, gamma, beta, relu, y, stats)
        return y, stats[0], stats[1]
    # rows: mean, invstd, var (the kernel's order is mean, var, invstd)
    stats = np.empty((3, C))
    drivers.forward(
        x3, drivers.chunk, eps, gamma, beta, relu, y.reshape(x3.shape), stats[0], stats[2], stats[1]
    )
    if x3.dtype is FLOAT64:
        return y, stats[0], stats[1]
    pair = stats[:2].astype(FLOAT32)
    return y, pair[0], pair[1]


def direct_inference(x3, y, running_mean, running_var, gamma, beta, eps, relu):
    """Inference on the direct path: ``y`` (from :func:`direct_out`) written from ``x3``
    and the given statistics (native float32/float64 ``(C,)`` arrays); returns ``y``.
    The kernel of :func:`cpu.inference` on the same view (see :func:`direct_forward`).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[1.0], [3.0]])
    >>> direct_inference(x.reshape(2, 1, 1), np.empty_like(x), np.array([2.0]),
    ...                  np.array([1.0]), None, None, 0.0, False).ravel()
    array([-1.,  1.])
    """
    C = x3.shape[1]
    drivers = cpu.drivers_for(x3)
    if gamma is None:
        gamma = _constant(C, 1.0, stats_dtype(x3.dtype))
    if beta is None:
        beta = _constant(C, 0.0, stats_dtype(x3.dtype))
    if drivers.small:  # y as it is (the kernel views it as x3)
        cpu.small_inference_kernel(x3, running_mean, running_var, gamma, beta, eps, relu, y)
    else:
        drivers.inference(
            x3, running_mean, running_var, gamma, beta, eps, relu, y.reshape(x3.shape)
        )
    return y


def direct_backward(dy, x3, mean, invstd, gamma, beta, relu, dx):
    """The backward of the direct path: ``dx`` written; returns ``(dgamma, dbeta)`` in
    the statistics dtype (the kernel of :func:`backward`, on the same views: bitwise its
    results; see :func:`direct_forward` for what is spared). ``dy`` and ``dx``:
    C-contiguous, of ``x3``'s dtype and size, in ``x3``'s shape or the caller's (x's):
    a small call's driver views them as ``x3`` itself, which spares two reshapes.

    Examples
    --------
    >>> import numpy as np
    >>> x3 = np.array([[[0.0]], [[2.0]]])
    >>> dx3 = np.empty_like(x3)
    >>> direct_backward(np.array([[[1.0]], [[3.0]]]), x3, np.ones(1), np.ones(1), None, None,
    ...                 False, dx3)
    (array([2.]), array([4.]))
    """
    C = x3.shape[1]
    drivers = cpu.drivers_for(x3)
    grads = np.empty((2, C), x3.dtype)
    if gamma is None:
        gamma = _constant(C, 1.0, stats_dtype(x3.dtype))
    if beta is None:
        beta = _constant(C, 0.0, stats_dtype(x3.dtype))
    if drivers.small:
        cpu.small_backward_kernel(dy, x3, mean, invstd, gamma, beta, relu, dx, grads)
    else:
        shape = x3.shape
        drivers.backward(
            dy.reshape(shape),
            x3,
            drivers.chunk,
            mean,
            invstd,
            gamma,
            beta,
            relu,
            dx.reshape(shape),
            grads[0],
            grads[1],
        )
    return grads[0], grads[1]


def direct_frozen_backward(dy, x3, mean, invstd, gamma, beta, relu, dx):
    """The backward through fixed statistics of the direct path: ``dx`` written;
    returns ``(dgamma, dbeta)`` in the statistics dtype (the kernel of
    :func:`frozen_backward`, on the same views: bitwise its results). ``dy`` and ``dx``
    as in :func:`direct_backward`."""
    coef, invstd64, _ = _coefficients(x3, x3, mean, invstd, gamma, beta)
    s_dy, s_dyx = cpu.frozen_backward(dy.reshape(x3.shape), x3, coef, relu, dx.reshape(x3.shape))
    dtype = stats_dtype(x3.dtype)
    return (s_dyx * invstd64).astype(dtype, copy=False), s_dy.astype(dtype, copy=False)


def direct_mask(mask, x, axis, x3):
    """``mask`` as the masked direct path's kernels take it (flat: the ``(outer, inner)``
    positions in memory order); None when the call takes the general path.

    Qualifies: a plain C-contiguous boolean NumPy array of exactly x's shape without the
    channel axis (``x3`` from :func:`direct_view`, so x is C-contiguous: the mask's
    memory order is then that of the canonical view, and the view is what
    :func:`fastbn._checks.mask_layout` would copy). Broadcast masks and the rest take
    the general path, whose checks raise the errors.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.zeros((2, 3, 4))
    >>> direct_mask(np.eye(2, 4, dtype=bool), x, 1, x.reshape(2, 3, 4)).astype(int).tolist()
    [1, 0, 0, 0, 0, 1, 0, 0]
    >>> direct_mask(np.ones(4, bool), x, 1, x.reshape(2, 3, 4)) is None
    True
    """
    if type(mask) is not np.ndarray or mask.dtype is not BOOL or not mask.flags.c_contiguous:
        return None
    shape = x.shape
    if len(shape) == 2:  # the most common call: spare the tuple slices, as direct_view does
        if mask.shape != ((shape[0],) if axis % 2 else (shape[1],)):
            return None
        return mask
    axis %= len(shape)
    if mask.shape != shape[:axis] + shape[axis + 1 :]:
        return None
    return mask.reshape(-1)


def direct_masked_forward(x3, w, y, gamma, beta, eps, relu):
    """The masked training forward of the direct path (``w`` from :func:`direct_mask`):
    returns ``(y, mean, invstd)`` as :func:`direct_forward` does.

    A mask that is all True takes :func:`direct_forward` (as the general path takes the
    unmasked kernels); fewer than 2 True positions are the general path's ValueError,
    raised before ``y`` is written. Otherwise :func:`fastbn.cpu_masked.forward`, the
    general path's kernels in one dispatch, or for a small rows batch (one reduction
    chunk, ``x3.nbytes < SERIAL_BYTES <= CHUNK_BYTES``)
    :func:`fastbn.cpu_masked.small_forward_kernel`, which counts the mask itself and
    writes the statistics in their dtype: bitwise the general path's results (tested).
    """
    outer, C, inner = x3.shape
    dtype = stats_dtype(x3.dtype)
    if gamma is None:
        gamma = _constant(C, 1.0, dtype)
    if beta is None:
        beta = _constant(C, 0.0, dtype)
    if inner == 1 and x3.nbytes < _config.SERIAL_BYTES:
        stats = np.empty((2, C), x3.dtype)
        count = cpu_masked.small_forward_kernel(x3, w, eps, gamma, beta, relu, y, stats)
        if 2 <= count < outer:
            return y, stats[0], stats[1]
    else:
        count = np.count_nonzero(w)
    if count == outer * inner:
        return direct_forward(x3, y, gamma, beta, eps, relu)
    if count < 2:
        _checks.check_mask_count(count, outer * inner)
    stats = cpu_masked.forward(x3, w, count, gamma, beta, eps, relu, y.reshape(x3.shape))
    if x3.dtype is FLOAT64:
        return y, stats[0], stats[1]
    pair = stats[:2].astype(FLOAT32)
    return y, pair[0], pair[1]


def direct_masked_backward(dy3, x3, w, mean, invstd, gamma, beta, relu, dx3):
    """The masked backward of the direct path (``w`` from :func:`direct_mask`): ``dx3``
    written; returns ``(dgamma, dbeta)`` as :func:`direct_backward` does, which an
    all-True mask takes (as the general path does); fewer than 2 True positions are the
    general path's ValueError, raised before ``dx3`` is written. Bitwise the general
    path's results (tested).
    """
    outer, C, inner = x3.shape
    count = np.count_nonzero(w)
    if count == outer * inner:
        return direct_backward(dy3, x3, mean, invstd, gamma, beta, relu, dx3)
    if count < 2:
        _checks.check_mask_count(count, outer * inner)
    dtype = stats_dtype(x3.dtype)
    grads = np.empty((2, C), dtype)
    cpu_masked.backward(
        dy3,
        x3,
        w,
        count,
        mean,
        invstd,
        _constant(C, 1.0, dtype) if gamma is None else gamma,
        _constant(C, 0.0, dtype) if beta is None else beta,
        relu,
        dx3,
        grads,
    )
    return grads[0], grads[1]


def direct_residual(residual, x, x3):
    """``residual`` (z) viewed as ``x3`` when the direct path may take it: a C-contiguous
    NumPy array of x's shape and dtype; None otherwise (the general path checks it and
    lays it out in x's order).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.zeros((4, 3))
    >>> direct_residual(np.ones((4, 3)), x, x.reshape(4, 3, 1)).shape
    (4, 3, 1)
    >>> direct_residual(np.ones((3, 4)).T, x, x.reshape(4, 3, 1)) is None
    True
    """
    if (
        type(residual) is not np.ndarray
        or residual.shape != x.shape
        or residual.dtype is not x.dtype
        or not residual.flags.c_contiguous
    ):
        return None
    return residual.reshape(x3.shape)


def direct_residual_forward(x3, z3, y, gamma, beta, eps, relu):
    """The training forward of ``act(bn(x) + z)`` on the direct path (``z3`` from
    :func:`direct_residual`, ``y`` from :func:`direct_out`): returns ``(y, mean, invstd)``
    as :func:`direct_forward` does. The general path's kernels in its order (the
    statistics, then one normalizing pass that adds z): bitwise its results (tested).
    """
    mean, m2 = cpu.moments(x3)
    var = m2 / (x3.shape[0] * x3.shape[2])
    _normalize_view(x3, z3, y.reshape(x3.shape), mean, var, gamma, beta, eps, relu)
    dtype = stats_dtype(x3.dtype)
    return y, saved(mean, dtype), saved(1.0 / np.sqrt(var + eps), dtype)


def direct_residual_inference(x3, z3, y, running_mean, running_var, gamma, beta, eps, relu):
    """Inference of ``act(bn(x) + z)`` on the direct path (arguments as in
    :func:`direct_inference`, ``z3`` from :func:`direct_residual`); returns ``y``.
    Bitwise the general path's results (tested)."""
    mean = running_mean.astype(FLOAT64, copy=False)
    var = running_var.astype(FLOAT64, copy=False)
    _normalize_view(x3, z3, y.reshape(x3.shape), mean, var, gamma, beta, eps, relu)
    return y


def direct_residual_backward(dy, x3, z3, mean, invstd, gamma, beta, relu, dx):
    """The backward of ``act(bn(x) + z)`` on the direct path: returns
    ``(dgamma, dbeta, dz)``, ``dx`` written (arguments as in :func:`direct_backward`;
    ``z3`` from :func:`direct_residual`, read with ``relu`` only).

    As the general path: ``dz`` first (``dy`` zeroed where the recomputed ``bn(x) + z``
    is not positive with ``relu``, a copy of ``dy`` without), then the plain backward on
    it: bitwise its results (tested).
    """
    shape = x3.shape
    dy3 = dy.reshape(shape)
    coef, _, _ = _coefficients(x3, x3, mean, invstd, gamma, beta)
    dz = np.empty(dy.shape, x3.dtype)
    cpu.residual_grad(dy3, x3, z3 if relu else dy3, coef, relu, dz.reshape(shape))
    dgamma, dbeta = direct_backward(dz, x3, mean, invstd, gamma, beta, False, dx)
    return dgamma, dbeta, dz


# --------------------------------------------------------------------------------------
# Kernel calls
# --------------------------------------------------------------------------------------


def mask_view(mask, x, axis, v, st=None):
    """The mask (checked by :func:`fastbn._checks.check_mask`) as the kernels take it, and
    its count of True positions: see :func:`fastbn._checks.mask_layout` (flat and
    boolean here, as the direct path passes it: the kernels compile once for it)."""
    w, count = _checks.mask_layout(mask, x.shape, axis, v.order, v.x3.shape)
    return w.reshape(-1).view(np.bool_), count


def shard_moments(x, v, st=None, mask=None):
    """``(mean, M2)`` per channel of this array (float64); over the True positions of
    ``mask`` (from :func:`mask_view`) when given."""
    if mask is not None:
        return cpu_masked.moments(_compute_view(v, x.dtype), mask)
    return cpu.moments(_compute_view(v, x.dtype))


def forward(x, v, dest, gamma, beta, eps, relu, st, dtype, running=None):
    """The fused training forward: ``(mean, invstd, (mean64, var64))``; the first two in
    ``dtype`` (None when ``dtype`` is None). ``running`` is for backends that update on
    the device; here the caller updates from the returned float64 statistics."""
    x3 = _compute_view(v, x.dtype)
    C = x3.shape[1]
    mean, var, invstd = cpu.forward_training(
        x3, param(gamma, C, 1.0, x.dtype), param(beta, C, 0.0, x.dtype), eps, relu, dest.work
    )
    return saved(mean, dtype), saved(invstd, dtype), (mean, var)


def normalize(x, v, dest, mean, var, gamma, beta, eps, relu, st=None, residual=None):
    """``y`` from given float64 statistics (the batch's, or the global batch's); with
    ``residual`` (the view of z in x's order), ``act(bn(x) + z)`` in the same pass."""
    z3 = None if residual is None else _compute_view(residual, x.dtype)
    _normalize_view(_compute_view(v, x.dtype), z3, dest.work, mean, var, gamma, beta, eps, relu)


def _normalize_view(x3, z3, y3, mean, var, gamma, beta, eps, relu):
    """:func:`normalize` on the kernels' views: ``y3`` from ``x3`` (and ``z3``, or None)."""
    C = x3.shape[1]
    invstd = 1.0 / np.sqrt(var + eps)
    coef = cpu.coefficients(
        mean, invstd, param(gamma, C, 1.0, x3.dtype), param(beta, C, 0.0, x3.dtype), x3.dtype
    )
    if z3 is None:
        cpu.normalize(x3, coef, relu, y3)
    else:
        cpu.normalize_residual(x3, z3, coef, relu, y3)


def inference(
    x, v, dest, running_mean, running_var, gamma, beta, eps, relu, st=None, residual=None
):
    """``y`` from the running statistics (``residual``: as in :func:`normalize`)."""
    if residual is not None:
        mean = channel(running_mean).astype(FLOAT64, copy=False)
        var = channel(running_var).astype(FLOAT64, copy=False)
        normalize(x, v, dest, mean, var, gamma, beta, eps, relu, st, residual)
        return
    x3 = _compute_view(v, x.dtype)
    C = x3.shape[1]
    cpu.inference(
        x3,
        channel(running_mean),
        channel(running_var),
        param(gamma, C, 1.0, x.dtype),
        param(beta, C, 0.0, x.dtype),
        eps,
        relu,
        dest.work,
    )


def backward(x, v, dyv, dest, mean, invstd, gamma, beta, relu, st, grads):
    """dx into ``dest``; returns ``(dgamma, dbeta)`` in ``grads[1]`` (None, None without
    ``grads``)."""
    x3 = _compute_view(v, x.dtype)
    dy3 = _compute_view(dyv, x.dtype)
    C = x3.shape[1]
    dgamma, dbeta = cpu.backward(
        dy3,
        x3,
        channel(mean),
        channel(invstd),
        param(gamma, C, 1.0, x.dtype),
        param(beta, C, 0.0, x.dtype),
        relu,
        dest.work,
    )
    if grads is None:
        return None, None
    return dgamma.astype(grads[1], copy=False), dbeta.astype(grads[1], copy=False)


def residual_grad(x, v, dyv, zv, dest, mean, invstd, gamma, beta, relu, st=None):
    """The gradient of ``bn(x) + z`` in ``act(bn(x) + z)`` into ``dest``: ``dy``, masked
    with ``relu`` where the recomputed sum is not positive (``zv``: z's view in x's
    order; not read without ``relu``)."""
    x3 = _compute_view(v, x.dtype)
    dy3 = _compute_view(dyv, x.dtype)
    coef, _, _ = _coefficients(x3, x, mean, invstd, gamma, beta)
    z3 = _compute_view(zv, x.dtype) if relu else dy3
    cpu.residual_grad(dy3, x3, z3, coef, relu, dest.work)


def _coefficients(x3, x, mean, invstd, gamma, beta):
    C = x3.shape[1]
    g = param(gamma, C, 1.0, x.dtype)
    invstd64 = np.asarray(invstd, dtype=np.float64)
    coef = cpu.coefficients(channel(mean), invstd64, g, param(beta, C, 0.0, x.dtype), x3.dtype)
    return coef, invstd64, g


def shard_grad_sums(x, v, dyv, mean, invstd, gamma, beta, relu, st=None):
    """``(sum dy, sum dy * (x - mean))`` per channel of this array (float64)."""
    x3 = _compute_view(v, x.dtype)
    coef, _, _ = _coefficients(x3, x, mean, invstd, gamma, beta)
    return cpu.grad_sums(_compute_view(dyv, x.dtype), x3, coef, relu)


def input_grad(x, v, dyv, dest, mean, invstd, gamma, beta, relu, sums, count, st, grads, mask=None):
    """dx from sums over ``count`` values per channel (every rank's); returns
    ``(dgamma, dbeta)`` as :func:`backward` does. With ``mask`` (from :func:`mask_view`),
    ``count`` is the True positions' and only those carry the statistics' terms."""
    x3 = _compute_view(v, x.dtype)
    coef, invstd64, g = _coefficients(x3, x, mean, invstd, gamma, beta)
    s_dy, s_dyx = sums
    if x3.size:
        dy3 = _compute_view(dyv, x.dtype)
        rest = (coef, s_dy, s_dyx, count, invstd64, np.asarray(g, dtype=np.float64), relu)
        if mask is None:
            cpu.input_grad(dy3, x3, *rest, dest.work)
        else:
            cpu_masked.input_grad(dy3, x3, mask, *rest, dest.work)
    return _param_grads(s_dy, s_dyx, invstd64, grads)


def masked_backward(x, v, dyv, dest, mean, invstd, gamma, beta, relu, mask, count, st, grads):
    """The masked backward of one array (no ``comm``; ``mask`` from :func:`mask_view`):
    :func:`fastbn.cpu_masked.backward`, the direct path's kernels, fused per channel
    where the plan fuses the unmasked backward; returns ``(dgamma, dbeta)`` as
    :func:`backward` does."""
    x3 = _compute_view(v, x.dtype)
    C = x3.shape[1]
    sums = np.empty((2, C), FLOAT64 if grads is None else grads[1])
    cpu_masked.backward(
        _compute_view(dyv, x.dtype),
        x3,
        mask,
        count,
        channel(mean),
        channel(invstd),
        param(gamma, C, 1.0, x.dtype),
        param(beta, C, 0.0, x.dtype),
        relu,
        dest.work,
        sums,
    )
    if grads is None:
        return None, None
    return sums[0], sums[1]


def _param_grads(s_dy, s_dyx, invstd64, grads):
    """``(dgamma, dbeta) = (invstd * sum dy * (x - mean), sum dy)`` in ``grads``' dtype
    (see :func:`backward`), or ``(None, None)`` without ``grads``."""
    if grads is None:
        return None, None
    return (s_dyx * invstd64).astype(grads[1], copy=False), s_dy.astype(grads[1], copy=False)


def frozen_backward(x, v, dyv, dest, mean, invstd, gamma, beta, relu, st, grads):
    """The backward through fixed statistics: ``dx = gamma * invstd * dy`` into ``dest``
    and the parameter gradients, in one pass (:func:`fastbn.cpu.frozen_backward`);
    returns ``(dgamma, dbeta)`` as :func:`backward` does."""
    x3 = _compute_view(v, x.dtype)
    coef, invstd64, _ = _coefficients(x3, x, mean, invstd, gamma, beta)
    s_dy, s_dyx = cpu.frozen_backward(_compute_view(dyv, x.dtype), x3, coef, relu, dest.work)
    return _param_grads(s_dy, s_dyx, invstd64, grads)
