"""Evaluate a model on a dataset's test split: loss, accuracy, per-class metrics.

The loss is the one the model was trained with (`model.meta["loss"]`, categorical
cross-entropy by default), computed on the logits as in training, so it equals the
history's `val_loss` on the same data and the model file's `test_loss`.
"""
from __future__ import annotations

import numpy as np

from . import datasets, metrics
from .augment import TTA_LEVELS, tta_logits
from .engines import get_engine
from .engines.base import evaluate_logits, predicted_classes
from .hardware import auto_precision
from .inputs import as_batch, color_of, model_input
from .losses import loss_of, resolve_loss


def _test_split(model, data, data_dir=None):
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = np.asarray(data[0]), np.asarray(data[1], np.int64)
        if y.ndim == 2:
            y = y.argmax(1)
        names = model.meta.get("class_names") or [str(i) for i in range(model.num_classes)]
        return as_batch(x, model.input_shape), y, names, "arrays"
    if isinstance(data, str):
        h, w, _ = model.input_shape
        data = datasets.load(data, data_dir=data_dir, image_size=(h, w),
                             color=color_of(model.input_shape))
    x = data.x_test
    if tuple(x.shape[1:]) != tuple(model.input_shape):
        raise ValueError(f"the data's images are {'x'.join(map(str, x.shape[1:]))} but the model "
                         f"expects {'x'.join(map(str, model.input_shape))}")
    return x, data.y_test, list(data.class_names), data.name


def evaluate(model, data="mnist-5k", *, engine="auto", batch_size=256, data_dir=None,
             tta: int = 0, precision: str = "fp32") -> dict:
    """{"accuracy", "loss", "loss_name", "top5_accuracy" (over 5 classes), "per_class",
    "confusion_matrix", "class_names", "most_confused", "tta", ...} on the test split.

    tta: test-time augmentation (cnnlab.augment.tta_logits): 0 none, 1 the mean logits of
    each image and its mirror, 2 also of 1-pixel shifts (airbench's).
    precision: "bf16" runs the torch engine's forward under bf16 autocast, "auto" where the
    hardware runs bf16 natively (cnnlab.hardware); the NumPy engine computes in float32."""
    if tta not in TTA_LEVELS:
        raise ValueError(f"tta must be one of {', '.join(map(str, TTA_LEVELS))}, got {tta!r}")
    x, y, names, name = _test_split(model, data, data_dir)
    eng = get_engine(model, engine)
    if eng.name == "torch" and precision != "fp32":
        eng.precision = precision if precision != "auto" else auto_precision(eng.device).precision
    loss_name = loss_of(model)
    kind = resolve_loss(loss_name, model)
    chunk = 2048
    logits = [tta_logits(eng.forward, model_input(model, x[i:i + chunk]), tta)
              for i in range(0, len(x), chunk)]
    z = np.concatenate(logits) if logits else np.zeros((0, model.output_shape[-1]), np.float32)
    res = evaluate_logits(model, lambda zb: zb, z, y, kind, batch_size=len(z) or 1)
    pred = predicted_classes(model, z)
    k = max(model.num_classes, len(names))
    names = list(names) + [str(i) for i in range(len(names), k)]
    cm = metrics.confusion_matrix(y, pred, k)
    return {"dataset": name, "images": int(len(y)), "engine": eng.name, "tta": tta,
            **res, "loss_name": loss_name,
            "per_class": metrics.per_class(cm, names),
            "confusion_matrix": cm.tolist(), "class_names": names,
            "most_confused": metrics.most_confused(cm, names)}

