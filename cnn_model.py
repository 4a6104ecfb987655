"""The model container ``Sequential`` (forward, backward, predict, summary,
save/load) and the network builders used by the report."""
from __future__ import annotations

import json
import math
import zipfile
import zlib
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from cnn_core import DEFAULT_DTYPE, softmax
from cnn_files import save_npz
from cnn_layers import (GELU, LAYER_TYPES, Activation, BatchNorm, Conv1D, Conv2D, Dense, Dropout, Flatten,
                        Layer, LeakyReLU, MaxPool1D, MaxPool2D, ParamLayer, ReLU, Scale, _check_impl)
from cnn_layers import RowsToSequence
from cnn_rnn import GRU, StepDense    # importing cnn_rnn registers its layers: saved GRU models load

# ---------------------------------------------------------------------------
# Input checks shared by predict, fit and evaluate
# ---------------------------------------------------------------------------

def as_batch_array(x, where, name="x"):
    """``x`` as a NumPy array (lists and other array-likes go through ``np.asarray``).

    Raises ``TypeError`` naming ``where`` when ``x`` cannot be one regular array
    (e.g. a list of images of different shapes) or is a single number.
    """
    try:
        array = np.asarray(x)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{where}: {name} must be a NumPy array (or a list np.asarray can turn into one, "
                        f"all items the same shape), got {type(x).__name__}: {err}") from err
    if array.ndim == 0:
        raise TypeError(f"{where}: {name} must be a batch (an array with a first axis), got {x!r}")
    return array


def prepare_batch(x, dtype):
    """A batch ready for ``forward``: uint8 images (0..255) become ``dtype`` scaled
    to [0, 1], i.e. ``x.astype(dtype) / 255``; every other array is returned as it
    is (the layers refuse dtypes that are not floating point, with a clear message).

    Applied batch by batch, so a uint8 dataset never exists in full as floats.
    """
    if x.dtype != np.uint8:
        return x
    out = x.astype(dtype)
    out /= 255                      # in place: the same rounding as x.astype(dtype) / 255
    return out


