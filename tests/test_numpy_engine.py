"""NumpyEngine: training gradients and vjp against a PyTorch autograd reference."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cnnlab.engines.numpy import reference
from cnnlab.engines.numpy.engine import NumpyEngine, layer_registry
from cnnlab.layers import (Activation, AvgPool2D, BatchNorm, Conv2D, Dense, Dropout, Flatten,
                           GlobalAvgPool2D, GlobalMaxPool2D, Input, MaxPool2D)
from cnnlab import Sequential

RATE = 0.5


def small_model():
    model = Sequential([Input((8, 8, 2)),
                        Conv2D(4, 3, strides=2, padding="same", activation="relu"),
                        BatchNorm(momentum=0.9),
                        MaxPool2D(),
                        Dropout(RATE),
                        Flatten(),
                        Dense(3, activation="softmax")])
    rng = np.random.default_rng(1)  # non-trivial BatchNorm parameters and statistics
    for key in ("gamma", "beta", "moving_mean", "moving_variance"):
        shape = model.weights[f"batch_normalization.{key}"].shape
        model.weights[f"batch_normalization.{key}"] = (rng.uniform(0.5, 1.5, shape) if key in (
            "gamma", "moving_variance") else rng.normal(0, 0.2, shape)).astype(np.float32)
    model.weights["dense.bias"] = rng.normal(0, 0.1, 3).astype(np.float32)
    return model


def images(n=5, shape=(8, 8, 2), seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, *shape))


def torch_reference(model, x, mask=None, training=False, upto=None, pre_activation=True):
    """The small model written with torch.nn.functional, NCHW, from model.weights.
    Returns (output, input tensor, params {name: tensor in Keras layout}, bn stats)."""
    w = {k: torch.tensor(v.astype(np.float64), requires_grad=True)
         for k, v in model.weights.items()}
    xt = torch.tensor(x).permute(0, 3, 1, 2).requires_grad_()
    rm, rv = w["batch_normalization.moving_mean"].detach().clone(), \
        w["batch_normalization.moving_variance"].detach().clone()
    h = F.conv2d(F.pad(xt, (0, 1, 0, 1)), w["conv2d.kernel"].permute(3, 2, 0, 1),
                 w["conv2d.bias"], stride=2)
    h = F.relu(h)
    outs = [h]
    h = F.batch_norm(h, rm, rv, w["batch_normalization.gamma"], w["batch_normalization.beta"],
                     training, momentum=0.1, eps=1e-3)
    outs.append(h)
    h = F.max_pool2d(h, 2)
    if training:
        h = h * torch.tensor(mask).permute(0, 3, 1, 2)
    outs += [h, h]
    h = h.permute(0, 2, 3, 1).flatten(1)
    outs.append(h)
    h = h @ w["dense.kernel"] + w["dense.bias"]
    if not pre_activation:
        h = torch.softmax(h, 1)
    outs.append(h)
    return outs, xt, w, (rm, rv)


def test_loss_and_grads_match_torch():
    model = small_model()
    x, y = images(), np.array([0, 2, 1, 1, 0])
    before = {k: v.copy() for k, v in model.weights.items()}
    engine = NumpyEngine(model, dtype=np.float64, seed=7)
    loss, logits, grads = engine.loss_and_grads(x, y, label_smoothing=0.1)
    mask = (np.random.default_rng(7).random((5, 2, 2, 4)) >= RATE) / (1 - RATE)

    ref_model = Sequential.from_config(model.get_config())
    ref_model.weights = before
    outs, xt, w, (rm, rv) = torch_reference(ref_model, x, mask, training=True)
    lt = F.cross_entropy(outs[-1], torch.tensor(y), label_smoothing=0.1)
    lt.backward()
    assert loss == pytest.approx(lt.item(), rel=1e-10)
    np.testing.assert_allclose(logits, outs[-1].detach().numpy(), rtol=1e-10, atol=1e-12)
    assert set(grads) == set(model.trainable_names())
    for k, g in grads.items():
        assert g.shape == model.weights[k].shape
        np.testing.assert_allclose(g, w[k].grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=k)
    # moving statistics updated in place (stored as float32)
    np.testing.assert_allclose(model.weights["batch_normalization.moving_mean"], rm.numpy(),
                               rtol=1e-6)
    np.testing.assert_allclose(model.weights["batch_normalization.moving_variance"],
                               rv.numpy(), rtol=1e-6)


@pytest.mark.parametrize("out_layer,wrt_layer,pre_activation", [
    (-1, None, True), (-1, None, False), (5, 1, True), (1, None, False), (3, 0, False),
    (2, 2, False)])
def test_vjp_matches_torch(out_layer, wrt_layer, pre_activation):
    model = small_model()
    x = images(2)
    engine = NumpyEngine(model, dtype=np.float64)
    outs, xt, _, _ = torch_reference(model, x, pre_activation=pre_activation)
    target = outs[out_layer]
    seed = np.random.default_rng(3).standard_normal(target.shape)
    if wrt_layer is not None:
        outs[wrt_layer].retain_grad()
    (target * torch.tensor(seed)).sum().backward()
    as_nhwc = lambda t: (t.permute(0, 2, 3, 1) if t.dim() == 4 else t).detach().numpy()  # noqa
    seed_nhwc = as_nhwc(torch.tensor(seed))
    out, grad = engine.vjp(x, out_layer, seed_nhwc, wrt_layer, pre_activation)
    np.testing.assert_allclose(out, as_nhwc(target), rtol=1e-10, atol=1e-12)
    want = as_nhwc(xt.grad if wrt_layer is None else outs[wrt_layer].grad)
    np.testing.assert_allclose(grad, want, rtol=1e-9, atol=1e-12)


def test_inference_outputs():
    model = small_model()
    x = images(3)
    engine = NumpyEngine(model)
    logits = engine.forward(x)
    outs, _, _, _ = torch_reference(model, x)
    np.testing.assert_allclose(logits, outs[-1].detach().numpy(), rtol=1e-4, atol=1e-5)
    p = engine.predict_proba(x, batch_size=2)
    assert p.shape == (3, 3) and p.dtype == np.float32
    np.testing.assert_allclose(p, torch.softmax(outs[-1], 1).detach().numpy(), atol=1e-6)
    acts = engine.activations(x)
    assert [name for name, _ in acts] == [layer.name for layer in model.layers]
    assert [a.shape[1:] for _, a in acts] == [s[1] for s in model.layer_shapes]
    np.testing.assert_allclose(acts[-1][1], p, atol=1e-6)
    assert engine.predict_proba(x[:0]).shape == (0, 3)


def other_model(binary=True):
    """The remaining layer types, ending in one sigmoid unit."""
    return Sequential([Input((7, 6, 2)),
                       Conv2D(3, (3, 2), padding="full", activation="elu"),
                       AvgPool2D(3, strides=2, padding="same"),
                       Activation("gelu"),
                       Conv2D(4, 2, strides=(1, 2), padding=1, activation="leaky_relu",
                              use_bias=False),
                       BatchNorm(),
                       GlobalMaxPool2D() if binary else GlobalAvgPool2D(),
                       Dense(5, activation="tanh"),
                       Dense(1 if binary else 3, activation="sigmoid" if binary else None)])


@pytest.mark.parametrize("binary,loss", [(True, "binary_crossentropy"), (False, "mse"),
                                         (False, "categorical_crossentropy")])
def test_loss_and_grads_numerically(binary, loss):
    model = other_model(binary)
    x, y = images(4, (7, 6, 2)), np.array([0, 1, 1, 2 if not binary else 0])
    engine = NumpyEngine(model, dtype=np.float64)
    value, _, grads = engine.loss_and_grads(x, y, loss)
    for key in ("conv2d.kernel", "conv2d_1.kernel", "batch_normalization.gamma",
                "dense_1.kernel"):
        w = model.weights[key] = model.weights[key].astype(np.float64)  # exact perturbations
        for idx in list(np.ndindex(w.shape))[:6]:
            old = w[idx]
            w[idx] = old + 1e-6
            lp = engine.loss_and_grads(x, y, loss)[0]
            w[idx] = old - 1e-6
            lm = engine.loss_and_grads(x, y, loss)[0]
            w[idx] = old
            assert grads[key][idx] == pytest.approx((lp - lm) / 2e-6, rel=1e-5, abs=1e-9), key


def test_sigmoid_output_probabilities():
    model = other_model(True)
    engine = NumpyEngine(model)
    p = engine.predict_proba(images(3, (7, 6, 2)))
    assert p.shape == (3, 2)
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-6)
    z = engine.forward(images(3, (7, 6, 2)))
    np.testing.assert_allclose(p[:, 1], 1 / (1 + np.exp(-z[:, 0])), rtol=1e-5)


def test_float32_stays_float32():
    model = small_model()
    engine = NumpyEngine(model)
    x = images().astype(np.float32)
    loss, logits, grads = engine.loss_and_grads(x, np.array([0, 1, 2, 0, 1]))
    assert isinstance(loss, float) and logits.dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads.values())
    assert all(v.dtype == np.float32 for v in model.weights.values())
    out, grad = engine.vjp(x, -1, np.ones((5, 3), np.float32), pre_activation=True)
    assert out.dtype == grad.dtype == np.float32
    assert all(a.dtype == np.float32 for _, a in engine.activations(x))


def test_bad_inputs():
    engine = NumpyEngine(small_model())
    with pytest.raises(ValueError, match="does not fit"):
        engine.forward(np.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match="labels must be in 0..2"):
        engine.loss_and_grads(images(2), np.array([0, 3]))


class ReferenceEngine(NumpyEngine):
    """The same engine on reference.py's plain ops."""
    ops = reference
    layer_ops = layer_registry(reference)


