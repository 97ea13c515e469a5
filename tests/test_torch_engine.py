"""The PyTorch engine against hand calculations, explicit reference code and the NumPy
engine; its layer registry; its fixes; calls from many threads."""
import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cnnlab import layers as L
from cnnlab import zoo
from cnnlab.engines.numpy.engine import NumpyEngine
from cnnlab.engines.torch.engine import (MODULES, TorchEngine, TorchNet, export_grads,
                                        export_weights, load_weights, to_nchw)
from cnnlab.layers import (AvgPool2D, BatchNorm, Conv2D, Dense, Flatten,
                           GlobalAvgPool2D, GlobalMaxPool2D, Input, MaxPool2D)
from cnnlab import Sequential

torch.set_num_threads(1)


def run(layers, x, weights=None):
    m = Sequential(layers)
    if weights:
        m.set_weights({**m.weights, **weights})
    return TorchEngine(m, device="cpu").forward(np.asarray(x, np.float32))


def test_vertical_edge_filter_on_6x6_gives_the_4x4_result():
    img = np.zeros((1, 6, 6, 1), np.float32)
    img[:, :, :3] = 10                      # bright left half, dark right half
    kernel = np.array([[1, 0, -1]] * 3, np.float32)[:, :, None, None]
    out = run([Input((6, 6, 1)), Conv2D(1, 3, use_bias=False)], img, {"conv2d.kernel": kernel})
    assert out.shape == (1, 4, 4, 1)
    np.testing.assert_array_equal(out[0, :, :, 0], [[0, 30, 30, 0]] * 4)


def test_same_stride2_equals_explicitly_padded_convolution():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 28, 28, 3)).astype(np.float32)
    k = rng.normal(size=(3, 3, 3, 5)).astype(np.float32)
    b = rng.normal(size=5).astype(np.float32)
    out = run([Input((28, 28, 3)), Conv2D(5, 3, strides=2, padding="same")], x,
              {"conv2d.kernel": k, "conv2d.bias": b})
    xt = F.pad(torch.from_numpy(x).permute(0, 3, 1, 2), (0, 1, 0, 1))  # Keras: extra px bottom/right
    ref = F.conv2d(xt, torch.from_numpy(k).permute(3, 2, 0, 1), torch.from_numpy(b), stride=2)
    np.testing.assert_allclose(out, ref.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)
    assert out.shape == (2, 14, 14, 5)


def test_full_padding_is_true_full_correlation():
    x = np.zeros((1, 3, 3, 1), np.float32)
    x[0, 1, 1, 0] = 1                        # an impulse
    k = np.arange(9, dtype=np.float32).reshape(3, 3, 1, 1)
    out = run([Input((3, 3, 1)), Conv2D(1, 3, padding="full", use_bias=False)], x,
              {"conv2d.kernel": k})
    assert out.shape == (1, 5, 5, 1)
    # correlation with an impulse gives the flipped kernel, centred
    np.testing.assert_array_equal(out[0, 1:4, 1:4, 0], k[::-1, ::-1, 0, 0])


def test_pools_by_hand():
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    np.testing.assert_array_equal(run([Input((4, 4, 1)), MaxPool2D()], x)[0, :, :, 0],
                                  [[5, 7], [13, 15]])
    np.testing.assert_array_equal(run([Input((4, 4, 1)), AvgPool2D()], x)[0, :, :, 0],
                                  [[2.5, 4.5], [10.5, 12.5]])
    # 'same' on 3x3 with pool 2: padded cells are not counted
    x3 = np.arange(9, dtype=np.float32).reshape(1, 3, 3, 1)
    out = run([Input((3, 3, 1)), AvgPool2D(2, padding="same")], x3)[0, :, :, 0]
    np.testing.assert_allclose(out, [[(0 + 1 + 3 + 4) / 4, (2 + 5) / 2], [(6 + 7) / 2, 8]])
    out = run([Input((3, 3, 1)), MaxPool2D(2, padding="same")], -x3)[0, :, :, 0]
    np.testing.assert_array_equal(out, [[0, -2], [-6, -8]])   # -inf padding never wins
    assert run([Input((4, 4, 1)), GlobalAvgPool2D()], x).tolist() == [[7.5]]
    assert run([Input((4, 4, 1)), GlobalMaxPool2D()], x).tolist() == [[15]]


