"""The gradient-checking utilities themselves."""

import numpy as np
import pytest

import cnn_gradcheck as G

numeric_grad, rel_error = G.numeric_gradient, G.relative_error


def test_numeric_gradient_and_relative_error_on_a_known_function():
    a = np.array([[1.0, -2.0], [0.5, 3.0]])
    np.testing.assert_allclose(numeric_grad(lambda: np.sum(a ** 3), a), 3 * a ** 2, rtol=1e-8)
    assert rel_error(a, a) == 0 and rel_error(a, -a) == 1
    assert rel_error(a, a * (1 + 1e-3)) == pytest.approx(5e-4, rel=1e-2)


def test_implementation_difference_is_zero_for_agreeing_layers_and_not_otherwise():
    import cnn_layers as L
    x = np.random.default_rng(1).standard_normal((2, 3, 6, 5))
    forward, gradients = G.implementation_difference(lambda impl: L.Conv2D(3, 2, 3, padding=1, impl=impl, seed=1,
                                                                             dtype=np.float64), x)
    assert forward < 1e-12 and gradients < 1e-12
    broken = lambda impl: L.Conv2D(3, 2, 3, padding=1, impl=impl, seed=1 if impl == "loop" else 2, dtype=np.float64)
    assert min(G.implementation_difference(broken, x)) > 1e-3


def test_loop_vs_vectorized_rows_one_per_layer_at_rounding_level():
    x = np.random.default_rng(0).standard_normal((2, 3, 9, 8))
    rows = G.loop_vs_vectorized_rows(x)
    assert [row[0] for row in rows] == list(G.loop_vs_vectorized_layers())
    assert rows[0][0] == "Conv2D 3x3, stride 1, padding 1" and len(rows) == 7
    assert all(float(cell) < 1e-12 for row in rows for cell in row[1:])
    assert all(len(cell) == 7 and "e" in cell for row in rows for cell in row[1:])      # "1.1e-15"


def test_gradient_check_errors_cover_every_layer_and_the_network():
    errors = G.gradient_check_errors(np.random.default_rng(0))
    assert list(errors)[:len(G.gradient_check_layers())] == list(G.gradient_check_layers())
    assert list(errors)[-2:] == ["Dense 10 -> 4", "whole network + softmax cross-entropy"]
    assert set(errors["Dense 10 -> 4"]) == {"x", "W", "b"} and len(errors["whole network + softmax cross-entropy"]) == 9
    assert max(max(e.values()) for e in errors.values()) < G.GRADIENT_TOLERANCE
    rows = G.gradient_check_rows(errors)
    assert rows[0][:2] == ["Conv2D 3x3, padding 1", 3] and float(rows[0][2]) == pytest.approx(
        max(errors["Conv2D 3x3, padding 1"].values()), rel=0.05)
    assert G.gradient_check_verdict(errors).startswith("largest relative error of all 27 gradients: ")
    assert G.gradient_check_verdict(errors).endswith(" (tolerance 1e-6): passed")
    assert G.gradient_check_network().forward(np.zeros((2, 3, 8, 6)), training=False).shape == (2, 5)


def test_gradient_check_verdict_fails_at_the_tolerance():
    errors = {"a": {"x": 1e-9, "W": 2e-6}, "b": {"x": 3e-10}}
    assert G.gradient_check_verdict(errors) == \
        "largest relative error of all 3 gradients: 2.0e-06 (tolerance 1e-6): FAILED"
    assert G.gradient_check_verdict(errors, tolerance=1e-5).endswith("(tolerance 1e-5): passed")
