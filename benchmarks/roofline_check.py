"""The frozen backward against its copy roofline, and the masked forward against the
unmasked one: the two speed targets of the frozen/masked work, in one quick run.

``python -m benchmarks.roofline_check`` prints, for the four large float32 cases:

- the frozen backward's best time (15 rounds) as a fraction of the time to move its bytes
  (2 reads + 1 write of x's size) at the best copy bandwidth measured at that size
  (:func:`benchmarks.bandwidth.copy_bandwidth`: a copy of x's size, whose working set is
  2 arrays), and at the best copy bandwidth of the same working set as the frozen
  backward's (a copy of 1.5 times x's size: 3 arrays of x's size);
- the median, over 11 interleaved rounds, of masked / unmasked training-forward time (a
  mask of 85 % True positions, of x's shape without the channel axis).
"""

import time

import numpy as np

import fastbn
from benchmarks.bandwidth import copy_bandwidth

CASES = [((32, 64, 56, 56), 1), ((64, 256, 14, 14), 1), ((32, 56, 56, 64), -1), ((65536, 256), 1)]


def _seconds(f, rounds):
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    rng = np.random.default_rng(0)
    for shape, axis in CASES:
        _case(rng, shape, axis)


def _case(rng, shape, axis):
    """Measure and print one case (see the module's docstring)."""
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    C = shape[axis]
    g, b = np.ones(C, np.float32), np.zeros(C, np.float32)
    mean, invstd = np.zeros(C, np.float32), np.ones(C, np.float32)
    dx = np.empty_like(x)

    def frozen():
        fastbn.batch_norm_backward(dy, x, mean, invstd, g, b, axis=axis, training=False, out=dx)

    frozen()
    bw = copy_bandwidth(x.nbytes)
    # the copy whose working set is the frozen backward's (dy, x and dx: 3 arrays of x's
    # size), which matters where 2 arrays fit the last-level cache and 3 do not
    bw_same = copy_bandwidth(3 * x.nbytes // 2)
    best = _seconds(frozen, 15)
    roofline = 3 * x.nbytes / (bw.gbps * 1e9) / best
    roofline_same = 3 * x.nbytes / (bw_same.gbps * 1e9) / best
    mask = rng.random(tuple(s for i, s in enumerate(shape) if i != axis % len(shape))) < 0.85

    def plain():
        fastbn.batch_norm_forward(x, g, b, axis=axis)

    def masked():
        fastbn.batch_norm_forward(x, g, b, axis=axis, mask=mask)

    plain()
    masked()
    ratio = np.median([_seconds(masked, 1) / _seconds(plain, 1) for _ in range(11)])
    print(
        f"{shape} axis={axis}: frozen backward {best * 1e3:.2f} ms, "
        f"{100 * roofline:.0f}% of the copy roofline ({bw.method}, {bw.gbps:.1f} GB/s), "
        f"{100 * roofline_same:.0f}% of the same-working-set copy's "
        f"({bw_same.method}, {bw_same.gbps:.1f} GB/s); "
        f"masked / unmasked forward {ratio:.2f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
