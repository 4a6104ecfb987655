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
    assert kwargs["augment"].settings == dict(crop=2, flip=True, pad="reflect")   # as the saved runs record it
    zeros = Q.cifar_recipe(x, widths=(8,), whiten_images=20, pad="zeros")[2]["augment"]
    assert zeros.settings == dict(crop=2, flip=True)        # as runs saved before the setting existed record it


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


def test_rows_recipe_whitening_stem_from_a_random_sample_of_the_rows():
    x = np.random.default_rng(2).integers(0, 256, (40, 3, 32, 32), dtype=np.uint8)
    model, _, _ = Q.rows_conv1d_recipe(seed=3, x_train=x, whiten_images=20, whiten_components=6)
    stem = model.layers[1]
    assert isinstance(stem, L.Conv1D) and not stem.trainable and stem.out_channels == 12
    pick = np.sort(np.random.default_rng(3).choice(40, 20, replace=False))
    rows = L.RowsToSequence().forward(x[pick] / np.float32(255))
    np.testing.assert_allclose(stem.params["W"], M.whitening_conv(rows, 2, components=6).params["W"])
    assert model.forward(x[:2].astype(np.float32), training=False).shape == (2, 10)
    plain = Q.rows_conv1d_recipe(whiten_images=0)[0].layers[1]
    assert isinstance(plain, L.Conv1D) and plain.trainable and plain.in_channels == 96
    with pytest.raises(ValueError, match="whiten_images=5000 needs the training images: pass x_train"):
        Q.rows_conv1d_recipe()


def test_mnist_study_runs_every_variant_per_seed_under_its_saved_run_name():
    """The run names are how the saved runs are found again: they must not change."""
    assert list(Q.MNIST_STUDY) == [
        "baseline", "kernel 5x5", "filters 8/16", "filters 16/32", "1 conv block", "3 conv blocks", "SGD lr 0.05",
        "SGD + momentum 0.9, lr 0.01", "Adam lr 1e-4", "Adam lr 1e-2", "batch norm", "dropout 0.25", "shifts of 2 px",
        "rotations and zooms"]
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
    assert calls["exp_shifts of 2 px_seed0"][4]["augment"].settings == dict(crop=2, flip=False)
    assert calls["exp_rotations and zooms_seed0"][4]["augment"].settings == dict(crop=0, flip=False, rotate=10,
                                                                                zoom=0.1)
    with pytest.raises(ValueError, match=r"mnist_study: unknown settings \['epoch'\]"):
        Q.mnist_study(train_or_load, data, seeds=(0,), epoch=1)


def test_tta_names_each_task_s_test_time_augmentation_and_every_mode_is_known():
    assert Q.tta("mnist") == "shift" and Q.tta("cifar") == Q.tta("rows") == "flip+shift"
    assert all(Q.tta(task) in M.TTA_MODES for task in ("mnist", "cifar", "rows"))
    with pytest.raises(ValueError, match="unknown task 'imagenet'"):
        Q.tta("imagenet")


def _same_run(built, inline):
    """Two (model, optimizer, fit_kwargs, epochs) runs are the same run: layers,
    initial weights, dropout streams, run_settings, learning rates and augmentation."""
    import cnn_report as R
    (model, optimizer, kwargs), (old_model, old_optimizer, old_kwargs, old_epochs) = built, inline
    kwargs = dict(kwargs)
    epochs = kwargs.pop("epochs")
    assert [layer.label() for layer in model.layers] == [layer.label() for layer in old_model.layers]
    for (key, p, _), (old_key, q, _) in zip(model.parameters(), old_model.parameters(), strict=True):
        assert key == old_key and p.dtype == q.dtype and np.array_equal(p, q)
    for layer, old in zip(model.layers, old_model.layers):
        if isinstance(layer, L.Dropout):
            assert layer.p == old.p and layer.rng.random() == old.rng.random()
    assert R.run_settings(optimizer, epochs, kwargs) == R.run_settings(old_optimizer, old_epochs, old_kwargs)
    assert [kwargs["schedule"](e) for e in range(epochs)] == [old_kwargs["schedule"](e) for e in range(old_epochs)]
    if "augment" in old_kwargs:
        x = np.random.default_rng(5).random((6, 3, 32, 32), dtype=np.float32)
        assert np.array_equal(kwargs["augment"](x, np.random.default_rng(7)),
                              old_kwargs["augment"](x, np.random.default_rng(7)))


