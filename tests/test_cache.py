"""The JIT cache never breaks ``import fastbn``: the fallback when no location is writable."""

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numba
import pytest
from numba.core import caching

from fastbn import _config

ROOT = Path(__file__).resolve().parents[1]


def _add_one(v):
    return v + 1


def _twice(v):
    return 2 * v


@pytest.fixture
def no_numba_location(monkeypatch, tmp_path):
    """Numba finds no writable cache location for any file, as for a read-only install
    used by an account without a home; only a ``NUMBA_CACHE_DIR`` would work. The
    temporary directory is ``tmp_path``."""
    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [caching.UserProvidedCacheLocator])
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.setitem(_config._fallback, "dir", "unset")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_numba_alone_would_fail(no_numba_location):
    with pytest.raises(RuntimeError, match="no locator available"):
        numba.njit(cache=True)(_add_one)


def test_private_cache_directory_with_one_warning(no_numba_location):
    with pytest.warns(RuntimeWarning, match="no writable JIT cache location") as record:
        add_one = _config.njit(cache=True)(_add_one)
    assert len(record) == 1 and "fastbn-jit-cache-" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        twice = _config.njit(cache=True)(_twice)  # no second warning
    assert add_one(41) == 42 and twice(21) == 42
    private = no_numba_location / f"fastbn-jit-cache-{os.getuid()}"
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o700
    assert add_one._cache._cache_path.startswith(str(private))
    assert any(private.rglob("*.nbi"))  # really cached there
    assert type(add_one._cache._cache_file).__name__ == "_LockedCacheFile"
    assert numba.config.CACHE_DIR == ""  # nothing else redirected


def test_no_cache_at_all_still_computes(no_numba_location, monkeypatch):
    monkeypatch.setattr(_config, "_private_cache_dir", lambda: None)
    with pytest.warns(RuntimeWarning, match="compiling without a cache"):
        add_one = _config.njit(cache=True)(_add_one)
    assert add_one(1) == 2
    assert type(add_one._cache).__name__ == "NullCache"


def test_an_unsafe_private_directory_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = tmp_path / f"fastbn-jit-cache-{os.getuid()}"
    path.mkdir(mode=0o777)
    os.chmod(path, 0o777)  # writable by anyone: someone else's code
    assert _config._private_cache_dir() is None
    os.chmod(path, 0o700)
    assert _config._private_cache_dir() == str(path)
    path.rmdir()
    path.symlink_to(tmp_path)  # not a real directory
    assert _config._private_cache_dir() is None


def test_other_errors_are_not_hidden(monkeypatch):
    def boom(**options):
        def decorate(fn):
            raise RuntimeError("something else")

        return decorate

    monkeypatch.setattr(numba, "njit", boom)
    with pytest.raises(RuntimeError, match="something else"):
        _config.njit(cache=True)(_add_one)


# --------------------------------------------------------------------------------------
# For real: a read-only copy of fastbn, used by `nobody` with HOME=/nonexistent
# --------------------------------------------------------------------------------------

SCRIPT = """
import numpy as np, fastbn
x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
g, b = np.ones(8, np.float32), np.zeros(8, np.float32)
y, mean, invstd = fastbn.batch_norm_forward(x, g, b)
dx, dg, db = fastbn.batch_norm_backward(np.ones_like(y), x, mean, invstd, g, b)
assert abs(float(y.mean())) < 1e-5 and dx.shape == x.shape
print("forward and backward ok")
"""


def _as_nobody():
    """The command prefix that runs as ``nobody``, or a reason why it cannot be done."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None, "needs root to switch to the nobody account"
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return None, "no nobody account"
    runner = shutil.which("runuser") or shutil.which("setpriv")
    if runner is None:
        return None, "neither runuser nor setpriv"
    if os.path.basename(runner) == "runuser":
        prefix = [runner, "-u", "nobody", "--"]
    else:
        prefix = [runner, "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", "import numba, numpy"],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=120,
    )
    if probe.returncode != 0:
        return None, (
            "this Python or its site-packages cannot be read by nobody "
            f"({probe.stderr.strip().splitlines()[-1:]})"
        )
    return prefix, None


@pytest.mark.slow
def test_read_only_install_used_by_nobody_without_home():
    prefix, why = _as_nobody()
    if prefix is None:
        pytest.skip(why)
    site = tempfile.mkdtemp(prefix="fastbn-ro-site-")
    scratch = tempfile.mkdtemp(prefix="fastbn-nobody-tmp-")
    try:
        shutil.copytree(
            ROOT / "fastbn",
            os.path.join(site, "fastbn"),
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        for directory, _, files in os.walk(site):  # read-only, readable by all
            os.chmod(directory, 0o555)
            for name in files:
                os.chmod(os.path.join(directory, name), 0o444)
        os.chmod(scratch, 0o777)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": "/nonexistent",
            "PYTHONPATH": site,
            "TMPDIR": scratch,
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        result = subprocess.run(
            [*prefix, "env", *[f"{k}={v}" for k, v in env.items()], sys.executable, "-c", SCRIPT],
            capture_output=True,
            text=True,
            cwd="/",
            timeout=600,
            env={},
        )
        assert result.returncode == 0, result.stderr
        assert "forward and backward ok" in result.stdout
        assert result.stderr.count("no writable JIT cache location") == 1, result.stderr
        uid = pwd.getpwnam("nobody").pw_uid
        assert os.path.isdir(os.path.join(scratch, f"fastbn-jit-cache-{uid}"))
    finally:
        for directory, _, _ in os.walk(site):
            os.chmod(directory, 0o755)
        shutil.rmtree(site, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
