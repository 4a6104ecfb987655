"""Atomic file writing, fingerprints and the arrays kept under them."""
import os

import numpy as np
import pytest

import cnn_files as F


def test_atomic_write_keeps_the_old_file_when_writing_or_checking_fails(tmp_path):
    path = tmp_path / "result.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with F.atomic_write(path) as f:
            f.write(b"half")
            raise RuntimeError("crash mid-write")

    def reject(tmp):
        raise ValueError(f"bad content in {tmp}")

    with pytest.raises(ValueError, match="bad content"):
        with F.atomic_write(path, check=reject) as f:
            f.write(b"new")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["result.bin"]
    with F.atomic_write(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["result.bin"]


def test_fingerprint_changes_with_any_value_dtype_or_shape_and_only_then():
    a = np.arange(6, dtype=np.float32)
    same = F.fingerprint(a, "flip")
    assert F.fingerprint(a.copy(), "flip") == same
    assert F.fingerprint(np.arange(12, dtype=np.float32)[::2] / 2, "flip") == same   # a strided view
    assert F.fingerprint(np.float32(1)) != F.fingerprint(np.ones(1, np.float32))      # 0-d is not (1,)
    changed = a.copy()
    changed[3] = np.nextafter(changed[3], np.float32(9))
    for other in [(changed, "flip"), (a.astype(np.float64), "flip"), (a.reshape(2, 3), "flip"), (a, "shift"), (a,)]:
        assert F.fingerprint(*other) != same


def test_cached_array_computes_once_and_rebuilds_an_unreadable_file(tmp_path):
    path, calls = tmp_path / "kept.npz", []

    def compute(value):
        calls.append(value)
        return np.full(3, value)

    assert F.cached_array(path, "a", lambda: compute(1)).tolist() == [1, 1, 1]
    assert F.cached_array(path, "a", lambda: compute(2)).tolist() == [1, 1, 1]     # read back, not computed
    assert F.cached_array(path, "b", lambda: compute(3)).tolist() == [3, 3, 3]     # a second key beside it
    assert calls == [1, 3] and F.cached_array(path, "a", lambda: compute(4)).tolist() == [1, 1, 1]
    path.write_bytes(b"not a zip file")                                           # damaged: computed again
    assert F.cached_array(path, "a", lambda: compute(5)).tolist() == [5, 5, 5]
    assert calls == [1, 3, 5] and os.listdir(tmp_path) == ["kept.npz"]
