"""Tests of cnn_report, the helpers of the report notebooks: Markdown tables,
subsets, training that reuses saved runs, result records, report.json."""
import copy
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import cnn_data as D
import cnn_images as I
import cnn_layers as L
import cnn_metrics as E
import cnn_model as M
import cnn_report as R
import cnn_train as T

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------
# Markdown tables
# ---------------------------------------------------------------------------

def test_markdown_table_text_and_jupyter_rendering():
    table = R.markdown_table(["layer", "error"], [["Conv2D", f"{1.5e-9:.1e}"], ["ReLU", 0]])
    assert table == "| layer | error |\n|---|---|\n| Conv2D | 1.5e-09 |\n| ReLU | 0 |"
    assert table._repr_markdown_() == table                     # Jupyter shows it as Markdown
    assert R.markdown_table(["a"], []) == "| a |\n|---|"


def test_markdown_table_escapes_pipes_and_rejects_ragged_rows():
    assert R.markdown_table(["x"], [["a|b"]]).splitlines()[-1] == r"| a\|b |"
    with pytest.raises(ValueError, match="row 1 has 1 cells for 2 columns"):
        R.markdown_table(["a", "b"], [[1, 2], [3]])


def test_results_table_formats_each_record():
    records = [R.Result("small", 1234, 2, 1.25, [0.5, 0.75]), R.Result("big", 56789, 3, 10.0, [0.6, 0.7, 0.8])]
    table = R.results_table(records, {"variant": "{r.name}", "parameters": "{r.params:,}",
                                      "s / epoch": "{r.seconds:.1f}", "validation accuracy": "{r.val_acc:.2%}"})
    assert table.splitlines() == ["| variant | parameters | s / epoch | validation accuracy |", "|---|---|---|---|",
                                  "| small | 1,234 | 1.2 | 75.00% |", "| big | 56,789 | 10.0 | 80.00% |"]


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

def toy_data(n_train=40, n_val=12, n_test=10, size=6, seed=0):
    """Random (N, 1, size, size) float32 images whose label is a function of the
    pixels (so that x and y stay paired), three classes."""
    rng = np.random.default_rng(seed)

    def split(n):
        x = rng.uniform(size=(n, 1, size, size)).astype(np.float32)
        return x, (x.sum(axis=(1, 2, 3)) * 1000).astype(np.int64) % 3

    return D.Dataset(*split(n_train), *split(n_val), *split(n_test), ("a", "b", "c"))


def test_subset_is_seeded_random_and_keeps_pairs():
    data = toy_data()
    small = R.subset(data, 10, 5, 4, seed=3)
    assert (len(small.y_train), len(small.y_val), len(small.y_test)) == (10, 5, 4)
    assert small.class_names == data.class_names
    for split in ("train", "val", "test"):
        x, y = getattr(small, f"x_{split}"), getattr(small, f"y_{split}")
        np.testing.assert_array_equal(y, (x.sum(axis=(1, 2, 3)) * 1000).astype(np.int64) % 3)
    assert not np.array_equal(small.x_train, data.x_train[:10])               # not simply the first ones
    np.testing.assert_array_equal(R.subset(data, 10, 5, 4, seed=3).x_train, small.x_train)
    assert not np.array_equal(R.subset(data, 10, 5, 4, seed=4).x_train, small.x_train)


def test_subset_refuses_more_examples_than_there_are():
    with pytest.raises(ValueError, match="asked for 13 val examples, the data set has 12"):
        R.subset(toy_data(), 10, 13, 4)


def test_load_cifar10_says_which_copy_it_returns(monkeypatch):
    official, jpeg = toy_data(seed=1), toy_data(seed=2)
    monkeypatch.setattr(D, "load_cifar10", lambda normalize: official)
    monkeypatch.setattr(I, "load_cifar10_jpeg", lambda normalize: jpeg)
    data, source = R.load_cifar10()
    assert data is official and "official" in source

    def unavailable(normalize):
        raise D.DatasetError("offline")

    monkeypatch.setattr(D, "load_cifar10", unavailable)
    data, source = R.load_cifar10()
    assert data is jpeg and "JPEG re-encoded copy" in source


# ---------------------------------------------------------------------------
# Training that reuses finished runs
# ---------------------------------------------------------------------------

def toy_model(hidden=3):
    return M.Sequential([L.Conv2D(1, hidden, 3, padding=1), L.ReLU(), L.Flatten(), L.Dense(hidden * 36, 3)], seed=0)


