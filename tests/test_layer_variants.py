"""The layer's variants (batch renormalization, ghost batches) and its parity with Keras
and PyTorch (center/scale, resets, strict loading, dtype conversion).

Each variant runs several training steps against the float64 reference of its semantics
(tests/reference.py: the formula, its autograd gradient, the statistics' updates) on 2-D,
NCHW and NHWC inputs. The same tests run on the GPU layer: in this process on a real GPU,
else :func:`test_cuda_variants_under_simulator` reruns this file under Numba's CUDA
simulator (the settings of tests/test_cuda.py) with only the ``cuda`` cases selected.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import reference as ref
from helpers import assert_close, child_env, tol

import fastbn

CHILD = os.environ.get("FASTBN_CUDA_TEST_CHILD") == "1"
SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
SIM_ENV = {  # as tests/test_cuda.py: two warps per block, several blocks per channel
    "NUMBA_ENABLE_CUDASIM": "1",
    "FASTBN_CUDA_THREADS": "64",
    "FASTBN_CUDA_MIN_VALUES_PER_THREAD": "4",
    "FASTBN_CUDA_TARGET_BLOCKS": "8",
    "FASTBN_CUDA_SYNC_NONFINITE": "0",
}
ON_GPU = CHILD or (not SIMULATED and fastbn.cuda_available())
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not ON_GPU, reason="no GPU"))]

# (shape, axis): 2-D, NCHW, NHWC. Small, for the simulator; batch 8 = 2 ghost batches of 4.
LAYOUTS = [((8, 5), 1), ((8, 3, 2, 3), 1), ((8, 2, 3, 3), -1)]
STEPS = 3


def rand(shape, seed, offset=0.0, scale=1.0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return (offset + scale * rng.standard_normal(shape)).astype(dtype)


def on(device, a):
    """``a`` on ``device`` (a Numba device array for "cuda")."""
    if device == "cpu" or a is None:
        return a
    from numba import cuda

    return cuda.to_device(np.ascontiguousarray(a))


def host(a):
    if a is None or isinstance(a, np.ndarray):
        return a
    return fastbn.cuda.to_host(a)


def make(device, C, axis, convention, dtype=np.float64, **options):
    """A layer of the convention with random gamma/beta, on ``device``."""
    if convention == "keras":
        bn = fastbn.BatchNorm.keras(C, axis=axis, momentum=0.9, dtype=dtype, **options)
    else:
        bn = fastbn.BatchNorm(C, axis=axis, momentum=0.2, dtype=dtype, **options)
    rng = np.random.default_rng(C)
    if bn.gamma is not None:
        bn.gamma[:] = rng.uniform(0.5, 1.5, C)
    if bn.beta is not None:
        bn.beta[:] = rng.normal(size=C)
    return bn.to("cuda") if device == "cuda" else bn


def state64(bn):
    return {k: np.asarray(v, np.float64) for k, v in bn.state_dict().items() if k != "x"}


def check(actual, expected, dtype, name, scale=1.0):
    t = tol(dtype, scale)
    if name in ("dx", "dgamma", "dbeta") and not ref.AUTOGRAD:
        # the reference gradients are finite differences (no torch): their own error
        t = {k: max(v, ref.FD_TOL) for k, v in t.items()}
    assert_close(host(actual), expected, **t, name=name)


# --------------------------------------------------------------------------------------
# Batch renormalization
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("convention", ["torch", "keras"])
@pytest.mark.parametrize(
    "clipping,relu",
    [({"rmin": 0.8, "rmax": 1.25, "dmax": 0.5}, False), (None, False), ({"rmax": 2.0}, True)],
)
def test_renorm_matches_reference(device, shape, axis, convention, clipping, relu):
    C = shape[axis]
    bn = make(
        device,
        C,
        axis,
        convention,
        renorm=True,
        renorm_clipping=clipping,
        renorm_momentum=0.7,
        activation="relu" if relu else None,
    )
    bounds = fastbn.BatchNorm(1, renorm=True, renorm_clipping=clipping).renorm_clipping
    g, b = host(bn.gamma).astype(np.float64), host(bn.beta).astype(np.float64)
    state = state64(bn)
    clipped = 0
    for step in range(STEPS):
        # the batch statistics drift, so that r and d leave their bounds
        x = rand(shape, step, offset=0.5 * step, scale=1.0 + 0.4 * step)
        dy = rand(shape, 10 + step)
        y_ref, dx_ref, dg_ref, db_ref = ref.formula_grads(
            ref.renorm_formula,
            x,
            g,
            b,
            dy,
            axis,
            bn.eps,
            state["renorm_mean"],
            state["renorm_stddev"],
            bounds,
            relu=relu,
        )
        mean, var = ref.batch_moments(x, axis)
        r = np.sqrt(var + bn.eps) / np.maximum(state["renorm_stddev"], bn.eps**0.5)
        clipped += int(((r < bounds[0]) | (r > bounds[1])).sum())
        new = ref.renorm_update(state, x, axis, bn.eps, 0.7, bn.momentum, bn.running_var_unbiased)
        y = bn.forward(on(device, x), training=True)
        check(y, y_ref, np.float64, "y")
        dx = bn.backward(on(device, dy))
        check(dx, dx_ref, np.float64, "dx")
        check(bn.dgamma, dg_ref, np.float64, "dgamma", scale=10)
        check(bn.dbeta, db_ref, np.float64, "dbeta", scale=10)
        for k, v in new.items():
            check(getattr(bn, k), v, np.float64, k)
        state.update(new)
    assert bn.num_batches_tracked == STEPS
    if clipping is not None and clipping.get("rmin") == 0.8:
        assert clipped, "the clipping bounds were never reached: the test would not see them"
    x = rand(shape, 99, offset=1.0)
    y_eval = bn.eval().forward(on(device, x))
    y_ref = ref.inference(
        x, state["running_mean"], state["running_var"], g, b, axis, bn.eps, bn.activation
    )
    check(y_eval, y_ref, np.float64, "eval")


@pytest.mark.parametrize("device", DEVICES)
def test_renorm_float32(device):
    shape, axis = (8, 3, 2, 3), 1
    bn = make(device, 3, axis, "keras", dtype=np.float32, renorm=True)
    g, b = host(bn.gamma).astype(np.float64), host(bn.beta).astype(np.float64)
    state = state64(bn)
    for step in range(2):
        x = rand(shape, step, offset=2.0 + step, dtype=np.float32)
        dy = rand(shape, 5 + step, dtype=np.float32)
        y_ref, dx_ref, dg_ref, db_ref = ref.formula_grads(
            ref.renorm_formula,
            x,
            g,
            b,
            dy,
            axis,
            bn.eps,
            state["renorm_mean"],
            state["renorm_stddev"],
            bn.renorm_clipping,
        )
        new = ref.renorm_update(state, x, axis, bn.eps, 0.99, bn.momentum, bn.running_var_unbiased)
        # float32 outputs of float64 statistics: the per-dtype tolerance; the gradient
        # sums add 48 float32 products: 10x
        check(bn.forward(on(device, x), training=True), y_ref, np.float32, "y")
        check(bn.backward(on(device, dy)), dx_ref, np.float32, "dx")
        check(bn.dgamma, dg_ref, np.float32, "dgamma", scale=10)
        check(bn.dbeta, db_ref, np.float32, "dbeta", scale=10)
        for k, v in new.items():
            check(getattr(bn, k), v, np.float32, k)
        state.update(new)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "options", [dict(renorm=True, renorm_clipping={"rmax": 1.5}), dict(virtual_batch_size=4)]
)
def test_variants_on_a_float16_layer(device, options):
    shape, axis = (8, 3, 2, 3), 1
    bn = make(device, 3, axis, "torch", dtype=np.float16, **options)
    g, b = host(bn.gamma).astype(np.float64), host(bn.beta).astype(np.float64)
    x = rand(shape, 1, offset=1.0, dtype=np.float16)
    dy = rand(shape, 2, dtype=np.float16)
    if bn.renorm:
        formula, args = ref.renorm_formula, (bn.eps, np.zeros(3), np.ones(3), bn.renorm_clipping)
    else:
        formula, args = ref.ghost_formula, (bn.eps, 4)
    y_ref, dx_ref, dg_ref, _ = ref.formula_grads(formula, x, g, b, dy, axis, *args)
    y = bn.forward(on(device, x), training=True)
    assert host(y).dtype == np.float16
    # float16 in and out, float32 arithmetic: the float16 tolerance; sums of 18 values 10x
    check(y, y_ref, np.float16, "y")
    check(bn.backward(on(device, dy)), dx_ref, np.float16, "dx")
    check(bn.dgamma, dg_ref, np.float16, "dgamma", scale=10)
    assert host(bn.running_var).dtype == np.float16


def test_renorm_ramp_follows_the_paper():
    shape, axis, ramp = (16, 4), 1, 4
    bn = make("cpu", 4, axis, "torch", renorm=True, renorm_ramp=ramp, renorm_momentum=0.5)
    g, b = bn.gamma.copy(), bn.beta.copy()
    state = state64(bn)
    for step in range(ramp + 2):
        t = min(step / ramp, 1.0)
        bounds = (1.0 / (1.0 + 2.0 * t), 1.0 + 2.0 * t, 5.0 * t)
        x = rand(shape, step, offset=3.0 * step, scale=1.0 + step)
        y_ref = ref.renorm_formula(
            x,
            g[None],
            b[None],
            axis,
            bn.eps,
            state["renorm_mean"][None],
            state["renorm_stddev"][None],
            bounds,
        )
        if step == 0:  # rmax 1, dmax 0: plain BatchNorm
            assert_close(y_ref, ref.forward(x, g, b, axis, bn.eps)[0], **tol(np.float64))
        check(bn.forward(x, training=True), y_ref, np.float64, f"y at step {step}")
        state.update(ref.renorm_update(state, x, axis, bn.eps, 0.5, bn.momentum, True))
    assert "renorm_ramp=4" in repr(bn)


@pytest.mark.parametrize(
    "clipping,error,match",
    [
        ({"rmin": 2.0, "rmax": 1.0}, ValueError, "rmax"),
        ({"dmax": -1.0}, ValueError, "dmax"),
        ({"rmax": -0.5}, ValueError, "rmax"),  # below the default rmin 0
        ({"r_max": 3.0}, ValueError, "unknown key.*r_max"),
        ({"rmax": float("nan")}, ValueError, "NaN"),
        ({"rmax": "3"}, TypeError, "rmax"),
        ([("rmax", 3.0)], TypeError, "dict"),
    ],
)
def test_bad_renorm_options_fail_at_construction(clipping, error, match):
    with pytest.raises(error, match=match):
        fastbn.BatchNorm(3, renorm=True, renorm_clipping=clipping)
    with pytest.raises(error, match=match):
        fastbn.BatchNorm.keras(3, renorm=True, renorm_clipping=clipping)


def test_renorm_option_combinations():
    assert fastbn.BatchNorm.keras(2, renorm=True, renorm_clipping={"rmax": 3}).renorm_clipping == (
        0.0,
        3.0,
        float("inf"),
    )
    with pytest.raises(ValueError, match="need renorm=True"):
        fastbn.BatchNorm(2, renorm_clipping={"rmax": 3})
    with pytest.raises(ValueError, match="not both"):
        fastbn.BatchNorm(2, renorm=True, renorm_clipping={"rmax": 3}, renorm_ramp=10)
    with pytest.raises(ValueError, match="track_running_stats"):
        fastbn.BatchNorm(2, renorm=True, track_running_stats=False)
    with pytest.raises(ValueError, match="renorm_momentum"):
        fastbn.BatchNorm(2, renorm=True, renorm_momentum=1.5)
    with pytest.raises(ValueError, match="cannot be combined"):
        fastbn.BatchNorm(2, renorm=True, virtual_batch_size=4)


def test_renorm_state_dict_and_nonfinite_batch():
    bn = fastbn.BatchNorm.keras(3, renorm=True)
    assert {"renorm_mean", "renorm_stddev"} <= set(bn.state_dict())
    bn.forward(rand((8, 3), 1, offset=2.0, dtype=np.float32), training=True)
    before = bn.state_dict()
    x = rand((8, 3), 2, dtype=np.float32)
    x[0, 1] = np.nan
    with pytest.raises(FloatingPointError):
        bn.forward(x, training=True)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    other = fastbn.BatchNorm.keras(3, renorm=True, dtype=np.float64)
    other.load_state_dict(before)
    np.testing.assert_array_equal(other.renorm_stddev, before["renorm_stddev"])
    assert {"renorm_mean", "renorm_stddev", "running_stddev"} <= set(before)
    # a renorm stddev near 0 is floored at sqrt(eps), as Keras does
    other.renorm_stddev[:] = [1e-9, 0.0, 2.0]
    state = state64(other)
    x = rand((8, 3), 3, offset=0.5)
    y_ref = ref.renorm_formula(
        x,
        other.gamma[None],
        other.beta[None],
        1,
        other.eps,
        state["renorm_mean"][None],
        state["renorm_stddev"][None],
        other.renorm_clipping,
    )
    assert_close(other.forward(x, training=True), y_ref, **tol(np.float64))
    new = ref.renorm_update(state, x, 1, other.eps, 0.99, other.momentum)
    for k, v in new.items():
        assert_close(getattr(other, k), v, **tol(np.float64), name=k)


# --------------------------------------------------------------------------------------
# Ghost batch normalization
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("convention", ["torch", "keras"])
@pytest.mark.parametrize("relu", [False, True])
def test_ghost_matches_reference(device, shape, axis, convention, relu):
    C, k = shape[axis], 4
    bn = make(
        device,
        C,
        axis,
        convention,
        virtual_batch_size=k,
        activation="relu" if relu else None,
    )
    g, b = host(bn.gamma).astype(np.float64), host(bn.beta).astype(np.float64)
    rm, rv = np.zeros(C), np.ones(C)
    for step in range(STEPS):
        x = rand(shape, step, offset=1.0 + step)
        x[:k] += 2.0  # ghost batches of different statistics
        dy = rand(shape, 10 + step)
        y_ref, dx_ref, dg_ref, db_ref = ref.formula_grads(
            ref.ghost_formula, x, g, b, dy, axis, bn.eps, k, relu=relu
        )
        # the exact statistics of the whole batch, not an average of the ghost batches'
        mean, var = ref.batch_moments(x, axis)
        m = x.size // C
        rm, rv = ref.update_running(rm, rv, mean, var, m, bn.momentum, bn.running_var_unbiased)
        y = bn.forward(on(device, x), training=True)
        check(y, y_ref, np.float64, "y")
        dx = bn.backward(on(device, dy))
        check(dx, dx_ref, np.float64, "dx")
        check(bn.dgamma, dg_ref, np.float64, "dgamma", scale=10)
        check(bn.dbeta, db_ref, np.float64, "dbeta", scale=10)
        check(bn.running_mean, rm, np.float64, "running_mean")
        check(bn.running_var, rv, np.float64, "running_var")
    assert bn.num_batches_tracked == STEPS
    x = rand(shape, 99, offset=1.0)
    y_ref = ref.inference(x, rm, rv, g, b, axis, bn.eps, bn.activation)
    check(bn.eval().forward(on(device, x)), y_ref, np.float64, "eval")


@pytest.mark.parametrize("device", DEVICES)
def test_ghost_float32_and_averaged_variances_differ(device):
    shape, axis, k = (8, 2, 3, 3), -1, 2
    bn = make(device, 3, axis, "keras", dtype=np.float32, virtual_batch_size=k)
    x = rand(shape, 3, offset=4.0, dtype=np.float32)
    x[: shape[0] // 2] *= 3.0
    dy = rand(shape, 4, dtype=np.float32)
    g, b = host(bn.gamma).astype(np.float64), host(bn.beta).astype(np.float64)
    y_ref, dx_ref, dg_ref, db_ref = ref.formula_grads(ref.ghost_formula, x, g, b, dy, axis, 1e-3, k)
    check(bn.forward(on(device, x), training=True), y_ref, np.float32, "y")
    check(bn.backward(on(device, dy)), dx_ref, np.float32, "dx")
    check(bn.dgamma, dg_ref, np.float32, "dgamma", scale=10)
    check(bn.dbeta, db_ref, np.float32, "dbeta", scale=10)
    mean, var = ref.batch_moments(x, axis)
    f = bn.momentum  # Keras's 0.9: 0.1 of the new batch
    check(bn.running_var, 1 - f + f * var, np.float32, "running_var")
    # tf-keras's average of the ghost variances leaves out the spread of the ghost means
    averaged = np.mean([ref.batch_moments(x[i : i + k], axis)[1] for i in range(0, 8, k)], 0)
    assert np.all(np.abs((1 - f + f * averaged) - host(bn.running_var)) > 1e-3)


@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_ghost_of_the_whole_batch_is_plain_batch_norm_bit_for_bit(shape, axis):
    plain = make("cpu", shape[axis], axis, "torch", dtype=np.float32)
    ghost = make("cpu", shape[axis], axis, "torch", dtype=np.float32, virtual_batch_size=8)
    for step in range(2):
        x = rand(shape, step, offset=3.0, dtype=np.float32)
        dy = rand(shape, 7 + step, dtype=np.float32)
        np.testing.assert_array_equal(ghost.forward(x), plain.forward(x))
        np.testing.assert_array_equal(ghost.backward(dy), plain.backward(dy))
        for k, v in plain.state_dict().items():
            np.testing.assert_array_equal(ghost.state_dict()[k], v, err_msg=k)
        np.testing.assert_array_equal(ghost.dgamma, plain.dgamma)


def test_ghost_batch_size_must_be_a_multiple():
    bn = fastbn.BatchNorm(3, virtual_batch_size=4)
    bn.forward(rand((8, 3), 0, dtype=np.float32))
    before = bn.state_dict()
    with pytest.raises(ValueError, match=r"virtual_batch_size=4 must divide.*x.shape\[0\]=10"):
        bn.forward(rand((10, 3), 1, dtype=np.float32))
    with pytest.raises(ValueError, match="virtual_batch_size.*axis 0"):
        fastbn.BatchNorm(8, axis=0, virtual_batch_size=4).forward(rand((8, 3), 1))
    with pytest.raises(ValueError, match="more than 1 value"):
        fastbn.BatchNorm(3, virtual_batch_size=1).forward(rand((8, 3), 1))
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    # eval mode and batches of other sizes in eval: no ghost batches
    assert bn.forward(rand((3, 3), 2, dtype=np.float32), training=False).shape == (3, 3)
    with pytest.raises(ValueError, match="virtual_batch_size must be >= 1"):
        fastbn.BatchNorm(3, virtual_batch_size=0)
    with pytest.raises(TypeError, match="virtual_batch_size"):
        fastbn.BatchNorm(3, virtual_batch_size=2.0)


def test_variants_with_a_one_rank_communicator_equal_the_local_ones():
    MPI = pytest.importorskip("mpi4py.MPI")
    for options in (dict(renorm=True, renorm_clipping={"dmax": 0.5}), dict(virtual_batch_size=4)):
        local = make("cpu", 3, 1, "keras", **options)
        synced = make("cpu", 3, 1, "keras", comm=MPI.COMM_SELF, **options)
        for step in range(2):
            x, dy = rand((8, 3, 5), step, offset=2.0), rand((8, 3, 5), 5 + step)
            assert_close(synced.forward(x), local.forward(x), **tol(np.float64))
            assert_close(synced.backward(dy), local.backward(dy), **tol(np.float64))
            for k, v in local.state_dict().items():
                assert_close(synced.state_dict()[k], v, **tol(np.float64), name=k)
            assert_close(synced.dgamma, local.dgamma, **tol(np.float64, 10))


# --------------------------------------------------------------------------------------
# Parity with Keras and PyTorch
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("convention", ["torch", "keras"])
@pytest.mark.parametrize("center,scale", [(True, False), (False, True), (False, False)])
def test_center_and_scale_are_independent(device, convention, center, scale):
    shape, axis = (6, 3, 4), 1
    bn = make(device, 3, axis, convention, center=center, scale=scale)
    assert (bn.beta is not None, bn.gamma is not None) == (center, scale)
    assert len(bn.parameters()) == center + scale
    g = None if bn.gamma is None else host(bn.gamma)
    b = None if bn.beta is None else host(bn.beta)
    x, dy = rand(shape, 1, offset=2.0), rand(shape, 2)
    y_ref, dx_ref, dg_ref, db_ref = ref.formula_grads(
        lambda x, g, b, axis, eps: ref.ghost_formula(x, g, b, axis, eps, x.shape[0]),
        x,
        g,
        b,
        dy,
        axis,
        bn.eps,
    )
    check(bn.forward(on(device, x), training=True), y_ref, np.float64, "y")
    check(bn.backward(on(device, dy)), dx_ref, np.float64, "dx")
    assert (bn.dgamma is None) == (not scale) and (bn.dbeta is None) == (not center)
    if scale:
        check(bn.dgamma, dg_ref, np.float64, "dgamma", scale=10)
    if center:
        check(bn.dbeta, db_ref, np.float64, "dbeta", scale=10)
    keys = set(bn.state_dict())
    assert ("gamma" in keys, "beta" in keys) == (scale, center)
    assert f"center={center}, scale={scale}" in repr(bn) or (center == scale)


def test_reset_running_stats_and_parameters():
    bn = make("cpu", 3, 1, "torch", renorm=True)
    bn.forward(rand((8, 3), 0, offset=4.0), training=True)
    gamma = bn.gamma.copy()
    bn.reset_running_stats()
    np.testing.assert_array_equal(bn.running_mean, np.zeros(3))
    np.testing.assert_array_equal(bn.running_var, np.ones(3))
    np.testing.assert_array_equal(bn.renorm_stddev, np.ones(3))
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.gamma, gamma)  # parameters kept
    bn.reset_parameters()
    np.testing.assert_array_equal(bn.gamma, np.ones(3))
    np.testing.assert_array_equal(bn.beta, np.zeros(3))


def test_load_state_dict_strict_and_not():
    a = make("cpu", 3, 1, "torch")
    a.forward(rand((8, 3), 0, offset=1.0), training=True)
    state = a.state_dict()
    b = fastbn.BatchNorm(3, dtype=np.float64)
    assert b.load_state_dict(state) == ([], [])
    partial = {k: v for k, v in state.items() if k != "num_batches_tracked"}
    with pytest.raises(KeyError, match=r"missing \['num_batches_tracked'\]"):
        fastbn.BatchNorm(3).load_state_dict(partial)
    with pytest.raises(KeyError, match=r"unexpected \['extra'\]"):
        fastbn.BatchNorm(3).load_state_dict(dict(state, extra=np.zeros(3)))
    c = fastbn.BatchNorm(3, dtype=np.float64)
    c.num_batches_tracked = 7
    result = c.load_state_dict(dict(partial, extra=1), strict=False)
    assert result.missing_keys == ["num_batches_tracked"] and result.unexpected_keys == ["extra"]
    np.testing.assert_array_equal(c.running_mean, a.running_mean)
    assert c.num_batches_tracked == 7
    d = fastbn.BatchNorm(3, dtype=np.float64)
    d.load_state_dict({"running_var": np.full(3, 2.0)}, strict=False)
    np.testing.assert_array_equal(d.running_var, np.full(3, 2.0))
    np.testing.assert_array_equal(d.gamma, np.ones(3))
    with pytest.raises(ValueError, match="shape"):  # present entries are checked all the same
        d.load_state_dict({"running_var": np.ones(4), "gamma": np.zeros(3)}, strict=False)
    np.testing.assert_array_equal(d.gamma, np.ones(3))


@pytest.mark.parametrize("device", DEVICES)
def test_dtype_conversion(device):
    bn = make(device, 3, 1, "keras", dtype=np.float32, renorm=True)
    bn.forward(on(device, rand((8, 3), 0, offset=1.0, dtype=np.float32)), training=True)
    bn.backward(on(device, rand((8, 3), 1, dtype=np.float32)))
    before = {k: np.asarray(v, np.float64) for k, v in bn.state_dict().items()}
    grad = host(bn.dgamma).astype(np.float64)
    assert bn.to(dtype=np.float64) is bn and bn.dtype == np.float64
    for k, v in bn.state_dict().items():
        assert np.asarray(v).dtype == (np.int64 if k == "num_batches_tracked" else np.float64)
        np.testing.assert_array_equal(np.asarray(v, np.float64), before[k], err_msg=k)
    assert host(bn.dgamma).dtype == np.float64
    np.testing.assert_array_equal(host(bn.dgamma), grad)
    x = rand((8, 3), 2, offset=1.0)
    assert host(bn.forward(on(device, x), training=True)).dtype == np.float64
    if device == "cuda":
        assert fastbn.api.is_cuda_array(bn.running_mean)


def test_dtype_conversion_that_overflows_changes_nothing():
    bn = fastbn.BatchNorm(2, dtype=np.float64)
    bn.running_var[:] = [1.0, 1e300]
    with pytest.raises(ValueError, match="running_var does not fit in dtype float16"):
        bn.to(dtype=np.float16)
    assert bn.dtype == np.float64 and bn.running_var.dtype == np.float64
    with pytest.raises(TypeError, match="dtype"):
        bn.to(dtype=np.int32)
    assert fastbn.BatchNorm(2).to(dtype=np.float16).gamma.dtype == np.float16


# --------------------------------------------------------------------------------------
# The GPU cases under the simulator
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(ON_GPU or SIMULATED, reason="the cuda cases run in this process")
def test_cuda_variants_under_simulator():
    """Rerun this file's ``cuda`` cases under Numba's CUDA simulator."""
    pytest.importorskip("numba.cuda")
    env = child_env(**SIM_ENV, FASTBN_CUDA_TEST_CHILD="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-x",
            __file__,
            "-k",
            "cuda and not simulator",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, (
        "CUDA variant tests failed under the simulator:\n"
        f"{proc.stdout[-5000:]}{proc.stderr[-2000:]}"
    )
    assert " passed" in proc.stdout and " skipped" not in proc.stdout, proc.stdout[-2000:]


@pytest.mark.mpi
def test_variants_over_two_ranks_equal_the_single_process_layer():
    """Renormalization with synchronized statistics and per-rank ghost batches, over 2
    ranks (tests/mpi/variant_checks.py): outputs, gradients and every statistic equal the
    single-process layer on the whole batch to float64 rounding."""
    pytest.importorskip("mpi4py")
    from helpers import find_mpiexec, run_mpi

    if find_mpiexec() is None:
        pytest.skip("no mpiexec")
    script = os.path.join(os.path.dirname(__file__), "mpi", "variant_checks.py")
    results = run_mpi(script, 2)
    assert set(results) == {"renorm NCHW uneven", "renorm NC", "ghost NHWC", "ghost NC"}
    for case, worst in results.items():
        assert {"y", "dx", "dgamma", "running_var"} <= set(worst)
        # merged moments and summed gradients reassociate float64 sums: ~1e-15 relative
        bad = {k: v for k, v in worst.items() if not v <= 1e-12}
        assert not bad, f"{case}: {bad}"


# The kernels the variants launch on a real GPU with argument types the rest of the suite
# does not compile: renormalization's folded coefficients are in the statistics dtype
# (float32) on a float16 layer, whose own gamma/beta are float16. Compiled for sm_90 with
# NVVM, without a GPU (as tests/test_cuda.py does for every kernel); exits 3 without NVVM.
_PTX_SCRIPT = r"""
import sys, types
import numpy as np
try:
    from numba import cuda, types as nt
    import numba.cuda.dispatcher as dispatcher
    from numba.cuda.cudadrv import nvvm
    nvvm.NVVM()
    cuda.compile_ptx(lambda a: None, (nt.float32[::1],), cc=(9, 0))
