"""Loop and vectorized maths agree, and finite differences (float64) confirm every backward pass."""

import numpy as np
import pytest

import cnn_core as C
import cnn_layers as L
import cnn_gradcheck as G

F64 = np.float64
numeric_grad, rel_error, gradient_errors = G.numeric_gradient, G.relative_error, G.gradient_errors


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


@pytest.mark.parametrize("case", random_conv_cases(12))
def test_conv_loop_matches_vectorized(case):
    N, Cin, H, W, F, kh, kw, stride, padding = case
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, Cin, H, W))
    loop = L.Conv2D(Cin, F, (kh, kw), stride, padding, impl="loop", seed=2, dtype=F64)
    vec = L.Conv2D(Cin, F, (kh, kw), stride, padding, impl="vectorized", seed=2, dtype=F64)
    out_loop, out_vec = loop.forward(x), vec.forward(x)
    assert out_loop.shape == out_vec.shape == (
        N, F, C.output_size(H, kh, stride, padding), C.output_size(W, kw, stride, padding))
    np.testing.assert_allclose(out_vec, out_loop, rtol=1e-12, atol=1e-12)
    dout = rng.standard_normal(out_loop.shape)
    np.testing.assert_allclose(vec.backward(dout), loop.backward(dout), rtol=1e-12, atol=1e-12)
    for name in ("W", "b"):
        np.testing.assert_allclose(vec.grads[name], loop.grads[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pool_cls", [L.MaxPool2D, L.AvgPool2D])
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
    for impl in L.IMPLS:
        pool = L.MaxPool2D(3, 2, impl=impl)
        np.testing.assert_array_equal(pool.forward(x), np.full((1, 1, 2, 2), 5.0))
        dx = pool.backward(np.array([[[[1.0, 2.0], [3.0, 4.0]]]]))
        assert dx[0, 0, 2, 2] == 10.0 and dx.sum() == 10.0
        # all-equal window: the gradient goes to the first element only
        tie = L.MaxPool2D(2, impl=impl)
        tie.forward(np.ones((1, 1, 2, 2)))
        np.testing.assert_array_equal(tie.backward(np.ones((1, 1, 1, 1)))[0, 0], [[1, 0], [0, 0]])


@pytest.mark.parametrize("layer_cls", [L.ReLU, L.LeakyReLU, L.Sigmoid, L.Tanh])
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
    loop, vec = (L.Dense(7, 3, impl=i, seed=1, dtype=F64) for i in L.IMPLS)
    np.testing.assert_allclose(vec.forward(x), loop.forward(x), rtol=1e-12)
    dout = rng.standard_normal((4, 3))
    np.testing.assert_allclose(vec.backward(dout), loop.backward(dout), rtol=1e-12)
    for name in ("W", "b"):
        np.testing.assert_allclose(vec.grads[name], loop.grads[name], rtol=1e-12)


@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (2, 2, 0), (4, 3, 2), (1, 1, 0)])
def test_conv1d_loop_matches_vectorized_and_the_equation(k, stride, padding):
    rng = np.random.default_rng(20)
    x = rng.standard_normal((2, 3, 9))
    loop, vec = (L.Conv1D(3, 4, k, stride, padding, impl=i, seed=3, dtype=F64) for i in L.IMPLS)
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


def test_1d_pooling_matches_the_definition():
    x = np.random.default_rng(22).standard_normal((2, 3, 7))
    np.testing.assert_array_equal(L.MaxPool1D(2).forward(x), np.maximum(x[:, :, 0:6:2], x[:, :, 1:7:2]))
    np.testing.assert_allclose(L.AvgPool1D(3, 2).forward(x)[:, :, 1], x[:, :, 2:5].mean(axis=2))


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 3, 4, 5)])
def test_batchnorm_loop_matches_vectorized_and_normalises(shape):
    rng = np.random.default_rng(23)
    x = rng.standard_normal(shape) * 3 + 2
    loop, vec = (L.BatchNorm(3, impl=i, dtype=F64) for i in L.IMPLS)
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


