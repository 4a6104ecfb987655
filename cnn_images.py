"""Folders of images (and .zip / .tar(.gz) archives of them) as a ``Dataset``,
the downsampled-ImageNet batch files, and the JPEG re-encoded CIFAR-10 copy.

``load_image_folder`` recognises these layouts, each given as a folder, a .zip or a
.tar(.gz), optionally inside one top-level folder, and says which one it found:

  flat class folders  <class>/<image>                  no split of its own: ``test_fraction``
                                                       (default 20 %) of each class becomes the test set
  train/test          train/<class>/<image>, test/<class>/<image>
  train/val           train/<class>/..., val/<class>/...   val/ is the test set (ImageNet's naming);
                      with train/, val/ and test/ all labelled, val/ is the validation set
  train only          train/<class>/...                 split like a flat folder; an unlabelled
                                                       test/ (no class folders) is ignored
  Tiny ImageNet       wnids.txt, words.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG labelled
                      by val/val_annotations.txt; val/ is the test set, the unlabelled test/ is ignored

Images may lie at any depth below their class folder. Every format Pillow reads is decoded
(IMAGE_EXTENSIONS) to uint8 RGB: grey and palette images are expanded, transparent pixels are
composited over white, CMYK is converted, 16-bit images are scaled to 8 bits, photos are turned
upright by their EXIF orientation. Images are kept as uint8 in memory and in the cache
(``<data_dir>/image-folder-cache/``, keyed by a hash of the files' bytes, not their path or
time), so a 100,000-image 64x64 set takes 1.2 GB instead of 4.9 GB as float32; ``fit``,
``evaluate`` and ``predict`` scale uint8 batches by 1/255 one batch at a time.
"""
import hashlib
import io
import os
import pickle
import re
import tarfile
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

import cnn_data as D
from cnn_data import EXAMPLE_SHAPES, DatasetError  # noqa: F401 (EXAMPLE_SHAPES re-exported)
from cnn_files import atomic_write, save_bytes
from cnn_layouts import IMAGE_EXTENSIONS, SPLIT_NAMES, TEST_FRACTION, _open_source, _plan  # noqa: F401 (re-exported)

AUTO_UINT8_BYTES = 1 << 30     # dtype="auto": keep uint8 when float32 arrays would take more than 1 GiB
CACHE_VERSION = 2          # part of the cache key: bump when decoding changes


# ---------------------------------------------------------------- decoding (cnn_data.decode_image)

def _decode(source, plan, size, where, unreadable):
    """Decode every planned image straight into preallocated uint8 arrays x[split] (N, 3, H, W)
    (no list of images and no second copy). Returns {"x_<split>": ..., "y_<split>": ...}."""
    slots = {name: (split, i) for split, items in plan.members.items() for i, (name, _) in enumerate(items)}
    x, first, bad = {}, None, {split: [] for split in plan.members}
    with D._progress_bar(total=len(slots), desc=f"decoding {where.name}", unit=" images",
                         disable=len(slots) < 1000) as bar:
        for name, data in source.read_all(list(slots)):
            split, i = slots[name]
            try:
                image = D.decode_image(data, size)
            except Exception as exc:                  # any failure inside Pillow: report the file, go on
                bad[split].append((i, f"{name} ({type(exc).__name__}: {exc})"))
                continue
            if first is None:
                first = (name, image.shape)
                x = {s: np.empty((len(items), 3) + image.shape[:2], np.uint8) for s, items in plan.members.items()}
            elif image.shape != first[1]:
                (h0, w0, _), (h, w, _) = first[1], image.shape
                raise DatasetError(f"{where}: images differ in size: {first[0]} is {w0}x{h0} pixels, {name} is "
                                   f"{w}x{h} (width x height); pass size=(h, w) to resize every image "
                                   f"(bilinear), e.g. size=({h0}, {w0})")
            x[split][i] = image.transpose(2, 0, 1)
            bar.update()
    failures = [message for split in bad for _, message in bad[split]]
    if failures and (unreadable == "raise" or first is None):
        raise DatasetError(f"{where}: {len(failures):,} of {len(slots):,} image files cannot be decoded: "
                           + "; ".join(failures[:5]) + ("; ..." if len(failures) > 5 else "")
                           + ". Remove or replace them, or pass unreadable='skip' to leave them out")
    if failures:
        warnings.warn(f"{where}: left out {len(failures):,} image files that cannot be decoded: "
                      + "; ".join(failures[:5]) + ("; ..." if len(failures) > 5 else ""))
    arrays = {}
    for split, items in plan.members.items():
        keep = np.ones(len(items), bool)
        keep[[i for i, _ in bad[split]]] = False
        if not keep.any():
            raise DatasetError(f"{where}: no image of the {split} split could be decoded")
        arrays[f"x_{split}"] = _take_rows(x[split], np.flatnonzero(keep))
        arrays[f"y_{split}"] = np.array([label for _, label in items], dtype=np.int64)[keep]
    return arrays


