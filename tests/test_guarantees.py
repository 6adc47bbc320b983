"""The guarantees of DESIGN.md: errors before writes, non-finite guard, gradients by finite
differences, thread safety, property tests, agreement with PyTorch."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import reference as ref
from helpers import assert_close, tol
from hypothesis import given, settings
from hypothesis import strategies as st

import fastbn


def rand(shape, dtype=np.float64, seed=0, offset=0.0):
    return (offset + np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


# --------------------------------------------------------------------------------------
# Bad input: clear exceptions, raised before anything is written
# --------------------------------------------------------------------------------------


def snapshot(*arrays):
    return [a.copy() for a in arrays]


def assert_unchanged(arrays, copies):
    for a, c in zip(arrays, copies):
        np.testing.assert_array_equal(a, c)


X = rand((4, 3, 5), np.float32)

BAD_FORWARD = [
    (dict(x=np.ones((4, 3), np.int32)), TypeError, "float16, float32 or float64"),
    (dict(x=np.ones(5, np.float32)), ValueError, "at least 2 dimensions"),
    (dict(x=X, axis=3), ValueError, "axis must be in"),
    (dict(x=X, axis=-4), ValueError, "axis must be in"),
    (dict(x=X, axis=1.0), TypeError, "axis must be an int"),
    (dict(x=X, gamma=np.ones(4)), ValueError, r"gamma must have shape \(3,\)"),
    (dict(x=X, beta=np.ones((3, 1))), ValueError, r"beta must have shape \(3,\)"),
    (dict(x=X, gamma=np.ones(3, np.int64)), TypeError, "gamma must be a float array"),
    (dict(x=np.ones((1, 3), np.float32)), ValueError, "more than 1 value per channel"),
    # (0, 3) x, an empty batch, is no longer an error (issue 18): see tests/test_contract.py
    (dict(x=X, eps=0.0), ValueError, "eps must be a finite number > 0"),
    (dict(x=X, eps=-1e-5), ValueError, "eps must be a finite number > 0"),
    (dict(x=X, eps=float("nan")), ValueError, "eps must be a finite number > 0"),
    (dict(x=X, out=np.empty((4, 3), np.float32)), ValueError, r"out must have shape \(4, 3, 5\)"),
    (dict(x=X, out=np.empty((4, 3, 5), np.float64)), ValueError, "out must have dtype float32"),
    (dict(x=X, activation="gelu"), ValueError, "activation must be None or 'relu'"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_FORWARD)
def test_forward_rejects_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastbn.batch_norm_forward(**kwargs)


def test_bad_batch_norm_call_leaves_everything_unchanged():
    x = rand((6, 3), np.float32)
    out = np.full_like(x, 7.0)
    rm, rv = np.full(3, 0.5), np.full(3, 2.0)
    copies = snapshot(out, rm, rv)
    cases = [
        (dict(momentum=1.5), ValueError, r"momentum must be in \[0, 1\]"),
        (dict(momentum=-0.1), ValueError, r"momentum must be in \[0, 1\]"),
        (dict(momentum=None), ValueError, "num_batches_tracked"),
        (dict(eps=0), ValueError, "eps"),
        (dict(gamma=np.ones(2)), ValueError, "gamma"),
        (dict(on_nonfinite="ignore"), ValueError, "on_nonfinite"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            fastbn.batch_norm(x, rm, rv, training=True, out=out, **kwargs)
        assert_unchanged((out, rm, rv), copies)
    with pytest.raises(ValueError, match="running_mean must have shape"):
        fastbn.batch_norm(x, np.zeros(4), rv, training=True, out=out)
    with pytest.raises(ValueError, match="running_var must be writable"):
        ro = np.ones(3)
        ro.flags.writeable = False
        fastbn.batch_norm(x, rm, ro, training=True, out=out)
    with pytest.raises(ValueError, match="given together"):
        fastbn.batch_norm(x, rm, None, training=True, out=out)
    with pytest.raises(ValueError, match="required when training=False"):
        fastbn.batch_norm(x, out=out)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fastbn.batch_norm(x[:1], rm, rv, training=True)
    assert_unchanged((out, rm, rv), copies)


def test_backward_rejects_bad_input():
    x = rand((5, 3), np.float32)
    dy = rand((5, 3), np.float32, 1)
    _, mean, invstd = fastbn.batch_norm_forward(x)
    out = np.full_like(x, 3.0)
    copy = out.copy()
    cases = [
        (dict(dy=dy[:4]), ValueError, "dy must have the shape of x"),
        (dict(dy=dy.astype(np.float64)), ValueError, "dy must have the dtype of x"),
        (dict(mean=mean[:2]), ValueError, r"mean must have shape \(3,\)"),
        (dict(invstd=np.ones(3, np.int32)), TypeError, "invstd must be a float array"),
        (dict(out=np.empty((5, 3), np.float64)), ValueError, "out must have dtype"),
        (dict(mean=None), TypeError, "mean and invstd are required"),
    ]
    for kwargs, exc, match in cases:
        args = dict(dy=dy, x=x, mean=mean, invstd=invstd, out=out)
        args.update(kwargs)
        with pytest.raises(exc, match=match):
            fastbn.batch_norm_backward(
                args.pop("dy"), args.pop("x"), args.pop("mean"), args.pop("invstd"), **args
            )
        assert_unchanged([out], [copy])


def test_inference_rejects_bad_input():
    x = rand((5, 3), np.float32)
    with pytest.raises(ValueError, match="running_var must have shape"):
        fastbn.batch_norm_inference(x, np.zeros(3), np.ones(2))
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        fastbn.batch_norm_inference(x.astype(np.int8), np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="stream= applies to CUDA arrays only"):
        fastbn.batch_norm_inference(x, np.zeros(3), np.ones(3), stream=object())


# --------------------------------------------------------------------------------------
# Non-finite batch statistics never enter the running statistics
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("with_out", [False, True])
def test_nonfinite_batch_raises_and_leaves_state_untouched(bad, with_out):
    x = rand((8, 3, 4), np.float32)
    x[2, 1, 3] = bad
    rm, rv = np.full(3, 0.25, np.float32), np.full(3, 4.0, np.float32)
    out = np.full_like(x, 9.0) if with_out else None
    copies = snapshot(rm, rv) + ([out.copy()] if with_out else [])
    with pytest.raises(FloatingPointError, match=r"not finite in 1 channel\(s\) \(first: \[1\]\)"):
        fastbn.batch_norm(x, rm, rv, training=True, out=out)
    assert_unchanged([rm, rv] + ([out] if with_out else []), copies)


def test_nonfinite_batch_can_warn_instead():
    x = rand((8, 3), np.float64)
    x[0, 0] = np.nan
    rm, rv = np.zeros(3), np.ones(3)
    out = np.empty_like(x)
    with pytest.warns(RuntimeWarning, match="left unchanged"):
        y = fastbn.batch_norm(x, rm, rv, training=True, on_nonfinite="warn", out=out)
    assert y is out and np.isnan(y[:, 0]).all() and np.isfinite(y[:, 1:]).all()
    assert_unchanged([rm, rv], [np.zeros(3), np.ones(3)])


def test_nonfinite_in_the_layer_leaves_it_untouched():
    bn = fastbn.BatchNorm(3)
    bn.forward(rand((8, 3), np.float32), training=True)
    state = bn.state_dict()
    x = rand((8, 3), np.float32, 1)
    x[4, 2] = np.inf
    with pytest.raises(FloatingPointError):
        bn.forward(x, training=True)
    after = bn.state_dict()
    assert after.keys() == state.keys()
    for k in state:
        np.testing.assert_array_equal(after[k], state[k])


# --------------------------------------------------------------------------------------
# Gradients by finite differences
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,axis", [((5, 3), 1), ((3, 2, 4), 1), ((2, 3, 2, 2), -1), ((4, 1, 3), 1)]
)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_gradients_match_finite_differences(shape, axis, activation):
    """Central differences of sum(w * y), computed with fastbn's own float64 forward."""
    rng = np.random.default_rng(21)
    x = rng.standard_normal(shape)
    C = shape[axis]
    gamma = rng.uniform(0.5, 1.5, C)
    beta = rng.normal(size=C) * 0.3
    w = rng.standard_normal(shape)

    def loss(x_, gamma_, beta_):
        y, _, _ = fastbn.batch_norm_forward(x_, gamma_, beta_, axis=axis, activation=activation)
        return float((w * y).sum())

    _, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, activation=activation)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        w, x, mean, invstd, gamma, beta, axis=axis, activation=activation
    )
    h = 1e-6

    def numeric(f, a):
        g = np.zeros_like(a)
        for i in np.ndindex(a.shape):
            a_p, a_m = a.copy(), a.copy()
            a_p[i] += h
            a_m[i] -= h
            g[i] = (f(a_p) - f(a_m)) / (2 * h)
        return g

    # central differences in float64: truncation ~h^2, rounding ~1e-16/h ~ 1e-10
    assert_close(dx, numeric(lambda a: loss(a, gamma, beta), x), rtol=1e-5, atol=1e-6, name="dx")
    assert_close(
        dgamma, numeric(lambda a: loss(x, a, beta), gamma), rtol=1e-5, atol=1e-6, name="dgamma"
    )
    assert_close(
        dbeta, numeric(lambda a: loss(x, gamma, a), beta), rtol=1e-5, atol=1e-6, name="dbeta"
    )


