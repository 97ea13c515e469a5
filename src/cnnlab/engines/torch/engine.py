"""The PyTorch engine: one nn.Module per layer kind, stacked in an nn.Sequential.

Inside, tensors are NCHW (stored channels_last where that is faster); at the
boundary, images are NHWC numpy arrays and weights use Keras layouts, so the
model file and the NumPy engine see the same numbers. Flatten reorders to
channels-last before flattening, so Dense kernels match Keras' (H, W, C) order.

A layer kind is one module class registered under its description's `type`
(`cnnlab.layers`); its forward is `act(transform(x))`, with the activation a child
module. The network returns logits: the final softmax/sigmoid is left out.

Reading layer outputs (activations, vjp, layer_output) uses forward hooks on the
activation modules. The hooks are registered once; what they do in one call (record
outputs, apply the final activation, stop early, force inference mode) is read from
a ContextVar, which each thread sees on its own: calls from many threads never share
mutable state.
"""
from __future__ import annotations

import contextlib
import contextvars

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ... import layers as L

LEAKY_SLOPE = 0.2  # Keras 3 default negative slope


def activation_fn(name: str):
    return {
        "linear": lambda x: x,
        "relu": F.relu,
        "leaky_relu": lambda x: F.leaky_relu(x, LEAKY_SLOPE),
        "elu": F.elu,
        "gelu": F.gelu,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "softplus": F.softplus,
        "softmax": lambda x: torch.softmax(x, dim=1 if x.dim() == 4 else -1),
    }[name]


# Per-call settings ------------------------------------------------------------------
class _Call:
    """What one engine call wants from the network: `training` overrides the modules'
    train/eval flag (None: use it); `tap` sees every layer's output (see _Tap)."""

    def __init__(self, training=None, tap=None):
        self.training, self.tap = training, tap


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("cnnlab_torch_call",
                                                                     default=None)


@contextlib.contextmanager
def _call(training=None, tap=None):
    token = _CALL.set(_Call(training, tap))
    try:
        yield
    finally:
        _CALL.reset(token)


def _training(module: nn.Module) -> bool:
    call = _CALL.get()
    return module.training if call is None or call.training is None else call.training


# Layer modules ----------------------------------------------------------------------
MODULES: dict[str, type] = {}


def register(kind: str):
    """Class decorator: the module that runs layer descriptions of type `kind`."""
    def add(cls):
        MODULES[kind] = cls
        return cls
    return add


class Act(nn.Module):
    """An activation by its Keras name (softmax over the channel axis)."""

    def __init__(self, name: str = "linear"):
        super().__init__()
        self.name = name
        self.fn = activation_fn(name)

    def forward(self, x):
        return self.fn(x)

    def extra_repr(self):
        return self.name


class LayerModule(nn.Module):
    """One layer of the description: forward(x) = act(transform(x)).

    Parameters are attributes named as in Keras (kernel, bias, gamma, ...); a
    subclass whose torch layout differs converts in to_torch/to_keras.
    """

    def __init__(self, layer: L.Layer, in_shape, out_shape):
        super().__init__()
        self.layer = layer
        self.act = Act(getattr(layer, "activation", "linear"))

    def transform(self, x):
        return x

    def forward(self, x):
        return self.act(self.transform(x))

    def to_torch(self, pname: str, arr: np.ndarray) -> np.ndarray:
        return arr

    def to_keras(self, pname: str, arr: np.ndarray) -> np.ndarray:
        return arr


def _standard(t: torch.Tensor) -> torch.Tensor:
    return t.clone(memory_format=torch.contiguous_format)