def test_flatten_uses_keras_channels_last_order():
    x = np.arange(2 * 2 * 3, dtype=np.float32).reshape(1, 2, 2, 3)
    k = np.eye(12, dtype=np.float32)
    out = run([Input((2, 2, 3)), Flatten(), Dense(12, use_bias=False)], x, {"dense.kernel": k})
    np.testing.assert_array_equal(out[0], x.reshape(-1))


def test_dense_and_activations_by_hand():
    x = np.array([[-2.0, -0.5, 0.0, 1.5]], np.float32)
    ident = {"dense.kernel": np.eye(4, dtype=np.float32), "dense.bias": np.zeros(4, np.float32)}
    def act(name):
        return run([Input((4,)), Dense(4, activation=name), Dense(4)], x,
                   {**ident, "dense_1.kernel": np.eye(4, dtype=np.float32)})[0]
    np.testing.assert_allclose(act("relu"), [0, 0, 0, 1.5])
    np.testing.assert_allclose(act("leaky_relu"), [-0.4, -0.1, 0, 1.5], rtol=1e-6)
    np.testing.assert_allclose(act("elu"), np.where(x[0] > 0, x[0], np.expm1(x[0])), rtol=1e-6)
    np.testing.assert_allclose(act("sigmoid"), 1 / (1 + np.exp(-x[0])), rtol=1e-6)
    np.testing.assert_allclose(act("softplus"), np.log1p(np.exp(x[0])), rtol=1e-6)
    np.testing.assert_allclose(act("tanh"), np.tanh(x[0]), rtol=1e-6)
    np.testing.assert_allclose(act("gelu"), [v * 0.5 * (1 + math.erf(v / math.sqrt(2)))
                                             for v in x[0]], rtol=1e-5, atol=1e-6)
    sm = act("softmax")
    np.testing.assert_allclose(sm, np.exp(x[0]) / np.exp(x[0]).sum(), rtol=1e-6)


def test_final_softmax_is_left_to_predict_proba():
    m = zoo.build("lenet")
    eng = TorchEngine(m, device="cpu")
    x = np.random.default_rng(0).random((3, 28, 28, 1), np.float32)
    logits = eng.forward(x)
    probs = eng.predict_proba(x)
    np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(logits), 1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-6)
    acts = eng.activations(x)
    assert [n for n, _ in acts] == [l.name for l in m.layers]
    np.testing.assert_allclose(acts[-1][1], probs, rtol=1e-5)
    assert acts[0][1].shape == (3, 28, 28, 6)


