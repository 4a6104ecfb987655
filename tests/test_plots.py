"""Tests of cnn_plots: every plot returns a Figure and saves a PNG atomically;
feature maps, saliency gradients and occlusion maps are checked numerically."""
import os

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest

import cnn_layers as L
import cnn_model as M
import cnn_train as T
import cnn_metrics as E
import cnn_plots as P


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def tiny_model(dropout=0.5):
    """Conv -> ReLU -> MaxPool -> Flatten -> Dense -> ReLU -> Dropout -> Dense, float64."""
    f64 = dict(dtype=np.float64)
    return M.Sequential([
        L.Conv2D(1, 2, 3, padding=1, **f64), L.ReLU(), L.MaxPool2D(2), L.Flatten(),
        L.Dense(2 * 3 * 3, 8, **f64), L.ReLU(), L.Dropout(dropout), L.Dense(8, 3, **f64),
    ], seed=1)


RNG = np.random.default_rng(0)
HISTORY = T.History(train_loss=[1.0, 0.6, 0.4], train_acc=[0.6, 0.8, 0.9],
                       val_loss=[0.9, 0.7, 0.6], val_acc=[0.65, 0.75, 0.8])
Y_TRUE, Y_PRED = RNG.integers(0, 3, 30), RNG.integers(0, 3, 30)
REPORT = E.classification_report(Y_TRUE, Y_PRED, class_names=["cat", "dog", "bird"])
GRAY = RNG.normal(size=(12, 1, 8, 8))
RGB = RNG.uniform(size=(5, 3, 8, 8))
PROBA = RNG.dirichlet(np.ones(3), size=30)

def test_misclassified_titles_name_the_true_class_over_the_predicted_one():
    """Two lines ("cat" over "→ dog (90%)"): CIFAR-10's class names side by side overlapped;
    the rows grow 0.2 inches a title line."""
    y_true, y_pred = np.array([0, 1, 2, 0]), np.array([1, 1, 0, 0])
    proba = np.array([[0.1, 0.9, 0.0], [0.1, 0.8, 0.1], [0.6, 0.2, 0.2], [0.7, 0.2, 0.1]])
    fig = P.plot_misclassified(RNG.uniform(size=(4, 1, 8, 8)), y_true, y_pred, proba, ["cat", "dog", "bird"])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["cat\n→ dog (90%)", "bird\n→ cat (60%)"]              # most confident first
    one_line = P.plot_images(RNG.uniform(size=(2, 1, 8, 8)), titles=["a", "b"], ncols=2)
    two_lines = P.plot_images(RNG.uniform(size=(2, 1, 8, 8)), titles=["a\nx", "b"], ncols=2)
    untitled = P.plot_images(RNG.uniform(size=(2, 1, 8, 8)), ncols=2)
    heights = [f.get_size_inches()[1] for f in (untitled, one_line, two_lines)]
    assert heights[1] - heights[0] == pytest.approx(0.2) and heights[2] - heights[1] == pytest.approx(0.2)


CASES = {
    "history": lambda p: P.plot_history(HISTORY, path=p),
    "history_no_val": lambda p: P.plot_history({"train_loss": [1.0, 0.5], "train_acc": [0.5, 0.7],
                                                    "val_loss": [], "val_acc": []}, path=p),
    "confusion": lambda p: P.plot_confusion_matrix(REPORT["confusion"], REPORT["class_names"], path=p),
    "confusion_norm": lambda p: P.plot_confusion_matrix(REPORT["confusion"], REPORT["class_names"],
                                                            normalize=True, path=p),
    "per_class": lambda p: P.plot_per_class(REPORT, path=p),
    "images_gray": lambda p: P.plot_images(GRAY, titles=[str(k) for k in range(12)], ncols=5, path=p),
    "images_rgb": lambda p: P.plot_images(RGB, path=p),
    "misclassified": lambda p: P.plot_misclassified(RNG.uniform(size=(30, 1, 8, 8)), Y_TRUE, Y_PRED,
                                                        PROBA, ["cat", "dog", "bird"], n=6, path=p),
    "filters_gray": lambda p: P.plot_filters(RNG.normal(size=(16, 1, 3, 3)), path=p),
    "filters_multi": lambda p: P.plot_filters(RNG.normal(size=(6, 12, 3, 3)), path=p, title="conv2"),
    "filters_rgb": lambda p: P.plot_filters(RNG.normal(size=(8, 3, 5, 5)), path=p),
    "feature_maps": lambda p: P.plot_feature_maps(RNG.normal(size=(40, 6, 6)), max_maps=10, path=p),
    "saliency": lambda p: P.plot_saliency(GRAY[:4], RNG.normal(size=(4, 1, 8, 8)),
                                              titles=list("abcd"), path=p),
    "val_curves": lambda p: P.plot_val_curves({"a": [0.5, 0.7], "b": [0.4, 0.6, 0.8]}, title="runs", path=p),
    "occlusion": lambda p: P.plot_occlusion(GRAY[:2], RNG.uniform(size=(2, 3, 3)), titles=["x", "y"], path=p),
}


