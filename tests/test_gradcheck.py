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
