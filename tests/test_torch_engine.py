"""The PyTorch engine against hand calculations and explicit reference code."""
import numpy as np
import torch
import torch.nn.functional as F

from cnnlab import zoo
from cnnlab.engines.torch.engine import TorchEngine, TorchNet, export_weights, load_weights
from cnnlab.layers import (AvgPool2D, BatchNorm, Conv2D, Dense, Flatten,
                           GlobalAvgPool2D, GlobalMaxPool2D, Input, MaxPool2D)
from cnnlab import Sequential


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
    import math
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
