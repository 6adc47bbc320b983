"""fastbn's functions against the float64 reference: layouts, dtypes, awkward shapes."""

from fractions import Fraction

import numpy as np
import pytest
import reference as ref
from helpers import assert_close, tol

import fastbn

DTYPES = [np.float64, np.float32, np.float16]

# (shape, axis): 2-D, 1-D signals, NCHW, NHWC, 3-D volumes, one channel, primes, 2 rows,
# long rows; and medium shapes that reach the parallel, chunked and fused kernel paths.
SHAPES = [
    ((2, 1), 1),
    ((2, 3), 1),
    ((7, 3), -1),
    ((199, 1), 1),
    ((3, 5, 7), 1),
    ((2, 3, 4, 5), 1),
    ((4, 5, 6, 3), -1),
    ((2, 3, 2, 3, 5), 1),
    ((1, 2, 13), 1),
    ((5, 7, 11), 2),
    ((3, 4, 5), 0),
    ((2, 1, 1), 1),
]
MEDIUM = [
    ((2, 3, 70001), 1),  # strided, channel larger than the fusion limit: 3 chunks
    ((16, 8, 1001), 1),  # strided, parallel build (fused with kernel_path "fused")
    ((40001, 5), 1),  # rows, several chunks
    ((64, 3, 33, 33), -2),  # NHWC-like view of an NCHW block, axis in the middle
    ((64, 1024, 7), 1),  # strided, short runs, many channels: chunks of 1 KiB per channel
]


def make(shape, dtype, rng, offset=0.0, scale=1.0):
    return (offset + scale * rng.standard_normal(shape)).astype(dtype)


def params(C, rng, dtype=np.float32):
    return (rng.uniform(0.5, 1.5, C).astype(dtype), rng.normal(size=C).astype(dtype))


def layouts(x):
    """The same values in several memory layouts."""
    yield "C", x
    yield "F", np.asfortranarray(x)
    perm = tuple(range(x.ndim))[::-1]
    yield "transposed", np.ascontiguousarray(x.transpose(perm)).transpose(perm)
    big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
    big[..., ::2] = x
    yield "strided", big[..., ::2]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES + MEDIUM)
def test_forward_matches_reference(shape, axis, dtype, kernel_path):
    rng = np.random.default_rng(hash((shape, axis)) % 2**32)
    x = make(shape, dtype, rng, offset=2.0, scale=3.0)
    C = shape[axis]
    gamma, beta = params(C, rng)
    y, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta, axis=axis)
    y_ref, mean_ref, invstd_ref, _ = ref.forward(x, gamma, beta, axis)
    assert y.dtype == x.dtype and y.shape == x.shape
    stats_dtype = np.float64 if dtype == np.float64 else np.float32
    assert mean.dtype == stats_dtype and invstd.dtype == stats_dtype
    assert_close(y, y_ref, **tol(dtype), name="y")
    assert_close(
        mean, mean_ref, **tol(np.float64 if dtype == np.float64 else np.float32), name="mean"
    )
    assert_close(
        invstd, invstd_ref, **tol(np.float64 if dtype == np.float64 else np.float32), name="invstd"
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES + MEDIUM)
def test_backward_matches_reference(shape, axis, dtype, kernel_path):
    rng = np.random.default_rng(hash((shape, axis, "b")) % 2**32)
    x = make(shape, dtype, rng, offset=-1.0, scale=2.0)
    dy = make(shape, dtype, rng)
    C = shape[axis]
    gamma, beta = params(C, rng)
    _, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta, axis=axis)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta, axis=axis)
    dx_ref, dgamma_ref, dbeta_ref = ref.backward(dy, x, mean, invstd, gamma, beta, axis)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    assert_close(dx, dx_ref, **tol(dtype), name="dx")
    # dgamma and dbeta are sums of m values: the reference's own float64 rounding and the
    # float32 rounding of the result grow with sqrt(m) relative to a single value.
    m = x.size // C
    scale = max(1.0, np.sqrt(m))
    sdt = np.float64 if dtype == np.float64 else np.float32
    assert_close(dgamma, dgamma_ref, **tol(sdt, scale), name="dgamma")
    assert_close(dbeta, dbeta_ref, **tol(sdt, scale), name="dbeta")


