"""The BatchNorm layer: state, modes, gradients, state_dict, Keras conventions."""

import numpy as np
import pytest
import reference as ref
from helpers import assert_close, tol

import fastbn


def rand(shape, seed=0, dtype=np.float32, offset=0.0):
    return (offset + np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


def test_defaults():
    bn = fastbn.BatchNorm(5)
    np.testing.assert_array_equal(bn.gamma, np.ones(5, np.float32))
    np.testing.assert_array_equal(bn.beta, np.zeros(5, np.float32))
    np.testing.assert_array_equal(bn.running_mean, np.zeros(5, np.float32))
    np.testing.assert_array_equal(bn.running_var, np.ones(5, np.float32))
    assert bn.num_batches_tracked == 0 and bn.dgamma is None and bn.dbeta is None
    assert (bn.momentum, bn.eps, bn.axis) == (0.1, 1e-5, 1)


@pytest.mark.parametrize("shape,axis", [((16, 5), 1), ((4, 5, 6, 7), 1), ((4, 6, 7, 5), -1)])
def test_training_forward_backward_and_running_stats(shape, axis):
    C = shape[axis]
    bn = fastbn.BatchNorm(C, axis=axis, dtype=np.float64)
    rng = np.random.default_rng(1)
    bn.gamma[:] = rng.uniform(0.5, 1.5, C)
    bn.beta[:] = rng.normal(size=C)
    x = rand(shape, 2, np.float64, offset=3.0)
    dy = rand(shape, 3, np.float64)
    y = bn.forward(x, training=True)
    y_ref, mean, invstd, var = ref.forward(x, bn.gamma, bn.beta, axis)
    assert_close(y, y_ref, **tol(np.float64))
    m = x.size // C
    exp_m, exp_v = ref.update_running(np.zeros(C), np.ones(C), mean, var, m, 0.1)
    assert_close(bn.running_mean, exp_m, **tol(np.float64))
    assert_close(bn.running_var, exp_v, **tol(np.float64))
    assert bn.num_batches_tracked == 1
    dx = bn.backward(dy)
    dx_ref, dg_ref, db_ref = ref.backward(dy, x, mean, invstd, bn.gamma, bn.beta, axis)
    assert_close(dx, dx_ref, **tol(np.float64))
    assert_close(bn.dgamma, dg_ref, **tol(np.float64, 10))
    assert_close(bn.dbeta, db_ref, **tol(np.float64, 10))
    assert [p is q for (p, _), q in zip(bn.parameters(), (bn.gamma, bn.beta))] == [True, True]


def test_eval_mode_uses_running_stats_and_does_not_update():
    bn = fastbn.BatchNorm(3)
    bn.forward(rand((20, 3), 1, offset=2.0), training=True)
    state = bn.state_dict()
    x = rand((4, 3), 2)
    y = bn.eval().forward(x)
    assert_close(y, ref.inference(x, bn.running_mean, bn.running_var), **tol(np.float32))
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    # the backward through the running statistics (issue 20): dx = gamma * invstd * dy,
    # the state untouched (tests/test_frozen.py checks it in depth)
    dx = bn.backward(np.ones_like(x))
    assert_close(dx, np.ones_like(x) / np.sqrt(bn.running_var + bn.eps), **tol(np.float32))
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    with pytest.raises(RuntimeError, match="needs a preceding forward"):
        fastbn.BatchNorm(3).backward(np.ones_like(x))
    assert bn.train().training


def test_momentum_none_is_a_cumulative_average():
    bn = fastbn.BatchNorm(2, momentum=None, dtype=np.float64)
    xs = [rand((10, 2), i, np.float64, offset=i) for i in range(5)]
    for x in xs:
        bn.forward(x, training=True)
    assert bn.num_batches_tracked == 5
    assert_close(bn.running_mean, np.mean([x.mean(0) for x in xs], 0), **tol(np.float64))
    assert_close(bn.running_var, np.mean([x.var(0, ddof=1) for x in xs], 0), **tol(np.float64))


def test_keras_conventions():
    bn = fastbn.BatchNorm.keras(3)
    assert bn.axis == -1 and bn.eps == 1e-3 and abs(bn.momentum - 0.01) < 1e-15
    x = rand((4, 5, 3), 4, np.float32, offset=1.0)
    bn.forward(x, training=True)
    _, mean, _, var = ref.forward(x, axis=-1, eps=1e-3)
    # Keras: moving = 0.99 * moving + 0.01 * batch, biased batch variance
    assert_close(bn.running_mean, 0.01 * mean, **tol(np.float32))
    assert_close(bn.running_var, 0.99 + 0.01 * var, **tol(np.float32))
    # center and scale are independent switches (tests/test_layer_variants.py)
    assert fastbn.BatchNorm.keras(3, center=False).beta is None


def test_no_running_stats_and_no_affine():
    bn = fastbn.BatchNorm(3, track_running_stats=False, affine=False)
    assert bn.running_mean is None and bn.gamma is None and bn.parameters() == []
    x = rand((6, 3), 5)
    assert_close(bn.forward(x, training=False), ref.forward(x)[0], **tol(np.float32))
    dx = bn.backward(np.ones_like(x))
    assert bn.dgamma is None and dx.shape == x.shape
    assert set(bn.state_dict()) == {"num_batches_tracked"}


def test_fused_relu_layer():
    bn = fastbn.BatchNorm(4, activation="relu", dtype=np.float64)
    x, dy = rand((9, 4), 6, np.float64), rand((9, 4), 7, np.float64)
    y = bn.forward(x)
    y_ref, mean, invstd, _ = ref.forward(x, activation="relu")
    assert_close(y, y_ref, **tol(np.float64))
    dx = bn.backward(dy)
    assert_close(
        dx,
        ref.backward(dy, x, mean, invstd, np.ones(4), np.zeros(4), activation="relu")[0],
        **tol(np.float64),
    )


def test_state_dict_round_trip_and_checks():
    a = fastbn.BatchNorm(3)
    a.forward(rand((8, 3), 8, offset=1.0))
    a.gamma[:] = [1.0, 2.0, 3.0]
    b = fastbn.BatchNorm(3)
    b.load_state_dict(a.state_dict())
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[k], v)
    before = b.state_dict()
    bad = a.state_dict()
    bad["running_var"] = np.ones(4)
    with pytest.raises(ValueError, match=r"running_var.*shape \(3,\)"):
        b.load_state_dict(bad)
    del bad["running_var"]
    with pytest.raises(KeyError, match="missing"):
        b.load_state_dict(bad)
    for k, v in b.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    sd = a.state_dict()
    sd["gamma"][:] = 0  # a copy, not a view
    assert a.gamma[0] == 1.0


