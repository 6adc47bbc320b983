"""fastbn's benchmark suite (pytest-benchmark) and its report.

Run the suite with ``pytest benchmarks --benchmark-only``; build the report with
``python -m benchmarks.report``; measure JIT compile and import times with
``python -m benchmarks.compile_time``. See ``docs/benchmarks.md``.

On a machine with an NVIDIA GPU, ``bash benchmarks/gpu_check.sh [OUTDIR]`` runs the CUDA
tests without the simulator and the GPU benchmarks (fastbn next to PyTorch/cuDNN, GB/s
and fraction of the device's copy bandwidth), and writes one raw JSON naming the device
under OUTDIR (default ``benchmarks/results/``), in under 8 minutes on an H100/H200. Its
options, and the environment it expects, are at the top of the script; see also
``docs/cuda.md``, *Running the GPU check*.

Modules: ``report`` (command line), ``run`` (runs the suite), ``analyse`` (rows and
summaries), ``render`` (tables, plots, the page from ``report_template.md``),
``formatting`` (shared text formatting), ``gpu_check`` (the GPU check's Python side).
"""