@pytest.mark.parametrize("shape,axis", [((5, 4, 3, 2), 1), ((6, 2, 3, 4), -1), ((9, 4), 1)])
def test_every_layout_gives_the_same_answer(shape, axis):
    rng = np.random.default_rng(1)
    x = make(shape, np.float64, rng)
    dy = make(shape, np.float64, rng)
    C = shape[axis]
    gamma, beta = params(C, rng, np.float64)
    y_ref, mean_ref, invstd_ref, _ = ref.forward(x, gamma, beta, axis)
    dx_ref = ref.backward(dy, x, mean_ref, invstd_ref, gamma, beta, axis)[0]
    for (name, xl), (_, dyl) in zip(layouts(x), layouts(dy)):
        y, mean, invstd = fastbn.batch_norm_forward(xl, gamma, beta, axis=axis)
        assert_close(y, y_ref, **tol(np.float64), name=f"y ({name})")
        dx = fastbn.batch_norm_backward(dyl, xl, mean, invstd, gamma, beta, axis=axis)[0]
        assert_close(dx, dx_ref, **tol(np.float64), name=f"dx ({name})")
        # mixed layouts: dy C-ordered, x in this layout
        dx2 = fastbn.batch_norm_backward(dy, xl, mean, invstd, gamma, beta, axis=axis)[0]
        assert_close(dx2, dx_ref, **tol(np.float64), name=f"dx mixed ({name})")
        yi = fastbn.batch_norm_inference(
            xl, mean_ref, 1 / invstd_ref**2 - 1e-5, gamma, beta, axis=axis
        )
        assert_close(yi, y_ref, rtol=1e-8, atol=1e-8, name=f"inference ({name})")


def test_output_keeps_the_input_layout():
    x = np.asfortranarray(np.random.default_rng(0).normal(size=(8, 3, 5)))
    y, _, _ = fastbn.batch_norm_forward(x)
    assert y.flags.f_contiguous
    nhwc = np.random.default_rng(0).normal(size=(4, 3, 5, 6)).transpose(0, 2, 3, 1)
    y, _, _ = fastbn.batch_norm_forward(nhwc, axis=-1)
    assert y.strides == nhwc.strides


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((6, 4, 5), 1), ((50, 3), 1), ((2, 5, 3, 3), -1)])
def test_inference_matches_reference(shape, axis, dtype):
    rng = np.random.default_rng(3)
    x = make(shape, dtype, rng, offset=1.0)
    C = shape[axis]
    rm = rng.normal(size=C).astype(np.float32)
    rv = rng.uniform(0.5, 2.0, C).astype(np.float32)
    gamma, beta = params(C, rng)
    for activation in (None, "relu"):
        y = fastbn.batch_norm_inference(x, rm, rv, gamma, beta, axis=axis, activation=activation)
        assert y.dtype == x.dtype
        assert_close(
            y,
            ref.inference(x, rm, rv, gamma, beta, axis, activation=activation),
            **tol(dtype),
            name="y",
        )


