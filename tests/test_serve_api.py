"""`cnnlab serve` as a user starts it: a real server process on 127.0.0.1, spoken to over HTTP."""
from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("waitress")
pytest.importorskip("werkzeug")


SRC = Path(__file__).resolve().parents[1] / "src"
CLASSES = [str(i) for i in range(10)]
from serving import (bomb_png, cli_env, data_url, decode_png, drawing_png, expected,
                     expected_activations, free_port, png, save_model, serve)  # noqa: E402


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("serve") / "lenet.safetensors")


@pytest.fixture(scope="module")
def server(model_path):
    with serve(model_path) as s:
        yield s
    assert s.proc.returncode == 0, s.stderr
    assert "Traceback" not in s.stderr, s.stderr


# endpoints ------------------------------------------------------------------------------------
def test_healthz_and_model_card(server):
    status, body = server.json("GET", "/healthz")
    assert status == 200 and body == {"status": "ok", "model": "lenet", "engine": "numpy"}
    status, card = server.json("GET", "/api/model")
    assert status == 200
    assert card["class_names"] == CLASSES and card["input_shape"] == [28, 28, 1]
    assert card["summary"]["total_params"] == 8790
    assert [r["type"] for r in card["summary"]["layers"]][:2] == ["Conv2D", "MaxPool2D"]
    assert card["meta"]["training"]["dataset"] == "mnist" and card["input_mode"] == "drawing"


def test_page_and_static_files(server):
    status, ctype, html = server.request("GET", "/")
    assert status == 200 and ctype.startswith("text/html")
    assert b"<canvas" in html and b"/static/app.js" in html and b"//cdn" not in html
    for name, kind in [("app.js", "javascript"), ("style.css", "text/css")]:
        status, ctype, data = server.request("GET", f"/static/{name}")
        assert status == 200 and kind in ctype and len(data) > 500
    for name in ("/", "/static/app.js", "/static/style.css"):  # nothing fetched from outside
        body = server.request("GET", name)[2]
        assert b"http://" not in body and b"https://" not in body


def check_prediction(body, model_path, data):
    x, probs = expected(model_path, data)
    assert body["empty"] is False and body["mode"] == "drawing"
    assert list(body["probabilities"]) == CLASSES
    got = np.array([body["probabilities"][c] for c in CLASSES])
    np.testing.assert_allclose(got, probs, atol=2e-6)
    assert abs(got.sum() - 1) < 1e-4
    top = body["top"]
    assert len(top) == 5 and top[0]["label"] == CLASSES[int(np.argmax(probs))]
    assert all(a["probability"] >= b["probability"] for a, b in zip(top, top[1:]))
    np.testing.assert_array_equal(decode_png(body["input"]), x[..., 0])
    assert isinstance(body["ms"], (int, float)) and body["ms"] >= 0


def test_predict_multipart_json_and_raw_agree(server, model_path):
    data = drawing_png()
    s1, b1 = server.post_file("/api/predict", data)
    s2, b2 = server.post_json("/api/predict", {"image": data_url(data)})
    s3, b3 = server.json("POST", "/api/predict", data, {"Content-Type": "image/png"})
    assert s1 == s2 == s3 == 200
    check_prediction(b1, model_path, data)
    for b in (b2, b3):
        assert b["probabilities"] == b1["probabilities"] and b["input"] == b1["input"]


def test_predict_mode_resize(server):
    status, body = server.post_json("/api/predict", {"image": data_url(drawing_png()),
                                                     "mode": "resize"})
    assert status == 200 and body["mode"] == "resize"
    status, body = server.post_file("/api/predict?mode=resize", drawing_png())
    assert status == 200 and body["mode"] == "resize"


def test_activations(server, model_path):
    data = drawing_png("circle")
    status, body = server.post_json("/api/activations", {"image": data_url(data)})
    assert status == 200
    check_prediction(body, model_path, data)
    layers = body["layers"]
    assert [l["name"] for l in layers] == ["conv2d", "max_pooling2d", "conv2d_1",
                                           "max_pooling2d_1", "dense"]
    acts = dict(expected_activations(model_path, data))
    for l in layers[:4]:
        h, w, c = l["shape"]
        rows, cols = l["grid"]
        assert l["kind"] == "maps" and l["count"] == c and not l["truncated"]
        assert rows * cols >= c > (rows - 1) * cols
        sheet = decode_png(l["sprite"])
        assert sheet.shape == (rows * h, cols * w) and sheet.dtype == np.uint8
        a = acts[l["name"]][0]
        assert l["min"] == pytest.approx(a.min(), abs=1e-5)
        assert l["max"] == pytest.approx(a.max(), abs=1e-5)
        for k in range(c):
            r, q = divmod(k, cols)
            tile = sheet[r * h:(r + 1) * h, q * w:(q + 1) * w].astype(float)
            want = (a[..., k] - a.min()) / max(a.max() - a.min(), 1e-12) * 255
            assert np.abs(tile - want).max() <= 1.01
    dense = layers[-1]
    assert dense["kind"] == "vector" and dense["labels"] == CLASSES and len(dense["values"]) == 10
    np.testing.assert_allclose(dense["values"], [body["probabilities"][c] for c in CLASSES],
                               atol=1e-4)


