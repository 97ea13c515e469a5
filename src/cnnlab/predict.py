"""Predict classes for images: arrays or image files, converted as the training data was."""
from __future__ import annotations

import os

import numpy as np

from .engines import get_engine
from .preprocess import apply, preprocessing_of


def as_batch(model, images) -> np.ndarray:
    """Images -> (N, H, W, C): a path, a list of paths, one image array or a batch."""
    from .datasets import load_image
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], (str, os.PathLike)):
        return np.stack([load_image(p, model.input_shape) for p in images])
    x = np.asarray(images)
    if x.ndim == len(model.input_shape) - 1 or (x.ndim == 3 and x.shape == tuple(model.input_shape)):
        x = x.reshape(1, *model.input_shape) if x.size == np.prod(model.input_shape) else x[None]
    if x.ndim == 3 and model.input_shape[-1] == 1:
        x = x[..., None]
    if tuple(x.shape[1:]) != tuple(model.input_shape):
        raise ValueError(f"images of shape {x.shape[1:]} do not fit the model's input "
                         f"{tuple(model.input_shape)}")
    return x


def predict_proba(model, images, engine="auto", batch_size=256) -> np.ndarray:
    x = as_batch(model, images)
    eng = get_engine(model, engine)
    return eng.predict_proba(apply(preprocessing_of(model), x), batch_size)


def top_k(model, probs: np.ndarray, k: int = 3) -> list[list[tuple[str, float]]]:
    names = model.meta.get("class_names") or [str(i) for i in range(probs.shape[1])]
    order = np.argsort(-probs, axis=1)[:, :k]
    return [[(str(names[j]), float(p[j])) for j in row] for p, row in zip(probs, order)]