def test_batchnorm_inference_and_keras_momentum():
    m = Sequential([Input((2, 2, 2)), BatchNorm(momentum=0.9, epsilon=1e-3)])
    m.set_weights({"batch_normalization.gamma": np.array([2, 1], np.float32),
                   "batch_normalization.beta": np.array([0, 1], np.float32),
                   "batch_normalization.moving_mean": np.array([1, 0], np.float32),
                   "batch_normalization.moving_variance": np.array([4, 1], np.float32)})
    x = np.ones((1, 2, 2, 2), np.float32) * np.array([3, 2], np.float32)
    out = TorchEngine(m, device="cpu").forward(x)
    np.testing.assert_allclose(out[0, 0, 0], [2 * (3 - 1) / np.sqrt(4.001),
                                              (2 - 0) / np.sqrt(1.001) + 1], rtol=1e-6)
    # one training-mode pass: moving = 0.9 * moving + 0.1 * batch statistic
    net = TorchNet(m)
    load_weights(net, m)
    xb = torch.from_numpy(np.random.default_rng(1).normal(size=(4, 2, 2, 2)).astype(np.float32))
    net.train()
    net(xb.permute(0, 3, 1, 2))
    w = export_weights(net)
    mean = xb.numpy().reshape(-1, 2).mean(0)
    var_unbiased = xb.numpy().reshape(-1, 2).var(0, ddof=1)
    np.testing.assert_allclose(w["batch_normalization.moving_mean"],
                               0.9 * np.array([1, 0]) + 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(w["batch_normalization.moving_variance"],
                               0.9 * np.array([4, 1]) + 0.1 * var_unbiased, rtol=1e-5)


def test_weights_round_trip_through_torch_layout():
    m = zoo.build("cifar-bn")
    m.init_weights(3)
    net = TorchNet(m)
    load_weights(net, m)
    back = export_weights(net)
    assert set(back) == set(m.weights)
    for k in back:
        np.testing.assert_array_equal(back[k], m.weights[k])


def test_vjp_gives_input_gradients_like_autograd():
    m = Sequential([Input((6, 6, 1)), Conv2D(2, 3, activation="relu"), Flatten(),
                    Dense(3, activation="softmax")])
    m.init_weights(5)
    eng = TorchEngine(m, device="cpu")
    x = np.random.default_rng(2).random((2, 6, 6, 1)).astype(np.float32)
    seed = np.zeros((2, 3), np.float32)
    seed[:, 1] = 1
    out, grad = eng.vjp(x, -1, seed, pre_activation=True)
    # finite differences on the class-1 logit
    eps, i = 1e-2, (0, 2, 3, 0)
    xp, xm = x.copy(), x.copy()
    xp[i] += eps
    xm[i] -= eps
    num = (eng.forward(xp)[0, 1] - eng.forward(xm)[0, 1]) / (2 * eps)
    assert grad.shape == x.shape
    assert abs(grad[i] - num) < 1e-3
    np.testing.assert_allclose(out, eng.forward(x), rtol=1e-5)


# Layer registry, parity fixes and thread safety --------------------------------------


def test_every_layer_kind_has_one_module():
    assert set(MODULES) == set(L.LAYER_TYPES) - {"Input"}
    m = Sequential([Input((5, 5, 3)), Conv2D(2, 3), BatchNorm(), MaxPool2D(), AvgPool2D(1),
                    L.Activation("relu"), L.Dropout(0.5), GlobalMaxPool2D(), Dense(2),
                    L.Dropout(0.1), Flatten(), Dense(3, activation="softmax")])
    net = TorchNet(m)
    assert isinstance(net, torch.nn.Sequential)
    assert [type(mod) for mod in net] == [MODULES[layer.type] for layer in m.layers]
    m2 = Sequential([Input((4, 4, 1)), GlobalAvgPool2D(), Dense(2, activation="sigmoid")])
    assert [type(mod).__name__ for mod in TorchNet(m2)] == ["GlobalAvgPool2D", "Dense"]


def _torch_loss_and_grads(model, x, y):
    """Cross-entropy on the logits of a float32 channels_last network (as the engine and
    training on CPU run it): (loss, grads in Keras layout, input gradient NHWC)."""
    net = TorchNet(model).to(memory_format=torch.channels_last)
    load_weights(net, model)
    net.train()
    xt = to_nchw(x, "cpu").requires_grad_()
    loss = F.cross_entropy(net(xt), torch.from_numpy(y))
    loss.backward()
    return loss.item(), export_grads(net), xt.grad.permute(0, 2, 3, 1).numpy()


# Width stride 2-3 to an output width of 1 from one input channel: PyTorch 2.13's CPU
# convolution gives garbage there for channels-last strides.
BUG3_CASES = [((6, 1, 1), dict(kernel_size=3, strides=(1, 2), padding="same")),
              ((6, 1, 1), dict(kernel_size=3, strides=(1, 3), padding="full")),
              ((5, 2, 1), dict(kernel_size=3, strides=(1, 3), padding=1)),
              ((4, 4, 1), dict(kernel_size=3, strides=(1, 2), padding="valid")),
              ((4, 2, 1), dict(kernel_size=(2, 3), strides=(1, 2), padding=1)),
              ((5, 1, 1), dict(kernel_size=3, strides=(1, 3), padding=2))]


@pytest.mark.parametrize("shape,conv", BUG3_CASES)
def test_one_channel_conv_strided_to_width_one_matches_numpy(shape, conv):
    m = Sequential([Input(shape), Conv2D(4, **conv, activation="tanh"), Flatten(),
                    Dense(2, activation="softmax")])
    assert m.layer_shapes[0][1][1] == 1
    m.init_weights(3)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, *shape)).astype(np.float32)
    y = np.array([0, 1, 1])
    ne, te = NumpyEngine(m, dtype=np.float64), TorchEngine(m, device="cpu")
    tol = dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(te.forward(x), ne.forward(x), **tol)
    acts_t, acts_n = te.activations(x), ne.activations(x)
    np.testing.assert_allclose(acts_t[0][1], acts_n[0][1], **tol)
    seed = rng.normal(size=(3, 2))
    np.testing.assert_allclose(te.vjp(x, -1, seed, pre_activation=True)[1],
                               ne.vjp(x, -1, seed, pre_activation=True)[1], **tol)
    loss, grads, dx = _torch_loss_and_grads(m, x, y)
    loss_n, _, grads_n = ne.loss_and_grads(x, y)
    assert loss == pytest.approx(loss_n, rel=1e-5)
    for k in grads_n:
        np.testing.assert_allclose(grads[k], grads_n[k], **tol, err_msg=k)


