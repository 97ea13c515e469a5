"""Preprocessing helpers on uint8 image arrays (numpy only)."""
from __future__ import annotations

import numpy as np

CHUNK_IMAGES = 4096


def to_float(x: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [0, 1] (x / 255)."""
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise TypeError(f"to_float expects uint8 images, got {x.dtype}")
    out = x.astype(np.float32)
    np.divide(out, 255.0, out=out)
    return out


def channel_stats(x: np.ndarray, chunk: int = CHUNK_IMAGES) -> tuple:
    """Per-channel mean and (population) std of uint8 (N, ..., C) images on the [0, 1] scale.

    Exact: built from per-chunk histograms of the 256 grey levels, so memory stays
    at one chunk of one channel whatever N is. Returns two float64 arrays of shape (C,).
    """
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim < 2:
        raise TypeError(f"channel_stats expects uint8 (N, ..., C) images, got {x.dtype} {x.shape}")
    c = x.shape[-1]
    hist = np.zeros((c, 256), dtype=np.int64)
    for start in range(0, len(x), chunk):
        block = x[start:start + chunk]
        for ch in range(c):
            hist[ch] += np.bincount(block[..., ch].ravel(), minlength=256)
    n = hist.sum(axis=1)
    if not n.all():
        raise ValueError("channel_stats needs at least one image")
    levels = np.arange(256, dtype=np.float64) / 255.0
    mean = hist @ levels / n
    var = hist @ (levels ** 2) / n - mean ** 2
    return mean, np.sqrt(np.maximum(var, 0.0))
