"""Tests of fastbn.data: IDX parsing, search order, errors, checked atomic downloads."""

import gzip
import hashlib
import http.server
import os
import struct
import threading

import numpy as np
import pytest

from fastbn import data

FILES = data.IDX_FILES


def _idx_bytes(array):
    """IDX encoding of a uint8 array (independent of the loader)."""
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def _write_gz(path, payload):
    with gzip.open(path, "wb") as f:
        f.write(payload)


def _make_dataset_dir(directory, n_train=12, n_test=5, seed=0):
    """Write the four IDX .gz files of a tiny 28x28 dataset; return the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    os.makedirs(directory, exist_ok=True)
    for key, array in arrays.items():
        _write_gz(os.path.join(directory, FILES[key]), _idx_bytes(array))
    return arrays


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No real data anywhere: a fresh HOME and cache, no system directories."""
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "empty").mkdir()  # a data_dir must exist
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.delenv("FASTBN_DATA", raising=False)
    for name in data.DATASETS:
        monkeypatch.setitem(data.DATASETS[name], "system_dirs", [str(tmp_path / "nowhere")])
    return tmp_path


class _Server:
    """A local HTTP server on 127.0.0.1 serving a directory, in a thread."""

    def __init__(self, directory, truncate=()):
        truncate = set(truncate)

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(directory), **kwargs)

            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                if name in truncate:  # promise more bytes than are sent, then hang up
                    body = open(os.path.join(str(directory), name), "rb").read()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body) + 1000))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    return
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mirror/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _md5_table(directory):
    table = {}
    for name in FILES.values():
        with open(os.path.join(directory, name), "rb") as f:
            table[name] = ("md5", hashlib.md5(f.read()).hexdigest())
    return table


# --------------------------------------------------------------------------------------
# Parsing and scaling
# --------------------------------------------------------------------------------------


def test_load_from_data_dir_scales_and_flattens(isolated):
    arrays = _make_dataset_dir(isolated / "d")
    ds = data.load_dataset("fashion-mnist", isolated / "d", download=False)
    assert ds.x_train.shape == (12, 784) and ds.x_test.shape == (5, 784)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    np.testing.assert_array_equal(
        ds.x_train, arrays["train_images"].reshape(12, 784) / np.float32(255)
    )
    np.testing.assert_array_equal(ds.y_test, arrays["test_labels"])
    assert ds.x_train.min() >= 0 and ds.x_train.max() <= 1
    assert ds.num_classes == 10 and ds.num_features == 784
    assert ds.source == str(isolated / "d")


