"""The backward through fixed statistics (``batch_norm_backward(..., training=False)``,
frozen BatchNorm) and the layer's ways to use it, on the CPU.

Checked against the float64 NumPy reference (tests/reference.py), PyTorch's autograd on
the formula ``y = (x - mean) * invstd * gamma + beta`` with ``mean``/``invstd`` constants
(when PyTorch is installed) and finite differences. The CUDA kernels run the same checks
in tests/test_cuda.py (simulator), ``comm=`` in tests/mpi/frozen_checks.py.
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

import fastbn

sys.path.insert(0, os.path.dirname(__file__))
import reference as ref
from helpers import assert_close, find_mpiexec, run_mpi, tol

ROOT = Path(__file__).resolve().parents[1]

# (shape, axis): 2-D, NCHW, NHWC (axis=-1), 3-D, volumes, odd and prime sizes, C = 1
LAYOUTS = [
    ((7, 3), 1),
    ((4, 5, 3, 3), 1),
    ((4, 3, 3, 5), -1),
    ((5, 4, 7), 1),
    ((3, 2, 3, 4, 5), 1),
    ((1, 3, 199), 1),
    ((13, 1), 1),
    ((2, 1, 17), 1),
]
# large enough for the parallel builds and several reduction chunks per channel
LARGE = [((20011, 37), 1), ((16, 8, 4001), 1), ((6, 31, 31, 24), -1)]
DTYPES = [np.float32, np.float64, np.float16]


def grads_dtype(dtype):
    return np.float64 if dtype == np.float64 else np.float32


def case(shape, axis, dtype, seed=0, offset=3.0):
    """x, dy, fixed statistics (as running statistics give them), gamma, beta."""
    rng = np.random.default_rng(seed)
    C = shape[axis]
    x = (offset + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    running_mean = offset + rng.standard_normal(C)
    running_var = 4.0 * rng.uniform(0.5, 1.5, C)
    invstd = 1.0 / np.sqrt(running_var + 1e-5)
    gamma = (1.0 + 0.5 * rng.standard_normal(C)).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    return x, dy, running_mean, invstd, gamma, beta


def check(result, expected, dtype, m, name=""):
    """dx elementwise at the dtype's tolerance (one rounding of ``gamma * invstd`` and one
    of the product); the parameter gradients, float64 sums of exact inputs stored in the
    statistics dtype, at its tolerance widened by sqrt(m) (cancellation in the sums)."""
    dx, dgamma, dbeta = result
    e_dx, e_dgamma, e_dbeta = expected
    assert dx.dtype == dtype and dx.shape == e_dx.shape
    assert_close(dx, e_dx, **tol(dtype), name=f"{name} dx")
    gdt = grads_dtype(dtype)
    assert dgamma.dtype == gdt and dbeta.dtype == gdt
    assert_close(dgamma, e_dgamma, **tol(gdt, np.sqrt(m)), name=f"{name} dgamma")
    assert_close(dbeta, e_dbeta, **tol(gdt, np.sqrt(m)), name=f"{name} dbeta")


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", LAYOUTS + LARGE)
def test_matches_reference(shape, axis, dtype, activation):
    if shape in [s for s, _ in LARGE] and dtype == np.float16 and activation:
        pytest.skip("the large cases run float16 without ReLU only (time)")
    x, dy, mean, invstd, gamma, beta = case(shape, axis, dtype)
    result = fastbn.batch_norm_backward(
        dy, x, mean, invstd, gamma, beta, axis=axis, activation=activation, training=False
    )
    expected = ref.frozen_backward(dy, x, mean, invstd, gamma, beta, axis, activation)
    check(result, expected, dtype, x.size // shape[axis], f"{shape} {dtype.__name__}")


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("shape, axis", [((7, 3), 1), ((4, 5, 3, 3), 1), ((4, 3, 3, 5), -1)])
def test_matches_torch_autograd(shape, axis, activation):
    """PyTorch differentiates ``y = (x - mean) * invstd * gamma + beta`` (then ReLU) with
    the statistics as constants; float64 throughout, so only rounding separates them."""
    torch = pytest.importorskip("torch")
    x, dy, mean, invstd, gamma, beta = case(shape, axis, np.float64)
    view = [1] * len(shape)
    view[axis] = -1
    tx = torch.tensor(x, requires_grad=True)
    tg = torch.tensor(gamma, requires_grad=True)
    tb = torch.tensor(beta, requires_grad=True)
    y = (tx - torch.tensor(mean).view(view)) * torch.tensor(invstd).view(view) * tg.view(
        view
    ) + tb.view(view)
    if activation:
        y = torch.relu(y)
    y.backward(torch.tensor(dy))
    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        dy, x, mean, invstd, gamma, beta, axis=axis, activation=activation, training=False
    )
    assert_close(dx, tx.grad.numpy(), rtol=1e-12, atol=1e-12, name="dx")
    assert_close(dgamma, tg.grad.numpy(), rtol=1e-11, atol=1e-11, name="dgamma")
    assert_close(dbeta, tb.grad.numpy(), rtol=1e-11, atol=1e-11, name="dbeta")


@pytest.mark.parametrize("shape, axis", [((4, 3, 5), 1), ((6, 2, 2, 3), -1)])
def test_matches_aten_eval_backward(shape, axis):
    """PyTorch's own eval-mode BatchNorm backward (``train=False``), NC* layouts."""
    torch = pytest.importorskip("torch")
    x, dy, mean, invstd, gamma, beta = case(shape, axis, np.float64)
    running_var = 1.0 / invstd**2 - 1e-5
    tx, tdy = torch.tensor(np.moveaxis(x, axis, 1)), torch.tensor(np.moveaxis(dy, axis, 1))
    dx, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
        tdy,
        tx,
        torch.tensor(gamma),
        torch.tensor(mean),
        torch.tensor(running_var),
        None,
        None,
        False,
        1e-5,
        [True, True, True],
    )
    got = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta, axis=axis, training=False)
    assert_close(np.moveaxis(got[0], axis, 1), dx.numpy(), rtol=1e-9, atol=1e-9, name="dx")
    assert_close(got[1], dgamma.numpy(), rtol=1e-9, atol=1e-9, name="dgamma")
    assert_close(got[2], dbeta.numpy(), rtol=1e-9, atol=1e-9, name="dbeta")


