"""``python -m fastbn``: the ``fastbn`` command (``fastbn --help``).

With no arguments, a self-check: forward and backward on a random NCHW batch compared
with a float64 NumPy computation, and the time of one call. When the kernels are not in
the JIT cache yet, it says so ("compiling kernels, first run only…", on stderr) and
leaves the compilation out of the times.
"""

import sys
import time

import numpy as np


def demo(shape=(32, 64, 28, 28), seed=0):
    """Run forward and backward once, check them against float64 NumPy, time them.

    Parameters
    ----------
    shape : tuple of int, default (32, 64, 28, 28)
        NCHW shape of the batch.
    seed : int, default 0

    Returns
    -------
    dict
        Maximum errors and median times (seconds).

    Examples
    --------
    >>> r = demo((4, 3, 5, 5))
    >>> r["forward_error"] < 1e-5 and r["backward_error"] < 1e-5
    True
    """
    import fastbn

    rng = np.random.default_rng(seed)
    x = rng.normal(3.0, 2.0, shape).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    C = shape[1]
    gamma = rng.normal(size=C).astype(np.float32)
    beta = rng.normal(size=C).astype(np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta)

    axes = (0,) + tuple(range(2, len(shape)))
    bshape = (1, C) + (1,) * (len(shape) - 2)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    mu = x64.mean(axes, keepdims=True)
    inv = 1.0 / np.sqrt(x64.var(axes, keepdims=True) + 1e-5)
    xhat = (x64 - mu) * inv
    g = gamma.astype(np.float64).reshape(bshape)
    y_ref = g * xhat + beta.reshape(bshape)
    m = x.size // C
    db = dy64.sum(axes, keepdims=True)
    dg = (dy64 * xhat).sum(axes, keepdims=True)
    dx_ref = g * inv / m * (m * dy64 - db - xhat * dg)

    def median_time(fn, repeat=7):
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    out_y, out_dx = np.empty_like(x), np.empty_like(x)
    return {
        "forward_error": float(np.abs(y - y_ref).max() / np.abs(y_ref).max()),
        "backward_error": float(np.abs(dx - dx_ref).max() / np.abs(dx_ref).max()),
        "forward_s": median_time(lambda: fastbn.batch_norm_forward(x, gamma, beta, out=out_y)),
        "backward_s": median_time(
            lambda: fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta, out=out_dx)
        ),
        "bytes": x.nbytes,
    }


def main(argv=None):
    """Entry point of ``python -m fastbn``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        from .cli import main as cli_main

        return cli_main(argv)
    import numba

    from . import _config
    from .cli import Interrupts

    shape = (32, 64, 28, 28)
    print(
        f"fastbn self-check: NCHW float32 {shape}, {numba.get_num_threads()} threads "
        f"({numba.config.THREADING_LAYER} threading layer)",
        flush=True,
    )
    announced = []

    def announce():
        if not announced:
            print(
                "compiling kernels, first run only…"
                if _config.CACHE
                else "compiling kernels (JIT cache off)…",
                file=sys.stderr,
                flush=True,
            )
        announced.append(time.perf_counter())

    with Interrupts("fastbn") as interrupts, _config.on_compile(announce):
        try:
            r = demo(shape)
        except KeyboardInterrupt:
            print(interrupts.report(), file=sys.stderr)
            return 130
    if interrupts.received:
        print(interrupts.report(), file=sys.stderr)
        return 130
    if announced:
        print(
            f"kernels compiled in {time.perf_counter() - announced[0]:.1f} s "
            "(not in the times below)",
            file=sys.stderr,
        )
    gb = r["bytes"] / 1e9
    print(
        f"  forward  max rel. error vs float64 NumPy: {r['forward_error']:.2e}   "
        f"{r['forward_s'] * 1e3:7.2f} ms  ({3 * gb / r['forward_s']:.1f} GB/s of 2R+1W)"
    )
    print(
        f"  backward max rel. error vs float64 NumPy: {r['backward_error']:.2e}   "
        f"{r['backward_s'] * 1e3:7.2f} ms  ({5 * gb / r['backward_s']:.1f} GB/s of 4R+1W)"
    )
    ok = r["forward_error"] < 1e-5 and r["backward_error"] < 1e-5
    print("  OK" if ok else "  FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
