"""The NumPy engine: runs a Sequential layer by layer with the ops of fast.py.

The engine only walks the layers; every forward and backward formula lives in
fast.py (the plain versions, for reading: reference.py). The registry maps each layer type
(layers.py `type`) to its (forward, backward) pair (layer_registry): a new layer kind adds one
entry there.
Images are NHWC float arrays, already preprocessed. Weights are read from model.weights
(Keras layouts) at each call, so the engine always sees the current ones.

The network's output is the logits: the final softmax/sigmoid (the one at
model.final_activation_index) is left out of forward() and of the training loss,
which is computed on the logits for numerical stability.
"""
from __future__ import annotations

import numpy as np

from ...losses import KINDS, resolve_loss
from . import fast


def _with_grads(backward, *names):
    """A backward returning (dx, *grads) -> (dx, {name: grad}), leaving out None grads."""
    def run(dout, cache, need_dx):
        dx, *grads = backward(dout, cache, need_dx)
        return dx, {k: g for k, g in zip(names, grads) if g is not None}
    return run


def _no_params(backward):
    """A backward(dout, cache) -> dx of a layer without parameters."""
    return lambda dout, cache, need_dx: (backward(dout, cache), {})


def layer_registry(ops):
    """The registry of an ops module (fast or reference): layer type (layers.py `type`) ->
    (forward(engine, layer, x, training) -> (out, cache),
     backward(dout, cache, need_dx) -> (dx, {param name: grad}))."""
    def batchnorm(e, layer, x, training):
        w = e.model.weights  # the moving statistics are updated in place in training
        c = x.shape[-1]      # without scale / center: gamma = 1, beta = 0
        gamma = e.param(layer, "gamma") if layer.scale else np.ones(c, e.dtype)
        beta = e.param(layer, "beta") if layer.center else np.zeros(c, e.dtype)
        return ops.batchnorm_forward(
            x, gamma, beta, w[f"{layer.name}.moving_mean"],
            w[f"{layer.name}.moving_variance"], layer.epsilon, layer.momentum, training)

    def pool(forward):
        return lambda e, layer, x, training: forward(x, layer.pool_size, layer.strides,
                                                     layer.padding)
    return {
        "Conv2D": (lambda e, layer, x, training: ops.conv2d_forward(
                       x, e.param(layer, "kernel"), e.param(layer, "bias"), layer.strides,
                       layer.padding),
                   _with_grads(ops.conv2d_backward, "kernel", "bias")),
        "Dense": (lambda e, layer, x, training: ops.dense_forward(
                      x, e.param(layer, "kernel"), e.param(layer, "bias")),
                  _with_grads(ops.dense_backward, "kernel", "bias")),
        "MaxPool2D": (pool(ops.maxpool_forward), _no_params(ops.maxpool_backward)),
        "AvgPool2D": (pool(ops.avgpool_forward), _no_params(ops.avgpool_backward)),
        "GlobalAvgPool2D": (lambda e, layer, x, training: ops.global_avgpool_forward(x),
                            _no_params(ops.global_avgpool_backward)),
        "GlobalMaxPool2D": (lambda e, layer, x, training: ops.global_maxpool_forward(x),
                            _no_params(ops.global_maxpool_backward)),
        "Flatten": (lambda e, layer, x, training: ops.flatten_forward(x),
                    _no_params(ops.flatten_backward)),
        "Dropout": (lambda e, layer, x, training: ops.dropout_forward(
                        x, layer.rate, training, e.rng),
                    _no_params(ops.dropout_backward)),
        "BatchNorm": (batchnorm, _with_grads(
            lambda dout, cache, need_dx: ops.batchnorm_backward(dout, cache), "gamma", "beta")),
        "Activation": (lambda e, layer, x, training: (x, None), _no_params(lambda d, c: d)),
        "Rescaling": (lambda e, layer, x, training: ops.rescaling_forward(
                          x, layer.scale, layer.offset),
                      _no_params(ops.rescaling_backward)),
    }


