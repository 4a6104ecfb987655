"""Training: optimisers, learning-rate schedules, augmentation, the training
loop ``fit`` with checkpoints and exact resume, and ``evaluate``."""
from __future__ import annotations

import json
import math
import numbers
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from cnn_core import _pad, check_labels
from cnn_files import save_npz
from cnn_layers import Dropout, SoftmaxCrossEntropy
from cnn_model import (NotAnArchiveError, Sequential, _describe_arrays, as_batch_array, check_batch_size,
                       check_finite, check_tta, prepare_batch, read_npz)

# ---------------------------------------------------------------------------
# Argument checks: a bad hyperparameter fails at construction, not as NaN weights later
# ---------------------------------------------------------------------------

def _check_number(where, name, value, minimum=0.0, strict=True, below=None):
    """``float(value)`` if it is a finite real number > ``minimum`` (>= when not
    ``strict``) and < ``below`` (when given); otherwise ``ValueError`` naming it."""
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
          and (value > minimum if strict else value >= minimum) and (below is None or value < below))
    if not ok:
        if below is not None:
            rule = f"a number in {'(' if strict else '['}{minimum:g}, {below:g})"
        else:
            rule = f"a finite number {'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"{where}: {name} must be {rule}, got {value!r}")
    return float(value)


def _check_positive_int(where, name, value):
    """``int(value)`` if it is an integer >= 1 (not a float, not a bool); otherwise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------
# Optimisers
# ---------------------------------------------------------------------------

class Optimizer:
    """Updates parameters in place from ``model.parameters()``.

    Weight decay applies to weights ``W`` only (not biases): shrinking biases
    does not reduce overfitting and can hurt. Frozen layers (``trainable =
    False``) are skipped: no update, no weight decay, no state.
    ``lr_scale``: learning-rate multipliers by parameter name, e.g. ``{"beta": 8}``
    trains every BatchNorm shift ``beta`` at 8 times ``lr`` (airbench trains them
    at 64 times: a shift moves a whole channel, and its gradient is small).
    """

    def __init__(self, lr, weight_decay=0.0, lr_scale=None):
        where = type(self).__name__
        self.lr = _check_number(where, "lr", lr)
        self.weight_decay = _check_number(where, "weight_decay", weight_decay, strict=False)
        if lr_scale is not None and not isinstance(lr_scale, dict):
            raise ValueError(f"{where}: lr_scale must be a dict {{parameter name: multiplier}} such as "
                             f"{{'beta': 8}}, got {lr_scale!r}")
        self.lr_scale = {str(name): _check_number(where, f"lr_scale[{name!r}]", scale)
                         for name, scale in (lr_scale or {}).items()}
        self.state = {}            # per-parameter buffers, keyed like model.parameters()
        self.steps = 0

    def step(self, model):
        params = [(key, key.split(".", 1)[1], param, grad)         # key: "<layer index>.<name>"
                  for key, param, grad in model.parameters(trainable_only=True)]
        names = {name for _, name, _, _ in params}
        if not set(self.lr_scale) <= names:     # a typo would otherwise train at the plain rate, silently
            raise ValueError(f"{type(self).__name__}: lr_scale names {sorted(set(self.lr_scale) - names)}, "
                             f"which no trainable parameter has; the model's are {sorted(names)}")
        self.steps += 1
        for key, name, param, grad in params:
            if grad is None:
                raise RuntimeError(f"{type(self).__name__}: no gradient for {key}; call backward() first")
            self.update(key, param, grad, decay=self.weight_decay if name == "W" else 0.0,
                        lr=self.lr * self.lr_scale.get(name, 1.0))

    def buffer_names(self):
        """Names of the per-parameter buffers this optimiser keeps in ``state``."""
        return ()

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

    def __init__(self, lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0, lr_scale=None):
        super().__init__(lr, weight_decay, lr_scale)
        self.momentum = _check_number("SGD", "momentum", momentum, strict=False, below=1)
        if nesterov and momentum == 0:
            raise ValueError("SGD: Nesterov momentum needs momentum > 0")
        self.nesterov = bool(nesterov)

    def buffer_names(self):
        return ("velocity",) if self.momentum else ()

    def update(self, key, param, grad, decay, lr):
        g = grad + decay * param if decay else grad
        if self.momentum == 0:
            param -= lr * g
            return
        v = self._buffer("velocity", key, param)
        v *= self.momentum
        v -= lr * g
        param += self.momentum * v - lr * g if self.nesterov else v


class Adam(Optimizer):
    """Adam (Kingma & Ba) with decoupled weight decay (AdamW, Loshchilov & Hutter).

    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
    W -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + lr * wd * W.
    """

    def __init__(self, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, lr_scale=None):
        super().__init__(lr, weight_decay, lr_scale)
        self.beta1 = _check_number("Adam", "beta1", beta1, strict=False, below=1)
        self.beta2 = _check_number("Adam", "beta2", beta2, strict=False, below=1)
        self.eps = _check_number("Adam", "eps", eps)

    def buffer_names(self):
        return ("m", "v")

    def update(self, key, param, grad, decay, lr):
        m, v = self._buffer("m", key, param), self._buffer("v", key, param)
        m *= self.beta1
        m += (1 - self.beta1) * grad
        v *= self.beta2
        v += (1 - self.beta2) * grad * grad
        m_hat_scale = 1 / (1 - self.beta1 ** self.steps)
        v_hat_scale = 1 / (1 - self.beta2 ** self.steps)
        if decay:
            param -= lr * decay * param
        param -= lr * m_hat_scale * m / (np.sqrt(v * v_hat_scale) + self.eps)


# ---------------------------------------------------------------------------
# Learning-rate schedules and gradient clipping
# ---------------------------------------------------------------------------

def step_schedule(lr, step_size, gamma=0.1):
    """Learning rate for epoch e (0-based): lr * gamma ** (e // step_size)."""
    lr = _check_number("step_schedule", "lr", lr)
    step_size = _check_positive_int("step_schedule", "step_size", step_size)
    gamma = _check_number("step_schedule", "gamma", gamma)
    return lambda epoch: lr * gamma ** (epoch // step_size)


def cosine_schedule(lr, epochs, lr_min=0.0):
    """Learning rate for epoch e: lr_min + (lr - lr_min) * (1 + cos(pi * e / epochs)) / 2."""
    lr = _check_number("cosine_schedule", "lr", lr)
    epochs = _check_positive_int("cosine_schedule", "epochs", epochs)
    lr_min = _check_number("cosine_schedule", "lr_min", lr_min, strict=False)

    def schedule(epoch):
        return lr_min + (lr - lr_min) * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    schedule.settings = dict(lr=lr, epochs=epochs, lr_min=lr_min)     # recorded with a saved run
    return schedule


def warmup_linear_schedule(lr, epochs, warmup=0.2):
    """A per-step schedule: linear warm-up, then linear decay to 0 (a triangle).

    lr(t) = lr * t / T_w for t < T_w, else lr * (epochs - t) / (epochs - T_w),
    where t in [0, epochs) is the fractional epoch and T_w = ``warmup`` * epochs
    (``warmup`` in [0, 1): the fraction of training spent warming up; 0: none).
    The returned function has ``per_step = True``: ``fit`` sets the learning
    rate before every batch b of epoch e to lr(e + b / batches), so it rises
    from 0 (the very first step) to ``lr`` step by step instead of in a few
    large jumps: warm-up keeps the first updates, made while the gradient
    statistics of a fresh network are still wild, from throwing it off.
    """
    lr = _check_number("warmup_linear_schedule", "lr", lr)
    epochs = _check_positive_int("warmup_linear_schedule", "epochs", epochs)
    warmup = _check_number("warmup_linear_schedule", "warmup", warmup, strict=False, below=1)
    peak = warmup * epochs

    def schedule(t):
        return lr * t / peak if t < peak else lr * max(0.0, epochs - t) / (epochs - peak)
    schedule.per_step, schedule.settings = True, dict(lr=lr, epochs=epochs, warmup=warmup)
    return schedule


def is_per_step(schedule):
    """True for a schedule that ``fit`` calls before every batch with a fractional
    epoch (``schedule.per_step`` is true), False for one called once per epoch."""
    return bool(getattr(schedule, "per_step", False))


def clip_gradients(model, clip_norm):
    """Clip by global norm: scale every gradient of ``model`` in place by
    min(1, clip_norm / ||g||), where ||g|| = sqrt(sum over all parameters of
    sum(grad ** 2)), so the update keeps its direction but its gradient norm is
    at most ``clip_norm``. Call between ``backward`` and ``optimizer.step``.

    Frozen layers (``trainable = False``) are left out of the norm and not scaled.
    Returns ||g|| before clipping. Raises ``FloatingPointError`` when a gradient
    is NaN or infinite (no scaling can repair it).
    """
    clip_norm = _check_number("clip_gradients", "clip_norm", clip_norm)
    grads = [grad for _, _, grad in model.parameters(trainable_only=True) if grad is not None]
    # float64 sums: a float32 sum of squares overflows for gradients near 1e19
    norm = math.sqrt(sum(float(np.vdot(g64, g64)) for g64 in (g.astype(np.float64) for g in grads)))
    if not math.isfinite(norm):
        raise FloatingPointError(f"the gradient norm is {norm}: some gradient is NaN or infinite")
    if norm > clip_norm:
        for grad in grads:
            grad *= clip_norm / norm
    return norm


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------

def evaluate(model, x, y, batch_size=64, tta=None):
    """Mean cross-entropy and accuracy of ``model`` on (x, y), in batches.

    x: (N, ...) floats or uint8 images 0..255 (scaled batch by batch, as in
    ``fit``); y: (N,) integer labels. NaN or inf in x raises ``ValueError``.
    ``tta="flip"``, ``"shift"`` or ``"flip+shift"``: test-time augmentation, loss and
    prediction from the mean of the LOGITS of each image and its left-right mirror,
    its four one-pixel shifts, or both (``Sequential.logits``); None (the default): none.
    """
    x, y = as_batch_array(x, "evaluate"), as_batch_array(y, "evaluate", "y")
    check_batch_size(batch_size, "evaluate")
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"evaluate: need as many labels as inputs and at least one, got x {x.shape}, y {y.shape}")
    check_tta(tta, x, "evaluate")
    check_finite(x, "evaluate")
    return _evaluate(model, x, y, batch_size, tta)


def _evaluate(model, x, y, batch_size, tta=None):
    """``evaluate`` without the argument checks (``fit`` makes them once, before training)."""
    loss_fn, total_loss, correct, dtype = SoftmaxCrossEntropy(), 0.0, 0, model.dtype
    for i in range(0, len(x), batch_size):
        logits = model.logits(prepare_batch(x[i:i + batch_size], dtype), tta)
        yb = y[i:i + batch_size]
        total_loss += loss_fn.forward(logits, yb) * len(yb)
        correct += int((logits.argmax(axis=1) == yb).sum())
    return total_loss / len(x), correct / len(x)


# ---------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------


PADDING_MODES = ("zeros", "reflect")


def random_crop(x, rng, padding, mode="zeros"):
    """Shift each image by up to ``padding`` pixels: pad, then cut a random (H, W)
    window per image. x: (N, C, H, W) -> (N, C, H, W). ``mode``: "zeros" (the border
    is 0, the mean of standardised images) or "reflect" (the image mirrored about its
    edge rows and columns, as airbench pads: no flat border the test images lack)."""
    if mode not in PADDING_MODES:
        raise ValueError(f"random_crop: mode must be one of {PADDING_MODES}, got {mode!r}")
    N, _, H, W = x.shape
    if mode == "reflect" and padding:
        xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), mode="reflect")
    else:
        xp = _pad(x, (padding, padding))
    windows = sliding_window_view(xp, (H, W), axis=(2, 3))           # (N, C, 2p+1, 2p+1, H, W)
    dy, dx = rng.integers(0, 2 * padding + 1, size=(2, N))
    return windows[np.arange(N), :, dy, dx]


