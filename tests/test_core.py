"""Tests of cnn_core: agreement of loop and vectorized layers, finite-difference
gradient checks (float64), metrics and optimisers on hand-computed examples,
error messages, saving, checkpoint/resume and dtypes."""
import os

import numpy as np
import pytest

import cnn_core as C

F64 = np.float64


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

numeric_grad, rel_error, gradient_errors = C.numeric_gradient, C.relative_error, C.gradient_errors


def test_numeric_gradient_and_relative_error_on_a_known_function():
    a = np.array([[1.0, -2.0], [0.5, 3.0]])
    np.testing.assert_allclose(numeric_grad(lambda: np.sum(a ** 3), a), 3 * a ** 2, rtol=1e-8)
    assert rel_error(a, a) == 0 and rel_error(a, -a) == 1
    assert rel_error(a, a * (1 + 1e-3)) == pytest.approx(5e-4, rel=1e-2)


def random_conv_cases(count, seed=0):
    """Random (N, C, H, W, F, kh, kw, stride, padding) with stride 1-3,
    padding 0-2, non-square kernels and inputs, odd sizes."""
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < count:
        kh, kw = rng.integers(1, 5, size=2)
        stride, padding = int(rng.integers(1, 4)), int(rng.integers(0, 3))
        H, W = rng.integers(max(kh, kw), 10, size=2)
        N, Cin, F = int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(1, 5))
        cases.append((N, Cin, int(H), int(W), F, int(kh), int(kw), stride, padding))
    return cases


# ---------------------------------------------------------------------------
# loop and vectorized implementations agree
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", random_conv_cases(12))
def test_conv_loop_matches_vectorized(case):
    N, Cin, H, W, F, kh, kw, stride, padding = case
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, Cin, H, W))
    loop = C.Conv2D(Cin, F, (kh, kw), stride, padding, impl="loop", seed=2, dtype=F64)
    vec = C.Conv2D(Cin, F, (kh, kw), stride, padding, impl="vectorized", seed=2, dtype=F64)
    out_loop, out_vec = loop.forward(x), vec.forward(x)
    assert out_loop.shape == out_vec.shape == (
        N, F, C.output_size(H, kh, stride, padding), C.output_size(W, kw, stride, padding))
    np.testing.assert_allclose(out_vec, out_loop, rtol=1e-12, atol=1e-12)
    dout = rng.standard_normal(out_loop.shape)
    np.testing.assert_allclose(vec.backward(dout), loop.backward(dout), rtol=1e-12, atol=1e-12)
    for name in ("W", "b"):
        np.testing.assert_allclose(vec.grads[name], loop.grads[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pool_cls", [C.MaxPool2D, C.AvgPool2D])
@pytest.mark.parametrize("pool,stride,shape", [
    (2, None, (2, 3, 8, 8)), (2, None, (1, 2, 7, 9)),       # odd sizes: last row/column dropped
    (3, 2, (2, 2, 9, 7)),                                   # overlapping windows
    ((2, 3), 1, (1, 2, 5, 6)), ((3, 1), (2, 3), (2, 1, 8, 7))])
def test_pool_loop_matches_vectorized(pool_cls, pool, stride, shape):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape)
    loop, vec = pool_cls(pool, stride, impl="loop"), pool_cls(pool, stride)
    out_loop, out_vec = loop.forward(x), vec.forward(x)
    np.testing.assert_allclose(out_vec, out_loop, rtol=1e-12, atol=1e-12)
    dout = rng.standard_normal(out_loop.shape)
    np.testing.assert_allclose(vec.backward(dout), loop.backward(dout), rtol=1e-12, atol=1e-12)


def test_maxpool_overlapping_windows_add_gradients_and_ties_pick_the_first():
    # A single large value shared by 4 overlapping 3x3/2 windows receives all four gradients.
    x = np.zeros((1, 1, 5, 5))
    x[0, 0, 2, 2] = 5.0
    for impl in C.IMPLS:
        pool = C.MaxPool2D(3, 2, impl=impl)
        np.testing.assert_array_equal(pool.forward(x), np.full((1, 1, 2, 2), 5.0))
        dx = pool.backward(np.array([[[[1.0, 2.0], [3.0, 4.0]]]]))
        assert dx[0, 0, 2, 2] == 10.0 and dx.sum() == 10.0
        # all-equal window: the gradient goes to the first element only
        tie = C.MaxPool2D(2, impl=impl)
        tie.forward(np.ones((1, 1, 2, 2)))
        np.testing.assert_array_equal(tie.backward(np.ones((1, 1, 1, 1)))[0, 0], [[1, 0], [0, 0]])


@pytest.mark.parametrize("layer_cls", [C.ReLU, C.LeakyReLU, C.Sigmoid, C.Tanh])
def test_activation_loop_matches_vectorized(layer_cls):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 2, 4, 5)) * 3
    loop, vec = layer_cls(impl="loop"), layer_cls()
    np.testing.assert_allclose(vec.forward(x), loop.forward(x), rtol=1e-14)
    dout = rng.standard_normal(x.shape)
    np.testing.assert_allclose(vec.backward(dout), loop.backward(dout), rtol=1e-14)