def test_train_or_load_trains_once_then_reloads_the_same_model(tmp_path, monkeypatch, capsys):
    data = toy_data()
    model, history = R.train_or_load(tmp_path, "toy run/1", toy_model(), data, T.Adam(1e-2), 2, batch_size=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy_run_1.json", "toy_run_1.npz"]   # no checkpoint left
    assert len(history["val_acc"]) == 2 and len(history["seconds"]) == 2
    assert capsys.readouterr().out.count("epoch ") == 2                     # one line per epoch
    monkeypatch.setattr(T, "fit", lambda *a, **k: pytest.fail("a saved run must not be trained again"))
    again, again_history = R.train_or_load(tmp_path, "toy run/1", toy_model(), data, T.Adam(1e-2), 2, batch_size=8)
    assert again_history == history
    np.testing.assert_array_equal(again.predict_proba(data.x_test), model.predict_proba(data.x_test))


def test_predictions_of_a_run_are_kept_and_predicted_again_only_when_weights_data_or_tta_change(
        tmp_path, monkeypatch):
    data = toy_data()
    model, history = R.train_or_load(tmp_path, "toy", toy_model(), data, T.Adam(1e-2), 1, batch_size=8)
    first = R.predict_proba(model, data.x_test, "flip")
    np.testing.assert_array_equal(first, model.predict_proba(data.x_test, tta="flip"))
    assert (tmp_path / "toy.predictions.npz").exists()
    calls = []
    predict = M.Sequential.predict_proba

    def counted(self, x, *args, **kwargs):
        calls.append(len(x))
        return predict(self, x, *args, **kwargs)

    monkeypatch.setattr(M.Sequential, "predict_proba", counted)
    reloaded, _ = R.train_or_load(tmp_path, "toy", toy_model(), data, T.Adam(1e-2), 1, batch_size=8)
    np.testing.assert_array_equal(R.predict_proba(reloaded, data.x_test, "flip"), first)
    assert calls == []                                                  # read back, not predicted
    R.predict_proba(reloaded, data.x_test)                               # no TTA: another prediction
    R.predict_proba(reloaded, data.x_val, "flip")                        # other data
    assert calls == [len(data.x_test), len(data.x_val)]
    reloaded.layers[-1].params["b"][0] += 1.0                            # other weights
    changed = R.predict_proba(reloaded, data.x_test, "flip")
    assert calls[-1] == len(data.x_test) and not np.array_equal(changed, first)
    assert R.accuracy(reloaded, data.x_test, data.y_test, "flip") == np.mean(changed.argmax(1) == data.y_test)
    with pytest.raises(ValueError, match="one label per input"):
        R.accuracy(reloaded, data.x_test, data.y_test[:1])
    R.predict_proba(toy_model(), data.x_test)                            # a model of no run: nothing kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.json", "toy.npz", "toy.predictions.npz"]
    for name in ("toy.json", "toy.npz"):                                 # trained anew: a fresh predictions file
        (tmp_path / name).unlink()
    R.train_or_load(tmp_path, "toy", toy_model(), data, T.Adam(1e-2), 1, batch_size=8)
    assert not (tmp_path / "toy.predictions.npz").exists()


def test_train_or_load_refuses_a_saved_run_of_another_network(tmp_path):
    data = toy_data()
    R.train_or_load(tmp_path, "toy", toy_model(hidden=3), data, T.Adam(1e-2), 1, batch_size=8)
    with pytest.raises(ValueError, match="toy.npz holds a different network.*delete it and toy.json"):
        R.train_or_load(tmp_path, "toy", toy_model(hidden=4), data, T.Adam(1e-2), 1, batch_size=8)
    gelu = toy_model(hidden=3)                                           # same parameters, another activation
    gelu.layers[1] = L.GELU()
    with pytest.raises(ValueError, match=r"toy.npz holds a different network .*\(layer 1: ReLU .* instead of GELU"):
        R.train_or_load(tmp_path, "toy", gelu, data, T.Adam(1e-2), 1, batch_size=8)
    longer = toy_model(hidden=3)                                         # one more layer, no more parameters
    longer.layers.append(L.ReLU())
    with pytest.raises(ValueError, match=r"holds a different network .*\(layer 4: no layer instead of ReLU"):
        R.train_or_load(tmp_path, "toy", longer, data, T.Adam(1e-2), 1, batch_size=8)
    loop = M.Sequential([L.Conv2D(1, 3, 3, padding=1, impl="loop"), L.ReLU(impl="loop"), L.Flatten(),
                         L.Dense(3 * 36, 3, impl="loop")], seed=0)         # the loop versions: the same network
    R.train_or_load(tmp_path, "toy", loop, data, T.Adam(1e-2), 1, batch_size=8)


@pytest.mark.parametrize("changed", [
    dict(epochs=2), dict(optimizer=T.Adam(1e-3)), dict(optimizer=T.SGD(1e-2)), dict(batch_size=4),
    dict(label_smoothing=0.1), dict(seed=1), dict(augment=T.augmentation(crop=1)),
    dict(schedule=T.cosine_schedule(1e-2, 1, lr_min=1e-3))])
def test_train_or_load_refuses_a_saved_run_trained_with_other_settings(tmp_path, changed):
    data = toy_data()
    def asked():
        return dict(epochs=1, optimizer=T.Adam(1e-2), batch_size=8)      # a fresh optimiser every time
    R.train_or_load(tmp_path, "toy", toy_model(), data, **asked())
    with pytest.raises(ValueError, match=r"toy.npz was trained with other settings.*delete it and toy.json"):
        R.train_or_load(tmp_path, "toy", toy_model(), data, **{**asked(), **changed})
    again, _ = R.train_or_load(tmp_path, "toy", toy_model(), data, **asked())    # the same settings still load
    assert again.num_params() == toy_model().num_params()


def test_train_or_load_refuses_a_saved_run_that_started_from_other_initial_values(tmp_path):
    data = toy_data()
    def asked(model):
        return dict(model=model, data=data, optimizer=T.Adam(1e-2), epochs=1, batch_size=8)
    trained, _ = R.train_or_load(tmp_path, "toy", **asked(toy_model()))
    R.train_or_load(tmp_path, "toy", **asked(trained))  # the run's own model, passed again (a cell run twice)
    other_seed = toy_model()
    other_seed.initialize(1)                          # same layers, shapes and settings; other weights
    identity = toy_model()
    M.identity_filters(identity.layers[0])            # an initialisation-only recipe setting (identity_init)
    flipped = toy_model()
    flipped.layers[0].params["W"] *= -1               # same norms: only the random projection tells
    for model, key in [(other_seed, "param.0.W"), (identity, "param.0.W"), (flipped, "param.0.W")]:
        with pytest.raises(ValueError, match=rf"toy.npz was trained from another starting point .*\({key}: "
                                             r".*pass a freshly built network, or delete it and toy.json"):
            R.train_or_load(tmp_path, "toy", **asked(model))
    nudged = toy_model()                              # last-bit differences (another machine, thread count)
    nudged.layers[0].params["W"] *= np.float32(1 + 1e-6)
    R.train_or_load(tmp_path, "toy", **asked(nudged))
    # A frozen layer computed from data (a whitening stem) may flip its filters' signs on
    # another machine: only its norms count; a trained layer's sign flip does not pass.
    frozen = toy_model()
    frozen.layers[0].trainable = False
    R.train_or_load(tmp_path, "frozen", **asked(frozen))
    frozen_flipped = toy_model()
    frozen_flipped.layers[0].trainable = False
    frozen_flipped.layers[0].params["W"] *= -1
    R.train_or_load(tmp_path, "frozen", **asked(frozen_flipped))
    frozen_flipped.layers[0].params["W"] *= 2
    with pytest.raises(ValueError, match=r"another starting point .*\(param.0.W: "):
        R.train_or_load(tmp_path, "frozen", **asked(frozen_flipped))
    # Runs saved before starts were recorded load as before.
    history = json.loads((tmp_path / "toy.json").read_text())
    del history["start"]
    (tmp_path / "toy.json").write_text(json.dumps(history))
    R.train_or_load(tmp_path, "toy", **asked(other_seed))


def test_train_or_load_checks_the_epochs_of_a_run_saved_without_settings(tmp_path):
    data = toy_data()
    R.train_or_load(tmp_path, "old", toy_model(), data, T.Adam(1e-2), 1, batch_size=8)
    history = json.loads((tmp_path / "old.json").read_text())
    del history["settings"]                            # the format of runs saved before settings were kept
    (tmp_path / "old.json").write_text(json.dumps(history))
    R.train_or_load(tmp_path, "old", toy_model(), data, T.Adam(1e-3), 1)      # only the epochs are known
    with pytest.raises(ValueError, match=r"epochs: 1 saved, 2 asked"):
        R.train_or_load(tmp_path, "old", toy_model(), data, T.Adam(1e-2), 2, batch_size=8)


def test_train_or_load_passes_a_live_progress_bar_only_when_asked(tmp_path, monkeypatch):
    from tqdm.auto import tqdm
    seen = []

    def fake_fit(model, x, y, optimizer, epochs, progress, **kwargs):
        seen.append(progress)
        return T.History(seconds=[0.1], train_loss=[1.0], train_acc=[0.5], val_loss=[1.0], val_acc=[0.5])

    monkeypatch.setattr(T, "fit", fake_fit)
    R.train_or_load(tmp_path, "with_bar", toy_model(), toy_data(), T.Adam(1e-2), 1, progress=True)
    R.train_or_load(tmp_path, "without", toy_model(), toy_data(), T.Adam(1e-2), 1)
    assert seen == [tqdm, False]


# ---------------------------------------------------------------------------
# Result records
# ---------------------------------------------------------------------------

def test_model_result_counts_times_and_scores_the_test_set():
    data, model = toy_data(), toy_model()
    history = {"seconds": [3.0, 1.0, 2.0, 10.0], "val_acc": [0.2, 0.4, 0.5, 0.6]}
    plain = R.model_result("toy", model, history)
    assert (plain.name, plain.epochs, plain.seconds, plain.curve, plain.val_acc) == ("toy", 4, 2.5, history["val_acc"], 0.6)
    assert plain.params == 3 * 9 + 3 + 3 * 36 * 3 + 3 and plain.accuracy is None and plain.report is None
    tested = R.model_result("toy", model, T.History(seconds=[1.0], val_acc=[0.3]), data)
    assert tested.accuracy == E.accuracy(data.y_test, model.predict(data.x_test)) == tested.report["accuracy"]
    assert list(tested.report["class_names"]) == list(data.class_names)
    assert tested.summary("accuracy", "params", "val_acc") == {"accuracy": tested.accuracy, "params": plain.params,
                                                              "val_acc": 0.3}


def test_read_results_returns_the_json_or_none_with_a_note(tmp_path, capsys):
    (tmp_path / "done.json").write_text(json.dumps({"test_accuracy": 0.99}))
    assert R.read_results(tmp_path / "done.json", "01_x") == {"test_accuracy": 0.99}
    assert R.read_results(tmp_path / "missing.json", "03_y") is None
    assert capsys.readouterr().out == "missing.json not found: run notebook 03_y first to include its results.\n"


# ---------------------------------------------------------------------------
# report.json
# ---------------------------------------------------------------------------

def test_task_records_give_seed_statistics_and_collect_into_report_json(tmp_path):
    record = R.task_record("mnist", "MNIST", "mnist_cnn", 421642, [0, 1, 2], [0.99, 0.995, 1.0], 12, [60, 61, 62])
    assert record["test_accuracy_mean"] == pytest.approx(0.995)
    assert record["test_accuracy_std"] == pytest.approx(0.005)          # sample deviation (ddof=1)
    assert R.task_record("one", "d", "m", 1, [0], [0.5], 1, [1.0])["test_accuracy_std"] == 0.0
    R.save_task(tmp_path, record)
    R.save_task(tmp_path, R.task_record("cifar10-cnn", "CIFAR-10", "net", 5, [0], [0.9], 3, [10]))
    report = R.write_report_json(tmp_path, tmp_path / "report.json")
    assert [t["id"] for t in report["tasks"]] == ["cifar10-cnn", "mnist"]
    assert json.loads((tmp_path / "report.json").read_text()) == report


def test_task_record_refuses_mismatched_lists_and_percentages():
    with pytest.raises(ValueError, match="one of each per seed"):
        R.task_record("x", "d", "m", 1, [0, 1], [0.5], 1, [1.0])
    with pytest.raises(ValueError, match="fractions"):
        R.task_record("x", "d", "m", 1, [0], [99.3], 1, [1.0])


def test_results_of_several_seeds_become_one_task(tmp_path):
    results = [R.Result("net", 10, 2, 1.5, [0.5, 0.6], train_seconds=3.0 + k, accuracy=0.7 + k / 10) for k in range(2)]
    record = R.save_results_task(tmp_path, "toy", "toy data", "net", results, seeds=[0, 1])
    assert record["test_accuracy"] == pytest.approx([0.7, 0.8]) and record["train_seconds"] == [3.0, 4.0]
    assert json.loads((tmp_path / "tasks" / "toy.json").read_text()) == record


def test_tasks_table_shows_seed_spread_or_says_one_run():
    report = {"tasks": [R.task_record("mnist", "MNIST", "net", 1000, [0, 1], [0.99, 0.995], 3, [60, 120]),
                        R.task_record("gru", "MNIST", "GRU", 10, [0], [0.98], 3, [30])]}
    lines = R.tasks_table(report).splitlines()
    assert lines[2] == "| mnist | MNIST | net | 1,000 | 2 | 99.25% ± 0.35% | 3 | 1.5 min |"
    assert lines[3] == "| gru | MNIST | GRU | 10 | 1 | 98.00% (one run) | 3 | 0.5 min |"


# ---------------------------------------------------------------- seed studies

def _runs(values, params=10, seconds=2.0):
    return [R.Result(name="v", params=params, epochs=2, seconds=seconds, curve=[v - 0.01, v]) for v in values]


def test_beyond_noise_is_welch_t_against_the_threshold():
    diff, t, verdict = R.beyond_noise([0.90, 0.91, 0.92], [0.80, 0.81, 0.82])
    assert diff == pytest.approx(0.10) and t == pytest.approx(0.10 / np.sqrt(2 * 1e-4 / 3)) and verdict == "yes"
    assert R.beyond_noise([0.90, 0.95, 0.85], [0.89, 0.94, 0.86])[2] == "no"      # 1 point inside a 5-point spread
    assert R.beyond_noise([0.9], [0.8, 0.85])[2] == "n/a"                          # one run: no spread
    assert R.beyond_noise([0.9, 0.9], [0.8, 0.8])[2] == "yes"                      # no spread at all, a difference


def test_study_table_gives_mean_std_difference_and_verdict():
    study = {"base": _runs([0.90, 0.91, 0.92]), "better": _runs([0.95, 0.96, 0.97]),
             "same": _runs([0.905, 0.915, 0.92])}
    text = str(R.study_table(study, "base"))
    lines = text.splitlines()
    assert "validation accuracy (3 seeds)" in lines[0] and "beyond seed noise?" in lines[0]
    assert "91.00% ± 1.00%" in lines[2] and "| baseline |" in lines[2]
    assert "+5.00" in lines[3] and "yes (t = 6.1)" in lines[3]
    assert "no (t = " in lines[4]
    assert "parameters" not in lines[0]                        # the same for every variant: no column
    wider = {**study, "wide": [dataclasses.replace(r, params=r.params * 2) for r in study["better"]]}
    wide_lines = str(R.study_table(wider, "base")).splitlines()
    assert wide_lines[0].startswith("| variant | parameters |") and f"| {2 * study['base'][0].params:,} |" in wide_lines[5]
    with pytest.raises(ValueError, match="baseline 'nope' is not one of the variants"):
        R.study_table(study, "nope")
    curves = R.study_curves(study)
    assert curves["better"].shape == (3, 2)


# ---------------------------------------------------------------- report presentation (issue 10)

def test_summary_table_counts_parameters_and_multiply_adds_per_layer():
    model = M.Sequential([L.Conv2D(1, 4, 3, padding=1), L.ReLU(), L.MaxPool2D(2), L.Flatten(),
                          L.Dense(4 * 3 * 3, 5)], seed=0)
    lines = str(R.summary_table(model, (1, 6, 6))).splitlines()
    assert lines[0] == "| layer | output shape | parameters | multiply-adds |"
    assert lines[2] == "| input | (1, 6, 6) |  |  |"
    assert lines[3] == "| Conv2D 1->4 3x3 pad 1 | (4, 6, 6) | 40 | 1,296 |"      # 6*6 * 4*1*3*3
    assert lines[4] == "| ReLU | (4, 6, 6) |  |  |"                               # elementwise: 0
    assert lines[7] == "| Dense 36->5 | (5,) | 185 | 180 |"                         # 36*5
    assert lines[-1] == "| **total** |  | **225** | **1,476** |"


def test_summary_table_counts_conv1d_and_recurrent_layers_per_step():
    conv1d = M.Sequential([L.Conv1D(3, 2, 3, padding=1)], seed=0)
    assert str(R.summary_table(conv1d, (3, 5))).splitlines()[3].endswith("| 20 | 90 |")   # 5 * 2*3*3
    import cnn_rnn as S
    gru = M.Sequential([S.GRU(4, 2)], seed=0)
    row = str(R.summary_table(gru, (7, 4))).splitlines()[3]
    assert row.endswith(f"| {7 * (4 * 6 + 2 * 6)} |")                                 # T * (D*3H + H*3H)


def _shown(monkeypatch):
    shown = []
    monkeypatch.setattr(R, "_display", lambda obj, metadata=None: shown.append((obj, metadata)))
    return shown


def test_figure_shows_the_figure_with_caption_metadata_then_closes_it(monkeypatch):
    import matplotlib.pyplot as plt
    shown = _shown(monkeypatch)
    fig = plt.figure()
    R.figure(fig, "What to look at.", label="fig-a")
    (obj, meta), (line, line_meta) = shown
    assert obj is fig and meta == {R.FLOAT_KEY: {"float": "figure", "caption": "What to look at.", "label": "fig-a"}}
    assert line == "*Figure: What to look at.*" and line_meta == {R.FLOAT_KEY: {"caption_text": True}}
    assert not plt.fignum_exists(fig.number)                  # Jupyter will not show it a second time
    with pytest.raises(ValueError, match="non-empty string"):
        R.figure(fig, "  ")
    with pytest.raises(ValueError, match="label must be"):
        R.figure(fig, "x", label="a b")


def test_table_shows_markdown_with_caption_and_refuses_other_text(monkeypatch):
    shown = _shown(monkeypatch)
    R.table(R.markdown_table(["a"], [[1]]), "Caption.")
    (obj, meta), (line, _) = shown
    assert obj == "| a |\n|---|\n| 1 |" and obj._repr_markdown_() == obj
    assert meta[R.FLOAT_KEY]["float"] == "table" and line == "*Table: Caption.*"
    with pytest.raises(ValueError, match="Markdown table"):
        R.table("just words", "Caption.")


def test_classification_table_rows_per_class_and_averages():
    report = E.classification_report(np.array([0, 1, 1]), np.array([0, 1, 0]), class_names=["a", "b"])
    lines = str(R.classification_table(report, digits=2)).splitlines()
    assert lines[0] == "| class | precision | recall | F1 | support |"
    assert lines[2] == "| a | 0.50 | 1.00 | 0.67 | 1 |"
    assert lines[-1].startswith("| *weighted average* |")


def test_progress_bar_is_tqdm_with_eta_only_when_enabled():
    from tqdm.auto import tqdm
    assert R.progress_bar(False) is False
    assert R.progress_bar(True) is tqdm


# ---------------------------------------------------------------- tools/build_report.py: one numbering

def _build_report():
    import importlib.util
    spec = importlib.util.spec_from_file_location("build_report", ROOT / "tools" / "build_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_stages_run_cifar_beside_the_rest_and_the_summary_last():
    B = _build_report()
    names = ["00_introduction", "01_mnist_training", "02_looking_inside", "03_experiments", "04_cifar10",
             "05_image_folders", "06_fashion_mnist", "07_cifar10_rows", "09_summary"]
    sources = [ROOT / "notebooks" / f"{name}.ipynb" for name in names]
    stem = lambda stages: [[[s.stem for s in lane] for lane in stage] for stage in stages]   # noqa: E731
    rest = ["00_introduction", "01_mnist_training", "02_looking_inside", "03_experiments", "05_image_folders",
            "06_fashion_mnist"]
    assert stem(B.stages(sources, 2)) == [[rest, ["04_cifar10", "07_cifar10_rows"]], [["09_summary"]]]
    assert stem(B.stages(sources, 1)) == [[names[:-1]], [["09_summary"]]]
    assert stem(B.stages(sources[-1:], 2)) == [[["09_summary"]]]
    # Every notebook the build runs exists, and the lane of its own holds real notebooks.
    found = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert found == names and set(B.OWN_LANE) <= set(found)


def _notebook_characters():
    """{non-ASCII character: the notebooks whose sources or text outputs hold it}."""
    found = {}
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            texts = [cell["source"]] + [o.get("text", "") for o in cell.get("outputs", [])] + [
                v for o in cell.get("outputs", []) for k, v in o.get("data", {}).items() if k.startswith("text/")]
            for text in texts:
                for ch in "".join(text) if isinstance(text, list) else text:
                    if ord(ch) > 127:
                        found.setdefault(ch, set()).add(path.stem)
    return found


def test_report_text_uses_only_characters_the_pdf_fonts_have_or_that_are_mapped():
    """xelatex drops a character its font lacks without an error (the PDF once read "costs 25/9
    2.8 times" for "25/9 ≈ 2.8"): every non-ASCII character of the notebooks must be one
    Latin Modern has or one the build maps to LaTeX."""
    B = _build_report()
    unknown = {ch: sorted(where) for ch, where in _notebook_characters().items()
               if ch not in B.FONT_HAS and ch not in B.MISSING_GLYPHS}
    assert not unknown, (f"characters {unknown} are not known to be in the PDF's fonts: check with fc-query and "
                         "add them to tools/build_report.py's FONT_HAS, or map them in MISSING_GLYPHS")
    for ch in B.MISSING_GLYPHS:             # defined before the lists of figures and tables read their captions
        assert -1 < B.CONTENTS.index(f"\\catcode`{ch}=\\active") < B.CONTENTS.index("\\listoffigures")
    assert not B.FONT_HAS & set(B.MISSING_GLYPHS)


def test_font_has_and_missing_glyphs_match_the_installed_latin_modern_fonts():
    """Where the report's fonts are installed: FONT_HAS are in both, MISSING_GLYPHS in neither."""
    import shutil
    B = _build_report()
    if not shutil.which("fc-query") or not shutil.which("kpsewhich"):
        pytest.skip("fc-query or TeX's kpsewhich is not installed")
    fonts = [subprocess.run(["kpsewhich", name], capture_output=True, text=True).stdout.strip()
             for name in ("lmroman10-regular.otf", "lmmono10-regular.otf")]
    if not all(fonts):
        pytest.skip("the Latin Modern fonts are not installed")
    for font in fonts:
        ranges = subprocess.run(["fc-query", "--format=%{charset}", str(font)], capture_output=True, text=True,
                                check=True).stdout.split()
        covered = set()
        for r in ranges:
            first, _, last = r.partition("-")
            covered |= set(range(int(first, 16), int(last or first, 16) + 1))
        assert {ord(ch) for ch in B.FONT_HAS} <= covered, font
        assert not {ord(ch) for ch in B.MISSING_GLYPHS} & covered, font


def _notebook(path, *sources):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook
    path.write_text(nbformat.writes(new_notebook(cells=[new_code_cell(s) for s in sources])))
    return path


def test_build_lanes_give_each_kernel_one_blas_thread_on_two_cores_and_the_summary_all(tmp_path, monkeypatch):
    B = _build_report()
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.setattr(B, "cores", lambda: 2)
    show = "import os; print(os.environ.get('OPENBLAS_NUM_THREADS'))"
    sources = [_notebook(tmp_path / f"{name}.ipynb", show) for name in ("01_a", "04_cifar10", "09_summary")]
    done = B.execute_all(sources, lambda s: tmp_path / f"out_{s.name}", lanes=2)
    assert [nb.cells[0].outputs[0]["text"].strip() for nb in done] == ["1", "1", "None"]
    assert (tmp_path / "out_09_summary.ipynb").exists()


def test_build_stops_the_other_lane_as_soon_as_a_notebook_fails(tmp_path):
    from nbclient.exceptions import CellExecutionError
    B = _build_report()
    sources = [_notebook(tmp_path / "01_slow.ipynb", "import time; time.sleep(300)"),
               _notebook(tmp_path / "04_cifar10.ipynb", "import time; time.sleep(2)", "raise ValueError('bad input')"),
               _notebook(tmp_path / "09_summary.ipynb", "print('never')")]
    began = time.time()
    with pytest.raises(CellExecutionError, match="bad input"):
        B.execute_all(sources, lambda s: tmp_path / f"out_{s.name}", lanes=2)
    assert time.time() - began < 60                       # not the 300 s of the other lane
    assert not list(tmp_path.glob("out_*"))


def test_build_notebook_stops_before_its_first_cell_once_the_other_lane_failed(tmp_path):
    import threading
    B = _build_report()
    failed = threading.Event()
    failed.set()
    source = _notebook(tmp_path / "01_a.ipynb", "print('ran')")
    with pytest.raises(RuntimeError, match="other lane failed"):
        B.execute(source, tmp_path / "out.ipynb", failed=failed)
    assert not (tmp_path / "out.ipynb").exists()


def test_number_floats_steps_the_table_counter_back_after_a_table_in_the_text():
    from nbformat.v4 import new_markdown_cell, new_notebook
    B = _build_report()
    text = new_markdown_cell("Layouts:\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\nNo table here: a | b.")
    not_tables = new_markdown_cell("plain | text, |x| and |y|\n\n---\n\n```\n| a | b |\n|---|---|\n```")
    nb, _, _ = B.number_floats(new_notebook(cells=[text, not_tables]))
    assert [c.cell_type for c in nb.cells] == ["markdown", "raw", "markdown"]
    assert nb.cells[1].source == "\\addtocounter{table}{-1}" and nb.cells[1].metadata["format"] == "text/latex"


def test_number_floats_captions_every_figure_and_table_in_order_across_notebooks():
    import base64
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output
    B = _build_report()
    png = base64.b64encode(b"\x89PNG fake").decode()
    table = "| a | b |\n|---|---|\n| 1 | 2 % |"
    first = new_notebook(cells=[
        new_markdown_cell("# Chapter\n\n## Kernel size"),
        new_code_cell("x", outputs=[
            new_output("display_data", data={"image/png": png, "text/plain": ""}),
            new_output("stream", name="stderr", text="UserWarning: noisy\n"),
            new_output("display_data", data={"text/markdown": table, "text/plain": ""})]),
        new_markdown_cell("*Figure 1: the old\ncaption.*\n\nDiscussion stays."),
    ])
    second = new_notebook(cells=[
        new_code_cell("y", outputs=[
            new_output("display_data", data={"image/png": png, "text/plain": ""},
                       metadata={R.FLOAT_KEY: {"float": "figure", "caption": "Explicit $x$.", "label": "ex"}}),
            new_output("display_data", data={"text/markdown": "*Figure: Explicit*"},
                       metadata={R.FLOAT_KEY: {"caption_text": True}})]),
        new_markdown_cell("See [figure](#ex); *Table 4: nothing to attach to.*"),
        new_markdown_cell("*Table 4: nothing above.*"),
    ])
    nb, resources, log = B.number_floats(B.merge([first, second], ["00_a", "01_b"]))
    assert nb.cells[0].cell_type == "raw" and "\\tableofcontents" in nb.cells[0].source
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert len(outputs) == 3                        # stderr and the Jupyter caption line are gone
    figure1, table1, figure2 = (o.data["text/latex"] for o in outputs)
    assert "\\begin{figure}[H]" in figure1 and "figure-1-0.png" in figure1
    assert "\\caption[{The old caption}]{The old caption.}" in figure1          # legacy caption, number dropped
    assert "\\begin{table}[H]" in table1 and "\\begin{tabular}{@{}ll@{}}" in table1 and "longtable" not in table1
    assert "\\caption[{Kernel size}]{Kernel size.}" in table1                  # no caption: the heading
    assert "\\caption[{Explicit \\(x\\)}]{Explicit \\(x\\).}\\label{fig:ex}" in figure2
    assert set(resources["outputs"]) == {"figure-1-0.png", "figure-2-0.png"}
    markdown = [c.source for c in nb.cells if c.cell_type == "markdown"]
    assert markdown[1] == "Discussion stays."
    assert markdown[2].startswith("See figure 2;")
    assert markdown[3].startswith("*Nothing above.*")                          # no float to attach: number dropped
    assert any("stderr of 00_a" in line and "UserWarning" in line for line in log)
    assert any(line.startswith("table 1 (00_a") and "no caption" in line for line in log)


def test_number_floats_folds_the_epoch_lines_of_several_runs_into_one_line():
    from nbformat.v4 import new_code_cell, new_notebook, new_output
    B = _build_report()
    lines = ["Data: MNIST\n"] + [f"epoch {e}/2: loss 0.{run}, acc 0.9 (7.{e} s)\n" for run in (1, 2, 3)
                                 for e in (1, 2)] + ["resumed from x after epoch 1\n"]
    study = [new_output("stream", name="stdout", text=line) for line in lines]   # one output a line, as executed
    study.insert(3, new_output("stream", name="stderr", text="UserWarning: between two runs\n"))
    one_run = new_output("stream", name="stdout", text="epoch 1/2: loss 0.5 (3 s)\nepoch 2/2: loss 0.4 (3 s)\n")
    # a run resumed from its checkpoint (epochs 2-3 of 3) after a whole one: two runs
    resumed = new_output("stream", name="stdout", text="".join(f"epoch {e}/{n}: loss 1 (1 s)\n"
                                                               for e, n in [(1, 3), (2, 3), (3, 3), (2, 3), (3, 3)]))
    cells = [new_code_cell("study", outputs=study), new_code_cell("one", outputs=[one_run]),
             new_code_cell("resumed", outputs=[resumed])]
    original = copy.deepcopy(cells)
    nb, _, log = B.number_floats(B.merge([new_notebook(cells=cells)], ["03_x"]))
    assert len(nb.cells[1].outputs) == 1 and nb.cells[1].outputs[0].text == (        # a NotebookNode still
        "Data: MNIST\n[the training log of 3 runs, 6 epoch lines: in notebooks/03_x.ipynb]\n"
        "resumed from x after epoch 1\n")
    assert any("UserWarning: between two runs" in line for line in log)
    assert nb.cells[3].outputs[0]["text"] == "[the training log of 2 runs, 5 epoch lines: in notebooks/03_x.ipynb]\n"
    assert cells == original                                    # the caller's notebook is left as it was
    assert nb.cells[2].outputs[0]["text"] == one_run["text"]          # one run's epochs stay, with their times


def test_number_floats_groups_consecutive_plain_images_of_one_cell_into_one_figure():
    import base64
    from nbformat.v4 import new_code_cell, new_notebook, new_output
    B = _build_report()
    png = {"image/png": base64.b64encode(b"png").decode(), "text/plain": ""}
    nb = new_notebook(cells=[new_code_cell("x", outputs=[new_output("display_data", data=dict(png))
                                                         for _ in range(3)])])
    nb, resources, _ = B.number_floats(B.merge([nb]))
    latex = "".join(o.data["text/latex"] for o in nb.cells[1].outputs)
    assert latex.count("\\begin{figure}") == 1 and latex.count("\\adjustimage") == 3
    assert len(resources["outputs"]) == 3


def test_recipe_ablation_trains_each_variant_per_seed_and_rescored_without_tta(tmp_path):
    import cnn_recipes as Q
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 3, 8, 8), dtype=np.uint8)
    y = rng.integers(0, 3, 20)
    data = D.Dataset(x[:12], y[:12], x[12:], y[12:], x[12:], y[12:], ["a", "b", "c"])
    trained = []

    def train_or_load(name, model, data, optimizer, **kwargs):
        trained.append(name)
        return R.train_or_load(tmp_path, name, model, data, optimizer, **kwargs)

    study = R.recipe_ablation(train_or_load, Q.cifar_recipe, data, {"recipe": {}, "no smoothing": {"label_smoothing": 0.0}},
                              seeds=[0, 1], epochs=1, batch_size=4, widths=(4,), whiten_images=12)
    assert list(study) == ["recipe", "no flip TTA", "no smoothing"]
    assert trained == ["ablation_recipe_seed0", "ablation_recipe_seed1", "ablation_no smoothing_seed0",
                       "ablation_no smoothing_seed1"]
    assert [r.accuracy for r in study["no flip TTA"]] == [r.val_acc for r in study["recipe"]]
    assert all(0 <= r.accuracy <= 1 for runs in study.values() for r in runs)


