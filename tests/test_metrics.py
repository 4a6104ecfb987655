"""Metrics on hand-computed examples."""

import numpy as np
import pytest

import cnn_metrics as E


Y_TRUE = np.array([0, 0, 1, 1, 2, 2, 2])


Y_PRED = np.array([0, 1, 1, 1, 2, 0, 1])


def test_confusion_matrix_and_accuracy():
    np.testing.assert_array_equal(E.confusion_matrix(Y_TRUE, Y_PRED), [[1, 1, 0], [0, 2, 0], [1, 1, 1]])
    assert E.accuracy(Y_TRUE, Y_PRED) == pytest.approx(4 / 7)


def test_classification_report_by_hand():
    r = E.classification_report(Y_TRUE, Y_PRED, class_names=["a", "b", "c"])
    np.testing.assert_allclose(r["precision"], [1 / 2, 2 / 4, 1 / 1])
    np.testing.assert_allclose(r["recall"], [1 / 2, 2 / 2, 1 / 3])
    np.testing.assert_allclose(r["f1"], [0.5, 2 / 3, 0.5])
    np.testing.assert_array_equal(r["support"], [2, 2, 3])
    assert r["macro"]["precision"] == pytest.approx(2 / 3)
    assert r["macro"]["recall"] == pytest.approx((0.5 + 1 + 1 / 3) / 3)
    assert r["weighted"]["recall"] == pytest.approx(4 / 7)       # weighted recall is accuracy
    assert r["weighted"]["precision"] == pytest.approx((2 * 0.5 + 2 * 0.5 + 3 * 1) / 7)
    assert r["accuracy"] == pytest.approx(4 / 7)
    text = E.format_report(r)
    assert "macro avg" in text and "0.6667" in text


def test_class_names_fix_the_number_of_classes_even_if_some_are_absent():
    r = E.classification_report(np.array([0, 0]), np.array([0, 1]), class_names=["a", "b", "c"])
    assert r["confusion"].shape == (3, 3) and r["support"].tolist() == [2, 0, 0]


def test_classes_without_predictions_do_not_divide_by_zero():
    with np.errstate(all="raise"):
        r = E.classification_report(np.array([0, 1, 1]), np.array([1, 1, 1]), num_classes=4)
    np.testing.assert_allclose(r["precision"], [0, 2 / 3, 0, 0])
    np.testing.assert_allclose(r["recall"], [0, 1, 0, 0])
    np.testing.assert_allclose(r["f1"], [0, 0.8, 0, 0])


def test_metrics_reject_bad_labels():
    with pytest.raises(ValueError, match="equal length"):
        E.accuracy(np.array([0, 1]), np.array([0]))
    with pytest.raises(ValueError, match=r"0\.\.2"):
        E.confusion_matrix(np.array([0, 3]), np.array([0, 1]), num_classes=3)


@pytest.mark.parametrize("kwargs", [{}, dict(num_classes=3), dict(class_names=["a", "b"])])
def test_classification_report_of_nothing_is_an_error_not_nan(kwargs):
    for empty in ([], np.array([], dtype=np.int64)):
        with pytest.raises(ValueError, match="y_true and y_pred are empty"):
            E.classification_report(empty, empty, **kwargs)


def test_top_confusions_lists_the_largest_mistakes_first():
    cm = np.array([[50, 3, 0], [7, 40, 1], [0, 3, 20]])
    assert E.top_confusions(cm, ["a", "b", "c"], k=3) == [("b", "a", 7, 7 / 48), ("a", "b", 3, 3 / 53),
                                                          ("c", "b", 3, 3 / 23)]
    assert E.top_confusions(np.eye(2, dtype=int), ["x", "y"]) == []          # no mistakes, nothing listed
    with pytest.raises(ValueError, match="square confusion matrix"):
        E.top_confusions(cm[:2], ["a", "b", "c"])


# ---------------------------------------------------------------- examples worth showing

PROBA = np.array([[0.9, 0.1, 0.0],      # 0: a 0 read as 0
                  [0.2, 0.8, 0.0],      # 1: a 0 read as 1 (80 %)
                  [0.1, 0.7, 0.2],      # 2: a 1 read as 1
                  [0.6, 0.3, 0.1],      # 3: a 1 read as 0 (60 %)
                  [0.0, 0.05, 0.95],    # 4: a 2 read as 2 (95 %)
                  [0.0, 0.99, 0.01]])   # 5: a 2 read as 1 (99 %)
LABELS = np.array([0, 0, 1, 1, 2, 2])


def test_first_correct_is_the_first_example_predicted_as_its_own_class():
    pred = PROBA.argmax(axis=1)
    assert [E.first_correct(LABELS, pred, k) for k in range(3)] == [0, 2, 4]
    assert E.first_correct(LABELS, pred, 3) is None


def test_correct_examples_one_per_class_with_its_probability():
    indices, titles = E.correct_examples(LABELS, PROBA, classes=[2, 0, 5])
    assert indices == [4, 0] and titles == ["2 (95%)", "0 (90%)"]          # class 5 has no example
    with pytest.raises(ValueError, match="labels"):
        E.correct_examples(LABELS[:3], PROBA, classes=[0])


def test_mistakes_beside_examples_most_confident_first_each_with_a_real_example():
    indices, titles = E.mistakes_beside_examples(LABELS, PROBA, n=2)
    assert indices == [5, 2, 1, 2]                         # 99 % then 80 %; both read as 1, its example is 2
    assert titles == ["2 read as 1\n(99%)", "a real 1\n", "0 read as 1\n(80%)", "a real 1\n"]
    indices, titles = E.mistakes_beside_examples(LABELS, PROBA, n=3)
    assert indices[4:] == [3, 0] and titles[4] == "1 read as 0\n(60%)"
    no_real_2 = np.array([[0.1, 0.0, 0.9], [0.0, 1.0, 0.0]])     # a 1 read as 2, and no 2 read right
    assert E.mistakes_beside_examples([1, 1], no_real_2) == ([0], ["1 read as 2\n(90%)"])
    assert E.mistakes_beside_examples(LABELS[[0, 2]], PROBA[[0, 2]]) == ([], [])
