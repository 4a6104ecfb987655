"""Classification metrics written by hand: accuracy, confusion matrix,
per-class precision, recall and F1, a text report, and the examples worth
showing (well-classified ones, the most confident mistakes)."""
from __future__ import annotations

import numpy as np

from cnn_core import check_labels

def _check_predictions(y_true, y_pred, num_classes):
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.ndim != 1 or y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred must be 1-D of equal length, got {y_true.shape} and {y_pred.shape}")
    if num_classes is None:
        num_classes = int(max(y_true.max(initial=-1), y_pred.max(initial=-1))) + 1
    check_labels(y_true, len(y_true), num_classes, "y_true")
    check_labels(y_pred, len(y_pred), num_classes, "y_pred")
    return y_true, y_pred, num_classes


def accuracy(y_true, y_pred):
    """Fraction of predictions equal to the labels."""
    y_true, y_pred, _ = _check_predictions(y_true, y_pred, None)
    if len(y_true) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float(np.mean(y_true == y_pred))


def confusion_matrix(y_true, y_pred, num_classes=None):
    """(K, K) counts: row = true class, column = predicted class."""
    y_true, y_pred, k = _check_predictions(y_true, y_pred, num_classes)
    return np.bincount(k * y_true + y_pred, minlength=k * k).reshape(k, k)


