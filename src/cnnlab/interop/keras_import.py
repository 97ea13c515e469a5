"""Keras architectures -> cnnlab models (the import).

Formats: Keras 3 `.keras`, legacy full-model `.h5` (Keras 2, tf.keras, Keras 3's
model.save("x.h5")), and model.to_json() beside save_weights() (weights in either layout).
Sequential and single-chain Functional models map onto cnnlab's layers; channels_first
models are transposed to channels-last. Nothing in a file is executed: Lambda layers and
custom objects are refused by name.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .. import layers as L
from ..layers import ModelError
from ..model import Model
from .errors import LEAKY_SLOPE, InteropError
from .keras_files import (MAX_JSON_BYTES, is_h5, is_zip, open_h5, read_json,
                          read_keras_zip, store_for)

MAX_PARAMS = 300_000_000           # 1.2 GB of float32: far above any model cnnlab trains
CNNLAB_ACTIVATIONS = {"linear", "relu", "leaky_relu", "elu", "gelu", "sigmoid", "tanh",
                      "softplus", "softmax"}
SUPPORTED = ("InputLayer, Conv2D, MaxPooling2D, AveragePooling2D, GlobalAveragePooling2D, "
             "GlobalMaxPooling2D, Flatten, Dense, Dropout, SpatialDropout2D, "
             "BatchNormalization, Activation, ReLU, LeakyReLU (slope 0.2), ELU (alpha 1), "
             "Softmax, ZeroPadding2D (before a 'valid' Conv2D), Rescaling (first layer), "
             "Reshape (to one axis); augmentation layers (RandomFlip, ...) are left out")
ALIASES = {"Convolution2D": "Conv2D", "MaxPool2D": "MaxPooling2D",
           "AvgPool2D": "AveragePooling2D", "GlobalAvgPool2D": "GlobalAveragePooling2D",
           "GlobalMaxPool2D": "GlobalMaxPooling2D"}
SPATIAL = ("Conv2D", "MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D",
           "GlobalMaxPooling2D", "ZeroPadding2D")
MODEL_CLASSES = ("Sequential", "Functional", "Model")
# identity at inference: left out of the imported model (cnnlab augments in training)
INFERENCE_IDENTITY = ("RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation",
                      "RandomContrast", "RandomBrightness", "GaussianNoise", "GaussianDropout",
                      "AlphaDropout", "ActivityRegularization")


# architecture ---------------------------------------------------------------------------
def _refuse_code(entry_cls, name):
    if entry_cls == "Lambda":
        raise InteropError(f"layer {name!r} (Lambda) holds Python code; cnnlab never runs code "
                           f"from a file: rebuild that step with the supported layers "
                           f"({SUPPORTED})")
    if entry_cls == "TFOpLambda" or entry_cls.startswith(("TFOp", "SlicingOp")):
        raise InteropError(f"layer {name!r} ({entry_cls}) is a TensorFlow operation written "
                           "into the model; it is not supported")


def _layer_entries(config, what):
    """The Keras model config -> (model name, all layer entries, the entries in chain
    order)."""
    if not isinstance(config, dict):
        raise InteropError(f"{what}: the model config is not a JSON object")
    cls = config.get("class_name")
    cfg = config.get("config")
    if cls is None:
        raise InteropError(f"{what}: not a Keras model config (no class_name; a cnnlab .json "
                           "description is used as it is: cnnlab summary/train FILE.json)")
    if cls not in MODEL_CLASSES:
        raise InteropError(f"{what}: the file holds a {cls!r}, not a Sequential or Functional "
                           "model")
    if cls == "Sequential" and isinstance(cfg, list):  # Keras 2.0-2.2: config is the list
        cfg = {"layers": cfg}
    if not isinstance(cfg, dict) or not isinstance(cfg.get("layers"), list):
        raise InteropError(f"{what}: the model config has no layer list")
    raw = cfg["layers"]
    entries = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("config", {}), dict):
            raise InteropError(f"{what}: layer {i + 1} of the config is not an object")
        lcls = item.get("class_name")
        lcfg = item.get("config") or {}
        name = lcfg.get("name") or item.get("name") or f"layer_{i + 1}"
        if not isinstance(lcls, str):
            raise InteropError(f"{what}: layer {name!r} has no class name")
        _refuse_code(lcls, name)
        module = item.get("module")
        registered = item.get("registered_name")
        if (module is not None and not str(module).startswith("keras")) or (
                registered not in (None, lcls, f"keras>{lcls}")
                and not str(registered).startswith("keras")) or ">" in lcls:
            raise InteropError(f"layer {name!r} is a custom object ({registered or lcls}, "
                               f"module {module!r}); cnnlab reads only built-in Keras layers: "
                               f"{SUPPORTED}")
        entries.append({"class_name": ALIASES.get(lcls, lcls), "real_class": lcls,
                        "config": lcfg, "name": name, "raw": item})
    if cls == "Sequential":
        return cfg.get("name", "sequential"), entries, entries
    return cfg.get("name", "model"), entries, _linear_chain(cfg, entries, what)


def _history(obj, out):
    """Names of the layers feeding a Keras 3 node (keras_history anywhere inside)."""
    if isinstance(obj, dict):
        if obj.get("class_name") == "__keras_tensor__":
            out.append(obj["config"]["keras_history"][0])
            return
        for v in obj.values():
            _history(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _history(v, out)


def _inbound(entry):
    nodes = entry["raw"].get("inbound_nodes") or []
    if len(nodes) > 1:
        raise InteropError(f"layer {entry['name']!r} is used more than once (shared weights); "
                           "cnnlab models are a single chain of layers")
    if not nodes:
        return []
    node, names = nodes[0], []
    if isinstance(node, dict):                      # Keras 3
        _history(node.get("args", []), names)
    elif isinstance(node, list):                    # Keras 2: [[name, node, tensor, kwargs]]
        names = [item[0] for item in node if isinstance(item, list) and item]
    return names


def _names_of(spec):
    """Keras' input_layers/output_layers: [name, 0, 0] or [[name, 0, 0], ...]."""
    if isinstance(spec, list) and spec and isinstance(spec[0], str):
        return [spec[0]]
    return [s[0] for s in spec or [] if isinstance(s, list) and s]