@register("Conv2D")
class Conv2D(LayerModule):
    """Cross-correlation, F.conv2d; kernel stored (out, in, kh, kw), Keras (kh, kw, in, out).

    Symmetric padding is left to the convolution (no copy); asymmetric ('same' with an
    odd total) pads first. PyTorch 2.13's CPU convolution returns garbage for one input
    channel, a width stride > 1 and an output width of 1 when the input or the kernel
    has channels-last strides (for C = 1 they are also 'contiguous', so .contiguous()
    leaves them); standard strides give the right result, so such a layer copies both
    to standard strides.
    """

    def __init__(self, layer, in_shape, out_shape):
        super().__init__(layer, in_shape, out_shape)
        c = in_shape[2]
        self.kernel = nn.Parameter(torch.zeros(layer.filters, c, *layer.kernel_size))
        self.bias = nn.Parameter(torch.zeros(layer.filters)) if layer.use_bias else None
        (pt, pb), (pl, pr) = layer.pads(in_shape)
        symmetric = pl == pr and pt == pb
        self.pad = (0, 0, 0, 0) if symmetric else (pl, pr, pt, pb)
        self.padding = (pt, pl) if symmetric else (0, 0)
        self.stride = layer.strides
        self.standard_strides = c == 1 and layer.strides[1] > 1 and out_shape[1] == 1

    def transform(self, x):
        if any(self.pad):
            x = F.pad(x, self.pad)
        w = self.kernel
        if self.standard_strides:
            x, w = _standard(x), _standard(w)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)

    def to_torch(self, pname, arr):
        return arr.transpose(3, 2, 0, 1) if pname == "kernel" else arr

    def to_keras(self, pname, arr):
        return arr.transpose(2, 3, 1, 0) if pname == "kernel" else arr


class _Pool(LayerModule):
    def __init__(self, layer, in_shape, out_shape):
        super().__init__(layer, in_shape, out_shape)
        (pt, pb), (pl, pr) = layer.pads(in_shape)
        self.pad = (pl, pr, pt, pb)
        self.size, self.stride = layer.pool_size, layer.strides


@register("MaxPool2D")
class MaxPool2D(_Pool):
    """Window max; padded cells are -inf, so they never win."""

    def transform(self, x):
        if any(self.pad):
            x = F.pad(x, self.pad, value=float("-inf"))
        return F.max_pool2d(x, self.size, self.stride)


@register("AvgPool2D")
class AvgPool2D(_Pool):
    """Window mean over the real cells: sum / count, padded cells in neither (Keras 'same')."""

    def transform(self, x):
        if not any(self.pad):
            return F.avg_pool2d(x, self.size, self.stride)
        ones = torch.ones_like(x[:1, :1])
        return F.avg_pool2d(F.pad(x, self.pad), self.size, self.stride) / \
            F.avg_pool2d(F.pad(ones, self.pad), self.size, self.stride)


@register("GlobalAvgPool2D")
class GlobalAvgPool2D(LayerModule):
    """(N, C, H, W) -> (N, C): mean over H, W."""

    def transform(self, x):
        return x.mean(dim=(2, 3))


@register("GlobalMaxPool2D")
class GlobalMaxPool2D(LayerModule):
    """(N, C, H, W) -> (N, C): max over H, W. The gradient goes to the first maximum in
    row-major order (as NumPy's argmax), not split among ties as amax would."""

    def transform(self, x):
        return x.flatten(2).max(dim=2).values


@register("Flatten")
class Flatten(LayerModule):
    """(N, C, H, W) -> (N, H*W*C) in channels-last (Keras) order."""

    def transform(self, x):
        return x.permute(0, 2, 3, 1).flatten(1) if x.dim() == 4 else x.flatten(1)


@register("Dense")
class Dense(LayerModule):
    """y = x W^T + b, F.linear; kernel stored (out, in), Keras (in, out)."""

    def __init__(self, layer, in_shape, out_shape):
        super().__init__(layer, in_shape, out_shape)
        self.kernel = nn.Parameter(torch.zeros(layer.units, in_shape[0]))
        self.bias = nn.Parameter(torch.zeros(layer.units)) if layer.use_bias else None

    def transform(self, x):
        return F.linear(x, self.kernel, self.bias)

    def to_torch(self, pname, arr):
        return arr.T if pname == "kernel" else arr

    to_keras = to_torch


@register("Dropout")
class Dropout(LayerModule):
    """Inverted dropout in training: y = x * m / (1 - rate), m_i = [u_i >= rate] with u_i
    uniform in [0, 1); identity at inference. On a CPU the mask comes from float32 uniforms,
    1.6-2.3x faster there (forward and backward) than F.dropout's bernoulli_
    (bench/bench_cpu_choices.py --dropout)."""

    def transform(self, x):
        rate = self.layer.rate
        if not _training(self) or rate == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, rate, True)
        keep = torch.rand_like(x, dtype=torch.float32) >= rate   # keeps x's memory format
        return x * keep.to(x.dtype).mul_(1 / (1 - rate))


