"""The CUDA path against the float64 reference and the CPU path.

On a machine with a GPU these tests run in-process, unchanged. Without one, the outer test
:func:`test_cuda_suite_under_simulator` re-runs this file in two subprocesses under Numba's
CUDA simulator with 64 threads per block (two warps: the shuffle tree *and* the cross-warp
merge run) and a launch configuration that gives tiny arrays several blocks per channel
with a tail, so that multi-block and tail paths run. The environment has to be set before
``numba.cuda`` is first imported, hence the subprocesses. The simulator is slow (about
0.1 s per block): shapes stay tiny.
"""

import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

import fastbn

sys.path.insert(0, os.path.dirname(__file__))
import reference as ref  # noqa: E402

CHILD = os.environ.get("FASTBN_CUDA_TEST_CHILD") == "1"
SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
SIM_ENV = {
    "NUMBA_ENABLE_CUDASIM": "1",
    "FASTBN_CUDA_THREADS": "64",
    "FASTBN_CUDA_MIN_VALUES_PER_THREAD": "4",
    "FASTBN_CUDA_TARGET_BLOCKS": "8",
    "FASTBN_CUDA_SYNC_NONFINITE": "0",
}
SHARDS = 2


def _real_gpu():
    if SIMULATED:
        return False
    return fastbn.cuda_available()


RUN_HERE = CHILD or _real_gpu()

if RUN_HERE:
    from numba import cuda

    import fastbn.cuda as fcuda


# --------------------------------------------------------------------------------------
# The outer test: run this file under the simulator
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(RUN_HERE, reason="the CUDA tests run in this process")
def test_cuda_suite_under_simulator():
    """Run every test below under the CUDA simulator, in two parallel shards."""
    pytest.importorskip("numba.cuda")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = []
    for shard in range(SHARDS):
        env = dict(
            os.environ,
            **SIM_ENV,
            FASTBN_CUDA_TEST_CHILD="1",
            FASTBN_CUDA_TEST_SHARD=f"{shard}/{SHARDS}",
        )
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "-x",
                    os.path.abspath(__file__),
                    "-k",
                    "not test_cuda_suite_under_simulator",
                ],
                cwd=root,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, f"CUDA tests failed under the simulator:\n{out}"
        assert " passed" in out, out


# Compiles every kernel for sm_90 with NVVM, without a GPU: catches typing and lowering
# errors of the code that only a real GPU runs (warp shuffles, float16 casts), which the
# simulator never compiles. Needs libNVVM (pip install nvidia-cuda-nvcc-cu12
# nvidia-cuda-nvrtc-cu12); exits 3 when it is missing. Device functions ask the current
# device for its compute capability, so that one query is answered with (9, 0).
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
f64, i64, b1, i32 = nt.float64, nt.int64, nt.boolean, nt.int32
A = lambda dt, nd: nt.Array(dt, nd, "C")
sigs = {}
for data, compute in ((nt.float32, np.float32), (nt.float16, np.float32), (nt.float64, np.float64)):
    k = K.build(np.dtype(compute))
    x3, p1, st = A(data, 3), A(data, 1), A(f64 if data == f64 else nt.float32, 1)
    sigs["forward_partials", data] = (k.forward_partials, (x3, i64, i64, i64, A(f64, 3), A(i32, 1)))
    sigs["forward_apply", data] = (k.forward_apply, (x3, x3, i64, i64, i64, A(f64, 3), f64, p1, b1,
        p1, b1, b1, st, st, b1, A(f64, 2), b1, p1, p1, f64, f64, f64, f64, A(i32, 1), A(i32, 1),
        i64))
    sigs["inference", data] = (k.inference, (x3, x3, i64, i64, i64, p1, p1, f64, p1, b1, p1,
        b1, b1))
    sigs["residual", data] = (k.residual, (x3, x3, x3, x3, i64, i64, i64, st, st, b1, f64, p1,
        b1, p1, b1, b1, b1))
    sigs["backward_partials", data] = (k.backward_partials, (x3, x3, i64, i64, i64, st, st, p1, b1,
        p1, b1, b1, A(f64, 3)))
    sigs["backward_apply", data] = (k.backward_apply, (x3, x3, x3, i64, i64, i64, A(f64, 3), i64,
        f64, st, st, p1, b1, p1, b1, b1, st, b1, st, b1))
    sigs["frozen_backward", data] = (k.frozen_backward, (x3, x3, x3, i64, i64, i64, st, st, p1,
        b1, p1, b1, b1, A(f64, 3)))
    sigs["frozen_grads", data] = (K.frozen_grads, (A(f64, 3), st, st, st))
    w2 = A(nt.uint8, 2)
    sigs["masked_forward_partials", data] = (k.masked_forward_partials, (x3, w2, i64, i64, i64,
        A(f64, 3)))
    sigs["masked_input_grad", data] = (k.masked_input_grad, (x3, x3, w2, x3, i64, i64, i64,
        A(f64, 3), f64, st, st, p1, b1, p1, b1, b1))
sigs["gather", 0] = (K.gather, (A(nt.float32, 1), A(f64, 1), nt.UniTuple(i64, 4),
    nt.UniTuple(i64, 4), i64))
sigs["scatter", 0] = (K.scatter, (A(nt.float16, 1), A(nt.float16, 1), nt.UniTuple(i64, 3),
    nt.UniTuple(i64, 3), i64))
