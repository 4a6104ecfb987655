"""Datasets for the CNN-from-scratch project: MNIST, Fashion-MNIST and CIFAR-10
(folders of images are in ``cnn_images.py``).

Every loader returns a `Dataset` of NumPy arrays: images NCHW (N, C, H, W), labels int64 (N,).
For example `load_mnist().x_train` is float32 (55000, 1, 28, 28) in [0, 1].

Files are downloaded once, checked against a known checksum and cached in `data/<dataset>/`.
Offline, point the environment variable CNN_DATA_MIRROR at a folder (or base URL) laid out
as `<mirror>/<dataset>/<filename>`, e.g. `CNN_DATA_MIRROR=../shared/datasets` (relative
paths start from this file's folder).
Every failure raises `DatasetError` with a message that says what to do: a download that
fails in any way (no connection, timeout, HTTP error, a connection dropped mid-file, a garbled
answer, a wrong checksum) moves on to the next source and, when none is left, names every URL
tried, the cause, and how to use CNN_DATA_MIRROR. Downloads are written to a hidden
`.<filename>.<random>.tmp` file next to the target and renamed once verified; one left by a
killed process is deleted by the next fetch of that file (after STALE_AFTER seconds).
"""
import colorsys
import contextlib
import dataclasses
import gzip
import hashlib
import http.client
import io
import os
import pickle
import re
import struct
import tarfile
import time
import types
import urllib.error
import urllib.request
import warnings
import zlib
from pathlib import Path

import numpy as np

from cnn_files import atomic_write

PROJECT_DIR = Path(__file__).resolve().parent
DATA_DIR = PROJECT_DIR / "data"
MIRROR_ENV = "CNN_DATA_MIRROR"
DOWNLOAD_ATTEMPTS = 2      # per URL, before moving on to the next one
TIMEOUT = 30               # seconds without data before a download attempt is abandoned
CHUNK = 1 << 20            # bytes read at a time when downloading or hashing
STALE_AFTER = 3600         # seconds: an untouched temporary download file this old was left by a killed process

# Official download locations, tried in order: <base URL><filename>.
BASE_URLS = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/",
              "https://storage.googleapis.com/cvdf-datasets/mnist/",
              "http://yann.lecun.com/exdb/mnist/"),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                      "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/",),
    "cifar10-jpeg": (),    # not published anywhere official: only available through a mirror
}

# Hex digests: 64 digits = SHA-256, 32 = MD5 (CIFAR-10 publishes only an MD5).
# For a compressed single file (*.gz but not *.tar.gz) the digest is of the DECOMPRESSED bytes,
# because a faithful mirror may recompress a file without changing its content.
CHECKSUMS = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
    "cifar10": {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
    "cifar10-jpeg": {"cifar10-jpeg.tar.gz": "0bfcb68717a0ecb0d51ed61034906a773d48d424d94b766a46d7d1c55702a4d9"},
}

CLASS_NAMES = {
    "mnist": tuple("0123456789"),
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer",
                "dog", "frog", "horse", "ship", "truck"),
}

NORMALIZE_MODES = (None, "unit", "standard")


class DatasetError(RuntimeError):
    """A dataset file is missing, unreachable, corrupt or malformed; the message says what to do."""


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """Images x_* (N, C, H, W) and integer labels y_* int64 (N,) for train / validation / test."""
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple

    def summary(self):
        """A few lines with the shape and dtype of every array and the class names."""
        rows = [f"{len(self.class_names)} classes: {', '.join(self.class_names)}"]
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            rows.append(f"{split:<5}  x {x.shape} {x.dtype}   y {y.shape} {y.dtype}")
        return "\n".join(rows)

    def __repr__(self):
        return (f"Dataset(train={self.x_train.shape}, val={self.x_val.shape}, test={self.x_test.shape}, "
                f"dtype={self.x_train.dtype}, classes={len(self.class_names)})")


# ---------------------------------------------------------------- download and verification

