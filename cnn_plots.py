"""Every figure of the NumPy CNN: training and validation curves, metrics,
images, filters, feature maps, saliency and occlusion maps.

This is the only module that imports matplotlib and seaborn (the maths
modules stay NumPy-only). Every ``plot_*`` function returns its matplotlib Figure and,
given ``path``, also writes it as a PNG (dpi 150) atomically. Figures are made
with pyplot: close them (``close(fig)``) when making many in a script, and
in Jupyter end a cell with ``;`` so the returned Figure is not shown twice.
"""
import functools
import sys
from pathlib import Path

import matplotlib
import numpy as np


def _backend_is_set():
    try:
        return matplotlib.get_backend(auto_select=False) is not None    # matplotlib >= 3.10
    except TypeError:
        return matplotlib.rcParams._get_backend_or_none() is not None


# Headless default: Agg, unless a backend was chosen (rc file, MPLBACKEND, Jupyter).
if not _backend_is_set() and "ipykernel" not in sys.modules:
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from mpl_toolkits.axes_grid1 import make_axes_locatable  # noqa: E402

from cnn_core import output_size  # noqa: E402
from cnn_files import save_figure  # noqa: E402
from cnn_layers import BatchNorm, Dropout  # noqa: E402

# One style for every figure, applied with rc_context inside each function so
# that importing this module changes no global matplotlib settings.
STYLE = {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook", font_scale=0.9),
         "axes.titlesize": 10, "figure.titlesize": 12, "image.interpolation": "nearest"}


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------

def _styled(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with plt.rc_context(STYLE):
            return fn(*args, **kwargs)
    return wrapper


def _finish(fig, path):
    if path is not None:
        save_figure(fig, path)
    return fig


def show(obj, metadata=None):
    """Show ``obj`` (a Figure, Markdown text, ``png(path)``, ...) in a notebook with
    output ``metadata`` (IPython's ``display``, imported only when something is shown)."""
    from IPython.display import display
    display(obj, metadata=metadata)


def png(path):
    """The PNG file at ``path`` as something ``show`` displays (IPython's ``Image``)."""
    from IPython.display import Image
    return Image(filename=str(path))


def close(fig):
    """Close a Figure made here: pyplot keeps every figure it made open (and Jupyter
    shows the open ones at the end of a cell) until it is closed. Used by
    ``cnn_report.figure`` once the figure is shown, so it does not appear twice."""
    plt.close(fig)


def _to_display(image):
    """(C, H, W) with C in {1, 3} -> (H, W) or (H, W, 3), min-max scaled to [0, 1] if outside it."""
    image = np.asarray(image, dtype=float)
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected an image of shape (1, H, W) or (3, H, W), got {image.shape}")
    lo, hi = image.min(), image.max()
    if lo < 0 or hi > 1:
        image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    return image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)


