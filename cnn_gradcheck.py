"""Gradient checking: central finite differences against the analytic
backward passes (use float64: in float32 rounding swamps the step h), and the
report's two verification tables: loop against vectorized layers, and every
analytic gradient against finite differences."""
from __future__ import annotations

import numpy as np

from cnn_layers import (AvgPool2D, Conv2D, Dense, Dropout, Flatten, LeakyReLU, MaxPool2D, ReLU, Sigmoid,
                        SoftmaxCrossEntropy, Tanh)
from cnn_model import Sequential

def numeric_gradient(f, a, h=1e-6):
    """Central-difference gradient (f(a + h e_k) - f(a - h e_k)) / 2h of the scalar
    function ``f()`` with respect to every entry of the array ``a`` (perturbed in
    place and restored). Use float64: in float32 the rounding error swamps h."""
    grad = np.zeros_like(a)
    for index in np.ndindex(a.shape):
        old = a[index]
        a[index] = old + h
        plus = f()
        a[index] = old - h
        minus = f()
        a[index] = old
        grad[index] = (plus - minus) / (2 * h)
    return grad


def relative_error(analytic, numeric):
    """||a - n|| / (||a|| + ||n||): 0 when equal, scale-free, at most 1."""
    denominator = np.linalg.norm(analytic) + np.linalg.norm(numeric)
    return float(np.linalg.norm(analytic - numeric) / max(denominator, 1e-300))


def gradient_errors(model, x, y=None, seed=0):
    """Relative errors of the analytic gradients of a layer or a ``Sequential``
    against finite differences, for the input ("x") and every parameter ("W",
    "b" for a layer; "i.W", "i.b" for layer i of a model).

    The loss is the mean cross-entropy against labels ``y`` when given, else
    L = sum(model(x) * R) for a fixed random R (so dL/dout = R).
    Dropout masks are frozen by restoring their random state before each pass.
    """
    layers = model.layers if isinstance(model, Sequential) else [model]
    frozen = [(layer, layer.rng.bit_generator.state) for layer in layers if isinstance(layer, Dropout)]

    def forward():
        for layer, state in frozen:
            layer.rng.bit_generator.state = state
        return model.forward(x, training=True)

    out = forward()
    if y is None:
        R = np.random.default_rng(seed).standard_normal(out.shape)
        loss, dout = (lambda: float(np.sum(forward() * R))), R
    else:
        loss_fn = SoftmaxCrossEntropy()
        loss_fn.forward(out, y)
        loss, dout = (lambda: SoftmaxCrossEntropy().forward(forward(), y)), loss_fn.backward()
    analytic, arrays = {"x": model.backward(dout)}, {"x": x}
    for i, layer in enumerate(layers):
        prefix = f"{i}." if isinstance(model, Sequential) else ""
        for name, param in layer.params.items():
            analytic[prefix + name], arrays[prefix + name] = layer.grads[name].copy(), param
    return {key: relative_error(analytic[key], numeric_gradient(loss, arrays[key])) for key in arrays}


def implementation_difference(make, x, seed=0):
    """Largest absolute difference between the loop and the vectorized version of
    one layer, ``make(impl)``, on input ``x``: (of the outputs, of every gradient,
    the input's and the parameters', after one backward pass of the same random dout)."""
    loop, vectorized = make("loop"), make("vectorized")
    out_loop, out_vectorized = loop.forward(x), vectorized.forward(x)
    dout = np.random.default_rng(seed).standard_normal(out_loop.shape).astype(out_loop.dtype)
    grads = [np.abs(loop.backward(dout) - vectorized.backward(dout)).max()]
    grads += [np.abs(loop.grads[k] - vectorized.grads[k]).max() for k in loop.grads]
    return float(np.abs(out_loop - out_vectorized).max()), float(max(grads))


# ---------------------------------------------------------------------------
# The report's verification tables (notebook 0)
# ---------------------------------------------------------------------------

F64 = np.float64
GRADIENT_TOLERANCE = 1e-6        # largest relative error accepted from a correct float64 gradient


