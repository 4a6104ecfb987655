"""Helpers for the report notebooks: Markdown tables, training that reuses
finished runs, seeded subsets, the record of a trained model, the CIFAR-10
copy in use, and the speed benchmark run by the summary notebook.

The notebooks tell the story and call these functions; training and using a
network needs none of them (see ``cnn_train`` and ``cnn_model``). The report's
settings (quick mode, output folders, the MNIST recipe) live in
``notebooks/common.py``.
"""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

import cnn_data as D
import cnn_files as F
import cnn_images as I
import cnn_metrics as E
import cnn_model as M
import cnn_train as T

ROOT = Path(__file__).resolve().parent
BENCH_SCRIPT = ROOT / "benchmarks" / "bench.py"

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
            "and split as the official set, lossy pixels: about 30 dB PSNR), because the official "
            "archive was not available; accuracies on it are close to, not equal to, official ones")


# ---------------------------------------------------------------------------
# Training that reuses finished runs
# ---------------------------------------------------------------------------

def _live_progress_bar():
    """tqdm's bar with an ETA: a widget in Jupyter, a text line in a terminal."""
    from tqdm.auto import tqdm        # imported only when a bar is wanted
    return tqdm


def train_or_load(runs, name, model, data, optimizer, epochs, progress=False, **fit_kwargs):
    """Train ``model`` on ``data`` unless ``runs/<name>.npz`` already exists.

    model: the untrained network; when the run is already saved, the saved one
    is returned instead, after checking that its parameters have the same names
    and shapes (a ValueError says which run to delete otherwise).
    An interrupted run resumes from its per-epoch checkpoint (same result as an
    uninterrupted one). ``progress=True`` shows a live progress bar with an ETA
    during each epoch; every epoch prints one line either way. ``fit_kwargs`` go
    to ``cnn_train.fit``. Returns (model, history as a dict).
    """
    runs = Path(runs)
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", name)          # run names may hold spaces and slashes
    model_path, history_path = runs / f"{slug}.npz", runs / f"{slug}.json"
    if model_path.exists() and history_path.exists():
        saved = M.Sequential.load(model_path)
        shapes = [[(key, p.shape) for key, p, _ in m.parameters()] for m in (model, saved)]
        if shapes[0] != shapes[1]:
            raise ValueError(f"{model_path} holds a different network than the one asked for "
                             f"(parameters {shapes[1]} instead of {shapes[0]}); delete it and "
                             f"{history_path.name} to train again")
        return saved, json.loads(history_path.read_text())
    checkpoint = runs / f"{slug}.checkpoint.npz"
    history = T.fit(model, data.x_train, data.y_train, optimizer, epochs,
                    validation=(data.x_val, data.y_val), checkpoint=checkpoint,
                    progress=_live_progress_bar() if progress else False, **fit_kwargs).as_dict()
    model.save(model_path)
    F.save_json(history_path, history)
    checkpoint.unlink(missing_ok=True)          # none when fit had no epoch to run
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

    @property
    def val_acc(self):
        """The final validation accuracy."""
        return self.curve[-1]

    def summary(self, *fields):
        """{field: value} of the named fields or properties, e.g. for a JSON file."""
        return {name: getattr(self, name) for name in fields}


def model_result(name, model, history, data=None):
    """The ``Result`` of a trained ``model`` and its ``history`` (a dict or a
    ``cnn_train.History``); with ``data`` (a ``cnn_data.Dataset``) also its test
    accuracy and classification report on ``data.x_test``, ``data.y_test``."""
    h = history.as_dict() if hasattr(history, "as_dict") else history
    result = Result(name=name, params=model.num_params(), epochs=len(h["seconds"]),
                    seconds=float(np.median(h["seconds"])), curve=list(h["val_acc"]),
                    train_seconds=float(np.sum(h["seconds"])))
    if data is not None:
        result.report = E.classification_report(data.y_test, model.predict(data.x_test),
                                                 class_names=data.class_names)
        result.accuracy = result.report["accuracy"]
    return result


def read_results(path, notebook):
    """The JSON results file that an earlier notebook writes, or None (after a
    printed note naming the ``notebook`` to run) when it does not exist yet."""
    path = Path(path)
    if path.exists():
        return json.loads(path.read_text())
    print(f"{path.name} not found: run notebook {notebook} first to include its results.")
    return None


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

# ---------------------------------------------------------------------------
# The speed benchmark (benchmarks/bench.py)
# ---------------------------------------------------------------------------