@pytest.mark.parametrize("name", CASES)
def test_plot_returns_figure_and_writes_png_atomically(tmp_path, name):
    path = tmp_path / "sub" / f"{name}.png"            # the folder does not exist yet
    fig = CASES[name](path)
    assert isinstance(fig, matplotlib.figure.Figure)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(path.parent) == [path.name]      # no temporary file left behind
    assert isinstance(CASES[name](None), matplotlib.figure.Figure)


def test_save_leaves_no_temp_file_when_saving_fails(tmp_path, monkeypatch):
    fig = P.plot_history(HISTORY)
    monkeypatch.setattr(fig, "savefig", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        P.save_figure(fig, tmp_path / "h.png")
    assert os.listdir(tmp_path) == []


def test_plot_history_draws_validation_only_when_present():
    with_val = P.plot_history(HISTORY)
    without = P.plot_history({"train_loss": [1.0, 0.5], "train_acc": [0.5, 0.7]})
    assert [len(ax.lines) for ax in with_val.axes] == [2, 2]
    assert [len(ax.lines) for ax in without.axes] == [1, 1]
    assert list(with_val.axes[0].lines[0].get_xdata()) == [1, 2, 3]      # epochs from 1


def test_plot_filters_rgb_tiles_are_scaled_to_unit_range():
    image = P.plot_filters(RNG.normal(size=(4, 3, 3, 3))).axes[0].get_images()[0].get_array()
    assert image.shape[-1] == 3 and image.min() == 0.0 and image.max() == 1.0


def test_feature_maps_one_entry_per_layer_with_shapes():
    model = M.mnist_cnn()
    maps = P.feature_maps(model, RNG.uniform(size=(1, 28, 28)).astype(np.float32))
    assert [label for label, _ in maps] == [layer.label() for layer in model.layers]
    assert [a.shape for _, a in maps] == [
        (1, 32, 28, 28), (1, 32, 28, 28), (1, 32, 14, 14), (1, 64, 14, 14), (1, 64, 14, 14),
        (1, 64, 7, 7), (1, 3136), (1, 128), (1, 128), (1, 128), (1, 10)]
    x = RNG.uniform(size=(3, 1, 28, 28)).astype(np.float32)
    logits = P.feature_maps(model, x)[-1][1]
    np.testing.assert_array_equal(logits, model.forward(x, training=False))


def test_input_gradient_matches_finite_differences_with_dropout_off():
    model = tiny_model(dropout=0.5)
    x = RNG.normal(size=(2, 1, 6, 6))
    labels = np.array([2, 0])
    grad = P.input_gradient(model, x, labels)
    assert grad.shape == x.shape and grad.dtype == np.float64

    def score(xx):                                     # sum_n logit[n, labels[n]], inference mode
        return model.forward(xx, training=False)[np.arange(len(xx)), labels].sum()

    eps, numeric = 1e-6, np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[idx] = eps
        numeric[idx] = (score(x + step) - score(x - step)) / (2 * eps)
    assert np.abs(numeric).max() > 1e-3               # the check is not vacuous
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)
    one = P.input_gradient(model, x[1], 0)        # a single example and an int label
    np.testing.assert_allclose(one, numeric[1], rtol=1e-5, atol=1e-7)