@pytest.mark.parametrize("activation", [None, "relu"])
def test_finite_differences(activation):
    """Central differences of ``sum(w * y)`` with fixed statistics, float64."""
    shape, axis = (5, 3, 4), 1
    x, w, mean, invstd, gamma, beta = case(shape, axis, np.float64, seed=3)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        w, x, mean, invstd, gamma, beta, axis=axis, activation=activation, training=False
    )
    h = 1e-6

    def loss(x_, g_, b_):
        return ref.frozen_loss(x_, g_, b_, w, mean, invstd, axis, activation)

    rng = np.random.default_rng(4)
    for idx in [tuple(rng.integers(0, n) for n in shape) for _ in range(12)]:
        e = np.zeros_like(x)
        e[idx] = h
        fd = (loss(x + e, gamma, beta) - loss(x - e, gamma, beta)) / (2 * h)
        assert abs(dx[idx] - fd) <= 1e-6 * (1 + abs(fd)), (idx, dx[idx], fd)
    for c in range(shape[axis]):
        e = np.zeros(shape[axis])
        e[c] = h
        fd_g = (loss(x, gamma + e, beta) - loss(x, gamma - e, beta)) / (2 * h)
        fd_b = (loss(x, gamma, beta + e) - loss(x, gamma, beta - e)) / (2 * h)
        assert abs(dgamma[c] - fd_g) <= 1e-6 * (1 + abs(fd_g)), (c, dgamma[c], fd_g)
        assert abs(dbeta[c] - fd_b) <= 1e-6 * (1 + abs(fd_b)), (c, dbeta[c], fd_b)


