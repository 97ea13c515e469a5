"""Figures about a model's results: training curves, confusion matrix, per-class
metrics, prediction grids, top-loss mistakes, feature maps and first-layer filters.

Every function returns its numbers together with a `matplotlib.figure.Figure`
(made without pyplot, so nothing stays open; `fig.savefig("x.png")` renders with Agg).
"""
from __future__ import annotations

import csv
import math
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from .. import metrics
from ._common import (conv_layers, engine_for, hide_axes, layer_index, layer_label, show,
                      to_input, to_pixels)

RIGHT, WRONG = "#1a7f37", "#cf222e"


class WrappedFigure(Figure):
    """A Figure whose suptitle wraps to the figure's width instead of running off its edges."""

    def suptitle(self, t, **kwargs):
        size = kwargs.get("fontsize", 12)
        size = size if isinstance(size, (int, float)) else 12
        chars = max(24, int(self.get_figwidth() * 72 / (0.62 * size)))
        t = "\n".join(textwrap.fill(line, chars) for line in str(t).split("\n"))
        return super().suptitle(t, **kwargs)


def new_figure(width, height) -> Figure:
    return WrappedFigure(figsize=(width, height), layout="constrained", dpi=100)


# training history ------------------------------------------------------------------------
def read_history(history) -> dict[str, np.ndarray]:
    """A run's history as {column: array}: from a run directory, a history.csv path,
    a list of per-epoch dicts (what `fit` returns) or a dict of lists."""
    if isinstance(history, (str, Path)):
        path = Path(history)
        path = path / "history.csv" if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"{path}: no such history file")
        with open(path, newline="") as f:
            history = list(csv.DictReader(f))
    if isinstance(history, dict):
        return {k: np.asarray(v, np.float64) for k, v in history.items()}
    cols = {}
    for row in history:
        for k, v in row.items():
            cols.setdefault(k, []).append(np.nan if v in (None, "") else float(v))
    return {k: np.asarray(v, np.float64) for k, v in cols.items()}


def training_curves(history):
    """Loss and accuracy per epoch, training and validation -> (columns, fig)."""
    h = read_history(history)
    if not h:
        raise ValueError("the history is empty")
    n = len(next(iter(h.values())))
    epochs = h.get("epoch", np.arange(1, n + 1))
    fig = new_figure(11, 4)
    axes = fig.subplots(1, 2)
    marker = "o" if n <= 30 else None
    for ax, key, title in ((axes[0], "loss", "Loss"),
                           (axes[1], "accuracy", "Accuracy")):
        for k, label, color in ((key, "training", "#0969da"), (f"val_{key}", "validation",
                                                                "#bf3989")):
            if k in h and np.isfinite(h[k]).any():
                ax.plot(epochs, h[k], marker=marker, ms=3, color=color, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    if "val_accuracy" in h and np.isfinite(h["val_accuracy"]).any():
        best = int(np.nanargmax(h["val_accuracy"]))
        right = best >= n / 2   # the label goes inward, never over the axis edge
        axes[1].annotate(f"best {h['val_accuracy'][best]:.4f}\n(epoch {int(epochs[best])})",
                         (epochs[best], h["val_accuracy"][best]),
                         xytext=(-12 if right else 12, -40), textcoords="offset points",
                         ha="right" if right else "left", fontsize=9,
                         arrowprops={"arrowstyle": "->", "color": "gray"})
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
        if n == 1:   # one epoch: one tick, not 0.96 ... 1.04
            ax.set_xticks([float(epochs[0])])
    fig.suptitle("Training curves", fontweight="bold")
    return h, fig


# confusion matrix and per-class metrics ------------------------------------------------------
def _matrix_panel(ax, values, names, title, fmt, vmax):
    k = len(names)
    ax.imshow(values, cmap="Blues", vmin=0, vmax=vmax)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                v = values[i, j]
                if v:
                    ax.text(j, i, fmt(v), ha="center", va="center", fontsize=8 if k > 10 else 9,
                            color="white" if v > 0.55 * vmax else "black")
    ticks = np.arange(k)
    ax.set_xticks(ticks, names, rotation=45 if max(map(len, names)) > 2 else 0,
                  ha="right" if max(map(len, names)) > 2 else "center", fontsize=9)
    ax.set_yticks(ticks, names, fontsize=9)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)


def confusion_figure(y_true, y_pred, class_names):
    """Counts and row-normalized confusion matrix -> (cm, fig).
    cm[i, j] = images of true class i predicted as j; row-normalized: cm[i, j] / sum_j cm[i, j]."""
    names = [str(c) for c in class_names]
    cm = metrics.confusion_matrix(y_true, y_pred, len(names))
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    side = min(7.5, 2.5 + 0.42 * len(names))
    fig = new_figure(2 * side + 0.6, side)
    axes = fig.subplots(1, 2)
    _matrix_panel(axes[0], cm, names, "Counts", lambda v: f"{int(v)}", max(cm.max(), 1))
    _matrix_panel(axes[1], norm, names, "Row-normalized (recall per true class)",
                  lambda v: f"{v:.2f}" if v >= 0.005 else "", 1.0)
    acc = np.trace(cm) / max(cm.sum(), 1)
    fig.suptitle(f"Confusion matrix: {cm.sum():,} test images, accuracy {acc:.4f}",
                 fontweight="bold")
    return cm, fig