@pytest.mark.parametrize("name", ["lenet", "lenet5", "litecnn", "cifar-basic", "cifar-bn"])
def test_zoo_models_fast_equals_reference(name):
    """Every layer of the zoo's models, training step and inference, gives the same numbers
    with fast.py (what the engine runs) and reference.py (float64)."""
    from cnnlab import zoo
    models = [zoo.build(name), zoo.build(name)]
    x = np.random.default_rng(0).uniform(0, 1, (3, *models[0].input_shape))
    y = np.array([0, 1, 2])
    results = []
    for model, cls in zip(models, (NumpyEngine, ReferenceEngine)):
        engine = cls(model, dtype=np.float64, seed=5)
        loss, logits, grads = engine.loss_and_grads(x, y)
        acts = engine.activations(x)
        results.append((loss, logits, grads, acts, dict(model.weights)))
    (loss, logits, grads, acts, weights), (loss_r, logits_r, grads_r, acts_r, weights_r) = results
    assert loss == pytest.approx(loss_r, rel=1e-10)
    np.testing.assert_allclose(logits, logits_r, rtol=1e-10, atol=1e-12)
    assert set(grads) == set(grads_r) == set(models[0].trainable_names())
    for k in grads:
        np.testing.assert_allclose(grads[k], grads_r[k], rtol=1e-8, atol=1e-12, err_msg=k)
    for (layer, a), (_, b) in zip(acts, acts_r):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=layer)
    for k in weights:  # BatchNorm's moving statistics, updated alike
        np.testing.assert_allclose(weights[k], weights_r[k], rtol=1e-10, err_msg=k)


def test_every_layer_type_has_an_op_pair():
    from cnnlab.layers import LAYER_TYPES
    assert set(NumpyEngine.layer_ops) == set(LAYER_TYPES) - {"Input"}
    engine = NumpyEngine(small_model())
    engine.layer_ops = {k: v for k, v in engine.layer_ops.items() if k != "Dense"}
    with pytest.raises(ValueError, match="cannot run a Dense layer"):
        engine.forward(images(1))
