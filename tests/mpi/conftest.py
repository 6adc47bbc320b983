"""The scripts here are run by ``mpiexec`` (tests/test_distributed.py), not collected.

They import mpi4py at module level and hold no doctests: ``--doctest-modules`` must not
import them, or a machine without mpi4py gets a collection error instead of skipped
MPI tests.
"""

collect_ignore_glob = ["*.py"]