def random_flip(x, rng):
    """Mirror a random half of the images left-right. x: (N, C, H, W)."""
    return mirror(x, rng.random(len(x)) < 0.5)


def mirror(x, which):
    """x (N, C, H, W) with the images where ``which`` (N,) bool is True mirrored left-right."""
    out = x.copy()
    out[which] = x[which, :, :, ::-1]
    return out


def alternating_flips(index, epoch, seed=0):
    """Which of the training images ``index`` (ints) to mirror in ``epoch``: a fixed
    pseudo-random half in even epochs (bit(i) = 1, a hash of i and ``seed``), the other
    half in odd ones. Every image is seen mirrored every other epoch, where random flips
    show half the images the same way as in the epoch before, a view the network has
    just learnt from (airbench's derandomized flips, Jordan 2024). Returns (len(index),) bool."""
    z = np.asarray(index, dtype=np.uint64) + np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)   # arrays wrap silently
    for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):   # splitmix64's finaliser:
        z = (z ^ (z >> np.uint64(shift))) * np.uint64(factor)                       # every bit of the index
    bit = (z ^ (z >> np.uint64(31))) >> np.uint64(63)                               # sways the top bit
    return (bit == 1) != bool(epoch % 2)


def affine(x, angle, zoom):
    """Rotate image n of x (N, C, H, W) by ``angle[n]`` radians (clockwise as shown,
    rows running down) and magnify it by ``zoom[n]`` > 0 about its centre
    c = ((H-1)/2, (W-1)/2): output pixel q reads the input at
    p = c + R(angle) (q - c) / zoom, bilinearly interpolated, zero outside the image.
    angle, zoom: (N,) or scalars. Returns (N, C, H, W) in x's float dtype (float32 for
    integer images); angle 0, zoom 1 gives x's values (for finite x)."""
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"affine: x must be images (N, C, H, W), got shape {x.shape}")
    N, C, H, W = x.shape
    try:
        angle, zoom = (np.broadcast_to(np.asarray(v, dtype=np.float64), (N,)) for v in (angle, zoom))
    except ValueError:
        raise ValueError(f"affine: angle and zoom must be scalars or one per image ({N},), got shapes "
                         f"{np.shape(angle)} and {np.shape(zoom)}") from None
    if not (np.isfinite(angle).all() and np.isfinite(zoom).all() and (zoom > 0).all()):
        raise ValueError("affine: angles must be finite and zooms finite and > 0")
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom               # (N,)
    i = np.arange(H, dtype=np.float64)[:, None] - (H - 1) / 2           # (H, 1) rows from the centre
    j = np.arange(W, dtype=np.float64)[None, :] - (W - 1) / 2           # (1, W) columns
    py = (H - 1) / 2 + cos[:, None, None] * i - sin[:, None, None] * j  # (N, H, W) source row
    px = (W - 1) / 2 + sin[:, None, None] * i + cos[:, None, None] * j  # source column
    y0, x0 = np.floor(py), np.floor(px)
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32   # uint8 weights would be 0
    wy, wx = (py - y0).astype(dtype), (px - x0).astype(dtype)
    # One zero pixel around the image: every source index is clipped into the
    # padded image, and a corner that falls outside the image lands on a zero.
    xp = _pad(x, (1, 1)).reshape(N, C, (H + 2) * (W + 2))
    rows = [np.clip(y0 + d, 0, H + 1).astype(np.intp) for d in (1, 2)]  # padded index of y0, y0 + 1
    cols = [np.clip(x0 + d, 0, W + 1).astype(np.intp) for d in (1, 2)]

    def at(r, c):                                                       # (N, C, H, W) gathered pixels
        flat = (r * (W + 2) + c).reshape(N, 1, H * W)
        return np.take_along_axis(xp, flat, axis=2).reshape(N, C, H, W)

    wy, wx = wy[:, None], wx[:, None]
    top = at(rows[0], cols[0]) * (1 - wx) + at(rows[0], cols[1]) * wx
    bottom = at(rows[1], cols[0]) * (1 - wx) + at(rows[1], cols[1]) * wx
    return top * (1 - wy) + bottom * wy