TOLERANCE = 1e-6


@pytest.mark.parametrize("impl", L.IMPLS)
@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), ((2, 3), 2, 0), ((3, 2), 3, 2)])
def test_conv_gradients(impl, kernel, stride, padding):
    x = np.random.default_rng(7).standard_normal((2, 2, 7, 6))
    layer = L.Conv2D(2, 3, kernel, stride, padding, impl=impl, seed=8, dtype=F64)
    errors = gradient_errors(layer, x)
    assert set(errors) == {"x", "W", "b"}
    assert max(errors.values()) < TOLERANCE, errors


@pytest.mark.parametrize("impl", L.IMPLS)
@pytest.mark.parametrize("layer_factory", [
    lambda impl: L.MaxPool2D(2, impl=impl), lambda impl: L.MaxPool2D(3, 2, impl=impl),
    lambda impl: L.AvgPool2D(2, impl=impl), lambda impl: L.AvgPool2D((3, 2), (2, 1), impl=impl),
    lambda impl: L.ReLU(impl=impl), lambda impl: L.LeakyReLU(0.1, impl=impl),
    lambda impl: L.Sigmoid(impl=impl), lambda impl: L.Tanh(impl=impl)])
def test_parameter_free_layer_gradients(impl, layer_factory):
    x = np.random.default_rng(9).standard_normal((2, 2, 6, 5))
    errors = gradient_errors(layer_factory(impl), x)
    assert errors["x"] < TOLERANCE, errors


@pytest.mark.parametrize("impl", L.IMPLS)
def test_dense_gradients(impl):
    x = np.random.default_rng(10).standard_normal((3, 5))
    errors = gradient_errors(L.Dense(5, 4, impl=impl, seed=3, dtype=F64), x)
    assert max(errors.values()) < TOLERANCE, errors


def test_flatten_and_dropout_gradients():
    x = np.random.default_rng(11).standard_normal((3, 2, 3, 2))
    assert gradient_errors(L.Flatten(), x)["x"] < TOLERANCE
    assert gradient_errors(L.Dropout(0.4), x)["x"] < TOLERANCE


def test_softmax_cross_entropy_gradient_and_value():
    rng = np.random.default_rng(12)
    logits, labels = rng.standard_normal((4, 5)), np.array([0, 3, 4, 1])
    loss_fn = L.SoftmaxCrossEntropy()
    loss = loss_fn.forward(logits, labels)
    expected = -np.mean(np.log(C.softmax(logits)[np.arange(4), labels]))
    assert loss == pytest.approx(expected, rel=1e-12)
    dlogits = loss_fn.backward()
    numeric = numeric_grad(lambda: L.SoftmaxCrossEntropy().forward(logits, labels), logits)
    assert rel_error(dlogits, numeric) < TOLERANCE


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1e4, 0.0, -1e4], [-1e4, 1e4, 1e4]], dtype=np.float32)
    loss_fn = L.SoftmaxCrossEntropy()
    loss = loss_fn.forward(logits, np.array([0, 2]))
    assert np.isfinite(loss) and loss == pytest.approx(np.log(2) / 2, rel=1e-5)
    assert np.all(np.isfinite(loss_fn.backward()))
    np.testing.assert_allclose(C.softmax(logits).sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("impl", L.IMPLS)
def test_conv1d_and_1d_pooling_gradients(impl):
    x = np.random.default_rng(21).standard_normal((2, 3, 10))
    for layer in (L.Conv1D(3, 2, 3, stride=2, padding=1, impl=impl, dtype=F64),
                  L.MaxPool1D(2, impl=impl), L.MaxPool1D(3, 2, impl=impl), L.AvgPool1D(2, impl=impl)):
        errors = gradient_errors(layer, x)
        assert max(errors.values()) < TOLERANCE, (layer, errors)


@pytest.mark.parametrize("impl", L.IMPLS)
def test_batchnorm_gradients(impl):
    x = np.random.default_rng(24).standard_normal((4, 3, 3, 2))
    layer = L.BatchNorm(3, impl=impl, dtype=F64)
    layer.params["gamma"][...] = [0.5, 1.5, -1.0]
    errors = gradient_errors(layer, x)
    assert set(errors) == {"x", "gamma", "beta"} and max(errors.values()) < TOLERANCE, errors


def test_rows_to_sequence_layer_and_its_gradient():
    x = np.random.default_rng(27).standard_normal((2, 3, 4, 5))
    layer = L.RowsToSequence()
    out = layer.forward(x)
    np.testing.assert_array_equal(out, L.rows_as_sequence(x).transpose(0, 2, 1))
    assert out.shape == (2, 15, 4)
    assert gradient_errors(layer, x)["x"] < TOLERANCE


# ---------------------------------------------------------------------------
# The fast paths of the vectorized layers: channels-last memory, im2col in blocks,
# the input gradient as a convolution, reused workspaces, one-pass batch norm
# ---------------------------------------------------------------------------

def channels_last_view(x):
    """The same values as x (N, C, ...) in channels-last memory, as the vectorized layers
    hand their outputs on: an (N, C, ...) view of an (N, ..., C) array."""
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)