def _grid(n, ncols, tile=1.3, height=None):
    """A figure with a grid of at least ``n`` axes, all without ticks or frames."""
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(tile * ncols, (height or tile) * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes.flat


def _mosaic(tiles, ncols, fill, pad=1):
    """(T, h, w[, 3]) tiles -> one image with ``ncols`` tiles per row and ``pad``-wide gaps."""
    T, rest = len(tiles), tiles.shape[3:]
    rows = -(-T // ncols)
    t = np.concatenate([tiles, np.full((rows * ncols - T,) + tiles.shape[1:], fill)])
    t = np.pad(t, [(0, 0), (pad, 0), (pad, 0)] + [(0, 0)] * len(rest), constant_values=fill)
    h, w = t.shape[1:3]
    grid = t.reshape((rows, ncols, h, w) + rest).swapaxes(1, 2).reshape((rows * h, ncols * w) + rest)
    return np.pad(grid, [(0, pad), (0, pad)] + [(0, 0)] * len(rest), constant_values=fill)


# ---------------------------------------------------------------------------
# Training curves and metrics
# ---------------------------------------------------------------------------

@_styled
def plot_history(history, path=None):
    """Loss and accuracy per epoch (numbered from 1), train and, if recorded, validation.

    history: a ``cnn_train.History`` or a dict with lists ``train_loss``,
    ``train_acc`` and optionally ``val_loss``, ``val_acc`` (one value per epoch).
    """
    h = history.as_dict() if hasattr(history, "as_dict") else dict(history)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, name in zip(axes, ("loss", "acc"), ("loss", "accuracy")):
        for split, style in (("train", "-o"), ("val", "--s")):
            values = h.get(f"{split}_{metric}")
            if values is not None and len(values):
                ax.plot(np.arange(1, len(values) + 1), values, style, ms=4,
                        label="train" if split == "train" else "validation")
        ax.set(xlabel="epoch", ylabel=name, title=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))   # whole epochs, even one
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    return _finish(fig, path)


@_styled
def plot_val_curves(curves, title=None, path=None):
    """Validation accuracy per epoch (numbered from 1) of several runs on one axis.

    curves: {label: list of validation accuracies, one per epoch}, drawn in
    order; runs may have different numbers of epochs. A (seeds, epochs) array
    instead of a list draws the mean over the seeds with error bars of one
    standard deviation.
    """
    curves = {label: np.asarray(values, dtype=float) for label, values in curves.items()}
    if not curves or not all(values.ndim in (1, 2) and values.shape[-1] for values in curves.values()):
        raise ValueError("plot_val_curves: need at least one run with one value per epoch, got "
                         f"{ {label: values.shape for label, values in curves.items()} }")
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    for label, values in curves.items():
        epochs = np.arange(1, values.shape[-1] + 1)
        if values.ndim == 2:
            spread = values.std(axis=0, ddof=1) if len(values) > 1 else None
            ax.errorbar(epochs, values.mean(axis=0), yerr=spread, fmt="-o", ms=4, capsize=3,
                        label=f"{label} ({len(values)} seeds)")
        else:
            ax.plot(epochs, values, "-o", ms=4, label=label)
    longest = max(values.shape[-1] for values in curves.values())
    ax.set(xlabel="epoch", ylabel="validation accuracy", title=title or "validation accuracy",
           xlim=(0.5, longest + 0.5))                  # whole epochs on the axis, even for a single one
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    # beside the axes, not on them: seven curves with error bars leave no free corner
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    fig.tight_layout()
    return _finish(fig, path)


@_styled
def plot_confusion_matrix(cm, class_names, normalize=False, path=None):
    """Heatmap of a (K, K) confusion matrix (row = true, column = predicted).

    ``normalize=True`` divides each row by its total, so the diagonal shows recall.
    """
    cm = np.asarray(cm)
    if normalize:
        totals = cm.sum(axis=1, keepdims=True)
        cm = np.divide(cm, totals, out=np.zeros(cm.shape), where=totals != 0)
    k = len(cm)
    fmt = ".2f" if normalize else ("d" if np.issubdtype(cm.dtype, np.integer) else "g")
    fig, ax = plt.subplots(figsize=(0.55 * k + 2.5, 0.55 * k + 2))
    sns.heatmap(cm, annot=k <= 20, fmt=fmt, cmap="Blues", square=True, ax=ax,
                xticklabels=class_names, yticklabels=class_names, vmin=0,
                vmax=1 if normalize else None, annot_kws={"fontsize": 8})
    ax.set(xlabel="predicted", ylabel="true",
           title="confusion matrix" + (" (row-normalised)" if normalize else " (counts)"))
    return _finish(fig, path)


@_styled
def plot_per_class(report, path=None):
    """Grouped bars of precision, recall and F1 per class.

    report: the dict of ``cnn_metrics.classification_report`` (arrays of K values
    under "precision", "recall", "f1", and "class_names").
    """
    names = report["class_names"]
    x, width = np.arange(len(names)), 0.27
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names) + 2), 3.8))
    for i, metric in enumerate(("precision", "recall", "f1")):
        ax.bar(x + (i - 1) * width, report[metric], width, label=metric)
    ax.set_xticks(x, names, rotation=45 if max(len(n) for n in names) > 3 else 0)
    title = "per-class metrics" + (f" (macro F1 {report['macro']['f1']:.3f})" if "macro" in report else "")
    ax.set(ylim=(0, 1.05), xlabel="class", ylabel="score", title=title)
    ax.grid(axis="x", visible=False)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _finish(fig, path)


# ---------------------------------------------------------------------------
# Images, filters and feature maps
# ---------------------------------------------------------------------------

