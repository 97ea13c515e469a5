"""The NumPy ops, reference.py and fast.py alike: numerical gradient checks (float64),
parity with PyTorch, and the two modules equal to each other."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cnnlab.engines.numpy import fast, reference
from cnnlab.engines.numpy import ops as engine_ops

PADDINGS = ["valid", "same", "full", 1, (2, 0)]
STRIDES = [1, 2, (2, 1)]


@pytest.fixture(params=[reference, fast], ids=["reference", "fast"])
def ops(request):
    """Each test that takes `ops` runs on both modules."""
    return request.param


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def numerical_grad(f, x, eps=1e-6):
    """Central differences of the scalar f() with respect to each entry of x (in place)."""
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + eps
        fp = f()
        x[idx] = old - eps
        fm = f()
        x[idx] = old
        g[idx] = (fp - fm) / (2 * eps)
    return g


def assert_close(a, b, rtol=1e-6, atol=1e-8):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def check_grads(forward, backward, inputs, seed=1):
    """forward(*inputs) -> (out, cache); backward(dout, cache) -> grads (one per input or a
    tuple). Compares against central differences of L = sum(out * r)."""
    out, cache = forward(*inputs)
    r = rand(*out.shape, seed=seed)
    grads = backward(r, cache)
    grads = grads if isinstance(grads, tuple) else (grads,)
    for x, g in zip(inputs, grads):
        if g is None:
            continue
        num = numerical_grad(lambda: float((forward(*inputs)[0] * r).sum()), x)
        assert_close(g, num)


def nchw(x):
    return torch.tensor(x).permute(0, 3, 1, 2)


def nhwc(t):
    return t.detach().permute(0, 2, 3, 1).numpy()


def torch_pad(pads):
    (t, b), (l, r) = pads
    return (l, r, t, b)


# activations -----------------------------------------------------------------------------
ACTS = ["linear", "relu", "leaky_relu", "elu", "gelu", "sigmoid", "tanh", "softplus",
        "softmax"]
TORCH_ACTS = {
    "linear": lambda t: t, "relu": F.relu, "leaky_relu": lambda t: F.leaky_relu(t, 0.2),
    "elu": F.elu, "gelu": F.gelu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
    "softplus": F.softplus, "softmax": lambda t: torch.softmax(t, -1)}


@pytest.mark.parametrize("name", ACTS)
def test_activation_gradcheck(name, ops):
    x = rand(3, 2, 2, 4) * 2
    check_grads(lambda x: ops.activation_forward(x, name), ops.activation_backward, [x])


@pytest.mark.parametrize("name", ACTS)
def test_activation_matches_torch(name, ops):
    x = rand(4, 3, 3, 5) * 3
    r = rand(*x.shape, seed=2)
    y, cache = ops.activation_forward(x, name)
    xt = torch.tensor(x, requires_grad=True)
    yt = TORCH_ACTS[name](xt)
    (yt * torch.tensor(r)).sum().backward()
    assert_close(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert_close(ops.activation_backward(r, cache), xt.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_leaky_relu_slope_is_keras_default(ops):
    y, _ = ops.activation_forward(np.array([-1.0, 2.0]), "leaky_relu")
    assert y.tolist() == [-0.2, 2.0]


def test_erfc_accuracy():
    xs = np.linspace(-6, 9, 3001)
    ref = np.array([math.erfc(v) for v in xs])
    assert_close(fast.erfc(xs), ref, rtol=1e-12, atol=0)
    assert_close(fast.erfc(xs.astype(np.float32)), ref, rtol=0, atol=5e-7)


def test_extreme_inputs_are_stable(ops):
    x = np.array([-1e4, -100.0, 0.0, 100.0, 1e4], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ACTS:
            y, cache = ops.activation_forward(x, name)
            dx = ops.activation_backward(np.ones_like(x), cache)
            assert np.isfinite(y).all() and np.isfinite(dx).all(), name
    assert_close(ops.sigmoid(x), [0, 0, 0.5, 1, 1], atol=1e-30)
    assert_close(ops.softplus(x), [0, 3.7200760e-44, math.log(2), 100, 1e4], rtol=1e-6)


# convolution -------------------------------------------------------------------------------
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("stride", STRIDES)
def test_conv_gradcheck(padding, stride, ops):
    x, w, b = rand(2, 5, 6, 2), rand(3, 2, 2, 3, seed=1), rand(3, seed=2)
    check_grads(lambda x, w, b: ops.conv2d_forward(x, w, b, stride, padding),
                ops.conv2d_backward, [x, w, b])


@pytest.mark.parametrize("padding", PADDINGS + [4])
@pytest.mark.parametrize("stride", STRIDES)
@pytest.mark.parametrize("channels", [(3, 4), (17, 2)])  # fast: channels-first / pixel rows
def test_three_conv_algorithms_agree(padding, stride, channels):
    """fast (tiles of patches, im2col when strided), fft and the reference give the same
    numbers, forward and backward."""
    c, f = channels
    x, w, b = rand(2, 7, 6, c), rand(3, 2, c, f, seed=1), rand(f, seed=2)
    ref, ref_cache = reference.conv2d_forward(x, w, b, stride, padding)
    out, cache = fast.conv2d_forward(x, w, b, stride, padding)
    assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert_close(fast.conv2d_fft(x, w, b, stride, padding), ref, rtol=1e-10, atol=1e-12)
    dout = rand(*out.shape, seed=3)
    for got, want in zip(fast.conv2d_backward(dout, cache),
                         reference.conv2d_backward(dout, ref_cache)):
        assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tile", [1, 5, 29, 64, 1024])
@pytest.mark.parametrize("shape", [(1, 40, 37, 3), (5, 4, 3, 20), (3, 9, 11, 16), (2, 1, 1, 2),
                                   (2, 12, 10, 24), (3, 9, 8, 32)])
def test_fast_conv_tiles_cover_every_pixel(shape, tile, monkeypatch):
    """Tiles smaller than an image, and several images per tile, give the reference's
    numbers at every pixel (and in the kernel gradient's sums)."""
    monkeypatch.setattr(fast, "_tile_rows", lambda k, itemsize: tile)
    f = 32 if shape[3] == 32 else 6  # 32 -> 32: products in pieces of 64 rows
    x, w, b = rand(*shape), rand(3, 3, shape[3], f, seed=1), rand(f, seed=2)
    for padding in ("same", "full", "valid", (0, 1)):
        if padding in ("valid", (0, 1)) and min(shape[1:3]) < 3:
            continue  # no room for a 3x3 window
        ref, ref_cache = reference.conv2d_forward(x, w, b, 1, padding)
        out, cache = fast.conv2d_forward(x, w, b, 1, padding)
        assert_close(out, ref, rtol=1e-10, atol=1e-10)
        dout = rand(*out.shape, seed=3)
        for got, want in zip(fast.conv2d_backward(dout, cache),
                             reference.conv2d_backward(dout, ref_cache)):
            assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-4)])
