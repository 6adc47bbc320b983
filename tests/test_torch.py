"""fastbn.torch against PyTorch: its own BatchNorm module cases and tests, gradcheck, a
converted CNN; and the public functions on PyTorch CPU tensors.

Tolerances are PyTorch's own (``torch.testing.assert_close``'s defaults per dtype), the
ones its module tests use, unless a test says why it needs another. Skipped when torch is
not installed.
"""

import ast
import copy
import importlib.util
import io
import pickle
import re
from copy import deepcopy
from enum import Enum
from functools import partial, wraps
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import reference  # noqa: E402

import fastbn  # noqa: E402
import fastbn.torch as fbt  # noqa: E402

PAIRS = [
    (torch.nn.BatchNorm1d, fbt.BatchNorm1d),
    (torch.nn.BatchNorm2d, fbt.BatchNorm2d),
    (torch.nn.BatchNorm3d, fbt.BatchNorm3d),
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# --------------------------------------------------------------------------------------
# PyTorch's module cases (torch/testing/_internal/common_modules.py)
# --------------------------------------------------------------------------------------

_CASE_NAMES = (
    "FunctionInput",
    "ModuleInput",
    "ModuleErrorEnum",
    "ErrorModuleInput",
    "module_inputs_torch_nn_BatchNorm1d",
    "module_inputs_torch_nn_BatchNorm2d",
    "module_inputs_torch_nn_BatchNorm3d",
    "module_error_inputs_torch_nn_BatchNorm1d_2d_3d",
)


def _torch_cases():
    """PyTorch's BatchNorm case generators, read from its installed common_modules.py.

    Importing that module needs PyTorch's test dependencies (expecttest and more), which a
    user's install lacks; the generators themselves need only torch, so their definitions
    are taken from the source and run as they are.
    """
    spec = importlib.util.find_spec("torch")
    path = Path(spec.origin).parent / "testing" / "_internal" / "common_modules.py"
    if not path.exists():
        pytest.skip(f"this torch build has no {path.name}")
    tree = ast.parse(path.read_text())
    nodes = [n for n in tree.body if getattr(n, "name", None) in _CASE_NAMES]
    if len(nodes) != len(_CASE_NAMES):
        pytest.skip("this torch's common_modules.py lays out its BatchNorm cases differently")
    namespace = {
        "torch": torch,
        "partial": partial,
        "wraps": wraps,
        "deepcopy": deepcopy,
        "Enum": Enum,
        "make_tensor": torch.testing.make_tensor,
    }
    exec(compile(ast.Module(nodes, []), str(path), "exec"), namespace)
    return namespace


class _Info:
    """What the case generators read of a ``ModuleInfo``."""

    def __init__(self, module_cls):
        self.module_cls = module_cls


def _module_inputs(torch_cls, dtype, training):
    cases = _torch_cases()
    make = cases[f"module_inputs_torch_nn_{torch_cls.__name__}"]
    return make(_Info(torch_cls), "cpu", dtype, True, training)


def _pair(torch_cls, ours_cls, constructor, dtype):
    """The torch module and fastbn's, built alike, with the same state."""
    torch.manual_seed(0)
    theirs = torch_cls(*constructor.args, **constructor.kwargs, dtype=dtype)
    ours = ours_cls(*constructor.args, **constructor.kwargs, dtype=dtype)
    if theirs.affine:  # not the constructor's ones and zeros: gradients must use them
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            if theirs.bias is not None:  # bias=False (torch >= 2.6)
                theirs.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _clone_inputs(args):
    return [a.detach().clone().requires_grad_(a.requires_grad) for a in args]


HALF = (torch.float16, torch.bfloat16)


def _assert_same(theirs, ours, what, exact=None):
    """``ours`` as PyTorch's result ``theirs``, at torch.testing.assert_close's defaults
    per dtype (PyTorch's own module tests), or else no further than ``theirs`` from
    ``exact``, the float64 result on the same data, plus one ulp of the dtype at the
    largest value.

    The second rule is for the cases where the defaults measure PyTorch's rounding rather
    than fastbn's: float16/bfloat16 (the defaults' atol 1e-5 assume a float64 reference,
    and both results carry half-precision roundings) and parameter gradients, sums of
    ~100 values of size ~100 that PyTorch accumulates in float32 (fastbn in float64).
    """
    try:
        torch.testing.assert_close(ours, theirs, msg=lambda m: f"{what}: {m}")
        return
    except AssertionError:
        if exact is None:
            raise
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, what
    err_ours = (ours.double() - exact).abs().max().item()
    err_theirs = (theirs.double() - exact).abs().max().item()
    ulp = torch.finfo(ours.dtype).eps * exact.abs().max().item()
    assert err_ours <= err_theirs + ulp, f"{what}: error {err_ours} vs torch's {err_theirs}"


def _step(module, args, grad):
    y = module(*args)
    y.backward(grad)
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("torch_cls, ours_cls", PAIRS, ids=lambda c: c.__name__)
def test_module_inputs_of_pytorch(torch_cls, ours_cls, training, dtype):
    """Every BatchNorm*d case of common_modules.py, forward and backward, twice (so the
    second call sees the running statistics the first updated): outputs, input and
    parameter gradients and buffers as PyTorch's, at its tolerances (half precision: see
    :func:`_assert_same`)."""
    for case in _module_inputs(torch_cls, dtype, training):
        theirs, ours = _pair(torch_cls, ours_cls, case.constructor_input, dtype)
        exact = copy.deepcopy(theirs).double()  # float64, the same state
        for module in (theirs, ours, exact):
            module.train(training)
        for call in range(2):
            args = case.forward_input.args
            a, b = _clone_inputs(args), _clone_inputs(args)
            e = [t.detach().double().requires_grad_() for t in args]
            grad = torch.testing.make_tensor(args[0].shape, device="cpu", dtype=dtype)
            what = f"{case.desc or 'default'} call {call}"
            ya, yb, ye = (
                _step(theirs, a, grad),
                _step(ours, b, grad),
                _step(exact, e, grad.double()),
            )
            _assert_same(ya, yb, f"{what} output", ye)
            _assert_same(a[0].grad, b[0].grad, f"{what} input grad", e[0].grad)
            named = zip(theirs.named_parameters(), ours.parameters(), exact.parameters())
            for (name, p), q, r in named:
                _assert_same(p.grad, q.grad, f"{what} {name}.grad", r.grad)
            named = zip(theirs.named_buffers(), ours.buffers(), exact.buffers())
            for (name, p), q, r in named:
                _assert_same(p, q, f"{what} buffer {name}", r if p.is_floating_point() else None)
            for module in (theirs, ours, exact):
                module.zero_grad()


@pytest.mark.parametrize("torch_cls, ours_cls", PAIRS, ids=lambda c: c.__name__)
def test_module_error_inputs_of_pytorch(torch_cls, ours_cls):
    cases = _torch_cases()
    errors = cases["module_error_inputs_torch_nn_BatchNorm1d_2d_3d"](
        _Info(torch_cls), "cpu", torch.float32, False, True
    )
    assert errors
    for error in errors:
        case = error.module_error_input
        assert error.error_on == cases["ModuleErrorEnum"].FORWARD_ERROR
        module = ours_cls(*case.constructor_input.args, **case.constructor_input.kwargs)
        with pytest.raises(error.error_type, match=error.error_regex):
            module(*case.forward_input.args)


# --------------------------------------------------------------------------------------
# The generic module tests of PyTorch's test_modules.py, on those cases
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("torch_cls, ours_cls", PAIRS, ids=lambda c: c.__name__)
def test_pickle_repr_and_factory_kwargs(torch_cls, ours_cls):
    for case in _module_inputs(torch_cls, torch.float64, True):
        _, ours = _pair(torch_cls, ours_cls, case.constructor_input, torch.float64)
        for p in list(ours.parameters()) + list(ours.buffers()):
            assert p.dtype == (torch.long if p.dim() == 0 else torch.float64)
        again = pickle.loads(pickle.dumps(ours))
        assert type(again) is ours_cls and repr(again) == repr(ours)
        x = case.forward_input.args[0].detach()
        torch.testing.assert_close(again(x), ours(x))


@pytest.mark.parametrize("check", ["gradcheck", "gradgradcheck"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("torch_cls, ours_cls", PAIRS, ids=lambda c: c.__name__)
def test_grad_and_gradgrad_of_module_inputs(torch_cls, ours_cls, training, check):
    """test_modules.py's test_grad and test_gradgrad: float64 gradcheck and gradgradcheck
    of the module with respect to its input and its parameters, every case."""
    for case in _module_inputs(torch_cls, torch.float64, training):
        x = case.forward_input.args[0].detach()
        if x.numel() == 0:
            continue
        _, ours = _pair(torch_cls, ours_cls, case.constructor_input, torch.float64)
        ours.train(training)
        names, params = zip(*ours.named_parameters()) if ours.affine else ((), ())

        def function(x, *values, module=ours, names=names):
            return torch.func.functional_call(module, dict(zip(names, values)), (x,))

        inputs = (
            x.clone().requires_grad_(),
            *(p.detach().clone().requires_grad_() for p in params),
        )
        assert getattr(torch.autograd, check)(function, inputs), case.desc


@pytest.mark.parametrize("torch_cls, ours_cls", PAIRS, ids=lambda c: c.__name__)
def test_non_contiguous_inputs(torch_cls, ours_cls):
    """test_modules.py's test_non_contiguous_tensors: inputs and gradients that are
    strided views give the results of their contiguous copies."""
    for case in _module_inputs(torch_cls, torch.float64, True):
        x = case.forward_input.args[0].detach()
        if x.numel() == 0:
            continue
        _, ours = _pair(torch_cls, ours_cls, case.constructor_input, torch.float64)
        wide = torch.repeat_interleave(x, 2, dim=-1)[..., ::2]
        assert not wide.is_contiguous() and torch.equal(wide, x)
        grad = torch.randn(x.shape, dtype=torch.float64)
        grad_wide = torch.repeat_interleave(grad, 2, dim=-1)[..., ::2]
        results = []
        for xi, gi in ((x, grad), (wide, grad_wide)):
            xi = xi.clone() if xi is x else xi
            xi.requires_grad_()
            module = copy.deepcopy(ours)
            y = module(xi)
            y.backward(gi)
            results.append((y, xi.grad, [p.grad for p in module.parameters()]))
        torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last(training, dtype):
    """test_modules.py's test_memory_format: channels_last input, the output and the input
    gradient in channels_last, the values those of torch."""
    for torch_cls, ours_cls, fmt, shape in [
        (torch.nn.BatchNorm2d, fbt.BatchNorm2d, torch.channels_last, (4, 6, 5, 3)),
        (torch.nn.BatchNorm3d, fbt.BatchNorm3d, torch.channels_last_3d, (2, 6, 3, 4, 5)),
    ]:
        theirs, ours = _pair(torch_cls, ours_cls, _FunctionInput(6), dtype)
        exact = copy.deepcopy(theirs).double()
        for module in (theirs, ours, exact):
            module.train(training)
        x = torch.randn(shape, dtype=dtype).to(memory_format=fmt)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        e = x.double().requires_grad_()
        grad = torch.randn(shape, dtype=dtype).to(memory_format=fmt)
        ya, yb, ye = (
            _step(theirs, [a], grad),
            _step(ours, [b], grad),
            _step(exact, [e], grad.double()),
        )
        assert yb.is_contiguous(memory_format=fmt)
        assert b.grad.is_contiguous(memory_format=fmt)
        _assert_same(ya, yb, "output", ye)
        _assert_same(a.grad, b.grad, "input grad", e.grad)
        _assert_same(theirs.weight.grad, ours.weight.grad, "weight.grad", exact.weight.grad)


class _FunctionInput:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


# --------------------------------------------------------------------------------------
# The BatchNorm tests of PyTorch's test_nn.py
# --------------------------------------------------------------------------------------


def test_momentum_none_is_the_cumulative_average():
    """test_nn.py: test_batchnorm_simple_average."""
    torch.manual_seed(1)
    theirs, ours = torch.nn.BatchNorm1d(3, momentum=None), fbt.BatchNorm1d(3, momentum=None)
    batches = [torch.randn(8, 3) * (i + 1) + i for i in range(4)]
    for x in batches:
        theirs(x)
        ours(x)
    stacked = torch.stack(batches).double()
    torch.testing.assert_close(ours.running_mean, stacked.mean(dim=1).mean(0).float())
    torch.testing.assert_close(ours.running_var, stacked.var(dim=1).mean(0).float())
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == 4
    ours.reset_running_stats()
    assert int(ours.num_batches_tracked) == 0 and torch.equal(ours.running_var, torch.ones(3))


def test_not_tracking_running_stats():
    """test_nn.py: test_batchnorm_buffer_update_when_stats_are_not_tracked and the eval
    mode of a module without running statistics (batch statistics all the same)."""
    ours = fbt.BatchNorm2d(3, track_running_stats=False)
    assert ours.running_mean is None and ours.running_var is None
    assert ours.num_batches_tracked is None
    assert sorted(ours.state_dict()) == ["bias", "weight"]
    x = torch.randn(4, 3, 2, 2)
    for mode in (ours.train, ours.eval):
        mode()
        expected = torch.nn.functional.batch_norm(x, None, None, ours.weight, ours.bias, True)
        torch.testing.assert_close(ours(x), expected)


def test_affine_false():
    ours = fbt.BatchNorm2d(3, affine=False)
    assert ours.weight is None and ours.bias is None
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    ours(x).pow(2).sum().backward()
    assert x.grad is not None and not list(ours.parameters())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_zero_size_batch(training):
    """test_nn.py: test_batchnorm_empty (zero-size batches: empty output, zero parameter
    gradients, running statistics untouched, the batch counted in training as torch's)."""
    theirs, ours = torch.nn.BatchNorm2d(5), fbt.BatchNorm2d(5)
    theirs.train(training)
    ours.train(training)
    x = torch.randn(0, 5, 2, 2, requires_grad=True)
    y = ours(x)
    assert y.shape == x.shape
    y.sum().backward()
    theirs(x.detach())
    assert torch.equal(ours.weight.grad, torch.zeros(5))
    assert torch.equal(ours.bias.grad, torch.zeros(5))
    for name, buffer in theirs.named_buffers():
        assert torch.equal(getattr(ours, name), buffer), name


@pytest.mark.parametrize(
    "cls, good_dims", [(fbt.BatchNorm1d, (2, 3)), (fbt.BatchNorm2d, (4,)), (fbt.BatchNorm3d, (5,))]
)
def test_wrong_input_dimensions_raise_like_pytorch(cls, good_dims):
    ours = cls(3)
    theirs = getattr(torch.nn, cls.__name__)(3)
    for ndim in range(1, 7):
        x = torch.randn((2, 3) + (2,) * (ndim - 2)) if ndim >= 2 else torch.randn(3)
        if ndim in good_dims:
            torch.testing.assert_close(ours(x), theirs(x))
            continue
        with pytest.raises(ValueError) as expected:
            theirs(x)
        with pytest.raises(ValueError, match=re.escape(str(expected.value))):
            ours(x)


def test_one_value_per_channel_in_training_raises():
    """test_nn.py: test_batchnorm_raises_error_if_less_than_one_value_per_channel."""
    ours = fbt.BatchNorm1d(10)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ours(torch.randn(1, 10))
    ours.eval()
    assert ours(torch.randn(1, 10)).shape == (1, 10)  # eval: no batch statistics


def test_wrong_running_statistics_size_raises():
    """test_nn.py: test_batchnorm_raises_error_if_running_mean_is_not_same_size_as_input."""
    x = torch.rand(2, 10)
    for training in (True, False):
        with pytest.raises(ValueError, match="running_mean must have shape"):
            fbt.batch_norm(x, torch.rand(11), torch.rand(10), training=training)
        with pytest.raises(ValueError, match="running_var must have shape"):
            fbt.batch_norm(x, torch.rand(10), torch.rand(11), training=training)
        with pytest.raises(ValueError, match="weight must have shape"):
            fbt.batch_norm(x, torch.rand(10), torch.rand(10), torch.rand(11), training=training)


@pytest.mark.parametrize("torch_cls, ours_cls", PAIRS, ids=lambda c: c.__name__)
def test_state_dict_round_trip_both_ways(torch_cls, ours_cls):
    theirs = torch_cls(4, momentum=0.3)
    spatial = int(torch_cls.__name__[-2])
    x = torch.randn((6, 4) + (3,) * (spatial if spatial > 1 else 0))
    theirs(x)
    theirs(x * 2 + 1)
    ours = ours_cls(4, momentum=0.3)
    assert str(ours.load_state_dict(theirs.state_dict())) == "<All keys matched successfully>"
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    ours(x - 1)
    back = torch_cls(4, momentum=0.3)
    back.load_state_dict(ours.state_dict())
    assert int(back.num_batches_tracked) == 3
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    # a state_dict of before num_batches_tracked (no version): loaded as torch loads it
    old = {k: v for k, v in theirs.state_dict().items() if k != "num_batches_tracked"}
    for module in (ours, back):
        module.load_state_dict(old, strict=False)
    assert torch.equal(ours.num_batches_tracked, back.num_batches_tracked)


def test_num_batches_tracked_and_train_eval():
    """test_nn.py: test_batchnorm_update_stats and test_batchnorm_eval: training updates
    the buffers as torch does; eval uses and keeps them, and repeated eval calls agree."""
    theirs, ours = torch.nn.BatchNorm2d(3), fbt.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    for _ in range(3):
        torch.testing.assert_close(ours(x), theirs(x))
    assert int(ours.num_batches_tracked) == 3
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    ours.eval()
    theirs.eval()
    before = ours.running_mean.clone()
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [ours(xi) for xi in xs]
    grad = torch.randn_like(x)
    for yi in ys:
        yi.backward(grad)
    assert torch.equal(ys[0], ys[1]) and torch.equal(xs[0].grad, xs[1].grad)
    assert torch.equal(ours.running_mean, before) and int(ours.num_batches_tracked) == 3
    torch.testing.assert_close(ys[0], theirs(x))


def test_half_input_with_float_parameters():
    """test_nn.py: test_batchnorm_half_overflow and mixed precision (float16 input,
    float32 module, as autocast leaves it)."""
    theirs, ours = torch.nn.BatchNorm2d(3), fbt.BatchNorm2d(3)
    x = (torch.randn(2, 3, 4, 4) * 30).half().requires_grad_()
    y = ours(x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, theirs(x))
    y.float().sum().backward()
    assert ours.weight.grad.dtype == torch.float32


# --------------------------------------------------------------------------------------
# The functional form: gradcheck, determinism, guarantees
# --------------------------------------------------------------------------------------


def _float64_inputs(seed, shape):
    """``(x, w, b, rm, rv)`` in float64 for gradcheck: inputs and parameters that require
    grad, running statistics that do not (3 channels)."""
    torch.manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64).add_(0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    return x, w, b, torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 5), (2, 3, 3, 2)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(training, shape):
    x, w, b, rm, rv = _float64_inputs(2, shape)

    def function(x, w, b):
        stats = (None, None) if training else (rm, rv)
        return fbt.batch_norm(x, *stats, w, b, training=training, eps=1e-3)

    assert torch.autograd.gradcheck(function, (x, w, b))


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 5), (2, 3, 3, 2)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradgradcheck_float64(training, shape):
    """Double backward (create_graph=True), as PyTorch's module tests check it."""
    x, w, b, rm, rv = _float64_inputs(3, shape)

    def function(x, w, b):
        stats = (rm.clone(), rv.clone()) if training else (rm, rv)
        return fbt.batch_norm(x, *stats, w, b, training=training, eps=1e-3)

    assert torch.autograd.gradgradcheck(function, (x, w, b))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_double_backward_matches_torch(training):
    """The second derivatives against torch.nn.functional.batch_norm's own, float32."""
    torch.manual_seed(4)
    x0, w0, b0 = torch.randn(6, 3, 4), torch.rand(3) + 0.5, torch.randn(3)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    results = []
    for function in (fbt.batch_norm, torch.nn.functional.batch_norm):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        y = function(x, rm.clone(), rv.clone(), w, b, training=training)
        gx, gw = torch.autograd.grad(y.pow(3).sum(), (x, w), create_graph=True)
        results.append(
            (gx, gw, *torch.autograd.grad((gx.sin().sum() + gw.pow(2).sum()), (x, w, b)))
        )
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_matches_reference(training):
    """The float64 reference (tests/reference.py) for the values and gradients."""
    rng = np.random.default_rng(3)
    x64 = rng.standard_normal((6, 4, 7)) * 3 + 1
    dy64 = rng.standard_normal(x64.shape)
    w64, b64 = rng.uniform(0.5, 1.5, 4), rng.standard_normal(4)
    rm64, rv64 = rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    x = torch.tensor(x64, dtype=torch.float32, requires_grad=True)
    w = torch.tensor(w64, dtype=torch.float32, requires_grad=True)
    b = torch.tensor(b64, dtype=torch.float32, requires_grad=True)
    rm, rv = torch.tensor(rm64, dtype=torch.float32), torch.tensor(rv64, dtype=torch.float32)
    y = fbt.batch_norm(x, rm, rv, w, b, training=training, momentum=0.25)
    y.backward(torch.tensor(dy64, dtype=torch.float32))
    xr = x.detach().double().numpy()  # the float32 input the call saw
    if training:
        y_ref, mean, invstd, var = reference.forward(xr, w64.astype(np.float32), b64, axis=1)
        dx_ref, dw_ref, db_ref = reference.backward(dy64, xr, mean, invstd, w64.astype(np.float32))
        new_mean, new_var = reference.update_running(
            rm64.astype(np.float32), rv64.astype(np.float32), mean, var, 6 * 7, 0.25
        )
    else:
        w32 = w64.astype(np.float32)
        rm32, rv32 = rm64.astype(np.float32), rv64.astype(np.float32)
        y_ref = reference.inference(xr, rm32, rv32, w32, b64.astype(np.float32))
        invstd = 1.0 / np.sqrt(rv32.astype(np.float64) + 1e-5)
        dx_ref, dw_ref, db_ref = reference.frozen_backward(dy64, xr, rm32, invstd, w32)
        new_mean, new_var = rm32, rv32
    # float32 results of float64-accumulated kernels: a few float32 ulps of values ~1-10
    tol = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y.detach().numpy(), y_ref, **tol)
    np.testing.assert_allclose(x.grad.numpy(), dx_ref, **tol)
    # parameter gradients are sums over 42 values of size ~1-10: their rounding grows
    np.testing.assert_allclose(w.grad.numpy(), dw_ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(b.grad.numpy(), db_ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(rm.numpy(), new_mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rv.numpy(), new_var, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(16, 8, 33, 17), (4096, 8)])
def test_bitwise_identical_for_every_thread_count(shape):
    """Outputs, gradients and running statistics bitwise the same for 1, 2 and the
    default number of threads (on (N, C) input ATen's BatchNorm differs between thread
    counts)."""
    import numba

    x = torch.randn(shape) * 5 + 3
    grad = torch.randn_like(x)
    results = []
    threads = numba.get_num_threads()
    try:
        for n in sorted({1, 2, threads}):
            numba.set_num_threads(n)
            bn = fbt.BatchNorm2d(8) if len(shape) == 4 else fbt.BatchNorm1d(8)
            xi = x.clone().requires_grad_()
            y = bn(xi)
            y.backward(grad)
            results.append((y, xi.grad, bn.weight.grad, bn.bias.grad, bn.running_var))
    finally:
        numba.set_num_threads(threads)
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=0, atol=0)


