"""Training checkpoints: one ``.npz`` file, written atomically.

A checkpoint holds the model's parameters and BatchNorm running statistics
(``model.<name>``), the optimizer's state (``optimizer.<name>``), and a JSON ``meta``
entry with the epoch counter, the shuffling RNG's state, the metrics history and the
configuration. Everything is stored without pickle (``np.load(allow_pickle=False)``).

Writes go to a temporary file in the target's directory, are flushed to disk, and then
renamed over the target with :func:`os.replace`: an interrupted save leaves the previous
checkpoint intact. The file gets the permissions a plain ``open(path, "w")`` would give
it (``0666`` less the umask, or the replaced file's mode). The temporary file's name
carries the host and process id of its writer (``.<name>.<host>.<pid>.<random>.tmp``); a
write killed outright (SIGKILL, power loss) leaves it behind, and the next save of the
same file on the same host removes it once its writer is gone.
"""

import errno
import glob
import json
import os
import socket
import tempfile
import zipfile

import numpy as np

__all__ = ["save_checkpoint", "load_checkpoint", "atomic_write_bytes", "CheckpointError", "FORMAT"]

FORMAT = "fastbn-trainer-checkpoint-1"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or not a fastbn trainer checkpoint."""


def _umask():
    """The process's umask (read from /proc when possible, which changes nothing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no way to read it without setting it
    os.umask(mask)
    return mask


def _temporary_prefix(path):
    """``.<name>.<host>.`` : the start of every temporary file written for ``path``."""
    host = socket.gethostname().replace(".", "_") or "localhost"
    return f".{os.path.basename(path)}.{host}."


def _pid_alive(pid):
    """Whether a process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def _remove_stale_temporaries(path):
    """Delete temporary files of ``path`` left by writers of this host that are gone.

    Parameters
    ----------
    path : str
        The final file name.

    Returns
    -------
    list of str
        The files removed.
    """
    prefix = os.path.join(os.path.dirname(os.path.abspath(path)), _temporary_prefix(path))
    removed = []
    for tmp in glob.glob(glob.escape(prefix) + "*.tmp"):
        pid_text = tmp[len(prefix) :].split(".", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        try:
            os.remove(tmp)
            removed.append(tmp)
        except OSError:
            pass
    return removed


def _atomic_replace(path, write):
    """Call ``write(fileobj)`` on a temporary file next to ``path``, then rename it to ``path``.

    The result gets ``path``'s previous mode when it existed, else ``0666`` less the umask;
    temporary files of earlier writes killed on this host are removed first.

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
    _remove_stale_temporaries(path)
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(
        prefix=f"{_temporary_prefix(path)}{os.getpid()}.", suffix=".tmp", dir=directory
    )
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
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
    meta = {
        "format": FORMAT,
        "epoch": int(epoch),
        "rng_state": rng_state,
        "history": history,
        "config": config,
    }
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
        Missing file, permission denied, unreadable or truncated file, not a fastbn
        trainer checkpoint, or a ``meta`` entry without the expected fields; the message
        names the file and what is wrong.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} is not a file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except PermissionError as exc:
        raise CheckpointError(f"checkpoint {path}: permission denied") from exc
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise CheckpointError(f"checkpoint {path}: permission denied") from exc
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated ({exc})") from exc
    except (ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated ({exc})") from exc
    if "meta" not in arrays:
        raise CheckpointError(f"{path} is not a fastbn trainer checkpoint (no 'meta' entry)")
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except ValueError as exc:
        raise CheckpointError(
            f"{path} is not a fastbn trainer checkpoint (meta is not JSON: {exc})"
        ) from exc
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{path} is not a fastbn trainer checkpoint (meta is a JSON "
            f"{type(meta).__name__}, not an object)"
        )
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a fastbn trainer checkpoint (format "
            f"{meta.get('format')!r}, expected {FORMAT!r})"
        )
    expected = {"epoch": int, "rng_state": dict, "history": list, "config": dict}
    for key, kind in expected.items():
        if key not in meta:
            raise CheckpointError(f"checkpoint {path} is malformed: meta has no {key!r}")
        value = meta[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CheckpointError(
                f"checkpoint {path} is malformed: meta {key!r} must be "
                f"a JSON {'integer' if kind is int else kind.__name__}, "
                f"got {value!r:.60}"
            )
    if meta["epoch"] < 0:
        raise CheckpointError(f"checkpoint {path} is malformed: epoch {meta['epoch']} < 0")
    return {
        "model_state": {k[6:]: v for k, v in arrays.items() if k.startswith("model.")},
        "optimizer_state": {k[10:]: v for k, v in arrays.items() if k.startswith("optimizer.")},
        "epoch": meta["epoch"],
        "rng_state": meta["rng_state"],
        "history": meta["history"],
        "config": meta["config"],
    }
