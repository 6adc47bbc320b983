"""fastbn.precompile and ``fastbn precompile``: compile ahead of use, load afterwards."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastbn import _precompile, cli

ROOT = Path(__file__).resolve().parent.parent

# A fresh process's first calls, as a user makes them (float32: the parameters given, left
# out, through the layer; rows and strided layouts, serial and parallel sizes), counting
# what Numba compiles meanwhile.
FIRST_CALLS = textwrap.dedent("""
    import json
    import numpy as np
    from numba.core import event
    import fastbn
    rng = np.random.default_rng(0)
    with event.install_recorder("numba:compile") as recorder:
        for shape, axis in [((256, 64), 1), ((4096, 64), 1), ((2, 3, 5, 7), 1),
                            ((8, 16, 32, 32), 1), ((8, 32, 32, 16), -1)]:
            x = rng.standard_normal(shape).astype(np.float32)
            C = shape[axis]
            for gamma, beta in [(np.ones(C, np.float32), np.zeros(C, np.float32)),
                                (None, None)]:
                y, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta, axis=axis)
                fastbn.batch_norm_backward(x, x, mean, invstd, gamma, beta, axis=axis)
                fastbn.batch_norm_backward(x, x, mean, invstd, gamma, beta, axis=axis,
                                           training=False)
                fastbn.batch_norm_inference(x, mean, invstd, gamma, beta, axis=axis)
            layer = fastbn.BatchNorm(C, axis=axis)
            layer.forward(x, training=True)
            layer.backward(x)
            layer.forward(x, training=False)
            layer.backward(x)
    compiled = sorted({e.data["dispatcher"].py_func.__qualname__ for _, e in recorder.buffer})
    print(json.dumps(compiled))
""")


def _env(cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), FASTBN_CACHE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def test_jobs_cover_every_family_build_and_operation():
    """Fused drivers exist for the strided family only; everything else for both."""
    found = _precompile.jobs(["float32", "float64"])
    assert len(found) == len(set(found)) == 48
    assert not [j for j in found if j.family == "rows" and j.operation.endswith("_fused")]
    assert {j.build for j in found} == {"serial", "parallel"}


def test_precompile_rejects_an_unsupported_dtype():
    with pytest.raises(ValueError, match="dtypes must be"):
        _precompile.precompile(["int32"], progress=False)
    assert cli.main(["precompile", "--dtypes", "int8", "--quiet"]) == 2


def test_cli_subcommand_is_registered():
    args = cli.build_parser().parse_args(
        ["precompile", "--dtypes", "float32", "--quiet", "--processes", "2"]
    )
    assert args.command == "precompile" and args.processes == 2 and args.quiet


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FASTBN_CACHE") == "0", reason="the on-disk cache is off")
def test_after_precompile_a_fresh_process_compiles_nothing(tmp_path):
    """``fastbn precompile`` (two worker processes writing one cache at once), then a new
    process's first forward, backward and inference calls load every kernel: Numba
    compiles nothing."""
    env = _env(tmp_path)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastbn",
            "precompile",
            "--dtypes",
            "float32",
            "--processes",
            "2",
            "--quiet",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    first = subprocess.run(
        [sys.executable, "-c", FIRST_CALLS],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    compiled = json.loads(first.stdout.strip().splitlines()[-1])
    assert compiled == [], f"compiled after precompile: {compiled}"