@register("BatchNorm")
class BatchNorm(LayerModule):
    """y = gamma (x - mu) / sqrt(var + eps) + beta over the channel axis (dim 1).

    Training: mu, var = the batch mean and biased variance over the M = N*H*W values of
    each channel, and in place (Keras momentum)
        moving_mean = momentum * moving_mean + (1 - momentum) * mu
        moving_var  = momentum * moving_var  + (1 - momentum) * var * M / max(M - 1, 1).
    With M = 1 (a batch of one on flat features or 1x1 maps) var = 0 and y = beta, as in
    the NumPy engine; F.batch_norm refuses that case, so it is written out. Inference:
    mu, var = the moving statistics. Without scale (center) gamma (beta) is None: 1 (0).
    """

    def __init__(self, layer, in_shape, out_shape):
        super().__init__(layer, in_shape, out_shape)
        c = in_shape[-1]
        self.gamma = nn.Parameter(torch.ones(c)) if layer.scale else None
        self.beta = nn.Parameter(torch.zeros(c)) if layer.center else None
        self.register_buffer("moving_mean", torch.zeros(c))
        self.register_buffer("moving_variance", torch.ones(c))

    def transform(self, x):
        lay, training = self.layer, _training(self)
        if not training or x.numel() > x.shape[1]:
            return F.batch_norm(x, self.moving_mean, self.moving_variance, self.gamma, self.beta,
                                training, 1.0 - lay.momentum, lay.epsilon)
        dims = [0, *range(2, x.dim())]
        mu = x.mean(dims, keepdim=True)
        xc = x - mu
        var = (xc * xc).mean(dims, keepdim=True)
        with torch.no_grad():
            m = lay.momentum
            self.moving_mean.copy_(m * self.moving_mean + (1 - m) * mu.flatten())
            self.moving_variance.copy_(m * self.moving_variance + (1 - m) * var.flatten())
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = xc * torch.rsqrt(var + lay.epsilon)
        if self.gamma is not None:
            y = y * self.gamma.view(shape)
        return y if self.beta is None else y + self.beta.view(shape)


@register("Rescaling")
class Rescaling(LayerModule):
    """y = x * scale + offset."""

    def transform(self, x):
        y = x * self.layer.scale
        return y + self.layer.offset if self.layer.offset else y


@register("Activation")
class Activation(LayerModule):
    """Only its activation (the transform is the identity)."""


# The network ------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by a tap to end the forward pass after the layer it wants."""


class TorchNet(nn.Sequential):
    """The whole network: one module per layer; forward returns logits (the final
    softmax/sigmoid, at model.final_activation_index, is left out)."""

    def __init__(self, model):
        mods = []
        for layer, (in_shape, out_shape) in zip(model.layers, model.layer_shapes):
            if layer.type not in MODULES:
                raise ValueError(f"the torch engine cannot run a {layer.type} layer")
            mods.append(MODULES[layer.type](layer, in_shape, out_shape))
        super().__init__(*mods)
        for mod in mods:   # trainable=False: no gradient is computed for the layer's weights
            for pname in mod.layer.weight_params:
                getattr(mod, pname).requires_grad_(mod.layer.trainable)
        self.final = model.final_activation_index
        self.final_activation = None if self.final is None else mods[self.final].act.name
        if self.final is not None:
            mods[self.final].act = Act("linear")
        for i, mod in enumerate(mods):
            mod.act.register_forward_hook(_Hook(i))

    def __getitem__(self, idx):
        if isinstance(idx, slice):  # nn.Sequential would rebuild a TorchNet from modules
            return nn.Sequential(*list(self)[idx])
        return super().__getitem__(idx)


class _Hook:
    """Forward hook on layer i's activation module: hands (i, pre, post) to this call's
    tap, if any; what the tap returns becomes the layer's output."""

    def __init__(self, i: int):
        self.i = i

    def __call__(self, module, inputs, output):
        call = _CALL.get()
        if call is None or call.tap is None:
            return None
        return call.tap(self.i, inputs[0], output)


