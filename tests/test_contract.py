"""Issue 18: the backward contract, dtypes and array kinds, nothing written before an error.

Three kinds of tests:

- CPU tests, in this process, against the float64 reference (tests/reference.py);
- CUDA tests (``needs_cuda``): on a real GPU in this process; without one,
  :func:`test_cuda_contract_under_simulator` re-runs them in a child process under Numba's
  CUDA simulator with a small block size (the pattern of tests/test_cuda.py);
- ``comm=``: tests/mpi/contract_checks.py under ``mpiexec -n 2`` (the runner pattern of
  tests/test_distributed.py), one launch for every check.

A property-based test (hypothesis) sweeps the argument space of the four functions and
the layer: a call either returns the reference's result, or raises a documented error
(TypeError, ValueError, FloatingPointError) naming an argument, with every output and
running statistic unchanged.
"""

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import fastbn

sys.path.insert(0, os.path.dirname(__file__))
import reference as ref
from helpers import assert_close, find_mpiexec, run_mpi, tol

ROOT = Path(__file__).resolve().parents[1]
CHILD = os.environ.get("FASTBN_CONTRACT_CUDA_CHILD") == "1"
SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
SIM_ENV = {
    "NUMBA_ENABLE_CUDASIM": "1",
    "FASTBN_CUDA_THREADS": "64",
    "FASTBN_CUDA_MIN_VALUES_PER_THREAD": "4",
    "FASTBN_CUDA_TARGET_BLOCKS": "8",
    "FASTBN_CUDA_SYNC_NONFINITE": "0",
}
RUN_CUDA_HERE = CHILD or (not SIMULATED and fastbn.cuda_available())
needs_cuda = pytest.mark.skipif(
    not RUN_CUDA_HERE, reason="runs on a GPU or in the simulator subprocess"
)
cpu_only = pytest.mark.skipif(CHILD, reason="CPU test: run by the parent process")

DTYPES = [np.float16, np.float32, np.float64]
SWAPPED = (
    [np.dtype(">f4"), np.dtype(">f8")]
    if sys.byteorder == "little"
    else [np.dtype("<f4"), np.dtype("<f8")]
)


def data(shape, dtype, seed=0, offset=3.0, scale=2.0):
    rng = np.random.default_rng(seed)
    return (offset + scale * rng.standard_normal(shape)).astype(dtype)


def params(C, dtype, seed=1):
    rng = np.random.default_rng(seed)
    return (
        (1.0 + 0.5 * rng.standard_normal(C)).astype(dtype),
        rng.standard_normal(C).astype(dtype),
    )


def native(dtype):
    return np.dtype(dtype).newbyteorder("=")


# --------------------------------------------------------------------------------------
# The backward contract: dgamma and dbeta whenever the call is affine
# --------------------------------------------------------------------------------------

AFFINE_CASES = [
    ("gamma", True, False),
    ("beta", False, True),
    ("both", True, True),
    ("neither", False, False),
]


@cpu_only
@pytest.mark.parametrize("name, with_gamma, with_beta", AFFINE_CASES)
@pytest.mark.parametrize("layout", ["direct", "general", "empty"])
def test_backward_returns_both_gradients_when_affine(name, with_gamma, with_beta, layout):
    shape = (0, 4) if layout == "empty" else (9, 4, 5)
    x = data(shape, np.float64)
    dy = data(shape, np.float64, seed=3, offset=0.5)
    if layout == "general":  # Fortran order: not the direct path
        x, dy = np.asfortranarray(x), np.asfortranarray(dy)
    gamma, beta = params(4, np.float64)
    g = gamma if with_gamma else None
    b = beta if with_beta else None
    _, mean, invstd = fastbn.batch_norm_forward(x, g, b)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, x, mean, invstd, g, b)
    if not (with_gamma or with_beta):
        assert dgamma is None and dbeta is None
        return
    assert dgamma is not None and dbeta is not None, (dgamma, dbeta)
    if layout == "empty":
        np.testing.assert_array_equal(dgamma, np.zeros(4))
        np.testing.assert_array_equal(dbeta, np.zeros(4))
        assert dx.shape == shape
        return
    e_dx, e_dgamma, e_dbeta = ref.backward(dy, x, mean, invstd, g, b)
    assert_close(dx, e_dx, **tol(np.float64, 10), name="dx")
    assert_close(dgamma, e_dgamma, **tol(np.float64, 10), name="dgamma")
    assert_close(dbeta, e_dbeta, **tol(np.float64, 10), name="dbeta")
    np.testing.assert_allclose(dbeta, dy.sum(axis=(0, 2)), rtol=1e-12)


@cpu_only
@pytest.mark.parametrize("affine", [True, False])
def test_layer_gradients_follow_affine(affine):
    bn = fastbn.BatchNorm(3, affine=affine, dtype=np.float64)
    x = data((8, 3), np.float64)
    bn.forward(x, training=True)
    bn.backward(np.ones_like(x))
    if affine:
        np.testing.assert_allclose(bn.dbeta, np.full(3, 8.0))
        assert bn.dgamma is not None
    else:
        assert bn.dgamma is None and bn.dbeta is None


# --------------------------------------------------------------------------------------
# float16 running statistics
# --------------------------------------------------------------------------------------


@cpu_only
@pytest.mark.parametrize("x_dtype", DTYPES)
def test_float16_running_statistics_are_updated(x_dtype):
    x = data((16, 3, 5), x_dtype)
    rm, rv = np.full(3, 0.5, np.float16), np.full(3, 2.0, np.float16)
    rm0, rv0 = rm.astype(np.float64), rv.astype(np.float64)
    out = np.full(x.shape, 7, x_dtype)
    y = fastbn.batch_norm(x, rm, rv, training=True, momentum=0.25, out=out)
    assert y is out and rm.dtype == np.float16
    _, mean, _, var = ref.forward(x)
    e_m, e_v = ref.update_running(rm0, rv0, mean, var, 80, 0.25)
    assert_close(rm, e_m, **tol(np.float16), name="running_mean")
    assert_close(rv, e_v, **tol(np.float16), name="running_var")
    assert_close(y, ref.forward(x)[0], **tol(x_dtype), name="y")


