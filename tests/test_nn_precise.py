"""``fastbn.nn.update_bn_stats``: exact population statistics against NumPy."""

import numpy as np
import pytest
import reference
from hypothesis import given, settings
from hypothesis import strategies as st

from fastbn import nn

# Batch sizes of the tests: unequal, one of a single sample.
SIZES = (37, 5, 100, 1, 64)

# Tolerances, relative to each channel's standard deviation for the mean and to the
# variance itself. float64: the layers and the merge run in float64, only the summation
# order differs from NumPy's. float32: the activations fed to the statistics are float32
# (rounding ~6e-8 relative per value, up to ~1e-6 after a Dense layer's 10-30-term dot
# products), then the statistics are rounded once to float32.
TOL = {np.float64: 1e-12, np.float32: 2e-5}


def _batches(x, sizes=SIZES):
    out, start = [], 0
    for size in sizes:
        out.append(x[start : start + size])
        start += size
    assert start == x.shape[0]
    return out


def _data(dtype, features=6, seed=0):
    """Rows sorted by their first feature, so the batches' means differ a lot: an average of
    per-batch variances (fvcore, swa_utils) would be far from the population variance."""
    rng = np.random.default_rng(seed)
    n = sum(SIZES)
    x = rng.normal(3.0, 2.0, (n, features)) * rng.uniform(0.5, 4.0, features)
    return x[np.argsort(x[:, 0])].astype(dtype)


def _assert_stats(bn, mean, var, dtype):
    std = np.sqrt(var)
    got_mean = np.asarray(bn.running_mean, np.float64)
    got_var = np.asarray(bn.running_var, np.float64)
    assert bn.running_mean.dtype == dtype and bn.running_var.dtype == dtype
    np.testing.assert_array_less(np.abs(got_mean - mean), TOL[dtype] * std + 1e-300)
    np.testing.assert_array_less(np.abs(got_var - var), TOL[dtype] * var + 1e-300)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("convention", ["keras", "torch"])
def test_one_layer_equals_numpy_on_the_concatenated_data(dtype, convention):
    x = _data(dtype)
    model = nn.Sequential([nn.BatchNorm(6, convention=convention, dtype=dtype)])
    assert nn.update_bn_stats(model, _batches(x)) == x.shape[0]
    mean, var = reference.population_moments([x], unbiased=convention == "torch")
    _assert_stats(model.layers[0].bn, mean, var, dtype)
    # The spread of the batch means is in: the average of the per-batch variances (what
    # fvcore and swa_utils compute) is far below the population variance here.
    per_batch = np.mean([b.astype(np.float64).var(axis=0) for b in _batches(x)], axis=0)
    assert (per_batch[0] < 0.5 * var[0]) and not np.allclose(per_batch, var, rtol=0.01)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("convention", ["keras", "torch"])
