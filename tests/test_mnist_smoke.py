"""End to end on real data: a small CNN learns MNIST inside the test run."""
import os
from pathlib import Path

import pytest

import cnn_layers as L
import cnn_model as M
import cnn_train as T
import cnn_metrics as E
import cnn_data as D

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture
def mnist(monkeypatch):
    if not os.environ.get(D.MIRROR_ENV) and SHARED.is_dir():
        monkeypatch.setenv(D.MIRROR_ENV, str(SHARED))     # undone after the test, unlike os.environ[...] = ...
    try:
        return D.load_mnist(validation_size=0)
    except D.DatasetError as err:
        pytest.skip(f"MNIST not available (no cache, no mirror, offline): {err}")


def test_small_cnn_learns_mnist(mnist):
    x_train, y_train = mnist.x_train[:2000], mnist.y_train[:2000]
    x_test, y_test = mnist.x_test[:1000], mnist.y_test[:1000]
    model = M.Sequential([L.Conv2D(1, 8, 3, padding=1), L.ReLU(), L.MaxPool2D(2),
                          L.Conv2D(8, 16, 3, padding=1), L.ReLU(), L.MaxPool2D(2),
                          L.Flatten(), L.Dense(16 * 7 * 7, 10)], seed=0)
    history = T.fit(model, x_train, y_train, T.Adam(2e-3), epochs=4, batch_size=32,
                    validation=(x_test, y_test), progress=False, log=None)
    assert history.train_loss[-1] < history.train_loss[0] < 2.3
    test_accuracy = E.accuracy(y_test, model.predict(x_test))
    assert test_accuracy >= 0.90, history
    assert test_accuracy == pytest.approx(history.val_acc[-1])
