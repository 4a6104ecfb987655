"""Optimisers and schedules by hand, augmentation, fit: divergence, exact resume, dtypes,
clear early errors for bad arguments, data and checkpoints; uint8 input; gradient clipping."""

import json

import numpy as np
import pytest

import cnn_gradcheck as G
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


def _resume_setup(**extra):
    rng = np.random.default_rng(0)
    x, y = rng.random((48, 1, 8, 8), dtype=np.float32), rng.integers(0, 3, 48)

    def flip(xb, rng):                       # augmentation that draws from fit's generator
        flipped = rng.random(len(xb)) < 0.5
        return np.where(flipped[:, None, None, None], xb[..., ::-1], xb)

    model = M.Sequential([L.Conv2D(1, 3, 3), L.ReLU(), L.MaxPool2D(2), L.Flatten(),
                          L.Dense(27, 8), L.ReLU(), L.Dropout(0.3), L.Dense(8, 3)], seed=3)
    kw = dict(batch_size=10, seed=5, augment=flip, progress=False, log=None,
              schedule=T.step_schedule(0.01, 2, 0.5), validation=(x[:8], y[:8]))
    return model, x, y, {**kw, **extra}


# With weight averaging the checkpoint must carry the averages (and their update count):
# without them a resumed run would restart the average from the epoch-2 weights.
RESUME_SETTINGS = {
    "plain": {},
    "ema, label smoothing, per-step warm-up": dict(ema=0.9, label_smoothing=0.1,
                                                   schedule=T.warmup_linear_schedule(0.01, 4, warmup=0.3)),
    "alternating flips (by epoch)": dict(augment=T.augmentation(crop=1, flip="alternate", seed=2)),
}


@pytest.mark.parametrize("settings", RESUME_SETTINGS.values(), ids=RESUME_SETTINGS.keys())
def test_resumed_training_equals_an_uninterrupted_run(tmp_path, settings):
    model, x, y, kw = _resume_setup(**settings)
    full = T.fit(model, x, y, T.Adam(), epochs=4, **kw)

    ckpt = tmp_path / "run.npz"
    first, *_ = _resume_setup()
    T.fit(first, x, y, T.Adam(), epochs=2, checkpoint=ckpt, **kw)   # "interrupted" after 2 epochs
    resumed, *_ = _resume_setup()
    history = T.fit(resumed, x, y, T.Adam(), epochs=4, checkpoint=ckpt, **kw)
    for (_, a, _), (_, b, _) in zip(model.parameters(), resumed.parameters()):
        np.testing.assert_array_equal(a, b)
    assert history.train_loss == full.train_loss and history.val_acc == full.val_acc
    # a finished checkpoint resumes to the same (averaged) model without training again
    again, *_ = _resume_setup()
    T.fit(again, x, y, T.Adam(), epochs=4, checkpoint=ckpt, **kw)
    for (_, a, _), (_, b, _) in zip(model.parameters(), again.parameters()):
        np.testing.assert_array_equal(a, b)

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


def test_random_crop_with_reflected_borders():
    """pad="reflect": every image is a window of its input mirrored about the edges (no zeros
    come in), with the zero-padded crop's shifts (the same draws), for any border width."""
    x = np.random.default_rng(0).random((6, 2, 5, 4), dtype=np.float32) + 1     # no zeros of its own
    augment = T.augmentation(crop=2, pad="reflect")
    out = augment(x, np.random.default_rng(1))
    zeros = T.random_crop(x, np.random.default_rng(1), padding=2)
    reflected = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    zero_padded = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    for n in range(len(x)):
        (dy, dx), = [(dy, dx) for dy in range(5) for dx in range(5)
                     if np.array_equal(zeros[n], zero_padded[n, :, dy:dy + 5, dx:dx + 4])][:1]
        np.testing.assert_array_equal(out[n], reflected[n, :, dy:dy + 5, dx:dx + 4])
    assert (out > 0).all() and not np.array_equal(out, x)
    assert augment.settings == dict(crop=2, flip=False, pad="reflect")
    with pytest.raises(ValueError, match="augmentation: pad must be one of"):
        T.augmentation(crop=2, pad="edge")
    with pytest.raises(ValueError, match="random_crop: mode must be one of"):
        T.random_crop(x, np.random.default_rng(0), 2, mode="reflct")
    wide = T.augmentation(crop=6, pad="reflect")(x, np.random.default_rng(0))   # a border wider than the
    assert wide.shape == x.shape and (wide > 0).all()                             # image: reflected again