# --------------------------------------------------------------------------------------
# Property tests over shapes and axes
# --------------------------------------------------------------------------------------


@st.composite
def batches(draw):
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    C = shape[axis]
    if np.prod(shape) // C < 2:
        shape = (
            (shape[0] + 1,) + shape[1:]
            if axis % ndim != 0
            else shape[:1] + (shape[1] + 1,) + shape[2:]
        )
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**16))
    offset = draw(st.sampled_from([0.0, 100.0, -1e3]))
    return shape, axis, dtype, seed, offset


@settings(max_examples=60, deadline=None)
@given(batches())
def test_property_forward_backward_match_reference(case):
    shape, axis, dtype, seed, offset = case
    rng = np.random.default_rng(seed)
    x = (offset + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    gamma = rng.uniform(0.5, 2, C)
    beta = rng.normal(size=C)
    y, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta, axis=axis)
    y_ref = ref.forward(x, gamma, beta, axis)[0]
    # where a channel is constant (one distinct value), xhat is 0/sqrt(eps) noise: skip
    assert_close(y, y_ref, **tol(dtype, 10), name="y")
    dx = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta, axis=axis)[0]
    dx_ref = ref.backward(dy, x, mean, invstd, gamma, beta, axis)[0]
    # dx has a 1/sqrt(var + eps) factor: with eps=1e-5 and tiny batches, values reach ~300
    assert_close(
        dx,
        dx_ref,
        rtol=tol(dtype)["rtol"] * 10,
        atol=tol(dtype)["atol"] * 10 * max(1.0, float(np.abs(dx_ref).max())),
        name="dx",
    )
    # mean and normalized output are invariant: the normalized batch has mean ~0, var ~1
    yn = fastbn.batch_norm_forward(x, axis=axis)[0].astype(np.float64)
    red = tuple(d for d in range(x.ndim) if d != axis % x.ndim)
    assert np.all(np.abs(yn.mean(axis=red)) < 1e-3)


