"""Settings shared by the report notebooks, which run with this folder as their
working directory: ``import common`` puts the project root on ``sys.path``
(here, once) and gives the quick mode, the output folders, the progress bar
setting and the report's MNIST recipe. The logic lives in the modules
(``cnn_report`` for the report's helpers).

Environment (set by ``tools/build_report.py``; the defaults suit a student who
opens a notebook in Jupyter):
  CNN_QUICK=1     small subsets and one epoch, to prove the pipeline in minutes
  CNN_OUT=dir     where runs/ and figures/ go (default: the repository)
  CNN_PROGRESS=0  no live progress bar while training (the per-epoch lines stay)
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cnn_data as D  # noqa: E402
import cnn_recipes as Q  # noqa: E402
import cnn_report as R  # noqa: E402

QUICK = os.environ.get("CNN_QUICK") == "1"
OUT = Path(os.environ.get("CNN_OUT", ROOT))
RUNS = OUT / "runs" / ("quick" if QUICK else "full")
FIGURES = OUT / "figures"
PROGRESS = os.environ.get("CNN_PROGRESS", "1") != "0"
QUICK_SIZES = (2000, 500, 1000)      # train / validation / test examples in quick mode

SEEDS = (0,) if QUICK else (0, 1, 2)   # every final model is trained with each seed


def load(dataset="mnist"):
    """MNIST or Fashion-MNIST (55,000 / 5,000 / 10,000), a random subset in quick mode."""
    data = D.load_mnist(dataset=dataset)
    return R.subset(data, *QUICK_SIZES) if QUICK else data


def load_cifar10():
    """``cnn_report.load_cifar10`` (data, which copy), a random subset in quick mode."""
    data, source = R.load_cifar10()
    return (R.subset(data, *QUICK_SIZES) if QUICK else data), source


def train_or_load(name, model, data, optimizer, epochs, **fit_kwargs):
    """``cnn_report.train_or_load`` with this report's runs/ folder and progress setting."""
    return R.train_or_load(RUNS, name, model, data, optimizer, epochs, progress=PROGRESS, **fit_kwargs)


def quick(**changes):
    """Recipe changes for the quick mode: one epoch (none in a full build)."""
    return {"epochs": 1, **changes} if QUICK else {}


def mnist_model(data, name="mnist", seed=0):
    """The report's MNIST model (``cnn_recipes.mnist_recipe`` with ``seed``), trained
    or loaded from runs/; also used unchanged for Fashion-MNIST. Returns (model, history)."""
    model, optimizer, kwargs = Q.mnist_recipe(seed, **quick())
    return train_or_load(f"{name}_seed{seed}", model, data, optimizer, **kwargs)
