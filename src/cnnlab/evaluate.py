"""Evaluate a model on a dataset's test split: loss, accuracy, per-class metrics."""
from __future__ import annotations

import numpy as np

from . import metrics
from .engines import get_engine
from .preprocess import apply, preprocessing_of


def _test_split(model, data, data_dir=None):
    from . import datasets
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = np.asarray(data[0]), np.asarray(data[1], np.int64)
        names = model.meta.get("class_names") or [str(i) for i in range(model.num_classes)]
        return x, y, names, "arrays"
    if isinstance(data, str):
        h, w, c = model.input_shape
        data = datasets.load(data, data_dir=data_dir, image_size=(h, w),
                             color="grayscale" if c == 1 else "rgb")
    return data.x_test, data.y_test, list(data.class_names), data.name


def evaluate(model, data="mnist-5k", *, engine="auto", batch_size=256, data_dir=None) -> dict:
    """{"accuracy", "loss", "per_class": [...], "confusion_matrix": [[...]], ...}."""
    x, y, names, name = _test_split(model, data, data_dir)
    if x.ndim == 3:
        x = x[..., None]
    if tuple(x.shape[1:]) != tuple(model.input_shape):
        raise ValueError(f"the data's images are {'x'.join(map(str, x.shape[1:]))} but the model "
                         f"expects {'x'.join(map(str, model.input_shape))}")
    eng = get_engine(model, engine)
    prep = preprocessing_of(model)
    probs = np.concatenate([eng.predict_proba(apply(prep, x[i:i + 2048]), batch_size)
                            for i in range(0, len(x), 2048)]) if len(x) else \
        np.zeros((0, model.num_classes), np.float32)
    pred = probs.argmax(1)
    k = max(model.num_classes, len(names))
    names = list(names) + [str(i) for i in range(len(names), k)]
    cm = metrics.confusion_matrix(y, pred, k)
    return {"dataset": name, "images": int(len(y)), "engine": eng.name,
            "accuracy": float((pred == y).mean()) if len(y) else 0.0,
            "loss": metrics.cross_entropy(probs, y),
            "per_class": metrics.per_class(cm, names),
            "confusion_matrix": cm.tolist(), "class_names": names,
            "most_confused": metrics.most_confused(cm, names)}
