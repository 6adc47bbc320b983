"""Test helpers: per-dtype tolerances and a NaN-aware assert that shows the mismatches."""

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

# Tolerances of fastbn against the float64 reference, per input dtype.
TOL = {
    # float64 kernels accumulate in float64 around a shift in the data: errors are a few
    # ulps times log(m); 1e-10 leaves room for m ~ 1e6 without hiding real bugs.
    np.dtype(np.float64): dict(rtol=1e-10, atol=1e-10),
    # float32 outputs carry one rounding of a float32 value (6e-8 relative) on top of
    # float64 statistics: 1e-5 is the accuracy the design promises.
    np.dtype(np.float32): dict(rtol=1e-5, atol=1e-5),
    # float16 outputs are rounded to 11 bits (4.9e-4 relative) and the inputs themselves
    # are float16: two roundings of values up to ~4 gives ~4e-3 absolute.
    np.dtype(np.float16): dict(rtol=2e-3, atol=5e-3),
}


def tol(dtype, scale=1.0):
    """Tolerance dict for ``dtype``, widened by ``scale`` (for sums over many values)."""
    t = TOL[np.dtype(dtype)]
    return dict(rtol=t["rtol"] * scale, atol=t["atol"] * scale)


def assert_close(actual, expected, rtol, atol, name="result"):
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise, NaN equal to NaN.

    On failure, the message lists the first mismatching indices with both values.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    both_nan = np.isnan(actual) & np.isnan(expected)
    bad = ~(np.abs(actual - expected) <= atol + rtol * np.abs(expected)) & ~both_nan
    if bad.any():
        idx = np.argwhere(bad)[:8]
        rows = "\n".join(
            f"  {tuple(int(i) for i in ix)}: got {actual[tuple(ix)]!r}, "
            f"expected {expected[tuple(ix)]!r}"
            for ix in idx
        )
        err = np.nanmax(np.abs(actual - expected))
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.size} values differ "
            f"(rtol={rtol}, atol={atol}, max abs err {err:.3g}); first:\n{rows}"
        )


ROOT = Path(__file__).resolve().parents[1]


def child_env(**overrides):
    """The environment of a child Python: this one, with the repository on PYTHONPATH
    (fastbn need not be installed) and ``overrides`` applied (None removes a name)."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def run_bounded(command, env, timeout, what):
    """Run ``command`` in its own process group; return ``(returncode, stdout, stderr)``.

    On timeout the whole group (an mpiexec and its ranks, or a forked child) is killed and
    the test fails with the output: a hang fails, it never blocks the suite.
    """
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(
            f"{what} did not finish in {timeout} s (a hang?)\n"
            f"stdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
        )
    return proc.returncode, out, err


def find_mpiexec():
    """``mpiexec`` on PATH, or the one the ``mpich`` wheel installs next to Python."""
    found = shutil.which("mpiexec")
    if found:
        return found
    candidate = Path(sysconfig.get_path("scripts")) / "mpiexec"
    return str(candidate) if candidate.exists() else None


def run_mpi(script, ranks, *args, timeout=300, extra_env=None):
    """Run ``script`` under ``mpiexec -n ranks``; return rank 0's ``RESULT`` JSON.

    One Numba thread per rank (the ranks already share the cores). ``ranks=None`` runs
    the script as one plain process (no mpiexec). A hang or a failure fails the test with
    the output.
    """
    env = child_env(NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", **(extra_env or {}))
    launcher = [] if ranks is None else [find_mpiexec(), "-n", str(ranks)]
    what = f"mpiexec -n {ranks} {Path(script).name}"
    code, out, err = run_bounded(
        [*launcher, sys.executable, str(script), *args], env, timeout, what
    )
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if code != 0 or not lines:
        pytest.fail(f"{what} failed (exit {code})\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])
