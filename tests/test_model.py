"""Sequential: implementations, initialisation, whole-network gradients, saving and loading, builders."""
import json
import math
import os

import numpy as np
import pytest

import cnn_core as C
import cnn_layers as L
import cnn_model as M
import cnn_gradcheck as G

F64 = np.float64
gradient_errors = G.gradient_errors
TOLERANCE = 1e-6          # largest relative error a float64 gradient check accepts


def test_sequential_set_impl_gives_the_same_network_output():
    model = M.mnist_cnn(dtype=F64, channels=(2, 3), hidden=5)
    x = np.random.default_rng(6).standard_normal((2, 1, 28, 28))
    fast = model.forward(x, training=False)
    slow = model.set_impl("loop").forward(x, training=False)
    np.testing.assert_allclose(slow, fast, rtol=1e-10)


@pytest.mark.parametrize("impl", L.IMPLS)
@pytest.mark.parametrize("first,x_shape,features", [
    (lambda impl: L.Conv2D(1, 2, 3, impl=impl, dtype=F64), (2, 1, 4, 4), 8),
    (lambda impl: L.Dense(16, 2, impl=impl, dtype=F64), (2, 16), 2)])
def test_skipping_the_input_gradient_leaves_parameter_gradients_unchanged(impl, first, x_shape, features):
    model = M.Sequential([first(impl), L.ReLU(impl=impl), L.Flatten(), L.Dense(features, 3, impl=impl, dtype=F64)])
    x = np.random.default_rng(0).standard_normal(x_shape)
    dout = np.random.default_rng(1).standard_normal((2, 3))
    model.forward(x)
    assert model.backward(dout).shape == x.shape
    full = [g.copy() for _, _, g in model.parameters()]
    model.forward(x)
    assert model.backward(dout, input_grad=False) is None
    for before, (key, _, after) in zip(full, model.parameters()):
        np.testing.assert_array_equal(before, after, err_msg=key)


def test_whole_network_gradient():
    """Every parameter of a small network with every layer type, and its input."""
    model = M.Sequential([
        L.Conv2D(2, 3, 3, padding=1, dtype=F64), L.ReLU(), L.MaxPool2D(2),
        L.Conv2D(3, 4, (2, 3), stride=2, padding=1, dtype=F64), L.Tanh(), L.AvgPool2D((2, 1)),
        L.Flatten(), L.Dense(8, 6, dtype=F64), L.LeakyReLU(0.05), L.Dropout(0.3),
        L.Dense(6, 6, dtype=F64), L.Sigmoid(), L.Dense(6, 4, dtype=F64)], seed=1)
    rng = np.random.default_rng(13)
    x, y = rng.standard_normal((3, 2, 8, 8)), np.array([0, 3, 1])
    errors = G.gradient_errors(model, x, y)
    assert len(errors) == 1 + 2 * 5
    assert max(errors.values()) < TOLERANCE, errors


def test_sequence_network_gradient():
    """Conv1D, BatchNorm and 1-D pooling inside a whole network (the row-sequence model).
    BatchNorm follows the ReLU here: straight after a convolution it would cancel
    the bias, whose true gradient is then exactly 0, and a relative error of two
    round-off-sized numbers means nothing."""
    model = M.Sequential([L.Conv1D(4, 5, 3, padding=1, dtype=F64), L.ReLU(), L.BatchNorm(5, dtype=F64),
                          L.MaxPool1D(2), L.Flatten(), L.Dense(15, 3, dtype=F64)], seed=2)
    x, y = np.random.default_rng(26).standard_normal((4, 4, 6)), np.array([0, 2, 1, 2])
    errors = G.gradient_errors(model, x, y)
    assert len(errors) == 7 and max(errors.values()) < TOLERANCE, errors


def test_initialisation_is_seeded_and_picks_he_or_glorot():
    a, b, c = M.mnist_cnn(seed=1), M.mnist_cnn(seed=1), M.mnist_cnn(seed=2)
    for (_, pa, _), (_, pb, _), (_, pc, _) in zip(a.parameters(), b.parameters(), c.parameters()):
        np.testing.assert_array_equal(pa, pb)
    assert not np.array_equal(a.layers[0].params["W"], c.layers[0].params["W"])
    dense_hidden, dense_out = a.layers[7], a.layers[10]
    assert dense_hidden.params["W"].std() == pytest.approx(np.sqrt(2 / 3136), rel=0.02)     # He
    assert np.abs(dense_out.params["W"]).max() <= np.sqrt(6 / (128 + 10))                   # Glorot
    assert dense_out.params["W"].std() == pytest.approx(np.sqrt(2 / (128 + 10)), rel=0.1)
    assert all(np.all(layer.params["b"] == 0) for layer in a.layers if layer.params)


def test_save_and_load_round_trip(tmp_path):
    model = M.mnist_cnn(seed=4, channels=(4, 8), hidden=16)
    path = tmp_path / "model.npz"
    model.save(path)
    assert os.listdir(tmp_path) == ["model.npz"]          # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask   # not the temporary file's private mode
    loaded = M.Sequential.load(path)
    assert [repr(l) for l in loaded.layers] == [repr(l) for l in model.layers]
    x = np.random.default_rng(1).random((5, 1, 28, 28), dtype=np.float32)
    np.testing.assert_array_equal(loaded.predict_proba(x), model.predict_proba(x))