def test_nonfinite_batches_never_enter_the_running_statistics():
    bn = fbt.BatchNorm1d(3)
    x = torch.randn(8, 3)
    x[2, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        bn(x)
    assert torch.equal(bn.running_mean, torch.zeros(3))
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.warns(RuntimeWarning, match="not finite"):
        y = fbt.batch_norm(x, rm, rv, training=True, on_nonfinite="warn")
    assert torch.isnan(y[:, 1]).all() and torch.equal(rm, torch.zeros(3))


def test_bfloat16_is_computed_in_float32():
    x = torch.randn(8, 3, 4).bfloat16().requires_grad_()
    rm, rv = torch.zeros(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16)
    y = fbt.batch_norm(x, rm, rv, training=True)
    assert y.dtype == torch.bfloat16 and rm.dtype == torch.bfloat16
    expected = torch.nn.functional.batch_norm(x.float(), None, None, training=True)
    torch.testing.assert_close(y, expected.bfloat16())
    torch.testing.assert_close(rm, (0.1 * x.float().mean((0, 2))).bfloat16())
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_eps_must_be_positive():
    x = torch.randn(4, 3)
    for eps in (0.0, -1.0):
        with pytest.raises(ValueError, match="eps must be positive"):
            fbt.batch_norm(x, None, None, training=True, eps=eps)


# --------------------------------------------------------------------------------------
# convert: a small CNN trained side by side
# --------------------------------------------------------------------------------------


def _cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(8, momentum=None),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 6 * 6, 10),
    )