def _safe_divide(a, b):
    """a / b with 0 where b == 0 (a class never predicted has precision 0, not NaN)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return np.divide(a, b, out=np.zeros_like(a), where=b != 0)


def classification_report(y_true, y_pred, num_classes=None, class_names=None):
    """Per-class precision, recall, F1 and support, with macro and weighted averages.

    precision_k = TP_k / (TP_k + FP_k) = C[k, k] / column sum k
    recall_k    = TP_k / (TP_k + FN_k) = C[k, k] / row sum k
    F1_k        = 2 P R / (P + R)
    A class with no predictions (or no examples) scores 0 instead of dividing by 0.
    Empty ``y_true`` / ``y_pred`` raise ``ValueError``.
    Returns a dict: ``precision``, ``recall``, ``f1``, ``support`` (arrays of K),
    ``macro`` and ``weighted`` (dicts of P/R/F1), ``accuracy``, ``confusion``
    and ``class_names``.
    """
    if num_classes is None and class_names is not None:
        num_classes = len(class_names)     # a class may be absent from a small sample
    if np.size(y_true) == 0 and np.size(y_pred) == 0:
        raise ValueError("classification_report: y_true and y_pred are empty, and precision, recall and F1 "
                         "of no predictions are undefined; pass at least one label and prediction "
                         "(is the test set empty?)")
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp, predicted, support = np.diag(cm), cm.sum(axis=0), cm.sum(axis=1)
    precision, recall = _safe_divide(tp, predicted), _safe_divide(tp, support)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    weights = _safe_divide(support, support.sum())
    names = list(class_names) if class_names is not None else [str(k) for k in range(len(cm))]
    if len(names) != len(cm):
        raise ValueError(f"class_names has {len(names)} entries for {len(cm)} classes")
    return {
        "precision": precision, "recall": recall, "f1": f1, "support": support,
        "macro": {"precision": precision.mean(), "recall": recall.mean(), "f1": f1.mean()},
        "weighted": {"precision": weights @ precision, "recall": weights @ recall, "f1": weights @ f1},
        "accuracy": float(tp.sum() / max(cm.sum(), 1)), "confusion": cm, "class_names": names,
    }


def format_report(report, digits=4):
    """The classification report as a text table."""
    names = report["class_names"]
    w = max(12, *(len(n) for n in names))
    lines = [f"{'class':<{w}} {'precision':>10} {'recall':>10} {'f1':>10} {'support':>8}"]
    for k, name in enumerate(names):
        lines.append(f"{name:<{w}} {report['precision'][k]:>10.{digits}f} {report['recall'][k]:>10.{digits}f} "
                     f"{report['f1'][k]:>10.{digits}f} {report['support'][k]:>8d}")
    total = int(report["support"].sum())
    for avg in ("macro", "weighted"):
        r = report[avg]
        lines.append(f"{avg + ' avg':<{w}} {r['precision']:>10.{digits}f} {r['recall']:>10.{digits}f} "
                     f"{r['f1']:>10.{digits}f} {total:>8d}")
    lines.append(f"{'accuracy':<{w}} {report['accuracy']:>32.{digits}f} {total:>8d}")
    return "\n".join(lines)


def top_confusions(confusion, class_names, k=5):
    """The k largest off-diagonal counts of a (K, K) confusion matrix (row = true
    class): a list of (true name, predicted name, count, share of the true
    class's examples), largest first; ties in row-major order."""
    cm = np.asarray(confusion)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or len(class_names) != len(cm):
        raise ValueError(f"top_confusions: need a square confusion matrix and one name per class, got "
                         f"shape {cm.shape} and {len(class_names)} names")
    off = cm.astype(float).copy()
    np.fill_diagonal(off, -1)
    order = np.argsort(-off, axis=None, kind="stable")[:k]
    support = cm.sum(axis=1)
    return [(class_names[i], class_names[j], int(cm[i, j]), float(cm[i, j] / max(support[i], 1)))
            for i, j in zip(*np.unravel_index(order, cm.shape)) if i != j and cm[i, j] > 0]


# ---------------------------------------------------------------------------
# Examples worth showing: one correct example per class, confident mistakes
# ---------------------------------------------------------------------------

def _predictions(y_true, proba):
    """(labels (N,), probabilities (N, K), predictions (N,)) after checking shapes."""
    y_true, proba = np.asarray(y_true), np.asarray(proba)
    if proba.ndim != 2 or y_true.shape != (len(proba),):
        raise ValueError(f"need labels (N,) and probabilities (N, K), got {y_true.shape} and {proba.shape}")
    return y_true, proba, proba.argmax(axis=1)


def first_correct(y_true, y_pred, label):
    """Index of the first example of class ``label`` that is also predicted as
    ``label``, or None when there is none. y_true, y_pred: (N,) ints."""
    found = np.flatnonzero((np.asarray(y_true) == label) & (np.asarray(y_pred) == label))
    return int(found[0]) if len(found) else None


def correct_examples(y_true, proba, classes):
    """The first correctly classified example of each class in ``classes`` (a class
    without one is skipped), for a figure: (indices, titles), titles
    "7 (99%)" = the class and its predicted probability.

    y_true: (N,) labels; proba: (N, K) predicted probabilities.
    """
    y_true, proba, pred = _predictions(y_true, proba)
    found = [first_correct(y_true, pred, label) for label in classes]
    indices = [i for i in found if i is not None]
    return indices, [f"{y_true[i]} ({proba[i, pred[i]]:.0%})" for i in indices]


def mistakes_beside_examples(y_true, proba, n=4):
    """The ``n`` most confident mistakes (largest probability of the wrong
    prediction first), each followed by the first correctly classified example
    of the class it was taken for, when there is one: (indices, titles), titles
    "4 read as 9\\n(97%)" for a mistake (true 4, predicted 9 with 97 %) and
    "a real 9\\n" for its example. Empty lists when nothing is misclassified.

    y_true: (N,) labels; proba: (N, K) predicted probabilities.
    """
    y_true, proba, pred = _predictions(y_true, proba)
    wrong = np.flatnonzero(pred != y_true)
    wrong = wrong[np.argsort(-proba[wrong, pred[wrong]], kind="stable")][:n]
    indices, titles = [], []
    for i in wrong:
        indices.append(int(i))
        titles.append(f"{y_true[i]} read as {pred[i]}\n({proba[i, pred[i]]:.0%})")
        example = first_correct(y_true, pred, pred[i])
        if example is not None:
            indices.append(example)
            titles.append(f"a real {pred[i]}\n")        # the newline aligns it with the two-line titles
    return indices, titles
