"""Sequential: implementations, initialisation, whole-network gradients, saving and loading, builders."""
import os

import numpy as np
import pytest

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