def test_bad_input_leaves_the_layer_untouched():
    bn = fastbn.BatchNorm(3)
    bn.forward(rand((8, 3), 9))
    state = bn.state_dict()
    for x, exc in [
        (rand((8, 4), 1), ValueError),
        (rand((1, 3), 1), ValueError),
        (np.ones((8, 3), np.int64), TypeError),
    ]:
        with pytest.raises(exc):
            bn.forward(x, training=True)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    with pytest.raises(ValueError, match="momentum"):
        fastbn.BatchNorm(3, momentum=2)
    with pytest.raises(ValueError, match="num_features"):
        fastbn.BatchNorm(0)
    with pytest.raises(TypeError, match="dtype"):
        fastbn.BatchNorm(3, dtype=np.int32)
    with pytest.raises(ValueError, match="activation"):
        fastbn.BatchNorm(3, activation="tanh")


def test_keras_layer_calls_run_inference_unless_training_is_given():
    """Keras's BatchNormalization runs inference when called without ``training``; the
    layer of BatchNorm.keras does too, and trains with ``training=True``."""
    x = np.random.default_rng(8).normal(3.0, 2.0, size=(16, 4))
    bn = fastbn.BatchNorm.keras(4, dtype=np.float64)
    y = bn(x)
    np.testing.assert_allclose(y, x / np.sqrt(1.0 + 1e-3))  # moving mean 0, variance 1
    assert bn.num_batches_tracked == 0 and (bn.running_mean == 0).all()
    bn(x, training=True)
    np.testing.assert_allclose(bn.running_mean, 0.01 * x.mean(axis=0))
    assert fastbn.BatchNorm(4).training and not fastbn.BatchNorm.keras(4).training
