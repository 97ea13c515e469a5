"""Predict classes for images: arrays or image files, converted as the training data was."""
from __future__ import annotations

import numpy as np

from .engines import get_engine
from .inputs import model_input


def predict_proba(model, images, engine="auto", batch_size=256, mode="auto") -> np.ndarray:
    """Class probabilities (N, classes) for images as `cnnlab.inputs.to_batch` takes them
    (paths, bytes, uint8 or [0, 1] float arrays); files go through `mode`."""
    x = model_input(model, images, mode)
    return get_engine(model, engine).predict_proba(x, batch_size)


def top_k(model, probs: np.ndarray, k: int = 3) -> list[list[tuple[str, float]]]:
    names = model.meta.get("class_names") or [str(i) for i in range(probs.shape[1])]
    order = np.argsort(-probs, axis=1)[:, :k]
    return [[(str(names[j]), float(p[j])) for j in row] for p, row in zip(probs, order)]
