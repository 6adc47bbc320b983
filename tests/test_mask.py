"""Masked statistics (``mask=``): the float64 reference, PyTorch autograd on the formula,
finite differences, every layout and dtype, broadcast masks, numpy.ma, the errors."""

import numba
import numpy as np
import pytest
import reference as ref
from helpers import assert_close, tol

import fastbn

DTYPES = [np.float64, np.float32, np.float16]

# (shape, axis): 2-D, NCHW, NHWC, 3-D volumes, odd and prime sizes, one channel; then
# shapes that reach the parallel and chunked paths of both kernel families.
SHAPES = [
    ((7, 3), 1),
    ((199, 1), 1),
    ((3, 5, 7), 1),
    ((2, 3, 4, 5), 1),
    ((4, 5, 6, 3), -1),
    ((2, 3, 2, 3, 5), 1),
    ((5, 7, 11), 2),
    ((3, 4, 5), 0),
]
MEDIUM = [
    ((2, 3, 70001), 1),  # strided, long runs, several chunks per channel
    ((40001, 5), 1),  # rows, several chunks
    ((64, 256, 7), 1),  # strided, short runs, many channels
]


def make(shape, dtype, rng, offset=0.0, scale=1.0):
    return (offset + scale * rng.standard_normal(shape)).astype(dtype)


def reduced(shape, axis):
    axis = axis % len(shape)
    return shape[:axis] + shape[axis + 1 :]


def random_mask(shape, axis, rng, p=0.6):
    """A mask with at least 2 True positions (and at least one False where it can)."""
    r = reduced(shape, axis)
    w = rng.random(r) < p
    flat = w.reshape(-1)
    flat[:2] = True
    if flat.size > 2:
        flat[-1] = False
    return w


def stats_dtype(dtype):
    return np.float64 if dtype == np.float64 else np.float32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES + MEDIUM)
