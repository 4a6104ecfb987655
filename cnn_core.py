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


# Memory layout and scratch space of the vectorized layers. They keep every
# activation channels-last in memory, (N, H, W, C), and hand it on as an
# (N, C, H, W) *view*: the interface stays NCHW, while inside, an activation is
# the (N*H*W, C) matrix ``as_rows(x)`` with one row per position and a pixel's
# C values side by side. Convolution is then one matrix product, batch norm's
# per-channel sums are matrix-vector products, and elementwise layers, pooling
# and padding copy contiguous runs of C values.

def channels_last(x):
    """(N, C, *S) -> the same values as a contiguous (N, *S, C) array; free (a
    view) when x is a channels-first view of channels-last memory, as every
    vectorized layer returns."""
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
    """Sums of the columns of an (m, C) matrix as one matrix-vector product
    1^T X: BLAS, several times faster than ``X.sum(axis=0)``."""
    return np.ones(X.shape[0], dtype=X.dtype) @ X


class Workspace:
    """Scratch arrays a layer reuses from one batch to the next, by name.

    A large new array (an im2col matrix is 75 MB for CIFAR's 32-channel
    convolution at batch 64) comes from the operating system as fresh pages
    that are zeroed on first touch: that costs about as much as filling the
    array once more. ``get`` hands back the same array while the shape and
    dtype stay the same; an array made with ``zeros=True`` stays zero wherever
    the caller never writes (the border of a padded image). Functions called
    without a workspace (``work=None``) get fresh arrays, as before. A layer's
    cache may point into its workspace: it is valid until the layer's next
    forward pass, which replaces the cache anyway.
    """

    def __init__(self):
        self._arrays = {}

    def get(self, name, shape, dtype, zeros=False):
        shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        array = self._arrays.get(name)
        if array is None or array.shape != shape or array.dtype != dtype:
            array = self._arrays[name] = (np.zeros if zeros else np.empty)(shape, dtype)
        return array

    def nbytes(self):
        """Total size of the arrays held, in bytes."""
        return sum(a.nbytes for a in self._arrays.values())


# Large arrays are slow to stream: an elementwise operation runs about four
# times faster when its operands fit in the core's L2 cache (2 MB here). So the
# im2col matrix is never built whole: it is built and multiplied a block of
# rows at a time, each block about CHUNK_BYTES, in one reused buffer.
CHUNK_BYTES = 1 << 20


def _padded(x, padding, work, name):
    """The channels-last x (N, H, W, C) zero-padded by ``padding`` (negative:
    cropped), as a workspace array whose border is never written (so it stays
    zero), or x itself when there is nothing to pad."""
    ph, pw = padding
    crop_h, crop_w = max(-ph, 0), max(-pw, 0)
    if crop_h or crop_w:
        x = x[:, crop_h:x.shape[1] - crop_h, crop_w:x.shape[2] - crop_w]
        ph, pw = max(ph, 0), max(pw, 0)
    if ph == pw == 0:
        return x
    N, H, W, C = x.shape
    xp = work.get(f"{name}.padded{ph},{pw}", (N, H + 2 * ph, W + 2 * pw, C), x.dtype, zeros=True)
    xp[:, ph:ph + H, pw:pw + W] = x
    return xp


def _windows(xp, kernel, stride):
    """Every (kh, kw) window of the channels-last xp (N, Hp, Wp, C) as a view
    (N, OH, OW, kh, kw, C): one window, flattened in (p, q, c) order, is one
    row of the im2col matrix."""
    sh, sw = stride
    return sliding_window_view(xp, kernel, axis=(1, 2))[:, ::sh, ::sw].transpose(0, 1, 2, 4, 5, 3)