def _linear_chain(cfg, entries, what):
    by_name = {e["name"]: e for e in entries}
    ins, outs = _names_of(cfg.get("input_layers")), _names_of(cfg.get("output_layers"))
    if len(ins) != 1 or len(outs) != 1:
        raise InteropError(f"{what}: the model has {len(ins)} inputs and {len(outs)} outputs; "
                           "cnnlab reads models with one input and one output")
    chain, name = [], outs[0]
    while True:
        if name not in by_name:
            raise InteropError(f"{what}: the config refers to a missing layer {name!r}")
        entry = by_name[name]
        if len(chain) > len(entries):
            raise InteropError(f"{what}: the layer graph has a cycle")
        chain.append(entry)
        parents = _inbound(entry)
        if name == ins[0]:
            break
        if len(parents) != 1:
            raise InteropError(f"layer {name!r} ({entry['real_class']}) takes {len(parents)} "
                               "inputs; cnnlab models are a single chain of layers "
                               "(no branches, no Add/Concatenate)")
        name = parents[0]
    return chain[::-1]


def _shape_of(cfg):
    for key in ("batch_shape", "batch_input_shape"):
        if cfg.get(key) is not None:
            return list(cfg[key])[1:]
    if cfg.get("shape") is not None:  # older Keras 3 InputLayer
        return list(cfg["shape"])
    if cfg.get("input_shape") is not None:
        return list(cfg["input_shape"])
    return None


def _activation(value, where):
    if isinstance(value, dict):  # a serialized function object
        inner = value.get("config")
        if value.get("class_name") == "function" and isinstance(inner, str) \
                and str(value.get("module", "keras")).startswith("keras"):
            value = inner
        else:
            raise InteropError(f"{where}: custom activation {value.get('class_name')!r} "
                               "is not supported")
    if value is None:
        return "linear"
    if value not in CNNLAB_ACTIVATIONS:
        raise InteropError(f"{where}: activation {value!r} is not supported; cnnlab has "
                           f"{', '.join(sorted(CNNLAB_ACTIVATIONS))}")
    return value


