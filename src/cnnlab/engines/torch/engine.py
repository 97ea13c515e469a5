"""The PyTorch engine: builds an nn.Module from the shared model description.

Inside, tensors are NCHW (stored channels_last where that is faster); at the
boundary, images are NHWC numpy arrays and weights use Keras layouts, so the
model file and the NumPy engine see the same numbers. Flatten reorders to
channels-last before flattening, so Dense kernels match Keras' (H, W, C) order.
"""
from __future__ import annotations

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


def _pad_spec(layer, in_shape):
    (pt, pb), (pl, pr) = layer.pads(in_shape)
    return (pl, pr, pt, pb)


class Block(nn.Module):
    """One layer of the description. `skip_activation` drops the final softmax/sigmoid
    so the network returns logits."""

    def __init__(self, layer: L.Layer, in_shape, skip_activation=False):
        super().__init__()
        self.layer = layer
        self.kind = layer.type
        act = getattr(layer, "activation", "linear")
        self.act = activation_fn("linear" if skip_activation else act)
        if isinstance(layer, L.Conv2D):
            pl, pr, pt, pb = _pad_spec(layer, in_shape)
            symmetric = pl == pr and pt == pb  # then the convolution pads itself: no copy
            self.pad = (0, 0, 0, 0) if symmetric else (pl, pr, pt, pb)
            self.conv = nn.Conv2d(in_shape[2], layer.filters, layer.kernel_size, layer.strides,
                                  padding=(pt, pl) if symmetric else 0, bias=layer.use_bias)
        elif isinstance(layer, (L.MaxPool2D, L.AvgPool2D)):
            self.pad = _pad_spec(layer, in_shape)
        elif isinstance(layer, L.Dense):
            self.fc = nn.Linear(in_shape[0], layer.units, bias=layer.use_bias)
        elif isinstance(layer, L.BatchNorm):
            bn = nn.BatchNorm2d if len(in_shape) == 3 else nn.BatchNorm1d
            self.bn = bn(in_shape[-1], eps=layer.epsilon, momentum=1.0 - layer.momentum)
        elif isinstance(layer, L.Dropout):
            self.drop = nn.Dropout(layer.rate)

    def forward(self, x):
        k = self.kind
        if k == "Conv2D":
            if any(self.pad):
                x = F.pad(x, self.pad)
            x = self.conv(x)
        elif k == "MaxPool2D":
            if any(self.pad):
                x = F.pad(x, self.pad, value=float("-inf"))
            x = F.max_pool2d(x, self.layer.pool_size, self.layer.strides)
        elif k == "AvgPool2D":
            ks, st = self.layer.pool_size, self.layer.strides
            if any(self.pad):  # padded cells are not counted (Keras 'same')
                ones = torch.ones_like(x[:1, :1])
                x = F.avg_pool2d(F.pad(x, self.pad), ks, st) / \
                    F.avg_pool2d(F.pad(ones, self.pad), ks, st)
            else:
                x = F.avg_pool2d(x, ks, st)
        elif k == "GlobalAvgPool2D":
            x = x.mean(dim=(2, 3))
        elif k == "GlobalMaxPool2D":
            x = x.amax(dim=(2, 3))
        elif k == "Flatten":
            x = x.permute(0, 2, 3, 1).flatten(1) if x.dim() == 4 else x.flatten(1)
        elif k == "Dense":
            x = self.fc(x)
        elif k == "BatchNorm":
            x = self.bn(x)
        elif k == "Dropout":
            x = self.drop(x)
        return self.act(x)


class TorchNet(nn.Module):
    """The whole network; forward returns logits (before the final softmax/sigmoid)."""

    def __init__(self, model):
        super().__init__()
        final = model.final_activation_index
        self.blocks = nn.ModuleList(
            Block(layer, in_shape, skip_activation=(i == final))
            for i, (layer, (in_shape, _)) in enumerate(zip(model.layers, model.layer_shapes)))

    def forward(self, x, upto: int | None = None):
        for i, block in enumerate(self.blocks):
            x = block(x)
            if upto is not None and i == upto:
                break
        return x


# Keras layout <-> torch layout ------------------------------------------------------
def _torch_param(block: Block, pname: str):
    if block.kind == "Conv2D":
        return getattr(block.conv, "weight" if pname == "kernel" else "bias")
    if block.kind == "Dense":
        return getattr(block.fc, "weight" if pname == "kernel" else "bias")
    name = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
            "moving_variance": "running_var"}[pname]
    return getattr(block.bn, name)


def _to_torch_layout(kind, pname, arr):
    if pname == "kernel":
        return arr.transpose(3, 2, 0, 1) if kind == "Conv2D" else arr.T
    return arr


