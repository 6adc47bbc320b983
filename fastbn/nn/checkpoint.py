"""Training checkpoints: one ``.npz`` file, written atomically.

A checkpoint holds the model's parameters and BatchNorm running statistics
(``model.<name>``), the optimizer's state (``optimizer.<name>``), and a JSON ``meta``
entry with the epoch counter, the shuffling RNG's state, the metrics history and the
configuration. Everything is stored without pickle (``np.load(allow_pickle=False)``).

Writes go to a temporary file in the target's directory, are flushed to disk, and then
renamed over the target with :func:`os.replace`: an interrupted save leaves the previous
checkpoint intact.
"""

import json
import os
import tempfile
import zipfile

import numpy as np

__all__ = ["save_checkpoint", "load_checkpoint", "atomic_write_bytes", "CheckpointError",
           "FORMAT"]

FORMAT = "fastbn-trainer-checkpoint-1"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or not a fastbn trainer checkpoint."""


def _atomic_replace(path, write):
    """Call ``write(fileobj)`` on a temporary file next to ``path``, then rename it to ``path``.

    Parameters
    ----------
    path : str or os.PathLike
        Final file name.
    write : callable
        Receives a binary file object.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` atomically (temporary file + :func:`os.replace`).

    Parameters
    ----------
    path : str or os.PathLike
    data : bytes

    Examples
    --------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "m.json")
    >>> atomic_write_bytes(path, b"{}")
    >>> open(path).read()
    '{}'
    """
    _atomic_replace(path, lambda f: f.write(data))


def save_checkpoint(path, *, model_state, optimizer_state, epoch, rng_state, history, config):
    """Write a checkpoint atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Target ``.npz`` file (replaced atomically if it exists).
    model_state : dict of str to numpy.ndarray
        ``Sequential.state_dict()``.
    optimizer_state : dict of str to numpy.ndarray
        The optimizer's ``state_dict()``.
    epoch : int
        Epochs completed.
    rng_state : dict
        ``numpy.random.Generator.bit_generator.state`` of the shuffling generator.
    history : list of dict
        Per-epoch metrics so far.
    config : dict
        The run's configuration (JSON-serializable).

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> path = os.path.join(tempfile.mkdtemp(), "ck.npz")
    >>> save_checkpoint(path, model_state={"w": np.ones(2)}, optimizer_state={"t": np.array(1)},
    ...                 epoch=1, rng_state=np.random.default_rng(0).bit_generator.state,
    ...                 history=[], config={"seed": 0})
    >>> load_checkpoint(path)["epoch"]
    1
    """
    meta = {"format": FORMAT, "epoch": int(epoch), "rng_state": rng_state,
            "history": history, "config": config}
    arrays = {f"model.{k}": np.asarray(v) for k, v in model_state.items()}
    arrays.update({f"optimizer.{k}": np.asarray(v) for k, v in optimizer_state.items()})
    arrays["meta"] = np.array(json.dumps(meta))
    _atomic_replace(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path):
    """Read a checkpoint written by :func:`save_checkpoint`.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    dict
        ``model_state``, ``optimizer_state``, ``epoch``, ``rng_state``, ``history``,
        ``config``.

    Raises
    ------
    CheckpointError
        Missing file, unreadable or truncated file, or not a fastbn trainer checkpoint;
        the message names the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated ({exc})") from exc
    try:
        meta = json.loads(str(arrays.pop("meta")))
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a fastbn trainer checkpoint ({exc})") from exc
    return {
        "model_state": {k[6:]: v for k, v in arrays.items() if k.startswith("model.")},
        "optimizer_state": {k[10:]: v for k, v in arrays.items() if k.startswith("optimizer.")},
        "epoch": int(meta["epoch"]),
        "rng_state": meta["rng_state"],
        "history": meta["history"],
        "config": meta["config"],
    }