def _image_figure(images, titles, ncols, cmap):
    images = np.asarray(images)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"expected a non-empty batch of images (N, C, H, W), got shape {images.shape}")
    # 1.3 inches a row of images, and 0.2 more for each line of the titles (fontsize 8)
    lines = max((str(t).count("\n") + 1 for t in titles), default=0) if titles is not None else 0
    fig, axes = _grid(len(images), ncols, height=1.3 + 0.2 * lines)
    for k, (ax, image) in enumerate(zip(axes, images)):
        ax.imshow(_to_display(image), cmap=cmap, vmin=0, vmax=1)
        if titles is not None:
            ax.set_title(titles[k], fontsize=8)
    fig.tight_layout()
    return fig


@_styled
def plot_images(images, titles=None, ncols=10, path=None, cmap="gray"):
    """A grid of images (N, 1, H, W) gray or (N, 3, H, W) RGB, each scaled to [0, 1]
    if outside it; ``titles`` an optional list of N strings."""
    return _finish(_image_figure(images, titles, ncols, cmap), path)


def plot_class_examples(x, y, class_names, per_class=6, max_classes=None, ncols=12, path=None):
    """``plot_images`` of the first ``per_class`` images of each class (of the
    first ``max_classes`` classes, default all), class by class, each titled
    with its class name. x: (N, C, H, W) floats, or uint8 pixels 0..255 (shown
    as pixel / 255, as the network sees them); y: (N,) labels; class_names: K strings."""
    y = np.asarray(y)
    classes = range(len(class_names) if max_classes is None else min(max_classes, len(class_names)))
    picks = np.concatenate([np.flatnonzero(y == k)[:per_class] for k in classes])
    images = x[picks] / 255 if x.dtype == np.uint8 else x[picks]     # only the shown images are converted
    return plot_images(images, [class_names[k] for k in y[picks]], ncols=ncols, path=path)


@_styled
def plot_misclassified(x, y_true, y_pred, proba, class_names, n=20, path=None):
    """The ``n`` most confident mistakes, titled "true" over "→ predicted (confidence%)"
    (two lines: class names such as "automobile" side by side would overlap).

    x: (N, C, H, W), y_true and y_pred: (N,), proba: (N, K) predicted probabilities.
    """
    y_true, y_pred, proba = np.asarray(y_true), np.asarray(y_pred), np.asarray(proba)
    wrong = np.flatnonzero(y_true != y_pred)
    if len(wrong) == 0:
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "no misclassified examples", ha="center", va="center")
        return _finish(fig, path)
    confidence = proba[wrong, y_pred[wrong]]
    worst = wrong[np.argsort(-confidence, kind="stable")[:n]]
    titles = [f"{class_names[y_true[i]]}\n→ {class_names[y_pred[i]]} ({100 * proba[i, y_pred[i]]:.0f}%)"
              for i in worst]
    fig = _image_figure(x[worst], titles, 10, "gray")
    fig.suptitle("most confident mistakes: true class, → predicted (confidence)", y=1.02)
    return _finish(fig, path)


@_styled
def plot_filters(W, path=None, title=None, max_channels=8, ncols=16):
    """Conv weights W: (F, C, kh, kw) as one image.

    C == 3: one RGB tile per filter, each min-max scaled to [0, 1].
    Otherwise: one tile per (input channel, filter) for the first
    ``max_channels`` channels (rows = channels, columns = filters), on a
    diverging colour map centred at 0 (red positive, blue negative).
    """
    W = np.asarray(W, dtype=float)
    F, C, kh, kw = W.shape
    c = 3 if C == 3 else min(C, max_channels)
    if C == 3:
        lo, hi = W.min(axis=(1, 2, 3), keepdims=True), W.max(axis=(1, 2, 3), keepdims=True)
        tiles = ((W - lo) / np.where(hi > lo, hi - lo, 1)).transpose(0, 2, 3, 1)   # (F, kh, kw, 3)
        image = _mosaic(tiles, min(F, ncols), fill=1.0)
    else:                                                          # rows = channels, columns = filters
        tiles = W[:, :c].transpose(1, 0, 2, 3).reshape(c * F, kh, kw)
        image = _mosaic(tiles, F if c > 1 else min(F, ncols), fill=np.nan)
    inch = min(0.12, 12 / image.shape[1], 8 / image.shape[0])      # size of one weight on the page
    fig, ax = plt.subplots(figsize=(inch * image.shape[1] + 1, inch * image.shape[0] + 0.6))
    if C == 3:
        ax.imshow(image)
    else:
        m = np.abs(W[:, :c]).max() or 1.0
        shown = ax.imshow(image, cmap="RdBu_r", vmin=-m, vmax=m)
        fig.colorbar(shown, cax=make_axes_locatable(ax).append_axes("right", size=0.15, pad=0.1))
    if C not in (1, 3):
        ax.set(xlabel="filter", ylabel="input channel" + (f"\n(first {c} of {C})" if c < C else ""))
    ax.set(xticks=[], yticks=[], title=title or f"filters {W.shape}")
    ax.grid(False)
    return _finish(fig, path)


