"""Folders of images (and .zip / .tar.gz archives of them) as a ``Dataset``:
decoding with Pillow, class folders, a cache of the decoded arrays, and the
JPEG re-encoded CIFAR-10 copy of the offline mirror."""
import hashlib
import io
import tarfile
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

import cnn_data as D
from cnn_data import DatasetError
from cnn_files import atomic_write

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
SPLITS = ("train", "test")



def _entries(path):
    """Yield (member name with "/" separators, read) for a folder, .zip or .tar(.gz) archive.

    read() returns the file's bytes, or read is None for a directory. Call it before
    advancing: a compressed tar is read sequentially, never extracted to disk.
    """
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            yield p.relative_to(path).as_posix(), None if p.is_dir() else p.read_bytes
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                yield info.filename, None if info.is_dir() else (lambda info=info: archive.read(info))
    elif tarfile.is_tarfile(path):
        with tarfile.open(path) as archive:
            for m in archive:
                if m.isdir() or m.isfile():
                    yield m.name, None if m.isdir() else (lambda m=m: archive.extractfile(m).read())
    else:
        raise DatasetError(f"{path} is not a folder, .zip or .tar(.gz) archive")


def _parse_member(name, is_dir):
    """'[top/]train/<class>/<file>' -> (split, class, file); a class folder -> (split, class, None); else None."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):    # hidden files, macOS zip debris
        return None
    depth = 2 if is_dir else 3
    if len(parts) == depth + 1 and parts[0] not in SPLITS:          # one wrapping top-level folder
        parts = parts[1:]
    if len(parts) != depth or parts[0] not in SPLITS:
        return None
    return parts[0], parts[1], None if is_dir else parts[2]


def _decode_image(data, name, size):
    """Decode image bytes to uint8 RGB (H, W, 3), resized bilinearly to size=(h, w) if given."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            if size is not None:
                image = image.resize((size[1], size[0]), Image.BILINEAR)   # PIL wants (width, height)
            return np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot decode image {name} ({exc}); remove or replace this file") from exc


def _read_image_folder(path, size):
    """Decode every train/ and test/ image: (x_train, y_train, x_test, y_test, class_names), x uint8 NCHW."""
    found = {split: {} for split in SPLITS}       # split -> class -> [(member name, image)]
    try:
        with D._progress_bar(desc=f"decoding {path.name}", unit=" images") as bar:
            for name, read in _entries(path):
                parsed = _parse_member(name, is_dir=read is None)
                if parsed is None:
                    continue
                split, label, filename = parsed
                images = found[split].setdefault(label, [])
                if filename and Path(filename).suffix.lower() in IMAGE_EXTENSIONS:
                    images.append((name, _decode_image(read(), f"{path}:{name}", size)))
                    bar.update()
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as exc:
        raise DatasetError(f"cannot read {path} ({exc}); it may be truncated: replace it and retry") from exc

    class_names = tuple(sorted(found["train"]))
    if not class_names or set(found["test"]) != set(class_names):
        raise DatasetError(f"{path} must hold train/<class>/<image> and test/<class>/<image> with the same "
                           f"class folders (optionally inside one top-level folder); found train/ classes "
                           f"{list(class_names)} and test/ classes {sorted(found['test'])}")
    examples = {image.shape: name for classes in found.values() for images in classes.values()
                for name, image in images}                # one file name per image size
    if len(examples) > 1:
        sizes = ", ".join(f"{name} is {w}x{h}" for (h, w, _), name in list(examples.items())[:3])
        raise DatasetError(f"{path}: images differ in size ({sizes} pixels); pass size=(h, w) to resize")
    arrays = []
    for split in SPLITS:
        items = []                            # (label, member name, image), sorted for a stable order
        for label, class_name in enumerate(class_names):
            if not found[split][class_name]:
                raise DatasetError(f"{path}: class folder {split}/{class_name} has no images {IMAGE_EXTENSIONS}")
            items += [(label, *item) for item in sorted(found[split][class_name], key=lambda item: item[0])]
        x = np.stack([image for _, _, image in items]).transpose(0, 3, 1, 2)    # NHWC -> NCHW
        arrays += [np.ascontiguousarray(x), np.array([label for label, _, _ in items], dtype=np.int64)]
    return (*arrays, class_names)


def _cache_path(path, size, data_dir):
    """data/image-folder-cache/<name>-<hash>.npz; the hash changes when the source files or size change."""
    path = path.resolve()
    files = [path] if path.is_file() else sorted(path.rglob("*"))
    stats = [(str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files]
    key = hashlib.sha256(repr((size, stats)).encode()).hexdigest()[:16]
    name = path.name.split(".")[0] or "images"
    return Path(data_dir or D.DATA_DIR) / "image-folder-cache" / f"{name}-{key}.npz"


def load_image_folder(path, size=None, normalize="unit", validation_size=0, seed=0, dtype=np.float32,
                      cache=True, data_dir=None):
    """A folder, .zip or .tar(.gz) laid out as train/<class>/<image> and test/<class>/<image> as a Dataset.

    Images (PNG, JPEG, ...) are decoded as RGB: x (N, 3, H, W), optionally resized to size=(h, w).
    Class names are the sorted class folder names; labels int64 index into them.
    Other arguments as in load_mnist. With cache=True the decoded uint8 arrays are kept in
    <data_dir>/image-folder-cache/ so later loads skip decoding.
    """
    path = Path(path)
    D._check_options(normalize, validation_size, dtype)
    if size is not None and (not isinstance(size, (tuple, list)) or len(size) != 2
                             or any(int(s) != s or s < 1 for s in size)):
        raise ValueError(f"size must be None or (height, width) in pixels, not {size!r}")
    if not path.exists():
        raise DatasetError(f"{path} does not exist; expected a folder or archive with train/ and test/")
    size = None if size is None else (int(size[0]), int(size[1]))
    cache_file = _cache_path(path, size, data_dir) if cache else None
    arrays = None
    if cache_file is not None and cache_file.exists():
        try:
            with np.load(cache_file) as z:
                arrays = (z["x_train"], z["y_train"], z["x_test"], z["y_test"], tuple(z["class_names"].tolist()))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            warnings.warn(f"ignoring unreadable cache {cache_file} ({exc}); decoding {path} again")
    if arrays is None:
        arrays = _read_image_folder(path, size)
        if cache_file is not None:
            with atomic_write(cache_file) as f:
                np.savez(f, **dict(zip(("x_train", "y_train", "x_test", "y_test"), arrays)),
                         class_names=np.array(arrays[4]))
    return D._make_dataset(*arrays, normalize, validation_size, seed, dtype)


def load_cifar10_jpeg(validation_size=5000, data_dir=None, **kwargs):
    """The JPEG re-encoded CIFAR-10 copy (cifar10-jpeg/cifar10-jpeg.tar.gz, mirror only) as a Dataset.

    Images (N, 3, 32, 32), 50,000 train (minus validation_size) and 10,000 test: the official
    classes and split but LOSSY pixels (about 5.8/255 mean error): report which copy you used.
    Keyword arguments as in load_image_folder. The sorted class folder names are the official
    class order (airplane ... truck), so labels match load_cifar10's.
    """
    path = D._fetch_known("cifar10-jpeg", "cifar10-jpeg.tar.gz", data_dir)
    return load_image_folder(path, validation_size=validation_size, data_dir=data_dir, **kwargs)