except Exception as exc:
    print("no NVVM:", exc)
    sys.exit(3)
dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
from fastbn import _cuda_kernels as K
f64, i64, b1 = nt.float64, nt.int64, nt.boolean
A = lambda dt, nd: nt.Array(dt, nd, "C")
k = K.build(np.dtype(np.float32))
x3, p1, s1 = A(nt.float16, 3), A(nt.float32, 1), A(f64, 1)
sigs = {
    "inference": (k.inference, (x3, x3, i64, i64, i64, s1, s1, f64, p1, b1, p1, b1, b1)),
    "backward_partials": (k.backward_partials,
        (x3, x3, i64, i64, i64, s1, s1, p1, b1, p1, b1, b1, A(f64, 3))),
    "backward_apply": (k.backward_apply, (x3, x3, x3, i64, i64, i64, A(f64, 3), i64, f64,
        s1, s1, p1, b1, p1, b1, b1, s1, b1, s1, b1)),
}
for name, (kernel, sig) in sigs.items():
    cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
    print("compiled", name)
"""


@pytest.mark.skipif(CHILD, reason="runs once, from the parent process")
def test_renorm_kernel_signatures_compile_for_a_real_gpu():
    pytest.importorskip("numba.cuda")
    env = child_env(NUMBA_ENABLE_CUDASIM=None, FASTBN_CUDA_THREADS=None)
    proc = subprocess.run(
        [sys.executable, "-c", _PTX_SCRIPT],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    if proc.returncode == 3:
        pytest.skip(f"libNVVM not installed: {proc.stdout.strip()[-200:]}")
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.count("compiled") == 3, proc.stdout


@pytest.mark.parametrize(
    "options", [dict(renorm=True, renorm_clipping={"dmax": 0.2}), dict(virtual_batch_size=4)]
)
def test_variants_without_a_running_update_and_frozen(options):
    """``update_running_stats=False``: the variant's output, no statistic moves; a frozen
    variant layer normalizes with the running statistics (inference) in training too."""
    bn = make("cpu", 3, 1, "torch", update_running_stats=False, **options)
    bn.forward(rand((8, 3), 0, offset=1.0), training=True)  # moves nothing
    before = bn.state_dict()
    g, b = bn.gamma.copy(), bn.beta.copy()
    x = rand((8, 3), 1, offset=2.0)
    if bn.renorm:
        y_ref = ref.renorm_formula(
            x, g[None], b[None], 1, bn.eps, np.zeros((1, 3)), np.ones((1, 3)), bn.renorm_clipping
        )
    else:
        y_ref = ref.ghost_formula(x, g[None], b[None], 1, bn.eps, 4)
    assert_close(bn.forward(x, training=True), y_ref, **tol(np.float64))
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    bn.frozen = True
    y = bn.forward(x, training=True)
    expected = ref.inference(x, bn.running_mean, bn.running_var, g, b, 1, bn.eps)
    assert_close(y, expected, **tol(np.float64))
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
