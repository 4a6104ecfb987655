"""Optimisers and schedules by hand, augmentation, fit: divergence, exact resume, dtypes."""

import numpy as np
import pytest

import cnn_layers as L
import cnn_model as M
import cnn_train as T

F64 = np.float64


def one_weight_model(grad_w=1.0, grad_b=1.0):
    model = M.Sequential([L.Dense(1, 1, dtype=F64)], seed=None)
    layer = model.layers[0]
    layer.params["W"][...] = 1.0
    layer.params["b"][...] = 1.0
    layer.grads = {"W": np.full((1, 1), grad_w), "b": np.full(1, grad_b)}
    return model, layer


@pytest.mark.parametrize("optimizer,expected_w", [
    (T.SGD(lr=0.1), [0.9, 0.8]),
    (T.SGD(lr=0.1, momentum=0.9), [0.9, 0.71]),                  # v = -0.1, then -0.19
    (T.SGD(lr=0.1, momentum=0.9, nesterov=True), [0.81, 0.539]),
    (T.SGD(lr=0.1, weight_decay=0.5), [0.85, 0.7075]),           # g = 1 + 0.5 * W
])
def test_sgd_steps_by_hand(optimizer, expected_w):
    model, layer = one_weight_model()
    for expected in expected_w:
        optimizer.step(model)
        assert layer.params["W"][0, 0] == pytest.approx(expected)
    # weight decay never touches biases
    assert layer.params["b"][0] == pytest.approx(1 - 0.1 * len(expected_w) if optimizer.momentum == 0
                                                 else expected_w[-1])


def test_adam_first_step_moves_by_lr_times_sign():
    model, layer = one_weight_model(grad_w=-3.0, grad_b=0.25)
    T.Adam(lr=0.01).step(model)
    assert layer.params["W"][0, 0] == pytest.approx(1.01, rel=1e-6)
    assert layer.params["b"][0] == pytest.approx(0.99, rel=1e-6)


def test_schedules():
    step = T.step_schedule(0.1, step_size=2, gamma=0.5)
    assert [step(e) for e in range(5)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    cosine = T.cosine_schedule(0.1, epochs=10, lr_min=0.0)
    assert [cosine(0), cosine(5), cosine(10)] == pytest.approx([0.1, 0.05, 0.0])


def test_diverging_learning_rate_stops_with_a_clear_message():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 1, 8, 8)).astype(np.float32) * 100, rng.integers(0, 3, 64)
    model = M.Sequential([L.Flatten(), L.Dense(64, 32), L.ReLU(), L.Dense(32, 3)])
    with np.errstate(all="ignore"), pytest.raises(FloatingPointError, match="diverged.*learning rate"):
        T.fit(model, x, y, T.SGD(lr=1e12), epochs=5, batch_size=16, progress=False, log=None)


def _resume_setup():
    rng = np.random.default_rng(0)
    x, y = rng.random((48, 1, 8, 8), dtype=np.float32), rng.integers(0, 3, 48)

    def flip(xb, rng):                       # augmentation that draws from fit's generator
        flipped = rng.random(len(xb)) < 0.5
        return np.where(flipped[:, None, None, None], xb[..., ::-1], xb)

    model = M.Sequential([L.Conv2D(1, 3, 3), L.ReLU(), L.MaxPool2D(2), L.Flatten(),
                          L.Dense(27, 8), L.ReLU(), L.Dropout(0.3), L.Dense(8, 3)], seed=3)
    return model, x, y, dict(batch_size=10, seed=5, augment=flip, progress=False, log=None,
                             schedule=T.step_schedule(0.01, 2, 0.5), validation=(x[:8], y[:8]))


def test_resumed_training_equals_an_uninterrupted_run(tmp_path):
    model, x, y, kw = _resume_setup()
    full = T.fit(model, x, y, T.Adam(), epochs=4, **kw)

    ckpt = tmp_path / "run.npz"
    first, *_ = _resume_setup()
    T.fit(first, x, y, T.Adam(), epochs=2, checkpoint=ckpt, **kw)   # "interrupted" after 2 epochs
    resumed, *_ = _resume_setup()
    history = T.fit(resumed, x, y, T.Adam(), epochs=4, checkpoint=ckpt, **kw)

    for (_, a, _), (_, b, _) in zip(model.parameters(), resumed.parameters()):
        np.testing.assert_array_equal(a, b)
    assert history.train_loss == full.train_loss and history.val_acc == full.val_acc
    assert len(history.seconds) == 4


def test_float32_training_step_never_upcasts():
    model = M.mnist_cnn(channels=(4, 8), hidden=16)
    x = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
    out = x
    for layer in model.layers:
        out = layer.forward(out, training=True)
        assert out.dtype == np.float32, layer
    loss_fn = L.SoftmaxCrossEntropy()
    loss_fn.forward(out, np.arange(8) % 10)
    dout = loss_fn.backward()
    assert dout.dtype == np.float32
    for layer in reversed(model.layers):
        dout = layer.backward(dout)
        assert dout.dtype == np.float32, layer
    optimizer = T.Adam()
    optimizer.step(model)
    for key, param, grad in model.parameters():
        assert param.dtype == grad.dtype == np.float32, key
    assert all(buf.dtype == np.float32 for bufs in optimizer.state.values() for buf in bufs.values())


def test_random_crop_shifts_each_image_within_the_padding():
    x = np.random.default_rng(0).random((6, 2, 5, 4), dtype=np.float32)
    out = T.random_crop(x, np.random.default_rng(1), padding=2)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    shifts = set()
    for n in range(len(x)):
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if np.array_equal(out[n], padded[n, :, dy:dy + 5, dx:dx + 4])]
        assert matches, f"image {n} is not a shift of its input"
        shifts.add(matches[0])
    assert len(shifts) > 1                                  # the shifts are random, not all equal
    np.testing.assert_array_equal(T.random_crop(x, np.random.default_rng(1), padding=0), x)


def test_random_flip_mirrors_some_images_and_keeps_the_rest():
    x = np.random.default_rng(0).random((40, 1, 3, 4))
    out = T.random_flip(x, np.random.default_rng(2))
    flipped = [np.array_equal(o, i[..., ::-1]) for o, i in zip(out, x)]
    kept = [np.array_equal(o, i) for o, i in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and 5 < sum(flipped) < 35
    assert T.augmentation()(x, np.random.default_rng(0)) is x