def test_differs_from_the_training_gradient():
    """training=False is another gradient, and training=True stays today's."""
    x, dy, _, _, gamma, beta = case((8, 3), 1, np.float64)
    _, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta)
    train = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta)
    assert_close(train[0], ref.backward(dy, x, mean, invstd, gamma, beta)[0], **tol(np.float64))
    frozen = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta, training=False)
    assert_close(frozen[0], dy * gamma * invstd, **tol(np.float64))
    assert not np.allclose(train[0], frozen[0])
    # the parameter gradients are the same formulas in both
    assert_close(frozen[1], train[1], **tol(np.float64))
    assert_close(frozen[2], train[2], **tol(np.float64))


def test_affine_contract():
    """dgamma and dbeta whenever gamma or beta is given, both None otherwise."""
    x, dy, mean, invstd, gamma, beta = case((6, 4, 5), 1, np.float32)
    for g, b in ((gamma, None), (None, beta), (gamma, beta)):
        dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, x, mean, invstd, g, b, training=False)
        e = ref.frozen_backward(dy, x, mean, invstd, g, b)
        check((dx, dgamma, dbeta), e, np.float32, 30)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, x, mean, invstd, training=False)
    assert dgamma is None and dbeta is None
    assert_close(dx, ref.frozen_backward(dy, x, mean, invstd)[0], **tol(np.float32))


def test_non_contiguous_and_fortran_inputs():
    x, dy, mean, invstd, gamma, beta = case((9, 3, 8), 1, np.float32)
    expected = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta, training=False)
    wide_x = np.zeros((9, 3, 16), np.float32)
    wide_x[:, :, ::2] = x
    wide_dy = np.zeros_like(wide_x)
    wide_dy[:, :, ::2] = dy
    variants = [
        (wide_dy[:, :, ::2], wide_x[:, :, ::2]),
        (np.asfortranarray(dy), np.asfortranarray(x)),
        (dy, np.asfortranarray(x)),
        (dy[::-1], x[::-1]),
    ]
    for k, (d, xx) in enumerate(variants):
        got = fastbn.batch_norm_backward(d, xx, mean, invstd, gamma, beta, training=False)
        flip = slice(None, None, -1) if k == 3 else slice(None)
        assert_close(got[0][flip], expected[0], **tol(np.float32), name=f"variant {k} dx")
        assert_close(got[1], expected[1], **tol(np.float32, 10), name=f"variant {k} dgamma")
        assert_close(got[2], expected[2], **tol(np.float32, 10), name=f"variant {k} dbeta")
    # big-endian data and parameters, float32 statistics
    got = fastbn.batch_norm_backward(
        dy.astype(">f4"),
        x.astype(">f4"),
        mean.astype(">f8"),
        invstd.astype(np.float32),
        gamma.astype(">f4"),
        beta,
        training=False,
    )
    assert got[0].dtype == np.float32 and got[0].dtype.isnative
    assert_close(got[0], expected[0], **tol(np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_out_and_out_is_dy(dtype):
    x, dy, mean, invstd, gamma, beta = case((5, 3, 6), 1, dtype)
    expected = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta, training=False)
    out = np.full_like(x, 7)
    dx, _, _ = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta, out=out, training=False)
    assert dx is out
    assert np.array_equal(out, expected[0])
    dy2 = dy.copy()
    dx, dgamma, _ = fastbn.batch_norm_backward(
        dy2, x, mean, invstd, gamma, beta, out=dy2, training=False
    )
    assert dx is dy2
    assert np.array_equal(dy2, expected[0])
    assert np.array_equal(dgamma, expected[1])
    # a Fortran-ordered out receives the same values (the general path's copy)
    out_f = np.asfortranarray(np.zeros_like(x))
    fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta, out=out_f, training=False)
    assert np.array_equal(out_f, expected[0])


