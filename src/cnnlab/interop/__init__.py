"""Bridges to other tools: Keras model files in, Keras and ONNX files out.

    model, notes = import_keras("model.keras")      # also .h5, or model.json + weights .h5
    export_keras(model, "out.keras")
    export_onnx(model, "out.onnx")

Reading needs h5py only (no Keras, no TensorFlow); nothing in a file is executed.
"""
from __future__ import annotations

from .errors import LEAKY_SLOPE, InteropError
from .keras_export import export_keras
from .keras_import import import_keras, model_from_keras_config
from .onnx_export import export_onnx

__all__ = ["LEAKY_SLOPE", "InteropError", "export_keras", "export_onnx", "import_keras",
           "load_keras", "model_from_keras_config"]


def load_keras(path):
    """A cnnlab model from a Keras file (`cnnlab.load` calls this for .keras/.h5)."""
    return import_keras(path)[0]