def _blocks(windows):
    """Blocks (n0, n1, r0, r1) of images n0:n1 and output rows r0:r1 whose
    im2col rows take about CHUNK_BYTES: whole images when one fits, else bands
    of rows of one image."""
    N, OH = windows.shape[:2]
    rows = max(1, CHUNK_BYTES // (windows[0, 0].size * windows.itemsize))
    if rows >= OH:
        images = rows // OH
        return [(n, min(N, n + images), 0, OH) for n in range(0, N, images)]
    return [(n, n + 1, r, min(OH, r + rows)) for n in range(N) for r in range(0, OH, rows)]


def _block_cols(windows, block, work, name):
    """The im2col matrix of one block, (rows, kh*kw*C), copied into a reused buffer."""
    n0, n1, r0, r1 = block
    part = windows[n0:n1, r0:r1]
    first = _blocks(windows)[0]
    capacity = (first[1] - first[0]) * (first[3] - first[2]) * windows[0, 0].size
    cols = work.get(f"{name}.cols", (capacity,), windows.dtype)[:part.size].reshape(part.shape)
    np.copyto(cols, part)
    return cols.reshape(-1, np.prod(part.shape[3:]))


def _conv_products(windows, W_mat, out, work, name, bias=None):
    """out (N, OH, OW, F) = im2col(windows) @ W_mat (+ bias), block by block."""
    F = W_mat.shape[1]
    for block in _blocks(windows):
        n0, n1, r0, r1 = block
        part = out[n0:n1, r0:r1].reshape(-1, F)                 # a view: whole images or one image's rows
        np.matmul(_block_cols(windows, block, work, name), W_mat, out=part)
        if bias is not None:
            part += bias


def _conv_filter_products(windows, g, work, name):
    """dW_mat (kh*kw*C, F) = im2col(windows)^T @ g, summed block by block."""
    F = g.shape[-1]
    dW = None
    for block in _blocks(windows):
        n0, n1, r0, r1 = block
        product = _block_cols(windows, block, work, name).T @ g[n0:n1, r0:r1].reshape(-1, F)
        dW = product if dW is None else np.add(dW, product, out=dW)
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


# Two algorithms compute the vectorized convolution. im2col (any kernel, stride
# and padding): every window becomes one row of a matrix, then one matrix
# product. Winograd F(2x2, 3x3) for 3x3 kernels at stride 1 with at least
# WINOGRAD_MIN_CHANNELS input channels (CIFAR's and MNIST's inner layers): 2.25x
# fewer multiplications and a 4x instead of 9x expansion of the input; with
# fewer channels its transforms cost more than they save.
WINOGRAD_MIN_CHANNELS = 16

ConvCache = namedtuple("ConvCache", "method x_shape data W stride padding")


def conv_method(in_channels, kernel, stride):
    """"winograd" or "im2col": the algorithm the vectorized convolution uses."""
    winograd = tuple(kernel) == (3, 3) and tuple(stride) == (1, 1) and in_channels >= WINOGRAD_MIN_CHANNELS
    return "winograd" if winograd else "im2col"


def conv2d_forward_vectorized(x, W, b, stride=(1, 1), padding=(0, 0), work=None):
    """Same maths as the loop version as matrix products, channels-last.

    im2col: every window becomes one row of a matrix (N*OH*OW, kh*kw*C)
    ordered (p, q, c), so each piece copied into it is a contiguous run of C
    channel values, and out = cols @ W_mat with W_mat = W reordered to
    (kh*kw*C, F); the matrix is built and multiplied a block of rows at a time
    (``_conv_products``). Winograd (3x3, stride 1): see ``_winograd_conv``.
    The result is an (N, F, OH, OW) *view* of the (N, OH, OW, F) product: no
    copy, and the next layers keep that order. ``work``: a ``Workspace`` for
    the temporary arrays (None: fresh ones).
    """
    work = Workspace() if work is None else work
    N, C, H, W_in = x.shape
    F, _, kh, kw = W.shape
    x_cl = x.transpose(0, 2, 3, 1)
    if conv_method(C, (kh, kw), stride) == "winograd":
        out, tiles = _winograd_conv(x_cl, W, padding, work, "x", bias=b)
        return channels_first(out), ConvCache("winograd", x.shape, tiles, W, stride, padding)
    xp = _padded(x_cl, padding, work, "x")
    windows = _windows(xp, (kh, kw), stride)
    out = np.empty(windows.shape[:3] + (F,), x.dtype)
    _conv_products(windows, W.transpose(2, 3, 1, 0).reshape(kh * kw * C, F), out, work, "x", bias=b)
    return channels_first(out), ConvCache("im2col", x.shape, xp, W, stride, padding)


def conv2d_backward_vectorized(dout, cache, input_grad=True, work=None):
    """db = column sums of g, where g = dout as an (N*OH*OW, F) matrix (free
    when dout is channels-last in memory); dW = im2col(x)^T @ g, block by
    block from the padded input the forward pass kept, or by Winograd
    (``_winograd_filter_grad``).

    dx at stride 1 is itself a convolution, of dout padded by (kh - 1 - ph,
    kw - 1 - pw) with the flipped filters, channels F -> C:
        dx[y, z] = sum_{p, q, f} gpad[y + p, z + q, f] * W[f, :, kh-1-p, kw-1-q],
    computed like the forward pass (im2col blocks or Winograd): nothing to
    scatter. Other strides: dcols = g @ W_mat^T, added back window by window
    (col2im).
    """
    work = Workspace() if work is None else work
    method, x_shape, data, W, (sh, sw), (ph, pw) = cache
    N, F, OH, OW = dout.shape
    _, C, H, W_in = x_shape
    kh, kw = W.shape[2:]
    g = channels_last(dout)                                         # (N, OH, OW, F)
    db = _column_sums(g.reshape(-1, F))
    if method == "winograd":
        dW = _winograd_filter_grad(g, data, work)
    else:
        dW_mat = _conv_filter_products(_windows(data, (kh, kw), (sh, sw)), g, work, "x")
        dW = np.ascontiguousarray(dW_mat.reshape(kh, kw, C, F).transpose(3, 2, 0, 1))
    if not input_grad:
        return None, dW, db
    if (sh, sw) == (1, 1):
        W_flip = W[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)            # (C, F, kh, kw)
        if conv_method(F, (kh, kw), (1, 1)) == "winograd":
            dx, _ = _winograd_conv(g, W_flip, (2 - ph, 2 - pw), work, "dout")
            return channels_first(dx), dW, db
        gp = _padded(g, (kh - 1 - ph, kw - 1 - pw), work, "dout")
        dx = np.empty((N, H, W_in, C), dout.dtype)
        _conv_products(_windows(gp, (kh, kw), (1, 1)), W_flip.transpose(2, 3, 1, 0).reshape(kh * kw * F, C),
                       dx, work, "dout")
        return channels_first(dx), dW, db
    W_mat = W.transpose(0, 2, 3, 1).reshape(F, kh * kw * C)
    padded_shape = (N, H + 2 * ph, W_in + 2 * pw, C)
    dxp = _col2im((g.reshape(-1, F) @ W_mat).reshape(N, OH, OW, kh, kw, C), padded_shape, (sh, sw))
    return channels_first(np.ascontiguousarray(dxp[:, ph:ph + H, pw:pw + W_in])), dW, db


# Winograd F(2x2, 3x3) (Lavin & Gray, "Fast algorithms for convolutional neural
# networks", 2016). Each 2x2 block of outputs comes from a 4x4 tile d of the
# padded input (tiles overlap by 2, one per block) as
#     Y = A^T [ (G W G^T) * (B^T d B) ] A          (* elementwise, 4x4)
# 16 multiplications per block and channel pair instead of 36. Summed over the
# input channels, the elementwise product becomes 16 independent matrix
# products, one per tile position k = (xi, nu):  M[k] = V[k] @ U[k], with
# V[k] (tiles, C) the transformed input and U[k] (C, F) the transformed filters.
# Every transform is a few additions of strided slices; the matrices hold
# 0, +-1 and 1/2 only, so the result equals im2col's up to rounding.
_WINO_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]])
_WINO_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
_WINO_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]])