sigs["fill", 0] = (K.fill, (A(nt.float32, 1), f64))
sigs["merge", 0] = (K.merge_partials, (A(f64, 3), b1, A(f64, 2)))
sigs["take_counts", 0] = (K.take_counts, (A(i32, 1), A(i32, 1)))
for (name, data), (kernel, sig) in sigs.items():
    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
    if "partials" in name or "apply" in name or name == "frozen_backward":
        assert "shfl.sync" in ptx, (name, "no warp shuffle")
        assert ".local" not in ptx, (name, "register batch spilled to local memory")
    print("compiled", name, data)
"""


@pytest.mark.skipif(CHILD, reason="runs once, from the parent process")
def test_kernels_compile_for_a_real_gpu():
    """Every kernel compiles to sm_90 PTX with shuffles and no local memory (NVVM, no GPU)."""
    pytest.importorskip("numba.cuda")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("FASTBN_CUDA_THREADS", None)
    proc = subprocess.run(
        [sys.executable, "-c", _PTX_SCRIPT],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    if proc.returncode == 3:
        pytest.skip(f"libNVVM not installed: {proc.stdout.strip()[-200:]}")
    assert proc.returncode == 0, proc.stdout


needs_cuda = pytest.mark.skipif(not RUN_HERE, reason="runs on a GPU or in the simulator subprocess")


@pytest.fixture(autouse=True)
def _shard(request):
    """In a simulator shard, run only this shard's share of the tests."""
    spec = os.environ.get("FASTBN_CUDA_TEST_SHARD")
    if CHILD and spec:
        index, count = (int(v) for v in spec.split("/"))
        if zlib.crc32(request.node.nodeid.encode()) % count != index:
            pytest.skip("other shard")


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------

TOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5, np.dtype(np.float16): 5e-3}