@cpu_only
def test_float16_layer_trains():
    bn = fastbn.BatchNorm(3, dtype=np.float16, momentum=None)
    xs = [data((12, 3), np.float16, seed=s) for s in range(3)]
    for x in xs:
        y = bn.forward(x, training=True)
        assert y.dtype == np.float16
        assert_close(y, ref.forward(x)[0], **tol(np.float16))
        dx = bn.backward(np.ones_like(x))
        assert dx.dtype == np.float16 and bn.dgamma.dtype == np.float16
    assert bn.num_batches_tracked == 3
    assert bn.running_mean.dtype == np.float16
    allx = np.stack([x.astype(np.float64) for x in xs])
    assert_close(bn.running_mean, allx.mean(axis=(0, 1)), **tol(np.float16))


# --------------------------------------------------------------------------------------
# Byte order, masked arrays, np.matrix
# --------------------------------------------------------------------------------------


@cpu_only
@pytest.mark.parametrize("swapped", SWAPPED, ids=str)
def test_byte_swapped_arguments(swapped):
    nat = native(swapped)
    x = data((6, 3, 4), nat)
    dy = data(x.shape, nat, seed=5, offset=0.0)
    gamma, beta = params(3, nat)

    def sw(a):
        return a.astype(swapped)

    y, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta)
    y_s, mean_s, _ = fastbn.batch_norm_forward(sw(x), sw(gamma), sw(beta))
    assert y_s.dtype == nat and y_s.dtype.isnative
    np.testing.assert_array_equal(y_s, y)
    np.testing.assert_array_equal(mean_s, mean)
    grads = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta)
    grads_s = fastbn.batch_norm_backward(sw(dy), sw(x), sw(mean), sw(invstd), sw(gamma), sw(beta))
    for a, b in zip(grads, grads_s):
        assert b.dtype.isnative
        np.testing.assert_array_equal(a, b)
    rm, rv = np.zeros(3, nat), np.ones(3, nat)
    y_inf = fastbn.batch_norm_inference(x, rm, rv, gamma, beta)
    np.testing.assert_array_equal(
        fastbn.batch_norm_inference(sw(x), sw(rm), sw(rv)), fastbn.batch_norm_inference(x, rm, rv)
    )
    np.testing.assert_array_equal(fastbn.batch_norm(sw(x), sw(rm), sw(rv), gamma, beta), y_inf)
    # running statistics byte-swapped: updated in place, in the caller's own arrays
    rm_s, rv_s = sw(np.zeros(3, nat)), sw(np.ones(3, nat))
    out_s = sw(np.zeros(x.shape))
    result = fastbn.batch_norm(sw(x), rm_s, rv_s, gamma, beta, training=True, out=out_s)
    fastbn.batch_norm(x, rm, rv, gamma, beta, training=True)
    assert result is out_s and rm_s.dtype == swapped
    np.testing.assert_array_equal(rm_s, rm)
    np.testing.assert_array_equal(rv_s, rv)
    np.testing.assert_array_equal(out_s, y)
    # the layer: byte-swapped x and dy, byte-swapped dtype
    bn, bn_s = fastbn.BatchNorm(3, dtype=nat), fastbn.BatchNorm(3, dtype=swapped)
    assert bn_s.running_mean.dtype.isnative
    np.testing.assert_array_equal(bn_s.forward(sw(x), training=True), bn.forward(x, training=True))
    np.testing.assert_array_equal(bn_s.backward(sw(dy)), bn.backward(dy))
    np.testing.assert_array_equal(bn_s.running_var, bn.running_var)


def _masked(a):
    return np.ma.masked_array(a, mask=np.zeros(a.shape, bool))


@cpu_only
@pytest.mark.parametrize(
    "target",
    ["gamma", "out", "running_mean", "dy", "mean", "layer_dy", "inference_x"],
)
def test_masked_arrays_are_refused(target):
    """A masked array whose mask would be dropped is refused (a training ``x`` gives its
    mask to ``mask=`` instead: test_masked_x_in_training_gives_its_mask)."""
    x = data((6, 3), np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x)
    args = dict(
        x=x,
        gamma=np.ones(3, np.float32),
        out=np.full_like(x, 7),
        running_mean=np.zeros(3, np.float32),
        running_var=np.ones(3, np.float32),
        dy=np.ones_like(x),
        mean=mean,
    )
    key = target.split("_", 1)[1] if target.startswith(("layer_", "inference_")) else target
    args[key] = _masked(args[key])
    before = {k: np.array(v) for k, v in args.items()}
    with pytest.raises(TypeError, match=rf"{key} must be a plain array.*MaskedArray"):
        if target == "layer_x":
            fastbn.BatchNorm(3).forward(args["x"], training=True)
        elif target == "layer_dy":
            bn = fastbn.BatchNorm(3)
            bn.forward(x, training=True)
            bn.backward(args["dy"])
        elif target == "inference_x":
            fastbn.batch_norm_inference(args["x"], args["running_mean"], args["running_var"])
        elif target in ("dy", "mean"):
            fastbn.batch_norm_backward(args["dy"], x, args["mean"], invstd, out=args["out"])
        else:
            fastbn.batch_norm(
                args["x"],
                args["running_mean"],
                args["running_var"],
                args["gamma"],
                training=True,
                out=args["out"],
            )
    for k, v in before.items():
        np.testing.assert_array_equal(np.asarray(args[k]), v, err_msg=k)