def test_inference_of_an_empty_batch():
    x = np.zeros((0, 3), np.float32)
    y = fastbn.batch_norm_inference(x, np.zeros(3), np.ones(3))
    assert y.shape == (0, 3) and y.dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "shape,axis",
    [((6, 4, 5), 1), ((50, 3), 1), ((4, 3, 3, 5), -1), ((16, 8, 1001), 1), ((40001, 5), 1)],
)
def test_fused_relu_forward_and_backward(shape, axis, dtype, kernel_path):
    rng = np.random.default_rng(4)
    x = make(shape, dtype, rng)
    dy = make(shape, dtype, rng)
    C = shape[axis]
    gamma, beta = params(C, rng)
    y, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, activation="relu")
    assert_close(y, ref.forward(x, gamma, beta, axis, activation="relu")[0], **tol(dtype), name="y")
    assert (y >= 0).all()
    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        dy, x, mean, invstd, gamma, beta, axis=axis, activation="relu"
    )
    dx_ref, dgamma_ref, dbeta_ref = ref.backward(
        dy, x, mean, invstd, gamma, beta, axis, activation="relu"
    )
    assert_close(dx, dx_ref, **tol(dtype), name="dx")
    scale = np.sqrt(x.size // C)
    assert_close(dgamma, dgamma_ref, **tol(dtype, scale), name="dgamma")
    assert_close(dbeta, dbeta_ref, **tol(dtype, scale), name="dbeta")


def test_affine_off_returns_none_gradients():
    rng = np.random.default_rng(5)
    x = make((10, 4), np.float64, rng)
    y, mean, invstd = fastbn.batch_norm_forward(x)
    assert_close(y, ref.forward(x)[0], **tol(np.float64))
    dx, dgamma, dbeta = fastbn.batch_norm_backward(np.ones_like(x), x, mean, invstd)
    assert dgamma is None and dbeta is None
    assert_close(dx, np.zeros_like(x), rtol=0, atol=1e-12)
    # gamma given, beta not: the call is affine, both come back (issue 18: dbeta = sum dy
    # does not need beta; this asserted the old "dbeta only with beta" rule)
    _, dgamma, dbeta = fastbn.batch_norm_backward(np.ones_like(x), x, mean, invstd, np.ones(4))
    assert dgamma is not None and dbeta is not None
    np.testing.assert_array_equal(dbeta, np.full(4, 10.0))


def test_large_offset_keeps_float32_accuracy(kernel_path):
    """1e4 + randn in float32: no E[x^2] - E[x]^2 cancellation, no float32 mean rounding."""
    rng = np.random.default_rng(6)
    for shape, axis in [((64, 8, 50), 1), ((4096, 6), 1), ((16, 8, 1001), 1), ((2, 3, 70001), 1)]:
        x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
        y, mean, invstd = fastbn.batch_norm_forward(x, axis=axis)
        y_ref, mean_ref, invstd_ref, _ = ref.forward(x, axis=axis)
        assert_close(y, y_ref, rtol=1e-5, atol=1e-5, name=f"y {shape}")
        assert_close(invstd, invstd_ref, rtol=1e-5, atol=0, name=f"invstd {shape}")
        assert_close(mean, mean_ref, rtol=1e-7, atol=0, name=f"mean {shape}")


@pytest.mark.parametrize("case", ["offset", "outlier_first"])
@pytest.mark.parametrize("shape,axis", [((40001, 5), 1), ((3, 4, 50001), 1)])
def test_statistics_keep_float64_accuracy(shape, axis, case):
    """float64 statistics exact to float64 rounding, for both kernel families: with a
    large offset (chunk means are carried as shift + deviation through the merge) and
    when the first value of every chunk is an outlier (the one-pass sums, shifted by that
    value, must fall back to two passes)."""
    rng = np.random.default_rng(60)
    x = rng.standard_normal(shape)
    if case == "offset":
        x += 1e8
    else:  # white-box placement: the first value of each chunk of each channel
        outer, C, inner = shape if len(shape) == 3 else (shape[0], shape[1], 1)
        chunk = fastbn.cpu._chunk((outer, C, inner), 8)  # rows (inner 1) or values
        flat = np.moveaxis(x, axis, 0).reshape(C, -1) if inner > 1 else x.T
        assert chunk < flat.shape[1]
        flat[:, ::chunk] = 1e6
        x = (
            np.moveaxis(flat.reshape((C, outer, inner)), 0, 1).reshape(shape)
            if inner > 1
            else flat.T.copy()
        )
    _, mean, invstd = fastbn.batch_norm_forward(x, axis=axis, eps=1e-300)
    # exact means (rational arithmetic), then the float64 variance around them
    cols = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
    mean_exact = np.array([float(sum(map(Fraction, col)) / col.size) for col in cols])
    var_ref = np.mean((cols - mean_exact[:, None]) ** 2, axis=1)
    assert_close(mean, mean_exact, rtol=1e-14, atol=0, name="mean")
    # a few float64 roundings; before the shifted summaries the offset cost 1e-9 and the
    # unguarded one-pass sums 1e-11
    assert_close(1.0 / invstd**2, var_ref, rtol=1e-13, atol=0, name="var")


def test_inputs_are_not_modified():
    rng = np.random.default_rng(7)
    x = make((6, 3, 4), np.float32, rng)
    dy = make((6, 3, 4), np.float32, rng)
    gamma, beta = params(3, rng)
    copies = [a.copy() for a in (x, dy, gamma, beta)]
    _, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta)
    fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta)
    for a, c in zip((x, dy, gamma, beta), copies):
        np.testing.assert_array_equal(a, c)


