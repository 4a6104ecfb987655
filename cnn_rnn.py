"""A recurrent layer written by hand: the GRU, with backpropagation through time.

Read it like ``cnn_core.py``: the gate equations first, then the *loop* version
that follows them one example and one time step at a time, then the
*vectorized* version that does the same maths fast, then the layer class.

1. the GRU maths: forward and backward, loop and vectorized,
2. the ``GRU`` layer (``return_sequences``, ``bidirectional``, orthogonal init) and
   ``StepDense``, one dense layer applied to every time step (a learned row encoder).

Conventions
-----------
* Sequences for this layer are (N, T, D): N examples, T time steps, D features
  per step; an image read row by row is (N, H, W*C) (``cnn_layers.rows_as_sequence``,
  ``RowsToSequence(layout="NTD")``): CIFAR-10 is 32 steps of 96 values.
* The forward functions return ``(out, cache)`` and the backward functions take
  ``(dout, cache)``, as in ``cnn_core``; ``out`` holds every hidden state (N, T, H).
* The three gates are stored side by side in one matrix, in the order
  (r, z, n): ``W[:, :H]`` belongs to the reset gate r, ``W[:, H:2H]`` to the
  update gate z and ``W[:, 2H:]`` to the candidate n.
* Only NumPy and the standard library (and the project's own modules) are used.
"""
from __future__ import annotations

import math
from collections import namedtuple

import numpy as np

from cnn_core import DEFAULT_DTYPE, check_input
from cnn_layers import Dense, Layer, Maths, ParamLayer, _check_impl

# ---------------------------------------------------------------------------
# 1. GRU maths
# ---------------------------------------------------------------------------
# Gated recurrent unit (Cho et al. 2014), in the form cuDNN and PyTorch use
# (the reset gate multiplies the recurrent product, so the three recurrent
# products of a step are one matrix product). For each time step t = 0..T-1,
# with h_{-1} = h0 (zeros unless given):
#
#   r_t = sigmoid(x_t W_r + b_r + h_{t-1} U_r)              reset gate     (N, H)
#   z_t = sigmoid(x_t W_z + b_z + h_{t-1} U_z)              update gate    (N, H)
#   n_t = tanh(x_t W_n + b_n + r_t * (h_{t-1} U_n + c))     candidate      (N, H)
#   h_t = (1 - z_t) * n_t + z_t * h_{t-1}                   hidden state   (N, H)
#
# x_t: (N, D); W = [W_r W_z W_n]: (D, 3H); U = [U_r U_z U_n]: (H, 3H);
# b = [b_r b_z b_n]: (3H,); c: (H,), the recurrent bias of the candidate
# (it sits inside r_t *, so it cannot be merged into b_n). z_t close to 1 keeps
# the old state, which is what lets a GRU carry information over many steps.
#
# Backward through time, from t = T-1 down to 0, with dh = dL/dh_t: the gradient
# of the loss through out[t] plus what step t+1 sends back (zero after the last step):
#   dn    = dh * (1 - z_t)                       da_n = dn * (1 - n_t^2)
#   dz    = dh * (h_{t-1} - n_t)                 da_z = dz * z_t * (1 - z_t)
#   dr    = da_n * (h_{t-1} U_n + c)             da_r = dr * r_t * (1 - r_t)
#   dg_n  = da_n * r_t                           (gradient of h_{t-1} U_n + c)
#   dW_g += x_t^T da_g,  db_g += sum_n da_g,  dx_t = sum_g da_g W_g^T     for g in r, z, n
#   dU_r += h_{t-1}^T da_r,  dU_z += h_{t-1}^T da_z,  dU_n += h_{t-1}^T dg_n,  dc += sum_n dg_n
#   dh_{t-1} = dh * z_t + da_r U_r^T + da_z U_z^T + dg_n U_n^T
# and dh0 = dh_{-1}. Every parameter's gradient is a sum over all time steps:
# that is backpropagation through time.

# What a GRU backward pass returns: the gradients of the input, the initial state and
# every parameter.
GRUGrads = namedtuple("GRUGrads", "dx dh0 dW dU db dc")


def sigmoid(a):
    """1 / (1 + exp(-a)) computed as (1 + tanh(a / 2)) / 2: equal, and it never overflows."""
    return 0.5 * np.tanh(0.5 * a) + 0.5