def _take_rows(x, rows):
    """x[rows] for increasing ``rows``, computed in place (no second copy of x): row j is
    filled from row rows[j] >= j, which no earlier step has overwritten. Returns a view."""
    if len(rows) == len(x):
        return x
    for j in range(0, len(rows), 1024):
        chunk = rows[j:j + 1024]
        x[j:j + len(chunk)] = x[chunk]
    return x[:len(rows)]


# ---------------------------------------------------------------- the cache, and the Dataset

def _cache_file(source, path, size, test_fraction, data_dir):
    """<data_dir>/image-folder-cache/<name>-<key>.npz, the key a SHA-256 of the source's bytes and
    of the options that change the arrays (not its path or modification time)."""
    digest = hashlib.sha256(repr((CACHE_VERSION, size, test_fraction)).encode())
    source.content_key(digest)
    name = path.name.split(".")[0] or "images"
    return Path(data_dir or D.DATA_DIR) / "image-folder-cache" / f"{name}-{digest.hexdigest()[:16]}.npz"


def _read_cache(cache_file):
    if not cache_file.exists():
        return None
    try:
        with np.load(cache_file) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["class_names"] = tuple(arrays["class_names"].tolist())
        arrays["layout"], arrays["notes"] = str(arrays["layout"]), arrays["notes"].tolist()
        return arrays
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        warnings.warn(f"ignoring unreadable cache {cache_file} ({exc}); decoding again")
        return None


def _write_cache(cache_file, arrays):
    # np.asarray, not np.array: a copy of the images would double the peak memory.
    with atomic_write(cache_file) as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


def _check_arguments(size, normalize, validation_size, dtype, test_fraction=None, unreadable="raise"):
    """ValueError for a bad argument, before any slow listing or decoding. Returns size as (h, w) or None."""
    if normalize not in D.NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {D.NORMALIZE_MODES}, not {normalize!r}")
    if not isinstance(validation_size, (int, np.integer)) or validation_size < 0:
        raise ValueError(f"validation_size must be an integer >= 0, not {validation_size!r}")
    if not (isinstance(dtype, str) and dtype == "auto"):
        kind = np.dtype(dtype)
        if kind != np.uint8 and not np.issubdtype(kind, np.floating):
            raise ValueError(f"dtype must be 'auto', np.uint8 or a float type, not {dtype!r}")
        if kind == np.uint8 and normalize == "standard":
            raise ValueError("normalize='standard' needs a float dtype: uint8 cannot hold standardised values")
    if test_fraction is not None and not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1 (exclusive), not {test_fraction!r}")
    if unreadable not in ("raise", "skip"):
        raise ValueError(f"unreadable must be 'raise' or 'skip', not {unreadable!r}")
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (size, size)
    if size is not None and (not isinstance(size, (tuple, list)) or len(size) != 2
                             or any(isinstance(s, bool) or int(s) != s or s < 1 for s in size)):
        raise ValueError(f"size must be None, an int or (height, width) in pixels, not {size!r}")
    return None if size is None else (int(size[0]), int(size[1]))


def _check_validation_size(n_train, has_val, validation_size, where):
    if has_val and validation_size:
        raise ValueError(f"{where} has its own val/ split (used as the validation set): "
                         f"leave validation_size=0, not {validation_size}")
    if validation_size >= n_train:
        raise ValueError(f"validation_size={validation_size} must be smaller than the {n_train:,} "
                         f"training images of {where}")


