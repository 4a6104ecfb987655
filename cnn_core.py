"""The maths of a convolutional neural network, NumPy only.

For each layer the *loop* version that mirrors the equation sits next to the
*vectorized* version that computes the same thing fast: convolution, max and
average pooling, dense, batch normalisation, and the softmax. Section 1: input
checks and shared helpers; section 2: equation, ``*_loop``, ``*_vectorized``.

Conventions
-----------
* Images are NCHW: ``x[n, c, h, w]``; sequences are NCL.
* Every ``*_forward_*`` function returns ``(out, cache)`` and every
  ``*_backward_*`` function takes ``(dout, cache)``; ``dout`` is the gradient
  of the loss with respect to ``out`` and has its shape.
* The vectorized functions keep activations in NHWC memory order behind the
  NCHW interface (see ``conv2d_forward_vectorized``): same results, faster.
* Only NumPy and the standard library are imported here; the layer classes
  that wrap these functions are in ``cnn_layers.py``.
"""
from __future__ import annotations

import math
from collections import namedtuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

DEFAULT_DTYPE = np.float32

# ---------------------------------------------------------------------------
# 1. Input checks and shared helpers
# ---------------------------------------------------------------------------

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
        raise ValueError(f"{layer}: expected a {len(layout)}-D input ({layout}), got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{layer}: received an empty batch, shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{layer}: expected floating-point input, got dtype {x.dtype}; "
                         "convert images first, e.g. x.astype(np.float32) / 255")
    if channels is not None and x.shape[1] != channels:
        what = "input features" if layout and layout[1] == "D" else "input channels"
        raise ValueError(f"{layer}: expected {channels} {what} ({layout}), got shape {x.shape}")


