"""Bridges to other tools: Keras model files in, Keras and ONNX files out.

    model, notes = import_keras("model.keras")      # also .h5, or model.json + weights .h5
    export_keras(model, "out.keras")
    export_onnx(model, "out.onnx")

Reading needs h5py only (no Keras, no TensorFlow); nothing in a file is executed.
"""
from __future__ import annotations

from ..fileformat import ModelFileError

LEAKY_SLOPE = 0.2   # cnnlab's leaky_relu negative slope (Keras 3's activation default)


class InteropError(ModelFileError, ValueError):
    """A file that cannot be converted; the message names the file and the layer."""


def import_keras(path, weights=None, classes=None):
    from .keras_import import import_keras as _imp
    return _imp(path, weights=weights, classes=classes)


def export_keras(model, path):
    from .keras_export import export_keras as _exp
    return _exp(model, path)


def export_onnx(model, path, layout="NHWC"):
    from .onnx_export import export_onnx as _exp
    return _exp(model, path, layout=layout)


def load_keras(path):
    """A cnnlab model from a Keras file (`cnnlab.load` calls this for .keras/.h5)."""
    return import_keras(path)[0]