def _make_dataset(arrays, normalize, validation_size, seed, dtype, log):
    """Split a validation set off (in place, the same images as cnn_data's loaders would pick),
    then keep uint8 or convert to float (cnn_data's normalisation)."""
    x_train, y_train, x_test, y_test = (arrays[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    if "x_val" in arrays:
        x_val, y_val = arrays["x_val"], arrays["y_val"]
    else:
        n = len(x_train)
        order = np.random.default_rng(seed).permutation(n)
        train, val = np.sort(order[:n - validation_size]), np.sort(order[n - validation_size:])
        x_val, y_val = x_train[val], y_train[val]
        x_train, y_train = _take_rows(x_train, train), y_train[train]
    xs = [x_train, x_val, x_test]
    if isinstance(dtype, str) and dtype == "auto":
        float_bytes = 4 * sum(x.size for x in xs)
        dtype = np.uint8 if normalize == "unit" and float_bytes > AUTO_UINT8_BYTES else np.float32
        if dtype == np.uint8:
            log(f"  images kept as uint8 ({sum(x.nbytes for x in xs) / 1e9:.2f} GB; float32 would take "
                f"{float_bytes / 1e9:.1f} GB): fit, evaluate and predict scale each batch by 1/255")
    if normalize is not None and np.dtype(dtype) != np.uint8:
        if normalize == "standard":
            mean, std = (s.astype(dtype) for s in D._channel_stats(x_train))
        xs = [x.astype(dtype) for x in xs]
        for x in xs:                               # in place: no second float copy
            x /= 255
            if normalize == "standard":
                x -= mean
                x /= std
    return D.Dataset(xs[0], y_train, xs[1], y_val, xs[2], y_test, tuple(arrays["class_names"]))


def load_image_folder(path, size=None, normalize="unit", validation_size=0, seed=0, dtype="auto",
                      test_fraction=None, unreadable="raise", cache=True, data_dir=None, log=print):
    """A folder, .zip or .tar(.gz) of images in one of the layouts of this module's docstring, as a Dataset.

    Images become x (N, 3, H, W), RGB; all must have one size unless ``size=(h, w)`` (or an int)
    is given, which resizes every image with Pillow's bilinear filter (aspect ratio not kept).
    Class names are the sorted class folder names (Tiny ImageNet: readable names from words.txt);
    labels int64 index into them. Layouts without a test split get a stratified one:
    ``test_fraction`` (default TEST_FRACTION = 0.2) of each class, fixed by SPLIT_SEED, not ``seed``.

    ``dtype``: np.float32 (scaled as ``normalize`` says, as in load_mnist), np.uint8 (0..255:
    fit / evaluate / predict scale each batch by 1/255), or "auto" (default): float32 unless the
    float32 arrays would exceed AUTO_UINT8_BYTES (1 GiB), then uint8. ``normalize=None`` gives uint8.
    ``validation_size`` images of the training split (seeded by ``seed``) become the validation
    set, unless the folder has a val/ split of its own next to test/.
    ``unreadable="skip"`` leaves out (with a warning) files Pillow cannot decode instead of raising.
    With ``cache=True`` the decoded uint8 arrays are kept in <data_dir>/image-folder-cache/,
    keyed by a hash of the files' bytes, so a later load skips decoding. ``log(message)``
    receives which layout was found and what was ignored (None: silent).
    """
    path, log = Path(path), log or (lambda message: None)
    size = _check_arguments(size, normalize, validation_size, dtype, test_fraction, unreadable)
    if not path.exists():
        raise DatasetError(f"{path} does not exist; expected a folder or a .zip / .tar.gz of images")
    try:
        with _open_source(path) as source:
            cache_file = _cache_file(source, path, size, test_fraction, data_dir) if cache else None
            arrays = _read_cache(cache_file) if cache else None
            from_cache = arrays is not None
            if not from_cache:
                plan = _plan(source, path, test_fraction)
                _check_validation_size(len(plan.members["train"]), "val" in plan.members, validation_size, path)
                arrays = _decode(source, plan, size, path, unreadable)
                arrays.update(class_names=plan.class_names, layout=plan.layout, notes=plan.notes)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as exc:
        raise DatasetError(f"cannot read {path} ({exc}); it may be truncated: replace it and retry") from exc
    if cache and not from_cache:
        _write_cache(cache_file, arrays)
    counts = ", ".join(f"{len(arrays[f'y_{s}']):,} {s}" for s in SPLIT_NAMES if f"y_{s}" in arrays)
    log(f"{path.name}: {arrays['layout']}; {counts} images of {arrays['x_train'].shape[3]}x"
        f"{arrays['x_train'].shape[2]}" + (f" (decoded images from the cache {cache_file.name})"
                                           if from_cache else ""))
    for note in arrays["notes"]:
        log(f"  {note}")
    _check_validation_size(len(arrays["x_train"]), "x_val" in arrays, validation_size, path)
    return _make_dataset(arrays, normalize, validation_size, seed, dtype, log)


# ---------------------------------------------------------------- downsampled ImageNet (ImageNet32 / 64)

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and NumPy arrays only: a downloaded pickle cannot run code."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"),
               ("_codecs", "encode")}           # how protocol 2 stores bytes under Python 3

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only NumPy arrays are expected")
        module = module.replace("numpy.core.", "numpy._core.")
        return super().find_class(module, name)