def _gates(m, H):
    """The (r, z, n) blocks of the last axis of a (..., 3H) array (views)."""
    return m[..., :H], m[..., H:2 * H], m[..., 2 * H:]


def _initial_state(h0, N, H, dtype):
    if h0 is None:
        return np.zeros((N, H), dtype=dtype)
    if np.shape(h0) != (N, H):
        raise ValueError(f"GRU: the initial state h0 must have shape (N, H) = {(N, H)}, got {np.shape(h0)}")
    return np.asarray(h0, dtype=dtype)


def gru_forward_loop(x, W, U, b, c, h0=None):
    """x: (N, T, D), W: (D, 3H), U: (H, 3H), b: (3H,), c: (H,), h0: (N, H) or None
    -> out: (N, T, H), every hidden state h_t; one example and one step at a time."""
    N, T, _ = x.shape
    H = U.shape[0]
    h0 = _initial_state(h0, N, H, x.dtype)
    W_r, W_z, W_n = _gates(W, H)
    U_r, U_z, U_n = _gates(U, H)
    b_r, b_z, b_n = _gates(b, H)
    out, r, z, n, hn = (np.empty((N, T, H), dtype=x.dtype) for _ in range(5))
    for i in range(N):
        h = h0[i]
        for t in range(T):
            x_t = x[i, t]
            r[i, t] = sigmoid(x_t @ W_r + b_r + h @ U_r)
            z[i, t] = sigmoid(x_t @ W_z + b_z + h @ U_z)
            hn[i, t] = h @ U_n + c
            n[i, t] = np.tanh(x_t @ W_n + b_n + r[i, t] * hn[i, t])
            h = (1 - z[i, t]) * n[i, t] + z[i, t] * h
            out[i, t] = h
    return out, (x, h0, W, U, out, r, z, n, hn)


def gru_backward_loop(dout, cache, input_grad=True):
    """dout: (N, T, H) -> GRUGrads(dx (N, T, D) or None, dh0 (N, H), dW, dU, db, dc),
    the equations above one example and one step at a time, last step first."""
    x, h0, W, U, out, r, z, n, hn = cache
    N, T, H = out.shape
    W_r, W_z, W_n = _gates(W, H)
    U_r, U_z, U_n = _gates(U, H)
    dx, dh0 = np.zeros_like(x), np.zeros_like(h0)
    dW, dU, db, dc = np.zeros_like(W), np.zeros_like(U), np.zeros(3 * H, dtype=W.dtype), np.zeros(H, dtype=W.dtype)
    dW_r, dW_z, dW_n = _gates(dW, H)
    dU_r, dU_z, dU_n = _gates(dU, H)
    db_r, db_z, db_n = _gates(db, H)
    for i in range(N):
        dh = np.zeros(H, dtype=dout.dtype)
        for t in reversed(range(T)):
            dh = dh + dout[i, t]
            h_prev = out[i, t - 1] if t > 0 else h0[i]
            r_t, z_t, n_t, x_t = r[i, t], z[i, t], n[i, t], x[i, t]
            da_n = dh * (1 - z_t) * (1 - n_t ** 2)
            da_z = dh * (h_prev - n_t) * z_t * (1 - z_t)
            da_r = da_n * hn[i, t] * r_t * (1 - r_t)
            dg_n = da_n * r_t
            dW_r += np.outer(x_t, da_r)
            dW_z += np.outer(x_t, da_z)
            dW_n += np.outer(x_t, da_n)
            db_r += da_r
            db_z += da_z
            db_n += da_n
            dx[i, t] = W_r @ da_r + W_z @ da_z + W_n @ da_n
            dU_r += np.outer(h_prev, da_r)
            dU_z += np.outer(h_prev, da_z)
            dU_n += np.outer(h_prev, dg_n)
            dc += dg_n
            dh = dh * z_t + U_r @ da_r + U_z @ da_z + U_n @ dg_n
        dh0[i] = dh
    return GRUGrads(dx if input_grad else None, dh0, dW, dU, db, dc)


