"""Gradient checking: central finite differences against the analytic
backward passes (use float64: in float32 rounding swamps the step h)."""
from __future__ import annotations

import numpy as np

from cnn_layers import Dropout, SoftmaxCrossEntropy
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
