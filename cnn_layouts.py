"""Reading a folder of images, or a .zip / .tar(.gz) archive of one, and
recognising its layout (flat class folders, train/test, train/val, train only,
Tiny ImageNet): the plan of which file is which split and class, made before
any image is decoded, so that every layout error is reported at once.
``cnn_images.load_image_folder`` decodes what the plan lists.
"""
import dataclasses
import os
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

import cnn_data as D
from cnn_data import DatasetError

# Suffixes decoded as images (case-insensitive): the raster formats Pillow reads.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".gif", ".tif", ".tiff",
                    ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".jp2", ".j2k", ".avif", ".qoi")
TEST_FRACTION = 0.2        # of each class, for layouts without a test split of their own
SPLIT_SEED = 0             # that test split never depends on ``seed``: the test set stays fixed
SPLIT_NAMES = ("train", "val", "test")


# ---------------------------------------------------------------- reading folders and archives

def _clean(name):
    """An archive or folder member name with "/" separators and no "./", or None for hidden
    files and folders (".DS_Store", "__MACOSX/" debris of macOS zips)."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return None
    return "/".join(parts)


def _is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


class _Folder:
    """A folder of files. ``listing()`` -> (files, folders), member names relative to it;
    ``read_all(names)`` yields (name, bytes); ``content_key()`` hashes every file's bytes."""

    def __init__(self, path):
        self.path, self._listing = path, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def listing(self):
        if self._listing is None:
            files, dirs = [], []
            for root, dirnames, filenames in os.walk(self.path):
                rel = Path(root).relative_to(self.path).as_posix()
                prefix = "" if rel == "." else rel + "/"
                dirnames[:] = sorted(d for d in dirnames if _clean(d))
                dirs += [prefix + d for d in dirnames]
                files += [prefix + f for f in sorted(filenames) if _clean(f)]
            self._listing = sorted(files), sorted(dirs)
        return self._listing

    def read(self, name):
        # open() on a string, not Path.read_bytes: 3x faster on 100,000 small files
        with open(os.path.join(self.path, name), "rb") as f:
            return f.read()

    def read_all(self, names):
        for name in names:
            yield name, self.read(name)

    def content_key(self, digest):
        # Every file's name, size and bytes: moving, copying or touching the folder keeps the
        # key, editing, adding or renaming a file changes it. About 1 s for 120,000 files.
        for name in self.listing()[0]:
            data = self.read(name)
            digest.update(f"{name}\0{len(data)}\0".encode())
            digest.update(data)


class _Zip(_Folder):
    """A .zip archive, read in place (random access)."""

    def __enter__(self):
        self.archive = zipfile.ZipFile(self.path)
        return self

    def __exit__(self, *exc):
        self.archive.close()
        return False

    def listing(self):
        if self._listing is None:
            self.infos = {}
            files, dirs = set(), set()
            for info in self.archive.infolist():
                name = _clean(info.filename)
                if name is not None:
                    (dirs if info.is_dir() else files).add(name)
                    self.infos[name] = info
            self._listing = sorted(files), sorted(dirs)
        return self._listing

    def read(self, name):
        return self.archive.read(self.infos[name])

    def read_all(self, names):
        for name in names:
            yield name, self.archive.read(self.infos[name])

    def content_key(self, digest):
        _hash_file(self.path, digest)


class _Tar(_Folder):
    """A .tar, .tar.gz, .tgz, .tar.bz2 or .tar.xz archive. A compressed tar can only be read
    in order, so it is read twice: once for the listing (keeping the small .txt files), once
    for the images. Nothing is extracted to disk."""

    def __enter__(self):
        return self

    def listing(self):
        if self._listing is None:
            files, dirs, self.texts = [], [], {}
            with tarfile.open(self.path) as archive:
                for member in _tar_members(archive):
                    name = _clean(member.name)
                    if name is None or not (member.isfile() or member.isdir()):
                        continue
                    (files if member.isfile() else dirs).append(name)
                    if member.isfile() and name.endswith(".txt") and member.size < (64 << 20):
                        self.texts[name] = archive.extractfile(member).read()
            self._listing = sorted(files), sorted(dirs)
        return self._listing

    def read(self, name):
        return self.texts[name]

    def read_all(self, names):
        """(name, bytes) for ``names``, in the archive's order (not the order given)."""
        wanted = set(names)
        with tarfile.open(self.path) as archive:
            for member in _tar_members(archive):
                name = _clean(member.name)
                if member.isfile() and name in wanted:
                    yield name, archive.extractfile(member).read()

    def content_key(self, digest):
        _hash_file(self.path, digest)