@cpu_only
@pytest.mark.parametrize("target", ["forward", "batch_norm", "layer"])
def test_masked_x_in_training_gives_its_mask(target):
    x = data((6, 3), np.float32)
    invalid = np.zeros(x.shape, bool)
    invalid[4:] = True  # the last two rows, in every channel
    valid = ~invalid[:, 0]

    def call(a, out):
        if target == "forward":
            return fastbn.batch_norm_forward(a, out=out)[0]
        if target == "batch_norm":
            return fastbn.batch_norm(
                a, np.zeros(3, np.float32), np.ones(3, np.float32), training=True, out=out
            )
        return fastbn.BatchNorm(3).forward(a, training=True)

    y = call(np.ma.masked_array(x, mask=invalid), None)
    np.testing.assert_array_equal(y, fastbn.batch_norm_forward(x, mask=valid)[0])
    varying = invalid.copy()
    varying[0, 1] = True
    out = np.full_like(x, 7)
    with pytest.raises(TypeError, match="varies across the channels"):
        call(np.ma.masked_array(x, mask=varying), out)
    assert (out == 7).all()


@cpu_only
def test_matrix_input():
    x = data((6, 3), np.float64)
    y, mean, invstd = fastbn.batch_norm_forward(np.asmatrix(x))
    e_y, e_mean, e_invstd = fastbn.batch_norm_forward(x)
    assert type(y) is np.ndarray
    np.testing.assert_array_equal(y, e_y)
    np.testing.assert_array_equal(mean, e_mean)
    dx, _, _ = fastbn.batch_norm_backward(
        np.asmatrix(np.ones_like(x)), np.asmatrix(x), mean, invstd
    )
    np.testing.assert_array_equal(
        dx, fastbn.batch_norm_backward(np.ones_like(x), x, mean, invstd)[0]
    )
    out = np.asmatrix(np.zeros_like(x))
    assert fastbn.batch_norm_forward(x, out=out)[0] is out
    np.testing.assert_array_equal(np.asarray(out), e_y)
    np.testing.assert_array_equal(
        fastbn.BatchNorm(3, dtype=np.float64).forward(np.asmatrix(x), training=True), e_y
    )


# --------------------------------------------------------------------------------------
# Empty inputs: C = 0, and an empty batch in training
# --------------------------------------------------------------------------------------


@cpu_only
@pytest.mark.parametrize("shape", [(4, 0), (4, 0, 3), (0, 0), (3, 0, 0)])
def test_zero_channels(shape):
    x = np.zeros(shape, np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x)
    assert y.shape == shape and mean.shape == (0,) and invstd.shape == (0,)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(x, x, mean, invstd, np.ones(0, np.float32))
    assert dx.shape == shape and dgamma.shape == (0,) and dbeta.shape == (0,)
    assert fastbn.batch_norm_inference(x, np.zeros(0), np.ones(0)).shape == shape
    assert fastbn.batch_norm(x, np.zeros(0), np.ones(0), training=True).shape == shape
    assert fastbn.batch_norm(x, np.zeros(0), np.ones(0)).shape == shape


@cpu_only
@pytest.mark.parametrize(
    "shape, axis", [((0, 3), 1), ((0, 3, 5), 1), ((2, 0, 3), -1), ((4, 3, 0), 1)]
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch_in_training(shape, axis, dtype):
    C = shape[axis]
    x = np.zeros(shape, dtype)
    y, mean, invstd = fastbn.batch_norm_forward(x, axis=axis)
    assert y.shape == shape and y.dtype == dtype
    assert mean.shape == (C,) and np.isnan(mean).all() and np.isnan(invstd).all()
    rm, rv = np.full(C, 0.5, dtype), np.full(C, 2.0, dtype)
    out = np.empty(shape, dtype)
    assert fastbn.batch_norm(x, rm, rv, training=True, axis=axis, out=out) is out
    assert (
        fastbn.batch_norm(
            x, rm, rv, training=True, axis=axis, momentum=None, num_batches_tracked=0
        ).shape
        == shape
    )
    np.testing.assert_array_equal(rm, np.full(C, 0.5, dtype))
    np.testing.assert_array_equal(rv, np.full(C, 2.0, dtype))
    bn = fastbn.BatchNorm(C, axis=axis, dtype=dtype)
    y = bn.forward(x, training=True)
    assert y.shape == shape and y.dtype == dtype
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.running_mean, np.zeros(C))
    np.testing.assert_array_equal(bn.running_var, np.ones(C))
    dx = bn.backward(np.zeros(shape, dtype))
    assert dx.shape == shape
    np.testing.assert_array_equal(bn.dgamma, np.zeros(C))
    np.testing.assert_array_equal(bn.dbeta, np.zeros(C))


@cpu_only
def test_empty_batch_like_pytorch():
    torch = pytest.importorskip("torch")
    rm, rv = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
    t_rm, t_rv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    t_y = torch.nn.functional.batch_norm(torch.zeros(0, 3, 4), t_rm, t_rv, training=True)
    y = fastbn.batch_norm(np.zeros((0, 3, 4), np.float32), rm, rv, training=True)
    assert y.shape == tuple(t_y.shape)
    np.testing.assert_array_equal(rm, t_rm.numpy())
    np.testing.assert_array_equal(rv, t_rv.numpy())


# --------------------------------------------------------------------------------------
# Scalars: eps, momentum, num_batches_tracked
# --------------------------------------------------------------------------------------