FAST_CONV_CASES = [  # (N, C, H, W, F, kernel, stride, padding): odd sizes, batch 1, padding 0-2
    (2, 3, 7, 9, 4, 3, 1, 1), (1, 4, 5, 6, 3, 3, 1, 0), (2, 2, 6, 5, 3, 3, 1, 2),
    (3, 2, 5, 7, 2, (2, 3), 1, 1), (2, 3, 6, 6, 2, 1, 1, 1), (2, 2, 7, 6, 3, 2, 1, 2),  # padding >= kernel: crop
    (2, 3, 7, 8, 4, 3, 2, 1), (1, 2, 9, 7, 3, (3, 2), (2, 3), 2), (2, 5, 4, 4, 3, 1, 1, 0)]


def run_conv_pair(case, x_layout, seed=0):
    """Loop and vectorized Conv2D on the same input and output gradient, float64."""
    N, Cin, H, W, F, k, s, p = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, Cin, H, W))
    loop = L.Conv2D(Cin, F, k, s, p, impl="loop", seed=2, dtype=F64)
    vec = L.Conv2D(Cin, F, k, s, p, impl="vectorized", seed=2, dtype=F64)
    out_loop, out_vec = loop.forward(x), vec.forward(x_layout(x))
    np.testing.assert_allclose(out_vec, out_loop, rtol=1e-12, atol=1e-12)
    dout = rng.standard_normal(out_loop.shape)
    np.testing.assert_allclose(vec.backward(x_layout(dout)), loop.backward(dout), rtol=1e-12, atol=1e-12)
    for name in ("W", "b"):
        np.testing.assert_allclose(vec.grads[name], loop.grads[name], rtol=1e-12, atol=1e-12)
    return vec


@pytest.mark.parametrize("case", FAST_CONV_CASES)
@pytest.mark.parametrize("layout", ["channels-first", "channels-last"])
@pytest.mark.parametrize("chunk", [C.CHUNK_BYTES, 64])       # 64 bytes: one row band per block
def test_conv_fast_paths_match_the_loop(case, layout, chunk, monkeypatch):
    # channels-first input: the first layer's im2col ("im2col-cf"); channels-last: every other
    # layer's. Stride 1 computes dx as a convolution of the padded dout, other strides by col2im.
    monkeypatch.setattr(C, "CHUNK_BYTES", chunk)
    as_layout = channels_last_view if layout == "channels-last" else (lambda a: a)
    expected = "im2col-cf" if layout == "channels-first" or case[1] == 1 else "im2col"
    assert C.conv_method(as_layout(np.zeros(case[:4]))) == expected
    run_conv_pair(case, as_layout)