def test_input_gradient_of_a_batchnorm_network_is_the_deployed_network_s_and_keeps_its_statistics():
    # Training-mode batch norm would normalise with the statistics of the image itself and move the
    # running averages on every call (the occlusion maps drawn after it would use drifted ones).
    model = M.Sequential([L.Conv2D(1, 3, 3, padding=1, dtype=np.float64), L.BatchNorm(3, dtype=np.float64),
                          L.ReLU(), L.Flatten(), L.Dense(3 * 36, 4, dtype=np.float64)], seed=0)
    bn = model.layers[1]
    bn.buffers["running_mean"][:] = [0.3, -0.2, 0.1]
    bn.buffers["running_var"][:] = [2.0, 0.5, 1.5]
    bn.params["gamma"][:] = [1.5, 0.7, -1.2]
    saved = {k: v.copy() for k, v in bn.buffers.items()}
    x, label = RNG.normal(size=(1, 1, 6, 6)), 3
    grad = P.input_gradient(model, x, label)
    for name, value in saved.items():
        np.testing.assert_array_equal(bn.buffers[name], value)

    def score(xx):
        return model.forward(xx, training=False)[0, label]

    eps, numeric = 1e-6, np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[idx] = eps
        numeric[idx] = (score(x + step) - score(x - step)) / (2 * eps)
    assert np.abs(numeric).max() > 1e-3
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)


def test_occlusion_map_matches_a_loop_and_is_unchanged_on_zero_regions():
    model = tiny_model(dropout=0.0)
    x = RNG.uniform(0.5, 1.0, size=(1, 6, 6))
    x[:, :, :3] = 0.0                                  # left half is already all zeros
    label, patch, stride = 1, 3, 1
    occ = P.occlusion_map(model, x, label, patch=patch, stride=stride, fill=0.0, batch_size=5)
    assert occ.shape == (4, 4)
    expected = np.empty((4, 4))
    for i in range(4):
        for j in range(4):
            xo = x.copy()
            xo[:, i:i + patch, j:j + patch] = 0.0
            expected[i, j] = model.predict_proba(xo[None])[0, label]
    np.testing.assert_allclose(occ, expected, rtol=1e-12)
    clean = model.predict_proba(x[None])[0, label]
    np.testing.assert_allclose(occ[:, 0], clean, rtol=1e-12)      # patch inside the zero region
    assert np.all(np.abs(occ[:, 1:] - clean) > 1e-9)               # patch touches non-zero pixels


def test_plot_val_curves_one_line_per_run_with_epochs_from_one():
    fig = P.plot_val_curves({"baseline": [0.5, 0.7, 0.9], "short": [0.6]}, title="study")
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == ["baseline", "short"]
    assert list(ax.lines[0].get_xdata()) == [1, 2, 3] and list(ax.lines[0].get_ydata()) == [0.5, 0.7, 0.9]
    assert list(ax.lines[1].get_xdata()) == [1]
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("study", "epoch", "validation accuracy")
    for fig in (P.plot_val_curves({"one epoch": [0.5]}), P.plot_history({"train_loss": [1.0], "train_acc": [0.5]})):
        lo, hi = fig.axes[0].get_xlim()                 # a single epoch is tick 1, not 0.96, 0.98, ...
        assert [t for t in fig.axes[0].get_xticks() if lo <= t <= hi] == [1]
    with pytest.raises(ValueError, match="at least one run"):
        P.plot_val_curves({})
    with pytest.raises(ValueError, match="one value per epoch"):
        P.plot_val_curves({"empty": []})


def test_plot_occlusion_pairs_each_image_with_its_map_on_one_scale():
    heatmaps = [RNG.uniform(size=(3, 3)), RNG.uniform(size=(3, 3))]
    fig = P.plot_occlusion(GRAY[:2], heatmaps, titles=["digit 7", "digit 2"])
    image_axes = [ax for ax in fig.axes if ax.get_images() and ax.get_label() != "<colorbar>"]
    assert len(image_axes) == 4 and len(fig.axes) == 5                      # 2 x (image, map) + one colour bar
    assert [ax.get_title() for ax in image_axes] == ["digit 7", "P(true class) occluded", "digit 2",
                                                      "P(true class) occluded"]
    for k, heat in enumerate(heatmaps):
        shown = image_axes[2 * k + 1].get_images()[0]
        np.testing.assert_array_equal(shown.get_array(), heat)
        assert shown.get_clim() == (0, 1)                                   # probabilities on one fixed scale
    with pytest.raises(ValueError, match="N heat maps"):
        P.plot_occlusion(GRAY[:2], heatmaps[:1])