def _to_keras_layout(kind, pname, arr):
    if pname == "kernel":
        return arr.transpose(2, 3, 1, 0) if kind == "Conv2D" else arr.T
    return arr


def load_weights(net: TorchNet, model):
    """Copy model.weights (Keras layout) into the network."""
    with torch.no_grad():
        for block in net.blocks:
            for pname in block.layer.trainable_params + block.layer.non_trainable_params:
                arr = _to_torch_layout(block.kind, pname, model.weights[f"{block.layer.name}.{pname}"])
                t = _torch_param(block, pname)
                t.copy_(torch.from_numpy(np.ascontiguousarray(arr)).to(t.dtype))


def export_weights(net: TorchNet) -> dict[str, np.ndarray]:
    """The network's weights as {"<layer>.<param>": float32 array in Keras layout}."""
    out = {}
    for block in net.blocks:
        for pname in block.layer.trainable_params + block.layer.non_trainable_params:
            t = _torch_param(block, pname).detach().float().cpu().numpy()
            # np.array copies: the result must not alias the live parameter
            out[f"{block.layer.name}.{pname}"] = np.array(_to_keras_layout(block.kind, pname, t),
                                                          order="C")
    return out


def param_names(net: TorchNet) -> list[tuple[str, nn.Parameter]]:
    """(model weight name, torch parameter) for every trainable parameter, in model order."""
    out = []
    for block in net.blocks:
        for pname in block.layer.trainable_params:
            out.append((f"{block.layer.name}.{pname}", _torch_param(block, pname)))
    return out


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; use --device cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; allowed: auto, cpu, cuda")
    return torch.device(device)


def to_nchw(x: np.ndarray, device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if t.dim() == 4:
        t = t.permute(0, 3, 1, 2)  # a channels_last view: no copy
    return t.to(device)


def to_nhwc(t: torch.Tensor) -> np.ndarray:
    t = t.detach().float().cpu()
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

    forward(x NHWC float) -> logits; predict_proba -> probabilities;
    activations -> each layer's output; vjp -> gradient of sum(out * seed).
    """
    name = "torch"

    def __init__(self, model, device="auto"):
        self.model = model
        self.device = resolve_device(device)
        self.net = TorchNet(model).to(self.device)
        load_weights(self.net, model)
        self.net.eval()
        if self.device.type == "cpu":
            self.net = self.net.to(memory_format=torch.channels_last)

    def forward(self, x, training=False):
        self.net.train(training)
        with torch.set_grad_enabled(False):
            out = self.net(to_nchw(x, self.device))
        self.net.eval()
        return to_nhwc(out)

    def predict_proba(self, x, batch_size=256):
        outs = []
        with torch.inference_mode():
            for i in range(0, len(x), batch_size):
                logits = self.net(to_nchw(x[i:i + batch_size], self.device))
                outs.append(final_activation(self.model, logits).float().cpu().numpy())
        n = self.model.num_classes
        return np.concatenate(outs) if outs else np.zeros((0, n), np.float32)

    def activations(self, x):
        out, h = [], to_nchw(x, self.device)
        with torch.inference_mode():
            for i, block in enumerate(self.net.blocks):
                h = block(h)
                shown = h
                if i == self.model.final_activation_index:
                    shown = activation_fn(block.layer.activation)(h)
                out.append((block.layer.name, to_nhwc(shown)))
        return out

    def vjp(self, x, out_layer: int, seed, wrt_layer: int | None = None, pre_activation=False):
        """Forward (inference mode) to layer `out_layer`, then d sum(out * seed) / d input
        (or / d output of layer `wrt_layer`). Returns (out, grad) as NHWC numpy arrays."""
        n = len(self.net.blocks)
        out_layer = out_layer % n
        h = to_nchw(x, self.device).clone().requires_grad_(wrt_layer is None)
        wrt = h
        self.net.eval()
        for i, block in enumerate(self.net.blocks[:out_layer + 1]):
            if i == out_layer:
                if pre_activation:
                    act = block.act
                    block.act = activation_fn("linear")
                    h = block(h)
                    block.act = act
                else:
                    h = block(h)
                    if i == self.model.final_activation_index:
                        h = activation_fn(block.layer.activation)(h)
            else:
                h = block(h)
            if wrt_layer is not None and i == wrt_layer % n:
                h.retain_grad()
                wrt = h
        s = to_nchw(np.asarray(seed, np.float32), self.device)
        (h * s).sum().backward()
        grad = wrt.grad
        for p in self.net.parameters():
            p.grad = None
        return to_nhwc(h), to_nhwc(grad)