class TestOut:
    def test_forward_writes_into_out(self):
        rng = np.random.default_rng(8)
        x = make((5, 3, 4), np.float32, rng)
        out = np.full_like(x, np.nan)
        y, _, _ = fastbn.batch_norm_forward(x, out=out)
        assert y is out
        assert_close(out, ref.forward(x)[0], **tol(np.float32))

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_out_in_another_layout(self, dtype):
        rng = np.random.default_rng(9)
        x = make((5, 3, 4), dtype, rng)
        out = np.asfortranarray(np.full_like(x, np.nan))
        y, _, _ = fastbn.batch_norm_forward(x, out=out)
        assert y is out
        assert_close(out, ref.forward(x)[0], **tol(dtype))

    def test_in_place(self):
        rng = np.random.default_rng(10)
        x = make((7, 3, 5), np.float64, rng)
        dy = make(x.shape, np.float64, rng)
        _, mean, invstd = fastbn.batch_norm_forward(x)
        y_ref = ref.forward(x)[0]
        dx_ref = ref.backward(dy, x, mean, invstd)[0]
        dx, _, _ = fastbn.batch_norm_backward(dy, x, mean, invstd, out=dy)
        assert dx is dy
        assert_close(dy, dx_ref, **tol(np.float64), name="dx in place")
        y, _, _ = fastbn.batch_norm_forward(x, out=x)
        assert y is x
        assert_close(x, y_ref, **tol(np.float64), name="y in place")

    def test_overlapping_out_is_handled(self):
        rng = np.random.default_rng(11)
        buf = make((9, 4), np.float64, rng)
        x = buf[:8]
        expected = ref.forward(x.copy())[0]
        out = buf[1:]
        fastbn.batch_norm_forward(x.copy(), out=out)  # no overlap with its own input
        buf = make((9, 4), np.float64, np.random.default_rng(11))
        x, out = buf[:8], buf[1:]
        fastbn.batch_norm_forward(x, out=out)
        assert_close(out, expected, **tol(np.float64))

    def test_inference_and_batch_norm_out(self):
        rng = np.random.default_rng(12)
        x = make((6, 4), np.float32, rng)
        out = np.empty_like(x)
        assert fastbn.batch_norm_inference(x, np.zeros(4), np.ones(4), out=out) is out
        assert fastbn.batch_norm(x, training=True, out=out) is out
        assert_close(out, ref.forward(x)[0], **tol(np.float32))


class TestBatchNormFunction:
    @pytest.mark.parametrize("dtype", [np.float32, np.float64])
    def test_training_updates_running_stats_like_torch(self, dtype):
        rng = np.random.default_rng(13)
        x = make((8, 3, 5), dtype, rng, offset=3.0)
        rm = rng.normal(size=3).astype(dtype)
        rv = rng.uniform(1, 2, 3).astype(dtype)
        rm0, rv0 = rm.copy(), rv.copy()
        y = fastbn.batch_norm(x, rm, rv, training=True, momentum=0.3)
        y_ref, mean, _, var = ref.forward(x)
        assert_close(y, y_ref, **tol(dtype))
        exp_m, exp_v = ref.update_running(rm0, rv0, mean, var, 40, 0.3)
        assert_close(rm, exp_m, **tol(dtype), name="running_mean")
        assert_close(rv, exp_v, **tol(dtype), name="running_var")

    def test_keras_convention_biased_variance(self):
        rng = np.random.default_rng(14)
        x = make((10, 4), np.float64, rng)
        rm, rv = np.zeros(4), np.ones(4)
        fastbn.batch_norm(
            x, rm, rv, training=True, momentum=1 - 0.99, eps=1e-3, running_var_unbiased=False
        )
        _, mean, _, var = ref.forward(x, eps=1e-3)
        exp_m, exp_v = ref.update_running(
            np.zeros(4), np.ones(4), mean, var, 10, 0.01, unbiased=False
        )
        assert_close(rm, exp_m, **tol(np.float64))
        assert_close(rv, exp_v, **tol(np.float64))

    def test_cumulative_average_with_momentum_none(self):
        rng = np.random.default_rng(15)
        batches = [make((6, 2), np.float64, rng, offset=i) for i in range(4)]
        rm, rv = np.zeros(2), np.ones(2)
        for n, x in enumerate(batches):
            fastbn.batch_norm(x, rm, rv, training=True, momentum=None, num_batches_tracked=n)
        means = [ref.forward(x)[1] for x in batches]
        vars_ = [ref.forward(x)[3] * 6 / 5 for x in batches]
        assert_close(rm, np.mean(means, axis=0), **tol(np.float64))
        assert_close(rv, np.mean(vars_, axis=0), **tol(np.float64))

    def test_eval_uses_running_stats(self):
        rng = np.random.default_rng(16)
        x = make((5, 3), np.float32, rng)
        rm, rv = rng.normal(size=3), rng.uniform(1, 2, 3)
        y = fastbn.batch_norm(x, rm, rv, training=False)
        assert_close(y, ref.inference(x, rm, rv), **tol(np.float32))

    def test_training_without_running_stats(self):
        x = make((5, 3), np.float32, np.random.default_rng(17))
        assert_close(fastbn.batch_norm(x, training=True), ref.forward(x)[0], **tol(np.float32))