def close(actual, expected, dtype, scale=1.0, name="result"):
    """``|actual - expected| <= tol * (1 + |expected|)``, NaN-aware, listing mismatches."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{name}: {actual.shape} != {expected.shape}"
    t = TOL[np.dtype(dtype)] * scale
    bad = ~(np.abs(actual - expected) <= t * (1 + np.abs(expected)))
    bad &= ~(np.isnan(actual) & np.isnan(expected))
    if bad.any():
        idx = np.argwhere(bad)[:5]
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.size} differ (tol {t}); first: "
            + ", ".join(f"{tuple(i)}: {actual[tuple(i)]!r} vs {expected[tuple(i)]!r}" for i in idx)
        )


def dev(a):
    return None if a is None else cuda.to_device(np.ascontiguousarray(a))


def host(a):
    return None if a is None else fcuda.to_host(a)


def data(shape, dtype, seed=0, offset=3.0):
    rng = np.random.default_rng(seed)
    return (offset + 2.0 * rng.standard_normal(shape)).astype(dtype)


def params(C, dtype, seed=1):
    rng = np.random.default_rng(seed)
    return (1.0 + 0.5 * rng.standard_normal(C)).astype(dtype), rng.standard_normal(C).astype(dtype)


@pytest.fixture
def launches(monkeypatch):
    """Count kernel launches (every launch goes through ``fastbn.cuda._launch``)."""
    calls = []
    original = fcuda._launch

    def counting(kernel, *args):
        calls.append(kernel)
        return original(kernel, *args)

    monkeypatch.setattr(fcuda, "_launch", counting)
    return calls


# Layouts: (shape, axis). Strided (inner > 1) and rows (inner == 1) families, C = 1,
# primes, two rows, C > 32 (two rows tiles, the second partial).
LAYOUTS = [
    ((7, 3, 41), 1),  # (N, C, L): strided, 2 blocks per channel, tail chunk
    ((2, 9, 300), 1),  # strided, 1 block per channel, > 8 values per thread
    ((4, 3, 5, 7), 1),  # NCHW
    ((3, 2, 3, 4, 5), 1),  # NCDHW volume
    ((37, 5), 1),  # (N, C): rows, width 8
    ((4, 5, 6, 3), -1),  # NHWC: rows
    ((70, 37), 1),  # C = 37 > 32: two rows tiles, 4 row chunks
    ((50, 1, 9), 1),  # C = 1, strided
    ((2, 7), 1),  # 2 rows
]


# --------------------------------------------------------------------------------------
# Forward, backward, inference against the reference and the CPU
# --------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_forward_backward_layouts(shape, axis):
    x = data(shape, np.float32)
    C = shape[axis]
    gamma, beta = params(C, np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(dev(x), dev(gamma), dev(beta), axis=axis)
    assert isinstance(y, type(dev(x))) and y.shape == x.shape and y.dtype == x.dtype
    yr, mr, ir, _ = ref.forward(x, gamma, beta, axis)
    close(host(y), yr, np.float32, name="y")
    close(host(mean), mr, np.float32, name="mean")
    close(host(invstd), ir, np.float32, name="invstd")
    assert host(mean).dtype == np.float32
    # GPU agrees with the CPU path
    y_cpu, mean_cpu, _ = fastbn.batch_norm_forward(x, gamma, beta, axis=axis)
    close(host(y), y_cpu, np.float32, name="y vs cpu")
    close(host(mean), mean_cpu, np.float32, name="mean vs cpu")

    dy = data(shape, np.float32, seed=5, offset=0.0)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        dev(dy), dev(x), mean, invstd, dev(gamma), dev(beta), axis=axis
    )
    dxr, dgr, dbr = ref.backward(dy, x, host(mean), host(invstd), gamma, beta, axis)
    m = x.size // C
    close(host(dx), dxr, np.float32, name="dx")
    close(host(dgamma), dgr, np.float32, scale=np.sqrt(m), name="dgamma")
    close(host(dbeta), dbr, np.float32, scale=np.sqrt(m), name="dbeta")


@needs_cuda
@pytest.mark.parametrize("dtype", [np.float64, np.float16])
@pytest.mark.parametrize("shape, axis", [((6, 3, 50), 1), ((37, 5), 1)])
def test_dtypes(dtype, shape, axis):
    x = data(shape, dtype)
    C = shape[axis]
    gamma, beta = params(C, dtype)
    y, mean, invstd = fastbn.batch_norm_forward(dev(x), dev(gamma), dev(beta), axis=axis)
    assert y.dtype == dtype
    stats = np.float64 if dtype == np.float64 else np.float32
    assert mean.dtype == stats and invstd.dtype == stats
    yr, mr, ir, _ = ref.forward(x, gamma, beta, axis)
    close(host(y), yr, dtype, name="y")
    close(host(mean), mr, np.float64 if dtype == np.float64 else np.float32, name="mean")
    # float16 has float32 compute: bitwise the CPU's output, whose float16 path is float32
    y_cpu = fastbn.batch_norm_forward(x, gamma, beta, axis=axis)[0]
    close(host(y), y_cpu, dtype, name="y vs cpu")
    dy = data(shape, dtype, seed=5, offset=0.0)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        dev(dy), dev(x), mean, invstd, dev(gamma), dev(beta), axis=axis
    )
    assert dx.dtype == dtype and dgamma.dtype == stats
    dxr, dgr, dbr = ref.backward(dy, x, host(mean), host(invstd), gamma, beta, axis)
    m = x.size // C
    close(host(dx), dxr, dtype, scale=4, name="dx")
    close(
        host(dbeta),
        dbr,
        np.float32 if dtype == np.float16 else dtype,
        scale=np.sqrt(m),
        name="dbeta",
    )


@needs_cuda
@pytest.mark.parametrize("shape, axis", [((6, 3, 50), 1), ((4, 5, 6, 3), -1)])
def test_relu_forward_backward(shape, axis):
    x = data(shape, np.float32)
    C = shape[axis]
    gamma, beta = params(C, np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(
        dev(x), dev(gamma), dev(beta), axis=axis, activation="relu"
    )
    close(host(y), ref.forward(x, gamma, beta, axis, activation="relu")[0], np.float32)
    assert (host(y) >= 0).all()
    dy = data(shape, np.float32, seed=5, offset=0.0)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        dev(dy), dev(x), mean, invstd, dev(gamma), dev(beta), axis=axis, activation="relu"
    )
    dxr, dgr, dbr = ref.backward(
        dy, x, host(mean), host(invstd), gamma, beta, axis, activation="relu"
    )
    m = x.size // C
    close(host(dx), dxr, np.float32, name="dx")
    close(host(dgamma), dgr, np.float32, scale=np.sqrt(m), name="dgamma")
    # the mask is recomputed with the forward's formula: where y == 0, dy is dropped
    dx_cpu, dg_cpu, db_cpu = fastbn.batch_norm_backward(
        dy, x, host(mean), host(invstd), gamma, beta, axis=axis, activation="relu"
    )
    close(host(dbeta), db_cpu, np.float32, scale=np.sqrt(m), name="dbeta vs cpu")


@needs_cuda
def test_affine_off_gives_no_parameter_gradients():
    x = data((6, 3, 50), np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(dev(x))
    close(host(y), ref.forward(x)[0], np.float32)
    dy = data(x.shape, np.float32, seed=2, offset=0.0)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dev(dy), dev(x), mean, invstd)
    assert dgamma is None and dbeta is None
    close(host(dx), ref.backward(dy, x, host(mean), host(invstd))[0], np.float32)


@needs_cuda
@pytest.mark.parametrize("shape, axis", [((4, 3, 5, 7), 1), ((37, 5), 1)])
def test_inference(shape, axis, launches):
    x = data(shape, np.float32)
    C = shape[axis]
    gamma, beta = params(C, np.float32)
    rm = np.linspace(2.0, 4.0, C).astype(np.float32)
    rv = np.linspace(1.0, 5.0, C).astype(np.float32)
    y = fastbn.batch_norm_inference(
        dev(x), dev(rm), dev(rv), dev(gamma), dev(beta), axis=axis, eps=1e-3, activation="relu"
    )
    assert len(launches) == 1
    close(
        host(y),
        ref.inference(x, rm, rv, gamma, beta, axis, eps=1e-3, activation="relu"),
        np.float32,
    )
    y2 = fastbn.batch_norm(dev(x), dev(rm), dev(rv), axis=axis, training=False)
    close(host(y2), ref.inference(x, rm, rv, axis=axis), np.float32)


@needs_cuda
def test_large_offset_keeps_float32_accuracy():
    """No E[x^2] - E[x]^2 cancellation: 1e4 + randn keeps ~1e-5 relative accuracy."""
    x = (1e4 + np.random.default_rng(3).standard_normal((6, 3, 50))).astype(np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(dev(x))
    yr, mr, ir, _ = ref.forward(x)
    close(host(y), yr, np.float32, scale=10, name="y")
    close(host(invstd), ir, np.float32, name="invstd")


@needs_cuda
def test_deterministic_and_launch_counts(launches):
    x = data((6, 3, 50), np.float32)
    dy = data((6, 3, 50), np.float32, seed=4, offset=0.0)
    xd, dyd = dev(x), dev(dy)
    y1, m1, i1 = fastbn.batch_norm_forward(xd)
    assert len(launches) == 2
    y2, m2, i2 = fastbn.batch_norm_forward(xd)
    assert np.array_equal(host(y1), host(y2)) and np.array_equal(host(m1), host(m2))
    del launches[:]
    dx1 = fastbn.batch_norm_backward(dyd, xd, m1, i1)[0]
    assert len(launches) == 2
    dx2 = fastbn.batch_norm_backward(dyd, xd, m1, i1)[0]
    assert np.array_equal(host(dx1), host(dx2))


@needs_cuda
def test_launch_configuration_has_several_blocks_and_tails():
    """The simulator run exercises multi-block and tail paths (guards the test knobs)."""
    if not CHILD:
        pytest.skip("about the simulator's knobs")
    strided = fcuda.launch_config((7, 3, 41), "<f4")
    assert strided.nblk > 1 and (7 * 41) % strided.chunk != 0 and strided.chunk % 64 != 0
    assert strided.threads == 64
    # full register batches (8 values) and a partial one per thread
    assert fcuda.launch_config((2, 9, 300), "<f4").chunk > 8 * 64
    rows = fcuda.launch_config((70, 37, 1), "<f4")
    assert rows.width == 32 and rows.grid == 2 * rows.nblk and rows.nblk > 1
    assert 70 % rows.chunk != 0


# --------------------------------------------------------------------------------------
# Layouts of inputs and outputs
# --------------------------------------------------------------------------------------


@needs_cuda
def test_out_in_place_and_other_layout(launches):
    x = data((4, 3, 5, 7), np.float32)
    gamma, beta = params(3, np.float32)
    yr = ref.forward(x, gamma, beta)[0]
    out = cuda.device_array(x.shape, np.float32)
    y, _, _ = fastbn.batch_norm_forward(dev(x), dev(gamma), dev(beta), out=out)
    assert y is out and len(launches) == 2
    close(host(out), yr, np.float32, name="out")
    xd = dev(x)
    y, _, _ = fastbn.batch_norm_forward(xd, dev(gamma), dev(beta), out=xd)  # in place
    assert y is xd
    close(host(xd), yr, np.float32, name="in place")
    # out in another memory layout: computed in a temporary, then one scatter launch
    out_f = cuda.to_device(np.asfortranarray(np.zeros(x.shape, np.float32)))
    del launches[:]
    y, _, _ = fastbn.batch_norm_forward(dev(x), dev(gamma), dev(beta), out=out_f)
    assert y is out_f and len(launches) == 3
    close(host(out_f), yr, np.float32, name="fortran out")


@needs_cuda
def test_non_contiguous_inputs(launches):
    base = data((4, 6, 5, 7), np.float32)
    # Fortran order: a permutation of a contiguous block, viewed without a copy, and the
    # result keeps that layout
    xf = np.asfortranarray(base)
    y, _, _ = fastbn.batch_norm_forward(cuda.to_device(xf))
    assert len(launches) == 2
    close(host(y), ref.forward(base)[0], np.float32, name="fortran")
    # a sliced (gappy) view: gathered once (one more launch)
    sliced = cuda.to_device(base)[:, ::2]
    del launches[:]
    y, mean, invstd = fastbn.batch_norm_forward(sliced)
    assert len(launches) == 3
    close(host(y), ref.forward(base[:, ::2])[0], np.float32, name="sliced")
    dy = data(base[:, ::2].shape, np.float32, seed=8, offset=0.0)
    dx, _, _ = fastbn.batch_norm_backward(dev(dy), sliced, mean, invstd)
    close(host(dx), ref.backward(dy, base[:, ::2], host(mean), host(invstd))[0], np.float32)


# --------------------------------------------------------------------------------------
# Running statistics and the non-finite guard
# --------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("momentum, unbiased", [(0.1, True), (None, True), (0.01, False)])
def test_running_statistics_update(momentum, unbiased):
    x = data((37, 5), np.float32)
    rm = np.linspace(-1, 1, 5).astype(np.float32)
    rv = np.linspace(1, 2, 5).astype(np.float32)
    rmd, rvd = dev(rm), dev(rv)
    y = fastbn.batch_norm(
        dev(x),
        rmd,
        rvd,
        training=True,
        momentum=momentum,
        num_batches_tracked=3,
        running_var_unbiased=unbiased,
    )
    _, mean, _, var = ref.forward(x)
    factor = 0.25 if momentum is None else momentum
    nm, nv = ref.update_running(rm, rv, mean, var, 37, factor, unbiased)
    close(host(rmd), nm, np.float32, name="running_mean")
    close(host(rvd), nv, np.float32, name="running_var")
    close(host(y), ref.forward(x)[0], np.float32, name="y")


@needs_cuda
def test_nonfinite_batch_leaves_running_statistics_and_is_reported(monkeypatch):
    fcuda.nonfinite_count()  # start from zero
    x = data((37, 5), np.float32)
    x[3, 2] = np.nan
    rm = np.zeros(5, np.float32)
    rv = np.ones(5, np.float32)
    rmd, rvd = dev(rm), dev(rv)
    fastbn.batch_norm(dev(x), rmd, rvd, training=True)  # deferred report: no raise here
    assert np.array_equal(host(rmd), rm) and np.array_equal(host(rvd), rv)  # all channels
    with pytest.raises(FloatingPointError, match="not finite in 1 GPU training call"):
        fcuda.check_nonfinite()
    fcuda.check_nonfinite()  # reset by the previous check
    fastbn.batch_norm(dev(x), rmd, rvd, training=True, on_nonfinite="warn")
    with pytest.warns(RuntimeWarning, match="not finite"):
        fcuda.check_nonfinite()
    # synchronous mode: raises in the call itself
    monkeypatch.setattr(fcuda._config, "CUDA_SYNC_NONFINITE", True)
    with pytest.raises(FloatingPointError):
        fastbn.batch_norm(dev(x), rmd, rvd, training=True)
    assert np.array_equal(host(rmd), rm)
    # finite batches still update
    fastbn.batch_norm(dev(np.nan_to_num(x)), rmd, rvd, training=True)
    assert not np.array_equal(host(rmd), rm)
    assert fcuda.nonfinite_count() == 0


# --------------------------------------------------------------------------------------
# The layer on the device
# --------------------------------------------------------------------------------------


@needs_cuda
def test_layer_on_device_matches_cpu_layer():
    x = data((6, 3, 50), np.float32)
    dy = data((6, 3, 50), np.float32, seed=9, offset=0.0)
    cpu_layer = fastbn.BatchNorm(3, activation="relu")
    gpu_layer = fastbn.BatchNorm(3, activation="relu").to("cuda")
    assert fastbn.api.is_cuda_array(gpu_layer.gamma)
    cpu_layer.gamma[:], cpu_layer.beta[:] = params(3, np.float32)
    fcuda.copy_into(gpu_layer.gamma, cpu_layer.gamma)  # from the host
    fcuda.copy_into(gpu_layer.beta, dev(cpu_layer.beta.astype(np.float64)))  # device, cast
    y_cpu = cpu_layer.forward(x, training=True)
    y_gpu = gpu_layer.forward(dev(x), training=True)
    close(host(y_gpu), y_cpu, np.float32, name="y")
    dx_cpu = cpu_layer.backward(dy)
    dx_gpu = gpu_layer.backward(dev(dy))
    close(host(dx_gpu), dx_cpu, np.float32, name="dx")
    close(host(gpu_layer.dgamma), cpu_layer.dgamma, np.float32, scale=20, name="dgamma")
    close(host(gpu_layer.dbeta), cpu_layer.dbeta, np.float32, scale=20, name="dbeta")
    assert gpu_layer.num_batches_tracked == 1
    state = gpu_layer.state_dict()
    assert isinstance(state["running_mean"], np.ndarray)
    for k, v in cpu_layer.state_dict().items():
        close(state[k], v, np.float32, name=k)
    y_eval = gpu_layer.eval().forward(dev(x))
    close(host(y_eval), cpu_layer.eval().forward(x), np.float32, name="eval")
    fresh = fastbn.BatchNorm(3).to("cuda")
    fresh.load_state_dict(cpu_layer.state_dict())
    close(host(fresh.running_var), cpu_layer.running_var, np.float32)
    gpu_layer.to("cpu")
    assert isinstance(gpu_layer.gamma, np.ndarray)


@needs_cuda
def test_layer_state_on_host_with_device_input_is_a_clear_error():
    layer = fastbn.BatchNorm(3)
    with pytest.raises(TypeError, match=r"layer.to\('cuda'\)"):
        layer.forward(dev(data((6, 3, 5), np.float32)), training=True)
    assert layer.num_batches_tracked == 0


# --------------------------------------------------------------------------------------
# Errors: raised before any launch, nothing written
# --------------------------------------------------------------------------------------


@needs_cuda
def test_bad_inputs_raise_before_any_launch(launches):
    x = dev(data((6, 3, 5), np.float32))
    g = dev(np.ones(3, np.float32))
    rm, rv = dev(np.zeros(3, np.float32)), dev(np.ones(3, np.float32))
    out = dev(np.full((6, 3, 5), 7.0, np.float32))
    bad = [
        (TypeError, lambda: fastbn.batch_norm_forward(dev(np.ones((6, 3), np.int32)))),
        (ValueError, lambda: fastbn.batch_norm_forward(dev(np.ones(6, np.float32)))),
        (ValueError, lambda: fastbn.batch_norm_forward(x, axis=3)),
        (ValueError, lambda: fastbn.batch_norm_forward(x, dev(np.ones(4, np.float32)))),
        (ValueError, lambda: fastbn.batch_norm_forward(x, eps=0.0)),
        (ValueError, lambda: fastbn.batch_norm_forward(dev(np.ones((1, 3), np.float32)))),
        (ValueError, lambda: fastbn.batch_norm_forward(x, out=dev(np.ones((6, 3), np.float32)))),
        (ValueError, lambda: fastbn.batch_norm_forward(x, out=dev(np.ones((6, 3, 5))))),
        (ValueError, lambda: fastbn.batch_norm_forward(x, g, activation="gelu", out=out)),
        (ValueError, lambda: fastbn.batch_norm(x, rm, rv, training=True, momentum=1.5, out=out)),
        (ValueError, lambda: fastbn.batch_norm(x, rm, rv, training=True, momentum=None)),
        (ValueError, lambda: fastbn.batch_norm(x, rm, None, training=True, out=out)),
        (ValueError, lambda: fastbn.batch_norm(x, rm, rv, training=True, on_nonfinite="x")),
        (ValueError, lambda: fastbn.batch_norm(x, training=False)),
        (
            ValueError,
            lambda: fastbn.batch_norm_backward(dev(np.ones((6, 3), np.float32)), x, rm, rv),
        ),
        (TypeError, lambda: fastbn.batch_norm_backward(x, x, None, rv)),
        (TypeError, lambda: fastbn.batch_norm_forward(x, stream="default")),
    ]
    for error, call in bad:
        with pytest.raises(error):
            call()
    assert launches == []
    assert (host(out) == 7.0).all()
    assert (host(rm) == 0.0).all() and (host(rv) == 1.0).all()


@needs_cuda
def test_mixed_host_and_device_arguments_raise_type_error(launches):
    x = data((6, 3, 5), np.float32)
    with pytest.raises(TypeError, match="host"):
        fastbn.batch_norm_forward(dev(x), np.ones(3, np.float32))
    with pytest.raises(TypeError, match="host"):
        fastbn.batch_norm_forward(x, dev(np.ones(3, np.float32)))
    with pytest.raises(TypeError, match="host"):
        fastbn.batch_norm(
            dev(x), np.zeros(3, np.float32), dev(np.ones(3, np.float32)), training=True
        )
    with pytest.raises(ValueError, match="stream"):
        fastbn.batch_norm_forward(x, stream=cuda.default_stream())
    assert launches == []


# --------------------------------------------------------------------------------------
# Streams and foreign array kinds
# --------------------------------------------------------------------------------------


@needs_cuda
def test_explicit_stream():
    stream = cuda.stream()
    x = data((37, 5), np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(dev(x), stream=stream)
    stream.synchronize()
    close(host(y), ref.forward(x)[0], np.float32)


class ForeignArray:
    """Another library's device array: nothing but ``__cuda_array_interface__``."""

    def __init__(self, dev_array):
        self._dev = dev_array
        self.__cuda_array_interface__ = dev_array.__cuda_array_interface__