def gru_forward_vectorized(x, W, U, b, c, h0=None):
    """The loop version's maths with the batch and the gates in matrix products.

    The input terms of all T steps are ONE product, A = x W + b: (T*N, D) @ (D, 3H);
    only the recurrence stays a loop over time, one (N, H) @ (H, 3H) product and
    a few in-place elementwise operations per step (r and z in one sigmoid).
    Work is time-major, (T, N, ...), so that each step reads contiguous blocks;
    out is returned as an (N, T, H) view of it.
    """
    N, T, D = x.shape
    H = U.shape[0]
    xt = np.ascontiguousarray(x.transpose(1, 0, 2))                  # (T, N, D)
    A = (xt.reshape(T * N, D) @ W).reshape(T, N, 3 * H)
    A += b
    hs = np.empty((T + 1, N, H), dtype=x.dtype)                       # h_{-1}, h_0, ..., h_{T-1}
    hs[0] = _initial_state(h0, N, H, x.dtype)
    rz, n, hn = np.empty((T, N, 2 * H), x.dtype), np.empty((T, N, H), x.dtype), np.empty((T, N, H), x.dtype)
    g = np.empty((N, 3 * H), dtype=x.dtype)
    for t in range(T):
        np.matmul(hs[t], U, out=g)                                    # h_{t-1} [U_r U_z U_n]
        s = rz[t]
        np.add(A[t, :, :2 * H], g[:, :2 * H], out=s)                   # r and z together:
        s *= 0.5                                                      # sigmoid(a) = tanh(a/2)/2 + 1/2
        np.tanh(s, out=s)
        s *= 0.5
        s += 0.5
        r, z = s[:, :H], s[:, H:]
        np.add(g[:, 2 * H:], c, out=hn[t])                            # h_{t-1} U_n + c
        n_t = n[t]
        np.multiply(r, hn[t], out=n_t)
        n_t += A[t, :, 2 * H:]
        np.tanh(n_t, out=n_t)
        h = hs[t + 1]                                                 # h_t = n_t + z_t (h_{t-1} - n_t)
        np.subtract(hs[t], n_t, out=h)
        h *= z
        h += n_t
    return hs[1:].transpose(1, 0, 2), (xt, W, U, hs, rz, n, hn)


def gru_backward_vectorized(dout, cache, input_grad=True):
    """Backward through time with the batch and the gates in matrix products.

    The factors of the chain rule that do not depend on dh (the gate
    derivatives) are computed for all steps at once before the loop; the loop
    over time then runs backwards with one (N, 3H) @ (3H, H) product and a few
    multiplications per step. The gradients of the step-shared weights are
    summed over all steps by single products at the end: dW = X^T dA,
    dU = H_prev^T dG, dx = dA W^T, with dA (T*N, 3H) the gate pre-activation
    gradients of every step and dG the same with dg_n in place of da_n.
    """
    xt, W, U, hs, rz, n, hn = cache
    T, N, D = xt.shape
    H = U.shape[0]
    r, z = rz[..., :H], rz[..., H:]                                   # (T, N, H) each
    da_n_per_dh = (1 - z) * (1 - n * n)                               # da_n = dh * this
    da_z_per_dh = (hs[:-1] - n) * z * (1 - z)                         # da_z = dh * this
    da_r_per_da_n = hn * r * (1 - r)                                  # da_r = da_n * this
    dout_t = dout.transpose(1, 0, 2)                                   # (T, N, H) view
    dA, dG = np.empty((T, N, 3 * H), dtype=W.dtype), np.empty((T, N, 3 * H), dtype=W.dtype)
    dh = np.zeros((N, H), dtype=W.dtype)
    for t in reversed(range(T)):
        dh += dout_t[t]
        da_r, da_z, da_n = _gates(dA[t], H)
        np.multiply(dh, da_n_per_dh[t], out=da_n)
        np.multiply(dh, da_z_per_dh[t], out=da_z)
        np.multiply(da_n, da_r_per_da_n[t], out=da_r)
        dG[t, :, :2 * H] = dA[t, :, :2 * H]
        np.multiply(da_n, r[t], out=dG[t, :, 2 * H:])                # dg_n
        dh *= z[t]
        dh += dG[t] @ U.T
    dA2, dG2 = dA.reshape(T * N, 3 * H), dG.reshape(T * N, 3 * H)
    dW = xt.reshape(T * N, D).T @ dA2
    dU = hs[:-1].reshape(T * N, H).T @ dG2
    db, dc = dA2.sum(axis=0), dG2[:, 2 * H:].sum(axis=0)
    dx = (dA2 @ W.T).reshape(T, N, D).transpose(1, 0, 2) if input_grad else None
    return GRUGrads(dx, dh, dW, dU, db, dc)


