"""The hand-in ZIP holds what git tracks, and nothing from the caches."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_hand_in_zip_has_the_code_and_no_data(tmp_path):
    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    target = tmp_path / "hand-in.zip"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_zip.py"), str(target)], check=True,
                   capture_output=True)
    names = zipfile.ZipFile(target).namelist()
    for needed in ("cnn_core.py", "cnn_data.py", "README.md", "requirements.txt", "environment.yml",
                   "notebooks/01_mnist_training.ipynb", "tests/test_core.py"):
        assert f"cnn-numpy/{needed}" in names
    assert not [n for n in names if n.startswith(("cnn-numpy/data/", "cnn-numpy/runs/", "cnn-numpy/.venv/"))
                and not n.endswith("data/README.md")]
    assert list(tmp_path.iterdir()) == [target]                  # no temporary file left behind
