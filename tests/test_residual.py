"""The fused residual add ``residual=z``: ``y = act(bn(x) + z)`` and its backward (CPU).

Against the float64 reference (tests/reference.py: ``residual_forward``,
``residual_backward``), finite differences of the reference loss, PyTorch's autograd of
``relu(batch_norm(x) + z)`` when PyTorch is installed, and fastbn's own calls without a
residual. The CUDA kernels meet the same checks in tests/test_cuda.py.
"""

import numpy as np
import pytest
import reference as ref
from helpers import assert_close, tol

import fastbn

SHAPES = [
    ((7, 3), 1),  # (N, C): rows family, serial
    ((199, 1), 1),  # C = 1
    ((3, 5, 7), 1),  # (N, C, L): strided, odd sizes
    ((2, 3, 4, 5), 1),  # NCHW
    ((4, 5, 6, 3), -1),  # NHWC
    ((2, 3, 2, 3, 5), 1),  # 3-D volume (NCDHW)
    ((5, 7, 11), 2),  # channel last of a 3-D array
    ((16, 8, 1001), 1),  # strided, parallel build
    ((40001, 5), 1),  # rows, several chunks, parallel build
]
DTYPES = [np.float16, np.float32, np.float64]


def make(shape, dtype, rng, offset=0.0, scale=1.0):
    return (offset + scale * rng.standard_normal(shape)).astype(dtype)


def params(C, rng, dtype):
    return rng.uniform(0.5, 1.5, C).astype(dtype), rng.normal(size=C).astype(dtype)


def other_layout(z, kind):
    """``z``'s values in another memory layout than C order."""
    if kind == "F":
        return np.asfortranarray(z)
    big = np.zeros(z.shape[:-1] + (2 * z.shape[-1],), z.dtype)
    big[..., ::2] = z
    return big[..., ::2]


def stats_tol(dtype, m):
    """Tolerance of per-channel sums over ``m`` values: float16 data computes in float32
    and returns float32 gradients; errors of a sum grow like sqrt(m)."""
    base = np.float32 if dtype == np.float16 else dtype
    return tol(base, scale=np.sqrt(m))


def dx_tol(dtype):
    # float16 dx: dy, x and z are float16 and dx is rounded to float16 from float32
    # coefficients: a few float16 ulps of values up to ~4 (the float16 tolerance, times 4)
    return tol(dtype, scale=4 if dtype == np.float16 else 1)


