"""Data parallelism (cnn_parallel): the same maths as one thread, batch norm across the
parts, gradients summed once, errors raised without a hang, exact resume."""

import threading

import numpy as np
import pytest

import cnn_layers as L
import cnn_model as M
import cnn_parallel as P
import cnn_train as T

F64 = np.float64


def small_net(seed=0, impl="vectorized", dropout=0.0):
    """Conv -> pool -> batch norm -> ReLU twice (the second conv at stride 2), dropout, dense."""
    return M.Sequential([L.Conv2D(3, 4, 3, padding=1, impl=impl, dtype=F64), L.MaxPool2D(2, impl=impl),
                         L.BatchNorm(4, impl=impl, dtype=F64), L.ReLU(impl=impl),
                         L.Conv2D(4, 6, 3, stride=2, padding=1, impl=impl, dtype=F64), L.BatchNorm(6, impl=impl, dtype=F64),
                         L.ReLU(impl=impl), L.Flatten(), L.Dropout(dropout), L.Dense(6 * 2 * 2, 5, impl=impl, dtype=F64)],
                        seed=seed)


def step(net, model, x, y):
    """One forward and backward pass through ``net`` (a model or its DataParallel); model's
    gradients by key, its buffers, and the output."""
    loss = L.SoftmaxCrossEntropy()
    out = net.forward(x, training=True)
    loss.forward(out, y)
    net.backward(loss.backward(), input_grad=False)
    grads = {f"{i}.{k}": g.copy() for i, layer in enumerate(model.layers) for k, g in layer.grads.items()}
    buffers = {f"{i}.{k}": b.copy() for i, layer in enumerate(model.layers) for k, b in layer.buffers.items()}
    return out, grads, buffers


@pytest.mark.parametrize("n,threads", [(7, 2), (9, 3), (1, 2), (2, 4)])
def test_a_split_batch_gives_the_whole_batch_maths(n, threads):
    """Outputs, every gradient (batch norm's too: each part returns its share) and the
    running statistics (updated once, with the whole batch's) equal one thread's;
    odd splits and fewer images than threads included; two steps in a row."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((n, 3, 8, 8)), rng.integers(0, 5, n)
    serial, split = small_net(), small_net()
    net = P.DataParallel(split, threads)
    for _ in range(2):
        out_a, grads_a, buffers_a = step(serial, serial, x, y)
        out_b, grads_b, buffers_b = step(net, split, x, y)
        np.testing.assert_allclose(out_b, out_a, rtol=1e-10, atol=1e-12)
        assert grads_a.keys() == grads_b.keys() and len(grads_a) == 10
        for key in grads_a:
            np.testing.assert_allclose(grads_b[key], grads_a[key], rtol=1e-9, atol=1e-12, err_msg=key)
        for key in buffers_a:
            np.testing.assert_allclose(buffers_b[key], buffers_a[key], rtol=1e-10, atol=1e-13, err_msg=key)
    # inference: the parts use the running statistics, no synchronisation
    np.testing.assert_allclose(net.forward(x, training=False), serial.forward(x, training=False), rtol=1e-10)
    assert all(layer.allsum is None for layer in split.layers if isinstance(layer, L.BatchNorm))
    net.close()


def test_batch_norm_far_from_zero_takes_the_centred_path_in_every_part():
    """A mean far larger than the spread makes the vectorized batch norm recompute its
    variance from centred values: all parts must take that second sum together."""
    rng = np.random.default_rng(1)
    x = 1e4 + rng.standard_normal((6, 4, 3, 3))
    serial, split = (M.Sequential([L.BatchNorm(4, dtype=F64), L.Flatten(), L.Dense(36, 3, dtype=F64)], seed=0)
                     for _ in range(2))
    y = rng.integers(0, 3, 6)
    a, b = step(serial, serial, x, y), step(P.DataParallel(split, 2), split, x, y)
    np.testing.assert_allclose(b[0], a[0], rtol=1e-9)
    for key in a[1]:
        np.testing.assert_allclose(b[1][key], a[1][key], rtol=1e-7, atol=1e-10)


class FailOn(L.Layer):
    """Raises on a batch that holds the value ``bad`` (to fail one part only)."""

    def __init__(self, bad):
        super().__init__()
        self.bad = bad

    def forward(self, x, training=True):
        if (x == self.bad).any():
            raise ValueError("this part is bad")
        return x

    def backward(self, dout):
        return dout


def test_a_failing_part_raises_its_own_error_and_no_part_waits_forever():
    model = M.Sequential([FailOn(-7.0), L.BatchNorm(3, dtype=F64), L.Flatten(), L.Dense(3, 2, dtype=F64)], seed=0)
    x = np.ones((4, 3)); x[3, 0] = -7.0                   # only the second part fails; the first waits in batch norm
    net = P.DataParallel(model, 2)
    outcome = {}

    def run():
        try:
            net.forward(x)
        except Exception as error:                        # noqa: BLE001 (the test looks at it)
            outcome["error"] = error
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "a part waited forever for the failed one"
    assert isinstance(outcome.get("error"), ValueError) and "this part is bad" in str(outcome["error"])
    assert model.layers[1].allsum is None                 # the model is usable on one thread again
    model.forward(np.ones((4, 3)))


def test_fit_with_two_threads_trains_like_one_thread_and_resumes_exactly(tmp_path):
    rng = np.random.default_rng(2)
    x, y = rng.random((40, 3, 8, 8)), rng.integers(0, 5, 40)
    kw = dict(epochs=2, batch_size=16, seed=1, progress=False, log=None, validation=(x[:8], y[:8]))
    one, two = small_net(), small_net()
    h1 = T.fit(one, x, y, T.SGD(0.05, momentum=0.9), threads=1, **kw)
    h2 = T.fit(two, x, y, T.SGD(0.05, momentum=0.9), threads=2, **kw)
    np.testing.assert_allclose(h2.train_loss, h1.train_loss, rtol=1e-9)
    for (_, a, _), (_, b, _) in zip(one.parameters(), two.parameters()):
        np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-10)
    # with dropout the parts draw their masks from generators seeded by the model's: a checkpoint resumes them
    kw = {**kw, "epochs": 4, "ema": 0.9}
    full = T.fit(small_net(dropout=0.3), x, y, T.Adam(), threads=2, **kw)
    T.fit(small_net(dropout=0.3), x, y, T.Adam(), threads=2, checkpoint=tmp_path / "c.npz", **{**kw, "epochs": 2})
    resumed = small_net(dropout=0.3)
    history = T.fit(resumed, x, y, T.Adam(), threads=2, checkpoint=tmp_path / "c.npz", **kw)
    assert history.train_loss == full.train_loss and history.val_acc == full.val_acc


def test_thread_settings_are_checked_and_a_loop_batch_norm_stays_on_one_thread():
    model = small_net(impl="loop")
    assert P.parallel(model) is model                     # automatic: the loop batch norm cannot split
    with pytest.raises(ValueError, match="impl='loop' cannot share its statistics"):
        P.parallel(model, 2)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads must be a positive integer or None"):
            P.parallel(small_net(), bad)
    assert P.parallel(small_net(), 1).__class__ is M.Sequential
    assert P.default_threads() >= 1