class _Tap:
    """Sees each layer's output (pre: before its activation, post: after it) in one call.

    Layer outputs are those of the NumPy engine and Keras: after every activation, the
    final softmax/sigmoid included, so layers after it (Flatten, Dropout) see
    probabilities. Keeps the outputs of the layers in `keep`, takes layer `upto`'s
    before its activation when pre_activation, and stops the pass after layer `upto`.
    """

    def __init__(self, net: TorchNet, upto: int, keep, pre_activation=False):
        self.final = net.final
        self.final_fn = None if net.final is None else activation_fn(net.final_activation)
        self.upto, self.keep, self.pre_activation = upto, set(keep), pre_activation
        self.outputs: dict[int, torch.Tensor] = {}

    def __call__(self, i, pre, post):
        if i == self.final:
            post = self.final_fn(pre)
        out = pre if self.pre_activation and i == self.upto else post
        if i in self.keep:
            self.outputs[i] = out
        if i == self.upto:
            raise _Stop
        return out

    def run(self, net, x):
        """Forward x through layers 0..upto; returns self.outputs."""
        with _call(training=False, tap=self):
            try:
                net(x)
            except _Stop:
                pass
        return self.outputs


# Keras layout <-> torch layout ------------------------------------------------------
def _params(net: TorchNet, trainable_only=False):
    """(module, Keras param name) for every parameter (and moving statistic), model order."""
    for mod in net:
        names = mod.layer.trainable_params
        if not trainable_only:
            names = names + mod.layer.non_trainable_params
        for pname in names:
            yield mod, pname


def load_weights(net: TorchNet, model):
    """Copy model.weights (Keras layout) into the network."""
    with torch.no_grad():
        for mod, pname in _params(net):
            arr = mod.to_torch(pname, model.weights[f"{mod.layer.name}.{pname}"])
            t = getattr(mod, pname)
            t.copy_(torch.from_numpy(np.ascontiguousarray(arr)).to(t.dtype))


def export_weights(net: TorchNet) -> dict[str, np.ndarray]:
    """The network's weights as {"<layer>.<param>": float32 array in Keras layout}."""
    out = {}
    for mod, pname in _params(net):
        t = getattr(mod, pname).detach().float().cpu().numpy()
        # np.array copies: the result must not alias the live parameter
        out[f"{mod.layer.name}.{pname}"] = np.array(mod.to_keras(pname, t), order="C")
    return out


def export_grads(net: TorchNet) -> dict[str, np.ndarray]:
    """The trainable parameters' .grad as {"<layer>.<param>": array in Keras layout}, in
    the parameters' dtype (None where a parameter has no gradient)."""
    out = {}
    for mod, pname in _params(net, trainable_only=True):
        g = getattr(mod, pname).grad
        out[f"{mod.layer.name}.{pname}"] = None if g is None else \
            np.array(mod.to_keras(pname, g.detach().cpu().numpy()), order="C")
    return out


def param_names(net: TorchNet) -> list[tuple[str, nn.Parameter]]:
    """(model weight name, torch parameter) for every trainable parameter, in model order."""
    return [(f"{mod.layer.name}.{pname}", getattr(mod, pname))
            for mod, pname in _params(net, trainable_only=True)]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    index = device[5:] if device.startswith("cuda:") else None
    if device != "cuda" and not (index or "").isdigit():
        raise ValueError(f"unknown device {device!r}; allowed: auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; "
                         "use --device cpu")
    if index is not None and int(index) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                         f"CUDA device(s): cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return torch.device(device)


def _torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    return torch.float64 if dt == np.float64 else torch.float32


def to_nchw(x: np.ndarray, device, dtype=torch.float32) -> torch.Tensor:
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np_dtype))
    if t.dim() == 4:
        t = t.permute(0, 3, 1, 2)  # a channels_last view: no copy
    return t.to(device)


def to_nhwc(t: torch.Tensor) -> np.ndarray:
    """NCHW tensor -> NHWC numpy array (float64 stays float64, anything else float32)."""
    t = t.detach().cpu()
    if t.dtype != torch.float64:
        t = t.float()
    if t.dim() == 4:
        t = t.permute(0, 2, 3, 1)
    return np.ascontiguousarray(t.numpy())


def final_activation(model, logits: torch.Tensor) -> torch.Tensor:
    """Logits -> class probabilities (N, classes); a 1-unit sigmoid gives [1-p, p]."""
    act = model.output_activation
    if act == "sigmoid":
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=1) if p.shape[1] == 1 else p
    return torch.softmax(logits, dim=1)