def test_loading_a_corrupt_or_foreign_file_fails_clearly(tmp_path):
    path = tmp_path / "model.npz"
    M.mnist_cnn(channels=(2,), hidden=4).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="model.npz"):
        M.Sequential.load(path)
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a saved Sequential model"):
        M.Sequential.load(tmp_path / "other.npz")


def test_float64_model_stays_float64():
    model = M.mnist_cnn(channels=(2,), hidden=4).astype(np.float64)
    x = np.random.default_rng(0).random((2, 1, 28, 28))
    assert model.forward(x).dtype == np.float64


def test_batchnorm_running_statistics_drive_evaluation_and_are_saved(tmp_path):
    rng = np.random.default_rng(25)
    model = M.Sequential([L.Conv2D(2, 3, 3, padding=1), L.BatchNorm(3), L.ReLU(), L.Flatten(),
                          L.Dense(3 * 4 * 4, 2)])
    bn = model.layers[1]
    for _ in range(200):
        model.forward((rng.standard_normal((16, 2, 4, 4)) * 2 + 1).astype(np.float32))
    conv_out = model.layers[0].forward(np.ones((1, 2, 4, 4), np.float32), training=False)
    assert not np.allclose(bn.buffers["running_var"], 1)                 # it has moved
    expected = ((conv_out - bn.buffers["running_mean"][:, None, None])
                / np.sqrt(bn.buffers["running_var"][:, None, None] + bn.eps))
    np.testing.assert_allclose(bn.forward(conv_out, training=False), expected, rtol=1e-5, atol=1e-6)
    model.save(tmp_path / "bn.npz")
    loaded = M.Sequential.load(tmp_path / "bn.npz")
    x = rng.standard_normal((3, 2, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict_proba(x), model.predict_proba(x))


def test_conv_net_builds_2d_and_1d_networks():
    cifar = M.conv_net(in_channels=3, input_size=32, channels=(8, 16), convs_per_block=2, batchnorm=True, hidden=0)
    assert cifar.forward(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 10)
    assert sum(isinstance(layer, L.BatchNorm) for layer in cifar.layers) == 4
    seq = M.conv_net(in_channels=96, input_size=32, channels=(8,), dims=1)
    assert seq.forward(np.zeros((2, 96, 32), np.float32)).shape == (2, 10)
    assert isinstance(seq.layers[0], L.Conv1D)


# ---------------------------------------------------------------- reliability, uint8 input, parameter count

def test_loading_a_npy_or_unrelated_npz_says_what_the_file_holds(tmp_path):
    np.save(tmp_path / "weights.npy", np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"weights\.npy is not a readable model file: it is a \.npy file "
                                         r"holding one array of shape \(3, 4\), dtype float64"):
        M.Sequential.load(tmp_path / "weights.npy")
    np.savez(tmp_path / "stats.npz", mean=np.zeros(3), counts=np.ones((2, 2), np.int64))
    with pytest.raises(ValueError, match=r"stats\.npz is not a saved Sequential model: it holds "
                                         r"mean \(3,\) float64, counts \(2, 2\) int64 and no 'architecture'"):
        M.Sequential.load(tmp_path / "stats.npz")
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.npz is not a readable model file: the file is empty"):
        M.Sequential.load(tmp_path / "empty.npz")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_predict_refuses_non_finite_input_with_a_count(bad):
    model = M.Sequential([L.Flatten(), L.Dense(12, 3)])
    x = np.random.default_rng(0).random((5, 3, 2, 2), dtype=np.float32)
    x[1, 0, 0, 0] = x[1, 2, 1, 1] = bad
    for predict in (model.predict, model.predict_proba):
        with pytest.raises(ValueError, match=r"predict: 2 of the 60 input values are not finite "
                                             r"\(NaN or inf\), in 1 of the 5 examples"):
            predict(x)


def test_predict_takes_uint8_images_and_lists():
    model = M.mnist_cnn(channels=(2, 3), hidden=8)
    x8 = np.random.default_rng(3).integers(0, 256, (7, 1, 28, 28), dtype=np.uint8)
    expected = model.predict_proba(x8.astype(np.float32) / 255, batch_size=3)
    np.testing.assert_array_equal(model.predict_proba(x8, batch_size=3), expected)
    np.testing.assert_array_equal(model.predict(x8), expected.argmax(axis=1))
    as_list = (x8.astype(np.float32) / 255).tolist()
    np.testing.assert_array_equal(model.predict_proba(as_list, batch_size=3), expected)
    # one batch at a time: each uint8 batch becomes floats, the whole array never does
    batch = M.prepare_batch(x8[:2], np.float32)
    assert batch.dtype == np.float32 and batch.max() <= 1
    assert M.prepare_batch(x8[:2].astype(np.float64), np.float32).dtype == np.float64
    with pytest.raises(ValueError, match="floating-point.*int32"):
        model.predict(x8.astype(np.int32))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        model.predict(x8, batch_size=0)


def test_num_params_counts_every_trained_parameter():
    assert M.mnist_cnn().num_params() == 421_642                      # the README's count
    model = M.Sequential([L.Conv2D(3, 4, 3), L.BatchNorm(4), L.Flatten(), L.Dense(4 * 2 * 2, 5)])
    assert model.num_params() == (4 * 3 * 3 * 3 + 4) + (4 + 4) + (16 * 5 + 5)
    assert model.summary((3, 4, 4)).endswith(f"total parameters: {model.num_params():,}")
    assert M.Sequential([L.Flatten()]).num_params() == 0


# ---------------------------------------------------------------- frozen layers

def test_frozen_layers_are_counted_apart_saved_and_loaded(tmp_path):
    model = M.Sequential([L.Conv2D(3, 4, 3), L.BatchNorm(4), L.Flatten(), L.Dense(4 * 2 * 2, 5)])
    model.layers[0].trainable = False
    assert model.num_params(trainable_only=True) == model.num_params() - (4 * 3 * 3 * 3 + 4)
    assert [key for key, _, _ in model.parameters(trainable_only=True)] == ["1.gamma", "1.beta", "3.W", "3.b"]
    assert "Conv2D 3->4 3x3 (frozen)" in model.summary((3, 4, 4))
    model.save(tmp_path / "frozen.npz")
    loaded = M.Sequential.load(tmp_path / "frozen.npz")
    assert [layer.trainable for layer in loaded.layers] == [False, True, True, True]
    # files written before the flag existed have no "trainable" entry: every layer is trained
    arrays = dict(np.load(tmp_path / "frozen.npz"))
    architecture = json.loads(str(arrays["architecture"]))
    for spec in architecture:
        del spec["trainable"]
    arrays["architecture"] = np.array(json.dumps(architecture))
    np.savez(tmp_path / "old.npz", **arrays)
    assert all(layer.trainable for layer in M.Sequential.load(tmp_path / "old.npz").layers)
    architecture[0]["trainable"] = "no"
    arrays["architecture"] = np.array(json.dumps(architecture))
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match="bad.npz.*trainable must be true or false"):
        M.Sequential.load(tmp_path / "bad.npz")


