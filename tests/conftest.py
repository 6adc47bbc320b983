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
    from fastbn import _config, cpu, cpu_masked

    # every cache of a plan (the plans, the direct path's drivers, the masked plans):
    # one left holding the fused choice would send later calls of that shape to the
    # fused kernels on one host path only (they agree with the two-pass ones to
    # rounding, not bitwise)
    caches = (cpu._plan_of, cpu._drivers_of, cpu_masked._plan_of)
    if request.param == "fused":
        monkeypatch.setattr(_config, "LLC_BYTES", 0)
        monkeypatch.setattr(_config, "FUSE_MIN_RUN_BYTES", 0)
    for cache in caches:
        cache.cache_clear()
    yield request.param
    monkeypatch.undo()
    for cache in caches:
        cache.cache_clear()