def test_load_idx_reads_any_shape(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_gz(tmp_path / "a.gz", _idx_bytes(array))
    np.testing.assert_array_equal(data.load_idx(tmp_path / "a.gz"), array)


@pytest.mark.parametrize(
    "case,payload,match",
    [
        ("not-gzip", None, "not a valid gzip file"),
        ("bad-magic", struct.pack(">BBBBI", 0, 0, 0x0D, 1, 3) + b"abc", "bad IDX magic"),
        (
            "wrong-ndim",
            struct.pack(">BBBBII", 0, 0, 8, 2, 1, 3) + b"abc",
            "expected an IDX file with 1",
        ),
        ("short-data", struct.pack(">BBBBI", 0, 0, 8, 1, 5) + b"abc", "truncated or corrupt"),
        ("long-data", struct.pack(">BBBBI", 0, 0, 8, 1, 2) + b"abc", "truncated or corrupt"),
        ("short-header", b"\x00\x00\x08", "header truncated"),
        ("short-dims", struct.pack(">BBBB", 0, 0, 8, 1) + b"\x00", "header truncated"),
    ],
)
def test_corrupt_idx_files_name_the_file(tmp_path, case, payload, match):
    path = tmp_path / f"{case}-idx1-ubyte.gz"
    if payload is None:
        path.write_bytes(b"this is not gzip")
    else:
        _write_gz(path, payload)
    with pytest.raises(data.DatasetError, match=match) as info:
        data.load_idx(path, expected_ndim=1)
    assert str(path) in str(info.value)


def test_truncated_gzip_names_the_file(isolated):
    _make_dataset_dir(isolated / "d")
    path = isolated / "d" / FILES["train_images"]
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(data.DatasetError, match="truncated") as info:
        data.load_dataset("fashion-mnist", isolated / "d", download=False)
    assert str(path) in str(info.value)


def test_mismatched_counts_and_bad_labels(isolated):
    _make_dataset_dir(isolated / "d")
    _write_gz(isolated / "d" / FILES["train_labels"], _idx_bytes(np.zeros(11, np.uint8)))
    with pytest.raises(data.DatasetError, match="12 images but .* 11 labels"):
        data.load_dataset("fashion-mnist", isolated / "d", download=False)
    _write_gz(isolated / "d" / FILES["train_labels"], _idx_bytes(np.full(12, 10, np.uint8)))
    with pytest.raises(data.DatasetError, match="label 10 out of range") as info:
        data.load_dataset("fashion-mnist", isolated / "d", download=False)
    assert FILES["train_labels"] in str(info.value)


# --------------------------------------------------------------------------------------
# Search order
# --------------------------------------------------------------------------------------


def test_search_order(isolated, monkeypatch):
    monkeypatch.setenv("FASTBN_DATA", "/env")
    dirs = data.search_dirs("fashion-mnist", "/given")
    home = os.environ["HOME"]
    assert dirs == [
        "/given",
        "/given/fashion-mnist",
        "/env",
        "/env/fashion-mnist",
        f"{home}/.cache/fashion-mnist".replace(".cache/", ".cache/fastbn/"),
        str(isolated / "nowhere"),
        f"{home}/.keras/datasets/fashion-mnist",
    ]


def test_real_search_dirs_include_debian_and_keras(monkeypatch):
    monkeypatch.delenv("FASTBN_DATA", raising=False)
    dirs = data.search_dirs("fashion-mnist")
    assert "/usr/share/datasets/fashion-mnist" in dirs
    assert os.path.join(os.path.expanduser("~"), ".keras", "datasets", "fashion-mnist") in dirs


def test_earlier_directory_wins_and_env_is_used(isolated, monkeypatch):
    _make_dataset_dir(isolated / "env" / "fashion-mnist", seed=1)
    monkeypatch.setenv("FASTBN_DATA", str(isolated / "env"))
    ds = data.load_dataset("fashion-mnist", download=False)
    assert ds.source == str(isolated / "env" / "fashion-mnist")
    arrays = _make_dataset_dir(isolated / "given", seed=2)
    ds = data.load_dataset("fashion-mnist", isolated / "given", download=False)
    np.testing.assert_array_equal(ds.y_train, arrays["train_labels"])
    # The user cache is searched too.
    _make_dataset_dir(isolated / "home" / ".cache" / "fastbn" / "mnist")
    monkeypatch.delenv("FASTBN_DATA")
    assert "fastbn" in data.load_dataset("mnist", download=False).source


def test_nothing_found_lists_every_place_and_how_to_get_the_data(isolated):
    with pytest.raises(data.DatasetError) as info:
        data.load_dataset("fashion-mnist", isolated / "empty", download=False)
    message = str(info.value)
    for d in data.search_dirs("fashion-mnist", isolated / "empty"):
        assert d in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data" in message and "synthetic" in message


def test_a_bad_data_dir_is_an_error_naming_it(isolated, monkeypatch):
    _make_dataset_dir(isolated / "home" / ".cache" / "fastbn" / "fashion-mnist")
    missing = isolated / "missing"
    with pytest.raises(data.DatasetError, match=f"data directory {missing} does not exist"):
        data.load_dataset("fashion-mnist", missing, download=False)
    regular = isolated / "file"
    regular.write_text("x")
    with pytest.raises(data.DatasetError, match="is not a directory"):
        data.load_dataset("fashion-mnist", regular, download=False)
    locked = isolated / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        data.os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode)
    )
    with pytest.raises(data.DatasetError, match=f"{locked}: permission denied"):
        data.load_dataset("fashion-mnist", locked, download=False)
    # Without data_dir the other places are still searched.
    assert data.load_dataset("fashion-mnist", download=False).x_train.shape == (12, 784)


def test_an_unreadable_idx_file_says_permission_denied(isolated, monkeypatch):
    directory = isolated / "d"
    _make_dataset_dir(directory)
    unreadable = str(directory / FILES["train_labels"])
    real_open = data.gzip.open

    def gzip_open(path, *args, **kwargs):
        if str(path) == unreadable:
            raise PermissionError(13, "Permission denied", unreadable)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(data.gzip, "open", gzip_open)
    with pytest.raises(data.DatasetError) as info:
        data.load_dataset("fashion-mnist", directory, download=False)
    assert f"{unreadable}: permission denied" in str(info.value)
    assert "gzip" not in str(info.value) and "delete it" not in str(info.value)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="root reads every file: the mode cannot make one unreadable",
)
def test_an_unreadable_idx_file_for_real(isolated):
    directory = isolated / "d"
    _make_dataset_dir(directory)
    os.chmod(directory / FILES["test_images"], 0)
    with pytest.raises(data.DatasetError, match="permission denied"):
        data.load_dataset("fashion-mnist", directory, download=False)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="dataset must be one of"):
        data.load_dataset("cifar10")


