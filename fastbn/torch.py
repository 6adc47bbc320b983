"""fastbn for PyTorch users: an autograd-aware ``batch_norm`` and drop-in BatchNorm modules.

``import fastbn.torch`` (torch installed; ``import fastbn`` alone never imports torch):

- :func:`batch_norm`: ``torch.nn.functional.batch_norm``'s signature and semantics, a
  :class:`torch.autograd.Function` with gradients for ``input``, ``weight`` and ``bias``
  in training (batch statistics) and in eval mode (frozen statistics);
- :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`: subclasses of
  ``torch.nn.BatchNorm*d`` (same constructor, parameters, buffers and state_dict keys)
  whose forward runs fastbn's kernels;
- :func:`convert`: every ``torch.nn.BatchNorm*d`` of a model replaced by fastbn's, with
  the same state.

CPU tensors run on the CPU kernels through zero-copy NumPy views (``channels_last``
included: read in place, the output in the same memory format), CUDA tensors on the GPU
kernels on the current stream. bfloat16, which the kernels lack, is computed in float32
(one conversion each way). Beyond PyTorch: CPU results are bitwise identical for every
thread count, and a batch whose statistics are not finite never enters the running
statistics (``on_nonfinite``).
"""

import math

import numpy as np
import torch

from . import _checks, _cpu_backend, _ops, api, backends

__all__ = ["ArgumentError", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "batch_norm", "convert"]

_COMPUTE = {torch.bfloat16: torch.float32}  # dtypes the kernels lack: computed in these
_TRAIN_ARGS = ("input", "weight", "bias", "running_mean", "running_var")
_FLOAT64 = np.dtype(np.float64)


class ArgumentError(ValueError, RuntimeError):
    """A bad argument of :func:`batch_norm` (or of a module's call) that PyTorch reports
    as a ``RuntimeError``: a parameter or running statistic whose size is not the
    input's channel count, no running statistics in eval mode, an input of fewer than 2
    dimensions. A ``ValueError`` as fastbn's contract says, and a ``RuntimeError`` as
    PyTorch's own tests expect (``test_nn.py``'s
    ``test_batchnorm_raises_error_if_*_is_not_same_size_as_input``).

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> try:
    ...     fastbn.torch.batch_norm(torch.rand(2, 10), torch.rand(9), torch.rand(10))
    ... except RuntimeError as error:
    ...     print(isinstance(error, ValueError), error)
    True running_mean must have shape (10,) to match input.shape[1], got (9,)
    """


# --------------------------------------------------------------------------------------
# Tensors and the arrays the kernels take
# --------------------------------------------------------------------------------------


def _array(t):
    """What the public functions take for tensor ``t``: a zero-copy NumPy view of a CPU
    tensor, a detached CUDA tensor; bfloat16 as a float32 copy (None stays None)."""
    if t is None:
        return None
    t = t.detach()
    compute = _COMPUTE.get(t.dtype)
    if compute is not None:
        t = t.to(compute)
    return t if t.is_cuda else t.numpy()


def _tensor(a, dtype):
    """A result as a tensor of ``dtype`` (None: its own; NumPy results shared, not copied)."""
    if a is None:
        return None
    t = torch.from_numpy(a) if type(a) is np.ndarray else a
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def _running(t):
    """A running statistic the kernels update in place: ``(array, copy)``, the array its
    own memory when they take its dtype (``copy`` None), else that of a float32 copy
    that :func:`_store_running` writes back."""
    if t is None or t.dtype not in _COMPUTE:
        return _array(t), None
    copy = t.detach().to(_COMPUTE[t.dtype])
    return (copy if copy.is_cuda else copy.numpy()), copy


def _store_running(t, copy):
    """Write the updated float32 ``copy`` of :func:`_running` back into ``t`` (bfloat16)."""
    if copy is not None:
        t.copy_(copy)


# --------------------------------------------------------------------------------------
# The operations on the arrays
# --------------------------------------------------------------------------------------