def test_confusion_pairs_table_lists_each_models_top_mistakes():
    cm = np.array([[50, 3, 0], [7, 40, 1], [0, 3, 20]])
    lines = R.confusion_pairs_table({"m": (cm, ["a", "b", "c"]), "n": (np.eye(2, dtype=int), ["x", "y"])}, k=2).splitlines()
    assert lines[0] == "| model | true → predicted | test images | share of the true class |"
    assert lines[2:] == ["| m | b → a | 7 | 14.6% |", "| m | a → b | 3 | 5.7% |"]


def test_study_section_shows_the_study_table_then_the_captioned_curves(monkeypatch, tmp_path):
    shown = _shown(monkeypatch)
    study = {"baseline": _runs([0.90, 0.91, 0.92]), "wide": _runs([0.95, 0.96, 0.97]), "deep": _runs([0.9, 0.9, 0.9])}
    R.study_section(study, ["wide", "baseline"], "Width.", "Width", "width (32 = baseline)", tmp_path / "w.png")
    (text, meta), (line, _), (fig, fig_meta), (fig_line, _) = shown
    assert text == str(R.study_table({"wide": study["wide"], "baseline": study["baseline"]}, "baseline"))
    assert meta[R.FLOAT_KEY]["caption"] == "Width." and line == "*Table: Width.*"
    assert fig_meta[R.FLOAT_KEY]["caption"] == fig_line.strip("*").removeprefix("Figure: ") == (
        "Width: validation accuracy per epoch, mean over the seeds, error bars one standard deviation.")
    assert fig.axes[0].get_title() == "width (32 = baseline)" and (tmp_path / "w.png").exists()
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["wide (3 seeds)", "baseline (3 seeds)"]
    with pytest.raises(ValueError, match=r"\['wider'\] are not variants"):
        R.study_section(study, ["wider", "baseline"], "Width.", "Width", "width", tmp_path / "v.png")