@needs_cuda
def test_any_cuda_array_interface_is_accepted():
    x = data((37, 5), np.float32)
    xd = dev(x)
    y, mean, invstd = fastbn.batch_norm_forward(ForeignArray(xd))
    close(host(y), ref.forward(x)[0], np.float32)


@needs_cuda
def test_empty_channels_launch_nothing(launches):
    x = dev(np.zeros((4, 0, 3), np.float32))
    y, mean, invstd = fastbn.batch_norm_forward(x)
    assert y.shape == (4, 0, 3) and mean.shape == (0,)
    assert launches == []


# --------------------------------------------------------------------------------------
# The fused residual add: residual=z, y = act(bn(x) + z)
# --------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize(
    "shape, axis, dtype",
    [
        ((7, 3, 41), 1, np.float32),  # strided, 2 blocks per channel, tail
        ((4, 5, 6, 3), -1, np.float32),  # NHWC: rows
        ((70, 37), 1, np.float64),  # two rows tiles
        ((6, 3, 50), 1, np.float16),
    ],
)
def test_residual_forward_backward(shape, axis, dtype):
    x = data(shape, dtype)
    z = np.asfortranarray(data(shape, dtype, seed=7, offset=0.0))  # another layout than x
    C = shape[axis]
    gamma, beta = params(C, dtype)
    y, mean, invstd = fastbn.batch_norm_forward(
        dev(x), dev(gamma), dev(beta), axis=axis, residual=cuda.to_device(z), activation="relu"
    )
    yr, _, _ = ref.residual_forward(x, z, gamma, beta, axis, activation="relu")
    scale = 4 if dtype == np.float16 else 1  # float16 y: rounded from float32 (+ z rounding)
    close(host(y), yr, dtype, scale=scale, name="y")
    dy = data(shape, dtype, seed=5, offset=0.0)
    dx, dgamma, dbeta, dz = fastbn.batch_norm_backward(
        dev(dy), dev(x), mean, invstd, dev(gamma), dev(beta), axis=axis, activation="relu",
        residual=dev(z), residual_grad=True,
    )  # fmt: skip
    dxr, dgr, dbr, dzr = ref.residual_backward(
        dy, x, z, host(mean), host(invstd), gamma, beta, axis, activation="relu"
    )
    m = x.size // C
    stats = np.float32 if dtype == np.float16 else dtype
    close(host(dz), dzr, dtype, name="dz")
    close(host(dx), dxr, dtype, scale=scale, name="dx")
    close(host(dgamma), dgr, stats, scale=np.sqrt(m), name="dgamma")
    close(host(dbeta), dbr, stats, scale=np.sqrt(m), name="dbeta")
    # the backward's mask is the forward's, bit for bit
    assert np.array_equal(host(dz), np.where(host(y) > 0, dy, 0))
    # the GPU agrees with the CPU
    y_cpu = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, residual=z, activation="relu")[0]
    close(host(y), y_cpu, dtype, scale=scale, name="y vs cpu")