def test_convert_keeps_the_state_and_the_parameters():
    model = _cnn()
    model[1].running_mean.fill_(0.5)
    model.eval()
    weight = model[1].weight
    converted = fbt.convert(model)
    assert converted is model
    assert type(model[1]) is fbt.BatchNorm2d and type(model[4]) is fbt.BatchNorm2d
    assert model[1].weight is weight and not model[1].training
    assert torch.equal(model[1].running_mean, torch.full((8,), 0.5))
    assert model[4].momentum is None
    assert fbt.convert(model)[1] is model[1]  # fastbn's modules are left alone
    bn = torch.nn.BatchNorm1d(4)
    assert type(fbt.convert(bn)) is fbt.BatchNorm1d


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_converted_cnn_trains_like_the_original(memory_format):
    """Several SGD steps: the same outputs, gradients and buffers as the original, to
    float32 rounding (which the convolutions pass on from step to step, hence rtol 1e-4
    after a few steps rather than the one-call tolerance)."""
    torch.manual_seed(4)
    original = _cnn().to(memory_format=memory_format)
    converted = fbt.convert(copy.deepcopy(original))
    assert sum(type(m) is fbt.BatchNorm2d for m in converted.modules()) == 2
    optimizers = [
        torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (original, converted)
    ]
    for step in range(5):
        x = torch.randn(16, 3, 6, 6).to(memory_format=memory_format)
        target = torch.randint(0, 10, (16,))
        outputs = []
        for model, optimizer in zip((original, converted), optimizers):
            optimizer.zero_grad()
            out = model(x)
            torch.nn.functional.cross_entropy(out, target).backward()
            outputs.append(out)
            optimizer.step()
        tol = dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(outputs[1], outputs[0], **tol)
        for (name, p), q in zip(original.named_parameters(), converted.parameters()):
            torch.testing.assert_close(q.grad, p.grad, **tol, msg=f"step {step} {name}")
        for (name, p), q in zip(original.named_buffers(), converted.buffers()):
            torch.testing.assert_close(q, p, **tol, msg=f"step {step} {name}")
    original.eval()
    converted.eval()
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(converted(x), original(x), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------
# The public functions on PyTorch CPU tensors
# --------------------------------------------------------------------------------------


def test_public_functions_take_and_return_cpu_tensors():
    x = torch.randn(4, 3, 5, requires_grad=True)  # read detached
    y, mean, invstd = fastbn.batch_norm_forward(x)
    assert all(type(a) is torch.Tensor for a in (y, mean, invstd))
    torch.testing.assert_close(
        y, torch.nn.functional.batch_norm(x.detach(), None, None, None, None, True)
    )
    rm, rv = torch.zeros(3), torch.ones(3)
    y2 = fastbn.batch_norm(x, rm, rv, training=True, momentum=0.5)
    torch.testing.assert_close(rm, 0.5 * x.detach().mean((0, 2)))  # in place
    assert type(y2) is torch.Tensor
    out = torch.empty(4, 3, 5)
    assert fastbn.batch_norm_inference(x, rm, rv, out=out) is out
    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        torch.ones(4, 3, 5), x, mean, invstd, torch.ones(3)
    )
    assert type(dx) is torch.Tensor and type(dgamma) is torch.Tensor
    torch.testing.assert_close(dbeta, torch.full((3,), 20.0))
    xn = x.detach().numpy()  # NumPy in: NumPy out, tensors among the other arguments
    assert type(fastbn.batch_norm(xn, rm, rv, training=False)) is np.ndarray