BAD_SCALARS = [
    (dict(eps="1e-5"), TypeError, "eps must be a number"),
    (dict(eps=b"1e-5"), TypeError, "eps must be a number"),
    (dict(eps=True), TypeError, "eps must be a number.*bool"),
    (dict(eps=np.bool_(True)), TypeError, "eps must be a number.*bool"),
    (dict(eps=1j), TypeError, "eps must be a number"),
    (dict(momentum="0.1"), TypeError, "momentum must be a number"),
    (dict(momentum=b"0.1"), TypeError, "momentum must be a number"),
    (dict(momentum=False), TypeError, "momentum must be a number.*bool"),
    (dict(momentum=float("nan")), ValueError, r"momentum must be in \[0, 1\]"),
    (dict(momentum=None, num_batches_tracked="abc"), TypeError, "num_batches_tracked must be"),
    (
        dict(momentum=None, num_batches_tracked=float("nan")),
        ValueError,
        "num_batches_tracked must be an integer",
    ),
    (dict(momentum=None, num_batches_tracked=1.5), ValueError, "num_batches_tracked"),
    (dict(momentum=None, num_batches_tracked=-1), ValueError, "num_batches_tracked"),
    (dict(momentum=0.1, num_batches_tracked="abc"), TypeError, "num_batches_tracked"),
]


@cpu_only
@pytest.mark.parametrize("kwargs, exc, match", BAD_SCALARS)
def test_bad_scalars_are_refused(kwargs, exc, match):
    x = data((6, 3), np.float32)
    rm, rv, out = np.zeros(3, np.float32), np.ones(3, np.float32), np.full_like(x, 7)
    with pytest.raises(exc, match=match):
        fastbn.batch_norm(x, rm, rv, training=True, out=out, **kwargs)
    assert (out == 7).all() and (rm == 0).all() and (rv == 1).all()
    if "eps" in kwargs:
        with pytest.raises(exc, match=match):
            fastbn.batch_norm_forward(x, eps=kwargs["eps"])
        with pytest.raises(exc, match=match):
            fastbn.batch_norm_inference(x, rm, rv, eps=kwargs["eps"])
        with pytest.raises(exc, match=match):
            fastbn.BatchNorm(3, eps=kwargs["eps"])
    if "num_batches_tracked" not in kwargs and "momentum" in kwargs:
        with pytest.raises(exc, match=match):
            fastbn.BatchNorm(3, momentum=kwargs["momentum"])


@cpu_only
def test_numeric_scalars_still_accepted():
    x = data((6, 3), np.float64)
    e = fastbn.batch_norm(x, np.zeros(3), np.ones(3), training=True, eps=1e-3, momentum=0.5)
    for eps, momentum in [(np.float32(1e-3), np.float64(0.5)), (np.array(1e-3), 0.5)]:
        y = fastbn.batch_norm(x, np.zeros(3), np.ones(3), training=True, eps=eps, momentum=momentum)
        np.testing.assert_allclose(y, e, rtol=1e-6)
    fastbn.batch_norm(
        x, np.zeros(3), np.ones(3), training=True, momentum=None, num_batches_tracked=np.int64(3)
    )
    fastbn.batch_norm(x, np.zeros(3), np.ones(3), training=True, eps=1)
    torch = pytest.importorskip("torch")
    fastbn.batch_norm(
        x,
        np.zeros(3),
        np.ones(3),
        training=True,
        eps=torch.tensor(1e-3),
        momentum=None,
        num_batches_tracked=torch.tensor(4),
    )
    bn = fastbn.BatchNorm(3)
    state = {
        k: torch.from_numpy(v) if isinstance(v, np.ndarray) else torch.tensor(v)
        for k, v in bn.state_dict().items()
    }
    bn.load_state_dict(state)  # a state dict of tensors, as PyTorch keeps them
    assert bn.num_batches_tracked == 0 and type(bn.num_batches_tracked) is int


# --------------------------------------------------------------------------------------
# Nothing written before an error
# --------------------------------------------------------------------------------------


@cpu_only
@pytest.mark.parametrize(
    "bad",
    [
        "running_var_shape",
        "running_var_readonly",
        "running_var_int",
        "momentum",
        "on_nonfinite",
        "running_mean_masked",
    ],
)
def test_training_checks_run_before_out_is_written(bad):
    x = data((6, 3), np.float32)
    rm, rv = np.zeros(3, np.float16), np.ones(3, np.float16)
    kwargs = {}
    if bad == "running_var_shape":
        rv = np.ones(4, np.float16)
    elif bad == "running_var_readonly":
        rv.flags.writeable = False
    elif bad == "running_var_int":
        rv = np.ones(3, np.int32)
    elif bad == "momentum":
        kwargs["momentum"] = "0.1"
    elif bad == "on_nonfinite":
        kwargs["on_nonfinite"] = "ignore"
    else:
        rm = _masked(rm)
    out = np.full_like(x, 7)
    rm0, rv0 = np.array(rm), np.array(rv)
    with pytest.raises((TypeError, ValueError)):
        fastbn.batch_norm(x, rm, rv, training=True, out=out, **kwargs)
    assert (out == 7).all()
    np.testing.assert_array_equal(np.asarray(rm), rm0)
    np.testing.assert_array_equal(rv, rv0)


BAD_STATES = [
    ("running_var", np.array(["a", "b", "c"]), TypeError, "real numbers"),
    ("running_var", np.array([None] * 3, dtype=object), TypeError, "real numbers"),
    ("running_mean", [object()] * 3, TypeError, "real numbers"),
    ("gamma", np.ones(4), ValueError, r"shape \(3,\)"),
    ("beta", "abc", TypeError, "real numbers"),
    ("running_mean", np.array([0.0, np.nan, 0.0]), ValueError, "finite"),
    ("running_var", np.array([1.0, 1e300, 1.0]), ValueError, "finite in float32"),
    ("num_batches_tracked", "abc", TypeError, "num_batches_tracked"),
    ("num_batches_tracked", float("nan"), ValueError, "num_batches_tracked"),
    ("num_batches_tracked", -2, ValueError, "num_batches_tracked"),
]