def test_dense_loop_matches_vectorized():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 7))
    loop, vec = (C.Dense(7, 3, impl=i, seed=1, dtype=F64) for i in C.IMPLS)
    np.testing.assert_allclose(vec.forward(x), loop.forward(x), rtol=1e-12)
    dout = rng.standard_normal((4, 3))
    np.testing.assert_allclose(vec.backward(dout), loop.backward(dout), rtol=1e-12)
    for name in ("W", "b"):
        np.testing.assert_allclose(vec.grads[name], loop.grads[name], rtol=1e-12)


def test_sequential_set_impl_gives_the_same_network_output():
    model = C.mnist_cnn(dtype=F64, channels=(2, 3), hidden=5)
    x = np.random.default_rng(6).standard_normal((2, 1, 28, 28))
    fast = model.forward(x, training=False)
    slow = model.set_impl("loop").forward(x, training=False)
    np.testing.assert_allclose(slow, fast, rtol=1e-10)


@pytest.mark.parametrize("impl", C.IMPLS)
@pytest.mark.parametrize("first,x_shape,features", [
    (lambda impl: C.Conv2D(1, 2, 3, impl=impl, dtype=F64), (2, 1, 4, 4), 8),
    (lambda impl: C.Dense(16, 2, impl=impl, dtype=F64), (2, 16), 2)])
def test_skipping_the_input_gradient_leaves_parameter_gradients_unchanged(impl, first, x_shape, features):
    model = C.Sequential([first(impl), C.ReLU(impl=impl), C.Flatten(), C.Dense(features, 3, impl=impl, dtype=F64)])
    x = np.random.default_rng(0).standard_normal(x_shape)
    dout = np.random.default_rng(1).standard_normal((2, 3))
    model.forward(x)
    assert model.backward(dout).shape == x.shape
    full = [g.copy() for _, _, g in model.parameters()]
    model.forward(x)
    assert model.backward(dout, input_grad=False) is None
    for before, (key, _, after) in zip(full, model.parameters()):
        np.testing.assert_array_equal(before, after, err_msg=key)


# ---------------------------------------------------------------------------
# finite-difference gradient checks (float64)
# ---------------------------------------------------------------------------

TOLERANCE = 1e-6


@pytest.mark.parametrize("impl", C.IMPLS)
@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), ((2, 3), 2, 0), ((3, 2), 3, 2)])
def test_conv_gradients(impl, kernel, stride, padding):
    x = np.random.default_rng(7).standard_normal((2, 2, 7, 6))
    layer = C.Conv2D(2, 3, kernel, stride, padding, impl=impl, seed=8, dtype=F64)
    errors = gradient_errors(layer, x)
    assert set(errors) == {"x", "W", "b"}
    assert max(errors.values()) < TOLERANCE, errors


@pytest.mark.parametrize("impl", C.IMPLS)
@pytest.mark.parametrize("layer_factory", [
    lambda impl: C.MaxPool2D(2, impl=impl), lambda impl: C.MaxPool2D(3, 2, impl=impl),
    lambda impl: C.AvgPool2D(2, impl=impl), lambda impl: C.AvgPool2D((3, 2), (2, 1), impl=impl),
    lambda impl: C.ReLU(impl=impl), lambda impl: C.LeakyReLU(0.1, impl=impl),
    lambda impl: C.Sigmoid(impl=impl), lambda impl: C.Tanh(impl=impl)])
