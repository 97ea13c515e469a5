"""The web app of `cnnlab serve`: a page to draw on, and a JSON API.

    app = create_app("runs/demo", engine="numpy")    # model file or run directory
    app.run()                                        # or `cnnlab serve runs/demo`

The model is loaded once; requests share it read-only (engines keep no state at
inference), so the app can be served by a threaded server. Nothing is written to disk.

API (every answer is JSON; every error is a 4xx/5xx with `{"error": "one line"}`):

GET  /healthz          {"status": "ok", "model": name, "engine": "numpy"}
GET  /api/model        the model card: {"summary": Sequential.summary_dict(), "meta": {...
                       class_names, preprocessing, training}, "engine", "input_shape",
                       "class_names", "input_mode": "drawing" | "resize", "file"}
POST /api/predict      an image, as one of
                         multipart/form-data with the file in field `file`
                         application/json {"image": "data:image/png;base64,..."}
                         a raw body with Content-Type image/* (e.g. curl --data-binary)
                       optional `mode` (form field, JSON key or query parameter):
                       auto (default), drawing or resize; see drawing.py.
                       Answer: {"empty": false,
                                "top": [{"label": "7", "probability": 0.98}, ...]  (5 best),
                                "probabilities": {label: p, ...}  (model's class order),
                                "input": "data:image/png;base64,..."  (the uint8 image fed
                                         to the model, e.g. 28x28 grey, before the
                                         model's normalization),
                                "mode": "drawing", "ms": 3.1}
                       Nothing drawn (no ink, a blank image): 200 with
                         {"empty": true, "top": [], "probabilities": {}, "input": null,
                          "message": "nothing drawn", "mode": ..., "ms": ...}
POST /api/activations  the same input; the answer of /api/predict plus "layers", in
                       model order (Flatten and Dropout left out):
                         feature maps (Conv2D, pooling, BatchNorm, Activation on maps):
                           {"name", "type", "kind": "maps", "shape": [H, W, C],
                            "min", "max", "sprite": one grey PNG data URL with the maps
                            tiled row by row in a grid of [rows, cols] tiles of H x W,
                            "grid": [rows, cols], "count": maps in the sprite (C, at most
                            256), "truncated": C > count}; grey 0..255 is the layer's
                            min..max
                         vectors (Dense, global pooling, ...):
                           {"name", "type", "kind": "vector", "shape": [N], "min", "max",
                            "values": [N floats, 4 decimals], "labels": class names for
                            the output layer else null}

Errors: 400 (not an image, truncated, bad JSON, missing field), 404, 405, 413 (body over
max_bytes or image over max_pixels), 415 (other content types), 500 (unexpected).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np

from ..inputs import drawing

MAX_BYTES = 10 * 1024 * 1024  # request body limit (a data URL is 4/3 of the image)
TOP_K = 5
MAX_MAPS = 256                # feature maps sent per layer (tiles of the sprite)
MAX_VALUES = 4096             # vector entries sent per layer
SKIPPED = ("Flatten", "Dropout")
STATIC = Path(__file__).with_name("static")
log = logging.getLogger("cnnlab.serve")


class BadInput(Exception):
    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


class Classifier:
    """The loaded model with its engine; the methods are safe to call from many threads."""

    def __init__(self, model_path, engine="numpy"):
        from ..engines import get_engine
        from ..api import load
        from ..preprocess import preprocessing_of
        self.path = str(model_path)
        self.model = load(model_path)
        self.engine = get_engine(self.model, engine)
        self.prep = preprocessing_of(self.model)
        n = self.model.num_classes
        names = self.model.meta.get("class_names") or []
        self.labels = [str(s) for s in names] if len(names) == n else [str(i) for i in range(n)]
        self.input_mode = drawing.mode_for(self.model)

    def card(self) -> dict:
        return {"summary": self.model.summary_dict(), "meta": self.model.meta,
                "engine": self.engine.name, "input_shape": list(self.model.input_shape),
                "class_names": self.labels, "input_mode": self.input_mode,
                "file": Path(self.path).name}

    def _x(self, image):
        from ..preprocess import apply
        return apply(self.prep, image[None])

    def _summary(self, probs) -> dict:
        probs = np.nan_to_num(np.asarray(probs, np.float64))  # JSON has no NaN
        order = np.argsort(-probs, kind="stable")[:TOP_K]
        return {"top": [{"label": self.labels[i], "probability": round(float(probs[i]), 6)}
                        for i in order],
                "probabilities": {lab: round(float(p), 6) for lab, p in zip(self.labels, probs)}}

    def predict(self, image) -> dict:
        return self._summary(np.asarray(self.engine.predict_proba(self._x(image)))[0])

    def explain(self, image) -> dict:
        """The prediction plus every layer's output (one forward pass when the last layer
        ends in the softmax)."""
        acts = self.engine.activations(self._x(image))
        last = len(self.model.layers) - 1
        if self.model.final_activation_index == last and \
                self.model.output_activation == "softmax":
            out = self._summary(np.asarray(acts[-1][1])[0])
        else:
            out = self.predict(image)
        out["layers"] = self._layers(acts)
        return out

    def _layers(self, acts) -> list:
        out = []
        last = len(self.model.layers) - 1
        for i, (layer, (name, a)) in enumerate(zip(self.model.layers, acts)):
            if layer.type in SKIPPED:
                continue
            a = np.nan_to_num(np.asarray(a, np.float32)[0], posinf=0.0, neginf=0.0)
            lo, hi = float(np.min(a)), float(np.max(a))
            entry = {"name": name, "type": layer.type, "shape": list(a.shape),
                     "min": round(lo, 6), "max": round(hi, 6)}
            if a.ndim == 3:
                entry.update(kind="maps", **sprite(a, lo, hi))
            else:
                v = a.ravel()
                entry.update(kind="vector", truncated=v.size > MAX_VALUES,
                             values=[round(float(x), 4) for x in v[:MAX_VALUES]],
                             labels=self.labels if i == last and v.size == len(self.labels)
                             else None)
            out.append(entry)
        return out


def sprite(a, lo, hi) -> dict:
    """(H, W, C) maps -> one grey PNG with the maps tiled row by row, scaled lo..hi to 0..255."""
    h, w, c = a.shape
    n = min(c, MAX_MAPS)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    maps = np.moveaxis(a[..., :n], -1, 0)
    scaled = np.rint((maps - lo) * (255.0 / (hi - lo))) if hi > lo else np.zeros_like(maps)
    tiles = np.zeros((rows * cols, h, w), np.uint8)
    tiles[:n] = scaled.astype(np.uint8)
    grid = tiles.reshape(rows, cols, h, w).transpose(0, 2, 1, 3).reshape(rows * h, cols * w)
    return {"sprite": drawing.png_data_url(grid), "grid": [rows, cols], "count": n,
            "truncated": c > n}


def _read_input(request):
    """(image bytes, mode) from the request, or BadInput."""
    from werkzeug.exceptions import RequestEntityTooLarge
    mimetype = request.mimetype or ""
    mode = request.args.get("mode")
    try:
        if mimetype == "multipart/form-data":
            f = request.files.get("file")
            if f is None:
                raise BadInput("no file: send the image in the multipart field 'file'")
            data = f.read()
            mode = request.form.get("mode") or mode
        elif mimetype == "application/json" or mimetype.endswith("+json"):
            body = request.get_json(silent=True)
            if body is None:
                raise BadInput("the body is not valid JSON")
            if not isinstance(body, dict) or "image" not in body:
                raise BadInput('JSON must be an object {"image": "data:image/png;base64,..."}')
            data = drawing.decode_data_url(body["image"])
            m = body.get("mode")
            if m is not None and not isinstance(m, str):
                raise BadInput("'mode' must be a string: auto, drawing or resize")
            mode = m or mode
        elif mimetype.startswith("image/") or mimetype == "application/octet-stream":
            data = request.get_data(cache=False)
        elif not mimetype and not request.content_length:
            raise BadInput("empty request: send an image (multipart field 'file' or JSON "
                           "{\"image\": data URL})")
        else:
            raise BadInput(f"unsupported content type {mimetype or 'none'!r}: send "
                           "multipart/form-data with a 'file' field, JSON {\"image\": "
                           "\"data:image/png;base64,...\"} or an image/* body", 415)
    except RequestEntityTooLarge:
        raise
    except drawing.ImageInputError as e:
        raise BadInput(str(e)) from None
    except UnicodeDecodeError:
        raise BadInput("the body is not valid UTF-8 JSON") from None
    if not data:
        raise BadInput("the image is empty (0 bytes)")
    mode = mode or "auto"
    if mode not in drawing.MODES:
        raise BadInput(f"unknown mode {str(mode)[:40]!r}; allowed: {', '.join(drawing.MODES)}")
    return data, mode


def create_app(model_path, engine: str = "numpy", *, max_bytes: int = MAX_BYTES,
               max_pixels: int = drawing.MAX_PIXELS):
    """A Flask app serving the model at model_path (file or run directory)."""
    from flask import Flask, jsonify, request, send_from_directory
    from werkzeug.exceptions import HTTPException

    clf = Classifier(model_path, engine)
    app = Flask(__name__, static_folder=str(STATIC), static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = max_bytes
    app.config["JSON_SORT_KEYS"] = False
    app.json.sort_keys = False
    app.extensions["cnnlab_classifier"] = clf

    def error(status, message):
        resp = jsonify({"error": str(message).splitlines()[0] if message else "error"})
        resp.status_code = status
        return resp

    @app.errorhandler(HTTPException)
    def http_error(e):
        messages = {404: "no such page: see / for the app and /api/model for the model",
                    405: f"method {request.method} is not allowed here",
                    413: f"the request is too large (at most {max_bytes // (1024 * 1024)} MiB)"}
        return error(e.code or 500, messages.get(e.code) or e.description or e.name)

    @app.errorhandler(BadInput)
    def bad_input(e):
        return error(e.status, e)

    @app.errorhandler(Exception)
    def unexpected(e):
        log.exception("error while answering %s %s", request.method, request.path)
        return error(500, f"internal error: {type(e).__name__}")

    def classify(with_layers):
        t0 = time.perf_counter()
        data, mode = _read_input(request)
        try:
            image, used = drawing.prepare(clf.model, data, mode, max_pixels)
        except drawing.ImageInputError as e:
            raise BadInput(str(e), 413 if "too large" in str(e) else 400) from None
        if image is None:
            out = {"empty": True, "message": "nothing drawn", "top": [], "probabilities": {},
                   "input": None, "mode": used}
            if with_layers:
                out["layers"] = []
        else:
            result = clf.explain(image) if with_layers else clf.predict(image)
            layers = result.pop("layers", None)
            out = {"empty": False, **result, "input": drawing.png_data_url(image), "mode": used}
            if with_layers:
                out["layers"] = layers

        out["ms"] = round((time.perf_counter() - t0) * 1000, 2)
        return jsonify(out)

    @app.get("/")
    def index():
        return send_from_directory(STATIC, "index.html")

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok", "model": clf.model.name, "engine": clf.engine.name})

    @app.get("/api/model")
    def model_card():
        return jsonify(clf.card())

    @app.post("/api/predict")
    def predict():
        return classify(False)

    @app.post("/api/activations")
    def activations():
        return classify(True)

    return app
