"""Argument checks and the canonical ``(outer, C, inner)`` view.

Every public function checks all of its arguments here *before* anything is written, so
a call that raises leaves ``out``, running statistics and layer state as they were.
The checks look only at ``shape``, ``dtype`` and ``ndim``, so they serve NumPy and CUDA
arrays alike.
"""

import math
import numbers
from typing import NamedTuple

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
ACTIVATIONS = (None, "relu")


def is_cuda_array(a):
    """True when ``a`` lives on a CUDA device (it has ``__cuda_array_interface__``).

    Examples
    --------
    >>> import numpy as np
    >>> is_cuda_array(np.zeros(3))
    False
    """
    if type(a) is np.ndarray:  # the common case, without an attribute look-up that fails
        return False
    if hasattr(a, "__cuda_array_interface__"):
        return True
    # Device arrays of Numba's CUDA simulator have no interface of their own until
    # fastbn.cuda gives them one; recognize them by their type.
    return type(a).__name__ == "FakeCUDAArray" and type(a).__module__.startswith("numba")


def check_input(name, x, min_ndim=2):
    """Check that ``x`` is a float16/32/64 array with at least ``min_ndim`` dimensions.

    Parameters
    ----------
    name : str
        Argument name for messages.
    x : array
        Anything with ``shape`` and ``dtype``.
    min_ndim : int, optional

    Returns
    -------
    numpy.dtype

    Raises
    ------
    TypeError
        Not float16, float32 or float64.
    ValueError
        Fewer than ``min_ndim`` dimensions.

    Examples
    --------
    >>> import numpy as np
    >>> check_input("x", np.zeros((2, 3), np.float32))
    dtype('float32')
    """
    if x is None:
        raise TypeError(f"{name} must be an array, got None")
    check_not_masked(name, x)
    dtype = x.dtype
    if not isinstance(dtype, np.dtype):
        dtype = np.dtype(dtype)
    if dtype.char not in "efd" or dtype.kind != "f":
        raise TypeError(f"{name} must be float16, float32 or float64, got dtype {dtype}")
    if len(x.shape) < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions (batch and "
            f"channel), got shape {tuple(x.shape)}"
        )
    return dtype


def check_not_masked(name, a):
    """Refuse a ``numpy.ma`` masked array: its mask would be silently dropped.

    Examples
    --------
    >>> import numpy as np
    >>> check_not_masked("x", np.zeros(3))
    """
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(
            f"{name} must be a plain array, got a numpy.ma.MaskedArray, whose mask "
            f"{name} cannot take (masked statistics take x as a masked array, or "
            f"mask=, in training); pass {name}.filled(value) or {name}.data to drop "
            f"the mask explicitly"
        )


def normalize_axis(axis, ndim):
    """Return ``axis`` as a non-negative index into ``ndim`` dimensions.

    Parameters
    ----------
    axis : int
    ndim : int

    Returns
    -------
    int

    Examples
    --------
    >>> normalize_axis(-1, 4)
    3
    """
    if type(axis) is int and -ndim <= axis < ndim:  # the common case
        return axis % ndim
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis must be in [-{ndim}, {ndim - 1}] for an array of {ndim} dimensions, got {axis}"
        )
    return int(axis) % ndim