def test_parameter_free_layer_gradients(impl, layer_factory):
    x = np.random.default_rng(9).standard_normal((2, 2, 6, 5))
    errors = gradient_errors(layer_factory(impl), x)
    assert errors["x"] < TOLERANCE, errors


@pytest.mark.parametrize("impl", C.IMPLS)
def test_dense_gradients(impl):
    x = np.random.default_rng(10).standard_normal((3, 5))
    errors = gradient_errors(C.Dense(5, 4, impl=impl, seed=3, dtype=F64), x)
    assert max(errors.values()) < TOLERANCE, errors


def test_flatten_and_dropout_gradients():
    x = np.random.default_rng(11).standard_normal((3, 2, 3, 2))
    assert gradient_errors(C.Flatten(), x)["x"] < TOLERANCE
    assert gradient_errors(C.Dropout(0.4), x)["x"] < TOLERANCE


def test_softmax_cross_entropy_gradient_and_value():
    rng = np.random.default_rng(12)
    logits, labels = rng.standard_normal((4, 5)), np.array([0, 3, 4, 1])
    loss_fn = C.SoftmaxCrossEntropy()
    loss = loss_fn.forward(logits, labels)
    expected = -np.mean(np.log(C.softmax(logits)[np.arange(4), labels]))
    assert loss == pytest.approx(expected, rel=1e-12)
    dlogits = loss_fn.backward()
    numeric = numeric_grad(lambda: C.SoftmaxCrossEntropy().forward(logits, labels), logits)
    assert rel_error(dlogits, numeric) < TOLERANCE


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1e4, 0.0, -1e4], [-1e4, 1e4, 1e4]], dtype=np.float32)
    loss_fn = C.SoftmaxCrossEntropy()
    loss = loss_fn.forward(logits, np.array([0, 2]))
    assert np.isfinite(loss) and loss == pytest.approx(np.log(2) / 2, rel=1e-5)
    assert np.all(np.isfinite(loss_fn.backward()))
    np.testing.assert_allclose(C.softmax(logits).sum(axis=1), 1.0, rtol=1e-6)


def test_whole_network_gradient():
    """Every parameter of a small network with every layer type, and its input."""
    model = C.Sequential([
        C.Conv2D(2, 3, 3, padding=1, dtype=F64), C.ReLU(), C.MaxPool2D(2),
        C.Conv2D(3, 4, (2, 3), stride=2, padding=1, dtype=F64), C.Tanh(), C.AvgPool2D((2, 1)),
        C.Flatten(), C.Dense(8, 6, dtype=F64), C.LeakyReLU(0.05), C.Dropout(0.3),
        C.Dense(6, 6, dtype=F64), C.Sigmoid(), C.Dense(6, 4, dtype=F64)], seed=1)
    rng = np.random.default_rng(13)
    x, y = rng.standard_normal((3, 2, 8, 8)), np.array([0, 3, 1])
    errors = C.gradient_errors(model, x, y)
    assert len(errors) == 1 + 2 * 5
    assert max(errors.values()) < TOLERANCE, errors


# ---------------------------------------------------------------------------
# metrics (hand-computed)
# ---------------------------------------------------------------------------

Y_TRUE = np.array([0, 0, 1, 1, 2, 2, 2])
Y_PRED = np.array([0, 1, 1, 1, 2, 0, 1])


def test_confusion_matrix_and_accuracy():
    np.testing.assert_array_equal(C.confusion_matrix(Y_TRUE, Y_PRED), [[1, 1, 0], [0, 2, 0], [1, 1, 1]])
    assert C.accuracy(Y_TRUE, Y_PRED) == pytest.approx(4 / 7)