def test_models_table_has_the_standard_columns():
    records = [R.Result("cnn", 12345, 3, 41.6, [0.5, 0.6, 0.7], accuracy=0.8765),
               R.Result("mlp", 99, 1, 2.4, [0.3], accuracy=0.5)]
    assert R.models_table(records).splitlines() == [
        "| model | parameters | s / epoch | epochs | test accuracy |", "|---|---|---|---|---|",
        "| cnn | 12,345 | 42 | 3 | 87.65% |", "| mlp | 99 | 2 | 1 | 50.00% |"]


def test_seeds_record_sums_up_the_seeds_and_keeps_the_first_seeds_details():
    data, model = toy_data(), toy_model()
    results = [R.model_result(f"seed {s}", model, {"seconds": [s + 1.0, 3.0], "val_acc": [0.4, 0.5]}, data)
               for s in range(3)]
    for result, accuracy in zip(results, (0.90, 0.92, 0.94)):
        result.accuracy = accuracy
    record = R.seeds_record(results, (0, 1, 2), train_images=40)
    assert list(record) == ["test_accuracy", "test_accuracy_std", "seeds", "macro", "weighted", "epochs",
                            "seconds_per_epoch", "train_seconds", "train_images", "parameters", "confusion",
                            "class_names"]                 # the order of mnist_results.json
    assert record["test_accuracy"] == pytest.approx(0.92) and record["test_accuracy_std"] == pytest.approx(0.02)
    assert record["seeds"] == [0, 1, 2] and record["train_images"] == 40 and record["parameters"] == model.num_params()
    assert (record["epochs"], record["seconds_per_epoch"], record["train_seconds"]) == (2, 2.0, 4.0)   # seed 0
    assert record["confusion"] == results[0].report["confusion"].tolist() and record["class_names"] == ["a", "b", "c"]
    assert record["macro"] == results[0].report["macro"]
    json.dumps(record)                                  # plain JSON (save_json also converts NumPy numbers)