@pytest.mark.parametrize("padding,stride", [("valid", 1), ("same", 1), ("same", 2),
                                            ("full", 1), ((1, 2), (2, 1)), ("valid", 3)])
def test_conv_matches_torch(padding, stride, dtype, tol, ops):
    x, w, b = (a.astype(dtype) for a in (rand(3, 9, 8, 4), rand(3, 3, 4, 5, seed=1),
                                         rand(5, seed=2)))
    out, cache = ops.conv2d_forward(x, w, b, stride, padding)
    dout = rand(*out.shape, seed=3).astype(dtype)
    dx, dw, db = ops.conv2d_backward(dout, cache)
    pads = ops.resolve_pads(9, 8, (3, 3), reference.pair(stride), padding)
    xt, wt = nchw(x).requires_grad_(), torch.tensor(w.transpose(3, 2, 0, 1)).requires_grad_()
    bt = torch.tensor(b, requires_grad=True)
    yt = F.conv2d(F.pad(xt, torch_pad(pads)), wt, bt, stride=stride)
    (yt * nchw(dout)).sum().backward()
    scale = lambda a: np.abs(a).max()  # noqa: E731
    for got, want in [(out, nhwc(yt)), (dx, nhwc(xt.grad)),
                      (dw, wt.grad.numpy().transpose(2, 3, 1, 0)), (db, bt.grad.numpy())]:
        assert got.dtype == dtype
        assert_close(got / scale(want), want / scale(want), rtol=0, atol=tol)