def test_plot_val_curves_draws_seed_means_with_error_bars(tmp_path):
    curves = {"one run": [0.5, 0.6], "three seeds": np.array([[0.5, 0.6, 0.7], [0.52, 0.62, 0.7], [0.48, 0.6, 0.72]])}
    fig = P.plot_val_curves(curves, path=tmp_path / "c.png")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["one run", "three seeds (3 seeds)"]
    mean_line = [line for line in ax.get_lines() if len(line.get_ydata()) == 3][0]
    assert np.allclose(mean_line.get_ydata(), curves["three seeds"].mean(axis=0))
    assert len(ax.collections) == 1          # the error bars of the seeded curve only


# ---------------------------------------------------------------- report figures (issue 10)

def test_strongest_channels_picks_the_input_channel_with_the_largest_l2_norm():
    W = np.zeros((3, 4, 3, 3))
    W[0, 2, 1, 1] = -5.0                     # a negative kernel counts by its norm
    W[1, 0] = 1.0                            # norm 3 beats a single weight of 2.5
    W[1, 3, 0, 0] = 2.5
    W[2, 1, 0, 0] = 0.1
    assert P.strongest_channels(W).tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="conv weights"):
        P.strongest_channels(W[0])


def test_plot_filter_grid_near_square_tiles_named_by_strongest_channel(tmp_path):
    W = RNG.normal(size=(10, 6, 3, 3))
    fig = P.plot_filter_grid(W, path=tmp_path / "g.png")
    tiles = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(tiles) == 12                                  # 10 filters: 4 columns x 3 rows
    shown = [ax for ax in tiles if ax.images]
    assert len(shown) == 10
    channels = P.strongest_channels(W)
    assert [ax.get_xlabel() for ax in shown] == [f"f{f} ch{channels[f]}" for f in range(10)]
    assert np.array_equal(shown[3].images[0].get_array(), W[3, channels[3]])
    assert "largest L2 norm" in fig._suptitle.get_text()
    assert (tmp_path / "g.png").exists()
    one = P.plot_filter_grid(RNG.normal(size=(9, 1, 3, 3)))  # first layer: the filter itself, no channel names
    assert sum(bool(ax.images) for ax in one.axes) == 9
    assert all(ax.get_xlabel() == "" for ax in one.axes)


def test_plot_feature_maps_pair_shares_one_scale_per_channel():
    images = RNG.uniform(size=(2, 1, 8, 8))
    activations = np.zeros((2, 3, 4, 4))
    activations[0, 1] = 1.0                    # channel 1 fires for input 0 only
    activations[1, 1] = 0.5
    fig = P.plot_feature_maps_pair(images, activations, ["a", "b"], max_maps=3)
    mosaics = [ax.images[0].get_array() for ax in fig.axes[1::2]]
    # input 1's channel 1 is drawn at half the brightness of input 0's (one scale per channel)
    assert np.nanmax(mosaics[0]) == 1.0 and np.nanmax(mosaics[1]) == 0.5
    with pytest.raises(ValueError, match="N titles"):
        P.plot_feature_maps_pair(images, activations, ["a"])


def test_occlusion_drop_is_the_fall_of_the_predicted_probability():
    model = tiny_model()
    x = RNG.normal(size=(1, 6, 6))
    drop, label, p = P.occlusion_drop(model, x, patch=3, stride=1)
    proba = model.predict_proba(x[None])[0]
    assert label == proba.argmax() and p == pytest.approx(proba[label])
    assert np.allclose(drop, proba[label] - P.occlusion_map(model, x, label, patch=3, stride=1))
    assert drop.shape == (4, 4) and np.ptp(drop) > 0          # the map varies over the image
    mean = np.full_like(x, 0.3)                                  # an image as the baseline
    other, _, _ = P.occlusion_drop(model, x, label=0, patch=3, stride=1, fill=mean)
    assert np.allclose(other, proba[0] - P.occlusion_map(model, x, 0, patch=3, stride=1, fill=mean))


def test_plot_explanations_three_rows_and_a_symmetric_scale_per_map(tmp_path):
    x, sal = RNG.uniform(size=(3, 1, 8, 8)), RNG.normal(size=(3, 1, 8, 8))
    drops = [RNG.normal(size=(4, 4)) for _ in range(3)]
    fig = P.plot_explanations(x, sal, drops, ["a", "b", "c"], patch=4, path=tmp_path / "e.png")
    assert len(fig.axes) == 9
    low, high = fig.axes[6].images[0].get_clim()              # bottom row, first column
    assert low == -high == -np.abs(drops[0]).max()
    assert (tmp_path / "e.png").exists()
    with pytest.raises(ValueError, match="N titles"):
        P.plot_explanations(x, sal, drops, ["a"])