def test_random_flip_mirrors_some_images_and_keeps_the_rest():
    x = np.random.default_rng(0).random((40, 1, 3, 4))
    out = T.random_flip(x, np.random.default_rng(2))
    flipped = [np.array_equal(o, i[..., ::-1]) for o, i in zip(out, x)]
    kept = [np.array_equal(o, i) for o, i in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and 5 < sum(flipped) < 35
    assert T.augmentation()(x, np.random.default_rng(0)) is x


def test_alternating_flips_mirror_each_image_every_other_epoch():
    index = np.arange(2000)
    even, odd = T.alternating_flips(index, 0, seed=3), T.alternating_flips(index, 1, seed=3)
    assert 900 < even.sum() < 1100 and (even != odd).all()                  # half, then the other half
    np.testing.assert_array_equal(T.alternating_flips(index, 4, seed=3), even)
    np.testing.assert_array_equal(T.alternating_flips(index[::-7], 2, seed=3), even[::-7])   # by index, not position
    assert 0.4 < (even == T.alternating_flips(index, 0, seed=4)).mean() < 0.6    # another seed, another half
    x = np.random.default_rng(0).random((6, 2, 3, 4))
    augment = T.augmentation(flip="alternate", seed=3)
    assert augment.by_image and augment.settings == dict(crop=0, flip="alternate", seed=3)
    rows = np.array([5, 17, 2, 40, 41, 8])
    for epoch in (0, 1):
        out, flips = augment(x, np.random.default_rng(0), index=rows, epoch=epoch), T.alternating_flips(rows, epoch, 3)
        for o, i, f in zip(out, x, flips):
            np.testing.assert_array_equal(o, i[..., ::-1] if f else i)
    with pytest.raises(ValueError, match="index=, epoch="):
        augment(x, np.random.default_rng(0))
    assert not T.augmentation(flip=True).by_image


def test_fit_tells_a_by_image_augmentation_which_rows_and_epoch():
    model, x, y = tiny_problem(n=20)
    seen = []

    def augment(xb, rng, index, epoch):
        seen.append((epoch, list(index)))
        np.testing.assert_array_equal(xb, x[index])
        return xb
    augment.by_image = True
    T.fit(model, x, y, T.SGD(0.1), epochs=2, batch_size=8, augment=augment, progress=False, log=None)
    assert [e for e, _ in seen] == [0, 0, 0, 1, 1, 1]
    for epoch in (0, 1):                                     # each epoch: every row once, shuffled
        rows = [i for e, batch in seen if e == epoch for i in batch]
        assert sorted(rows) == list(range(20)) and rows != list(range(20))


def affine_loop(x, angle, zoom):
    """``T.affine`` pixel by pixel: the source point of each output pixel, then the
    four neighbours' weighted sum (bilinear), a neighbour outside the image counting 0."""
    N, C, H, W = x.shape
    out = np.zeros(x.shape)
    cy, cx = (H - 1) / 2, (W - 1) / 2
    for n in range(N):
        c, s = np.cos(angle[n]) / zoom[n], np.sin(angle[n]) / zoom[n]
        for i in range(H):
            for j in range(W):
                py, px = cy + c * (i - cy) - s * (j - cx), cx + s * (i - cy) + c * (j - cx)
                y0, x0 = int(np.floor(py)), int(np.floor(px))
                for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                    if 0 <= yy < H and 0 <= xx < W:
                        weight = (1 - abs(py - yy)) * (1 - abs(px - xx))
                        out[n, :, i, j] += weight * x[n, :, yy, xx]
    return out


def test_affine_matches_the_pixel_loop_and_known_transforms():
    rng = np.random.default_rng(0)
    x = rng.random((4, 2, 7, 6))
    angle, zoom = np.array([0.3, -1.2, 2.5, 0.0]), np.array([1.0, 0.8, 1.3, 0.5])
    np.testing.assert_allclose(T.affine(x, angle, zoom), affine_loop(x, angle, zoom), atol=1e-12)
    np.testing.assert_array_equal(T.affine(x, np.zeros(4), np.ones(4)), x)           # the identity
    pixels = (x * 255).astype(np.uint8)                                                # integer images: float32
    turned = T.affine(pixels, angle, zoom)
    assert turned.dtype == np.float32
    np.testing.assert_allclose(turned, affine_loop(pixels.astype(np.float64), angle, zoom), atol=1e-3)
    square = rng.random((2, 1, 6, 6), dtype=np.float32)
    quarter = T.affine(square, np.full(2, np.pi / 2), np.ones(2))                      # a quarter turn
    assert quarter.dtype == np.float32
    np.testing.assert_allclose(quarter, np.rot90(square, -1, axes=(2, 3)), atol=1e-6)
    dot = np.zeros((1, 1, 9, 9)); dot[0, 0, 4, 6] = 1                                  # 2 right of centre
    shrunk, magnified = (T.affine(dot, 0.0, z)[0, 0, 4] for z in (0.5, 2))                # scalars broadcast
    np.testing.assert_allclose(shrunk, [0, 0, 0, 0, 0, 1, 0, 0, 0], atol=1e-12)    # 1 right of centre
    np.testing.assert_allclose(magnified, [0, 0, 0, 0, 0, 0, 0, 0.5, 1], atol=1e-12)   # 4 right, spread
    for bad_x, bad_angle, bad_zoom, message in ((dot[0], 0.0, 1.0, r"\(N, C, H, W\)"), (dot, 0.0, 0.0, "> 0"),
                                                (dot, np.nan, 1.0, "finite"), (dot, np.zeros(3), 1.0, r"one per image \(1,\)")):
        with pytest.raises(ValueError, match=message):
            T.affine(bad_x, bad_angle, bad_zoom)


def test_random_affine_augmentation_draws_within_its_limits_and_records_its_settings():
    x = np.random.default_rng(0).random((50, 1, 12, 12), dtype=np.float32)
    out = T.random_affine(x, np.random.default_rng(1), degrees=10, zoom=0.1)
    rng = np.random.default_rng(1)                            # the same draws, in the same order
    angle, zoom = np.deg2rad(rng.uniform(-10, 10, 50)), rng.uniform(0.9, 1.1, 50)
    np.testing.assert_array_equal(out, T.affine(x, angle, zoom))
    augment = T.augmentation(crop=0, rotate=10, zoom=0.1)
    assert augment.settings == dict(crop=0, flip=False, rotate=10, zoom=0.1)
    assert T.augmentation(crop=2).settings == dict(crop=2, flip=False)   # as runs saved before rotations
    np.testing.assert_array_equal(augment(x, np.random.default_rng(1)), out)
    assert out.shape == x.shape and not np.array_equal(out, x)
    for bad in (dict(zoom=1.0), dict(zoom=-0.1), dict(rotate=-5), dict(rotate=float("nan"))):
        with pytest.raises(ValueError, match=r"augmentation: (zoom|rotate) .* must be a number in \[0, "):
            T.augmentation(**bad)
    for bad, message in ((dict(crop=-1), "crop .* integer >= 0, got -1"), (dict(crop=2.5), "crop .* got 2.5"),
                         (dict(crop=True), "crop .* got True"), (dict(flip="yes"), "flip must be True, False or 'alternate'")):
        with pytest.raises(ValueError, match=f"augmentation: {message}"):
            T.augmentation(**bad)
    assert T.augmentation(crop=np.int64(2), flip=np.bool_(True)).settings == dict(crop=2, flip=True)


# ---------------------------------------------------------------- reliability: clear, early errors

def tiny_problem(n=24, seed=0):
    rng = np.random.default_rng(seed)
    x, y = rng.random((n, 1, 4, 4), dtype=np.float32), rng.integers(0, 3, n)
    model = M.Sequential([L.Flatten(), L.Dense(16, 8), L.ReLU(), L.Dense(8, 3)], seed=1)
    return model, x, y


def weights(model):
    return [param.copy() for _, param, _ in model.parameters()]


@pytest.mark.parametrize("make,name", [
    (lambda: T.SGD(lr=float("nan")), "lr"), (lambda: T.SGD(lr=float("inf")), "lr"),
    (lambda: T.SGD(lr=0), "lr"), (lambda: T.Adam(lr=-1e-3), "lr"), (lambda: T.Adam(lr="0.1"), "lr"),
    (lambda: T.SGD(0.1, weight_decay=float("nan")), "weight_decay"),
    (lambda: T.SGD(0.1, momentum=1.0), "momentum"), (lambda: T.SGD(0.1, momentum=float("nan")), "momentum"),
    (lambda: T.Adam(beta1=1.0), "beta1"), (lambda: T.Adam(beta2=1.0), "beta2"),
    (lambda: T.Adam(beta1=-0.1), "beta1"), (lambda: T.Adam(eps=0), "eps"), (lambda: T.Adam(eps=float("nan")), "eps"),
    (lambda: T.step_schedule(0.1, step_size=0), "step_size"), (lambda: T.step_schedule(0.1, 2.5), "step_size"),
    (lambda: T.step_schedule(0.1, 2, gamma=0), "gamma"), (lambda: T.step_schedule(float("inf"), 2), "lr"),
    (lambda: T.cosine_schedule(0.1, epochs=0), "epochs"), (lambda: T.cosine_schedule(0.1, epochs=-1), "epochs"),
    (lambda: T.cosine_schedule(0.1, 10, lr_min=-1e-3), "lr_min"),
    (lambda: T.warmup_linear_schedule(0, 10), "lr"), (lambda: T.warmup_linear_schedule(0.1, 0), "epochs"),
    (lambda: T.warmup_linear_schedule(0.1, 2.5), "epochs"), (lambda: T.warmup_linear_schedule(0.1, 10, 1.0), "warmup"),
    (lambda: T.warmup_linear_schedule(0.1, 10, -0.1), "warmup"),
    (lambda: T.warmup_linear_schedule(0.1, 10, float("nan")), "warmup"),
    (lambda: L.SoftmaxCrossEntropy(label_smoothing=1.0), "label_smoothing"),
    (lambda: L.SoftmaxCrossEntropy(label_smoothing=-0.1), "label_smoothing"),
    (lambda: T.WeightAverage(M.Sequential([L.Dense(2, 2)]), decay=1.0), "decay"),
])
def test_bad_optimiser_and_schedule_hyperparameters_fail_at_construction(make, name):
    with pytest.raises(ValueError, match=rf"\b{name} must be"):
        make()


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
    (dict(batch_size=-4), "batch_size must be a positive integer"),
    (dict(batch_size=2.5), "batch_size must be a positive integer"),
    (dict(epochs=-1), "epochs must be a positive integer, got -1"),
    (dict(epochs=0), "epochs must be a positive integer"),
    (dict(clip_norm=0.0), "clip_norm must be a finite number > 0"),
    (dict(schedule=lambda epoch: float("nan")), r"schedule\(0\).*must be a finite number > 0"),
    (dict(label_smoothing=1.0), r"fit: label_smoothing must be a number in \[0, 1\)"),
    (dict(ema=1.0), r"fit: ema .*must be a number in \(0, 1\)"),
    (dict(ema=0), r"fit: ema .*must be a number in \(0, 1\)"),
    (dict(validation=(np.zeros((5, 1, 4, 5), np.float32), np.zeros(5, int))), "validation examples have shape"),
    (dict(validation=(np.zeros((5, 1, 4, 4), np.float32), np.zeros(4, int))), "5 inputs but 4 labels"),
    (dict(validation=(np.zeros((5, 1, 4, 4), np.float32), np.full(5, 7))), r"validation y.*0\.\.2"),
])
def test_fit_rejects_bad_arguments_before_any_work(kwargs, message):
    model, x, y = tiny_problem()
    before, calls = weights(model), []
    args = dict(epochs=2, batch_size=8, progress=False, log=calls.append,
                augment=lambda xb, rng: calls.append("batch") or xb)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        T.fit(model, x, y, T.SGD(0.1), **args)
    assert calls == []                                  # not one batch, not one epoch
    for a, b in zip(before, weights(model)):
        np.testing.assert_array_equal(a, b)