@pytest.mark.parametrize("path", ["/api/predict", "/api/activations"])
def test_empty_canvas_says_so(server, path):
    blank = png(Image.new("RGBA", (280, 280), (0, 0, 0, 0)))
    status, body = server.post_json(path, {"image": data_url(blank)})
    assert status == 200 and body["empty"] is True and body["top"] == []
    assert body["probabilities"] == {} and body["input"] is None


# bad input ----------------------------------------------------------------------------------
JS = {"Content-Type": "application/json"}
PNG = {"Content-Type": "image/png"}
BAD = [
    ("no body", "POST", "/api/predict", b"", {}, 400),
    ("empty multipart file", "FILE", "/api/predict", b"", {}, 400),
    ("text file", "FILE", "/api/predict", b"just some text\n", {}, 400),
    ("truncated png", "FILE", "/api/predict", None, {}, 400),
    ("random bytes raw", "POST", "/api/predict", bytes(range(256)) * 8, PNG, 400),
    ("empty raw image", "POST", "/api/predict", b"", PNG, 400),
    ("text/plain", "POST", "/api/predict", b"hello", {"Content-Type": "text/plain"}, 415),
    ("form urlencoded", "POST", "/api/predict", b"image=abc",
     {"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ("broken json", "POST", "/api/predict", b'{"image": ', JS, 400),
    ("json list", "POST", "/api/predict", b"[1, 2]", JS, 400),
    ("json no image", "POST", "/api/predict", b'{"img": "x"}', JS, 400),
    ("json image number", "POST", "/api/predict", b'{"image": 7}', JS, 400),
    ("json bad base64", "POST", "/api/predict", b'{"image": "data:image/png;base64,%%%"}',
     JS, 400),
    ("json not an image", "POST", "/api/activations",
     json.dumps({"image": data_url(b"GIF89a nothing")}).encode(), JS, 400),
    ("json bad mode", "POST", "/api/predict",
     json.dumps({"image": data_url(drawing_png()), "mode": "x"}).encode(),
     JS, 400),
    ("json latin-1", "POST", "/api/predict", b'{"image": "\xff\xfe"}', JS, 400),
    ("bomb header", "FILE", "/api/predict", "bomb", {}, 413),
    ("bomb as json", "POST", "/api/activations", "bomb-json", JS, 413),
    ("huge body", "POST", "/api/predict", b"\0" * (11 * 1024 * 1024), PNG, 413),
    ("huge multipart", "FILE", "/api/predict", b"\0" * (11 * 1024 * 1024), {}, 413),
    ("GET predict", "GET", "/api/predict", None, {}, 405),
    ("PUT model", "PUT", "/api/model", b"{}", {}, 405),
    ("unknown page", "GET", "/api/nothing", None, {}, 404),
    ("static without slash", "GET", "/static", None, {}, 404),
    ("static traversal", "GET", "/static/../app.py", None, {}, 404),
    ("nested json 990", "POST", "/api/predict", b"[" * 990 + b"]" * 990, JS, 400),
    ("nested json 100k", "POST", "/api/predict", b'{"image":' * 100_000, JS, 400),
    ("long url", "GET", "/" + "a" * 9000, None, {}, 414),
    ("huge header", "GET", "/healthz", None, {"X-Big": "a" * 40_000}, 431),
    ("bad content-length", "POST", "/api/predict", None, {"Content-Length": "12x"}, 400),
]


@pytest.mark.parametrize("name,method,path,body,headers,code", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_json_4xx(server, name, method, path, body, headers, code):
    if body is None and method == "FILE":
        body = drawing_png()[:100]
    elif body == "bomb":
        body = bomb_png()
    elif body == "bomb-json":
        body = json.dumps({"image": data_url(bomb_png())}).encode()
    if method == "FILE":
        status, resp = server.post_file(path, body)
    elif "Content-Length" in headers:  # http.client would set its own
        status, resp = raw_json(server, f"{method} {path} HTTP/1.1\r\nHost: x\r\n"
                                f"Content-Length: {headers['Content-Length']}\r\n\r\n".encode())
    else:
        status, resp = server.json(method, path, body, headers)
    assert status == code, resp
    assert set(resp) == {"error"} and resp["error"] and "\n" not in resp["error"]
    assert server.json("GET", "/healthz")[0] == 200


def raw_json(server, data: bytes, timeout=10):
    """Send bytes as they are; (status, JSON body) of the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        s.sendall(data)
        r = http.client.HTTPResponse(s)
        r.begin()
        assert r.getheader("Content-Type", "").startswith("application/json")
        return r.status, json.loads(r.read())


def test_head_and_allow(server):
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    c.request("HEAD", "/healthz")
    r = c.getresponse()
    assert r.status == 200 and r.read() == b"" and int(r.getheader("Content-Length")) > 10
    c.request("DELETE", "/api/predict")
    r = c.getresponse()
    assert r.status == 405 and r.getheader("Allow") == "POST"
    assert json.loads(r.read()) == {"error": "method DELETE is not allowed here (allowed: POST)"}
    c.close()


def test_multipart_without_file_field(server):
    status, resp = server.post_file("/api/predict", drawing_png(), field="picture")
    assert status == 400 and "'file'" in resp["error"]


# concurrency ----------------------------------------------------------------------------------
def test_32_concurrent_clients_get_identical_answers(server, model_path):
    a, b = drawing_png("seven"), drawing_png("circle")
    results, errors = [None] * 64, []

    def client(i):
        try:
            img = a if i % 2 else b
            if i % 4 < 2:
                results[i] = server.post_json("/api/predict", {"image": data_url(img)})
            else:
                results[i] = server.post_file("/api/predict", img)
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
    barrier_start = time.time()
    for t in threads[:32]:
        t.start()
    for t in threads[32:]:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert time.time() - barrier_start < 60
    for parity, img in ((1, a), (0, b)):
        answers = [r for i, r in enumerate(results) if i % 2 == parity]
        assert all(s == 200 for s, _ in answers)
        first = answers[0][1]
        check_prediction(first, model_path, img)
        for _, body in answers[1:]:
            assert body["probabilities"] == first["probabilities"]
            assert body["top"] == first["top"] and body["input"] == first["input"]


# the command line ------------------------------------------------------------------------------
def test_ctrl_c_stops_cleanly(model_path):
    with serve(model_path) as s:
        pass
    assert s.proc.returncode == 0
    assert "Traceback" not in s.stderr and "Traceback" not in s.stdout
    assert f"http://127.0.0.1:{s.port}/" in s.stdout and "stopped" in s.stdout


def test_torch_engine_gives_the_same_answers(server, model_path):
    pytest.importorskip("torch")
    data = drawing_png()
    with serve(model_path, "--engine", "torch") as t:
        assert t.json("GET", "/healthz")[1]["engine"] == "torch"
        s1, b1 = t.post_json("/api/activations", {"image": data_url(data)})
    assert s1 == 200 and t.proc.returncode == 0
    _, b0 = server.post_json("/api/activations", {"image": data_url(data)})
    assert b1["top"][0]["label"] == b0["top"][0]["label"]
    np.testing.assert_allclose([b1["probabilities"][c] for c in CLASSES],
                               [b0["probabilities"][c] for c in CLASSES], atol=1e-4)
    assert [l["name"] for l in b1["layers"]] == [l["name"] for l in b0["layers"]]


def test_cli_errors_are_one_line(tmp_path, model_path, capsys):
    from cnnlab.cli import main
    assert main(["serve", str(tmp_path / "missing"), "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", str(model_path), "--port", str(busy.getsockname()[1])]) == 1
    err = capsys.readouterr().err
    assert "in use" in err and err.count("\n") == 1


def test_help_lists_options(capsys):
    from cnnlab.cli import main
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--host", "--port", "--engine", "127.0.0.1"):
        assert opt in out


def test_serves_without_torch(model_path):
    """The package never imports PyTorch for serving with the default engine."""
    code = f"""
import sys
sys.modules["torch"] = None  # any import of torch fails
from werkzeug.test import Client
from cnnlab.serve.app import create_app
from cnnlab.serve import cli, server
client = Client(create_app({str(model_path)!r}))
r = client.post("/api/activations", json={{"image": {data_url(drawing_png())!r}}})
assert r.status_code == 200 and len(r.get_json()["layers"]) == 5, r.get_data()
assert "torch" not in sys.modules or sys.modules["torch"] is None
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
