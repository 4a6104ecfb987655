"""The GRU: loop = vectorized, finite differences (float64) for every parameter, the
input and the initial state, state carried across steps, shapes, init, save/load."""

import math

import numpy as np
import pytest

import cnn_gradcheck as G
import cnn_layers as L
import cnn_model as M
import cnn_rnn as S
import cnn_train as T

F64 = np.float64
GRAD_NAMES = ("dx", "dh0", "dW", "dU", "db", "dc")


def random_gru(N, T_, D, H, seed=0, scale=0.6):
    """x, W, U, b, c, h0 in float64, large enough that every gate is away from 0 and 1."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, T_, D))
    W, U = rng.standard_normal((D, 3 * H)) * scale, rng.standard_normal((H, 3 * H)) * scale
    b, c, h0 = rng.standard_normal(3 * H) * 0.3, rng.standard_normal(H) * 0.3, rng.standard_normal((N, H)) * 0.5
    return x, W, U, b, c, h0


@pytest.mark.parametrize("N,T_,D,H,with_h0", [(1, 1, 1, 1, False), (2, 5, 3, 4, True), (3, 7, 4, 2, False),
                                              (4, 3, 6, 5, True)])
def test_gru_loop_matches_vectorized(N, T_, D, H, with_h0):
    x, W, U, b, c, h0 = random_gru(N, T_, D, H)
    h0 = h0 if with_h0 else None
    out_loop, cache_loop = S.gru_forward_loop(x, W, U, b, c, h0)
    out_vec, cache_vec = S.gru_forward_vectorized(x, W, U, b, c, h0)
    assert out_loop.shape == out_vec.shape == (N, T_, H)
    np.testing.assert_allclose(out_vec, out_loop, rtol=1e-12, atol=1e-12)
    dout = np.random.default_rng(1).standard_normal((N, T_, H))
    grads_loop, grads_vec = S.gru_backward_loop(dout, cache_loop), S.gru_backward_vectorized(dout, cache_vec)
    for name in GRAD_NAMES:
        assert getattr(grads_vec, name).shape == getattr(grads_loop, name).shape, name
        np.testing.assert_allclose(getattr(grads_vec, name), getattr(grads_loop, name),
                                   rtol=1e-11, atol=1e-12, err_msg=name)
    assert S.gru_backward_vectorized(dout, cache_vec, input_grad=False).dx is None


@pytest.mark.parametrize("forward,backward", [(S.gru_forward_loop, S.gru_backward_loop),
                                              (S.gru_forward_vectorized, S.gru_backward_vectorized)])
def test_gru_backward_through_time_matches_finite_differences(forward, backward):
    """Every parameter, the input and the initial state, float64, L = sum(out * G)."""
    x, W, U, b, c, h0 = arrays = random_gru(2, 4, 3, 3, seed=2)
    dout = np.random.default_rng(3).standard_normal((2, 4, 3))
    grads = backward(dout, forward(x, W, U, b, c, h0)[1])
    loss = lambda: float(np.sum(forward(x, W, U, b, c, h0)[0] * dout))
    for name, array in zip(("dx", "dW", "dU", "db", "dc", "dh0"), arrays):
        error = G.relative_error(getattr(grads, name), G.numeric_gradient(loss, array))
        assert error < 1e-7, (name, error)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("return_sequences", [False, True])
def test_gru_layer_gradients_match_finite_differences(bidirectional, return_sequences):
    layer = S.GRU(3, 4, return_sequences=return_sequences, bidirectional=bidirectional, seed=0, dtype=F64)
    x = np.random.default_rng(4).standard_normal((2, 5, 3))
    errors = G.gradient_errors(layer, x)
    expected = {"x"} | {p + n for p in (("", "rev.") if bidirectional else ("",)) for n in "WUbc"}
    assert set(errors) == expected
    assert max(errors.values()) < 1e-7, errors


def test_gru_in_a_model_with_a_loss_matches_finite_differences():
    model = M.rows_gru_net(in_channels=2, input_size=4, hidden=3, bidirectional=True, read="all",
                           row_features=5, num_classes=3, seed=1).astype(F64)
    x = np.random.default_rng(5).standard_normal((3, 2, 4, 4))
    errors = G.gradient_errors(model, x, y=np.array([0, 2, 1]))
    assert max(errors.values()) < 1e-7, errors


def test_one_step_follows_the_gate_equations():
    """T = 1, D = H = 1, numbers worked out by hand from the equations in cnn_rnn."""
    x, h0 = 0.5, -0.4
    Wr, Wz, Wn, Ur, Uz, Un = 0.3, -0.7, 1.1, 0.9, 0.2, -1.3
    br, bz, bn, c = 0.1, -0.2, 0.05, 0.4
    sig = lambda a: 1 / (1 + math.exp(-a))
    r = sig(x * Wr + br + h0 * Ur)
    z = sig(x * Wz + bz + h0 * Uz)
    n = math.tanh(x * Wn + bn + r * (h0 * Un + c))
    expected = (1 - z) * n + z * h0
    for forward in (S.gru_forward_loop, S.gru_forward_vectorized):
        out, _ = forward(np.array([[[x]]]), np.array([[Wr, Wz, Wn]]), np.array([[Ur, Uz, Un]]),
                         np.array([br, bz, bn]), np.array([c]), np.array([[h0]]))
        assert out.shape == (1, 1, 1) and out[0, 0, 0] == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("forward", [S.gru_forward_loop, S.gru_forward_vectorized])
def test_the_state_is_carried_across_steps(forward):
    """Running steps 0..k-1, then k..T-1 from the state reached, equals one run over all T steps."""
    x, W, U, b, c, h0 = random_gru(3, 9, 4, 5, seed=6)
    whole, _ = forward(x, W, U, b, c, h0)
    for k in (1, 4, 8):
        first, _ = forward(x[:, :k], W, U, b, c, h0)
        second, _ = forward(x[:, k:], W, U, b, c, first[:, -1])
        np.testing.assert_allclose(np.concatenate([first, second], axis=1), whole, rtol=1e-13, atol=1e-13)
    # starting from zeros instead of the state reached gives a different continuation
    restart, _ = forward(x[:, 4:], W, U, b, c, None)
    assert np.abs(restart - whole[:, 4:]).max() > 1e-3


@pytest.mark.parametrize("impl", ["loop", "vectorized"])
def test_a_step_changes_only_the_states_after_it_and_reaches_the_last(impl):
    layer = S.GRU(3, 4, return_sequences=True, impl=impl, seed=0, dtype=F64)
    x = np.random.default_rng(7).standard_normal((2, 6, 3))
    out = layer.forward(x)
    x2 = x.copy()
    x2[:, 2] += 1.0
    out2 = layer.forward(x2)
    np.testing.assert_array_equal(out2[:, :2], out[:, :2])                 # the past does not see the future
    assert np.all(np.abs(out2[:, 2:] - out[:, 2:]).max(axis=(0, 2)) > 1e-6)  # every later step does
    # and BPTT sends the last state's gradient all the way back to step 0
    last = S.GRU(3, 4, impl=impl, seed=0, dtype=F64)
    last.forward(x)
    dx = last.backward(np.ones((2, 4)))
    assert np.all(np.abs(dx).max(axis=(0, 2)) > 1e-6)


def test_a_closed_update_gate_keeps_the_state():
    """z = 1 (a large update-gate bias): h_t = h_{t-1} for every t, whatever x is."""
    x, W, U, b, c, h0 = random_gru(2, 6, 3, 4, seed=8)
    b[4:8] = 60.0                                               # the z block of b
    for forward in (S.gru_forward_loop, S.gru_forward_vectorized):
        out, _ = forward(x, W, U, b, c, h0)
        np.testing.assert_allclose(out, np.broadcast_to(h0[:, None], out.shape), atol=1e-12)


@pytest.mark.parametrize("bidirectional,return_sequences,shape", [
    (False, False, (5, 7)), (False, True, (5, 6, 7)), (True, False, (5, 14)), (True, True, (5, 6, 14))])
def test_gru_output_shapes(bidirectional, return_sequences, shape):
    layer = S.GRU(3, 7, return_sequences=return_sequences, bidirectional=bidirectional, seed=0)
    x = np.random.default_rng(9).standard_normal((5, 6, 3)).astype(np.float32)
    out = layer.forward(x)
    assert out.shape == shape and out.dtype == np.float32
    assert layer.backward(np.ones_like(out)).shape == x.shape
    assert all(layer.grads[k].shape == p.shape and layer.grads[k].dtype == np.float32 for k, p in layer.params.items())


def test_bidirectional_is_a_forward_and_a_time_reversed_gru():
    bi = S.GRU(3, 4, return_sequences=True, bidirectional=True, seed=0, dtype=F64)
    x = np.random.default_rng(10).standard_normal((2, 5, 3))
    out = bi.forward(x)
    forward_only, _ = S.gru_forward_vectorized(x, *(bi.params[k] for k in "WUbc"))
    backward_only, _ = S.gru_forward_vectorized(x[:, ::-1], *(bi.params["rev." + k] for k in "WUbc"))
    np.testing.assert_allclose(out[..., :4], forward_only, rtol=1e-13)
    np.testing.assert_allclose(out[..., 4:], backward_only[:, ::-1], rtol=1e-13)
    last = S.GRU(3, 4, bidirectional=True, seed=0, dtype=F64).forward(x)
    np.testing.assert_allclose(last, np.concatenate([forward_only[:, -1], backward_only[:, -1]], axis=1), rtol=1e-13)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("return_sequences", [False, True])
def test_gru_layer_loop_matches_vectorized(bidirectional, return_sequences):
    kwargs = dict(return_sequences=return_sequences, bidirectional=bidirectional, seed=3, dtype=F64)
    loop, vec = S.GRU(4, 3, impl="loop", **kwargs), S.GRU(4, 3, **kwargs)
    x = np.random.default_rng(11).standard_normal((3, 5, 4))
    out_loop, out_vec = loop.forward(x), vec.forward(x)
    np.testing.assert_allclose(out_vec, out_loop, rtol=1e-12, atol=1e-12)
    dout = np.random.default_rng(12).standard_normal(out_loop.shape)
    np.testing.assert_allclose(vec.backward(dout), loop.backward(dout), rtol=1e-11, atol=1e-12)
    for name in loop.params:
        np.testing.assert_allclose(vec.grads[name], loop.grads[name], rtol=1e-11, atol=1e-12, err_msg=name)


def test_float32_vectorized_agrees_with_float64():
    x, W, U, b, c, h0 = random_gru(8, 12, 6, 16, seed=13, scale=0.3)
    out64, cache64 = S.gru_forward_vectorized(x, W, U, b, c, h0)
    f32 = [a.astype(np.float32) for a in (x, W, U, b, c, h0)]
    out32, cache32 = S.gru_forward_vectorized(*f32)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, out64, atol=1e-5)
    dout = np.random.default_rng(14).standard_normal(out64.shape)
    g64, g32 = S.gru_backward_vectorized(dout, cache64), S.gru_backward_vectorized(dout.astype(np.float32), cache32)
    for name in GRAD_NAMES:
        assert getattr(g32, name).dtype == np.float32, name
        np.testing.assert_allclose(getattr(g32, name), getattr(g64, name), rtol=1e-4, atol=1e-4, err_msg=name)


def test_orthogonal_recurrent_init_is_seeded():
    layer = S.GRU(5, 6, bidirectional=True, seed=42)
    for prefix in ("", "rev."):
        for block in S._gates(layer.params[prefix + "U"], 6):
            np.testing.assert_allclose(block.T @ block, np.eye(6), atol=1e-5)
        limit = math.sqrt(6 / (5 + 6))
        assert 0 < np.abs(layer.params[prefix + "W"]).max() <= limit
        assert not layer.params[prefix + "b"].any() and not layer.params[prefix + "c"].any()
    same, other = S.GRU(5, 6, bidirectional=True, seed=42), S.GRU(5, 6, bidirectional=True, seed=43)
    for name, param in layer.params.items():
        np.testing.assert_array_equal(same.params[name], param)
    assert not np.array_equal(other.params["U"], layer.params["U"])
    assert not np.array_equal(layer.params["U"], layer.params["rev.U"])       # two directions, two draws
    q = S.orthogonal(np.random.default_rng(0), 4, np.float64)
    np.testing.assert_allclose(q @ q.T, np.eye(4), atol=1e-12)


def test_save_and_load_a_gru_model(tmp_path):
    model = M.rows_gru_net(in_channels=3, input_size=8, hidden=5, bidirectional=True, read="all",
                           row_features=6, dropout=0.1, num_classes=4, seed=2)
    x = np.random.default_rng(15).standard_normal((6, 3, 8, 8)).astype(np.float32)
    model.save(tmp_path / "gru.npz")
    loaded = M.Sequential.load(tmp_path / "gru.npz")
    assert [repr(layer) for layer in loaded.layers] == [repr(layer) for layer in model.layers]
    assert isinstance(loaded.layers[3], S.GRU) and sorted(loaded.layers[3].params) == sorted(model.layers[3].params)
    np.testing.assert_array_equal(loaded.predict_proba(x), model.predict_proba(x))


def test_step_dense_is_one_dense_layer_on_every_step():
    x = np.random.default_rng(19).standard_normal((3, 4, 5))
    loop, vec = S.StepDense(5, 2, impl="loop", seed=0, dtype=F64), S.StepDense(5, 2, seed=0, dtype=F64)
    out = vec.forward(x)
    assert out.shape == (3, 4, 2)
    np.testing.assert_allclose(out, x @ vec.params["W"] + vec.params["b"], rtol=1e-13)
    np.testing.assert_allclose(loop.forward(x), out, rtol=1e-13)
    dout = np.random.default_rng(20).standard_normal(out.shape)
    np.testing.assert_allclose(loop.backward(dout), vec.backward(dout), rtol=1e-12)
    for name in ("W", "b"):
        np.testing.assert_allclose(loop.grads[name], vec.grads[name], rtol=1e-12)
    assert max(G.gradient_errors(vec, x).values()) < 1e-7
    with pytest.raises(ValueError, match=r"expected 5 features per time step.*\(3, 4, 6\)"):
        vec.forward(np.zeros((3, 4, 6)))


def test_rows_to_sequence_time_major_layout():
    x = np.random.default_rng(16).standard_normal((2, 3, 4, 5))
    layer = L.RowsToSequence(layout="NTD")
    out = layer.forward(x)
    np.testing.assert_array_equal(out, L.rows_as_sequence(x))                   # (N, H, W*C)
    np.testing.assert_array_equal(layer.backward(out), x)
    np.testing.assert_array_equal(L.RowsToSequence().forward(x), out.transpose(0, 2, 1))
    with pytest.raises(ValueError, match="layout"):
        L.RowsToSequence(layout="NLC")


@pytest.mark.parametrize("x,message", [
    (np.zeros((2, 5, 4), np.float32), r"expected 3 features per time step.*\(2, 5, 4\).*RowsToSequence"),
    (np.zeros((2, 3, 8, 8), np.float32), r"expected a 3-D input \(NTD\)"),
    (np.zeros((2, 0, 3), np.float32), "no time steps"),
    (np.zeros((0, 5, 3), np.float32), "empty batch"),
    (np.zeros((2, 5, 3), np.int64), "floating-point")])
def test_bad_gru_input_names_the_problem(x, message):
    with pytest.raises(ValueError, match=message):
        S.GRU(3, 4).forward(x)


def test_bad_gru_arguments_name_the_problem():
    with pytest.raises(ValueError, match="hidden_size=0"):
        S.GRU(3, 0)
    with pytest.raises(ValueError, match="impl"):
        S.GRU(3, 4, impl="fast")
    with pytest.raises(ValueError, match=r"h0 must have shape.*\(2, 4\)"):
        S.gru_forward_vectorized(np.zeros((2, 3, 5)), np.zeros((5, 12)), np.zeros((4, 12)), np.zeros(12),
                                 np.zeros(4), h0=np.zeros((4,)))
    with pytest.raises(RuntimeError, match="before forward"):
        S.GRU(3, 4).backward(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="read"):
        M.rows_gru_net(read="mean")


def test_gru_learns_to_remember_the_first_step():
    """Labels depend on step 0 only, followed by 11 steps of noise: only a state carried
    across every step (and a gradient carried back through all of them) can fit it."""
    rng = np.random.default_rng(17)
    x = rng.standard_normal((1024, 12, 2)).astype(np.float32)
    y = (x[:, 0, 0] > 0).astype(np.int64)
    model = M.Sequential([S.GRU(2, 8, seed=0), L.Dense(8, 2)], seed=0)
    T.fit(model, x[:768], y[:768], T.Adam(0.02), epochs=8, batch_size=32, progress=False, log=None, clip_norm=1.0)
    assert (model.predict(x[768:]) == y[768:]).mean() > 0.9


def test_a_bidirectional_gru_resumes_from_a_checkpoint_exactly(tmp_path):
    """The reverse direction's parameters ("rev.W", ...) survive save, optimiser state and resume."""
    rng = np.random.default_rng(18)
    x, y = rng.standard_normal((40, 1, 4, 4)).astype(np.float32), rng.integers(0, 3, 40)
    build = lambda: M.rows_gru_net(in_channels=1, input_size=4, hidden=3, bidirectional=True, num_classes=3, seed=0)
    kwargs = dict(batch_size=16, progress=False, log=None, clip_norm=1.0)
    straight = build()
    T.fit(straight, x, y, T.Adam(0.01), epochs=2, **kwargs)
    resumed, path = build(), tmp_path / "ckpt.npz"
    T.fit(resumed, x, y, T.Adam(0.01), epochs=1, checkpoint=path, **kwargs)
    T.fit(resumed, x, y, T.Adam(0.01), epochs=2, checkpoint=path, **kwargs)
    for (key, a, _), (_, b, _) in zip(straight.parameters(), resumed.parameters()):
        np.testing.assert_array_equal(a, b, err_msg=key)


@pytest.mark.parametrize("build,shape,params", [(M.mnist_rows_gru, (1, 28, 28), 138_378),
                                                (M.cifar_rows_gru, (3, 32, 32), 152_202)])
def test_the_recipe_networks(build, shape, params):
    model = build()
    assert model.num_params() == params
    assert [type(layer).__name__ for layer in model.layers] == [
        "RowsToSequence", "StepDense", "ReLU", "GRU", "Flatten", "Dense"]
    assert model.forward(np.zeros((2,) + shape, np.float32), training=False).shape == (2, 10)
    assert build(bidirectional=True).layers[3].bidirectional