def test_initialisation_leaves_frozen_layers_alone():
    conv = L.Conv2D(1, 2, 3)
    conv.params["W"][...] = 7.0
    conv.trainable = False
    model = M.Sequential([conv, L.ReLU(), L.Flatten(), L.Dense(2, 3)], seed=0)
    assert np.all(model.layers[0].params["W"] == 7.0)
    assert not np.all(model.layers[3].params["W"] == 0)


def test_backward_skips_the_frozen_layers_in_front():
    rng = np.random.default_rng(5)
    model = M.Sequential([L.Conv2D(2, 3, 3, padding=1, dtype=F64), L.ReLU(), L.Conv2D(3, 2, 3, dtype=F64),
                          L.ReLU(), L.Flatten(), L.Dense(8, 3, dtype=F64)], seed=1)
    x, dout = rng.standard_normal((2, 2, 4, 4)), rng.standard_normal((2, 3))
    model.forward(x)
    model.backward(dout)
    full = {key: grad.copy() for key, _, grad in model.parameters()}
    model.layers[0].trainable = False
    model.layers[0].grads = {}
    model.forward(x)
    assert model.backward(dout, input_grad=False) is None
    assert model.layers[0].grads == {}                       # no backward pass through the frozen stem
    for key, _, grad in model.parameters(trainable_only=True):
        np.testing.assert_array_equal(grad, full[key], err_msg=key)
    assert model.backward(dout).shape == x.shape             # an input gradient still goes all the way


# ---------------------------------------------------------------- whitening initialisation

def patch_covariance(out):
    """Covariance (C, C) and mean of the channel vectors of out (N, C, H, W) over all positions."""
    rows = out.transpose(0, 2, 3, 1).reshape(-1, out.shape[1]).astype(np.float64)
    return np.cov(rows, rowvar=False, bias=True), rows.mean(axis=0)


def correlated_images(n=60, size=9, seed=0):
    """Images whose channels and neighbouring pixels are strongly correlated, unlike white noise."""
    rng = np.random.default_rng(seed)
    base = rng.random((n, 1, size + 1, size + 1))
    smooth = (base[:, :, 1:, 1:] + base[:, :, :-1, 1:] + base[:, :, 1:, :-1]) / 3
    return np.concatenate([smooth, 0.6 * smooth + 0.4 * rng.random((n, 1, size, size)),
                           rng.random((n, 1, size, size)) * 0.1], axis=1).astype(np.float32)


