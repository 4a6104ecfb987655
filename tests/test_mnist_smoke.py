"""End to end on real data: a small CNN learns MNIST inside the test run."""
import os
from pathlib import Path

import numpy as np
import pytest

import cnn_core as C
import cnn_data

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="module")
def mnist():
    if not os.environ.get(cnn_data.MIRROR_ENV) and SHARED.is_dir():
        os.environ[cnn_data.MIRROR_ENV] = str(SHARED)
    try:
        return cnn_data.load_mnist(validation_size=0)
    except cnn_data.DatasetError as err:
        pytest.skip(f"MNIST not available (no cache, no mirror, offline): {err}")


def test_small_cnn_learns_mnist(mnist):
    x_train, y_train = mnist.x_train[:2000], mnist.y_train[:2000]
    x_test, y_test = mnist.x_test[:1000], mnist.y_test[:1000]
    model = C.Sequential([C.Conv2D(1, 8, 3, padding=1), C.ReLU(), C.MaxPool2D(2),
                          C.Conv2D(8, 16, 3, padding=1), C.ReLU(), C.MaxPool2D(2),
                          C.Flatten(), C.Dense(16 * 7 * 7, 10)], seed=0)
    history = C.fit(model, x_train, y_train, C.Adam(2e-3), epochs=4, batch_size=32,
                    validation=(x_test, y_test), progress=False, log=None)
    assert history.train_loss[-1] < history.train_loss[0] < 2.3
    test_accuracy = C.accuracy(y_test, model.predict(x_test))
    assert test_accuracy >= 0.90, history
    assert test_accuracy == pytest.approx(history.val_acc[-1])