def _read_batch(name, data):
    """One batch file (pickle or .npz) -> (images uint8 (N, 3, s, s), labels int64 (N,) from 0)."""
    try:
        if name.endswith(".npz"):
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                batch = {k: z[k] for k in z.files}
        else:
            batch = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
            batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        x, y = np.asarray(batch["data"]), np.asarray(batch["labels"]).astype(np.int64) - 1    # labels 1..1000
    except (pickle.UnpicklingError, ValueError, KeyError, EOFError, AttributeError, TypeError, OSError,
            zipfile.BadZipFile) as exc:
        raise DatasetError(f"{name} is not a downsampled-ImageNet batch file ({type(exc).__name__}: {exc})") from exc
    side = int(round((x.shape[1] / 3) ** 0.5)) if x.ndim == 2 else 0
    if x.dtype != np.uint8 or x.ndim != 2 or 3 * side * side != x.shape[1] or len(y) != len(x) or y.min() < 0:
        raise DatasetError(f"{name}: expected 'data' uint8 (N, 3*s*s) and N 'labels' from 1, found "
                           f"data {x.dtype} {x.shape} and {len(y)} labels")
    # Each row holds the red plane, then green, then blue, row by row (as in CIFAR-10): reshaping
    # gives channel-first images directly.
    return x.reshape(-1, 3, side, side), y


def load_imagenet_batches(paths, normalize="unit", validation_size=0, seed=0, dtype="auto",
                          num_classes=None, log=print):
    """Downsampled ImageNet (ImageNet32x32 / ImageNet64x64, Chrabaszcz et al. 2017) as a Dataset.

    ``paths``: one or several folders, .zip or .tar(.gz) files (the official downloads are one
    archive for training, one for validation) holding train_data_batch_1 ... train_data_batch_10
    and val_data, pickled or .npz: 'data' uint8 (N, 3*s*s) and 'labels' 1..1000. val_data is the
    test set. Class names come from a map_clsloc.txt among them ("n02119789 1 kit_fox"), else
    they are the label numbers "1" ... "1000". ``num_classes=k`` keeps the first k classes:
    all 1.28 million training images take 3.9 GB (32x32) or 15.7 GB (64x64) as uint8; each
    batch file is read whole before the other classes are dropped. Pickles are read by an
    unpickler that builds only arrays, so a tampered file cannot run code.
    Other arguments as in load_image_folder.
    """
    _check_arguments(None, normalize, validation_size, dtype)
    log = log or (lambda message: None)
    if num_classes is not None and (not isinstance(num_classes, (int, np.integer)) or num_classes < 1):
        raise ValueError(f"num_classes must be None or an integer >= 1, not {num_classes!r}")
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    found = {"train": [], "test": []}
    names = {}
    for path in paths:
        if not path.exists():
            raise DatasetError(f"{path} does not exist; expected a folder or archive of ImageNet32/64 batch files")
        with _open_source(path) as source:
            files = source.listing()[0]
            batches = sorted((int(m.group(1) or 0), n) for n in files
                             if (m := re.fullmatch(r"(?:.*/)?(?:train_data_batch_(\d+)|val_data)(?:\.npz)?", n)))
            for n in files:
                if n.rsplit("/", 1)[-1] == "map_clsloc.txt":
                    for line in source.read(n).decode().splitlines():
                        if len(fields := line.split()) >= 3:
                            names[int(fields[1]) - 1] = fields[2]
            for name, data in source.read_all([n for _, n in batches]):
                x, y = _read_batch(f"{path.name}:{name}", data)
                keep = slice(None) if num_classes is None else y < num_classes
                split = "test" if "val_data" in name else "train"
                found[split].append((x[keep], y[keep]))
                del x, y, data
    for split, parts in found.items():
        if not parts:
            raise DatasetError(f"no {'train_data_batch_<k>' if split == 'train' else 'val_data'} file in "
                               f"{', '.join(map(str, paths))}: pass the folders or archives holding both")
    arrays = {f"{xy}_{split}": np.concatenate([part[i] for part in parts])
              for split, parts in found.items() for i, xy in enumerate("xy")}
    k = int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1 if num_classes is None else num_classes
    arrays["class_names"] = tuple(names.get(i, str(i + 1)) for i in range(k))
    side = arrays["x_train"].shape[2]
    log(f"ImageNet{side}x{side} batch files: {k} classes, {len(arrays['y_train']):,} train and "
        f"{len(arrays['y_test']):,} test (val_data) images")
    _check_validation_size(len(arrays["x_train"]), False, validation_size, "these batch files")
    return _make_dataset(arrays, normalize, validation_size, seed, dtype, log)


# ---------------------------------------------------------------- CIFAR-10 JPEG copy, example folders