def test_two_layers_the_second_sees_the_first_with_its_new_statistics(dtype, convention):
    x = _data(dtype, features=5, seed=1)
    rng = np.random.default_rng(2)
    model = nn.Sequential(
        [
            nn.Dense(5, 7, activation="relu", rng=3, dtype=dtype),
            nn.BatchNorm(7, convention=convention, dtype=dtype),
            nn.Dense(7, 4, rng=4, dtype=dtype),
            nn.BatchNorm(4, convention=convention, activation="relu", dtype=dtype),
            nn.Dense(4, 3, rng=5, dtype=dtype),
        ]
    )
    for i in (1, 3):
        model.layers[i].gamma[...] = rng.uniform(0.5, 2.0, model.layers[i].num_features)
        model.layers[i].beta[...] = rng.normal(0.0, 1.0, model.layers[i].num_features)
        model.layers[i].bn.num_batches_tracked = 7
    # Old statistics far from the new ones: a second layer fed through the first's old
    # statistics, or in training mode, would see another input.
    model.layers[1].bn.running_mean[...] = -50.0
    model.layers[1].bn.running_var[...] = 1e-3
    params = model.store.values.copy()
    unbiased = convention == "torch"
    eps1 = model.layers[1].bn.eps
    dense0, dense2 = model.layers[0], model.layers[2]

    # (x, y) tuples from a generator: read once.
    labels = np.zeros(x.shape[0], np.int64)
    assert nn.update_bn_stats(model, ((b, labels[: len(b)]) for b in _batches(x))) == sum(SIZES)

    h1 = reference.mlp_inference(x, [("dense", dense0.weight, dense0.bias, "relu")])
    mean1, var1 = reference.population_moments([h1], unbiased)
    _assert_stats(model.layers[1].bn, mean1, var1, dtype)
    # The reference feeds the second layer through the first with the *exact* float64
    # statistics (the layer uses their float32 rounding: within the float32 tolerance).
    h3 = reference.mlp_inference(
        x,
        [
            ("dense", dense0.weight, dense0.bias, "relu"),
            ("bn", mean1, var1, model.layers[1].gamma, model.layers[1].beta, eps1, None),
            ("dense", dense2.weight, dense2.bias, None),
        ],
    )
    mean3, var3 = reference.population_moments([h3], unbiased)
    _assert_stats(model.layers[3].bn, mean3, var3, dtype)
    np.testing.assert_array_equal(model.store.values, params)  # parameters untouched
    assert [model.layers[i].bn.num_batches_tracked for i in (1, 3)] == [7, 7]


def test_batch_order_and_sizes_change_only_rounding():
    x = _data(np.float64)
    a = nn.Sequential([nn.BatchNorm(6, convention="torch", dtype=np.float64)])
    b = nn.Sequential([nn.BatchNorm(6, convention="torch", dtype=np.float64)])
    nn.update_bn_stats(a, _batches(x))
    nn.update_bn_stats(b, [x[::-1][:65], x[::-1][65:]])
    np.testing.assert_allclose(a.layers[0].bn.running_var, b.layers[0].bn.running_var, rtol=1e-13)
    np.testing.assert_allclose(a.layers[0].bn.running_mean, b.layers[0].bn.running_mean, rtol=1e-13)


def _stats(model):
    return [
        (layer.bn.running_mean.copy(), layer.bn.running_var.copy())
        for layer in model.layers
        if isinstance(layer, nn.BatchNorm)
    ]


def _assert_same_stats(before, model):
    for (mean, var), (mean2, var2) in zip(before, _stats(model)):
        np.testing.assert_array_equal(mean, mean2)
        np.testing.assert_array_equal(var, var2)


def test_errors_leave_every_layer_as_it_was():
    model = nn.Sequential(
        [
            nn.BatchNorm(4),
            nn.Dense(4, 4, rng=0),
            nn.BatchNorm(4, convention="torch"),
        ]
    )
    before = _stats(model)
    with pytest.raises(ValueError, match="at least one sample"):
        nn.update_bn_stats(model, [])
    with pytest.raises(ValueError, match="at least one sample"):
        nn.update_bn_stats(model, [np.zeros((0, 4), np.float32)])
    with pytest.raises(ValueError, match="2-D"):
        nn.update_bn_stats(model, [np.zeros(4, np.float32)])
    with pytest.raises(ValueError, match=r"x must have shape \(n, 4\)"):
        nn.update_bn_stats(
            nn.Sequential([nn.Dense(4, 4, rng=0), nn.BatchNorm(4)]),
            [np.zeros((3, 5), np.float32)],
        )
    with pytest.raises(ValueError, match="at least 2 samples"):
        nn.update_bn_stats(nn.Sequential([nn.BatchNorm(4, convention="torch")]), [np.ones((1, 4))])
    _assert_same_stats(before, model)
    # The second layer's variance overflows float32 after the first layer was done: both
    # keep their old statistics.
    model.layers[1].weight[...] = 1e20
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    with pytest.raises(FloatingPointError, match=r"layers\.2: the population var"):
        nn.update_bn_stats(model, [x])
    _assert_same_stats(before, model)
    with pytest.raises(TypeError, match="fastbn.nn.Sequential"):
        nn.update_bn_stats([nn.BatchNorm(4)], [x])