@cpu_only
@pytest.mark.parametrize("key, value, exc, match", BAD_STATES)
def test_load_state_dict_is_all_or_nothing(key, value, exc, match):
    bn = fastbn.BatchNorm(3)
    before = bn.state_dict()
    good = {k: (np.full(3, 5.0, np.float32) if k != "num_batches_tracked" else 9) for k in before}
    # whichever order the entries come in, a bad one leaves every entry unloaded
    for order in (list(good), list(good)[::-1]):
        state = {k: (value if k == key else good[k]) for k in order}
        with pytest.raises(exc, match=match):
            bn.load_state_dict(state)
        after = bn.state_dict()
        for k in before:
            np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    bn.load_state_dict(good)
    np.testing.assert_array_equal(bn.gamma, np.full(3, 5.0))
    assert bn.num_batches_tracked == 9


@cpu_only
@pytest.mark.parametrize(
    "rs_dtype, x_dtype, scale",
    [
        (np.float32, np.float32, 1e20),
        (np.float16, np.float32, 1e3),
        (np.float16, np.float16, 1000.0),
    ],
)
def test_running_update_that_overflows_is_refused(rs_dtype, x_dtype, scale):
    """float32 data of std 1e20: float64 statistics are finite, the running variance
    (~1e39) is not in float32; float16 running statistics overflow past 65504."""
    x = data((8, 3), x_dtype, offset=0.0, scale=scale)
    assert np.isfinite(x).all()
    rm, rv = np.zeros(3, rs_dtype), np.ones(3, rs_dtype)
    out = np.full_like(x, 7)
    with pytest.raises(FloatingPointError, match="running statistics.*would not be finite"):
        fastbn.batch_norm(x, rm, rv, training=True, out=out)
    assert (out == 7).all() and (rm == 0).all() and (rv == 1).all()
    with pytest.raises(FloatingPointError, match="would not be finite"):
        fastbn.batch_norm(x, rm, rv, training=True)
    with pytest.warns(RuntimeWarning, match="would not be finite"):
        y = fastbn.batch_norm(x, rm, rv, training=True, out=out, on_nonfinite="warn")
    assert y is out and (rm == 0).all() and (rv == 1).all()
    assert_close(y, ref.forward(x)[0], **tol(x_dtype))
    bn = fastbn.BatchNorm(3, dtype=rs_dtype)
    with pytest.raises(FloatingPointError, match="would not be finite"):
        bn.forward(x, training=True)
    assert bn.num_batches_tracked == 0 and (bn.running_var == 1).all()
    assert (bn.running_mean == 0).all()
    # no overflow, no error: the same data into float64 running statistics
    rm64, rv64 = np.zeros(3), np.ones(3)
    fastbn.batch_norm(x, rm64, rv64, training=True)
    assert np.isfinite(rv64).all() and (rv64 > 1).all()


# --------------------------------------------------------------------------------------
# comm=: the backward contract under mpiexec -n 2
# --------------------------------------------------------------------------------------


@cpu_only
@pytest.mark.mpi
def test_backward_contract_with_comm_on_two_ranks():
    pytest.importorskip("mpi4py.MPI")
    if find_mpiexec() is None:
        pytest.skip("mpiexec not found")
    result = run_mpi(ROOT / "tests" / "mpi" / "contract_checks.py", 2)
    assert result["size"] == 2
    failures = [
        f"rank {rank}: {case}: {problem}"
        for rank, cases in enumerate(result["ranks"])
        for case, problem in cases.items()
        if problem != "ok"
    ]
    assert not failures, "\n".join(failures)
    assert set(result["ranks"][0]) >= {
        "gamma",
        "beta",
        "both",
        "neither",
        "layer_affine",
        "layer_not_affine",
        "empty_shard_gamma",
    }


# --------------------------------------------------------------------------------------
# Property-based sweep of the argument space
# --------------------------------------------------------------------------------------

ARG_NAMES = (
    "x",
    "dy",
    "mean",
    "invstd",
    "gamma",
    "beta",
    "running_mean",
    "running_var",
    "out",
    "eps",
    "momentum",
    "axis",
    "num_batches_tracked",
    "on_nonfinite",
    "batch statistics",
    "running statistics",
    "training needs",
    "num_features",
    "channels",
)
ALL_DTYPES = [np.dtype(d) for d in ("<f2", "<f4", "<f8")] + SWAPPED
GOOD_EPS = [1e-5, 1e-3, 1, np.float32(1e-4), np.float64(0.5)]
BAD_EPS = [0.0, -1.0, float("nan"), float("inf"), "1e-5", b"1", True, None]
GOOD_MOMENTUM = [0.1, 0, 1, np.float32(0.5), 0.99]
BAD_MOMENTUM = [1.5, -0.1, float("nan"), "0.1", True]


def _layout(a, kind):
    """``a`` (C order) in another memory layout, same values."""
    if kind == "F":
        return np.asfortranarray(a)
    if kind == "strided":  # every other element of a bigger array along axis 0
        big = np.zeros((2 * a.shape[0],) + a.shape[1:], a.dtype)
        big[::2] = a
        return big[::2]
    if kind == "transposed":  # a view whose memory order is reversed
        return np.ascontiguousarray(a.T).T
    return a