def _rows_validation_run(epochs, x):
    """The row-sequence run as the validation script of 2026-11-27 (session 18) built it by hand: a
    whitening stem from 5,000 (here all) images of x (48 directions) -> ReLU, three
    airbench blocks in 1-D of widths 128/256/256, the 3 rows left flattened -> Dropout 0.1
    -> Dense, He-started, every trained Conv1D and Dense redrawn uniform from the rng
    [0, 1], a last Scale(1/9), and the CIFAR-10 recipe's optimiser, schedule and averaging."""
    stem = M.whitening_conv(L.RowsToSequence().forward(x), 2, components=48)
    layers, c = [L.RowsToSequence(), stem, L.ReLU()], 96
    for w in (128, 256, 256):
        layers += [L.Conv1D(c, w, 3, padding=1), L.MaxPool1D(2), L.BatchNorm(w), L.ReLU(),
                   L.Conv1D(w, w, 3, padding=1), L.BatchNorm(w), L.ReLU()]
        c = w
    model = M.Sequential(layers + [L.Flatten(), L.Dropout(0.1), L.Dense(256 * 3, 10)], seed=0)
    rng = np.random.default_rng([0, 1])
    for layer in model.layers:
        if isinstance(layer, (L.Conv1D, L.Dense)) and layer.trainable:
            layer.initialize(rng, "uniform")
    model.layers.append(L.Scale(1 / 9))
    return (model, T.SGD(0.1875, momentum=0.85, nesterov=True, weight_decay=1.33e-3, lr_scale={"beta": 64}),
            dict(batch_size=128, schedule=T.warmup_linear_schedule(0.1875, epochs, warmup=0.2),
                 augment=T.augmentation(crop=2, flip=True), label_smoothing=0.2, ema=0.998, seed=0), epochs)


@pytest.mark.parametrize("epochs", [15, 1])         # the report's run and the quick mode's
def test_rows_conv1d_and_mlp_recipes_are_the_runs_that_chose_them(epochs):
    """The row-sequence recipe is the run validated by hand (so its validation figures
    hold for it); the MLP's is the run notebook 4 built inline, so the saved run
    "cifar_mlp" stays valid (train_or_load reuses it)."""
    changes = {} if epochs == 15 else {"epochs": 1}
    mlp_epochs = 8 if epochs == 15 else 1
    x = np.random.default_rng(4).random((100, 3, 32, 32), dtype=np.float32)
    _same_run(Q.rows_conv1d_recipe(x_train=x, **changes), _rows_validation_run(epochs, x))
    mlp_inline = (M.Sequential([L.Flatten(), L.Dense(3 * 32 * 32, 512), L.ReLU(), L.Dropout(0.3), L.Dense(512, 10)],
                               seed=0),
                  T.Adam(1e-3), dict(batch_size=64, schedule=T.cosine_schedule(1e-3, mlp_epochs, lr_min=1e-5),
                                     augment=T.augmentation(crop=4, flip=True), seed=0), mlp_epochs)
    _same_run(Q.mlp_recipe(**changes), mlp_inline)


def test_rows_conv1d_and_mlp_recipes_change_settings_and_refuse_typos():
    model, optimizer, kwargs = Q.mlp_recipe(seed=1, lr=2e-3, epochs=2)
    assert optimizer.lr == 2e-3 and kwargs["epochs"] == 2 and kwargs["seed"] == 1
    assert not np.array_equal(model.layers[1].params["W"], Q.mlp_recipe()[0].layers[1].params["W"])
    _, optimizer, kwargs = Q.rows_conv1d_recipe(momentum=0.5, shift=0, flip=False, whiten_images=0)
    x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    assert optimizer.momentum == 0.5 and np.array_equal(kwargs["augment"](x, np.random.default_rng(0)), x)
    with pytest.raises(ValueError, match=r"rows_conv1d_recipe: unknown settings \['lr_max'\]"):
        Q.rows_conv1d_recipe(lr_max=1.0)
    with pytest.raises(ValueError, match=r"mlp_recipe: unknown settings \['crop'\]"):
        Q.mlp_recipe(crop=4)


