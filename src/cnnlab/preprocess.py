"""Preprocessing shared by training and prediction (NumPy only).

x = (pixels / 255 - mean) / std per channel; mean 0 and std 1 when the model was
trained without standardization. The statistics travel in the model file
(`model.meta["preprocessing"]`), so prediction uses exactly what training used.
"""
from __future__ import annotations

import numpy as np


def make_preprocessing(mean=None, std=None, channels=1) -> dict:
    mean = [0.0] * channels if mean is None else [float(m) for m in mean]
    std = [1.0] * channels if std is None else [float(s) for s in std]
    return {"scale": 1 / 255, "mean": mean, "std": std}


def preprocessing_of(model) -> dict:
    return model.meta.get("preprocessing") or make_preprocessing(channels=model.input_shape[-1])


def apply(prep: dict, x) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 normalized. Float input is taken as already in [0, 1]."""
    x = np.asarray(x)
    x = x.astype(np.float32) * np.float32(prep["scale"]) if x.dtype == np.uint8 \
        else x.astype(np.float32, copy=False)
    mean = np.asarray(prep["mean"], np.float32)
    std = np.asarray(prep["std"], np.float32)
    if np.any(mean != 0) or np.any(std != 1):
        x = (x - mean) / std
    return x