@needs_cuda
def test_residual_inference_in_place_layer_and_errors(launches):
    x = data((4, 3, 5, 7), np.float32)
    z = data(x.shape, np.float32, seed=9, offset=0.0)
    rm, rv = (
        np.linspace(2.0, 4.0, 3).astype(np.float32),
        np.linspace(1.0, 5.0, 3).astype(np.float32),
    )
    zd = dev(z)
    y = fastbn.batch_norm_inference(dev(x), dev(rm), dev(rv), out=zd, residual=zd)
    assert y is zd and len(launches) == 1  # one pass: x and z read, y written
    close(host(zd), ref.residual_inference(x, z, rm, rv), np.float32, name="inference")
    bn = fastbn.BatchNorm(3, activation="relu").to("cuda")
    y = bn.forward(dev(x), training=True, residual=dev(z))
    close(host(y), ref.residual_forward(x, z, activation="relu")[0], np.float32, name="layer")
    dy = data(x.shape, np.float32, seed=2, offset=0.0)
    bn.backward(dev(dy))
    y_h = host(y)
    close(host(bn.dresidual), np.where(y_h > 0, dy, 0), np.float32, name="dresidual")
    with pytest.raises(TypeError, match="residual"):
        fastbn.batch_norm_forward(dev(x), residual=z)  # a host z for a device x
    with pytest.raises(TypeError, match="residual"):
        bn.forward(dev(x), training=True, residual=z)
    out = dev(np.full(x.shape, 7.0, np.float32))
    with pytest.raises(ValueError, match="residual must have the shape"):
        fastbn.batch_norm_forward(dev(x), out=out, residual=dev(z[:, :2]))
    assert (host(out) == 7.0).all()


