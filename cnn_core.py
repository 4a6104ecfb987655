"""A convolutional neural network written with NumPy only.

Read this file top to bottom:

1. input checks and the window helpers the spatial layers share,
2. the layer maths as plain functions, a *loop* version that mirrors the
   equation next to a *vectorized* version that is fast (convolution, max and
   average pooling, dense, batch normalisation),
3. layer classes (``forward``/``backward``/``params``/``grads``),
4. the loss, the ``Sequential`` model, network builders, optimisers and
   learning-rate schedules,
5. metrics, gradient checking, augmentation and the training loop.

Conventions
-----------
* Images are NCHW: ``x[n, c, h, w]``; sequences are NCL.
* Every ``*_forward_*`` function returns ``(out, cache)`` and every
  ``*_backward_*`` function takes ``(dout, cache)``; ``dout`` is the gradient
  of the loss with respect to ``out`` and has its shape.
* The vectorized layers keep activations in NHWC memory order behind the NCHW
  interface (see ``conv2d_forward_vectorized``); the results are the same,
  only faster.
* float32 by default. A layer computes in the dtype of its parameters and casts
  its input to it, so a float64 model (for gradient checks) stays float64 and
  a float32 model never silently upcasts.
* Only NumPy and the standard library are imported here; plotting lives in
  ``cnn_plots.py`` and data loading in ``cnn_data.py``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

DEFAULT_DTYPE = np.float32


# ---------------------------------------------------------------------------
# 1. Input checks and shared helpers
# ---------------------------------------------------------------------------

def _pair(value, name):
    """Return ``(a, b)`` from an int or a pair of ints, all >= 0."""
    pair = (value, value) if np.isscalar(value) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and v >= 0 for v in pair):
        raise ValueError(f"{name} must be a non-negative int or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def check_input(x, layer, layout=None, channels=None):
    """Raise a ``ValueError`` naming the problem unless ``x`` fits ``layout``.

    ``layout`` is a string such as ``"NCHW"``: its length is the expected rank
    (``None``: any rank >= 1, for elementwise layers).
    """
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{layer}: expected a NumPy array, got {type(x).__name__}")
    min_rank = 2 if channels is not None else 1       # a channel count needs axis 1
    if layout is None and x.ndim < min_rank:
        raise ValueError(f"{layer}: expected a batch of rank >= {min_rank}, got shape {x.shape}")
    if layout is not None and x.ndim != len(layout):
        raise ValueError(f"{layer}: expected a {len(layout)}-D input ({layout}), "
                         f"got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{layer}: received an empty batch, shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{layer}: expected floating-point input, got dtype {x.dtype}; "
                         "convert images first, e.g. x.astype(np.float32) / 255")
    if channels is not None and x.shape[1] != channels:
        what = "input features" if layout and layout[1] == "D" else "input channels"
        raise ValueError(f"{layer}: expected {channels} {what} ({layout}), "
                         f"got shape {x.shape}")


def output_size(size, kernel, stride, padding):
    """Length of a conv/pool output along one axis: floor((size + 2p - k) / s) + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def _pad(x, padding, axes=(2, 3)):
    """Zero-pad two spatial ``axes`` by ``padding = (ph, pw)`` on both sides."""
    ph, pw = padding
    if ph == pw == 0:
        return x
    shape, inner = list(x.shape), [slice(None)] * x.ndim
    for axis, p in zip(axes, padding):
        shape[axis] += 2 * p
        inner[axis] = slice(p, p + x.shape[axis])
    xp = np.zeros(shape, dtype=x.dtype)
    xp[tuple(inner)] = x
    return xp


def _offset(p, out_size, stride):
    """Input positions i*stride + p for i = 0..out_size-1, as a slice.

    Window offset (p, q) of a conv or pool with output (OH, OW) reads the
    strided slice ``x[..., _offset(p, OH, sh), _offset(q, OW, sw)]``: looping
    over the kh*kw offsets visits every window element with whole-array
    operations, the same trick for convolution and pooling, forward and backward.
    """
    return slice(p, p + stride * (out_size - 1) + 1, stride)


def _col2im(dcols, padded_shape, stride):
    """Add each window's gradient back to the pixels it was read from.

    dcols: (N, OH, OW, kh, kw, C) -> dxp: ``padded_shape`` (N, Hp, Wp, C).
    Offset (p, q) touches pixels (i*sh + p, j*sw + q), one strided slice, so kh*kw
    slice additions cover everything; overlapping windows add up, as the chain
    rule asks.
    """
    _, OH, OW, kh, kw, _ = dcols.shape
    sh, sw = stride
    dxp = np.zeros(padded_shape, dtype=dcols.dtype)
    for p in range(kh):
        for q in range(kw):
            dxp[:, _offset(p, OH, sh), _offset(q, OW, sw)] += dcols[:, :, :, p, q]
    return dxp


# ---------------------------------------------------------------------------
# 2. Layer maths: loop versions (readable) and vectorized versions (fast)
# ---------------------------------------------------------------------------
# Convolution (cross-correlation, as in every deep-learning library):
#   out[n, f, i, j] = b[f] + sum_{c, p, q} W[f, c, p, q] * xp[n, c, i*sh + p, j*sw + q]
# Backward, with g = dout:
#   db[f]            = sum_{n, i, j} g[n, f, i, j]
#   dW[f, c, p, q]   = sum_{n, i, j} g[n, f, i, j] * xp[n, c, i*sh + p, j*sw + q]
#   dxp[n, c, y, z]  = sum over (f, i, j, p, q) with i*sh + p = y, j*sw + q = z
#                      of g[n, f, i, j] * W[f, c, p, q]

def conv2d_forward_loop(x, W, b, stride=(1, 1), padding=(0, 0)):
    """x: (N, C, H, W), W: (F, C, kh, kw), b: (F,) -> out: (N, F, OH, OW)."""
    N, C, H, Wd = x.shape
    F, _, kh, kw = W.shape
    sh, sw = stride
    xp = _pad(x, padding)
    OH, OW = output_size(H, kh, sh, padding[0]), output_size(Wd, kw, sw, padding[1])
    out = np.empty((N, F, OH, OW), dtype=x.dtype)
    for n in range(N):
        for f in range(F):
            for i in range(OH):
                for j in range(OW):
                    window = xp[n, :, i * sh:i * sh + kh, j * sw:j * sw + kw]
                    out[n, f, i, j] = np.sum(window * W[f]) + b[f]
    return out, (x, W, stride, padding)