def test_seed_runs_table_has_one_row_per_run_with_times_and_accuracies():
    records = [R.Result("seed 0", 10, 4, 201.26, [0.98, 0.994], train_seconds=805.0, accuracy=0.9943)]
    assert R.seed_runs_table(records).splitlines() == [
        "| run | epochs | s / epoch | training | validation accuracy | test accuracy |", "|---|---|---|---|---|---|",
        "| seed 0 | 4 | 201.3 | 13.4 min | 99.40% | 99.43% |"]


def test_target_verdict_says_met_or_not_met_with_the_target_in_percent():
    assert R.target_verdict(0.9955, 0.9955) == "target 99.55 %: **met**"
    assert R.target_verdict(0.8999, 0.90) == "target 90 %: **not met**"
    assert R.target_verdict(0.56, 0.55) == "target 55 %: **met**"
    tie = np.mean([0.9951, 0.9962, 0.9952])             # 29,865 of 30,000: 99.55 % exactly, 0.99549999... as a float
    assert tie < 0.9955 and R.target_verdict(tie, 0.9955) == "target 99.55 %: **met**"
    assert R.target_verdict(0.99549, 0.9955) == "target 99.55 %: **not met**"   # 0.3 of a test image short


def _seed_results():
    return [R.Result("seed 0", 10, 5, 48.26, [0.99], train_seconds=241.3, accuracy=0.9957),
            R.Result("seed 1", 10, 5, 47.91, [0.99], train_seconds=239.9, accuracy=0.9951),
            R.Result("seed 2", 10, 5, 49.02, [0.99], train_seconds=245.6, accuracy=0.9960)]


