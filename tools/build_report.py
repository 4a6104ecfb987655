"""Build report.pdf from the notebooks: execute each one top to bottom, then
export them together through nbconvert's LaTeX route (xelatex).

    python tools/build_report.py            # full run: notebooks executed in place,
                                            # figures/ and report.pdf at the top level
    python tools/build_report.py --quick    # small subset, one epoch (a few minutes),
                                            # into build/quick/
    python tools/build_report.py --quick --out /tmp/r   # into another folder

The notebooks read three environment variables that this script sets:
CNN_QUICK ("1" for the quick mode), CNN_OUT (where runs/, figures/ go) and
CNN_PROGRESS ("0": no live progress bar, the PDF keeps the per-epoch lines).
Training notebooks save weights and histories in <out>/runs/ and reuse them,
so an interrupted build resumes where it stopped. Cells tagged "hide-input"
show only their output in the PDF; cells tagged "remove-cell" are left out.
"""
import argparse
import copy
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbconvert import PDFExporter
from traitlets.config import Config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cnn_files import save_bytes  # noqa: E402

NOTEBOOKS = ROOT / "notebooks"


def execute(source, target):
    """Run the notebook at ``source`` in the notebooks folder; save it to ``target``."""
    nb = nbformat.read(source, as_version=4)
    began = time.time()
    NotebookClient(nb, timeout=None, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    save_bytes(target, nbformat.writes(nb).encode())
    print(f"  {source.name}: {time.time() - began:.0f} s", flush=True)
    return nb


def merge(notebooks):
    """One notebook holding every cell of ``notebooks`` in order."""
    merged = copy.deepcopy(notebooks[0])
    for nb in notebooks[1:]:
        merged.cells.extend(copy.deepcopy(nb.cells))
    merged.metadata["title"] = "A Convolutional Neural Network from Scratch in NumPy"
    merged.metadata["authors"] = [{"name": "cnn-numpy project"}]
    return merged


def export_pdf(nb, target):
    config = Config()
    config.TagRemovePreprocessor.enabled = True
    config.TagRemovePreprocessor.remove_input_tags = {"hide-input"}
    config.TagRemovePreprocessor.remove_cell_tags = {"remove-cell"}
    config.PDFExporter.latex_command = ["xelatex", "-interaction=nonstopmode", "{filename}"]
    pdf, _ = PDFExporter(config=config).from_notebook_node(nb)
    save_bytes(target, pdf)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small subset, one epoch")
    parser.add_argument("--out", type=Path, default=None,
                        help="write notebooks, runs/, figures/ and report.pdf here (default: the repository)")
    args = parser.parse_args(argv)
    # A quick run never overwrites the committed notebooks, figures or report.
    out = (args.out or (ROOT / "build" / "quick" if args.quick else ROOT)).resolve()
    os.environ["CNN_QUICK"] = "1" if args.quick else "0"
    os.environ["CNN_OUT"] = str(out)
    os.environ["CNN_PROGRESS"] = "0"
    sources = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if not sources:
        sys.exit(f"no notebooks found in {NOTEBOOKS}")
    began = time.time()
    print(f"executing {len(sources)} notebooks ({'quick' if args.quick else 'full'} mode) into {out}")
    executed = [execute(src, src if out == ROOT else out / "notebooks" / src.name) for src in sources]
    export_pdf(merge(executed), out / "report.pdf")
    print(f"wrote {out / 'report.pdf'} in {time.time() - began:.0f} s")


if __name__ == "__main__":
    main()