def conv2d_backward_loop(dout, cache, input_grad=True):
    """dout: (N, F, OH, OW) -> dx: (N, C, H, W), dW: (F, C, kh, kw), db: (F,).

    dx is None when ``input_grad`` is False (no layer below needs it).
    """
    x, W, (sh, sw), padding = cache
    N, F, OH, OW = dout.shape
    _, _, kh, kw = W.shape
    xp = _pad(x, padding)
    dxp, dW, db = np.zeros_like(xp), np.zeros_like(W), np.zeros(F, dtype=W.dtype)
    for n in range(N):
        for f in range(F):
            for i in range(OH):
                for j in range(OW):
                    g = dout[n, f, i, j]
                    rows, cols = slice(i * sh, i * sh + kh), slice(j * sw, j * sw + kw)
                    db[f] += g
                    dW[f] += g * xp[n, :, rows, cols]
                    if input_grad:
                        dxp[n, :, rows, cols] += g * W[f]
    ph, pw = padding
    return (dxp[:, :, ph:dxp.shape[2] - ph, pw:dxp.shape[3] - pw] if input_grad else None), dW, db


def conv2d_forward_vectorized(x, W, b, stride=(1, 1), padding=(0, 0)):
    """Same maths as the loop version as one matrix product (im2col).

    The work is done in NHWC memory order: every window becomes one row of
    ``cols`` (N*OH*OW, kh*kw*C) ordered (p, q, c), so each piece copied into it
    is a contiguous run of C channel values, and out = cols @ W_mat.T with W_mat
    = W reordered to (F, kh, kw, C). The result is returned as an (N, F, OH, OW)
    *view* of the NHWC product: no copy, and the next layers keep that order.
    """
    N, C, H, Wd = x.shape
    F, _, kh, kw = W.shape
    sh, sw = stride
    xp = _pad(x.transpose(0, 2, 3, 1), padding, axes=(1, 2))        # (N, Hp, Wp, C)
    win = sliding_window_view(xp, (kh, kw), axis=(1, 2))[:, ::sh, ::sw]   # (N, OH, OW, C, kh, kw)
    OH, OW = win.shape[1:3]
    cols = win.transpose(0, 1, 2, 4, 5, 3).reshape(N * OH * OW, kh * kw * C)
    W_mat = W.transpose(0, 2, 3, 1).reshape(F, kh * kw * C)
    out = cols @ W_mat.T
    out += b
    return out.reshape(N, OH, OW, F).transpose(0, 3, 1, 2), (xp.shape, cols, W_mat, W.shape, stride, padding)


def conv2d_backward_vectorized(dout, cache, input_grad=True):
    """dW = g.T @ cols, db = column sums of g, dx = col2im(g @ W_mat), where
    g = dout as an (N*OH*OW, F) matrix (free when dout is NHWC-ordered)."""
    padded_shape, cols, W_mat, w_shape, stride, (ph, pw) = cache
    N, F, OH, OW = dout.shape
    _, C, kh, kw = w_shape
    g = dout.transpose(0, 2, 3, 1).reshape(N * OH * OW, F)
    dW = np.ascontiguousarray((g.T @ cols).reshape(F, kh, kw, C).transpose(0, 3, 1, 2))
    db = g.sum(axis=0)
    if not input_grad:
        return None, dW, db
    dxp = _col2im((g @ W_mat).reshape(N, OH, OW, kh, kw, C), padded_shape, stride)
    Hp, Wp = padded_shape[1:3]
    return dxp[:, ph:Hp - ph, pw:Wp - pw].transpose(0, 3, 1, 2), dW, db


# Max pooling: out[n, c, i, j] = max_{p, q} x[n, c, i*sh + p, j*sw + q].
# Backward: the gradient flows only to the arg-max of each window (the first
# one on ties, the same rule in both versions); overlapping windows add up.

def maxpool_forward_loop(x, pool=(2, 2), stride=(2, 2)):
    """x: (N, C, H, W) -> out: (N, C, OH, OW); cache holds each window's arg-max."""
    N, C, H, Wd = x.shape
    (ph, pw), (sh, sw) = pool, stride
    OH, OW = output_size(H, ph, sh, 0), output_size(Wd, pw, sw, 0)
    out = np.empty((N, C, OH, OW), dtype=x.dtype)
    argmax = np.empty((N, C, OH, OW), dtype=np.intp)
    for n in range(N):
        for c in range(C):
            for i in range(OH):
                for j in range(OW):
                    window = x[n, c, i * sh:i * sh + ph, j * sw:j * sw + pw]
                    argmax[n, c, i, j] = np.argmax(window)
                    out[n, c, i, j] = window.flat[argmax[n, c, i, j]]
    return out, (x.shape, x.dtype, argmax, pool, stride)


def maxpool_backward_loop(dout, cache):
    """dout: (N, C, OH, OW) -> dx: (N, C, H, W)."""
    x_shape, dtype, argmax, (ph, pw), (sh, sw) = cache
    N, C, OH, OW = dout.shape
    dx = np.zeros(x_shape, dtype=dtype)
    for n in range(N):
        for c in range(C):
            for i in range(OH):
                for j in range(OW):
                    p, q = divmod(argmax[n, c, i, j], pw)
                    dx[n, c, i * sh + p, j * sw + q] += dout[n, c, i, j]
    return dx