def test_cpu_results_bitwise_identical_for_any_thread_count(kernel_path):
    import numba

    rng = np.random.default_rng(18)
    # (64, 1024, 7): short runs and many channels, chunks at _config.CHUNK_MIN_CHANNEL_BYTES
    cases = [
        ((4, 6, 40001), 1),
        ((16, 8, 1001), 1),
        ((50001, 7), 1),
        ((8, 3, 64, 64), 1),
        ((30, 20, 20, 9), -1),
        ((64, 1024, 7), 1),
    ]
    default = numba.get_num_threads()
    try:
        for shape, axis in cases:
            x = make(shape, np.float32, rng, offset=5.0)
            dy = make(shape, np.float32, rng)
            results = []
            for threads in sorted({1, 2, default}):
                numba.set_num_threads(threads)
                for _ in range(2):
                    y, mean, invstd = fastbn.batch_norm_forward(x, axis=axis)
                    dx, dg, db = fastbn.batch_norm_backward(
                        dy, x, mean, invstd, np.ones(shape[axis]), np.zeros(shape[axis]), axis=axis
                    )
                    results.append((y, mean, invstd, dx, dg, db))
            for r in results[1:]:
                for a, b in zip(results[0], r):
                    assert np.array_equal(a, b), f"results differ between thread counts for {shape}"
    finally:
        numba.set_num_threads(default)