def gru_macs(N, T, D, H):
    """Multiply-adds of the matrix products of one GRU direction: (forward, backward).

    Forward: the input projection N*T*D*3H and the recurrent products N*T*H*3H;
    backward twice that (dW and dx; dU and dh). Elementwise work is not counted.
    """
    forward = N * T * 3 * H * (D + H)
    return forward, 2 * forward


# ---------------------------------------------------------------------------
# 2. The layer
# ---------------------------------------------------------------------------

def orthogonal(rng, n, dtype=DEFAULT_DTYPE):
    """A random n x n orthogonal matrix: Q of the QR factorisation of a Gaussian
    matrix, with the signs of R's diagonal moved into Q so that Q is uniformly
    distributed (Mezzadri 2007). All its singular values are 1, so repeated
    multiplication by it neither explodes nor vanishes a state vector."""
    Q, R = np.linalg.qr(rng.standard_normal((n, n)))
    return (Q * np.sign(np.diag(R))).astype(dtype)


class GRU(Layer):
    """Gated recurrent unit over sequences. x: (N, T, D) -> (N, H), the last
    hidden state, or (N, T, H) with ``return_sequences=True``.

    ``bidirectional=True`` adds a second GRU that reads the sequence backwards
    (time steps T-1..0) and concatenates the two: outputs (N, 2H) or (N, T, 2H),
    where the backward direction's output at step t has read steps t..T-1 and
    its "last" state is the one after step 0.

    ``params``: "W" (D, 3H) input weights, "U" (H, 3H) recurrent weights, "b"
    (3H,) and "c" (H,) biases, gates in the order (r, z, n) (see the equations
    above); the backward direction has the same four under "rev.W", "rev.U", ...
    Initialisation: W Glorot-uniform per gate (fan_in D, fan_out H), U
    orthogonal per gate, biases zero, all from ``seed``. Weight decay in
    ``cnn_train`` applies to keys ending in ``.W``: the input weights, not the
    orthogonal recurrent ones.
    """

    PARAM_NAMES = ("W", "U", "b", "c")
    functions = {"loop": Maths(gru_forward_loop, gru_backward_loop),
                 "vectorized": Maths(gru_forward_vectorized, gru_backward_vectorized)}

    def __init__(self, input_size, hidden_size, return_sequences=False, bidirectional=False,
                 impl="vectorized", seed=None, dtype=DEFAULT_DTYPE):
        super().__init__()
        self.input_size, self.hidden_size = int(input_size), int(hidden_size)
        if self.input_size < 1 or self.hidden_size < 1:
            raise ValueError(f"GRU sizes must be >= 1, got input_size={input_size}, hidden_size={hidden_size}")
        self.return_sequences, self.bidirectional = bool(return_sequences), bool(bidirectional)
        self.impl = _check_impl(impl)
        D, H = self.input_size, self.hidden_size
        shapes = {"W": (D, 3 * H), "U": (H, 3 * H), "b": (3 * H,), "c": (H,)}
        self.params = {prefix + name: np.zeros(shape, dtype=dtype)
                       for prefix in self.directions() for name, shape in shapes.items()}
        self.initialize(np.random.default_rng(seed))

    def directions(self):
        """Parameter-name prefixes: "" for the forward direction, "rev." for the backward one."""
        return ("", "rev.") if self.bidirectional else ("",)

    def initialize(self, rng):
        D, H = self.input_size, self.hidden_size
        limit = math.sqrt(6.0 / (D + H))
        for prefix in self.directions():
            p = self.params
            p[prefix + "W"][...] = rng.uniform(-limit, limit, (D, 3 * H))
            for block in _gates(p[prefix + "U"], H):
                block[...] = orthogonal(rng, H)
            p[prefix + "b"][...] = 0
            p[prefix + "c"][...] = 0

    @property
    def dtype(self):
        return self.params["W"].dtype

    def config(self):
        return dict(input_size=self.input_size, hidden_size=self.hidden_size,
                    return_sequences=self.return_sequences, bidirectional=self.bidirectional, impl=self.impl)

    def label(self):
        kind = "bidirectional GRU" if self.bidirectional else "GRU"
        return f"{kind} {self.input_size}->{self.hidden_size}" + (" sequences" if self.return_sequences else "")

    def check(self, x):
        check_input(x, "GRU", "NTD")
        if x.shape[1] == 0:
            raise ValueError(f"GRU: the sequence has no time steps, shape {x.shape}")
        if x.shape[2] != self.input_size:
            raise ValueError(f"GRU: expected {self.input_size} features per time step (N, T, D), got shape "
                             f"{x.shape}; images need RowsToSequence(layout='NTD') first")

    def _weights(self, prefix):
        return [self.params[prefix + name] for name in self.PARAM_NAMES]

    def forward(self, x, training=True):
        self.check(x)
        x = x.astype(self.dtype, copy=False)
        forward = self.functions[self.impl].forward
        outs, caches = [], []
        for prefix in self.directions():
            # the backward direction is the same GRU run on the time-reversed sequence
            out, cache = forward(x if prefix == "" else x[:, ::-1], *self._weights(prefix))
            outs.append(out if prefix == "" else out[:, ::-1])        # back in input order
            caches.append(cache)
        self._cache = (x.shape, caches) if training else None
        if self.return_sequences:
            return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=2)
        # the last state of each direction: step T-1 forwards, step 0 for the reversed reading
        last = [outs[0][:, -1]] + [out[:, 0] for out in outs[1:]]
        return last[0] if len(last) == 1 else np.concatenate(last, axis=1)

    def backward(self, dout, input_grad=True):
        """Fill ``grads`` and return dx (N, T, D) (None when ``input_grad`` is False)."""
        (N, T, _), caches = self._cached()
        H = self.hidden_size
        backward = self.functions[self.impl].backward
        dx = None
        for k, (prefix, cache) in enumerate(zip(self.directions(), caches)):
            d = dout[..., k * H:(k + 1) * H]
            if not self.return_sequences:                             # only the last state reached the loss
                d_last, d = d, np.zeros((N, T, H), dtype=dout.dtype)
                d[:, -1 if prefix == "" else 0] = d_last
            grads = backward(d if prefix == "" else d[:, ::-1], cache, input_grad)
            self.grads.update({prefix + name: grad for name, grad in
                               zip(self.PARAM_NAMES, (grads.dW, grads.dU, grads.db, grads.dc))})
            if input_grad:
                d_x = grads.dx if prefix == "" else grads.dx[:, ::-1]
                dx = d_x if dx is None else dx + d_x
        return dx


