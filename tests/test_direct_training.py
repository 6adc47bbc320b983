"""The direct host paths of batch_norm(training=True) and of the layer's forward/backward
give bitwise the results of the general path (the same kernels on the same view)."""

import numpy as np
import pytest

import fastbn


class _Sub(np.ndarray):
    """An ndarray subclass: never takes the direct path (the general one views it)."""


def _mask(kind, shape, axis, rng):
    """None, a random mask (2 True positions at least, one False), or an all-True one,
    of x's shape without the channel axis."""
    if kind is None:
        return None
    reduced = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
    if kind == "ones":
        return np.ones(reduced, bool)
    w = rng.random(reduced) < 0.6
    w.reshape(-1)[:2] = True
    w.reshape(-1)[-1] = False
    return w


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((64, 16), 1), ((4, 3, 5, 2), 1), ((4, 3, 5, 2), -1)])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("momentum,nbt", [(0.1, None), (None, 3)])
@pytest.mark.parametrize("masked", [None, "random", "ones"])
def test_batch_norm_training_direct_equals_general(
    dtype, shape, axis, activation, momentum, nbt, masked
):
    """With and without ``mask=`` (a random one, and an all-True one, which both paths
    send to the unmasked kernels)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    C = shape[axis]
    g, b = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C)
    mask = _mask(masked, shape, axis, rng)
    results = []
    for ax in (axis, np.int64(axis)):  # a NumPy integer axis takes the general path
        rm, rv = np.arange(C, dtype=np.float32), np.linspace(1, 2, C)
        y = fastbn.batch_norm(
            x,
            rm,
            rv,
            g,
            b,
            training=True,
            momentum=momentum,
            num_batches_tracked=nbt,
            axis=ax,
            activation=activation,
            mask=mask,
        )
        results.append((y, rm, rv))
    for a, c in zip(*results):
        assert a.dtype == c.dtype and a.tobytes() == c.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("shape,masked", [((32, 6, 3), None), ((32, 6, 3), "random"),
                                          ((32, 6, 3), "ones"), ((256, 6), "random"),
                                          ((16, 6, 4, 5), "random")])  # fmt: skip
def test_layer_direct_equals_general(dtype, activation, track, shape, masked):
    """The layer's forward and backward, with and without ``mask=``."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    gamma = rng.standard_normal(6)
    mask = _mask(masked, shape, 1, rng)
    results = []
    for wrap in (lambda a: a, lambda a: a.view(_Sub)):
        bn = fastbn.BatchNorm(6, dtype=dtype, activation=activation, track_running_stats=track)
        bn.gamma[:] = gamma
        bn.beta[:] = 0.5
        outs = []
        for _ in range(2):
            outs.append(np.asarray(bn.forward(wrap(x), training=True, mask=mask)))
            outs.append(np.asarray(bn.backward(wrap(dy))))
            outs += [bn.dgamma, bn.dbeta]
            if track:
                outs += [bn.running_mean.copy(), bn.running_var.copy()]
        results.append(outs)
    for a, c in zip(*results):
        assert a.dtype == c.dtype and a.tobytes() == c.tobytes()


@pytest.mark.parametrize("general", [False, True])
def test_masked_training_with_too_few_true_positions_writes_nothing(general):
    """A mask with one True position is the ValueError of the general path on the direct
    one too, raised before the running statistics or the layer's state change."""
    x = np.random.default_rng(2).standard_normal((8, 3))
    mask = np.zeros(8, bool)
    mask[3] = True
    axis = np.int64(1) if general else 1
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match="mask"):
        fastbn.batch_norm(x, rm, rv, training=True, axis=axis, mask=mask)
    assert (rm == 0).all() and (rv == 1).all()
    bn = fastbn.BatchNorm(3, dtype=np.float64)
    with pytest.raises(ValueError, match="mask"):
        bn.forward(x.view(_Sub) if general else x, training=True, mask=mask)
    assert (bn.running_mean == 0).all() and (bn.running_var == 1).all()
    assert bn.num_batches_tracked == 0


def test_masked_small_calls_take_the_direct_path(monkeypatch):
    """A plain boolean mask of x's shape without the channel axis keeps batch_norm's
    training call and the layer's forward and backward on the direct path (whose host
    side costs a few microseconds; the general one's several times more)."""
    from fastbn import _cpu_backend, api

    calls = []

    def spy(function):
        def wrapped(*args, **kwargs):
            calls.append(function.__name__)
            return function(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(api, "_direct_train", spy(_cpu_backend.direct_train))
    monkeypatch.setattr(_cpu_backend, "direct_train", spy(_cpu_backend.direct_train))
    monkeypatch.setattr(
        _cpu_backend, "direct_masked_backward", spy(_cpu_backend.direct_masked_backward)
    )
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 4)).astype(np.float32)
    mask = _mask("random", x.shape, 1, rng)
    fastbn.batch_norm(x, np.zeros(4), np.ones(4), training=True, mask=mask)
    bn = fastbn.BatchNorm(4)
    bn.forward(x, training=True, mask=mask)
    bn.backward(np.ones_like(x))
    assert calls == ["direct_train", "direct_train", "direct_masked_backward"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((64, 16), 1), ((4, 3, 5, 2), 1), ((4, 3, 5, 2), -1)])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_batch_norm_eval_direct_equals_general(dtype, shape, axis, activation, with_residual):
    """``batch_norm(training=False)`` takes the direct path of batch_norm_inference; the
    general path (a NumPy integer axis) gives the same bytes, and so does
    batch_norm_inference itself."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(dtype)
    z = rng.standard_normal(shape).astype(dtype) if with_residual else None
    C = shape[axis]
    rm, rv = rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
    g, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    kw = dict(activation=activation, residual=z)
    ys = [fastbn.batch_norm(x, rm, rv, g, b, axis=ax, **kw) for ax in (axis, np.int64(axis))]
    ys.append(fastbn.batch_norm_inference(x, rm, rv, g, b, axis=axis, **kw))
    for y in ys[1:]:
        assert y.dtype == ys[0].dtype and y.tobytes() == ys[0].tobytes()