def test_masked_forward_matches_reference(shape, axis, dtype):
    rng = np.random.default_rng(abs(hash((shape, axis, "mf"))) % 2**32)
    x = make(shape, dtype, rng, offset=2.0, scale=3.0)
    mask = random_mask(shape, axis, rng)
    C = shape[axis]
    gamma, beta = rng.uniform(0.5, 1.5, C), rng.normal(size=C)
    y, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, mask=mask)
    y_ref, mean_ref, invstd_ref, _, _ = ref.masked_forward(x, mask, gamma, beta, axis)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert mean.dtype == stats_dtype(dtype) and invstd.dtype == stats_dtype(dtype)
    assert_close(y, y_ref, **tol(dtype), name="y")
    assert_close(mean, mean_ref, **tol(stats_dtype(dtype)), name="mean")
    assert_close(invstd, invstd_ref, **tol(stats_dtype(dtype)), name="invstd")


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES + MEDIUM)
def test_masked_backward_matches_reference(shape, axis, dtype, activation):
    rng = np.random.default_rng(abs(hash((shape, axis, "mb"))) % 2**32)
    x = make(shape, dtype, rng, offset=-1.0, scale=2.0)
    dy = make(shape, dtype, rng)
    mask = random_mask(shape, axis, rng)
    C = shape[axis]
    gamma, beta = rng.uniform(0.5, 1.5, C), rng.normal(size=C)
    _, mean, invstd = fastbn.batch_norm_forward(
        x, gamma, beta, axis=axis, mask=mask, activation=activation
    )
    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        dy, x, mean, invstd, gamma, beta, axis=axis, mask=mask, activation=activation
    )
    dx_ref, dgamma_ref, dbeta_ref = ref.masked_backward(
        dy, x, mask, mean, invstd, gamma, beta, axis, activation
    )
    assert dx.dtype == x.dtype and dx.shape == x.shape
    assert_close(dx, dx_ref, **tol(dtype), name="dx")
    # sums of m values: rounding grows with sqrt(m) (as in test_api)
    scale = max(1.0, np.sqrt(x.size // C))
    assert_close(dgamma, dgamma_ref, **tol(stats_dtype(dtype), scale), name="dgamma")
    assert_close(dbeta, dbeta_ref, **tol(stats_dtype(dtype), scale), name="dbeta")


def test_backward_is_the_gradient_by_finite_differences():
    rng = np.random.default_rng(3)
    shape, axis = (5, 3, 4), 1
    x = rng.normal(size=shape)
    w = rng.normal(size=shape)  # loss = sum(w * y): dy = w
    mask = random_mask(shape, axis, rng)
    gamma, beta = rng.uniform(0.5, 1.5, 3), rng.normal(size=3)
    _, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, mask=mask)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        w, x, mean, invstd, gamma, beta, axis=axis, mask=mask
    )
    h = 1e-6

    def loss(x_, g_, b_):
        return ref.masked_loss_for_gradcheck(x_, mask, g_, b_, w, axis)

    for idx in np.ndindex(shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        fd = (loss(xp, gamma, beta) - loss(xm, gamma, beta)) / (2 * h)
        assert abs(dx[idx] - fd) <= 1e-6 * (1 + abs(fd)), (idx, dx[idx], fd)
    for c in range(3):
        e = np.zeros(3)
        e[c] = h
        fd_g = (loss(x, gamma + e, beta) - loss(x, gamma - e, beta)) / (2 * h)
        fd_b = (loss(x, gamma, beta + e) - loss(x, gamma, beta - e)) / (2 * h)
        assert abs(dgamma[c] - fd_g) <= 1e-6 * (1 + abs(fd_g))
        assert abs(dbeta[c] - fd_b) <= 1e-6 * (1 + abs(fd_b))


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("shape,axis", [((6, 3), 1), ((3, 4, 5, 2), 1), ((2, 3, 4, 5), -1)])
def test_matches_torch_autograd_on_the_formula(shape, axis, activation):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    x = rng.normal(size=shape)
    dy = rng.normal(size=shape)
    mask = random_mask(shape, axis, rng)
    C = shape[axis]
    gamma, beta = rng.uniform(0.5, 1.5, C), rng.normal(size=C)
    eps = 1e-5
    # the masked BatchNorm written in torch, float64, differentiated by autograd
    xt = torch.tensor(x, requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    ax = axis % len(shape)
    bshape = [1] * len(shape)
    bshape[ax] = C
    wt = torch.tensor(ref.expand_mask(mask, x, ax))
    red = tuple(d for d in range(len(shape)) if d != ax)
    m = wt.sum(dim=red, keepdim=True)
    mean = (wt * xt).sum(dim=red, keepdim=True) / m
    var = (wt * (xt - mean) ** 2).sum(dim=red, keepdim=True) / m
    yt = gt.reshape(bshape) * (xt - mean) / torch.sqrt(var + eps) + bt.reshape(bshape)
    if activation == "relu":
        yt = torch.relu(yt)
    yt.backward(torch.tensor(dy))
    y, mean_f, invstd_f = fastbn.batch_norm_forward(
        x, gamma, beta, axis=axis, eps=eps, mask=mask, activation=activation
    )
    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        dy, x, mean_f, invstd_f, gamma, beta, axis=axis, mask=mask, activation=activation
    )
    assert_close(y, yt.detach().numpy(), rtol=1e-10, atol=1e-10, name="y")
    assert_close(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-9, name="dx")
    assert_close(dgamma, gt.grad.numpy(), rtol=1e-9, atol=1e-9, name="dgamma")
    assert_close(dbeta, bt.grad.numpy(), rtol=1e-9, atol=1e-9, name="dbeta")


@pytest.mark.parametrize(
    "shape,axis,mask_shape",
    [
        ((6, 3, 5), 1, (5,)),  # the same positions in every sample
        ((6, 3, 5), 1, (6, 1)),  # whole samples
        ((4, 5, 6, 3), -1, (1, 5, 6)),
        ((4, 3, 5, 6), 1, (4, 1, 1)),
    ],
)
def test_broadcast_masks(shape, axis, mask_shape):
    rng = np.random.default_rng(5)
    x = rng.normal(size=shape)
    mask = rng.random(mask_shape) < 0.5
    mask.reshape(-1)[:2] = True
    full = np.broadcast_to(mask, reduced(shape, axis))
    y, mean, invstd = fastbn.batch_norm_forward(x, axis=axis, mask=mask)
    y_full, mean_full, invstd_full = fastbn.batch_norm_forward(x, axis=axis, mask=full.copy())
    np.testing.assert_array_equal(y, y_full)
    np.testing.assert_array_equal(mean, mean_full)
    y_ref, mean_ref = ref.masked_forward(x, mask, axis=axis)[:2]
    assert_close(y, y_ref, **tol(np.float64), name="y")
    dy = rng.normal(size=shape)
    dx = fastbn.batch_norm_backward(dy, x, mean, invstd, axis=axis, mask=mask)[0]
    dx_full = fastbn.batch_norm_backward(dy, x, mean, invstd, axis=axis, mask=full.copy())[0]
    np.testing.assert_array_equal(dx, dx_full)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((7, 3), 1), ((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1)])
