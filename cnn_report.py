"""Helpers for the report notebooks: Markdown tables, captioned figures and
tables, training that reuses finished runs, seeded subsets, the record of a
trained model and its sentences, seed statistics and studies, report.json, and
the CIFAR-10 copy in use (the speed chapter's helpers are in ``cnn_speed``).

The notebooks tell the story and call these functions; training and using a
network needs none of them (see ``cnn_train`` and ``cnn_model``). The report's
settings (quick mode, output folders, the MNIST recipe) live in
``notebooks/common.py``.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
from pathlib import Path

import numpy as np

import cnn_data as D
import cnn_files as F
import cnn_images as I
import cnn_metrics as E
import cnn_model as M
import cnn_train as T


# ---------------------------------------------------------------------------
# Markdown tables
# ---------------------------------------------------------------------------

class MarkdownText(str):
    """A string that Jupyter renders as Markdown (``display(text)`` or the last
    line of a cell) and that prints as its source anywhere else."""

    def _repr_markdown_(self):
        return str(self)


def markdown_table(header, rows):
    """A Markdown table with the column names ``header`` and one line per row.

    rows: sequences of as many cells as ``header`` has names; each cell becomes
    ``str(cell)``, with ``|`` escaped so that it cannot split a cell.
    Returns a ``MarkdownText``.
    """
    header, rows = list(header), [list(row) for row in rows]
    for k, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"markdown_table: row {k} has {len(row)} cells for {len(header)} columns: {row}")

    def line(cells):
        return "| " + " | ".join(str(cell).replace("|", r"\|") for cell in cells) + " |"

    return MarkdownText("\n".join([line(header), "|" + "---|" * len(header)] + [line(row) for row in rows]))


def results_table(results, columns):
    """A Markdown table of records (e.g. ``Result``), one row each.

    columns: {column name: format string over the record ``r``}, e.g.
    ``{"model": "{r.name}", "parameters": "{r.params:,}"}``.
    """
    return markdown_table(columns, [[fmt.format(r=r) for fmt in columns.values()] for r in results])


# The columns of a table of trained models, each a ``Result`` scored on the test set.
MODEL_COLUMNS = {"model": "{r.name}", "parameters": "{r.params:,}", "s / epoch": "{r.seconds:.0f}",
                 "epochs": "{r.epochs}", "test accuracy": "{r.accuracy:.2%}"}


def models_table(results):
    """A Markdown table of trained models (``Result`` records with a test accuracy),
    one row each: name, parameters, median seconds per epoch, epochs and test
    accuracy (``MODEL_COLUMNS``)."""
    return results_table(results, MODEL_COLUMNS)


# The columns of a table of one recipe's runs, one per seed, each scored on the test set.
SEED_RUN_COLUMNS = {"run": "{r.name}", "epochs": "{r.epochs}", "s / epoch": "{r.seconds:.1f}",
                    "training": "{r.minutes:.1f} min", "validation accuracy": "{r.val_acc:.2%}",
                    "validation with TTA": "{r.val_acc_tta:.2%}", "test accuracy": "{r.accuracy:.2%}"}


def seed_runs_table(results):
    """A Markdown table of one recipe's runs (``Result`` records, one per seed, with
    a test accuracy): name, epochs, median seconds per epoch, training minutes,
    final validation accuracy (also with test-time augmentation, when the runs were
    scored with it) and test accuracy (``SEED_RUN_COLUMNS``)."""
    with_tta = all(r.val_acc_tta is not None for r in results)
    return results_table(results, {k: v for k, v in SEED_RUN_COLUMNS.items() if with_tta or "val_acc_tta" not in v})


def summary_table(model, input_shape):
    """A Markdown table of ``model`` (a ``cnn_model.Sequential``) for one example
    of ``input_shape`` (e.g. (1, 28, 28)): layer, output shape, parameters and
    multiply-adds per example, with a total row.

    Multiply-adds (MACs) of one forward pass: Conv2D ``OH*OW*F*C*kh*kw``, Conv1D
    ``OL*F*C*k``, Dense ``in*out``, a recurrent or per-step layer (GRU,
    StepDense) its weight matrices times the number of steps; every other layer 0
    (its elementwise work is not a product). Display it with ``table``.
    """
    x = np.zeros((1,) + tuple(input_shape), dtype=model.dtype)
    rows, total_params, total_macs = [["input", str(tuple(input_shape)), "", ""]], 0, 0
    for layer in model.layers:
        y = layer.forward(x, training=False)
        count = sum(p.size for p in layer.params.values())
        macs = _layer_macs(layer, x, y)
        total_params, total_macs = total_params + count, total_macs + macs
        label = layer.label() + ("" if getattr(layer, "trainable", True) else " (frozen)")
        rows.append([label, str(y.shape[1:]), f"{count:,}" if count else "", f"{macs:,}" if macs else ""])
        x = y
    rows.append(["**total**", "", f"**{total_params:,}**", f"**{total_macs:,}**"])
    return markdown_table(["layer", "output shape", "parameters", "multiply-adds"], rows)


def _layer_macs(layer, x, y):
    """Multiply-adds of one example through ``layer`` (x: its input, y: its output, batch of 1)."""
    W = layer.params.get("W")
    name = type(layer).__name__
    if W is None:
        return 0
    if name in ("Conv2D", "Conv1D"):                  # every weight once per output position
        return int(W.size * np.prod(y.shape[2:]))
    if name == "Dense":
        return int(W.size)
    matrices = sum(p.size for p in layer.params.values() if p.ndim >= 2)
    return int(matrices * x.shape[1]) if x.ndim == 3 else 0       # (N, T, D): once per step


# ---------------------------------------------------------------------------
# Captioned figures and tables (numbered across the whole PDF by tools/build_report.py)
# ---------------------------------------------------------------------------

# Output metadata key that tools/build_report.py reads: {"float": "figure" | "table",
# "caption": ..., "label": ...} on the figure or table itself, {"caption_text": True}
# on the caption line that Jupyter shows under it (the PDF's \caption replaces that line).
FLOAT_KEY = "cnn_report"


def _display(obj, metadata=None):
    import cnn_plots as P              # matplotlib and IPython only once a notebook shows something
    P.show(obj, metadata)


def _caption_line(kind, caption):
    return MarkdownText(f"*{kind.capitalize()}: {caption}*")


def _check_caption(function, caption, label):
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"{function}: the caption must be a non-empty string saying what to look at, got {caption!r}")
    if label is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", str(label)):
        raise ValueError(f"{function}: label must be letters, digits, '-' or '_', got {label!r}")


def figure(fig, caption, label=None):
    """Show ``fig`` (a matplotlib Figure, or the path of a PNG) with ``caption``.

    In Jupyter the figure appears with the caption in italics under it; in the
    PDF ``tools/build_report.py`` turns it into a numbered LaTeX figure (numbers
    run across all notebooks). ``label`` (letters, digits, ``-``, ``_``) lets a
    Markdown cell refer to it as ``[figure](#label)``, which becomes "figure 7".
    The Figure is closed after it is shown, so Jupyter does not show it twice.
    """
    _check_caption("figure", caption, label)
    import cnn_plots as P               # matplotlib and IPython only once a notebook shows something
    is_file = isinstance(fig, (str, Path))
    _display(P.png(fig) if is_file else fig, metadata={FLOAT_KEY: {"float": "figure", "caption": caption,
                                                                   "label": label}})
    if not is_file:
        P.close(fig)
    _display(_caption_line("figure", caption), metadata={FLOAT_KEY: {"caption_text": True}})


def table(markdown, caption, label=None):
    """Show a Markdown table (e.g. from ``markdown_table``, ``results_table`` or
    ``summary_table``) with ``caption``; in the PDF it becomes a numbered table
    that never breaks across pages. ``label`` as for ``figure`` (``[table](#label)``)."""
    _check_caption("table", caption, label)
    text = str(markdown).strip()
    if not text.startswith("|"):
        raise ValueError(f"table: expected a Markdown table (lines starting with '|'), got {text[:60]!r}")
    _display(MarkdownText(text), metadata={FLOAT_KEY: {"float": "table", "caption": caption, "label": label}})
    _display(_caption_line("table", caption), metadata={FLOAT_KEY: {"caption_text": True}})


def confusion_pairs_table(confusions, k=5):
    """A Markdown table of the k most frequent mistakes of each model:
    confusions = {model name: (confusion matrix (K, K), class names)}; a row per
    (true class -> predicted class) with its count and its share of the true
    class's test images (``cnn_metrics.top_confusions``)."""
    rows = [[name, f"{true} → {predicted}", count, f"{share:.1%}"]
            for name, (cm, names) in confusions.items()
            for true, predicted, count, share in E.top_confusions(cm, names, k)]
    return markdown_table(["model", "true → predicted", "test images", "share of the true class"], rows)


def report_confusions(mnist, cifar):
    """{model: (confusion matrix, class names)} for ``confusion_pairs_table`` from
    notebook 1's mnist_results.json and notebook 4's cifar_results.json records
    (dicts, as ``read_results`` returns them; None: that model is left out)."""
    confusions = {}
    if mnist:
        confusions["MNIST"] = (mnist["confusion"], mnist["class_names"])
    if cifar and "cifar_confusion" in cifar:          # notebook 7's record has no 2-D CNN
        confusions["CIFAR-10 2-D CNN"] = (cifar["cifar_confusion"], cifar["class_names"])
    return confusions


def classification_table(report, digits=4):
    """The per-class precision, recall, F1 and support of a
    ``cnn_metrics.classification_report`` as a Markdown table, with the macro
    and weighted averages as the last rows."""
    names = report["class_names"]
    rows = [[names[k], *(f"{report[m][k]:.{digits}f}" for m in ("precision", "recall", "f1")),
             f"{int(report['support'][k]):,}"] for k in range(len(names))]
    for average in ("macro", "weighted"):
        if average in report:
            rows.append([f"*{average} average*", *(f"{report[average][m]:.{digits}f}"
                                                   for m in ("precision", "recall", "f1")), ""])
    return markdown_table(["class", "precision", "recall", "F1", "support"], rows)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

def subset(data, train, val, test, seed=0):
    """A seeded random sample of ``train``/``val``/``test`` examples of each split
    of a ``cnn_data.Dataset`` (random, not the first ones: image-folder datasets
    are stored class by class)."""
    rng = np.random.default_rng(seed)
    pick = {}
    for split, n in (("train", train), ("val", val), ("test", test)):
        available = len(getattr(data, f"y_{split}"))
        if not 0 < n <= available:
            raise ValueError(f"subset: asked for {n} {split} examples, the data set has {available}")
        pick[split] = np.sort(rng.permutation(available)[:n])
    return dataclasses.replace(data, **{f"{xy}_{split}": getattr(data, f"{xy}_{split}")[index]
                                        for split, index in pick.items() for xy in "xy"})


def load_cifar10():
    """CIFAR-10 with per-channel standardisation, and a sentence saying which copy
    it is: the official python archive when it can be had, otherwise the JPEG
    re-encoded copy of an offline mirror (close to, not equal to, the official pixels).

    Returns (``cnn_data.Dataset``, sentence).
    """
    try:
        return D.load_cifar10(normalize="standard"), "the official CIFAR-10 python archive"
    except D.DatasetError:
        return I.load_cifar10_jpeg(normalize="standard"), (
            "the **JPEG re-encoded copy** of CIFAR-10 from the offline mirror (same images, labels "
            "and split as the official set, lossy pixels: JPEG quality 75 with the colour at half "
            "resolution, about 30 dB PSNR), because the official "
            "archive was not available; accuracies on it are close to, not equal to, official ones")


# ---------------------------------------------------------------------------
# Training that reuses finished runs
# ---------------------------------------------------------------------------

def progress_bar(enabled):
    """What to pass as ``cnn_train.fit(progress=...)``: tqdm's live bar with an
    ETA when ``enabled`` (``cnn_data.live_progress_bar``: a widget in Jupyter), otherwise
    False (the notebook keeps the per-epoch lines)."""
    return D.live_progress_bar() if enabled else False


def run_settings(optimizer, epochs, fit_kwargs):
    """The settings of a training run that change its result, as a JSON-able dict:
    epochs, the optimiser's class and hyper-parameters, and every ``fit`` keyword
    with a plain value (batch size, seed, label smoothing, ...). A schedule or an
    augmentation (a function) is its qualified name and the ``settings`` it carries
    (``cnn_train.cosine_schedule``, ``warmup_linear_schedule``, ``augmentation``)."""
    def plain(value):
        if isinstance(value, np.generic):                  # a NumPy seed or rate: its Python value
            return value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        name = getattr(value, "__qualname__", type(value).__name__)
        return {"name": name, **value.settings} if hasattr(value, "settings") else name
    hyper = {k: plain(v) for k, v in vars(optimizer).items()
             if not k.startswith("_") and k != "steps" and isinstance(v, (bool, int, float))}   # steps: state
    if getattr(optimizer, "lr_scale", None):    # only when set, so runs saved before it existed still match
        hyper["lr_scale"] = dict(optimizer.lr_scale)
    return {"epochs": epochs, "optimizer": {"class": type(optimizer).__name__, **hyper},
            **{k: plain(v) for k, v in sorted(fit_kwargs.items())}}


def start_summary(model):
    """A few numbers per parameter and buffer of an untrained ``model`` that tell its
    starting point from another with the same layers (another initialisation seed,
    ``identity_init``, other whitening images), as {"<param|buffer>.<layer>.<name>":
    [L2 norm, mean absolute value(, product with a fixed random unit vector)]}, the
    last for trained parameters only: a frozen layer computed from data (a whitening
    stem) may come out with its filters' signs flipped or swapped on another machine.
    ``_start_change`` compares them to 1e-3, far above last-bit differences between
    machines or thread counts."""
    summary = {}
    for i, layer in enumerate(model.layers):
        for kind, arrays in (("param", layer.params), ("buffer", layer.buffers)):
            for name, array in arrays.items():
                a = np.asarray(array, dtype=np.float64).ravel()
                numbers = [float(np.linalg.norm(a)), float(np.abs(a).mean()) if a.size else 0.0]
                if kind == "param" and layer.trainable:
                    u = np.random.default_rng(a.size).standard_normal(a.size)
                    numbers.append(float(a @ u) / max(float(np.linalg.norm(u)), 1e-12))
                summary[f"{kind}.{i}.{name}"] = numbers
    return summary


def _start_change(saved, asked):
    """The key of the first array whose ``start_summary`` numbers differ between two
    summaries (by more than 1e-3 of the array's norm), or None when they agree."""
    for key in sorted(set(saved) | set(asked)):
        old, new = np.asarray(saved.get(key, []), float), np.asarray(asked.get(key, []), float)
        if old.shape != new.shape or not np.allclose(old, new, rtol=1e-3, atol=1e-3 * (abs(new[0]) + 1e-12)):
            return key
    return None


def _same_parameters(a, b):
    """Whether two networks of the same parameter shapes hold exactly the same values."""
    return all(np.array_equal(p, q) for (_, p, _), (_, q, _) in zip(a.parameters(), b.parameters()))


def _settings_changes(saved, asked):
    """Human-readable differences between two ``run_settings`` dicts. A function saved
    by its name alone (runs saved before functions carried their settings) matches
    a function of that name."""
    def same(old, new):
        return old == new or (isinstance(old, str) and isinstance(new, dict) and new.get("name") == old)
    return [f"{key}: {saved.get(key)!r} saved, {asked.get(key)!r} asked"
            for key in sorted(set(saved) | set(asked)) if not same(saved.get(key), asked.get(key))]


def _layer_specs(model):
    """Each layer's type and settings (not ``impl``: loop and vectorized do the same maths)."""
    settings = [{k: v for k, v in layer.config().items() if k != "impl"} for layer in model.layers]
    return [f"{type(layer).__name__} {json.dumps(s, sort_keys=True)}" for layer, s in zip(model.layers, settings)]


def train_or_load(runs, name, model, data, optimizer, epochs, progress=False, **fit_kwargs):
    """Train ``model`` on ``data`` unless ``runs/<name>.npz`` already exists.

    model: the untrained network; when the run is already saved, the saved one
    is returned instead, after checking that its parameters have the same names
    and shapes, its layers the same types and settings, that it started from the
    same initial values (``start_summary``: an initialisation-only change such as
    identity_init or the whitening images) and that it was trained with the same
    settings (``run_settings``: epochs, optimiser, ``fit`` keywords); otherwise a
    ValueError names the difference and the files to delete, so a changed recipe
    never silently reuses an old run. (Runs saved before settings were recorded
    are checked for their number of epochs only; before starts were, not for them.)
    An interrupted run resumes from its per-epoch checkpoint (same result as an
    uninterrupted one). ``progress=True`` shows a live progress bar with an ETA
    during each epoch; every epoch prints one line either way. ``fit_kwargs`` go
    to ``cnn_train.fit``. Returns (model, history as a dict); the model's
    ``predictions_file`` is where ``predict_proba`` keeps its predictions.
    """
    runs = Path(runs)
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", name)          # run names may hold spaces and slashes
    model_path, history_path = runs / f"{slug}.npz", runs / f"{slug}.json"
    checkpoint, predictions = runs / f"{slug}.checkpoint.npz", runs / f"{slug}.predictions.npz"
    settings = run_settings(optimizer, epochs, fit_kwargs)
    if model_path.exists() and history_path.exists():
        saved = M.Sequential.load(model_path)
        shapes = [[(key, p.shape) for key, p, _ in m.parameters()] for m in (model, saved)]
        if shapes[0] != shapes[1]:
            raise ValueError(f"{model_path} holds a different network than the one asked for "
                             f"(parameters {shapes[1]} instead of {shapes[0]}); delete it and "
                             f"{history_path.name} to train again")
        layers = [_layer_specs(m) for m in (model, saved)]
        if layers[0] != layers[1]:            # same shapes, other layers (a GELU for a ReLU, another dropout)
            i = next(i for i, (a, b) in enumerate(itertools.zip_longest(*layers)) if a != b)   # or one is longer
            asked, held = (specs[i] if i < len(specs) else "no layer" for specs in layers)
            raise ValueError(f"{model_path} holds a different network than the one asked for (layer {i}: "
                             f"{held} instead of {asked}); delete it and "
                             f"{history_path.name} to train again")
        history = json.loads(history_path.read_text())
        saved_start = history.pop("start", None)         # None: saved before starts were recorded
        moved = saved_start is not None and _start_change(saved_start, start_summary(model))
        # The run's own model, trained in place by an earlier call and passed again, is no other start.
        if moved and not _same_parameters(model, saved):
            raise ValueError(f"{model_path} was trained from another starting point than the network asked for "
                             f"({moved}: other initial values, e.g. another initialisation seed, identity_init "
                             f"or whitening images); pass a freshly built network, or delete it and "
                             f"{history_path.name} to train again")
        saved_settings = history.pop("settings", {"epochs": len(history["val_acc"])})
        changes = _settings_changes(saved_settings, {k: settings.get(k) for k in saved_settings}
                                    if "optimizer" not in saved_settings else settings)
        if changes:
            raise ValueError(f"{model_path} was trained with other settings than the ones asked for "
                             f"({'; '.join(changes)}); delete it and {history_path.name} to train again "
                             "with the new settings")
        saved.predictions_file = predictions
        return saved, history
    predictions.unlink(missing_ok=True)         # another run's, if any: its keys would never match again
    start = start_summary(model)                # before training changes it
    history = T.fit(model, data.x_train, data.y_train, optimizer, epochs,
                    validation=(data.x_val, data.y_val), checkpoint=checkpoint,
                    progress=progress_bar(progress), **fit_kwargs).as_dict()
    model.save(model_path)
    F.save_json(history_path, {**history, "settings": settings, "start": start})
    checkpoint.unlink(missing_ok=True)          # none when fit had no epoch to run
    model.predictions_file = predictions
    return model, history


# ---------------------------------------------------------------------------
# What the report shows of a trained model
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    """The record of one trained model that the report's tables and figures use."""
    name: str
    params: int                  # number of trained parameters
    epochs: int
    seconds: float               # median seconds per training epoch
    curve: list                  # validation accuracy after every epoch
    train_seconds: float = 0.0   # all epochs together
    accuracy: float | None = None     # test accuracy (when evaluated)
    report: dict | None = None        # cnn_metrics.classification_report on the test set
    proba: np.ndarray | None = dataclasses.field(default=None, repr=False)   # (N, K) test probabilities
    tta: str | None = None            # the test-time augmentation it was scored with (cnn_model.TTA_MODES)
    val_acc_tta: float | None = None  # final validation accuracy with that augmentation

    @property
    def val_acc(self):
        """The final validation accuracy."""
        return self.curve[-1]

    @property
    def minutes(self):
        """Training time of all epochs together, in minutes."""
        return self.train_seconds / 60

    def summary(self, *fields):
        """{field: value} of the named fields or properties, e.g. for a JSON file."""
        return {name: getattr(self, name) for name in fields}


def model_result(name, model, history, data=None, tta=None):
    """The ``Result`` of a trained ``model`` and its ``history`` (a dict or a
    ``cnn_train.History``); with ``data`` (a ``cnn_data.Dataset``) also its test
    accuracy, classification report and class probabilities (N, K) on
    ``data.x_test``, ``data.y_test`` (predicted once, with test-time augmentation
    ``tta``, see ``Sequential.predict_proba``); with a ``tta`` also the validation
    accuracy with it, so that what the augmentation adds is measured on the
    validation split (``val_acc`` is the plain one)."""
    h = history.as_dict() if hasattr(history, "as_dict") else history
    result = Result(name=name, params=model.num_params(), epochs=len(h["seconds"]),
                    seconds=float(np.median(h["seconds"])), curve=list(h["val_acc"]),
                    train_seconds=float(np.sum(h["seconds"])))
    if data is not None:
        result.proba = predict_proba(model, data.x_test, tta)
        result.report = E.classification_report(data.y_test, result.proba.argmax(axis=1),
                                                 class_names=data.class_names)
        result.accuracy = result.report["accuracy"]
        if tta is not None:
            result.tta = tta
            result.val_acc_tta = accuracy(model, data.x_val, data.y_val, tta)
    return result


def predict_proba(model, x, tta=None):
    """``model.predict_proba(x, tta=tta)``, (N, K); for a model from ``train_or_load``
    kept beside its run (``<run>.predictions.npz``) under a fingerprint of its weights,
    x and ``tta``: a rebuild reads it back (test-time augmentation is most of a cached
    rebuild's time), while other weights, data or augmentation predict afresh. After a
    change to the prediction code itself, delete the ``*.predictions.npz`` files."""
    path = getattr(model, "predictions_file", None)
    if path is None:
        return model.predict_proba(x, tta=tta)
    key = "p" + F.fingerprint(*model.state_arrays().values(), x, str(tta))
    return F.cached_array(path, key, lambda: model.predict_proba(x, tta=tta))


def accuracy(model, x, y, tta=None):
    """The fraction of (x, y) that ``predict_proba`` classifies right."""
    if np.shape(y) != (len(x),):
        raise ValueError(f"accuracy: need one label per input, got x {np.shape(x)}, y {np.shape(y)}")
    return float(np.mean(predict_proba(model, x, tta).argmax(axis=1) == y))


def read_results(path, notebook):
    """The JSON results file that an earlier notebook writes, or None (after a
    printed note naming the ``notebook`` to run) when it does not exist yet."""
    path = Path(path)
    if path.exists():
        return json.loads(path.read_text())
    print(f"{path.name} not found: run notebook {notebook} first to include its results.")
    return None


# ---------------------------------------------------------------------------
# Result sentences (Markdown, shown under the tables)
# ---------------------------------------------------------------------------

def target_verdict(value, target):
    """Whether a test accuracy ``value`` reaches ``target`` (both fractions), in
    bold: "target 99.55 %: **met**" or "target 90 %: **not met**". An accuracy is a
    count over a test set (or a mean of such), moving in steps of 1 / 30,000 or
    more, so a value within 1e-9 below the target equals it up to floating-point
    rounding: (0.9951 + 0.9962 + 0.9952) / 3 is 0.99549999... as a float, but
    29,865 right of 30,000 is exactly 99.55 %."""
    return f"target {round(target * 100, 4):g} %: **{'met' if value >= target - 1e-9 else 'not met'}**"


def _count(n, word):
    """"1 seed", "3 seeds": ``n`` and ``word``, plural unless n is 1."""
    return f"{n:g} {word}{'' if n == 1 else 's'}"


def budget_verdict(seconds, minutes):
    """Whether a run's training ``seconds`` fit a budget of ``minutes``, in bold:
    "budget 5 minutes: **met**" (compared in seconds: 303 s is over 5 minutes even
    where it prints as 5.1)."""
    return f"budget {_count(minutes, 'minute')}: **{'met' if seconds <= minutes * 60 else 'not met'}**"


def seeds_sentence(results, target, train_images, cores=None, budget=None):
    """The result of one recipe trained once per seed (notebook 1), as Markdown:
    mean +- standard deviation of the test accuracies of ``results`` (a scored
    ``Result`` per seed) against ``target``, epochs of ``train_images`` images,
    the median seconds per epoch on ``cores`` CPU cores (default: this machine's)
    and the longest training in minutes (with its ``budget_verdict`` for a ``budget``
    in minutes per run)."""
    mean, std = seed_statistics([r.accuracy for r in results])
    longest = max(r.train_seconds for r in results)
    cores = os.cpu_count() if cores is None else cores
    return MarkdownText(
        f"**Test accuracy {mean:.2%} ± {std:.2%}** (mean ± standard deviation over {_count(len(results), 'seed')}; "
        f"{target_verdict(mean, target)}), each run {results[0].epochs} epochs of "
        f"{int(train_images):,} images, {np.median([r.seconds for r in results]):.1f} s per epoch (median) on "
        f"{cores} CPU cores, at most {longest / 60:.1f} minutes of training"
        + (f" ({budget_verdict(longest, budget)})." if budget is not None else "."))


def run_sentence(result, name, target=None, how="", budget=None):
    """The test accuracy of one run, a scored ``Result``, as Markdown: "**<name> test
    accuracy: 91.23%** <how> (10 epochs of 150 s)." With a ``target`` (a fraction),
    the ``target_verdict`` for one run, the training minutes and the macro precision
    and recall instead: "... (target 90 %: **met**; one run) after 10 epochs of
    150 s (25.0 minutes of training). Macro precision 0.912, recall 0.912."; a ``budget``
    in minutes adds its ``budget_verdict`` after the minutes. A run
    scored with test-time augmentation (``result.tta``) ends with a sentence naming
    it and the validation accuracy without and with it."""
    head = f"**{name} test accuracy: {result.accuracy:.2%}**" + (f" {how}" if how else "")
    tta = ("" if result.tta is None else f" Scored with test-time augmentation, the mean logits of "
           f"{M.TTA_VIEWS[result.tta]} (validation accuracy {result.val_acc:.2%} without it, "
           f"{result.val_acc_tta:.2%} with it).")
    budget_text = "" if budget is None else f"; {budget_verdict(result.train_seconds, budget)}"
    if target is None:
        minutes = "" if budget is None else f", {result.train_seconds / 60:.1f} minutes of training{budget_text}"
        return MarkdownText(f"{head} ({result.epochs} epochs of {result.seconds:.0f} s{minutes}).{tta}")
    macro = result.report["macro"]
    return MarkdownText(
        f"{head} ({target_verdict(result.accuracy, target)}; one run) after {result.epochs} epochs of "
        f"{result.seconds:.0f} s ({result.train_seconds / 60:.1f} minutes of training{budget_text}). "
        f"Macro precision {macro['precision']:.3f}, recall {macro['recall']:.3f}.{tta}")


# ---------------------------------------------------------------------------
# report.json: one record per task, from the executed runs only
# ---------------------------------------------------------------------------

def seed_statistics(values):
    """(mean, sample standard deviation) of one number per seed; the deviation
    is 0.0 for a single run (and the report then says it is a single run)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("seed_statistics: no values (no finished run)")
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


# Welch's t above this for 3 + 3 runs (4 degrees of freedom) is a two-sided p < 0.05.
NOISE_T = 2.78


def beyond_noise(a, b):
    """Is the difference of the means of two sets of per-seed values larger than
    the seed noise? Welch's t = (mean_a - mean_b) / sqrt(s_a^2/n_a + s_b^2/n_b)
    against ``NOISE_T``. Returns (difference, t, verdict) with verdict "yes", "no",
    or "n/a" when either side has a single run (no spread to compare with)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(a.mean() - b.mean())
    if a.size < 2 or b.size < 2:
        return diff, float("nan"), "n/a"
    scale = float(np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size))
    t = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf") * np.sign(diff))
    return diff, t, "yes" if abs(t) > NOISE_T else "no"


def study_table(study, baseline, metric="val_acc", label="validation accuracy"):
    """A Markdown table of a study, {variant: [Result, one per seed]}: parameters
    (only where the variants differ in them: a column the same in every row says
    nothing and makes a wide table smaller in print), seconds per epoch, the
    metric's mean +- standard deviation over the seeds, its difference to the
    ``baseline`` variant and whether that difference exceeds the seed noise
    (``beyond_noise``). ``metric``: a ``Result`` field or property holding a
    fraction, named ``label`` in the header."""
    if baseline not in study:
        raise ValueError(f"study_table: baseline {baseline!r} is not one of the variants {list(study)}")
    base = [getattr(r, metric) for r in study[baseline]]
    rows = []
    for name, runs in study.items():
        values = [getattr(r, metric) for r in runs]
        mean, std = seed_statistics(values)
        diff, t, verdict = beyond_noise(values, base)
        rows.append([name, f"{runs[0].params:,}", f"{np.median([r.seconds for r in runs]):.1f}",
                     f"{mean:.2%} ± {std:.2%}", "baseline" if name == baseline else f"{diff * 100:+.2f}",
                     "" if name == baseline else (verdict if verdict == "n/a" else f"{verdict} (t = {t:.1f})")])
    header = ["variant", "parameters", "s / epoch", f"{label} ({_count(len(base), 'seed')})", "difference (points)",
              "beyond seed noise?"]
    if len({runs[0].params for runs in study.values()}) == 1:
        header, rows = header[:1] + header[2:], [row[:1] + row[2:] for row in rows]
    return markdown_table(header, rows)


def study_record(study):
    """A study, {variant: [Result, one per seed]}, as notebook 3 saves it in
    experiments.json: {variant: {"val_acc": [one per seed], "params", "seconds"
    (of the first seed's run)}}."""
    return {name: {"val_acc": [r.val_acc for r in runs], "params": runs[0].params, "seconds": runs[0].seconds}
            for name, runs in study.items()}


def study_curves(study):
    """{variant: (seeds, epochs) array of validation curves} for ``cnn_plots.plot_val_curves``."""
    return {name: np.array([r.curve for r in runs]) for name, runs in study.items()}


def study_section(study, names, table_caption, topic, title, path, baseline="baseline"):
    """One section of a seeded study, {variant: [Result, one per seed]}: the
    ``study_table`` of the variants ``names`` (in that order, against ``baseline``)
    captioned ``table_caption``, then their validation curves
    (``cnn_plots.plot_val_curves``, titled ``title``, saved to ``path``) captioned
    "<topic>: validation accuracy per epoch, mean over the seeds, error bars one
    standard deviation."."""
    import cnn_plots as P           # matplotlib only when a figure is drawn
    unknown = [name for name in names if name not in study]
    if unknown:
        raise ValueError(f"study_section: {unknown} are not variants of the study {list(study)}")
    chosen = {name: study[name] for name in names}
    table(study_table(chosen, baseline), table_caption)
    figure(P.plot_val_curves(study_curves(chosen), title=title, path=path),
           f"{topic}: validation accuracy per epoch, mean over the seeds, error bars one standard deviation.")


def recipe_ablation(train_or_load, recipe, data, removed, seeds, tta="flip", **settings):
    """Remove one technique of a recipe at a time, with every seed:
    {variant: [Result per seed]}, each Result's ``accuracy`` the validation
    accuracy with test-time augmentation ``tta``.

    recipe(x_train, seed, **settings) -> (model, optimizer, fit_kwargs), e.g.
    ``cnn_recipes.cifar_recipe``; removed: {variant: the settings that remove a
    technique}, the first variant the full recipe ({}); ``settings`` are shared
    (a short schedule). train_or_load(name, model, data, optimizer, **kwargs)
    -> (model, history) trains or reuses a run. A "no <tta> TTA" variant scores
    the full recipe's own models without test-time augmentation (no training).
    """
    study, plain = {}, []
    for index, (name, change) in enumerate(removed.items()):
        study[name] = []
        for seed in seeds:
            model, optimizer, kwargs = recipe(data.x_train, seed, **settings, **change)
            model, history = train_or_load(f"ablation_{name}_seed{seed}", model, data, optimizer, **kwargs)
            result = model_result(name, model, history)
            result.accuracy = accuracy(model, data.x_val, data.y_val, tta)
            study[name].append(result)
            if index == 0 and tta:
                plain.append(dataclasses.replace(result, name=f"no {tta} TTA", accuracy=result.val_acc))
    if plain:           # the validation after the last epoch is the plain forward pass of the same weights
        study = {**dict(list(study.items())[:1]), plain[0].name: plain, **dict(list(study.items())[1:])}
    return study


def task_record(task_id, dataset, model, parameters, seeds, test_accuracy, epochs, train_seconds, **extra):
    """One task of ``report.json``: accuracies as fractions, one entry per seed,
    with their mean and standard deviation. ``extra`` adds fields (e.g. notes)."""
    seeds, test_accuracy, train_seconds = list(seeds), [float(a) for a in test_accuracy], list(train_seconds)
    if not len(seeds) == len(test_accuracy) == len(train_seconds):
        raise ValueError(f"task_record {task_id}: {len(seeds)} seeds, {len(test_accuracy)} accuracies and "
                         f"{len(train_seconds)} training times; give one of each per seed")
    if not all(0.0 <= a <= 1.0 for a in test_accuracy):
        raise ValueError(f"task_record {task_id}: accuracies are fractions in [0, 1], got {test_accuracy}")
    mean, std = seed_statistics(test_accuracy)
    return {"id": task_id, "dataset": dataset, "model": model, "parameters": int(parameters), "seeds": seeds,
            "test_accuracy": test_accuracy, "test_accuracy_mean": mean, "test_accuracy_std": std,
            "epochs": int(epochs), "train_seconds": [float(t) for t in train_seconds], **extra}


def seeds_record(results, seeds, train_images):
    """The record of one recipe trained once per seed, as notebook 1 saves it in
    mnist_results.json. results: a ``Result`` per seed of ``seeds``, each scored
    on the test set, the first seed's first (the report shows its model).
    Holds the test accuracy's mean and standard deviation over the seeds; the
    first seed's macro and weighted averages, confusion matrix (K, K) as lists,
    class names, epochs, seconds per epoch, training seconds and parameters;
    and ``train_images``, the number of training images."""
    first, report = results[0], results[0].report
    mean, std = seed_statistics([r.accuracy for r in results])
    return {"test_accuracy": mean, "test_accuracy_std": std, "seeds": list(seeds), "macro": report["macro"],
            "weighted": report["weighted"], "epochs": first.epochs, "seconds_per_epoch": first.seconds,
            "train_seconds": first.train_seconds, "train_images": int(train_images), "parameters": first.params,
            "confusion": report["confusion"].tolist(), "class_names": list(report["class_names"])}


def save_task(runs, record):
    """Write one task record to ``runs/tasks/<id>.json`` (atomically)."""
    F.save_json(Path(runs) / "tasks" / f"{record['id']}.json", record)


def save_results_task(runs, task_id, dataset, model, results, seeds):
    """``save_task`` of the test accuracies of ``results`` (one ``Result`` per seed,
    evaluated on the test set) trained with ``seeds``; returns the record."""
    record = task_record(task_id, dataset, model, results[0].params, seeds, [r.accuracy for r in results],
                         results[0].epochs, [r.train_seconds for r in results])
    save_task(runs, record)
    return record


# The report.json task of each bonus model, by its name in notebooks 4 and 7, in the
# order of the summary's CIFAR-10 comparison (the MNIST row GRU is not part of it).
BONUS_TASKS = {"2-D CNN": "cifar10-cnn", "row sequence (Conv1D)": "cifar10-rows",
               "row sequence (GRU)": "cifar10-rows-gru", "MLP on pixels": "cifar10-mlp",
               "MNIST rows (GRU)": "mnist-rows-gru"}
# The summary's CIFAR-10 comparison: the bonus models on CIFAR-10, in that order.
CIFAR_VIEWS = tuple(name for name, task in BONUS_TASKS.items() if task.startswith("cifar10"))
# What a bonus results file keeps of each Result: enough for the summary's table and curves.
BONUS_FIELDS = ("name", "params", "epochs", "seconds", "curve", "train_seconds", "accuracy")


def save_bonus_results(runs, filename, results, source, class_names):
    """Notebook 4's or 7's records, one seed each, in ``runs/<filename>``:
    ``models``, each ``Result`` of ``results`` ({name: Result}, names from
    ``BONUS_TASKS``) as its ``BONUS_FIELDS`` (``bonus_models`` reads them back); the
    CIFAR-10 copy ``source`` (``load_cifar10``), ``class_names``, and the 2-D CNN's
    confusion matrix (K, K) as lists when it is among them. Then a task record
    (``save_results_task``) of each model. Returns the dict written."""
    unknown = set(results) - set(BONUS_TASKS)
    if unknown:
        raise ValueError(f"save_bonus_results: no report.json task for {sorted(unknown)}; "
                         f"the names are {list(BONUS_TASKS)}")
    bonus = dict(models={n: r.summary(*BONUS_FIELDS) for n, r in results.items()}, cifar_source=source,
                 class_names=list(class_names))
    if "2-D CNN" in results:
        bonus["cifar_confusion"] = results["2-D CNN"].report["confusion"].tolist()
    F.save_json(Path(runs) / filename, bonus)
    cifar = "CIFAR-10 (JPEG copy)" if "JPEG" in source else "CIFAR-10"
    for name, r in results.items():
        dataset = cifar if name in CIFAR_VIEWS else "MNIST"
        save_results_task(runs, BONUS_TASKS[name], dataset, r.name, [r], seeds=[0])   # one seed each: the report says so
    return bonus


def bonus_models(*records):
    """The models that ``save_bonus_results`` files hold (``records``: their dicts as
    ``read_results`` returns them, None for a file not written yet) as ``Result``
    records, as far as ``BONUS_FIELDS`` keeps them (no report, probabilities or TTA),
    {name: Result} for the ``CIFAR_VIEWS`` among them, in that order: the summary's
    CIFAR-10 comparison."""
    models = {n: m for record in records if record for n, m in record["models"].items()}
    return {n: Result(**models[n]) for n in CIFAR_VIEWS if n in models}


def write_report_json(runs, path):
    """Collect every ``runs/tasks/*.json`` into ``path`` as ``{"tasks": [...]}``
    (sorted by id) and return that dict; the README and the PDF quote it."""
    files = sorted((Path(runs) / "tasks").glob("*.json"))
    report = {"tasks": [json.loads(f.read_text()) for f in files]}
    F.save_json(path, report)
    return report



def tasks_table(report):
    """A Markdown table of ``report.json``'s tasks: test accuracy as mean +- standard
    deviation over the seeds, or marked as one run; training minutes per run."""
    rows = []
    for t in report["tasks"]:
        runs = len(t["seeds"])
        spread = f" ± {t['test_accuracy_std']:.2%}" if runs > 1 else " (one run)"
        rows.append([t["id"], t["dataset"], t["model"], f"{t['parameters']:,}", runs,
                     f"{t['test_accuracy_mean']:.2%}{spread}", t["epochs"], f"{sum(t['train_seconds']) / runs / 60:.1f} min"])
    return markdown_table(["task", "dataset", "model", "parameters", "seeds", "test accuracy", "epochs",
                           "training per run"], rows)