def test_keras_same_stride2_is_torch_pad_bottom_right(ops):
    x, w = rand(2, 28, 28, 3), rand(3, 3, 3, 4, seed=1)
    out, _ = ops.conv2d_forward(x, w, None, 2, "same")
    ref = F.conv2d(F.pad(nchw(x), (0, 1, 0, 1)), torch.tensor(w.transpose(3, 2, 0, 1)),
                   stride=2)
    assert out.shape == (2, 14, 14, 4)
    assert_close(out, nhwc(ref), rtol=1e-10, atol=1e-12)


# pooling -----------------------------------------------------------------------------------
POOLS = [(2, None, "valid"), (2, None, "same"), (3, 2, "valid"), (3, 2, "same"),
         ((2, 3), (1, 2), "same"), (3, 1, "same")]


@pytest.mark.parametrize("pool,stride,padding", POOLS)
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pool_gradcheck(kind, pool, stride, padding, ops):
    x = rand(2, 5, 6, 2)
    fwd = ops.maxpool_forward if kind == "max" else ops.avgpool_forward
    bwd = ops.maxpool_backward if kind == "max" else ops.avgpool_backward
    check_grads(lambda x: fwd(x, pool, stride, padding), bwd, [x])


def torch_pool(kind, x, pool, stride, padding):
    pool = reference.pair(pool)
    stride = pool if stride is None else reference.pair(stride)
    pads = torch_pad(reference.resolve_pads(x.shape[2], x.shape[3], pool, stride, padding))
    if kind == "max":
        return F.max_pool2d(F.pad(x, pads, value=-math.inf), pool, stride)
    ones = torch.ones_like(x[:1, :1])
    return F.avg_pool2d(F.pad(x, pads), pool, stride) / F.avg_pool2d(F.pad(ones, pads),
                                                                      pool, stride)


@pytest.mark.parametrize("pool,stride,padding", POOLS + [(3, 3, "valid")])
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("ties", [False, True])
def test_pool_matches_torch(kind, pool, stride, padding, ties, ops):
    x = rand(2, 8, 6, 3)  # pool 2 tiles it; the gradient checks use 5 x 6
    if ties:  # ReLU-like: many equal values in a window
        x = np.maximum(np.round(x), 0)
    fwd = ops.maxpool_forward if kind == "max" else ops.avgpool_forward
    bwd = ops.maxpool_backward if kind == "max" else ops.avgpool_backward
    out, cache = fwd(x, pool, stride, padding)
    dout = rand(*out.shape, seed=1)
    xt = nchw(x).requires_grad_()
    yt = torch_pool(kind, xt, pool, stride, padding)
    (yt * nchw(dout)).sum().backward()
    assert_close(out, nhwc(yt), rtol=1e-12, atol=1e-12)
    assert_close(bwd(dout, cache), nhwc(xt.grad), rtol=1e-12, atol=1e-12)


def test_maxpool_ties_go_to_first_max(ops):
    x = np.zeros((1, 4, 4, 1))
    out, cache = ops.maxpool_forward(x, 2)
    dx = ops.maxpool_backward(np.ones_like(out), cache)
    assert dx[0, :, :, 0].tolist() == [[1, 0, 1, 0], [0, 0, 0, 0]] * 2
    out, cache = ops.maxpool_forward(x[:, :3, :3], 2, 1)  # overlapping, general path
    dx = ops.maxpool_backward(np.ones_like(out), cache)
    assert dx[0, :, :, 0].tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 0]]


@pytest.mark.parametrize("kind", ["avg", "max"])
def test_global_pool(kind, ops):
    x = rand(3, 4, 5, 2)
    fwd = ops.global_avgpool_forward if kind == "avg" else ops.global_maxpool_forward
    bwd = ops.global_avgpool_backward if kind == "avg" else ops.global_maxpool_backward
    check_grads(fwd, bwd, [x])
    out, cache = fwd(x)
    xt = nchw(x).requires_grad_()
    yt = xt.mean((2, 3)) if kind == "avg" else xt.amax((2, 3))
    dout = rand(*out.shape, seed=1)
    (yt * torch.tensor(dout)).sum().backward()
    assert_close(out, yt.detach().numpy(), rtol=1e-12)
    assert_close(bwd(dout, cache), nhwc(xt.grad), rtol=1e-12)


