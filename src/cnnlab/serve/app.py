"""The web app of `cnnlab serve`: a page to draw on, and a JSON API.

    app = create_app("runs/demo", engine="numpy")    # model file or run directory
    # a WSGI application: `cnnlab serve` runs it on waitress (see cli.py)

The model is loaded once; requests share it read-only (engines keep no state at
inference), so the app is served by a pool of threads. Nothing is written to disk.
A plain WSGI app: Werkzeug parses multipart bodies, the rest is a dozen routes.

API (every answer is JSON; every error is a 4xx/5xx with the one-line body
`{"error": "message"}`):

GET  /healthz          {"status": "ok", "model": name, "engine": "numpy"}
GET  /api/model        the model card: {"summary": Sequential.summary_dict(), "meta": {...
                       class_names, preprocessing, training}, "engine", "input_shape",
                       "class_names", "input_mode": "drawing" | "resize", "file"}
POST /api/predict      an image, as one of
                         multipart/form-data with the file in field `file`
                         application/json {"image": "data:image/png;base64,..."}
                         a raw body with Content-Type image/* (e.g. curl --data-binary)
                       optional `mode` (form field, JSON key or query parameter):
                       auto (default), drawing or resize; see inputs/drawing.py.
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

Errors: 400 (not an image, truncated, bad or too deeply nested JSON, missing field),
404, 405 (with Allow), 413 (body over max_bytes or image over the pixel limit), 414
(URL over MAX_URL), 415 (other content types), 500 (unexpected; logged). The server
(cli.py) answers its own errors in the same form: 400 (malformed HTTP), 408 (a request
not received whole in time), 413, 414, 431 (headers too large), 501.

Memory: bodies over BIG_BODY are read by at most BODY_SLOTS requests at once, and
images over drawing.LARGE_PIXELS are decoded DECODE_SLOTS at a time (drawing.py), so
a burst of large uploads waits in line instead of multiplying the peak.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from ..inputs import drawing

MAX_BYTES = 10 * 1024 * 1024  # request body limit (a data URL is 4/3 of the image)
MAX_URL = 8 * 1024            # request target (path and query) limit
MAX_HEADER = 32 * 1024        # request line and headers (server.py)
TIMEOUT = 15.0                # seconds for a request to arrive whole; idle keep-alive limit
THREADS = 4                   # requests run at once (server.py); the rest wait in a queue
CONNECTIONS = 256             # open connections at most; more wait in the listen backlog
BIG_BODY = 1024 * 1024        # bodies above this wait for one of BODY_SLOTS
BODY_SLOTS = 2
TOP_K = 5
MAX_MAPS = 256                # feature maps sent per layer (tiles of the sprite)
MAX_VALUES = 4096             # vector entries sent per layer
SKIPPED = ("Flatten", "Dropout")
STATIC = Path(__file__).with_name("static")
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8"}
log = logging.getLogger("cnnlab.serve")

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 413: "Content Too Large", 414: "URI Too Long",
           415: "Unsupported Media Type", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 501: "Not Implemented"}


class BadInput(Exception):
    """A request the app refuses: status and a one-line message for the client."""

    def __init__(self, message, status=400, headers=()):
        super().__init__(message)
        self.status = status
        self.headers = list(headers)


def error_body(message) -> bytes:
    """{"error": first line of message} as one line of JSON."""
    text = str(message).strip().splitlines()[0] if str(message).strip() else "error"
    return json.dumps({"error": text}).encode()


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


# reading a request ---------------------------------------------------------------------------
def _mimetype(environ) -> str:
    return environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()


def _content_length(environ) -> int:
    try:
        return max(0, int(environ.get("CONTENT_LENGTH") or 0))
    except ValueError:
        raise BadInput("the Content-Length header is not a number") from None


def _read_body(environ, length) -> bytes:
    stream = environ.get("wsgi.input")
    return stream.read(length) if stream is not None and length else b""


def _parse_json(body: bytes):
    try:
        return json.loads(body)
    except RecursionError:
        raise BadInput("the JSON is nested too deeply") from None
    except UnicodeDecodeError:
        raise BadInput("the body is not valid UTF-8 JSON") from None
    except ValueError:
        raise BadInput("the body is not valid JSON") from None


def _query_mode(environ):
    from urllib.parse import parse_qs
    values = parse_qs(environ.get("QUERY_STRING", ""), max_num_fields=20).get("mode")
    return values[0] if values else None


def read_input(environ, max_bytes):
    """(image bytes, mode) from the request, or BadInput."""
    mimetype = _mimetype(environ)
    length = _content_length(environ)
    if length > max_bytes:
        raise BadInput(too_large(max_bytes), 413)
    try:
        mode = _query_mode(environ)
    except ValueError:
        raise BadInput("too many query parameters") from None
    try:
        if mimetype == "multipart/form-data":
            from werkzeug.exceptions import HTTPException
            from werkzeug.wrappers import Request
            req = Request(environ)
            req.max_content_length = max_bytes
            req.max_form_memory_size = 64 * 1024   # non-file fields
            req.max_form_parts = 16
            try:
                f = req.files.get("file")
                form_mode = req.form.get("mode")
            except HTTPException as e:
                raise BadInput(too_large(max_bytes) if e.code == 413 else
                               "the multipart body is malformed", e.code or 400) from None
            if f is None:
                raise BadInput("no file: send the image in the multipart field 'file'")
            data = f.read()
            mode = form_mode or mode
        elif mimetype == "application/json" or mimetype.endswith("+json"):
            body = _parse_json(_read_body(environ, length))
            if not isinstance(body, dict) or "image" not in body:
                raise BadInput('JSON must be an object {"image": "data:image/png;base64,..."}')
            data = drawing.decode_data_url(body["image"])
            m = body.get("mode")
            if m is not None and not isinstance(m, str):
                raise BadInput("'mode' must be a string: auto, drawing or resize")
            mode = m or mode
        elif mimetype.startswith("image/") or mimetype == "application/octet-stream":
            data = _read_body(environ, length)
        elif not mimetype and not length:
            raise BadInput("empty request: send an image (multipart field 'file' or JSON "
                           "{\"image\": data URL})")
        else:
            raise BadInput(f"unsupported content type {mimetype[:60] or 'none'!r}: send "
                           "multipart/form-data with a 'file' field, JSON {\"image\": "
                           "\"data:image/png;base64,...\"} or an image/* body", 415)
    except drawing.ImageInputError as e:
        raise BadInput(str(e)) from None
    if not data:
        raise BadInput("the image is empty (0 bytes)")
    mode = mode or "auto"
    if mode not in drawing.MODES:
        raise BadInput(f"unknown mode {str(mode)[:40]!r}; allowed: {', '.join(drawing.MODES)}")
    return data, mode


def too_large(max_bytes) -> str:
    return f"the request is too large (at most {max_bytes / (1024 * 1024):g} MiB)"


# the application ----------------------------------------------------------------------------
class App:
    """The WSGI application: routes, JSON answers, and the limits on concurrent large work."""

    def __init__(self, classifier, *, max_bytes=MAX_BYTES, max_pixels=drawing.MAX_PIXELS,
                 body_slots=BODY_SLOTS, access_log=False):
        self.classifier = classifier
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.body_gate = threading.BoundedSemaphore(body_slots)
        self.access_log = access_log
        self.static = {}
        for name in ("index.html", "app.js", "style.css"):
            path = STATIC / name
            self.static["/" if name == "index.html" else f"/static/{name}"] = (
                path.read_bytes(), STATIC_TYPES[path.suffix])
        self.routes = {"/healthz": {"GET": self.healthz}, "/api/model": {"GET": self.model_card},
                       "/api/predict": {"POST": lambda env: self.classify(env, False)},
                       "/api/activations": {"POST": lambda env: self.classify(env, True)}}
        for path in self.static:
            self.routes[path] = {"GET": self.static_file}

    def __call__(self, environ, start_response):
        t0 = time.perf_counter()
        method = environ.get("REQUEST_METHOD", "GET").upper()
        path = environ.get("PATH_INFO", "") or "/"
        try:
            status, ctype, body, headers = self.dispatch(environ, method, path)
        except BadInput as e:
            status, ctype, body, headers = e.status, "application/json", error_body(e), e.headers
        except Exception as e:
            log.exception("error while answering %s %s", method, path[:200])
            status, ctype, body, headers = (500, "application/json",
                                            error_body(f"internal error: {type(e).__name__}"), [])
        length = len(body)
        if method == "HEAD":
            body = b""
        start_response(f"{status} {REASONS.get(status, '')}".strip(),
                       [("Content-Type", ctype), ("Content-Length", str(length)),
                        ("X-Content-Type-Options", "nosniff"), ("Cache-Control", "no-cache"),
                        *headers])
        if self.access_log:
            log.info("%s %s %d %.1f ms", method, path[:200], status,
                     (time.perf_counter() - t0) * 1000)
        return [body]

    def dispatch(self, environ, method, path):
        target = len(path) + len(environ.get("QUERY_STRING", ""))
        if target > MAX_URL:
            raise BadInput(f"the URL is too long (at most {MAX_URL // 1024} KiB)", 414)
        methods = self.routes.get(path)
        if methods is None:
            raise BadInput("no such page: see / for the app and /api/model for the model", 404)
        handler = methods.get("GET" if method == "HEAD" else method)
        if handler is None:
            allowed = ", ".join(sorted(set(methods) | ({"HEAD"} if "GET" in methods else set())))
            raise BadInput(f"method {method[:20]} is not allowed here (allowed: {allowed})",
                           405, [("Allow", allowed)])
        return handler(environ)

    @staticmethod
    def json(obj, status=200):
        return status, "application/json", json.dumps(obj).encode(), []

    def static_file(self, environ):
        body, ctype = self.static[environ.get("PATH_INFO") or "/"]
        return 200, ctype, body, []

    def healthz(self, environ):
        clf = self.classifier
        return self.json({"status": "ok", "model": clf.model.name, "engine": clf.engine.name})

    def model_card(self, environ):
        return self.json(self.classifier.card())

    def classify(self, environ, with_layers):
        t0 = time.perf_counter()
        big = _content_length(environ) > BIG_BODY
        with self.body_gate if big else nullcontext():
            data, mode = read_input(environ, self.max_bytes)
            try:
                image, used = drawing.prepare(self.classifier.model, data, mode,
                                              self.max_pixels)
            except drawing.ImageInputError as e:
                raise BadInput(str(e), 413 if "too large" in str(e) else 400) from None
            del data
        clf = self.classifier
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
        return self.json(out)


def create_app(model_path, engine: str = "numpy", *, max_bytes: int = MAX_BYTES,
               max_pixels: int = drawing.MAX_PIXELS, access_log: bool = False) -> App:
    """The WSGI app serving the model at model_path (file or run directory)."""
    return App(Classifier(model_path, engine), max_bytes=max_bytes, max_pixels=max_pixels,
               access_log=access_log)