def maxpool_forward_vectorized(x, pool=(2, 2), stride=(2, 2)):
    """Running maximum over the ph*pw window offsets, each a strided slice of x.
    Only the maximum is computed: the arg-max is found in the backward pass, so
    inference does not pay for it."""
    (ph, pw), (sh, sw) = pool, stride
    OH, OW = output_size(x.shape[2], ph, sh, 0), output_size(x.shape[3], pw, sw, 0)
    out = x[:, :, _offset(0, OH, sh), _offset(0, OW, sw)].copy(order="K")   # keep x's memory order
    for k in range(1, ph * pw):
        np.maximum(out, x[:, :, _offset(k // pw, OH, sh), _offset(k % pw, OW, sw)], out=out)
    return out, (x, out, pool, stride)


def maxpool_backward_vectorized(dout, cache):
    """Offset k's slice of dx receives dout where k is the window's arg-max.

    argmax = the smallest k whose slice equals the output (np.argmax's rule on
    ties), computed as min over k of (k if equal else K) with boolean arithmetic,
    which is several times faster than np.where.
    """
    x, out, (ph, pw), (sh, sw) = cache
    OH, OW = dout.shape[2:]
    K = ph * pw
    index = np.int8 if K < 127 else np.int32
    offsets = [(_offset(k // pw, OH, sh), _offset(k % pw, OW, sw)) for k in range(K)]
    argmax = np.full_like(out, K, dtype=index)
    for k, (rows, cols) in enumerate(offsets):
        np.minimum(argmax, K - (x[:, :, rows, cols] == out) * index(K - k), out=argmax)
    dx = np.zeros_like(x)                      # x's memory order, so the next backward stays fast
    overlapping = sh < ph or sw < pw
    for k, (rows, cols) in enumerate(offsets):
        if overlapping:                        # a pixel in several windows collects every share
            dx[:, :, rows, cols] += dout * (argmax == k)
        else:                                  # each pixel is in one window: write, don't add
            np.multiply(dout, argmax == k, out=dx[:, :, rows, cols])
    return dx


# Average pooling: out[n, c, i, j] = mean_{p, q} x[n, c, i*sh + p, j*sw + q];
# every pixel of a window receives dout / (ph * pw).

def avgpool_forward_loop(x, pool=(2, 2), stride=(2, 2)):
    """x: (N, C, H, W) -> out: (N, C, OH, OW)."""
    N, C, H, Wd = x.shape
    (ph, pw), (sh, sw) = pool, stride
    out = np.empty((N, C, output_size(H, ph, sh, 0), output_size(Wd, pw, sw, 0)), dtype=x.dtype)
    for n in range(N):
        for c in range(C):
            for i in range(out.shape[2]):
                for j in range(out.shape[3]):
                    out[n, c, i, j] = np.mean(x[n, c, i * sh:i * sh + ph, j * sw:j * sw + pw])
    return out, (x.shape, x.dtype, pool, stride)


def avgpool_backward_loop(dout, cache):
    """dout: (N, C, OH, OW) -> dx: (N, C, H, W)."""
    x_shape, dtype, (ph, pw), (sh, sw) = cache
    dx = np.zeros(x_shape, dtype=dtype)
    N, C, OH, OW = dout.shape
    for n in range(N):
        for c in range(C):
            for i in range(OH):
                for j in range(OW):
                    dx[n, c, i * sh:i * sh + ph, j * sw:j * sw + pw] += dout[n, c, i, j] / (ph * pw)
    return dx


def avgpool_forward_vectorized(x, pool=(2, 2), stride=(2, 2)):
    """Sum of the ph*pw offset slices, divided by ph*pw."""
    (ph, pw), (sh, sw) = pool, stride
    OH, OW = output_size(x.shape[2], ph, sh, 0), output_size(x.shape[3], pw, sw, 0)
    out = np.zeros(x.shape[:2] + (OH, OW), dtype=x.dtype)
    for p in range(ph):
        for q in range(pw):
            out += x[:, :, _offset(p, OH, sh), _offset(q, OW, sw)]
    out /= ph * pw
    return out, (x, pool, stride)


def avgpool_backward_vectorized(dout, cache):
    """Every offset's slice of dx receives dout / (ph*pw)."""
    x, (ph, pw), (sh, sw) = cache
    OH, OW = dout.shape[2:]
    share = dout / (ph * pw)
    dx = np.zeros_like(x)
    for p in range(ph):
        for q in range(pw):
            dx[:, :, _offset(p, OH, sh), _offset(q, OW, sw)] += share
    return dx


# Dense (fully connected): out[n, j] = b[j] + sum_i x[n, i] * W[i, j]
#   dW[i, j] = sum_n x[n, i] * g[n, j],  db[j] = sum_n g[n, j],  dx[n, i] = sum_j g[n, j] * W[i, j]

def dense_forward_loop(x, W, b):
    """x: (N, D), W: (D, M), b: (M,) -> out: (N, M)."""
    out = np.empty((x.shape[0], W.shape[1]), dtype=x.dtype)
    for n in range(x.shape[0]):
        for j in range(W.shape[1]):
            out[n, j] = b[j] + np.dot(x[n], W[:, j])
    return out, (x, W)


def dense_backward_loop(dout, cache, input_grad=True):
    """dout: (N, M) -> dx: (N, D) (None unless ``input_grad``), dW: (D, M), db: (M,)."""
    x, W = cache
    dx, dW, db = np.zeros_like(x), np.zeros_like(W), np.zeros(W.shape[1], dtype=W.dtype)
    for n in range(x.shape[0]):
        for j in range(W.shape[1]):
            g = dout[n, j]
            db[j] += g
            dW[:, j] += g * x[n]
            if input_grad:
                dx[n] += g * W[:, j]
    return (dx if input_grad else None), dW, db


def dense_forward_vectorized(x, W, b):
    """out = x @ W + b."""
    return x @ W + b, (x, W)


def dense_backward_vectorized(dout, cache, input_grad=True):
    """dx = dout @ W.T, dW = x.T @ dout, db = column sums of dout."""
    x, W = cache
    return (dout @ W.T if input_grad else None), x.T @ dout, dout.sum(axis=0)


# Batch normalisation, per channel c over the m values of every other axis:
#   mu_c = mean(x_c),  var_c = mean((x_c - mu_c)^2),  xhat = (x - mu_c) / sqrt(var_c + eps),
#   y = gamma_c * xhat + beta_c
# Backward, with g = dout (the mean and variance depend on x too):
#   dbeta_c = sum(g_c),  dgamma_c = sum(g_c * xhat_c),
#   dx = gamma_c / sqrt(var_c + eps) * (g - dbeta_c / m - xhat * dgamma_c / m)

def batchnorm_forward_loop(x, gamma, beta, eps=1e-5):
    """x: (N, C, ...) -> y: same shape, channel by channel with the batch's statistics."""
    y, xhat = np.empty_like(x), np.empty_like(x)
    mean, var = np.empty(x.shape[1], dtype=x.dtype), np.empty(x.shape[1], dtype=x.dtype)
    for c in range(x.shape[1]):
        xc = x[:, c]
        mean[c] = np.sum(xc) / xc.size
        var[c] = np.sum((xc - mean[c]) ** 2) / xc.size
        xhat[:, c] = (xc - mean[c]) / np.sqrt(var[c] + eps)
        y[:, c] = gamma[c] * xhat[:, c] + beta[c]
    return y, (xhat, gamma, var, eps, mean)


def batchnorm_backward_loop(dout, cache, input_grad=True):
    """dout: (N, C, ...) -> dx: same shape, dgamma: (C,), dbeta: (C,)."""
    xhat, gamma, var, eps, _ = cache
    dx, dgamma, dbeta = np.empty_like(dout), np.empty_like(gamma), np.empty_like(gamma)
    for c in range(dout.shape[1]):
        g, m = dout[:, c], dout[:, c].size
        dbeta[c] = np.sum(g)
        dgamma[c] = np.sum(g * xhat[:, c])
        dx[:, c] = gamma[c] / np.sqrt(var[c] + eps) * (g - dbeta[c] / m - xhat[:, c] * dgamma[c] / m)
    return (dx if input_grad else None), dgamma, dbeta


def _channel_axes(x):
    """Every axis but the channel axis 1, and the shape that broadcasts a (C,) vector."""
    return (0,) + tuple(range(2, x.ndim)), (1, -1) + (1,) * (x.ndim - 2)


def batchnorm_forward_vectorized(x, gamma, beta, eps=1e-5):
    """Per-channel mean and variance as reductions over all other axes at once."""
    axes, shape = _channel_axes(x)
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    xhat = (x - mean) / np.sqrt(var + eps)
    return gamma.reshape(shape) * xhat + beta.reshape(shape), (xhat, gamma, var.ravel(), eps, mean.ravel())


def batchnorm_backward_vectorized(dout, cache, input_grad=True):
    """The loop version's three lines with sums over all non-channel axes."""
    xhat, gamma, var, eps, _ = cache
    axes, shape = _channel_axes(dout)
    m = dout.size // dout.shape[1]
    dbeta, dgamma = dout.sum(axis=axes), (dout * xhat).sum(axis=axes)
    if not input_grad:
        return None, dgamma, dbeta
    scale = (gamma / np.sqrt(var + eps)).reshape(shape)
    return scale * (dout - (dbeta / m).reshape(shape) - xhat * (dgamma / m).reshape(shape)), dgamma, dbeta


# ---------------------------------------------------------------------------
# 3. Layers
# ---------------------------------------------------------------------------

LAYER_TYPES = {}          # class name -> class, so that a saved model can be rebuilt


class Layer:
    """Base class. ``forward(x, training=True) -> out``, ``backward(dout) -> dx``.

    ``params`` maps names to arrays; ``backward`` fills ``grads`` with the same
    keys and shapes. ``buffers`` holds state that is saved but not trained
    (batch-norm running statistics). ``config()`` returns the constructor
    arguments (used by ``Sequential.save``).
    """

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

    def _cached(self):
        if self._cache is None:
            raise RuntimeError(f"{self!r}: backward() called before forward(training=True)")
        return self._cache


IMPLS = ("loop", "vectorized")


def _check_impl(impl):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


class ParamLayer(Layer):
    """A layer with weights ``W`` and bias ``b``, initialised He or Glorot.

    ``fan_in``/``fan_out`` count the inputs and outputs each weight connects.
    He (normal, std sqrt(2 / fan_in)) keeps the activation variance constant
    through ReLUs; Glorot (uniform, limit sqrt(6 / (fan_in + fan_out))) does so
    for symmetric activations and for the last layer before the softmax.
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
        else:
            raise ValueError(f"init must be 'he' or 'glorot', got {scheme!r}")
        self.params["b"][...] = 0

    @property
    def dtype(self):
        return self.params["W"].dtype

    functions = {}        # impl -> (forward, backward), given by each subclass

    def check(self, x):
        """Raise ValueError unless x is a valid input (each subclass says what that is)."""

    def hyperparameters(self):
        """Extra arguments of the forward function after (x, W, b)."""
        return ()

    def forward(self, x, training=True):
        self.check(x)
        out, cache = self.functions[self.impl][0](x.astype(self.dtype, copy=False), self.params["W"],
                                                  self.params["b"], *self.hyperparameters())
        self._cache = cache if training else None
        return out

    def backward(self, dout, input_grad=True):
        """Fill ``grads`` and return dx (None when ``input_grad`` is False)."""
        dx, dW, db = self.functions[self.impl][1](dout, self._cached(), input_grad)
        self.grads = {"W": dW, "b": db}
        return dx


class Conv2D(ParamLayer):
    """2-D convolution. x: (N, C_in, H, W) -> (N, C_out, OH, OW).

    ``params["W"]``: (C_out, C_in, kh, kw), ``params["b"]``: (C_out,).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 impl="vectorized", init="he", seed=None, dtype=DEFAULT_DTYPE):
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        if self.in_channels < 1 or self.out_channels < 1:
            raise ValueError(f"Conv2D channels must be >= 1, got {in_channels}, {out_channels}")
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

    functions = {"loop": (conv2d_forward_loop, conv2d_backward_loop),
                 "vectorized": (conv2d_forward_vectorized, conv2d_backward_vectorized)}

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
        self.in_features, self.out_features = int(in_features), int(out_features)
        if self.in_features < 1 or self.out_features < 1:
            raise ValueError(f"Dense sizes must be >= 1, got {in_features}, {out_features}")
        super().__init__((in_features, out_features), in_features, out_features, out_features,
                         impl, init, seed, dtype)

    def config(self):
        return dict(in_features=self.in_features, out_features=self.out_features, impl=self.impl)

    functions = {"loop": (dense_forward_loop, dense_backward_loop),
                 "vectorized": (dense_forward_vectorized, dense_backward_vectorized)}

    def check(self, x):
        check_input(x, "Dense", "ND", self.in_features)

    def label(self):
        return f"Dense {self.in_features}->{self.out_features}"


class _Pool2D(Layer):
    """Shared plumbing of the pooling layers; subclasses name their functions."""
    functions = {}        # impl -> (forward, backward)

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
        out, cache = self.functions[self.impl][0](x, self.pool_size, self.stride)
        self._cache = cache if training else None
        return out

    def backward(self, dout):
        return self.functions[self.impl][1](dout, self._cached())


class MaxPool2D(_Pool2D):
    """Max pooling. x: (N, C, H, W) -> (N, C, OH, OW); stride defaults to pool_size."""
    functions = {"loop": (maxpool_forward_loop, maxpool_backward_loop),
                 "vectorized": (maxpool_forward_vectorized, maxpool_backward_vectorized)}


class AvgPool2D(_Pool2D):
    """Average pooling. x: (N, C, H, W) -> (N, C, OH, OW); stride defaults to pool_size."""
    functions = {"loop": (avgpool_forward_loop, avgpool_backward_loop),
                 "vectorized": (avgpool_forward_vectorized, avgpool_backward_vectorized)}


def _as_1d(forward_2d, backward_2d):
    """Turn 2-D conv functions into 1-D ones: (N, C, L) is (N, C, 1, L) and a
    length-k kernel is 1 x k, so the same loop and vectorized code serves both."""
    def forward(x, W, b, stride, padding):
        out, cache = forward_2d(x[:, :, None, :], W[:, :, None, :], b, (1, stride), (0, padding))
        return out[:, :, 0, :], cache

    def backward(dout, cache, input_grad=True):
        dx, dW, db = backward_2d(dout[:, :, None, :], cache, input_grad)
        return (None if dx is None else dx[:, :, 0, :]), np.ascontiguousarray(dW[:, :, 0, :]), db

    return forward, backward


class Conv1D(ParamLayer):
    """1-D convolution over positions. x: (N, C_in, L) -> (N, C_out, OL).

    ``params["W"]``: (C_out, C_in, k), ``params["b"]``: (C_out,);
    out[n, f, i] = b[f] + sum_{c, q} W[f, c, q] * xp[n, c, i*s + q].
    """
    functions = {impl: _as_1d(*fns) for impl, fns in Conv2D.functions.items()}

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 impl="vectorized", init="he", seed=None, dtype=DEFAULT_DTYPE):
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.padding = int(kernel_size), int(stride), int(padding)
        if min(self.in_channels, self.out_channels, self.kernel_size, self.stride) < 1 or self.padding < 0:
            raise ValueError(f"Conv1D: need channels, kernel_size, stride >= 1 and padding >= 0, got "
                             f"{in_channels}, {out_channels}, {kernel_size}, {stride}, {padding}")
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
    functions = {"loop": (batchnorm_forward_loop, batchnorm_backward_loop),
                 "vectorized": (batchnorm_forward_vectorized, batchnorm_backward_vectorized)}

    def __init__(self, num_channels, momentum=0.1, eps=1e-5, impl="vectorized", dtype=DEFAULT_DTYPE):
        super().__init__()
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
        if not training:
            _, shape = _channel_axes(x)
            scale = gamma / np.sqrt(self.buffers["running_var"] + self.eps)
            return x * scale.reshape(shape) + (beta - self.buffers["running_mean"] * scale).reshape(shape)
        out, cache = self.functions[self.impl][0](x, gamma, beta, self.eps)
        _, _, var, _, mean = cache
        m = x.size // x.shape[1]
        self.buffers["running_mean"] += self.momentum * (mean - self.buffers["running_mean"])
        # the running variance estimates the population's: unbiased, m / (m - 1)
        self.buffers["running_var"] += self.momentum * (var * (m / max(m - 1, 1)) - self.buffers["running_var"])
        self._cache = cache
        return out

    def backward(self, dout, input_grad=True):
        dx, dgamma, dbeta = self.functions[self.impl][1](dout, self._cached(), input_grad)
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
    """Images as sequences of rows, for Conv1D: (N, C, H, W) -> (N, W*C, H).

    Each of the H rows becomes one vector of its W pixels with the channels
    interleaved (``rows_as_sequence``: (N, H, W*C), for CIFAR (N, 32, 96)),
    handed on channels-first as Conv1D expects. Only a reshuffle: backward
    puts the gradient back in place.
    """

    def forward(self, x, training=True):
        check_input(x, "RowsToSequence", "NCHW")
        self._cache = x.shape if training else None
        return rows_as_sequence(x).transpose(0, 2, 1)

    def backward(self, dout):
        N, C, H, W = self._cached()
        return dout.transpose(0, 2, 1).reshape(N, H, W, C).transpose(0, 3, 1, 2)


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


# ---------------------------------------------------------------------------
# 4. Loss, model, optimisers, schedules
# ---------------------------------------------------------------------------

def softmax(logits):
    """Row-wise softmax of (N, K) logits; subtracting the row maximum avoids overflow."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def check_labels(labels, n, num_classes, where):
    """Raise a ``ValueError`` unless ``labels`` are n integers in 0..num_classes-1."""
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"{where}: expected labels of shape ({n},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{where}: labels must lie in 0..{num_classes - 1}, "
                         f"got values from {labels.min()} to {labels.max()}")
    return labels


class SoftmaxCrossEntropy:
    """Mean cross-entropy of softmax(logits) against integer labels.

    loss = -(1/N) sum_n log softmax(z_n)[y_n], with log softmax computed as
    z - max(z) - log(sum(exp(z - max(z)))) so any logit size is safe.
    backward: dz = (softmax(z) - onehot(y)) / N.
    """

    def __init__(self):
        self._cache = None

    def forward(self, logits, labels):
        check_input(logits, "SoftmaxCrossEntropy", "NK")
        labels = check_labels(labels, logits.shape[0], logits.shape[1], "SoftmaxCrossEntropy")
        z = logits - logits.max(axis=1, keepdims=True)
        log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        rows = np.arange(len(labels))
        self._cache = (log_probs, labels)
        return float(-log_probs[rows, labels].mean())

    def backward(self):
        if self._cache is None:
            raise RuntimeError("SoftmaxCrossEntropy: backward() called before forward()")
        log_probs, labels = self._cache
        dlogits = np.exp(log_probs)
        dlogits[np.arange(len(labels)), labels] -= 1
        dlogits /= len(labels)
        return dlogits


class Sequential:
    """A stack of layers applied in order.

    With an int ``seed`` every ``ParamLayer`` is (re)initialised from one
    generator: He when the next activation is a ReLU or LeakyReLU, Glorot
    otherwise (Sigmoid, Tanh, or the output layer); every ``Dropout`` gets its
    own stream of the same seed. ``seed=None`` keeps the layers as they are.
    """

    def __init__(self, layers, seed=0):
        self.layers = list(layers)
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, Layer):
                raise ValueError(f"Sequential: item {i} is not a Layer: {layer!r}")
        if seed is not None:
            self.initialize(seed)

    def initialize(self, seed):
        rng = np.random.default_rng(seed)
        for i, layer in enumerate(self.layers):
            if isinstance(layer, ParamLayer):
                layer.initialize(rng, self._init_scheme(i))
            elif isinstance(layer, Dropout):
                layer.rng = np.random.default_rng([seed, i])

    def _init_scheme(self, index):
        for layer in self.layers[index + 1:]:
            if isinstance(layer, ParamLayer):
                break
            if isinstance(layer, Activation):
                return "he" if isinstance(layer, (ReLU, LeakyReLU)) else "glorot"
        return "glorot"

    def forward(self, x, training=True):
        for layer in self.layers:
            x = layer.forward(x, training)
        return x

    def backward(self, dout, input_grad=True):
        """Backpropagate dout (the gradient of the loss w.r.t. the output) through
        every layer, filling their ``grads``; return the gradient w.r.t. the input.

        Training needs no input gradient: with ``input_grad=False`` a first layer
        with parameters skips it (one product and a col2im fewer) and None is returned.
        """
        for layer in reversed(self.layers[1:]):
            dout = layer.backward(dout)
        first = self.layers[0]
        return first.backward(dout, input_grad=False) if not input_grad and isinstance(first, ParamLayer) \
            else first.backward(dout)

    def parameters(self):
        """Yield ``(key, param, grad)`` for every parameter; key is 'layer_index.name'."""
        for i, layer in enumerate(self.layers):
            for name, param in layer.params.items():
                yield f"{i}.{name}", param, layer.grads.get(name)

    @property
    def dtype(self):
        for _, param, _ in self.parameters():
            return param.dtype
        return np.dtype(DEFAULT_DTYPE)

    def astype(self, dtype):
        """Cast every parameter to ``dtype`` in place (e.g. float64 for gradient checks)."""
        for layer in self.layers:
            layer.params = {k: v.astype(dtype) for k, v in layer.params.items()}
            layer.buffers = {k: v.astype(dtype) for k, v in layer.buffers.items()}
            layer.grads = {}
        return self

    def set_impl(self, impl):
        """Switch every layer that has one to ``impl`` ("loop" or "vectorized")."""
        _check_impl(impl)
        for layer in self.layers:
            if hasattr(layer, "impl"):
                layer.impl = impl
        return self

    def predict_proba(self, x, batch_size=64):
        """Class probabilities (N, K), computed in batches: small batches keep each
        layer's im2col matrix in cache (64 measured fastest on a 2-core CPU)."""
        if len(x) == 0:
            raise ValueError(f"predict: received an empty batch, shape {np.shape(x)}")
        return np.concatenate([softmax(self.forward(x[i:i + batch_size], training=False))
                               for i in range(0, len(x), batch_size)])

    def predict(self, x, batch_size=64):
        """Predicted class indices (N,)."""
        return self.predict_proba(x, batch_size).argmax(axis=1)

    def summary(self, input_shape):
        """A table of each layer's output shape and parameter count.

        ``input_shape`` is one example's shape, e.g. (1, 28, 28).
        """
        x = np.zeros((1,) + tuple(input_shape), dtype=self.dtype)
        rows, total = [("input", str(tuple(input_shape)), "")], 0
        for layer in self.layers:
            x = layer.forward(x, training=False)
            count = sum(p.size for p in layer.params.values())
            total += count
            rows.append((layer.label(), str(x.shape[1:]), f"{count:,}" if count else ""))
        widths = [max(len(r[k]) for r in rows) for k in range(3)]
        lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}" for r in rows]
        rule = "-" * len(lines[0])
        return "\n".join([rule, *lines, rule, f"total parameters: {total:,}"])

    def state_arrays(self):
        """The architecture (as JSON) and every parameter, as a dict of arrays."""
        architecture = [{"type": type(layer).__name__, "config": layer.config()}
                        for layer in self.layers]
        arrays = {"architecture": np.array(json.dumps(architecture))}
        arrays.update({f"param.{key}": param for key, param, _ in self.parameters()})
        arrays.update({f"buffer.{i}.{name}": buf for i, layer in enumerate(self.layers)
                       for name, buf in layer.buffers.items()})
        return arrays

    def save(self, path):
        """Write architecture and weights to one ``.npz`` file, atomically."""
        save_npz(path, self.state_arrays())

    @classmethod
    def from_arrays(cls, arrays):
        try:
            architecture = json.loads(str(arrays["architecture"]))
            layers = [LAYER_TYPES[spec["type"]](**spec["config"]) for spec in architecture]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not a saved Sequential model (bad architecture record: {err})") from err
        model = cls(layers, seed=None)
        for key, param, _ in model.parameters():
            name = f"param.{key}"
            if name not in arrays or arrays[name].shape != param.shape:
                found = arrays[name].shape if name in arrays else "nothing"
                raise ValueError(f"saved model: expected {name} of shape {param.shape}, found {found}")
        for i, layer in enumerate(model.layers):
            layer.params = {k: np.array(arrays[f"param.{i}.{k}"]) for k in layer.params}
            layer.buffers = {k: np.array(arrays.get(f"buffer.{i}.{k}", v)) for k, v in layer.buffers.items()}
        return model

    @classmethod
    def load(cls, path):
        """Rebuild a model written by ``save``."""
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = dict(data)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path}: not a readable .npz model file ({err}); "
                             "save the model again") from err
        return cls.from_arrays(arrays)


def conv_net(in_channels=1, input_size=28, channels=(32, 64), kernel_size=3, convs_per_block=1,
             batchnorm=False, hidden=128, dropout=0.25, num_classes=10, dims=2, impl="vectorized",
             seed=0, dtype=DEFAULT_DTYPE):
    """A plain CNN: one block per entry of ``channels``, each
    ``convs_per_block`` x (conv with 'same' padding -> [BatchNorm] -> ReLU) and a
    2x2 max pool that halves the size; then flatten -> [dense ``hidden`` -> ReLU]
    -> dropout -> dense to ``num_classes`` logits.

    ``dims=2`` for images (N, C, H, W); ``dims=1`` for sequences (N, C, L) with
    Conv1D/MaxPool1D. ``hidden=0`` leaves out the hidden dense layer.
    """
    conv, pool = (Conv2D, MaxPool2D) if dims == 2 else (Conv1D, MaxPool1D)
    layers, c_in, size = [], in_channels, input_size
    for c_out in channels:
        for _ in range(convs_per_block):
            layers.append(conv(c_in, c_out, kernel_size, padding=kernel_size // 2, impl=impl, dtype=dtype))
            layers += [BatchNorm(c_out, impl=impl, dtype=dtype)] if batchnorm else []
            layers.append(ReLU(impl=impl))
            c_in = c_out
        layers.append(pool(2, impl=impl))
        size //= 2
    features = c_in * size ** dims
    layers.append(Flatten())
    if hidden:
        layers += [Dense(features, hidden, impl=impl, dtype=dtype), ReLU(impl=impl)]
        features = hidden
    layers += [Dropout(dropout), Dense(features, num_classes, impl=impl, dtype=dtype)]
    return Sequential(layers, seed=seed)


def mnist_cnn(**overrides):
    """The default network: conv 1->32 3x3 -> ReLU -> pool -> conv 32->64 3x3 ->
    ReLU -> pool -> dense 3136->128 -> ReLU -> dropout 0.25 -> dense 128->10
    (``conv_net``'s defaults; keyword arguments override them)."""
    return conv_net(**overrides)


def rows_as_sequence(x):
    """The row-sequence view of images: (N, C, H, W) -> (N, H, W*C).

    Row i becomes one vector of its W pixels with the channels interleaved
    (R, G, B, R, G, B, ...): a 32x32 RGB image is 32 vectors of length 96.
    Conv1D wants channels first, so a network reads ``seq.transpose(0, 2, 1)``,
    i.e. (N, 96, 32): 96 channels at 32 positions.
    """
    N, C, H, W = x.shape
    return x.transpose(0, 2, 3, 1).reshape(N, H, W * C)


@contextlib.contextmanager
def atomic_write(path, check=None):
    """Write a file so that ``path`` is never left half-written.

    Yields a binary file in the same folder; when the block succeeds (and
    ``check(temporary_path)``, if given, does not raise) the file is renamed to
    ``path`` with ``os.replace``, which is atomic; otherwise it is deleted. A
    crash therefore leaves the old file or none, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        if check is not None:
            check(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp's file is private; the result need not be
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_npz(path, arrays):
    """``np.savez`` of ``arrays`` to ``path`` through ``atomic_write``."""
    with atomic_write(path) as f:
        np.savez(f, **arrays)


class Optimizer:
    """Updates parameters in place from ``model.parameters()``.

    Weight decay applies to weights ``W`` only (not biases): shrinking biases
    does not reduce overfitting and can hurt.
    """

    def __init__(self, lr, weight_decay=0.0):
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got {lr}, {weight_decay}")
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.state = {}            # per-parameter buffers, keyed like model.parameters()
        self.steps = 0

    def step(self, model):
        self.steps += 1
        for key, param, grad in model.parameters():
            if grad is None:
                raise RuntimeError(f"{type(self).__name__}: no gradient for {key}; call backward() first")
            self.update(key, param, grad, decay=self.weight_decay if key.endswith(".W") else 0.0)

    def state_arrays(self):
        arrays = {f"opt.{name}.{key}": buf for name, bufs in self.state.items() for key, buf in bufs.items()}
        arrays["opt.steps"] = np.array(self.steps)
        return arrays

    def load_state_arrays(self, arrays):
        self.steps = int(arrays["opt.steps"])
        self.state = {}
        for name, value in arrays.items():
            if name.startswith("opt.") and name != "opt.steps":
                _, buf, key = name.split(".", 2)
                self.state.setdefault(buf, {})[key] = np.array(value)

    def _buffer(self, name, key, like):
        bufs = self.state.setdefault(name, {})
        if key not in bufs:
            bufs[key] = np.zeros_like(like)
        return bufs[key]


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum.

    g = grad + wd * W;  v = mu * v - lr * g;  W += v  (Nesterov: W += mu * v - lr * g).
    """

    def __init__(self, lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(lr, weight_decay)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum == 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)

    def update(self, key, param, grad, decay):
        g = grad + decay * param if decay else grad
        if self.momentum == 0:
            param -= self.lr * g
            return
        v = self._buffer("velocity", key, param)
        v *= self.momentum
        v -= self.lr * g
        param += self.momentum * v - self.lr * g if self.nesterov else v


class Adam(Optimizer):
    """Adam (Kingma & Ba) with decoupled weight decay (AdamW, Loshchilov & Hutter).

    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
    W -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + lr * wd * W.
    """

    def __init__(self, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        super().__init__(lr, weight_decay)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)

    def update(self, key, param, grad, decay):
        m, v = self._buffer("m", key, param), self._buffer("v", key, param)
        m *= self.beta1
        m += (1 - self.beta1) * grad
        v *= self.beta2
        v += (1 - self.beta2) * grad * grad
        m_hat_scale = 1 / (1 - self.beta1 ** self.steps)
        v_hat_scale = 1 / (1 - self.beta2 ** self.steps)
        if decay:
            param -= self.lr * decay * param
        param -= self.lr * m_hat_scale * m / (np.sqrt(v * v_hat_scale) + self.eps)


def step_schedule(lr, step_size, gamma=0.1):
    """Learning rate for epoch e (0-based): lr * gamma ** (e // step_size)."""
    return lambda epoch: lr * gamma ** (epoch // step_size)


def cosine_schedule(lr, epochs, lr_min=0.0):
    """Learning rate for epoch e: lr_min + (lr - lr_min) * (1 + cos(pi * e / epochs)) / 2."""
    return lambda epoch: lr_min + (lr - lr_min) * 0.5 * (1 + math.cos(math.pi * epoch / epochs))


# ---------------------------------------------------------------------------
# 5. Metrics and training
# ---------------------------------------------------------------------------

def _check_predictions(y_true, y_pred, num_classes):
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.ndim != 1 or y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred must be 1-D of equal length, got {y_true.shape} and {y_pred.shape}")
    if num_classes is None:
        num_classes = int(max(y_true.max(initial=-1), y_pred.max(initial=-1))) + 1
    check_labels(y_true, len(y_true), num_classes, "y_true")
    check_labels(y_pred, len(y_pred), num_classes, "y_pred")
    return y_true, y_pred, num_classes


def accuracy(y_true, y_pred):
    """Fraction of predictions equal to the labels."""
    y_true, y_pred, _ = _check_predictions(y_true, y_pred, None)
    if len(y_true) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float(np.mean(y_true == y_pred))


def confusion_matrix(y_true, y_pred, num_classes=None):
    """(K, K) counts: row = true class, column = predicted class."""
    y_true, y_pred, k = _check_predictions(y_true, y_pred, num_classes)
    return np.bincount(k * y_true + y_pred, minlength=k * k).reshape(k, k)


def _safe_divide(a, b):
    """a / b with 0 where b == 0 (a class never predicted has precision 0, not NaN)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return np.divide(a, b, out=np.zeros_like(a), where=b != 0)


def classification_report(y_true, y_pred, num_classes=None, class_names=None):
    """Per-class precision, recall, F1 and support, with macro and weighted averages.

    precision_k = TP_k / (TP_k + FP_k) = C[k, k] / column sum k
    recall_k    = TP_k / (TP_k + FN_k) = C[k, k] / row sum k
    F1_k        = 2 P R / (P + R)
    A class with no predictions (or no examples) scores 0 instead of dividing by 0.
    Returns a dict: ``precision``, ``recall``, ``f1``, ``support`` (arrays of K),
    ``macro`` and ``weighted`` (dicts of P/R/F1), ``accuracy``, ``confusion``
    and ``class_names``.
    """
    if num_classes is None and class_names is not None:
        num_classes = len(class_names)     # a class may be absent from a small sample
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp, predicted, support = np.diag(cm), cm.sum(axis=0), cm.sum(axis=1)
    precision, recall = _safe_divide(tp, predicted), _safe_divide(tp, support)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    weights = _safe_divide(support, support.sum())
    names = list(class_names) if class_names is not None else [str(k) for k in range(len(cm))]
    if len(names) != len(cm):
        raise ValueError(f"class_names has {len(names)} entries for {len(cm)} classes")
    return {
        "precision": precision, "recall": recall, "f1": f1, "support": support,
        "macro": {"precision": precision.mean(), "recall": recall.mean(), "f1": f1.mean()},
        "weighted": {"precision": weights @ precision, "recall": weights @ recall, "f1": weights @ f1},
        "accuracy": float(tp.sum() / max(cm.sum(), 1)), "confusion": cm, "class_names": names,
    }


def format_report(report, digits=4):
    """The classification report as a text table."""
    names = report["class_names"]
    w = max(12, *(len(n) for n in names))
    lines = [f"{'class':<{w}} {'precision':>10} {'recall':>10} {'f1':>10} {'support':>8}"]
    for k, name in enumerate(names):
        lines.append(f"{name:<{w}} {report['precision'][k]:>10.{digits}f} {report['recall'][k]:>10.{digits}f} "
                     f"{report['f1'][k]:>10.{digits}f} {report['support'][k]:>8d}")
    total = int(report["support"].sum())
    for avg in ("macro", "weighted"):
        r = report[avg]
        lines.append(f"{avg + ' avg':<{w}} {r['precision']:>10.{digits}f} {r['recall']:>10.{digits}f} "
                     f"{r['f1']:>10.{digits}f} {total:>8d}")
    lines.append(f"{'accuracy':<{w}} {report['accuracy']:>32.{digits}f} {total:>8d}")
    return "\n".join(lines)


def evaluate(model, x, y, batch_size=64):
    """Mean cross-entropy and accuracy of ``model`` on (x, y), in batches."""
    loss_fn, total_loss, correct = SoftmaxCrossEntropy(), 0.0, 0
    for i in range(0, len(x), batch_size):
        logits = model.forward(x[i:i + batch_size], training=False)
        yb = y[i:i + batch_size]
        total_loss += loss_fn.forward(logits, yb) * len(yb)
        correct += int((logits.argmax(axis=1) == yb).sum())
    return total_loss / len(x), correct / len(x)


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


def random_crop(x, rng, padding):
    """Shift each image by up to ``padding`` pixels: zero-pad, then cut a random
    (H, W) window per image. x: (N, C, H, W) -> (N, C, H, W)."""
    N, _, H, W = x.shape
    xp = _pad(x, (padding, padding))
    windows = sliding_window_view(xp, (H, W), axis=(2, 3))           # (N, C, 2p+1, 2p+1, H, W)
    dy, dx = rng.integers(0, 2 * padding + 1, size=(2, N))
    return windows[np.arange(N), :, dy, dx]


def random_flip(x, rng):
    """Mirror a random half of the images left-right. x: (N, C, H, W)."""
    flip = rng.random(len(x)) < 0.5
    out = x.copy()
    out[flip] = x[flip, :, :, ::-1]
    return out


def augmentation(crop=0, flip=False):
    """An ``augment(x, rng)`` for ``fit``: random shifts of up to ``crop`` pixels
    and, if ``flip``, random horizontal mirroring (not for digits: a mirrored 2 is no 2)."""
    def augment(x, rng):
        if crop:
            x = random_crop(x, rng, crop)
        return random_flip(x, rng) if flip else x
    return augment


@dataclass
class History:
    """Per-epoch record of a training run (lists of floats, one entry per epoch)."""
    train_loss: list = field(default_factory=list)
    train_acc: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    val_acc: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    seconds: list = field(default_factory=list)

    def as_dict(self):
        return asdict(self)


class TextProgress:
    """A one-line progress bar on stdout with no dependency, used by ``fit`` by
    default; any tqdm-like wrapper (e.g. ``tqdm.auto.tqdm``) can replace it."""

    def __init__(self, iterable, desc="", **_):
        self.iterable, self.desc, self.postfix = iterable, desc, ""

    def set_postfix(self, **values):
        self.postfix = " ".join(f"{k} {v}" for k, v in values.items())

    def __iter__(self):
        total = len(self.iterable)
        line = ""
        for done, item in enumerate(self.iterable, 1):
            yield item
            if done % max(1, total // 50) == 0 or done == total:
                line = f"{self.desc} [{'#' * (20 * done // total):<20}] {done}/{total} {self.postfix}"
                print("\r" + line, end="", file=sys.stdout, flush=True)
        print("\r" + " " * len(line) + "\r", end="", file=sys.stdout, flush=True)


def _checkpoint_arrays(model, optimizer, history, epoch, rng):
    arrays = model.state_arrays()
    arrays.update(optimizer.state_arrays())
    dropout_rngs = {str(i): layer.rng.bit_generator.state
                    for i, layer in enumerate(model.layers) if isinstance(layer, Dropout)}
    arrays["training"] = np.array(json.dumps({
        "epoch": epoch, "history": history.as_dict(), "rng": rng.bit_generator.state,
        "dropout_rngs": dropout_rngs}))
    return arrays


def _restore_checkpoint(path, model, optimizer, rng):
    with np.load(path, allow_pickle=False) as data:
        arrays = dict(data)
    saved = Sequential.from_arrays(arrays)
    if [repr(layer) for layer in saved.layers] != [repr(layer) for layer in model.layers]:
        raise ValueError(f"checkpoint {path} holds a different architecture; "
                         "delete it or pass a new checkpoint path")
    for layer, saved_layer in zip(model.layers, saved.layers):
        layer.params, layer.buffers = saved_layer.params, saved_layer.buffers
    optimizer.load_state_arrays(arrays)
    training = json.loads(str(arrays["training"]))
    rng.bit_generator.state = training["rng"]
    for index, state in training["dropout_rngs"].items():
        model.layers[int(index)].rng.bit_generator.state = state
    return training["epoch"], History(**training["history"])


def fit(model, x, y, optimizer, epochs, batch_size=64, validation=None, schedule=None,
        augment=None, seed=0, checkpoint=None, progress=True, log=print):
    """Train ``model`` with mini-batch gradient descent on softmax cross-entropy.

    x: (N, ...) float inputs, y: (N,) int labels; ``validation`` an optional
    (x_val, y_val) pair evaluated after every epoch; ``schedule(epoch) -> lr``;
    ``augment(x_batch, rng) -> x_batch`` applied to each training batch.
    ``progress``: True for a text progress bar, False for none, or a tqdm-like
    wrapper such as ``tqdm.auto.tqdm``; ``log(message)`` receives one line per
    epoch (``None`` to stay silent).
    With ``checkpoint`` (a path), the model, optimiser state, random states and
    history are written atomically after every epoch, and a run started with an
    existing checkpoint resumes from it: the result equals an uninterrupted run.
    Raises ``FloatingPointError`` as soon as the loss stops being finite.
    Returns a ``History``.
    """
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"fit: need as many labels as inputs and at least one, got x {np.shape(x)}, y {np.shape(y)}")
    log = log or (lambda message: None)
    loss_fn, rng = SoftmaxCrossEntropy(), np.random.default_rng(seed)
    history, start = History(), 0
    if checkpoint is not None and os.path.exists(checkpoint):
        start, history = _restore_checkpoint(checkpoint, model, optimizer, rng)
        log(f"resumed from {checkpoint} after epoch {start}")
    for epoch in range(start, epochs):
        if schedule is not None:
            optimizer.lr = schedule(epoch)
        began, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        order = rng.permutation(len(x))
        batches = range(0, len(x), batch_size)
        if progress:
            wrapper = TextProgress if progress is True else progress
            batches = wrapper(batches, desc=f"epoch {epoch + 1}/{epochs}", leave=False)
        for b, i in enumerate(batches):
            index = order[i:i + batch_size]
            xb, yb = x[index], y[index]
            if augment is not None:
                xb = augment(xb, rng)
            logits = model.forward(xb, training=True)
            loss = loss_fn.forward(logits, yb)
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"training diverged: the loss became {loss} at epoch {epoch + 1}, batch {b + 1} "
                    f"(learning rate {optimizer.lr:g}); lower the learning rate or check the input scaling")
            model.backward(loss_fn.backward(), input_grad=False)
            optimizer.step(model)
            seen += len(index)
            loss_sum += loss * len(index)
            correct += int((logits.argmax(axis=1) == yb).sum())
            if progress and b % 20 == 0:
                batches.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
        history.seconds.append(time.perf_counter() - began)
        history.train_loss.append(loss_sum / seen)
        history.train_acc.append(correct / seen)
        history.lr.append(optimizer.lr)
        message = (f"epoch {epoch + 1}/{epochs}: loss {loss_sum / seen:.4f}, acc {correct / seen:.4f}")
        if validation is not None:
            val_loss, val_acc = evaluate(model, *validation)
            history.val_loss.append(val_loss)
            history.val_acc.append(val_acc)
            message += f", val_loss {val_loss:.4f}, val_acc {val_acc:.4f}"
        log(message + f" ({history.seconds[-1]:.1f} s)")
        if checkpoint is not None:
            save_npz(checkpoint, _checkpoint_arrays(model, optimizer, history, epoch + 1, rng))
    return history
