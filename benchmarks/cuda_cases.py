"""GPU providers: fastbn's CUDA kernels vs PyTorch (cuDNN), and when they may run.

Every timed callable ends with a device synchronization, so the time measured from the
host is the time the GPU took (plus the launch overhead, which is part of a real call).
The byte counts are those of :mod:`benchmarks.cases`.

``fastbn``
    Numba device arrays in, ``out=`` preallocated on the device.
``torch``
    ``torch.nn.functional.batch_norm`` on CUDA tensors (PyTorch picks cuDNN where it
    supports the case), backward through ``torch.autograd.grad`` of that forward, which
    calls the matching cuDNN backward. NHWC data is a ``channels_last`` tensor.
"""

from __future__ import annotations

import importlib
import os

import pytest

from benchmarks.cases import EPS, Case, import_fastbn, torch_channels_at_1

GPU_CASES = (
    Case("NCHW", (32, 64, 56, 56), 1, "float32", rounds=50),
    Case("NCHW", (64, 256, 14, 14), 1, "float32", rounds=50),
    Case("NCHW", (64, 256, 14, 14), 1, "float64", rounds=50),
    Case("NHWC", (32, 56, 56, 64), -1, "float32", rounds=50),
    Case("NC", (65536, 256), 1, "float32", rounds=50),
)

#: A tiny input: the time of one call is the host-side overhead (checks, launch, sync).
TINY_CASE = Case("NC", (8, 4), 1, "float32", rounds=30, iterations=20, tag="tiny")


def under_cuda_simulator():
    """Return whether Numba's CUDA simulator is switched on.

    Returns
    -------
    bool
        ``NUMBA_ENABLE_CUDASIM`` is set to a true value.
    """
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def gpu_skip_reason(benchmark_enabled=True):
    """Say why the GPU benchmarks cannot run here, or ``None`` when they can.

    Parameters
    ----------
    benchmark_enabled : bool, optional
        Whether timings will be taken. Under the CUDA simulator timings would mean
        nothing, so they are refused; with pytest-benchmark disabled (one untimed call,
        a check that the code runs) the simulator is accepted.

    Returns
    -------
    str or None
        The reason to skip.
    """
    try:
        import fastbn
    except ImportError as exc:
        return f"fastbn cannot be imported: {exc}"
    cuda_available = getattr(fastbn, "cuda_available", None)
    if cuda_available is None:
        return "fastbn has no cuda_available()"
    if under_cuda_simulator() and benchmark_enabled:
        return "timings under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1) would be meaningless"
    if not cuda_available():
        return "no CUDA GPU"
    return None


def fastbn_cuda_provider(op, inputs):
    """Return a no-argument callable doing one fastbn GPU call of ``op``, synchronized.

    Parameters
    ----------
    op : str
        One of :data:`benchmarks.cases.OPS`.
    inputs : benchmarks.cases.Inputs
        Host arrays, copied to the device once here.

    Returns
    -------
    callable
        The timed call.
    """
    fastbn = import_fastbn()
    # fastbn imports its CUDA module on the first GPU call; importing it here keeps that
    # one-time cost out of the first call (and registers the simulator's arrays as CUDA
    # arrays when the code path is checked under NUMBA_ENABLE_CUDASIM).
    importlib.import_module("fastbn.cuda")
    from numba import cuda

    d, axis = inputs, inputs.case.axis
    x, dy = cuda.to_device(d.x), cuda.to_device(d.dy)
    gamma, beta = cuda.to_device(d.gamma), cuda.to_device(d.beta)
    running_mean, running_var = cuda.to_device(d.running_mean), cuda.to_device(d.running_var)
    mean, invstd = cuda.to_device(d.mean), cuda.to_device(d.invstd)
    y, dx = cuda.device_array_like(x), cuda.device_array_like(x)

    def forward():
        result = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, eps=EPS, out=y)
        cuda.synchronize()
        return result

    def inference():
        result = fastbn.batch_norm_inference(
            x, running_mean, running_var, gamma, beta, axis=axis, eps=EPS, out=y
        )
        cuda.synchronize()
        return result

    def backward():
        result = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta, axis=axis, out=dx)
        cuda.synchronize()
        return result

    running_invstd = cuda.to_device(d.running_invstd)

    def frozen_backward():
        result = fastbn.batch_norm_backward(
            dy, x, running_mean, running_invstd, gamma, beta, axis=axis, out=dx, training=False
        )
        cuda.synchronize()
        return result

    def forward_backward():
        _, saved_mean, saved_invstd = fastbn.batch_norm_forward(
            x, gamma, beta, axis=axis, eps=EPS, out=y
        )
        result = fastbn.batch_norm_backward(
            dy, x, saved_mean, saved_invstd, gamma, beta, axis=axis, out=dx
        )
        cuda.synchronize()
        return result

    return {
        "forward": forward,
        "inference": inference,
        "backward": backward,
        "forward_backward": forward_backward,
        "frozen_backward": frozen_backward,
    }[op]


def torch_cuda_provider(op, inputs):
    """Return a no-argument callable doing one PyTorch GPU call of ``op``, synchronized.

    Parameters
    ----------
    op : str
        One of :data:`benchmarks.cases.OPS`.
    inputs : benchmarks.cases.Inputs
        Host arrays, copied to the device once here.

    Returns
    -------
    callable
        The timed call. Skips the test without a CUDA build of PyTorch.
    """
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA device")
    functional = torch.nn.functional
    d, axis = inputs, inputs.case.axis
    device = torch.device("cuda")
    x = torch_channels_at_1(torch, d.x, axis).to(device)
    dy = torch_channels_at_1(torch, d.dy, axis).to(device)
    weight = torch.from_numpy(d.gamma).to(device)
    bias = torch.from_numpy(d.beta).to(device)
    running_mean = torch.from_numpy(d.running_mean).to(device)
    running_var = torch.from_numpy(d.running_var).to(device)
    synchronize = torch.cuda.synchronize

    def forward():
        with torch.no_grad():
            y = functional.batch_norm(x, None, None, weight, bias, training=True, eps=EPS)
        synchronize()
        return y

    def inference():
        with torch.no_grad():
            y = functional.batch_norm(
                x, running_mean, running_var, weight, bias, training=False, eps=EPS
            )
        synchronize()
        return y

    leaves = (
        x.detach().requires_grad_(),
        weight.detach().requires_grad_(),
        bias.detach().requires_grad_(),
    )

    def forward_graph():
        return functional.batch_norm(
            leaves[0], None, None, leaves[1], leaves[2], training=True, eps=EPS
        )

    saved_graph = forward_graph() if op == "backward" else None
    # eval mode: the running statistics are constants of the graph (cuDNN's eval backward)
    frozen_graph = (
        functional.batch_norm(
            leaves[0], running_mean, running_var, leaves[1], leaves[2], training=False, eps=EPS
        )
        if op == "frozen_backward"
        else None
    )

    def frozen_backward():
        grads = torch.autograd.grad(frozen_graph, leaves, dy, retain_graph=True)
        synchronize()
        return grads

    def backward():
        grads = torch.autograd.grad(saved_graph, leaves, dy, retain_graph=True)
        synchronize()
        return grads

    def forward_backward():
        grads = torch.autograd.grad(forward_graph(), leaves, dy)
        synchronize()
        return grads

    return {
        "forward": forward,
        "inference": inference,
        "backward": backward,
        "forward_backward": forward_backward,
        "frozen_backward": frozen_backward,
    }[op]


GPU_PROVIDERS = {
    "fastbn": fastbn_cuda_provider,
    "torch": torch_cuda_provider,
}