def test_all_true_mask_is_the_unmasked_result_bitwise(shape, axis, dtype):
    rng = np.random.default_rng(6)
    x = make(shape, dtype, rng, 1.0, 2.0)
    dy = make(shape, dtype, rng)
    C = shape[axis]
    gamma, beta = rng.uniform(0.5, 1.5, C).astype(dtype), rng.normal(size=C).astype(dtype)
    ones = np.ones(reduced(shape, axis), bool)
    a = fastbn.batch_norm_forward(x, gamma, beta, axis=axis)
    b = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, mask=ones)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    ga = fastbn.batch_norm_backward(dy, x, a[1], a[2], gamma, beta, axis=axis)
    gb = fastbn.batch_norm_backward(dy, x, a[1], a[2], gamma, beta, axis=axis, mask=ones)
    for u, v in zip(ga, gb):
        np.testing.assert_array_equal(u, v)
    rm_a, rv_a, rm_b, rv_b = np.zeros(C), np.ones(C), np.zeros(C), np.ones(C)
    fastbn.batch_norm(x, rm_a, rv_a, gamma, beta, training=True, axis=axis)
    fastbn.batch_norm(x, rm_b, rv_b, gamma, beta, training=True, axis=axis, mask=ones)
    np.testing.assert_array_equal(rm_a, rm_b)
    np.testing.assert_array_equal(rv_a, rv_b)


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", SHAPES[:-1] + MEDIUM + [((256, 64), 1)])
def test_direct_and_general_masked_paths_agree_bitwise(shape, axis, dtype, activation):
    """A plain C-contiguous NumPy call with a boolean mask of x's shape without the
    channel axis takes the masked direct path (fastbn._cpu_backend.direct_mask); a NumPy
    integer axis sends the same call through the general path. Every output must agree
    bit for bit, with and without gamma/beta and out=, for a random and an all-True mask
    (which both paths send to the unmasked kernels)."""
    from fastbn import api

    rng = np.random.default_rng(29)
    x = make(shape, dtype, rng, 3.0, 2.0)
    dy = make(shape, dtype, rng)
    C = shape[axis]
    gamma, beta = rng.uniform(0.5, 1.5, C).astype(dtype), rng.normal(size=C).astype(dtype)
    x3 = api._direct_view(x, axis, None)
    for mask in (random_mask(shape, axis, rng), np.ones(reduced(shape, axis), bool)):
        assert api._direct_mask(mask, x, axis, x3) is not None
        for gb in ((gamma, beta), (None, None)):
            results = []
            for ax in (axis, np.int64(axis)):
                kw = dict(axis=ax, activation=activation, mask=mask)
                y, mean, invstd = fastbn.batch_norm_forward(x, *gb, **kw)
                out = np.full_like(x, np.nan)
                fastbn.batch_norm_forward(x, *gb, out=out, **kw)
                grads = fastbn.batch_norm_backward(dy, x, mean, invstd, *gb, **kw)
                results.append((y, mean, invstd, out) + grads)
            for a, b in zip(*results):
                if a is None:
                    assert b is None
                    continue
                assert a.dtype == b.dtype and a.shape == b.shape
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 3, 70001), (64, 16, 49), (5, 300000, 1)])
def test_fused_masked_backward(shape, dtype, relu):
    """The masked backward fused per channel (taken where the unmasked one is fused: a
    large NCHW batch) gives the same bits for any thread count, and the two passes'
    results to rounding (it sums the same chunks, but LLVM may compile a reduction
    helper differently inside another driver, as for the unmasked fused backward). A
    rows layout (inner == 1) has no fused kernel: fuse=True runs the two passes."""
    from fastbn import cpu_masked

    rng = np.random.default_rng(31)
    x = make(shape, dtype, rng, 2.0, 3.0)
    dy = make(shape, dtype, rng)
    w = rng.random(shape[0] * shape[2]) < 0.7  # flat, as the kernels take it
    C = shape[1]
    mean, invstd = x.mean(axis=(0, 2)), rng.uniform(0.5, 2.0, C)
    gamma, beta = rng.uniform(0.5, 1.5, C), rng.normal(size=C)
    results = []
    before = numba.get_num_threads()
    try:
        for fuse, threads in ((False, before), (True, before), (True, 1)):
            numba.set_num_threads(threads)
            dx, grads = np.empty_like(x), np.empty((2, C), dtype)
            m = int(w.sum())
            cpu_masked.backward(dy, x, w, m, mean, invstd, gamma, beta, relu, dx, grads, fuse)
            results.append((dx, grads))
    finally:
        numba.set_num_threads(before)
    for u, v in zip(results[1], results[2]):
        np.testing.assert_array_equal(u, v)
    for u, v in zip(results[0], results[1]):
        assert_close(u, v, **tol(dtype, 4.0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows", [3, 4, 5, 7, 8, 9, 64, 255])  # 2 True, 1 False at least
@pytest.mark.parametrize("C", [1, 3, 64, 100])
def test_small_masked_forward_agrees_bitwise_with_the_general_driver(rows, C, dtype):
    """A small rows batch takes ``cpu_masked.small_forward_kernel`` (it counts the mask
    itself, writes the statistics in their dtype and normalizes four rows at a time).
    Every bit must be that of the general driver (``cpu_masked.forward``), compared byte
    for byte, with an outlier first True row (the two-pass fallback), a non-finite value
    in the padding (the select fallback), float32 and float64 parameters and ReLU; and a
    mask with fewer than 2 True positions, or all True, must leave y unwritten."""
    from fastbn import _config, cpu_masked

    assert _config.SERIAL_BYTES <= _config.CHUNK_BYTES  # a serial rows batch is one chunk
    rng = np.random.default_rng(rows * 1000 + C)
    x = make((rows, C), dtype, rng, offset=3.0)
    x3 = x.reshape(rows, C, 1)
    assert x3.nbytes < _config.SERIAL_BYTES
    assert cpu_masked.chunk_rows(x3.shape, x.itemsize) >= rows
    for case in range(3):
        w = rng.random(rows) < 0.7
        w[rng.integers(rows - 1)], w[-1] = True, False
        if case == 1:  # an outlier first True row in half the channels
            x[np.flatnonzero(w)[0], ::2] = 1e4
        if case == 2 and rows > 2:  # padding that the statistics must never read
            x[-1, 0] = np.nan
            x[-1, -1] = np.inf
        if w.sum() < 2:
            w[:2] = True
            w[-1] = False
        m = int(w.sum())
        for gamma, beta in (
            (rng.uniform(0.5, 1.5, C).astype(dtype), rng.normal(size=C).astype(dtype)),
            (rng.uniform(0.5, 1.5, C), rng.normal(size=C)),
        ):
            for relu in (False, True):
                y_ref = np.empty_like(x3)
                stats = cpu_masked.forward(x3, w, m, gamma, beta, 1e-5, relu, y_ref)
                y, small = np.empty_like(x), np.empty((2, C), dtype)
                count = cpu_masked.small_forward_kernel(x3, w, 1e-5, gamma, beta, relu, y, small)
                assert count == m
                assert y.tobytes() == y_ref.tobytes()
                assert small.tobytes() == stats[:2].astype(dtype).tobytes()
    for w in (np.zeros(rows, bool), np.eye(1, rows, dtype=bool)[0], np.ones(rows, bool)):
        y, small = np.full_like(x, 7.0), np.full((2, C), 7.0, dtype)
        g, b = np.ones(C, dtype), np.zeros(C, dtype)
        count = cpu_masked.small_forward_kernel(x3, w, 1e-5, g, b, False, y, small)
        assert count == w.sum()
        assert (y == 7.0).all() and (small == 7.0).all()


def test_masks_the_direct_path_leaves_to_the_general_one():
    """Broadcast, non-contiguous, wrongly shaped and non-boolean masks take the general
    path (which checks them and raises its errors)."""
    from fastbn import api

    x = np.zeros((4, 3, 5))
    x3 = api._direct_view(x, 1, None)
    assert api._direct_mask(np.ones((4, 5), bool), x, 1, x3) is not None
    for mask in (
        np.ones(5, bool),
        np.ones((5, 4), bool).T,
        np.ones((4, 3), bool),
        np.ones((4, 5), np.uint8),
        [[True] * 5] * 4,
    ):
        assert api._direct_mask(mask, x, 1, x3) is None


@pytest.mark.parametrize("shape,axis", [((2, 3, 70001), 1), ((40001, 5), 1), ((64, 256, 7), 1)])
def test_masked_results_do_not_depend_on_the_thread_count(shape, axis):
    rng = np.random.default_rng(7)
    x = make(shape, np.float32, rng, 10.0, 2.0)
    dy = make(shape, np.float32, rng)
    mask = random_mask(shape, axis, rng, p=0.3)
    results = []
    before = numba.get_num_threads()
    try:
        for n in sorted({1, 2, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(n)
            y, mean, invstd = fastbn.batch_norm_forward(x, axis=axis, mask=mask)
            dx = fastbn.batch_norm_backward(dy, x, mean, invstd, axis=axis, mask=mask)[0]
            results.append((y, mean, invstd, dx))
    finally:
        numba.set_num_threads(before)
    for other in results[1:]:
        for u, v in zip(results[0], other):
            np.testing.assert_array_equal(u, v)


def test_large_offset_keeps_float32_accuracy():
    rng = np.random.default_rng(8)
    x = (1e4 + rng.standard_normal((4000, 3))).astype(np.float32)
    mask = rng.random(4000) < 0.5
    y, mean, invstd = fastbn.batch_norm_forward(x, mask=mask)
    y_ref, mean_ref, invstd_ref = ref.masked_forward(x, mask)[:3]
    assert_close(invstd, invstd_ref, **tol(np.float32), name="invstd")
    assert_close(y, y_ref, rtol=1e-5, atol=2e-3, name="y")  # x itself is rounded at 1e4


def test_padding_values_stay_out_of_the_statistics():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(6, 2, 5))
    mask = np.ones((6, 5), bool)
    mask[4:, 3:] = False
    padded = x.copy()
    padded[4:, :, 3:] = np.nan
    _, mean, invstd = fastbn.batch_norm_forward(padded, mask=mask)
    _, mean_ref, invstd_ref = ref.masked_forward(x, mask)[:3]
    assert_close(mean, mean_ref, **tol(np.float64), name="mean")
    assert_close(invstd, invstd_ref, **tol(np.float64), name="invstd")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((5003, 8), 1), ((4, 30, 31, 3), -1), ((3, 4, 999), 1)])
def test_nonfinite_padding_stays_out_of_every_family(shape, axis, dtype):
    """NaN and infinities at False positions, in batches that run the vectorized loops
    (the rows family multiplies each row by its mask bit, then takes the skipping loop
    for a chunk whose sums came out non-finite): the statistics and dx are those of the
    finite data, and the output at the True positions too."""
    rng = np.random.default_rng(37)
    x = rng.normal(size=shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    mask = random_mask(shape, axis, rng, p=0.7)
    bad = np.expand_dims(~mask, axis % len(shape)) & (rng.random(shape) < 0.3)
    padded = x.copy()
    padded[bad] = rng.choice(np.array([np.nan, np.inf, -np.inf], dtype), size=int(bad.sum()))
    y, mean, invstd = fastbn.batch_norm_forward(padded, axis=axis, mask=mask)
    y_ref, mean_ref, invstd_ref = ref.masked_forward(x, mask, axis=axis)[:3]
    assert_close(mean, mean_ref, **tol(dtype), name="mean")
    assert_close(invstd, invstd_ref, **tol(dtype), name="invstd")
    keep = np.broadcast_to(np.expand_dims(mask, axis % len(shape)), shape)
    assert_close(y[keep], y_ref[keep], **tol(dtype), name="y")
    dx = fastbn.batch_norm_backward(dy, x, mean, invstd, axis=axis, mask=mask)[0]
    dx_ref = ref.masked_backward(dy, x, mask, mean_ref, invstd_ref, axis=axis)[0]
    assert_close(dx, dx_ref, **tol(dtype), name="dx")


@pytest.mark.parametrize("shape,axis", [((5, 4, 3, 2), 1), ((6, 2, 3, 4), -1), ((9, 4), 1)])
def test_every_layout_gives_the_same_masked_answer(shape, axis):
    rng = np.random.default_rng(10)
    x = rng.normal(size=shape)
    dy = rng.normal(size=shape)
    mask = random_mask(shape, axis, rng)
    y_ref, mean_ref, invstd_ref = ref.masked_forward(x, mask, axis=axis)[:3]
    dx_ref = ref.masked_backward(dy, x, mask, mean_ref, invstd_ref, axis=axis)[0]
    perm = tuple(range(x.ndim))[::-1]
    for name, xl in (
        ("F", np.asfortranarray(x)),
        ("transposed", np.ascontiguousarray(x.transpose(perm)).transpose(perm)),
        ("strided", np.repeat(x, 2, axis=-1)[..., ::2]),
    ):
        for mname, ml in (("C", mask), ("F", np.asfortranarray(mask))):
            y, mean, invstd = fastbn.batch_norm_forward(xl, axis=axis, mask=ml)
            assert_close(y, y_ref, **tol(np.float64), name=f"y ({name}, mask {mname})")
            dx = fastbn.batch_norm_backward(dy, xl, mean, invstd, axis=axis, mask=ml)[0]
            assert_close(dx, dx_ref, **tol(np.float64), name=f"dx ({name}, mask {mname})")


@pytest.mark.parametrize("unbiased", [True, False])
def test_running_statistics_use_the_masked_count(unbiased):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(8, 3, 5))
    mask = random_mask((8, 3, 5), 1, rng)
    rm, rv = np.zeros(3), np.ones(3)
    y = fastbn.batch_norm(
        x, rm, rv, training=True, momentum=0.3, mask=mask, running_var_unbiased=unbiased
    )
    y_ref, mean, _, var, m = ref.masked_forward(x, mask)
    rm_ref, rv_ref = ref.update_running(np.zeros(3), np.ones(3), mean, var, m, 0.3, unbiased)
    assert m == mask.sum()
    assert_close(y, y_ref, **tol(np.float64), name="y")
    assert_close(rm, rm_ref, **tol(np.float64), name="running_mean")
    assert_close(rv, rv_ref, **tol(np.float64), name="running_var")


def test_layer_keeps_the_mask_for_its_backward():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(6, 3, 4))
    dy = rng.normal(size=(6, 3, 4))
    mask = random_mask((6, 3, 4), 1, rng)
    bn = fastbn.BatchNorm(3, dtype=np.float64)
    bn.gamma[:] = rng.uniform(0.5, 1.5, 3)
    y = bn.forward(x, training=True, mask=mask)
    dx = bn.backward(dy)
    y_ref, mean, invstd, var, m = ref.masked_forward(x, mask, bn.gamma, bn.beta)
    dx_ref, dgamma_ref, dbeta_ref = ref.masked_backward(dy, x, mask, mean, invstd, bn.gamma)
    assert_close(y, y_ref, **tol(np.float64), name="y")
    assert_close(dx, dx_ref, **tol(np.float64), name="dx")
    assert_close(bn.dgamma, dgamma_ref, **tol(np.float64), name="dgamma")
    assert_close(bn.dbeta, dbeta_ref, **tol(np.float64), name="dbeta")
    rv_ref = ref.update_running(np.zeros(3), np.ones(3), mean, var, m, 0.1)[1]
    assert_close(bn.running_var, rv_ref, **tol(np.float64), name="running_var")
    # the next unmasked forward forgets the mask
    bn.forward(x, training=True)
    dx_plain = bn.backward(dy)
    _, mean2, invstd2, _ = ref.forward(x, bn.gamma, bn.beta)
    assert_close(dx_plain, ref.backward(dy, x, mean2, invstd2, bn.gamma)[0], **tol(np.float64))