# --------------------------------------------------------------------------------------
# The backward through fixed statistics (training=False)
# --------------------------------------------------------------------------------------


def _frozen_case(shape, axis, dtype, seed=21):
    rng = np.random.default_rng(seed)
    C = shape[axis]
    x = data(shape, dtype, seed=seed)
    dy = data(shape, dtype, seed=seed + 1, offset=0.0)
    mean = (3.0 + rng.standard_normal(C)).astype(np.float32)
    invstd = (1.0 / np.sqrt(4.0 * rng.uniform(0.5, 1.5, C) + 1e-5)).astype(np.float32)
    gamma, beta = params(C, dtype)
    return x, dy, mean, invstd, gamma, beta


@needs_cuda
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_frozen_backward_layouts(shape, axis, activation):
    """Against the float64 reference, and bitwise the CPU's dx (the same float32 product
    ``scale * dy``)."""
    x, dy, mean, invstd, gamma, beta = _frozen_case(shape, axis, np.float32)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        dev(dy),
        dev(x),
        dev(mean),
        dev(invstd),
        dev(gamma),
        dev(beta),
        axis=axis,
        activation=activation,
        training=False,
    )
    assert dgamma.dtype == np.float32 and dx.dtype == np.float32
    e_dx, e_dgamma, e_dbeta = ref.frozen_backward(
        dy, x, mean, invstd, gamma, beta, axis, activation
    )
    m = x.size // shape[axis]
    close(host(dx), e_dx, np.float32, name="dx")
    close(host(dgamma), e_dgamma, np.float32, scale=np.sqrt(m), name="dgamma")
    close(host(dbeta), e_dbeta, np.float32, scale=np.sqrt(m), name="dbeta")
    cpu_dx = fastbn.batch_norm_backward(
        dy, x, mean, invstd, gamma, beta, axis=axis, activation=activation, training=False
    )[0]
    assert np.array_equal(host(dx), cpu_dx)


