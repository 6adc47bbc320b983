"""House-style checks read from the package's source (nothing is compiled).

Like stumpy's CI check on ``fastmath``: JIT options live in one place,
:mod:`fastbn._config`. Every CPU kernel is compiled by :func:`fastbn._config.njit` (which
locks the on-disk cache between processes) and no module hard-codes ``fastmath=``.
"""

import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fastbn"
CONFIG = PACKAGE / "_config.py"

# A compiler entry point that bypasses fastbn._config.njit.
BARE_JIT = re.compile(
    r"\bnumba\.n?jit\b|^\s*from numba import [^\n]*\bn?jit\b|^\s*@jit\b", re.MULTILINE
)
FASTMATH = re.compile(r"\bfastmath\s*=")


def _sources():
    return sorted(p for p in PACKAGE.rglob("*.py") if p != CONFIG)


def _where(pattern, path):
    text = path.read_text()
    return [
        f"{path.relative_to(PACKAGE.parent)}:{text.count(chr(10), 0, m.start()) + 1}: "
        f"{text[m.start() : text.find(chr(10), m.start())].strip()}"
        for m in pattern.finditer(text)
    ]


def test_package_sources_are_found():
    names = {p.name for p in _sources()}
    assert {"cpu.py", "_cuda_kernels.py", "_ops.py"} <= names


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_kernels_compile_through_config_njit(path):
    """No ``numba.njit`` / ``numba.jit`` / ``from numba import njit`` / bare ``@jit``."""
    found = _where(BARE_JIT, path)
    assert not found, (
        "compile CPU kernels with `from fastbn._config import njit` "
        "(options from _config):\n" + "\n".join(found)
    )


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_fastmath_outside_config(path):
    """``fastmath=`` appears only in fastbn/_config.py."""
    found = _where(FASTMATH, path)
    assert not found, "take fastmath options from fastbn._config:\n" + "\n".join(found)


def test_patterns_catch_what_they_should():
    bad = [
        "@numba.njit(cache=True)\ndef f(): pass\n",
        "from numba import njit\n",
        "from numba import prange, njit\n",
        "@jit\ndef f(): pass\n",
        "k = numba.jit(nopython=True)(f)\n",
    ]
    good = [
        "from ._config import njit\n@njit(**_JIT)\ndef f(): pass\n",
        "from numba import cuda, prange\n",
        "@cuda.jit(**_DEVICE)\ndef f(): pass\n",
    ]
    assert all(BARE_JIT.search(s) for s in bad)
    assert not any(BARE_JIT.search(s) for s in good)
    assert FASTMATH.search("dict(JIT, fastmath=False)")
    assert not FASTMATH.search("FASTMATH = {...}")