def test_whitening_conv_whitens_the_patches_of_the_data():
    x = correlated_images()
    before, _ = patch_covariance(M._patch_rows(x, 2).T.reshape(12, len(x), 8, 8).transpose(1, 0, 2, 3))
    assert np.abs(before - np.diag(np.diag(before))).max() > 0.01           # correlated to begin with
    layer = M.whitening_conv(x, kernel_size=2, eps=1e-9)
    assert isinstance(layer, L.Conv2D) and layer.trainable is False
    assert (layer.in_channels, layer.out_channels, layer.kernel_size, layer.padding) == (3, 24, (2, 2), (0, 0))
    out = layer.forward(x, training=False)
    cov, mean = patch_covariance(out[:, :12])
    np.testing.assert_allclose(cov, np.eye(12), atol=2e-4)
    np.testing.assert_allclose(mean, 0, atol=2e-4)
    np.testing.assert_array_equal(layer.params["W"][12:], -layer.params["W"][:12])   # and their negatives
    np.testing.assert_array_equal(layer.params["b"][12:], -layer.params["b"][:12])
    # eps damps the weak directions: variance lambda / (lambda + eps) per component, strongest first
    damped = np.diag(patch_covariance(M.whitening_conv(x, eps=1.0).forward(x, training=False)[:, :12])[0])
    assert np.all(damped < 1) and np.all(np.diff(damped) <= 1e-6) and damped[0] - damped[-1] > 0.2, damped


def test_whitening_conv_takes_uint8_images_like_fit_and_checks_its_input():
    x8 = np.random.default_rng(2).integers(0, 256, (20, 1, 6, 6), dtype=np.uint8)
    a, b = M.whitening_conv(x8, 3), M.whitening_conv(x8.astype(np.float32) / 255, 3)
    np.testing.assert_allclose(a.params["W"], b.params["W"], rtol=1e-4)
    assert a.params["W"].shape == (18, 1, 3, 3)
    for bad, message in [(x8[:, 0, 0], r"\(N, C, H, W\) or sequences"), (x8[:, :, :2], "H, W or L >= kernel_size"),
                         (x8.astype(np.int32), "dtype int32")]:
        with pytest.raises(ValueError, match=message):
            M.whitening_conv(bad, 3)
    with pytest.raises(ValueError, match="eps must be"):
        M.whitening_conv(x8, 3, eps=0)
    with pytest.raises(ValueError, match="kernel_size must be"):
        M.whitening_conv(x8, 0)
    with pytest.raises(ValueError, match=r"components must be at most the patch size C\*k\^2 = 9, got 10"):
        M.whitening_conv(x8, 3, components=10)


def test_whitening_conv_of_sequences_whitens_runs_of_k_steps_and_keeps_the_strongest():
    """(N, C, L) sequences (image rows): a frozen Conv1D whose outputs on the data have the
    identity covariance over each run of k steps; ``components`` keeps the strongest directions,
    the same filters as the full layer's first ones."""
    x = M.RowsToSequence().forward(correlated_images(n=60, size=8))           # (60, 24, 8): rows of 8 x RGB
    layer = M.whitening_conv(x, kernel_size=2, eps=1e-9)
    assert isinstance(layer, L.Conv1D) and layer.trainable is False
    assert (layer.in_channels, layer.out_channels, layer.kernel_size) == (24, 96, 2)
    out = layer.forward(x, training=False)[:, :48]                             # (60, 48, 7)
    rows = out.transpose(0, 2, 1).reshape(-1, 48).astype(np.float64)
    np.testing.assert_allclose(np.cov(rows, rowvar=False, bias=True), np.eye(48), atol=2e-3)
    np.testing.assert_allclose(rows.mean(axis=0), 0, atol=2e-3)
    patches = M._patch_rows(x, 2)                                              # by hand: the (c, q) order
    np.testing.assert_array_equal(patches[1], np.asarray(x)[0, :, 1:3].reshape(-1))
    few = M.whitening_conv(x, kernel_size=2, eps=1e-9, components=5)
    assert few.out_channels == 10
    np.testing.assert_allclose(np.abs(few.params["W"][:5]), np.abs(layer.params["W"][:5]), rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(few.params["W"][5:], -few.params["W"][:5])


# ---------------------------------------------------------------- test-time augmentation

def test_shifted_moves_images_and_fills_the_border_with_zeros():
    x = np.arange(2 * 1 * 3 * 4, dtype=float).reshape(2, 1, 3, 4) + 1
    down = M.shifted(x, 1, 0)
    np.testing.assert_array_equal(down[:, :, 1:], x[:, :, :-1])
    assert not down[:, :, 0].any()
    left = M.shifted(x, 0, -1)
    np.testing.assert_array_equal(left[..., :-1], x[..., 1:])
    assert not left[..., -1].any()
    np.testing.assert_array_equal(M.shifted(M.shifted(x, -1, 2), 1, -2)[:, :, 1:, :-2], x[:, :, 1:, :-2])


def test_shift_tta_is_the_mean_of_the_logits_of_five_views():
    model = M.Sequential([L.Conv2D(1, 2, 3, padding=1, dtype=np.float64), L.ReLU(), L.Flatten(),
                          L.Dense(2 * 25, 3, dtype=np.float64)], seed=0)
    x = np.random.default_rng(5).standard_normal((4, 1, 5, 5))
    views = [x] + [M.shifted(x, dy, dx) for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1))]
    expected = np.mean([model.forward(v, training=False) for v in views], axis=0)
    np.testing.assert_allclose(model.logits(x, tta="shift"), expected, rtol=1e-12)
    np.testing.assert_allclose(model.predict_proba(x, batch_size=3, tta="shift"), C.softmax(expected), rtol=1e-12)
    assert not np.allclose(model.logits(x, tta="shift"), model.logits(x))
    with pytest.raises(ValueError, match=r"tta='shift'.*\(N, C, H, W\)"):
        M.Sequential([L.Dense(6, 2)]).predict(x[:, 0, 0, :2].repeat(3, axis=1), tta="shift")