def test_conv_gradients_of_the_fast_paths():
    x = np.random.default_rng(31).standard_normal((2, 3, 5, 6))
    for padding, x_layout in ((0, channels_last_view), (1, channels_last_view), (2, lambda a: a)):
        layer = L.Conv2D(3, 2, 3, 1, padding, seed=8, dtype=F64)
        errors = gradient_errors(layer, x_layout(x))
        assert max(errors.values()) < TOLERANCE, (padding, errors)


def test_a_reused_workspace_gives_the_results_of_a_fresh_layer():
    # The same layer on batches of different data, sizes and dtypes: its scratch arrays (padded
    # input, im2col blocks) are reused or replaced, never stale; every result equals a fresh layer's.
    rng = np.random.default_rng(32)
    layer = L.Conv2D(3, 4, 3, padding=1, seed=3, dtype=F64)
    for n, dtype in ((4, F64), (4, F64), (1, F64), (4, F64), (3, np.float32)):
        layer.params = {k: v.astype(dtype) for k, v in layer.params.items()}
        fresh = L.Conv2D(3, 4, 3, padding=1, dtype=dtype)
        fresh.params = {k: v.copy() for k, v in layer.params.items()}
        x = channels_last_view(rng.standard_normal((n, 3, 6, 5)).astype(dtype))
        dout = channels_last_view(rng.standard_normal((n, 4, 6, 5)).astype(dtype))
        out = layer.forward(x)
        assert out.dtype == dtype
        np.testing.assert_array_equal(out, fresh.forward(x))
        np.testing.assert_array_equal(layer.backward(dout), fresh.backward(dout))
        np.testing.assert_array_equal(layer.grads["W"], fresh.grads["W"])
    assert layer.work.nbytes() > 0


def test_workspace_arrays_are_reused_and_padding_borders_stay_zero():
    work = C.Workspace()
    a = work.get("a", (2, 3), np.float32, zeros=True)
    a[1:, 1:] = 5
    assert work.get("a", (2, 3), np.float32) is a                      # same shape and dtype: same array
    assert work.get("a", (2, 4), np.float32) is not a                  # otherwise a new one
    s = work.scratch("s", (4, 5), np.float64)
    assert s.shape == (4, 5) and work.scratch("s", (2, 3), np.float64).base is s.base   # a smaller view
    layer = L.Conv2D(1, 1, 3, padding=1, dtype=F64)
    layer.params["W"][...] = 1
    for value in (1.0, 2.0):                                           # only the interior is rewritten
        out = layer.forward(np.full((1, 1, 3, 3), value))
        np.testing.assert_array_equal(out[0, 0], value * np.array([[4, 6, 4], [6, 9, 6], [4, 6, 4]]))


def test_vectorized_layers_hand_on_channels_last_memory():
    x = np.random.default_rng(33).standard_normal((2, 3, 8, 8)).astype(np.float32)
    model = [L.Conv2D(3, 4, 3, padding=1), L.BatchNorm(4), L.ReLU(), L.MaxPool2D(2), L.Conv2D(4, 5, 3)]
    for layer in model:
        x = layer.forward(x)
        assert np.moveaxis(x, 1, -1).flags.c_contiguous and x.dtype == np.float32, layer
    g = np.ones_like(x)
    for layer in reversed(model[1:]):
        g = layer.backward(g)
        assert np.moveaxis(g, 1, -1).flags.c_contiguous and g.dtype == np.float32, layer


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 3, 4, 5), (1, 3, 3, 1), (16, 3, 8),
                                   (2, 3, 23, 25)])                 # 1150 rows: one block of 1024 and the rest
