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


def test_mnist_study_runs_every_variant_per_seed_under_its_saved_run_name():
    """The run names are how the saved runs are found again: they must not change."""
    assert list(Q.MNIST_STUDY) == [
        "baseline", "kernel 5x5", "filters 8/16", "filters 16/32", "1 conv block", "3 conv blocks", "SGD lr 0.05",
        "SGD + momentum 0.9, lr 0.01", "Adam lr 1e-4", "Adam lr 1e-2", "batch norm", "dropout 0.25", "shifts of 2 px"]
    import cnn_data as D
    rng = np.random.default_rng(0)
    x, y = rng.random((30, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 30)
    data = D.Dataset(x, y, x[:5], y[:5], x[:5], y[:5], tuple("0123456789"))
    calls = {}

    def train_or_load(name, model, data, optimizer, epochs, **fit):
        calls[name] = (model, data, optimizer, epochs, fit)
        return model, {"val_acc": [0.5]}

    runs = Q.mnist_study(train_or_load, data, seeds=(0, 1), train_images=12, epochs=2)
    assert list(runs) == list(Q.MNIST_STUDY) and all(len(pairs) == 2 for pairs in runs.values())
    assert list(calls)[:3] == ["exp_baseline_seed0", "exp_baseline_seed1", "exp_kernel 5x5_seed0"]
    model, train, optimizer, epochs, fit = calls["exp_baseline_seed1"]
    assert len(train.x_train) == 12 and np.array_equal(train.x_train, x[:12]) and len(train.x_val) == 5
    assert isinstance(optimizer, T.Adam) and optimizer.lr == 1e-3 and epochs == 2
    assert fit == {"batch_size": 64, "seed": 1}
    assert [layer.p for layer in model.layers if isinstance(layer, L.Dropout)] == [0.0]       # baseline: no dropout
    assert [layer.p for layer in calls["exp_dropout 0.25_seed0"][0].layers if isinstance(layer, L.Dropout)] == [0.25]
    assert np.array_equal(model.layers[0].params["W"], M.mnist_cnn(seed=1, dropout=0.0).layers[0].params["W"])
    assert calls["exp_kernel 5x5_seed0"][0].layers[0].params["W"].shape == (32, 1, 5, 5)
    sgd = calls["exp_SGD + momentum 0.9, lr 0.01_seed0"][2]
    assert isinstance(sgd, T.SGD) and (sgd.lr, sgd.momentum) == (0.01, 0.9)
    assert calls["exp_SGD lr 0.05_seed0"][2] is not calls["exp_SGD lr 0.05_seed1"][2]     # a fresh optimiser per run
    assert any(isinstance(layer, L.BatchNorm) for layer in calls["exp_batch norm_seed0"][0].layers)
    assert callable(calls["exp_shifts of 2 px_seed0"][4]["augment"])
    with pytest.raises(ValueError, match=r"mnist_study: unknown settings \['epoch'\]"):
        Q.mnist_study(train_or_load, data, seeds=(0,), epoch=1)


def test_tta_names_each_task_s_test_time_augmentation_and_every_mode_is_known():
    assert Q.tta("mnist") == "shift" and Q.tta("cifar") == "flip"
    assert all(Q.tta(task) in M.TTA_MODES for task in ("mnist", "cifar"))
    with pytest.raises(ValueError, match="unknown task 'imagenet'"):
        Q.tta("imagenet")