def test_fit_accepts_lists_and_refuses_ragged_ones():
    model, x, y = tiny_problem()
    from_arrays = T.fit(model, x, y, T.SGD(0.1), epochs=1, batch_size=8, progress=False, log=None)
    model, *_ = tiny_problem()
    from_lists = T.fit(model, x.tolist(), y.tolist(), T.SGD(0.1), epochs=1, batch_size=8, progress=False, log=None)
    assert from_lists.train_loss == pytest.approx(from_arrays.train_loss)
    with pytest.raises(TypeError, match="fit: x must be a NumPy array"):
        T.fit(model, [np.zeros((1, 4, 4)), np.zeros((1, 4, 5))], [0, 1], T.SGD(0.1), epochs=1, log=None)


def test_empty_validation_set_is_skipped_with_a_warning_before_training():
    model, x, y = tiny_problem()
    with pytest.warns(UserWarning, match=r"validation set is empty.*validation=None"):
        history = T.fit(model, x, y, T.SGD(0.1), epochs=2, batch_size=8, progress=False, log=None,
                        validation=(x[:0], y[:0]))
    assert len(history.train_loss) == 2 and history.val_loss == [] and history.val_acc == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_refused_with_a_count(bad):
    model, x, y = tiny_problem()
    x[3, 0, 1, 2] = x[5, 0, 0, 0] = x[5, 0, 3, 3] = bad
    message = r"3 of the 384 input values are not finite \(NaN or inf\), in 2 of the 24 examples"
    with pytest.raises(ValueError, match="evaluate: " + message):
        T.evaluate(model, x, y)
    with pytest.raises(ValueError, match="fit: " + message):
        T.fit(model, x, y, T.SGD(0.1), epochs=1, progress=False, log=None)
    clean = x[:2]
    with pytest.raises(ValueError, match=r"fit: 3 of the 384 validation input values are not finite"):
        T.fit(model, clean, y[:2], T.SGD(0.1), epochs=1, progress=False, log=None, validation=(x, y))


