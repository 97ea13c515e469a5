"""One path from images to a model's input, for predict, evaluate, the report, the server
and training.

    x = to_batch(model, ["a.png", "b.jpg"])       # uint8 (N, H, W, C), as the model expects
    x = to_batch(model, array)                   # arrays pass through, shape-checked
    z = model_input(model, images_or_paths)      # float32, normalized as in training

Files (paths or bytes) go through `inputs.drawing.prepare`: for a model of handwriting
(28x28x1) the steps that made MNIST ("drawing" mode), else a plain resize ("resize");
`mode="auto"` chooses as `cnnlab predict --mode` does. Arrays are uint8 pixels or floats
in [0, 1]: one image (H, W[, C]) or a batch (N, H, W[, C]).
"""
from __future__ import annotations

import os

import numpy as np

from ..preprocess import apply, preprocessing_of
from .drawing import MODES, ImageInputError, prepare

__all__ = ["MODES", "ImageInputError", "color_of", "to_batch", "model_input", "read_file",
           "as_batch"]


def color_of(input_shape) -> str:
    """The colour mode data is converted to for an input shape: 'grayscale' or 'rgb'."""
    return "grayscale" if input_shape[-1] == 1 else "rgb"


def read_file(model, path, mode: str = "auto") -> np.ndarray:
    """One image file (path or bytes) -> uint8 (H, W, C) for `model`.
    Raises ImageInputError (naming the file) for unreadable or blank images."""
    name = "image" if isinstance(path, (bytes, bytearray)) else str(path)
    if isinstance(path, (bytes, bytearray)):
        data = bytes(path)
    else:
        with open(path, "rb") as f:
            data = f.read()
    try:
        image, _ = prepare(model, data, mode)
    except ImageInputError as e:
        raise ImageInputError(f"{name}: {e}") from None
    if image is None:
        raise ImageInputError(f"{name}: the image is blank: nothing to classify")
    return image


def _is_files(images) -> bool:
    if isinstance(images, (str, os.PathLike, bytes, bytearray)):
        return True
    return isinstance(images, (list, tuple)) and len(images) > 0 and all(
        isinstance(p, (str, os.PathLike, bytes, bytearray)) for p in images)


def check_pixels(x: np.ndarray) -> np.ndarray:
    """Images are uint8 pixels or floats in [0, 1] (as Keras tutorials divide by 255);
    anything else is refused rather than misread (ValueError)."""
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"images must be uint8 pixels or floats in [0, 1], got {x.dtype}")
    if x.size and not (np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
        raise ValueError(f"float images must be in [0, 1] (got {np.nanmin(x):g} .. "
                         f"{np.nanmax(x):g}); pass uint8 pixels or divide by 255")
    return x


def as_batch(images, input_shape=None) -> np.ndarray:
    """Arrays -> (N, H, W, C): a single image gets N = 1, a grey (N, H, W) batch gets C = 1.
    With input_shape the result must fit it (ValueError otherwise)."""
    x = check_pixels(np.asarray(images))
    shape = None if input_shape is None else tuple(input_shape)
    if x.ndim == 2:
        x = x[None, ..., None]
    elif x.ndim == 3:
        x = x[None] if (shape is None or x.shape == shape) else x[..., None]
    if shape is not None and tuple(x.shape[1:]) != shape:
        raise ValueError(f"images are {'x'.join(map(str, x.shape[1:]))} but the model "
                         f"expects {'x'.join(map(str, shape))}")
    return x


def to_batch(model, images, mode: str = "auto") -> np.ndarray:
    """Paths, bytes or arrays -> a batch (N, H, W, C) for `model`: uint8 (files, uint8
    arrays) or float in [0, 1] (float arrays)."""
    if _is_files(images):
        paths = [images] if isinstance(images, (str, os.PathLike, bytes, bytearray)) else images
        return np.stack([read_file(model, p, mode) for p in paths])
    return as_batch(images, model.input_shape)


def model_input(model, images, mode: str = "auto") -> np.ndarray:
    """Images (as `to_batch` takes them) -> float32 input, normalized as in training."""
    return apply(preprocessing_of(model), to_batch(model, images, mode))