def test_classification_report_by_hand():
    r = C.classification_report(Y_TRUE, Y_PRED, class_names=["a", "b", "c"])
    np.testing.assert_allclose(r["precision"], [1 / 2, 2 / 4, 1 / 1])
    np.testing.assert_allclose(r["recall"], [1 / 2, 2 / 2, 1 / 3])
    np.testing.assert_allclose(r["f1"], [0.5, 2 / 3, 0.5])
    np.testing.assert_array_equal(r["support"], [2, 2, 3])
    assert r["macro"]["precision"] == pytest.approx(2 / 3)
    assert r["macro"]["recall"] == pytest.approx((0.5 + 1 + 1 / 3) / 3)
    assert r["weighted"]["recall"] == pytest.approx(4 / 7)       # weighted recall is accuracy
    assert r["weighted"]["precision"] == pytest.approx((2 * 0.5 + 2 * 0.5 + 3 * 1) / 7)
    assert r["accuracy"] == pytest.approx(4 / 7)
    text = C.format_report(r)
    assert "macro avg" in text and "0.6667" in text


def test_class_names_fix_the_number_of_classes_even_if_some_are_absent():
    r = C.classification_report(np.array([0, 0]), np.array([0, 1]), class_names=["a", "b", "c"])
    assert r["confusion"].shape == (3, 3) and r["support"].tolist() == [2, 0, 0]


def test_classes_without_predictions_do_not_divide_by_zero():
    with np.errstate(all="raise"):
        r = C.classification_report(np.array([0, 1, 1]), np.array([1, 1, 1]), num_classes=4)
    np.testing.assert_allclose(r["precision"], [0, 2 / 3, 0, 0])
    np.testing.assert_allclose(r["recall"], [0, 1, 0, 0])
    np.testing.assert_allclose(r["f1"], [0, 0.8, 0, 0])


def test_metrics_reject_bad_labels():
    with pytest.raises(ValueError, match="equal length"):
        C.accuracy(np.array([0, 1]), np.array([0]))
    with pytest.raises(ValueError, match=r"0\.\.2"):
        C.confusion_matrix(np.array([0, 3]), np.array([0, 1]), num_classes=3)


# ---------------------------------------------------------------------------
# optimisers, schedules, initialisation
# ---------------------------------------------------------------------------

def one_weight_model(grad_w=1.0, grad_b=1.0):
    model = C.Sequential([C.Dense(1, 1, dtype=F64)], seed=None)
    layer = model.layers[0]
    layer.params["W"][...] = 1.0
    layer.params["b"][...] = 1.0
    layer.grads = {"W": np.full((1, 1), grad_w), "b": np.full(1, grad_b)}
    return model, layer


