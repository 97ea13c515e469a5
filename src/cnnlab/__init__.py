"""cnnlab: define, train, inspect and serve convolutional networks for images.

    import cnnlab
    from cnnlab.layers import Input, Conv2D, MaxPool2D, Flatten, Dense
    model = cnnlab.Sequential([Input((28, 28, 1)), Conv2D(6, 3, activation="relu"), ...])

Names load on first use (PEP 562), so `cnnlab --help` starts without numpy or torch.
"""
from __future__ import annotations

import importlib

from .version import __version__

_LAYERS = ("Activation", "AvgPool2D", "BatchNorm", "Conv2D", "Dense", "Dropout", "Flatten",
           "GlobalAvgPool2D", "GlobalMaxPool2D", "Input", "MaxPool2D", "ModelError")
_NAMES = {"Sequential": "api", "load": "api", **{n: "layers" for n in _LAYERS}}
_MODULES = ("api", "callbacks", "datasets", "engines", "evaluate", "fileformat", "inputs",
            "inspect", "interop", "layers", "losses", "model", "predict", "training", "zoo")
__all__ = ["__version__", *_NAMES, *_MODULES]


def __getattr__(name):
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'cnnlab' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