@pytest.mark.parametrize("shape", [(16, 8, 1001), (4, 3, 70001), (64, 5, 600)])
def test_fused_and_two_pass_paths_agree(shape):
    """The per-channel fused kernels reduce the same chunks in the same order as the
    two-pass ones; LLVM may vectorize the inlined chunk loops differently in the two
    contexts, so the agreement is to rounding, not bitwise (a given shape always takes
    the same path, so results stay reproducible)."""
    from fastbn import cpu

    rng = np.random.default_rng(19)
    x = make(shape, np.float32, rng, offset=3.0)
    dy = make(shape, np.float32, rng)
    C = shape[1]
    gamma, beta = rng.uniform(0.5, 1.5, C), rng.normal(size=C)
    results = []
    for fuse in (True, False):
        y = np.empty_like(x)
        mean, var, invstd = cpu.forward_training(x, gamma, beta, 1e-5, True, y, fuse=fuse)
        dx = np.empty_like(x)
        grads = cpu.backward(dy, x, mean, invstd, gamma, beta, True, dx, fuse=fuse)
        results.append((y, mean, var, invstd, dx) + grads)
    names = ("y", "mean", "var", "invstd", "dx", "dgamma", "dbeta")
    for name, a, b in zip(names, *results):
        # float64 statistics: a few ulps; float32 outputs: one float32 rounding
        assert_close(
            a,
            b,
            rtol=1e-6 if a.dtype == np.float32 else 1e-12,
            atol=1e-6 if a.dtype == np.float32 else 1e-9,
            name=name,
        )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "shape,axis",
    [
        ((2, 3), 1),
        ((7, 3), -1),
        ((4, 5, 6, 3), -1),
        ((3, 5, 7), 1),
        ((16, 8, 1001), 1),
        ((40001, 5), 1),
    ],
)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_direct_and_general_host_paths_agree_bitwise(shape, axis, dtype, activation):
    """Plain NumPy calls take a direct host path (fastbn.api._direct_view); a NumPy
    integer axis sends the same call through the general path. Both must run the same
    kernels on the same view, so every output agrees bit for bit."""
    from fastbn import api

    rng = np.random.default_rng(23)
    x = make(shape, dtype, rng, offset=2.0)
    dy = make(shape, dtype, rng)
    C = shape[axis]
    gamma, beta = params(C, rng, dtype)
    rm, rv = rng.normal(size=C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
    assert api._direct_view(x, axis, None, gamma, beta) is not None
    assert api._direct_view(x, np.int64(axis), None, gamma, beta) is None
    for gb in ((gamma, beta), (None, None)):
        results = []
        for ax in (axis, np.int64(axis)):
            y, mean, invstd = fastbn.batch_norm_forward(x, *gb, axis=ax, activation=activation)
            grads = fastbn.batch_norm_backward(
                dy, x, mean, invstd, *gb, axis=ax, activation=activation
            )
            inf = fastbn.batch_norm_inference(x, rm, rv, *gb, axis=ax, activation=activation)
            out = np.empty_like(x)
            fastbn.batch_norm_forward(x, *gb, axis=ax, activation=activation, out=out)
            results.append((y, mean, invstd, inf, out) + grads)
        for a, b in zip(*results):
            if a is None:
                assert b is None
                continue
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 64, 255])
@pytest.mark.parametrize("C", [1, 3, 64, 100])
def test_small_call_drivers_agree_bitwise_with_the_general_ones(rows, C, dtype):
    """The direct path runs a small serial rows batch (one reduction chunk) through the
    small-call drivers (``cpu.small_forward_kernel`` and friends: fewer arguments,
    statistics in their final dtype, the elementwise passes four rows at a time). They
    must give every bit of the general drivers' results (compared byte for byte, so the
    sign of zero counts), the rows left after the groups of four included, with an
    outlier first row (the two-pass fallback of the statistics) and ReLU."""
    from fastbn import _cpu_backend, cpu

    rng = np.random.default_rng(rows * 1000 + C)
    x = make((rows, C), dtype, rng, offset=3.0)
    x[0, ::2] = 1e4  # an outlier first row in half the channels
    dy = make((rows, C), dtype, rng)
    dy[:, 0] = -0.0
    x3, dy3 = x.reshape(rows, C, 1), dy.reshape(rows, C, 1)
    drivers = cpu.drivers_for(x3)
    assert drivers.small
    for gamma, beta in (params(C, rng, dtype), params(C, rng, np.float64)):
        for relu in (False, True):
            stats = np.empty((3, C))
            y3 = np.empty_like(x3)
            drivers.forward(x3, drivers.chunk, 1e-5, gamma, beta, relu, y3, *stats)
            y, mean, invstd = _cpu_backend.direct_forward(
                x3, np.empty_like(x), gamma, beta, 1e-5, relu
            )
            assert y.tobytes() == y3.tobytes()
            assert mean.tobytes() == stats[0].astype(dtype).tobytes()
            assert invstd.tobytes() == stats[2].astype(dtype).tobytes()
            rv = rng.uniform(0.5, 2, C).astype(gamma.dtype)
            drivers.inference(x3, mean, rv, gamma, beta, 1e-5, relu, y3)
            y = _cpu_backend.direct_inference(
                x3, np.empty_like(x), mean, rv, gamma, beta, 1e-5, relu
            )
            assert y.tobytes() == y3.tobytes()
            grads = np.empty((2, C), dtype)
            dx3 = np.empty_like(x3)
            drivers.backward(dy3, x3, drivers.chunk, mean, invstd, gamma, beta, relu, dx3, *grads)
            dx = np.empty_like(x3)
            dgamma, dbeta = _cpu_backend.direct_backward(
                dy3, x3, mean, invstd, gamma, beta, relu, dx
            )
            assert dx.tobytes() == dx3.tobytes()
            assert dgamma.tobytes() == grads[0].tobytes() and dbeta.tobytes() == grads[1].tobytes()


def test_small_call_drivers_only_for_one_chunk_serial_rows():
    """A batch over one reduction chunk, a parallel one, or a strided one takes the
    general drivers."""
    from fastbn import cpu

    assert cpu.drivers_for(np.zeros((256, 64, 1), np.float32)).small
    assert not cpu.drivers_for(np.zeros((256, 64, 7), np.float32)).small
    assert not cpu.drivers_for(np.zeros((70000, 64, 1), np.float32)).small