@pytest.mark.parametrize("optimizer,expected_w", [
    (C.SGD(lr=0.1), [0.9, 0.8]),
    (C.SGD(lr=0.1, momentum=0.9), [0.9, 0.71]),                  # v = -0.1, then -0.19
    (C.SGD(lr=0.1, momentum=0.9, nesterov=True), [0.81, 0.539]),
    (C.SGD(lr=0.1, weight_decay=0.5), [0.85, 0.7075]),           # g = 1 + 0.5 * W
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
    C.Adam(lr=0.01).step(model)
    assert layer.params["W"][0, 0] == pytest.approx(1.01, rel=1e-6)
    assert layer.params["b"][0] == pytest.approx(0.99, rel=1e-6)


def test_schedules():
    step = C.step_schedule(0.1, step_size=2, gamma=0.5)
    assert [step(e) for e in range(5)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    cosine = C.cosine_schedule(0.1, epochs=10, lr_min=0.0)
    assert [cosine(0), cosine(5), cosine(10)] == pytest.approx([0.1, 0.05, 0.0])


def test_initialisation_is_seeded_and_picks_he_or_glorot():
    a, b, c = C.mnist_cnn(seed=1), C.mnist_cnn(seed=1), C.mnist_cnn(seed=2)
    for (_, pa, _), (_, pb, _), (_, pc, _) in zip(a.parameters(), b.parameters(), c.parameters()):
        np.testing.assert_array_equal(pa, pb)
    assert not np.array_equal(a.layers[0].params["W"], c.layers[0].params["W"])
    dense_hidden, dense_out = a.layers[7], a.layers[10]
    assert dense_hidden.params["W"].std() == pytest.approx(np.sqrt(2 / 3136), rel=0.02)     # He
    assert np.abs(dense_out.params["W"]).max() <= np.sqrt(6 / (128 + 10))                   # Glorot
    assert dense_out.params["W"].std() == pytest.approx(np.sqrt(2 / (128 + 10)), rel=0.1)
    assert all(np.all(layer.params["b"] == 0) for layer in a.layers if layer.params)


# ---------------------------------------------------------------------------
# bad input gets a clear error
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("layer,x,message", [
    (C.Conv2D(3, 4, 3), np.zeros((2, 1, 8, 8), np.float32), r"expected 3 input channels.*\(2, 1, 8, 8\)"),
    (C.Conv2D(1, 4, 3), np.zeros((1, 8, 8), np.float32), r"expected a 4-D input.*\(1, 8, 8\)"),
    (C.Conv2D(1, 4, 3), np.zeros((0, 1, 8, 8), np.float32), "empty batch"),
    (C.Conv2D(1, 4, 5), np.zeros((1, 1, 3, 8), np.float32), "smaller than the kernel"),
    (C.Conv2D(1, 4, 3), np.zeros((1, 1, 8, 8), np.uint8), "floating-point.*uint8"),
    (C.MaxPool2D(2), np.zeros((2, 3, 8), np.float32), r"expected a 4-D input"),
    (C.MaxPool2D(3), np.zeros((2, 3, 2, 8), np.float32), "smaller than the pool"),
    (C.Dense(10, 2), np.zeros((4, 9), np.float32), r"expected 10 input features.*\(4, 9\)"),
    (C.ReLU(), np.zeros((0, 3), np.float32), "empty batch"),
    (C.BatchNorm(3), np.zeros(3, np.float32), r"rank >= 2.*\(3,\)"),
    (C.BatchNorm(3), np.zeros((4, 2, 5), np.float32), r"expected 3 input channels"),
])
def test_bad_layer_input_names_the_problem(layer, x, message):
    with pytest.raises(ValueError, match=message):
        layer.forward(x)


@pytest.mark.parametrize("labels,message", [
    (np.array([0, 10]), r"0\.\.9.*0 to 10"), (np.array([0, -1]), r"0\.\.9"),
    (np.array([0.0, 1.0]), "integers"), (np.array([0, 1, 2]), r"shape \(2,\)")])
def test_bad_labels_name_the_problem(labels, message):
    with pytest.raises(ValueError, match=message):
        C.SoftmaxCrossEntropy().forward(np.zeros((2, 10), np.float32), labels)


def test_bad_constructor_arguments_and_order():
    with pytest.raises(ValueError, match="impl"):
        C.Conv2D(1, 2, 3, impl="fast")
    with pytest.raises(ValueError, match="kernel_size"):
        C.Conv2D(1, 2, (3, -1))
    with pytest.raises(ValueError, match="Dropout"):
        C.Dropout(1.0)
    with pytest.raises(RuntimeError, match="before forward"):
        C.ReLU().backward(np.zeros((1, 2)))


def test_diverging_learning_rate_stops_with_a_clear_message():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 1, 8, 8)).astype(np.float32) * 100, rng.integers(0, 3, 64)
    model = C.Sequential([C.Flatten(), C.Dense(64, 32), C.ReLU(), C.Dense(32, 3)])
    with np.errstate(all="ignore"), pytest.raises(FloatingPointError, match="diverged.*learning rate"):
        C.fit(model, x, y, C.SGD(lr=1e12), epochs=5, batch_size=16, progress=False, log=None)


# ---------------------------------------------------------------------------
# saving, checkpoints, dtypes
# ---------------------------------------------------------------------------

def test_save_and_load_round_trip(tmp_path):
    model = C.mnist_cnn(seed=4, channels=(4, 8), hidden=16)
    path = tmp_path / "model.npz"
    model.save(path)
    assert os.listdir(tmp_path) == ["model.npz"]          # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask   # not the temporary file's private mode
    loaded = C.Sequential.load(path)
    assert [repr(l) for l in loaded.layers] == [repr(l) for l in model.layers]
    x = np.random.default_rng(1).random((5, 1, 28, 28), dtype=np.float32)
    np.testing.assert_array_equal(loaded.predict_proba(x), model.predict_proba(x))


def test_loading_a_corrupt_or_foreign_file_fails_clearly(tmp_path):
    path = tmp_path / "model.npz"
    C.mnist_cnn(channels=(2,), hidden=4).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="model.npz"):
        C.Sequential.load(path)
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a saved Sequential model"):
        C.Sequential.load(tmp_path / "other.npz")


