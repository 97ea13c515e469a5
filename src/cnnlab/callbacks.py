"""Keras-style callbacks for fit(): `from cnnlab.callbacks import EarlyStopping, ...`."""
from .training.callbacks import *  # noqa: F401,F403
from .training.callbacks import __all__  # noqa: F401