def test_flip_shift_tta_is_the_mean_of_the_logits_of_ten_views():
    model = M.Sequential([L.Conv2D(2, 2, 3, padding=1, dtype=np.float64), L.ReLU(), L.Flatten(),
                          L.Dense(2 * 20, 3, dtype=np.float64)], seed=0)
    x = np.random.default_rng(6).standard_normal((3, 2, 4, 5))
    five = [x] + [M.shifted(x, dy, dx) for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1))]
    views = five + [v[..., ::-1] for v in five]
    expected = np.mean([model.forward(np.ascontiguousarray(v), training=False) for v in views], axis=0)
    np.testing.assert_allclose(model.logits(x, tta="flip+shift"), expected, rtol=1e-12)
    for other in ("flip", "shift", None):
        assert not np.allclose(model.logits(x, tta=other), expected)


def test_flip_tta_is_exact_for_a_mirror_symmetric_model_and_none_is_unchanged():
    rng = np.random.default_rng(8)
    x = rng.random((7, 2, 5, 6), dtype=np.float32)
    # 1x1 convolution and a global max pool commute with mirroring, rounding included
    symmetric = M.Sequential([L.Conv2D(2, 4, 1), L.ReLU(), L.MaxPool2D((5, 6)), L.Flatten(), L.Dense(4, 3)])
    np.testing.assert_array_equal(symmetric.predict_proba(x, batch_size=3, tta="flip"),
                                  symmetric.predict_proba(x, batch_size=3))
    model = M.Sequential([L.Conv2D(2, 3, 3), L.ReLU(), L.Flatten(), L.Dense(3 * 3 * 4, 3)], seed=4)
    logits = model.forward(x, training=False)
    np.testing.assert_array_equal(model.predict_proba(x, batch_size=3, tta=None), model.predict_proba(x, 3))
    np.testing.assert_allclose(model.predict_proba(x), C.softmax(logits), rtol=1e-6)
    mirrored = model.forward(x[..., ::-1].copy(), training=False)
    expected = C.softmax((logits + mirrored) / 2)                     # the mean of logits, not probabilities
    np.testing.assert_allclose(model.predict_proba(x, tta="flip"), expected, rtol=1e-6)
    np.testing.assert_array_equal(model.predict(x, tta="flip"), expected.argmax(axis=1))
    assert not np.allclose(expected, (C.softmax(logits) + C.softmax(mirrored)) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="tta must be None"):
        model.predict(x, tta=True)
    with pytest.raises(ValueError, match=r"tta='flip'.*\(N, C, H, W\)"):
        M.Sequential([L.Dense(6, 2)]).predict(x[:, 0, 0], tta="flip")


# ---------------------------------------------------------------- the CIFAR network

def test_cifar_net_builds_for_other_sizes_and_class_counts():
    model = M.cifar_net(widths=(4, 8, 16))
    assert model.forward(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 10)
    kinds = [type(layer).__name__ for layer in model.layers[2:9]]
    assert kinds == ["Conv2D", "MaxPool2D", "BatchNorm", "ReLU", "Conv2D", "BatchNorm", "ReLU"]
    assert model.layers[-3].pool_size == (3, 3)                       # 32 -> 31 -> 15 -> 7 -> 3: global
    big = M.cifar_net(widths=(4, 8, 16), input_size=64, num_classes=200)
    assert big.forward(np.zeros((1, 3, 64, 64), np.float32)).shape == (1, 200)
    assert big.layers[-3].pool_size == (7, 7)
    gray = M.cifar_net(widths=(4, 8), in_channels=1, input_size=28)
    assert gray.forward(np.zeros((1, 1, 28, 28), np.float32)).shape == (1, 10)
    with pytest.raises(ValueError, match="too small"):
        M.cifar_net(widths=(4, 8, 16), input_size=8)
    with pytest.raises(ValueError, match="widths"):
        M.cifar_net(widths=())


def test_cifar_net_whitened_stem_is_frozen_and_kept():
    x = correlated_images(n=20, size=8)
    stem = M.whitening_conv(x)
    model = M.cifar_net(widths=(4, 8), whiten=x, input_size=8, seed=3)
    assert model.layers[0].trainable is False and model.layers[1].trainable is True
    np.testing.assert_array_equal(model.layers[0].params["W"], stem.params["W"])
    assert model.num_params(trainable_only=True) == model.num_params() - (24 * 3 * 2 * 2 + 24)
    with pytest.raises(ValueError, match="whitening sample has 3 channels but in_channels is 1"):
        M.cifar_net(widths=(4,), whiten=x, in_channels=1, input_size=8)