def _train_forward(x, weight, bias, running_mean, running_var, momentum, eps, on_nonfinite):
    """The training forward with the running update (the layer's rules, :mod:`fastbn._ops`):
    ``(y, mean, invstd)``, the statistics in float64 for the backward (as the layer keeps
    them).

    A C-contiguous float32/float64 CPU call takes the direct path of the public functions
    (:func:`fastbn._cpu_backend.direct_train`: the same kernels on the same view, bitwise
    the general path's results, in fewer operations); any other the general one.
    """
    if type(x) is np.ndarray and type(eps) is float and 0.0 < eps < math.inf:
        x3 = _cpu_backend.direct_view(x, 1, None, weight, bias, running_mean, running_var)
        if (
            x3 is not None
            and x3.shape[0] * x3.shape[2] >= 2
            and x3.shape[1]
            and (running_mean is None) == (running_var is None)
            and all(
                a is None or (a.flags.writeable and a.flags.c_contiguous)
                for a in (running_mean, running_var)
            )
        ):
            factor = None if running_mean is None else _ops.momentum_factor(momentum, None)
            _ops.check_on_nonfinite(on_nonfinite)
            y = np.empty(x.shape, x.dtype)
            mean, _, invstd = _cpu_backend.direct_train(
                x3, y.reshape(x3.shape), weight, bias, eps, False, running_mean, running_var,
                factor, True, on_nonfinite, stacklevel=4,
            )  # fmt: skip
            return y, mean, invstd
    be = backends.backend_for(_TRAIN_ARGS, x, weight, bias, running_mean, running_var)
    x, weight, bias = be.wrap("input", x), be.wrap("weight", weight), be.wrap("bias", bias)
    axis, relu = _ops.check_forward_args(x, weight, bias, 1, eps, None, None)
    C = x.shape[1]
    running = None
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if running_mean is not None:
        factor = _ops.momentum_factor(momentum, None)
        _ops.check_on_nonfinite(on_nonfinite)
        running_mean = be.wrap_running("running_mean", running_mean)
        running_var = be.wrap_running("running_var", running_var)
        _checks.check_running("running_mean", running_mean, C, axis)
        _checks.check_running("running_var", running_var, C, axis)
        running = _ops.Running(running_mean, running_var, factor, True, on_nonfinite)
    _checks.check_batch(x.shape, axis, training=True)
    return _ops.train_forward(
        be, x, weight, bias, axis, float(eps), relu, None, None, dtype=_FLOAT64, running=running
    )


def _forward(input, weight, bias, running_mean, running_var, training, momentum, eps,
             on_nonfinite):  # fmt: skip
    """The forward's computation: ``(y, (x, w, b), stats)``, ``y`` a tensor like
    ``input``, the NumPy views (or converted copies) of the inputs, and in training the
    float64 ``(mean, invstd)`` of the batch (None otherwise); the running statistics
    updated in training."""
    x, w, b = _array(input), _array(weight), _array(bias)
    if training:
        rm, mean_copy = _running(running_mean)
        rv, var_copy = _running(running_var)
        y, mean, invstd = _train_forward(x, w, b, rm, rv, momentum, eps, on_nonfinite)
        _store_running(running_mean, mean_copy)
        _store_running(running_var, var_copy)
        stats = (mean, invstd)
    else:
        if running_mean is None or running_var is None:
            raise ArgumentError("running_mean and running_var are required when training=False")
        y = api.batch_norm_inference(x, _array(running_mean), _array(running_var), w, b, eps=eps)
        stats = None
    return _tensor(y, input.dtype), (x, w, b), stats