def test_public_functions_share_memory_with_tensors():
    x = torch.randn(6, 4).to(torch.float64)
    y, _, _ = fastbn.batch_norm_forward(x)
    y.add_(1)  # the tensor is the result's own memory
    x_cl = torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last)
    y_cl = fastbn.batch_norm_inference(x_cl, torch.zeros(4), torch.ones(4))
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, x_cl / np.sqrt(1 + 1e-5))


def test_public_functions_refuse_bfloat16_clearly():
    with pytest.raises(TypeError, match="x must be a float16, float32 or float64 tensor"):
        fastbn.batch_norm_forward(torch.randn(4, 3).bfloat16())


def test_channels_last_is_read_in_place(monkeypatch):
    """No copy of a channels_last input: the kernels get a view of its memory."""
    from fastbn import _checks

    seen = []
    view = _checks.canonical_view

    def spy(x, axis, order=None):
        v = view(x, axis, order)
        seen.append(v.x3)
        return v

    monkeypatch.setattr(_checks, "canonical_view", spy)
    x = torch.randn(2, 4, 3, 5).to(memory_format=torch.channels_last)
    fastbn.batch_norm_forward(x)
    assert seen and seen[0].ctypes.data == x.data_ptr() and seen[0].shape == (30, 4, 1)