def output_size(size, kernel, stride, padding):
    """Length of a conv/pool output along one axis: floor((size + 2p - k) / s) + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def _offset(p, out_size, stride):
    """Input positions i*stride + p for i = 0..out_size-1, as a slice. Window offset
    (p, q) of an output (OH, OW) reads ``x[..., _offset(p, OH, sh), _offset(q, OW, sw)]``:
    looping over the kh*kw offsets visits every window element with whole-array operations."""
    return slice(p, p + stride * (out_size - 1) + 1, stride)


def _col2im(dcols, padded_shape, stride):
    """Add each window's gradient back to the pixels it was read from: dcols (N, OH,
    OW, kh, kw, C) -> dxp ``padded_shape`` (N, Hp, Wp, C). Offset (p, q) touches pixels
    (i*sh + p, j*sw + q), one strided slice, so kh*kw slice additions cover everything;
    overlapping windows add up, as the chain rule asks."""
    _, OH, OW, kh, kw, _ = dcols.shape
    sh, sw = stride
    dxp = np.zeros(padded_shape, dtype=dcols.dtype)
    for p in range(kh):
        for q in range(kw):
            dxp[:, _offset(p, OH, sh), _offset(q, OW, sw)] += dcols[:, :, :, p, q]
    return dxp


# Memory layout of the vectorized layers: every activation is channels-last in
# memory, (N, H, W, C), handed on as an (N, C, H, W) *view*. The interface stays
# NCHW; inside, an activation is the (N*H*W, C) matrix ``as_rows(x)``, one row per
# position, so convolution is one matrix product, batch norm's per-channel sums
# are column sums, and pooling and padding copy contiguous runs of C values.

def channels_last(x):
    """(N, C, *S) -> the same values as a contiguous (N, *S, C) array; free (a view)
    when x is a channels-first view of channels-last memory, as layers return."""
    return np.ascontiguousarray(np.moveaxis(x, 1, -1))


def channels_first(x):
    """(N, *S, C) -> an (N, C, *S) view, no copy: the interface order."""
    return np.moveaxis(x, -1, 1)


def as_rows(x):
    """(N, C, *S) -> the (N*prod(S), C) matrix of its positions (free when x is
    channels-last in memory, else one transposing copy)."""
    return channels_last(x).reshape(-1, x.shape[1])


def _from_rows(rows, like):
    """(m, C) rows -> an array shaped like ``like`` (N, C, *S), as a view."""
    return channels_first(rows.reshape((like.shape[0],) + like.shape[2:] + (like.shape[1],)))


def _column_sums(X):
    """1^T X, the sums of the columns of an (m, C) matrix, in one pass."""
    return _column_reduce("ij->j", X)


def _column_dots(A, B):
    """sum_i A[i, c] * B[i, c] for every column c of two (m, C) matrices, in one pass."""
    return _column_reduce("ij,ij->j", A, B)


def _column_reduce(spec, *matrices, block=1024):
    """``np.einsum(spec, *matrices)`` -> (C,) for (m, C) matrices, summed per block
    of ``block`` rows, then across blocks: float32 rounding about ten times smaller
    than one running sum (or BLAS's ``ones @ X``), as fast, and single-threaded (a
    BLAS call can wait ~15 ms for its second thread on a busy machine)."""
    m = matrices[0].shape[0] // block * block
    blocked = spec.replace("ij", "kij").replace("->j", "->kj")
    heads = [X[:m].reshape(-1, block, X.shape[1]) for X in matrices]
    return np.einsum(blocked, *heads).sum(axis=0) + np.einsum(spec, *(X[m:] for X in matrices))


def _scale_shift(X, scale, shift):
    """X * scale + shift for per-column (C,) vectors, in chunks of rows that stay in
    the L2 cache (the second operation costs almost nothing)."""
    out = np.empty_like(X)
    Xw, ow, scale, shift = _widen((X, out), (scale, shift))
    for rows in _row_chunks(Xw):
        np.multiply(Xw[rows], scale, out=ow[rows])
        ow[rows] += shift
    return out


ROW_CHUNK_BYTES = 1 << 18


def _row_chunks(X):
    """Slices of the rows of the matrix X, each about ROW_CHUNK_BYTES (256 KB): a chain
    of elementwise operations on one chunk stays in the L2 cache."""
    step = max(1, ROW_CHUNK_BYTES // max(1, X.shape[1] * X.itemsize))
    return [slice(i, i + step) for i in range(0, X.shape[0], step)]


def _widen(matrices, vectors):
    """(m, C) matrices as (m / r, r * C) views, r rows side by side, and per-column
    (C,) vectors repeated r times to match: r is the largest power of two up to
    512 / C that divides m (a row of only C values makes every NumPy operation
    loop too briefly)."""
    m, C = matrices[0].shape
    r = 1
    while r * 2 * C <= 512 and m % (r * 2) == 0:
        r *= 2
    return [X.reshape(m // r, r * C) for X in matrices] + [np.tile(v, r) for v in vectors]


class Workspace:
    """Scratch arrays a layer reuses from one batch to the next, by name (a large new
    array costs fresh pages zeroed on first touch: about one more fill). ``get``: the
    same array while shape and dtype stay (``zeros=True``: zero wherever never written,
    such as a padded border); ``scratch``: temporaries whose size varies (im2col blocks).
    A layer's cache may point into its workspace until its next forward pass."""

    def __init__(self):
        self._arrays = {}

    def get(self, name, shape, dtype, zeros=False):
        shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        array = self._arrays.get(name)
        if array is None or array.shape != shape or array.dtype != dtype:
            array = self._arrays[name] = (np.zeros if zeros else np.empty)(shape, dtype)
        return array

    def scratch(self, name, shape, dtype):
        """An array of ``shape`` (content undefined) for a temporary whose shape varies
        (a loop's smaller last block): a view of one buffer that only ever grows."""
        size = math.prod(shape)
        buffer = self._arrays.get(name)
        if buffer is None or buffer.size < size or buffer.dtype != np.dtype(dtype):
            buffer = self._arrays[name] = np.empty(size, dtype)
        return buffer[:size].reshape(shape)

    def nbytes(self):
        """Total size of the arrays held, in bytes."""
        return sum(a.nbytes for a in self._arrays.values())


# Operands that fit in the core's L2 cache (2 MB here) stream about four times
# faster, so the im2col matrix (75 MB for CIFAR's 32-channel layer) is built and
# multiplied a block of about CHUNK_BYTES at a time, in one reused buffer: 1-4 MB
# blocks were all about 20 % faster than the whole matrix; 2 MB means fewer BLAS calls.
CHUNK_BYTES = 1 << 21


def _padded(x, padding, work, name, axes=(1, 2)):
    """x zero-padded by ``padding`` = (ph, pw) along two ``axes`` (negative: cropped),
    in a workspace array whose border is never written (a new one for ``work=None``),
    or a view of x when there is nothing to pad."""
    index = [slice(None)] * x.ndim
    for axis, p in zip(axes, padding):
        if p < 0:
            index[axis] = slice(-p, x.shape[axis] + p)
    x = x[tuple(index)]
    ph, pw = max(padding[0], 0), max(padding[1], 0)
    if ph == pw == 0:
        return x
    shape, inner = list(x.shape), [slice(None)] * x.ndim
    for axis, p in zip(axes, (ph, pw)):
        shape[axis] += 2 * p
        inner[axis] = slice(p, p + x.shape[axis])
    xp = np.zeros(shape, x.dtype) if work is None else work.get(f"{name}.padded{ph},{pw}", shape, x.dtype, True)
    xp[tuple(inner)] = x
    return xp