@pytest.mark.parametrize(
    "shape, axis",
    [
        ((16, 8, 1001), 1),  # strided, runs vectorized and remainders
        ((2, 4, 9001), 1),  # strided, runs longer than _config.FROZEN_PIECE
        ((30, 20, 20, 9), -1),  # rows
        ((20000, 37), 1),  # rows, odd C
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_is_dy_or_x_bitwise_on_vectorized_sizes(shape, axis, dtype):
    """``out=dy`` and ``out=x`` give the bits of a separate out, on arrays large enough for
    the parallel build and runs long enough for the vectorized loops (where an in-place
    write would send LLVM to its scalar fallback, which sums in another order)."""
    x, dy, mean, invstd, gamma, beta = case(shape, axis, dtype, seed=4)
    for activation in (None, "relu"):
        kw = dict(axis=axis, activation=activation, training=False)
        expected = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta, **kw)
        dy2 = dy.copy()
        got_dy = fastbn.batch_norm_backward(dy2, x, mean, invstd, gamma, beta, out=dy2, **kw)
        x2 = x.copy()
        got_x = fastbn.batch_norm_backward(dy, x2, mean, invstd, gamma, beta, out=x2, **kw)
        assert got_dy[0] is dy2 and got_x[0] is x2
        for got in (got_dy, got_x):
            for a, b, name in zip(got, expected, ("dx", "dgamma", "dbeta")):
                assert np.array_equal(a, b), f"{name} differs in place: {shape} {activation}"


def test_direct_and_general_paths_bitwise_equal():
    """The direct path (C-contiguous NumPy) and the general one (here: a list gamma) run
    the same kernel on the same view."""
    for shape, axis in [((300, 7), 1), ((6, 5, 40), 1), ((4, 6, 5, 3), -1)]:
        x, dy, mean, invstd, gamma, beta = case(shape, axis, np.float32)
        a = fastbn.batch_norm_backward(
            dy, x, mean, invstd, gamma, beta, axis=axis, activation="relu", training=False
        )
        b = fastbn.batch_norm_backward(
            dy,
            x,
            list(mean),
            invstd,
            list(gamma.astype(np.float64)),
            beta,
            axis=axis,
            activation="relu",
            training=False,
        )
        for u, v in zip(a, b):
            assert np.array_equal(u, v)


def test_empty_batch():
    x = np.zeros((0, 3, 4), np.float32)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        x, x, np.zeros(3), np.ones(3), np.ones(3), training=False
    )
    assert dx.shape == x.shape
    assert np.array_equal(dgamma, np.zeros(3)) and np.array_equal(dbeta, np.zeros(3))


def test_one_value_per_channel_is_fine():
    """Fixed statistics need no batch: one value per channel has a gradient."""
    x, dy, mean, invstd, gamma, beta = case((1, 4), 1, np.float64)
    got = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta, training=False)
    check(got, ref.frozen_backward(dy, x, mean, invstd, gamma, beta), np.float64, 1)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(training=1), TypeError, "training"),
        (dict(training="no"), TypeError, "training"),
        (dict(mean=np.zeros(4)), ValueError, "mean"),
        (dict(invstd=None), TypeError, "invstd"),
        (dict(gamma=np.ones((3, 1))), ValueError, "gamma"),
        (dict(out=np.zeros((5, 3, 6), np.float64)), ValueError, "out"),
        (dict(activation="tanh"), ValueError, "activation"),
        (dict(axis=3), ValueError, "axis"),
    ],
)
def test_errors_before_anything_is_written(kwargs, error, words):
    x, dy, mean, invstd, gamma, beta = case((5, 3, 6), 1, np.float32)
    args = dict(mean=mean, invstd=invstd, gamma=gamma, beta=beta, training=False, axis=1)
    args.update(kwargs)
    out = args.pop("out", None)
    dy_before = dy.copy()
    target = np.full_like(x, 7) if out is None else out
    before = target.copy()
    mean_, invstd_ = args.pop("mean"), args.pop("invstd")
    with pytest.raises(error, match=words):
        fastbn.batch_norm_backward(dy, x, mean_, invstd_, out=target, **args)
    assert np.array_equal(target, before)
    assert np.array_equal(dy, dy_before)


def test_numpy_bool_training():
    x, dy, mean, invstd, gamma, beta = case((5, 3), 1, np.float64)
    a = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, training=np.False_)
    b = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, training=False)
    assert np.array_equal(a[0], b[0])


