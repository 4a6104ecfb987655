"""Layer classes: clear errors on bad input and arguments, the row-sequence view."""

import numpy as np
import pytest

import cnn_layers as L


@pytest.mark.parametrize("layer,x,message", [
    (L.Conv2D(3, 4, 3), np.zeros((2, 1, 8, 8), np.float32), r"expected 3 input channels.*\(2, 1, 8, 8\)"),
    (L.Conv2D(1, 4, 3), np.zeros((1, 8, 8), np.float32), r"expected a 4-D input.*\(1, 8, 8\)"),
    (L.Conv2D(1, 4, 3), np.zeros((0, 1, 8, 8), np.float32), "empty batch"),
    (L.Conv2D(1, 4, 5), np.zeros((1, 1, 3, 8), np.float32), "smaller than the kernel"),
    (L.Conv2D(1, 4, 3), np.zeros((1, 1, 8, 8), np.uint8), "floating-point.*uint8"),
    (L.MaxPool2D(2), np.zeros((2, 3, 8), np.float32), r"expected a 4-D input"),
    (L.MaxPool2D(3), np.zeros((2, 3, 2, 8), np.float32), "smaller than the pool"),
    (L.Dense(10, 2), np.zeros((4, 9), np.float32), r"expected 10 input features.*\(4, 9\)"),
    (L.ReLU(), np.zeros((0, 3), np.float32), "empty batch"),
    (L.BatchNorm(3), np.zeros(3, np.float32), r"rank >= 2.*\(3,\)"),
    (L.BatchNorm(3), np.zeros((4, 2, 5), np.float32), r"expected 3 input channels"),
])
def test_bad_layer_input_names_the_problem(layer, x, message):
    with pytest.raises(ValueError, match=message):
        layer.forward(x)


@pytest.mark.parametrize("labels,message", [
    (np.array([0, 10]), r"0\.\.9.*0 to 10"), (np.array([0, -1]), r"0\.\.9"),
    (np.array([0.0, 1.0]), "integers"), (np.array([0, 1, 2]), r"shape \(2,\)")])
def test_bad_labels_name_the_problem(labels, message):
    with pytest.raises(ValueError, match=message):
        L.SoftmaxCrossEntropy().forward(np.zeros((2, 10), np.float32), labels)


def test_bad_constructor_arguments_and_order():
    with pytest.raises(ValueError, match="impl"):
        L.Conv2D(1, 2, 3, impl="fast")
    with pytest.raises(ValueError, match="kernel_size"):
        L.Conv2D(1, 2, (3, -1))
    with pytest.raises(ValueError, match="Dropout"):
        L.Dropout(1.0)
    with pytest.raises(RuntimeError, match="before forward"):
        L.ReLU().backward(np.zeros((1, 2)))


def test_rows_as_sequence_interleaves_the_channels_of_each_row():
    x = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    seq = L.rows_as_sequence(x)
    assert seq.shape == (2, 4, 15)
    n, row, col = 1, 2, 3
    np.testing.assert_array_equal(seq[n, row, 3 * col:3 * col + 3], x[n, :, row, col])   # R, G, B of one pixel


@pytest.mark.parametrize("make,name", [
    (lambda: L.Conv1D(1, 2, kernel_size=2.5), "Conv1D: kernel_size"),
    (lambda: L.Conv1D(1, 2, 3, stride=0), "Conv1D: stride"),
    (lambda: L.Conv1D(1, 2, 3, padding=-1), "Conv1D: padding must be an integer >= 0"),
    (lambda: L.Conv1D(1.0, 2, 3), "Conv1D: in_channels"),
    (lambda: L.Conv2D(1.5, 2, 3), "Conv2D: in_channels"),
    (lambda: L.Conv2D(1, 0, 3), "Conv2D: out_channels"),
    (lambda: L.Dense(10.5, 3), "Dense: in_features"),
    (lambda: L.Dense(10, "3"), "Dense: out_features"),
    (lambda: L.Dense(True, 3), "Dense: in_features"),
    (lambda: L.BatchNorm(4.0), "BatchNorm: num_channels"),
    (lambda: L.BatchNorm(0), "BatchNorm: num_channels"),
    (lambda: L.MaxPool2D(2.5), "pool_size"),
    (lambda: L.MaxPool1D(1.5), "pool_size"),
])
def test_integer_hyperparameters_must_be_positive_integers(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_numpy_integers_are_accepted_as_sizes():
    layer = L.Dense(np.int64(4), np.int32(2))
    assert layer.params["W"].shape == (4, 2) and layer.config()["in_features"] == 4
    assert L.Conv1D(np.int64(2), 3, np.int64(3)).params["W"].shape == (3, 2, 3)