@pytest.mark.parametrize("layout", ["channels-first", "channels-last"])
@pytest.mark.parametrize("chunk", [C.ROW_CHUNK_BYTES, 40])      # 40 bytes: many chunks of rows
def test_batchnorm_one_pass_statistics_match_the_loop_in_any_layout(shape, layout, chunk, monkeypatch):
    monkeypatch.setattr(C, "ROW_CHUNK_BYTES", chunk)
    rng = np.random.default_rng(34)
    x = rng.standard_normal(shape) * 3 + 2
    as_layout = channels_last_view if layout == "channels-last" else (lambda a: a)
    loop, vec = (L.BatchNorm(3, impl=i, dtype=F64) for i in L.IMPLS)
    out = vec.forward(as_layout(x))
    np.testing.assert_allclose(out, loop.forward(x), rtol=1e-10, atol=1e-12)
    dout = rng.standard_normal(shape)
    np.testing.assert_allclose(vec.backward(as_layout(dout)), loop.backward(dout), rtol=1e-10, atol=1e-12)
    for name in ("gamma", "beta"):
        np.testing.assert_allclose(vec.grads[name], loop.grads[name], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(vec.buffers["running_var"], loop.buffers["running_var"], rtol=1e-10)


@pytest.mark.parametrize("m", [1, 5, 1023, 1024, 1025, 3 * 1024 + 7])
@pytest.mark.parametrize("dtype", [F64, np.float32])
def test_column_sums_and_dots_in_blocks_match_the_definition(m, dtype):
    # blocks of 1024 rows, then the rest: no row counted twice or missed, at any m, in any dtype
    rng = np.random.default_rng(37)
    A, B = (rng.standard_normal((m, 3)).astype(dtype) for _ in range(2))
    tol = 1e-12 if dtype == F64 else 1e-5
    assert C._column_sums(A).dtype == C._column_dots(A, B).dtype == dtype
    np.testing.assert_allclose(C._column_sums(A), A.astype(F64).sum(axis=0), rtol=tol, atol=tol * m)
    np.testing.assert_allclose(C._column_dots(A, B), (A.astype(F64) * B).sum(axis=0), rtol=tol, atol=tol * m)
    np.testing.assert_allclose(C._column_sums(A[::2]), A[::2].astype(F64).sum(axis=0), rtol=tol, atol=tol * m)


def test_float32_column_sums_round_less_than_one_running_sum():
    # 2**16 rows with mean 3: a running float32 sum (or BLAS's ones @ X) is off by a few 1e-6;
    # summing blocks of 1024 rows, then the blocks, keeps the relative error below 1e-6
    X = (np.random.default_rng(38).standard_normal((1 << 16, 4)) + 3).astype(np.float32)
    X64 = X.astype(F64)
    assert np.max(np.abs(C._column_sums(X) / X64.sum(axis=0) - 1)) < 1e-6
    assert np.max(np.abs(C._column_dots(X, X) / (X64 * X64).sum(axis=0) - 1)) < 1e-6


def test_batchnorm_float32_keeps_its_digits_when_the_mean_dwarfs_the_spread():
    # E[x^2] - mean^2 alone would lose every digit of the variance here (mean 1e4, std 1 in
    # float32); the vectorized forward notices and recomputes from centred values.
    rng = np.random.default_rng(35)
    x = rng.standard_normal((64, 4, 6, 6)) + np.array([1e4, -3e3, 0.0, 50.0])[:, None, None]
    dout = rng.standard_normal(x.shape)
    ref, ref_cache = C.batchnorm_forward_loop(x, np.ones(4), np.zeros(4))
    dref = C.batchnorm_backward_loop(dout, ref_cache)
    layer = L.BatchNorm(4)
    out = layer.forward(channels_last_view(x.astype(np.float32)))
    dx = layer.backward(channels_last_view(dout.astype(np.float32)))
    assert out.dtype == dx.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=2e-3)
    np.testing.assert_allclose(dx, dref[0], atol=2e-3 * np.abs(dref[0]).max())
    np.testing.assert_allclose(layer.grads["gamma"], dref[1], rtol=1e-3, atol=1e-2)