def _only_augmentation(cfg):
    """A nested Sequential of augmentation layers only (the tutorials' data_augmentation)."""
    inner = cfg.get("layers") if isinstance(cfg, dict) else None
    return isinstance(inner, list) and bool(inner) and all(
        isinstance(x, dict) and x.get("class_name") in INFERENCE_IDENTITY + ("InputLayer",)
        for x in inner)


def _ints(value, n, where):
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] * n
    if isinstance(value, (list, tuple)) and len(value) == n and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise InteropError(f"{where}: expected {n} integers, got {value!r}")


def _zero_padding(cfg, where):
    p = cfg.get("padding", 1)
    if isinstance(p, int):
        return (p, p), (p, p)
    if isinstance(p, (list, tuple)) and len(p) == 2:
        if all(isinstance(v, int) for v in p):
            return (p[0], p[0]), (p[1], p[1])
        return tuple(_ints(p[0], 2, where)), tuple(_ints(p[1], 2, where))
    raise InteropError(f"{where}: cannot read padding {p!r}")


class _Converter:
    """Keras layer entries -> cnnlab layers, with notes on what was folded or assumed."""

    def __init__(self, entries, what):
        self.what = what
        self.entries = entries
        self.layers: list = []          # cnnlab layers
        self.sources: list = []         # per cnnlab layer: (keras entry or None, flags)
        self.notes: list[str] = []
        self.preprocessing = None
        self.pending_pad = None         # "layer 'x' (ZeroPadding2D)" waiting for its Conv2D
        self.pad_value = None
        formats = {e["config"].get("data_format") or "channels_last"
                   for e in entries if e["class_name"] in SPATIAL}
        if len(formats) > 1:
            raise InteropError(f"{what}: the model mixes channels_first and channels_last "
                               "layers; cnnlab reads models with one data_format")
        self.channels_first = formats == {"channels_first"}
        self.rank = None                # rank of the Keras tensor (without batch)

    def add(self, layer, entry=None, **flags):
        if entry is not None and entry["config"].get("trainable") is False:
            layer.trainable = False
        self.layers.append(layer)
        self.sources.append((entry, flags))

    def run(self):
        entries = list(self.entries)
        shape = None
        if entries and entries[0]["class_name"] == "InputLayer":
            shape = _shape_of(entries.pop(0)["config"])
        elif entries:
            shape = _shape_of(entries[0]["config"])
        if shape is None:
            raise InteropError(f"{self.what}: the model has no input shape (build it with "
                               "keras.Input(shape=...) before saving)")
        if any(not isinstance(d, int) or d < 1 for d in shape):
            raise InteropError(f"{self.what}: input shape {shape} is not fixed; cnnlab needs "
                               "a fixed (height, width, channels)")
        if len(shape) == 3 and self.channels_first:
            shape = [shape[1], shape[2], shape[0]]
            self.notes.append("channels_first model: transposed to channels-last (NHWC)")
        self.rank = len(shape)
        if self.rank == 2:  # a grey image without channel axis, as in MNIST MLPs
            nxt = entries[0]["class_name"] if entries else None
            if nxt not in ("Flatten", "Reshape"):
                raise InteropError(f"{self.what}: a 2-D input {shape} must be followed by "
                                   "Flatten; cnnlab images are (height, width, channels)")
            shape = shape + [1]
            self.rank = 3
        if self.rank not in (1, 3):
            raise InteropError(f"{self.what}: input shape {shape} is neither an image "
                               "(H, W, C) nor a flat vector")
        self.input_shape = tuple(shape)
        i = 0
        while i < len(entries):
            i = self.convert(entries, i)
        if not self.layers:
            raise InteropError(f"{self.what}: the model has no layers after its input")

    def convert(self, entries, i) -> int:
        e = entries[i]
        cls, cfg, name = e["class_name"], e["config"], e["name"]
        where = f"layer {name!r} ({e['real_class']})"
        lname = name if re.fullmatch(r"[A-Za-z0-9_\-]+", name or "") else None
        if i > 0 and cls == "InputLayer":
            raise InteropError(f"{where}: a second input layer inside the model")
        if cls in INFERENCE_IDENTITY or (cls == "Sequential" and _only_augmentation(cfg)):
            self.notes.append(f"{name}: {e['real_class']} left out (it does nothing at "
                              "inference; use cnnlab's --augment when training)")
            return i + 1
        if cls in MODEL_CLASSES:
            raise InteropError(f"{where}: a model nested inside the model; cnnlab reads one "
                               "Sequential or linear Functional model (flatten it in Keras "
                               "first)")
        if cls == "Conv2D":
            if _ints(cfg.get("dilation_rate", 1), 2, where) != [1, 1]:
                raise InteropError(f"{where}: dilated convolutions are not supported")
            if cfg.get("groups", 1) != 1:
                raise InteropError(f"{where}: grouped convolutions are not supported")
            padding = cfg.get("padding", "valid")
            if padding not in ("valid", "same"):
                raise InteropError(f"{where}: padding {padding!r} is not supported")
            if self.pending_pad is not None:
                if padding != "valid":
                    raise InteropError(f"{self.pending_pad}: ZeroPadding2D folds only into a "
                                       "following Conv2D with padding 'valid'")
                padding = self.pad_value
                self.pending_pad = None
            self.need_rank(3, where)
            self.add(L.Conv2D(cfg["filters"], _ints(cfg["kernel_size"], 2, where),
                              _ints(cfg.get("strides", 1), 2, where), padding,
                              _activation(cfg.get("activation"), where),
                              cfg.get("use_bias", True), name=lname), e)
            return i + 1
        if self.pending_pad is not None:
            raise InteropError(f"{self.pending_pad}: ZeroPadding2D is supported only directly "
                               "before a Conv2D with padding 'valid'")
        if cls == "ZeroPadding2D":
            (t, b), (lft, r) = _zero_padding(cfg, where)
            if t != b or lft != r:
                raise InteropError(f"{where}: uneven padding ((top {t}, bottom {b}), "
                                   f"(left {lft}, right {r})) is not supported; cnnlab pads "
                                   "symmetrically")
            self.pending_pad, self.pad_value = where, (t if t == lft else [t, lft])
            self.notes.append(f"{name}: ZeroPadding2D folded into the next Conv2D's padding")
            return i + 1
        if cls in ("MaxPooling2D", "AveragePooling2D"):
            padding = cfg.get("padding", "valid")
            if padding not in ("valid", "same"):
                raise InteropError(f"{where}: padding {padding!r} is not supported")
            self.need_rank(3, where)
            pool = _ints(cfg.get("pool_size", 2), 2, where)
            strides = cfg.get("strides")
            layer_cls = L.MaxPool2D if cls == "MaxPooling2D" else L.AvgPool2D
            self.add(layer_cls(pool, None if strides is None else _ints(strides, 2, where),
                               padding, name=lname), e)
            return i + 1
        if cls in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
            if cfg.get("keepdims"):
                raise InteropError(f"{where}: keepdims=True is not supported")
            self.need_rank(3, where)
            self.rank = 1
            self.add((L.GlobalAvgPool2D if cls == "GlobalAveragePooling2D"
                      else L.GlobalMaxPool2D)(name=lname), e)
            return i + 1
        if cls in ("Flatten", "Reshape"):
            if cls == "Reshape":
                target = cfg.get("target_shape")
                if not (isinstance(target, (list, tuple)) and len(target) == 1):
                    raise InteropError(f"{where}: only a Reshape to one axis (a flatten) is "
                                       f"supported, got target_shape {target!r}")
            # Keras flattens in memory order; Flatten(data_format='channels_first') first
            # moves the channels last. cnnlab flattens (H, W, C).
            chw = self.channels_first and self.rank == 3 and not (
                cls == "Flatten" and cfg.get("data_format") == "channels_first")
            self.rank = 1
            self.add(L.Flatten(name=lname), e, chw=chw)
            return i + 1
        if cls == "Dense":
            if self.rank != 1:
                raise InteropError(f"{where}: Dense on an image tensor (per-pixel Dense) is not "
                                   "supported; put Flatten or a global pooling before it")
            self.add(L.Dense(cfg["units"], _activation(cfg.get("activation"), where),
                             cfg.get("use_bias", True), name=lname), e)
            return i + 1
        if cls in ("Dropout", "SpatialDropout2D"):
            if cls == "SpatialDropout2D":
                self.notes.append(f"{name}: SpatialDropout2D becomes Dropout (the same at "
                                  "inference)")
            self.add(L.Dropout(float(cfg.get("rate", 0.0)), name=lname), e)
            return i + 1
        if cls == "BatchNormalization":
            axis = cfg.get("axis", -1)
            axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
            ok = {1: (-1, 1), 3: (1,) if self.channels_first else (-1, 3)}[self.rank]
            if axis not in ok:
                raise InteropError(f"{where}: normalization over axis {axis} is not the "
                                   "channel axis; cnnlab normalizes channels")
            for flag in ("renorm", "synchronized"):
                if cfg.get(flag):
                    raise InteropError(f"{where}: {flag}=True is not supported")
            self.add(L.BatchNorm(float(cfg.get("momentum", 0.99)),
                                 float(cfg.get("epsilon", 1e-3)),
                                 center=bool(cfg.get("center", True)),
                                 scale=bool(cfg.get("scale", True)), name=lname), e)
            return i + 1
        if cls in ("Activation", "ReLU", "LeakyReLU", "ELU", "Softmax"):
            act = self.activation_layer(cls, cfg, where)
            if act == "softmax" and self.rank == 3 and self.channels_first:
                raise InteropError(f"{where}: softmax over the last axis of a channels_first "
                                   "image is not supported")
            self.add(L.Activation(act, name=lname), e)
            return i + 1
        if cls == "Rescaling":
            if self.layers or self.preprocessing is not None:   # inside the network
                scale, offset = cfg.get("scale", 1.0), cfg.get("offset", 0.0)
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           for v in (scale, offset)):
                    raise InteropError(f"{where}: a Rescaling after the first layer needs a "
                                       "single scale and offset")
                self.add(L.Rescaling(float(scale), float(offset), name=lname), e)
                return i + 1
            self.fold_rescaling(cfg, where)
            return i + 1
        raise InteropError(f"{where} is not supported; cnnlab reads: {SUPPORTED}")

    def need_rank(self, rank, where):
        if self.rank != rank:
            raise InteropError(f"{where}: needs an image input (H, W, C); it follows a "
                               "flattening layer")

    def activation_layer(self, cls, cfg, where):
        if cls == "Activation":
            return _activation(cfg.get("activation"), where)
        if cls == "Softmax":
            axis = cfg.get("axis", -1)
            if axis not in (-1, [-1], self.rank, [self.rank]):
                raise InteropError(f"{where}: softmax over axis {axis} is not supported "
                                   "(only the last axis)")
            return "softmax"
        if cls == "ELU":
            if abs(float(cfg.get("alpha", 1.0)) - 1.0) > 1e-7:
                raise InteropError(f"{where}: ELU alpha {cfg.get('alpha')} is not supported "
                                   "(cnnlab's elu has alpha 1)")
            return "elu"
        if cls == "LeakyReLU":
            slope = cfg.get("negative_slope", cfg.get("alpha", 0.3))
            if abs(float(slope) - LEAKY_SLOPE) > 1e-7:
                raise InteropError(f"{where}: negative slope {slope} is not supported; cnnlab's "
                                   f"leaky_relu has slope {LEAKY_SLOPE} (Keras 3's activation "
                                   "default; the LeakyReLU layer defaults to 0.3)")
            return "leaky_relu"
        # ReLU(max_value, negative_slope, threshold)
        mx, slope, th = cfg.get("max_value"), cfg.get("negative_slope", 0.0), \
            cfg.get("threshold", 0.0)
        if mx is not None or th not in (0, 0.0, None):
            raise InteropError(f"{where}: ReLU with max_value or threshold is not supported")
        if slope in (0, 0.0, None):
            return "relu"
        if abs(float(slope) - LEAKY_SLOPE) <= 1e-7:
            return "leaky_relu"
        raise InteropError(f"{where}: ReLU negative_slope {slope} is not supported (0 or 0.2)")

    def fold_rescaling(self, cfg, where):
        """x * s + o  ==  (x * 1/255 - mean) / std  with std = 1 / (255 s), mean = -o * std."""
        c = self.input_shape[-1]
        vals = []
        for key, default in (("scale", 1.0), ("offset", 0.0)):
            v = cfg.get(key, default)
            try:
                arr = np.asarray(v, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                arr = None
            if arr is None or arr.size not in (1, c):
                raise InteropError(f"{where}: {key} {v!r} must be a number or one per channel")
            if arr.size > 1 and self.channels_first:
                raise InteropError(f"{where}: a per-channel {key} in a channels_first model is "
                                   "not supported (Keras applies it by the global "
                                   "image_data_format)")
            vals.append(np.broadcast_to(arr, (c,)))
        scale, offset = vals
        if np.any(scale <= 0) or not np.all(np.isfinite(scale)) \
                or not np.all(np.isfinite(offset)):
            raise InteropError(f"{where}: scale must be positive and finite")
        std = 1.0 / (255.0 * scale)
        mean = -offset * std
        self.preprocessing = {"scale": 1 / 255, "mean": [float(m) for m in mean],
                              "std": [float(s) for s in std]}
        self.notes.append(f"Rescaling(scale={cfg.get('scale')}, offset={cfg.get('offset', 0.0)}) "
                          f"became the input preprocessing: mean {np.round(mean, 6).tolist()}, "
                          f"std {np.round(std, 6).tolist()} (on pixels / 255)")


# loading --------------------------------------------------------------------------------
def _read_array(ds, key, shape, what):
    if getattr(ds, "dtype", None) is None or ds.dtype.kind != "f":
        raise InteropError(f"{what}: weight {key} is not a float array "
                           f"(dtype {getattr(ds, 'dtype', '?')})")
    if tuple(ds.shape) != tuple(shape):
        raise InteropError(f"{what}: weight {key} has shape {tuple(ds.shape)}, the "
                           f"architecture needs {tuple(shape)}")
    try:
        arr = np.asarray(ds[()], dtype=np.float32)
    except (OSError, ValueError, KeyError) as e:
        raise InteropError(f"{what}: cannot read weight {key} (damaged or truncated file: "
                           f"{e})") from None
    if not np.all(np.isfinite(arr)):
        raise InteropError(f"{what}: weight {key} holds NaN or infinite values")
    return arr


def _architecture(config, what, init):
    """(Model, converter, all layer entries) from a Keras model config."""
    name, all_entries, entries = _layer_entries(config, what)
    conv = _Converter(entries, what)
    conv.run()
    if conv.pending_pad is not None:
        raise InteropError(f"{conv.pending_pad}: ZeroPadding2D at the end of the model")
    try:
        model = Model(conv.layers, name=re.sub(r"[^A-Za-z0-9_\-]", "_", str(name)) or
                      "sequential", input_shape=conv.input_shape, init=init)
    except ModelError as e:
        raise InteropError(f"{what}: {e}") from None
    return model, conv, all_entries


def model_from_keras_config(config, what="the Keras model config"):
    """(Model with fresh weights, notes) from a Keras `get_config()` / `to_json()` dict;
    a first Rescaling becomes the model's preprocessing."""
    model, conv, _ = _architecture(config, what, init=True)
    if conv.preprocessing is not None:
        model.meta["preprocessing"] = conv.preprocessing
    return model, conv.notes


def _build(config, h5, what, metadata=None, classes=None):
    model, conv, all_entries = _architecture(config, what, init=False)
    total = model.count_params()[0]
    if total > MAX_PARAMS:
        raise InteropError(f"{what}: the architecture has {total:,} parameters (limit "
                           f"{MAX_PARAMS:,})")
    store = store_for(h5, all_entries, what)
    shapes = model.param_shapes()
    weights, perm = {}, None
    for layer, (in_shape, _), (entry, flags) in zip(model.layers, model.layer_shapes,
                                                     conv.sources):
        if flags.get("chw"):      # channels_first flatten: Keras' order is (C, H, W)
            h, w, c = in_shape
            perm = np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).reshape(-1)
        if entry is None or not layer.param_shapes(in_shape):
            continue
        found = store.get(entry)
        for pname in layer.param_shapes(in_shape):
            key = f"{layer.name}.{pname}"
            if pname not in found:      # BatchNormalization(center=False/scale=False)
                weights[key] = (np.zeros if pname == "beta" else np.ones)(shapes[key],
                                                                          np.float32)
                continue
            arr = _read_array(found[pname], key, shapes[key], what)
            if perm is not None and (pname == "kernel" or isinstance(layer, L.BatchNorm)):
                arr = arr[perm]
            weights[key] = arr
        if isinstance(layer, L.Dense):
            perm = None
    if perm is not None:
        raise InteropError(f"{what}: the model ends in a channels_first flatten with no Dense "
                           "after it; its outputs are in (C, H, W) order")
    model.set_weights(weights)
    meta = {}
    saved = (metadata or {}).get("cnnlab") if isinstance(metadata, dict) else None
    saved = saved if isinstance(saved, dict) else {}
    n = model.num_classes
    names = classes if classes is not None else saved.get("class_names")
    if names is not None:
        names = [str(c) for c in names]
        if len(names) != n:
            raise InteropError(f"{what}: {len(names)} class names for a model with {n} "
                               "outputs")
    else:
        names = [str(i) for i in range(n)]
        conv.notes.append(f"no class names in the file: using 0..{n - 1} (set them with "
                          "--classes a,b,c)")
    meta["class_names"] = names
    if conv.preprocessing is not None:
        prep = conv.preprocessing
        sp = saved.get("preprocessing")
        if isinstance(sp, dict) and _same_prep(sp, prep):
            prep = sp   # cnnlab's own export: keep the exact statistics
        meta["preprocessing"] = prep
    else:
        c = model.input_shape[-1]
        meta["preprocessing"] = {"scale": 1 / 255, "mean": [0.0] * c, "std": [1.0] * c}
        conv.notes.append("no Rescaling layer: the model is taken to expect pixels / 255 "
                          "(inputs in [0, 1])")
    meta["source"] = {"format": "keras", "file": Path(what).name}
    model.meta = meta
    return model, conv.notes


