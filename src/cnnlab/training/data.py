"""The data of a run: training, validation and test images as uint8 arrays, the class
names and the preprocessing statistics that travel in the model file."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import datasets
from ..inputs import check_pixels, color_of
from ..preprocess import make_preprocessing
from .config import TrainConfig, TrainingError


@dataclass
class Prepared:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    class_names: list
    name: str
    val_source: str = ""
    preprocessing: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)   # what loading decided (sizes, conversions)


def arrays_to_uint8(x, y):
    """Keras-style arrays -> uint8 (N, H, W, C) images and int64 labels: images as uint8
    or floats in [0, 1]; labels as integers (N,) or one-hot rows (N, K)."""
    x, y = np.asarray(x), np.asarray(y)
    if y.ndim == 2:   # one-hot rows, as Keras' to_categorical makes them
        y = y.argmax(1)
    if y.ndim != 1 or len(y) != len(x):
        raise TrainingError(f"labels must be (N,) integers or (N, classes) one-hot rows "
                            f"for {len(x)} images, got shape {np.shape(y)}")
    if x.dtype != np.uint8:
        try:
            x = check_pixels(np.asarray(x, np.float32))
        except ValueError as e:
            raise TrainingError(str(e)) from None
        x = np.round(x * 255).astype(np.uint8)
    if x.ndim == 3:
        x = x[..., None]
    return x, y.astype(np.int64)


def load_dataset(data, cfg: TrainConfig, input_shape):
    """(name, x_train, y_train, x_test, y_test, class names, notes) from a name, a folder,
    a Dataset or an (x, y) pair, converted to the model's input size and colour."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = arrays_to_uint8(*data)
        n_cls = int(y.max()) + 1 if len(y) else 0
        return "arrays", x, y, None, None, [str(i) for i in range(n_cls)], []
    if isinstance(data, (str, os.PathLike)):
        data = datasets.load(str(data), data_dir=cfg.data_dir,
                             image_size=tuple(input_shape[:2]), color=color_of(input_shape))
    return (data.name, data.x_train, data.y_train, data.x_test, data.y_test,
            list(data.class_names), list(getattr(data, "notes", [])))


def prepare_data(data, cfg: TrainConfig, input_shape, validation_data=None) -> Prepared:
    """Load the dataset, split validation data (or take `validation_data`, an (x, y) pair,
    as Keras' fit does), compute standardization statistics."""
    name, xt, yt, xs, ys, class_names, notes = load_dataset(data, cfg, input_shape)
    if tuple(xt.shape[1:]) != tuple(input_shape):
        raise TrainingError(f"the data's images are {'x'.join(map(str, xt.shape[1:]))} but the "
                            f"model expects {'x'.join(map(str, input_shape))}; build the model "
                            f"with Input(shape={tuple(xt.shape[1:])})")
    if validation_data is not None:
        if cfg.val_split > 0:
            raise TrainingError("give validation_data or val_split, not both")
        if not (isinstance(validation_data, (tuple, list)) and len(validation_data) == 2):
            raise TrainingError("validation_data is an (x, y) pair of arrays")
        xv, yv = arrays_to_uint8(*validation_data)
        if tuple(xv.shape[1:]) != tuple(input_shape):
            raise TrainingError(f"validation_data images are {'x'.join(map(str, xv.shape[1:]))}"
                                f" but the model expects {'x'.join(map(str, input_shape))}")
        val_source = f"validation_data: {len(xv):,} images"
    elif cfg.val_split > 0:
        rng = np.random.default_rng(cfg.seed)
        perm = rng.permutation(len(xt))
        n_val = max(1, int(round(len(xt) * cfg.val_split)))
        vi, ti = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        xv, yv, xt, yt = xt[vi], yt[vi], xt[ti], yt[ti]
        val_source = f"{len(xv):,} images split from the training data ({cfg.val_split:g})"
    elif xs is not None:
        xv, yv = xs, ys
        val_source = "the test split (as the tutorials do)"
    else:
        xv = yv = None
        val_source = "none"
    if cfg.standardize:
        mean, std = datasets.channel_stats(xt)
        prep = make_preprocessing(mean, np.maximum(std, 1e-3), input_shape[2])
    else:
        prep = make_preprocessing(channels=input_shape[2])
    as_int = lambda a: None if a is None else np.asarray(a, np.int64)  # noqa: E731
    return Prepared(xt, as_int(yt), xv, as_int(yv), xs, as_int(ys), class_names, name,
                    val_source, prep, notes)


def data_name(data) -> str:
    """How config.json names the data: a dataset name, or a folder's absolute path."""
    if isinstance(data, (tuple, list)):
        return "arrays"
    if isinstance(data, (str, os.PathLike)):
        name = str(data)
    else:
        name = data.name if data.name in datasets.DATASETS else \
            str(getattr(data, "source", data.name))
    if name not in datasets.DATASETS and Path(name).is_dir():
        return str(Path(name).resolve())
    return name