def _tar_members(archive):
    """The members of an open tar in order, without keeping them all (``TarFile.next`` stores
    every header it reads: ~50 MB for 100,000 files)."""
    while (member := archive.next()) is not None:
        archive.members.clear()
        yield member


def _hash_file(path, digest):
    with open(path, "rb") as f:
        while chunk := f.read(D.CHUNK):
            digest.update(chunk)


def _open_source(path):
    if path.is_dir():
        return _Folder(path)
    if zipfile.is_zipfile(path):
        return _Zip(path)
    if tarfile.is_tarfile(path):
        return _Tar(path)
    raise DatasetError(f"{path} is not a folder, .zip or .tar(.gz) archive of images")


# ---------------------------------------------------------------- recognising the layout

@dataclasses.dataclass
class _Plan:
    """What to decode: ``members[split]`` lists (member name, label) in dataset order
    (class by class, names sorted) for "train", "test" and, if the folder has one, "val"."""
    layout: str
    class_names: tuple
    members: dict
    notes: list
    split_off: bool = False          # True when the test set was split off the training images


def _sample(names, k=3):
    names = sorted(names)
    return ", ".join(names[:k]) + (f" and {len(names) - k:,} more" if len(names) > k else "")


def _wrapper(files, dirs):
    """The single top-level folder that holds everything ("pets/" of pets.zip) or ""."""
    tops = {n.split("/")[0] for n in files if "/" in n} | {d.split("/")[0] for d in dirs}
    loose = [n for n in files if "/" not in n]
    if len(tops) == 1 and not any(map(_is_image, loose)) and not {"wnids.txt"} & set(loose):
        top = tops.pop()
        if top not in SPLIT_NAMES:
            return top + "/"
    return ""


def _class_images(files, dirs, split):
    """Images below ``split``/<class>/ (any depth) -> ({class: [name]}, images directly in split/,
    other files). ``split`` "" means the top level (the flat layout). Empty class folders are kept."""
    start = split + "/" if split else ""
    classes = {d[len(start):]: [] for d in dirs if d.startswith(start) and "/" not in d[len(start):]}
    loose, other = [], []
    for name in files:
        if not name.startswith(start):
            continue
        rest = name[len(start):]
        if not _is_image(name):
            other.append(name)
        elif "/" in rest:
            classes.setdefault(rest.split("/")[0], []).append(name)
        else:
            loose.append(name)
    return classes, loose, other


def _check_classes(classes, where, folder):
    """DatasetError for a class folder without images (naming what it holds instead)."""
    empty = sorted(c for c, names in classes.items() if not names)
    if empty:
        raise DatasetError(f"{where}: class folder {folder}{empty[0]} has no images "
                           f"({len(empty)} empty class folder{'s' if len(empty) > 1 else ''}: {_sample(empty)}); "
                           f"add images ({', '.join(IMAGE_EXTENSIONS[:5])}, ...) or remove the folder")


def _stratified_split(classes, class_names, fraction, where):
    """(train, test) member lists: round(fraction * n) images of each class (at least 1, at most
    n - 1) go to the test set. Each class draws from its own generator seeded with SPLIT_SEED and
    the class name, so adding a class leaves the other classes' splits unchanged."""
    train, test = [], []
    for label, name in enumerate(class_names):
        members = sorted(classes[name])
        n = len(members)
        if n < 2:
            raise DatasetError(f"{where}: class {name} has only {n} image; a test split needs at least 2 per class")
        k = min(n - 1, max(1, round(fraction * n)))
        rng = np.random.default_rng([SPLIT_SEED, zlib.crc32(name.encode())])
        chosen = set(rng.permutation(n)[:k].tolist())
        for i, member in enumerate(members):
            (test if i in chosen else train).append((member, label))
    return train, test


def _labelled(classes, class_names):
    index = {name: label for label, name in enumerate(class_names)}
    return [(m, index[c]) for c in class_names if c in classes for m in sorted(classes[c])]


