"""Classification metrics from labels and predictions (NumPy only)."""
from __future__ import annotations

import numpy as np


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """cm[i, j] = number of images of true class i predicted as class j."""
    idx = np.asarray(y_true, np.int64) * num_classes + np.asarray(y_pred, np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class(cm: np.ndarray, class_names) -> list[dict]:
    """precision = TP / predicted, recall = TP / actual, F1 = harmonic mean (0 when undefined)."""
    tp = np.diag(cm).astype(np.float64)
    predicted, actual = cm.sum(0), cm.sum(1)
    prec = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    rec = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros_like(tp), where=(prec + rec) > 0)
    return [{"class": str(name), "precision": float(p), "recall": float(r), "f1": float(f),
             "support": int(s)}
            for name, p, r, f, s in zip(class_names, prec, rec, f1, actual)]


def cross_entropy(probs: np.ndarray, y) -> float:
    """Mean of -log p[true class], with p clipped to [1e-7, 1] (as Keras)."""
    p = probs[np.arange(len(y)), np.asarray(y, np.int64)]
    return float(-np.log(np.clip(p, 1e-7, 1.0)).mean()) if len(y) else 0.0


def most_confused(cm: np.ndarray, class_names, top: int = 5) -> list[tuple[str, str, int]]:
    """The largest off-diagonal cells: (true, predicted, count)."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(off, axis=None)[::-1][:top]
    out = []
    for flat in order:
        i, j = divmod(int(flat), cm.shape[0])
        if off[i, j] > 0:
            out.append((str(class_names[i]), str(class_names[j]), int(off[i, j])))
    return out