def check_finite(x, where, name="input"):
    """Raise ``ValueError`` when ``x`` holds NaN or +-inf, saying how many values and
    examples (``x[n]``) are affected. Scans in chunks of about 2**20 values so no
    full-size boolean copy of a large dataset is made; integer arrays pass at once."""
    if not np.issubdtype(x.dtype, np.inexact) or x.size == 0:
        return
    rows = max(1, (1 << 20) // max(1, x[0].size))
    bad_values = bad_examples = 0
    for i in range(0, len(x), rows):
        finite = np.isfinite(x[i:i + rows]).reshape(len(x[i:i + rows]), -1)
        bad_values += finite.size - int(np.count_nonzero(finite))
        bad_examples += int(np.count_nonzero(~finite.all(axis=1)))
    if bad_values:
        raise ValueError(f"{where}: {bad_values} of the {x.size} {name} values are not finite (NaN or inf), "
                         f"in {bad_examples} of the {len(x)} examples; remove or repair them first "
                         f"(np.isfinite(x).all(axis=tuple(range(1, x.ndim))) marks the good examples)")


def _describe_arrays(arrays, limit=6):
    """'a (3,) float64, b (2, 2) int64, ...' for an error message about a file's content."""
    items = [f"{name} {np.shape(value)} {np.asarray(value).dtype}" for name, value in list(arrays.items())[:limit]]
    more = f", ... ({len(arrays)} arrays in all)" if len(arrays) > limit else ""
    return ", ".join(items) + more if items else "no arrays at all"


class NotAnArchiveError(ValueError):
    """A readable file that is no ``.npz`` archive (a ``.npy`` array): something else, not damage."""


def read_npz(path):
    """Every array of the ``.npz`` file at ``path``, as a dict.

    Raises ``ValueError`` saying what is wrong with the file (missing, empty,
    truncated, corrupt), ``NotAnArchiveError`` for a single-array ``.npy`` file;
    callers add what the file was meant to be and what to do.
    """
    try:
        if Path(path).stat().st_size == 0:
            problem = "the file is empty (0 bytes)"
        else:
            loaded = np.load(path, allow_pickle=False)
            if not isinstance(loaded, np.ndarray):
                with loaded as data:
                    return dict(data)      # reads (and CRC-checks) every array now
            raise NotAnArchiveError(f"it is a .npy file holding one array of shape {loaded.shape}, "
                                    f"dtype {loaded.dtype}")
    except FileNotFoundError:
        problem = "there is no such file"
    except NotAnArchiveError:
        raise
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        problem = f"it is truncated, corrupt or not a .npz file ({type(err).__name__}: {err})"
    raise ValueError(problem)


TTA_MODES = (None, "flip", "shift", "flip+shift")
TTA_VIEWS = {"flip": "the image and its mirror", "shift": "the image and its four one-pixel shifts",
             "flip+shift": "the image, its four one-pixel shifts and their mirrors"}   # what is averaged
SHIFTS = ((1, 0), (-1, 0), (0, 1), (0, -1))     # tta="shift": one pixel down, up, right, left


def check_tta(tta, x, where):
    """Raise ``ValueError`` unless ``tta`` is one of ``TTA_MODES`` and fits ``x``
    (every mode moves pixels, so it needs images (N, C, H, W))."""
    if not any(tta is mode or (isinstance(tta, str) and tta == mode) for mode in TTA_MODES):
        raise ValueError(f"{where}: tta must be None (no test-time augmentation), 'shift' (the mean of the "
                         f"logits of each image and its four one-pixel shifts), 'flip+shift' (of those five "
                         f"and their mirrors) or 'flip' (of each image and its mirror), got {tta!r}")
    if tta is not None and np.ndim(x) != 4:
        raise ValueError(f"{where}: tta={tta!r} moves pixels and needs images (N, C, H, W), "
                         f"got shape {np.shape(x)}")


def shifted(x, dy, dx):
    """Images x (N, C, H, W) moved dy pixels down and dx right (negative: up, left);
    the uncovered border is 0, as the padding of the training shifts
    (``cnn_train.random_crop``)."""
    out = np.zeros_like(x)
    H, W = x.shape[2:]
    out[:, :, max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
        x[:, :, max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
    return out


def check_batch_size(batch_size, where):
    """Raise ``ValueError`` unless ``batch_size`` is a positive integer."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"{where}: batch_size must be a positive integer, got {batch_size!r}")


class Sequential:
    """A stack of layers applied in order.

    With an int ``seed`` every ``ParamLayer`` is (re)initialised from one
    generator: He when the next activation is a ReLU, LeakyReLU or GELU, Glorot
    otherwise (Sigmoid, Tanh, or the output layer); every ``Dropout`` gets its
    own stream of the same seed. ``seed=None`` keeps the layers as they are.
    Frozen layers (``layer.trainable = False``) are never re-initialised: their
    weights were set on purpose (e.g. ``whitening_conv``).
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
            if isinstance(layer, ParamLayer) and layer.trainable:
                layer.initialize(rng, self._init_scheme(i))
            elif isinstance(layer, Dropout):
                layer.rng = np.random.default_rng([seed, i])

    def _init_scheme(self, index):
        for layer in self.layers[index + 1:]:
            if isinstance(layer, ParamLayer):
                break
            if isinstance(layer, Activation):
                return "he" if isinstance(layer, (ReLU, LeakyReLU, GELU)) else "glorot"
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
        Frozen layers in front of the first trained one (``trainable = False``,
        e.g. a ``whitening_conv`` stem, and the parameter-free layers after it)
        then get no backward pass at all: no parameter below them is trained,
        and their ``grads`` are left as they were.
        """
        start = 0 if input_grad else self._first_trained_layer()
        for layer in reversed(self.layers[start + 1:]):
            dout = layer.backward(dout)
        first = self.layers[start]
        if not input_grad and isinstance(first, ParamLayer):
            return first.backward(dout, input_grad=False)
        dx = first.backward(dout)
        return dx if start == 0 else None

    def _first_trained_layer(self):
        """Index of the first layer with trainable parameters (0 when there is none)."""
        for i, layer in enumerate(self.layers):
            if layer.trainable and layer.params:
                return i
        return 0

    def parameters(self, trainable_only=False):
        """Yield ``(key, param, grad)`` for every parameter; key is 'layer_index.name'.
        ``trainable_only``: skip frozen layers (``layer.trainable = False``), as optimisers do."""
        for i, layer in enumerate(self.layers):
            if trainable_only and not layer.trainable:
                continue
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

    def logits(self, x, tta=None):
        """Evaluation-mode logits (N, K) of one batch ``x`` that is ready for
        ``forward`` (see ``prepare_batch``), with optional test-time augmentation:
        ``tta=None``: ``forward(x, training=False)``, nothing else;
        ``tta="flip"``: the mean of the LOGITS (not of the probabilities) of x
        and of its left-right mirror x[..., ::-1]; ``tta="shift"``: the mean of
        the logits of x and of its four one-pixel shifts (``SHIFTS``, ``shifted``),
        for digits, which a mirror would change; ``tta="flip+shift"``: the mean
        over those five views and their five mirrors; images (N, C, H, W) only.
        """
        check_tta(tta, x, "predict")
        if tta is None:
            return self.forward(x, training=False)
        views = [x]
        if "shift" in tta:
            views += [shifted(x, dy, dx) for dy, dx in SHIFTS]
        if "flip" in tta:
            views += [np.ascontiguousarray(v[..., ::-1]) for v in views]
        return sum(self.forward(v, training=False) for v in views) / len(views)

    def predict_proba(self, x, batch_size=64, tta=None):
        """Class probabilities (N, K), computed in batches: small batches keep each
        layer's im2col matrix in cache (64 measured fastest on a 2-core CPU).

        x: (N, ...) floats, or uint8 images 0..255 (each batch becomes the model's
        dtype divided by 255). NaN or inf in x raises ``ValueError``.
        ``tta="flip"``, ``"shift"`` or ``"flip+shift"``: test-time augmentation, softmax
        of the mean of the logits of each image and its mirror and/or shifts (``logits``).
        """
        x = as_batch_array(x, "predict")
        check_batch_size(batch_size, "predict")
        if len(x) == 0:
            raise ValueError(f"predict: received an empty batch, shape {np.shape(x)}")
        check_tta(tta, x, "predict")
        check_finite(x, "predict")
        return np.concatenate([softmax(self.logits(prepare_batch(x[i:i + batch_size], self.dtype), tta))
                               for i in range(0, len(x), batch_size)])

    def predict(self, x, batch_size=64, tta=None):
        """Predicted class indices (N,); ``tta`` as in ``predict_proba`` (the mean of logits)."""
        return self.predict_proba(x, batch_size, tta).argmax(axis=1)

    def num_params(self, trainable_only=False):
        """Number of parameters (every ``W``, ``b``, ``gamma``, ``beta``);
        ``trainable_only``: only those of layers that are not frozen."""
        return sum(param.size for _, param, _ in self.parameters(trainable_only))

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
            label = layer.label() + ("" if layer.trainable else " (frozen)")
            rows.append((label, str(x.shape[1:]), f"{count:,}" if count else ""))
        widths = [max(len(r[k]) for r in rows) for k in range(3)]
        lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}" for r in rows]
        rule = "-" * len(lines[0])
        return "\n".join([rule, *lines, rule, f"total parameters: {total:,}"])

    def state_arrays(self):
        """The architecture (as JSON: each layer's type, config and trainable flag)
        and every parameter, as a dict of arrays."""
        architecture = [{"type": type(layer).__name__, "config": layer.config(), "trainable": layer.trainable}
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
            for layer, spec in zip(layers, architecture):
                trainable = spec.get("trainable", True)          # files written before the flag: trained
                if not isinstance(trainable, bool):
                    raise ValueError(f"trainable must be true or false, got {trainable!r}")
                if not trainable:
                    layer.trainable = False
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
        """Rebuild a model written by ``save``.

        Raises ``ValueError`` naming the file when it cannot be read or holds
        something else than a model (the message lists what it holds).
        """
        try:
            arrays = read_npz(path)
        except ValueError as err:
            raise ValueError(f"{path} is not a readable model file: {err}. Pass a file written by "
                             "model.save(path), or save the model again if this one was damaged") from err
        if "architecture" not in arrays:
            raise ValueError(f"{path} is not a saved Sequential model: it holds {_describe_arrays(arrays)} "
                             "and no 'architecture' record. Read it with np.load, or pass a file "
                             "written by model.save(path)")
        try:
            return cls.from_arrays(arrays)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err


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


def mnist_net_v2(channels=(16, 32, 64), hidden=128, dropout=0.25, num_classes=10, impl="vectorized",
                 seed=0, dtype=DEFAULT_DTYPE):
    """The network of the MNIST recipe (``cnn_recipes.mnist_recipe``):
    one block per entry of ``channels``, each conv 3x3 ('same') -> max-pool 2 -> BatchNorm -> ReLU
    (28 -> 14 -> 7 -> 3), every block after the first followed by a second conv 3x3 -> BatchNorm
    -> ReLU at the pooled size (``cifar_net``'s block); then flatten -> dense ``hidden`` -> ReLU
    -> dropout -> dense to logits.

    Pooling before the normalisation and the ReLU runs both on a quarter of the values, and
    the extra convolutions work on 7x7 and 3x3 maps. Widths 16/32/64 take half the time per
    batch of 32/64/128 (the recipe's earlier widths), so the recipe trains 9 epochs instead
    of 5 within the same five minutes (see ``cnn_recipes.MNIST_RECIPE``).
    """
    layers, c_in, size = [], 1, 28
    for i, c_out in enumerate(channels):
        layers += [Conv2D(c_in, c_out, 3, padding=1, impl=impl, dtype=dtype), MaxPool2D(2, impl=impl),
                   BatchNorm(c_out, impl=impl, dtype=dtype), ReLU(impl=impl)]
        if i:
            layers += [Conv2D(c_out, c_out, 3, padding=1, impl=impl, dtype=dtype),
                       BatchNorm(c_out, impl=impl, dtype=dtype), ReLU(impl=impl)]
        c_in, size = c_out, size // 2
    layers += [Flatten(), Dense(c_in * size * size, hidden, impl=impl, dtype=dtype), ReLU(impl=impl),
               Dropout(dropout), Dense(hidden, num_classes, impl=impl, dtype=dtype)]
    return Sequential(layers, seed=seed)


def conv_net_for(data, **overrides):
    """``conv_net`` sized by a dataset: ``in_channels`` and ``input_size`` from
    ``data.x_train`` (N, C, H, W), ``num_classes`` from ``len(data.class_names)``;
    so a 200-class 64x64 image folder builds without editing code. Other keyword
    arguments as in ``conv_net``. Images must be square (load them with ``size=``)."""
    _, channels, height, width = data.x_train.shape
    if height != width:
        raise ValueError(f"conv_net_for: images are {height}x{width}; conv_net needs square images: "
                         f"load them with size=(s, s)")
    return conv_net(**{"in_channels": channels, "input_size": height,
                       "num_classes": len(data.class_names), **overrides})


def rows_gru_net(in_channels=1, input_size=28, hidden=128, bidirectional=False, read="last",
                 row_features=0, dropout=0.0, num_classes=10, impl="vectorized", seed=0, dtype=DEFAULT_DTYPE):
    """Images read row by row by a GRU (``cnn_rnn``): RowsToSequence(layout="NTD")
    -> [StepDense(W*C -> ``row_features``) -> ReLU] -> GRU(-> ``hidden``, optionally
    ``bidirectional``) -> [Dropout] -> Dense to logits.

    ``row_features`` > 0 adds a learned non-linear encoder of each row (the same
    for every row) in front of the recurrence. ``read="last"``: the classifier
    sees the last hidden state only (N, H), the classic sequence classifier;
    ``read="all"``: it sees every step's state, flattened (N, T*H), so no row
    has to survive the whole recurrence.
    """
    if read not in ("last", "all"):
        raise ValueError(f"rows_gru_net: read must be 'last' or 'all', got {read!r}")
    directions = 2 if bidirectional else 1
    steps, features = input_size, input_size * in_channels          # T rows of W*C values
    layers = [RowsToSequence(layout="NTD")]
    if row_features:
        layers += [StepDense(features, row_features, impl=impl, dtype=dtype), ReLU(impl=impl)]
        features = row_features
    layers.append(GRU(features, hidden, return_sequences=(read == "all"), bidirectional=bidirectional,
                      impl=impl, seed=seed, dtype=dtype))
    width = directions * hidden * (steps if read == "all" else 1)
    layers += [Flatten()] if read == "all" else []
    layers += [Dropout(dropout)] if dropout else []
    layers.append(Dense(width, num_classes, impl=impl, dtype=dtype))
    return Sequential(layers, seed=seed)


# The recurrent models of the row-sequence experiments: each row -> StepDense 128 -> ReLU ->
# GRU 128 over the rows -> every state -> Dense. Trained with Adam(3e-3), cosine schedule to
# 3e-5, batch 64, fit(..., clip_norm=1.0): MNIST 3 epochs (98.8 % validation), CIFAR-10 5 epochs
# (62.1 %); CIFAR-10 with bidirectional=True, dropout=0.3, flips and 10 epochs: 65.2 %.
ROWS_GRU = dict(hidden=128, row_features=128, read="all", bidirectional=False)


def mnist_rows_gru(**overrides):
    """MNIST as 28 rows of 28 pixels read by a GRU (``rows_gru_net`` with ``ROWS_GRU``);
    keyword arguments override them."""
    return rows_gru_net(**{**dict(ROWS_GRU, in_channels=1, input_size=28), **overrides})


def cifar_rows_gru(**overrides):
    """CIFAR-10 as 32 rows of 96 values (32 pixels x RGB) read by a GRU (``rows_gru_net``
    with ``ROWS_GRU``); keyword arguments override them."""
    return rows_gru_net(**{**dict(ROWS_GRU, in_channels=3, input_size=32), **overrides})


# ---------------------------------------------------------------------------
# Whitening initialisation and the CIFAR-10 network
# ---------------------------------------------------------------------------

def _positive_int(where, name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
    return int(value)


def _patch_rows(x, k):
    """Every k x k patch of the images x (n, C, H, W), or every run of k steps of the
    sequences x (n, C, L), as one row (patches, C*k*k or C*k), entries in the order of a
    Conv2D / Conv1D filter W[f] (channel, then row and column, or step)."""
    axes = tuple(range(2, x.ndim))
    windows = sliding_window_view(x, (k,) * len(axes), axis=axes)    # (n, C, H', W', k, k) or (n, C, L', k)
    order = (0, *range(2, x.ndim), 1, *range(x.ndim, windows.ndim))  # (n, positions, C, k...)
    return windows.transpose(order).reshape(-1, x.shape[1] * k ** len(axes))


def whitening_conv(x, kernel_size=2, eps=5e-4, components=None, impl="vectorized", dtype=DEFAULT_DTYPE):
    """A frozen ``Conv2D(C, 2K, k, padding=0)`` that whitens the k x k
    patches of images like ``x`` (whitening initialisation, as in Page's and
    Jordan's fast CIFAR-10 training); for sequences x (N, C, L) a ``Conv1D(C, 2K, k)``
    that whitens their runs of k steps (the row-sequence model's stem).

    x: (N, C, H, W) training images or (N, C, L) sequences, floats or uint8 (scaled by
    1/255 as ``fit`` does), sides >= k. The inputs are standardised per channel
    (z = (x - m_c) / s_c), every patch p of z becomes a vector of D = C*k*k (C*k) values,
    and Sigma = Cov(p) = V diag(lambda) V^T. Filter i is v_i / sqrt(lambda_i + eps)
    (strongest eigenvalue first) with bias -v_i . mean(p) / sqrt(lambda_i + eps),
    so on the data its outputs have mean 0 and covariance
    diag(lambda / (lambda + eps)), about the identity (``eps`` in standardised
    units damps the directions of tiny variance, i.e. noise). ``components``: keep
    the K strongest directions (default all D; a patch of two 96-value image rows has
    192, the weakest of them pixel-to-pixel noise that whitening would amplify most).
    The standardisation is folded into the weights and bias, so the layer takes the
    inputs as ``fit`` gives them. Filters K..2K-1 are the negatives
    of 0..K-1, so a following ReLU keeps both signs of every component.
    The covariance is accumulated exactly over all of x (in float64, in chunks):
    pass a few thousand images. The layer has ``trainable = False``.
    """
    x = as_batch_array(x, "whitening_conv")
    k = _positive_int("whitening_conv", "kernel_size", kernel_size)
    if not (isinstance(eps, (int, float, np.floating)) and not isinstance(eps, bool)
            and np.isfinite(eps) and eps > 0):
        raise ValueError(f"whitening_conv: eps must be a finite number > 0, got {eps!r}")
    if x.ndim not in (3, 4) or len(x) == 0 or min(x.shape[2:]) < k:
        raise ValueError(f"whitening_conv: x must be a non-empty batch of images (N, C, H, W) or sequences "
                         f"(N, C, L) with H, W or L >= kernel_size ({k}), got shape {x.shape}")
    if not (x.dtype == np.uint8 or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"whitening_conv: x must hold floats or uint8 images, got dtype {x.dtype}")
    check_finite(x, "whitening_conv")
    N, C, *sides = x.shape
    spatial = len(sides)                                            # 2: images, 1: sequences
    D = C * k ** spatial
    K = D if components is None else _positive_int("whitening_conv", "components", components)
    if K > D:
        raise ValueError(f"whitening_conv: components must be at most the patch size C*k^{spatial} = {D}, got {K}")
    chunk = max(1, (1 << 18) // math.prod(side - k + 1 for side in sides))   # about 2**18 patches per product
    images = lambda: (prepare_batch(x[i:i + chunk], np.float64).astype(np.float64, copy=False)
                      for i in range(0, N, chunk))
    per_channel = (slice(None),) + (None,) * spatial                 # m[:, None, None]: m_c over its channel
    sums = (0, *range(2, x.ndim))
    # per-channel standardisation, then the patch mean and second moment of z
    pixels, m = 0, np.zeros(C)
    sq = np.zeros(C)
    for xb in images():
        pixels += xb.size // C
        m += xb.sum(axis=sums)
        sq += (xb * xb).sum(axis=sums)
    m /= pixels
    s = np.sqrt(np.maximum(sq / pixels - m * m, 0))
    s[s == 0] = 1                                  # a constant channel: nothing to scale
    count, total, outer = 0, np.zeros(D), np.zeros((D, D))
    for xb in images():
        p = _patch_rows((xb - m[per_channel]) / s[per_channel], k)
        count += len(p)
        total += p.sum(axis=0)
        outer += p.T @ p
    mu = total / count
    cov = outer / count - np.outer(mu, mu)
    lam, V = np.linalg.eigh((cov + cov.T) / 2)
    lam, V = np.maximum(lam[::-1], 0)[:K], V[:, ::-1][:, :K]       # the K strongest first
    filters = (V / np.sqrt(lam + eps)).T                            # (K, D): filter i is row i, on z
    bias = -filters @ mu
    # z = (x - m_c) / s_c: W z + b = (W / s_c) x + (b - sum W m_c / s_c)
    Wz = filters.reshape(K, C, *(k,) * spatial)
    Wx = Wz / s[(None,) + per_channel]
    bias = bias - (Wz * (m / s)[(None,) + per_channel]).sum(axis=tuple(range(1, Wz.ndim)))
    layer = (Conv2D(C, 2 * K, k, padding=0, impl=impl, dtype=dtype) if spatial == 2
             else Conv1D(C, 2 * K, k, impl=impl, dtype=dtype))
    layer.params["W"][...] = np.concatenate([Wx, -Wx])
    layer.params["b"][...] = np.concatenate([bias, -bias])
    layer.trainable = False
    return layer


def identity_filters(conv):
    """Identity (Dirac) initialisation of a ``Conv2D`` with odd kernel sizes, as in
    airbench: its first min(C, F) filters pass one input channel through unchanged,
    W[f] = 0 except W[f, f, kh // 2, kw // 2] = 1, so at the start the layer carries
    its input forward (as a residual connection would) beside the other filters'
    random features. The rest of W and the bias are left as they are. Returns conv."""
    W = conv.params["W"]
    F, C, kh, kw = W.shape
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"identity_filters: a {kh}x{kw} kernel has no centre; it needs odd kernel sizes")
    k = min(F, C)
    W[:k] = 0
    W[np.arange(k), np.arange(k), kh // 2, kw // 2] = 1
    return conv


def _check_widths(where, widths):
    """``widths`` as a tuple; a ``ValueError`` unless it is a non-empty sequence of positive integers."""
    widths = tuple(widths) if isinstance(widths, (tuple, list)) else widths
    if not isinstance(widths, tuple) or not widths:
        raise ValueError(f"{where}: widths must be a non-empty tuple of positive integers, got {widths!r}")
    for w in widths:
        _positive_int(where, "each width", w)
    return widths


def _airbench_blocks(channels, size, widths, dims, act=ReLU, impl="vectorized", dtype=DEFAULT_DTYPE):
    """airbench's blocks, one per width w of ``widths``: conv 3 ('same') -> max-pool 2 ->
    BatchNorm -> act -> conv 3 -> BatchNorm -> act, on ``channels`` inputs of size ``size``;
    ``dims=2``: Conv2D/MaxPool2D on images, 1: Conv1D/MaxPool1D on sequences. Pooling
    right after the first convolution leaves the second a quarter of the positions (a half
    in 1-D). Returns (layers, the size left: size halved, rounded down, once per block)."""
    conv, pool = (Conv2D, MaxPool2D) if dims == 2 else (Conv1D, MaxPool1D)
    layers, c = [], channels
    for w in widths:
        layers += [conv(c, w, 3, padding=1, impl=impl, dtype=dtype), pool(2, impl=impl),
                   BatchNorm(w, impl=impl, dtype=dtype), act(impl=impl),
                   conv(w, w, 3, padding=1, impl=impl, dtype=dtype), BatchNorm(w, impl=impl, dtype=dtype),
                   act(impl=impl)]
        size, c = size // 2, w
    return layers, size


def cifar_net(widths=(64, 128, 256), whiten=None, num_classes=10, input_size=32, in_channels=3, seed=0,
              eps=5e-4, identity=False, activation="relu", init="he", logit_scale=None, impl="vectorized",
              dtype=DEFAULT_DTYPE):
    """The fast CIFAR-10 network (after Page's and Jordan's airbench):

    stem: 2x2 conv C -> 8C (padding 0) -> ReLU; then for each width w of ``widths``:
    conv 3x3 -> max-pool 2 -> BatchNorm -> ReLU -> conv 3x3 -> BatchNorm -> ReLU;
    then a global max pool (MaxPool2D over the remaining size), Flatten and
    Dense(widths[-1] -> num_classes).

    ``whiten``: None for a stem trained from a random (He) start, or a sample
    of training images (N, C, H, W) for ``whitening_conv(whiten, 2, eps)``, a
    frozen stem with the same shape. ``identity``: ``identity_filters`` on every
    3x3 convolution after the random start. ``activation``: "relu" or "gelu" (airbench's) after
    every BatchNorm and the stem. ``init``: "he" (He normal, Glorot for the last layer) or
    "uniform" (every trained weight U(+-1/sqrt(fan_in)), PyTorch's default, which airbench's
    settings were tuned with). ``logit_scale``: None, or a number s that multiplies the
    logits (a last ``Scale(s)`` layer; airbench uses 1/9). x: (N, in_channels, input_size, input_size)
    floats or uint8; any size works as long as each pool has at least one pixel
    (the remaining size is computed: 32 -> 31 -> 15 -> 7 -> 3 -> 1).
    """
    where = "cifar_net"
    widths = _check_widths(where, widths)
    num_classes = _positive_int(where, "num_classes", num_classes)
    size = _positive_int(where, "input_size", input_size)
    in_channels = _positive_int(where, "in_channels", in_channels)
    activations = {"relu": ReLU, "gelu": GELU}
    if activation not in activations:
        raise ValueError(f"{where}: activation must be one of {sorted(activations)}, got {activation!r}")
    act = activations[activation]
    _check_init(where, init)
    if whiten is None:
        stem = Conv2D(in_channels, 8 * in_channels, 2, padding=0, impl=impl, dtype=dtype)
    else:
        stem = whitening_conv(whiten, 2, eps=eps, impl=impl, dtype=dtype)
        if stem.in_channels != in_channels:
            raise ValueError(f"{where}: the whitening sample has {stem.in_channels} channels but "
                             f"in_channels is {in_channels}")
    blocks, size = _airbench_blocks(stem.out_channels, size - 1, widths, 2, act, impl, dtype)
    if size < 1:
        raise ValueError(f"{where}: input_size {input_size} is too small for {len(widths)} blocks "
                         f"(each halves the size after the 2x2 stem); use fewer widths or larger images")
    layers = [stem, act(impl=impl)] + blocks + [MaxPool2D(size, impl=impl), Flatten(),
                                                Dense(widths[-1], num_classes, impl=impl, dtype=dtype)]
    model = _airbench_start(layers, seed, init, logit_scale, impl)
    if identity:
        for layer in model.layers[2:]:                  # not the 2x2 stem
            if isinstance(layer, Conv2D):
                identity_filters(layer)
    return model


def cifar_rows_conv1d(seed=0, widths=(128, 256, 256), dropout=0.1, init="he", logit_scale=None, whiten=None,
                      components=None):
    """CIFAR-10 read as a sequence of its 32 rows by 1-D convolutions (notebook 7's
    row-sequence model): RowsToSequence turns x (N, 3, 32, 32) into (N, 96, 32),
    the 96 values of a row (32 pixels x RGB, interleaved) as channels; then one
    airbench block per width of ``widths`` (``_airbench_blocks`` in 1-D: Conv1D k=3 ->
    MaxPool1D 2 -> BatchNorm -> ReLU -> Conv1D k=3 -> BatchNorm -> ReLU), each halving
    the rows (32 -> 16 -> 8 -> 4), Flatten (N, 4 * 256) -> Dropout ``dropout`` -> Dense
    to 10 logits. The rows left are flattened, not max-pooled as in ``cifar_net``: a
    feature's vertical place is all the position this model has.
    ``whiten``: None, or a sample of training images (N, 3, 32, 32) for a frozen stem
    first, ``whitening_conv`` of their row sequences (runs of 2 rows, its ``components``
    strongest directions and their negatives) -> ReLU: 32 -> 31 -> 15 -> 7 -> 3 rows, Flatten (N, 768)
    (the report's recipe: 5,000 images, 48 directions, so the stem hands on 96 channels as a row has).
    ``init`` and ``logit_scale``: as in ``cifar_net`` (the report's recipe,
    ``cnn_recipes.rows_conv1d_recipe``, passes "uniform" and 1/9)."""
    where = "cifar_rows_conv1d"
    _check_init(where, init)
    widths = _check_widths(where, widths)
    front, channels, length = [RowsToSequence()], 96, 32
    if whiten is not None:
        images = prepare_batch(as_batch_array(whiten, where), np.float32)   # uint8: / 255, as fit
        stem = whitening_conv(RowsToSequence().forward(images), 2, components=components)
        if stem.in_channels != channels:
            raise ValueError(f"{where}: the whitening sample's rows have {stem.in_channels} values, "
                             f"not 96 (32 pixels x RGB): pass CIFAR-10 images (N, 3, 32, 32)")
        front, channels, length = front + [stem, ReLU()], stem.out_channels, length - 1
    rows = length
    blocks, length = _airbench_blocks(channels, length, widths, 1)
    if length < 1:
        raise ValueError(f"{where}: {len(widths)} blocks halve the {rows} rows to none; "
                         f"use at most {rows.bit_length() - 1} widths")
    head = [Flatten(), Dropout(dropout), Dense(widths[-1] * length, 10)]
    return _airbench_start(front + blocks + head, seed, init, logit_scale)


def _check_init(where, init):
    if init not in ("he", "uniform"):
        raise ValueError(f"{where}: init must be 'he' or 'uniform', got {init!r}")


def _airbench_start(layers, seed, init, logit_scale, impl="vectorized"):
    """Sequential(layers, seed), with a last ``Scale(logit_scale)`` unless it is None;
    ``init="uniform"`` then redraws every trainable convolution's and Dense layer's
    weights U(+-1/sqrt(fan_in)) (PyTorch's default, airbench's start) from the rng
    [seed, 1], in layer order ("he": the weights as built)."""
    if logit_scale is not None:
        layers = layers + [Scale(logit_scale, impl=impl)]
    model = Sequential(layers, seed=seed)
    if init == "uniform":
        rng = np.random.default_rng([seed, 1])
        for layer in model.layers:
            if isinstance(layer, (Conv2D, Conv1D, Dense)) and layer.trainable:
                layer.initialize(rng, "uniform")
    return model


def mlp(in_features=3 * 32 * 32, hidden=512, dropout=0.3, num_classes=10, seed=0):
    """A one-hidden-layer perceptron on the raw pixels (notebook 4's MLP baseline):
    Flatten x (N, C, H, W) to (N, in_features) -> Dense to ``hidden`` -> ReLU ->
    Dropout ``dropout`` -> Dense to ``num_classes`` logits; initialised from ``seed``."""
    return Sequential([Flatten(), Dense(in_features, hidden), ReLU(), Dropout(dropout),
                       Dense(hidden, num_classes)], seed=seed)
