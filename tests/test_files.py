"""Atomic file writing."""
import os

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