def test_average_pooling_keeps_channels_last_memory_and_the_loop_values():
    x = np.random.default_rng(39).standard_normal((2, 3, 7, 6))
    for pool, stride in ((2, None), ((3, 2), (2, 1)), (1, 1)):
        loop, vec = L.AvgPool2D(pool, stride, impl="loop"), L.AvgPool2D(pool, stride)
        out = vec.forward(channels_last_view(x))
        assert np.moveaxis(out, 1, -1).flags.c_contiguous
        np.testing.assert_allclose(out, loop.forward(x), rtol=1e-12)


@pytest.mark.parametrize("shape,dtype", [((2, 5, 6, 8), np.float64), ((1, 3, 4, 4), np.float32), ((3, 1, 2, 6), np.float64),
                                         ((2, 3, 7, 5), np.float32), ((1, 2, 3, 2), np.float64)])
def test_maxpool_backward_on_channels_last_memory_matches_the_loop_with_and_without_ties(shape, dtype):
    # Odd sizes leave a last row or column in no window; ReLU zeros make ties, which keep the first maximum.
    rng = np.random.default_rng(41)
    for x in (rng.standard_normal(shape), np.maximum(rng.standard_normal(shape), 0)):
        x = channels_last_view(x.astype(dtype))
        loop, vec = L.MaxPool2D(2, impl="loop"), L.MaxPool2D(2)
        np.testing.assert_array_equal(vec.forward(x), loop.forward(x))
        dout = channels_last_view(rng.standard_normal(loop.forward(x).shape).astype(dtype))
        dx = vec.backward(dout)
        np.testing.assert_array_equal(dx, loop.backward(dout))
        assert dx.dtype == dtype and np.moveaxis(dx, 1, -1).flags.c_contiguous


@pytest.mark.parametrize("pool,stride", [(2, None), (3, 2), (2, 3), ((3, 1), (1, 2))])
def test_maxpool_backward_in_blocks_of_images_matches_the_loop(monkeypatch, pool, stride):
    # A chunk smaller than one image: the backward pass runs image by image (ties, gaps, overlaps).
    monkeypatch.setattr(C, "CHUNK_BYTES", 1)
    rng = np.random.default_rng(42)
    x = np.round(rng.standard_normal((3, 2, 7, 8)), 1)                     # rounded: many ties
    loop, vec = L.MaxPool2D(pool, stride, impl="loop"), L.MaxPool2D(pool, stride)
    np.testing.assert_array_equal(vec.forward(x), loop.forward(x))
    dout = rng.standard_normal(loop.forward(x).shape)
    np.testing.assert_allclose(vec.backward(dout), loop.backward(dout), rtol=1e-12, atol=1e-15)  # sums in another order


def test_maxpool_backward_follows_np_argmax_on_ties_and_nans():
    x = np.zeros((1, 1, 2, 6))
    x[0, 0, :, :2] = [[1.0, 1.0], [0.0, 0.0]]          # window 0: a tie of two 1s -> the first
    x[0, 0, 1, 3], x[0, 0, 0, 2] = np.nan, np.inf       # window 1: a NaN after an inf -> the NaN
    x[0, 0, :, 4:] = [[np.nan, 5.0], [np.nan, 7.0]]     # window 2: two NaNs -> the first
    loop, vec = L.MaxPool2D(2, impl="loop"), L.MaxPool2D(2)
    loop.forward(x)
    vec.forward(channels_last_view(x))
    dout = np.array([[[[1.0, 2.0, 3.0]]]])
    np.testing.assert_array_equal(vec.backward(channels_last_view(dout)), loop.backward(dout))
    np.testing.assert_array_equal(loop.backward(dout)[0, 0], [[1, 0, 0, 0, 3, 0], [0, 0, 0, 2, 0, 0]])


