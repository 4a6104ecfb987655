"""The model container ``Sequential`` (forward, backward, predict, summary,
save/load) and the network builders used by the report."""
from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path

import numpy as np

from cnn_core import DEFAULT_DTYPE, softmax
from cnn_files import save_npz
from cnn_layers import (LAYER_TYPES, Activation, BatchNorm, Conv1D, Conv2D, Dense, Dropout, Flatten,
                        Layer, LeakyReLU, MaxPool1D, MaxPool2D, ParamLayer, ReLU, _check_impl)
from cnn_layers import RowsToSequence
from cnn_rnn import GRU        # also registers GRU in LAYER_TYPES, so saved GRU models load

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


def check_batch_size(batch_size, where):
    """Raise ``ValueError`` unless ``batch_size`` is a positive integer."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"{where}: batch_size must be a positive integer, got {batch_size!r}")


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
        layer's im2col matrix in cache (64 measured fastest on a 2-core CPU).

        x: (N, ...) floats, or uint8 images 0..255 (each batch becomes the model's
        dtype divided by 255). NaN or inf in x raises ``ValueError``.
        """
        x = as_batch_array(x, "predict")
        check_batch_size(batch_size, "predict")
        if len(x) == 0:
            raise ValueError(f"predict: received an empty batch, shape {np.shape(x)}")
        check_finite(x, "predict")
        return np.concatenate([softmax(self.forward(prepare_batch(x[i:i + batch_size], self.dtype), training=False))
                               for i in range(0, len(x), batch_size)])

    def predict(self, x, batch_size=64):
        """Predicted class indices (N,)."""
        return self.predict_proba(x, batch_size).argmax(axis=1)

    def num_params(self):
        """Total number of trained parameters (every ``W``, ``b``, ``gamma``, ``beta``)."""
        return sum(param.size for _, param, _ in self.parameters())

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
                 dropout=0.0, num_classes=10, impl="vectorized", seed=0, dtype=DEFAULT_DTYPE):
    """Images read row by row by a GRU (``cnn_rnn``): RowsToSequence(layout="NTD")
    -> GRU(W*C -> ``hidden``, optionally ``bidirectional``) -> [Dropout] -> Dense to logits.

    ``read="last"``: the classifier sees the last hidden state only (N, H), the
    classic sequence classifier; ``read="all"``: it sees every step's state,
    flattened (N, T*H), so no row has to survive the whole recurrence.
    """
    if read not in ("last", "all"):
        raise ValueError(f"rows_gru_net: read must be 'last' or 'all', got {read!r}")
    directions = 2 if bidirectional else 1
    steps, features = input_size, input_size * in_channels          # T rows of W*C values
    layers = [RowsToSequence(layout="NTD"),
              GRU(features, hidden, return_sequences=(read == "all"), bidirectional=bidirectional,
                  impl=impl, seed=seed, dtype=dtype)]
    width = directions * hidden * (steps if read == "all" else 1)
    layers += [Flatten()] if read == "all" else []
    layers += [Dropout(dropout)] if dropout else []
    layers.append(Dense(width, num_classes, impl=impl, dtype=dtype))
    return Sequential(layers, seed=seed)
