"""The rows frozen backward against a plain ``prange`` loop of the same traffic.

``python -m benchmarks.frozen_rows [--rounds 40] [--threads 2]`` times, for the two rows
cases of docs/cpu.md (float32 ``(65536, 256)``, 67 MB, and ``(100352, 64)``), in
interleaved rounds (each round times every variant once, in a rotating order):

- ``frozen``: :func:`fastbn.cpu.frozen_backward` on the canonical ``(rows, C, 1)`` view,
  dx a separate array allocated like dy and x;
- ``plain``: a ``prange`` loop over the same rows that reads dy and x and writes
  ``dx = s * dy + t * x`` (2 reads + 1 write, no sums): the speed the frozen kernel would
  have if its sums cost nothing;
- ``frozen out=dy``: the same with dx written over (a copy of) dy, the in-place kernel;
- ``frozen@2K`` and ``plain@2K``: the same with dx placed 2 KiB further modulo 4 KiB than
  dy and x (which NumPy's large allocations all place at the same offset in a page), to
  show whether 4K aliasing between the stores and the loads matters.

It prints the median and the interquartile range of each variant's per-round ratio to
``plain`` and the load average before and after: on a loaded machine only these paired
ratios mean anything.
"""

import argparse
import os
import time

import numba
import numpy as np

from fastbn import cpu


@numba.njit(parallel=True, boundscheck=False)
def _plain(dy, x, dx, s, t, chunk):
    """``dx = s * dy + t * x`` over rows in ``prange`` chunks of ``chunk`` rows."""
    rows, C = x.shape
    for k in numba.prange((rows + chunk - 1) // chunk):
        for r in range(k * chunk, min(k * chunk + chunk, rows)):
            for c in range(C):
                dx[r, c] = s[c] * dy[r, c] + t[c] * x[r, c]


def _like(x, offset):
    """An empty array of x's shape whose address is ``offset`` bytes past x's modulo 4 KiB."""
    buf = np.empty(x.size + 4096 // x.itemsize, x.dtype)
    skew = (x.ctypes.data - buf.ctypes.data + offset) % 4096 // x.itemsize
    return buf[skew : skew + x.size].reshape(x.shape)


def _case(shape, rounds):
    """Time one case and print its ratios (see the module's docstring)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    rows, C = shape
    one = np.ones(C)
    # gamma * invstd = 1, so that out=dy leaves dy's values as they are, call after call
    coef = cpu.coefficients(np.zeros(C), one, one, np.zeros(C), x.dtype)
    s = np.full(C, 1.0, np.float32)
    t = np.full(C, 0.5, np.float32)
    chunk = max(1, 65536 // C)
    dxs = {"": _like(x, 0), "@2K": _like(x, 2048)}
    x3, dy3 = x.reshape(rows, C, 1), dy.reshape(rows, C, 1)
    variants = {}
    for tag, dx in dxs.items():
        variants["frozen" + tag] = lambda dx=dx: cpu.frozen_backward(
            dy3, x3, coef, False, dx.reshape(rows, C, 1)
        )
        variants["plain" + tag] = lambda dx=dx: _plain(dy, x, dx, s, t, chunk)
    dy_copy = _like(x, 0)
    dy_copy[...] = dy
    dyc3 = dy_copy.reshape(rows, C, 1)
    variants["frozen out=dy"] = lambda: cpu.frozen_backward(dyc3, x3, coef, False, dyc3)
    names = list(variants)
    times = {n: [] for n in names}
    for n in names:
        variants[n]()
    for k in range(rounds):
        for n in names[k % len(names) :] + names[: k % len(names)]:
            t0 = time.perf_counter()
            variants[n]()
            times[n].append(time.perf_counter() - t0)
    base = np.array(times["plain"])
    print(f"{shape} float32, {numba.get_num_threads()} threads, {rounds} rounds:")
    for n in names:
        ratio = np.array(times[n]) / base
        q1, med, q3 = np.percentile(ratio, [25, 50, 75])
        print(f"  {n:13s} / plain  {med:.3f}  (IQR {q1:.2f}-{q3:.2f})")


def main():
    """Run both cases (see the module's docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    numba.set_num_threads(args.threads)
    print("load average", os.getloadavg())
    for shape in ((65536, 256), (100352, 64)):
        _case(shape, args.rounds)
    print("load average", os.getloadavg())


if __name__ == "__main__":
    main()