# --------------------------------------------------------------------------------------
# Concurrency: several Python threads calling at once (subprocess: a failure would abort)
# --------------------------------------------------------------------------------------

CONCURRENT = textwrap.dedent("""
    import json, threading
    import numpy as np, numba, fastbn
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((16, 8, 3000)).astype(np.float32) for _ in range(4)]
    xs += [rng.standard_normal((40000, 7)).astype(np.float32) for _ in range(4)]
    expected = [fastbn.batch_norm_forward(x, axis=1)[0] for x in xs]
    errors = []
    def work(i):
        try:
            for _ in range(10):
                y, mean, invstd = fastbn.batch_norm_forward(xs[i], axis=1)
                dx = fastbn.batch_norm_backward(xs[i], xs[i], mean, invstd)[0]
                if not np.array_equal(y, expected[i]):
                    errors.append(f"thread {i}: result differs")
        except Exception as e:
            errors.append(repr(e))
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads: t.start()
    for t in threads: t.join()
    print(json.dumps({"layer": numba.threading_layer(), "errors": errors}))
""")


def test_concurrent_calls_from_python_threads():
    env = dict(os.environ)
    env.pop("NUMBA_THREADING_LAYER", None)
    proc = subprocess.run(
        [sys.executable, "-c", CONCURRENT], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["errors"] == []
    assert result["layer"] in ("tbb", "omp")


def test_every_cpu_kernel_has_a_locked_cache():
    """Each cached CPU kernel reads and writes Numba's on-disk cache under a file lock."""
    fcntl = pytest.importorskip("fcntl")  # noqa: F841 (POSIX only)
    from numba.core.registry import CPUDispatcher

    from fastbn import _config, cpu, cpu_masked

    kernels = [v for v in vars(cpu).values() if isinstance(v, CPUDispatcher)] + cpu.drivers()
    kernels += [v for v in vars(cpu_masked).values() if isinstance(v, CPUDispatcher)]
    kernels += cpu_masked.drivers()
    assert len(kernels) > 30
    for kernel in kernels:
        assert type(kernel._cache._cache_file) is _config._LockedCacheFile, kernel


FIRST_CALL = textwrap.dedent("""
    import sys
    import numpy as np
    from fastbn import cpu
    op = sys.argv[1]
    rng = np.random.default_rng(0)
    x = rng.random((16, 64, 160), dtype=np.float32)  # 640 KiB: parallel, two-pass
    out = np.empty_like(x)
    C = x.shape[1]
    mean, var, inv = rng.random(C), rng.random(C), rng.random(C)
    ones, zeros = np.ones(C), np.zeros(C)
    plan = cpu._plan(x)
    assert not (plan.serial or plan.fuse_forward or plan.fuse_backward), plan
    if op == "inference":
        cpu.inference(x, mean, var, ones, zeros, 1e-5, False, out)
        kernel = cpu.inference_kernels.strided.parallel
    elif op == "forward":
        cpu.forward_training(x, ones, zeros, 1e-5, False, out)
        kernel = cpu.forward_two_pass_kernels.strided.parallel
    else:
        cpu.backward(x, x, mean, inv, ones, zeros, False, out)
        kernel = cpu.backward_two_pass_kernels.strided.parallel
    print(sum(kernel.stats.cache_hits.values()))
""")


@pytest.mark.skipif(os.environ.get("FASTBN_CACHE") == "0", reason="the on-disk cache is off")
@pytest.mark.parametrize("op", ["inference", "forward", "backward"])
def test_first_call_of_a_process_from_the_cache(op):
    """A driver with no prange of its own that calls parallel drivers (inference, two-pass
    forward and backward), loaded from the on-disk cache as the first parallel call of a
    process: Numba does not start its threading layer for it (numba/numba#8578), and
    inference crashed the process until fastbn started the layer itself."""
    runs = [
        subprocess.run(
            [sys.executable, "-c", FIRST_CALL, op], capture_output=True, text=True, timeout=600
        )
        for _ in range(2)
    ]  # fill, then load
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    if int(runs[1].stdout.split()[-1]) == 0:
        pytest.skip("the on-disk cache is not writable here: nothing was loaded")


def test_cache_save_and_load_hold_the_lock(tmp_path):
    """A save holds the lock exclusively (no reader sees a half-written entry), a load
    holds it shared (no writer starts meanwhile); entries round-trip."""
    fcntl = pytest.importorskip("fcntl")
    from fastbn._config import _LockedCacheFile

    cache_file = _LockedCacheFile(str(tmp_path), "kernel", source_stamp=b"stamp")
    lock_path = cache_file._index_path + ".lock"
    seen = []

    def try_lock(operation):
        fd = os.open(lock_path, os.O_RDWR)
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    save_data, load_data = cache_file._save_data, cache_file._load_data

    def spy_save(name, data):
        seen.append(("save", try_lock(fcntl.LOCK_SH)))
        save_data(name, data)

    def spy_load(name):
        seen.append(("load", try_lock(fcntl.LOCK_SH), try_lock(fcntl.LOCK_EX)))
        return load_data(name)

    cache_file._save_data, cache_file._load_data = spy_save, spy_load
    cache_file.save(("sig", 1), ("machine code", 1))
    cache_file.save(("sig", 2), ("machine code", 2))
    assert cache_file.load(("sig", 1)) == ("machine code", 1)
    assert cache_file.load(("sig", 2)) == ("machine code", 2)
    assert cache_file.load(("sig", 3)) is None
    # during a save even a reader is refused; during a load readers pass, writers wait
    assert seen == [("save", False), ("save", False), ("load", True, False), ("load", True, False)]
    assert try_lock(fcntl.LOCK_EX)  # and every lock is released


# --------------------------------------------------------------------------------------
# Agreement with PyTorch (skipped when it is not installed)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 4), (4, 3, 5, 6), (3, 5, 7)])
def test_agrees_with_pytorch(shape):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(22)
    x = rng.standard_normal(shape).astype(np.float32) * 2 + 1
    dy = rng.standard_normal(shape).astype(np.float32)
    C = shape[1]
    gamma = rng.uniform(0.5, 1.5, C).astype(np.float32)
    beta = rng.normal(size=C).astype(np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)

    xt = torch.tensor(x, requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    rmt, rvt = torch.zeros(C), torch.ones(C)
    yt = torch.nn.functional.batch_norm(xt, rmt, rvt, gt, bt, training=True, momentum=0.1, eps=1e-5)
    yt.backward(torch.tensor(dy))

    y = fastbn.batch_norm(x, rm, rv, gamma, beta, training=True, momentum=0.1, eps=1e-5)
    _, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta)
    # PyTorch accumulates differently in float32: agreement to a few float32 ulps of sums
    assert_close(y, yt.detach().numpy(), rtol=1e-5, atol=1e-5, name="y")
    assert_close(rm, rmt.numpy(), rtol=1e-5, atol=1e-6, name="running_mean")
    assert_close(rv, rvt.numpy(), rtol=1e-5, atol=1e-6, name="running_var")
    assert_close(dx, xt.grad.numpy(), rtol=1e-4, atol=1e-5, name="dx")
    assert_close(dgamma, gt.grad.numpy(), rtol=1e-4, atol=1e-4, name="dgamma")
    assert_close(dbeta, bt.grad.numpy(), rtol=1e-4, atol=1e-4, name="dbeta")
    yi = fastbn.batch_norm(x, rm, rv, gamma, beta, training=False)
    yit = torch.nn.functional.batch_norm(
        torch.tensor(x), rmt, rvt, gt.detach(), bt.detach(), training=False
    )
    assert_close(yi, yit.numpy(), rtol=1e-5, atol=1e-5, name="inference")


def test_layer_agrees_with_torch_module():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(23)
    bn = fastbn.BatchNorm(4, momentum=None)
    tbn = torch.nn.BatchNorm1d(4, momentum=None)
    for i in range(3):
        x = (rng.standard_normal((16, 4)) * (i + 1) + i).astype(np.float32)
        bn.forward(x, training=True)
        tbn.train()(torch.tensor(x))
    assert bn.num_batches_tracked == int(tbn.num_batches_tracked)
    assert_close(bn.running_mean, tbn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    assert_close(bn.running_var, tbn.running_var.numpy(), rtol=1e-5, atol=1e-6)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    assert_close(
        bn.forward(x, training=False),
        tbn.eval()(torch.tensor(x)).detach().numpy(),
        rtol=1e-5,
        atol=1e-5,
    )