def feature_maps(model, x):
    """Run ``model`` (inference mode) layer by layer on x: (N, C, H, W) or one (C, H, W).

    Returns a list of (label, activation), one per layer; every activation keeps
    the batch axis, e.g. (1, 32, 28, 28) for one MNIST image after the first conv.
    """
    x = np.asarray(x)
    out, maps = (x[None] if x.ndim == 3 else x), []
    for layer in model.layers:
        out = layer.forward(out, training=False)
        maps.append((layer.label() if hasattr(layer, "label") else type(layer).__name__, out))
    return maps


def activations_after(model, x, layer_type):
    """The outputs of every layer of ``model`` that is a ``layer_type`` (e.g.
    ``cnn_layers.ReLU``), in layer order, for x (N, C, H, W) in inference mode
    (``feature_maps``): a list of arrays (N, C', h, w), e.g. the maps after each
    convolution block's ReLU."""
    return [out for layer, (_, out) in zip(model.layers, feature_maps(model, x)) if isinstance(layer, layer_type)]


@_styled
def plot_feature_maps(activation, title=None, max_maps=32, path=None):
    """The first ``max_maps`` channels of one example's activation (C, H, W), each
    on its own colour scale."""
    activation = np.asarray(activation)
    if activation.ndim != 3:
        raise ValueError(f"expected one example's activation (C, H, W), got {activation.shape}; "
                         "take one example, e.g. maps[k][1][0]")
    shown = activation[:max_maps]
    fig, axes = _grid(len(shown), 8, tile=1.2, height=1.35)
    for c, (ax, fmap) in enumerate(zip(axes, shown)):
        ax.imshow(fmap, cmap="viridis")
        ax.set_title(f"channel {c}", fontsize=8)
    fig.suptitle(title or f"feature maps {activation.shape}")
    fig.tight_layout()
    return _finish(fig, path)


# ---------------------------------------------------------------------------
# What drives a decision: saliency and occlusion
# ---------------------------------------------------------------------------

def input_gradient(model, x, labels):
    """Saliency: d logit[n, labels[n]] / d x[n] of the deployed (inference-mode)
    network, by our own backward pass.

    x: (N, ...) or one example (C, H, W); labels: (N,) ints or one int.
    Layers run with training=True so they keep their caches, except the two
    whose inference mode differs: Dropout is the identity (skipped on the way
    back) and BatchNorm the per-channel map x * scale + shift with its running
    statistics (its gradient is dout * scale), so the statistics of these few
    images never enter and the running averages stay untouched.
    Returns an array of x's shape (pass a few examples at a time: every layer
    keeps its cache for the whole batch until the next forward pass).
    """
    x = np.asarray(x)
    out = xb = x[None] if x.ndim == 3 else x
    for layer in model.layers:
        out = layer.forward(out, training=not isinstance(layer, (Dropout, BatchNorm)))
    labels = np.broadcast_to(np.asarray(labels), (len(xb),))
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= out.shape[1]:
        raise ValueError(f"labels must be ints in 0..{out.shape[1] - 1}, got {labels}")
    dout = np.zeros_like(out)
    dout[np.arange(len(xb)), labels] = 1
    for layer in reversed(model.layers):
        if isinstance(layer, BatchNorm):              # inference mode: y = x * scale + shift per channel
            dout = dout * layer.inference_scale().reshape((1, -1) + (1,) * (dout.ndim - 2))
        elif not isinstance(layer, Dropout):
            dout = layer.backward(dout)
    return dout.reshape(x.shape)


