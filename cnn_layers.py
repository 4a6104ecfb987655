"""Layer classes around the maths of ``cnn_core``, and the loss.

Every layer has ``forward(x, training=True) -> out`` and ``backward(dout) -> dx``,
``params`` and ``grads`` (dicts of arrays with the same keys), ``buffers``
(saved but not trained), ``config()`` (its constructor arguments, used to save
a model) and ``impl`` ("loop" or "vectorized") where it has maths.
"""
from __future__ import annotations

import math
from collections import namedtuple

import numpy as np

from cnn_core import (DEFAULT_DTYPE, Workspace, _from_rows, _scale_shift, as_rows, avgpool_backward_loop,
                      avgpool_backward_vectorized, avgpool_forward_loop, avgpool_forward_vectorized,
                      batchnorm_backward_loop, batchnorm_backward_vectorized, batchnorm_forward_loop,
                      batchnorm_forward_vectorized, check_input, check_labels, conv2d_backward_loop,
                      conv2d_backward_vectorized, conv2d_forward_loop, conv2d_forward_vectorized,
                      dense_backward_loop, dense_backward_vectorized, dense_forward_loop,
                      dense_forward_vectorized, maxpool_backward_loop, maxpool_backward_vectorized,
                      maxpool_forward_loop, maxpool_forward_vectorized)

LAYER_TYPES = {}          # class name -> class, so that a saved model can be rebuilt