def _plan(source, where, test_fraction):
    """Recognise the layout of ``source`` and list the images to decode (before any decoding)."""
    files, dirs = source.listing()
    if not any(map(_is_image, files)):
        found = f"{len(files):,} other files ({_sample(files)})" if files else "nothing"
        raise DatasetError(f"no images found in {where}: found {found}. Expected images "
                           f"({', '.join(IMAGE_EXTENSIONS[:5])}, ...) in class folders: <class>/<image>, "
                           f"train/<class>/ + test/<class>/ (or val/), or Tiny ImageNet")
    prefix = _wrapper(files, dirs)
    outside = [n for n in files if not n.startswith(prefix)]
    files = [n[len(prefix):] for n in files if n.startswith(prefix)]
    dirs = [d[len(prefix):] for d in dirs if d.startswith(prefix) and d != prefix.rstrip("/")]
    top_dirs = {n.split("/")[0] for n in files if "/" in n} | {d.split("/")[0] for d in dirs}
    if "wnids.txt" in files or "val/val_annotations.txt" in files:
        plan = _plan_tiny_imagenet(source, prefix, files, dirs, where)
    elif "train" in top_dirs:
        plan = _plan_splits(files, dirs, where, test_fraction)
    else:
        plan = _plan_flat(files, dirs, where, test_fraction)
    if prefix:
        plan.layout += f", inside the top-level folder {prefix}"
        plan.members = {s: [(prefix + m, y) for m, y in items] for s, items in plan.members.items()}
    if outside:
        plan.notes.append(f"ignored {len(outside):,} files outside {prefix} ({_sample(outside)})")
    if test_fraction is not None and not plan.split_off:
        plan.notes.append("test_fraction ignored: the folder has its own test split")
    return plan


def _plan_flat(files, dirs, where, test_fraction, folder=""):
    """<class>/<image> (or train/<class>/<image> alone): a stratified test split."""
    classes, loose, other = _class_images(files, dirs, folder)
    notes = [f"ignored {len(other):,} files that are not images ({_sample(other)})"] if other else []
    if loose:
        notes.append(f"ignored {len(loose):,} images outside class folders ({_sample(loose)})")
    if len(classes) < 2:
        raise DatasetError(f"{where}: found {len(classes)} class folder{'' if len(classes) == 1 else 's'} "
                           f"({_sample(classes) or 'none'}) and {len(loose):,} images outside class folders; "
                           f"put each class's images in a folder named after the class (at least 2 classes): "
                           f"<class>/<image>, or train/<class>/ + test/<class>/")
    _check_classes(classes, where, f"{folder}/" if folder else "")
    class_names = tuple(sorted(classes))
    fraction = TEST_FRACTION if test_fraction is None else test_fraction
    train, test = _stratified_split(classes, class_names, fraction, where)
    layout = (f"{'train/<class>/ folders only' if folder else 'flat class folders <class>/<image>'}: "
              f"{len(class_names)} classes; test split off: {fraction:.0%} of each class "
              f"(stratified, fixed seed {SPLIT_SEED})")
    return _Plan(layout, class_names, {"train": train, "test": test}, notes, split_off=True)


def _plan_splits(files, dirs, where, test_fraction):
    """train/<class>/ with test/<class>/ and/or val/<class>/."""
    found = {split: _class_images(files, dirs, split) for split in SPLIT_NAMES}
    notes = []
    for split, (classes, loose, other) in found.items():
        if loose:
            notes.append(f"ignored {len(loose):,} unlabelled images directly in {split}/ ({_sample(loose)})")
        if other:
            notes.append(f"ignored {len(other):,} files in {split}/ that are not images ({_sample(other)})")
    others = sorted({n.split("/")[0] for n in files if "/" in n} - set(SPLIT_NAMES))
    if others:
        notes.append(f"ignored the folders {_sample([o + '/' for o in others])} (not train/, val/ or test/)")
    train = found["train"][0]
    if not train:
        raise DatasetError(f"{where}: train/ has no class folders; expected train/<class>/<image>")
    _check_classes(train, where, "train/")
    labelled = [s for s in ("test", "val") if found[s][0]]
    if not labelled:
        plan = _plan_flat(files, dirs, where, test_fraction, folder="train")
        plan.notes = notes + plan.notes
        return plan
    class_names = tuple(sorted(train))
    for split in labelled:
        _check_classes(found[split][0], where, f"{split}/")
        unknown = sorted(set(found[split][0]) - set(train))
        if unknown:
            raise DatasetError(f"{where}: {split}/ has classes that train/ lacks: {_sample(unknown)}; "
                               f"add train/{unknown[0]}/ with images or remove {split}/{unknown[0]}/")
        missing = sorted(set(train) - set(found[split][0]))
        if missing:
            notes.append(f"{split}/ has no images of {len(missing)} classes ({_sample(missing)})")
    members = {"train": _labelled(train, class_names)}
    if labelled == ["test", "val"]:
        layout = "train/, val/ and test/ class folders (val/ is the validation set)"
        members.update(test=_labelled(found["test"][0], class_names), val=_labelled(found["val"][0], class_names))
    else:
        split = labelled[0]
        layout = f"train/ and {split}/ class folders" + (" (val/ used as the test set)" if split == "val" else "")
        members["test"] = _labelled(found[split][0], class_names)
    return _Plan(f"{layout}: {len(class_names)} classes", class_names, members, notes)


