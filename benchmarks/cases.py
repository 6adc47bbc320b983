"""What the benchmarks run: shapes, operations, bytes moved, inputs and providers.

A *provider* turns an operation and a set of inputs into a no-argument callable that does
one call of the operation; the benchmark times that callable. Providers side by side:

``fastbn``
    The package, CPU kernels; it allocates its outputs, as the other providers do.
``numpy``
    The obvious vectorized NumPy implementation (``x.mean`` / ``x.var`` and broadcasting),
    written here and not in the package. NumPy's element-wise operations and reductions
    run on one thread, whatever the thread count.
``torch``
    PyTorch's CPU kernels through ``torch.nn.functional.batch_norm`` (forward, inference)
    and ``torch.ops.aten.native_batch_norm`` / ``native_batch_norm_backward`` (backward, and
    the forward whose saved statistics it needs): the same kernels autograd calls, without
    autograd's bookkeeping. NHWC input is handed to PyTorch as a ``channels_last`` tensor
    (a view of the same memory), which is PyTorch's own NHWC layout.

The GPU providers (``fastbn`` on Numba device arrays, ``torch`` through cuDNN) live in
:mod:`benchmarks.cuda_cases`.

Bytes moved
-----------
Counted in x-sized arrays, the traffic that a kernel needs at the least when the data does
not stay in cache between its passes (per-channel statistics and parameters, ``C`` values
each, are negligible and not counted):

=================  =====  ======  ===============================================
op                 reads  writes  why
=================  =====  ======  ===============================================
forward            2      1       pass 1 reads x (statistics); pass 2 reads x, writes y
inference          1      1       reads x, writes y
backward           4      1       pass 1 reads dy and x (dbeta, dgamma); pass 2 reads
                                  dy and x again and writes dx
forward_backward   6      2       the sum of the two
frozen_backward    2      1       through fixed (running) statistics: dx needs no
                                  sum, so one pass reads dy and x and writes dx while
                                  dbeta and dgamma accumulate
=================  =====  ======  ===============================================

A kernel that keeps a channel in cache between its passes can move fewer bytes than this
(its "fraction of copy bandwidth" can then exceed 100 %); every provider is measured with
the same byte count, so ratios between providers are ratios of times.

Headroom
--------
No kernel moves less than one read of each input and one write of each output
(:data:`MIN_TRAFFIC`): at the copy bandwidth, that is the shortest time any kernel could
take, whatever it keeps in cache. The report divides PyTorch's time by it: the speed-up
over PyTorch that no implementation can pass on the machine.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pytest

EPS = 1e-5

#: op -> (reads, writes) of x-sized arrays; see the module docstring.
TRAFFIC = {
    "forward": (2, 1),
    "inference": (1, 1),
    "backward": (4, 1),
    "forward_backward": (6, 2),
    "frozen_backward": (2, 1),
}

OPS = tuple(TRAFFIC)

#: op -> (reads, writes) of x-sized arrays that no kernel can go below: each input read
#: once, each output written once (forward_backward reads x and dy, writes y and dx).
MIN_TRAFFIC = {
    "forward": (1, 1),
    "inference": (1, 1),
    "backward": (2, 1),
    "forward_backward": (2, 2),
    "frozen_backward": (2, 1),
}


@dataclass(frozen=True)
class Case:
    """One input configuration.

    Attributes
    ----------
    layout : str
        ``"NCHW"``, ``"NHWC"`` or ``"NC"`` (2-D).
    shape : tuple of int
        Shape of x.
    axis : int
        The channel axis (``1`` for NCHW and 2-D, ``-1`` for NHWC).
    dtype : str
        ``"float32"`` or ``"float64"``.
    rounds : int
        Timed rounds of pytest-benchmark's ``pedantic``.
    iterations : int
        Calls per round (more than one only for calls too short for the timer).
    tag : str, optional
        Extra word in the id (``"small"``).
    """

    layout: str
    shape: tuple
    axis: int
    dtype: str
    rounds: int = 20
    iterations: int = 1
    tag: str = ""

    @property
    def id(self):
        """str: e.g. ``"NCHW-32x64x56x56-float32"``, used in test ids and the report."""
        prefix = f"{self.tag}-" if self.tag else ""
        return f"{prefix}{self.layout}-{'x'.join(map(str, self.shape))}-{self.dtype}"

    @property
    def channels(self):
        """int: the number of channels C."""
        return self.shape[self.axis]

    @property
    def nbytes(self):
        """int: bytes of one x-sized array."""
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


CPU_CASES = (
    Case("NCHW", (32, 64, 56, 56), 1, "float32"),
    Case("NCHW", (64, 256, 14, 14), 1, "float32"),
    Case("NCHW", (64, 256, 14, 14), 1, "float64"),
    Case("NHWC", (32, 56, 56, 64), -1, "float32"),
    Case("NC", (65536, 256), 1, "float32", rounds=15),
    Case("NC", (256, 64), 1, "float32", rounds=30, iterations=50, tag="small"),
)


def bytes_moved(op, nbytes, traffic=TRAFFIC):
    """Return the bytes an operation moves (see the module docstring).

    Parameters
    ----------
    op : str
        One of :data:`OPS`.
    nbytes : int
        Bytes of one x-sized array.
    traffic : dict, optional
        :data:`TRAFFIC` (default): two passes that find nothing in cache, the byte count
        of every GB/s figure. :data:`MIN_TRAFFIC`: the least any implementation moves.

    Returns
    -------
    int
        ``(reads + writes) * nbytes``.

    Examples
    --------
    >>> bytes_moved("backward", 100), bytes_moved("backward", 100, MIN_TRAFFIC)
    (500, 300)
    """
    reads, writes = traffic[op]
    return (reads + writes) * int(nbytes)


@dataclass
class Inputs:
    """The arrays of one case, shared by every provider.

    Attributes
    ----------
    case : Case
        The configuration.
    x, dy : numpy.ndarray
        Input and upstream gradient, shape ``case.shape``.
    gamma, beta, running_mean, running_var : numpy.ndarray
        Shape ``(C,)``, dtype of x.
    mean, invstd : numpy.ndarray
        Batch statistics of x, shape ``(C,)``: float64 for float64 x, float32 otherwise
        (the dtype fastbn's forward returns them in).
    running_invstd : numpy.ndarray
        ``1 / sqrt(running_var + eps)`` in that dtype: the fixed statistics of the
        frozen backward, with ``running_mean``.
    """

    case: Case
    x: np.ndarray
    dy: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    mean: np.ndarray
    invstd: np.ndarray
    running_invstd: np.ndarray


def reduce_axes(ndim, axis):
    """Return the axes a BatchNorm reduces over and the broadcast shape of its parameters.

    Parameters
    ----------
    ndim : int
        Number of dimensions of x.
    axis : int
        The channel axis, negative allowed.

    Returns
    -------
    axes : tuple of int
        Every axis but ``axis``.
    param_shape_of : callable
        ``param_shape_of(C)`` gives the shape that broadcasts a ``(C,)`` array against x.
    """
    axis = axis % ndim
    axes = tuple(i for i in range(ndim) if i != axis)

    def param_shape_of(channels):
        shape = [1] * ndim
        shape[axis] = channels
        return tuple(shape)

    return axes, param_shape_of


@functools.cache
def make_inputs(case):
    """Build (once per case and process) the random inputs of a case.

    Parameters
    ----------
    case : Case
        The configuration.

    Returns
    -------
    Inputs
        Normal random x and dy; gamma near 1, beta near 0; running statistics near the
        batch's. Seeded, so every provider and every run sees the same data.
    """
    rng = np.random.default_rng(20240605)
    dtype = np.dtype(case.dtype)
    channels = case.channels
    x = rng.standard_normal(case.shape, dtype=dtype)
    dy = rng.standard_normal(case.shape, dtype=dtype)
    gamma = (1 + 0.1 * rng.standard_normal(channels)).astype(dtype)
    beta = (0.1 * rng.standard_normal(channels)).astype(dtype)
    running_mean = (0.1 * rng.standard_normal(channels)).astype(dtype)
    running_var = (1 + 0.1 * rng.random(channels)).astype(dtype)
    axes, _ = reduce_axes(x.ndim, case.axis)
    stats_dtype = np.float64 if dtype == np.float64 else np.float32
    mean64 = x.mean(axis=axes, dtype=np.float64)
    var64 = x.var(axis=axes, dtype=np.float64)
    return Inputs(
        case=case,
        x=x,
        dy=dy,
        gamma=gamma,
        beta=beta,
        running_mean=running_mean,
        running_var=running_var,
        mean=mean64.astype(stats_dtype),
        invstd=(1 / np.sqrt(var64 + EPS)).astype(stats_dtype),
        running_invstd=(1 / np.sqrt(running_var.astype(np.float64) + EPS)).astype(stats_dtype),
    )


# ----------------------------------------------------------------------------- numpy


def numpy_forward(x, gamma, beta, axis, eps=EPS):
    """BatchNorm forward (training) the obvious NumPy way.

    Parameters
    ----------
    x : numpy.ndarray
        Input.
    gamma, beta : numpy.ndarray
        Scale and shift, shape ``(C,)``.
    axis : int
        Channel axis.
    eps : float, optional
        Added to the variance.

    Returns
    -------
    y : numpy.ndarray
        Normalized, scaled and shifted x.
    mean, invstd : numpy.ndarray
        Batch statistics, shape ``(C,)``.
    """
    axes, param_shape_of = reduce_axes(x.ndim, axis)
    shape = param_shape_of(x.shape[axis])
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    invstd = 1 / np.sqrt(var + eps)
    y = (x - mean) * (invstd * gamma.reshape(shape)) + beta.reshape(shape)
    return y, mean.reshape(-1), invstd.reshape(-1)


def numpy_inference(x, running_mean, running_var, gamma, beta, axis, eps=EPS):
    """BatchNorm inference (running statistics) the obvious NumPy way.

    Parameters
    ----------
    x : numpy.ndarray
        Input.
    running_mean, running_var, gamma, beta : numpy.ndarray
        Shape ``(C,)``.
    axis : int
        Channel axis.
    eps : float, optional
        Added to the variance.

    Returns
    -------
    numpy.ndarray
        ``x * scale + shift`` with per-channel ``scale``, ``shift``.
    """
    _, param_shape_of = reduce_axes(x.ndim, axis)
    shape = param_shape_of(x.shape[axis])
    scale = gamma / np.sqrt(running_var + eps)
    shift = beta - running_mean * scale
    return x * scale.reshape(shape) + shift.reshape(shape)


def numpy_backward(dy, x, mean, invstd, gamma, axis):
    """BatchNorm backward (training statistics) the obvious NumPy way.

    Parameters
    ----------
    dy, x : numpy.ndarray
        Upstream gradient and the forward's input.
    mean, invstd : numpy.ndarray
        The forward's batch statistics, shape ``(C,)``.
    gamma : numpy.ndarray
        Scale, shape ``(C,)``.
    axis : int
        Channel axis.

    Returns
    -------
    dx : numpy.ndarray
        Gradient of x.
    dgamma, dbeta : numpy.ndarray
        Gradients of gamma and beta, shape ``(C,)``.
    """
    axes, param_shape_of = reduce_axes(x.ndim, axis)
    shape = param_shape_of(x.shape[axis])
    count = x.size // x.shape[axis]
    invstd = invstd.reshape(shape)
    xhat = (x - mean.reshape(shape)) * invstd
    dbeta = dy.sum(axis=axes, keepdims=True)
    dgamma = (dy * xhat).sum(axis=axes, keepdims=True)
    dx = (gamma.reshape(shape) * invstd / count) * (count * dy - dbeta - xhat * dgamma)
    return dx, dgamma.reshape(-1), dbeta.reshape(-1)


def numpy_frozen_backward(dy, x, mean, invstd, gamma, axis):
    """BatchNorm backward through fixed (running) statistics the obvious NumPy way.

    Parameters
    ----------
    dy, x : numpy.ndarray
        Upstream gradient and the forward's input.
    mean, invstd : numpy.ndarray
        The fixed statistics, shape ``(C,)``.
    gamma : numpy.ndarray
        Scale, shape ``(C,)``.
    axis : int
        Channel axis.

    Returns
    -------
    dx : numpy.ndarray
        ``gamma * invstd * dy``.
    dgamma, dbeta : numpy.ndarray
        ``sum(dy * xhat)`` and ``sum(dy)``, shape ``(C,)``.
    """
    axes, param_shape_of = reduce_axes(x.ndim, axis)
    shape = param_shape_of(x.shape[axis])
    invstd = invstd.reshape(shape)
    dx = dy * (gamma.reshape(shape) * invstd)
    dgamma = (dy * ((x - mean.reshape(shape)) * invstd)).sum(axis=axes)
    return dx, dgamma, dy.sum(axis=axes)


def numpy_provider(op, inputs):
    """Return a no-argument callable doing one NumPy call of ``op``.

    Parameters
    ----------
    op : str
        One of :data:`OPS`.
    inputs : Inputs
        The arrays.

    Returns
    -------
    callable
        The timed call.
    """
    d, axis = inputs, inputs.case.axis
    if op == "forward":
        return lambda: numpy_forward(d.x, d.gamma, d.beta, axis)
    if op == "inference":
        return lambda: numpy_inference(d.x, d.running_mean, d.running_var, d.gamma, d.beta, axis)
    if op == "backward":
        return lambda: numpy_backward(d.dy, d.x, d.mean, d.invstd, d.gamma, axis)
    if op == "frozen_backward":
        return lambda: numpy_frozen_backward(
            d.dy, d.x, d.running_mean, d.running_invstd, d.gamma, axis
        )

    def forward_backward():
        _, mean, invstd = numpy_forward(d.x, d.gamma, d.beta, axis)
        return numpy_backward(d.dy, d.x, mean, invstd, d.gamma, axis)

    return forward_backward


# ----------------------------------------------------------------------------- torch


def torch_channels_at_1(torch, array, axis):
    """Wrap a NumPy array as a torch tensor with the channel axis at position 1.

    Parameters
    ----------
    torch : module
        The imported ``torch``.
    array : numpy.ndarray
        The data; shared, not copied.
    axis : int
        Its channel axis.

    Returns
    -------
    torch.Tensor
        A view: NHWC data becomes a ``channels_last`` NCHW tensor, PyTorch's NHWC layout.
    """
    return torch.from_numpy(array).movedim(axis % array.ndim, 1)


def torch_provider(op, inputs):
    """Return a no-argument callable doing one PyTorch (CPU) call of ``op``.

    Parameters
    ----------
    op : str
        One of :data:`OPS`.
    inputs : Inputs
        The arrays.

    Returns
    -------
    callable
        The timed call. Skips the test when PyTorch is not installed.
    """
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    d, axis = inputs, inputs.case.axis
    x = torch_channels_at_1(torch, d.x, axis)
    dy = torch_channels_at_1(torch, d.dy, axis)
    weight, bias = torch.from_numpy(d.gamma), torch.from_numpy(d.beta)
    running_mean, running_var = torch.from_numpy(d.running_mean), torch.from_numpy(d.running_var)
    native_forward = torch.ops.aten.native_batch_norm
    native_backward = torch.ops.aten.native_batch_norm_backward
    mask = [True, True, True]
    if op == "forward":
        return lambda: functional.batch_norm(x, None, None, weight, bias, training=True, eps=EPS)
    if op == "inference":
        return lambda: functional.batch_norm(
            x, running_mean, running_var, weight, bias, training=False, eps=EPS
        )
    if op == "backward":
        _, save_mean, save_invstd = native_forward(x, weight, bias, None, None, True, 0.1, EPS)
        return lambda: native_backward(
            dy, x, weight, None, None, save_mean, save_invstd, True, EPS, mask
        )
    if op == "frozen_backward":  # PyTorch's eval-mode backward (train=False)
        return lambda: native_backward(
            dy, x, weight, running_mean, running_var, None, None, False, EPS, mask
        )

    def forward_backward():
        _, save_mean, save_invstd = native_forward(x, weight, bias, None, None, True, 0.1, EPS)
        return native_backward(dy, x, weight, None, None, save_mean, save_invstd, True, EPS, mask)

    return forward_backward


def torch_native_provider(op, inputs):
    """:func:`torch_provider` with PyTorch's own kernels for every op: the forward and
    inference through ``torch.ops.aten.native_batch_norm`` too, no Python wrapper (the
    yardstick of the small-call target: what PyTorch's dispatcher costs, without
    ``torch.nn.functional``'s Python checks).

    Parameters
    ----------
    op : str
        One of :data:`OPS`.
    inputs : Inputs
        The arrays.

    Returns
    -------
    callable
        The timed call.
    """
    torch = pytest.importorskip("torch")
    d, axis = inputs, inputs.case.axis
    x = torch_channels_at_1(torch, d.x, axis)
    weight, bias = torch.from_numpy(d.gamma), torch.from_numpy(d.beta)
    running_mean, running_var = torch.from_numpy(d.running_mean), torch.from_numpy(d.running_var)
    native_forward = torch.ops.aten.native_batch_norm
    if op == "forward":
        return lambda: native_forward(x, weight, bias, None, None, True, 0.1, EPS)
    if op == "inference":
        return lambda: native_forward(x, weight, bias, running_mean, running_var, False, 0.1, EPS)
    return torch_provider(op, inputs)


# ----------------------------------------------------------------------------- fastbn


def import_fastbn():
    """Import fastbn, or skip the test when its API is not there.

    Returns
    -------
    module
        ``fastbn`` with ``batch_norm_forward`` and friends.
    """
    try:
        import fastbn
    except ImportError as exc:  # pragma: no cover - depends on the checkout
        pytest.skip(f"fastbn cannot be imported: {exc}")
    if not hasattr(fastbn, "batch_norm_forward"):
        pytest.skip("fastbn has no batch_norm_forward yet")
    return fastbn


def fastbn_provider(op, inputs):
    """Return a no-argument callable doing one fastbn (CPU) call of ``op``.

    Parameters
    ----------
    op : str
        One of :data:`OPS`.
    inputs : Inputs
        The arrays.

    Returns
    -------
    callable
        The timed call. It allocates its x-sized output (``y`` or ``dx``), as the NumPy
        and PyTorch calls do (``out=`` would spare fastbn an allocation the others pay).
        Backward gets gamma and beta, so it returns dgamma and dbeta, as the NumPy and
        PyTorch providers do.
    """
    fastbn = import_fastbn()
    d, axis = inputs, inputs.case.axis
    if op == "forward":
        return lambda: fastbn.batch_norm_forward(d.x, d.gamma, d.beta, axis=axis, eps=EPS)
    if op == "inference":
        return lambda: fastbn.batch_norm_inference(
            d.x, d.running_mean, d.running_var, d.gamma, d.beta, axis=axis, eps=EPS
        )
    if op == "backward":
        return lambda: fastbn.batch_norm_backward(
            d.dy, d.x, d.mean, d.invstd, d.gamma, d.beta, axis=axis
        )
    if op == "frozen_backward":
        return lambda: fastbn.batch_norm_backward(
            d.dy, d.x, d.running_mean, d.running_invstd, d.gamma, d.beta, axis=axis, training=False
        )

    def forward_backward():
        _, mean, invstd = fastbn.batch_norm_forward(d.x, d.gamma, d.beta, axis=axis, eps=EPS)
        return fastbn.batch_norm_backward(d.dy, d.x, mean, invstd, d.gamma, d.beta, axis=axis)

    return forward_backward


CPU_PROVIDERS = {
    "fastbn": fastbn_provider,
    "torch": torch_provider,
    "numpy": numpy_provider,
}