def test_cifar_net_gradient():
    """Every parameter of a small float64 cifar_net. A conv bias right before a max pool and a
    BatchNorm is cancelled by the normalisation: its true gradient is 0 and its relative error
    means nothing, so those are checked to be ~0 instead."""
    model = M.cifar_net(widths=(2, 3), in_channels=1, input_size=8, seed=1, dtype=F64)
    _check_blocks_gradient(model, np.random.default_rng(2).standard_normal((3, 1, 8, 8)))


def _check_blocks_gradient(model, x):
    """Float64 gradient check of a network of two airbench blocks (2-D or 1-D) on x with
    labels 0, 4, 9; the 4 conv biases cancelled by the max pool and BatchNorm right after
    them must have a gradient of ~0. Returns the number of other arrays checked."""
    errors = G.gradient_errors(model, x, np.array([0, 4, 9]))
    cancelled = {f"{i}.b" for i, layer in enumerate(model.layers[:-1])
                 if isinstance(layer, (L.Conv2D, L.Conv1D))
                 and isinstance(model.layers[i + 1], (L.MaxPool2D, L.MaxPool1D, L.BatchNorm))}
    assert len(cancelled) == 4
    for key in cancelled:
        assert np.abs(model.layers[int(key.split(".")[0])].grads["b"]).max() < 1e-12
    checked = {key: error for key, error in errors.items() if key not in cancelled}
    assert max(checked.values()) < TOLERANCE, checked
    return len(checked)


# ---------------------------------------------------------------- GELU

def test_gelu_loop_and_vectorized_agree_and_match_the_definition():
    x = np.linspace(-5, 5, 41).reshape(1, 41)
    fast, slow = L.GELU(), L.GELU(impl="loop")
    y = fast.forward(x)
    np.testing.assert_allclose(slow.forward(x), y, rtol=1e-15, atol=1e-15)
    phi = 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))      # tanh form of Phi(x)
    np.testing.assert_allclose(y, x * phi, rtol=1e-14)
    erf_form = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x.ravel()])
    np.testing.assert_allclose(y.ravel(), erf_form, atol=1e-3)                 # the exact GELU, nearly
    dout = np.random.default_rng(0).standard_normal(x.shape)
    np.testing.assert_allclose(slow.backward(dout), fast.backward(dout), rtol=1e-14)
    assert L.GELU().label() == "GELU" and M.Sequential([L.Dense(3, 4), L.GELU()])._init_scheme(0) == "he"


@pytest.mark.parametrize("impl", L.IMPLS)
def test_gelu_gradient(impl):
    model = M.Sequential([L.Dense(5, 6, dtype=F64), L.GELU(impl=impl), L.Dense(6, 3, dtype=F64)], seed=3)
    x, y = np.random.default_rng(4).standard_normal((4, 5)), np.array([0, 2, 1, 1])
    errors = G.gradient_errors(model, x, y)
    assert max(errors.values()) < TOLERANCE, errors


# ---------------------------------------------------------------- Scale, uniform init

def test_scale_layer_loop_and_vectorized_agree_and_scale():
    x = np.random.default_rng(0).standard_normal((3, 4))
    fast, slow = L.Scale(1 / 9), L.Scale(1 / 9, impl="loop")
    np.testing.assert_allclose(fast.forward(x), x / 9, rtol=1e-15)
    np.testing.assert_array_equal(slow.forward(x), fast.forward(x))
    dout = np.random.default_rng(1).standard_normal(x.shape)
    np.testing.assert_allclose(fast.backward(dout), dout / 9, rtol=1e-15)
    np.testing.assert_array_equal(slow.backward(dout), fast.backward(dout))
    assert fast.forward(x.astype(np.float32)).dtype == np.float32
    for bad in (0, float("nan"), "1/9", True):
        with pytest.raises(ValueError, match="Scale: s must be a finite non-zero number"):
            L.Scale(bad)


@pytest.mark.parametrize("impl", L.IMPLS)
def test_scale_gradient(impl):
    model = M.Sequential([L.Dense(5, 3, dtype=F64), L.Scale(-0.3, impl=impl)], seed=3)
    x, y = np.random.default_rng(4).standard_normal((4, 5)), np.array([0, 2, 1, 1])
    errors = G.gradient_errors(model, x, y)
    assert max(errors.values()) < TOLERANCE, errors


def test_uniform_init_has_pytorchs_limit():
    conv = L.Conv2D(16, 8, 3, seed=0)
    conv.initialize(np.random.default_rng(0), "uniform")
    W, limit = conv.params["W"], 1 / np.sqrt(16 * 9)
    assert np.abs(W).max() <= limit and np.abs(W).max() > 0.95 * limit
    assert abs(W.std() - limit / np.sqrt(3)) < 0.05 * limit
    with pytest.raises(ValueError, match="'he', 'glorot' or 'uniform'"):
        conv.initialize(np.random.default_rng(0), "torch")