def test_divergence_names_epoch_and_batch_and_keeps_the_last_good_checkpoint(tmp_path):
    model, x, y = tiny_problem()
    ckpt = tmp_path / "run.npz"
    T.fit(model, x, y, T.SGD(0.1), epochs=1, batch_size=24, checkpoint=ckpt, progress=False, log=None)
    good = dict(np.load(ckpt))
    # lr 1e39 is a finite float, but one float32 step of it makes every weight infinite while
    # the loss of that batch is still finite: the old loop saved those weights after the epoch.
    with np.errstate(all="ignore"), \
            pytest.raises(FloatingPointError, match=r"epoch 2, batch 1 .*learning rate.*still holds epoch 1"):
        T.fit(model, x, y, T.SGD(1e39), epochs=3, batch_size=24, checkpoint=ckpt, progress=False, log=None)
    saved = dict(np.load(ckpt))
    assert json.loads(str(saved["training"]))["epoch"] == 1
    for key in good:
        np.testing.assert_array_equal(saved[key], good[key], err_msg=key)


def test_resuming_from_a_broken_or_foreign_checkpoint_fails_clearly(tmp_path):
    model, x, y = tiny_problem()
    ckpt = tmp_path / "run.npz"
    T.fit(model, x, y, T.Adam(), epochs=1, batch_size=8, checkpoint=ckpt, progress=False, log=None)
    data = ckpt.read_bytes()
    corrupt = bytearray(data)
    corrupt[len(data) // 2] ^= 0xFF                     # inside a stored array: bad CRC
    saved_model = tmp_path / "model.npz"
    model.save(saved_model)
    cases = {"truncated.npz": data[:len(data) // 3], "empty.npz": b"", "corrupt.npz": bytes(corrupt),
             "model.npz": saved_model.read_bytes()}
    np.save(tmp_path / "array.npy", np.zeros(3))
    cases["array.npy"] = (tmp_path / "array.npy").read_bytes()
    for name, content in cases.items():
        path = tmp_path / "bad" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
        fresh, *_ = tiny_problem()
        with pytest.raises(ValueError, match=r"checkpoint .*" + name + r" cannot be resumed: ") as info:
            T.fit(fresh, x, y, T.Adam(), epochs=2, batch_size=8, checkpoint=path, progress=False, log=None)
        assert isinstance(info.value, T.CheckpointError)
        message = str(info.value)
        if name in ("model.npz", "array.npy"):      # not damaged, just something else: never "delete it"
            assert "checkpoint path of its own" in message and "Delete it" not in message
            assert ("saved model" in message and "Sequential.load" in message) if name == "model.npz" \
                else "one array of shape (3,)" in message
        else:
            assert "Delete it to start training over" in message


def test_resuming_with_another_optimiser_is_refused(tmp_path):
    model, x, y = tiny_problem()
    for written, resumed, name in [(T.Adam(), T.SGD(0.1, momentum=0.9), "Adam"),
                                   (T.SGD(0.1, momentum=0.9), T.SGD(0.1), "SGD")]:
        ckpt = tmp_path / f"{name}-{resumed.momentum}.npz"
        T.fit(model, x, y, written, epochs=1, batch_size=8, checkpoint=ckpt, progress=False, log=None)
        with pytest.raises(ValueError, match=rf"written by {name}.*drop the optimiser state"):
            T.fit(model, x, y, resumed, epochs=2, batch_size=8, checkpoint=ckpt, progress=False, log=None)
    # Checkpoints written before the optimiser's name was recorded: Adam is recognised by its buffers.
    arrays = dict(np.load(tmp_path / "Adam-0.9.npz"))
    training = json.loads(str(arrays["training"]))
    del training["optimizer"]
    arrays["training"] = np.array(json.dumps(training))
    np.savez(tmp_path / "old.npz", **arrays)
    with pytest.raises(ValueError, match="written by Adam"):
        T.fit(model, x, y, T.SGD(0.1), epochs=2, batch_size=8, checkpoint=tmp_path / "old.npz",
              progress=False, log=None)


def test_uint8_images_train_and_evaluate_like_floats_divided_by_255():
    rng = np.random.default_rng(4)
    x8, y = rng.integers(0, 256, (20, 1, 4, 4), dtype=np.uint8), rng.integers(0, 3, 20)
    xf = x8.astype(np.float32) / 255
    runs = []
    for x in (x8, xf):
        model, *_ = tiny_problem()
        history = T.fit(model, x, y, T.Adam(), epochs=2, batch_size=8, progress=False, log=None,
                        validation=(x, y))
        runs.append((model, history))
    (m8, h8), (mf, hf) = runs
    assert h8.as_dict() | {"seconds": 0} == hf.as_dict() | {"seconds": 0}
    for a, b in zip(weights(m8), weights(mf)):
        np.testing.assert_array_equal(a, b)
    assert T.evaluate(m8, x8, y) == T.evaluate(m8, xf, y)
    with pytest.raises(ValueError, match="floating-point.*int16"):           # other dtypes: today's error
        T.fit(m8, x8.astype(np.int16), y, T.Adam(), epochs=1, progress=False, log=None)


def test_clip_gradients_by_global_norm_by_hand():
    model, layer = one_weight_model(grad_w=3.0, grad_b=4.0)          # global norm 5
    assert T.clip_gradients(model, 10.0) == pytest.approx(5.0)       # below the limit: unchanged
    assert layer.grads["W"][0, 0] == 3.0 and layer.grads["b"][0] == 4.0
    assert T.clip_gradients(model, 1.0) == pytest.approx(5.0)
    assert layer.grads["W"][0, 0] == pytest.approx(0.6) and layer.grads["b"][0] == pytest.approx(0.8)
    T.SGD(lr=0.1).step(model)
    assert layer.params["W"][0, 0] == pytest.approx(0.94) and layer.params["b"][0] == pytest.approx(0.92)
    layer.grads["W"][0, 0] = np.nan
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        T.clip_gradients(model, 1.0)
    with pytest.raises(ValueError, match="clip_norm"):
        T.clip_gradients(model, -1.0)


def test_fit_clip_norm_bounds_each_step():
    model, x, y = tiny_problem()
    before = weights(model)
    T.fit(model, x, y, T.SGD(lr=1.0), epochs=1, batch_size=24, clip_norm=1e-3, progress=False, log=None)
    step = np.sqrt(sum(((a - b).astype(np.float64) ** 2).sum() for a, b in zip(weights(model), before)))
    assert step == pytest.approx(1e-3, rel=1e-4)                    # one step of lr * clip_norm
    unclipped, *_ = tiny_problem()
    huge, *_ = tiny_problem()
    T.fit(unclipped, x, y, T.SGD(0.1), epochs=1, batch_size=8, progress=False, log=None)
    T.fit(huge, x, y, T.SGD(0.1), epochs=1, batch_size=8, clip_norm=1e9, progress=False, log=None)
    for a, b in zip(weights(unclipped), weights(huge)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- label smoothing

def plain_cross_entropy(logits, labels):
    """The loss exactly as it was computed before label smoothing existed."""
    z = logits - logits.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    rows = np.arange(len(labels))
    dlogits = np.exp(log_probs)
    dlogits[rows, labels] -= 1
    dlogits /= len(labels)
    return float(-log_probs[rows, labels].mean()), dlogits


def smoothed_cross_entropy_loop(logits, labels, eps):
    """The definition, one term at a time: t = (1 - eps) onehot + eps / K, loss = mean_n -sum_k t log p."""
    N, K = logits.shape
    total = 0.0
    for n in range(N):
        m = max(logits[n])
        log_sum = m + np.log(sum(np.exp(v - m) for v in logits[n]))
        for k in range(K):
            t = (1 - eps) * (k == labels[n]) + eps / K
            total -= t * (logits[n, k] - log_sum)
    return total / N


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_label_smoothing_zero_gives_exactly_the_plain_loss(dtype):
    rng = np.random.default_rng(0)
    logits, labels = (rng.standard_normal((7, 5)) * 3).astype(dtype), rng.integers(0, 5, 7)
    expected_loss, expected_grad = plain_cross_entropy(logits, labels)
    for loss_fn in (L.SoftmaxCrossEntropy(), L.SoftmaxCrossEntropy(label_smoothing=0.0)):
        assert loss_fn.forward(logits, labels) == expected_loss
        grad = loss_fn.backward()
        assert grad.dtype == dtype
        np.testing.assert_array_equal(grad, expected_grad)


def test_label_smoothing_matches_its_definition_and_finite_differences():
    rng = np.random.default_rng(1)
    logits, labels, eps = rng.standard_normal((6, 4)) * 2, rng.integers(0, 4, 6), 0.2
    loss_fn = L.SoftmaxCrossEntropy(label_smoothing=eps)
    assert loss_fn.forward(logits, labels) == pytest.approx(smoothed_cross_entropy_loop(logits, labels, eps),
                                                            rel=1e-12)
    analytic = loss_fn.backward()
    numeric = G.numeric_gradient(lambda: L.SoftmaxCrossEntropy(eps).forward(logits, labels), logits)
    assert G.relative_error(analytic, numeric) < 1e-8
    # the targets are (1 - eps) onehot + eps / K: the gradient is p - t, so each row sums to 0
    np.testing.assert_allclose(analytic.sum(axis=1), 0, atol=1e-15)
    assert L.SoftmaxCrossEntropy(eps).forward(np.zeros((2, 4)), [0, 1]) == pytest.approx(np.log(4))


def test_fit_passes_label_smoothing_to_the_loss():
    model, x, y = tiny_problem()
    kw = dict(epochs=1, batch_size=24, progress=False, log=None)
    plain = T.fit(model, x, y, T.SGD(0.1), **kw)
    model, *_ = tiny_problem()
    smooth = T.fit(model, x, y, T.SGD(0.1), label_smoothing=0.3, **kw)
    fresh, *_ = tiny_problem()
    expected = L.SoftmaxCrossEntropy(0.3).forward(fresh.forward(x), y)   # one batch: the loss before the step
    assert smooth.train_loss[0] == pytest.approx(expected, rel=1e-6) != plain.train_loss[0]


# ---------------------------------------------------------------- per-step schedules

def test_warmup_linear_schedule_rises_then_falls_linearly():
    schedule = T.warmup_linear_schedule(0.1, epochs=10, warmup=0.2)
    assert schedule.per_step is True and T.is_per_step(schedule)
    assert not T.is_per_step(T.cosine_schedule(0.1, 10)) and not T.is_per_step(T.step_schedule(0.1, 2))
    assert [schedule(t) for t in (0, 1, 2, 6, 10)] == pytest.approx([0.0, 0.05, 0.1, 0.05, 0.0])
    assert schedule(1.5) == pytest.approx(0.075)
    flat_start = T.warmup_linear_schedule(0.1, epochs=4, warmup=0.0)
    assert [flat_start(t) for t in (0, 1, 3.5)] == pytest.approx([0.1, 0.075, 0.0125])


def test_fit_calls_per_step_schedules_every_batch_and_others_once_per_epoch():
    model, x, y = tiny_problem()                         # 24 examples, batches of 8: 3 batches per epoch
    used, calls = [], []
    optimizer = T.SGD(0.1)

    def record_lr(xb, rng):                             # augment runs after fit sets the rate of the batch
        used.append(optimizer.lr)
        return xb

    def per_epoch(epoch):
        calls.append(epoch)
        return 0.1 / (1 + epoch)

    kw = dict(epochs=2, batch_size=8, progress=False, log=None, augment=record_lr)
    history = T.fit(model, x, y, optimizer, schedule=per_epoch, **kw)
    assert calls == [0, 1] and all(isinstance(e, int) for e in calls)          # as before: whole epochs
    assert used == [0.1] * 3 + [0.05] * 3 and history.lr == [0.1, 0.05]
    used.clear()
    warm = T.warmup_linear_schedule(0.3, epochs=2, warmup=0.5)
    history = T.fit(model, x, y, optimizer, schedule=warm, **kw)
    assert used == pytest.approx([warm(e + b / 3) for e in range(2) for b in range(3)])
    assert used == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.2, 0.1]) and history.lr == pytest.approx([0.2, 0.1])


# ---------------------------------------------------------------- weight averaging (EMA)

def test_weight_average_by_hand_and_applied_restores_the_weights_exactly():
    model, layer = one_weight_model()                    # W = 1
    average = T.WeightAverage(model, decay=0.9)
    expected = 1.0
    for step, w in enumerate([2.0, 4.0, 0.5, 3.0]):
        layer.params["W"][...] = w
        average.update(model)
        d = min(0.9, (1 + step) / (10 + step))          # 0.1, 2/11, 0.25, 4/13: the ramp, then 0.9
        expected = d * expected + (1 - d) * w
        assert average.arrays["param.0.W"][0, 0] == pytest.approx(expected)
    bn = M.Sequential([L.BatchNorm(2)])
    bn_average = T.WeightAverage(bn, 0.5)
    bn.layers[0].buffers["running_mean"][...] = 4.0
    bn_average.update(bn)                               # buffers are averaged too: d = 0.1 at first
    assert bn_average.arrays["buffer.0.running_mean"] == pytest.approx([3.6, 3.6])
    live = layer.params["W"].copy()
    with average.applied(model):
        assert layer.params["W"][0, 0] == pytest.approx(expected) != live[0, 0]
    np.testing.assert_array_equal(layer.params["W"], live)


def test_fit_with_ema_validates_and_returns_the_averaged_weights():
    model, x, y = tiny_problem()
    snapshots = []                                      # the weights before every step of a plain run
    kw = dict(epochs=2, batch_size=8, progress=False, log=None, validation=(x, y))
    T.fit(model, x, y, T.SGD(0.5), augment=lambda xb, rng: snapshots.append(weights(model)) or xb, **kw)
    trajectory = snapshots[1:] + [weights(model)]       # the weights after every step
    averaged, *_ = tiny_problem()
    history = T.fit(averaged, x, y, T.SGD(0.5), ema=0.8, **kw)
    expected = [w.astype(np.float64) for w in snapshots[0]]
    for t, after in enumerate(trajectory):
        d = min(0.8, (1 + t) / (10 + t))
        expected = [d * e + (1 - d) * a for e, a in zip(expected, after)]
    for got, want, live in zip(weights(averaged), expected, trajectory[-1]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(got, live)              # not the last weights
    assert history.val_loss[-1] == T.evaluate(averaged, x, y)[0]     # validated with the averages


def test_resuming_with_another_ema_setting_is_refused(tmp_path):
    model, x, y = tiny_problem()
    kw = dict(batch_size=8, progress=False, log=None)
    for written, given in [(0.9, None), (None, 0.9), (0.9, 0.99)]:
        ckpt = tmp_path / f"{written}-{given}.npz"
        T.fit(model, x, y, T.SGD(0.1), epochs=1, checkpoint=ckpt, ema=written, **kw)
        with pytest.raises(T.CheckpointError, match=rf"ema={written}, but fit was given ema={given}"):
            T.fit(model, x, y, T.SGD(0.1), epochs=2, checkpoint=ckpt, ema=given, **kw)
    arrays = dict(np.load(tmp_path / "0.9-None.npz"))
    del arrays["ema.param.1.W"]
    np.savez(tmp_path / "damaged.npz", **arrays)
    with pytest.raises(T.CheckpointError, match=r"weight average ema.param.1.W is missing.*Delete it"):
        T.fit(model, x, y, T.SGD(0.1), epochs=2, checkpoint=tmp_path / "damaged.npz", ema=0.9, **kw)


# ---------------------------------------------------------------- frozen layers

def frozen_problem():
    model, x, y = tiny_problem()
    model.layers[1].trainable = False                   # Dense 16 -> 8
    return model, x, y


def test_optimisers_and_clipping_skip_frozen_layers():
    for optimizer in (T.SGD(0.1, momentum=0.9, weight_decay=0.1), T.Adam(weight_decay=0.1)):
        model, x, y = frozen_problem()
        frozen, trained = model.layers[1], model.layers[3]
        before = {k: v.copy() for k, v in frozen.params.items()}
        model.forward(x)
        model.backward(np.ones((24, 3)))
        frozen.grads = {k: np.ones_like(v) for k, v in frozen.params.items()}    # a gradient it must ignore
        trained_before = trained.params["W"].copy()
        optimizer.step(model)
        for key in before:
            np.testing.assert_array_equal(frozen.params[key], before[key])        # no update, no weight decay
        assert not np.array_equal(trained.params["W"], trained_before)
        assert all(not key.startswith("1.") for bufs in optimizer.state.values() for key in bufs)
    model, _ = one_weight_model(grad_w=3.0, grad_b=4.0)
    model.layers.insert(0, L.Dense(1, 1, dtype=F64))
    model.layers[0].trainable = False
    model.layers[0].grads = {"W": np.full((1, 1), 100.0), "b": np.full(1, 100.0)}
    assert T.clip_gradients(model, 1.0) == pytest.approx(5.0)                    # the frozen 100s do not count
    assert model.layers[0].grads["W"][0, 0] == 100.0


def test_fit_leaves_frozen_layers_unchanged_and_trains_the_rest():
    model, x, y = frozen_problem()
    before = weights(model)
    T.fit(model, x, y, T.Adam(1e-2, weight_decay=0.1), epochs=2, batch_size=8, progress=False, log=None,
          clip_norm=1.0)
    after = weights(model)
    np.testing.assert_array_equal(after[0], before[0])                    # layer 1 W
    np.testing.assert_array_equal(after[1], before[1])                    # layer 1 b
    assert not np.array_equal(after[2], before[2])
    assert model.num_params(trainable_only=True) == model.num_params() - (16 * 8 + 8)


# ---------------------------------------------------------------- test-time augmentation

def test_evaluate_with_flip_tta_averages_the_logits():
    rng = np.random.default_rng(3)
    x, y = rng.random((10, 2, 4, 4), dtype=np.float32), rng.integers(0, 3, 10)
    model = M.Sequential([L.Conv2D(2, 3, 3), L.ReLU(), L.Flatten(), L.Dense(12, 3)], seed=2)
    assert T.evaluate(model, x, y, batch_size=4) == T.evaluate(model, x, y, batch_size=4, tta=None)
    logits = (model.forward(x, training=False) + model.forward(x[..., ::-1].copy(), training=False)) / 2
    loss, acc = T.evaluate(model, x, y, batch_size=4, tta="flip")
    assert loss == pytest.approx(L.SoftmaxCrossEntropy().forward(logits, y), rel=1e-6)
    assert acc == np.mean(logits.argmax(axis=1) == y)
    with pytest.raises(ValueError, match="evaluate: tta must be None.*or 'flip'"):
        T.evaluate(model, x, y, tta="rotate")
    flat = M.Sequential([L.Dense(4, 3)])
    with pytest.raises(ValueError, match=r"evaluate: tta='flip' .*\(N, C, H, W\)"):
        T.evaluate(flat, x[:, 0, 0], y, tta="flip")


def test_lr_scale_multiplies_the_rate_of_the_named_parameters_only():
    model = M.Sequential([L.Dense(1, 1, dtype=F64), L.BatchNorm(1, dtype=F64)], seed=None)
    dense, norm = model.layers
    for layer in model.layers:
        layer.grads = {name: np.ones_like(p) for name, p in layer.params.items()}
    T.SGD(0.1, lr_scale={"beta": 8}).step(model)
    assert norm.params["beta"][0] == pytest.approx(-0.8)        # 0 - 8 * 0.1 * 1
    assert norm.params["gamma"][0] == pytest.approx(0.9)        # the plain rate
    assert dense.params["b"][0] == pytest.approx(-0.1)
    with pytest.raises(ValueError, match=r"lr_scale names \['bta'\].*'beta'"):
        T.SGD(0.1, lr_scale={"bta": 8}).step(model)              # a typo is not ignored
    assert norm.params["beta"][0] == pytest.approx(-0.8)        # and nothing was updated
    with pytest.raises(ValueError, match="lr_scale"):
        T.Adam(lr_scale={"beta": -1.0})
    with pytest.raises(ValueError, match="must be a dict"):
        T.SGD(0.1, lr_scale=8)
