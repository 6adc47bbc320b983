"""Processes and threads: the threading layer fastbn selects, and fork safety.

Users call fastbn from data loaders and process pools, which fork (``multiprocessing``'s
default start method on Linux up to Python 3.13). With GNU OpenMP as Numba's threading
layer, a child forked after its parent ran a parallel kernel dies ("fork() called from a
process already using GNU OpenMP, this is unsafe") and a fork ``Pool`` hangs; with TBB,
which fastbn loads from the ``tbb`` wheel (``fastbn._config.TBB_LIBRARY``), both work.

Every check runs in a fresh interpreter (the threading layer is chosen once per process),
under a timeout that kills its whole process group, so a hang fails instead of blocking.
"""

import importlib.metadata
import json
import os
import sys
import textwrap
from pathlib import Path

import helpers
import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds per interpreter; Numba's cache makes a run take a few seconds

try:
    importlib.metadata.version("tbb")
    HAVE_TBB_WHEEL = True
except importlib.metadata.PackageNotFoundError:
    HAVE_TBB_WHEEL = False

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")

# A batch above _config.SERIAL_BYTES (256 KiB), so that the parallel builds run: 512 KiB.
PRELUDE = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import numba
    import fastbn
    from fastbn import _config

    assert 512 * 256 * 4 > _config.SERIAL_BYTES
    x = np.random.default_rng(0).standard_normal((512, 256)).astype(np.float32)

    def run(_=None):
        y, mean, invstd = fastbn.batch_norm_forward(x)
        dx = fastbn.batch_norm_backward(y, x, mean, invstd)[0]
        return y.tobytes() + dx.tobytes()

    expected = run()  # the parent's parallel kernels: Numba's threads are running
""")

FORKED_CHILD = PRELUDE + textwrap.dedent("""
    import time
    pid = os.fork()
    if pid == 0:
        os._exit(0 if run() == expected else 3)
    deadline = time.monotonic() + float(sys.argv[1])
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            status = None
            break
        time.sleep(0.05)
    print(json.dumps({"layer": numba.threading_layer(),
                      "child": None if status is None else os.waitstatus_to_exitcode(status)}))
""")

FORK_POOL = PRELUDE + textwrap.dedent("""
    import multiprocessing
    with multiprocessing.get_context("fork").Pool(2) as pool:
        try:
            results = pool.map_async(run, range(4)).get(timeout=float(sys.argv[1]))
            outcome = "same" if all(r == expected for r in results) else "different"
        except multiprocessing.TimeoutError:
            outcome = "timeout"
        pool.terminate()
    print(json.dumps({"layer": numba.threading_layer(), "pool": outcome}))
""")

LAYER = PRELUDE + textwrap.dedent("""
    print(json.dumps({"layer": numba.threading_layer(),
                      "tbb": getattr(_config, "TBB_LIBRARY", None)}))
""")


def run_python(code, *args, layer=None):
    """Run ``code`` in a fresh interpreter with two Numba threads; return its JSON line.

    ``layer`` sets ``NUMBA_THREADING_LAYER`` (None: unset, fastbn chooses).
    """
    env = helpers.child_env(NUMBA_NUM_THREADS="2", NUMBA_THREADING_LAYER=layer)
    code_, out, err = helpers.run_bounded(
        [sys.executable, "-c", code, *map(str, args)], env, TIMEOUT, "the child interpreter"
    )
    assert code_ == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not HAVE_TBB_WHEEL, reason="the tbb wheel is not installed")
@pytest.mark.skipif(sys.platform not in ("linux", "darwin"), reason="loaded by Numba itself")
def test_the_threading_layer_is_tbb_when_the_wheel_is_present():
    result = run_python(LAYER)
    assert result["layer"] == "tbb"
    assert os.path.basename(result["tbb"]).startswith("libtbb")


def test_a_threading_layer_set_by_the_user_wins():
    result = run_python(LAYER, layer="workqueue")
    assert result == {"layer": "workqueue", "tbb": None}


@pytest.mark.skipif(not HAVE_TBB_WHEEL, reason="the tbb wheel is not installed")
@pytest.mark.skipif(sys.platform not in ("linux", "darwin"), reason="loaded by Numba itself")
def test_a_user_asking_for_tbb_gets_the_wheels_library():
    """NUMBA_THREADING_LAYER=tbb alone failed ("No threading layer could be loaded"):
    the wheel's library is not on the loader's path. fastbn loads it for that choice too."""
    result = run_python(LAYER, layer="tbb")
    assert result["layer"] == "tbb"
    assert result["tbb"] is not None


@needs_fork
def test_a_forked_child_runs_a_parallel_kernel():
    """The parent runs the parallel kernels, forks; the child runs them again and gets
    the parent's bits (it died with GNU OpenMP)."""
    result = run_python(FORKED_CHILD, 120)
    assert result["child"] == 0, f"child exit status {result['child']} ({result['layer']} layer)"


@needs_fork
def test_a_fork_pool_maps_a_parallel_kernel():
    """A ``multiprocessing`` fork-context Pool maps the parallel kernels after the parent
    ran them (it hung with GNU OpenMP)."""
    result = run_python(FORK_POOL, 120)
    assert result["pool"] == "same", result


@needs_fork
def test_gnu_openmp_is_what_breaks_a_forked_child():
    """The caveat of the fallback, documented in docs/api.md: with GNU OpenMP chosen (the
    layer fastbn falls back on without TBB), the forked child does not succeed. Guards
    the two tests above against passing for a reason other than the layer."""
    try:
        result = run_python(FORKED_CHILD, 20, layer="omp")
    except AssertionError as exc:  # no OpenMP layer in this Numba build
        pytest.skip(f"the omp layer does not load here: {exc}")
    from numba.np.ufunc import omppool

    if omppool.openmp_vendor != "GNU":
        pytest.skip(f"OpenMP from {omppool.openmp_vendor}, not GNU")
    assert result["layer"] == "omp"
    assert result["child"] != 0