def _readable_names(wnids, words):
    """WordNet ids -> the first synonym of each in words.txt ("n01443537" -> "goldfish"),
    with the id appended where two classes would share a name."""
    names = [words.get(w, w).split(",")[0].strip() or w for w in wnids]
    return tuple(f"{n} ({w})" if names.count(n) > 1 else n for n, w in zip(names, wnids))


def _plan_tiny_imagenet(source, prefix, files, dirs, where):
    """Tiny ImageNet: train/<wnid>/images/, val/images/ + val/val_annotations.txt, wnids.txt, words.txt."""
    def text(name):
        return source.read(prefix + name).decode("utf-8", errors="replace").splitlines()

    train, _, other = _class_images(files, dirs, "train")
    wnids = [w.strip() for w in text("wnids.txt") if w.strip()] if "wnids.txt" in files else sorted(train)
    if "val/val_annotations.txt" not in files:
        raise DatasetError(f"{where}: wnids.txt but no val/val_annotations.txt: the validation labels are missing")
    unknown = sorted(set(train) - set(wnids))
    if unknown:
        raise DatasetError(f"{where}: train/ has class folders missing from wnids.txt: {_sample(unknown)}")
    _check_classes({w: train.get(w, []) for w in wnids}, where, "train/")
    wnids = sorted(wnids)
    words = dict(line.split("\t", 1) for line in text("words.txt") if "\t" in line) if "words.txt" in files else {}
    class_names = _readable_names(wnids, words)
    index = {w: label for label, w in enumerate(wnids)}

    annotations = {}
    for line in text("val/val_annotations.txt"):
        fields = line.split("\t")
        if len(fields) >= 2:
            annotations[fields[0]] = fields[1]
    val_images = [n for n in files if n.startswith("val/") and _is_image(n)]
    unlabelled = [n for n in val_images if n.rsplit("/", 1)[-1] not in annotations]
    if unlabelled:
        raise DatasetError(f"{where}: {len(unlabelled):,} images in val/ have no line in val/val_annotations.txt "
                           f"({_sample(unlabelled)})")
    strangers = sorted({annotations[n.rsplit("/", 1)[-1]] for n in val_images} - set(wnids))
    if strangers:
        raise DatasetError(f"{where}: val/val_annotations.txt labels images with classes that training lacks: "
                           f"{_sample(strangers)}")
    test = sorted(((n, index[annotations[n.rsplit("/", 1)[-1]]]) for n in val_images), key=lambda item: item[::-1])
    notes = ["class names: the first synonym in words.txt; class order: sorted WordNet ids"] if words else []
    if other:
        notes.append(f"ignored {len(other):,} files in train/ that are not images ({_sample(other, 1)})")
    unlabelled_test = [n for n in files if n.startswith("test/") and _is_image(n)]
    if unlabelled_test:
        notes.append(f"ignored the {len(unlabelled_test):,} unlabelled images in test/ "
                     f"(Tiny ImageNet publishes no test labels: val/ is the test set)")
    layout = (f"Tiny ImageNet (wnids.txt, train/<wnid>/images/, val/ labelled by val_annotations.txt; "
              f"val/ used as the test set): {len(wnids)} classes")
    return _Plan(layout, class_names, {"train": _labelled(train, wnids), "test": test}, notes)