def test_close_closes_the_figure():
    fig = P.plot_images(GRAY[:2])
    assert plt.fignum_exists(fig.number)
    P.close(fig)
    assert not plt.fignum_exists(fig.number)


def test_explain_shows_saliency_and_occlusion_drop_of_the_given_classes(tmp_path):
    model = tiny_model()
    x = RNG.normal(size=(2, 1, 6, 6))
    other = (model.predict(x[:1])[0] + 1) % 3
    classes = np.array([other, (other + 1) % 3])   # not image 0's prediction, and one class per image
    fig = P.explain(model, x, classes, ["a", "b"], patch=3, stride=1, path=tmp_path / "x.png")
    assert len(fig.axes) == 6 and [ax.get_title() for ax in fig.axes[:2]] == ["a", "b"]
    for k in range(2):
        saliency = np.abs(P.input_gradient(model, x[k:k + 1], classes[k])[0]).max(axis=0)
        drop = P.occlusion_drop(model, x[k], classes[k], patch=3, stride=1)[0]
        assert np.allclose(fig.axes[2 + k].images[0].get_array(), saliency)
        assert np.allclose(fig.axes[4 + k].images[0].get_array(), drop)
    predicted = P.occlusion_drop(model, x[0], patch=3, stride=1)[0]
    assert not np.allclose(fig.axes[4].images[0].get_array(), predicted)
    assert not np.allclose(fig.axes[3].images[0].get_array(),
                           np.abs(P.input_gradient(model, x[1:2], classes[0])[0]).max(axis=0))
    assert (tmp_path / "x.png").exists() and "3x3" in fig.axes[4].get_ylabel()
    with pytest.raises(ValueError, match="N classes"):
        P.explain(model, x, [0], ["a", "b"])


def test_plot_class_examples_the_first_images_of_each_class_titled_by_name(tmp_path):
    y = np.array([2, 0, 1, 0, 2, 0, 1])
    x = np.arange(7 * 3 * 4 * 4).reshape(7, 3, 4, 4) % 256
    fig = P.plot_class_examples(x.astype(np.uint8), y, ["a", "b", "c"], per_class=2, ncols=4, path=tmp_path / "c.png")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["a", "a", "b", "b", "c", "c"] and (tmp_path / "c.png").exists()
    assert np.allclose(fig.axes[0].images[0].get_array(), (x[1] / 255).transpose(1, 2, 0))     # pixel / 255
    fig = P.plot_class_examples(RGB, np.array([1, 0, 1, 0, 2]), ["a", "b", "c"], per_class=1, max_classes=2)
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["a", "b"]
    assert np.allclose(fig.axes[0].images[0].get_array(), RGB[1].transpose(1, 2, 0))


def test_activations_after_are_the_outputs_of_the_layers_of_one_type():
    model = M.mnist_net_v2(channels=(4, 6), hidden=8)
    x = RNG.uniform(size=(2, 1, 28, 28)).astype(np.float32)
    maps = P.feature_maps(model, x)
    relus = P.activations_after(model, x, L.ReLU)
    expected = [out for label, out in maps if label == "ReLU"]
    assert len(relus) == 4 and all(np.array_equal(a, b) for a, b in zip(relus, expected, strict=True))
    assert [a.shape for a in relus[:2]] == [(2, 4, 14, 14), (2, 6, 7, 7)]
    assert [a.shape for a in P.activations_after(model, x, L.Conv2D)] == [(2, 4, 28, 28), (2, 6, 14, 14), (2, 6, 7, 7)]


def test_show_displays_the_object_itself_and_png_wraps_a_file(monkeypatch, tmp_path):
    import IPython.display
    import cnn_report as R
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, metadata=None: shown.append((obj, metadata)))
    text = R.MarkdownText("| a |\n|---|\n| 1 |")          # a str: must not be taken for a file name
    P.show(text, {"k": 1})
    assert shown == [(text, {"k": 1})]
    path = tmp_path / "f.png"
    fig = plt.figure(figsize=(1, 1))
    fig.savefig(path)
    plt.close(fig)
    assert isinstance(P.png(path), IPython.display.Image) and P.png(str(path)).data == path.read_bytes()

