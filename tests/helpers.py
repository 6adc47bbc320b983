"""Test helpers: per-dtype tolerances and a NaN-aware assert that shows the mismatches."""

import numpy as np

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
