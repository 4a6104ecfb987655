"""The maths of a convolutional neural network, NumPy only.

For each layer the *loop* version that mirrors the equation sits next to the
*vectorized* version that computes the same thing fast: convolution, max and
average pooling, dense, batch normalisation, and the softmax. Read this file
top to bottom to see every forward and backward pass of the project.

1. input checks and the window helpers the spatial layers share,
2. the layer maths, equation first, then ``*_loop`` and ``*_vectorized``.

Conventions
-----------
* Images are NCHW: ``x[n, c, h, w]``; sequences are NCL.
* Every ``*_forward_*`` function returns ``(out, cache)`` and every
  ``*_backward_*`` function takes ``(dout, cache)``; ``dout`` is the gradient
  of the loss with respect to ``out`` and has its shape.
* The vectorized functions keep activations in NHWC memory order behind the
  NCHW interface (see ``conv2d_forward_vectorized``); the results are the
  same, only faster.
* Only NumPy and the standard library are imported here. The layer classes
  that wrap these functions are in ``cnn_layers.py``.
"""
from __future__ import annotations

from collections import namedtuple

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
    N, C, H, W_in = x.shape                     # W_in: input width (W is the weights)
    F, _, kh, kw = W.shape
    sh, sw = stride
    xp = _pad(x, padding)
    OH, OW = output_size(H, kh, sh, padding[0]), output_size(W_in, kw, sw, padding[1])
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
    N, C, H, W_in = x.shape
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
    N, C, H, W_in = x.shape
    (ph, pw), (sh, sw) = pool, stride
    OH, OW = output_size(H, ph, sh, 0), output_size(W_in, pw, sw, 0)
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
    N, C, H, W_in = x.shape
    (ph, pw), (sh, sw) = pool, stride
    out = np.empty((N, C, output_size(H, ph, sh, 0), output_size(W_in, pw, sw, 0)), dtype=x.dtype)
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

# What the batch-norm backward needs; ``mean`` and ``var`` are the batch statistics the
# layer also folds into its running averages.
BatchNormCache = namedtuple("BatchNormCache", "xhat gamma mean var eps")


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
    return y, BatchNormCache(xhat, gamma, mean, var, eps)


def batchnorm_backward_loop(dout, cache, input_grad=True):
    """dout: (N, C, ...) -> dx: same shape, dgamma: (C,), dbeta: (C,)."""
    xhat, gamma, _, var, eps = cache
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
    return gamma.reshape(shape) * xhat + beta.reshape(shape), BatchNormCache(xhat, gamma, mean.ravel(), var.ravel(), eps)


def batchnorm_backward_vectorized(dout, cache, input_grad=True):
    """The loop version's three lines with sums over all non-channel axes."""
    xhat, gamma, _, var, eps = cache
    axes, shape = _channel_axes(dout)
    m = dout.size // dout.shape[1]
    dbeta, dgamma = dout.sum(axis=axes), (dout * xhat).sum(axis=axes)
    if not input_grad:
        return None, dgamma, dbeta
    scale = (gamma / np.sqrt(var + eps)).reshape(shape)
    return scale * (dout - (dbeta / m).reshape(shape) - xhat * (dgamma / m).reshape(shape)), dgamma, dbeta


# Softmax, the output of the classifier (its gradient is in the loss, cnn_layers.SoftmaxCrossEntropy).

def softmax(logits):
    """Row-wise softmax of (N, K) logits; subtracting the row maximum avoids overflow."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