def _sweep_case(draw):
    from hypothesis import strategies as st

    op = draw(st.sampled_from(["forward", "backward", "inference", "train", "eval", "layer"]))
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    C = shape[axis]
    dtype = draw(st.sampled_from(ALL_DTYPES))
    layout = draw(st.sampled_from(["C", "F", "strided", "transposed"]))
    seed = draw(st.integers(0, 2**16))
    x = _layout(data(shape, dtype, seed=seed), layout)
    case = dict(op=op, shape=shape, axis=axis, C=C, dtype=dtype, x=x, expect_error=False)
    bad_eps = draw(st.booleans()) and draw(st.booleans())
    case["eps"] = draw(st.sampled_from(BAD_EPS if bad_eps else GOOD_EPS))
    bad_momentum = draw(st.booleans()) and draw(st.booleans())
    case["momentum"] = draw(st.sampled_from(BAD_MOMENTUM if bad_momentum else GOOD_MOMENTUM))
    uses_eps = op != "backward"
    uses_momentum = op in ("train", "layer")
    case["expect_error"] |= (bad_eps and uses_eps) or (bad_momentum and uses_momentum)
    for name in ("gamma", "beta", "running_mean", "running_var"):
        kind = (
            draw(st.sampled_from(["none", "good", "good", "wrong_shape"]))
            if name in ("gamma", "beta")
            else draw(st.sampled_from(["good"] * 5 + ["wrong_shape"]))
        )
        p_dtype = draw(st.sampled_from(ALL_DTYPES))
        if kind == "none":
            case[name] = None
            continue
        n = C if kind == "good" else C + 1
        base = np.full(n, 0.5) if name != "running_var" else np.full(n, 2.0)
        case[name] = (base + 0.1 * np.arange(n)).astype(p_dtype)
        if kind == "wrong_shape":
            case["expect_error"] |= (op != "layer" and name in ("gamma", "beta")) or op in (
                "inference",
                "train",
                "eval",
            )
    out_kind = draw(
        st.sampled_from(
            ["none", "none", "fresh", "fresh_swapped", "alias_x", "wrong_dtype", "wrong_shape"]
        )
    )
    case["out_kind"] = out_kind
    if op != "layer":
        if out_kind == "fresh":
            case["out"] = np.full(shape, 7, native(dtype))
        elif out_kind == "fresh_swapped":
            case["out"] = np.full(shape, 7, dtype.newbyteorder())
        elif out_kind == "alias_x":
            case["out"] = x
        elif out_kind == "wrong_dtype":
            case["out"] = np.full(
                shape, 7, np.float64 if native(dtype) != np.float64 else np.float32
            )
            case["expect_error"] = True
        elif out_kind == "wrong_shape":
            case["out"] = np.full(shape + (1,), 7, native(dtype))
            case["expect_error"] = True
        else:
            case["out"] = None
    else:
        case["out"] = None
    m = x.size // C if C else 0
    if op in ("forward", "train", "layer") and C and m == 1:
        case["expect_error"] = True
    if op == "layer" and C == 0:
        case["expect_error"] = True  # num_features must be >= 1
    return case


