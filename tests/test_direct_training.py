"""The direct host paths of batch_norm(training=True) and of the layer's forward/backward
give bitwise the results of the general path (the same kernels on the same view)."""

import numpy as np
import pytest

import fastbn


class _Sub(np.ndarray):
    """An ndarray subclass: never takes the direct path (the general one views it)."""


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((64, 16), 1), ((4, 3, 5, 2), 1), ((4, 3, 5, 2), -1)])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("momentum,nbt", [(0.1, None), (None, 3)])
def test_batch_norm_training_direct_equals_general(dtype, shape, axis, activation, momentum, nbt):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    C = shape[axis]
    g, b = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C)
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
        )
        results.append((y, rm, rv))
    for a, c in zip(*results):
        assert a.dtype == c.dtype and a.tobytes() == c.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("track", [True, False])
def test_layer_direct_equals_general(dtype, activation, track):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 6, 3)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    gamma = rng.standard_normal(6)
    results = []
    for wrap in (lambda a: a, lambda a: a.view(_Sub)):
        bn = fastbn.BatchNorm(6, dtype=dtype, activation=activation, track_running_stats=track)
        bn.gamma[:] = gamma
        bn.beta[:] = 0.5
        outs = []
        for _ in range(2):
            outs.append(np.asarray(bn.forward(wrap(x), training=True)))
            outs.append(np.asarray(bn.backward(wrap(dy))))
            outs += [bn.dgamma, bn.dbeta]
            if track:
                outs += [bn.running_mean.copy(), bn.running_var.copy()]
        results.append(outs)
    for a, c in zip(*results):
        assert a.dtype == c.dtype and a.tobytes() == c.tobytes()