def test_seeds_sentence_is_notebook_1s_result_sentence(monkeypatch):
    text = R.seeds_sentence(_seed_results(), 0.9955, train_images=55000, cores=2)
    assert isinstance(text, R.MarkdownText) and text == (
        "**Test accuracy 99.56% ± 0.05%** (mean ± standard deviation over 3 seeds; target 99.55 %: **met**), "
        "each run 5 epochs of 55,000 images, 48.3 s per epoch (median) on 2 CPU cores, at most 4.1 minutes of "
        "training.")
    monkeypatch.setattr(R.os, "cpu_count", lambda: 7)
    budget = R.seeds_sentence(_seed_results(), 0.9955, train_images=55000, cores=2, budget=4)
    assert budget == text.replace("minutes of training.", "minutes of training (budget 4 minutes: **not met**).")
    one = R.seeds_sentence(_seed_results()[1:2], 0.9955, train_images=2000)
    assert one == ("**Test accuracy 99.51% ± 0.00%** (mean ± standard deviation over 1 seed; target 99.55 %: "
                   "**not met**), each run 5 epochs of 2,000 images, 47.9 s per epoch (median) on 7 CPU cores, "
                   "at most 4.0 minutes of training.")


def test_run_sentence_is_notebooks_4_6_and_7s_result_sentence():
    cnn = R.Result("2-D CNN", 10, 10, 151.4, [0.9], train_seconds=1514.2, accuracy=0.9123,
                   report={"macro": {"precision": 0.91234, "recall": 0.9121}})
    assert R.run_sentence(cnn, "2-D CNN", target=0.90, how="with flip test-time augmentation") == (
        "**2-D CNN test accuracy: 91.23%** with flip test-time augmentation (target 90 %: **met**; one run) after "
        "10 epochs of 151 s (25.2 minutes of training). Macro precision 0.912, recall 0.912.")
    fashion = R.Result("Fashion-MNIST (MNIST recipe)", 10, 5, 50.4, [0.9], accuracy=0.9312)
    assert R.run_sentence(fashion, "Fashion-MNIST", how="with the MNIST recipe") == (
        "**Fashion-MNIST test accuracy: 93.12%** with the MNIST recipe (5 epochs of 50 s).")
    assert R.run_sentence(fashion, "F") == "**F test accuracy: 93.12%** (5 epochs of 50 s)."
    assert R.run_sentence(fashion, "F", budget=1) == ("**F test accuracy: 93.12%** (5 epochs of 50 s, 0.0 minutes "
                                                      "of training; budget 1 minute: **met**).")
    assert R.run_sentence(cnn, "2-D CNN", target=0.90, budget=25) == (
        "**2-D CNN test accuracy: 91.23%** (target 90 %: **met**; one run) after 10 epochs of 151 s (25.2 minutes "
        "of training; budget 25 minutes: **not met**). Macro precision 0.912, recall 0.912.")


