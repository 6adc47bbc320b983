"""fastbn's benchmark suite (pytest-benchmark) and its report.

Run the suite with ``pytest benchmarks --benchmark-only``; build the report with
``python -m benchmarks.report``; measure JIT compile and import times with
``python -m benchmarks.compile_time``. See ``docs/benchmarks.md``.
"""
