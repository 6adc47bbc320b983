"""Every code block of README.md and docs/*.md runs as written.

``python`` blocks are executed, each in a fresh namespace. A block may start with marker
comments, the only ways out of running it here:

- ``# requires: gpu, cupy, torch, mpi4py, keras, fashion-mnist``: skipped (with that
  reason) unless a CUDA GPU is present (``gpu``), the module imports, or the dataset is
  installed (``fashion-mnist``);
- ``# signature``: a call signature, not code: every ``fastbn.NAME(...)`` in it must
  exist and accept the parameters shown;
- ``# slow: ...``: runs, marked ``slow``.

In ``bash``/``sh``/``console`` blocks every ``fastbn train ...`` command must parse with
the real argument parser, and README.md's quick-start block must hold exactly the two
commands that ``.ci/run`` runs.
"""

import ast
import importlib.util
import inspect
import os
import re
import shlex
from pathlib import Path

import pytest

import fastbn
from fastbn import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.S | re.M)


def _blocks(languages):
    for path in DOCS:
        text = path.read_text()
        for match in FENCE.finditer(text):
            if match.group(1) in languages:
                line = text.count("\n", 0, match.start()) + 1
                yield pytest.param(match.group(2), id=f"{path.relative_to(ROOT)}:{line}")


def _markers(code):
    markers = {}
    for line in code.splitlines():
        if not line.startswith("#"):
            break
        key, _, value = line[1:].partition(":")
        markers[key.strip()] = value.strip()
    return markers


def _gpu():
    try:
        from numba import config, cuda
    except ImportError:
        return False
    return not config.ENABLE_CUDASIM and cuda.is_available()


def _fashion_mnist():
    from fastbn import data

    return all(
        any(os.path.isfile(os.path.join(d, f)) for d in data.search_dirs("fashion-mnist"))
        for f in data.IDX_FILES.values()
    )


def _missing(requirement):
    if requirement == "gpu":
        return None if _gpu() else "no CUDA GPU"
    if requirement == "fashion-mnist":
        return None if _fashion_mnist() else "Fashion-MNIST is not installed"
    return None if importlib.util.find_spec(requirement) else f"{requirement} is not installed"


def _check_signature(code):
    """Every ``fastbn.NAME(args)`` call shown exists and accepts those parameters."""
    for call in ast.walk(ast.parse(code.replace("...", "_ellipsis_=None"))):
        if not isinstance(call, ast.Call):
            continue
        name = ast.unparse(call.func)
        if not name.startswith("fastbn."):
            continue
        target = fastbn
        for part in name.split(".")[1:]:
            target = getattr(target, part)
        parameters = inspect.signature(target).parameters
        shown = [a.id for a in call.args if isinstance(a, ast.Name)]
        shown += [k.arg for k in call.keywords if k.arg != "_ellipsis_"]
        unknown = [p for p in shown if p not in parameters]
        assert not unknown, f"{name} has no parameter(s) {unknown}"


@pytest.mark.parametrize("code", list(_blocks({"python"})))
def test_python_block_runs(code, request, tmp_path, monkeypatch):
    markers = _markers(code)
    if "signature" in markers:
        # A signature: "*" alone marks keyword-only arguments, not valid in a call.
        _check_signature(re.sub(r"\*,", "", code))
        return
    for requirement in filter(None, re.split(r"[,\s]+", markers.get("requires", ""))):
        why = _missing(requirement)
        if why:
            pytest.skip(f"this block needs {requirement}: {why}")
    if "slow" in markers:
        request.applymarker(pytest.mark.slow)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<doc block>", "exec"), {"__name__": "__doc_block__"})


def _fastbn_train_commands():
    for param in _blocks({"bash", "sh", "console", "shell"}):
        for line in param.values[0].splitlines():
            line = line.split("  #")[0].split(" # ")[0]
            if "fastbn train" in line:
                for command in re.split(r"&&|;", line):
                    if "fastbn train" in command:
                        yield pytest.param(
                            command.split("fastbn train", 1)[1],
                            id=f"{param.id}:{command.strip()[:40]}",
                        )


@pytest.mark.parametrize("arguments", list(_fastbn_train_commands()))
def test_fastbn_train_commands_parse(arguments):
    args = cli.build_parser().parse_args(["train", *shlex.split(arguments)])
    assert args.command == "train"


def quick_start_commands():
    """The command lines of README.md's quick-start block (what .ci/run runs)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("<!-- quick-start"))
    assert lines[start + 1].startswith("```")
    end = next(i for i in range(start + 2, len(lines)) if lines[i].startswith("```"))
    return [line for line in lines[start + 2 : end] if line.strip() and not line.startswith("#")]


def test_readme_quick_start_is_two_commands_that_ci_runs():
    install, tests = quick_start_commands()
    assert install.startswith("apt-get update && apt-get install -y dataset-fashion-mnist")
    assert install.endswith('pip install -e ".[train]" && fastbn train')
    assert tests == 'pip install -e ".[test]" && python -m pytest'
    ci = (ROOT / ".ci" / "run").read_text()
    assert "README.md" in ci and "quick-start" in ci
    assert install not in ci and tests not in ci  # read from the README, never copied


def test_the_test_extra_brings_what_the_mpi_tests_need():
    text = (ROOT / "pyproject.toml").read_text()
    test_extra = text.split("\ntest = [", 1)[1].split("]", 1)[0]
    assert "mpi4py" in test_extra and "mpich" in test_extra