def _winograd_conv(x, W, padding, work, name, bias=None):
    """3x3 stride-1 convolution of the channels-last x (N, H, W, C) with W
    (F, C, 3, 3): returns y (N, OH, OW, F) (fresh) and V, the transformed
    tiles of x (16, N*TH*TW, C), which the filter gradient reuses.
    A negative padding crops x (the input-gradient pass of a padding > 2)."""
    ph, pw = padding
    crop_h, crop_w = max(-ph, 0), max(-pw, 0)
    if crop_h or crop_w:
        x = x[:, crop_h:x.shape[1] - crop_h, crop_w:x.shape[2] - crop_w]
        ph, pw = max(ph, 0), max(pw, 0)
    N, H, W_in, C = x.shape
    F = W.shape[0]
    OH, OW = H + 2 * ph - 2, W_in + 2 * pw - 2
    TH, TW = (OH + 1) // 2, (OW + 1) // 2                       # tiles: one per 2x2 output block
    V = _winograd_input(x, (ph, pw), (TH, TW), work, name)
    GG = np.kron(_WINO_G, _WINO_G).astype(W.dtype)               # (16, 9): U = G W G^T, flattened
    U = np.ascontiguousarray((W.reshape(F * C, 9) @ GG.T).reshape(F, C, 16).transpose(2, 1, 0))
    M = np.matmul(V, U, out=work.get(f"{name}.products", (16, N * TH * TW, F), x.dtype))
    if bias is not None:
        M[5] += bias               # A^T's column 1 is (1, 1): M[1, 1] reaches every output exactly once
    return _winograd_output(M, (N, TH, TW, F), (OH, OW), work, name), V