def _real(name, value, expected):
    """``value`` as a float when it is a real number (not bool, str or bytes), else TypeError.

    Accepts Python and NumPy ints and floats and 0-d numeric arrays (a PyTorch or NumPy
    scalar); anything else, booleans included, is a TypeError naming ``name``.
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be {expected}, got a bool ({value!r})")
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "__array__") and not isinstance(value, (str, bytes)):
        try:  # a 0-d NumPy array, a PyTorch scalar tensor (state dicts hold those)
            a = np.asarray(value)
        except Exception:  # noqa: BLE001 - not convertible: the TypeError below
            a = None
        if a is not None and a.ndim == 0 and a.dtype.kind in "fiu":
            return float(a)
    raise TypeError(f"{name} must be {expected}, got {type(value).__name__} ({value!r})")


def check_eps(eps):
    """Check that ``eps`` is a finite number > 0 and return it as a float.

    Raises
    ------
    TypeError
        Not a real number (a str, bytes or bool is refused, not converted).
    ValueError
        Not finite or not > 0.

    Examples
    --------
    >>> check_eps(1e-5)
    1e-05
    """
    if type(eps) is float and 0.0 < eps < math.inf:  # the common case
        return eps
    value = _real("eps", eps, "a number > 0")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"eps must be a finite number > 0, got {eps}")
    return value


def check_momentum(momentum, allow_none=True, name="momentum"):
    """Check that ``momentum`` is in [0, 1] (or None for a cumulative average); ``name``
    is the argument's name in messages.

    Raises
    ------
    TypeError
        Not a real number (a str, bytes or bool is refused, not converted).
    ValueError
        Outside [0, 1] (NaN included).

    Examples
    --------
    >>> check_momentum(0.1)
    0.1
    """
    if momentum is None and allow_none:
        return None
    value = _real(name, momentum, "a number in [0, 1]" + (" or None" if allow_none else ""))
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {momentum}")
    return value


def check_num_batches_tracked(n, name="num_batches_tracked"):
    """Check a batch count: an integer >= 0 (an integral float is accepted); return an int.

    Examples
    --------
    >>> check_num_batches_tracked(3.0)
    3
    """
    value = _real(name, n, "an integer >= 0")
    if not (math.isfinite(value) and value == int(value) and value >= 0):
        raise ValueError(f"{name} must be an integer >= 0, got {n!r}")
    return int(n) if isinstance(n, (int, np.integer)) else int(value)


def check_flag(name, value):
    """``value`` as a bool: a Python or NumPy bool, else a TypeError naming ``name``.

    Examples
    --------
    >>> import numpy as np
    >>> check_flag("training", np.False_)
    False
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")