@_styled
def plot_saliency(x, grads, titles=None, path=None):
    """Images x: (N, C, H, W) on top, |gradient| (max over channels) below.

    grads: same shape as x, e.g. from ``input_gradient``.
    """
    x, grads = np.asarray(x), np.asarray(grads)
    n = len(x)
    fig, axes = plt.subplots(2, n, figsize=(1.4 * n, 3.2), squeeze=False)
    for k in range(n):
        axes[0, k].imshow(_to_display(x[k]), cmap="gray", vmin=0, vmax=1)
        axes[1, k].imshow(np.abs(grads[k]).max(axis=0), cmap="magma")
        if titles is not None:
            axes[0, k].set_title(titles[k], fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    axes[1, 0].set_title("|gradient|", fontsize=8, loc="left")
    fig.tight_layout()
    return _finish(fig, path)


def occlusion_map(model, x, label, patch=4, stride=2, fill=0.0, batch_size=256):
    """Probability of ``label`` while a ``patch`` x ``patch`` square of value ``fill``
    slides with ``stride`` over ONE image x: (C, H, W).

    Returns (OH, OW) with OH = (H - patch) // stride + 1 (likewise OW), the
    output size of a patch x patch window with this stride and no padding; entry
    (i, j) is the probability with pixels [i*stride : i*stride+patch, j*stride :
    j*stride+patch] occluded. Occluded copies are built and classified
    ``batch_size`` at a time.
    """
    x = np.asarray(x)
    C, H, W = x.shape
    if not 1 <= patch <= min(H, W) or stride < 1:
        raise ValueError(f"need 1 <= patch <= {min(H, W)} and stride >= 1, got {patch}, {stride}")
    OH, OW = output_size(H, patch, stride, 0), output_size(W, patch, stride, 0)
    starts_h, starts_w = np.arange(OH) * stride, np.arange(OW) * stride
    in_row = (np.arange(H) >= starts_h[:, None]) & (np.arange(H) < starts_h[:, None] + patch)    # (OH, H)
    in_col = (np.arange(W) >= starts_w[:, None]) & (np.arange(W) < starts_w[:, None] + patch)    # (OW, W)
    probs = np.empty(OH * OW)
    for s in range(0, OH * OW, batch_size):
        i, j = np.divmod(np.arange(s, min(s + batch_size, OH * OW)), OW)
        mask = in_row[i][:, None, :, None] & in_col[j][:, None, None, :]                      # (B, 1, H, W)
        copies = np.where(mask, np.asarray(fill, dtype=x.dtype), x[None])
        probs[s:s + len(i)] = model.predict_proba(copies, batch_size)[:, label]
    return probs.reshape(OH, OW)


@_styled
def plot_occlusion(x, heatmaps, titles=None, path=None):
    """Each image of x: (N, C, H, W) beside its occlusion map, one shared colour
    bar for the probability of the true class (0 to 1).

    heatmaps: N arrays (OH, OW), e.g. from ``occlusion_map``; ``titles`` an
    optional list of N strings for the images.
    """
    x = np.asarray(x)
    if x.ndim != 4 or len(x) == 0 or len(heatmaps) != len(x):
        raise ValueError(f"plot_occlusion: need N images (N, C, H, W) and N heat maps, got images "
                         f"{x.shape} and {len(heatmaps)} maps")
    fig, axes = plt.subplots(1, 2 * len(x), figsize=(4 * len(x), 2.4), squeeze=False)
    axes = axes[0]
    for k, (image, heat) in enumerate(zip(x, heatmaps)):
        axes[2 * k].imshow(_to_display(image), cmap="gray", vmin=0, vmax=1)
        axes[2 * k].set_title(titles[k] if titles is not None else f"image {k}")
        shown = axes[2 * k + 1].imshow(np.asarray(heat), cmap="magma", vmin=0, vmax=1)
        axes[2 * k + 1].set_title("P(true class) occluded")
    for ax in axes:
        ax.axis("off")
    fig.colorbar(shown, ax=list(axes), shrink=0.8)
    return _finish(fig, path)


# ---------------------------------------------------------------------------
# Report figures sized for a printed page: filter grids, feature maps of two
# inputs, saliency and occlusion side by side
# ---------------------------------------------------------------------------

def strongest_channels(W):
    """For conv weights W: (F, C, kh, kw), the input channel of each filter whose
    kernel has the largest L2 norm: (F,) ints (the channel that filter relies on most)."""
    W = np.asarray(W)
    if W.ndim != 4:
        raise ValueError(f"expected conv weights (F, C, kh, kw), got shape {W.shape}")
    return np.sqrt((W.astype(float) ** 2).sum(axis=(2, 3))).argmax(axis=1)


@_styled
def plot_filter_grid(W, title=None, path=None, tile=0.62):
    """Every filter of a conv layer W: (F, C, kh, kw) as one tile of a near-square grid.

    C == 1: the filter itself. C == 3: an RGB tile (min-max scaled per filter).
    C > 1 otherwise: per filter, its strongest input channel (largest L2 norm,
    ``strongest_channels``), named under the tile ("ch 12"), and the title says so.
    Weights use one diverging colour scale for the whole grid (red positive,
    blue negative, shared colour bar), so tiles compare.
    """
    W = np.asarray(W, dtype=float)
    if W.ndim != 4:
        raise ValueError(f"expected conv weights (F, C, kh, kw), got shape {W.shape}")
    F, C, kh, kw = W.shape
    ncols = int(np.ceil(np.sqrt(F)))
    nrows = -(-F // ncols)
    deep = C not in (1, 3)
    channels = strongest_channels(W) if deep else np.zeros(F, dtype=int)
    tile = min(tile, 6.5 / ncols)                       # at most about a page's width
    fig, axes = plt.subplots(nrows, ncols, figsize=(tile * ncols + 0.9, (tile + (0.16 if deep else 0.02)) * nrows + 0.5),
                             squeeze=False, layout="constrained")
    m = np.abs(W[np.arange(F), channels]).max() or 1.0
    for f, ax in enumerate(axes.flat):
        ax.set(xticks=[], yticks=[])
        ax.grid(False)
        if f >= F:
            ax.axis("off")
            continue
        if C == 3:
            w = W[f].transpose(1, 2, 0)
            ax.imshow((w - w.min()) / (np.ptp(w) or 1.0))
        else:
            shown = ax.imshow(W[f, channels[f]], cmap="RdBu_r", vmin=-m, vmax=m)
        if deep:
            ax.set_xlabel(f"f{f} ch{channels[f]}", fontsize=6, labelpad=1)
    if C != 3:
        fig.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.6, pad=0.02, label="weight")
    default = (f"{F} filters {kh}x{kw}" + (f", each shown on its strongest of {C} input channels "
                                           "(largest L2 norm)" if deep else ""))
    fig.suptitle(title or default, fontsize=10)
    return _finish(fig, path)


@_styled
def plot_feature_maps_pair(images, activations, titles, max_maps=16, title=None, path=None, cmap="gray"):
    """The same channels of one layer for two (or more) inputs, side by side.

    images: (N, C, H, W) inputs; activations: (N, C', h, w) that layer's output for
    them; titles: N strings. Each input is shown small, then the first ``max_maps``
    channels as a 4-column mosaic. A channel has one colour scale shared by all
    inputs (0 to its largest value over them), so brighter means stronger.
    """
    images, activations = np.asarray(images), np.asarray(activations, dtype=float)
    if images.ndim != 4 or activations.ndim != 4 or len(images) != len(activations) or len(titles) != len(images):
        raise ValueError(f"plot_feature_maps_pair: need N images (N, C, H, W), N activations (N, C', h, w) and "
                         f"N titles, got {images.shape}, {activations.shape}, {len(titles)} titles")
    maps = activations[:, :max_maps]
    lo = np.minimum(maps.min(axis=(0, 2, 3), keepdims=True), 0)
    hi = maps.max(axis=(0, 2, 3), keepdims=True)
    maps = (maps - lo) / np.where(hi > lo, hi - lo, 1)
    ncols = 4
    n = len(images)
    fig, axes = plt.subplots(1, 2 * n, figsize=(3.6 * n, 2.6), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2.6] * n})
    for k in range(n):
        axes[0, 2 * k].imshow(_to_display(images[k]), cmap="gray", vmin=0, vmax=1)
        axes[0, 2 * k].set_title(titles[k], fontsize=9)
        axes[0, 2 * k + 1].imshow(_mosaic(maps[k], ncols, fill=np.nan), cmap="viridis", vmin=0, vmax=1)
        axes[0, 2 * k + 1].set_title(f"channels 0-{len(maps[k]) - 1} (row by row)", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(title or f"feature maps {activations.shape[1:]}", fontsize=10)
    fig.tight_layout()
    return _finish(fig, path)


def occlusion_drop(model, x, label=None, patch=8, stride=2, fill=0.0, batch_size=256):
    """How much the probability of ``label`` (default: the predicted class) falls
    when a ``patch`` x ``patch`` square of ``fill`` hides each part of ONE image x: (C, H, W).

    Returns (drop, label, p): drop (OH, OW) = p - P(label | occluded) with the
    positions of ``occlusion_map``, p the probability on the whole image.
    Positive: that region supported the decision; negative: it spoke against it.
    ``fill`` may be a number or an image of x's shape (e.g. the mean training image).
    """
    x = np.asarray(x)
    proba = model.predict_proba(x[None])[0]
    label = int(proba.argmax()) if label is None else int(label)
    return proba[label] - occlusion_map(model, x, label, patch, stride, fill, batch_size), label, float(proba[label])


@_styled
def plot_explanations(x, saliency, drops, titles, patch=None, path=None, title=None):
    """Columns of: image (with ``titles``), |saliency| (max over channels) and the
    occlusion drop map, for N images x: (N, C, H, W).

    saliency: same shape as x (e.g. ``input_gradient`` for the predicted class);
    drops: N maps from ``occlusion_drop``, each drawn on its own symmetric scale
    (red: hiding this region lowers the predicted class's probability, blue:
    raises it) upsampled to the image size so they line up with it.
    """
    x, saliency = np.asarray(x), np.asarray(saliency)
    n = len(x)
    if x.ndim != 4 or saliency.shape != x.shape or len(drops) != n or len(titles) != n:
        raise ValueError(f"plot_explanations: need N images (N, C, H, W), saliency of the same shape, N maps "
                         f"and N titles, got {x.shape}, {saliency.shape}, {len(drops)}, {len(titles)}")
    fig, axes = plt.subplots(3, n, figsize=(0.95 * n + 0.8, 3.6), squeeze=False)
    H, W = x.shape[2:]
    for k in range(n):
        axes[0, k].imshow(_to_display(x[k]), cmap="gray", vmin=0, vmax=1)
        axes[0, k].set_title(titles[k], fontsize=9)
        axes[1, k].imshow(np.abs(saliency[k]).max(axis=0), cmap="magma")
        drop = np.asarray(drops[k], dtype=float)
        m = np.abs(drop).max() or 1.0
        axes[2, k].imshow(drop, cmap="RdBu_r", vmin=-m, vmax=m, extent=(0, W, H, 0))
        axes[2, k].text(0.5, -0.04, f"max {drop.max():+.2f}", transform=axes[2, k].transAxes,
                        ha="center", va="top", fontsize=8)
    for ax in axes.flat:
        ax.set(xticks=[], yticks=[])
        ax.grid(False)
    axes[1, 0].set_ylabel("|saliency|", fontsize=9)
    axes[2, 0].set_ylabel("occlusion\ndrop" + (f" ({patch}x{patch})" if patch else ""), fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _finish(fig, path)


def explain(model, images, classes, titles, patch=8, stride=2, path=None):
    """Why ``model`` chose a class, for N images (N, C, H, W): ``plot_explanations``
    of the saliency of ``classes`` (N,) ints (``input_gradient``) and of the drop of
    its probability when a ``patch`` x ``patch`` square of 0 slides over the image
    with ``stride`` (``occlusion_drop``); ``titles``: N strings. Returns the Figure.

    The saliency is taken one image at a time, as ``input_gradient`` advises
    (every layer caches its whole batch on the way forward).
    """
    images, classes = np.asarray(images), np.asarray(classes)
    if images.ndim != 4 or classes.shape != (len(images),):
        raise ValueError(f"explain: need N images (N, C, H, W) and N classes, got {images.shape} and "
                         f"{classes.shape}")
    saliency = np.concatenate([input_gradient(model, images[k:k + 1], classes[k]) for k in range(len(images))])
    drops = [occlusion_drop(model, image, label, patch=patch, stride=stride)[0]
             for image, label in zip(images, classes)]
    return plot_explanations(images, saliency, drops, titles, patch=patch, path=path)
