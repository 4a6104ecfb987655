"""Tests for cnn_data: small fake files in the official formats, plus the real mirror when present."""
import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import struct
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))          # so plain `pytest` works as well as `python -m pytest`
import cnn_data as D  # noqa: E402
import cnn_images as I  # noqa: E402
from cnn_data import DatasetError  # noqa: E402

# Read before the autouse fixture below clears the variable. Relative paths start from the repo.
REAL_MIRROR = REPO / os.environ.get("CNN_DATA_MIRROR", str(REPO.parent / "shared" / "datasets"))
UNREACHABLE = ("http://127.0.0.1:9/",)     # the discard port: the connection is refused at once


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No mirror, no network, and a cache folder inside tmp_path: tests never touch data/."""
    monkeypatch.delenv("CNN_DATA_MIRROR", raising=False)
    monkeypatch.setattr(D, "DATA_DIR", tmp_path / "cache")
    monkeypatch.setattr(D, "BASE_URLS", {name: UNREACHABLE if urls else ()
                                                for name, urls in D.BASE_URLS.items()})


# ---------------------------------------------------------------- helpers building official formats

def idx_bytes(array):
    """IDX encoding of a uint8 array: 0x00 0x00 0x08 ndim, big-endian uint32 dims, then the bytes."""
    array = np.asarray(array, dtype=np.uint8)
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_fake_mnist(mirror, n_train=50, n_test=20):
    """Write mnist/*.gz under `mirror`; image i of the training set has pixel (0, 0) = i.

    Returns the {filename: sha256 of decompressed bytes} table to use as CHECKSUMS["mnist"].
    """
    rng = np.random.default_rng(123)
    checksums = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n)
        for kind, array in (("images-idx3", images), ("labels-idx1", np.arange(n) % 10)):
            raw = idx_bytes(array)
            name = f"{split}-{kind}-ubyte.gz"
            write(mirror / "mnist" / name, gzip.compress(raw))
            checksums[name] = sha256(raw)
    return checksums


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """A local mirror with a tiny MNIST (50 train, 20 test images), selected via CNN_DATA_MIRROR."""
    mirror = tmp_path / "mirror"
    monkeypatch.setitem(D.CHECKSUMS, "mnist", make_fake_mnist(mirror))
    monkeypatch.setenv("CNN_DATA_MIRROR", str(mirror))
    return mirror


# ---------------------------------------------------------------- IDX parsing

def test_read_idx_hand_written_labels_and_images(tmp_path):
    labels = write(tmp_path / "labels", b"\x00\x00\x08\x01" b"\x00\x00\x00\x03" b"\x07\x02\x01")
    images = write(tmp_path / "images.gz", gzip.compress(
        b"\x00\x00\x08\x03" b"\x00\x00\x00\x02" b"\x00\x00\x00\x01" b"\x00\x00\x00\x02" b"\x01\x02\x03\x04"))
    assert D.read_idx(labels).tolist() == [7, 2, 1]
    x = D.read_idx(images)
    assert x.dtype == np.uint8 and x.shape == (2, 1, 2)
    assert x.tolist() == [[[1, 2]], [[3, 4]]]


@pytest.mark.parametrize("data, message", [
    (b"\x00\x00\x08\x02\x00\x00\x00\x01\x00\x00\x00\x01\x05", "magic"),     # 2-D: neither labels nor images
    (b"\x00\x00\x09\x01\x00\x00\x00\x01\x05", "magic"),                     # 0x09 = int8, not uint8
    (b"\x00\x00\x08\x01\x00\x00\x00\x03\x07\x02", "truncated"),             # payload one byte short
    (b"\x00\x00\x08\x03\x00\x00\x00\x01", "truncated"),                     # header cut off
])
def test_read_idx_rejects_malformed_files(tmp_path, data, message):
    path = write(tmp_path / "bad-idx1-ubyte", data)
    with pytest.raises(DatasetError, match=message) as info:
        D.read_idx(path)
    assert "bad-idx1-ubyte" in str(info.value)


def test_read_idx_truncated_gzip_is_reported_as_corrupt(tmp_path):
    data = gzip.compress(idx_bytes(np.arange(1000) % 10))
    path = write(tmp_path / "short-labels-idx1-ubyte.gz", data[: len(data) // 2])
    with pytest.raises(DatasetError, match="corrupt") as info:
        D.read_idx(path)
    assert "short-labels-idx1-ubyte.gz" in str(info.value)


# ---------------------------------------------------------------- fetch: mirror, download, verification

def test_local_mirror_file_is_verified_and_used_in_place(tmp_path, monkeypatch):
    path = write(tmp_path / "mirror" / "toy" / "a.bin", b"hello")
    monkeypatch.setenv("CNN_DATA_MIRROR", str(tmp_path / "mirror"))
    assert D.fetch("toy", "a.bin", sha256(b"hello"), UNREACHABLE) == path
    assert not (tmp_path / "cache").exists()                  # nothing copied
    with pytest.raises(DatasetError, match="corrupt") as info:
        D.fetch("toy", "a.bin", sha256(b"other"), UNREACHABLE)
    assert str(path) in str(info.value)
    with pytest.raises(DatasetError, match="CNN_DATA_MIRROR") as info:
        D.fetch("toy", "missing.bin", sha256(b""), UNREACHABLE)
    assert "toy/missing.bin" in str(info.value)


def test_gz_checksum_is_of_the_decompressed_content(tmp_path, monkeypatch):
    # A mirror may recompress a file: a different .gz with the same content must still verify.
    content = idx_bytes(np.arange(100) % 10)
    write(tmp_path / "m" / "toy" / "x.gz", gzip.compress(content, compresslevel=1, mtime=7))
    monkeypatch.setenv("CNN_DATA_MIRROR", str(tmp_path / "m"))
    assert D.fetch("toy", "x.gz", sha256(content), UNREACHABLE).name == "x.gz"


def test_file_url_mirror_downloads_atomically_into_the_cache(tmp_path, monkeypatch):
    write(tmp_path / "m" / "toy" / "a.bin", b"payload")
    monkeypatch.setenv("CNN_DATA_MIRROR", (tmp_path / "m").as_uri())
    path = D.fetch("toy", "a.bin", sha256(b"payload"), UNREACHABLE)
    assert path == tmp_path / "cache" / "toy" / "a.bin" and path.read_bytes() == b"payload"
    assert os.listdir(path.parent) == ["a.bin"]               # no temporary file left behind
    # Once cached, the file is used without any source at all.
    monkeypatch.delenv("CNN_DATA_MIRROR")
    assert D.fetch("toy", "a.bin", sha256(b"payload"), UNREACHABLE) == path


def test_download_with_wrong_checksum_leaves_no_file(tmp_path, monkeypatch):
    write(tmp_path / "m" / "toy" / "a.bin", b"tampered")
    monkeypatch.setenv("CNN_DATA_MIRROR", (tmp_path / "m").as_uri())
    with pytest.raises(DatasetError, match="checksum"):
        D.fetch("toy", "a.bin", sha256(b"payload"), UNREACHABLE)
    assert os.listdir(tmp_path / "cache" / "toy") == []


def test_download_works_without_tqdm(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)            # makes `from tqdm import tqdm` fail
    write(tmp_path / "m" / "toy" / "a.bin", b"payload")
    monkeypatch.setenv("CNN_DATA_MIRROR", (tmp_path / "m").as_uri())
    assert D.fetch("toy", "a.bin", sha256(b"payload"), UNREACHABLE).read_bytes() == b"payload"


def test_http_mirror_download_and_404(tmp_path, monkeypatch):
    write(tmp_path / "m" / "toy" / "a.bin", b"over http")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "m"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("CNN_DATA_MIRROR", f"http://127.0.0.1:{server.server_port}/")
        assert D.fetch("toy", "a.bin", sha256(b"over http"), ()).read_bytes() == b"over http"
        with pytest.raises(DatasetError, match="404") as info:
            D.fetch("toy", "gone.bin", sha256(b""), ())
        assert "attempt 2" not in str(info.value)             # a 404 is not retried
    finally:
        server.shutdown()
        server.server_close()


def test_corrupt_cached_file_is_moved_aside_and_downloaded_again(tmp_path, monkeypatch):
    content = b"good content"
    cached = write(tmp_path / "cache" / "toy" / "a.gz", gzip.compress(b"bad content"))
    write(tmp_path / "m" / "toy" / "a.gz", gzip.compress(content))
    monkeypatch.setenv("CNN_DATA_MIRROR", (tmp_path / "m").as_uri())
    with pytest.warns(UserWarning, match="corrupt"):
        path = D.fetch("toy", "a.gz", sha256(content), UNREACHABLE)
    assert path == cached and gzip.decompress(path.read_bytes()) == content
    assert gzip.decompress((cached.parent / "a.gz.corrupt").read_bytes()) == b"bad content"


def test_truncated_cached_gzip_offline_is_never_used(tmp_path):
    data = gzip.compress(b"x" * 100_000 + bytes(range(256)) * 100)
    cached = write(tmp_path / "cache" / "toy" / "a.gz", data[:-20])
    with pytest.warns(UserWarning, match="a.gz is corrupt"), pytest.raises(DatasetError, match="CNN_DATA_MIRROR"):
        D.fetch("toy", "a.gz", sha256(gzip.decompress(data)), ["http://127.0.0.1:9/a.gz"])
    assert not cached.exists() and (cached.parent / "a.gz.corrupt").exists()


def test_offline_without_mirror_says_how_to_fix_it():
    with pytest.raises(DatasetError, match="CNN_DATA_MIRROR") as info:
        D.load_mnist()
    assert "mnist/train-images-idx3-ubyte.gz" in str(info.value) and "127.0.0.1:9" in str(info.value)
    with pytest.raises(DatasetError, match="only available from a mirror.*CNN_DATA_MIRROR"):
        I.load_cifar10_jpeg()


# ---------------------------------------------------------------- MNIST loader, split, normalisation

def test_load_mnist_shapes_dtypes_and_disjoint_split(fake_mnist):
    ds = D.load_mnist(normalize=None, validation_size=10)
    assert ds.x_train.shape == (40, 1, 28, 28) and ds.x_val.shape == (10, 1, 28, 28)
    assert ds.x_test.shape == (20, 1, 28, 28) and ds.x_train.dtype == np.uint8
    assert ds.y_train.dtype == np.int64 and ds.y_train.shape == (40,) and ds.class_names == tuple("0123456789")
    train_ids, val_ids = ds.x_train[:, 0, 0, 0], ds.x_val[:, 0, 0, 0]       # pixel (0, 0) = image index
    assert sorted(np.concatenate([train_ids, val_ids]).tolist()) == list(range(50))
    assert np.array_equal(ds.y_train, train_ids % 10) and np.array_equal(ds.y_val, val_ids % 10)
    assert "(40, 1, 28, 28)" in repr(ds) and "val" in ds.summary()


def test_validation_split_is_seeded(fake_mnist):
    val = [D.load_mnist(normalize=None, validation_size=10, seed=s).x_val[:, 0, 0, 0] for s in (0, 0, 1)]
    assert np.array_equal(val[0], val[1]) and not np.array_equal(val[0], val[2])
    empty = D.load_mnist(validation_size=0)
    assert empty.x_val.shape == (0, 1, 28, 28) and empty.y_val.shape == (0,) and len(empty.x_train) == 50


def test_normalisation_modes(fake_mnist):
    raw = D.load_mnist(normalize=None, validation_size=10)
    unit = D.load_mnist(normalize="unit", validation_size=10, dtype=np.float64)
    std = D.load_mnist(normalize="standard", validation_size=10)
    assert unit.x_train.dtype == np.float64 and std.x_train.dtype == np.float32
    assert np.allclose(unit.x_test, raw.x_test / 255) and 0 <= unit.x_train.min() and unit.x_train.max() <= 1
    # Statistics from the training split only (not validation, not test).
    scaled = raw.x_train / 255
    mean, sd = scaled.mean(), scaled.std()
    for split in ("train", "val", "test"):
        expected = (getattr(raw, f"x_{split}") / 255 - mean) / sd
        assert np.allclose(getattr(std, f"x_{split}"), expected, atol=1e-5)
    assert abs(std.x_train.mean()) < 1e-5 and abs(std.x_train.std() - 1) < 1e-5


@pytest.mark.parametrize("kwargs", [dict(normalize="zscore"), dict(validation_size=-1),
                                    dict(validation_size=50), dict(dtype=np.int32), dict(dataset="kmnist")])
def test_bad_arguments_raise_value_error(fake_mnist, kwargs):
    with pytest.raises(ValueError):
        D.load_mnist(**kwargs)


def test_mismatched_image_and_label_counts(tmp_path, monkeypatch, fake_mnist):
    raw = idx_bytes(np.zeros(7, dtype=np.uint8))
    write(fake_mnist / "mnist" / "t10k-labels-idx1-ubyte.gz", gzip.compress(raw))
    monkeypatch.setitem(D.CHECKSUMS["mnist"], "t10k-labels-idx1-ubyte.gz", sha256(raw))
    with pytest.raises(DatasetError, match="do not match"):
        D.load_mnist()


# ---------------------------------------------------------------- CIFAR-10 python format

def make_fake_cifar(path, per_batch=2):
    """cifar-10-python.tar.gz in the official layout; the first training image has known pixels."""
    def batch(first_label):
        data = np.zeros((per_batch, 3072), dtype=np.uint8)
        labels = [(first_label + i) % 10 for i in range(per_batch)]
        return {b"data": data, b"labels": labels, b"batch_label": b"fake"}
    batches = {f"data_batch_{i}": batch(i) for i in range(1, 6)}
    batches["data_batch_1"][b"data"][0, 0] = 200            # R plane, pixel (0, 0)
    batches["data_batch_1"][b"data"][0, 1024 + 5] = 100     # G plane, pixel (0, 5)
    batches["data_batch_1"][b"data"][0, 2048 + 32] = 50     # B plane, pixel (1, 0)
    batches["test_batch"] = batch(7)
    batches["batches.meta"] = {b"label_names": [n.encode() for n in D.CLASS_NAMES["cifar10"]]}
    with tarfile.open(path, "w:gz") as archive:
        for name, obj in batches.items():
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_load_cifar10_official_pickle_format(tmp_path, monkeypatch):
    archive = tmp_path / "m" / "cifar10" / "cifar-10-python.tar.gz"
    archive.parent.mkdir(parents=True)
    monkeypatch.setitem(D.CHECKSUMS["cifar10"], archive.name, make_fake_cifar(archive))
    monkeypatch.setenv("CNN_DATA_MIRROR", str(tmp_path / "m"))
    ds = D.load_cifar10(normalize=None, validation_size=0)
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.x_test.shape == (2, 3, 32, 32)
    assert ds.x_train[0, 0, 0, 0] == 200 and ds.x_train[0, 1, 0, 5] == 100 and ds.x_train[0, 2, 1, 0] == 50
    assert ds.x_train.sum() == 350
    assert ds.y_train.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6] and ds.y_test.tolist() == [7, 8]
    assert ds.class_names[0] == "airplane" and ds.class_names[-1] == "truck"
    std = D.load_cifar10(normalize="standard", validation_size=2)
    assert np.allclose(std.x_train.mean(axis=(0, 2, 3)), 0, atol=1e-5)     # per-channel statistics
    assert np.allclose(std.x_train.std(axis=(0, 2, 3)), 1, atol=1e-4)


def test_cifar10_archive_without_a_batch_is_rejected(tmp_path, monkeypatch):
    archive = tmp_path / "m" / "cifar10" / "cifar-10-python.tar.gz"
    with tarfile.open(write(archive, b""), "w:gz") as tar:
        tar.addfile(tarfile.TarInfo("cifar-10-batches-py/readme.html"), io.BytesIO())
    monkeypatch.setitem(D.CHECKSUMS["cifar10"], archive.name, hashlib.md5(archive.read_bytes()).hexdigest())
    monkeypatch.setenv("CNN_DATA_MIRROR", str(tmp_path / "m"))
    with pytest.raises(DatasetError, match="data_batch_1") as info:
        D.load_cifar10()
    assert "cifar-10-python.tar.gz" in str(info.value)


# ---------------------------------------------------------------- the real files, when a mirror is here

needs_mirror = pytest.mark.skipif(not (REAL_MIRROR / "mnist").is_dir(),
                                  reason=f"no dataset mirror at {REAL_MIRROR} (set CNN_DATA_MIRROR)")


@needs_mirror
def test_real_mnist(monkeypatch):
    monkeypatch.setenv("CNN_DATA_MIRROR", str(REAL_MIRROR))
    ds = D.load_mnist(normalize=None)
    assert ds.x_train.shape == (55000, 1, 28, 28) and ds.x_val.shape == (5000, 1, 28, 28)
    assert ds.x_test.shape == (10000, 1, 28, 28) and set(ds.y_test.tolist()) == set(range(10))
    counts = np.bincount(np.concatenate([ds.y_train, ds.y_val]), minlength=10)
    assert counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@needs_mirror
def test_real_fashion_mnist_and_cifar10_jpeg_archive(monkeypatch):
    monkeypatch.setenv("CNN_DATA_MIRROR", str(REAL_MIRROR))
    ds = D.load_fashion_mnist(validation_size=0, normalize=None)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10 and len(ds.x_test) == 10000
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    # Only verify the CIFAR-10 JPEG archive: decoding its 60,000 images is too slow for a test.
    assert D.fetch("cifar10-jpeg", "cifar10-jpeg.tar.gz", D.CHECKSUMS["cifar10-jpeg"]
                          ["cifar10-jpeg.tar.gz"], ()).is_file()


# ---------------------------------------------------------------- broken servers, leftover temporary files

class BrokenHandler(http.server.BaseHTTPRequestHandler):
    """Answers every GET as the server's `mode` says: "truncated" announces 100,000 bytes and
    closes after 1,000; "chunked" sends one chunk and closes before the last (IncompleteRead);
    "garbage" is no HTTP at all (BadStatusLine); "silent" closes without a word
    (RemoteDisconnected); "good" sends `server.payload`."""

    def do_GET(self):
        mode, self.close_connection = self.server.mode, True
        if mode == "chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"3e8\r\n" + b"x" * 1000 + b"\r\n")
        elif mode == "garbage":
            self.wfile.write(b"HELLO THIS IS NOT HTTP\r\n\r\n")
        elif mode in ("truncated", "good"):
            body = self.server.payload if mode == "good" else b"x" * 1000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) if mode == "good" else 100_000))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def serve(monkeypatch):
    """serve(mode, payload) -> base URL of a server on 127.0.0.1 (stopped after the test)."""
    monkeypatch.setattr(D, "TIMEOUT", 5)
    servers = []

    def start(mode, payload=b""):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), BrokenHandler)
        server.mode, server.payload = mode, payload
        threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("mode,cause", [
    ("truncated", r"closed the connection in the middle of the file \(1,000 of 100,000 bytes received\)"),
    ("chunked", r"closed the connection in the middle of the file \(IncompleteRead\(1000 bytes read"),
    ("garbage", "did not answer with valid HTTP \\(BadStatusLine"),
    ("silent", "did not answer with valid HTTP \\(RemoteDisconnected"),
])
def test_a_broken_server_gives_a_dataset_error_naming_url_cause_and_mirror(tmp_path, serve, mode, cause):
    url = serve(mode) + "toy/a.bin"
    with pytest.raises(DatasetError, match=cause) as info:
        D.fetch("toy", "a.bin", sha256(b"payload"), [url])
    message = str(info.value)
    assert f"{url} (attempt 1)" in message and f"{url} (attempt 2)" in message
    assert "could not download toy/a.bin" in message and "Set CNN_DATA_MIRROR=" in message
    assert os.listdir(tmp_path / "cache" / "toy") == []        # no partial or temporary file left


def test_a_broken_server_moves_on_to_the_next_source(tmp_path, serve):
    urls = [serve(mode) + "a.bin" for mode in ("truncated", "chunked", "garbage", "silent")]
    urls.append(serve("good", b"payload") + "a.bin")
    path = D.fetch("toy", "a.bin", sha256(b"payload"), urls)
    assert path.read_bytes() == b"payload" and os.listdir(path.parent) == ["a.bin"]


def test_temporary_files_left_by_a_killed_download_are_cleared_on_the_next_run(tmp_path, monkeypatch):
    folder = tmp_path / "cache" / "toy"
    stale, live = write(folder / ".a.bin.k3x_9q0z.tmp", b"half"), write(folder / ".a.bin.abcd1234.tmp", b"live")
    others = [write(folder / ".b.bin.k3x_9q0z.tmp", b"other file"), write(folder / "notes.tmp", b"not ours")]
    hour_ago = stale.stat().st_mtime - D.STALE_AFTER - 60
    for path in (stale, *others):
        os.utime(path, (hour_ago, hour_ago))
    write(tmp_path / "m" / "toy" / "a.bin", b"payload")
    monkeypatch.setenv("CNN_DATA_MIRROR", (tmp_path / "m").as_uri())
    with pytest.warns(UserWarning, match=r"removed 1 temporary file.*\.a\.bin\.k3x_9q0z\.tmp"):
        assert D.fetch("toy", "a.bin", sha256(b"payload"), UNREACHABLE).read_bytes() == b"payload"
    # only stale files of this download's own naming go: a live one may belong to another process
    assert sorted(os.listdir(folder)) == sorted(["a.bin", live.name] + [p.name for p in others])
