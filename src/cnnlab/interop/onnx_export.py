"""A cnnlab model as an ONNX graph, built from the description and weights with `onnx.helper`.

The graph (opset 17, float32):
  input  "pixels"        (batch, H, W, C) raw pixel values 0..255 (or (batch, C, H, W) with
                         layout="NCHW"); the batch axis is dynamic
  preprocessing          x * scale, - mean, / std per channel (the model file's statistics),
                         inside the graph: feed pixels as they are
  layers                 Conv / MaxPool / AveragePool (count_include_pad=0) / GlobalAveragePool /
                         GlobalMaxPool / Gemm / BatchNormalization (inference) in NCHW; Flatten
                         first transposes to (H, W, C) order as cnnlab and Keras do; Dropout is
                         left out (identity at inference); GELU is x * (1 + erf(x / sqrt 2)) / 2
  output "probabilities" (batch, classes): softmax of the logits, as cnnlab's predict_proba
                         (sigmoid for a sigmoid output; [1 - p, p] for a single unit)
The metadata (metadata_props) holds class_names, preprocessing and the input layout as JSON.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .. import layers as L
from ..preprocess import preprocessing_of
from .errors import LEAKY_SLOPE, InteropError

OPSET = 17


def _onnx():
    try:
        import onnx
    except ImportError:
        raise InteropError("ONNX export needs the onnx package: pip install 'cnnlab[interop]'") \
            from None
    return onnx


class _Graph:
    def __init__(self, onnx):
        self.onnx, self.h = onnx, onnx.helper
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, base):
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, base, arr):
        name = self.name(base)
        self.inits.append(self.onnx.numpy_helper.from_array(np.asarray(arr, np.float32), name))
        return name

    def op(self, op_type, inputs, base=None, **attrs):
        out = self.name(base or op_type.lower())
        self.nodes.append(self.h.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def activation(self, x, act, axis):
        if act == "linear":
            return x
        if act == "relu":
            return self.op("Relu", [x])
        if act == "leaky_relu":
            return self.op("LeakyRelu", [x], alpha=LEAKY_SLOPE)
        if act == "elu":
            return self.op("Elu", [x], alpha=1.0)
        if act == "gelu":  # x * Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2
            e = self.op("Erf", [self.op("Mul", [x, self.const("inv_sqrt2", 1 / math.sqrt(2))])])
            phi = self.op("Mul", [self.op("Add", [e, self.const("one", 1.0)]),
                                  self.const("half", 0.5)])
            return self.op("Mul", [x, phi], "gelu")
        if act == "sigmoid":
            return self.op("Sigmoid", [x])
        if act == "tanh":
            return self.op("Tanh", [x])
        if act == "softplus":
            return self.op("Softplus", [x])
        if act == "softmax":
            return self.op("Softmax", [x], axis=axis)
        raise InteropError(f"activation {act!r} has no ONNX export")


def build_onnx(model, layout="NHWC"):
    """The onnx.ModelProto of `model`; layout of the input: "NHWC" (cnnlab's) or "NCHW"."""
    onnx = _onnx()
    if layout not in ("NHWC", "NCHW"):
        raise InteropError(f"layout must be NHWC or NCHW, got {layout!r}")
    if len(model.output_shape) != 1:
        raise InteropError(f"the model's output {model.output_shape} is not a vector of "
                           "class scores")
    g = _Graph(onnx)
    shape = model.input_shape
    image = len(shape) == 3
    if image:
        h, w, c = shape
        in_dims = ["batch", h, w, c] if layout == "NHWC" else ["batch", c, h, w]
    else:
        c, in_dims = shape[0], ["batch", shape[0]]
    x = "pixels"
    prep = preprocessing_of(model)
    bshape = (c, 1, 1) if (image and layout == "NCHW") else (c,)
    mean = np.broadcast_to(np.asarray(prep["mean"], np.float32), (c,)).reshape(bshape)
    std = np.broadcast_to(np.asarray(prep["std"], np.float32), (c,)).reshape(bshape)
    x = g.op("Mul", [x, g.const("scale", float(prep["scale"]))], "scaled")
    if np.any(mean != 0) or np.any(std != 1):
        x = g.op("Div", [g.op("Sub", [x, g.const("mean", mean)]), g.const("std", std)],
                 "standardized")
    if image and layout == "NHWC":
        x = g.op("Transpose", [x], "nchw", perm=[0, 3, 1, 2])
    final = model.final_activation_index
    for i, (layer, (in_shape, out_shape)) in enumerate(zip(model.layers, model.layer_shapes)):
        wt = {p: model.weights[f"{layer.name}.{p}"] for p in layer.param_shapes(in_shape)}
        act = getattr(layer, "activation", "linear")
        if i == final:
            act = "linear"   # applied once, at the end, as predict_proba does
        axis = 1             # channels (NCHW) or features (N, F)
        if isinstance(layer, L.Conv2D):
            (pt, pb), (pl, pr) = layer.pads(in_shape)
            ins = [x, g.const(f"{layer.name}_kernel", wt["kernel"].transpose(3, 2, 0, 1))]
            if layer.use_bias:
                ins.append(g.const(f"{layer.name}_bias", wt["bias"]))
            x = g.op("Conv", ins, layer.name, kernel_shape=list(layer.kernel_size),
                     strides=list(layer.strides), pads=[pt, pl, pb, pr])
        elif isinstance(layer, (L.MaxPool2D, L.AvgPool2D)):
            (pt, pb), (pl, pr) = layer.pads(in_shape)
            kw = dict(kernel_shape=list(layer.pool_size), strides=list(layer.strides),
                      pads=[pt, pl, pb, pr])
            if isinstance(layer, L.AvgPool2D):
                kw["count_include_pad"] = 0
            x = g.op("MaxPool" if isinstance(layer, L.MaxPool2D) else "AveragePool", [x],
                     layer.name, **kw)
        elif isinstance(layer, (L.GlobalAvgPool2D, L.GlobalMaxPool2D)):
            op = "GlobalMaxPool" if layer.type == "GlobalMaxPool2D" else "GlobalAveragePool"
            x = g.op("Flatten", [g.op(op, [x], layer.name)], axis=1)
        elif isinstance(layer, L.Flatten):
            if len(in_shape) == 3:
                x = g.op("Transpose", [x], "nhwc", perm=[0, 2, 3, 1])
            x = g.op("Flatten", [x], layer.name, axis=1)
        elif isinstance(layer, L.Dense):
            if layer.use_bias:
                x = g.op("Gemm", [x, g.const(f"{layer.name}_kernel", wt["kernel"]),
                                  g.const(f"{layer.name}_bias", wt["bias"])], layer.name)
            else:
                x = g.op("MatMul", [x, g.const(f"{layer.name}_kernel", wt["kernel"])],
                         layer.name)
        elif isinstance(layer, L.BatchNorm):
            x = g.op("BatchNormalization",
                     [x] + [g.const(f"{layer.name}_{p}", wt[p] if p in wt else np.full(
                                wt["moving_mean"].shape, float(p == "gamma"), np.float32))
                            for p in ("gamma", "beta", "moving_mean", "moving_variance")],
                     layer.name, epsilon=layer.epsilon)
        elif isinstance(layer, L.Rescaling):   # y = x * scale + offset
            x = g.op("Mul", [x, g.const(f"{layer.name}_scale", np.float32(layer.scale))])
            if layer.offset:
                x = g.op("Add", [x, g.const(f"{layer.name}_offset", np.float32(layer.offset))],
                         layer.name)
        elif isinstance(layer, (L.Dropout, L.Activation)):
            pass
        else:
            raise InteropError(f"layer {layer.name!r} ({layer.type}) has no ONNX export")
        x = g.activation(x, act, axis)
    n = model.output_shape[0]
    if model.output_activation == "sigmoid":
        p = g.op("Sigmoid", [x])
        if n == 1:
            p = g.op("Concat", [g.op("Sub", [g.const("one", 1.0), p]), p], axis=1)
    else:
        p = g.op("Softmax", [x], axis=1)
    g.nodes.append(onnx.helper.make_node("Identity", [p], ["probabilities"], name="output"))
    graph = onnx.helper.make_graph(
        g.nodes, model.name,
        [onnx.helper.make_tensor_value_info("pixels", onnx.TensorProto.FLOAT, in_dims)],
        [onnx.helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT,
                                            ["batch", model.num_classes])],
        g.inits)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="cnnlab", ir_version=8)
    proto.doc_string = (f"cnnlab model {model.name}: input 'pixels' float32 "
                        f"{'x'.join(map(str, in_dims))}, raw pixel values 0..255 "
                        "(preprocessing is inside the graph); output 'probabilities'.")
    onnx.helper.set_model_props(proto, {
        "class_names": json.dumps(model.meta.get("class_names")
                                  or [str(i) for i in range(model.num_classes)]),
        "preprocessing": json.dumps(prep), "input_layout": layout if image else "NC",
        "input_range": "0..255 (preprocessing in the graph)"})
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(model, path, layout="NHWC") -> Path:
    from ..atomic import atomic_writer
    proto = build_onnx(model, layout)
    path = Path(path)
    with atomic_writer(path) as f:
        f.write(proto.SerializeToString())
    return path