@needs_cuda
@pytest.mark.parametrize("dtype", [np.float64, np.float16])
@pytest.mark.parametrize("shape, axis", [((6, 3, 50), 1), ((37, 5), 1)])
def test_frozen_backward_dtypes_out_and_contract(dtype, shape, axis):
    x, dy, mean, invstd, gamma, beta = _frozen_case(shape, axis, dtype)
    stats = np.float64 if dtype == np.float64 else np.float32
    out = cuda.device_array(shape, dtype)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        dev(dy), dev(x), dev(mean), dev(invstd), dev(gamma), None, axis=axis, out=out,
        training=False,
    )  # fmt: skip
    assert dx is out and dx.dtype == dtype and dgamma.dtype == stats and dbeta.dtype == stats
    e = ref.frozen_backward(dy, x, mean, invstd, gamma, None, axis)
    m = x.size // shape[axis]
    close(host(dx), e[0], dtype, scale=4, name="dx")
    close(host(dgamma), e[1], stats, scale=np.sqrt(m), name="dgamma")
    # out=dy, and no parameter: no dgamma, no dbeta
    d_dy = dev(dy)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        d_dy, dev(x), dev(mean), dev(invstd), axis=axis, out=d_dy, training=False
    )
    assert dx is d_dy and dgamma is None and dbeta is None
    close(host(dx), ref.frozen_backward(dy, x, mean, invstd, None, None, axis)[0], dtype, 4)