class TorchEngine:
    """Inference and gradients with PyTorch on a Sequential's weights.

    forward(x NHWC) -> logits; predict_proba -> probabilities; activations -> each
    layer's output; layer_output -> one layer's output; vjp -> gradient of sum(out * seed).
    All methods may be called from many threads at once. dtype: float32 or float64.
    """
    name = "torch"

    def __init__(self, model, device="auto", dtype=torch.float32):
        self.model = model
        self.device = resolve_device(device)
        self.dtype = _torch_dtype(dtype)
        self.net = TorchNet(model).to(self.device, self.dtype)
        load_weights(self.net, model)
        self.net.eval()
        if self.device.type == "cpu":
            self.net = self.net.to(memory_format=torch.channels_last)

    def _x(self, x) -> torch.Tensor:
        x = np.asarray(x)
        if x.shape[1:] != tuple(self.model.input_shape):
            raise ValueError(f"input batch of shape {x.shape} does not fit the model's input "
                             f"{tuple(self.model.input_shape)} (expected (N, H, W, C))")
        return to_nchw(x, self.device, self.dtype)

    def _layer(self, i: int) -> int:
        n = len(self.net)
        if not -n <= i < n:
            raise IndexError(f"layer {i} out of range: the model has {n} layers")
        return i % n

    #: "bf16": forward() runs under bf16 autocast (faster evaluation where bf16 is native)
    precision = "fp32"

    def forward(self, x, training=False):
        """The logits (N, K). training=True: batch statistics (moving ones updated in
        place in the network) and dropout."""
        with _call(training=training), torch.no_grad(), torch.autocast(
                self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = self.net(self._x(x))
        return to_nhwc(out)

    def predict_proba(self, x, batch_size=256):
        outs = []
        with _call(training=False), torch.inference_mode():
            for i in range(0, len(x), batch_size):
                logits = self.net(self._x(x[i:i + batch_size]))
                outs.append(to_nhwc(final_activation(self.model, logits)))
        n = self.model.num_classes
        return np.concatenate(outs) if outs else np.zeros((0, n), np.float32)

    def activations(self, x):
        """[(layer name, output)] for every layer at inference, after its activation
        (the final softmax/sigmoid included, as in the NumPy engine and Keras)."""
        n = len(self.net)
        with torch.inference_mode():
            outs = _Tap(self.net, n - 1, range(n)).run(self.net, self._x(x))
        return [(mod.layer.name, to_nhwc(outs[i])) for i, mod in enumerate(self.net)]

    def layer_output(self, x, i: int, pre_activation=False):
        """Output of layer i (NHWC) at inference, before its activation when
        pre_activation; runs layers 0..i only, with no backward pass."""
        i = self._layer(i)
        with torch.inference_mode():
            out = _Tap(self.net, i, [i], pre_activation).run(self.net, self._x(x))
        return to_nhwc(out[i])

    def vjp(self, x, out_layer: int, seed, wrt_layer: int | None = None, pre_activation=False):
        """Vector-Jacobian product at inference.

        Runs layers 0..out_layer (-1 = the last), all with their activations except layer
        out_layer itself when pre_activation, giving `out`; returns (out, d sum(out * seed)
        / d z) as NHWC arrays, z the input (wrt_layer None) or the output of layer
        wrt_layer (after its activation). Parameters' .grad are left untouched.
        """
        out_layer = self._layer(out_layer)
        wrt = None if wrt_layer is None else self._layer(wrt_layer)
        if wrt is not None and wrt > out_layer:
            raise ValueError(f"wrt_layer {wrt_layer} comes after out_layer {out_layer}")
        h = self._x(x).clone().requires_grad_()  # also when no parameter comes before wrt
        keep = [out_layer] if wrt is None else [out_layer, wrt]
        with torch.enable_grad():
            outs = _Tap(self.net, out_layer, keep, pre_activation).run(self.net, h)
            out = outs[out_layer]
            z = h if wrt is None else outs[wrt]
            s = to_nchw(np.asarray(seed), self.device, self.dtype)
            grad, = torch.autograd.grad((out * s).sum(), z, allow_unused=True)
        if grad is None:  # out does not depend on z
            grad = torch.zeros_like(z)
        return to_nhwc(out), to_nhwc(grad)