def loop_vs_vectorized_layers():
    """The layers compared loop against vectorized: {description: make(impl) ->
    layer}, each built with the same weights (seed 1) for either ``impl``, for
    inputs (N, 3, H, W) float64."""
    return {
        "Conv2D 3x3, stride 1, padding 1": lambda impl: Conv2D(3, 4, 3, padding=1, impl=impl, seed=1, dtype=F64),
        "Conv2D 2x3, stride 2, padding 2": lambda impl: Conv2D(3, 4, (2, 3), stride=2, padding=2, impl=impl,
                                                               seed=1, dtype=F64),
        "MaxPool2D 2x2": lambda impl: MaxPool2D(2, impl=impl),
        "MaxPool2D 3x3, stride 2 (overlapping)": lambda impl: MaxPool2D(3, 2, impl=impl),
        "AvgPool2D 2x2": lambda impl: AvgPool2D(2, impl=impl),
        "ReLU": lambda impl: ReLU(impl=impl),
        "Sigmoid": lambda impl: Sigmoid(impl=impl),
    }


def loop_vs_vectorized_rows(x):
    """One table row per layer of ``loop_vs_vectorized_layers`` run on x (N, 3, H, W)
    float64: [description, largest difference of the outputs, largest difference
    of the gradients] (``implementation_difference``), numbers as "1.2e-16"."""
    return [[name, *(f"{d:.1e}" for d in implementation_difference(make, x))]
            for name, make in loop_vs_vectorized_layers().items()]


def gradient_check_layers():
    """The layers checked one by one against finite differences, for inputs
    (N, 3, H, W) float64: {description: layer} (weights from a random start)."""
    return {
        "Conv2D 3x3, padding 1": Conv2D(3, 4, 3, padding=1, dtype=F64),
        "Conv2D 2x3, stride 2, padding 2": Conv2D(3, 2, (2, 3), stride=2, padding=2, dtype=F64),
        "MaxPool2D 2x2": MaxPool2D(2), "MaxPool2D 3x3 / 2": MaxPool2D(3, 2), "AvgPool2D 2x2": AvgPool2D(2),
        "ReLU": ReLU(), "LeakyReLU": LeakyReLU(0.1), "Sigmoid": Sigmoid(), "Tanh": Tanh(),
        "Dropout(0.3)": Dropout(0.3), "Flatten": Flatten(),
    }


def gradient_check_network():
    """A small float64 network with every kind of checked layer, for inputs
    (N, 3, 8, 6) and 5 classes: two blocks of conv 3x3 -> ReLU -> max-pool 2
    (8x6 -> 4x3 -> 2x1), then dense 12 -> 8 -> ReLU -> dropout 0.3 -> dense 8 -> 5."""
    return Sequential([
        Conv2D(3, 4, 3, padding=1, dtype=F64), ReLU(), MaxPool2D(2),
        Conv2D(4, 6, 3, padding=1, dtype=F64), ReLU(), MaxPool2D(2),
        Flatten(), Dense(12, 8, dtype=F64), ReLU(), Dropout(0.3), Dense(8, 5, dtype=F64)], seed=0)


def gradient_check_errors(rng):
    """Every analytic gradient of the report's check against finite differences:
    {checked: {gradient name: relative error}} for each of ``gradient_check_layers``
    on x (2, 3, 8, 6), a Dense 10 -> 4 on (3, 10), and ``gradient_check_network``
    with its softmax cross-entropy loss on the same x with labels (0, 4). Both
    inputs are drawn from ``rng`` (a NumPy Generator), x first."""
    x = rng.standard_normal((2, 3, 8, 6))
    errors = {name: gradient_errors(layer, x) for name, layer in gradient_check_layers().items()}
    errors["Dense 10 -> 4"] = gradient_errors(Dense(10, 4, dtype=F64), rng.standard_normal((3, 10)))
    errors["whole network + softmax cross-entropy"] = gradient_errors(gradient_check_network(), x, np.array([0, 4]))
    return errors


def gradient_check_rows(errors):
    """One table row per entry of ``gradient_check_errors``: [what was checked,
    number of gradients, largest relative error as "3.1e-09"]."""
    return [[name, len(errs), f"{max(errs.values()):.1e}"] for name, errs in errors.items()]


def gradient_check_verdict(errors, tolerance=GRADIENT_TOLERANCE):
    """One line on all of ``gradient_check_errors``: "largest relative error of
    all 97 gradients: 3.1e-09 (tolerance 1e-6): passed" ("FAILED" when the
    largest error reaches the tolerance)."""
    worst = max(max(errs.values()) for errs in errors.values())
    count = sum(len(errs) for errs in errors.values())
    limit = f"{tolerance:.0e}".replace("e-0", "e-")          # 1e-6, not Python's 1e-06
    return (f"largest relative error of all {count} gradients: {worst:.1e} (tolerance {limit}): "
            f"{'passed' if worst < tolerance else 'FAILED'}")
