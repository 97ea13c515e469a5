"""The HTML report: every figure of `cnnlab.inspect` for one model and one test set.

    path = write_report("runs/demo", "mnist-5k")      # runs/demo/report/index.html

The page is self-contained (CSS inline, figures as base64 PNG) and each figure is
also written next to it as a PNG file.
"""
from __future__ import annotations

import base64
import html
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

from .. import metrics
from ..engines.base import evaluate_logits, probabilities
from ..losses import loss_of, resolve_loss
from ..api import load as load_model
from . import attribution, figures, maximize
from ._common import (as_batch, class_names, conv_layers, engine_for, layer_label, logits_layer,
                      predict, to_input)


# inputs ------------------------------------------------------------------------------------
def resolve_model(model):
    """A Sequential, or a model file / run directory -> (model, path or None, run dir or None)."""
    if not isinstance(model, (str, Path)):
        return model, None, None
    path = Path(model)
    loaded = load_model(path)
    if path.is_dir():
        return loaded, path, path
    run_dir = path.parent if (path.parent / "history.csv").is_file() else None
    return loaded, path, run_dir


def default_out(path: Path | None) -> Path:
    """<run dir>/report for a run directory, report-<stem> beside a model file."""
    if path is None:
        return Path("report")
    if path.is_dir():
        return path / "report"
    return path.parent / f"report-{path.stem}"


def default_data(model, run_dir=None) -> tuple[str, str | None]:
    """(dataset, data_dir) the model was trained on, from its metadata and the run's config."""
    name = (model.meta.get("training") or {}).get("dataset")
    if not name or name == "arrays":
        raise ValueError("which dataset? pass --data (the model does not name the one it was "
                         "trained on)")
    data_dir = None
    if run_dir is not None and (run_dir / "config.json").is_file():
        try:
            data_dir = json.loads((run_dir / "config.json").read_text())["train"].get("data_dir")
        except (ValueError, KeyError, TypeError):
            data_dir = None
    return name, data_dir


def test_split(model, data, data_dir=None):
    """(x_test uint8 NHWC, y_test, class names, dataset name) shaped for the model."""
    from .. import datasets
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y, name = as_batch(data[0], model), np.asarray(data[1], np.int64), "arrays"
        names = class_names(model)
    else:
        if isinstance(data, (str, Path)):
            h, w, c = model.input_shape
            data = datasets.load(str(data), data_dir=data_dir, image_size=(h, w),
                                 color="grayscale" if c == 1 else "rgb")
        x, y, names, name = data.x_test, data.y_test, list(data.class_names), data.name
        x = as_batch(x, model)
    if not len(y):
        raise ValueError(f"{name}: the test split is empty")
    names = [str(n) for n in names] + [str(i) for i in range(len(names), model.num_classes)]
    return x, y, names, name


