"""Tests for cnn_images: small generated image sets in every layout (folder, .zip, .tar.gz),
every image mode, the cache, the errors, and the downsampled-ImageNet batch files."""
import io
import pickle
import struct
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))          # so plain `pytest` works as well as `python -m pytest`
import cnn_data as D  # noqa: E402
import cnn_images as I  # noqa: E402
import cnn_model as M  # noqa: E402
from cnn_data import DatasetError  # noqa: E402


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No mirror and a cache folder inside tmp_path: tests never touch data/."""
    monkeypatch.delenv("CNN_DATA_MIRROR", raising=False)
    monkeypatch.setattr(D, "DATA_DIR", tmp_path / "cache")


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def image_bytes(color=(0, 0, 0), size=(4, 4), mode="RGB", fmt="PNG", **save_kwargs):
    """One image of a single colour, size (h, w), encoded as ``fmt``."""
    from PIL import Image
    buffer = io.BytesIO()
    Image.new(mode, (size[1], size[0]), color).save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


def png_bytes(color, size=(4, 4)):
    return image_bytes(color, size)


def png16(a):
    """A 16-bit PNG (grey for (H, W), RGB for (H, W, 3)) written by hand: Pillow cannot write 16-bit RGB."""
    h, w = a.shape[:2]
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))    # filter 0 per row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", w, h, 16, 2 if a.ndim == 3 else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


COLORS = {"cat": (255, 0, 0), "dog": (0, 0, 255)}


def image_layout(sizes=None):
    """{member name: PNG bytes}: 3 train and 1 test image per class, coloured by class."""
    files = {}
    for label, color in COLORS.items():
        for i in range(3):
            files[f"train/{label}/{i}.png"] = png_bytes(color, (sizes or {}).get(f"train/{label}/{i}.png", (4, 4)))
        files[f"test/{label}/0.png"] = png_bytes(color)
    return files


def flat_layout(per_class=5, classes=("cat", "dog", "fox")):
    """{member name: PNG bytes}: <class>/<i>.png, pixel (0, 0) red = class index, green = i."""
    return {f"{name}/{i}.png": png_bytes((k, i, 0)) for k, name in enumerate(classes) for i in range(per_class)}


def as_folder(root, files):
    for name, data in files.items():
        write(root / name, data)
    return root


def as_zip(path, files, top=""):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(top + name, data)
    return path


def as_tar_gz(path, files, top="wrapped"):
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def load(source, **kwargs):
    """load_image_folder without a cache, returning (dataset, logged lines)."""
    lines = []
    kwargs.setdefault("cache", False)
    return I.load_image_folder(source, log=lines.append, **kwargs), lines


# ---------------------------------------------------------------- train/test, folder / zip / tar.gz, cache

@pytest.mark.parametrize("kind", ["folder", "zip", "tar.gz"])
def test_image_folder_from_folder_zip_and_tar_gz(tmp_path, kind):
    files = image_layout()
    source = {"folder": lambda: as_folder(tmp_path / "pets", files),
              "zip": lambda: as_zip(tmp_path / "pets.zip", files),
              "tar.gz": lambda: as_tar_gz(tmp_path / "pets.tar.gz", files)}[kind]()
    ds = I.load_image_folder(source, normalize=None)
    assert ds.class_names == ("cat", "dog")
    assert ds.x_train.shape == (6, 3, 4, 4) and ds.x_test.shape == (2, 3, 4, 4) and ds.x_train.dtype == np.uint8
    assert ds.y_train.tolist() == [0, 0, 0, 1, 1, 1] and ds.y_test.tolist() == [0, 1]
    assert ds.x_train[0, :, 0, 0].tolist() == [255, 0, 0] and ds.x_test[1, :, 2, 3].tolist() == [0, 0, 255]
    assert len(list((tmp_path / "cache" / "image-folder-cache").glob("pets-*.npz"))) == 1


def test_image_folder_resize_and_mixed_sizes(tmp_path):
    source = as_folder(tmp_path / "mixed", image_layout(sizes={"train/dog/2.png": (6, 5)}))
    with pytest.raises(DatasetError, match="size=") as info:
        I.load_image_folder(source)
    assert "train/dog/2.png" in str(info.value) and "differ in size" in str(info.value)
    ds = I.load_image_folder(source, size=(8, 6), validation_size=2)
    assert ds.x_train.shape == (4, 3, 8, 6) and ds.x_val.shape == (2, 3, 8, 6) and ds.x_test.shape == (2, 3, 8, 6)
    assert ds.x_train.dtype == np.float32 and ds.x_train.max() == 1.0
    assert I.load_image_folder(source, size=5, cache=False).x_test.shape == (2, 3, 5, 5)     # an int: square


@pytest.fixture
def count_decodes(monkeypatch):
    """The number of images decoded so far (a list holding one counter)."""
    calls, decode = [0], D.decode_image

    def counting(*args):
        calls[0] += 1
        return decode(*args)
    monkeypatch.setattr(D, "decode_image", counting)
    return calls


def test_image_folder_second_load_comes_from_the_cache(tmp_path, count_decodes):
    source = as_zip(tmp_path / "pets.zip", image_layout())
    first, lines = load(source, cache=True)
    assert count_decodes[0] == 8
    second, lines = load(source, cache=True)
    assert count_decodes[0] == 8 and "from the cache" in lines[0] and "train/ and test/" in lines[0]
    assert np.array_equal(first.x_train, second.x_train) and first.class_names == second.class_names
    load(source, cache=True, size=(2, 2))                   # another size: not in the cache
    assert count_decodes[0] == 16
    assert not [p for p in (tmp_path / "cache" / "image-folder-cache").iterdir() if p.suffix != ".npz"]


def test_the_cache_is_keyed_by_content_not_by_path_or_time(tmp_path, count_decodes):
    original = as_folder(tmp_path / "a" / "pets", image_layout())
    load(original, cache=True)
    moved = original.rename(tmp_path / "pets")                           # another path, same bytes
    for p in moved.rglob("*.png"):
        p.touch()                                                        # newer modification times
    load(moved, cache=True)
    assert count_decodes[0] == 8
    write(moved / "train/cat/0.png", png_bytes((0, 255, 0)))             # same name and size, new pixels
    ds, _ = load(moved, cache=True, normalize=None)
    assert count_decodes[0] == 16 and ds.x_train[0, :, 0, 0].tolist() == [0, 255, 0]


@pytest.mark.parametrize("change, message", [
    (lambda root: (root / "train/dog/0.png").write_bytes(b"not a png"), "train/dog/0.png"),
    (lambda root: [(root / "train/bird").mkdir(), write(root / "test/bird/0.png", png_bytes((0, 9, 0)))],
     "train/bird has no images"),                                                     # empty class folder
    (lambda root: write(root / "test/bird/0.png", png_bytes((0, 255, 0))), "train/ lacks: bird"),
    (lambda root: [p.unlink() for p in (root / "test").rglob("*.png")], "test/cat has no images"),
])
def test_image_folder_errors_name_the_file_or_class(tmp_path, change, message):
    root = as_folder(tmp_path / "pets", image_layout())
    change(root)
    with pytest.raises(DatasetError, match=message):
        I.load_image_folder(root, cache=False)


def test_image_folder_missing_path_no_images_and_truncated_archive(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        I.load_image_folder(tmp_path / "nowhere")
    notes = as_zip(tmp_path / "notes.zip", {"cat/readme.txt": b"hi", "dog/list.csv": b"1,2"})
    with pytest.raises(DatasetError, match=r"no images found .*2 other files \(cat/readme.txt"):
        I.load_image_folder(notes)
    with pytest.raises(DatasetError, match="not a folder, .zip or .tar"):
        I.load_image_folder(write(tmp_path / "image.png", png_bytes((1, 2, 3))))
    data = as_tar_gz(tmp_path / "pets.tar.gz", image_layout()).read_bytes()
    cut = write(tmp_path / "cut.tar.gz", data[: len(data) - 200])
    with pytest.raises(DatasetError, match="cut.tar.gz"):
        I.load_image_folder(cut)


# ---------------------------------------------------------------- the other layouts

@pytest.mark.parametrize("kind", ["folder", "zip", "tar.gz"])
def test_flat_class_folders_get_a_stratified_fixed_test_split(tmp_path, kind):
    files = flat_layout(per_class=5)
    source = {"folder": lambda: as_folder(tmp_path / "animals", files),
              "zip": lambda: as_zip(tmp_path / "animals.zip", files, top="animals/"),
              "tar.gz": lambda: as_tar_gz(tmp_path / "animals.tar.gz", files, top="animals")}[kind]()
    ds, lines = load(source, normalize=None)
    assert "flat class folders" in lines[0] and "20% of each class" in lines[0]
    assert ("inside the top-level folder animals/" in lines[0]) == (kind != "folder")
    assert ds.class_names == ("cat", "dog", "fox")
    assert np.bincount(ds.y_test).tolist() == [1, 1, 1] and np.bincount(ds.y_train).tolist() == [4, 4, 4]
    assert np.array_equal(ds.x_train[:, 0, 0, 0], ds.y_train) and np.array_equal(ds.x_test[:, 0, 0, 0], ds.y_test)
    ids = {(k, i) for x in (ds.x_train, ds.x_test) for k, i in zip(x[:, 0, 0, 0], x[:, 1, 0, 0])}
    assert len(ids) == 15                                                 # every image exactly once
    # The test set never depends on ``seed`` (which only picks the validation images).
    other, _ = load(source, normalize=None, seed=7, validation_size=3)
    assert np.array_equal(other.x_test, ds.x_test) and len(other.x_val) == 3


def test_flat_split_fraction_and_too_small_classes(tmp_path):
    root = as_folder(tmp_path / "animals", flat_layout(per_class=10))
    ds, lines = load(root, test_fraction=0.5)
    assert np.bincount(ds.y_test).tolist() == [5, 5, 5] and "50% of each class" in lines[0]
    write(root / "owl/0.png", png_bytes((9, 9, 9)))
    with pytest.raises(DatasetError, match="class owl has only 1 image"):
        load(root)
    with pytest.raises(ValueError, match="test_fraction"):
        load(root, test_fraction=1.0)
    one = as_folder(tmp_path / "one", {"cat/0.png": png_bytes((1, 1, 1)), "cat/1.png": png_bytes((1, 1, 1))})
    with pytest.raises(DatasetError, match="at least 2 classes"):
        load(one)


def test_train_val_uses_val_as_test_and_train_val_test_uses_val_for_validation(tmp_path):
    files = {name.replace("test/", "val/"): data for name, data in image_layout().items()}
    ds, lines = load(as_zip(tmp_path / "imagenet-style.zip", files))
    assert "train/ and val/ class folders (val/ used as the test set)" in lines[0]
    assert len(ds.x_train) == 6 and ds.y_test.tolist() == [0, 1] and len(ds.x_val) == 0
    files.update({"test/cat/9.png": png_bytes((255, 0, 0)), "test/dog/9.png": png_bytes((0, 0, 255))})
    root = as_folder(tmp_path / "three", files)
    ds, lines = load(root)
    assert "val/ is the validation set" in lines[0]
    assert ds.y_val.tolist() == [0, 1] and ds.y_test.tolist() == [0, 1] and len(ds.x_train) == 6
    with pytest.raises(ValueError, match="own val/ split"):
        load(root, validation_size=2)


def test_train_only_with_unlabelled_test_images_is_split_and_says_so(tmp_path):
    files = {n: d for n, d in flat_layout(per_class=5).items()}
    files = {f"train/{n}": d for n, d in files.items()} | {"test/1.png": png_bytes((0, 0, 0)), "README.md": b"x"}
    ds, lines = load(as_folder(tmp_path / "kaggle", files))
    assert "train/<class>/ folders only" in lines[0] and len(ds.y_test) == 3
    assert any("1 unlabelled images directly in test/" in line for line in lines)


def tiny_imagenet_files(per_class=3, wnids=("n01443537", "n01629819")):
    """The Tiny ImageNet layout: pixel (0, 0) red = class index, green = image number."""
    files = {"wnids.txt": "".join(w + "\n" for w in wnids).encode(),
             "words.txt": b"n01443537\tgoldfish, Carassius auratus\nn01629819\tEuropean fire salamander\n"
                          b"n09999999\tnot, in, this, set\n"}
    annotations = []
    for k, wnid in enumerate(wnids):
        for i in range(per_class):
            files[f"train/{wnid}/images/{wnid}_{i}.JPEG"] = png_bytes((k, i, 0))     # PNG bytes, .JPEG name
        files[f"train/{wnid}/{wnid}_boxes.txt"] = b"boxes"
        files[f"val/images/val_{k}.JPEG"] = png_bytes((k, 50, 0))
        annotations.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t3\t3\n")
        files[f"test/images/test_{k}.JPEG"] = png_bytes((0, 0, 0))
    files["val/val_annotations.txt"] = "".join(reversed(annotations)).encode()
    return files


@pytest.mark.parametrize("kind", ["folder", "zip", "tar.gz"])
def test_tiny_imagenet_layout(tmp_path, kind):
    files = tiny_imagenet_files()
    source = {"folder": lambda: as_folder(tmp_path / "tiny-imagenet-200", files),
              "zip": lambda: as_zip(tmp_path / "tiny-imagenet-200.zip", files, top="tiny-imagenet-200/"),
              "tar.gz": lambda: as_tar_gz(tmp_path / "tiny.tar.gz", files, top="tiny-imagenet-200")}[kind]()
    ds, lines = load(source, normalize=None)
    assert lines[0].startswith(f"{source.name}: Tiny ImageNet") and "val/ used as the test set" in lines[0]
    assert any("ignored the 2 unlabelled images in test/" in line for line in lines)
    assert ds.class_names == ("goldfish", "European fire salamander")
    assert ds.y_train.tolist() == [0, 0, 0, 1, 1, 1] and np.array_equal(ds.x_train[:, 0, 0, 0], ds.y_train)
    assert ds.y_test.tolist() == [0, 1] and np.array_equal(ds.x_test[:, 0, 0, 0], ds.y_test)
    assert ds.x_test[:, 1, 0, 0].tolist() == [50, 50]


def test_tiny_imagenet_errors(tmp_path):
    files = tiny_imagenet_files()
    files["val/images/val_7.JPEG"] = png_bytes((0, 0, 0))
    with pytest.raises(DatasetError, match="1 images in val/ have no line in val/val_annotations.txt"):
        load(as_folder(tmp_path / "a", files))
    files = tiny_imagenet_files()
    files["val/val_annotations.txt"] += b"val_0.JPEG\tn00000001\t0\t0\t1\t1\n"          # relabelled: unknown class
    with pytest.raises(DatasetError, match="classes that training lacks: n00000001"):
        load(as_folder(tmp_path / "b", files))


@pytest.mark.parametrize("layout", ["flat", "train-test", "train-val", "tiny-imagenet"])
def test_generated_example_folders_load_in_every_layout(tmp_path, layout):
    root = I.make_example_folder(tmp_path / layout, layout=layout, num_classes=5, per_class=4,
                                 test_per_class=2, size=8)
    ds, lines = load(root)
    assert len(ds.class_names) == 5 and ds.x_train.shape[1:] == (3, 8, 8)
    assert len(ds.x_train) + len(ds.x_test) == 30 and set(ds.y_test.tolist()) == set(range(5))
    expected = {"flat": "flat", "train-test": "train/ and test/", "train-val": "train/ and val/",
                "tiny-imagenet": "Tiny ImageNet"}[layout]
    assert expected in lines[0]


# ---------------------------------------------------------------- image modes and formats

def decode(data):
    return D.decode_image(data, None)


def test_sixteen_bit_png_is_scaled_to_eight_bits_not_clipped():
    grey = np.array([[0, 257, 32896, 65535]], np.uint16)                  # 0, 1, 128, 255 in 8 bits
    assert decode(png16(grey))[0, :, 0].tolist() == [0, 1, 128, 255]
    rgb = np.array([[[65535, 32896, 0], [2570, 51400, 65535]]], np.uint16)
    assert decode(png16(rgb))[0].tolist() == [[255, 128, 0], [10, 200, 255]]


def test_sixteen_bit_png_in_a_folder(tmp_path):
    files = {f"{c}/{i}.png": png16(np.full((4, 4), 257 * (10 + i + 20 * k), np.uint16))
             for k, c in enumerate(("a", "b")) for i in range(3)}
    ds, _ = load(as_folder(tmp_path / "deep", files), normalize=None, test_fraction=0.34)
    values = sorted(np.concatenate([ds.x_train[:, 0, 0, 0], ds.x_test[:, 0, 0, 0]]).tolist())
    assert values == [10, 11, 12, 30, 31, 32]          # the old decoder clipped all six to 255


def test_image_modes_become_rgb_correctly():
    from PIL import Image
    assert decode(image_bytes(77, mode="L"))[0, 0].tolist() == [77, 77, 77]
    assert decode(image_bytes(1, mode="1"))[0, 0].tolist() == [255, 255, 255]
    assert decode(image_bytes((255, 0, 0, 0), mode="CMYK", fmt="JPEG"))[0, 0].tolist() == [0, 255, 255]
    assert decode(image_bytes((255, 0, 0, 0), mode="CMYK", fmt="TIFF"))[0, 0].tolist() == [0, 255, 255]
    # Transparent pixels are composited over white, half-transparent ones blended.
    assert decode(image_bytes((10, 20, 30, 0), mode="RGBA"))[0, 0].tolist() == [255, 255, 255]
    assert decode(image_bytes((0, 0, 0, 255), mode="RGBA"))[0, 0].tolist() == [0, 0, 0]
    assert decode(image_bytes((0, 128), mode="LA"))[0, 0].tolist() == [127, 127, 127]
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=0)
    assert decode(buffer.getvalue())[0].tolist() == [[255, 255, 255], [0, 255, 0]]
    buffer = io.BytesIO()
    Image.fromarray(np.array([[0.5, 2.0]], np.float32)).save(buffer, format="TIFF")      # mode F
    assert decode(buffer.getvalue())[0, :, 0].tolist() == [128, 255]


def test_exif_orientation_turns_photos_upright():
    from PIL import Image
    image = Image.new("RGB", (4, 2))                         # stored 4 wide, 2 high
    image.putpixel((3, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6                                         # "rotate 90 degrees clockwise to display"
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    x = decode(buffer.getvalue())
    assert x.shape == (4, 2, 3) and x[3, 1].tolist() == [255, 255, 255]


def test_tif_and_webp_files_are_decoded_not_skipped(tmp_path):
    files = {"train/a/0.tif": image_bytes((200, 0, 0), fmt="TIFF"),
             "train/a/1.webp": image_bytes((200, 0, 0), fmt="WEBP", lossless=True),
             "train/b/0.TIFF": image_bytes((0, 200, 0), fmt="TIFF"),
             "train/b/1.png": image_bytes((0, 200, 0)),
             "test/a/0.webp": image_bytes((200, 0, 0), fmt="WEBP", lossless=True),
             "test/b/0.tiff": image_bytes((0, 200, 0), fmt="TIFF"),
             "test/b/notes.txt": b"not an image"}
    ds, lines = load(as_folder(tmp_path / "formats", files), normalize=None)
    assert ds.y_train.tolist() == [0, 0, 1, 1] and ds.y_test.tolist() == [0, 1]
    assert ds.x_train[:, :, 0, 0].tolist() == [[200, 0, 0]] * 2 + [[0, 200, 0]] * 2
    assert any("1 files in test/ that are not images (test/b/notes.txt)" in line for line in lines)


def test_unreadable_files_are_named_and_counted_or_skipped(tmp_path):
    root = as_folder(tmp_path / "pets", image_layout())
    write(root / "train/cat/0.png", b"not a png")
    write(root / "train/dog/bad.jpg", image_bytes((1, 2, 3), fmt="JPEG")[:40])            # truncated JPEG
    with pytest.raises(DatasetError, match="2 of 9 image files cannot be decoded") as info:
        load(root)
    assert "train/cat/0.png" in str(info.value) and "train/dog/bad.jpg" in str(info.value)
    with pytest.warns(UserWarning, match="left out 2 image files"):
        ds, _ = load(root, unreadable="skip", normalize=None)
    assert ds.y_train.tolist() == [0, 0, 1, 1, 1] and ds.x_train[:, :, 0, 0].tolist() == \
        [[255, 0, 0]] * 2 + [[0, 0, 255]] * 3


# ---------------------------------------------------------------- memory: uint8, in-place splits

def test_uint8_option_and_auto_dtype(tmp_path, monkeypatch):
    root = as_folder(tmp_path / "pets", image_layout())
    as_uint8, _ = load(root, dtype=np.uint8, validation_size=2, seed=3)
    as_float, _ = load(root, dtype="float32", validation_size=2, seed=3)
    assert as_uint8.x_train.dtype == np.uint8 and as_float.x_train.dtype == np.float32
    for split in ("train", "val", "test"):
        assert np.array_equal(getattr(as_uint8, f"x_{split}") / np.float32(255), getattr(as_float, f"x_{split}"))
    small, lines = load(root)                                    # "auto": float32 for a small set
    assert small.x_train.dtype == np.float32 and len(lines) == 1
    monkeypatch.setattr(I, "AUTO_UINT8_BYTES", 100)              # now "large": kept as uint8, and said so
    large, lines = load(root)
    assert large.x_train.dtype == np.uint8 and "kept as uint8" in lines[-1]
    with pytest.raises(ValueError, match="standard"):
        load(root, dtype=np.uint8, normalize="standard")
    with pytest.raises(ValueError, match="dtype"):
        load(root, dtype=np.int32)


def test_validation_split_picks_the_same_images_as_cnn_data(tmp_path):
    ds, _ = load(as_folder(tmp_path / "a", flat_layout(per_class=8)), normalize=None, validation_size=5, seed=4)
    x = np.concatenate([ds.x_train, ds.x_val])
    order = np.lexsort((x[:, 1, 0, 0], x[:, 0, 0, 0]))          # back to file order: class, then number
    x_all, y_all = x[order], np.concatenate([ds.y_train, ds.y_val])[order]
    expected = D._make_dataset(x_all, y_all, ds.x_test, ds.y_test, ds.class_names, None, 5, 4, np.float32)
    assert np.array_equal(expected.x_train, ds.x_train) and np.array_equal(expected.x_val, ds.x_val)
    assert np.array_equal(expected.y_val, ds.y_val)


def test_take_rows_in_place_equals_fancy_indexing():
    x = np.arange(3000 * 2).reshape(3000, 2)
    rows = np.sort(np.random.default_rng(0).choice(3000, 2100, replace=False))
    expected = x[rows].copy()
    out = I._take_rows(x, rows)
    assert np.array_equal(out, expected) and np.shares_memory(out, x)


def test_too_large_validation_size_fails_before_decoding(tmp_path, count_decodes):
    root = as_folder(tmp_path / "a", flat_layout(per_class=5))
    with pytest.raises(ValueError, match="validation_size=12 must be smaller than the 12 training images"):
        load(root, validation_size=12)
    assert count_decodes[0] == 0


def test_models_follow_the_data():
    data = D.Dataset(np.zeros((2, 3, 64, 64), np.uint8), np.zeros(2, np.int64), np.zeros((0, 3, 64, 64), np.uint8),
                     np.zeros(0, np.int64), np.zeros((1, 3, 64, 64), np.uint8), np.zeros(1, np.int64),
                     tuple(f"n{k}" for k in range(200)))
    model = M.conv_net_for(data, channels=(4, 8), hidden=0)
    assert model.forward(np.zeros((2, 3, 64, 64), np.float32), training=False).shape == (2, 200)
    wide = D.Dataset(*(np.zeros((1, 3, 32, 48), np.uint8), np.zeros(1, np.int64)) * 3, class_names=("a", "b"))
    with pytest.raises(ValueError, match="size="):
        M.conv_net_for(wide)


# ---------------------------------------------------------------- downsampled ImageNet batch files

def imagenet_batch(labels, side=8, first_pixel=None):
    """A batch in the ImageNet32/64 format: 'data' uint8 (N, 3*side*side) R, G, B planes; labels from 1."""
    data = np.zeros((len(labels), 3 * side * side), np.uint8)
    data[:, 0] = first_pixel if first_pixel is not None else np.arange(len(labels))
    data[:, side * side] = 7                                    # green plane, pixel (0, 0)
    return {"data": data, "labels": list(labels), "mean": np.zeros(3 * side * side)}


def test_imagenet_batches_pickled_in_a_folder(tmp_path):
    folder = tmp_path / "Imagenet8_train"
    for k, labels in ((1, [1, 2, 3, 1]), (2, [3, 3, 2, 1])):
        write(folder / f"train_data_batch_{k}", pickle.dumps(imagenet_batch(labels), protocol=2))
    val = write(tmp_path / "val" / "val_data", pickle.dumps(imagenet_batch([2, 1, 3]), protocol=2))
    write(folder / "map_clsloc.txt", b"n01 1 kit_fox\nn02 2 goldfish\nn03 3 tabby\n")
    lines = []
    ds = I.load_imagenet_batches([folder, val.parent], normalize=None, log=lines.append)
    assert "ImageNet8x8" in lines[0] and "3 classes, 8 train and 3 test" in lines[0]
    assert ds.x_train.shape == (8, 3, 8, 8) and ds.y_train.tolist() == [0, 1, 2, 0, 2, 2, 1, 0]
    assert ds.x_train[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3] and (ds.x_train[:, 1, 0, 0] == 7).all()
    assert ds.y_test.tolist() == [1, 0, 2] and ds.class_names == ("kit_fox", "goldfish", "tabby")
    few = I.load_imagenet_batches([folder, val.parent], num_classes=2, log=None)
    assert few.y_train.tolist() == [0, 1, 0, 1, 0] and few.class_names == ("kit_fox", "goldfish")


def test_imagenet_npz_batches_in_a_zip_and_bad_files(tmp_path):
    def npz(batch):
        buffer = io.BytesIO()
        np.savez(buffer, data=batch["data"], labels=np.array(batch["labels"]))
        return buffer.getvalue()
    files = {"train_data_batch_1.npz": npz(imagenet_batch([1, 2], side=4)),
             "val_data.npz": npz(imagenet_batch([2], side=4))}
    ds = I.load_imagenet_batches(as_zip(tmp_path / "Imagenet4.zip", files), log=None)
    assert ds.x_train.shape == (2, 3, 4, 4) and ds.class_names == ("1", "2") and ds.x_train.dtype == np.float32

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    evil = write(tmp_path / "evil" / "train_data_batch_1", pickle.dumps({"data": Evil(), "labels": [1]}))
    write(evil.parent / "val_data", pickle.dumps(imagenet_batch([1])))
    with pytest.raises(DatasetError, match="refusing to load builtins.print"):
        I.load_imagenet_batches(evil.parent)
    write(evil, pickle.dumps({"data": np.zeros((2, 10), np.uint8), "labels": [1, 1]}))
    with pytest.raises(DatasetError, match=r"expected 'data' uint8 \(N, 3\*s\*s\)"):
        I.load_imagenet_batches(evil.parent)
    with pytest.raises(DatasetError, match="no val_data file"):
        I.load_imagenet_batches(as_zip(tmp_path / "train-only.zip", {"train_data_batch_1.npz": files[
            "train_data_batch_1.npz"]}))
