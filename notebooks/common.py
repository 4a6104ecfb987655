"""Set-up shared by the report notebooks: paths, the quick mode, the MNIST
recipe, and training that reuses finished runs and resumes interrupted ones.

Environment (set by ``tools/build_report.py``; defaults suit a student who
opens a notebook in Jupyter):
  CNN_QUICK=1   small subsets and one epoch, to prove the pipeline in minutes
  CNN_OUT=dir   where runs/ and figures/ go (default: the repository)
"""
import dataclasses
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import cnn_model as M  # noqa: E402
import cnn_train as T  # noqa: E402
import cnn_files as F  # noqa: E402
import cnn_data as D  # noqa: E402
import cnn_images as I  # noqa: E402

QUICK = os.environ.get("CNN_QUICK") == "1"
OUT = Path(os.environ.get("CNN_OUT", ROOT))
RUNS = OUT / "runs" / ("quick" if QUICK else "full")
FIGURES = OUT / "figures"

# The MNIST recipe of the report (notebook 1 trains it, the others reuse it).
MNIST_EPOCHS = 1 if QUICK else 12
MNIST_LR = 1e-3
MNIST_SHIFT = 2          # pixels of random shift (augmentation)


def load_cifar10():
    """CIFAR-10 with per-channel standardisation, and a sentence saying which copy
    it is: the official python archive when it can be had, otherwise the JPEG
    re-encoded copy of an offline mirror (close to, not equal to, the official pixels)."""
    try:
        data, source = D.load_cifar10(normalize="standard"), "the official CIFAR-10 python archive"
    except D.DatasetError:
        data = I.load_cifar10_jpeg(normalize="standard")
        source = ("the **JPEG re-encoded copy** of CIFAR-10 from the offline mirror (same images, labels "
                  "and split as the official set, lossy pixels: about 30 dB PSNR), because the official "
                  "archive was not available; accuracies on it are close to, not equal to, official ones")
    return (subset(data, 2000, 500, 1000) if QUICK else data), source


def subset(data, train, val, test, seed=0):
    """A seeded random sample of ``train``/``val``/``test`` examples of each split
    (random, not the first ones: image-folder datasets are stored class by class)."""
    rng = np.random.default_rng(seed)
    pick = {split: np.sort(rng.permutation(len(getattr(data, f"y_{split}")))[:n])
            for split, n in (("train", train), ("val", val), ("test", test))}
    return dataclasses.replace(data, **{f"{xy}_{split}": getattr(data, f"{xy}_{split}")[index]
                                        for split, index in pick.items() for xy in "xy"})


def load(dataset="mnist"):
    """MNIST or Fashion-MNIST (55,000 / 5,000 / 10,000), a small subset in quick mode."""
    data = D.load_mnist(dataset=dataset)
    return subset(data, 2000, 500, 1000) if QUICK else data


def train_or_load(name, build, data, optimizer, epochs, **fit_kwargs):
    """Train ``build()`` on ``data`` unless runs/<name>.npz already exists.

    An interrupted run resumes from its per-epoch checkpoint (same result as an
    uninterrupted one). Returns (model, history as a dict).
    """
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", name)          # run names may hold spaces and slashes
    model_path, history_path = RUNS / f"{slug}.npz", RUNS / f"{slug}.json"
    if model_path.exists() and history_path.exists():
        return M.Sequential.load(model_path), json.loads(history_path.read_text())
    checkpoint = RUNS / f"{slug}.checkpoint.npz"
    model = build()
    history = T.fit(model, data.x_train, data.y_train, optimizer, epochs,
                    validation=(data.x_val, data.y_val), checkpoint=checkpoint,
                    progress=False, **fit_kwargs).as_dict()
    model.save(model_path)
    F.save_json(history_path, history)
    checkpoint.unlink()
    return model, history


def mnist_model(data, name="mnist_cnn"):
    """The report's MNIST network, trained with the report's recipe (or loaded);
    also used unchanged for Fashion-MNIST."""
    return train_or_load(
        name, lambda: M.mnist_cnn(seed=0), data, T.Adam(MNIST_LR), MNIST_EPOCHS,
        batch_size=64, schedule=T.cosine_schedule(MNIST_LR, MNIST_EPOCHS, lr_min=1e-5),
        augment=T.augmentation(crop=MNIST_SHIFT), seed=0)