def run_benchmark(json_path, quick=False, script=BENCH_SCRIPT):
    """Run the benchmark ``script`` in a fresh Python process, as ``make bench``
    does, with its results written to ``json_path``; return them (parsed JSON).
    Raises RuntimeError with the end of the benchmark's error output if it fails."""
    command = [sys.executable, str(script), "--json", str(json_path)] + (["--quick"] if quick else [])
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed (exit status {done.returncode}):\n"
                           + "\n".join((done.stderr or done.stdout).splitlines()[-20:]))
    return json.loads(Path(json_path).read_text())


def _get(record, *keys):
    """record[k1][k2]... or None when a level is missing (the benchmark's JSON may
    gain or lose fields: the report shows what is there)."""
    for key in keys:
        if not isinstance(record, dict) or record.get(key) is None:
            return None
        record = record[key]
    return record


def _percent(fraction):
    return f"{fraction * 100:.0f} %"


def benchmark_text(bench):
    """A paragraph (Markdown) with the GEMM ceiling, training and inference speed
    and the full-epoch time and memory: each part only when the JSON has it."""
    cores, gemm, n = _get(bench, "machine", "cpu_count"), _get(bench, "gemm", "gflops"), _get(bench, "gemm", "n")
    sentences = []
    if gemm is not None:
        sentences.append(f"On this machine{f' ({cores} cores)' if cores else ''} a {n or 2048}³ float32 matrix "
                         f"product runs at **{gemm:.0f} GFLOP/s**.")
    clauses = []
    tr = _get(bench, "training") or {}
    if tr.get("images_per_s") is not None:
        text = f"Training the default network at batch {tr.get('batch', 64)} reaches **{tr['images_per_s']:,.0f} images/s"
        if tr.get("gflops") is not None and tr.get("fraction_of_gemm") is not None:
            text += f" = {tr['gflops']:.0f} GFLOP/s, {tr['fraction_of_gemm']:.0%} of that ceiling"
        text += "**"
        target = _get(bench, "targets", "training_fraction_of_gemm")
        clauses.append(text + (f" (target {_percent(target)})" if target is not None else ""))
    inf = _get(bench, "inference") or {}
    if inf.get("images_per_s") is not None:
        text = f"inference {inf['images_per_s']:,.0f} images/s"
        if inf.get("fraction_of_gemm") is not None:
            text += f" = {inf['fraction_of_gemm']:.0%}"
        target = _get(bench, "targets", "inference_fraction_of_gemm")
        clauses.append(text + (f" (target {_percent(target)})" if target is not None else ""))
    if clauses:
        sentence = "; ".join(clauses) + "."
        sentences.append(sentence[0].upper() + sentence[1:])
    epoch = _get(bench, "epoch") or {}
    if epoch.get("seconds") is not None:
        text = f"A full {epoch.get('images', 60_000):,}-image training epoch takes **{epoch['seconds']:.1f} s**"
        if epoch.get("peak_rss_mb") is not None:
            text += f" with a peak resident memory of {epoch['peak_rss_mb']:.0f} MB"
        sentences.append(text + ".")
    return MarkdownText(" ".join(sentences) or "The benchmark's results hold none of the expected measurements.")


def benchmark_layer_table(bench):
    """A Markdown table of the benchmark's per-layer times: loop and vectorized
    forward + backward milliseconds, the speed-up, and the GFLOP/s of the
    vectorized products; a cell stays empty when the JSON lacks its numbers."""
    def total_ms(r, *keys):
        times = [r.get(k) for k in keys]
        return None if None in times else sum(times) * 1e3

    rows = []
    for r in _get(bench, "layers") or []:
        loop = total_ms(r, "loop_fwd_s", "loop_bwd_s") if r.get("has_loop") else None
        vectorized = total_ms(r, "vec_fwd_s", "vec_bwd_s")
        speedup = r.get("speedup_total") if r.get("has_loop") else None
        gflops = ""
        if r.get("fwd_macs") and r.get("vec_fwd_s") and r.get("bwd_macs") is not None and r.get("vec_bwd_s"):
            gflops = f"{2 * r['fwd_macs'] / r['vec_fwd_s'] / 1e9:.0f} / {2 * r['bwd_macs'] / r['vec_bwd_s'] / 1e9:.0f}"
        rows.append([r.get("name", "?"), "" if loop is None else f"{loop:,.0f}",
                     "" if vectorized is None else f"{vectorized:.2f}",
                     "" if speedup is None else f"{speedup:,.0f}x", gflops])
    return markdown_table(["layer", "loop ms", "vectorized ms", "speed-up", "GFLOP/s (fwd / bwd)"], rows)