# output ----------------------------------------------------------------------------------
class Page:
    """Collects sections; each figure is saved as PNG and embedded in the HTML."""

    def __init__(self, out: Path):
        self.out = out
        self.sections: list[tuple[str, str, list[str]]] = []
        self.count = 0

    def section(self, key, title):
        self.sections.append((key, title, []))

    def add(self, text):
        self.sections[-1][2].append(text)

    def figure(self, fig, name, caption=""):
        self.count += 1
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        data = buf.getvalue()
        file = f"{self.count:02d}-{name}.png"
        (self.out / file).write_bytes(data)
        b64 = base64.b64encode(data).decode("ascii")
        cap = f"<figcaption>{caption}</figcaption>" if caption else ""
        self.add(f'<figure><img src="data:image/png;base64,{b64}" alt="{html.escape(name)}">'
                 f'{cap}<a class="file" href="{file}">{file}</a></figure>')

    def html(self, title) -> str:
        nav = " ".join(f'<a href="#{k}">{html.escape(t)}</a>' for k, t, _ in self.sections)
        body = "\n".join(f'<section id="{k}"><h2>{html.escape(t)}</h2>\n' + "\n".join(parts) +
                         "</section>" for k, t, parts in self.sections)
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
                f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
                f"<h1>{html.escape(title)}</h1><nav>{nav}</nav>\n{body}\n</body></html>\n")


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1400px; padding: 0 1em; color: #1f2328; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
nav { position: sticky; top: 0; background: #fff; padding: .5em 0;
      border-bottom: 1px solid #d0d7de; }
nav a { margin-right: 1em; white-space: nowrap; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .9em; }
th, td { border: 1px solid #d0d7de; padding: .25em .6em; text-align: right; }
th { background: #f6f8fa; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; }
figcaption { color: #59636e; font-size: .9em; }
a.file { font-size: .8em; color: #59636e; display: block; }
.note { color: #59636e; }
"""


def table(header, rows) -> str:
    """An HTML table; header None gives a key/value table with the keys as row headers."""
    head = "" if header is None else \
        "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>"
    cell = (lambda i: "th" if i == 0 else "td") if header is None else (lambda i: "td")
    body = "".join("<tr>" + "".join(f"<{cell(i)}>{html.escape(str(c))}</{cell(i)}>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


class Progress:
    """Numbered progress lines with the time each step took."""

    def __init__(self, total, stream):
        self.total, self.stream, self.k, self.t = total, stream, 0, None

    def __call__(self, what):
        self.done()
        self.k += 1
        if self.stream:
            print(f"[{self.k}/{self.total}] {what} ...", end="", file=self.stream, flush=True)
        self.t = time.perf_counter()

    def done(self):
        if self.t is not None and self.stream:
            print(f" {time.perf_counter() - self.t:.1f} s", file=self.stream, flush=True)
        self.t = None


def _pick(y, pred, n, rng, correct=True):
    """Up to n images, correctly predicted when possible, covering different classes first."""
    ok = np.flatnonzero(pred == y) if correct else np.arange(len(y))
    ok = ok if len(ok) else np.arange(len(y))
    order = rng.permutation(ok)
    first = [i for c in np.unique(y[order]) for i in order[y[order] == c][:1]]
    taken = set(first)
    rest = [i for i in order[:n + len(first)] if i not in taken]
    return np.array((list(rng.permutation(first)) + rest)[:n], np.int64)


# the report --------------------------------------------------------------------------------
def write_report(model, data=None, out=None, *, history=None, images=16, engine="auto",
                 data_dir=None, patch=4, stride=2, steps=128, max_filters=16,
                 feature_images=2, attribution_images=8, real_images=1000, seed=0,
                 progress=sys.stderr) -> Path:
    """Evaluate `model` on the test split of `data` and write `out`/index.html plus one PNG
    per figure; returns the HTML path.

    model: a Sequential, a model file or a run directory (whose history.csv is used).
    data: dataset name, folder, Dataset or (x, y) arrays; default: the training dataset.
    images: how many random test images (and top-loss mistakes) to show.
    patch, stride: occlusion patch size and step; steps: activation maximization steps.
    progress: a stream for progress lines (None: quiet)."""
    model, path, run_dir = resolve_model(model)
    if data is None:
        data, saved_dir = default_data(model, run_dir)
        data_dir = data_dir or saved_dir
    if history is None and run_dir is not None and (run_dir / "history.csv").is_file():
        history = run_dir / "history.csv"
    out = Path(out) if out is not None else default_out(path)
    x, y, names, data_name = test_split(model, data, data_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "index.html").is_file():  # only a folder that holds an earlier report
        for old in out.glob("[0-9][0-9]-*.png"):
            old.unlink()
    eng = engine_for(model, engine)
    convs = conv_layers(model)
    step = Progress(6 + len(convs) + bool(convs) + (history is not None), progress)
    rng = np.random.default_rng(seed)
    page = Page(out)

    step(f"predicting {len(x):,} test images ({eng.name} engine)")
    logits = np.concatenate([eng.forward(to_input(model, x[i:i + 4096]))
                             for i in range(0, len(x), 4096)])
    probs = probabilities(model, logits)
    pred = probs.argmax(1)
    _summary(page, model, path, data_name, logits, y, eng.name)
    if history is not None:
        step("training curves")
        page.section("training", "Training curves")
        page.figure(figures.training_curves(history)[1], "training-curves",
                    "Loss and accuracy per epoch on the training data and the validation data.")
    step("confusion matrix and per-class metrics")
    _confusion(page, y, pred, names)
    step("prediction grid and top-loss mistakes")
    _predictions(page, x, y, probs, names, images, seed)
    if convs:
        step("filters and feature maps")
        _inside(page, model, eng, x, y, pred, names, feature_images, rng)
    real = x[rng.permutation(len(x))[:real_images]]
    for conv, shown in convs:
        step(f"activation maximization: {model.layers[conv].name}")
        _maximize(page, model, eng, shown, real, steps, max_filters, model.layers[conv].name,
                  first=conv == convs[0][0])
    step("activation maximization: class logits")
    _maximize(page, model, eng, "logits", real, steps, None, "classes", first=not convs)
    step("occlusion, saliency and Grad-CAM")
    _attribution(page, model, eng, x, y, pred, attribution_images, patch, stride, rng,
                 bool(convs))
    step("writing HTML")
    index = out / "index.html"
    index.write_text(page.html(f"cnnlab report: {model.name} on {data_name}"), encoding="utf-8")
    step.done()
    return index


TRAINING_ROWS = {"dataset": "trained on", "epochs": "epochs", "engine": "trained with",
                 "train_images": "training images", "test_accuracy": "test accuracy then",
                 "date": "date", "interrupted": "interrupted"}


def _training_rows(training: dict) -> list:
    rows = []
    for key, label in TRAINING_ROWS.items():
        v = training.get(key)
        if v is None or key == "interrupted" and not v:
            continue
        if key == "date":
            v = str(v).replace("T", " ")
        elif isinstance(v, float):
            v = f"{v:.4f}"
        elif isinstance(v, int) and not isinstance(v, bool):
            v = f"{v:,}"
        rows.append((label, v))
    return rows


def _summary(page, model, path, data_name, logits, y, engine):
    loss_name = loss_of(model)
    res = evaluate_logits(model, lambda z: z, logits, y, resolve_loss(loss_name, model),
                          max(len(y), 1))
    acc, loss = res["accuracy"], res["loss"]
    training = model.meta.get("training") or {}
    total, trainable, _ = model.count_params()
    page.section("summary", "Summary")
    rows = [("model", model.name), ("file", path or "(in memory)"),
            ("parameters", f"{total:,} ({trainable:,} trainable)"),
            ("input", "x".join(map(str, model.input_shape))),
            ("test data", f"{data_name}: {len(y):,} images"),
            ("test accuracy", f"{acc:.4f}"), (f"test loss ({loss_name})", f"{loss:.4f}"),
            ("engine", engine)]
    rows += _training_rows(training)
    page.add(table(None, rows))
    page.add(table(["layer", "type", "output shape", "params"],
                   [(r["name"], r["type"], "x".join(map(str, r["output_shape"][1:])),
                     f"{r['params']:,}") for r in model.summary_rows()]))


def _confusion(page, y, pred, names):
    cm, fig = figures.confusion_figure(y, pred, names)
    page.section("confusion", "Confusion matrix")
    page.figure(fig, "confusion-matrix", "Rows: true class; columns: predicted class. Right: "
                                         "each row divided by the images of that class.")
    pairs = metrics.most_confused(cm, names, top=10)
    items = "".join(f"<li>true <b>{html.escape(a)}</b> predicted as <b>{html.escape(b)}</b>: "
                    f"{n} image{'s' if n > 1 else ''} ({n / cm[names.index(a)].sum():.1%} of "
                    f"{html.escape(a)})</li>"
                    for a, b, n in pairs)
    page.add(f"<h3>Most confused pairs</h3><ol>{items}</ol>" if pairs else
             "<p>No confusions: every test image is classified correctly.</p>")
    rows, fig = figures.per_class_figure(y, pred, names)
    page.section("per-class", "Per-class metrics")
    page.figure(fig, "per-class", "Precision = correct / predicted as the class; recall = "
                                  "correct / images of the class; accuracy = (TP + TN) / all.")
    page.add(table(["class", "precision", "recall", "F1", "accuracy", "support"],
                   [(r["class"], f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}",
                     f"{r['accuracy']:.4f}", r["support"]) for r in rows]))


def _predictions(page, x, y, probs, names, n, seed):
    page.section("predictions", "Predictions on random test images")
    page.figure(figures.prediction_grid(x, y, probs, names, n=n, seed=seed)[1],
                "predictions", "Title: predicted class (confidence) and true class; "
                               "red: wrong.")
    idx, losses, fig = figures.top_losses(x, y, probs, names, k=n)
    page.section("mistakes", "Top-loss mistakes")
    page.figure(fig, "top-losses", "The misclassified test images the model was most sure "
                                   "about: highest loss = -log p(true class).")


def _inside(page, model, eng, x, y, pred, names, n_images, rng):
    page.section("filters", "First-layer filters")
    page.figure(figures.filters_figure(model)[1], "filters")
    page.section("feature-maps", "Feature maps")
    for k, i in enumerate(_pick(y, pred, n_images, rng)):
        title = f"Feature maps of test image {i} (true {names[y[i]]}, predicted {names[pred[i]]})"
        page.figure(figures.feature_maps(model, x[i], engine=eng, title=title)[1],
                    f"feature-maps-{k + 1}", "Every channel of every convolutional layer's "
                                             "output (after its activation), layer by layer.")


def _maximize(page, model, eng, layer, real, steps, max_filters, tag, first):
    if first:
        page.section("maximization", "Activation maximization")
        page.add('<p class="note">Synthetic inputs found by gradient ascent from faint noise '
                 'with random shifts (jitter), a total-variation penalty, periodic Gaussian blur '
                 'and clipping to the valid pixel range. Conv filters: the mean of the '
                 'channel\'s output after its activation, away from the border; classes: the '
                 'logit before softmax. "Real" columns: the same value over '
                 f'{len(real):,} test images.</p>')
    n_out = model.layer_shapes[logits_layer(model) if layer == "logits" else layer][1][-1]
    channels = range(n_out if max_filters is None else min(n_out, max_filters))
    imgs, acts, fig = maximize.activation_maximization(model, layer, channels, steps=steps,
                                                        real_images=real, engine=eng)
    is_logits = layer == "logits"
    name = "class logits" if is_logits else layer_label(model, layer)
    page.add(f"<h3>{html.escape(name)}</h3>")
    note = "A first-layer filter's mean output is mostly a weighted sum of the image's " \
        "brightness, so a uniform image often wins; deeper layers show patterns." \
        if first and not is_logits else ""
    page.figure(fig, f"maximize-{tag}", note)
    labels = class_names(model, n_out) if is_logits else [str(c) for c in channels]
    page.add(table(["class" if is_logits else "filter", "noise start", "reached", "real mean",
                    "real max", "reached / real max"],
                   [(labels[b], f"{acts['start'][b]:.3g}", f"{acts['reached'][b]:.3g}",
                     f"{acts['real_mean'][b]:.3g}", f"{acts['real_max'][b]:.3g}",
                     f"{acts['reached'][b] / acts['real_max'][b]:.2f}"
                     if acts["real_max"][b] > 0 else "-")
                    for b in range(len(labels))]))


def _attribution(page, model, eng, x, y, pred, n, patch, stride, rng, has_conv):
    idx = _pick(y, pred, n, rng)
    page.section("occlusion", "Occlusion sensitivity")
    page.figure(attribution.occlusion(model, x[idx], y[idx], patch=patch, stride=stride,
                                      engine=eng)[1], "occlusion",
                "Correctly predicted test images; the map is the mean drop of the true "
                "class's probability over the patches covering each pixel.")
    page.section("saliency", "Gradient saliency")
    page.figure(attribution.saliency(model, x[idx], y[idx], engine=eng)[1], "saliency")
    if has_conv:
        page.section("grad-cam", "Grad-CAM")
        page.figure(attribution.grad_cam(model, x[idx], y[idx], engine=eng)[1], "grad-cam",
                    "Weights: spatial mean of d logit / d A over the last conv output A; "
                    "map = relu(sum_k w_k A_k), upsampled to the image.")
        page.figure(attribution.grad_cam(model, x[idx], y[idx], method="hirescam",
                                         engine=eng)[1], "hirescam",
                    "The same with the gradient kept per position: map = relu(sum_k "
                    "d logit / d A_k * A_k). When the model ends in Flatten + Dense, Grad-CAM's "
                    "averaged weights often cancel and leave an empty map; this one does not.")