def test_numpy_masked_array_gives_its_mask():
    rng = np.random.default_rng(13)
    x = rng.normal(size=(6, 3, 5))
    valid = random_mask((6, 3, 5), 1, rng)
    xm = np.ma.masked_array(x, mask=np.broadcast_to(~valid[:, None, :], x.shape))
    y, mean, invstd = fastbn.batch_norm_forward(xm)
    y2, mean2, invstd2 = fastbn.batch_norm_forward(x, mask=valid)
    assert type(y) is np.ndarray
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(mean, mean2)
    dy = rng.normal(size=x.shape)
    np.testing.assert_array_equal(
        fastbn.batch_norm_backward(dy, xm, mean, invstd)[0],
        fastbn.batch_norm_backward(dy, x, mean, invstd, mask=valid)[0],
    )
    # with mask= too: both must hold
    extra = np.ones((6, 5), bool)
    extra[0] = False
    _, mean3, _ = fastbn.batch_norm_forward(xm, mask=extra)
    _, mean4, _ = fastbn.batch_norm_forward(x, mask=valid & extra)
    np.testing.assert_array_equal(mean3, mean4)
    # a layer and batch_norm take it too
    bn = fastbn.BatchNorm(3, dtype=np.float64)
    np.testing.assert_array_equal(bn.forward(xm, training=True), y2)
    rm, rv = np.zeros(3), np.ones(3)
    np.testing.assert_array_equal(fastbn.batch_norm(xm, rm, rv, training=True), y2)