@needs_cuda
def test_frozen_backward_launches(launches):
    """Two launches with parameter gradients, one without."""
    x, dy, mean, invstd, gamma, beta = _frozen_case((6, 3, 50), 1, np.float32)
    args = [dev(a) for a in (dy, x, mean, invstd)]
    fastbn.batch_norm_backward(*args, training=False)
    assert len(launches) == 1
    fastbn.batch_norm_backward(*args, dev(gamma), dev(beta), training=False)
    assert len(launches) == 3


@needs_cuda
def test_layer_backward_after_eval_forward_on_the_gpu():
    rng = np.random.default_rng(22)
    x = data((8, 3, 20), np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    cpu_layer = fastbn.BatchNorm(3, activation="relu")
    cpu_layer.forward(x, training=True)
    cpu_layer.gamma[:] = [1.5, -0.5, 2.0]
    gpu_layer = fastbn.BatchNorm(3, activation="relu")
    gpu_layer.load_state_dict(cpu_layer.state_dict())
    gpu_layer.to("cuda")
    y_cpu = cpu_layer.forward(x, training=False)
    dx_cpu = cpu_layer.backward(dy)
    gpu_layer.frozen = True
    y_gpu = gpu_layer.forward(dev(x), training=True)
    dx_gpu = gpu_layer.backward(dev(dy))
    assert np.array_equal(host(y_gpu), y_cpu)
    assert np.array_equal(host(dx_gpu), dx_cpu)
    close(host(gpu_layer.dgamma), cpu_layer.dgamma, np.float32, scale=10, name="dgamma")
    close(host(gpu_layer.dbeta), cpu_layer.dbeta, np.float32, scale=10, name="dbeta")
    assert np.array_equal(host(gpu_layer.running_mean), cpu_layer.running_mean)
    assert gpu_layer.num_batches_tracked == 1


# --------------------------------------------------------------------------------------
# Masked statistics (mask=)
# --------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("shape, axis", [((7, 3, 41), 1), ((4, 5, 6, 3), -1), ((70, 37), 1)])
def test_masked_forward_backward(shape, axis, dtype):
    """The masked kernels against the float64 reference and the CPU: strided and rows
    families, several blocks per channel, chunks with no True position."""
    x = data(shape, dtype, seed=21)
    dy = data(shape, dtype, seed=22, offset=0.0)
    ax = axis % len(shape)
    C = shape[ax]
    gamma, beta = params(C, dtype)
    rng = np.random.default_rng(23)
    mask = rng.random(shape[:ax] + shape[ax + 1 :]) < 0.5
    mask[: max(1, shape[0] // 3)] = False  # whole chunks without a True position
    mask.reshape(-1)[-2:] = True
    for activation in (None, "relu"):
        y, mean, invstd = fastbn.batch_norm_forward(
            dev(x), dev(gamma), dev(beta), axis=axis, mask=dev(mask), activation=activation
        )
        dx, dgamma, dbeta = fastbn.batch_norm_backward(
            dev(dy),
            dev(x),
            mean,
            invstd,
            dev(gamma),
            dev(beta),
            axis=axis,
            mask=dev(mask),
            activation=activation,
        )
        y_ref, mean_ref, invstd_ref = ref.masked_forward(
            x, mask, gamma, beta, axis, activation=activation
        )[:3]
        close(host(y), y_ref, dtype, name="y")
        close(host(mean), mean_ref, np.float64 if dtype == np.float64 else np.float32)
        close(host(invstd), invstd_ref, np.float64 if dtype == np.float64 else np.float32)
        dx_ref, dgamma_ref, dbeta_ref = ref.masked_backward(
            dy, x, mask, host(mean), host(invstd), gamma, beta, axis, activation
        )
        close(host(dx), dx_ref, dtype, name="dx")
        scale = np.sqrt(x.size // C)
        sdt = np.float64 if dtype == np.float64 else np.float32
        close(host(dgamma), dgamma_ref, sdt, scale, name="dgamma")
        close(host(dbeta), dbeta_ref, sdt, scale, name="dbeta")
        if dtype != np.float16:  # the CPU path gives the same statistics
            _, mean_cpu, _ = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, mask=mask)
            close(host(mean), mean_cpu, dtype, name="mean vs CPU")


@needs_cuda
def test_masked_running_statistics_and_layer():
    x = data((9, 3, 5), np.float32, seed=24)
    dy = data((9, 3, 5), np.float32, seed=25, offset=0.0)
    mask = np.random.default_rng(26).random((9, 5)) < 0.6
    mask[0, :2] = True
    rm, rv = dev(np.zeros(3, np.float32)), dev(np.ones(3, np.float32))
    fastbn.batch_norm(dev(x), rm, rv, training=True, mask=dev(mask), momentum=0.5)
    _, mean, _, var, m = ref.masked_forward(x, mask)
    rm_ref, rv_ref = ref.update_running(np.zeros(3), np.ones(3), mean, var, m, 0.5)
    close(host(rm), rm_ref, np.float32)
    close(host(rv), rv_ref, np.float32)
    layer = fastbn.BatchNorm(3).to("cuda")
    layer.forward(dev(x), training=True, mask=dev(mask))
    dx = layer.backward(dev(dy))
    cpu_layer = fastbn.BatchNorm(3)
    cpu_layer.forward(x, training=True, mask=mask)
    close(host(dx), cpu_layer.backward(dy), np.float32, name="layer dx")
    with pytest.raises(TypeError, match="all be CUDA arrays or all host arrays"):
        fastbn.batch_norm_forward(dev(x), mask=mask)