def test_bitwise_identical_for_any_thread_count(kernel_path):
    import numba

    default = numba.get_num_threads()
    try:
        for shape, axis in [((50001, 7), 1), ((16, 8, 1001), 1), ((30, 20, 20, 9), -1)]:
            x, dy, mean, invstd, gamma, beta = case(shape, axis, np.float32, seed=9)
            results = []
            for threads in sorted({1, 2, default}):
                numba.set_num_threads(threads)
                for _ in range(2):
                    results.append(
                        fastbn.batch_norm_backward(
                            dy,
                            x,
                            mean,
                            invstd,
                            gamma,
                            beta,
                            axis=axis,
                            activation="relu",
                            training=False,
                        )
                    )
            for r in results[1:]:
                for a, b in zip(results[0], r):
                    assert np.array_equal(a, b), f"results differ between thread counts: {shape}"
    finally:
        numba.set_num_threads(default)


# --------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------


def trained_layer(dtype=np.float64, **kwargs):
    bn = fastbn.BatchNorm(3, dtype=dtype, **kwargs)
    rng = np.random.default_rng(11)
    for _ in range(3):
        bn.forward((2.0 + 3.0 * rng.standard_normal((16, 3, 5))).astype(dtype), training=True)
    bn.gamma[:] = [1.5, -0.5, 2.0]
    bn.beta[:] = [0.1, 0.2, -0.3]
    return bn


def layer_state(bn):
    return bn.running_mean.copy(), bn.running_var.copy(), bn.num_batches_tracked


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_layer_backward_after_eval_forward(dtype, activation):
    bn = trained_layer(dtype, activation=activation)
    rm, rv, n = layer_state(bn)
    x, dy, *_ = case((7, 3, 5), 1, dtype, seed=12, offset=2.0)
    y = bn.forward(x, training=False)
    dx = bn.backward(dy)
    invstd = 1.0 / np.sqrt(rv.astype(np.float64) + bn.eps)
    e = ref.frozen_backward(dy, x, rm, invstd, bn.gamma, bn.beta, 1, activation)
    assert dx.dtype == dtype and bn.dgamma.dtype == dtype and bn.dbeta.dtype == dtype
    assert_close(dx, e[0], **tol(dtype))
    assert_close(bn.dgamma, e[1], **tol(dtype, 6))
    assert_close(bn.dbeta, e[2], **tol(dtype, 6))
    # running statistics untouched, the output is the inference output
    assert np.array_equal(bn.running_mean, rm) and np.array_equal(bn.running_var, rv)
    assert bn.num_batches_tracked == n
    assert np.array_equal(
        y,
        fastbn.batch_norm_inference(
            x, bn.running_mean, bn.running_var, bn.gamma, bn.beta, activation=activation
        ),
    )
    # the functional call with the same statistics gives the same bits
    f = fastbn.batch_norm_backward(
        dy, x, rm.astype(np.float64), invstd, bn.gamma, bn.beta, activation=activation,
        training=False,
    )  # fmt: skip
    assert np.array_equal(dx, f[0])


def test_layer_frozen_option():
    """frozen=True: running statistics in training mode too, a gradient through them."""
    bn = trained_layer()
    rm, rv, n = layer_state(bn)
    x, dy, *_ = case((7, 3, 5), 1, np.float64, seed=13)
    y_eval = bn.forward(x, training=False)
    dx_eval = bn.backward(dy)
    dgamma_eval = bn.dgamma.copy()
    bn.frozen = True
    assert np.array_equal(bn.forward(x, training=True), y_eval)
    assert np.array_equal(bn(x), y_eval)
    assert np.array_equal(bn.backward(dy), dx_eval)
    assert np.array_equal(bn.dgamma, dgamma_eval)
    assert layer_state(bn)[2] == n
    assert np.array_equal(bn.running_mean, rm) and np.array_equal(bn.running_var, rv)
    built = fastbn.BatchNorm(3, frozen=True)
    assert built.frozen and built.update_running_stats
    with pytest.raises(ValueError, match="track_running_stats"):
        fastbn.BatchNorm(3, frozen=True, track_running_stats=False)