def test_import_fastbn_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, fastbn; print('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "False", result.stderr


def test_meta_tensors_give_shapes_like_pytorch():
    """Modules built on the meta device (deferred initialization) run on meta inputs."""
    for cls, shape in ((fbt.BatchNorm1d, (4, 3)), (fbt.BatchNorm2d, (2, 3, 4, 5))):
        module = cls(3, device="meta")
        x = torch.empty(shape, device="meta")
        for training in (True, False):
            y = module.train(training)(x)
            assert y.is_meta and y.shape == x.shape and y.dtype == x.dtype


def test_save_and_load_through_torch_save():
    ours = fbt.BatchNorm2d(3)
    ours(torch.randn(4, 3, 2, 2))
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    theirs = torch.nn.BatchNorm2d(3)
    theirs.load_state_dict(torch.load(buffer))
    assert torch.equal(theirs.running_mean, ours.running_mean)


def _storage_use_count(t):
    """How many references hold ``t``'s storage (torch's own count)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


@pytest.mark.skipif(
    not hasattr(torch._C, "_storage_Use_Count"), reason="torch lacks _storage_Use_Count"
)
def test_training_node_holds_the_input_only_as_torch_does():
    """After the backward, nothing of fastbn's autograd node holds the input's memory,
    although the graph (``y.grad_fn``) lives on: the saved input is released as
    torch.nn's is. A node that kept it (NumPy views on ctx) kept a (32, 64, 56, 56)
    activation allocated until the whole backward ended, and the next step faulted in
    fresh pages for it (docs/torch.md). A backward with ``retain_graph=True`` still runs
    twice, with the same gradients."""
    inp = torch.randn(4, 3, 5, 5, requires_grad=True)
    h = inp * 2
    before = _storage_use_count(h)
    y = fbt.batch_norm(h, None, None, training=True)
    dy = torch.randn(y.shape)
    (first,) = torch.autograd.grad(y, inp, dy, retain_graph=True)
    (second,) = torch.autograd.grad(y, inp, dy)
    assert torch.equal(first, second)
    assert y.grad_fn is not None
    assert _storage_use_count(h) == before


@pytest.mark.parametrize("training", [True, False])
def test_no_graph_calls_skip_the_autograd_node_with_the_same_results(training):
    """Without a graph to record (no_grad, or nothing requiring grad) batch_norm computes
    without its autograd node: the same output bytes and running statistics as a call
    that records one, and no grad_fn."""
    rng = torch.Generator().manual_seed(5)
    x = torch.randn(32, 6, 5, generator=rng)
    w, b = torch.rand(6, generator=rng) + 0.5, torch.randn(6, generator=rng)
    results = []
    for mode in ("graph", "no_grad", "no_requires_grad"):
        rm, rv = torch.zeros(6), torch.ones(6)
        xi = x.clone().requires_grad_(mode != "no_requires_grad")
        if mode == "no_grad":
            with torch.no_grad():
                y = fastbn.torch.batch_norm(xi, rm, rv, w, b, training=training, momentum=0.3)
        else:
            y = fastbn.torch.batch_norm(xi, rm, rv, w, b, training=training, momentum=0.3)
        assert (y.grad_fn is not None) == (mode == "graph")
        results.append((y.detach(), rm, rv))
    for other in results[1:]:
        for u, v in zip(results[0], other):
            assert u.numpy().tobytes() == v.numpy().tobytes()