class _BatchNormFunction(torch.autograd.Function):
    """fastbn's BatchNorm as a node of the autograd graph (see :func:`batch_norm`)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps,
                on_nonfinite):  # fmt: skip
        y, arrays, stats = _forward(
            input, weight, bias, running_mean, running_var, training, momentum, eps, on_nonfinite
        )
        ctx.training = training
        ctx.eps = eps
        if training:
            # The tensors saved (autograd refuses a backward after one of them was
            # modified in place, and releases them once the backward ran); the backward
            # views them again rather than keeping the arrays on ctx, which lives with
            # the graph: kept there, the input stayed allocated until the whole backward
            # ended, and the step's next large allocations faulted in fresh pages
            # (docs/torch.md). Only converted copies (bfloat16) are kept.
            converted = any(t is not None and t.dtype in _COMPUTE for t in (input, weight, bias))
            ctx.arrays = arrays if converted else None
            ctx.stats = stats
            ctx.save_for_backward(input, weight, bias)
        else:
            ctx.save_for_backward(input, weight, bias, running_mean, running_var)
        return y

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors  # unpacked once: each access unpacks them again
        input, weight, bias = saved[:3]
        if torch.is_grad_enabled():  # create_graph=True: a gradient autograd can differentiate
            dx, dweight, dbias = _differentiable_backward(ctx, dy, saved)
        else:
            dx, dweight, dbias = (_tensor(a, None) for a in _kernel_backward(ctx, dy, saved))
        needs = ctx.needs_input_grad
        dx = dx.to(input.dtype) if needs[0] else None
        dweight = dweight.to(weight.dtype) if needs[1] else None
        dbias = dbias.to(bias.dtype) if needs[2] else None
        return dx, dweight, dbias, None, None, None, None, None, None


def _kernel_backward(ctx, dy, saved):
    """The gradient of :class:`_BatchNormFunction` on fastbn's kernels (``saved``: its
    saved tensors): dx, dweight, dbias."""
    if ctx.training:
        if ctx.arrays is None:  # views of the saved tensors (see _BatchNormFunction.forward)
            x, w, b = (_array(t) for t in saved)
        else:
            x, w, b = ctx.arrays
        mean, invstd = ctx.stats
        return api.batch_norm_backward(_array(dy), x, mean, invstd, w, b)
    # the frozen-statistics gradient: the running statistics were constants of the
    # forward (their values then: autograd refuses them modified in place)
    input, weight, bias, running_mean, running_var = saved
    mean = running_mean.detach().to(torch.float64)
    invstd = torch.rsqrt(running_var.detach().to(torch.float64) + ctx.eps)
    return api.batch_norm_backward(
        *map(_array, (dy, input, mean, invstd, weight, bias)), training=False
    )


def _differentiable_backward(ctx, dy, saved):
    """The gradient of :class:`_BatchNormFunction` (``saved``: its saved tensors) in torch
    operations, for a double backward.

    Under ``create_graph=True`` the gradient must itself be a node of the graph: it is
    computed from the saved input with the formula of docs/math.md (in training the
    batch statistics recomputed from the input, so that their dependence on it is part of
    the graph; in eval mode the running statistics, constants), in float32 for float16 and
    bfloat16 tensors, in the input's dtype otherwise. Returns dx, dweight, dbias (dweight
    and dbias also when the parameters are None).
    """
    input, weight, bias = saved[:3]
    acc = input.dtype if input.dtype == torch.float64 else torch.float32
    dims = [0, *range(2, input.dim())]
    shape = [1, -1] + [1] * (input.dim() - 2)
    x, g = input.to(acc), dy.to(acc)
    if ctx.training:
        mean = x.mean(dims, keepdim=True)
        invstd = torch.rsqrt((x - mean).square().mean(dims, keepdim=True) + ctx.eps)
    else:
        running_mean, running_var = saved[3:]
        mean = running_mean.detach().to(acc).reshape(shape)
        invstd = torch.rsqrt(running_var.detach().to(acc).reshape(shape) + ctx.eps)
    xhat = (x - mean) * invstd
    dbias = g.sum(dims)
    dweight = (g * xhat).sum(dims)
    scale = invstd if weight is None else weight.to(acc).reshape(shape) * invstd
    if ctx.training:
        m = x.numel() // max(x.shape[1], 1)
        g = g - (dbias.reshape(shape) + xhat * dweight.reshape(shape)) / m
    return scale * g, dweight, dbias


# --------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------


def batch_norm(
    input,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
    *,
    on_nonfinite="raise",
):
    """``torch.nn.functional.batch_norm`` on fastbn's kernels, autograd-aware.

    In training, normalize with the batch statistics and update ``running_mean`` and
    ``running_var`` in place when given (``(1 - momentum) * running + momentum * batch``,
    the unbiased batch variance); otherwise normalize with the running statistics.
    Gradients flow to ``input``, ``weight`` and ``bias`` in both modes (eval mode: the
    frozen-statistics gradient).

    Parameters
    ----------
    input : torch.Tensor, ndim >= 2, channels on dim 1
        float16, bfloat16 (computed in float32), float32 or float64; CPU tensors (any
        memory format) on the CPU kernels, CUDA tensors on the GPU kernels.
    running_mean, running_var : torch.Tensor of shape (C,) or None
        Required when not training.
    weight, bias : torch.Tensor of shape (C,), optional
    training : bool, default False
        A Python or NumPy bool (anything else is a TypeError, as in PyTorch).
    momentum : float in [0, 1], default 0.1
    eps : float, default 1e-5
        Must be > 0.
    on_nonfinite : {"raise", "warn"}, default "raise"
        Training with running statistics, batch statistics that are not finite (or that
        would overflow the running statistics): raise ``FloatingPointError`` before
        anything is written, or warn and leave the running statistics untouched.

    Returns
    -------
    torch.Tensor
        Same shape, dtype, device and memory format as ``input``.

    Raises
    ------
    ValueError
        eps <= 0, one value per channel in training, shapes that do not match.
    ArgumentError
        A ValueError that is also the RuntimeError PyTorch raises: a parameter or running
        statistic not of shape ``(C,)``, no running statistics when not training, an
        input of fewer than 2 dimensions.
    TypeError
        ``training`` not a bool.
    FloatingPointError
        See ``on_nonfinite``.

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> x = torch.tensor([[1.0, 2.0], [3.0, 6.0]], requires_grad=True)
    >>> rm, rv = torch.zeros(2), torch.ones(2)
    >>> y = fastbn.torch.batch_norm(x, rm, rv, training=True, momentum=0.5, eps=1e-12)
    >>> y.detach()
    tensor([[-1., -1.],
            [ 1.,  1.]])
    >>> rm, rv
    (tensor([1., 2.]), tensor([1.5000, 4.5000]))
    >>> (y * torch.tensor([[1.0, 0.0], [0.0, 0.0]])).sum().backward()
    >>> x.grad
    tensor([[0., 0.],
            [0., 0.]])
    """
    if isinstance(eps, (int, float)) and not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if training is not True and training is not False:  # "False" must not train
        training = _checks.check_flag("training", training)
    # the messages in torch's names (the core says x, gamma and beta), the errors of
    # the kind PyTorch raises too (ArgumentError)
    if input.dim() < 2:
        raise ArgumentError(
            f"input must have at least 2 dimensions (batch and channel), got shape "
            f"{tuple(input.shape)}"
        )
    C = input.shape[1]
    for name, t in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        if t is not None and tuple(t.shape) != (C,):
            raise ArgumentError(
                f"{name} must have shape ({C},) to match input.shape[1], got {tuple(t.shape)}"
            )
    if training and input.shape[0] * math.prod(input.shape[2:]) == 1:
        # torch's words (code written for torch.nn matches on them, e.g. to suggest
        # drop_last=True); fastbn's rule, the same ValueError
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {input.size()}"
        )
    if input.is_meta:  # shapes only (deferred initialization, tracing): no data to compute
        return torch.nn.functional.batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps
        )
    args = (input, weight, bias, running_mean, running_var, bool(training), momentum, eps,
            on_nonfinite)  # fmt: skip
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias)
    ):
        return _BatchNormFunction.apply(*args)
    # no graph to record (no_grad, inference_mode, or nothing requires grad): the
    # computation without the autograd node (~15 us of a small call)
    return _forward(*args)[0]


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------


def _module_forward(module, input):
    """``torch.nn.modules.batchnorm._BatchNorm.forward`` with fastbn's :func:`batch_norm`.

    One difference: torch counts the batch in ``num_batches_tracked`` before the call,
    which then may raise; here the count follows the call, so that a call that raises
    (one value per channel, a non-finite batch) leaves the module as it was, and a
    refused batch does not weigh in the cumulative average (``momentum=None``) of the
    later ones. Every call that succeeds counts as torch's does (empty batches too).
    """
    module._check_input_dim(input)
    factor = 0.0 if module.momentum is None else module.momentum
    count = (
        module.training and module.track_running_stats and module.num_batches_tracked is not None
    )
    if count and module.momentum is None:  # the cumulative average, this batch included
        factor = 1.0 / float(module.num_batches_tracked + 1)
    training = module.training or (module.running_mean is None and module.running_var is None)
    keep = not module.training or module.track_running_stats
    y = batch_norm(
        input,
        module.running_mean if keep else None,
        module.running_var if keep else None,
        module.weight,
        module.bias,
        training,
        factor,
        module.eps,
    )
    if count:
        module.num_batches_tracked.add_(1)
    return y


class BatchNorm1d(torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on fastbn's kernels: ``(N, C)`` or ``(N, C, L)`` input.

    Same constructor, parameters, buffers and state_dict as ``torch.nn.BatchNorm1d`` (it
    is one: a subclass whose forward calls :func:`batch_norm`).

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> bn = fastbn.torch.BatchNorm1d(3)
    >>> bn(torch.randn(8, 3)).shape
    torch.Size([8, 3])
    >>> sorted(bn.state_dict())
    ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight']
    """

    def forward(self, input):
        """Normalize ``input`` (see :func:`batch_norm`)."""
        return _module_forward(self, input)