def per_class_metrics(y_true, y_pred, class_names) -> list[dict]:
    """precision = TP / predicted, recall = TP / actual, accuracy = (TP + TN) / N
    (one class against the rest), F1, support."""
    names = [str(c) for c in class_names]
    cm = metrics.confusion_matrix(y_true, y_pred, len(names))
    rows = metrics.per_class(cm, names)
    n, tp = cm.sum(), np.diag(cm)
    for r, t, pred, act in zip(rows, tp, cm.sum(0), cm.sum(1)):
        r["accuracy"] = float((n - pred - act + 2 * t) / n) if n else 0.0
    return rows


def per_class_figure(y_true, y_pred, class_names):
    """Precision, recall and one-vs-rest accuracy per class, as dots on a common scale ->
    (rows, fig). Dots, not bars: the axis can then zoom on the range the values span
    without bars whose lengths would mislead."""
    rows = per_class_metrics(y_true, y_pred, class_names)
    k = len(rows)
    fig = new_figure(max(7.0, 1.5 + 0.6 * k), 4.4)
    ax = fig.subplots()
    x = np.arange(k)
    low = 1.0
    for m, (key, color, marker) in enumerate((("precision", "#0969da", "o"),
                                              ("recall", "#bf8700", "s"),
                                              ("accuracy", "#1a7f37", "D"))):
        vals = np.array([r[key] for r in rows])
        low = min(low, vals.min())
        ax.plot(x + (m - 1) * 0.18, vals, marker, color=color, label=key, ms=7)
    ax.vlines(x, 0, 1, color="#d0d7de", lw=0.8, zorder=0)
    pad = 0.06 * (1.0 - low) + 0.004   # room for the markers at both ends
    ax.set_ylim(low - pad, 1.0 + pad)
    ax.set_xlim(-0.6, k - 0.4)
    names = [r["class"] for r in rows]
    long = max(map(len, names)) > 3
    ax.set_xticks(x, names, rotation=30 if long else 0, ha="right" if long else "center")
    ax.set_xlabel("class")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.suptitle("Per-class precision, recall and accuracy (one class against the rest)",
                 fontweight="bold")
    return rows, fig


# image grids ----------------------------------------------------------------------------------
def _grid(n, cols=None):
    cols = cols or min(n, 8)
    return max(1, math.ceil(n / cols)), cols


def _mark(ax, wrong):
    color = WRONG if wrong else RIGHT
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_color(color)
        spine.set_linewidth(3 if wrong else 1)


def prediction_grid(images, y_true, probs, class_names, n=16, seed=0):
    """Random test images titled 'pred (confidence) / true', wrong ones in red -> (indices, fig)."""
    names = [str(c) for c in class_names]
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(images), size=min(n, len(images)), replace=False))
    pred = probs[idx].argmax(1)
    rows, cols = _grid(len(idx))
    fig = new_figure(1.65 * cols, 1.95 * rows + 0.5)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    pixels = to_pixels(images[idx])
    wrong_count = 0
    for ax, i, p, img in zip(axes, idx, pred, pixels):
        wrong = p != y_true[i]
        wrong_count += wrong
        show(ax, img)
        _mark(ax, wrong)
        ax.set_title(f"{names[p]} ({probs[i, p]:.0%})\ntrue: {names[y_true[i]]}", fontsize=9,
                     color=WRONG if wrong else "black", fontweight="bold" if wrong else None)
    for ax in axes[len(idx):]:
        hide_axes(ax)
    wrong_text = f"{wrong_count} of {len(idx)} wrong, in red" if wrong_count else \
        f"all {len(idx)} right"
    fig.suptitle(f"Random test images: predicted class (confidence) / true class; {wrong_text}",
                 fontweight="bold")
    return idx, fig


def top_losses(images, y_true, probs, class_names, k=16):
    """The k misclassified images with the largest loss -log p(true) -> (indices, losses, fig)."""
    names = [str(c) for c in class_names]
    y_true = np.asarray(y_true)
    p_true = probs[np.arange(len(y_true)), y_true]
    loss = -np.log(np.clip(p_true, 1e-7, 1.0))
    wrong = np.flatnonzero(probs.argmax(1) != y_true)
    idx = wrong[np.argsort(-loss[wrong], kind="stable")][:k]
    rows, cols = _grid(max(len(idx), 1))
    fig = new_figure(1.85 * cols, 2.2 * rows + 0.5)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, i in zip(axes, idx):
        p = probs[i].argmax()
        show(ax, to_pixels(images[i]))
        _mark(ax, True)
        ax.set_title(f"pred {names[p]} ({probs[i, p]:.2f})\ntrue {names[y_true[i]]} "
                     f"({p_true[i]:.2f})\nloss {loss[i]:.2f}", fontsize=8.5)
    for ax in axes[len(idx):]:
        hide_axes(ax)
    title = (f"Top-loss mistakes ({len(wrong):,} wrong in all): predicted (p), true (p), "
             f"loss = -log p(true)") if len(idx) else "Top-loss mistakes: no mistakes"
    fig.suptitle(title, fontweight="bold")
    return idx, loss[idx], fig