def test_a_model_without_batchnorm_does_not_read_the_batches():
    def batches():
        raise AssertionError("read")
        yield

    assert nn.update_bn_stats(nn.Sequential([nn.Dense(3, 2, rng=0)]), batches()) == 0


def test_deterministic_for_any_thread_count():
    import numba

    model = nn.build_mlp(num_features=20, hidden=(16, 8), rng=0)
    x = np.random.default_rng(1).random((300, 20), dtype=np.float32)
    results = []
    for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
        numba.set_num_threads(threads)
        nn.update_bn_stats(model, _batches(x, (100, 77, 123)))
        results.append(model.state_dict())
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for key in results[0]:
        np.testing.assert_array_equal(results[0][key], results[-1][key])


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 60),
    features=st.integers(1, 5),
    offset=st.sampled_from([0.0, 1e4]),
    cuts=st.lists(st.floats(0.0, 1.0), max_size=6),
    seed=st.integers(0, 2**16),
    unbiased=st.booleans(),
)
def test_any_split_of_the_data_gives_its_statistics(n, features, offset, cuts, seed, unbiased):
    # float64 layers; a large offset checks that no E[x^2] - E[x]^2 cancellation creeps in.
    x = offset + np.random.default_rng(seed).normal(0.0, 1.0, (n, features))
    bounds = sorted({0, n, *(int(c * n) for c in cuts)})
    batches = [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    model = nn.Sequential(
        [nn.BatchNorm(features, convention="torch" if unbiased else "keras", dtype=np.float64)]
    )
    assert nn.update_bn_stats(model, batches) == n
    mean, var = reference.population_moments([x], unbiased)
    bn = model.layers[0].bn
    np.testing.assert_allclose(bn.running_mean, mean, rtol=1e-14, atol=1e-12 * np.sqrt(var).max())
    np.testing.assert_allclose(bn.running_var, var, rtol=1e-9, atol=1e-300)


@pytest.mark.parametrize("convention", ["keras", "torch"])
def test_renorm_and_ghost_layers_get_the_exact_statistics_and_keep_them(convention):
    x = _data(np.float64)
    unbiased = convention == "torch"
    mean, var = reference.population_moments([x], unbiased)
    for variant in (dict(renorm=True), dict(virtual_batch_size=10)):
        layer = nn.BatchNorm(6, convention=convention, dtype=np.float64, **variant)
        model = nn.Sequential([layer])
        model.forward(x[:100], training=True)
        renorm_state = {
            k: v.copy() for k, v in layer.state_dict().items() if k.startswith("renorm_")
        }
        nn.update_bn_stats(model, _batches(x))
        bn = layer.bn
        _assert_stats(bn, mean, var, np.float64)
        state = layer.state_dict()
        for key, value in renorm_state.items():  # training's own statistics stay
            np.testing.assert_array_equal(state[key], value)
        if variant.get("renorm"):
            np.testing.assert_allclose(bn.running_stddev, np.sqrt(var + bn.eps), rtol=1e-14)
        # The next training step moves on from the exact statistics (not from the old ones).
        batch = x[:30]
        model.forward(batch, training=True)
        batch_mean = batch.mean(axis=0)
        np.testing.assert_allclose(
            bn.running_mean, (1 - bn.momentum) * mean + bn.momentum * batch_mean, rtol=1e-12
        )
        batch_var = batch.var(axis=0, ddof=1 if unbiased else 0)
        if variant.get("renorm"):
            stddev = (1 - bn.momentum) * np.sqrt(var + bn.eps) + bn.momentum * np.sqrt(
                batch_var + bn.eps
            )
            expected_var = np.maximum(stddev**2 - bn.eps, 0.0)
        else:
            expected_var = (1 - bn.momentum) * var + bn.momentum * batch_var
        np.testing.assert_allclose(bn.running_var, expected_var, rtol=1e-12)