def _pad(x, padding, axes=(2, 3)):
    """Zero-pad two ``axes`` by ``padding = (ph, pw)`` on both sides (x itself: none)."""
    return _padded(x, padding, None, "", axes)


def _windows(xp, kernel, stride, channels_first=False):
    """Every (kh, kw) window of the padded input as a view (N, OH, OW, kh, kw, C): one
    window, flattened, is one im2col row. xp: (N, Hp, Wp, C), or (N, C, Hp, Wp)."""
    sh, sw = stride
    if channels_first:
        return sliding_window_view(xp, kernel, axis=(2, 3))[:, :, ::sh, ::sw].transpose(0, 2, 3, 4, 5, 1)
    return sliding_window_view(xp, kernel, axis=(1, 2))[:, ::sh, ::sw].transpose(0, 1, 2, 4, 5, 3)


def _filter_matrix(W, channels_first=False):
    """W (F, C, kh, kw) as the (kh*kw*C, F) matrix that multiplies im2col rows, rows in
    (p, q, c) order ((c, p, q) channels-first): a transposed view of W with each filter's
    channels moved last, (F, kh*kw*C) (BLAS reads the transpose as it is). Reordering W
    to (kh, kw, C, F) in memory instead costs a copy whose power-of-two strides thrash the
    cache: 1.6 ms for 256 x 256 x 3 x 3 filters, against 0.2 ms for this one."""
    F = W.shape[0]
    return np.ascontiguousarray(W if channels_first else W.transpose(0, 2, 3, 1)).reshape(F, -1).T


