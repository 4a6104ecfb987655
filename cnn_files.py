"""Every file the project writes goes through ``atomic_write``: a crash leaves
the old file or none, never a half-written one; ``cached_array`` keeps arrays that
can be computed again (a run's predictions) under a ``fingerprint`` of what they
came from. Standard library and NumPy only."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

@contextlib.contextmanager
def atomic_write(path, check=None):
    """Write a file so that ``path`` is never left half-written.

    Yields a binary file in the same folder; when the block succeeds (and
    ``check(temporary_path)``, if given, does not raise) the file is renamed to
    ``path`` with ``os.replace``, which is atomic; otherwise it is deleted. A
    crash therefore leaves the old file or none, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        if check is not None:
            check(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp's file is private; the result need not be
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_npz(path, arrays):
    """``np.savez`` of ``arrays`` to ``path`` through ``atomic_write``."""
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def save_bytes(path, data):
    """Write ``data`` (bytes) to ``path`` atomically."""
    with atomic_write(path) as f:
        f.write(data)


def save_json(path, obj):
    """Write ``obj`` as indented JSON atomically; NumPy numbers become floats."""
    save_bytes(path, json.dumps(obj, indent=1, default=float).encode())


def save_figure(fig, path, dpi=150):
    """Write a matplotlib figure as a PNG atomically."""
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")


def fingerprint(*items):
    """A short hex digest of arrays and strings (dtype, shape and bytes of each): equal
    for equal contents, different (but for a 2^-128 chance) for any other."""
    digest = hashlib.blake2b(digest_size=16)
    for item in items:
        a = np.asarray(item)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


def cached_array(path, key, compute):
    """``compute()`` -> an array, kept in the ``.npz`` file ``path`` under ``key``: the
    next call with the same key reads it back instead. A file that cannot be read
    is rebuilt (it holds only results that can be computed again); every write is
    atomic, so a crash never leaves a half-written file."""
    path = Path(path)
    try:
        with np.load(path) as saved:
            kept = {name: saved[name] for name in saved.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        kept = {}
    if key not in kept:
        kept[key] = np.asarray(compute())
        save_npz(path, kept)
    return kept[key]