def test_cifar_net_uniform_start_and_logit_scale(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (20, 3, 32, 32), dtype=np.uint8)
    he = M.cifar_net((4, 8), whiten=images, seed=0)
    small = M.cifar_net((4, 8), whiten=images, seed=0, init="uniform", logit_scale=1 / 9)
    assert isinstance(small.layers[-1], L.Scale) and small.layers[-1].s == 1 / 9
    assert not any(isinstance(layer, L.Scale) for layer in he.layers)
    np.testing.assert_array_equal(small.layers[0].params["W"], he.layers[0].params["W"])   # the frozen stem
    for a, b in zip(he.layers, small.layers):
        if isinstance(a, (L.Conv2D, L.Dense)) and a.trainable:
            limit = 1 / np.sqrt(a.fan_in)
            assert np.abs(b.params["W"]).max() <= limit < np.abs(a.params["W"]).max()
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert small.forward(x, training=False).shape == (2, 10)
    again = M.cifar_net((4, 8), whiten=images, seed=0, init="uniform", logit_scale=1 / 9)
    for (_, a, _), (_, b, _) in zip(small.parameters(), again.parameters()):
        np.testing.assert_array_equal(a, b)                                     # seeded
    small.save(tmp_path / "net.npz")                                           # the Scale layer saves and loads
    loaded = M.Sequential.load(tmp_path / "net.npz")
    assert repr(loaded.layers[-1]) == "Scale(s=0.1111111111111111, impl='vectorized')"
    np.testing.assert_array_equal(loaded.forward(x, training=False), small.forward(x, training=False))
    with pytest.raises(ValueError, match="init must be 'he' or 'uniform'"):
        M.cifar_net((4, 8), init="torch")


def test_mnist_net_v2_blocks_pool_before_normalising():
    model = M.mnist_net_v2(seed=0)
    assert model.forward(np.zeros((2, 1, 28, 28), np.float32)).shape == (2, 10)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds[:4] == ["Conv2D", "MaxPool2D", "BatchNorm", "ReLU"]             # block 1: one conv
    assert kinds[4:11] == ["Conv2D", "MaxPool2D", "BatchNorm", "ReLU", "Conv2D", "BatchNorm", "ReLU"]
    assert kinds.count("Conv2D") == 5 and model.layers[-4].in_features == 64 * 3 * 3
    assert M.mnist_net_v2(channels=(8,), hidden=16).forward(np.zeros((1, 1, 28, 28), np.float32)).shape == (1, 10)


def test_cifar_rows_conv1d_is_airbench_blocks_in_1d():
    """The default (He start, no logit scale, no stem): RowsToSequence, then per width
    Conv1D -> MaxPool1D -> BatchNorm -> ReLU -> Conv1D -> BatchNorm -> ReLU (cifar_net's
    blocks, in 1-D), the 4 rows left flattened -> Dropout -> Dense; the seed sets the start."""
    built = M.cifar_rows_conv1d(seed=0)
    block = lambda c, w: [f"Conv1D {c}->{w} k3 pad 1", "MaxPool1D 2", f"BatchNorm {w}", "ReLU",
                          f"Conv1D {w}->{w} k3 pad 1", f"BatchNorm {w}", "ReLU"]
    assert [layer.label() for layer in built.layers] == (
        ["RowsToSequence"] + block(96, 128) + block(128, 256) + block(256, 256)
        + ["Flatten", "Dropout 0.1", "Dense 1024->10"])
    assert isinstance(built.layers[0], L.RowsToSequence) and built.layers[0].layout == "NCL"
    assert [layer.label() for layer in M.cifar_net(widths=(8,)).layers[2:9]] == [
        "Conv2D 24->8 3x3 pad 1", "MaxPool2D 2x2", "BatchNorm 8", "ReLU", "Conv2D 8->8 3x3 pad 1", "BatchNorm 8",
        "ReLU"]                                                   # the same blocks in 2-D
    assert built.forward(np.zeros((2, 3, 32, 32), np.float32), training=False).shape == (2, 10)
    other_seed = M.cifar_rows_conv1d(seed=1)
    assert not np.array_equal(other_seed.layers[1].params["W"], built.layers[1].params["W"])
    small = M.cifar_rows_conv1d(widths=(4, 4, 4, 4, 4))              # 32 -> 16 -> 8 -> 4 -> 2 -> 1 rows
    assert small.layers[-1].in_features == 4
    assert small.forward(np.zeros((1, 3, 32, 32)), training=False).shape == (1, 10)
    with pytest.raises(ValueError, match="6 blocks halve the 32 rows to none; use at most 5 widths"):
        M.cifar_rows_conv1d(widths=(4,) * 6)
    with pytest.raises(ValueError, match="cifar_rows_conv1d: widths must be a non-empty tuple"):
        M.cifar_rows_conv1d(widths=())
    with pytest.raises(ValueError, match="cifar_rows_conv1d: each width must be a positive integer"):
        M.cifar_rows_conv1d(widths=(8, 0))


def test_airbench_blocks_in_1d_gradient():
    """Every parameter of two float64 airbench blocks on sequences (N, C, L), as in the
    row-sequence model (the cancelled conv biases checked to be ~0, as in test_cifar_net_gradient)."""
    blocks, length = M._airbench_blocks(2, 9, (3, 4), 1, dtype=F64)
    assert length == 2                                                   # 9 -> 4 -> 2
    model = M.Sequential(blocks + [L.Flatten(), L.Dense(4 * length, 10, dtype=F64)], seed=1)
    checked = _check_blocks_gradient(model, np.random.default_rng(2).standard_normal((3, 2, 9)))
    assert checked == 15                                      # x, 4 W, 4 gamma, 4 beta, the Dense's W and b


