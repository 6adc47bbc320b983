"""How to install an optional part of fastbn, said the way fastbn itself was installed.

fastbn is installed from a clone of its repository, not from a package index, so asking
pip for ``fastbn[plot]`` fails: the hint names the clone (``pip install -e ".[plot]"``)
when fastbn runs from one, and the plain packages otherwise.
"""

import os

__all__ = ["install_hint"]

# The packages of each extra of pyproject.toml that a hint may name.
EXTRAS = {
    "train": ["tqdm"],
    "plot": ["matplotlib"],
    "mpi": ["mpi4py", "mpich"],
    "cuda": ["numba-cuda", "cupy-cuda12x"],
}


def _source_root():
    """The clone fastbn runs from (the directory holding its pyproject.toml), or None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        with open(os.path.join(root, "pyproject.toml"), encoding="utf-8") as f:
            if 'name = "fastbn"' in f.read():
                return root
    except OSError:
        pass
    return None


def install_hint(extra):
    """The pip command that installs ``extra``, for this installation of fastbn.

    Parameters
    ----------
    extra : {"train", "plot", "mpi", "cuda"}

    Returns
    -------
    str
        ``pip install -e ".[extra]"`` (the clone is the current directory),
        ``pip install -e "/path/to/clone[extra]"``, or, for an installed copy,
        ``pip install <packages>``.

    Examples
    --------
    >>> install_hint("plot") in ('pip install -e ".[plot]"', "pip install matplotlib") or \\
    ...     install_hint("plot").endswith('[plot]"')
    True
    """
    root = _source_root()
    if root is None:
        return "pip install " + " ".join(EXTRAS[extra])
    if os.path.abspath(os.getcwd()) == root:
        return f'pip install -e ".[{extra}]"'
    return f'pip install -e "{root}[{extra}]"'