def random_affine(x, rng, degrees, zoom):
    """Rotate each image by a random angle of up to ``degrees`` either way and
    magnify it by a random factor in [1 - zoom, 1 + zoom] (``affine``).
    x: (N, C, H, W) -> (N, C, H, W)."""
    angle = np.deg2rad(rng.uniform(-degrees, degrees, len(x)))
    return affine(x, angle, rng.uniform(1 - zoom, 1 + zoom, len(x)))


def augmentation(crop=0, flip=False, rotate=0, zoom=0, pad="zeros", seed=0):
    """An ``augment(x, rng)`` for ``fit``: random rotations of up to ``rotate``
    degrees and zooms by up to ``zoom`` (a fraction: 0.1 = 10 %) (``random_affine``),
    then random shifts of up to ``crop`` pixels (the border filled as ``pad`` says,
    ``random_crop``'s mode) and, if ``flip``, horizontal mirroring (not for
    digits: a mirrored 2 is no 2): a random half of each batch (``flip=True``), or
    with ``flip="alternate"`` each image every other epoch (``alternating_flips``
    with ``seed``: ``fit`` then calls ``augment(x, rng, index=, epoch=)``, the batch's
    image indices and the epoch)."""
    if isinstance(crop, bool) or not isinstance(crop, (int, np.integer)) or crop < 0:
        raise ValueError(f"augmentation: crop (the largest shift, in pixels) must be an integer >= 0, got {crop!r}")
    if not (isinstance(flip, (bool, np.bool_)) or (isinstance(flip, str) and flip == "alternate")):
        raise ValueError(f"augmentation: flip must be True, False or 'alternate', got {flip!r}")
    crop, flip = int(crop), (flip if isinstance(flip, str) else bool(flip))
    rotate = _check_number("augmentation", "rotate (the largest angle, in degrees)", rotate, strict=False, below=180)
    zoom = _check_number("augmentation", "zoom (the largest change of size, a fraction)", zoom, strict=False, below=1)
    if pad not in PADDING_MODES:
        raise ValueError(f"augmentation: pad must be one of {PADDING_MODES}, got {pad!r}")

    def augment(x, rng, index=None, epoch=None):
        if rotate or zoom:
            x = random_affine(x, rng, rotate, zoom)
        if crop:
            x = random_crop(x, rng, crop, pad)
        if flip == "alternate":
            if index is None or epoch is None:
                raise ValueError("augmentation(flip='alternate'): call augment(x, rng, index=, epoch=) "
                                 "with the batch's image indices and the epoch (fit does)")
            return mirror(x, alternating_flips(index, epoch, seed))
        return random_flip(x, rng) if flip else x
    augment.by_image = flip == "alternate"                             # fit passes index= and epoch=
    augment.settings = dict(crop=crop, flip=flip)                      # recorded with a saved run
    if rotate or zoom:              # only when used: runs saved before these existed still match
        augment.settings.update(rotate=rotate, zoom=zoom)
    if pad != "zeros":
        augment.settings.update(pad=pad)
    if flip == "alternate":
        augment.settings.update(seed=seed)
    return augment


