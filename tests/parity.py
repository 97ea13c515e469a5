"""What both engines must agree on, checked one model at a time: outputs, every layer's
activation, input gradients, parameter gradients of the loss, parameter counts.
Random architectures over the whole vocabulary come from `models()`."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

from cnnlab import Sequential
from cnnlab import layers as L
from cnnlab.engines.numpy.engine import NumpyEngine
from cnnlab.engines.torch.backend import loss_fn
from cnnlab.losses import resolve_loss
from cnnlab.engines.torch.engine import (TorchEngine, TorchNet, export_grads, load_weights,
                                        to_nchw)

OUT_TOL = dict(rtol=1e-8, atol=1e-8)
GRAD_TOL = dict(rtol=1e-6, atol=1e-6)

pairs = st.tuples(st.integers(1, 3), st.integers(1, 3))
activations = st.sampled_from(L.ACTIVATIONS)
conv_paddings = st.one_of(st.sampled_from(["valid", "same", "full"]), st.integers(0, 2),
                          st.tuples(st.integers(0, 2), st.integers(0, 2)))


def conv(draw):
    return L.Conv2D(draw(st.integers(1, 3)), draw(pairs), draw(pairs), draw(conv_paddings),
                    draw(activations), draw(st.booleans()))


def pool(draw):
    kind = draw(st.sampled_from([L.MaxPool2D, L.AvgPool2D]))
    return kind(draw(pairs), draw(st.none() | pairs), draw(st.sampled_from(["valid", "same"])))


def batchnorm(draw):
    return L.BatchNorm(draw(st.sampled_from([0.0, 0.5, 0.99])),
                       draw(st.sampled_from([1e-3, 0.1])))


def dropout(draw):
    return L.Dropout(draw(st.sampled_from([0.0, 0.5])))


def activation(draw):
    return L.Activation(draw(activations))


def dense(draw):
    return L.Dense(draw(st.integers(1, 4)), draw(activations), draw(st.booleans()))


@st.composite
def models(draw):
    """A valid Sequential: image layers, a flattening layer, flat layers, a softmax or
    1-unit sigmoid output (on the Dense or a separate Activation), trailing Flatten/Dropout."""
    if draw(st.integers(0, 5)):
        shape = (draw(st.integers(1, 7)), draw(st.integers(1, 7)), draw(st.sampled_from([1, 3])))
    else:
        shape = (draw(st.integers(1, 6)),)  # flat features
    layers = [L.Input(shape)]

    def add(layer):
        nonlocal shape
        try:
            out = layer.output_shape(shape)
        except L.ModelError:
            return  # does not fit this input: leave it out
        if min(out) >= 1:
            layers.append(layer)
            shape = out

    for _ in range(draw(st.integers(0, 4)) if len(shape) == 3 else 0):
        add(draw(st.sampled_from([conv, conv, pool, batchnorm, dropout, activation]))(draw))
    if len(shape) == 3:
        add(draw(st.sampled_from([L.Flatten, L.GlobalAvgPool2D, L.GlobalMaxPool2D]))())
    for _ in range(draw(st.integers(0, 2))):
        add(draw(st.sampled_from([dense, dense, batchnorm, dropout, activation]))(draw))
    out = draw(st.sampled_from(["softmax", "sigmoid"]))
    units = 1 if out == "sigmoid" else draw(st.integers(2, 4))
    if draw(st.booleans()):
        layers.append(L.Dense(units, out))
    else:
        layers += [L.Dense(units), L.Activation(out)]
    for _ in range(draw(st.integers(0, 2))):
        layers.append(draw(st.sampled_from([L.Flatten, lambda: L.Dropout(0.5)]))())
    model = Sequential(layers)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    weights = {}
    for key, wshape in model.param_shapes().items():
        pname = key.rsplit(".", 1)[1]
        if pname == "moving_variance":
            weights[key] = rng.uniform(0.5, 2.0, wshape)
        elif pname == "gamma":
            weights[key] = rng.normal(1.0, 0.3, wshape)
        else:
            weights[key] = rng.normal(0.0, 0.5, wshape)
    model.set_weights(weights)
    n = draw(st.integers(1, 3))
    return model, rng.normal(size=(n, *model.input_shape)), rng


def close(a, b, tol, what):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs {b.shape}"
    np.testing.assert_allclose(a, b, **tol, err_msg=what)


def check_param_count(model):
    net = TorchNet(model)
    params = sum(p.numel() for p in net.parameters())
    buffers = sum(b.numel() for name, b in net.named_buffers()
                  if not name.endswith("num_batches_tracked"))
    total, trainable, _ = model.count_params()
    assert (params + buffers, params) == (total, trainable)


def check_inference(model, x, rng):
    ne = NumpyEngine(model, dtype=np.float64)
    te = TorchEngine(model, device="cpu", dtype=np.float64)
    close(te.forward(x), ne.forward(x), OUT_TOL, "logits")
    # float32 with channels-last strides takes other kernels (PyTorch 2.13 has a wrong one)
    logits = ne.forward(x)
    close(TorchEngine(model, device="cpu").forward(x), logits,
          dict(rtol=1e-3, atol=1e-4 * (1 + np.abs(logits).max())), "float32 logits")
    close(te.predict_proba(x), ne.predict_proba(x), OUT_TOL, "probabilities")
    for (name, a), (name_np, b) in zip(te.activations(x), ne.activations(x), strict=True):
        assert name == name_np
        close(a, b, OUT_TOL, f"activation of {name}")
    n = len(model.layers)
    for out_layer in {n - 1, int(rng.integers(n))}:
        pre = bool(rng.integers(2))
        wrt = [None, int(rng.integers(out_layer + 1))][int(rng.integers(2))]
        seed = rng.normal(size=(len(x), *model.layer_shapes[out_layer][1]))
        out_t, g_t = te.vjp(x, out_layer, seed, wrt_layer=wrt, pre_activation=pre)
        out_n, g_n = ne.vjp(x, out_layer, seed, wrt_layer=wrt, pre_activation=pre)
        what = f"vjp(out_layer={out_layer}, wrt_layer={wrt}, pre_activation={pre})"
        close(out_t, out_n, OUT_TOL, what + " out")
        close(g_t, g_n, GRAD_TOL, what + " gradient")
        close(te.layer_output(x, out_layer, pre_activation=pre), out_n, OUT_TOL,
              f"layer_output({out_layer}, pre_activation={pre})")
        np.testing.assert_array_equal(ne.layer_output(x, out_layer, pre_activation=pre), out_n)


def check_training(model, x, rng, loss, label_smoothing):
    """One training-mode forward/backward; Dropout off (the engines draw different masks).
    loss: "crossentropy" (softmax or sigmoid, by the output) or "mse"."""
    model = model.copy()
    for layer in model.layers:
        if isinstance(layer, L.Dropout):
            layer.rate = 0.0
    sigmoid = model.output_activation == "sigmoid"
    y = rng.integers(0, model.num_classes, len(x))
    net = TorchNet(model).double()
    load_weights(net, model)
    net.train()
    logits_t = net(to_nchw(x, "cpu", torch.float64))
    name = "mse" if loss == "mse" else "categorical_crossentropy"
    kind = resolve_loss(name, model)   # one rule for both engines
    assert kind == ("mse_probs" if loss == "mse" else "sigmoid_bce" if sigmoid else "softmax_ce")
    loss_t = loss_fn(kind, logits_t, torch.from_numpy(y), label_smoothing)
    loss_t.backward()
    ne = NumpyEngine(model, dtype=np.float64)
    loss_n, logits_n, grads_n = ne.loss_and_grads(x, y, name, label_smoothing)
    close(loss_t.item(), loss_n, OUT_TOL, "loss")
    close(logits_t.detach().numpy(), logits_n, OUT_TOL, "training logits")
    grads_t = export_grads(net)
    assert set(grads_t) == set(grads_n)
    for key, g in grads_n.items():
        close(grads_t[key], g, GRAD_TOL, f"gradient of {key}")
    for mod in net:  # moving statistics after the step (NumPy keeps them in float32)
        for pname in mod.layer.state_params:
            close(getattr(mod, pname).numpy(), model.weights[f"{mod.layer.name}.{pname}"],
                  dict(rtol=1e-6, atol=1e-7), f"{mod.layer.name}.{pname} after a step")