def test_maxpool_backward_takes_the_nan_path_only_in_the_blocks_that_need_it(monkeypatch):
    # One image per block: image 1 holds a NaN (the arg-max search), images 0 and 2 compare with
    # the maximum; signed zeros are equal, so a window of -0.0 and 0.0 is a tie: the first wins.
    monkeypatch.setattr(C, "CHUNK_BYTES", 1)
    fast_blocks = []                                    # the images each comparison-path call received
    first_max_grad = C._first_max_grad
    monkeypatch.setattr(C, "_first_max_grad", lambda xs, out, *rest: (fast_blocks.append(len(out)),
                                                                      first_max_grad(xs, out, *rest)))
    rng = np.random.default_rng(43)
    x = np.round(rng.standard_normal((3, 2, 4, 4)), 1)
    x[1, 1, 2, 3] = np.nan
    x[2, 0, :2, :2] = [[-0.0, 0.0], [0.0, -0.0]]
    loop, vec = L.MaxPool2D(2, impl="loop"), L.MaxPool2D(2)
    np.testing.assert_array_equal(vec.forward(channels_last_view(x)), loop.forward(x))
    dout = rng.standard_normal((3, 2, 2, 2))
    np.testing.assert_array_equal(vec.backward(channels_last_view(dout)), loop.backward(dout))
    assert loop.backward(dout)[2, 0, 0, 0] == dout[2, 0, 0, 0]
    assert fast_blocks == [1, 1]                        # images 0 and 2; image 1 took the arg-max search


@pytest.mark.parametrize("channels", [3, 8])          # channels-first and channels-last im2col
def test_conv_of_an_empty_batch_is_empty_like_the_loop(channels):
    x, W, b = np.zeros((0, channels, 5, 5)), np.ones((4, channels, 3, 3)), np.zeros(4)
    for stride in ((1, 1), (2, 2)):
        out, cache = C.conv2d_forward_vectorized(x, W, b, stride, (1, 1))
        loop_out, loop_cache = C.conv2d_forward_loop(x, W, b, stride, (1, 1))
        assert out.shape == loop_out.shape
        for got, expected in zip(C.conv2d_backward_vectorized(out, cache), C.conv2d_backward_loop(loop_out, loop_cache)):
            np.testing.assert_array_equal(got, expected)


def test_maxpool_backward_of_an_empty_batch_is_empty():
    out, cache = C.maxpool_forward_vectorized(np.zeros((0, 2, 4, 4)))
    assert C.maxpool_backward_vectorized(out, cache).shape == (0, 2, 4, 4)


def test_pad_adds_a_zero_border_or_returns_x_itself():
    x = np.random.default_rng(40).standard_normal((2, 3, 4, 5))
    np.testing.assert_array_equal(C._pad(x, (1, 2)), np.pad(x, ((0, 0), (0, 0), (1, 1), (2, 2))))
    np.testing.assert_array_equal(C._pad(x, (2, 0), axes=(1, 3)), np.pad(x, ((0, 0), (2, 2), (0, 0), (0, 0))))
    no_pad = C._pad(x, (0, 0))
    assert np.shares_memory(no_pad, x) and np.array_equal(no_pad, x)      # no copy


def test_a_float32_training_step_makes_no_float64():
    import cnn_model as M
    model = M.conv_net(in_channels=3, input_size=8, channels=(4, 8), convs_per_block=2, batchnorm=True,
                       hidden=6, seed=0)
    x = np.random.default_rng(36).standard_normal((5, 3, 8, 8)).astype(np.float32)
    loss_fn = L.SoftmaxCrossEntropy()
    out = model.forward(x)
    loss_fn.forward(out, np.arange(5) % 10)
    assert model.backward(loss_fn.backward()).dtype == np.float32
    assert out.dtype == np.float32 and all(g.dtype == np.float32 for _, _, g in model.parameters())
