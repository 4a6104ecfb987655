"""Build the hand-in ZIP: every file git tracks (code, notebooks, README,
environment files, report.pdf), as it is in the working tree; no data, no
caches, no virtual environment. Usage: python tools/make_zip.py [OUTPUT.zip]"""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cnn_files import atomic_write  # noqa: E402


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    target = Path(argv[0] if argv else ROOT / "cnn-numpy-handin.zip").resolve()
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    files = [f for f in files if f and (ROOT / f).is_file()]
    with atomic_write(target) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in files:
            archive.write(ROOT / name, f"cnn-numpy/{name}")
    print(f"wrote {target} ({len(files)} files, {target.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