def check_activation(activation):
    """Check that ``activation`` is None or ``"relu"``; return whether it is ReLU.

    Examples
    --------
    >>> check_activation("relu")
    True
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return activation == "relu"


def check_running_stats(running_mean, running_var, C, axis, when):
    """Check the running statistics that an inference normalizes with: both given
    (``when`` ends the message: why they are needed), each a float array of shape
    ``(C,)`` (:func:`check_channel_param`).

    Raises
    ------
    ValueError
        Either is None, or a wrong shape.
    TypeError
        Not a float array.
    """
    if running_mean is None or running_var is None:
        raise ValueError(f"running_mean and running_var are required {when}")
    check_channel_param("running_mean", running_mean, C, axis)
    check_channel_param("running_var", running_var, C, axis)


def check_channel_param(name, p, C, axis):
    """Check a per-channel parameter: a float array of shape ``(C,)``.

    Parameters
    ----------
    name : str
    p : array or None
    C : int
        Number of channels.
    axis : int
        The channel axis (for the message).

    Raises
    ------
    TypeError
        Not a float array.
    ValueError
        Shape is not ``(C,)``.

    Examples
    --------
    >>> import numpy as np
    >>> check_channel_param("gamma", np.ones(3), 3, 1)
    """
    if p is None or (type(p) is np.ndarray and p.shape == (C,) and p.dtype.kind == "f"):
        return  # the common case, decided without building a message
    check_not_masked(name, p)
    if not hasattr(p, "dtype") or not hasattr(p, "shape"):
        raise TypeError(f"{name} must be an array of shape ({C},), got {type(p).__name__}")
    if np.dtype(p.dtype).kind != "f":
        raise TypeError(f"{name} must be a float array, got dtype {np.dtype(p.dtype)}")
    if tuple(p.shape) != (C,):
        raise ValueError(
            f"{name} must have shape ({C},) to match x.shape[{axis}], got {tuple(p.shape)}"
        )


def check_running(name, p, C, axis):
    """Check a running statistic updated in place: writable float array of shape ``(C,)``.

    Examples
    --------
    >>> import numpy as np
    >>> check_running("running_mean", np.zeros(4), 4, 1)
    """
    check_channel_param(name, p, C, axis)
    flags = getattr(p, "flags", None)
    if flags is not None and not flags.writeable:
        raise ValueError(f"{name} must be writable: it is updated in place")
    check_no_self_overlap(name, p)


def check_no_self_overlap(name, a):
    """Refuse a destination with a stride of 0 on an axis of length > 1 (an
    ``as_strided`` view, a PyTorch ``expand``): several results would be one element,
    the last written winning (PyTorch refuses such an ``out`` too). Other strides are
    taken as they are (as PyTorch does, which calls a finer test too hard).

    Examples
    --------
    >>> import numpy as np
    >>> check_no_self_overlap("out", np.zeros((0, 3)))  # NumPy's strides of 0: empty
    >>> rows = np.lib.stride_tricks.as_strided(np.zeros(3), (2, 3), (0, 8))  # one row
    >>> check_no_self_overlap("out", rows)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: out must not overlap itself: a stride of 0 on an axis of length > 1 ...
    """
    strides = getattr(a, "strides", None)
    if strides is None or 0 not in strides:
        return
    shape = tuple(a.shape)
    if any(s == 0 and n > 1 for s, n in zip(strides, shape)) and 0 not in shape:
        raise ValueError(
            f"{name} must not overlap itself: a stride of 0 on an axis of length > 1 "
            f"(shape {shape}, strides {tuple(strides)}) would make several results one "
            f"element"
        )


def check_out(name, out, shape, dtype):
    """Check a preallocated output: same shape and dtype as the result.

    Examples
    --------
    >>> import numpy as np
    >>> check_out("out", np.empty((2, 3)), (2, 3), np.dtype(np.float64))
    """
    if out is None:
        return
    if (
        type(out) is np.ndarray
        and out.shape == shape
        and out.dtype == dtype
        and out.flags.writeable
        and 0 not in out.strides
    ):
        return  # the common case
    check_not_masked(name, out)
    if not hasattr(out, "shape") or not hasattr(out, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if np.dtype(out.dtype).newbyteorder("=") != np.dtype(dtype).newbyteorder("="):
        # any byte order: the result is written into out as out stores it
        raise ValueError(f"{name} must have dtype {dtype}, got {np.dtype(out.dtype)}")
    flags = getattr(out, "flags", None)
    if flags is not None and not flags.writeable:
        raise ValueError(f"{name} must be writable")
    check_no_self_overlap(name, out)


def check_residual(residual, shape, dtype):
    """Check ``residual=`` (z of ``act(bn(x) + z)``): x's shape and dtype, any layout.

    Parameters
    ----------
    residual : array or None
        Anything with ``shape`` and ``dtype`` (None: nothing to check).
    shape : tuple of int
    dtype : numpy.dtype
        x's shape and dtype.

    Raises
    ------
    TypeError
        Not a float16, float32 or float64 array.
    ValueError
        Another shape or dtype than x's.

    Examples
    --------
    >>> import numpy as np
    >>> check_residual(np.zeros((2, 3)).T, (3, 2), np.dtype(np.float64))
    """
    if residual is None:
        return
    if not hasattr(residual, "shape") or not hasattr(residual, "dtype"):
        raise TypeError(f"residual must be an array, got {type(residual).__name__}")
    got = check_input("residual", residual, min_ndim=0)
    if tuple(residual.shape) != tuple(shape):
        raise ValueError(
            f"residual must have the shape of x {tuple(shape)}, got {tuple(residual.shape)}"
        )
    if got.newbyteorder("=") != np.dtype(dtype).newbyteorder("="):
        raise ValueError(f"residual must have the dtype of x ({dtype}), got {got}")


def check_batch(shape, axis, training):
    """Check that a batch has enough values per channel; return ``(C, m)``.

    One value per channel is an error in training; none (an empty batch) is not.

    Parameters
    ----------
    shape : tuple of int
    axis : int
        Non-negative channel axis.
    training : bool
        Training needs at least 2 values per channel.

    Returns
    -------
    tuple of int
        Channels and values per channel.

    Examples
    --------
    >>> check_batch((8, 3, 5), 1, True)
    (3, 40)
    """
    C = shape[axis]
    m = math.prod(shape) // C if C else 0
    if training and C:
        # An empty batch (m == 0) is not an error: like PyTorch, training on it gives an
        # empty output and leaves the running statistics untouched.
        if m == 1:
            raise ValueError(
                f"training needs more than 1 value per channel, got x of shape "
                f"{tuple(shape)} (1 value per channel along axis {axis})"
            )
    return C, m


def check_mask(mask, shape, axis):
    """Check ``mask=``: a boolean array of x's shape without the channel axis, or of a
    shape that NumPy broadcasts to it; returns that shape.

    Parameters
    ----------
    mask : array or None
    shape : tuple of int
        x's shape.
    axis : int
        Non-negative channel axis.

    Raises
    ------
    TypeError
        Not an array, or not of a boolean dtype.
    ValueError
        A shape that does not broadcast to x's shape without the channel axis.

    Examples
    --------
    >>> import numpy as np
    >>> check_mask(np.ones((8, 5), bool), (8, 3, 5), 1)
    (8, 5)
    >>> check_mask(np.ones(5, bool), (8, 3, 5), 1)
    (8, 5)
    """
    shape = tuple(shape)
    reduced = shape[:axis] + shape[axis + 1 :]
    if mask is None:
        return reduced
    check_not_masked("mask", mask)
    if not hasattr(mask, "dtype") or not hasattr(mask, "shape"):
        raise TypeError(
            f"mask must be a boolean array of shape {reduced}, got {type(mask).__name__}"
        )
    dtype = np.dtype(mask.dtype)
    if dtype.kind != "b":
        raise TypeError(
            f"mask must be a boolean array (True: the position enters the statistics), "
            f"got dtype {dtype}"
        )
    try:
        fits = np.broadcast_shapes(tuple(mask.shape), reduced) == reduced
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"mask must have x's shape without the channel axis {reduced} (axis {axis} of "
            f"x of shape {shape}), or a shape that broadcasts to it, got {tuple(mask.shape)}"
        )
    return reduced


def check_mask_count(count, m):
    """Masked training needs more than 1 True position (when the batch is not empty).

    Parameters
    ----------
    count : int
        True positions of the mask (values per channel that enter the statistics).
    m : int
        Values per channel.

    Examples
    --------
    >>> check_mask_count(2, 10)
    """
    if m and count < 2:
        raise ValueError(
            f"training needs more than 1 value per channel, got {count} True position(s) "
            f"in mask (of {m} values per channel)"
        )


def mask_layout(mask, shape, axis, order, shape3):
    """A checked host mask as the kernels read it: broadcast to x's shape without the
    channel axis, laid out in x's memory ``order`` (that of its canonical view) as a
    C-contiguous ``(outer, inner)`` uint8 array; and its count of True positions.

    Parameters
    ----------
    mask : ndarray of bool
    shape : tuple of int
        x's shape.
    axis : int
        Non-negative channel axis.
    order : tuple of int
        The memory order of x's canonical view.
    shape3 : tuple of int
        ``(outer, C, inner)``.

    Examples
    --------
    >>> import numpy as np
    >>> w, count = mask_layout(np.array([True, False, True]), (2, 4, 3), 1, (0, 1, 2), (2, 4, 3))
    >>> w.tolist(), count
    ([[1, 0, 1], [1, 0, 1]], 4)
    """
    reduced = tuple(shape[:axis]) + tuple(shape[axis + 1 :])
    full = np.expand_dims(np.broadcast_to(mask, reduced), axis)
    if tuple(order) != _identity(len(shape)):
        full = full.transpose(order)
    w = np.ascontiguousarray(full).reshape(shape3[0], shape3[2]).view(np.uint8)
    return w, int(np.count_nonzero(w))


def check_backward_args(dy, x, mean, invstd, gamma, beta, axis, out, activation):
    """Checks shared by every backward (host and GPU); returns ``(dtype, axis, C, relu)``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.zeros((4, 3), np.float32)
    >>> check_backward_args(x, x, np.zeros(3), np.ones(3), None, None, 1, None, None)
    (dtype('float32'), 1, 3, False)
    """
    dtype = check_input("x", x)
    check_input("dy", dy)
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"dy must have the shape of x {tuple(x.shape)}, got {tuple(dy.shape)}")
    if dy.dtype != x.dtype:
        raise ValueError(f"dy must have the dtype of x ({dtype}), got {dy.dtype}")
    axis = normalize_axis(axis, len(x.shape))
    C = x.shape[axis]
    for name, p in (("mean", mean), ("invstd", invstd), ("gamma", gamma), ("beta", beta)):
        check_channel_param(name, p, C, axis)
    if mean is None or invstd is None:
        raise TypeError(
            "mean and invstd are required: pass the statistics returned by batch_norm_forward"
        )
    check_out("out", out, x.shape, dtype)
    return dtype, axis, C, check_activation(activation)


class View(NamedTuple):
    """An array seen as ``(outer, C, inner)`` with the channel in the middle.

    Attributes
    ----------
    x3 : ndarray
        C-contiguous ``(outer, C, inner)`` view (or copy, for non-contiguous input).
    order : tuple of int
        Axes of the original array in memory order: ``x.transpose(order)`` is what ``x3``
        reshapes.
    shape_t : tuple of int
        ``x.transpose(order).shape``.
    """

    x3: np.ndarray
    order: tuple
    shape_t: tuple


_IDENTITY = tuple(tuple(range(n)) for n in range(9))


def _identity(ndim):
    """The identity axis order ``(0, 1, ..., ndim - 1)`` (prebuilt up to 8 dimensions)."""
    return _IDENTITY[ndim] if ndim < len(_IDENTITY) else tuple(range(ndim))


def memory_order(a):
    """Axes of ``a`` from the slowest to the fastest in memory, or None.

    Returns an ``order`` such that ``a.transpose(order)`` is C-contiguous, or None when no
    permutation of ``a`` is contiguous (a sliced view with gaps, negative strides).

    Examples
    --------
    >>> import numpy as np
    >>> memory_order(np.zeros((2, 3, 4)).transpose(0, 2, 1))
    (0, 2, 1)
    >>> memory_order(np.zeros((4, 6))[:, ::2]) is None
    True
    """
    if a.flags.c_contiguous:
        return tuple(range(a.ndim))
    if a.flags.f_contiguous:
        return tuple(range(a.ndim - 1, -1, -1))
    order = tuple(sorted(range(a.ndim), key=lambda d: -a.strides[d]))
    return order if a.transpose(order).flags.c_contiguous else None


def canonical_view(x, axis, order=None):
    """View ``x`` as a C-contiguous ``(outer, C, inner)`` array, copying only when needed.

    Any array that is a permutation of a contiguous block (C order, Fortran order, NHWC,
    transposes) is viewed without a copy; other strided arrays are copied once.

    Parameters
    ----------
    x : ndarray
    axis : int
        Non-negative channel axis of ``x``.
    order : tuple of int, optional
        Use this memory order (from another array's view) instead of ``x``'s own; ``x`` is
        copied into it when it does not match.

    Returns
    -------
    View

    Examples
    --------
    >>> import numpy as np
    >>> canonical_view(np.zeros((2, 3, 4, 5)), 1).x3.shape
    (2, 3, 20)
    >>> canonical_view(np.zeros((2, 4, 5, 3)), 3).x3.shape
    (40, 3, 1)
    """
    if order is None and x.flags.c_contiguous:  # the common case, in a few operations
        shape = x.shape
        return View(
            x.reshape(math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])),
            _identity(len(shape)),
            shape,
        )
    if order is None:
        order = memory_order(x)
        if order is None:
            x = np.ascontiguousarray(x)
            order = tuple(range(x.ndim))
    if order == _identity(x.ndim):  # the common case: no view to make
        xt = x if x.flags.c_contiguous else np.ascontiguousarray(x)
    else:
        xt = x.transpose(order)
        if not xt.flags.c_contiguous:
            xt = np.ascontiguousarray(xt)
    p = order.index(axis)
    shape_t = xt.shape
    outer = math.prod(shape_t[:p])
    inner = math.prod(shape_t[p + 1 :])
    return View(xt.reshape(outer, shape_t[p], inner), order, shape_t)


def restore_layout(a3, view):
    """Give a ``(outer, C, inner)`` result the shape and memory layout of the input.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.zeros((2, 4, 3)).transpose(0, 2, 1)
    >>> v = canonical_view(x, 1)
    >>> restore_layout(v.x3, v).shape
    (2, 3, 4)
    """
    a = a3.reshape(view.shape_t)
    if view.order == _identity(a.ndim):
        return a
    return a.transpose(tuple(np.argsort(view.order)))


def direct_output(out, view, inputs=()):
    """``out`` as a C-contiguous ``(outer, C, inner)`` view in ``view``'s order, or None.

    None when ``out`` has another layout or overlaps an input without coinciding with
    it element for element; the caller then computes into a temporary and copies into
    ``out`` at the end.

    Parameters
    ----------
    out : ndarray
    view : View
        The input's canonical view.
    inputs : tuple of ndarray, optional
        Other ``(outer, C, inner)`` inputs of the kernel (``dy`` for backward).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.zeros((2, 3, 4))
    >>> direct_output(np.empty_like(x), canonical_view(x, 1)).shape
    (2, 3, 4)
    """
    out_t = out if view.order == _identity(out.ndim) else out.transpose(view.order)
    if not out_t.flags.c_contiguous:
        return None
    out3 = out_t.reshape(view.x3.shape)
    for a in (view.x3,) + tuple(inputs):
        if np.may_share_memory(out3, a) and not (
            out3.ctypes.data == a.ctypes.data and out3.strides == a.strides
        ):
            return None
    return out3
