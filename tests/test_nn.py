"""Tests of fastbn.nn: layers, loss, optimizers, against independent NumPy references."""

import numpy as np
import pytest

from fastbn import nn
from fastbn.nn import _device, _ops

# --------------------------------------------------------------------------------------
# An independent float64 NumPy implementation of the default model's training step.
# --------------------------------------------------------------------------------------


def _ref_softmax_ce(z, labels):
    """Mean cross-entropy of softmax(z) and its gradient (float64, obviously correct)."""
    z = z.astype(np.float64)
    n = z.shape[0]
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    loss = -np.log(p[np.arange(n), labels]).mean()
    onehot = np.eye(z.shape[1])[labels]
    return loss, (p - onehot) / n


def _ref_forward_backward(params, x, labels, running, *, eps=1e-3, momentum=0.01):
    """Loss and gradients of Dense(relu) -> BN -> Dense(relu) -> BN -> Dense (Keras BN).

    params: dict W0,b0,g0,be0,W1,b1,g1,be1,W2,b2 (float64); running: dict mean0,var0,...
    updated in place with Keras's rule (biased batch variance).
    """
    cache = {}
    h = x.astype(np.float64)
    for k in range(2):
        z = h @ params[f"W{k}"] + params[f"b{k}"]
        a = np.maximum(z, 0)
        mu = a.mean(0)
        var = a.var(0)
        xhat = (a - mu) / np.sqrt(var + eps)
        cache[k] = (h, z, a, var)
        running[f"mean{k}"] = (1 - momentum) * running[f"mean{k}"] + momentum * mu
        running[f"var{k}"] = (1 - momentum) * running[f"var{k}"] + momentum * var
        cache[k] += (xhat,)
        h = params[f"g{k}"] * xhat + params[f"be{k}"]
    logits = h @ params["W2"] + params["b2"]
    loss, d = _ref_softmax_ce(logits, labels)
    grads = {"W2": h.T @ d, "b2": d.sum(0)}
    d = d @ params["W2"].T
    for k in (1, 0):
        hin, z, a, var, xhat = cache[k]
        n = a.shape[0]
        grads[f"g{k}"] = (d * xhat).sum(0)
        grads[f"be{k}"] = d.sum(0)
        dxhat = d * params[f"g{k}"]
        # Textbook BN backward through mean and variance (chain rule), not the design's
        # closed form.
        centered = a - a.mean(0)
        dvar = (dxhat * centered * -0.5 * (var + eps) ** -1.5).sum(0)
        dmu = (-dxhat / np.sqrt(var + eps)).sum(0) + dvar * (-2 * centered).mean(0)
        da = dxhat / np.sqrt(var + eps) + dvar * 2 * centered / n + dmu / n
        dz = da * (z > 0)
        grads[f"W{k}"] = hin.T @ dz
        grads[f"b{k}"] = dz.sum(0)
        d = dz @ params[f"W{k}"].T
    return loss, grads


_NAMES = {
    "W0": "layers.0.weight",
    "b0": "layers.0.bias",
    "g0": "layers.1.gamma",
    "be0": "layers.1.beta",
    "W1": "layers.2.weight",
    "b1": "layers.2.bias",
    "g1": "layers.3.gamma",
    "be1": "layers.3.beta",
    "W2": "layers.4.weight",
    "b2": "layers.4.bias",
}


def _small_model(dtype=np.float64, seed=0, **kw):
    return nn.build_mlp(7, 4, (6, 5), dtype=dtype, rng=seed, **kw)


def _batch(n=9, features=7, classes=4, seed=1, dtype=np.float64):
    # Centered inputs: a ReLU unit active for every row would sit right before a
    # BatchNorm, which is invariant to its bias: that bias's true gradient is 0 and Adam
    # would amplify the rounding noise of a float32 gradient into a full step.
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, features)).astype(dtype), rng.integers(0, classes, n)