def _progress_bar(**tqdm_kwargs):
    """A tqdm progress bar, or a silent stand-in with the same update() when tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        return contextlib.nullcontext(types.SimpleNamespace(update=lambda n=1: None))
    return tqdm(**tqdm_kwargs)


def live_progress_bar():
    """tqdm's bar class with an ETA for ``cnn_train.fit(progress=...)``: a widget in
    Jupyter, a text line in a terminal (``tqdm.auto``)."""
    from tqdm.auto import tqdm
    return tqdm


def _verify(path, checksum, name):
    """Raise DatasetError unless the file at `path` matches `checksum` (rules: see CHECKSUMS).

    `name` is the file's final name: it decides whether the content is gzip-decompressed first.
    """
    digest = hashlib.sha256() if len(checksum) == 64 else hashlib.md5()
    decompress = name.endswith(".gz") and not name.endswith(".tar.gz")
    try:
        with (gzip.open if decompress else open)(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DatasetError(f"{path} is corrupt: truncated or invalid gzip data ({exc})") from exc
    if digest.hexdigest() != checksum:
        raise DatasetError(f"{path} is corrupt: checksum {digest.hexdigest()} instead of {checksum}")


def _temporary_name_pattern(filename):
    """The names ``cnn_files.atomic_write`` gives its temporary files for `filename`:
    ``.<filename>.<8 random characters from tempfile>.tmp``."""
    return re.compile(rf"\.{re.escape(filename)}\.[a-z0-9_]{{8}}\.tmp")


def remove_stale_temporaries(target, max_age=STALE_AFTER):
    """Delete the temporary files a killed download of `target` left next to it.

    A download writes to ``.<name>.<random>.tmp`` and renames it when verified; an
    interrupted one deletes it, but a killed process cannot. Only files of that
    exact naming, untouched for `max_age` seconds (a live download writes every
    few seconds), are removed, so a download running in another process is safe.
    Returns the paths removed.
    """
    folder, pattern, removed = Path(target).parent, _temporary_name_pattern(Path(target).name), []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        try:
            if pattern.fullmatch(path.name) and time.time() - path.stat().st_mtime > max_age:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:
            pass                                  # another process removed it first
    if removed:
        warnings.warn(f"removed {len(removed)} temporary file(s) left by an interrupted download of "
                      f"{Path(target).name}: {', '.join(p.name for p in removed)}")
    return removed


def _describe_failure(exc):
    """One readable phrase for a failed download attempt (the cause, with its type)."""
    if isinstance(exc, (DatasetError, urllib.error.HTTPError)):
        return str(exc)
    if isinstance(exc, http.client.IncompleteRead):
        return f"the server closed the connection in the middle of the file ({exc!r})"
    if isinstance(exc, (http.client.BadStatusLine, http.client.RemoteDisconnected)):
        answer = str(exc).strip()[:100]           # the garbage line itself: quoted, at most 100 characters
        return f"the server did not answer with valid HTTP ({type(exc).__name__}: {answer!r})"
    return f"{type(exc).__name__}: {exc}"


def _content_length(response):
    """The announced size in bytes for the progress bar, or None (missing or not a number)."""
    try:
        return int(response.headers.get("Content-Length") or 0) or None
    except ValueError:
        return None


def _download(urls, target, checksum, where):
    """Download the first URL that yields a file with the right checksum to `target`.

    Every transport failure (refused or dropped connection, timeout, HTTP error,
    garbage or truncated answer, wrong checksum) moves on to the next attempt;
    the temporary file is deleted each time, so nothing partial is left behind.
    """
    failures = []
    for url in urls:
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            try:
                with atomic_write(target, check=lambda tmp: _verify(tmp, checksum, target.name)) as out, \
                        urllib.request.urlopen(url, timeout=TIMEOUT) as response:
                    size, received = _content_length(response), 0
                    with _progress_bar(total=size, unit="B", unit_scale=True, desc=target.name) as bar:
                        while chunk := response.read(CHUNK):
                            out.write(chunk)
                            received += len(chunk)
                            bar.update(len(chunk))
                    # http.client's read(n) returns b"" when the server hangs up early, as if the file
                    # had ended: say so plainly rather than report a checksum mismatch.
                    if size is not None and received < size:
                        raise DatasetError(f"the server closed the connection in the middle of the file "
                                           f"({received:,} of {size:,} bytes received)")
                return
            # URLError, HTTPError, timeouts and dropped connections are OSErrors; a truncated or
            # garbled HTTP answer is an http.client.HTTPException; a malformed URL a ValueError.
            except (OSError, http.client.HTTPException, ValueError, DatasetError) as exc:
                failures.append(f"  {url} (attempt {attempt}): {_describe_failure(exc)}")
                if isinstance(exc, urllib.error.HTTPError) and exc.code < 500:
                    break                             # "404 Not Found" will not change on a retry
    if not urls:
        raise DatasetError(f"{where} has no official download URL: it is only available from a mirror. "
                           f"Set {MIRROR_ENV}=/path/to/folder containing {where}.")
    raise DatasetError(f"could not download {where}:\n" + "\n".join(failures) + "\n"
                       f"Offline? Set {MIRROR_ENV}=/path/to/folder containing {where} (or a base URL), "
                       f"or copy a good copy of the file to {target}.")


def fetch(dataset, filename, checksum, urls, data_dir=None):
    """Return the path of a verified local copy of `<dataset>/<filename>`.

    checksum: hex SHA-256 (64 digits) or MD5 (32 digits); of the decompressed bytes for *.gz
    files that are not *.tar.gz. urls: full URLs tried in order when there is no mirror.
    With CNN_DATA_MIRROR set to a folder (relative paths start from the project folder),
    the mirror's file is verified and used in place;
    set to a URL (http://, https://, file://), `<mirror>/<dataset>/<filename>` replaces `urls`.
    Otherwise the file is cached at `<data_dir>/<dataset>/<filename>` (default: DATA_DIR).
    """
    where = f"{dataset}/{filename}"
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if mirror and "://" not in mirror:
        # Relative to the project folder, not the working directory, so notebooks/ finds it too.
        path = PROJECT_DIR / Path(mirror).expanduser() / dataset / filename
        if not path.is_file():
            raise DatasetError(f"{MIRROR_ENV}={mirror} has no {where} (looked for {path}). Put the file "
                               f"there, or unset {MIRROR_ENV} to download from the official sites.")
        try:
            _verify(path, checksum, filename)
        except DatasetError as exc:
            raise DatasetError(f"{exc}. Replace the mirror's copy with a good one.") from exc
        return path
    if mirror:
        urls = [f"{mirror.rstrip('/')}/{dataset}/{filename}"]
    target = Path(data_dir or DATA_DIR) / dataset / filename
    remove_stale_temporaries(target)
    if target.exists():
        try:
            _verify(target, checksum, filename)
            return target
        except DatasetError as exc:
            # Never use a bad cached file: keep it aside for inspection and download it once more.
            os.replace(target, target.with_name(target.name + ".corrupt"))
            warnings.warn(f"{exc}; moved it to {target.name}.corrupt and downloading it again")
    _download(urls, target, checksum, where)
    return target


def _fetch_known(dataset, filename, data_dir):
    """fetch() a file listed in CHECKSUMS from its official locations."""
    urls = [base + filename for base in BASE_URLS[dataset]]
    return fetch(dataset, filename, CHECKSUMS[dataset][filename], urls, data_dir)


# ---------------------------------------------------------------- shared split + normalisation

def _check_options(normalize, validation_size, dtype):
    """ValueError for bad loader arguments, raised before any slow download or decoding."""
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, not {normalize!r}")
    if not isinstance(validation_size, (int, np.integer)) or validation_size < 0:
        raise ValueError(f"validation_size must be an integer >= 0, not {validation_size!r}")
    if normalize is not None and not np.issubdtype(np.dtype(dtype), np.floating):
        raise ValueError(f"dtype must be a floating type when normalize={normalize!r}, not {dtype!r}")


def _channel_stats(x):
    """Per-channel mean and std, shape (1, C, 1, 1), on the 0..1 scale, of uint8 images x (N, C, H, W).

    Computed exactly from a histogram of the 256 possible pixel values, so no float copy
    of the whole training set is needed.
    """
    values = np.arange(256) / 255.0
    hist = np.stack([np.bincount(x[:, c].ravel(), minlength=256) for c in range(x.shape[1])])
    p = hist / hist.sum(axis=1, keepdims=True)                   # (C, 256) pixel-value frequencies
    mean = p @ values
    std = np.sqrt((p * (values - mean[:, None]) ** 2).sum(axis=1))
    std[std == 0] = 1.0                  # a constant channel: avoid dividing by zero
    return mean.reshape(1, -1, 1, 1), std.reshape(1, -1, 1, 1)


def _make_dataset(x_train, y_train, x_test, y_test, class_names, normalize, validation_size, seed, dtype):
    """Split a validation set off the training set, then normalise: the step every loader shares.

    x_*: uint8 (N, C, H, W); y_*: int64 (N,). The last `validation_size` images of a seeded
    random permutation become the validation set; both parts keep the original file order.
    "standard" statistics come from the remaining training images only, so nothing is
    learnt from validation or test images.
    """
    n = len(x_train)
    if validation_size >= n:
        raise ValueError(f"validation_size={validation_size} must be smaller than the {n} training images")
    order = np.random.default_rng(seed).permutation(n)
    train, val = np.sort(order[:n - validation_size]), np.sort(order[n - validation_size:])
    xs = [x_train[train], x_train[val], x_test]
    if normalize is not None:
        dtype = np.dtype(dtype)
        if normalize == "standard":
            mean, std = (s.astype(dtype) for s in _channel_stats(xs[0]))
        xs = [x.astype(dtype) for x in xs]
        for x in xs:                          # in place: no second float copy of the data
            x /= 255
            if normalize == "standard":
                x -= mean
                x /= std
    return Dataset(xs[0], y_train[train], xs[1], y_train[val], xs[2], y_test, tuple(class_names))


# ---------------------------------------------------------------- MNIST and Fashion-MNIST

def read_idx(path):
    """Read an IDX file (raw or .gz) of unsigned bytes: uint8 array (N,) for labels, (N, H, W) for images."""
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = bytearray(f.read())         # bytearray: the returned array is writable
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DatasetError(f"{path} is corrupt: truncated or invalid gzip data ({exc}); delete it and retry") from exc
    # Header: two zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions,
    # then one big-endian uint32 per dimension. 0x00000801 = labels, 0x00000803 = images.
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] not in (1, 3):
        raise DatasetError(f"{path} is not an IDX file of uint8 labels or images "
                           f"(magic {bytes(raw[:4]).hex()}, expected 00000801 or 00000803); delete it and retry")
    header = 4 + 4 * raw[3]
    dims = struct.unpack(f">{raw[3]}I", raw[4:header]) if len(raw) >= header else ()
    if len(dims) != raw[3] or len(raw) != header + int(np.prod(dims)):
        raise DatasetError(f"{path} is truncated or malformed: {len(raw)} bytes do not match "
                           f"the header's shape {dims}; delete it and retry")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def load_mnist(normalize="unit", validation_size=5000, seed=0, dtype=np.float32, data_dir=None, dataset="mnist"):
    """MNIST (or Fashion-MNIST with dataset="fashion-mnist") as a Dataset.

    Images (N, 1, 28, 28): uint8 0..255 if normalize is None, else `dtype` scaled to [0, 1]
    ("unit") or standardised with the training split's mean and std ("standard").
    60,000 training images split into 60,000 - validation_size train and validation_size
    validation images; 10,000 test images. Labels int64 (N,) in 0..9.
    """
    if dataset not in ("mnist", "fashion-mnist"):
        raise ValueError(f"dataset must be 'mnist' or 'fashion-mnist', not {dataset!r}")
    _check_options(normalize, validation_size, dtype)
    arrays = []
    for split in ("train", "t10k"):
        images = read_idx(_fetch_known(dataset, f"{split}-images-idx3-ubyte.gz", data_dir))
        labels = read_idx(_fetch_known(dataset, f"{split}-labels-idx1-ubyte.gz", data_dir))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(f"{dataset} {split} files do not match: images {images.shape}, labels "
                               f"{labels.shape}; delete the folder {dataset}/ in the cache and retry")
        arrays += [images[:, None], labels.astype(np.int64)]   # add the channel axis: NCHW
    return _make_dataset(*arrays, CLASS_NAMES[dataset], normalize, validation_size, seed, dtype)


def load_fashion_mnist(**kwargs):
    """Fashion-MNIST: same format and arguments as load_mnist; classes in CLASS_NAMES["fashion-mnist"]."""
    return load_mnist(dataset="fashion-mnist", **kwargs)


# ---------------------------------------------------------------- CIFAR-10 (official python version)

def _read_cifar10_tar(path):
    """Read cifar-10-python.tar.gz without extracting it.

    Returns x_train uint8 (50000, 3, 32, 32), y_train int64 (50000,), x_test, y_test, class_names.
    """
    train_batches = [f"data_batch_{i}" for i in range(1, 6)]
    try:
        with tarfile.open(path) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            # pickle can run code: acceptable only because the archive's checksum was verified.
            batches = {name: pickle.load(tar.extractfile(members[name]), encoding="bytes")
                       for name in train_batches + ["test_batch", "batches.meta"]}
        arrays = []
        for names in (train_batches, ["test_batch"]):
            # Each 3072-byte row holds the 1024 red pixels, then green, then blue, each plane
            # row by row: reshaping to (3, 32, 32) gives channel-first images directly.
            arrays.append(np.concatenate([batches[n][b"data"] for n in names]).reshape(-1, 3, 32, 32))
            arrays.append(np.concatenate([batches[n][b"labels"] for n in names]).astype(np.int64))
        return (*arrays, tuple(name.decode() for name in batches["batches.meta"][b"label_names"]))
    except (tarfile.TarError, EOFError, zlib.error, OSError, pickle.UnpicklingError, KeyError, ValueError) as exc:
        raise DatasetError(f"{path} is corrupt or not the official CIFAR-10 archive ({exc!r}); "
                           f"delete it and retry") from exc


def load_cifar10(normalize="unit", validation_size=5000, seed=0, dtype=np.float32, data_dir=None):
    """CIFAR-10 from the official cifar-10-python.tar.gz as a Dataset; images (N, 3, 32, 32).

    Same arguments as load_mnist; "standard" uses per-channel statistics. 50,000 training
    and 10,000 test images. Offline with only the shared mirror, use load_cifar10_jpeg().
    """
    _check_options(normalize, validation_size, dtype)
    path = _fetch_known("cifar10", "cifar-10-python.tar.gz", data_dir)
    return _make_dataset(*_read_cifar10_tar(path), normalize, validation_size, seed, dtype)


# ---------------------------------------------------------------------------
# Image files: decoding (for cnn_images' folders) and drawing the example images
# (Pillow, imported only when an image is decoded or drawn)
# ---------------------------------------------------------------------------

def _to_rgb(image):
    """Any Pillow image -> mode RGB: 16-bit and 32-bit grey scaled (not clipped) to 8 bits, float
    grey taken as 0..1, transparent pixels composited over white, CMYK/palette/grey converted."""
    from PIL import Image
    if image.mode.startswith("I"):             # "I;16", "I;16B" (16-bit PNG, TIFF, PGM) and "I" (32-bit)
        x = np.clip(np.asarray(image).astype(np.int64), 0, 65535)    # 0..65535 -> 0..255, rounded
        image = Image.fromarray(((x * 255 + 32767) // 65535).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.round(np.clip(np.asarray(image), 0, 1) * 255).astype(np.uint8))
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        # Dropping alpha would show whatever colour the invisible pixels happen to store.
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_image(data, size):
    """Image bytes (any format Pillow reads) -> uint8 RGB (H, W, 3), turned upright by its EXIF
    orientation and resized to size=(h, w) (bilinear) if given; ``cnn_images`` decodes folders with it."""
    from PIL import Image, ImageOps
    with Image.open(io.BytesIO(data)) as image:
        if size is not None:
            image.draft(None, (2 * size[1], 2 * size[0]))     # JPEG: decode at 1/2, 1/4, 1/8 if still >= 2x
        if image.getexif().get(0x0112, 1) != 1:               # EXIF orientation: phone photos lie on their side
            image = ImageOps.exif_transpose(image)
        image = _to_rgb(image)
        if size is not None and image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)    # PIL wants (width, height)
        return np.asarray(image)


EXAMPLE_SHAPES = ("circle", "square", "triangle", "cross")


def example_image(label, num_classes, size, rng):
    """A shape (EXAMPLE_SHAPES[label % 4]) of a class-dependent hue (label / num_classes, give
    or take 0.05) at a random place, size and brightness on a noisy background of random colour:
    learnable, but not from any one pixel."""
    from PIL import Image, ImageDraw
    background = rng.integers(60, 200, size=3)
    pixels = np.clip(background + rng.normal(0, 20, size=(size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    hue = label / num_classes + rng.uniform(-0.05, 0.05)
    colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue % 1, 0.9, rng.uniform(0.6, 1.0)))
    r = rng.uniform(0.2, 0.35) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    box = (cx - r, cy - r, cx + r, cy + r)
    draw, shape = ImageDraw.Draw(image), EXAMPLE_SHAPES[label % len(EXAMPLE_SHAPES)]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        draw.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=colour)
        draw.rectangle((cx - r / 3, cy - r, cx + r / 3, cy + r), fill=colour)
    return image
