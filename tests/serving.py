"""Helpers of the server tests: a trained model file, a server process, request bodies."""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cnnlab import Sequential, zoo

SRC = Path(__file__).resolve().parents[1] / "src"
CLASSES = [str(i) for i in range(10)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def save_model(path, seed=0) -> Path:
    m = Sequential(zoo.lenet(), name="lenet").init_weights(seed)
    m.meta = {"class_names": CLASSES,
              "preprocessing": {"scale": 1 / 255, "mean": [0.0], "std": [1.0]},
              "training": {"dataset": "mnist", "epochs": 1, "test_accuracy": 0.5}}
    return m.save(path)


class Server:
    def __init__(self, proc, port):
        self.proc, self.port = proc, port

    def request(self, method, path, body=None, headers=None, timeout=30):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, r.getheader("Content-Type", ""), r.read()
        finally:
            c.close()

    def json(self, method, path, body=None, headers=None):
        status, ctype, data = self.request(method, path, body, headers)
        assert ctype.startswith("application/json"), (status, ctype, data[:200])
        return status, json.loads(data)

    def post_json(self, path, obj):
        return self.json("POST", path, json.dumps(obj).encode(),
                         {"Content-Type": "application/json"})

    def post_file(self, path, data, filename="digit.png", field="file", extra=None):
        body, ctype = multipart({field: (filename, data)}, extra or {})
        return self.json("POST", path, body, {"Content-Type": ctype})


def multipart(files, fields):
    boundary = "----cnnlabtest" + os.urandom(8).hex()
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                  f'{value}\r\n'.encode())
    for name, (filename, data) in files.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                  f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                  .encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


@contextmanager
def serve(model_path, *args, wait=60):
    """`python -m cnnlab.cli serve MODEL --port P ...`; stopped with Ctrl-C (SIGINT) at the end."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cnnlab.cli", "serve", str(model_path),
                             "--port", str(port), *args], env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server = Server(proc, port)
    deadline = time.time() + wait
    while True:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the server exited with {proc.returncode}: {out}{err}")
        try:
            if server.request("GET", "/healthz", timeout=2)[0] == 200:
                break
        except OSError:
            pass
        if time.time() > deadline:
            proc.kill()
            pytest.fail("the server did not answer /healthz in time")
        time.sleep(0.1)
    try:
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.stdout, server.stderr = proc.communicate()


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def drawing_png(kind="seven") -> bytes:
    img = Image.new("RGBA", (280, 280), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    if kind == "seven":
        d.line([(70, 60), (210, 60), (120, 230)], fill=(17, 17, 17, 255), width=20, joint="curve")
    else:
        d.ellipse((60, 50, 220, 230), outline=(17, 17, 17, 255), width=20)
    return png(img)


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def decode_png(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def bomb_png(width=50_000, height=50_000) -> bytes:
    data = bytearray(png(Image.new("L", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def expected(model_path, data: bytes):
    """What the server should answer, computed in this process."""
    from cnnlab.engines import get_engine
    from cnnlab import load
    from cnnlab.preprocess import apply, preprocessing_of
    from cnnlab.inputs import drawing
    m = load(model_path)
    x, _ = drawing.prepare(m, data)
    return x, get_engine(m, "numpy").predict_proba(apply(preprocessing_of(m), x[None]))[0]


def expected_activations(model_path, data: bytes):
    from cnnlab.engines import get_engine
    from cnnlab import load
    from cnnlab.preprocess import apply, preprocessing_of
    from cnnlab.inputs import drawing
    m = load(model_path)
    x, _ = drawing.prepare(m, data)
    return get_engine(m, "numpy").activations(apply(preprocessing_of(m), x[None]))


# fixtures ------------------------------------------------------------------------------------
