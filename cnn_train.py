"""Training: optimisers, learning-rate schedules, augmentation, the training
loop ``fit`` with checkpoints and exact resume, and ``evaluate``."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from cnn_core import _pad
from cnn_files import save_npz
from cnn_layers import Dropout, SoftmaxCrossEntropy
from cnn_model import Sequential

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


def evaluate(model, x, y, batch_size=64):
    """Mean cross-entropy and accuracy of ``model`` on (x, y), in batches."""
    loss_fn, total_loss, correct = SoftmaxCrossEntropy(), 0.0, 0
    for i in range(0, len(x), batch_size):
        logits = model.forward(x[i:i + batch_size], training=False)
        yb = y[i:i + batch_size]
        total_loss += loss_fn.forward(logits, yb) * len(yb)
        correct += int((logits.argmax(axis=1) == yb).sum())
    return total_loss / len(x), correct / len(x)


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