def _to_column_planes(x, out, row0, col0):
    """Copy the channels-last x (N, H, W, C) into out (N, Hb, 2, Wb, C) at rows
    row0..., padded columns col0...: padded column w goes to plane w % 2,
    position w // 2. With even and odd columns apart, the Winograd transforms,
    which combine neighbouring columns, read long contiguous runs (whole rows
    of a plane) instead of one pixel's C values at a time."""
    H, W_in = x.shape[1:3]
    for q in range(2):
        first = (q - col0) % 2                                    # first column with (col0 + w) % 2 == q
        cols = x[:, :, first::2]
        start = (col0 + first) // 2
        out[:, row0:row0 + H, q, start:start + cols.shape[2]] = cols


def _winograd_input(x, padding, tiles, work, name):
    """V = B^T d B for every 4x4 tile d (stride 2) of x zero-padded by
    ``padding`` (and at the bottom/right up to whole tiles), as (16, T, C)."""
    N, H, W_in, C = x.shape
    (ph, pw), (TH, TW) = padding, tiles
    xp = work.get(f"{name}.padded{ph},{pw}", (N, 2 * TH + 2, 2, TW + 1, C), x.dtype, zeros=True)
    _to_column_planes(x, xp, ph, pw)                              # the border stays zero
    t = work.get(f"{name}.rows", (4, N, TH, 2, TW + 1, C), x.dtype)
    _winograd_bt([xp[:, a:a + 2 * TH:2] for a in range(4)], t)    # B^T along the rows: row a of every tile
    even, odd = t[:, :, :, 0], t[:, :, :, 1]                      # (4, N, TH, TW + 1, C)
    V = work.get(f"{name}.tiles", (4, 4, N, TH, TW, C), x.dtype)
    _winograd_bt([even[..., :TW, :], odd[..., :TW, :], even[..., 1:, :], odd[..., 1:, :]],
                 [V[:, nu] for nu in range(4)])                   # then along the columns
    return V.reshape(16, N * TH * TW, C)


def _winograd_bt(d, out):
    """out[i] = sum_a B^T[i, a] d[a] for the four slices d[0..3]."""
    np.subtract(d[0], d[2], out=out[0])
    np.add(d[1], d[2], out=out[1])
    np.subtract(d[2], d[1], out=out[2])
    np.subtract(d[1], d[3], out=out[3])


def _winograd_output(M, tiles_shape, out_size, work, name):
    """y = A^T M A for every tile: M (16, N*TH*TW, F) -> y (N, OH, OW, F), fresh."""
    N, TH, TW, F = tiles_shape
    OH, OW = out_size
    M = M.reshape(4, 4, N, TH, TW, F)
    s = work.get(f"{name}.sums", (2, 4, N, TH, TW, F), M.dtype)
    np.add(M[0], M[1], out=s[0])                                  # A^T along the rows
    s[0] += M[2]
    np.subtract(M[1], M[2], out=s[1])
    s[1] -= M[3]
    t = work.get(f"{name}.pairs", (2, 2, N, TH, TW, F), M.dtype)
    np.add(s[:, 0], s[:, 1], out=t[0])                            # then along the columns
    np.subtract(s[:, 1], s[:, 2], out=t[1])
    even = (2 * TH, 2 * TW) == (OH, OW)
    y = np.empty((N, OH, OW, F), M.dtype) if even else work.get(f"{name}.blocks", (N, 2 * TH, 2 * TW, F), M.dtype)
    blocks = y.reshape(N, TH, 2, TW, 2, F)                        # y[n, 2i + a, 2j + b]
    a_inner = (1, 2, 0, 3, 4)                                     # (a, N, TH, TW, F) -> (N, TH, a, TW, F)
    np.add(t[0].transpose(a_inner), s[:, 2].transpose(a_inner), out=blocks[:, :, :, :, 0])
    np.subtract(t[1].transpose(a_inner), s[:, 3].transpose(a_inner), out=blocks[:, :, :, :, 1])
    return y if even else np.ascontiguousarray(y[:, :OH, :OW])