def _pair(value, name):
    """Return ``(a, b)`` from an int or a pair of ints, all >= 0."""
    pair = (value, value) if np.isscalar(value) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and v >= 0 for v in pair):
        raise ValueError(f"{name} must be a non-negative int or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


class Layer:
    """Base class. ``forward(x, training=True) -> out``, ``backward(dout) -> dx``.

    ``params`` maps names to arrays; ``backward`` fills ``grads`` with the same
    keys and shapes. ``buffers`` holds state that is saved but not trained
    (batch-norm running statistics). ``config()`` returns the constructor
    arguments (used by ``Sequential.save``).

    ``trainable`` (default True): set it to False to freeze the layer's
    parameters (e.g. ``cnn_model.whitening_conv``): optimisers, weight decay,
    gradient clipping and ``Sequential.initialize`` leave them alone, and
    ``Sequential.save`` records the flag with the architecture.
    """
    trainable = True          # a class default, so every subclass has it without calling __init__

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        LAYER_TYPES[cls.__name__] = cls

    def __init__(self):
        self.params, self.grads, self.buffers = {}, {}, {}
        self._cache = None

    def config(self):
        return {}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    def label(self):
        """Short description for tables such as ``Sequential.summary``."""
        return type(self).__name__

    @property
    def work(self):
        """The layer's ``cnn_core.Workspace``: scratch arrays its vectorized maths
        reuse from batch to batch (made on first use, never saved)."""
        if self.__dict__.get("_work") is None:
            self._work = Workspace()
        return self._work

    def _cached(self):
        if self._cache is None:
            raise RuntimeError(f"{self!r}: backward() called before forward(training=True)")
        return self._cache


IMPLS = ("loop", "vectorized")

# A layer's maths for one implementation: its forward and backward functions from cnn_core.
Maths = namedtuple("Maths", "forward backward")


def _check_impl(impl):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


class ParamLayer(Layer):
    """A layer with weights ``W`` and bias ``b``, initialised He, Glorot or uniform.

    ``fan_in``/``fan_out`` count the inputs and outputs each weight connects.
    He (normal, std sqrt(2 / fan_in)) keeps the activation variance constant
    through ReLUs; Glorot (uniform, limit sqrt(6 / (fan_in + fan_out))) does so
    for symmetric activations and for the last layer before the softmax.
    "uniform" (limit 1 / sqrt(fan_in), std 1 / sqrt(3 fan_in): PyTorch's default
    for its convolutions and dense layers) starts 2.45 times smaller than He;
    before a BatchNorm the scale of W does not change the output, but a smaller
    W takes larger steps relative to its size (the effective rate is lr / |W|^2).
    """

    def __init__(self, w_shape, fan_in, fan_out, out_features, impl, init, seed, dtype):
        super().__init__()
        self.impl = _check_impl(impl)
        self.fan_in, self.fan_out = fan_in, fan_out
        self.params = {"W": np.zeros(w_shape, dtype=dtype), "b": np.zeros(out_features, dtype=dtype)}
        self.initialize(np.random.default_rng(seed), init)

    def initialize(self, rng, scheme):
        W = self.params["W"]
        if scheme == "he":
            W[...] = rng.normal(0.0, math.sqrt(2.0 / self.fan_in), W.shape)
        elif scheme == "glorot":
            limit = math.sqrt(6.0 / (self.fan_in + self.fan_out))
            W[...] = rng.uniform(-limit, limit, W.shape)
        elif scheme == "uniform":
            limit = 1.0 / math.sqrt(self.fan_in)
            W[...] = rng.uniform(-limit, limit, W.shape)
        else:
            raise ValueError(f"init must be 'he', 'glorot' or 'uniform', got {scheme!r}")
        self.params["b"][...] = 0

    @property
    def dtype(self):
        return self.params["W"].dtype

    functions = {}        # impl -> Maths(forward, backward), given by each subclass

    def check(self, x):
        """Raise ValueError unless x is a valid input (each subclass says what that is)."""

    def hyperparameters(self):
        """Extra arguments of the forward function after (x, W, b)."""
        return ()

    uses_workspace = False   # True: the vectorized functions take ``work=`` (a Workspace)

    def _scratch(self):
        return {"work": self.work} if self.uses_workspace and self.impl == "vectorized" else {}

    def forward(self, x, training=True):
        self.check(x)
        out, cache = self.functions[self.impl].forward(x.astype(self.dtype, copy=False), self.params["W"],
                                                  self.params["b"], *self.hyperparameters(), **self._scratch())
        self._cache = cache if training else None
        return out

    def backward(self, dout, input_grad=True):
        """Fill ``grads`` and return dx (None when ``input_grad`` is False)."""
        dx, dW, db = self.functions[self.impl].backward(dout, self._cached(), input_grad, **self._scratch())
        self.grads = {"W": dW, "b": db}
        return dx


class Conv2D(ParamLayer):
    """2-D convolution. x: (N, C_in, H, W) -> (N, C_out, OH, OW).

    ``params["W"]``: (C_out, C_in, kh, kw), ``params["b"]``: (C_out,).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 impl="vectorized", init="he", seed=None, dtype=DEFAULT_DTYPE):
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"Conv2D: {name} must be a positive integer, got {value!r}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride, self.padding = _pair(stride, "stride"), _pair(padding, "padding")
        if min(self.kernel_size) < 1 or min(self.stride) < 1:
            raise ValueError(f"kernel_size and stride must be >= 1, got {kernel_size}, {stride}")
        kh, kw = self.kernel_size
        super().__init__((out_channels, in_channels, kh, kw), in_channels * kh * kw,
                         out_channels * kh * kw, out_channels, impl, init, seed, dtype)

    def config(self):
        return dict(in_channels=self.in_channels, out_channels=self.out_channels,
                    kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                    impl=self.impl)

    functions = {"loop": Maths(conv2d_forward_loop, conv2d_backward_loop),
                 "vectorized": Maths(conv2d_forward_vectorized, conv2d_backward_vectorized)}
    uses_workspace = True

    def hyperparameters(self):
        return self.stride, self.padding

    def label(self):
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        text = f"Conv2D {self.in_channels}->{self.out_channels} {kh}x{kw}"
        text += f" stride {sh}" if sh == sw != 1 else f" stride {sh}x{sw}" if sh != sw else ""
        return text + (f" pad {ph}" if ph == pw != 0 else f" pad {ph}x{pw}" if ph != pw else "")

    def check(self, x):
        check_input(x, "Conv2D", "NCHW", self.in_channels)
        for axis, size, k, p in zip("HW", x.shape[2:], self.kernel_size, self.padding):
            if size + 2 * p < k:
                raise ValueError(f"Conv2D: input {axis}={size} with padding {p} is smaller "
                                 f"than the kernel ({k}); input shape {x.shape}")


class Dense(ParamLayer):
    """Fully connected layer. x: (N, in_features) -> (N, out_features).

    ``params["W"]``: (in_features, out_features), ``params["b"]``: (out_features,).
    """

    def __init__(self, in_features, out_features, impl="vectorized", init="he", seed=None,
                 dtype=DEFAULT_DTYPE):
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"Dense: {name} must be a positive integer, got {value!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        super().__init__((in_features, out_features), in_features, out_features, out_features,
                         impl, init, seed, dtype)

    def config(self):
        return dict(in_features=self.in_features, out_features=self.out_features, impl=self.impl)

    functions = {"loop": Maths(dense_forward_loop, dense_backward_loop),
                 "vectorized": Maths(dense_forward_vectorized, dense_backward_vectorized)}

    def check(self, x):
        check_input(x, "Dense", "ND", self.in_features)

    def label(self):
        return f"Dense {self.in_features}->{self.out_features}"


class _Pool2D(Layer):
    """Shared plumbing of the pooling layers; subclasses name their functions."""
    functions = {}        # impl -> Maths(forward, backward)

    def __init__(self, pool_size=2, stride=None, impl="vectorized"):
        super().__init__()
        self.pool_size = _pair(pool_size, "pool_size")
        self.stride = self.pool_size if stride is None else _pair(stride, "stride")
        if min(self.pool_size) < 1 or min(self.stride) < 1:
            raise ValueError(f"pool_size and stride must be >= 1, got {pool_size}, {stride}")
        self.impl = _check_impl(impl)

    def config(self):
        return dict(pool_size=self.pool_size, stride=self.stride, impl=self.impl)

    def label(self):
        (ph, pw), (sh, sw) = self.pool_size, self.stride
        stride = "" if self.stride == self.pool_size else f" stride {sh}" if sh == sw else f" stride {sh}x{sw}"
        return f"{type(self).__name__} {ph}x{pw}{stride}"

    def forward(self, x, training=True):
        name = type(self).__name__
        check_input(x, name, "NCHW")
        if x.shape[2] < self.pool_size[0] or x.shape[3] < self.pool_size[1]:
            raise ValueError(f"{name}: input {x.shape} is smaller than the pool {self.pool_size}")
        out, cache = self.functions[self.impl].forward(x, self.pool_size, self.stride)
        self._cache = cache if training else None
        return out

    def backward(self, dout):
        return self.functions[self.impl].backward(dout, self._cached())


class MaxPool2D(_Pool2D):
    """Max pooling. x: (N, C, H, W) -> (N, C, OH, OW); stride defaults to pool_size."""
    functions = {"loop": Maths(maxpool_forward_loop, maxpool_backward_loop),
                 "vectorized": Maths(maxpool_forward_vectorized, maxpool_backward_vectorized)}


class AvgPool2D(_Pool2D):
    """Average pooling. x: (N, C, H, W) -> (N, C, OH, OW); stride defaults to pool_size."""
    functions = {"loop": Maths(avgpool_forward_loop, avgpool_backward_loop),
                 "vectorized": Maths(avgpool_forward_vectorized, avgpool_backward_vectorized)}


def _as_1d(forward_2d, backward_2d):
    """Turn 2-D conv functions into 1-D ones: (N, C, L) is (N, C, 1, L) and a
    length-k kernel is 1 x k, so the same loop and vectorized code serves both."""
    def forward(x, W, b, stride, padding, **scratch):
        out, cache = forward_2d(x[:, :, None, :], W[:, :, None, :], b, (1, stride), (0, padding), **scratch)
        return out[:, :, 0, :], cache

    def backward(dout, cache, input_grad=True, **scratch):
        dx, dW, db = backward_2d(dout[:, :, None, :], cache, input_grad, **scratch)
        return (None if dx is None else dx[:, :, 0, :]), np.ascontiguousarray(dW[:, :, 0, :]), db

    return Maths(forward, backward)


class Conv1D(ParamLayer):
    """1-D convolution over positions. x: (N, C_in, L) -> (N, C_out, OL).

    ``params["W"]``: (C_out, C_in, k), ``params["b"]``: (C_out,);
    out[n, f, i] = b[f] + sum_{c, q} W[f, c, q] * xp[n, c, i*s + q].
    """
    functions = {impl: _as_1d(*maths) for impl, maths in Conv2D.functions.items()}
    uses_workspace = True

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 impl="vectorized", init="he", seed=None, dtype=DEFAULT_DTYPE):
        for name, value, least in (("in_channels", in_channels, 1), ("out_channels", out_channels, 1),
                                   ("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                kind = "a positive integer" if least else "an integer >= 0"
                raise ValueError(f"Conv1D: {name} must be {kind}, got {value!r}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.padding = int(kernel_size), int(stride), int(padding)
        k = self.kernel_size
        super().__init__((out_channels, in_channels, k), in_channels * k, out_channels * k,
                         out_channels, impl, init, seed, dtype)

    def config(self):
        return dict(in_channels=self.in_channels, out_channels=self.out_channels,
                    kernel_size=self.kernel_size, stride=self.stride, padding=self.padding, impl=self.impl)

    def hyperparameters(self):
        return self.stride, self.padding

    def check(self, x):
        check_input(x, "Conv1D", "NCL", self.in_channels)
        if x.shape[2] + 2 * self.padding < self.kernel_size:
            raise ValueError(f"Conv1D: input length {x.shape[2]} with padding {self.padding} is smaller "
                             f"than the kernel ({self.kernel_size}); input shape {x.shape}")

    def label(self):
        extra = (f" stride {self.stride}" if self.stride != 1 else "") + (f" pad {self.padding}" if self.padding else "")
        return f"Conv1D {self.in_channels}->{self.out_channels} k{self.kernel_size}{extra}"


class _Pool1D(_Pool2D):
    """Pooling over positions of (N, C, L): the 2-D pooling with 1 x k windows."""

    def __init__(self, pool_size=2, stride=None, impl="vectorized"):
        super().__init__((1, pool_size), None if stride is None else (1, stride), impl)

    def config(self):
        return dict(pool_size=self.pool_size[1], stride=self.stride[1], impl=self.impl)

    def label(self):
        stride = "" if self.stride == self.pool_size else f" stride {self.stride[1]}"
        return f"{type(self).__name__} {self.pool_size[1]}{stride}"

    def forward(self, x, training=True):
        check_input(x, type(self).__name__, "NCL")
        return super().forward(x[:, :, None, :], training)[:, :, 0, :]

    def backward(self, dout):
        return super().backward(dout[:, :, None, :])[:, :, 0, :]


class MaxPool1D(_Pool1D):
    """Max pooling over positions. x: (N, C, L) -> (N, C, OL)."""
    functions = MaxPool2D.functions


class AvgPool1D(_Pool1D):
    """Average pooling over positions. x: (N, C, L) -> (N, C, OL)."""
    functions = AvgPool2D.functions


class BatchNorm(Layer):
    """Batch normalisation (Ioffe & Szegedy 2015) of each channel (axis 1) of
    (N, C), (N, C, L) or (N, C, H, W) inputs.

    Training normalises with the batch's statistics and keeps running averages
    (``buffers``) that evaluation uses instead, so a prediction does not depend
    on the rest of its batch. ``params``: gamma (scale) and beta (shift), (C,).
    """
    functions = {"loop": Maths(batchnorm_forward_loop, batchnorm_backward_loop),
                 "vectorized": Maths(batchnorm_forward_vectorized, batchnorm_backward_vectorized)}

    def __init__(self, num_channels, momentum=0.1, eps=1e-5, impl="vectorized", dtype=DEFAULT_DTYPE):
        super().__init__()
        if isinstance(num_channels, bool) or not isinstance(num_channels, (int, np.integer)) or num_channels < 1:
            raise ValueError(f"BatchNorm: num_channels must be a positive integer, got {num_channels!r}")
        self.num_channels, self.momentum, self.eps = int(num_channels), float(momentum), float(eps)
        self.impl = _check_impl(impl)
        self.params = {"gamma": np.ones(num_channels, dtype=dtype), "beta": np.zeros(num_channels, dtype=dtype)}
        self.buffers = {"running_mean": np.zeros(num_channels, dtype=dtype),
                        "running_var": np.ones(num_channels, dtype=dtype)}

    def config(self):
        return dict(num_channels=self.num_channels, momentum=self.momentum, eps=self.eps, impl=self.impl)

    def label(self):
        return f"BatchNorm {self.num_channels}"

    def forward(self, x, training=True):
        check_input(x, "BatchNorm", None, self.num_channels)
        x = x.astype(self.params["gamma"].dtype, copy=False)
        gamma, beta = self.params["gamma"], self.params["beta"]
        if not training:               # y = x * scale + shift per channel, on the (m, C) rows of x
            scale = self.inference_scale()
            return _from_rows(_scale_shift(as_rows(x), scale, beta - self.buffers["running_mean"] * scale), x)
        out, cache = self.functions[self.impl].forward(x, gamma, beta, self.eps)
        mean, var = cache.mean, cache.var
        m = x.size // x.shape[1]
        self.buffers["running_mean"] += self.momentum * (mean - self.buffers["running_mean"])
        # the running variance estimates the population's: unbiased, m / (m - 1)
        self.buffers["running_var"] += self.momentum * (var * (m / max(m - 1, 1)) - self.buffers["running_var"])
        self._cache = cache
        return out

    def inference_scale(self):
        """(C,) gamma / sqrt(running_var + eps): inference mode is y = x * scale + shift."""
        return self.params["gamma"] / np.sqrt(self.buffers["running_var"] + self.eps)

    def backward(self, dout, input_grad=True):
        dx, dgamma, dbeta = self.functions[self.impl].backward(dout, self._cached(), input_grad)
        self.grads = {"gamma": dgamma, "beta": dbeta}
        return dx


class Activation(Layer):
    """Elementwise activation y = f(x) with dx = dout * f'(x).

    A subclass gives ``f(x)`` and ``grad(x, y, dout)`` as NumPy expressions that
    work on arrays and on single numbers alike; ``impl="loop"`` applies them
    element by element, ``impl="vectorized"`` to the whole array at once.
    """

    def __init__(self, impl="vectorized"):
        super().__init__()
        self.impl = _check_impl(impl)

    def config(self):
        return dict(impl=self.impl)

    def forward(self, x, training=True):
        check_input(x, type(self).__name__)
        if self.impl == "loop":
            y = np.empty_like(x)
            for k in range(x.size):
                y.flat[k] = self.f(x.flat[k])
        else:
            y = self.f(x)
        self._cache = (x, y) if training else None
        return y

    def backward(self, dout):
        x, y = self._cached()
        if self.impl == "loop":
            dx = np.empty_like(dout)
            for k in range(dout.size):
                dx.flat[k] = self.grad(x.flat[k], y.flat[k], dout.flat[k])
            return dx
        return self.grad(x, y, dout)


class ReLU(Activation):
    """y = max(x, 0); dx = dout where x > 0, else 0."""
    def f(self, x):
        return np.maximum(x, 0)

    def grad(self, x, y, dout):
        return dout * (x > 0)                  # a boolean mask: far faster than np.where


class LeakyReLU(Activation):
    """y = x if x > 0 else alpha * x; dx = dout or alpha * dout."""

    def __init__(self, alpha=0.01, impl="vectorized"):
        super().__init__(impl)
        self.alpha = float(alpha)

    def config(self):
        return dict(alpha=self.alpha, impl=self.impl)

    def label(self):
        return f"LeakyReLU {self.alpha:g}"

    def f(self, x):
        return np.where(x > 0, x, self.alpha * x)

    def grad(self, x, y, dout):
        return np.where(x > 0, dout, self.alpha * dout)


class Sigmoid(Activation):
    """y = 1 / (1 + exp(-x)), computed as exp(-log(1 + exp(-x))) so it never overflows;
    dx = dout * y * (1 - y)."""
    def f(self, x):
        return np.exp(-np.logaddexp(0, -x))

    def grad(self, x, y, dout):
        return dout * y * (1 - y)


class Tanh(Activation):
    """y = tanh(x); dx = dout * (1 - y**2)."""
    def f(self, x):
        return np.tanh(x)

    def grad(self, x, y, dout):
        return dout * (1 - y * y)


class GELU(Activation):
    """Gaussian error linear unit (Hendrycks & Gimpel 2016), x * Phi(x), in its
    tanh form (NumPy has no erf): y = x/2 * (1 + tanh(u)), u = c * (x + a x^3),
    c = sqrt(2 / pi), a = 0.044715;
    dx = dout * (1/2 * (1 + tanh(u)) + x/2 * (1 - tanh(u)^2) * c * (1 + 3 a x^2)).
    A smooth ReLU: slightly negative for x < 0, with a gradient everywhere."""
    C, A = math.sqrt(2 / math.pi), 0.044715

    def f(self, x):
        return 0.5 * x * (1 + np.tanh(self.C * (x + self.A * x * x * x)))

    def grad(self, x, y, dout):
        t = np.tanh(self.C * (x + self.A * x * x * x))
        return dout * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * self.C * (1 + 3 * self.A * x * x))


class Scale(Activation):
    """y = s * x for a fixed number s; dx = s * dout.

    After the last layer it scales the logits, as airbench's ``Mul(1/9)``: the
    last layer's weights then have to grow s^-1 times larger for the same logits,
    so (under the same weight decay) the logits stay small and change slowly.
    """

    def __init__(self, s, impl="vectorized"):
        super().__init__(impl)
        if isinstance(s, bool) or not isinstance(s, (int, float, np.integer, np.floating)) \
                or not math.isfinite(s) or s == 0:
            raise ValueError(f"Scale: s must be a finite non-zero number, got {s!r}")
        self.s = float(s)

    def config(self):
        return dict(s=self.s, impl=self.impl)

    def label(self):
        return f"Scale {self.s:.4g}"

    def f(self, x):
        return self.s * x

    def grad(self, x, y, dout):
        return self.s * dout


class Flatten(Layer):
    """(N, d1, d2, ...) -> (N, d1*d2*...); backward restores the shape."""

    def forward(self, x, training=True):
        if not isinstance(x, np.ndarray) or x.ndim < 2 or x.shape[0] == 0:
            raise ValueError(f"Flatten: expected a non-empty batch of rank >= 2, "
                             f"got {getattr(x, 'shape', type(x).__name__)}")
        self._cache = x if training else None
        return x.reshape(x.shape[0], -1)

    def backward(self, dout):
        # Hand the gradient back in the memory order of the input (NHWC after
        # vectorized conv/pool layers) so the layers below never mix layouts.
        x = self._cached()
        dx = np.empty_like(x)
        dx[...] = dout.reshape(x.shape)
        return dx


class RowsToSequence(Layer):
    """Images as sequences of rows: (N, C, H, W) -> (N, W*C, H) for Conv1D
    (``layout="NCL"``) or (N, H, W*C) for a recurrent layer (``layout="NTD"``).

    Each of the H rows becomes one vector of its W pixels with the channels
    interleaved (``rows_as_sequence``: (N, H, W*C), for CIFAR (N, 32, 96)),
    handed on channels-first as Conv1D expects, or as (N, T, D), T = H steps
    of D = W*C values, as ``cnn_rnn.GRU`` expects. Only a reshuffle: backward
    puts the gradient back in place.
    """

    LAYOUTS = ("NCL", "NTD")

    def __init__(self, layout="NCL"):
        super().__init__()
        if layout not in self.LAYOUTS:
            raise ValueError(f"RowsToSequence: layout must be one of {self.LAYOUTS}, got {layout!r}")
        self.layout = layout

    def config(self):
        return dict(layout=self.layout)

    def forward(self, x, training=True):
        check_input(x, "RowsToSequence", "NCHW")
        self._cache = x.shape if training else None
        seq = rows_as_sequence(x)
        return seq if self.layout == "NTD" else seq.transpose(0, 2, 1)

    def backward(self, dout):
        N, C, H, W = self._cached()
        seq = dout if self.layout == "NTD" else dout.transpose(0, 2, 1)
        return seq.reshape(N, H, W, C).transpose(0, 3, 1, 2)


class Dropout(Layer):
    """Inverted dropout: in training, zero each value with probability p and scale
    the rest by 1 / (1 - p), so that evaluation needs no rescaling."""

    def __init__(self, p=0.5, seed=None):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"Dropout probability must be in [0, 1), got {p}")
        self.p = float(p)
        self.rng = np.random.default_rng(seed)

    def config(self):
        return dict(p=self.p)

    def label(self):
        return f"Dropout {self.p:g}"

    def forward(self, x, training=True):
        if not training or self.p == 0:
            self._cache = None if not training else np.ones((), dtype=x.dtype)
            return x
        mask = (self.rng.random(x.shape, dtype=np.float32) >= self.p).astype(x.dtype)
        mask /= 1 - self.p
        self._cache = mask
        return x * mask

    def backward(self, dout):
        return dout * self._cached()


def rows_as_sequence(x):
    """The row-sequence view of images: (N, C, H, W) -> (N, H, W*C).

    Row i becomes one vector of its W pixels with the channels interleaved
    (R, G, B, R, G, B, ...): a 32x32 RGB image is 32 vectors of length 96.
    Conv1D wants channels first, so a network reads ``seq.transpose(0, 2, 1)``,
    i.e. (N, 96, 32): 96 channels at 32 positions.
    """
    N, C, H, W = x.shape
    return x.transpose(0, 2, 3, 1).reshape(N, H, W * C)


# ---------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------

class SoftmaxCrossEntropy:
    """Mean cross-entropy of softmax(logits) against integer labels, with
    optional label smoothing (Szegedy et al. 2016).

    Targets t = (1 - eps) * onehot(y) + eps / K for K classes (``eps`` =
    ``label_smoothing``, in [0, 1)); loss = -(1/N) sum_n sum_k t[n, k] log p[n, k]
    with p = softmax(z), log p computed as z - max(z) - log(sum(exp(z - max(z))))
    so any logit size is safe. backward: dz = (p - t) / N.
    With eps = 0 (the default) t is the one-hot vector: loss = -(1/N) sum_n log p[n, y_n]
    and dz = (p - onehot(y)) / N, computed exactly as before label smoothing existed.
    """

    def __init__(self, label_smoothing=0.0):
        eps = label_smoothing
        if isinstance(eps, bool) or not isinstance(eps, (int, float, np.integer, np.floating)) \
                or not 0 <= eps < 1:
            raise ValueError(f"SoftmaxCrossEntropy: label_smoothing must be a number in [0, 1), got {eps!r}")
        self.label_smoothing = float(eps)
        self._cache = None

    def forward(self, logits, labels):
        check_input(logits, "SoftmaxCrossEntropy", "NK")
        labels = check_labels(labels, logits.shape[0], logits.shape[1], "SoftmaxCrossEntropy")
        z = logits - logits.max(axis=1, keepdims=True)
        log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        rows = np.arange(len(labels))
        self._cache = (log_probs, labels)
        if not self.label_smoothing:
            return float(-log_probs[rows, labels].mean())
        # sum_k t_k log p_k = (1 - eps) log p_y + (eps / K) sum_k log p_k
        eps, K = self.label_smoothing, logits.shape[1]
        return float(-((1 - eps) * log_probs[rows, labels] + eps / K * log_probs.sum(axis=1)).mean())

    def backward(self):
        if self._cache is None:
            raise RuntimeError("SoftmaxCrossEntropy: backward() called before forward()")
        log_probs, labels = self._cache
        dlogits = np.exp(log_probs)
        rows, eps = np.arange(len(labels)), self.label_smoothing
        if eps:                             # p - t = p - eps / K - (1 - eps) onehot
            dlogits -= eps / log_probs.shape[1]
            dlogits[rows, labels] -= 1 - eps
        else:
            dlogits[rows, labels] -= 1
        dlogits /= len(labels)
        return dlogits
