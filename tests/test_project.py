"""Project-wide rules: no machine-learning library anywhere, NumPy-only core."""
import ast
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"sklearn", "torch", "torchvision", "tensorflow", "keras", "jax", "jaxlib", "flax",
             "theano", "mxnet", "paddle", "chainer", "cupy", "scipy", "pandas", "cv2", "skimage"}


def imported_modules(source, module_level_only=False):
    """Top-level names of the modules a piece of Python source imports
    (anywhere, or only in statements at module level)."""
    tree = ast.parse(source)
    found = set()
    for node in (tree.body if module_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def project_sources():
    """(path, source) of every Python file and notebook code cell in the repository."""
    skip = {".venv", ".git", "data", "runs", "build"}
    for path in sorted(ROOT.rglob("*")):
        if skip & set(path.relative_to(ROOT).parts):
            continue
        if path.suffix == ".py":
            yield path, path.read_text()
        elif path.suffix == ".ipynb":
            cells = json.loads(path.read_text())["cells"]
            code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
            # IPython magics are not Python: drop them before parsing
            yield path, "\n".join(l for l in code.splitlines() if not l.lstrip().startswith(("%", "!")))


def test_the_import_scanner_catches_forbidden_imports():
    assert imported_modules("import torch.nn as nn\nfrom sklearn.metrics import f1_score") == {"torch", "sklearn"}
    assert imported_modules("from . import x\nimport numpy") == {"numpy"}


def test_no_machine_learning_library_is_imported_anywhere():
    sources = list(project_sources())
    assert any(p.name == "cnn_core.py" for p, _ in sources)
    offenders = {str(p.relative_to(ROOT)): sorted(imported_modules(src) & FORBIDDEN) for p, src in sources}
    assert not {p: m for p, m in offenders.items() if m}


ALLOWED = {"numpy"} | set(sys.stdlib_module_names)


MATHS_MODULES = ("cnn_core", "cnn_layers", "cnn_rnn", "cnn_model", "cnn_train", "cnn_recipes", "cnn_metrics", "cnn_gradcheck",
                 "cnn_files")


@pytest.mark.parametrize("module", MATHS_MODULES)
def test_the_maths_imports_only_numpy_and_the_standard_library(module):
    assert not imported_modules((ROOT / f"{module}.py").read_text()) - ALLOWED - set(MATHS_MODULES)


def test_the_core_imports_nothing_but_numpy_and_the_standard_library():
    assert not imported_modules((ROOT / "cnn_core.py").read_text()) - ALLOWED


@pytest.mark.parametrize("module", ["cnn_data", "cnn_layouts", "cnn_images"])
def test_the_data_modules_import_tqdm_and_pillow_only_lazily(module):
    source = (ROOT / f"{module}.py").read_text()
    project = set(MATHS_MODULES) | {"cnn_data", "cnn_layouts"}
    assert not imported_modules(source, module_level_only=True) - ALLOWED - project
    assert not imported_modules(source) - ALLOWED - project - {"tqdm", "PIL"}
    assert imported_modules("import numpy\ndef f():\n    import PIL", module_level_only=True) == {"numpy"}


@pytest.mark.parametrize("module", ["cnn_images", "cnn_report", "cnn_speed"])
def test_image_folders_and_report_helpers_leave_pillow_ipython_tqdm_and_matplotlib_to_data_and_plots(module):
    # Decoding and drawing images belong in cnn_data, showing and plotting in cnn_plots.
    project = set(MATHS_MODULES) | {"cnn_data", "cnn_layouts", "cnn_images", "cnn_plots", "cnn_report"}
    assert not imported_modules((ROOT / f"{module}.py").read_text()) - ALLOWED - project


def test_the_readme_quotes_report_json():
    """The README's results table is report.json's (R.tasks_table), nothing typed by hand."""
    report = ROOT / "report.json"
    if not report.exists():
        pytest.skip("no report.json yet: run make report")
    import cnn_report as R
    table = str(R.tasks_table(json.loads(report.read_text())))
    assert table in (ROOT / "README.md").read_text(), "README.md's results table differs from report.json: " \
        "paste the table printed by tools/build_report.py"
