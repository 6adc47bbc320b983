#!/usr/bin/env bash
# One-call GPU check of fastbn: the CUDA tests on the real GPU (no simulator), the GPU
# benchmarks next to PyTorch/cuDNN and the device's copy bandwidth, and one raw JSON
# naming the device. Under 8 minutes on an H100/H200 (every step runs under `timeout`).
#
#   bash benchmarks/gpu_check.sh [OUTDIR] [--install] [--torch VERSION]
#                                [--tests-timeout S] [--bench-timeout S]
#                                [--skip-tests] [--skip-bench]
#
# OUTDIR (default benchmarks/results) receives cuda_<gpu>_<host>_<date>.json: the
# benchmarks' pytest-benchmark JSON (machine_info.gpu names the device) plus "gpu_check":
# the device (nvidia-smi name, driver, CUDA version; numba-cuda's device, compute
# capability, runtime; PyTorch's CUDA and cuDNN), the tests' outcome, and per benchmark the
# median, GB/s and fraction of the copy bandwidth. `python -m benchmarks.report --json
# FILE --doc docs/benchmarks_gpu.md` renders it as a page. Exit 0 when every step passed.
#
# Expected environment (the script installs nothing unless --install is given):
#   - Linux, an NVIDIA GPU and its driver (nvidia-smi on PATH), Python >= 3.10;
#   - run from a checkout of fastbn (any directory: the script changes to the root);
#   - in the active Python: fastbn importable (pip install -e ".[test,cuda]": numba,
#     numpy, numba-cuda, pytest, pytest-benchmark, hypothesis, matplotlib, cupy-cuda12x)
#     and a CUDA build of PyTorch (pip install torch==2.13.0; the Linux wheels on PyPI are
#     CUDA 12 builds) for the cuDNN comparison (without it only fastbn is timed).
# --install runs exactly:  python -m pip install -e ".[test,cuda]" "torch==VERSION"
# (VERSION 2.13.0 unless --torch says otherwise), outside the 8-minute budget.
#
# The logic that needs no GPU (arguments, device description, the JSON) is in
# benchmarks/gpu_check.py and is tested by tests/test_gpu_check.py.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PYTHON=${PYTHON:-python}

plan=$("$PYTHON" -m benchmarks.gpu_check plan "$@") || exit 2
eval "$plan"

# Real-GPU runs only: the simulator settings of the test suite must not leak in.
unset NUMBA_ENABLE_CUDASIM FASTBN_CUDA_THREADS FASTBN_CUDA_MIN_VALUES_PER_THREAD \
      FASTBN_CUDA_TARGET_BLOCKS FASTBN_CUDA_TEST_CHILD FASTBN_CUDA_TEST_SHARD

if [ "$INSTALL" = 1 ]; then
    echo "== installing fastbn[test,cuda] and torch==$TORCH_VERSION"
    "$PYTHON" -m pip install -e ".[test,cuda]" "torch==$TORCH_VERSION" || exit 2
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastbn-gpu-check.XXXXXX") || exit 1
trap 'rm -rf "$WORK"' EXIT
start=$SECONDS

echo "== device"
timeout 60 "$PYTHON" -m benchmarks.gpu_check device "$WORK/device.json" || exit $?

assemble_args=(--device "$WORK/device.json" --outdir "$OUTDIR")

if [ "$RUN_TESTS" = 1 ]; then
    echo "== CUDA tests on the GPU (tests/test_cuda.py, timeout ${TESTS_TIMEOUT}s)"
    # The sm_90 compile test is left out: it compiles every kernel again on the CPU, for
    # machines without a GPU; here the tests compile them for the device itself.
    timeout --kill-after=10 "$TESTS_TIMEOUT" "$PYTHON" -m pytest tests/test_cuda.py -q \
        -p no:cacheprovider -rs -k "not test_kernels_compile_for_a_real_gpu" \
        2>&1 | tee "$WORK/tests.log"
    assemble_args+=(--tests-log "$WORK/tests.log" --tests-rc "${PIPESTATUS[0]}")
fi

if [ "$RUN_BENCH" = 1 ]; then
    echo "== GPU benchmarks (benchmarks/test_batch_norm_cuda.py, timeout ${BENCH_TIMEOUT}s)"
    timeout --kill-after=10 "$BENCH_TIMEOUT" "$PYTHON" -m pytest \
        benchmarks/test_batch_norm_cuda.py --benchmark-only -q -p no:cacheprovider -rs \
        --benchmark-json="$WORK/bench.json" --benchmark-sort=name \
        --benchmark-columns=min,median,max,rounds
    assemble_args+=(--bench-json "$WORK/bench.json" --bench-rc "$?")
fi

echo "== results"
"$PYTHON" -m benchmarks.gpu_check assemble "${assemble_args[@]}"
rc=$?
echo "gpu check took $((SECONDS - start)) s"
exit $rc