def test_masked_array_whose_mask_varies_across_channels_is_a_type_error():
    x = np.ma.masked_array(np.zeros((4, 2)), mask=[[0, 1], [0, 0], [0, 0], [0, 0]])
    with pytest.raises(TypeError, match="varies across the channels"):
        fastbn.batch_norm_forward(x)
    with pytest.raises(TypeError, match="numpy.ma.MaskedArray"):
        fastbn.batch_norm_inference(x, np.zeros(2), np.ones(2))


def test_mask_errors_name_mask_and_write_nothing():
    rng = np.random.default_rng(14)
    x = rng.normal(size=(6, 3, 5))
    out = np.full_like(x, 7.0)
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match=r"mask must have x's shape without the channel axis"):
        fastbn.batch_norm_forward(x, mask=np.ones((6, 3), bool), out=out)
    with pytest.raises(TypeError, match="mask must be a boolean array"):
        fastbn.batch_norm_forward(x, mask=np.ones((6, 5), np.int8))
    with pytest.raises(TypeError, match="mask must be a boolean array"):
        fastbn.batch_norm_backward(x, x, np.zeros(3), np.ones(3), mask=np.ones((6, 5)))
    one = np.zeros((6, 5), bool)
    one[2, 3] = True
    with pytest.raises(ValueError, match=r"more than 1 value per channel, got 1 True position"):
        fastbn.batch_norm(x, rm, rv, training=True, mask=one, out=out)
    with pytest.raises(ValueError, match="got 0 True position"):
        fastbn.batch_norm_forward(x, mask=np.zeros((6, 5), bool), out=out)
    with pytest.raises(ValueError, match="mask= applies to training"):
        fastbn.batch_norm(x, rm, rv, training=False, mask=np.ones((6, 5), bool))
    with pytest.raises(ValueError, match="mask= applies to batch statistics"):
        fastbn.BatchNorm(3).forward(x.astype(np.float32), training=False, mask=one)
    with pytest.raises(ValueError, match="mask= applies to training=True"):
        fastbn.batch_norm_backward(
            x, x, np.zeros(3), np.ones(3), training=False, mask=np.ones((6, 5), bool), out=out
        )
    assert (out == 7.0).all()
    assert (rm == 0).all() and (rv == 1).all()


def test_empty_batch_with_a_mask():
    x = np.zeros((0, 3, 4))
    y, mean, invstd = fastbn.batch_norm_forward(x, mask=np.zeros((0, 4), bool))
    assert y.shape == x.shape and np.isnan(mean).all()


@pytest.mark.parametrize("variant", [dict(renorm=True), dict(virtual_batch_size=2)])
def test_layer_variants_refuse_a_mask(variant):
    x = np.random.default_rng(15).normal(size=(6, 3, 5)).astype(np.float32)
    bn = fastbn.BatchNorm(3, **variant)
    before = bn.running_mean.copy()
    with pytest.raises(ValueError, match="not supported with renorm or virtual_batch_size"):
        bn.forward(x, training=True, mask=np.ones((6, 5), bool))
    assert np.array_equal(bn.running_mean, before) and bn.num_batches_tracked == 0