def test_cifar_rows_conv1d_uniform_start_and_logit_scale():
    """init="uniform" redraws all seven weighted layers within PyTorch's limit, logit_scale
    appends a Scale that multiplies the logits, and a bad init is refused by name."""
    he, uniform = M.cifar_rows_conv1d(seed=0), M.cifar_rows_conv1d(seed=0, init="uniform", logit_scale=0.5)
    assert isinstance(uniform.layers[-1], L.Scale) and uniform.layers[-1].s == 0.5
    assert [layer.label() for layer in uniform.layers[:-1]] == [layer.label() for layer in he.layers]
    weighted = [layer for layer in uniform.layers if isinstance(layer, (L.Conv1D, L.Dense))]
    assert len(weighted) == 7
    for layer in weighted:          # uniform within PyTorch's limit, not He's wider normal
        limit, W = 1 / np.sqrt(layer.fan_in), layer.params["W"]
        assert 0.9 * limit < np.abs(W).max() <= limit
    x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    scaled = uniform.forward(x, training=False)
    uniform.layers.pop()
    assert np.allclose(scaled, 0.5 * uniform.forward(x, training=False), rtol=1e-6)
    with pytest.raises(ValueError, match="cifar_rows_conv1d: init must be 'he' or 'uniform'"):
        M.cifar_rows_conv1d(init="glorot")


def test_mlp_is_notebook_4s_pixel_perceptron():
    """The builder gives the MLP notebook 4 built inline (same layers, same initial
    weights and dropout stream), so the saved run "cifar_mlp" stays valid."""
    inline = M.Sequential([L.Flatten(), L.Dense(3 * 32 * 32, 512), L.ReLU(), L.Dropout(0.3), L.Dense(512, 10)], seed=0)
    built = M.mlp(seed=0)
    assert [layer.label() for layer in built.layers] == [layer.label() for layer in inline.layers]
    for (key, p, _), (other_key, q, _) in zip(built.parameters(), inline.parameters(), strict=True):
        assert key == other_key and np.array_equal(p, q)
    assert built.layers[3].p == 0.3 and built.layers[3].rng.random() == inline.layers[3].rng.random()
    assert built.forward(np.zeros((2, 3, 32, 32), np.float32), training=False).shape == (2, 10)
    small = M.mlp(in_features=4, hidden=5, dropout=0.1, num_classes=3, seed=1)
    assert [p.shape for _, p, _ in small.parameters()] == [(4, 5), (5,), (5, 3), (3,)]
    assert not np.array_equal(M.mlp(seed=1).layers[1].params["W"], built.layers[1].params["W"])


def test_identity_filters_pass_channels_through_and_cifar_net_uses_them_when_asked():
    conv = L.Conv2D(3, 5, 3, padding=1, dtype=np.float64)
    M.Sequential([conv], seed=0)
    rest = conv.params["W"][3:].copy()
    M.identity_filters(conv)
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6))
    out = conv.forward(x, training=False)
    np.testing.assert_allclose(out[:, :3], x + conv.params["b"][:3, None, None])   # channel f -> output f
    np.testing.assert_array_equal(conv.params["W"][3:], rest)                    # the other filters unchanged
    with pytest.raises(ValueError, match="odd kernel"):
        M.identity_filters(L.Conv2D(3, 5, 2))
    plain, ident = M.cifar_net((4, 8), seed=0), M.cifar_net((4, 8), seed=0, identity=True)
    convs = [i for i, layer in enumerate(ident.layers) if isinstance(layer, L.Conv2D)]
    np.testing.assert_array_equal(ident.layers[0].params["W"], plain.layers[0].params["W"])   # not the 2x2 stem
    for i in convs[1:]:
        W = ident.layers[i].params["W"]
        k = min(W.shape[:2])
        assert (W[:k, :, 1, 1][np.arange(k), np.arange(k)] == 1).all() and np.abs(W[:k]).sum() == k
        assert not np.array_equal(W, plain.layers[i].params["W"])


def test_cifar_net_activation_choice():
    relu, gelu = M.cifar_net((4, 8), seed=0), M.cifar_net((4, 8), seed=0, activation="gelu")
    kinds = [type(layer) for layer in relu.layers]
    assert kinds.count(L.ReLU) == 5 and L.GELU not in kinds                  # the stem's and two per block
    assert [type(layer) for layer in gelu.layers] == [L.GELU if k is L.ReLU else k for k in kinds]
    for a, b in zip(relu.parameters(), gelu.parameters()):                    # same start, other non-linearity
        np.testing.assert_array_equal(a[1], b[1])
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert not np.allclose(relu.forward(x, training=False), gelu.forward(x, training=False))
    with pytest.raises(ValueError, match="activation must be one of"):
        M.cifar_net((4, 8), activation="tanh")