def test_budget_verdict_compares_seconds_not_the_rounded_minutes():
    assert R.budget_verdict(300.0, 5) == "budget 5 minutes: **met**"
    assert R.budget_verdict(303.5, 5) == "budget 5 minutes: **not met**"          # printed as 5.1 minutes
    assert R.budget_verdict(301.0, 5) == "budget 5 minutes: **not met**"          # printed as 5.0 minutes
    assert R.budget_verdict(1799.0, 30) == "budget 30 minutes: **met**"
    assert R.budget_verdict(0.5, 0) == "budget 0 minutes: **not met**"          # a budget of 0 is a budget


@pytest.mark.parametrize("source", ["the CIFAR-10 binary batches", "the JPEG copy of CIFAR-10 (folder x)"])
def test_save_bonus_results_writes_each_notebooks_models_and_one_task_per_model(tmp_path, source):
    names = ["2-D CNN", "MLP on pixels", "row sequence (Conv1D)", "row sequence (GRU)", "MNIST rows (GRU)"]
    accuracies = [0.6, 0.7, 0.8, 0.9, 0.98]
    results = {n: R.Result(n, 100 + k, k + 1, 10.0 + k, [0.5, 0.5 + k / 10], train_seconds=20.0 + k,
                           accuracy=accuracies[k], report={"confusion": np.array([[3, 1], [k, 4]])},
                           tta="flip" if k == 0 else None, val_acc_tta=0.61 if k == 0 else None)
               for k, n in enumerate(names)}
    cifar = R.save_bonus_results(tmp_path, "cifar_results.json", {n: results[n] for n in names[:2]}, source,
                                 ("cat", "dog"))
    rows = R.save_bonus_results(tmp_path, "rows_results.json", {n: results[n] for n in names[2:]}, source,
                                ["cat", "dog"])
    assert cifar == json.loads((tmp_path / "cifar_results.json").read_text())
    assert rows == json.loads((tmp_path / "rows_results.json").read_text())
    assert (cifar["cifar_source"], cifar["cifar_confusion"], cifar["class_names"]) == (source, [[3, 1], [0, 4]],
                                                                                       ["cat", "dog"])   # the 2-D CNN's
    assert "cifar_confusion" not in rows                    # only the 2-D CNN's matrix is kept
    assert (rows["cifar_source"], rows["class_names"]) == (source, ["cat", "dog"])
    assert list(rows["models"]) == names[2:]                # the MNIST row GRU is recorded too
    assert cifar["models"]["MLP on pixels"] == {"name": "MLP on pixels", "params": 101, "epochs": 2, "seconds": 11.0,
                                                "curve": [0.5, 0.6], "train_seconds": 21.0, "accuracy": 0.7}
    assert rows["models"]["MNIST rows (GRU)"]["accuracy"] == 0.98
    # The summary's comparison: the four CIFAR-10 models in BONUS_TASKS's order, read back
    # as Results (BONUS_FIELDS only), without the MNIST row GRU; a file not written yet (None) is skipped.
    assert set(R.BONUS_FIELDS) <= {f.name for f in dataclasses.fields(R.Result)}
    views = R.bonus_models(rows, cifar)
    assert list(views) == ["2-D CNN", "row sequence (Conv1D)", "row sequence (GRU)", "MLP on pixels"]
    assert all(views[n] == dataclasses.replace(results[n], report=None, tta=None, val_acc_tta=None) for n in views)
    assert list(R.bonus_models(None, rows)) == ["row sequence (Conv1D)", "row sequence (GRU)"]
    dataset = "CIFAR-10 (JPEG copy)" if "JPEG" in source else "CIFAR-10"
    expected = {"cifar10-cnn": (dataset, "2-D CNN", 0.6), "cifar10-mlp": (dataset, "MLP on pixels", 0.7),
                "cifar10-rows": (dataset, "row sequence (Conv1D)", 0.8),
                "cifar10-rows-gru": (dataset, "row sequence (GRU)", 0.9),
                "mnist-rows-gru": ("MNIST", "MNIST rows (GRU)", 0.98)}
    tasks = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "tasks").glob("*.json")}
    assert sorted(tasks) == sorted(expected)
    for task_id, (dataset, model, accuracy) in expected.items():
        t = tasks[task_id]
        assert (t["dataset"], t["model"], t["seeds"], t["test_accuracy"]) == (dataset, model, [0], [accuracy])
    with pytest.raises(ValueError, match=r"no report.json task for \['CNN'\]"):
        R.save_bonus_results(tmp_path, "x.json", {"CNN": results["2-D CNN"]}, source, ["cat", "dog"])