# --------------------------------------------------------------------------------------
# Against the float64 reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", SHAPES)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_forward_and_backward_match_reference(shape, axis, dtype, activation):
    rng = np.random.default_rng(abs(hash((shape, axis))) % 2**32)
    x = make(shape, dtype, rng, offset=2.0, scale=1.5)
    z = other_layout(make(shape, dtype, rng), "F" if len(shape) % 2 else "strided")
    C = shape[axis]
    gamma, beta = params(C, rng, dtype)
    y, mean, invstd = fastbn.batch_norm_forward(
        x, gamma, beta, axis=axis, residual=z, activation=activation
    )
    assert y.shape == x.shape and y.dtype == x.dtype
    yr, mr, ir = ref.residual_forward(x, z, gamma, beta, axis, activation=activation)
    assert_close(y, yr, **dx_tol(dtype), name="y")
    m = x.size // C
    assert_close(mean, mr, **stats_tol(dtype, 1), name="mean")
    assert_close(invstd, ir, **stats_tol(dtype, 1), name="invstd")
    # the residual does not enter the statistics
    _, mean0, invstd0 = fastbn.batch_norm_forward(x, gamma, beta, axis=axis)
    assert_close(mean, mean0, **stats_tol(dtype, 1), name="mean without residual")

    dy = make(shape, dtype, rng)
    dx, dgamma, dbeta, dz = fastbn.batch_norm_backward(
        dy,
        x,
        mean,
        invstd,
        gamma,
        beta,
        axis=axis,
        activation=activation,
        residual=z,
        residual_grad=True,
    )
    assert dz.shape == x.shape and dz.dtype == x.dtype and dx.dtype == x.dtype
    dxr, dgr, dbr, dzr = ref.residual_backward(
        dy, x, z, mean, invstd, gamma, beta, axis, activation=activation
    )
    assert_close(dz, dzr, **tol(dtype), name="dz")
    assert_close(dx, dxr, **dx_tol(dtype), name="dx")
    assert_close(dgamma, dgr, **stats_tol(dtype, m), name="dgamma")
    assert_close(dbeta, dbr, **stats_tol(dtype, m), name="dbeta")
    # the mask is the forward's, bit for bit: dz is dy where y > 0 and 0 where y == 0
    if activation == "relu":
        assert np.array_equal(dz, np.where(y > 0, dy, 0)), "mask differs from the forward's"
    else:
        assert np.array_equal(dz, dy) and dz is not dy
    # without residual_grad: the same three gradients, bitwise
    three = fastbn.batch_norm_backward(
        dy, x, mean, invstd, gamma, beta, axis=axis, activation=activation, residual=z
    )
    assert len(three) == 3
    for a, b in zip(three, (dx, dgamma, dbeta)):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("shape, axis", [((3, 2, 4), 1), ((5, 3), 1), ((2, 3, 3, 2), -1)])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_gradients_match_finite_differences(shape, axis, activation):
    """Central differences of the reference loss ``sum(w * act(bn(x) + z))`` (float64)."""
    rng = np.random.default_rng(3)
    C = shape[axis]
    x, z, w = (rng.standard_normal(shape) for _ in range(3))
    gamma, beta = params(C, rng, np.float64)
    y, mean, invstd = fastbn.batch_norm_forward(
        x, gamma, beta, axis=axis, residual=z, activation=activation
    )
    # keep every value off the ReLU's kink, where the loss is not differentiable
    s = ref.residual_forward(x, z, gamma, beta, axis)[0]
    assert np.abs(s).min() > 1e-4
    dx, dgamma, dbeta, dz = fastbn.batch_norm_backward(
        w, x, mean, invstd, gamma, beta, axis=axis, activation=activation, residual=z,
        residual_grad=True,
    )  # fmt: skip
    h = 1e-6

    def numeric(arrays, which):
        a = arrays[which]
        grad = np.empty_like(a)
        for i in np.ndindex(a.shape):
            saved = a[i]
            a[i] = saved + h
            up = ref.residual_loss_for_gradcheck(*arrays, w, axis, activation=activation)
            a[i] = saved - h
            down = ref.residual_loss_for_gradcheck(*arrays, w, axis, activation=activation)
            a[i] = saved
            grad[i] = (up - down) / (2 * h)
        return grad

    arrays = [x.copy(), z.copy(), gamma.copy(), beta.copy()]
    # central differences of a smooth float64 loss: O(h^2) truncation, 1e-10 / h rounding
    for which, analytic, name in ((0, dx, "dx"), (1, dz, "dz"), (2, dgamma, "dgamma"),
                                  (3, dbeta, "dbeta")):  # fmt: skip
        assert_close(analytic, numeric(arrays, which), rtol=1e-6, atol=1e-6, name=name)


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (9, 4)])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_agrees_with_pytorch_autograd(shape, activation):
    """fastbn against ``act(torch.nn.functional.batch_norm(x) + z)`` and autograd (float64)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    C = shape[1]
    x, z, dy = (rng.standard_normal(shape) for _ in range(3))
    gamma, beta = params(C, rng, np.float64)
    tensors = [torch.tensor(a, requires_grad=True) for a in (x, z, gamma, beta)]
    xt, zt, gt, bt = tensors
    yt = torch.nn.functional.batch_norm(xt, None, None, gt, bt, training=True, eps=1e-5) + zt
    if activation == "relu":
        yt = torch.relu(yt)
    yt.backward(torch.tensor(dy))
    y, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta, residual=z, activation=activation)
    grads = fastbn.batch_norm_backward(
        dy, x, mean, invstd, gamma, beta, activation=activation, residual=z, residual_grad=True
    )
    # float64 on both sides; PyTorch's statistics differ in their last bits (its sums)
    assert_close(y, yt.detach().numpy(), rtol=1e-10, atol=1e-10, name="y")
    for got, t, name in zip(grads, (xt, gt, bt, zt), ("dx", "dgamma", "dbeta", "dz")):
        assert_close(got, t.grad.numpy(), rtol=1e-9, atol=1e-9, name=name)


# --------------------------------------------------------------------------------------
# Inference, batch_norm in both modes, the layer
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", [((7, 3), 1), ((2, 3, 4, 5), 1), ((4, 5, 6, 3), -1)])
def test_inference_and_batch_norm_eval(shape, axis, dtype):
    rng = np.random.default_rng(5)
    C = shape[axis]
    x, z = make(shape, dtype, rng), other_layout(make(shape, dtype, rng), "F")
    rm, rv = rng.normal(size=C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    gamma, beta = params(C, rng, dtype)
    expected = ref.residual_inference(x, z, rm, rv, gamma, beta, axis, activation="relu")
    y = fastbn.batch_norm_inference(
        x, rm, rv, gamma, beta, axis=axis, residual=z, activation="relu"
    )
    assert_close(y, expected, **dx_tol(dtype), name="batch_norm_inference")
    y2 = fastbn.batch_norm(x, rm, rv, gamma, beta, axis=axis, residual=z, activation="relu")
    assert np.array_equal(y, y2)


@pytest.mark.parametrize("shape, axis", [((7, 3), 1), ((16, 8, 1001), 1), ((4, 5, 6, 3), -1)])
def test_batch_norm_training_updates_running_statistics_as_without(shape, axis):
    rng = np.random.default_rng(6)
    C = shape[axis]
    x, z = make(shape, np.float32, rng, offset=3.0), make(shape, np.float32, rng)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    rm0, rv0 = rm.copy(), rv.copy()
    y = fastbn.batch_norm(x, rm, rv, training=True, axis=axis, residual=z, activation="relu")
    fastbn.batch_norm(x, rm0, rv0, training=True, axis=axis)
    assert_close(rm, rm0, **tol(np.float32), name="running_mean")
    assert_close(rv, rv0, **tol(np.float32), name="running_var")
    expected = ref.residual_forward(x, z, axis=axis, activation="relu")[0]
    assert_close(y, expected, **tol(np.float32), name="y")


def test_layer_forward_backward_with_residual():
    rng = np.random.default_rng(7)
    x, z, dy = (make((6, 4, 5, 3), np.float32, rng, offset=o) for o in (1.0, 0.0, 0.0))
    bn = fastbn.BatchNorm(4, activation="relu")
    bn.gamma[:] = rng.uniform(0.5, 1.5, 4)
    y = bn.forward(x, training=True, residual=z)
    y_ref, mean, invstd = fastbn.batch_norm_forward(
        x, bn.gamma, bn.beta, residual=z, activation="relu"
    )
    assert np.array_equal(y, y_ref)
    assert bn.num_batches_tracked == 1
    dx = bn.backward(dy)
    expected = fastbn.batch_norm_backward(
        dy, x, mean, invstd, bn.gamma, bn.beta, activation="relu", residual=z, residual_grad=True
    )
    assert_close(dx, expected[0], **tol(np.float32), name="dx")
    assert_close(bn.dgamma, expected[1], **tol(np.float32, 10), name="dgamma")
    assert_close(bn.dresidual, expected[3], **tol(np.float32), name="dresidual")
    # a forward without residual: dresidual None after its backward, dx as before
    bn.forward(x, training=True)
    bn.backward(dy)
    assert bn.dresidual is None
    # eval mode: the running statistics, plus z; the call operator takes it too
    y_eval = bn(x, training=False, residual=z)
    expected_eval = ref.residual_inference(
        x, z, bn.running_mean, bn.running_var, bn.gamma, bn.beta, activation="relu"
    )
    assert_close(y_eval, expected_eval, **tol(np.float32), name="eval")


# --------------------------------------------------------------------------------------
# Layouts, out=, errors, determinism, comm
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, axis", [((5, 3, 4, 7), 1), ((30, 5), 1), ((4, 5, 6, 3), -1)])
def test_out_aliasing_x_or_z_and_other_layouts(shape, axis):
    rng = np.random.default_rng(8)
    x, z = make(shape, np.float64, rng), make(shape, np.float64, rng)
    expected = fastbn.batch_norm_forward(x, axis=axis, residual=z, activation="relu")[0]
    for kind in ("F", "strided"):  # z in another layout than x, same result
        got = fastbn.batch_norm_forward(
            x, axis=axis, residual=other_layout(z, kind), activation="relu"
        )[0]
        assert np.array_equal(got, expected), kind
    xa, za = x.copy(), z.copy()
    assert fastbn.batch_norm_forward(xa, axis=axis, out=xa, residual=za, activation="relu")[0] is xa
    assert np.array_equal(xa, expected) and np.array_equal(za, z)
    xa, za = x.copy(), z.copy()
    assert fastbn.batch_norm_forward(xa, axis=axis, out=za, residual=za, activation="relu")[0] is za
    assert np.array_equal(za, expected) and np.array_equal(xa, x)
    out = np.asfortranarray(np.empty_like(x))
    fastbn.batch_norm_forward(x, axis=axis, out=out, residual=z, activation="relu")
    assert np.array_equal(out, expected)
    # inference in place of z
    C = shape[axis]
    za = z.copy()
    yi = fastbn.batch_norm_inference(x, np.zeros(C), np.ones(C), axis=axis, out=za, residual=za)
    assert yi is za
    assert_close(
        za, ref.residual_inference(x, z, np.zeros(C), np.ones(C), axis=axis), **tol(x.dtype)
    )
    # the backward's dx may overwrite dy; dz is computed before
    y, mean, invstd = fastbn.batch_norm_forward(x, axis=axis, residual=z, activation="relu")
    dy = make(shape, np.float64, rng)
    dx, _, _, dz = fastbn.batch_norm_backward(
        dy, x, mean, invstd, axis=axis, activation="relu", residual=z, residual_grad=True
    )
    dya = dy.copy()
    dxa, _, _, dza = fastbn.batch_norm_backward(
        dya, x, mean, invstd, axis=axis, out=dya, activation="relu", residual=z, residual_grad=True
    )
    assert dxa is dya and np.array_equal(dxa, dx) and np.array_equal(dza, dz)


def test_bad_residual_raises_before_anything_is_written():
    rng = np.random.default_rng(9)
    x = make((6, 3, 4), np.float32, rng)
    rm, rv, out = np.zeros(3, np.float32), np.ones(3, np.float32), np.full_like(x, 7.0)
    bad = [
        (np.zeros((6, 4, 4), np.float32), ValueError, r"residual must have the shape of x"),
        (np.zeros((6, 3, 4), np.float64), ValueError, r"residual must have the dtype of x"),
        (np.zeros((6, 3, 4), np.int32), TypeError, r"residual must be float16"),
        (np.ma.masked_array(np.zeros((6, 3, 4), np.float32)), TypeError, "residual"),
    ]
    calls = [
        lambda z: fastbn.batch_norm_forward(x, out=out, residual=z),
        lambda z: fastbn.batch_norm(x, rm, rv, training=True, out=out, residual=z),
        lambda z: fastbn.batch_norm(x, rm, rv, training=False, out=out, residual=z),
        lambda z: fastbn.batch_norm_inference(x, rm, rv, out=out, residual=z),
    ]
    for z, error, message in bad:
        for call in calls:
            with pytest.raises(error, match=message):
                call(z)
            assert (out == 7.0).all() and (rm == 0).all() and (rv == 1).all()
    y, mean, invstd = fastbn.batch_norm_forward(x)
    for z, error, message in bad:
        with pytest.raises(error, match=message):
            fastbn.batch_norm_backward(x, x, mean, invstd, out=out, residual=z, activation="relu")
        assert (out == 7.0).all()
    with pytest.raises(ValueError, match="needs residual="):
        fastbn.batch_norm_backward(x, x, mean, invstd, activation="relu", residual_grad=True)
    bn = fastbn.BatchNorm(3)
    for z, error, message in bad:
        with pytest.raises(error, match=message):
            bn.forward(x, training=True, residual=z)
        assert bn.num_batches_tracked == 0 and (bn.running_mean == 0).all()


def test_empty_batch_with_residual():
    x = np.zeros((0, 3, 4), np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x, residual=x.copy(), activation="relu")
    assert y.shape == x.shape and np.isnan(mean).all()
    dx, dgamma, dbeta, dz = fastbn.batch_norm_backward(
        x, x, mean, invstd, np.ones(3, np.float32), residual=x, residual_grad=True
    )
    assert dx.shape == dz.shape == x.shape and (dbeta == 0).all()


def test_cpu_results_bitwise_identical_for_any_thread_count():
    import numba

    rng = np.random.default_rng(10)
    cases = [((16, 8, 1001), 1), ((50001, 7), 1), ((30, 20, 20, 9), -1), ((8, 3, 64, 64), 1)]
    default = numba.get_num_threads()
    try:
        for shape, axis in cases:
            x, z, dy = (make(shape, np.float32, rng, offset=o) for o in (5.0, 0.0, 0.0))
            C = shape[axis]
            results = []
            for threads in sorted({1, 2, default}):
                numba.set_num_threads(threads)
                y, mean, invstd = fastbn.batch_norm_forward(
                    x, axis=axis, residual=z, activation="relu"
                )
                grads = fastbn.batch_norm_backward(
                    dy, x, mean, invstd, np.ones(C), np.zeros(C), axis=axis, activation="relu",
                    residual=z, residual_grad=True,
                )  # fmt: skip
                results.append((y, mean, invstd, *grads))
            for r in results[1:]:
                for a, b in zip(results[0], r):
                    assert np.array_equal(a, b), f"results differ between thread counts: {shape}"
    finally:
        numba.set_num_threads(default)


def test_one_rank_comm_passes_the_residual_through():
    """``comm=MPI.COMM_SELF``: the synchronized paths add the residual too."""
    MPI = pytest.importorskip("mpi4py.MPI")
    rng = np.random.default_rng(12)
    shape = (6, 3, 5)
    x, z, dy = (make(shape, np.float64, rng) for _ in range(3))
    gamma, beta = params(3, rng, np.float64)
    plain = fastbn.batch_norm_forward(x, gamma, beta, residual=z, activation="relu")
    synced = fastbn.batch_norm_forward(
        x, gamma, beta, residual=z, activation="relu", comm=MPI.COMM_SELF
    )
    for a, b in zip(plain, synced):
        assert_close(b, a, **tol(np.float64))
    kw = dict(activation="relu", residual=z, residual_grad=True)
    g_plain = fastbn.batch_norm_backward(dy, x, *plain[1:], gamma, beta, **kw)
    g_synced = fastbn.batch_norm_backward(dy, x, *synced[1:], gamma, beta, comm=MPI.COMM_SELF, **kw)
    for a, b in zip(g_plain, g_synced):
        assert_close(b, a, **tol(np.float64, 10))
    rm, rv = np.zeros(3), np.ones(3)
    y = fastbn.batch_norm(x, rm, rv, gamma, beta, training=True, residual=z, comm=MPI.COMM_SELF)
    assert_close(y, ref.residual_forward(x, z, gamma, beta)[0], **tol(np.float64))
    bn = fastbn.BatchNorm(3, dtype=np.float64, activation="relu", comm=MPI.COMM_SELF)
    bn.gamma[:], bn.beta[:] = gamma, beta
    assert_close(bn.forward(x, residual=z), plain[0], **tol(np.float64))
    bn.backward(dy)
    assert_close(bn.dresidual, g_plain[3], **tol(np.float64))


@pytest.mark.mpi
def test_synchronized_residual_equals_single_process():
    """``mpiexec -n 3``, uneven shards (one rank with a single row): forward, backward
    with ``dz`` and the running update against the single-process result on the whole
    batch (tests/mpi/residual_checks.py)."""
    pytest.importorskip("mpi4py.MPI")
    import helpers

    if helpers.find_mpiexec() is None:
        pytest.skip("mpiexec not found")
    script = helpers.ROOT / "tests" / "mpi" / "residual_checks.py"
    result = helpers.run_mpi(script, 3)
    assert len(result["cases"]) == 6
    for case in result["cases"]:
        # both sides use float64 statistics grouped differently (per rank vs per chunk):
        # a few float64 ulps, and one ulp of the data's dtype on the outputs
        limit = 1e-5 if case["dtype"] == "float32" else 1e-10
        for name, diff in case["diffs"].items():
            assert diff <= limit * 10, (case["layout"], case["dtype"], name, diff)
        assert case["identical"], case


def test_nonfinite_batch_with_residual_follows_the_policy():
    """The residual path applies the non-finite policy before it writes: "raise" leaves
    ``out`` and the running statistics untouched, "warn" writes ``y`` and keeps them."""
    rng = np.random.default_rng(13)
    x, z = make((6, 3, 4), np.float32, rng), make((6, 3, 4), np.float32, rng)
    x[2, 1, 3] = np.nan
    rm, rv, out = np.zeros(3, np.float32), np.ones(3, np.float32), np.full_like(x, 7.0)
    with pytest.raises(FloatingPointError, match="not finite"):
        fastbn.batch_norm(x, rm, rv, training=True, out=out, residual=z)
    assert (out == 7.0).all() and (rm == 0).all() and (rv == 1).all()
    with pytest.warns(RuntimeWarning, match="not finite"):
        y = fastbn.batch_norm(x, rm, rv, training=True, residual=z, on_nonfinite="warn")
    assert (rm == 0).all() and (rv == 1).all()
    expected = ref.residual_forward(x, z)[0]
    assert_close(y[:, [0, 2]], expected[:, [0, 2]], **tol(np.float32), name="finite channels")


@pytest.mark.parametrize("shape, axis", [((7, 3), 1), ((2, 3, 4, 5), 1), ((4, 5, 6, 3), -1)])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_backward_through_fixed_statistics_with_residual(shape, axis, activation):
    """``training=False`` (frozen BatchNorm) with ``residual=``: the mask of
    ``bn(x) + z`` with the running statistics, functional and layer (eval forward, then
    backward)."""
    rng = np.random.default_rng(14)
    C = shape[axis]
    x, z, dy = (make(shape, np.float64, rng) for _ in range(3))
    rm, rv = rng.normal(size=C), rng.uniform(0.5, 2.0, C)
    gamma, beta = params(C, rng, np.float64)
    mean, invstd = rm, 1.0 / np.sqrt(rv + 1e-5)
    y = fastbn.batch_norm_inference(
        x, rm, rv, gamma, beta, axis=axis, residual=z, activation=activation
    )
    grads = fastbn.batch_norm_backward(
        dy, x, mean, invstd, gamma, beta, axis=axis, activation=activation, residual=z,
        residual_grad=True, training=False,
    )  # fmt: skip
    expected = ref.residual_backward(
        dy, x, z, mean, invstd, gamma, beta, axis, activation=activation, training=False
    )
    for got, want, name in zip(grads, expected, ("dx", "dgamma", "dbeta", "dz")):
        assert_close(got, want, **tol(np.float64, 10), name=name)
    if activation == "relu":
        assert np.array_equal(grads[3], np.where(y > 0, dy, 0))
    bn = fastbn.BatchNorm(C, axis=axis, dtype=np.float64, activation=activation)
    bn.gamma[:], bn.beta[:], bn.running_mean[:], bn.running_var[:] = gamma, beta, rm, rv
    assert np.array_equal(bn.forward(x, training=False, residual=z), y)
    dx = bn.backward(dy)
    assert_close(dx, expected[0], **tol(np.float64, 10), name="layer dx")
    assert_close(bn.dresidual, expected[3], **tol(np.float64), name="layer dresidual")


def test_layer_variants_refuse_a_residual_before_anything_changes():
    """Batch renormalization and ghost batches have their own training forward, without
    the fused add: ``residual=`` is a ValueError there, the layer left as it was."""
    rng = np.random.default_rng(15)
    x, z = make((8, 3, 4), np.float32, rng), make((8, 3, 4), np.float32, rng)
    for bn in (fastbn.BatchNorm(3, renorm=True), fastbn.BatchNorm(3, virtual_batch_size=4)):
        with pytest.raises(ValueError, match="residual= is not supported"):
            bn.forward(x, training=True, residual=z)
        assert bn.num_batches_tracked == 0 and (bn.running_mean == 0).all()
        # inference is plain BatchNorm: the residual is added there
        y = bn.forward(x, training=False, residual=z)
        assert_close(
            y, ref.residual_inference(x, z, bn.running_mean, bn.running_var), **tol(x.dtype)
        )


@pytest.mark.parametrize("shape, axis", [((9, 3), 1), ((4, 3, 5, 2), 1), ((4, 5, 2, 3), -1)])
def test_masked_statistics_with_residual(shape, axis):
    """``mask=`` and ``residual=`` together: statistics over the True positions, z added
    everywhere, and the backward of the masked BatchNorm on ``dz`` (functional and layer)."""
    rng = np.random.default_rng(16)
    C = shape[axis]
    x, z, dy = (make(shape, np.float64, rng) for _ in range(3))
    reduced = tuple(n for d, n in enumerate(shape) if d != axis % len(shape))
    mask = rng.random(reduced) < 0.7
    mask.flat[:2] = True
    gamma, beta = params(C, rng, np.float64)
    y, mean, invstd = fastbn.batch_norm_forward(
        x, gamma, beta, axis=axis, mask=mask, residual=z, activation="relu"
    )
    ym = ref.masked_forward(x, mask, gamma, beta, axis)[0]
    s = ym + z
    assert_close(y, np.maximum(s, 0), **tol(np.float64), name="y")
    dx, dgamma, dbeta, dz = fastbn.batch_norm_backward(
        dy, x, mean, invstd, gamma, beta, axis=axis, mask=mask, activation="relu", residual=z,
        residual_grad=True,
    )  # fmt: skip
    ds = np.where(s > 0, dy, 0.0)
    expected = ref.masked_backward(ds, x, mask, mean, invstd, gamma, beta, axis)
    assert_close(dz, ds, **tol(np.float64), name="dz")
    for got, want, name in zip((dx, dgamma, dbeta), expected, ("dx", "dgamma", "dbeta")):
        assert_close(got, want, **tol(np.float64, 10), name=name)
    bn = fastbn.BatchNorm(C, axis=axis, dtype=np.float64, activation="relu")
    bn.gamma[:], bn.beta[:] = gamma, beta
    assert_close(bn.forward(x, training=True, mask=mask, residual=z), y, **tol(np.float64))
    assert_close(bn.backward(dy), dx, **tol(np.float64, 10), name="layer dx")
    assert_close(bn.dresidual, ds, **tol(np.float64), name="layer dresidual")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((256, 64), 1), ((7, 3), 1), ((4, 5, 6, 3), -1),
                                        ((16, 8, 1001), 1), ((2, 3, 4, 5), 1)])  # fmt: skip
@pytest.mark.parametrize("activation", [None, "relu"])
def test_direct_and_general_residual_paths_agree_bitwise(shape, axis, dtype, activation):
    """A C-contiguous NumPy ``residual`` of x's shape and dtype keeps the forward, the
    inference and the backward (with and without ``residual_grad``) on the CPU's direct
    host path; a NumPy integer axis sends the same call through the general path. Every
    output must agree byte for byte, with and without gamma/beta, with ``out=`` a new
    array and ``out`` = z (forward) or dy (backward)."""
    from fastbn import api

    rng = np.random.default_rng(41)
    x = make(shape, dtype, rng, 1.0, 2.0)
    z = make(shape, dtype, rng)
    dy = make(shape, dtype, rng)
    C = shape[axis]
    gamma, beta = params(C, rng, dtype)
    rm, rv = rng.normal(size=C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
    x3 = api._direct_view(x, axis, None)
    assert api._direct_residual(z, x, x3) is not None
    for gb in ((gamma, beta), (None, None)):
        results = []
        for ax in (axis, np.int64(axis)):  # a NumPy integer axis takes the general path
            kw = dict(axis=ax, activation=activation, residual=z)
            y, mean, invstd = fastbn.batch_norm_forward(x, *gb, **kw)
            z_out = z.copy()
            fastbn.batch_norm_forward(x, *gb, out=z_out, axis=ax, activation=activation,
                                      residual=z_out)  # fmt: skip
            inf = fastbn.batch_norm_inference(x, rm, rv, *gb, **kw)
            outs = [y, mean, invstd, z_out, inf]
            for residual_grad in (False, True):
                grads = fastbn.batch_norm_backward(
                    dy, x, mean, invstd, *gb, residual_grad=residual_grad, **kw
                )
                dy_out = dy.copy()
                again = fastbn.batch_norm_backward(
                    dy_out, x, mean, invstd, *gb, residual_grad=residual_grad, out=dy_out, **kw
                )
                assert again[0] is dy_out
                outs += list(grads) + [dy_out]
            grads = fastbn.batch_norm_backward(
                dy, x, mean, invstd, *gb, axis=ax, residual_grad=True
            )  # no residual, no ReLU: dz is a copy of dy
            outs += list(grads)
            results.append(outs)
        for a, b in zip(*results):
            if a is None:
                assert b is None
                continue
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.tobytes() == b.tobytes()


def test_residual_calls_take_the_direct_path(monkeypatch):
    """A spy on the direct path's residual functions: a plain NumPy call takes them."""
    from fastbn import api

    calls = []
    for name in ("_direct_residual_forward", "_direct_residual_inference",
                 "_direct_residual_backward"):  # fmt: skip
        function = getattr(api, name)

        def wrapped(*args, _function=function, _name=name, **kwargs):
            calls.append(_name)
            return _function(*args, **kwargs)

        monkeypatch.setattr(api, name, wrapped)
    rng = np.random.default_rng(42)
    x, z = rng.standard_normal((64, 4)), rng.standard_normal((64, 4))
    y, mean, invstd = fastbn.batch_norm_forward(x, residual=z, activation="relu")
    fastbn.batch_norm_inference(x, mean, invstd, residual=z)
    fastbn.batch_norm_backward(np.ones_like(x), x, mean, invstd, residual=z, activation="relu")
    assert calls == [
        "_direct_residual_forward",
        "_direct_residual_inference",
        "_direct_residual_backward",
    ]