def _check_case(case):
    op, x, axis, C = case["op"], case["x"], case["axis"], case["C"]
    dtype = native(case["dtype"])
    t = tol(dtype, 10)
    arrays = {
        k: case[k]
        for k in ("x", "gamma", "beta", "running_mean", "running_var", "out")
        if case.get(k) is not None
    }
    before = {k: np.array(v, copy=True) for k, v in arrays.items()}
    x0 = before["x"]
    gamma = None if case["gamma"] is None else case["gamma"].astype(np.float64)
    beta = None if case["beta"] is None else case["beta"].astype(np.float64)
    eps, momentum = case["eps"], case["momentum"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if op == "forward":
                y, mean, invstd = fastbn.batch_norm_forward(
                    x, case["gamma"], case["beta"], axis=axis, eps=eps, out=case["out"]
                )
            elif op == "inference":
                y = fastbn.batch_norm_inference(
                    x,
                    case["running_mean"],
                    case["running_var"],
                    case["gamma"],
                    case["beta"],
                    axis=axis,
                    eps=eps,
                    out=case["out"],
                )
            elif op in ("train", "eval"):
                y = fastbn.batch_norm(
                    x,
                    case["running_mean"],
                    case["running_var"],
                    case["gamma"],
                    case["beta"],
                    training=op == "train",
                    momentum=momentum,
                    eps=eps,
                    axis=axis,
                    out=case["out"],
                )
            elif op == "backward":
                mean = np.linspace(2.0, 4.0, C) if C else np.zeros(0)
                invstd = np.linspace(0.3, 0.6, C) if C else np.zeros(0)
                dy = _layout(data(x.shape, case["dtype"], seed=9, offset=0.0), "C")
                dx, dgamma, dbeta = fastbn.batch_norm_backward(
                    dy,
                    x,
                    mean.astype(case["dtype"]),
                    invstd.astype(case["dtype"]),
                    case["gamma"],
                    case["beta"],
                    axis=axis,
                    out=case["out"],
                )
            else:  # the layer
                bn = fastbn.BatchNorm(C, axis=axis, eps=eps, momentum=momentum, dtype=case["dtype"])
                y = bn.forward(x, training=True)
                dy = data(x.shape, dtype, seed=9, offset=0.0)
                dx = bn.backward(dy)
    except (TypeError, ValueError, FloatingPointError) as exc:
        message = str(exc)
        assert any(name in message for name in ARG_NAMES), message
        assert not re.search(r"numba|Numba|nopython|unbox", message), message
        for k, v in before.items():
            np.testing.assert_array_equal(np.asarray(arrays[k]), v, err_msg=f"{k} written")
        assert case["expect_error"], f"unexpected error for a valid call: {exc!r}"
        return "error"
    assert not case["expect_error"], f"no error for {case}"
    if op == "backward" and x.size == 0:
        assert dx.shape == x.shape
        if dgamma is not None:
            assert not dgamma.any() and not dbeta.any()
        return "ok"
    if op == "backward":
        e_dx, e_dg, e_db = ref.backward(
            dy.astype(np.float64),
            x0.astype(np.float64),
            mean.astype(case["dtype"]).astype(np.float64),
            invstd.astype(case["dtype"]).astype(np.float64),
            gamma,
            beta,
            axis=axis,
        )
        assert dx.shape == x.shape
        assert dx is case["out"] if case["out"] is not None else dx.dtype == dtype
        assert_close(dx, e_dx, **t, name="dx")
        if case["gamma"] is None and case["beta"] is None:
            assert dgamma is None and dbeta is None
        else:
            assert_close(dgamma, e_dg, **tol(dtype, 100), name="dgamma")
            assert_close(dbeta, e_db, **tol(dtype, 100), name="dbeta")
        return "ok"
    assert y.shape == x.shape
    if case["out"] is not None:
        assert y is case["out"]
    else:
        assert y.dtype == dtype  # native byte order out
    if x.size == 0:
        if op == "forward":
            assert mean.shape == (C,) and np.isnan(mean).all()
        if op == "train":
            np.testing.assert_array_equal(case["running_mean"], before["running_mean"])
            np.testing.assert_array_equal(case["running_var"], before["running_var"])
        return "ok"
    if op in ("inference", "eval"):
        e_y = ref.inference(
            x0,
            case["running_mean"].astype(np.float64),
            case["running_var"].astype(np.float64),
            gamma,
            beta,
            axis=axis,
            eps=float(eps),
        )
    elif op == "layer":
        e_y = ref.forward(x0, None, None, axis=axis, eps=float(eps))[0]
    else:
        e_y, e_mean, e_invstd, e_var = ref.forward(x0, gamma, beta, axis=axis, eps=float(eps))
    assert_close(y, e_y, **t, name="y")
    if op == "forward":
        assert_close(mean, e_mean, **t, name="mean")
        assert_close(invstd, e_invstd, **t, name="invstd")
    if op == "train":
        rm, rv = case["running_mean"], case["running_var"]
        e_rm, e_rv = ref.update_running(
            before["running_mean"],
            before["running_var"],
            e_mean,
            e_var,
            x.size // C,
            float(momentum),
        )
        assert_close(rm, e_rm, **tol(rm.dtype.newbyteorder("="), 10), name="running_mean")
        assert_close(rv, e_rv, **tol(rv.dtype.newbyteorder("="), 10), name="running_var")
    return "ok"


@cpu_only
def test_property_sweep_of_the_argument_space():
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    outcomes = []

    @settings(
        max_examples=400,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def sweep(d):
        outcomes.append(_check_case(_sweep_case(d.draw)))

    sweep()
    assert outcomes.count("ok") > 50 and outcomes.count("error") > 20, (
        outcomes.count("ok"),
        outcomes.count("error"),
    )
    del hypothesis


# --------------------------------------------------------------------------------------
# CUDA (simulator child process, or a real GPU)
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(RUN_CUDA_HERE, reason="the CUDA tests run in this process")
def test_cuda_contract_under_simulator():
    """Run the ``needs_cuda`` tests of this file under the CUDA simulator."""
    pytest.importorskip("numba.cuda")
    env = dict(os.environ, **SIM_ENV, FASTBN_CONTRACT_CUDA_CHILD="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            os.path.abspath(__file__),
            "-k",
            "cuda_ and not under_simulator",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"CUDA contract tests failed under the simulator:\n{proc.stdout}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout


if RUN_CUDA_HERE:
    from numba import cuda

    import fastbn.cuda as fcuda

    def dev(a):
        return None if a is None else cuda.to_device(np.ascontiguousarray(a))

    def host(a):
        return None if a is None else fcuda.to_host(a)


@needs_cuda
@pytest.mark.parametrize("name, with_gamma, with_beta", AFFINE_CASES)
@pytest.mark.parametrize("empty", [False, True])
def test_cuda_backward_returns_both_gradients_when_affine(name, with_gamma, with_beta, empty):
    shape = (0, 3, 5) if empty else (6, 3, 5)
    x = data(shape, np.float32)
    dy = data(shape, np.float32, seed=3, offset=0.5)
    gamma, beta = params(3, np.float32)
    g = gamma if with_gamma else None
    b = beta if with_beta else None
    _, mean, invstd = fastbn.batch_norm_forward(dev(x), dev(g), dev(b))
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dev(dy), dev(x), mean, invstd, dev(g), dev(b))
    if not (with_gamma or with_beta):
        assert dgamma is None and dbeta is None
        return
    assert dgamma is not None and dbeta is not None
    if empty:
        assert np.isnan(host(mean)).all()
        np.testing.assert_array_equal(host(dgamma), np.zeros(3))
        np.testing.assert_array_equal(host(dbeta), np.zeros(3))
        return
    e_dx, e_dg, e_db = ref.backward(dy, x, host(mean), host(invstd), g, b)
    assert_close(host(dgamma), e_dg, **tol(np.float32, 10), name="dgamma")
    assert_close(host(dbeta), e_db, **tol(np.float32, 10), name="dbeta")


@needs_cuda
def test_cuda_float16_running_statistics_and_layer():
    x = data((16, 3, 5), np.float16)
    rm, rv = dev(np.full(3, 0.5, np.float16)), dev(np.full(3, 2.0, np.float16))
    fastbn.batch_norm(dev(x), rm, rv, training=True, momentum=0.25)
    fcuda.check_nonfinite()
    _, mean, _, var = ref.forward(x)
    e_m, e_v = ref.update_running(np.full(3, 0.5), np.full(3, 2.0), mean, var, 80, 0.25)
    assert_close(host(rm), e_m, **tol(np.float16))
    assert_close(host(rv), e_v, **tol(np.float16))
    bn = fastbn.BatchNorm(3, dtype=np.float16).to("cuda")
    y = bn.forward(dev(x), training=True)
    fcuda.check_nonfinite()
    assert_close(host(y), ref.forward(x)[0], **tol(np.float16))
    bn.backward(dev(np.ones_like(x)))
    assert bn.num_batches_tracked == 1 and host(bn.dbeta).dtype == np.float16
    np.testing.assert_allclose(host(bn.dbeta), np.full(3, 80.0))


@needs_cuda
def test_cuda_empty_batch_in_training():
    x = np.zeros((0, 3, 4), np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(dev(x))
    assert host(y).shape == x.shape and np.isnan(host(mean)).all()
    rm, rv = dev(np.full(3, 0.5, np.float32)), dev(np.full(3, 2.0, np.float32))
    assert host(fastbn.batch_norm(dev(x), rm, rv, training=True)).shape == x.shape
    np.testing.assert_array_equal(host(rm), np.full(3, 0.5))
    np.testing.assert_array_equal(host(rv), np.full(3, 2.0))
    bn = fastbn.BatchNorm(3).to("cuda")
    assert host(bn.forward(dev(x), training=True)).shape == x.shape
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(host(bn.running_var), np.ones(3))
    assert host(bn.backward(dev(x))).shape == x.shape
    np.testing.assert_array_equal(host(bn.dgamma), np.zeros(3))
    np.testing.assert_array_equal(host(bn.dbeta), np.zeros(3))
    z = np.zeros((4, 0), np.float32)
    y, mean, _ = fastbn.batch_norm_forward(dev(z))
    assert host(y).shape == (4, 0) and host(mean).shape == (0,)


@needs_cuda
@pytest.mark.parametrize("rs_dtype, scale", [(np.float32, 1e20), (np.float16, 1e3)])
def test_cuda_running_update_that_overflows_is_refused(rs_dtype, scale):
    x = data((8, 3), np.float32, offset=0.0, scale=scale)
    rm, rv = dev(np.zeros(3, rs_dtype)), dev(np.ones(3, rs_dtype))
    y = fastbn.batch_norm(dev(x), rm, rv, training=True)
    with pytest.raises(FloatingPointError, match="overflow"):
        fcuda.check_nonfinite()
    np.testing.assert_array_equal(host(rm), np.zeros(3))
    np.testing.assert_array_equal(host(rv), np.ones(3))
    assert_close(host(y), ref.forward(x)[0], **tol(np.float32))
    rm, rv = dev(np.zeros(3)), dev(np.ones(3))
    fastbn.batch_norm(dev(x), rm, rv, training=True)
    fcuda.check_nonfinite()
    assert (host(rv) > 1).all()


@needs_cuda
def test_cuda_layer_given_a_host_array_in_training():
    bn = fastbn.BatchNorm(3).to("cuda")
    x = data((6, 3), np.float32)
    with pytest.raises(TypeError, match="host array.*layer is on the GPU"):
        bn.forward(x, training=True)
    with pytest.raises(TypeError, match="CUDA arrays"):
        bn.forward(x, training=False)
    assert bn.num_batches_tracked == 0


@needs_cuda
def test_cuda_bad_scalars_and_byte_order():
    x = data((6, 3), np.float32)
    rm, rv = dev(np.zeros(3, np.float32)), dev(np.ones(3, np.float32))
    for eps in ("1e-5", True, b"1"):
        with pytest.raises(TypeError, match="eps must be a number"):
            fastbn.batch_norm_forward(dev(x), eps=eps)
    with pytest.raises(TypeError, match="momentum must be a number"):
        fastbn.batch_norm(dev(x), rm, rv, training=True, momentum="0.1")
    with pytest.raises(TypeError, match="num_batches_tracked"):
        fastbn.batch_norm(dev(x), rm, rv, training=True, momentum=None, num_batches_tracked="a")
    with pytest.raises(TypeError, match="x must be in native byte order"):
        fastbn.batch_norm_forward(cuda.to_device(x.astype(SWAPPED[0])))
    np.testing.assert_array_equal(host(rm), np.zeros(3))


@needs_cuda
@pytest.mark.parametrize("with_gamma, with_beta", [(True, False), (False, True), (False, False)])
def test_cuda_backward_contract_with_comm(with_gamma, with_beta):
    """The GPU's synchronized backward (host-staged sums) follows the contract too; one
    rank (COMM_SELF) runs the same code path as many."""
    MPI = pytest.importorskip("mpi4py.MPI")
    x = data((6, 3, 5), np.float32)
    dy = data(x.shape, np.float32, seed=3, offset=0.5)
    gamma, beta = params(3, np.float32)
    g = gamma if with_gamma else None
    b = beta if with_beta else None
    _, mean, invstd = fastbn.batch_norm_forward(dev(x), dev(g), dev(b), comm=MPI.COMM_SELF)
    _, dgamma, dbeta = fastbn.batch_norm_backward(
        dev(dy), dev(x), mean, invstd, dev(g), dev(b), comm=MPI.COMM_SELF
    )
    if not (with_gamma or with_beta):
        assert dgamma is None and dbeta is None
        return
    assert dgamma is not None and dbeta is not None
    _, e_dg, e_db = ref.backward(dy, x, host(mean), host(invstd), g, b)
    assert_close(host(dgamma), e_dg, **tol(np.float32, 10), name="dgamma")
    assert_close(host(dbeta), e_db, **tol(np.float32, 10), name="dbeta")


@needs_cuda
def test_cuda_layer_load_state_dict_is_all_or_nothing():
    bn = fastbn.BatchNorm(3).to("cuda")
    before = bn.state_dict()
    state = {k: (np.full(3, 5.0, np.float32) if k != "num_batches_tracked" else 9) for k in before}
    state["running_var"] = np.array([None] * 3, dtype=object)
    with pytest.raises(TypeError, match=r"state_dict\['running_var'\]"):
        bn.load_state_dict(state)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    state["running_var"] = dev(np.full(3, 2.0, np.float32))  # device values load too
    bn.load_state_dict(state)
    np.testing.assert_array_equal(host(bn.running_var), np.full(3, 2.0))
    np.testing.assert_array_equal(host(bn.gamma), np.full(3, 5.0))