# dense, flatten, dropout, batchnorm -----------------------------------------------------
def test_dense_gradcheck_and_torch(ops):
    x, w, b = rand(4, 5), rand(5, 3, seed=1), rand(3, seed=2)
    check_grads(ops.dense_forward, ops.dense_backward, [x, w, b])
    out, _ = ops.dense_forward(x, w, b)
    assert_close(out, F.linear(torch.tensor(x), torch.tensor(w.T), torch.tensor(b)).numpy(),
                 rtol=1e-12)


def test_flatten_is_channels_last(ops):
    x = rand(2, 3, 4, 5)
    out, shape = ops.flatten_forward(x)
    assert out.shape == (2, 60) and out[1, 5 * 4 + 2] == x[1, 1, 0, 2]
    assert np.array_equal(ops.flatten_backward(out, shape), x)


def test_dropout(ops):
    x = np.ones((200, 50), np.float32)
    y, mask = ops.dropout_forward(x, 0.25, False, np.random.default_rng(0))
    assert y is x and ops.dropout_backward(x, mask) is x
    y, mask = ops.dropout_forward(x, 0.25, True, np.random.default_rng(0))
    assert y.dtype == np.float32 and set(np.unique(y)) == {0, np.float32(1 / 0.75)}
    assert abs((y == 0).mean() - 0.25) < 0.02 and abs(y.mean() - 1) < 0.03
    assert np.array_equal(ops.dropout_backward(x, mask), y)