class BatchNorm2d(torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on fastbn's kernels: ``(N, C, H, W)`` input, contiguous or
    ``channels_last``.

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> bn = fastbn.torch.BatchNorm2d(3)
    >>> bn.load_state_dict(torch.nn.BatchNorm2d(3).state_dict())
    <All keys matched successfully>
    >>> bn(torch.randn(2, 3, 4, 4)).shape
    torch.Size([2, 3, 4, 4])
    """

    def forward(self, input):
        """Normalize ``input`` (see :func:`batch_norm`)."""
        return _module_forward(self, input)


class BatchNorm3d(torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on fastbn's kernels: ``(N, C, D, H, W)`` input.

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> bn = fastbn.torch.BatchNorm3d(2).eval()
    >>> bn(torch.ones(1, 2, 2, 2, 2)).shape
    torch.Size([1, 2, 2, 2, 2])
    """

    def forward(self, input):
        """Normalize ``input`` (see :func:`batch_norm`)."""
        return _module_forward(self, input)


_REPLACEMENTS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


def convert(module):
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` of ``module`` by fastbn's.

    The new modules carry the same state: the same parameter objects (an optimizer built
    before keeps working), buffers, hyperparameters and training flag, as
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does. Subclasses of torch's modules
    (fastbn's own included) are left alone.

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    torch.nn.Module
        ``module`` itself with its children replaced, or the replacement when ``module``
        is a BatchNorm itself.

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    >>> type(fastbn.torch.convert(model)[1]).__module__
    'fastbn.torch'
    """
    result = module
    replacement = _REPLACEMENTS.get(type(module))
    if replacement is not None:
        result = replacement(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        if module.affine:
            result.weight = module.weight
            result.bias = module.bias
        result.running_mean = module.running_mean
        result.running_var = module.running_var
        result.num_batches_tracked = module.num_batches_tracked
        result.train(module.training)
        if hasattr(module, "qconfig"):
            result.qconfig = module.qconfig
    for name, child in module.named_children():
        result.add_module(name, convert(child))
    return result
