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
