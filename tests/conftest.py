"""Shared fixtures."""

import pytest


@pytest.fixture(params=["planned", "fused"])
def kernel_path(request, monkeypatch):
    """Run a test twice: on the kernels each shape's plan picks, then with the per-channel
    fused kernels for every strided shape.

    The plan fuses only channels of long runs whose arrays exceed the last-level cache
    (:func:`fastbn.cpu._fusable`), which no small test array does; the second run lowers
    those limits to zero so that the fused kernels, serial and parallel builds, meet the
    same checks as the two-pass ones. Yields the name of the path.
    """
    from fastbn import _config, cpu

    if request.param == "fused":
        monkeypatch.setattr(_config, "LLC_BYTES", 0)
        monkeypatch.setattr(_config, "FUSE_MIN_RUN_BYTES", 0)
    cpu._plan_of.cache_clear()
    yield request.param
    monkeypatch.undo()
    cpu._plan_of.cache_clear()