def _resume_setup():
    rng = np.random.default_rng(0)
    x, y = rng.random((48, 1, 8, 8), dtype=np.float32), rng.integers(0, 3, 48)

    def flip(xb, rng):                       # augmentation that draws from fit's generator
        flipped = rng.random(len(xb)) < 0.5
        return np.where(flipped[:, None, None, None], xb[..., ::-1], xb)

    model = C.Sequential([C.Conv2D(1, 3, 3), C.ReLU(), C.MaxPool2D(2), C.Flatten(),
                          C.Dense(27, 8), C.ReLU(), C.Dropout(0.3), C.Dense(8, 3)], seed=3)
    return model, x, y, dict(batch_size=10, seed=5, augment=flip, progress=False, log=None,
                             schedule=C.step_schedule(0.01, 2, 0.5), validation=(x[:8], y[:8]))


def test_resumed_training_equals_an_uninterrupted_run(tmp_path):
    model, x, y, kw = _resume_setup()
    full = C.fit(model, x, y, C.Adam(), epochs=4, **kw)

    ckpt = tmp_path / "run.npz"
    first, *_ = _resume_setup()
    C.fit(first, x, y, C.Adam(), epochs=2, checkpoint=ckpt, **kw)   # "interrupted" after 2 epochs
    resumed, *_ = _resume_setup()
    history = C.fit(resumed, x, y, C.Adam(), epochs=4, checkpoint=ckpt, **kw)

    for (_, a, _), (_, b, _) in zip(model.parameters(), resumed.parameters()):
        np.testing.assert_array_equal(a, b)
    assert history.train_loss == full.train_loss and history.val_acc == full.val_acc
    assert len(history.seconds) == 4


def test_float32_training_step_never_upcasts():
    model = C.mnist_cnn(channels=(4, 8), hidden=16)
    x = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
    out = x
    for layer in model.layers:
        out = layer.forward(out, training=True)
        assert out.dtype == np.float32, layer
    loss_fn = C.SoftmaxCrossEntropy()
    loss_fn.forward(out, np.arange(8) % 10)
    dout = loss_fn.backward()
    assert dout.dtype == np.float32
    for layer in reversed(model.layers):
        dout = layer.backward(dout)
        assert dout.dtype == np.float32, layer
    optimizer = C.Adam()
    optimizer.step(model)
    for key, param, grad in model.parameters():
        assert param.dtype == grad.dtype == np.float32, key
    assert all(buf.dtype == np.float32 for bufs in optimizer.state.values() for buf in bufs.values())


def test_float64_model_stays_float64():
    model = C.mnist_cnn(channels=(2,), hidden=4).astype(np.float64)
    x = np.random.default_rng(0).random((2, 1, 28, 28))
    assert model.forward(x).dtype == np.float64


def test_random_crop_shifts_each_image_within_the_padding():
    x = np.random.default_rng(0).random((6, 2, 5, 4), dtype=np.float32)
    out = C.random_crop(x, np.random.default_rng(1), padding=2)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    shifts = set()
    for n in range(len(x)):
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if np.array_equal(out[n], padded[n, :, dy:dy + 5, dx:dx + 4])]
        assert matches, f"image {n} is not a shift of its input"
        shifts.add(matches[0])
    assert len(shifts) > 1                                  # the shifts are random, not all equal
    np.testing.assert_array_equal(C.random_crop(x, np.random.default_rng(1), padding=0), x)


