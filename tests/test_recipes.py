"""The report's recipes build, train one short epoch with every technique, and refuse typos."""
import numpy as np
import pytest

import cnn_layers as L
import cnn_model as M
import cnn_recipes as Q
import cnn_train as T


def test_mnist_recipe_builds_and_trains_with_every_technique():
    model, optimizer, kwargs = Q.mnist_recipe(seed=1, epochs=1, batch_size=16)
    assert isinstance(optimizer, T.SGD) and optimizer.nesterov and T.is_per_step(kwargs["schedule"])
    assert kwargs["ema"] == Q.MNIST_RECIPE["ema"] and kwargs["label_smoothing"] == Q.MNIST_RECIPE["label_smoothing"]
    assert sum(isinstance(layer, L.BatchNorm) for layer in model.layers) == 5
    rng = np.random.default_rng(0)
    x, y = rng.random((32, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 32)
    history = T.fit(model, x, y, optimizer, progress=False, log=None, validation=(x[:8], y[:8]), **kwargs)
    assert len(history.val_acc) == 1 and np.isfinite(history.train_loss[0])
    with pytest.raises(ValueError, match=r"unknown settings \['epoch'\]"):
        Q.mnist_recipe(epoch=3)


def test_cifar_recipe_whitens_from_the_training_images_and_trains():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (24, 3, 16, 16), dtype=np.uint8)
    y = rng.integers(0, 10, 24)
    model, optimizer, kwargs = Q.cifar_recipe(x, seed=0, epochs=1, batch_size=8, widths=(8, 16), whiten_images=20)
    stem = model.layers[0]
    assert isinstance(stem, L.Conv2D) and not stem.trainable and stem.params["W"].shape == (24, 3, 2, 2)
    assert kwargs["label_smoothing"] == Q.CIFAR_RECIPE["label_smoothing"] and T.is_per_step(kwargs["schedule"])
    W_before = stem.params["W"].copy()
    history = T.fit(model, x, y, optimizer, progress=False, log=None, **kwargs)
    assert np.isfinite(history.train_loss[0]) and np.array_equal(stem.params["W"], W_before)   # frozen
    with pytest.raises(ValueError, match=r"cifar_recipe: unknown settings \['width'\]"):
        Q.cifar_recipe(x, width=(8,))


def test_rows_gru_recipe_clips_and_decays():
    model, optimizer, kwargs = Q.rows_gru_recipe(M.mnist_rows_gru(seed=0), epochs=2)
    assert isinstance(optimizer, T.Adam) and kwargs["clip_norm"] == Q.ROWS_GRU_RECIPE["clip_norm"]
    assert kwargs["schedule"](1) < kwargs["schedule"](0)
    with pytest.raises(ValueError, match="rows_gru_recipe: unknown settings"):
        Q.rows_gru_recipe(model, lr_max=1.0)


def test_cifar_recipe_ablation_switches():
    x = np.random.default_rng(0).integers(0, 256, (12, 3, 16, 16), dtype=np.uint8)
    model, _, kwargs = Q.cifar_recipe(x, widths=(8,), whiten_images=0, ema=0, shift=0, flip=False)
    assert model.layers[0].trainable and kwargs["ema"] is None and kwargs["augment"] is None


def test_cifar_recipe_whitens_from_a_random_sample_not_the_first_images():
    """Image-folder copies of CIFAR-10 are stored class by class: the first images
    are all one class, so the whitening statistics must come from a random sample."""
    rng = np.random.default_rng(1)
    x = np.concatenate([np.full((30, 3, 8, 8), 7, np.uint8) + rng.integers(0, 3, (30, 3, 8, 8), dtype=np.uint8),
                        rng.integers(0, 256, (30, 3, 8, 8), dtype=np.uint8)])      # "class 0" first
    model, _, _ = Q.cifar_recipe(x, seed=3, widths=(4,), whiten_images=20)
    pick = np.sort(np.random.default_rng(3).choice(60, 20, replace=False))
    assert np.allclose(model.layers[0].params["W"], M.whitening_conv(x[pick]).params["W"])
    assert not np.allclose(model.layers[0].params["W"], M.whitening_conv(x[:20]).params["W"])