@pytest.mark.parametrize("quick", [False, True])
def test_row_gru_recipes_are_notebook_7s_saved_runs(quick):
    """CIFAR-10: ROWS_GRU_RECIPE's 5 epochs; MNIST: 3 epochs; 1 each in quick mode
    (as notebook 4, now 7, built them, so "cifar_rows_gru" and "mnist_rows_gru" stay valid)."""
    changes = {"epochs": 1} if quick else {}
    cifar, mnist = (1, 1) if quick else (Q.ROWS_GRU_RECIPE["epochs"], 3)
    for built, network, epochs in [(Q.cifar_rows_gru_recipe(**changes), M.cifar_rows_gru, cifar),
                                   (Q.mnist_rows_gru_recipe(**changes), M.mnist_rows_gru, mnist)]:
        model, optimizer, kwargs = Q.rows_gru_recipe(network(seed=0), epochs=epochs)
        _same_run(built, (model, optimizer, {k: v for k, v in kwargs.items() if k != "epochs"}, epochs))
    assert Q.MNIST_ROWS_GRU_RECIPE["epochs"] == 3 and Q.ROWS_GRU_RECIPE["epochs"] == 5
    with pytest.raises(ValueError, match="mnist_rows_gru_recipe: unknown settings"):
        Q.mnist_rows_gru_recipe(epoch=2)


def test_cifar_ablation_is_notebook_3s_variants_in_order():
    """The names are part of the saved runs' names; the changes are cifar_recipe settings."""
    assert list(Q.CIFAR_ABLATION.items()) == [
        ("recipe", {}), ("no whitening (trained stem)", {"whiten_images": 0}),
        ("no label smoothing", {"label_smoothing": 0.0}), ("no weight averaging", {"ema": 0}),
        ("no flips or shifts", {"shift": 0, "flip": False}), ("no reflection (zero border)", {"pad": "zeros"})]
    assert all(set(changes) <= set(Q.CIFAR_RECIPE) for changes in Q.CIFAR_ABLATION.values())


def test_cifar_recipe_options_from_airbench_reach_the_model_and_the_saved_settings():
    import cnn_report as R
    x = np.random.default_rng(0).integers(0, 256, (24, 3, 16, 16), dtype=np.uint8)
    model, optimizer, kwargs = Q.cifar_recipe(x, seed=0, widths=(8, 16), whiten_images=20, bn_shift_lr=1,
                                              init="he", logit_scale=None)
    assert optimizer.lr_scale == {} and "lr_scale" not in R.run_settings(optimizer, 1, {})["optimizer"]
    assert isinstance(model.layers[-1], L.Dense)
    he_conv = model.layers[2].params["W"]
    model, optimizer, kwargs = Q.cifar_recipe(x, seed=0, widths=(8, 16), whiten_images=20)
    assert R.run_settings(optimizer, 1, {})["optimizer"]["lr_scale"] == {"beta": 64.0}    # the recipe's
    assert isinstance(model.layers[-1], L.Scale) and model.layers[-1].s == Q.CIFAR_RECIPE["logit_scale"]
    first = model.layers[2].params["W"]           # the first 3x3 convolution, 24 -> 8: the uniform start
    assert np.abs(first).max() <= 1 / np.sqrt(24 * 9) < np.abs(he_conv).max()
    model, optimizer, kwargs = Q.cifar_recipe(x, seed=0, widths=(8, 16), whiten_images=20, identity_init=True)
    second = model.layers[6].params["W"]          # the block's second 3x3 convolution, 8 -> 8
    assert isinstance(model.layers[6], L.Conv2D) and np.array_equal(second[:, :, 1, 1], np.eye(8))
    _, optimizer, _ = Q.mnist_recipe(bn_shift_lr=8)
    assert optimizer.lr_scale == {"beta": 8.0}
