"""What the interop modules share: their error, and the slope cnnlab's leaky_relu uses."""
from __future__ import annotations

from ..fileformat import ModelFileError

LEAKY_SLOPE = 0.2   # cnnlab's leaky_relu negative slope (Keras 3's activation default)


class InteropError(ModelFileError, ValueError):
    """A file that cannot be converted; the message names the file and the layer."""