# --------------------------------------------------------------------------------------
# Whole-model gradients
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [{}, {"bn_position": "before_relu"}, {"bn_convention": "torch"}, {"batch_norm": False}],
    ids=["keras-order", "bn-relu-fused", "torch-bn", "no-bn"],
)
def test_gradients_match_finite_differences(kw):
    model = _small_model(**kw)
    x, labels = _batch()
    loss = nn.SoftmaxCrossEntropy()

    def loss_at():
        value, _ = loss(model.forward(x, training=True), labels)
        return value

    _, grad = loss(model.forward(x, training=True), labels)
    dx = model.backward(grad, input_grad=True).copy()
    analytic = model.store.grads.copy()
    values = model.store.values
    h = 1e-6
    numeric = np.empty_like(analytic)
    for j in range(values.size):
        saved = values[j]
        values[j] = saved + h
        up = loss_at()
        values[j] = saved - h
        down = loss_at()
        values[j] = saved
        numeric[j] = (up - down) / (2 * h)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8)
    numeric_dx = np.empty_like(x)
    for idx in np.ndindex(*x.shape):
        saved = x[idx]
        x[idx] = saved + h
        up = loss_at()
        x[idx] = saved - h
        down = loss_at()
        x[idx] = saved
        numeric_dx[idx] = (up - down) / (2 * h)
    np.testing.assert_allclose(dx, numeric_dx, rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------------------
# One training step and evaluation against the NumPy reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,rtol,atol", [(np.float64, 1e-9, 1e-10), (np.float32, 2e-4, 2e-6)])
def test_training_steps_equal_numpy_reference(dtype, rtol, atol):
    model = _small_model(dtype=dtype)
    lr = 1e-2
    opt = nn.Adam(model.store, lr=lr)
    loss = nn.SoftmaxCrossEntropy()
    params = {k: np.asarray(model.state_dict()[v], np.float64) for k, v in _NAMES.items()}
    running = {"mean0": np.zeros(6), "var0": np.ones(6), "mean1": np.zeros(5), "var1": np.ones(5)}
    m = {k: np.zeros_like(p) for k, p in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    for t in (1, 2, 3):
        x, labels = _batch(n=32, seed=t, dtype=dtype)
        value, grad = loss(model.forward(x, training=True), labels)
        model.backward(grad)
        opt.step()
        ref_loss, grads = _ref_forward_backward(params, x, labels, running)
        for k, g in grads.items():  # Keras's Adam, written out
            m[k] = 0.9 * m[k] + 0.1 * g
            v[k] = 0.999 * v[k] + 0.001 * g * g
            alpha = lr * np.sqrt(1 - 0.999**t) / (1 - 0.9**t)
            params[k] = params[k] - alpha * m[k] / (np.sqrt(v[k]) + 1e-7)
        assert value == pytest.approx(ref_loss, rel=rtol * 10)
    state = model.state_dict()
    for k, name in _NAMES.items():
        np.testing.assert_allclose(state[name], params[k], rtol=rtol, atol=atol, err_msg=name)
    for k in range(2):
        np.testing.assert_allclose(
            state[f"layers.{2 * k + 1}.running_mean"], running[f"mean{k}"], rtol=rtol, atol=atol
        )
        np.testing.assert_allclose(
            state[f"layers.{2 * k + 1}.running_var"], running[f"var{k}"], rtol=rtol, atol=atol
        )


def test_eval_mode_uses_running_statistics():
    model = _small_model()
    opt = nn.Adam(model.store, lr=1e-2)
    loss = nn.SoftmaxCrossEntropy()
    for t in range(5):
        x, labels = _batch(seed=10 + t)
        _, grad = loss(model.forward(x, training=True), labels)
        model.backward(grad)
        opt.step()
    x, _ = _batch(seed=99, n=3)
    state = model.state_dict()
    h = x
    for k in range(2):
        a = np.maximum(h @ state[f"layers.{2 * k}.weight"] + state[f"layers.{2 * k}.bias"], 0)
        mean, var = (
            state[f"layers.{2 * k + 1}.running_mean"],
            state[f"layers.{2 * k + 1}.running_var"],
        )
        h = (
            state[f"layers.{2 * k + 1}.gamma"] * (a - mean) / np.sqrt(var + 1e-3)
            + state[f"layers.{2 * k + 1}.beta"]
        )
    expected = h @ state["layers.4.weight"] + state["layers.4.bias"]
    got = model.forward(x, training=False).copy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    # Evaluation neither depends on the batch nor changes the running statistics.
    np.testing.assert_allclose(model.predict(x, batch_size=1), expected, rtol=1e-10, atol=1e-12)
    after = model.state_dict()
    for key in state:
        np.testing.assert_array_equal(after[key], state[key])
    # Training mode normalizes with the batch statistics instead.
    assert not np.allclose(model.forward(x, training=True), expected)


def test_running_statistics_follow_keras_and_torch_momentum():
    x, _ = _batch(n=16)
    for convention, factor, unbiased in (("keras", 0.01, False), ("torch", 0.1, True)):
        model = nn.Sequential([nn.BatchNorm(7, convention=convention, dtype=np.float64)])
        model.forward(x, training=True)
        bn = model.layers[0].bn
        np.testing.assert_allclose(bn.running_mean, factor * x.mean(0), rtol=1e-12)
        var = x.var(0, ddof=1 if unbiased else 0)
        np.testing.assert_allclose(bn.running_var, (1 - factor) + factor * var, rtol=1e-12)


# --------------------------------------------------------------------------------------
# Kernels: the Numba implementation against the array-module one (the GPU code path)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_ops_match_array_ops(dtype):
    rng = np.random.default_rng(0)
    ref = _ops.ArrayOps(np)
    z = rng.normal(size=(13, 7)).astype(dtype)
    bias = rng.normal(size=7).astype(dtype)
    for relu in (False, True):
        a, b = z.copy(), z.copy()
        _ops.CpuOps.bias_activation(a, bias, relu)
        ref.bias_activation(b, bias, relu)
        np.testing.assert_array_equal(a, b)
        dy = rng.normal(size=z.shape).astype(dtype)
        dz_a, dz_b = np.empty_like(dy), np.empty_like(dy)
        db_a, db_b = np.empty(7, dtype), np.empty(7, dtype)
        _ops.CpuOps.activation_grad_bias(dy, a, relu, dz_a, db_a)
        ref.activation_grad_bias(dy, b, relu, dz_b, db_b)
        np.testing.assert_array_equal(dz_a, dz_b)
        np.testing.assert_allclose(db_a, db_b, rtol=1e-6)
    y_a, y_b = np.empty_like(z), np.empty_like(z)
    _ops.CpuOps.relu(z, y_a)
    ref.relu(z, y_b)
    np.testing.assert_array_equal(y_a, y_b)
    dy = rng.normal(size=z.shape).astype(dtype)
    _ops.CpuOps.relu_grad(dy, y_a, y_a.copy())
    out_a, out_b = np.empty_like(z), np.empty_like(z)
    _ops.CpuOps.relu_grad(dy, y_b, out_a)
    ref.relu_grad(dy, y_b, out_b)
    np.testing.assert_array_equal(out_a, out_b)

    labels = rng.integers(0, 7, 13)
    g_a, g_b = np.empty_like(z), np.empty_like(z)
    acc_a, acc_b = np.zeros(2), np.zeros(2)
    _ops.CpuOps.softmax_cross_entropy(z, labels, g_a, 1 / 13, acc_a)
    ref.softmax_cross_entropy(z, labels, g_b, 1 / 13, acc_b)
    np.testing.assert_allclose(g_a, g_b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(acc_a, acc_b, rtol=1e-12)

    p = rng.normal(size=50).astype(dtype)
    g = rng.normal(size=50).astype(dtype)
    states = [(p.copy(), np.full(50, 0.1, dtype), np.full(50, 0.2, dtype)) for _ in range(2)]
    _ops.CpuOps.adam(states[0][0], g, states[0][1], states[0][2], 1e-2, 0.9, 0.999, 1e-7)
    ref.adam(states[1][0], g, states[1][1], states[1][2], 1e-2, 0.9, 0.999, 1e-7)
    for a, b in zip(*states):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for nesterov in (False, True):
        pa, pb = p.copy(), p.copy()
        va, vb = np.full(50, 0.3, dtype), np.full(50, 0.3, dtype)
        _ops.CpuOps.sgd(pa, g, va, 0.1, 0.9, nesterov)
        ref.sgd(pb, g, vb, 0.1, 0.9, nesterov)
        np.testing.assert_allclose(pa, pb, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(va, vb, rtol=1e-6)


def test_array_ops_model_trains_like_cpu_ops(monkeypatch):
    """The device-generic code path (what CuPy runs) gives the CPU path's training step."""

    def step(model):
        opt = nn.Adam(model.store)
        loss = nn.SoftmaxCrossEntropy()
        for t in range(3):
            x, labels = _batch(seed=t)
            _, grad = loss(model.forward(x, training=True), labels)
            model.backward(grad)
            opt.step()
        return model.state_dict()

    expected = step(_small_model())
    monkeypatch.setattr(_ops, "ops_for", lambda xp: _ops.ArrayOps(xp))
    got = step(_small_model())
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-9, atol=1e-12, err_msg=key)


def test_softmax_cross_entropy_is_stable_and_counts_hits():
    z = np.array([[1e4, 0.0, -1e4], [-1e4, -1e4, -1e4], [0.0, 3.0, 1.0]], np.float32)
    labels = np.array([0, 2, 0])
    value, grad = nn.SoftmaxCrossEntropy()(z, labels)
    ref_loss, ref_grad = _ref_softmax_ce(
        np.array([[0.0, -1e4, -2e4], [0, 0, 0], [0, 3, 1]]), labels
    )
    assert np.isfinite(value) and np.isfinite(grad).all()
    assert value == pytest.approx(ref_loss, rel=1e-6)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-7)
    acc = np.zeros(2)
    nn.SoftmaxCrossEntropy().forward_backward(z, labels, acc)
    assert acc[1] == 1  # row 0 right, row 1 tie -> class 0 != 2, row 2 wrong


def test_loss_rejects_bad_labels_and_shapes():
    loss = nn.SoftmaxCrossEntropy()
    with pytest.raises(ValueError, match="labels must lie in"):
        loss(np.zeros((2, 3), np.float32), np.array([0, 3]))
    with pytest.raises(ValueError, match="labels must have shape"):
        loss(np.zeros((2, 3), np.float32), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="logits must be 2-D"):
        loss.forward_backward(np.zeros(3, np.float32), np.zeros(3, np.int64), np.zeros(2))


# --------------------------------------------------------------------------------------
# Optimizers against PyTorch's (optional) and closed forms
# --------------------------------------------------------------------------------------


def test_adam_and_sgd_match_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(4, 3))
    grads = [rng.normal(size=(4, 3)) for _ in range(4)]
    cases = [
        (
            lambda p, g: nn.Adam([(p, g)], lr=0.01, convention="torch"),
            lambda t: torch.optim.Adam([t], lr=0.01),
        ),
        (
            lambda p, g: nn.Adam([(p, g)], lr=0.01, eps=1e-3, convention="torch"),
            lambda t: torch.optim.Adam([t], lr=0.01, eps=1e-3),
        ),
        (
            lambda p, g: nn.SGD([(p, g)], lr=0.1, momentum=0.9),
            lambda t: torch.optim.SGD([t], lr=0.1, momentum=0.9),
        ),
        (
            lambda p, g: nn.SGD([(p, g)], lr=0.1, momentum=0.5, nesterov=True),
            lambda t: torch.optim.SGD([t], lr=0.1, momentum=0.5, nesterov=True),
        ),
    ]
    for make_ours, make_torch in cases:
        p, g = p0.copy(), np.zeros_like(p0)
        ours = make_ours(p, g)
        t = torch.tensor(p0.copy(), requires_grad=True)
        theirs = make_torch(t)
        for grad in grads:
            g[...] = grad
            ours.step()
            t.grad = torch.tensor(grad)
            theirs.step()
        np.testing.assert_allclose(p, t.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_adam_keras_epsilon_placement():
    p, g = np.array([0.0]), np.array([1e-6])
    nn.Adam([(p, g)], lr=1.0, eps=1e-7).step()
    # Keras: alpha = sqrt(1 - b2)/(1 - b1); step = alpha * m / (sqrt(v) + eps).
    m, v = 0.1 * 1e-6, 0.001 * 1e-12
    assert p[0] == pytest.approx(-np.sqrt(0.001) / 0.1 * m / (np.sqrt(v) + 1e-7), rel=1e-12)


def test_optimizer_state_dict_round_trip_and_errors():
    model = _small_model()
    opt = nn.Adam(model.store)
    model.store.grads[...] = 1.0
    opt.step()
    state = opt.state_dict()
    other = nn.Adam(_small_model().store)
    other.load_state_dict(state)
    assert other.t == 1
    np.testing.assert_array_equal(other.state["m"][0], opt.state["m"][0])
    with pytest.raises(ValueError, match="must have shape"):
        other.load_state_dict(dict(state, **{"m.0": np.zeros(3)}))
    with pytest.raises(KeyError, match="v.0"):
        other.load_state_dict({k: v for k, v in state.items() if k != "v.0"})
    with pytest.raises(ValueError, match="lr must be > 0"):
        nn.Adam(model.store, lr=0)
    with pytest.raises(ValueError, match="beta1"):
        nn.Adam(model.store, beta1=1.0)
    with pytest.raises(ValueError, match="convention"):
        nn.Adam(model.store, convention="tf")
    with pytest.raises(ValueError, match="momentum"):
        nn.SGD(model.store, momentum=1.5)
    with pytest.raises(ValueError, match="grad must be"):
        nn.SGD([(np.zeros(3), None)])
    with pytest.raises(ValueError, match="must not be empty"):
        nn.SGD([])


# --------------------------------------------------------------------------------------
# Layers and model plumbing
# --------------------------------------------------------------------------------------


def test_initializers_have_their_scales():
    fan_in, fan_out = 400, 200
    for init, check in (
        (
            "glorot_uniform",
            lambda w: (
                np.abs(w).max() <= np.sqrt(6 / 600)
                and w.std() == pytest.approx(np.sqrt(2 / 600), rel=0.02)
            ),
        ),
        ("he_normal", lambda w: w.std() == pytest.approx(np.sqrt(2 / 400), rel=0.02)),
        ("he_uniform", lambda w: np.abs(w).max() <= np.sqrt(6 / 400)),
        ("torch", lambda w: np.abs(w).max() <= 1 / 20),
    ):
        layer = nn.Dense(fan_in, fan_out, init=init, rng=0, dtype=np.float64)
        assert check(layer.weight), init
    assert not nn.Dense(3, 2, init="glorot", rng=0).bias.any()
    assert nn.Dense(3, 2, init="torch", rng=0).bias.any()
    with pytest.raises(ValueError, match="init must be one of"):
        nn.Dense(3, 2, init="zeros")


def test_layer_argument_errors():
    with pytest.raises(ValueError, match="in_features"):
        nn.Dense(0, 3)
    with pytest.raises(ValueError, match="activation"):
        nn.Dense(2, 3, activation="tanh")
    with pytest.raises(ValueError, match="convention"):
        nn.BatchNorm(3, convention="caffe")
    model = nn.Sequential([nn.Dense(4, 3, rng=0)])
    with pytest.raises(ValueError, match=r"x must have shape \(n, 4\)"):
        model.forward(np.zeros((2, 5), np.float32))
    with pytest.raises(RuntimeError, match="preceding forward"):
        nn.Sequential([nn.Dense(4, 3, rng=0)]).backward(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="one dtype"):
        nn.Sequential([nn.Dense(4, 3, dtype=np.float64), nn.BatchNorm(3)])
    with pytest.raises(ValueError, match="must not be empty"):
        nn.Sequential([])
    with pytest.raises(ValueError, match="bn_position"):
        nn.build_mlp(bn_position="middle")


def test_relu_layer_and_parameter_views():
    model = nn.Sequential(
        [
            nn.Dense(3, 4, rng=0, dtype=np.float64),
            nn.ReLU(),
            nn.Dense(4, 2, rng=1, dtype=np.float64),
        ]
    )
    x = np.random.default_rng(0).normal(size=(5, 3))
    y = model.forward(x)
    w0, b0, w1, b1 = (p.value for p in model.parameters())
    np.testing.assert_allclose(y, np.maximum(x @ w0 + b0, 0) @ w1 + b1, rtol=1e-12)
    # Parameters are views of the flat array that the optimizers update.
    model.store.values[0] = 42.0
    assert model.layers[0].weight[0, 0] == 42.0
    assert model.parameters()[0].name == "layers.0.weight"


def test_state_dict_round_trip_and_errors():
    a, b = _small_model(seed=0), _small_model(seed=1)
    x, labels = _batch()
    a.forward(x, training=True)
    b.load_state_dict(a.state_dict())
    for key, value in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[key], value)
    state = a.state_dict()
    with pytest.raises(KeyError, match="missing"):
        b.load_state_dict({k: v for k, v in state.items() if k != "layers.0.bias"})
    before = b.state_dict()
    with pytest.raises(ValueError, match="layers.4.weight must have shape"):
        b.load_state_dict(dict(state, **{"layers.4.weight": np.zeros((2, 2))}))
    with pytest.raises(ValueError, match="running_mean must have shape"):
        b.load_state_dict(dict(state, **{"layers.1.running_mean": np.zeros(2)}))
    for key, value in before.items():  # a failed load changes nothing
        np.testing.assert_array_equal(b.state_dict()[key], value)


def test_cuda_device_without_cupy_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_cupy(name, *args, **kwargs):
        if name == "cupy":
            raise ImportError("No module named 'cupy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cupy)
    with pytest.raises(RuntimeError, match="needs CuPy"):
        _device.array_module("cuda")
    with pytest.raises(ValueError, match="device must be one of"):
        _device.array_module("tpu")
