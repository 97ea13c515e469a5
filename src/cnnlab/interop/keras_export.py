"""cnnlab models -> Keras 3 `.keras` files (config.json, model.weights.h5, metadata.json),
written with h5py and zipfile; `keras.saving.load_model` reads them.

The written model takes raw pixel values 0..255: its first layer is a Rescaling that applies
the model file's preprocessing, (x * scale - mean) / std = x * (scale / std) - mean / std.
Class names and the exact preprocessing travel in metadata.json under "cnnlab".
"""
from __future__ import annotations

import datetime
import io
import json
import zipfile
from pathlib import Path

import numpy as np

from .. import layers as L
from .errors import InteropError
from .keras_files import h5py_module, snake_case

KERAS_VERSION = "3.15.1"   # the version the written files are tested with


def _dtype_cfg():
    return {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"},
            "registered_name": None}


def _klayer(cls, name, cfg, input_shape=None):
    out = {"module": "keras.layers", "class_name": cls,
           "config": {"name": name, "trainable": True, "dtype": _dtype_cfg(), **cfg},
           "registered_name": None}
    if input_shape is not None:
        out["build_config"] = {"input_shape": [None, *input_shape]}
    return out


def keras_layers(model):
    """[(Keras layer entry, [weight arrays in Keras order])] for a cnnlab model."""
    from ..preprocess import preprocessing_of
    out = []
    prep = preprocessing_of(model)
    c = model.input_shape[-1]
    if prep:  # (x * scale - mean) / std as Rescaling(scale', offset') on raw pixels
        std = np.asarray(prep["std"], np.float64)
        scale = np.broadcast_to(float(prep["scale"]) / std, (c,))
        offset = np.broadcast_to(-np.asarray(prep["mean"], np.float64) / std, (c,))
        sc = float(scale[0]) if np.all(scale == scale[0]) else [float(v) for v in scale]
        of = float(offset[0]) if np.all(offset == offset[0]) else [float(v) for v in offset]
        out.append((_klayer("Rescaling", "rescaling_input", {"scale": sc, "offset": of}), []))
    for layer, (in_shape, _) in zip(model.layers, model.layer_shapes):
        w = [model.weights[f"{layer.name}.{p}"] for p in layer.param_shapes(in_shape)]
        if isinstance(layer, L.Conv2D):
            pad = layer.padding
            if pad not in ("valid", "same"):
                if pad == "full":
                    kh, kw = layer.kernel_size
                    ph, pw = kh - 1, kw - 1
                else:
                    ph, pw = L._pair(pad, "padding")
                out.append((_klayer("ZeroPadding2D", f"{layer.name}_pad",
                                    {"padding": [[ph, ph], [pw, pw]],
                                     "data_format": "channels_last"}), []))
                in_shape = (in_shape[0] + 2 * ph, in_shape[1] + 2 * pw, in_shape[2])
                pad = "valid"
            cfg = {"filters": layer.filters, "kernel_size": list(layer.kernel_size),
                   "strides": list(layer.strides), "padding": pad,
                   "data_format": "channels_last", "dilation_rate": [1, 1], "groups": 1,
                   "activation": layer.activation, "use_bias": layer.use_bias}
            out.append((_klayer("Conv2D", layer.name, cfg, in_shape), w))
        elif isinstance(layer, (L.MaxPool2D, L.AvgPool2D)):
            cls = "MaxPooling2D" if isinstance(layer, L.MaxPool2D) else "AveragePooling2D"
            out.append((_klayer(cls, layer.name, {
                "pool_size": list(layer.pool_size), "padding": layer.padding,
                "strides": list(layer.strides), "data_format": "channels_last"}), []))
        elif isinstance(layer, (L.GlobalAvgPool2D, L.GlobalMaxPool2D)):
            # (GlobalMaxPool2D subclasses GlobalAvgPool2D: test the type name)
            cls = "GlobalMaxPooling2D" if layer.type == "GlobalMaxPool2D" \
                else "GlobalAveragePooling2D"
            out.append((_klayer(cls, layer.name, {"data_format": "channels_last",
                                                  "keepdims": False}), []))
        elif isinstance(layer, L.Flatten):
            out.append((_klayer("Flatten", layer.name, {"data_format": "channels_last"}), []))
        elif isinstance(layer, L.Dense):
            out.append((_klayer("Dense", layer.name, {
                "units": layer.units, "activation": layer.activation,
                "use_bias": layer.use_bias}, in_shape), w))
        elif isinstance(layer, L.Dropout):
            out.append((_klayer("Dropout", layer.name, {"rate": layer.rate, "seed": None,
                                                        "noise_shape": None}), []))
        elif isinstance(layer, L.BatchNorm):
            out.append((_klayer("BatchNormalization", layer.name, {
                "axis": -1, "momentum": layer.momentum, "epsilon": layer.epsilon,
                "center": layer.center, "scale": layer.scale}, in_shape), w))
        elif isinstance(layer, L.Activation):
            out.append((_klayer("Activation", layer.name, {"activation": layer.activation}),
                        []))
        elif isinstance(layer, L.Rescaling):
            out.append((_klayer("Rescaling", layer.name, {"scale": layer.scale,
                                                          "offset": layer.offset}), []))
        else:
            raise InteropError(f"layer {layer.name!r} ({layer.type}) has no Keras export")
        out[-1][0]["config"]["trainable"] = layer.trainable
    return out


def export_keras(model, path) -> Path:
    """Write a Keras 3 .keras file (config.json, model.weights.h5, metadata.json)."""
    from ..atomic import atomic_writer
    from ..preprocess import preprocessing_of
    h5py = h5py_module()
    path = Path(path)
    entries = keras_layers(model)
    inp = {"module": "keras.layers", "class_name": "InputLayer",
           "config": {"batch_shape": [None, *model.input_shape], "dtype": "float32",
                      "sparse": False, "ragged": False, "name": "input_layer",
                      "optional": False}, "registered_name": None}
    config = {"module": "keras", "class_name": "Sequential",
              "config": {"name": model.name, "trainable": True, "dtype": _dtype_cfg(),
                         "layers": [inp] + [e for e, _ in entries]},
              "registered_name": None,
              "build_config": {"input_shape": [None, *model.input_shape]}}
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        layers_g = f.create_group("layers")
        used = {}
        for entry, arrays in entries:
            base = snake_case(entry["class_name"])
            k = used.get(base)
            used[base] = 0 if k is None else k + 1
            g = layers_g.create_group(base if k is None else f"{base}_{k + 1}")
            v = g.create_group("vars")
            v.attrs["name"] = entry["config"]["name"]
            for i, arr in enumerate(arrays):
                v.create_dataset(str(i), data=np.asarray(arr, np.float32))
        f.create_group("vars").attrs["name"] = model.name
    metadata = {"keras_version": KERAS_VERSION,
                "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
                "cnnlab": {"class_names": model.meta.get("class_names"),
                           "preprocessing": preprocessing_of(model)}}
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("metadata.json", json.dumps(metadata))
        z.writestr("config.json", json.dumps(config))
        z.writestr("model.weights.h5", buf.getvalue())
    with atomic_writer(path) as f:
        f.write(zbuf.getvalue())
    return path