# inside the network -----------------------------------------------------------------------------
def mosaic(maps, cols=16):
    """(h, w, C) channels tiled into one image, row-major, each scaled to [0, 1] by its own
    min and max. Constant channels (e.g. all zero) are -1, the gaps between tiles NaN."""
    h, w, c = maps.shape
    gap = max(1, h // 10)
    rows = math.ceil(c / cols)
    out = np.full((rows * (h + gap) - gap, min(c, cols) * (w + gap) - gap), np.nan, np.float32)
    for k in range(c):
        m = maps[..., k]
        lo, hi = m.min(), m.max()
        r, q = divmod(k, cols)
        out[r * (h + gap):r * (h + gap) + h, q * (w + gap):q * (w + gap) + w] = \
            (m - lo) / (hi - lo) if hi > lo else -1.0
    return out


def feature_maps(model, image, layers=None, engine="auto", title=None, cols=16):
    """Every channel of each conv layer's output for one image -> ({layer: (h, w, C)}, fig).

    layers: indices or names (default: every Conv2D, after its activation). Each layer is
    one panel of tiles, `cols` per row: channel = row label + column label."""
    eng = engine_for(model, engine)
    shown = [j for _, j in conv_layers(model)] if layers is None else \
        [layer_index(model, lay) for lay in layers]
    if not shown:
        raise ValueError("the model has no convolutional layers")
    acts = eng.activations(to_input(model, image))
    maps = {acts[j][0]: acts[j][1][0] for j in shown}
    width = 15.0
    heights = [1.8] + [width * math.ceil(m.shape[-1] / cols) * m.shape[0] / (cols * m.shape[1])
                       + 0.7 for m in maps.values()]
    fig = new_figure(width, sum(heights) + 0.6)
    axes = fig.subplots(len(heights), 1, height_ratios=heights)
    show(axes[0], to_pixels(np.asarray(image).reshape(model.input_shape)))
    axes[0].set_title("input", fontsize=10)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white", under="#d0d7de")
    for ax, j, (name, m) in zip(axes[1:], shown, maps.items()):
        h, w, c = m.shape
        gap = max(1, h // 10)
        ax.imshow(mosaic(m, cols), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([q * (w + gap) + (w - 1) / 2 for q in range(min(c, cols))],
                      range(min(c, cols)), fontsize=7)
        rows = math.ceil(c / cols)
        ax.set_yticks([r * (h + gap) + (h - 1) / 2 for r in range(rows)] if rows > 1 else [],
                      [f"{r * cols}+" for r in range(rows)] if rows > 1 else [], fontsize=7)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        dead = int(sum(not m[..., k].max() > m[..., k].min() for k in range(c)))
        ax.set_title(f"{layer_label(model, j)}: {c} channels of {h}x{w}"
                     + (f", {dead} constant (grey)" if dead else ""), fontsize=10,
                     fontweight="bold")
    fig.suptitle(title or "Feature maps", fontweight="bold")
    fig.text(0.5, 0.002, "each channel on its own colour scale (dark: its minimum, yellow: "
             "its maximum); channel = row label + column number", ha="center", va="bottom",
             fontsize=8, color="#59636e")
    return maps, fig


def filters_figure(model, layer=None):
    """A conv layer's kernels drawn as images -> (kernel (kh, kw, in, out), fig).

    3 input channels: RGB, each filter scaled to [0, 1] by its own min and max.
    Otherwise: the mean over input channels on a diverging scale symmetric about 0
    (red positive, blue negative)."""
    convs = [i for i, _ in conv_layers(model)]
    if not convs:
        raise ValueError("the model has no convolutional layers")
    i = convs[0] if layer is None else layer_index(model, layer)
    name = model.layers[i].name
    kernel = model.weights[f"{name}.kernel"]
    n = kernel.shape[-1]
    rows, cols = _grid(n, min(n, 16))
    fig = new_figure(max(6.5, 1.0 * cols), 1.1 * rows + 0.9)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for k, ax in enumerate(axes):
        hide_axes(ax)
        if k >= n:
            continue
        w = kernel[..., k]
        if w.shape[-1] == 3:
            lo, hi = w.min(), w.max()
            ax.imshow((w - lo) / (hi - lo + 1e-12), interpolation="nearest")
        else:
            w = w.mean(-1)
            lim = np.abs(w).max() + 1e-12
            ax.imshow(w, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_title(str(k), fontsize=8, pad=2)
    how = "RGB, each scaled to its own range" if kernel.shape[2] == 3 else \
        "red positive, blue negative, each on its own scale"
    fig.suptitle(f"{name}: {n} filters of {kernel.shape[0]}x{kernel.shape[1]}\n({how})",
                 fontweight="bold", fontsize=11)
    return kernel, fig