def test_layer_batch_statistics_without_update():
    """update_running_stats=False: batch statistics and the training gradient, the
    running statistics and num_batches_tracked untouched."""
    untouched = trained_layer(update_running_stats=False)  # the constructor option
    assert not untouched.update_running_stats and untouched.num_batches_tracked == 0
    assert np.array_equal(untouched.running_mean, np.zeros(3))
    bn = trained_layer()
    bn.update_running_stats = False  # the attribute, from now on
    ref_bn = trained_layer()
    rm, rv, n = layer_state(bn)
    x, dy, *_ = case((7, 3, 5), 1, np.float64, seed=14)
    y = bn.forward(x, training=True)
    dx = bn.backward(dy)
    assert np.array_equal(bn.running_mean, rm) and np.array_equal(bn.running_var, rv)
    assert bn.num_batches_tracked == n
    e_y, mean, invstd, _ = ref.forward(x, bn.gamma, bn.beta, 1, bn.eps)
    assert_close(y, e_y, **tol(np.float64))
    e = ref.backward(dy, x, mean, invstd, bn.gamma, bn.beta, 1)
    assert_close(dx, e[0], **tol(np.float64))
    assert_close(bn.dgamma, e[1], **tol(np.float64))
    # the general path (a list input) too
    bn.forward(x.tolist(), training=True)
    assert np.array_equal(bn.running_mean, rm) and bn.num_batches_tracked == n
    # and the same layer updating gives other running statistics
    ref_bn.forward(x, training=True)
    assert not np.array_equal(ref_bn.running_mean, rm)


def test_layer_eval_backward_general_path_and_errors():
    bn = trained_layer(np.float32)
    x, dy, *_ = case((7, 3, 5), 1, np.float32, seed=15)
    bn.forward(x, training=False)
    direct = bn.backward(dy)
    bn.forward(np.asfortranarray(x), training=False)  # the general path
    assert np.array_equal(bn.backward(np.asfortranarray(dy)), direct)
    bn.forward(x.tolist(), training=False)  # a list: float64 data, float64 dy
    dx64 = bn.backward(dy.astype(np.float64))
    assert dx64.dtype == np.float64
    assert_close(dx64, direct, **tol(np.float32))
    with pytest.raises(ValueError, match="dy"):
        bn.backward(dy[:3])
    fresh = fastbn.BatchNorm(3)
    with pytest.raises(RuntimeError, match="forward"):
        fresh.backward(dy)


def test_layer_not_affine():
    bn = fastbn.BatchNorm(3, affine=False, dtype=np.float64)
    x, dy, *_ = case((7, 3), 1, np.float64, seed=16)
    bn.forward(x, training=False)
    dx = bn.backward(dy)
    assert bn.dgamma is None and bn.dbeta is None
    assert_close(dx, dy / np.sqrt(1.0 + bn.eps), **tol(np.float64))


# --------------------------------------------------------------------------------------
# comm=: tests/mpi/frozen_checks.py under mpiexec
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ranks", [2, 3])
def test_synchronized_frozen_backward(ranks):
    pytest.importorskip("mpi4py.MPI")
    if find_mpiexec() is None:
        pytest.skip("mpiexec not found")
    result = run_mpi(ROOT / "tests" / "mpi" / "frozen_checks.py", ranks)
    assert result["size"] == ranks
    failures = [
        f"rank {rank}: {name}: {outcome}"
        for rank, outcomes in enumerate(result["ranks"])
        for name, outcome in outcomes.items()
        if outcome != "ok"
    ]
    assert not failures, "\n".join(failures)
    assert set(result["ranks"][0]) >= {
        "NC_float32",
        "NCHW_float64",
        "NHWC_float32",
        "relu_float64",
        "neither",
        "empty_shard",
        "out_untouched_on_mismatch",
        "mixed_training",
        "layer_eval",
        "layer_mixed",
    }