def load_cifar10_jpeg(validation_size=5000, data_dir=None, **kwargs):
    """The JPEG re-encoded CIFAR-10 copy (cifar10-jpeg/cifar10-jpeg.tar.gz, mirror only) as a Dataset.

    Images (N, 3, 32, 32), 50,000 train (minus validation_size) and 10,000 test: the official
    classes and split but LOSSY pixels (about 5.8/255 mean error): report which copy you used.
    Keyword arguments as in load_image_folder. The sorted class folder names are the official
    class order (airplane ... truck), so labels match load_cifar10's.
    """
    path = D._fetch_known("cifar10-jpeg", "cifar10-jpeg.tar.gz", data_dir)
    return load_image_folder(path, validation_size=validation_size, data_dir=data_dir, **kwargs)


def make_example_folder(path, layout="flat", num_classes=4, per_class=40, test_per_class=10, size=32,
                        image_format="png", seed=0):
    """Write a small synthetic image set to the folder ``path`` and return ``path``: a stand-in
    for your own folder, in any layout load_image_folder reads.

    layout: "flat" (<class>/<image>, per_class + test_per_class images each), "train-test",
    "train-val" or "tiny-imagenet" (WordNet-style ids, words.txt, val_annotations.txt, boxes
    files and an unlabelled test/). Class k shows shape EXAMPLE_SHAPES[k % 4] in hue
    k / num_classes, size x size pixels, as .png or .jpeg files. Existing files are overwritten.
    """
    if layout not in ("flat", "train-test", "train-val", "tiny-imagenet"):
        raise ValueError(f"layout must be 'flat', 'train-test', 'train-val' or 'tiny-imagenet', not {layout!r}")
    path, rng = Path(path), np.random.default_rng(seed)
    names = [f"{EXAMPLE_SHAPES[k % 4]}{k // 4 if num_classes > 4 else ''}" for k in range(num_classes)]
    wnids = [f"n{k:08d}" for k in range(num_classes)]
    suffix = ".JPEG" if layout == "tiny-imagenet" else "." + image_format.lower()
    pillow_format = "JPEG" if suffix.lower() in (".jpg", ".jpeg") else image_format.upper()

    def save(label, target):
        with atomic_write(target) as f:
            D.example_image(label, num_classes, size, rng).save(f, format=pillow_format)

    val_lines = []
    for k in range(num_classes):
        for i in range(per_class):
            target = {"flat": path / names[k] / f"{i:05d}{suffix}",
                      "tiny-imagenet": path / "train" / wnids[k] / "images" / f"{wnids[k]}_{i}{suffix}"
                      }.get(layout, path / "train" / names[k] / f"{i:05d}{suffix}")
            save(k, target)
        for i in range(test_per_class):
            if layout == "tiny-imagenet":
                j = k * test_per_class + i
                save(k, path / "val" / "images" / f"val_{j}{suffix}")
                val_lines.append(f"val_{j}{suffix}\t{wnids[k]}\t0\t0\t{size - 1}\t{size - 1}\n")
                save(k, path / "test" / "images" / f"test_{j}{suffix}")
            else:
                split = {"flat": "", "train-test": "test", "train-val": "val"}[layout]
                save(k, path / split / names[k] / f"{per_class + i:05d}{suffix}")
    if layout == "tiny-imagenet":
        for k, wnid in enumerate(wnids):
            boxes = "".join(f"{wnid}_{i}{suffix}\t0\t0\t{size - 1}\t{size - 1}\n" for i in range(per_class))
            save_bytes(path / "train" / wnid / f"{wnid}_boxes.txt", boxes.encode())
        save_bytes(path / "wnids.txt", "".join(w + "\n" for w in wnids).encode())
        save_bytes(path / "words.txt", "".join(f"{w}\t{n}, synthetic {n}\n" for w, n in zip(wnids, names)).encode())
        save_bytes(path / "val" / "val_annotations.txt", "".join(val_lines).encode())
    return path


def folder_or_example(variable="CNN_IMAGE_FOLDER", example_dir="example-images"):
    """(path, description): the folder or archive the environment variable ``variable`` names,
    or else a small generated example (``make_example_folder``: 4 shapes, 125 PNGs each,
    32x32, flat layout) written to ``example_dir``. The description says which, for a report."""
    named = os.environ.get(variable, "").strip()
    if named:
        return Path(named).expanduser(), f"your folder `{named}` (named by `{variable}`)"
    path = make_example_folder(example_dir, num_classes=4, per_class=100, test_per_class=25, size=32)
    return path, (f"a small generated folder of 4 shapes, 125 images each (set `{variable}=/path/to/images` "
                  f"to use your own)")