# ---------------------------------------------------------------------------
# Weight averaging
# ---------------------------------------------------------------------------

def _state(model):
    """Yield ``(key, array)`` for every parameter ('param.i.name') and buffer ('buffer.i.name')
    of ``model``, the arrays themselves (looked up afresh: layers may swap their dicts)."""
    for i, layer in enumerate(model.layers):
        for kind, arrays in (("param", layer.params), ("buffer", layer.buffers)):
            for name, array in arrays.items():
                yield f"{kind}.{i}.{name}", array


class WeightAverage:
    """Exponential moving average (EMA) of a model's weights: every parameter
    and every buffer (batch-norm running statistics), updated after EVERY
    optimiser step (``update``):

        avg = d_t * avg + (1 - d_t) * w,   d_t = min(decay, (1 + t) / (10 + t)),

    t = number of updates before this one. The ramp (1 + t) / (10 + t) (as in
    TensorFlow's ExponentialMovingAverage) lets the average forget the random
    initial weights quickly; later d_t = ``decay``, an average over the last
    ~1 / (1 - decay) steps. The average of a noisy SGD trajectory lies nearer
    the middle of the valley than the last point does, so it usually
    generalises a little better (Polyak averaging). ``applied(model)`` puts
    the averages into the model for a while (e.g. to validate).
    """

    def __init__(self, model, decay):
        self.decay = _check_number("WeightAverage", "decay", decay, below=1)
        self.updates = 0
        self.arrays = {key: array.copy() for key, array in _state(model)}

    def update(self, model):
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        for key, array in _state(model):
            avg = self.arrays[key]
            avg += (1 - d) * (array - avg)

    def copy_to(self, model):
        """Overwrite the model's parameters and buffers with the averages."""
        for key, array in _state(model):
            array[...] = self.arrays[key]

    class _Applied:
        def __init__(self, average, model):
            self.average, self.model = average, model

        def __enter__(self):
            self.saved = {key: array.copy() for key, array in _state(self.model)}
            self.average.copy_to(self.model)
            return self.model

        def __exit__(self, *exc):
            for key, array in _state(self.model):
                array[...] = self.saved[key]          # bit for bit the weights training goes on from
            return False

    def applied(self, model):
        """A context manager: inside ``with average.applied(model):`` the model holds
        the averaged weights; on leaving it gets its own weights back exactly."""
        return self._Applied(self, model)

    def state_arrays(self):
        arrays = {f"ema.{key}": avg for key, avg in self.arrays.items()}
        arrays["ema.updates"] = np.array(self.updates)
        return arrays

    def check_state_arrays(self, arrays):
        """A problem with the averages in checkpoint ``arrays`` (a sentence), or None."""
        if "ema.updates" not in arrays:
            return "it has no weight averages (it was written by a run without ema)"
        for key, avg in self.arrays.items():
            saved = arrays.get(f"ema.{key}")
            if saved is None or saved.shape != avg.shape or not np.isfinite(saved).all():
                return f"its weight average ema.{key} is missing, of another shape or not finite"
        return None

    def load_state_arrays(self, arrays):
        self.updates = int(arrays["ema.updates"])
        self.arrays = {key: np.array(arrays[f"ema.{key}"]) for key in self.arrays}