def test_random_flip_mirrors_some_images_and_keeps_the_rest():
    x = np.random.default_rng(0).random((40, 1, 3, 4))
    out = C.random_flip(x, np.random.default_rng(2))
    flipped = [np.array_equal(o, i[..., ::-1]) for o, i in zip(out, x)]
    kept = [np.array_equal(o, i) for o, i in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and 5 < sum(flipped) < 35
    assert C.augmentation()(x, np.random.default_rng(0)) is x


# ---------------------------------------------------------------------------
# Conv1D, 1-D pooling, batch normalisation
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (2, 2, 0), (4, 3, 2), (1, 1, 0)])
def test_conv1d_loop_matches_vectorized_and_the_equation(k, stride, padding):
    rng = np.random.default_rng(20)
    x = rng.standard_normal((2, 3, 9))
    loop, vec = (C.Conv1D(3, 4, k, stride, padding, impl=i, seed=3, dtype=F64) for i in C.IMPLS)
    out = vec.forward(x)
    np.testing.assert_allclose(loop.forward(x), out, rtol=1e-12, atol=1e-12)
    # the equation, directly: out[n, f, i] = b[f] + sum_{c,q} W[f, c, q] xp[n, c, i*s + q]
    xp, W = np.pad(x, ((0, 0), (0, 0), (padding, padding))), vec.params["W"]
    expected = np.stack([np.einsum("ncq,fcq->nf", xp[:, :, i * stride:i * stride + k], W)
                         for i in range(out.shape[2])], axis=2) + vec.params["b"][:, None]
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    dout = rng.standard_normal(out.shape)
    np.testing.assert_allclose(vec.backward(dout), loop.backward(dout), rtol=1e-12, atol=1e-12)
    assert vec.grads["W"].shape == (4, 3, k)
    for name in ("W", "b"):
        np.testing.assert_allclose(vec.grads[name], loop.grads[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", C.IMPLS)
def test_conv1d_and_1d_pooling_gradients(impl):
    x = np.random.default_rng(21).standard_normal((2, 3, 10))
    for layer in (C.Conv1D(3, 2, 3, stride=2, padding=1, impl=impl, dtype=F64),
                  C.MaxPool1D(2, impl=impl), C.MaxPool1D(3, 2, impl=impl), C.AvgPool1D(2, impl=impl)):
        errors = gradient_errors(layer, x)
        assert max(errors.values()) < TOLERANCE, (layer, errors)


def test_1d_pooling_matches_the_definition():
    x = np.random.default_rng(22).standard_normal((2, 3, 7))
    np.testing.assert_array_equal(C.MaxPool1D(2).forward(x), np.maximum(x[:, :, 0:6:2], x[:, :, 1:7:2]))
    np.testing.assert_allclose(C.AvgPool1D(3, 2).forward(x)[:, :, 1], x[:, :, 2:5].mean(axis=2))


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 3, 4, 5)])
def test_batchnorm_loop_matches_vectorized_and_normalises(shape):
    rng = np.random.default_rng(23)
    x = rng.standard_normal(shape) * 3 + 2
    loop, vec = (C.BatchNorm(3, impl=i, dtype=F64) for i in C.IMPLS)
    for layer in (loop, vec):
        layer.params["gamma"][...] = [1.0, 2.0, 0.5]
        layer.params["beta"][...] = [0.0, -1.0, 3.0]
    out = vec.forward(x)
    np.testing.assert_allclose(loop.forward(x), out, rtol=1e-10, atol=1e-12)
    axes = (0,) + tuple(range(2, len(shape)))
    np.testing.assert_allclose(out.mean(axis=axes), [0.0, -1.0, 3.0], atol=1e-10)
    np.testing.assert_allclose(out.std(axis=axes), [1.0, 2.0, 0.5], rtol=1e-4)
    dout = rng.standard_normal(shape)
    np.testing.assert_allclose(vec.backward(dout), loop.backward(dout), rtol=1e-10, atol=1e-12)
    for name in ("gamma", "beta"):
        np.testing.assert_allclose(vec.grads[name], loop.grads[name], rtol=1e-10)


@pytest.mark.parametrize("impl", C.IMPLS)
def test_batchnorm_gradients(impl):
    x = np.random.default_rng(24).standard_normal((4, 3, 3, 2))
    layer = C.BatchNorm(3, impl=impl, dtype=F64)
    layer.params["gamma"][...] = [0.5, 1.5, -1.0]
    errors = gradient_errors(layer, x)
    assert set(errors) == {"x", "gamma", "beta"} and max(errors.values()) < TOLERANCE, errors