def _same_prep(a, b):
    try:
        return all(np.allclose(np.asarray(a[k], float), np.asarray(b[k], float), rtol=1e-5,
                               atol=1e-7) for k in ("scale", "mean", "std"))
    except (KeyError, TypeError, ValueError):
        return False



def import_keras(path, weights=None, classes=None):
    """(cnnlab Model, notes) from a Keras file. Raises InteropError."""
    path = Path(path)
    if not path.is_file():
        raise InteropError(f"{path}: no such file")
    what = str(path)
    try:
        if path.suffix.lower() == ".keras" and not is_zip(path):
            raise InteropError(f"{path}: not a .keras file (not a zip archive, or truncated)")
        if is_zip(path):
            if weights:
                raise InteropError(f"{path}: a .keras file holds its weights; --weights goes "
                                   "with a .json architecture")
            config, h5, metadata = read_keras_zip(path)
            with h5:
                return _build(config, h5, what, metadata, classes)
        if path.suffix == ".json":
            config = read_json(path.read_bytes()[:MAX_JSON_BYTES + 1], what)
            _Converter(_layer_entries(config, what)[2], what).run()  # its errors name the JSON
            wpath = Path(weights) if weights else _guess_weights(path)
            if not is_h5(wpath):
                raise InteropError(f"{wpath}: not an HDF5 weights file")
            with open_h5(wpath) as h5:
                return _build(config, h5, str(wpath), None, classes)
        if is_h5(path):
            with open_h5(path) as h5:
                raw = h5.attrs.get("model_config")
                if raw is None:
                    raise InteropError(f"{path}: this HDF5 file holds weights only; give the "
                                       "architecture: cnnlab import model.json --weights "
                                       f"{path.name}")
                config = read_json(raw, f"{path}: model_config")
                if weights:
                    with open_h5(Path(weights)) as wh5:
                        return _build(config, wh5, str(weights), None, classes)
                return _build(config, h5, what, None, classes)
    except OSError as e:
        raise InteropError(f"{path}: cannot read: {e.strerror or e}") from None
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise InteropError(f"{path}: unexpected content in the Keras file ({type(e).__name__}: "
                           f"{e})") from None
    raise InteropError(f"{path}: not a Keras model file (.keras zip, .h5, or .json with "
                       "--weights)")


def _guess_weights(json_path: Path) -> Path:
    for cand in (json_path.with_suffix(".weights.h5"), json_path.with_suffix(".h5")):
        if cand.is_file():
            return cand
    raise InteropError(f"{json_path}: the JSON holds only the architecture; pass the weights "
                       "with --weights FILE.h5")
