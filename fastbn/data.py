"""Datasets for the trainer: Fashion-MNIST and MNIST from IDX files, and a synthetic set.

The IDX datasets are four gzip files each (``train-images-idx3-ubyte.gz``,
``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``,
``t10k-labels-idx1-ubyte.gz``). :func:`load_dataset` looks for them, in this order, in

1. the ``data_dir`` argument (``fastbn train --data DIR``); ``DIR/<dataset>`` is tried too
   (a ``data_dir`` that does not exist, is not a directory or cannot be read is an
   error, never skipped silently);
2. ``$FASTBN_DATA`` (and ``$FASTBN_DATA/<dataset>``);
3. the user cache, ``~/.cache/fastbn/<dataset>`` (``$XDG_CACHE_HOME`` is honoured);
4. the Debian package location, ``/usr/share/datasets/fashion-mnist`` for Fashion-MNIST
   (``apt-get install dataset-fashion-mnist``);
5. Keras's cache, ``~/.keras/datasets/fashion-mnist`` (Keras stores MNIST as one ``.npz``
   file, which is not read here);

and, when a file is in none of them, downloads it from the dataset's official mirror into
the user cache. Downloads are checked against the published MD5 of each file and written
atomically (temporary file, then ``os.replace``), so an interrupted download never leaves
a partial file under the final name. Files found on disk are not checksummed (the Debian
package recompresses them, so their ``.gz`` bytes differ from the mirror's); they are
validated structurally instead: gzip integrity, IDX magic number, dimensions, length,
label range and matching image/label counts. Any defect raises :class:`DatasetError`
naming the file.

Pixels are scaled to ``[0, 1]`` as float32 and each image is flattened to 784 values.
"""