def test_report_confusions_takes_each_record_that_exists():
    mnist = {"confusion": [[1, 0], [2, 3]], "class_names": ["0", "1"]}
    cifar = {"cifar_confusion": [[4, 1], [0, 5]], "class_names": ["cat", "dog"]}
    assert R.report_confusions(mnist, cifar) == {"MNIST": ([[1, 0], [2, 3]], ["0", "1"]),
                                                 "CIFAR-10 2-D CNN": ([[4, 1], [0, 5]], ["cat", "dog"])}
    assert list(R.report_confusions(None, cifar)) == ["CIFAR-10 2-D CNN"]
    assert R.report_confusions(mnist, None) == {"MNIST": ([[1, 0], [2, 3]], ["0", "1"])}
    assert R.report_confusions(None, None) == {}
    assert R.report_confusions(None, {"class_names": ["cat", "dog"]}) == {}     # a record without the 2-D CNN


def test_study_record_is_notebook_3s_experiments_json():
    study = {"baseline": [R.Result("baseline", 10, 3, 4.5, [0.8, 0.9]), R.Result("baseline", 10, 3, 4.7, [0.7, 0.95])],
             "kernel 5x5": [R.Result("kernel 5x5", 20, 3, 6.0, [0.85])]}
    assert R.study_record(study) == {"baseline": {"val_acc": [0.9, 0.95], "params": 10, "seconds": 4.5},
                                     "kernel 5x5": {"val_acc": [0.85], "params": 20, "seconds": 6.0}}
    assert list(R.study_record(study)) == ["baseline", "kernel 5x5"]


def test_model_result_with_tta_also_measures_it_on_the_validation_split():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((30, 1, 6, 6)).astype(np.float32)
    y = rng.integers(0, 3, 30)
    data = D.Dataset(x[:10], y[:10], x[10:20], y[10:20], x[20:], y[20:], ["a", "b", "c"])
    history = {"seconds": [1.0, 1.2], "val_acc": [0.4, 0.5]}
    plain = R.model_result("plain", toy_model(), history, data)
    assert plain.val_acc_tta is None and "validation with TTA" not in R.seed_runs_table([plain])
    shifted = R.model_result("shift", toy_model(), history, data, tta="shift")
    assert shifted.val_acc_tta == T.evaluate(toy_model(), data.x_val, data.y_val, tta="shift")[1]
    np.testing.assert_allclose(shifted.proba, toy_model().predict_proba(data.x_test, tta="shift"))
    header, _, row = str(R.seed_runs_table([shifted])).splitlines()
    assert "| validation accuracy | validation with TTA | test accuracy |" in header
    assert f"| 50.00% | {shifted.val_acc_tta:.2%} | {shifted.accuracy:.2%} |" in row
    assert R.run_sentence(shifted, "toy").endswith(
        f"(2 epochs of 1 s). Scored with test-time augmentation, the mean logits of the image and its four "
        f"one-pixel shifts (validation accuracy 50.00% without it, {shifted.val_acc_tta:.2%} with it).")
    assert "test-time" not in R.run_sentence(plain, "toy")



def test_table_and_figure_reach_ipython_display_as_markdown_and_image(monkeypatch, tmp_path):
    # Through the real R._display -> P.show path: a Markdown table (a str) is shown as text,
    # never taken for a file name; a PNG path is shown as an image.
    import IPython.display
    import matplotlib.pyplot as plt
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, metadata=None: shown.append(obj))
    R.table(R.markdown_table(["a"], [[0.0]]), "Caption.")
    assert shown[0] == "| a |\n|---|\n| 0.0 |"
    fig = plt.figure(figsize=(1, 1))
    fig.savefig(tmp_path / "f.png")
    plt.close(fig)
    R.figure(tmp_path / "f.png", "A picture.")
    assert isinstance(shown[2], IPython.display.Image)