def _winograd_filter_grad(g, V, work):
    """dW (F, C, 3, 3) from the output gradient g (N, OH, OW, F) and the
    forward pass's transformed tiles V (16, T, C).

    The forward pass is linear in W per tile, with the 2x2 block w of g as
    its weights: dW = sum over tiles of G^T [ (A w A^T) * V ] G, i.e. 16
    products Mw[k] = (A w A^T)[k]^T @ V[k] that sum over all tiles at once
    (a long inner dimension: efficient), then a 4x4 -> 3x3 transform of the
    small (F, C) result. A's last row (0, -1) is used as (0, 1) and the sign
    is put back in that small transform.
    """
    N, OH, OW, F = g.shape
    TH, TW = (OH + 1) // 2, (OW + 1) // 2
    gp = work.get("dout.planes", (N, 2 * TH, 2, TW, F), g.dtype, zeros=True)   # zero rows/columns
    _to_column_planes(g, gp, 0, 0)                                             # up to whole blocks
    g0, g1 = gp[:, 0::2], gp[:, 1::2]                             # rows 0 and 1 of every 2x2 block
    r = work.get("dout.block_rows", (2, N, TH, 2, TW, F), g.dtype)
    np.add(g0, g1, out=r[0])
    np.subtract(g0, g1, out=r[1])
    U = work.get("dout.block_tiles", (4, 4, N, TH, TW, F), g.dtype)
    for xi, rows in enumerate((g0, r[0], r[1], g1)):              # A w A^T, A = (1 0; 1 1; 1 -1; 0 1)
        c0, c1 = rows[:, :, 0], rows[:, :, 1]
        np.copyto(U[xi, 0], c0)
        np.add(c0, c1, out=U[xi, 1])
        np.subtract(c0, c1, out=U[xi, 2])
        np.copyto(U[xi, 3], c1)
    Mw = np.matmul(U.reshape(16, -1, F).transpose(0, 2, 1), V)  # (16, F, C)
    Gs = _WINO_G * np.array([1, 1, 1, -1])[:, None]              # the folded sign
    GG = np.kron(Gs, Gs).astype(g.dtype)                          # (16, 9): G^T Mw G, flattened
    return (Mw.reshape(16, -1).T @ GG).reshape(F, -1, 3, 3)


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


# The vectorized cache: ``rows`` is x as an (m, C) matrix and ``center`` what is
# subtracted from it to get deviations (the mean, or 0 when ``rows`` is already centred).
BatchNormRowsCache = namedtuple("BatchNormRowsCache", "rows center gamma mean var inv_std")

# One-pass variance E[x^2] - mean^2 loses digits when |mean| >> std; beyond this
# ratio of mean^2 to variance (about 3 of float32's 7 digits lost) it is recomputed
# from the centred values.
_CANCELLATION = 1e3


def batchnorm_forward_vectorized(x, gamma, beta, eps=1e-5):
    """Statistics in one pass over X = ``as_rows(x)`` (m, C): the sums are the
    matrix-vector product 1^T X, the sums of squares one einsum (no temporary
    array), var = E[x^2] - mean^2; then y = X * scale + shift with scale =
    gamma / std and shift = beta - mean * scale, two passes. The cache keeps x
    itself, not xhat (no extra array)."""
    X = as_rows(x)
    m = X.shape[0]
    mean = _column_sums(X) / m
    var = np.einsum("ij,ij->j", X, X) / m - mean * mean
    rows, center = X, mean
    if np.any(mean * mean > _CANCELLATION * np.maximum(var, 0)):
        rows = X - mean                                      # two-pass: exact for any offset
        var, center = np.einsum("ij,ij->j", rows, rows) / m, np.zeros_like(mean)
    var = np.maximum(var, 0)
    inv_std = 1 / np.sqrt(var + eps)
    scale = gamma * inv_std
    y = rows * scale
    y += beta - center * scale
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
    dgamma = (np.einsum("ij,ij->j", G, X) - center * dbeta) * inv_std
    if not input_grad:
        return None, dgamma, dbeta
    a = gamma * inv_std
    b = -a * inv_std * dgamma / m
    dx = G * a
    dx += X * b
    dx += -a * dbeta / m - b * center
    return _from_rows(dx, dout), dgamma, dbeta


# Softmax, the output of the classifier (its gradient is in the loss, cnn_layers.SoftmaxCrossEntropy).

def softmax(logits):
    """Row-wise softmax of (N, K) logits; subtracting the row maximum avoids overflow."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