def test_one_channel_strided_conv_trains_like_numpy():
    """The issue's symptom: plain SGD gave loss NaN with torch, 0.756 with NumPy."""
    m = Sequential([Input((6, 1, 1)), Conv2D(4, 3, strides=(1, 2), padding="same",
                                             activation="relu"), Flatten(),
                    Dense(2, activation="softmax")])
    m.init_weights(0)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 6, 1, 1)).astype(np.float32)
    y = (x[:, :3].sum(axis=(1, 2, 3)) > 0).astype(np.int64)
    m_np = m.copy()
    ne = NumpyEngine(m_np)
    net = TorchNet(m).to(memory_format=torch.channels_last)
    load_weights(net, m)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    xt, yt = to_nchw(x, "cpu"), torch.from_numpy(y)
    for _ in range(10):
        loss = F.cross_entropy(net(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_n, _, grads = ne.loss_and_grads(x, y)
        m_np.set_weights({k: v - 0.5 * grads.get(k, 0) for k, v in m_np.weights.items()})
        assert np.isfinite(loss.item())
        assert loss.item() == pytest.approx(loss_n, rel=1e-4)


def test_layers_after_the_final_softmax_see_probabilities():
    m = Sequential([Input((4, 4, 2)), Conv2D(3, 3, activation="relu"), Flatten(),
                    Dense(3, activation="softmax"), Flatten(), L.Dropout(0.5)])
    m.init_weights(2)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 4, 4, 2)).astype(np.float32)
    te, ne = TorchEngine(m, device="cpu"), NumpyEngine(m)
    probs = te.predict_proba(x)
    acts = te.activations(x)
    for (name, a), (_, b) in zip(acts, ne.activations(x), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
    for i in (2, 3, 4):
        np.testing.assert_allclose(acts[i][1], probs, rtol=1e-6)
    seed = rng.normal(size=(2, 3)).astype(np.float32)
    for out_layer, wrt in [(-1, None), (-1, 3), (4, 1), (2, None)]:
        out_t, g_t = te.vjp(x, out_layer, seed, wrt_layer=wrt)
        out_n, g_n = ne.vjp(x, out_layer, seed, wrt_layer=wrt)
        np.testing.assert_allclose(out_t, out_n, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g_t, g_n, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(te.vjp(x, -1, seed)[0], probs, rtol=1e-6)
    # the logits: the final layer itself before its activation
    np.testing.assert_allclose(te.vjp(x, 2, seed, pre_activation=True)[0], te.forward(x),
                               rtol=1e-6)
    np.testing.assert_allclose(te.layer_output(x, 2, pre_activation=True), te.forward(x),
                               rtol=1e-6)
    # one sigmoid unit, then Flatten: the sigmoid, not the logit
    m1 = Sequential([Input((3, 3, 1)), Flatten(), Dense(1, activation="sigmoid"), Flatten()])
    m1.init_weights(4)
    x1 = rng.normal(size=(4, 3, 3, 1)).astype(np.float32)
    e1 = TorchEngine(m1, device="cpu")
    np.testing.assert_allclose(e1.activations(x1)[-1][1], e1.predict_proba(x1)[:, 1:],
                               rtol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1, 3), (3,)])