def test_batchnorm_running_statistics_drive_evaluation_and_are_saved(tmp_path):
    rng = np.random.default_rng(25)
    model = C.Sequential([C.Conv2D(2, 3, 3, padding=1), C.BatchNorm(3), C.ReLU(), C.Flatten(),
                          C.Dense(3 * 4 * 4, 2)])
    bn = model.layers[1]
    for _ in range(200):
        model.forward((rng.standard_normal((16, 2, 4, 4)) * 2 + 1).astype(np.float32))
    conv_out = model.layers[0].forward(np.ones((1, 2, 4, 4), np.float32), training=False)
    assert not np.allclose(bn.buffers["running_var"], 1)                 # it has moved
    expected = ((conv_out - bn.buffers["running_mean"][:, None, None])
                / np.sqrt(bn.buffers["running_var"][:, None, None] + bn.eps))
    np.testing.assert_allclose(bn.forward(conv_out, training=False), expected, rtol=1e-5, atol=1e-6)
    model.save(tmp_path / "bn.npz")
    loaded = C.Sequential.load(tmp_path / "bn.npz")
    x = rng.standard_normal((3, 2, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict_proba(x), model.predict_proba(x))


def test_sequence_network_gradient():
    """Conv1D, BatchNorm and 1-D pooling inside a whole network (the row-sequence model).
    BatchNorm follows the ReLU here: straight after a convolution it would cancel
    the bias, whose true gradient is then exactly 0, and a relative error of two
    round-off-sized numbers means nothing."""
    model = C.Sequential([C.Conv1D(4, 5, 3, padding=1, dtype=F64), C.ReLU(), C.BatchNorm(5, dtype=F64),
                          C.MaxPool1D(2), C.Flatten(), C.Dense(15, 3, dtype=F64)], seed=2)
    x, y = np.random.default_rng(26).standard_normal((4, 4, 6)), np.array([0, 2, 1, 2])
    errors = C.gradient_errors(model, x, y)
    assert len(errors) == 7 and max(errors.values()) < TOLERANCE, errors


def test_rows_as_sequence_interleaves_the_channels_of_each_row():
    x = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    seq = C.rows_as_sequence(x)
    assert seq.shape == (2, 4, 15)
    n, row, col = 1, 2, 3
    np.testing.assert_array_equal(seq[n, row, 3 * col:3 * col + 3], x[n, :, row, col])   # R, G, B of one pixel


def test_conv_net_builds_2d_and_1d_networks():
    cifar = C.conv_net(in_channels=3, input_size=32, channels=(8, 16), convs_per_block=2, batchnorm=True, hidden=0)
    assert cifar.forward(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 10)
    assert sum(isinstance(layer, C.BatchNorm) for layer in cifar.layers) == 4
    seq = C.conv_net(in_channels=96, input_size=32, channels=(8,), dims=1)
    assert seq.forward(np.zeros((2, 96, 32), np.float32)).shape == (2, 10)
    assert isinstance(seq.layers[0], C.Conv1D)


def test_rows_to_sequence_layer_and_its_gradient():
    x = np.random.default_rng(27).standard_normal((2, 3, 4, 5))
    layer = C.RowsToSequence()
    out = layer.forward(x)
    np.testing.assert_array_equal(out, C.rows_as_sequence(x).transpose(0, 2, 1))
    assert out.shape == (2, 15, 4)
    assert gradient_errors(layer, x)["x"] < TOLERANCE


def test_atomic_write_keeps_the_old_file_when_writing_or_checking_fails(tmp_path):
    path = tmp_path / "result.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with C.atomic_write(path) as f:
            f.write(b"half")
            raise RuntimeError("crash mid-write")

    def reject(tmp):
        raise ValueError(f"bad content in {tmp}")

    with pytest.raises(ValueError, match="bad content"):
        with C.atomic_write(path, check=reject) as f:
            f.write(b"new")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["result.bin"]
    with C.atomic_write(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["result.bin"]