@pytest.mark.parametrize("param_dtype", [">f4", ">f8", np.float16])
def test_other_parameter_dtypes_take_the_general_path(param_dtype):
    """The direct path passes per-channel arrays to the kernels as they are, so it takes
    only native float32/float64 ones; others (byte-swapped, float16) go through the
    general path, which converts them exactly to float64. The kernels read every
    per-channel array as float64, so the results agree bit for bit with native ones of
    the same values."""
    from fastbn import api

    rng = np.random.default_rng(5)
    x = make((9, 4, 5), np.float32, rng, offset=1.0)
    dy = make((9, 4, 5), np.float32, rng)
    values = rng.normal(size=(4, 4))
    values[3] = np.abs(values[3]) + 0.5  # running_var
    native = list(values.astype(np.float16).astype(np.float32))  # float16-exact values
    other = [p.astype(param_dtype) for p in native]
    assert api._direct_view(x, 1, None, *other[:1]) is None
    assert api._direct_view(x, 1, None, *native) is not None
    results = []
    for gamma, beta, rm, rv in (native, other):
        y, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta)
        results.append(
            (y, mean, invstd, fastbn.batch_norm_inference(x, rm, rv, gamma, beta))
            + fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta)
        )
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_direct_path_in_place_and_aliasing_out():
    """``out=x`` (in place) runs directly; an ``out`` that overlaps x without coinciding
    is sent to the general path, which computes into a temporary."""
    from fastbn import api

    rng = np.random.default_rng(24)
    x = make((9, 4, 6), np.float32, rng)
    expected, _, _ = fastbn.batch_norm_forward(x.copy())
    assert api._direct_out(x, x, x) is x
    inplace = x.copy()
    y, _, _ = fastbn.batch_norm_forward(inplace, out=inplace)
    assert y is inplace
    np.testing.assert_array_equal(y, expected)
    buf = np.concatenate([x.ravel(), np.zeros(24, np.float32)])
    xs, shifted = buf[: x.size].reshape(x.shape), buf[24:].reshape(x.shape)
    assert api._direct_out(shifted, xs, xs) is None
    y, _, _ = fastbn.batch_norm_forward(xs, out=shifted)
    np.testing.assert_array_equal(y, expected)


def test_per_channel_arrays_of_any_float_dtype():
    """Per-channel arguments in float16 or big-endian float64 (which Numba cannot load)
    give the results of their float64 values."""
    rng = np.random.default_rng(25)
    x = make((12, 3, 5), np.float32, rng)
    dy = make(x.shape, np.float32, rng)
    gamma, beta = params(3, rng, np.float16)
    rm, rv = np.zeros(3, np.float16), np.ones(3, ">f8")
    y, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta)
    y64, _, _ = fastbn.batch_norm_forward(x, gamma.astype(np.float64), beta.astype(np.float64))
    np.testing.assert_array_equal(y, y64)
    grads = fastbn.batch_norm_backward(
        dy, x, mean.astype(np.float16), invstd.astype(">f8"), gamma, beta
    )
    grads64 = fastbn.batch_norm_backward(
        dy,
        x,
        mean.astype(np.float16).astype(np.float64),
        invstd.astype(np.float64),
        gamma.astype(np.float64),
        beta.astype(np.float64),
    )
    for a, b in zip(grads, grads64):
        np.testing.assert_array_equal(a, b)
    inf = fastbn.batch_norm_inference(x, rm, rv, gamma, beta)
    np.testing.assert_array_equal(
        inf,
        fastbn.batch_norm_inference(
            x,
            rm.astype(np.float64),
            rv.astype(np.float64),
            gamma.astype(np.float64),
            beta.astype(np.float64),
        ),
    )


def test_kernel_path_fixture_reaches_the_fused_kernels(kernel_path):
    """The ``kernel_path`` fixture does what the tests using it rely on: the plan of a
    small strided shape is two-pass, and fused under ``"fused"``."""
    from fastbn import cpu

    for shape in [(16, 8, 1001), (3, 5, 7)]:
        plan = cpu._plan(np.empty(shape, np.float32))
        assert plan.fuse_forward == plan.fuse_backward == (kernel_path == "fused"), plan
    assert not cpu._plan(np.empty((40001, 5, 1), np.float32)).fuse_forward  # rows: never