def _per_step(maths):
    """Turn dense maths on (N, D) into the same maths on every step of (N, T, D):
    the N*T steps are N*T rows of one (N*T, D) matrix, so the loop and vectorized
    dense code serve unchanged (as ``cnn_layers`` does for Conv1D)."""
    def forward(x, W, b):
        N, T, D = x.shape
        out, cache = maths.forward(x.reshape(N * T, D), W, b)
        return out.reshape(N, T, -1), (cache, N, T)

    def backward(dout, cache, input_grad=True):
        inner, N, T = cache
        dx, dW, db = maths.backward(dout.reshape(N * T, -1), inner, input_grad)
        return (None if dx is None else dx.reshape(N, T, -1)), dW, db

    return Maths(forward, backward)


class StepDense(ParamLayer):
    """The same fully connected layer applied to every time step.
    x: (N, T, in_features) -> (N, T, out_features): out[n, t] = x[n, t] W + b.

    Followed by a ReLU it is a learned, non-linear encoder of each row before
    the recurrence (it sees one row at a time: only the GRU relates rows).
    ``params["W"]``: (in_features, out_features), ``params["b"]``: (out_features,).
    """
    functions = {impl: _per_step(maths) for impl, maths in Dense.functions.items()}

    def __init__(self, in_features, out_features, impl="vectorized", init="he", seed=None,
                 dtype=DEFAULT_DTYPE):
        self.in_features, self.out_features = int(in_features), int(out_features)
        if self.in_features < 1 or self.out_features < 1:
            raise ValueError(f"StepDense sizes must be >= 1, got {in_features}, {out_features}")
        super().__init__((in_features, out_features), in_features, out_features, out_features,
                         impl, init, seed, dtype)

    def config(self):
        return dict(in_features=self.in_features, out_features=self.out_features, impl=self.impl)

    def check(self, x):
        check_input(x, "StepDense", "NTD")
        if x.shape[2] != self.in_features:
            raise ValueError(f"StepDense: expected {self.in_features} features per time step (N, T, D), "
                             f"got shape {x.shape}")

    def label(self):
        return f"StepDense {self.in_features}->{self.out_features}"