def test_batchnorm_batch_of_one_gives_beta_and_updates_like_numpy(shape):
    """One value per channel: var = 0, y = beta; moving_mean moves towards x and
    moving_var shrinks by momentum (the unbiased variance of one value is taken as 0,
    as NumPy does); dx = 0, dgamma = 0, dbeta = dout."""
    m = Sequential([Input(shape), BatchNorm(momentum=0.8)])
    w = {"batch_normalization.gamma": np.array([2.0, -1.0, 0.5], np.float32),
         "batch_normalization.beta": np.array([0.1, 0.2, -0.3], np.float32),
         "batch_normalization.moving_mean": np.array([1.0, 0.0, -1.0], np.float32),
         "batch_normalization.moving_variance": np.array([4.0, 1.0, 2.0], np.float32)}
    m.set_weights(w)
    x = np.array([3.0, -2.0, 0.5], np.float32).reshape(1, *shape)
    net = TorchNet(m)
    load_weights(net, m)
    net.train()
    xt = torch.from_numpy(x).reshape(1, 3, 1, 1) if len(shape) == 3 else torch.from_numpy(x)
    xt.requires_grad_()
    out = net(xt)
    np.testing.assert_array_equal(out.detach().numpy().reshape(-1), w["batch_normalization.beta"])
    dout = torch.tensor([1.0, 2.0, 3.0]).reshape(out.shape)
    out.backward(dout)
    np.testing.assert_array_equal(xt.grad.numpy(), 0)
    grads = export_grads(net)
    np.testing.assert_array_equal(grads["batch_normalization.gamma"], 0)
    np.testing.assert_array_equal(grads["batch_normalization.beta"], [1, 2, 3])
    after = export_weights(net)
    np.testing.assert_allclose(after["batch_normalization.moving_mean"],
                               0.8 * w["batch_normalization.moving_mean"] + 0.2 * x.reshape(-1),
                               rtol=1e-6)
    np.testing.assert_allclose(after["batch_normalization.moving_variance"],
                               0.8 * w["batch_normalization.moving_variance"], rtol=1e-6)
    ne = NumpyEngine(m, dtype=np.float64)  # the same step in NumPy (updates m.weights)
    ne.forward(x, training=True)
    for k in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(after[f"batch_normalization.{k}"],
                                   m.weights[f"batch_normalization.{k}"], rtol=1e-6)


def test_global_max_pool_gradient_goes_to_the_first_maximum():
    m = Sequential([Input((2, 2, 1)), GlobalMaxPool2D()])
    x = np.array([[[[1.0], [3.0]], [[3.0], [0.0]]]], np.float32)
    _, g = TorchEngine(m, device="cpu").vjp(x, 0, np.ones((1, 1), np.float32))
    np.testing.assert_array_equal(g[0, :, :, 0], [[0, 1], [0, 0]])
    np.testing.assert_array_equal(g, NumpyEngine(m).vjp(x, 0, np.ones((1, 1)))[1])


def _inspect_model():
    m = Sequential([Input((8, 8, 3)), Conv2D(4, 3, padding="same", activation="relu"),
                    BatchNorm(), MaxPool2D(), Conv2D(5, 3, activation="elu"), Flatten(),
                    Dense(4, activation="softmax"), L.Dropout(0.3)])
    m.init_weights(7)
    return m


def test_layer_output_equals_activations_without_a_backward_pass():
    m = _inspect_model()
    x = np.random.default_rng(5).normal(size=(3, 8, 8, 3)).astype(np.float32)
    eng = TorchEngine(m, device="cpu")
    acts = eng.activations(x)
    for i in range(len(m.layers)):
        np.testing.assert_array_equal(eng.layer_output(x, i), acts[i][1])
    pre = eng.layer_output(x, 0, pre_activation=True)
    np.testing.assert_allclose(np.maximum(pre, 0), acts[0][1], rtol=1e-6)
    assert (pre < 0).any()
    np.testing.assert_allclose(eng.layer_output(x, -2, pre_activation=True), eng.forward(x),
                               rtol=1e-6)
    with pytest.raises(IndexError, match="layer 7 out of range: the model has 7 layers"):
        eng.layer_output(x, 7)
    with pytest.raises(ValueError, match="wrt_layer 5 comes after out_layer 2"):
        eng.vjp(x, 2, np.zeros((3, 4, 4, 4)), wrt_layer=5)
    # the engine keeps no gradient state
    assert all(p.grad is None for p in eng.net.parameters())
    eng.vjp(x, -1, np.ones((3, 4), np.float32))
    assert all(p.grad is None for p in eng.net.parameters())