def _blocks(windows):
    """Blocks (n0, n1, r0, r1) of images n0:n1 and output rows r0:r1 whose im2col rows
    take about CHUNK_BYTES: whole images when one fits, else bands of one image."""
    N, OH = windows.shape[:2]
    rows = max(1, CHUNK_BYTES // (math.prod(windows.shape[2:]) * windows.itemsize or 1))
    if rows >= OH:
        images = rows // OH
        return [(n, min(N, n + images), 0, OH) for n in range(0, N, images)]
    return [(n, n + 1, r, min(OH, r + rows)) for n in range(N) for r in range(0, OH, rows)]


def _block_cols(windows, block, work, name, channels_first=False):
    """The im2col matrix of one block, (rows, kh*kw*C), copied into a reused buffer:
    channels-last, each row (p, q, c) is kh*kw runs of C contiguous values.
    Channels-first (images with 1 or 3 channels), it is built transposed, (c, p, q)
    by rows, each one shifted copy of a channel (runs of OW values), and the
    product reads it through a transposed view."""
    n0, n1, r0, r1 = block
    part = windows[n0:n1, r0:r1]                                   # (n, rows, OW, kh, kw, C)
    if channels_first:
        cols = work.scratch(f"{name}.cols", part.shape[5:] + part.shape[3:5] + part.shape[:3], windows.dtype)
        np.copyto(cols, part.transpose(5, 3, 4, 0, 1, 2))
        return cols.reshape(math.prod(part.shape[3:]), -1).T
    cols = work.scratch(f"{name}.cols", part.shape, windows.dtype)
    np.copyto(cols, part)
    return cols.reshape(-1, math.prod(part.shape[3:]))


def _conv_products(windows, W_mat, out, work, name, bias=None, channels_first=False):
    """out (N, OH, OW, F) = im2col(windows) @ W_mat (+ bias), block by block."""
    F = W_mat.shape[1]
    for n0, n1, r0, r1 in _blocks(windows):
        rows = out[n0:n1, r0:r1].reshape(-1, F)                 # a view: whole images or one image's rows
        np.matmul(_block_cols(windows, (n0, n1, r0, r1), work, name, channels_first), W_mat, out=rows)
        if bias is not None:
            rows += bias


def _conv_filter_products(windows, g, work, name, channels_first=False):
    """dW_mat^T (F, kh*kw*C) = g^T @ im2col(windows), summed block by block: each
    filter's gradient is one row, in the order of ``_filter_matrix``'s columns."""
    dW = np.zeros((g.shape[-1], math.prod(windows.shape[3:])), g.dtype)   # stays 0 for an empty batch
    for n0, n1, r0, r1 in _blocks(windows):
        cols = _block_cols(windows, (n0, n1, r0, r1), work, name, channels_first)
        dW += g[n0:n1, r0:r1].reshape(-1, g.shape[-1]).T @ cols
    return dW


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
    """dout: (N, F, OH, OW) -> dx: (N, C, H, W) (None unless ``input_grad``: no layer
    below needs it), dW: (F, C, kh, kw), db: (F,)."""
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


ConvCache = namedtuple("ConvCache", "method x_shape padded W stride padding")


def conv_method(x):
    """How the vectorized convolution reads the windows of x (N, C, H, W): "im2col"
    (channels-last: runs of C values) or "im2col-cf" (x channels-first in memory,
    such as a batch of images with 1 or 3 channels: runs of OW values)."""
    return "im2col-cf" if x.shape[1] == 1 or abs(x.strides[1]) > abs(x.strides[-1]) else "im2col"


def conv2d_forward_vectorized(x, W, b, stride=(1, 1), padding=(0, 0), work=None):
    """Same maths as the loop version as matrix products (im2col), channels-last.

    Every window becomes one row of a matrix (N*OH*OW, kh*kw*C) ordered (p, q, c),
    so each piece copied into it is a contiguous run of C channel values, and
    out = cols @ W_mat with W_mat = W reordered to (kh*kw*C, F); a block of rows at
    a time, in a reused buffer (``_conv_products``). The padding is the zero border
    of a reused buffer. The result is an (N, F, OH, OW) *view* of the (N, OH, OW, F)
    product: no copy. ``work``: a ``Workspace`` for temporaries (None: fresh ones).
    """
    work = Workspace() if work is None else work
    F, _, kh, kw = W.shape
    method = conv_method(x)
    first = method == "im2col-cf"
    xp = _padded(x, padding, work, "x", axes=(2, 3)) if first else _padded(x.transpose(0, 2, 3, 1), padding, work, "x")
    windows = _windows(xp, (kh, kw), stride, first)
    out = np.empty(windows.shape[:3] + (F,), x.dtype)
    _conv_products(windows, _filter_matrix(W, first), out, work, "x", bias=b, channels_first=first)
    return channels_first(out), ConvCache(method, x.shape, xp, W, stride, padding)


def conv2d_backward_vectorized(dout, cache, input_grad=True, work=None):
    """db = column sums of g = dout as an (N*OH*OW, F) matrix (free: channels-last);
    dW = g^T @ im2col(x) (one row per filter), block by block from the padded input
    the forward kept.
    dx at stride 1 is itself a convolution, of dout padded by (kh-1-ph, kw-1-pw)
    with the flipped filters, channels F -> C:
        dx[y, z] = sum_{p, q, f} gpad[y + p, z + q, f] * W[f, :, kh-1-p, kw-1-q],
    computed like the forward pass (K = kh*kw*F, nothing to scatter; a blocked
    col2im measured no faster). Other strides: dcols = g @ W_mat^T, added back
    window by window (col2im)."""
    work = Workspace() if work is None else work
    method, x_shape, xp, W, (sh, sw), (ph, pw) = cache
    N, F, OH, OW = dout.shape
    _, C, H, W_in = x_shape
    kh, kw = W.shape[2:]
    g = channels_last(dout)                                         # (N, OH, OW, F)
    db = _column_sums(g.reshape(-1, F))
    first = method == "im2col-cf"
    dW_rows = _conv_filter_products(_windows(xp, (kh, kw), (sh, sw), first), g, work, "x", first)
    dW = np.ascontiguousarray(dW_rows.reshape(F, C, kh, kw) if first else
                              dW_rows.reshape(F, kh, kw, C).transpose(0, 3, 1, 2))
    if not input_grad:
        return None, dW, db
    if (sh, sw) == (1, 1):
        gp = _padded(g, (kh - 1 - ph, kw - 1 - pw), work, "dout")
        dx = np.empty((N, H, W_in, C), dout.dtype)
        W_rows = _filter_matrix(W).T.reshape(F, kh, kw, C)             # each filter channels-last
        W_flip = W_rows[:, ::-1, ::-1].transpose(1, 2, 0, 3).reshape(-1, C)   # (kh*kw*F, C), rows (p, q, f)
        _conv_products(_windows(gp, (kh, kw), (1, 1)), W_flip, dx, work, "dout")
        return channels_first(dx), dW, db
    dcols = (g.reshape(-1, F) @ _filter_matrix(W).T).reshape(N, OH, OW, kh, kw, C)
    dxp = _col2im(dcols, (N, H + 2 * ph, W_in + 2 * pw, C), (sh, sw))
    return channels_first(np.ascontiguousarray(dxp[:, ph:ph + H, pw:pw + W_in])), dW, db


# Max pooling: out[n, c, i, j] = max_{p, q} x[n, c, i*sh + p, j*sw + q].
# Backward: dout goes to each window's arg-max (np.argmax's rule in both); overlaps add up.

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
    """Running maximum over the window offsets (strided slices of x); the arg-max is
    found in the backward pass, so inference does not pay for it. The cache keeps
    the output too: the backward finds each window's maximum by comparing with it."""
    out = _window_max(x, pool, stride)[0]
    return out, (x, out, pool, stride)


def maxpool_backward_vectorized(dout, cache):
    """Offset k = p*pw + q's slice of dx receives dout where k is the window's arg-max
    (np.argmax's rule: the first maximum); overlapping windows add up. A block of images
    (about CHUNK_BYTES of x) at a time: its ph*pw passes stay in the L2 cache.

    Windows side by side (stride = pool), the arg-max is the first offset whose value
    equals the window's maximum ``out``: one comparison per offset, on masks of one
    byte. Otherwise, or where a window holds a NaN (equal to nothing, yet np.argmax's
    maximum), ``_window_max`` finds the arg-max offset by offset."""
    x, out, pool, stride = cache
    (ph, pw), (sh, sw), (OH, OW) = pool, stride, dout.shape[2:]
    side_by_side = (sh, sw) == (ph, pw)
    if side_by_side:                           # zero only what no window covers
        dx = np.empty_like(x)                  # x's memory order: the next backward stays fast
        dx[:, :, OH * sh:], dx[:, :, :, OW * sw:] = 0, 0
    else:
        dx = np.zeros_like(x)
    step = max(1, CHUNK_BYTES // (math.prod(x.shape[1:]) * x.itemsize or 1))
    for n in range(0, len(x), step):
        images, g, o = slice(n, n + step), dout[n:n + step], out[n:n + step]
        dx_views = _pool_views(dx[images], pool, stride)
        if side_by_side and not np.isnan(o).any():
            _first_max_grad(_pool_views(x[images], pool, stride), o, g, dx_views)
            continue
        _, argmax = _window_max(x[images], pool, stride, argmax=True)
        is_k = np.empty_like(argmax, dtype=bool)
        for k, dxk in enumerate(dx_views):
            np.equal(argmax, k, out=is_k)
            if side_by_side:                   # each pixel is in one window: write, don't add
                np.multiply(g, is_k, out=dxk)
            else:                              # a pixel in several windows collects every share
                dxk += g * is_k
    return dx


def _first_max_grad(x_views, out, g, dx_views):
    """dx_views[k] = g where offset k is the first to hold the window's maximum ``out``,
    else 0, for windows side by side (each pixel in one window). x_views, dx_views: one
    (n, C, OH, OW) view per offset k; out, g: (n, C, OH, OW)."""
    hit, taken = np.empty_like(out, dtype=bool), np.zeros_like(out, dtype=bool)   # out's memory order
    for xk, dxk in zip(x_views, dx_views):
        np.equal(xk, out, out=hit)
        hit &= ~taken                          # a tie goes to the first offset
        taken |= hit
        np.multiply(g, hit, out=dxk)


def _window_max(x, pool, stride, argmax=False):
    """(out, arg): every window's maximum, (N, C, OH, OW) in x's memory order, and with
    ``argmax`` the offset k = p*pw + q holding it. k replaces the arg-max only where it
    is strictly greater than the running maximum (a tie keeps the first); as k only
    grows, that is arg = max(arg, k * greater) (``np.copyto(where=)``: 10x slower)."""
    views = _pool_views(x, pool, stride)
    out = views[0].copy(order="K")                 # keep x's memory order
    arg = np.zeros_like(out, dtype=np.min_scalar_type(len(views) - 1)) if argmax else None
    greater = np.empty_like(arg) if argmax else None
    for k, xk in enumerate(views[1:], start=1):
        if argmax:
            np.greater(xk, out, out=greater, dtype=bool, casting="unsafe")
            greater *= k
            np.maximum(arg, greater, out=arg)
        np.maximum(out, xk, out=out)
    if argmax and np.isnan(out).any():        # np.argmax's rule: a window's first NaN is its maximum
        seen = np.zeros(out.shape, bool)
        for k, xk in enumerate(views):
            first = np.isnan(xk) & ~seen
            arg[first], seen[first] = k, True
    return out, arg


def _pool_views(x, pool, stride):
    """Offset k = p*pw + q of every window of x (N, C, H, W), a strided view per k."""
    (ph, pw), (sh, sw) = pool, stride
    OH, OW = output_size(x.shape[2], ph, sh, 0), output_size(x.shape[3], pw, sw, 0)
    return [x[:, :, _offset(p, OH, sh), _offset(q, OW, sw)] for p in range(ph) for q in range(pw)]


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
    views = _pool_views(x, pool, stride)
    out = views[0].copy(order="K")                 # keep x's memory order
    for xk in views[1:]:
        out += xk
    out /= len(views)
    return out, (x, pool, stride)


def avgpool_backward_vectorized(dout, cache):
    """Every offset's slice of dx receives dout / (ph*pw)."""
    x, pool, stride = cache
    share = dout / (pool[0] * pool[1])
    dx = np.zeros_like(x)
    for dxk in _pool_views(dx, pool, stride):
        dxk += share
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

# ``mean`` and ``var``: the batch statistics the layer also folds into its running averages.
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


# The vectorized cache: ``rows`` is x as an (m, C) matrix and ``center`` what it lacks
# of deviations from the mean (the mean, or a small correction when ``rows`` is x
# already centred on an estimate of the mean).
BatchNormRowsCache = namedtuple("BatchNormRowsCache", "rows center gamma mean var inv_std")

# One-pass variance E[x^2] - mean^2 loses digits when |mean| >> std; beyond this ratio
# of mean^2 to variance (3 of float32's 7 digits lost) it is recomputed from centred values.
_CANCELLATION = 1e3


def batchnorm_forward_vectorized(x, gamma, beta, eps=1e-5):
    """Statistics in one pass over X = ``as_rows(x)`` (m, C): column sums 1^T X and
    sums of squares (no temporary), var = E[x^2] - mean^2; then y = X * scale + shift
    with scale = gamma / std, shift = beta - mean * scale. The cache keeps x, not xhat."""
    X = as_rows(x)
    m = X.shape[0]
    mean = _column_sums(X) / m
    var = _column_dots(X, X) / m - mean * mean
    rows, center = X, mean
    if np.any(mean * mean > _CANCELLATION * np.maximum(var, 0)):
        rows = X - mean                      # deviations from a close estimate of the mean (nearly exact)
        center = _column_sums(rows) / m      # the estimate's own rounding error, now small
        var = _column_dots(rows, rows) / m - center * center
        mean = mean + center
    var = np.maximum(var, 0)
    inv_std = 1 / np.sqrt(var + eps)
    scale = gamma * inv_std
    y = _scale_shift(rows, scale, beta - center * scale)
    return _from_rows(y, x), BatchNormRowsCache(rows, center, gamma, mean, var, inv_std)


def batchnorm_backward_vectorized(dout, cache, input_grad=True):
    """The loop version's three lines, fused: with G = ``as_rows(dout)``,
    dbeta = 1^T G, dgamma = sum(G * xhat) = (sum(G * X) - mean * dbeta) / std,
    and dx = a * G + b * X + c with per-channel a = gamma / std,
    b = -a * dgamma / (m * std), c = -a * dbeta / m - b * mean."""
    X, center, gamma, _, _, inv_std = cache
    G = as_rows(dout)
    m = G.shape[0]
    dbeta = _column_sums(G)
    dgamma = (_column_dots(G, X) - center * dbeta) * inv_std
    if not input_grad:
        return None, dgamma, dbeta
    a = gamma * inv_std
    b = -a * inv_std * dgamma / m
    dx = np.empty_like(G)
    Gw, Xw, dxw, a, b, c = _widen((G, X, dx), (a, b, -a * dbeta / m - b * center))
    chunks = _row_chunks(Gw)
    t = np.empty_like(Gw[chunks[0]])
    for rows in chunks:                               # each chunk's four operations stay in the cache
        d = dxw[rows]
        np.multiply(Gw[rows], a, out=d)
        d += np.multiply(Xw[rows], b, out=t[:len(d)])
        d += c
    return _from_rows(dx, dout), dgamma, dbeta


# Softmax, the output of the classifier (its gradient is in the loss, cnn_layers.SoftmaxCrossEntropy).

def softmax(logits):
    """Row-wise softmax of (N, K) logits; subtracting the row maximum avoids overflow."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
