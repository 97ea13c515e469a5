"""cnnlab: define, train, inspect and serve convolutional networks for images."""
__version__ = "0.1.0"

from . import layers  # noqa: E402
from .layers import (Activation, AvgPool2D, BatchNorm, Conv2D, Dense, Dropout, Flatten,  # noqa: E402
                     GlobalAvgPool2D, GlobalMaxPool2D, Input, MaxPool2D, ModelError)
from .model import Sequential  # noqa: E402


def load(path):
    """Load a model file (.safetensors) or a run directory's model."""
    from .fileformat import load as _load
    return _load(path)


def __getattr__(name):  # lazy submodules that pull in heavier dependencies
    if name in ("datasets", "zoo", "train", "evaluate", "predict", "fileformat"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(name)
