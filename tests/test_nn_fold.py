"""``fastbn.nn.fold_batch_norm``: the folded model's inference equals the original's."""

import numpy as np
import pytest
import reference

from fastbn import nn

# Largest logit difference relative to the largest logit (float64 reference). float64:
# the bound, 1e-10 (folding rounds each weight once; the rest is float64 BLAS
# rounding ~1e-15). float32: 1e-4, the bound; the folded weights are rounded to
# float32 once and the products accumulate ~1e-6 relative over at most 40 terms.
TOL = {np.float64: 1e-10, np.float32: 1e-4}


def _randomize(model, seed):
    """Non-trivial gamma, beta and running statistics in every BatchNorm layer."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, nn.BatchNorm):
            C = layer.num_features
            if layer.affine:
                layer.gamma[...] = rng.uniform(-2.0, 2.0, C)
                layer.beta[...] = rng.normal(0.0, 1.0, C)
            layer.bn.running_mean[...] = rng.normal(0.5, 1.0, C)
            layer.bn.running_var[...] = rng.uniform(0.05, 4.0, C)
        elif isinstance(layer, nn.Dense):
            layer.bias[...] = rng.normal(0.0, 0.5, layer.out_features)
    return model


def _reference_specs(model):
    specs = []
    for layer in model.layers:
        if isinstance(layer, nn.Dense):
            specs.append(("dense", layer.weight, layer.bias, layer.activation))
        elif isinstance(layer, nn.ReLU):
            specs.append(("relu",))
        else:
            bn = layer.bn
            specs.append(
                ("bn", bn.running_mean, bn.running_var, bn.gamma, bn.beta, bn.eps, layer.activation)
            )
    return specs


def _models(dtype, affine, convention):
    """(name, model, expected layer kinds after folding) for both fold directions."""
    bn = dict(dtype=dtype, affine=affine, convention=convention)
    d = dict(dtype=dtype)
    yield (
        "following: Dense(relu) -> BN -> Dense (the default model's form)",
        nn.Sequential(
            [
                nn.Dense(9, 8, "relu", rng=0, **d),
                nn.BatchNorm(8, **bn),
                nn.Dense(8, 6, "relu", rng=1, **d),
                nn.BatchNorm(6, **bn),
                nn.Dense(6, 3, rng=2, **d),
            ]
        ),
        ["Dense", "Dense", "Dense"],
    )
    yield (
        "preceding: Dense -> BN+ReLU (fused) and Dense -> BN -> ReLU",
        nn.Sequential(
            [
                nn.Dense(9, 8, rng=0, **d),
                nn.BatchNorm(8, activation="relu", **bn),
                nn.Dense(8, 6, rng=1, **d),
                nn.BatchNorm(6, **bn),
                nn.ReLU(),
                nn.Dense(6, 3, rng=2, **d),
            ]
        ),
        ["Dense", "Dense", "ReLU", "Dense"],
    )
    yield (
        "both into one Dense: BN -> Dense -> BN, a BatchNorm first",
        nn.Sequential(
            [
                nn.BatchNorm(9, **bn),
                nn.Dense(9, 6, rng=1, **d),
                nn.BatchNorm(6, **bn),
                nn.ReLU(),
                nn.Dense(6, 3, rng=2, **d),
            ]
        ),
        ["Dense", "ReLU", "Dense"],
    )


CASES = [
    (dtype, affine, convention)
    for dtype in (np.float32, np.float64)
    for affine in (True, False)
    for convention in ("keras", "torch")
]


@pytest.mark.parametrize(("dtype", "affine", "convention"), CASES)
def test_folded_inference_equals_the_original(dtype, affine, convention):
    x = np.random.default_rng(7).normal(1.0, 2.0, (97, 9)).astype(dtype)
    for name, model, kinds in _models(dtype, affine, convention):
        _randomize(model, seed=3)
        before = model.state_dict()
        expected = reference.mlp_inference(x, _reference_specs(model))
        original = model.predict(x)
        folded = nn.fold_batch_norm(model)
        assert [type(layer).__name__ for layer in folded.layers] == kinds, name
        got = folded.predict(x)
        assert got.dtype == dtype
        scale = np.abs(expected).max()
        assert np.abs(got - expected).max() <= TOL[dtype] * scale, name
        assert np.abs(got - original).max() <= TOL[dtype] * scale, name
        # The original is untouched and shares nothing with the folded model.
        after = model.state_dict()
        assert after.keys() == before.keys()
        for key in before:
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)
        folded.store.values[...] = 0.0
        np.testing.assert_array_equal(model.predict(x), original)


def test_the_default_model_folds_into_the_following_dense_and_a_fused_relu_moves():
    model = _randomize(nn.build_mlp(num_features=12, hidden=(8, 4), rng=0), seed=1)
    folded = nn.fold_batch_norm(model)
    assert [repr(layer) for layer in folded.layers] == [
        "Dense(12, 8, activation='relu')",
        "Dense(8, 4, activation='relu')",
        "Dense(4, 10, activation=None)",
    ]
    np.testing.assert_array_equal(folded.layers[0].weight, model.layers[0].weight)
    before = _randomize(nn.build_mlp(12, hidden=(8,), bn_position="before_relu", rng=0), 2)
    assert [repr(layer) for layer in nn.fold_batch_norm(before).layers] == [
        "Dense(12, 8, activation='relu')",
        "Dense(8, 10, activation=None)",
    ]
    # The folded model has the names and shapes of the model built without BatchNorm.
    plain = nn.build_mlp(12, hidden=(8, 4), batch_norm=False, rng=5)
    plain.load_state_dict(folded.state_dict())
    x = np.random.default_rng(0).random((10, 12), dtype=np.float32)
    np.testing.assert_array_equal(plain.predict(x), folded.predict(x))


def test_layers_that_cannot_be_folded():
    with pytest.raises(ValueError, match=r"layers\.1 .* cannot be folded"):
        nn.fold_batch_norm(
            nn.Sequential(
                [nn.Dense(3, 3, "relu", rng=0), nn.BatchNorm(3, activation="relu"), nn.Dense(3, 2)]
            )
        )
    with pytest.raises(ValueError, match=r"layers\.2 .* cannot be folded"):
        nn.fold_batch_norm(
            nn.Sequential([nn.Dense(3, 3, rng=0), nn.BatchNorm(3), nn.BatchNorm(3), nn.ReLU()])
        )
    with pytest.raises(ValueError, match=r"layers\.1 .* cannot be folded"):
        nn.fold_batch_norm(nn.Sequential([nn.Dense(3, 3, "relu", rng=0), nn.BatchNorm(3)]))

    class Scale:
        dtype = np.float32

        def param_specs(self):
            return []

        def bind(self, xp, ops, params):
            pass

    with pytest.raises(TypeError, match=r"layers\.1 must be a Dense, ReLU or BatchNorm"):
        nn.fold_batch_norm(nn.Sequential([nn.Dense(3, 3, rng=0), Scale()]))
    with pytest.raises(TypeError, match="fastbn.nn.Sequential"):
        nn.fold_batch_norm([nn.Dense(3, 3)])


def test_affine_off_layer_trains_without_parameters():
    model = nn.Sequential([nn.Dense(4, 3, rng=0), nn.BatchNorm(3, affine=False)])
    assert [p.name for p in model.parameters()] == ["layers.0.weight", "layers.0.bias"]
    assert model.layers[1].gamma is None and model.layers[1].beta is None
    x = np.random.default_rng(0).random((8, 4), dtype=np.float32)
    y = model.forward(x, training=True)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-6)
    model.backward(np.ones_like(y))
    assert "affine=False" in repr(model.layers[1])
