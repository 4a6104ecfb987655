"""The model container ``Sequential`` (forward, backward, predict, summary,
save/load) and the network builders used by the report."""
from __future__ import annotations

import json
import zipfile

import numpy as np

from cnn_core import DEFAULT_DTYPE, softmax
from cnn_files import save_npz
from cnn_layers import (LAYER_TYPES, Activation, BatchNorm, Conv1D, Conv2D, Dense, Dropout, Flatten,
                        Layer, LeakyReLU, MaxPool1D, MaxPool2D, ParamLayer, ReLU, _check_impl)

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