# ---------------------------------------------------------------------------
# Training loop, checkpoints
# ---------------------------------------------------------------------------

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


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed; the message names the file and what to do."""


def _checkpoint_error(path, problem, foreign=False):
    """A damaged checkpoint may be deleted; a file that is something else (``foreign``) is not ours to delete."""
    remedy = ("Pass fit a checkpoint path of its own (fit creates the file); delete this one only if "
              "you no longer need it" if foreign else "Delete it to start training over, or pass another "
              "checkpoint path")
    return CheckpointError(f"checkpoint {path} cannot be resumed: {problem}. {remedy}")


def _checkpoint_arrays(model, optimizer, history, epoch, rng, average=None):
    arrays = model.state_arrays()
    arrays.update(optimizer.state_arrays())
    if average is not None:
        arrays.update(average.state_arrays())
    dropout_rngs = {str(i): layer.rng.bit_generator.state
                    for i, layer in enumerate(model.layers) if isinstance(layer, Dropout)}
    arrays["training"] = np.array(json.dumps({
        "epoch": epoch, "history": history.as_dict(), "rng": rng.bit_generator.state,
        "dropout_rngs": dropout_rngs, "optimizer": type(optimizer).__name__,
        "ema": None if average is None else average.decay}))
    return arrays


def _optimizer_buffers(arrays):
    """Buffer names ("m", "velocity", ...) of the optimiser state held in checkpoint ``arrays``."""
    return {name.split(".")[1] for name in arrays if name.startswith("opt.") and name != "opt.steps"}


def _restore_checkpoint(path, model, optimizer, rng, average=None):
    """Load a checkpoint written by ``fit`` into model, optimiser, generators and
    (with ``average``, a ``WeightAverage``) the weight averages.

    Everything is checked before anything is changed; every problem raises
    ``CheckpointError`` naming the file and the way out.
    """
    try:
        arrays = read_npz(path)
    except ValueError as err:
        raise _checkpoint_error(path, err, foreign=isinstance(err, NotAnArchiveError)) from None
    if "training" not in arrays or "opt.steps" not in arrays:
        if "architecture" in arrays:
            raise _checkpoint_error(path, "it is a saved model (model.save), not a training checkpoint: it has "
                                          "no optimiser or training state. To train on from its weights, build "
                                          "the model with Sequential.load(path)", foreign=True)
        raise _checkpoint_error(path, f"it is not a training checkpoint: it holds {_describe_arrays(arrays)}",
                                foreign=True)
    try:
        training = json.loads(str(arrays["training"]))
        epoch, history = int(training["epoch"]), History(**training["history"])
        np.random.default_rng().bit_generator.state = training["rng"]       # a valid generator state?
        dropout_rngs = {int(index): state for index, state in training["dropout_rngs"].items()}
        saved = Sequential.from_arrays(arrays)
        int(arrays["opt.steps"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise _checkpoint_error(path, f"its training record is damaged ({type(err).__name__}: {err})") from err
    if [repr(layer) for layer in saved.layers] != [repr(layer) for layer in model.layers]:
        raise CheckpointError(f"checkpoint {path} holds a different architecture; "
                              "delete it or pass a new checkpoint path")
    for key, param, _ in saved.parameters():
        if not np.isfinite(param).all():
            raise _checkpoint_error(path, f"its parameter {key} is not finite (written by a diverged run)")
    buffers, name = _optimizer_buffers(arrays), type(optimizer).__name__
    # Checkpoints before the optimiser's name was recorded: Adam is the one with "m" and "v".
    written_with = training.get("optimizer") or ("Adam" if buffers & {"m", "v"} else "SGD")
    if written_with != name or not buffers <= set(optimizer.buffer_names()):
        def state(names):
            return f"state: {', '.join(sorted(names))}" if names else "no state"
        raise _checkpoint_error(path, f"it was written by {written_with} ({state(buffers)}), but fit was given "
                                      f"{name} ({state(optimizer.buffer_names())}); resuming would drop the "
                                      "optimiser state or misread it. Resume with the same optimiser and settings")
    written_ema, given_ema = training.get("ema"), None if average is None else average.decay
    if written_ema != given_ema:
        raise _checkpoint_error(path, f"it was written by a run with ema={written_ema}, but fit was given "
                                      f"ema={given_ema}. Resume with the same ema setting")
    problem = None if average is None else average.check_state_arrays(arrays)
    if problem:
        raise _checkpoint_error(path, problem)
    for layer, saved_layer in zip(model.layers, saved.layers):
        layer.params, layer.buffers = saved_layer.params, saved_layer.buffers
    optimizer.load_state_arrays(arrays)
    if average is not None:
        average.load_state_arrays(arrays)
    rng.bit_generator.state = training["rng"]
    for index, state in dropout_rngs.items():
        model.layers[index].rng.bit_generator.state = state
    return epoch, history


def _check_fit_arguments(model, x, y, optimizer, epochs, batch_size, validation, schedule, clip_norm,
                         label_smoothing=0.0, ema=None):
    """Every check ``fit`` can make before training, so bad arguments fail in
    milliseconds rather than after an epoch. Returns x, y, validation as arrays
    (validation None when it is empty) and the learning rates: None without a
    schedule, else one per epoch (a number), or for a per-step schedule one list
    per epoch with the rate of every batch."""
    if isinstance(optimizer, type) or not hasattr(optimizer, "step"):
        raise TypeError(f"fit: optimizer must be an optimiser object such as T.Adam(1e-3), got {optimizer!r}")
    epochs = _check_positive_int("fit", "epochs", epochs)
    check_batch_size(batch_size, "fit")
    if clip_norm is not None:
        _check_number("fit", "clip_norm", clip_norm)
    _check_number("fit", "label_smoothing", label_smoothing, strict=False, below=1)
    if ema is not None:
        _check_number("fit", "ema (the decay of the weight average)", ema, below=1)
    x, y = as_batch_array(x, "fit"), as_batch_array(y, "fit", "y")
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"fit: need as many labels as inputs and at least one, got x {np.shape(x)}, y {np.shape(y)}")
    # One example through the network: a wrong shape or dtype fails now, with the layer's message,
    # and the output tells the number of classes the labels must fit.
    num_classes = model.forward(prepare_batch(x[:1], model.dtype), training=False).shape[-1]
    check_labels(y, len(y), num_classes, "fit: y")
    check_finite(x, "fit")
    if validation is not None:
        if not isinstance(validation, (tuple, list)) or len(validation) != 2:
            raise TypeError(f"fit: validation must be a pair (x_val, y_val) or None, got {type(validation).__name__}")
        x_val = as_batch_array(validation[0], "fit", "validation x")
        y_val = as_batch_array(validation[1], "fit", "validation y")
        if len(x_val) == 0 and len(y_val) == 0:
            warnings.warn("fit: the validation set is empty (0 examples), so this run is not validated and "
                          "history.val_loss / val_acc stay empty. Pass validation=None to say so, or split "
                          "off a validation set (e.g. validation_size=5000 when loading the data)", stacklevel=3)
            validation = None
        else:
            if len(x_val) != len(y_val):
                raise ValueError(f"fit: the validation set has {len(x_val)} inputs but {len(y_val)} labels")
            if x_val.shape[1:] != x.shape[1:]:
                raise ValueError(f"fit: validation examples have shape {x_val.shape[1:]} but training examples "
                                 f"{x.shape[1:]}; both must come from the same dataset")
            model.forward(prepare_batch(x_val[:1], model.dtype), training=False)     # its dtype
            check_labels(y_val, len(y_val), num_classes, "fit: validation y")
            check_finite(x_val, "fit", "validation input")
            validation = (x_val, y_val)
    lrs = None
    if schedule is not None and is_per_step(schedule):
        batches = -(-len(x) // batch_size)
        lrs = [[schedule(epoch + b / batches) for b in range(batches)] for epoch in range(epochs)]
        for epoch, rates in enumerate(lrs):
            for b, lr in enumerate(rates):          # 0 is allowed: a warm-up starts there
                _check_number("fit", f"schedule({epoch + b / batches:g}) (the learning rate of epoch "
                                     f"{epoch + 1}, batch {b + 1})", lr, strict=False)
    elif schedule is not None:
        lrs = [schedule(epoch) for epoch in range(epochs)]
        for epoch, lr in enumerate(lrs):
            _check_number("fit", f"schedule({epoch}) (the learning rate of epoch {epoch + 1})", lr)
    return x, y, validation, lrs


def _first_nonfinite(model, kind="params"):
    """Key ('layer_index.name') of the first parameter (or buffer) that holds NaN or inf, else None."""
    for i, layer in enumerate(model.layers):
        for name, array in getattr(layer, kind).items():
            if not np.isfinite(array).all():
                return f"{i}.{name}"
    return None


def _diverged(problem, epoch, batch, optimizer, checkpoint, saved_epoch):
    """The FloatingPointError ``fit`` raises when training stops being finite."""
    message = (f"training diverged: {problem} at epoch {epoch + 1}, batch {batch + 1} (learning rate "
               f"{optimizer.lr:g}); lower the learning rate (try 10x smaller), clip gradients with "
               f"fit(..., clip_norm=1.0), or check the input scaling")
    if checkpoint is not None:
        message += (f". The checkpoint {checkpoint} was not touched: it still holds epoch {saved_epoch}"
                    if saved_epoch else f". No checkpoint was written to {checkpoint}")
    return FloatingPointError(message)


def fit(model, x, y, optimizer, epochs, batch_size=64, validation=None, schedule=None,
        augment=None, seed=0, checkpoint=None, progress=True, log=print, clip_norm=None,
        label_smoothing=0.0, ema=None):
    """Train ``model`` with mini-batch gradient descent on softmax cross-entropy.

    x: (N, ...) float inputs, or uint8 images 0..255 (each batch becomes the
    model's dtype divided by 255, so no float copy of the dataset is made);
    y: (N,) int labels; ``validation`` an optional (x_val, y_val) pair evaluated
    after every epoch (an empty one is skipped with a warning; its loss is the
    plain cross-entropy, without label smoothing);
    ``schedule(epoch) -> lr`` called once per epoch, or, when it has
    ``per_step = True`` (``warmup_linear_schedule``), before every batch b with
    the fractional epoch e + b / batches (``history.lr`` then holds each epoch's
    last rate); ``augment(x_batch, rng) -> x_batch`` applied to
    each training batch (``augment(x_batch, rng, index=, epoch=)`` when it has
    ``by_image = True``: the batch's rows of x and the epoch, from 0); ``clip_norm``: clip the gradients to this global norm
    before each step (``clip_gradients``). Frozen layers are not trained.
    ``label_smoothing``: eps in [0, 1) for ``SoftmaxCrossEntropy`` (the training
    loss and ``history.train_loss`` use the smoothed targets).
    ``ema``: a decay in (0, 1), e.g. 0.999, to keep an exponential moving average
    of every parameter and batch-norm buffer, updated after every step
    (``WeightAverage``). The validation after each epoch then uses the AVERAGED
    weights, and when fit returns the model holds the averaged weights (the
    checkpoint keeps both, so a resumed run equals an uninterrupted one).
    ``progress``: True for a text progress bar, False for none, or a tqdm-like
    wrapper such as ``tqdm.auto.tqdm``; ``log(message)`` receives one line per
    epoch (``None`` to stay silent).
    With ``checkpoint`` (a path), the model, optimiser state, random states and
    history are written atomically after every epoch, and a run started with an
    existing checkpoint resumes from it: the result equals an uninterrupted run.
    Every argument is checked before training (``ValueError``/``TypeError``);
    a checkpoint that cannot be resumed raises ``CheckpointError``.
    Raises ``FloatingPointError`` as soon as the loss or a weight stops being
    finite, before that epoch's checkpoint would be written.
    Returns a ``History``.
    """
    x, y, validation, lrs = _check_fit_arguments(model, x, y, optimizer, epochs, batch_size, validation,
                                                 schedule, clip_norm, label_smoothing, ema)
    log = log or (lambda message: None)
    loss_fn, rng, dtype = SoftmaxCrossEntropy(label_smoothing), np.random.default_rng(seed), model.dtype
    average = None if ema is None else WeightAverage(model, ema)
    per_step = schedule is not None and is_per_step(schedule)
    history, start = History(), 0
    if checkpoint is not None and os.path.exists(checkpoint):
        start, history = _restore_checkpoint(checkpoint, model, optimizer, rng, average)
        log(f"resumed from {checkpoint} after epoch {start}")
    saved_epoch = start
    for epoch in range(start, epochs):
        if lrs is not None and not per_step:
            optimizer.lr = lrs[epoch]
        began, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        order = rng.permutation(len(x))
        batches = range(0, len(x), batch_size)
        if progress:
            wrapper = TextProgress if progress is True else progress
            batches = wrapper(batches, desc=f"epoch {epoch + 1}/{epochs}", leave=False)
        for b, i in enumerate(batches):
            index = order[i:i + batch_size]
            if per_step:
                optimizer.lr = lrs[epoch][b]
            xb, yb = prepare_batch(x[index], dtype), y[index]
            if augment is not None:
                xb = augment(xb, rng, index=index, epoch=epoch) if getattr(augment, "by_image", False) \
                    else augment(xb, rng)
            logits = model.forward(xb, training=True)
            loss = loss_fn.forward(logits, yb)
            if not math.isfinite(loss):
                raise _diverged(f"the loss became {loss}", epoch, b, optimizer, checkpoint, saved_epoch)
            model.backward(loss_fn.backward(), input_grad=False)
            if clip_norm is not None:
                try:
                    clip_gradients(model, clip_norm)
                except FloatingPointError as err:
                    raise _diverged(str(err), epoch, b, optimizer, checkpoint, saved_epoch) from None
            optimizer.step(model)
            # A finite loss can still take a step to inf: check the weights (0.2 ms for
            # the default network) so that no NaN weight is ever trained on or saved.
            bad = _first_nonfinite(model)
            if bad is not None:
                raise _diverged(f"parameter {bad} became NaN or infinite in the update", epoch, b,
                                optimizer, checkpoint, saved_epoch)
            if average is not None:
                average.update(model)
            seen += len(index)
            loss_sum += loss * len(index)
            correct += int((logits.argmax(axis=1) == yb).sum())
            if progress and b % 20 == 0:
                batches.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
        bad = _first_nonfinite(model, "buffers")
        if bad is not None:
            raise _diverged(f"buffer {bad} (running statistics) became NaN or infinite", epoch, b,
                            optimizer, checkpoint, saved_epoch)
        history.seconds.append(time.perf_counter() - began)
        history.train_loss.append(loss_sum / seen)
        history.train_acc.append(correct / seen)
        history.lr.append(optimizer.lr)
        message = (f"epoch {epoch + 1}/{epochs}: loss {loss_sum / seen:.4f}, acc {correct / seen:.4f}")
        if validation is not None:
            if average is None:
                val_loss, val_acc = _evaluate(model, *validation, batch_size=64)
            else:
                with average.applied(model):
                    val_loss, val_acc = _evaluate(model, *validation, batch_size=64)
            history.val_loss.append(val_loss)
            history.val_acc.append(val_acc)
            message += f", val_loss {val_loss:.4f}, val_acc {val_acc:.4f}"
        log(message + f" ({history.seconds[-1]:.1f} s)")
        if checkpoint is not None:
            save_npz(checkpoint, _checkpoint_arrays(model, optimizer, history, epoch + 1, rng, average))
            saved_epoch = epoch + 1
    if average is not None:
        average.copy_to(model)
    return history