@pytest.mark.parametrize("shape", [(4, 3, 2, 3), (6, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_gradcheck(shape, training, ops):
    c = shape[-1]
    x, gamma, beta = rand(*shape) * 2 + 1, rand(c, seed=1), rand(c, seed=2)
    stats = lambda: (np.full(c, 0.3), np.full(c, 1.7))  # noqa: E731
    check_grads(lambda x, g, b: ops.batchnorm_forward(x, g, b, *stats(), 1e-3, 0.99, training),
                ops.batchnorm_backward, [x, gamma, beta])


@pytest.mark.parametrize("shape", [(5, 3, 4, 2), (6, 3)])
def test_batchnorm_matches_torch(shape, ops):
    c = shape[-1]
    x, gamma, beta = rand(*shape) * 2 + 1, rand(c, seed=1), rand(c, seed=2)
    mm, mv = rand(c, seed=3), np.abs(rand(c, seed=4)) + 0.5
    rm, rv = torch.tensor(mm), torch.tensor(mv)
    to_t = nchw if len(shape) == 4 else torch.tensor
    from_t = nhwc if len(shape) == 4 else (lambda t: t.detach().numpy())
    for training in (True, False, True):
        out, cache = ops.batchnorm_forward(x, gamma, beta, mm, mv, 1e-3, 0.9, training)
        dout = rand(*shape, seed=5)
        dx, dg, db = ops.batchnorm_backward(dout, cache)
        xt, gt, bt = to_t(x).requires_grad_(), torch.tensor(gamma, requires_grad=True), \
            torch.tensor(beta, requires_grad=True)
        yt = F.batch_norm(xt, rm, rv, gt, bt, training, momentum=0.1, eps=1e-3)
        (yt * to_t(dout)).sum().backward()
        for got, want in [(out, from_t(yt)), (dx, from_t(xt.grad)), (dg, gt.grad.numpy()),
                          (db, bt.grad.numpy()), (mm, rm.numpy()), (mv, rv.numpy())]:
            assert_close(got, want, rtol=1e-10, atol=1e-12)


# losses ---------------------------------------------------------------------------------
def test_softmax_cross_entropy():
    z, y = rand(5, 4) * 3, np.array([0, 3, 1, 1, 2])
    for ls in (0.0, 0.1):
        loss, dz = reference.softmax_cross_entropy(z, y, ls)
        zt = torch.tensor(z, requires_grad=True)
        lt = F.cross_entropy(zt, torch.tensor(y), label_smoothing=ls)
        lt.backward()
        assert abs(loss - lt.item()) < 1e-12
        assert_close(dz, zt.grad.numpy(), rtol=1e-10, atol=1e-14)
        num = numerical_grad(lambda: reference.softmax_cross_entropy(z, y, ls)[0], z)
        assert_close(dz, num)
    onehot = np.eye(4)[y]
    assert reference.softmax_cross_entropy(z, onehot)[0] == reference.softmax_cross_entropy(z, y)[0]
    loss, dz = reference.softmax_cross_entropy(np.array([[1e4, -1e4], [0, 5e3]]), np.array([1, 0]))
    assert np.isfinite(loss) and np.isfinite(dz).all() and loss == pytest.approx(1.25e4)


def test_binary_cross_entropy():
    z, y = rand(6, 1) * 3, np.array([0, 1, 1, 0, 1, 0])
    for ls in (0.0, 0.2):
        loss, dz = reference.sigmoid_binary_cross_entropy(z, y, ls)
        t = torch.tensor(y[:, None] * (1 - ls) + 0.5 * ls)
        zt = torch.tensor(z, requires_grad=True)
        lt = F.binary_cross_entropy_with_logits(zt, t)
        lt.backward()
        assert abs(loss - lt.item()) < 1e-12
        assert_close(dz, zt.grad.numpy(), rtol=1e-10, atol=1e-14)
        assert_close(dz, numerical_grad(lambda: reference.sigmoid_binary_cross_entropy(z, y, ls)[0], z))
    loss, dz = reference.sigmoid_binary_cross_entropy(np.array([[1e4], [-1e4]]), np.array([0, 1]))
    assert loss == pytest.approx(1e4) and np.isfinite(dz).all()


@pytest.mark.parametrize("output", ["softmax", "sigmoid", "sigmoid1"])
def test_mse_loss(output):
    k = 1 if output == "sigmoid1" else 4
    z, y = rand(5, k) * 2, np.array([0, 3, 1, 1, 2]) % max(k, 2)
    act = "softmax" if output == "softmax" else "sigmoid"
    loss, dz = reference.mse_loss(z, y, act)
    zt = torch.tensor(z, requires_grad=True)
    p = torch.softmax(zt, 1) if act == "softmax" else torch.sigmoid(zt)
    t = torch.tensor(y[:, None] * 1.0) if k == 1 else F.one_hot(torch.tensor(y), k).double()
    lt = F.mse_loss(p, t)
    lt.backward()
    assert abs(loss - lt.item()) < 1e-12
    assert_close(dz, zt.grad.numpy(), rtol=1e-10, atol=1e-14)
    assert_close(dz, numerical_grad(lambda: reference.mse_loss(z, y, act)[0], z))


def test_loss_on_logits_dispatch():
    z1, z3, y = rand(4, 1), rand(4, 3), np.array([0, 1, 1, 0])
    bce = reference.sigmoid_binary_cross_entropy(z1, y)[0]
    assert reference.loss_on_logits("sigmoid_bce", z1, y)[0] == bce
    assert reference.loss_on_logits("softmax_ce", z3, y)[0] == \
        reference.softmax_cross_entropy(z3, y)[0]
    assert reference.loss_on_logits("mse_probs", z3, y)[0] == reference.mse_loss(z3, y)[0]
    assert reference.loss_on_logits("mse_probs", z1, y)[0] == \
        reference.mse_loss(z1, y, "sigmoid")[0]
    with pytest.raises(ValueError, match="unknown loss kind"):
        reference.loss_on_logits("hinge", z3, y)


# dtype ----------------------------------------------------------------------------------
def test_float32_stays_float32(ops):
    f32 = np.float32
    x, w, b = rand(2, 6, 6, 3).astype(f32), rand(3, 3, 3, 4).astype(f32), rand(4).astype(f32)
    checks = []
    for name in ACTS:
        y, c = ops.activation_forward(x, name)
        checks += [y, ops.activation_backward(y, c)]
    if ops is fast:
        checks.append(fast.conv2d_fft(x, w, b, 2, "same"))
    for stride in (1, 2):
        y, c = ops.conv2d_forward(x, w, b, stride, "same")
        checks += [y, *ops.conv2d_backward(y, c)]
    for fwd, bwd in [(ops.maxpool_forward, ops.maxpool_backward),
                     (ops.avgpool_forward, ops.avgpool_backward)]:
        for args in [(2,), (3, 2, "same")]:
            y, c = fwd(x, *args)
            checks += [y, bwd(y, c)]
    for fwd, bwd in [(ops.global_avgpool_forward, ops.global_avgpool_backward),
                     (ops.global_maxpool_forward, ops.global_maxpool_backward)]:
        y, c = fwd(x)
        checks += [y, bwd(y, c)]
    g, bt = np.ones(3, f32), np.zeros(3, f32)
    for training in (True, False):
        y, c = ops.batchnorm_forward(x, g, bt, np.zeros(3, f32), np.ones(3, f32), 1e-3, 0.99,
                                     training)
        checks += [y, *ops.batchnorm_backward(y, c)]
    h, _ = ops.flatten_forward(x)
    y, c = ops.dense_forward(h, rand(108, 3).astype(f32), b[:3])
    checks += [y, *ops.dense_backward(y, c)]
    for kind in ("softmax_ce", "mse_probs"):
        checks.append(ops.loss_on_logits(kind, y, np.array([0, 2]))[1])
    checks.append(ops.loss_on_logits("sigmoid_bce", y[:, :1], [0, 1])[1])
    assert all(a.dtype == f32 for a in checks), [a.dtype for a in checks]


# reference.py and fast.py are the same math ----------------------------------------------
@pytest.mark.parametrize("name", ACTS)
def test_fast_activations_equal_reference(name):
    x, dout = rand(3, 4, 5, 6) * 4, rand(3, 4, 5, 6, seed=1)
    y, cache = fast.activation_forward(x, name)
    y_ref, cache_ref = reference.activation_forward(x, name)
    assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    assert_close(fast.activation_backward(dout, cache),
                 reference.activation_backward(dout, cache_ref), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pool,stride,padding", POOLS + [(3, 3, "valid"), (2, 1, "valid")])
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_fast_pools_equal_reference(kind, pool, stride, padding):
    x = np.maximum(np.round(rand(3, 7, 8, 4) * 2), 0)  # with ties
    outs = []
    for m in (fast, reference):
        fwd, bwd = (m.maxpool_forward, m.maxpool_backward) if kind == "max" else \
            (m.avgpool_forward, m.avgpool_backward)
        out, cache = fwd(x, pool, stride, padding)
        outs.append((out, bwd(rand(*out.shape, seed=1), cache)))
    for got, want in zip(*outs):
        assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (7, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_fast_batchnorm_and_dense_equal_reference(shape, training):
    c = shape[-1]
    x, gamma, beta, dout = rand(*shape) * 3 + 1, rand(c, seed=1), rand(c, seed=2), \
        rand(*shape, seed=3)
    results = []
    for m in (fast, reference):
        mm, mv = np.full(c, 0.2), np.full(c, 1.5)
        out, cache = m.batchnorm_forward(x, gamma, beta, mm, mv, 1e-3, 0.9, training)
        flat = out.reshape(shape[0], -1)
        z, dcache = m.dense_forward(flat, rand(flat.shape[1], 3, seed=4), rand(3, seed=5))
        results.append([out, *m.batchnorm_backward(dout, cache), mm, mv, z,
                        *m.dense_backward(rand(*z.shape, seed=6), dcache)])
    for got, want in zip(*results):
        assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_engine_ops_are_the_fast_ones():
    """The module the engine and the backend import runs fast.py, losses included."""
    assert engine_ops.conv2d_forward is fast.conv2d_forward
    assert engine_ops.gelu is fast.gelu and engine_ops.erfc is fast.erfc
    z, y = rand(4, 3), np.array([0, 2, 1, 1])
    assert engine_ops.loss_on_logits("softmax_ce", z, y)[0] == \
        reference.softmax_cross_entropy(z, y)[0]
