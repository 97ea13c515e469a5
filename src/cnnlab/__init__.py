"""cnnlab: define, train, inspect and serve convolutional networks for images."""
from .version import __version__  # noqa: E402,F401

from . import layers  # noqa: E402
from .api import Sequential, load  # noqa: E402
from .layers import (Activation, AvgPool2D, BatchNorm, Conv2D, Dense, Dropout, Flatten,  # noqa: E402
                     GlobalAvgPool2D, GlobalMaxPool2D, Input, MaxPool2D, ModelError)

__all__ = ["Sequential", "load", "layers", "Activation", "AvgPool2D", "BatchNorm", "Conv2D",
           "Dense", "Dropout", "Flatten", "GlobalAvgPool2D", "GlobalMaxPool2D", "Input",
           "MaxPool2D", "ModelError"]


def __getattr__(name):  # submodules that pull in heavier dependencies load when asked for
    if name in ("datasets", "zoo", "training", "evaluate", "predict", "fileformat", "inspect",
                "inputs", "engines"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(name)