class NumpyEngine:
    """forward, predict_proba, activations, loss_and_grads and vjp on a Sequential.

    dtype: the float type of the computation (float32 for speed, float64 for gradient
    checks). Dropout draws its masks from self.rng.
    """
    name = "numpy"
    ops = fast                    # the math: fast.py (reference.py gives the same numbers)
    layer_ops = layer_registry(fast)  # layer type -> (forward, backward)

    def __init__(self, model, dtype=np.float32, seed: int = 0):
        self.model = model
        self.dtype = np.dtype(dtype)
        self.rng = np.random.default_rng(seed)

    # weights ----------------------------------------------------------------------
    def param(self, layer, pname):
        """The parameter `<layer>.<pname>` in the engine's dtype (None if absent)."""
        arr = self.model.weights.get(f"{layer.name}.{pname}")
        return None if arr is None else arr.astype(self.dtype, copy=False)

    def _input(self, x):
        x = np.asarray(x, dtype=self.dtype)
        if x.shape[1:] != tuple(self.model.input_shape):
            raise ValueError(f"input batch of shape {x.shape} does not fit the model's input "
                             f"{tuple(self.model.input_shape)} (expected (N, H, W, C))")
        return x

    # one layer ----------------------------------------------------------------------
    def _forward(self, i, x, training=False, activation=True):
        """Layer i on x; returns (output, cache). activation=False leaves its activation out."""
        layer = self.model.layers[i]
        if layer.type not in self.layer_ops:
            raise ValueError(f"the NumPy engine cannot run a {layer.type} layer")
        h, cache = self.layer_ops[layer.type][0](self, layer, x, training)
        act = getattr(layer, "activation", "linear") if activation else "linear"
        act_cache = None
        if act != "linear":
            h, act_cache = self.ops.activation_forward(h, act)
        return h, (cache, act_cache)

    def _backward(self, i, dout, caches, need_dx=True):
        """Back through layer i: returns (dx, {param name: grad}) with the grads of its
        trainable parameters only (none for a layer with trainable=False)."""
        layer = self.model.layers[i]
        if not need_dx and not layer.trainable_params:
            return None, {}     # e.g. a frozen first layer: nothing to compute
        cache, act_cache = caches
        if act_cache is not None:
            dout = self.ops.activation_backward(dout, act_cache)
        dx, grads = self.layer_ops[layer.type][1](dout, cache, need_dx)
        keep = layer.trainable_params
        return dx, {f"{layer.name}.{k}": g for k, g in grads.items() if k in keep}

    def _run(self, x, upto, training, activations):
        """Forward through layers 0..upto; activations(i) says whether layer i applies
        its activation. Returns (output, caches)."""
        h, caches = self._input(x), []
        for i in range(upto + 1):
            h, cache = self._forward(i, h, training, activations(i))
            caches.append(cache)
        return h, caches

    def _logits_mask(self):
        final = self.model.final_activation_index
        return lambda i: i != final

    # public API ---------------------------------------------------------------------
    def forward(self, x, training=False):
        """The logits (N, K): the network without its final softmax/sigmoid."""
        out, _ = self._run(x, len(self.model.layers) - 1, training, self._logits_mask())
        return out

    def predict_proba(self, x, batch_size=256):
        """Class probabilities (N, classes): softmax of the logits (also for a linear
        output); sigmoid for a sigmoid output, as [1 - p, p] for a single unit."""
        outs = [self._probabilities(self.forward(x[i:i + batch_size]))
                for i in range(0, len(x), batch_size)]
        return np.concatenate(outs) if outs else \
            np.zeros((0, self.model.num_classes), dtype=self.dtype)

    def _probabilities(self, z):
        if self.model.output_activation == "sigmoid":
            p = self.ops.sigmoid(z)
            return np.concatenate([1 - p, p], axis=1) if p.shape[1] == 1 else p
        return self.ops.softmax(z)

    def activations(self, x):
        """[(layer name, output)] for every layer at inference, after its activation
        (the last one gives the probabilities)."""
        h, out = self._input(x), []
        for i, layer in enumerate(self.model.layers):
            h, _ = self._forward(i, h)
            out.append((layer.name, h))
        return out

    def loss_and_grads(self, x, y, loss="softmax_ce", label_smoothing=0.0, reduction="mean"):
        """Training-mode forward and backward on one batch.

        BatchNorm normalizes with the batch statistics and updates its moving statistics
        in model.weights; Dropout draws masks from self.rng. y: integer labels (N,)
        (or one-hot rows). Returns (loss, logits, grads) with grads
        {"<layer>.<param>": array} for every trainable parameter, in Keras layout.
        loss is the batch mean; reduction="sum" gives the gradients of the sum (N times).
        """
        n = len(self.model.layers)
        logits, caches = self._run(x, n - 1, True, self._logits_mask())
        kind = loss if loss in KINDS else resolve_loss(loss, self.model)
        value, g = self.ops.loss_on_logits(kind, logits, y, label_smoothing)
        if reduction == "sum":
            g = g * g.dtype.type(len(logits))
        grads = {}
        for i in range(n - 1, -1, -1):
            g, layer_grads = self._backward(i, g, caches[i], need_dx=i > 0)
            grads.update(layer_grads)
        return value, logits, grads

    def layer_output(self, x, i: int, pre_activation=False):
        """Output of layer i (NHWC) at inference, before its activation when
        pre_activation; runs layers 0..i only, with no backward pass."""
        n = len(self.model.layers)
        if not -n <= i < n:
            raise ValueError(f"layer {i}: the model has {n} layers")
        i %= n
        out, _ = self._run(x, i, False, lambda j: not (pre_activation and j == i))
        return out

    def vjp(self, x, out_layer: int, seed, wrt_layer: int | None = None,
            pre_activation=False):
        """Vector-Jacobian product at inference.

        Runs layers 0..out_layer (-1 = the last), all with their activations except layer
        out_layer itself when pre_activation (e.g. the class logits), giving `out`; then
        returns (out, d sum(out * seed) / d z), z the input image (wrt_layer None) or
        the output of layer wrt_layer (after its activation).
        """
        n = len(self.model.layers)
        out_layer = out_layer % n
        stop = -1 if wrt_layer is None else wrt_layer % n
        if stop > out_layer:
            raise ValueError(f"wrt_layer {wrt_layer} comes after out_layer {out_layer}")
        out, caches = self._run(x, out_layer, False,
                                lambda i: not (pre_activation and i == out_layer))
        g = np.asarray(seed, dtype=self.dtype)
        for i in range(out_layer, stop, -1):
            g, _ = self._backward(i, g, caches[i])
        return out, g