import gzip
import hashlib
import os
import shutil
import struct
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Dataset",
    "DatasetError",
    "DATASETS",
    "load_dataset",
    "load_idx",
    "make_synthetic",
    "search_dirs",
    "fetch_file",
    "check_data_dir",
    "IDX_FILES",
]

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# Official mirrors and the MD5 of each published .gz file. Fashion-MNIST's are the ones in
# its README; MNIST's are those that torchvision checks for the same mirror files.
DATASETS = {
    "fashion-mnist": {
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "checksums": {
            "train-images-idx3-ubyte.gz": ("md5", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            "train-labels-idx1-ubyte.gz": ("md5", "25c81989df183df01b3e8a0aad5dffbe"),
            "t10k-images-idx3-ubyte.gz": ("md5", "bef4ecab320f06d8554ea6380940ec79"),
            "t10k-labels-idx1-ubyte.gz": ("md5", "bb300cfdad3c16e7a12a480ee83cd310"),
        },
        "system_dirs": ["/usr/share/datasets/fashion-mnist"],
        "keras_dir": "fashion-mnist",
        "install_hint": "apt-get install dataset-fashion-mnist",
        "sizes": {"train": 60000, "test": 10000},
    },
    "mnist": {
        "mirrors": [
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ],
        "checksums": {
            "train-images-idx3-ubyte.gz": ("md5", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            "train-labels-idx1-ubyte.gz": ("md5", "d53e105ee54ea40749a09fcbcd1e9432"),
            "t10k-images-idx3-ubyte.gz": ("md5", "9fb629c4189551a2d022fa330f9573f3"),
            "t10k-labels-idx1-ubyte.gz": ("md5", "ec29112dd5afa0611ce80d1b7f02629c"),
        },
        "system_dirs": ["/usr/share/datasets/mnist"],
        "keras_dir": None,
        "install_hint": None,
        "sizes": {"train": 60000, "test": 10000},
    },
}

# IDX type codes (third byte of the magic number) that the loader accepts.
_IDX_UNSIGNED_BYTE = 0x08


class DatasetError(RuntimeError):
    """A dataset file is missing, corrupt, truncated, or cannot be fetched.

    The message names the file (or, when nothing was found, every place tried).
    """


@dataclass
class Dataset:
    """A classification dataset held in memory.

    Attributes
    ----------
    name : str
        Dataset name (``"fashion-mnist"``, ``"mnist"``, ``"synthetic"``).
    x_train, x_test : numpy.ndarray
        float32 features, shape ``(n, 784)`` for the image sets, values in ``[0, 1]``.
    y_train, y_test : numpy.ndarray
        int64 class labels in ``[0, num_classes)``.
    num_classes : int
        Number of classes.
    source : str
        Where the data came from (a directory, ``"downloaded to ..."``, or ``"synthetic"``).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source: str

    @property
    def num_features(self):
        """int: Number of features per sample (784 for the image sets)."""
        return self.x_train.shape[1]


def _user_cache_root():
    """Return the root of fastbn's user cache, ``$XDG_CACHE_HOME/fastbn`` or ``~/.cache/fastbn``.

    Returns
    -------
    str
        An absolute directory path (not created here).
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastbn")


def search_dirs(dataset, data_dir=None):
    """List the directories searched for ``dataset``'s IDX files, in search order.

    Parameters
    ----------
    dataset : {"fashion-mnist", "mnist"}
        Dataset name.
    data_dir : str or os.PathLike, optional
        A directory given by the user (``--data``); it and ``data_dir/<dataset>`` come first.

    Returns
    -------
    list of str
        Directories, the user cache among them (where downloads go). Duplicates removed.

    Examples
    --------
    >>> dirs = search_dirs("fashion-mnist", data_dir="/data")
    >>> dirs[:2]
    ['/data', '/data/fashion-mnist']
    >>> "/usr/share/datasets/fashion-mnist" in dirs
    True
    """
    info = _dataset_info(dataset)
    dirs = []
    for root in (data_dir, os.environ.get("FASTBN_DATA") or None):
        if root is not None:
            root = os.fspath(root)
            dirs += [root, os.path.join(root, dataset)]
    dirs.append(os.path.join(_user_cache_root(), dataset))
    dirs += list(info["system_dirs"])
    if info["keras_dir"]:
        dirs.append(os.path.join(os.path.expanduser("~"), ".keras", "datasets", info["keras_dir"]))
    seen, unique = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            unique.append(d)
    return unique


def check_data_dir(data_dir):
    """Check that a user-given data directory exists, is a directory and can be read.

    Parameters
    ----------
    data_dir : str or os.PathLike

    Returns
    -------
    str
        The path.

    Raises
    ------
    DatasetError
        It does not exist, is not a directory, or cannot be listed; the message names it.

    Examples
    --------
    >>> check_data_dir("/nonexistent/fashion")
    Traceback (most recent call last):
    ...
    fastbn.data.DatasetError: data directory /nonexistent/fashion does not exist
    """
    path = os.fspath(data_dir)
    if not os.path.exists(path):
        raise DatasetError(f"data directory {path} does not exist")
    if not os.path.isdir(path):
        raise DatasetError(f"data directory {path} is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise DatasetError(f"data directory {path}: permission denied")
    try:
        os.listdir(path)
    except PermissionError:
        raise DatasetError(f"data directory {path}: permission denied") from None
    except OSError as exc:
        raise DatasetError(f"data directory {path} cannot be read ({exc})") from None
    return path


def _dataset_info(dataset):
    """Return the table entry of an IDX dataset, or raise a ValueError naming the choices.

    Parameters
    ----------
    dataset : str
        Dataset name.

    Returns
    -------
    dict
        The entry of :data:`DATASETS`.
    """
    try:
        return DATASETS[dataset]
    except KeyError:
        raise ValueError(
            f"dataset must be one of {sorted(DATASETS) + ['synthetic']}, got {dataset!r}"
        ) from None


def _read_gzip(path):
    """Read and decompress a whole gzip file, turning any defect into a DatasetError.

    Parameters
    ----------
    path : str
        The ``.gz`` file.

    Returns
    -------
    bytes
        The decompressed content.
    """
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except PermissionError as exc:
        raise DatasetError(
            f"{path}: permission denied (the file exists but this account cannot read it)"
        ) from exc
    except (OSError, EOFError, zlib.error) as exc:
        # gzip raises BadGzipFile (an OSError) for a wrong header, EOFError for a truncated
        # stream, and zlib.error or OSError for a CRC/length mismatch.
        raise DatasetError(
            f"{path}: not a valid gzip file or truncated ({exc}); "
            "delete it and let fastbn fetch it again"
        ) from exc


def load_idx(path, expected_ndim=None):
    """Read one gzip-compressed IDX file of unsigned bytes into a NumPy array.

    Parameters
    ----------
    path : str or os.PathLike
        Path of an ``*-ubyte.gz`` file.
    expected_ndim : int, optional
        Required number of dimensions (3 for images, 1 for labels).

    Returns
    -------
    numpy.ndarray
        uint8 array of the shape stored in the file's header.

    Raises
    ------
    DatasetError
        The file is not gzip, is truncated, has a bad magic number, the wrong number of
        dimensions, or a length that does not match its header. The message names the file.

    Examples
    --------
    >>> import gzip, os, struct, tempfile
    >>> import numpy as np
    >>> path = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte.gz")
    >>> with gzip.open(path, "wb") as f:
    ...     _ = f.write(struct.pack(">BBBBI", 0, 0, 8, 1, 3) + bytes([7, 0, 9]))
    >>> load_idx(path, expected_ndim=1)
    array([7, 0, 9], dtype=uint8)
    """
    path = os.fspath(path)
    raw = _read_gzip(path)
    if len(raw) < 4:
        raise DatasetError(f"{path}: IDX header truncated ({len(raw)} bytes)")
    zero0, zero1, type_code, ndim = struct.unpack(">BBBB", raw[:4])
    if zero0 != 0 or zero1 != 0 or type_code != _IDX_UNSIGNED_BYTE or ndim == 0:
        raise DatasetError(
            f"{path}: bad IDX magic number {raw[:4].hex()} (expected 000008xx: unsigned bytes)"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        raise DatasetError(
            f"{path}: expected an IDX file with {expected_ndim} dimension(s), got {ndim}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: IDX header truncated ({len(raw)} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != count:
        raise DatasetError(
            f"{path}: IDX header says shape {shape} ({count} bytes of data), "
            f"file holds {len(raw) - header} bytes: truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, count=count, offset=header).reshape(shape)


def _checksum(path, algorithm):
    """Hex digest of a file.

    Parameters
    ----------
    path : str
        File to hash.
    algorithm : str
        A :mod:`hashlib` algorithm name (``"md5"``, ``"sha256"``).

    Returns
    -------
    str
        Lower-case hex digest.
    """
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_file(filename, dest_dir, base_urls, checksum=None, timeout=30.0):
    """Download ``filename`` from the first base URL that serves it, into ``dest_dir``.

    The bytes go to a temporary file in ``dest_dir``; the checksum is verified; only then
    is the file renamed to its final name with :func:`os.replace` (atomic on POSIX and
    Windows). A failed or interrupted download leaves nothing under the final name.

    Parameters
    ----------
    filename : str
        File name, appended to each base URL.
    dest_dir : str or os.PathLike
        Target directory, created if missing.
    base_urls : sequence of str
        Mirror base URLs, tried in order.
    checksum : tuple of (str, str), optional
        ``(algorithm, hexdigest)``, e.g. ``("md5", "8d4f...")``. None skips the check.
    timeout : float, default 30.0
        Socket timeout in seconds.

    Returns
    -------
    str
        Path of the downloaded file.

    Raises
    ------
    DatasetError
        No mirror served the file, or every download failed its checksum; the message
        lists each URL and what went wrong.

    Examples
    --------
    >>> import os, tempfile
    >>> src = tempfile.mkdtemp()
    >>> with open(os.path.join(src, "a.bin"), "wb") as f:
    ...     _ = f.write(b"hello")
    >>> url = "file://" + src + "/"
    >>> path = fetch_file("a.bin", tempfile.mkdtemp(), [url],
    ...                   checksum=("md5", "5d41402abc4b2a76b9719d911017c592"))
    >>> open(path, "rb").read()
    b'hello'
    """
    dest_dir = os.fspath(dest_dir)
    os.makedirs(dest_dir, exist_ok=True)
    final = os.path.join(dest_dir, filename)
    problems = []
    for base in base_urls:
        url = base if base.endswith("/") else base + "/"
        url += filename
        fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", suffix=".part", dir=dest_dir)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                shutil.copyfileobj(resp, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            if checksum is not None:
                algorithm, expected = checksum
                got = _checksum(tmp, algorithm)
                if got != expected.lower():
                    problems.append(
                        f"{url}: {algorithm} checksum mismatch (expected {expected}, got {got})"
                    )
                    continue
            os.replace(tmp, final)
            return final
        except (urllib.error.URLError, OSError, ValueError) as exc:
            problems.append(f"{url}: {exc}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    raise DatasetError(f"could not download {filename}:\n  " + "\n  ".join(problems))


def _locate(dataset, filename, dirs):
    """First directory among ``dirs`` that holds ``filename``.

    Parameters
    ----------
    dataset : str
        Dataset name (unused, kept for symmetry with messages).
    filename : str
        File name to look for.
    dirs : list of str
        Directories in search order.

    Returns
    -------
    str or None
        Full path, or None when no directory has it.
    """
    for d in dirs:
        path = os.path.join(d, filename)
        if os.path.isfile(path):
            return path
    return None


def load_dataset(
    name="fashion-mnist",
    data_dir=None,
    *,
    download=True,
    base_urls=None,
    checksums=None,
    cache_dir=None,
    seed=0,
    timeout=30.0,
):
    """Load a dataset as float32 features in ``[0, 1]`` and int64 labels.

    Parameters
    ----------
    name : {"fashion-mnist", "mnist", "synthetic"}, default "fashion-mnist"
        Dataset.
    data_dir : str or os.PathLike, optional
        Directory searched first (see the module docstring for the whole search order).
    download : bool, default True
        Fetch files that are found nowhere from the official mirror into the cache.
    base_urls : sequence of str, optional
        Mirror base URLs to download from instead of the official ones (tests serve files
        from a local HTTP server this way).
    checksums : dict, optional
        ``{filename: (algorithm, hexdigest)}`` used instead of the official table; a file
        missing from it is not checked.
    cache_dir : str or os.PathLike, optional
        Where downloads go instead of ``~/.cache/fastbn/<name>``. It is searched too.
    seed : int, default 0
        Seed of the synthetic dataset (ignored for the others).
    timeout : float, default 30.0
        Download socket timeout in seconds.

    Returns
    -------
    Dataset
        ``x_train`` ``(60000, 784)``, ``x_test`` ``(10000, 784)`` for the image sets.

    Raises
    ------
    ValueError
        Unknown dataset name.
    DatasetError
        ``data_dir`` does not exist, is not a directory or cannot be read; a file cannot
        be read (permission denied), is corrupt or truncated (the message names it), or a
        file is missing and could not be downloaded (the message lists every place tried
        and how to get it).

    Examples
    --------
    >>> ds = load_dataset("synthetic", seed=0)
    >>> ds.x_train.shape, ds.x_train.dtype, ds.num_classes
    ((6000, 784), dtype('float32'), 10)
    """
    if name == "synthetic":
        return make_synthetic(seed=seed)
    info = _dataset_info(name)
    if data_dir is not None:
        check_data_dir(data_dir)
    dirs = search_dirs(name, data_dir)
    cache = (
        os.fspath(cache_dir) if cache_dir is not None else os.path.join(_user_cache_root(), name)
    )
    if cache not in dirs:
        # A custom cache takes the default cache's place in the search order.
        dirs.insert(dirs.index(os.path.join(_user_cache_root(), name)), cache)
    mirrors = list(base_urls) if base_urls is not None else list(info["mirrors"])
    table = info["checksums"] if checksums is None else checksums

    paths, missing = {}, []
    for key, filename in IDX_FILES.items():
        path = _locate(name, filename, dirs)
        if path is None and download:
            try:
                path = fetch_file(filename, cache, mirrors, table.get(filename), timeout=timeout)
            except DatasetError as exc:
                missing.append((filename, str(exc)))
                continue
        if path is None:
            missing.append((filename, "download disabled"))
            continue
        paths[key] = path
    if missing:
        raise DatasetError(_not_found_message(name, dirs, missing, mirrors, download, info))

    arrays = {
        key: load_idx(path, 3 if key.endswith("images") else 1) for key, path in paths.items()
    }
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[0] != labels.shape[0]:
            raise DatasetError(
                f"{paths[split + '_images']} holds {images.shape[0]} images but "
                f"{paths[split + '_labels']} holds {labels.shape[0]} labels"
            )
        if labels.size and labels.max() > 9:
            raise DatasetError(
                f"{paths[split + '_labels']}: label {int(labels.max())} out of "
                "range [0, 9]: corrupt file"
            )
    dirs_used = sorted({os.path.dirname(p) for p in paths.values()})
    return Dataset(
        name=name,
        x_train=_to_features(arrays["train_images"]),
        y_train=arrays["train_labels"].astype(np.int64),
        x_test=_to_features(arrays["test_images"]),
        y_test=arrays["test_labels"].astype(np.int64),
        num_classes=10,
        source=", ".join(dirs_used),
    )


def _not_found_message(name, dirs, missing, mirrors, download, info):
    """Compose the error listing every place tried and how to get the data.

    Parameters
    ----------
    name : str
        Dataset name.
    dirs : list of str
        Directories searched.
    missing : list of (str, str)
        Missing files and the download error of each.
    mirrors : list of str
        URLs tried.
    download : bool
        Whether downloading was allowed.
    info : dict
        The dataset's table entry.

    Returns
    -------
    str
        The message.
    """
    lines = [f"{name}: could not find or fetch " + ", ".join(f for f, _ in missing) + "."]
    lines.append("Looked in:")
    lines += [f"  {d}" for d in dirs]
    if download:
        lines.append("Tried to download from:")
        lines += [f"  {m}" for m in mirrors]
        lines.append("Download errors:")
        for _, err in missing:
            lines += ["  " + line for line in err.splitlines()]
    else:
        lines.append("Downloading was disabled.")
    options = []
    if info["install_hint"]:
        options.append(
            f"{info['install_hint']}   (Debian/Ubuntu; installs the files to "
            f"{info['system_dirs'][0]})"
        )
    options.append(
        "put the four IDX .gz files ("
        + ", ".join(IDX_FILES.values())
        + ") in a directory and pass it with --data DIR (or set FASTBN_DATA)"
    )
    options.append("use --dataset synthetic for an offline run")
    lines.append("To get the data:")
    lines += [("  " if i == 0 else "  or ") + option for i, option in enumerate(options)]
    return "\n".join(lines)


def _to_features(images):
    """Flatten uint8 images to float32 rows scaled to ``[0, 1]``.

    Parameters
    ----------
    images : numpy.ndarray
        uint8, shape ``(n, h, w)``.

    Returns
    -------
    numpy.ndarray
        float32, shape ``(n, h * w)``, C-contiguous.
    """
    features = images.reshape(images.shape[0], -1).astype(np.float32)
    features /= np.float32(255.0)  # a division, not * (1/255): exactly k/255 rounded once
    return features


def make_synthetic(n_train=6000, n_test=1000, num_features=784, num_classes=10, seed=0):
    """A learnable, deterministic classification dataset shaped like Fashion-MNIST.

    Each class has a random prototype in ``[0, 1]^num_features``; a sample is its class's
    prototype plus Gaussian noise, clipped to ``[0, 1]``. The classes overlap enough that
    accuracy starts near chance and a small MLP reaches well above 90 % in an epoch or two.

    Parameters
    ----------
    n_train, n_test : int
        Number of training and test samples.
    num_features : int, default 784
        Features per sample.
    num_classes : int, default 10
        Number of classes.
    seed : int, default 0
        Seed of the :class:`numpy.random.Generator`; the same seed gives the same data.

    Returns
    -------
    Dataset
        float32 features in ``[0, 1]`` and int64 labels.

    Examples
    --------
    >>> a = make_synthetic(n_train=100, n_test=10, seed=3)
    >>> b = make_synthetic(n_train=100, n_test=10, seed=3)
    >>> bool((a.x_train == b.x_train).all()), a.x_train.shape
    (True, (100, 784))
    """
    for arg, value in (
        ("n_train", n_train),
        ("n_test", n_test),
        ("num_features", num_features),
        ("num_classes", num_classes),
    ):
        if int(value) < 1:
            raise ValueError(f"{arg} must be >= 1, got {value}")
    rng = np.random.default_rng(seed)
    prototypes = rng.random((num_classes, num_features), dtype=np.float32)

    def draw(n):
        labels = rng.integers(0, num_classes, size=n)
        x = prototypes[labels] + rng.normal(0.0, 0.6, size=(n, num_features)).astype(np.float32)
        np.clip(x, 0.0, 1.0, out=x)
        return np.ascontiguousarray(x, dtype=np.float32), labels.astype(np.int64)

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return Dataset("synthetic", x_train, y_train, x_test, y_test, num_classes, "synthetic")