# --------------------------------------------------------------------------------------
# Downloads from a local HTTP server
# --------------------------------------------------------------------------------------


def test_download_from_local_server_into_cache(isolated):
    served = isolated / "srv" / "mirror"
    arrays = _make_dataset_dir(served)
    cache = isolated / "cache"
    with _Server(isolated / "srv") as server:
        ds = data.load_dataset(
            "fashion-mnist",
            isolated / "empty",
            base_urls=[server.url],
            checksums=_md5_table(served),
            cache_dir=cache,
        )
    np.testing.assert_array_equal(ds.y_train, arrays["train_labels"])
    assert sorted(os.listdir(cache)) == sorted(FILES.values())  # no temporary files left
    assert ds.source == str(cache)
    # A second load finds the cached files without any server.
    again = data.load_dataset(
        "fashion-mnist",
        isolated / "empty",
        cache_dir=cache,
        base_urls=["http://127.0.0.1:9/"],
        download=True,
    )
    np.testing.assert_array_equal(again.x_test, ds.x_test)


def test_download_falls_back_to_the_next_mirror(isolated):
    served = isolated / "srv" / "mirror"
    _make_dataset_dir(served)
    with _Server(isolated / "srv") as server:
        ds = data.load_dataset(
            "mnist", base_urls=[server.url + "missing/", server.url], checksums=_md5_table(served)
        )
    assert ds.x_train.shape == (12, 784)
    assert "fastbn" in ds.source  # went to the default user cache


def test_checksum_mismatch_keeps_nothing(isolated):
    served = isolated / "srv" / "mirror"
    _make_dataset_dir(served)
    table = _md5_table(served)
    table[FILES["train_images"]] = ("md5", "0" * 32)
    cache = isolated / "cache"
    with _Server(isolated / "srv") as server:
        with pytest.raises(data.DatasetError) as info:
            data.load_dataset(
                "fashion-mnist",
                isolated / "empty",
                base_urls=[server.url],
                checksums=table,
                cache_dir=cache,
            )
    message = str(info.value)
    assert "md5 checksum mismatch" in message and FILES["train_images"] in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert FILES["train_images"] not in os.listdir(cache)
    assert not [f for f in os.listdir(cache) if f.endswith(".part")]


def test_interrupted_download_leaves_no_partial_file(isolated):
    served = isolated / "srv" / "mirror"
    _make_dataset_dir(served)
    cache = isolated / "cache"
    with _Server(isolated / "srv", truncate={FILES["test_images"]}) as server:
        with pytest.raises(data.DatasetError, match=FILES["test_images"]):
            data.load_dataset(
                "fashion-mnist",
                isolated / "empty",
                base_urls=[server.url],
                checksums={},
                cache_dir=cache,
                timeout=5,
            )
    assert sorted(os.listdir(cache)) == sorted(set(FILES.values()) - {FILES["test_images"]})


def test_unreachable_mirror_error_lists_urls(isolated):
    with pytest.raises(data.DatasetError) as info:
        data.load_dataset("mnist", base_urls=["http://127.0.0.1:9/"], timeout=2)
    message = str(info.value)
    assert "http://127.0.0.1:9/" in message and "Looked in:" in message
    assert "--data" in message


def test_fetch_file_verifies_sha256(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(b"payload")
    digest = hashlib.sha256(b"payload").hexdigest()
    path = data.fetch_file("f.bin", tmp_path / "out", [src.as_uri() + "/"], ("sha256", digest))
    assert open(path, "rb").read() == b"payload"
    with pytest.raises(data.DatasetError, match="sha256 checksum mismatch"):
        data.fetch_file("f.bin", tmp_path / "out2", [src.as_uri()], ("sha256", "1" * 64))


# --------------------------------------------------------------------------------------
# Synthetic and real data
# --------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_valid():
    a, b, c = (data.make_synthetic(200, 50, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)
    assert a.x_train.dtype == np.float32 and 0 <= a.x_train.min() and a.x_train.max() <= 1
    assert set(np.unique(a.y_train)) <= set(range(10))
    with pytest.raises(ValueError, match="n_train must be >= 1"):
        data.make_synthetic(0)


@pytest.mark.skipif(
    not os.path.isdir("/usr/share/datasets/fashion-mnist"),
    reason="dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist_files_of_the_debian_package():
    # The test split only (the training images take seconds to decompress).
    root = "/usr/share/datasets/fashion-mnist"
    images = data.load_idx(os.path.join(root, FILES["test_images"]), expected_ndim=3)
    labels = data.load_idx(os.path.join(root, FILES["test_labels"]), expected_ndim=1)
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [1000] * 10
    assert labels[:5].tolist() == [9, 2, 1, 1, 6]  # ankle boot, pullover, trouser...