def test_engine_calls_from_many_threads_equal_single_threaded_ones():
    m = _inspect_model()
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    eng = TorchEngine(m, device="cpu")
    calls = []
    for out_layer in range(len(m.layers)):
        seed = rng.normal(size=(2, *m.layer_shapes[out_layer][1])).astype(np.float32)
        for pre in (False, True):
            calls.append(lambda o=out_layer, s=seed, p=pre: eng.vjp(x, o, s, pre_activation=p))
            calls.append(lambda o=out_layer, s=seed, p=pre: eng.vjp(x, o, s, wrt_layer=o // 2,
                                                                   pre_activation=p))
            calls.append(lambda o=out_layer, p=pre: eng.layer_output(x, o, pre_activation=p))
    calls.append(lambda: eng.predict_proba(x))
    calls.append(lambda: [a for _, a in eng.activations(x)])

    def arrays(result):
        return [result] if isinstance(result, np.ndarray) else list(result)

    expected = [arrays(c()) for c in calls]
    failures = []

    def worker(k):
        order = np.random.default_rng(k).permutation(len(calls))
        for _ in range(3):
            for j in order:
                try:
                    got = arrays(calls[j]())
                except Exception as e:  # noqa: BLE001 (reported by the assert below)
                    failures.append((k, j, repr(e)))
                    continue
                if len(got) != len(expected[j]) or not all(
                        np.array_equal(a, b) for a, b in zip(got, expected[j])):
                    failures.append((k, j))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_training_mode_forward_in_one_thread_leaves_inference_in_others_alone():
    m = Sequential([Input((4, 4, 1)), Flatten(), Dense(8, activation="relu"), L.Dropout(0.5),
                    Dense(3, activation="softmax")])
    m.init_weights(8)
    x = np.random.default_rng(9).normal(size=(5, 4, 4, 1)).astype(np.float32)
    eng = TorchEngine(m, device="cpu")
    expected = eng.predict_proba(x)
    stop, seen = threading.Event(), []
    torch.manual_seed(0)

    def train():
        while True:
            seen.append(eng.forward(x, training=True))
            if stop.is_set():
                break

    t = threading.Thread(target=train)
    t.start()
    try:
        for _ in range(200):
            np.testing.assert_array_equal(eng.predict_proba(x), expected)
    finally:
        stop.set()
        t.join()
    assert not np.allclose(seen[0], eng.forward(x))  # dropout was on in that thread


def test_a_slice_of_the_network_runs_its_first_layers():
    m = _inspect_model()
    x = np.random.default_rng(4).normal(size=(2, 8, 8, 3)).astype(np.float32)
    eng = TorchEngine(m, device="cpu")
    with torch.no_grad():
        head = eng.net[:3](to_nchw(x, "cpu"))
    np.testing.assert_allclose(head.permute(0, 2, 3, 1).numpy(), eng.layer_output(x, 2),
                               rtol=1e-6)
    assert isinstance(eng.net[0], MODULES["Conv2D"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_in_training_keeps_a_fraction_scales_and_backpropagates_through_its_mask(dtype):
    from cnnlab.engines.torch.engine import Dropout as DropoutModule, _call
    rate = 0.3
    mod = DropoutModule(L.Dropout(rate), (8, 8, 16), (8, 8, 16))
    torch.manual_seed(0)
    x = (torch.rand(64, 16, 8, 8) + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    with _call(training=True):
        y = mod(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - rate)) < 0.01   # 65,536 draws: sd 0.002
    torch.testing.assert_close(y[kept], x.detach()[kept] / (1 - rate), rtol=1e-2, atol=0)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.to(dtype) / (1 - rate), rtol=1e-2, atol=0)
    with _call(training=False):   # inference: the identity
        assert mod(x) is x
    torch.manual_seed(0)   # the mask comes from torch's generator: a seed repeats it
    torch.rand(64, 16, 8, 8)
    state = torch.get_rng_state()
    with _call(training=True):
        again = mod(x.detach())
        torch.set_rng_state(state)
        once_more = mod(x.detach())
    assert torch.equal(again != 0, kept) and torch.equal(once_more != 0, kept)
    zero = DropoutModule(L.Dropout(0.0), (8, 8, 16), (8, 8, 16))
    with _call(training=True):
        assert zero(x) is x
